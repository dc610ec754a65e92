"""Stochastic transitions (rto_sim/stochastic.py): exact recursions, RTO Proposition C.2 and the residual of
the DPO identity (docs/theory.md identity 2 holds only in expectation over s')."""

import numpy as np
import pytest

from rto_sim.exact import argmax_policy, evaluate, soft_bellman
from rto_sim.mdp import TokenMDP
from rto_sim.stochastic import (
    PROPOSITION_C2_PAPER,
    StochasticMDP,
    all_sequences,
    bellman_optimal,
    best_predetermined,
    dpo_residuals,
    evaluate_markov,
    markov_predetermined_gap,
    predetermined_returns,
    proposition_c2,
    proposition_c2_instance,
    random_reward,
    residual_check,
    soft_bellman_stochastic,
)


def _instance(seed=0, A=3, n_states=(2, 4, 3, 3), **kw):
    mdp = StochasticMDP.random(A, list(n_states), seed=seed, **kw)
    return mdp, random_reward(mdp, seed=seed + 1)


# ---------------------------------------------------------------------- Proposition C.2
def test_proposition_c2_values():
    markov, pre = proposition_c2()
    assert markov == pytest.approx(PROPOSITION_C2_PAPER[0], abs=1e-12)
    assert pre == pytest.approx(PROPOSITION_C2_PAPER[1], abs=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_proposition_c2_closed_form(p):
    """Best predetermined = max(p, 1 - p) for any branching probability; the Markov value is always 1."""
    markov, pre = proposition_c2(p)
    assert markov == pytest.approx(1.0, abs=1e-12)
    assert pre == pytest.approx(max(p, 1 - p), abs=1e-12)


def test_proposition_c2_check_fails_on_deterministic_transitions():
    """The check can fail: with deterministic transitions (p = 1) the predetermined value is 1, not 0.5."""
    markov, pre = proposition_c2(1.0)
    assert abs(pre - PROPOSITION_C2_PAPER[1]) > 0.4
    assert markov == pre


def test_proposition_c2_instance_layout():
    mdp, r = proposition_c2_instance()
    assert mdp.n_states == [1, 2] and mdp.A == 2 and mdp.H == 2 and not mdp.is_deterministic
    opt = bellman_optimal(mdp, r)
    np.testing.assert_array_equal(opt.policy[1], np.eye(2))   # s1 -> action 0, s2 -> action 1


# ---------------------------------------------------------------------- predetermined policies
def test_predetermined_returns_equal_time_only_markov_policies():
    """Independent computation: an open-loop sequence is the Markov policy 'play a_h in every state of
    layer h'; its backward-recursion value must equal the forward enumeration, start by start."""
    mdp, r = _instance(seed=3)
    G = predetermined_returns(mdp, r)
    seqs = all_sequences(mdp.A, mdp.H)
    assert G.shape == (mdp.n_states[0], len(seqs))
    for j, seq in enumerate(seqs):
        pol = [np.tile(np.eye(mdp.A)[a], (n, 1)) for a, n in zip(seq, mdp.n_states)]
        val = evaluate_markov(mdp, pol, r)
        np.testing.assert_allclose(G[:, j], val.J_per_start, atol=1e-12)


def test_markov_dominates_predetermined_and_gap_on_random_stochastic():
    for seed in range(5):
        mdp, r = _instance(seed=seed)
        markov, pre = markov_predetermined_gap(mdp, r)
        assert markov >= pre - 1e-12
    mdp, r = _instance(seed=0)
    markov, pre = markov_predetermined_gap(mdp, r)
    assert markov - pre > 1e-3           # generic stochastic instance: a strict gap


def test_predetermined_equals_markov_on_deterministic_tree():
    """Deterministic transitions: an open-loop sequence is a response, so both optima coincide and equal the
    token MDP's argmax return."""
    tok = TokenMDP.tree(A=3, H=3, n_prompts=2, eos=True, seed=4)
    rng = np.random.default_rng(5)
    r = tok.check_reward([rng.standard_normal((n, tok.A)) for n in tok.n_states])
    mdp = StochasticMDP.from_token_mdp(tok)
    markov, pre = markov_predetermined_gap(mdp, r)
    best = evaluate(tok, argmax_policy(tok, r), r).expected_return
    assert markov == pytest.approx(best, abs=1e-12)
    assert pre == pytest.approx(best, abs=1e-12)


def test_predetermined_respects_forbidden_actions():
    mdp, r = proposition_c2_instance()
    lp = [x.copy() for x in mdp.log_pi_ref]
    lp[1][0] = [-np.inf, 0.0]        # pi_ref forbids action 0 in s1
    mdp2 = StochasticMDP(A=2, rho=mdp.rho, P=mdp.P, log_pi_ref=lp)
    G = predetermined_returns(mdp2, r)
    seqs = all_sequences(2, 2)
    assert np.all(np.isneginf(G[0, seqs[:, 1] == 0]))
    assert best_predetermined(mdp2, r).value == pytest.approx(0.5)
    assert bellman_optimal(mdp2, r).value == pytest.approx(0.5)


# ---------------------------------------------------------------------- soft Bellman
def test_soft_bellman_matches_exact_on_deterministic_instances():
    for seed, structure in [(0, "tree"), (1, "last_token")]:
        tok = (TokenMDP.tree if structure == "tree" else TokenMDP.last_token_automaton)(
            A=3, H=4, n_prompts=2, eos=bool(seed % 2 == 0), seed=seed)
        rng = np.random.default_rng(seed + 10)
        r = tok.check_reward([rng.standard_normal((n, tok.A)) for n in tok.n_states])
        a = soft_bellman(tok, r, 0.7)
        b = soft_bellman_stochastic(StochasticMDP.from_token_mdp(tok), r, 0.7)
        for h in range(tok.H):
            np.testing.assert_allclose(b.V[h], a.V[h], atol=1e-10, rtol=0)
            np.testing.assert_allclose(np.exp(b.log_policy[h]), np.exp(a.log_policy[h]), atol=1e-10, rtol=0)


def test_soft_optimum_value_and_kl_gap():
    """J(pi*) = rho V*(s_1); every other Markov policy loses exactly beta E_pi sum_h KL(pi || pi*)."""
    mdp, r = _instance(seed=2)
    beta = 0.6
    sol = soft_bellman_stochastic(mdp, r, beta)
    J_star = evaluate_markov(mdp, sol.policy, r, beta).J
    assert J_star == pytest.approx(float(mdp.rho @ sol.V[0]), abs=1e-12)
    rng = np.random.default_rng(0)
    star_as_ref = StochasticMDP(A=mdp.A, rho=mdp.rho, P=mdp.P, log_pi_ref=sol.log_policy)
    zero = [np.zeros((n, mdp.A)) for n in mdp.n_states]
    for _ in range(3):
        pol = [rng.dirichlet(np.ones(mdp.A), size=n) for n in mdp.n_states]
        J = evaluate_markov(mdp, pol, r, beta).J
        kl_to_star = evaluate_markov(star_as_ref, pol, zero).kl
        assert J_star - J == pytest.approx(beta * kl_to_star, abs=1e-10)
        assert J < J_star


def test_soft_small_beta_tends_to_bellman_optimal():
    mdp, r = _instance(seed=1)
    hard = bellman_optimal(mdp, r).value
    soft = soft_bellman_stochastic(mdp, r, 1e-6)
    assert evaluate_markov(mdp, soft.policy, r).expected_return == pytest.approx(hard, abs=1e-4)


# ---------------------------------------------------------------------- the residual (*)
def test_residual_mean_zero_pointwise_nonzero():
    mdp, r = _instance(seed=0)
    res = dpo_residuals(mdp, r, beta=0.5)
    assert res.max_abs_mean < 1e-12
    assert res.max_abs_pointwise > 1e-2
    # pointwise residual = E[V*(s')|s,a] - V*(s'), checked independently in layer 0
    sol = soft_bellman_stochastic(mdp, r, 0.5)
    expect = (mdp.P[0] @ sol.V[1])[:, :, None] - sol.V[1][None, None, :]
    m = mdp.P[0] > 0
    np.testing.assert_allclose(res.pointwise[0][m], expect[m], atol=1e-12)


def test_residual_zero_on_deterministic_transitions():
    out = residual_check(seed=0)
    assert out["stochastic_mean"] < 1e-12 and out["stochastic_pointwise"] > 1e-2
    assert out["deterministic_mean"] < 1e-12 and out["deterministic_pointwise"] < 1e-12
    assert out["deterministic_vs_exact"] < 1e-10


def test_residual_check_fails_on_wrong_policies():
    """The mean-residual check must fail (a) for pi_ref instead of pi*, and (b) for a planner that backs up
    the realized (here: the largest) successor value instead of its expectation."""
    mdp, r = _instance(seed=0)
    beta = 0.5
    assert dpo_residuals(mdp, r, beta, log_policy=mdp.log_pi_ref).max_abs_mean > 1e-2
    wrong = []
    V_next = None
    for h in range(mdp.H - 1, -1, -1):
        nxt = np.zeros((mdp.n_states[h], mdp.A)) if h == mdp.H - 1 else \
            np.where(mdp.P[h] > 0, V_next[None, None, :], -np.inf).max(axis=2)
        z = mdp.log_pi_ref[h] + (r[h] + nxt) / beta
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        wrong.insert(0, z - lse[:, None])
        V_next = beta * lse
    assert dpo_residuals(mdp, r, beta, log_policy=wrong).max_abs_mean > 1e-2


# ---------------------------------------------------------------------- validation
def test_validation_errors():
    mdp, _ = proposition_c2_instance()
    with pytest.raises(ValueError, match="sum to 1"):
        StochasticMDP(A=2, rho=[1.0], P=[np.full((1, 2, 2), 0.4)], log_pi_ref=mdp.log_pi_ref)
    with pytest.raises(ValueError, match=r"P\[0\] must have shape"):
        StochasticMDP(A=2, rho=[1.0], P=[np.full((1, 2, 3), 1 / 3)], log_pi_ref=mdp.log_pi_ref)
    with pytest.raises(ValueError, match="H-1"):
        StochasticMDP(A=2, rho=[1.0], P=[], log_pi_ref=mdp.log_pi_ref)
    with pytest.raises(ValueError, match="rho"):
        StochasticMDP(A=2, rho=[0.5], P=mdp.P, log_pi_ref=mdp.log_pi_ref)
    with pytest.raises(ValueError, match="p"):
        proposition_c2_instance(1.5)
    with pytest.raises(ValueError, match="too large"):
        predetermined_returns(*_instance(A=3, n_states=(1, 2, 2, 2)), max_entries=10)
