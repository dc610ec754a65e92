"""Tests for rto_sim.tabular_ppo: PPO with the RTO reward on tabular policies (docs/practice.md section 4
invariants, in the simulator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rto_sim import TokenMDP, draw_theta, evaluate, make_features, soft_bellman
from rto_sim import core as core_mod
from rto_sim.gym_env import TokenMDPVectorEnv
from rto_sim.tabular_ppo import (
    SCHEMES,
    TabularPolicy,
    TabularPPOConfig,
    TabularPPOTrainer,
    delimiter_mask,
    scheme_reward_table,
    train_ppo,
)


@pytest.fixture(scope="module")
def toy():
    mdp = TokenMDP.tree(A=3, H=3, eos=True, n_prompts=2, seed=3)
    phi = make_features(mdp, "positional")
    r = phi.token_reward(draw_theta(mdp, phi, return_var=1.0, seed=4))
    log_dpo = soft_bellman(mdp, r, 0.1).log_policy
    return mdp, r, log_dpo


def test_vector_env_is_gymnasium_and_masks_through_first_eos(toy):
    import gymnasium as gym

    mdp, r, _ = toy
    env = TokenMDPVectorEnv(mdp, num_envs=6, reward=r)
    assert isinstance(env, gym.vector.VectorEnv)
    obs, info = env.reset(seed=0)
    assert obs.shape == (6,) and np.array_equal(info["state"], info["prompt"])
    eos = mdp.eos
    actions = np.array([[eos, 0, 0], [0, eos, 1], [0, 1, eos], [1, 1, 1], [eos, eos, eos], [0, 0, 0]])
    valid, rewards, states = [], [], []
    for h in range(mdp.H):
        obs, rew, term, trunc, info = env.step(actions[:, h])
        valid.append(info["valid"])
        rewards.append(rew)
        states.append(info["state"])
        assert term.all() == (h == mdp.H - 1)
    valid = np.stack(valid, 1)
    expected = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]], bool)
    assert np.array_equal(valid, expected)
    # rewards on masked (absorbing) steps are 0; valid ones equal the table
    states = np.stack(states, 1)
    table = np.stack([r[h][states[:, h], actions[:, h]] for h in range(mdp.H)], 1)
    assert np.allclose(np.stack(rewards, 1), np.where(expected, table, 0.0))
    # next step after termination auto-resets
    obs, rew, term, _, info = env.step(np.zeros(6, int))
    assert np.all(rew == 0) and "prompt" in info


def test_policy_initialized_at_reference_and_zero_kl(toy):
    mdp, r, log_dpo = toy
    pol = TabularPolicy(mdp)
    for a, b in zip(pol.layered_policy(), mdp.pi_ref):
        assert np.allclose(a, b, atol=1e-14)
    tr = TabularPPOTrainer(mdp, r, r, log_dpo, TabularPPOConfig(mode="rto", batch_size=32, n_updates=1))
    ev = tr.evaluate()
    assert abs(ev["kl_ref"]) < 1e-12
    roll = tr.make_experience()
    # at pi = pi_ref the per-token k1 KL reward is exactly zero on every token
    assert torch.count_nonzero(roll.terms.kl) == 0
    assert torch.equal(roll.terms.non_score_rewards, torch.zeros_like(roll.terms.kl))


def test_first_minibatch_ratio_exactly_one(toy):
    mdp, r, log_dpo = toy
    res = train_ppo(mdp, r, r, log_dpo, mode="rto", batch_size=64, n_updates=3, seed=1)
    # max |rho - 1| on the first minibatch of every update: pi == pi_old bit for bit
    assert [row["ratio_first"] for row in res.curve[1:]] == [0.0, 0.0, 0.0]


def test_rewards_are_built_only_through_core(toy, monkeypatch):
    mdp, r, log_dpo = toy
    calls = []
    real = core_mod.compute_rto_rewards

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(core_mod, "compute_rto_rewards", spy)
    tr = TabularPPOTrainer(mdp, r, r, log_dpo, TabularPPOConfig(mode="semi_rto", beta1=0.3, batch_size=16))
    roll = tr.make_experience()
    assert len(calls) == 1
    kwargs, out = calls[0]
    assert kwargs["mode"] == "semi_rto" and kwargs["beta1"] == 0.3 and kwargs["beta2"] == tr.cfg.beta2
    assert roll.terms is out
    # the advantages are GAE of exactly those rewards (then whitened)
    adv, _ = core_mod.gae_advantages(out.token_level_rewards, roll.values, roll.mask, gamma=1.0, lam=0.95)
    assert torch.allclose(roll.advantages, core_mod.masked_whiten(adv, roll.mask))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ppo_improves_true_objective_with_exact_reward(scheme):
    """A real optimization test: on a tiny tree with the TRUE reward as the RM and the exact DPO policy,
    every scheme (reward mode and advantage estimator) closes >= 80% of the gap between pi_ref and the best
    achievable J in 25 updates."""
    mdp = TokenMDP.tree(A=3, H=3, eos=False, seed=11)
    phi = make_features(mdp, "positional")
    r = phi.token_reward(draw_theta(mdp, phi, return_var=1.0, seed=12))
    beta2 = 0.1
    log_dpo = soft_bellman(mdp, r, 0.1).log_policy
    res = train_ppo(mdp, r, r, log_dpo, **SCHEMES[scheme], beta2=beta2, batch_size=128, n_updates=25, seed=0)
    J0 = res.curve[0]["J_true"]
    J_final = np.mean([row["J_true"] for row in res.curve[-3:]])
    # the best this scheme can do for J_true: the exact-planning optimum of its own reward table
    table, spread = scheme_reward_table(mdp, SCHEMES[scheme]["mode"], r, log_dpo, beta1=0.05)
    assert spread == 0.0
    J_plan = evaluate(mdp, soft_bellman(mdp, table, beta2).policy, r, beta2).J
    assert J_plan > J0 + 0.3
    assert (J_final - J0) / (J_plan - J0) > 0.8


def test_same_seed_same_curve_and_different_seed_differs(toy):
    mdp, r, log_dpo = toy
    a = train_ppo(mdp, r, r, log_dpo, mode="rto", batch_size=32, n_updates=4, seed=5).curve
    b = train_ppo(mdp, r, r, log_dpo, mode="rto", batch_size=32, n_updates=4, seed=5).curve
    c = train_ppo(mdp, r, r, log_dpo, mode="rto", batch_size=32, n_updates=4, seed=6).curve
    assert [x["J_true"] for x in a] == [x["J_true"] for x in b]
    assert [x["J_true"] for x in a][1:] != [x["J_true"] for x in c][1:]


def test_beta1_zero_gives_the_ppo_curve(toy):
    """Identity 9 through the whole trainer: beta1 = 0 switches the DPO term off, so RTO == PPO."""
    mdp, r, log_dpo = toy
    a = train_ppo(mdp, r, r, log_dpo, mode="rto", beta1=0.0, batch_size=32, n_updates=4, seed=2).curve
    b = train_ppo(mdp, r, r, log_dpo, mode="ppo", beta1=0.0, batch_size=32, n_updates=4, seed=2).curve
    assert [x["J_true"] for x in a] == [x["J_true"] for x in b]


def test_reinforce_pp_has_no_critic(toy):
    mdp, r, log_dpo = toy
    cfg = TabularPPOConfig(**SCHEMES["rto_reinforce++"], batch_size=16)
    assert (cfg.mode, cfg.advantage_estimator) == ("rto", "reinforce++")
    tr = TabularPPOTrainer(mdp, r, r, log_dpo, cfg)
    roll = tr.make_experience()
    assert tr.critic is None and roll.values is None
    adv, _ = core_mod.reinforce_plus_plus_advantages(roll.terms.token_level_rewards, roll.mask)
    assert torch.equal(adv, roll.advantages)


def test_delimiters_and_config_validation():
    acts = np.zeros((2, 5), int)
    assert delimiter_mask(acts, segment_length=2)[0].tolist() == [False, True, False, True, False]
    acts[1, 2] = 1
    assert delimiter_mask(acts, delimiter_token=1)[1].tolist() == [False, False, True, False, False]
    with pytest.raises(ValueError, match="mode"):
        TabularPPOConfig(mode="nope")
    with pytest.raises(ValueError, match="advantage_estimator"):
        TabularPPOConfig(advantage_estimator="vtrace")
    with pytest.raises(ValueError, match="beta2"):
        TabularPPOConfig(beta2=0.0)
    with pytest.raises(ValueError, match="beta1"):
        TabularPPOConfig(beta1=-1.0)


def test_missing_dpo_policy_is_an_error(toy):
    mdp, r, _ = toy
    with pytest.raises(ValueError, match="log_pi_dpo"):
        TabularPPOTrainer(mdp, r, r, None, TabularPPOConfig(mode="rto", beta1=0.05))
    TabularPPOTrainer(mdp, r, r, None, TabularPPOConfig(mode="ppo"))   # PPO needs no DPO model
