"""Tests for rto_sim.pessimism: Algorithm 1, the Appendix B.1 max-min planner, Theorem 4.2 and rho."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from rto_sim import TokenMDP, draw_theta, enumerate_responses, make_features, soft_bellman, sub_optimality
from rto_sim.exact import sequence_kl
from rto_sim.learners import fit_token_mle
from rto_sim.pessimism import (
    ConfidenceSet,
    asymptotic_rho,
    bootstrap_radii,
    calibrate_rho,
    expected_features,
    feature_bonus,
    greedy_policy,
    identifiable_basis,
    layered_kl,
    maxmin_objective,
    maxmin_policy,
    pessimistic_policy,
    pessimistic_reward,
    theorem42_bound,
    theory_rho,
)
from rto_sim.preferences import sample_preferences


def problem(A=3, H=3, kind="random", d=5, N=200, seed=0, n_prompts=1, ridge=1e-3):
    mdp = TokenMDP.tree(A, H, n_prompts=n_prompts, seed=seed)
    feats = make_features(mdp, kind, d=d, seed=seed + 1)
    theta = draw_theta(mdp, feats, seed=seed + 2)
    r = feats.token_reward(theta)
    data = sample_preferences(mdp, r, N, seed=seed + 3)
    fit = fit_token_mle(data, feats, ridge=ridge)
    return mdp, feats, theta, r, data, fit


def test_inner_min_closed_form_matches_numerical():
    mdp, feats, theta, r, data, fit = problem(kind="random", d=4)
    cs = ConfidenceSet.from_fit(fit, rho=2.0, mdp=mdp)
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.standard_normal(feats.d)
        val, arg = cs.inner_min(m)
        assert cs.radius(arg) == pytest.approx(cs.rho, rel=1e-9)          # on the boundary
        assert float(m @ arg) == pytest.approx(val, abs=1e-10)
        # numerical: minimize <m, theta_hat + rho U S^-1/2 z> over ||z|| <= 1
        res = minimize(lambda z, m=m: float(m @ cs.point(z)), np.zeros(cs.basis.shape[1]), method="SLSQP",
                       constraints=[{"type": "ineq", "fun": lambda z: 1 - z @ z}], options={"ftol": 1e-14})
        assert res.fun == pytest.approx(val, abs=1e-7)
        # random boundary points never go below the closed form
        z = rng.standard_normal((500, cs.basis.shape[1]))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        assert min(float(m @ cs.point(zz)) for zz in z) >= val - 1e-10


def test_pessimistic_reward_below_mle_and_rho_zero_is_greedy():
    mdp, feats, theta, r, data, fit = problem()
    cs = ConfidenceSet.from_fit(fit, rho=1.5, mdp=mdp)
    r_hat = feats.token_reward(fit.theta)
    for rp, rh in zip(pessimistic_reward(feats, cs), r_hat):
        assert np.all(rp <= rh + 1e-15)
    zero = cs.with_rho(0.0)
    for a, b in zip(pessimistic_policy(mdp, feats, zero, 0.5).log_policy,
                    greedy_policy(mdp, feats, fit.theta, 0.5).log_policy):
        np.testing.assert_allclose(a, b, atol=1e-14)
    mm = maxmin_policy(mdp, feats, zero, 0.5)
    for a, b in zip(mm.policy, greedy_policy(mdp, feats, fit.theta, 0.5).policy):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_bonus_matches_dense_computation_and_cap():
    mdp, feats, theta, r, data, fit = problem(kind="bigram", d=None, A=2, H=3)
    cs = ConfidenceSet.from_fit(fit, rho=0.7, mdp=mdp)
    b = feature_bonus(feats, cs)
    for h in range(mdp.H):
        phi = feats.dense(h)
        want = 0.7 * np.sqrt(np.einsum("sai,ij,saj->sa", phi, cs.metric_inv, phi))
        np.testing.assert_allclose(b[h], want, rtol=1e-10, atol=1e-12)
    capped = ConfidenceSet(cs.theta_hat, cs.sigma_D, 0.7, cs.basis, norm_bound=0.01)
    for x, y in zip(feature_bonus(feats, capped), b):
        assert np.all(x <= y + 1e-15)


def test_identifiable_subspace_unigram_and_literal_bonus():
    """Unigram without EOS: every response has H tokens, so the all-ones direction is not identifiable
    (d_eff = A - 1) and the literal Sigma_D^-1 norm carries a ~1/sqrt(lambda) term that projection removes."""
    mdp, feats, theta, r, data, fit = problem(kind="unigram", d=None, A=3, H=4, ridge=1e-4)
    U = identifiable_basis(mdp, feats)
    assert U.shape == (3, 2)
    assert np.allclose(U.T @ np.ones(3), 0, atol=1e-10)
    lit = ConfidenceSet.from_fit(fit, rho=1.0, project=False)
    proj = ConfidenceSet.from_fit(fit, rho=1.0, mdp=mdp)
    assert feature_bonus(feats, lit)[0].min() > 10 * feature_bonus(feats, proj)[0].max()


def test_layered_kl_equals_sequence_kl():
    mdp, feats, theta, r, data, fit = problem(n_prompts=2)
    p = soft_bellman(mdp, r, 0.3)
    q = soft_bellman(mdp, feats.token_reward(fit.theta), 0.7)
    enum = enumerate_responses(mdp)
    want = sequence_kl(enum, enum.log_prob(p.log_policy), enum.log_prob(q.log_policy), mdp.rho)
    assert layered_kl(mdp, p.policy, q.log_policy) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("n_prompts", [1, 2])
def test_b1_dual_primal_and_brute_force_on_tiny_case(n_prompts):
    mdp, feats, theta, r, data, fit = problem(A=2, H=2, kind="random", d=3, N=60, seed=4, n_prompts=n_prompts)
    cs = ConfidenceSet.from_fit(fit, rho=1.2, mdp=mdp)
    beta = 0.4
    dual = maxmin_policy(mdp, feats, cs, beta, method="dual")
    primal = maxmin_policy(mdp, feats, cs, beta, method="primal", tol=1e-10, max_iter=20000)
    assert dual.converged and primal.converged
    assert 0 <= dual.gap <= 1e-8 and -1e-10 <= primal.gap <= 1e-8
    assert dual.value == pytest.approx(primal.value, abs=1e-7)
    # the dual policy is feasible and its objective is the reported value
    assert maxmin_objective(mdp, feats, cs, beta, dual.policy) == pytest.approx(dual.value, abs=1e-12)
    # brute force over the sequence simplices (K = 4 responses per prompt) with random restarts
    enum = enumerate_responses(mdp)
    psi = feats.psi(enum).toarray()
    logref = enum.log_prob(mdp.log_pi_ref)
    w = mdp.rho[enum.prompt]

    def negF(z):
        p = np.exp(z - z.max())
        p = np.concatenate([pp / pp.sum() for pp in np.split(p, n_prompts)])
        m = (w * p) @ psi
        kl = float(w @ (p * (np.log(np.maximum(p, 1e-300)) - logref)))
        return -(cs.inner_min(m)[0] - beta * kl)

    rng = np.random.default_rng(0)
    best = max(-minimize(negF, rng.standard_normal(len(enum)), method="Nelder-Mead",
                         options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 20000}).fun for _ in range(8))
    assert best <= dual.dual_value + 1e-9                      # weak duality: no policy beats the dual value
    assert best == pytest.approx(dual.value, abs=1e-6)
    # KKT / saddle point: theta_min is the inner minimizer for the Gibbs policy of theta_min
    m = expected_features(mdp, feats, dual.policy)
    np.testing.assert_allclose(cs.inner_min(m)[1], dual.theta_min, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_bounds_hold_whenever_the_event_holds(seed):
    """rho = ||P (theta_hat - theta*)||_Sigma_D (the event holds with equality): Theorem 4.2 and the B.1
    bound are deterministic consequences, so they must hold for every data set."""
    mdp, feats, theta, r, data, fit = problem(A=3, H=4, kind="random", d=5, N=150, seed=seed)
    cs0 = ConfidenceSet.from_fit(fit, rho=0.0, mdp=mdp)
    cs = cs0.with_rho(cs0.radius(theta) * (1 + 1e-9))
    for beta in (0.1, 1.0):
        star = soft_bellman(mdp, r, beta)
        pess = pessimistic_policy(mdp, feats, cs, beta)
        b = theorem42_bound(mdp, feats, cs, beta, star.policy, pess.log_policy)
        assert sub_optimality(mdp, pess.policy, r, beta) <= b["bound"] + 1e-10
        mm = maxmin_policy(mdp, feats, cs, beta)
        assert sub_optimality(mdp, mm.policy, r, beta) <= b["b1"] + 1e-10
        assert b["b1"] <= b["first"] + 1e-12                     # Jensen
        capped = ConfidenceSet(cs.theta_hat, cs.sigma_D, cs.rho, cs.basis, norm_bound=float(np.linalg.norm(theta)))
        pc = pessimistic_policy(mdp, feats, capped, beta)
        bc = theorem42_bound(mdp, feats, capped, beta, star.policy, pc.log_policy)
        assert sub_optimality(mdp, pc.policy, r, beta) <= bc["bound"] + 1e-10


def test_calibration():
    assert calibrate_rho([3.0, 1.0, 2.0, 4.0], 0.25) == 4.0 or calibrate_rho([3.0, 1.0, 2.0, 4.0], 0.25) == 3.0
    with pytest.raises(ValueError, match="delta"):
        calibrate_rho([1.0], 1.5)
    # oracle calibration on independent seeds covers fresh data sets, and is close to the asymptotic value
    mdp = TokenMDP.tree(3, 4, seed=0)
    feats = make_features(mdp, "random", d=4, seed=1)
    theta = draw_theta(mdp, feats, seed=2)
    r = feats.token_reward(theta)
    U = identifiable_basis(mdp, feats)

    def radius(seed):
        data = sample_preferences(mdp, r, 1500, seed=seed)
        fit = fit_token_mle(data, feats, ridge=1e-3)
        return ConfidenceSet(fit.theta, fit.sigma_D, 0.0, U).radius(theta), data.bt_slope(), fit, data

    cal = [radius(s) for s in range(40)]
    rho = calibrate_rho([c[0] for c in cal], 0.1)
    fresh = [radius(1000 + s)[0] for s in range(40)]
    assert np.mean(np.array(fresh) <= rho) >= 0.8
    asym = asymptotic_rho(U.shape[1], 0.1, float(np.mean([c[1] for c in cal])))
    assert abs(rho / asym - 1) < 0.35
    # the parametric bootstrap (data only) lands in the same range
    fit, data = cal[0][2], cal[0][3]
    boot = calibrate_rho(bootstrap_radii(fit, data, feats, U, n_boot=20, seed=0), 0.1)
    assert 0.5 < boot / rho < 2.0
    th = theory_rho(4, 0.1, H=4, L=3.0, B=1.0)
    assert th["upsilon"] == pytest.approx(1 / (2 + np.exp(-24) + np.exp(24)))
    assert th["rho"] > 100 * rho                                 # the paper's constant is far from the truth here
