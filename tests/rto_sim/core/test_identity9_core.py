"""Property tests of docs/theory.md identity 9 (RTO limits) through the algorithm core.

- on sampled trajectories, `core.compute_rto_rewards` with beta1 = 0, or with pi_dpo = pi_ref, equals the
  PPO reward (mode "ppo"), for every redistribution mode;
- at pi = pi_ref the KL part of the reward is exactly zero;
- the exact-planning RTO reward table's DPO term is `core.dpo_token_reward` itself (clip on/off, forbidden tokens);
- exact planning: the optimum of the RTO reward table (`rto_reward_table`) with beta3 = 0 and beta1 = beta2 is
  pi_dpo (`soft_bellman` at beta = beta2), and with c = beta1 / beta2 it is prop. to pi_ref^(1-c) pi_dpo^c.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rto_sim import TokenMDP, enumerate_responses, rto_reward_table, safe_log, sample_trajectories, soft_bellman
from rto_sim.core import compute_rto_rewards, dpo_token_reward
from rto_sim.tabular_ppo import delimiter_mask

SETTINGS = settings(max_examples=25, deadline=None)
MODES = ("rto", "semi_rto", "ddpo", "rs_ppo")


@st.composite
def instance(draw):
    structure = draw(st.sampled_from(["tree", "last_token"]))
    A = draw(st.integers(2, 4))
    H = draw(st.integers(1, 4))
    eos = draw(st.booleans())
    seed = draw(st.integers(0, 2**20))
    build = TokenMDP.tree if structure == "tree" else TokenMDP.last_token_automaton
    mdp = build(A, H, n_prompts=draw(st.integers(1, 2)), eos=eos, seed=seed)
    return mdp, seed


def _tensors(mdp, traj, layered_list):
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    return [t(traj.gather(x)) for x in layered_list]


@SETTINGS
@given(instance(), st.floats(0.01, 1.0), st.floats(0.0, 2.0), st.sampled_from(MODES),
       st.sampled_from([None, 0.05, 0.5]))
def test_beta1_zero_or_dpo_equal_ref_gives_ppo(inst, beta2, beta3, mode, clip):
    mdp, seed = inst
    rng = np.random.default_rng(seed)
    policy = mdp.random_policy(seed=seed + 1)
    pi_dpo = mdp.random_policy(seed=seed + 2)
    traj = sample_trajectories(mdp, policy, 16, rng)
    logp, ref, dpo = _tensors(mdp, traj, [[safe_log(p) for p in policy], mdp.log_pi_ref, [safe_log(p) for p in pi_dpo]])
    mask = torch.as_tensor(traj.mask)
    score = torch.as_tensor(rng.standard_normal(len(traj)))
    delim = torch.as_tensor(delimiter_mask(traj.actions, 2))
    ppo = compute_rto_rewards(score, logp, ref, mask, beta2=beta2, beta3=beta3, mode="ppo").token_level_rewards
    off = compute_rto_rewards(score, logp, ref, mask, beta2=beta2, beta3=beta3, dpo_logprobs=dpo, beta1=0.0,
                              dpo_clip=clip, mode=mode, delimiter_mask=delim).token_level_rewards
    same = compute_rto_rewards(score, logp, ref, mask, beta2=beta2, beta3=beta3, dpo_logprobs=ref.clone(), beta1=0.7,
                               dpo_clip=clip, mode=mode, delimiter_mask=delim).token_level_rewards
    assert torch.equal(off, ppo)
    assert torch.equal(same, ppo)
    # and with a real DPO model the reward does differ somewhere (the test can fail)
    on = compute_rto_rewards(score, logp, ref, mask, beta2=beta2, beta3=beta3, dpo_logprobs=dpo, beta1=0.7,
                             dpo_clip=clip, mode="rto", delimiter_mask=delim).token_level_rewards
    assert not torch.equal(on, ppo)


@SETTINGS
@given(instance(), st.floats(0.01, 1.0), st.sampled_from(("k1", "k2", "k3")))
def test_kl_reward_zero_at_reference(inst, beta2, kind):
    mdp, seed = inst
    traj = sample_trajectories(mdp, mdp.pi_ref, 16, np.random.default_rng(seed))
    (ref,) = _tensors(mdp, traj, [mdp.log_pi_ref])
    mask = torch.as_tensor(traj.mask)
    terms = compute_rto_rewards(torch.zeros(len(traj), dtype=torch.float64), ref.clone(), ref, mask, beta2=beta2,
                                beta3=1.0, kl_kind=kind)
    assert torch.count_nonzero(terms.kl) == 0
    assert torch.count_nonzero(terms.token_level_rewards) == 0


@SETTINGS
@given(instance(), st.floats(0.05, 2.0), st.floats(0.3, 3.0))
def test_rto_optimum_is_dpo_policy_and_geometric_mixture(inst, beta2, c):
    mdp, seed = inst
    pi_dpo = mdp.random_policy(seed=seed + 3)
    log_dpo = [np.log(np.maximum(p, 1e-300)) for p in pi_dpo]
    # beta3 = 0, beta1 = beta2: the optimum is pi_dpo exactly (on any deterministic MDP, tree or automaton)
    table = rto_reward_table(mdp, None, log_dpo, beta1=beta2, beta3=0.0)
    sol = soft_bellman(mdp, table, beta2)
    for h in range(mdp.H):
        live = ~mdp.absorbing[h]
        assert np.allclose(sol.policy[h][live], pi_dpo[h][live], atol=1e-10, rtol=0)
    # beta3 = 0, beta1 = c beta2: sequence-level optimum prop. to pi_ref^(1-c) pi_dpo^c
    table = rto_reward_table(mdp, None, log_dpo, beta1=c * beta2, beta3=0.0)
    sol = soft_bellman(mdp, table, beta2)
    enum = enumerate_responses(mdp)
    target = (1 - c) * enum.log_prob(mdp.log_pi_ref) + c * enum.log_prob(log_dpo)
    got = enum.log_prob(sol.log_policy)
    for x in range(mdp.n_prompts):
        rows = enum.prompt == x
        t = target[rows] - np.logaddexp.reduce(target[rows])
        assert np.allclose(got[rows], t, atol=1e-9, rtol=0)


@SETTINGS
@given(instance(), st.floats(0.01, 3.0), st.sampled_from([None, 0.05, 0.5]), st.floats(0.0, 0.5))
def test_exact_dpo_reward_table_is_the_core_dpo_token_reward(inst, beta1, clip, p_forbid):
    """The exact-planning table's DPO term is `core.dpo_token_reward` (one definition of the clipped DPO token
    reward), bit for bit, with tokens pi_ref forbids (log pi_ref = -inf, also -inf under pi_dpo) at 0; and it
    equals the numpy formula clip(beta1 (log pi_dpo - log pi_ref), -c, c) it replaced."""
    mdp, seed = inst
    rng = np.random.default_rng(seed)
    pi_ref = []
    for h, p in enumerate(mdp.random_policy(seed=seed + 1)):
        keep = rng.random(p.shape) >= p_forbid
        keep[np.arange(len(p)), rng.integers(0, mdp.A, len(p))] = True      # at least one allowed token
        keep[mdp.absorbing[h]] = True                                        # delta_EOS stays
        q = np.where(keep, p, 0.0)
        pi_ref.append(q / q.sum(axis=1, keepdims=True))
    mdp = mdp.with_reference(pi_ref)
    log_dpo = [np.where(lr > -np.inf, safe_log(p), -np.inf)
               for lr, p in zip(mdp.log_pi_ref, mdp.random_policy(seed=seed + 2))]
    table = rto_reward_table(mdp, None, log_dpo, beta1=beta1, beta3=0.0, clip=clip)
    for h in range(mdp.H):
        allowed = mdp.log_pi_ref[h] > -np.inf
        live = ~mdp.absorbing[h]
        dpo, ref = np.where(allowed, log_dpo[h], 0.0), np.where(allowed, mdp.log_pi_ref[h], 0.0)
        core_r = dpo_token_reward(torch.as_tensor(dpo), torch.as_tensor(ref), torch.as_tensor(allowed), beta1,
                                  clip).numpy()
        d = beta1 * (dpo - ref)
        numpy_r = np.where(allowed, d if clip is None else np.clip(d, -clip, clip), 0.0)
        assert np.array_equal(table[h][live], core_r[live]) and np.array_equal(table[h][live], numpy_r[live])
        assert np.all(table[h][~allowed] == 0.0) and np.all(table[h][~live] == 0.0)
