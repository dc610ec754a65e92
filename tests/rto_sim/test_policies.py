"""rto_sim.policies: the log-linear actor, the critics, and the exact objective / gradient / advantage that E7 compares
PPO's estimators with (each against an independent computation: finite differences, exact.evaluate,
soft_bellman, Monte Carlo)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rto_sim import TokenMDP, draw_theta, evaluate, make_features, soft_bellman
from rto_sim.mdp import safe_log
from rto_sim.policies import (
    LinearCritic,
    LogLinearPolicy,
    MultiEvaluator,
    TabularCritic,
    TabularPolicy,
    class_optimum,
    critic_features,
    exact_advantage,
    exact_gradient,
    exact_objective,
    make_actor,
    make_critic,
)
from rto_sim.sampling import sample_trajectories
from rto_sim.tabular_ppo import TabularPPOConfig, TabularPPOTrainer


def _setup(kind="last_token", eos=True, A=3, H=4, seed=0):
    build = TokenMDP.tree if kind == "tree" else TokenMDP.last_token_automaton
    mdp = build(A, H, n_prompts=2, eos=eos, seed=seed)
    phi = make_features(mdp, "bigram")
    r = phi.token_reward(draw_theta(mdp, phi, return_var=1.0, seed=seed + 1))
    return mdp, phi, r


def _random_w(pol, seed):
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(torch.as_tensor(np.random.default_rng(seed).normal(0, 0.7, p.shape)))
    return pol


@pytest.mark.parametrize("kind, eos", [("tree", True), ("last_token", True), ("last_token", False)])
def test_exact_objective_equals_exact_evaluate(kind, eos):
    mdp, phi, r = _setup(kind, eos)
    for pol in (_random_w(LogLinearPolicy(mdp, [phi, make_features(mdp, "positional")]), 1),
                _random_w(TabularPolicy(mdp), 2)):
        J_torch = float(exact_objective(mdp, pol, r, 0.3).detach())
        J_np = evaluate(mdp, pol.layered_policy(), r, 0.3).J
        assert abs(J_torch - J_np) < 1e-12
        ret, kl = MultiEvaluator(mdp, [r, [2 * x for x in r]])(pol.layered_policy())
        ev = evaluate(mdp, pol.layered_policy(), r, 0.3)
        assert abs(ret[0] - ev.expected_return) < 1e-12 and abs(ret[1] - 2 * ev.expected_return) < 1e-12
        assert abs(kl - ev.kl) < 1e-12


def test_loglinear_gradient_matches_finite_differences():
    """The actor's exact policy gradient (torch autograd through the occupancy recursion) against central finite
    differences of J computed by the numpy recursion (exact.evaluate): two independent computations."""
    mdp, phi, r = _setup("last_token", True)
    pol = _random_w(LogLinearPolicy(mdp, phi), 3)
    g = exact_gradient(mdp, pol, r, 0.2).numpy()
    eps = 1e-6
    fd = np.zeros_like(g)
    for i in range(len(g)):
        vals = []
        for s in (eps, -eps):
            with torch.no_grad():
                pol.w[i] += s
            vals.append(evaluate(mdp, pol.layered_policy(), r, 0.2).J)
            with torch.no_grad():
                pol.w[i] -= s
        fd[i] = (vals[0] - vals[1]) / (2 * eps)
    assert np.abs(g - fd).max() < 1e-7 * max(1.0, np.abs(g).max())
    assert np.abs(g).max() > 1e-3                          # a real gradient, not zero
    # and the per-token log-probabilities' gradient (what the PPO loss uses) against finite differences too
    flat = torch.tensor([[0, 3, 5]])
    act = torch.tensor([[1, 0, 2]])
    lp = pol.log_probs(flat, act).sum()
    (gl,) = torch.autograd.grad(lp, pol.w)
    fd2 = np.zeros(pol.d)
    for i in range(pol.d):
        with torch.no_grad():
            pol.w[i] += eps
            up = float(pol.log_probs(flat, act).sum())
            pol.w[i] -= 2 * eps
            dn = float(pol.log_probs(flat, act).sum())
            pol.w[i] += eps
        fd2[i] = (up - dn) / (2 * eps)
    assert np.abs(gl.numpy() - fd2).max() < 1e-7


def test_class_optimum_of_the_tabular_class_is_soft_bellman():
    mdp, _, r = _setup("last_token", True)
    J, lp = class_optimum(mdp, TabularPolicy(mdp), r, 0.2, max_iter=500, tol=1e-10)
    star = soft_bellman(mdp, r, 0.2)
    assert abs(J - float(mdp.rho @ star.V[0])) < 1e-6             # an optimizer: docs/theory.md section 2
    # a log-linear class is smaller: its optimum is not above the global one, and above pi_ref
    J_ll, _ = class_optimum(mdp, LogLinearPolicy(mdp, make_features(mdp, "unigram")), r, 0.2)
    assert evaluate(mdp, mdp.pi_ref, r, 0.2).J < J_ll <= J + 1e-10


def test_exact_advantage_has_zero_mean_and_matches_monte_carlo():
    """A^pi(s, a) against Monte Carlo: E[G_t | s_t, a_t] - E[G_t | s_t] from sampled trajectories, with the per-token
    reward r - beta log(pi/pi_ref) that PPO's estimators see."""
    mdp, phi, r = _setup("last_token", True, A=3, H=3, seed=4)
    beta = 0.3
    pol = _random_w(LogLinearPolicy(mdp, phi), 5).layered_policy()
    A = exact_advantage(mdp, pol, r, beta)
    for h in range(mdp.H):
        assert np.abs((pol[h] * A[h]).sum(axis=1)).max() < 1e-12
    rng = np.random.default_rng(0)
    n = 200_000
    tr = sample_trajectories(mdp, pol, n, rng)
    logr = np.where(tr.mask, tr.gather([safe_log(p) for p in pol]) - tr.gather(mdp.log_pi_ref), 0.0)
    rew = tr.gather(r) - beta * logr
    G = np.cumsum(rew[:, ::-1], axis=1)[:, ::-1]            # reward-to-go
    checked = 0
    for h in range(mdp.H):
        m = tr.mask[:, h]
        s, a, g = tr.states[m, h], tr.actions[m, h], G[m, h]
        for si in np.unique(s):
            in_s = s == si
            v = g[in_s].mean()
            for ai in np.unique(a[in_s]):
                sel = in_s & (a == ai)
                if sel.sum() < 2000:
                    continue
                mc = g[sel].mean() - v
                se = g[sel].std() / np.sqrt(sel.sum()) + g[in_s].std() / np.sqrt(in_s.sum())
                assert abs(mc - A[h][si, ai]) < 5 * se + 1e-3, (h, si, ai, mc, A[h][si, ai])
                checked += 1
    assert checked >= 10


