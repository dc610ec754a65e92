"""The exact engine at its boundary (issue 12): non-finite inputs and results raise a ValueError naming the input
(beta too small for the reward scale, NaN in theta / a reward / a policy) instead of warning, and MDPs too large
for memory are refused before any table is allocated."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from rto_sim import TokenMDP, draw_theta, evaluate, make_features, return_moments, rto_reward_table, soft_bellman
from rto_sim import mdp as mdp_module
from rto_sim.exact import implicit_token_reward, sub_optimality


@pytest.fixture
def inst():
    m = TokenMDP.tree(A=3, H=4, eos=True, seed=0)
    phi = make_features(m, "unigram")
    return m, phi, phi.token_reward(draw_theta(m, phi, return_var=0.25, seed=1))


@pytest.fixture(autouse=True)
def warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # "raise, not warn": a RuntimeWarning fails the test
        yield


def test_tiny_beta_overflow_names_beta_and_the_reward_scale(inst):
    m, phi, r = inst
    big = [x * 1e3 for x in r]
    with pytest.raises(ValueError, match=r"beta=1e-308: beta is too small for the reward scale .* use beta >="):
        soft_bellman(m, big, 1e-308)
    with pytest.raises(ValueError, match="beta is too small"):
        sub_optimality(m, m.pi_ref, big, 1e-308)
    sol = soft_bellman(m, r, 1e-7)              # small but representable: fine
    assert all(np.isfinite(v).all() for v in sol.V)


@pytest.mark.parametrize("beta", ["a", None, True, float("nan"), float("inf"), 0.0, -1.0])
def test_bad_beta_is_a_value_error(inst, beta):
    m, _, r = inst
    with pytest.raises(ValueError, match="beta"):
        soft_bellman(m, r, beta)
    with pytest.raises(ValueError, match="beta"):
        implicit_token_reward(m, m.pi_ref, beta)
    if beta not in (0.0,):
        with pytest.raises(ValueError, match="beta"):
            evaluate(m, m.pi_ref, r, beta)


def test_nan_in_theta_reward_or_policy_is_named(inst):
    m, phi, r = inst
    with pytest.raises(ValueError, match=r"theta has NaN or infinite entries at indices \[1\]"):
        phi.token_reward(np.array([0.1, np.nan, 0.2]))
    with pytest.raises(ValueError, match=r"theta must be a vector"):
        phi.token_reward(["a", "b", "c"])
    bad = [x.copy() for x in r]
    bad[2][1, 0] = np.nan
    with pytest.raises(ValueError, match=r"reward\[2\] has non-finite entries \(nan at state 1, token 0\)"):
        soft_bellman(m, bad, 0.5)
    pol = [p.copy() for p in m.pi_ref]
    pol[1][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"policy\[1\] has negative or non-finite entries"):
        evaluate(m, pol, r, 0.5)
    with pytest.raises(ValueError, match=r"log_pi_dpo\[0\] holds NaN"):
        rto_reward_table(m, r, [np.full((n, m.A), np.nan) for n in m.n_states], beta1=0.1)
    for name, kw in (("beta1", {"beta1": float("nan")}), ("beta3", {"beta3": float("inf")}),
                     ("clip", {"clip": float("nan")})):
        with pytest.raises(ValueError, match=name):
            rto_reward_table(m, r, **kw)


def test_overflowing_results_raise_and_name_the_reward(inst):
    m, phi, _ = inst
    huge = phi.token_reward(np.full(phi.d, 1e308))
    with pytest.raises(ValueError, match="expected return overflows: the reward scale"):
        evaluate(m, m.pi_ref, huge, 0.5)
    with pytest.raises(ValueError, match="return variance overflows"):
        return_moments(m, m.pi_ref, phi.token_reward(np.full(phi.d, 1e200)))
    with pytest.raises(ValueError, match="overflows"):
        soft_bellman(m, huge, 0.5)


def test_infinite_kl_names_the_forbidden_token():
    ref = TokenMDP.tree(A=3, H=2, seed=0).pi_ref
    ref[0][0] = [0.5, 0.5, 0.0]
    m = TokenMDP.tree(A=3, H=2, seed=0, pi_ref=ref)
    pol = [np.full((n, 3), 1 / 3) for n in m.n_states]
    r = [np.zeros((n, 3)) for n in m.n_states]
    with pytest.raises(ValueError, match=r"KL\(policy \|\| pi_ref\) is infinite: policy\[0\] puts mass on token 2"):
        evaluate(m, pol, r, 0.5)
    with pytest.raises(ValueError, match="RTO reward is not finite"):
        rto_reward_table(m, r, [np.tile([-np.inf, np.log(0.5), np.log(0.5)], (n, 1)) for n in m.n_states], beta1=0.1)


@pytest.mark.parametrize("build, match", [
    (lambda: TokenMDP.tree(A=2, H=40), r"TokenMDP.tree\(A=2, H=40.* more than the limit MAX_TABLE_ENTRIES"),
    (lambda: TokenMDP.tree(A=50_000, H=3), "MAX_TABLE_ENTRIES"),
    (lambda: TokenMDP.tree(A=3, H=10**9), "MAX_HORIZON"),
    (lambda: TokenMDP.tree(A=2, H=10**6, eos=True), "MAX_HORIZON"),
    (lambda: TokenMDP.last_token_automaton(A=100, H=50_000, n_prompts=100), "MAX_TABLE_ENTRIES"),
    (lambda: TokenMDP.position(A=3, H=10**7), "MAX_HORIZON"),
])
def test_mdps_too_large_for_memory_are_refused_before_allocating(build, match):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match) as e:
        build()
    assert time.perf_counter() - t0 < 2.0                 # refused up front, nothing was built
    assert "states" in str(e.value) or "layers" in str(e.value)


def test_a_growing_automaton_is_refused_before_the_layer_that_breaks_the_limit(monkeypatch):
    monkeypatch.setattr(mdp_module, "MAX_TABLE_ENTRIES", 4_000)
    calls = []

    def step(q, a):
        calls.append(1)
        return q + (a,)                        # the prefix tree, built through the generic automaton path
    with pytest.raises(ValueError, match=r"from_automaton\(A=4, H=12\) \(layer \d+ may reach"):
        TokenMDP.from_automaton(A=4, H=12, initial=[()], step=step)
    assert len(calls) < 4_000
    TokenMDP.from_automaton(A=4, H=3, initial=[()], step=lambda q, a: q + (a,))    # small: fine