def test_critics_and_their_features():
    mdp, _, _ = _setup("last_token", True, A=3, H=4)
    f = critic_features(mdp, "position_last_token")
    S = int(mdp.flat_offsets()[-1])
    assert f.shape == (S, mdp.H + mdp.A + 1) and np.allclose(f.sum(axis=1), 2.0)
    assert critic_features(mdp, "position").shape == (S, mdp.H)
    c = make_critic(mdp, "position_last_token", init=np.arange(S, dtype=float))
    assert isinstance(c, LinearCritic)
    states = torch.arange(S)
    assert torch.equal(c(states), torch.arange(S, dtype=torch.float64))       # w = 0: the offset
    t = TabularCritic(mdp, init=[np.full(n, 2.0) for n in mdp.n_states])
    assert torch.all(t(states) == 2.0)
    assert make_critic(mdp, "none") is None
    with pytest.raises(ValueError, match="critic"):
        make_critic(mdp, "deep")
    with pytest.raises(ValueError, match="features"):
        make_actor(mdp, "loglinear")


def test_trainer_with_loglinear_actor_and_linear_critic_starts_at_pi_ref():
    mdp, phi, r = _setup("last_token", True)
    log_dpo = soft_bellman(mdp, r, 0.1).log_policy
    cfg = TabularPPOConfig(mode="rto", batch_size=16, n_updates=3, epochs=2, n_minibatches=2)
    tr = TabularPPOTrainer(mdp, r, r, log_dpo, cfg, policy=LogLinearPolicy(mdp, phi),
                           critic=make_critic(mdp, "position_last_token"), eval_rewards={"true_again": r})
    assert abs(tr.evaluate()["kl_ref"]) < 1e-12
    roll = tr.make_experience()
    assert torch.count_nonzero(roll.terms.kl) == 0
    res = tr.train()
    assert [row["ratio_first"] for row in res.curve[1:]] == [0.0, 0.0, 0.0]
    assert all(abs(row["J_true_again"] - row["J_true"]) < 1e-12 for row in res.curve)
    assert res.curve[-1]["kl_ref"] > 0                                   # it moved
    with pytest.raises(ValueError, match="critic"):
        TabularPPOTrainer(mdp, r, r, log_dpo, TabularPPOConfig(advantage_estimator="reinforce++"),
                          critic=make_critic(mdp, "tabular"))
