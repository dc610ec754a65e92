"""Learners: gradient check, consistency, S7 (tree-tabular == bandit), ball constraint, DPO equivalence."""

import numpy as np
import pytest
import scipy.sparse as sp

from rto_sim import TokenMDP, draw_theta, enumerate_responses, make_features, soft_bellman
from rto_sim.learners import (
    bandit_mle_exists,
    fit_bandit_mle,
    fit_tabular_dpo,
    fit_token_mle,
    lift_to_tree,
    logistic_objective,
)
from rto_sim.preferences import sample_preferences, trajectory_features


def _centred(enum, mdp, x, w):
    """x minus its per-prompt mean under weights w (rows prompt-major)."""
    m = np.bincount(enum.prompt, weights=w * x, minlength=mdp.n_prompts)
    return x - m[enum.prompt]


def _weights(mdp, enum):
    return np.exp(enum.log_prob(mdp.log_pi_ref)) * mdp.rho[enum.prompt]


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    X = sp.random(40, 7, density=0.4, random_state=1, format="csr")
    w = rng.integers(1, 4, 40).astype(float)
    theta = rng.standard_normal(7)
    f, g = logistic_objective(theta, X, w, ridge=0.3)
    eps = 1e-6
    fd = np.array([(logistic_objective(theta + eps * e, X, w, 0.3)[0] - logistic_objective(theta - eps * e, X, w,
                                                                                               0.3)[0]) / (2 * eps)
                   for e in np.eye(7)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)
    # value: sum_i w_i log(1 + exp(-<x_i, theta>)) + ridge/2 |theta|^2
    z = X @ theta
    assert abs(f - (w @ np.log1p(np.exp(-z)) + 0.15 * theta @ theta)) < 1e-10


@pytest.fixture(scope="module")
def unigram():
    mdp = TokenMDP.position(3, 4, seed=1)
    phi = make_features(mdp, "unigram")
    theta = draw_theta(mdp, phi, seed=2)
    return mdp, phi, theta


def test_token_mle_consistent_in_identifiable_coordinates(unigram):
    """N large: the centred-return error matches the asymptotic sqrt(d_eff / (2 s N)) scale (d_eff = A - 1)
    and theta_hat ~= theta* up to the unidentifiable constant shift (responses all have length H)."""
    mdp, phi, theta = unigram
    r = phi.token_reward(theta)
    data = sample_preferences(mdp, r, 50000, seed=3)
    fit = fit_token_mle(data, phi, ridge=1e-3)
    assert fit.converged and fit.ridge == 1e-3 and fit.n == 50000
    enum = enumerate_responses(mdp)
    w = _weights(mdp, enum)
    err = _centred(enum, mdp, fit.returns(enum) - enum.returns(r), w)
    rmse = np.sqrt(w @ err**2)
    scale = np.sqrt(2 / (2 * data.bt_slope() * 50000))
    assert rmse < 3 * scale
    np.testing.assert_allclose(fit.theta - fit.theta.mean(), theta - theta.mean(), atol=0.05)
    # Sigma_D is a SUM and includes the ridge
    assert fit.sigma_D.shape == (3, 3)
    D = fit.design.toarray()
    np.testing.assert_allclose(fit.sigma_D, D.T @ (fit.counts[:, None] * D) + 1e-3 * np.eye(3), rtol=1e-12)
    assert fit.counts.sum() == 50000


def test_sigma_methods_agree(unigram):
    mdp, phi, theta = unigram
    data = sample_preferences(mdp, phi.token_reward(theta), 300, seed=5)
    fit = fit_token_mle(data, phi, ridge=0.5)
    v = np.array([0.3, -1.0, 2.0])
    assert abs(fit.quadratic(v) - v @ fit.sigma_D @ v) < 1e-9
    X = np.random.default_rng(0).standard_normal((4, 3))
    np.testing.assert_allclose(fit.inv_quadratic(X), np.einsum("md,dk,mk->m", X, np.linalg.inv(fit.sigma_D), X),
                               rtol=1e-9)
    dense = fit.sigma_D
    fit.sigma_D, fit._factor = None, None          # the matrix-free path of large d
    assert abs(fit.quadratic(v) - v @ dense @ v) < 1e-9
    np.testing.assert_allclose(fit.inv_quadratic(X), np.einsum("md,dk,mk->m", X, np.linalg.inv(dense), X),
                               rtol=1e-8)


def test_ball_constraint_is_the_constrained_optimum(unigram):
    mdp, phi, theta = unigram
    data = sample_preferences(mdp, phi.token_reward(theta), 2000, seed=6)
    free = fit_token_mle(data, phi, ridge=1e-3)
    B = 0.5 * np.linalg.norm(free.theta)
    ball = fit_token_mle(data, phi, ridge=1e-3, norm_bound=B)
    assert abs(np.linalg.norm(ball.theta) - B) < 1e-6
    # KKT: the gradient is anti-parallel to theta on the sphere, and no feasible point does better
    f0, g = logistic_objective(ball.theta, ball.design, ball.counts, 1e-3)
    cos = g @ ball.theta / (np.linalg.norm(g) * B)
    assert cos < -1 + 1e-5
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = rng.standard_normal(3)
        t *= B * rng.random() ** (1 / 3) / np.linalg.norm(t)
        assert logistic_objective(t, ball.design, ball.counts, 1e-3)[0] >= f0 - 1e-8
    # an inactive bound changes nothing
    loose = fit_token_mle(data, phi, ridge=1e-3, norm_bound=10 * np.linalg.norm(free.theta))
    np.testing.assert_allclose(loose.theta, free.theta)


def test_s7_tree_tabular_equals_bandit_unregularized():
    """S7: on the tree, tree-tabular token MLE and the one-hot bandit give the same centred returns
    (ridge 0, data dense enough that the MLE exists)."""
    mdp = TokenMDP.tree(2, 3, seed=3, ref_temperature=3.0)   # near-uniform: every arm well covered
    phi = make_features(mdp, "tree_tabular")
    r = phi.token_reward(draw_theta(mdp, phi, seed=4))
    data = sample_preferences(mdp, r, 20000, seed=5)
    tok = fit_token_mle(data, phi, ridge=0.0, tol=1e-11)
    band = fit_bandit_mle(data, mdp, ridge=0.0, tol=1e-11)
    assert tok.converged and band.converged
    enum = enumerate_responses(mdp)
    w = _weights(mdp, enum)
    a = _centred(enum, mdp, tok.returns(enum), w)
    b = _centred(enum, mdp, band.returns(enum), w)
    assert np.max(np.abs(a - b)) < 1e-5
    # with a ridge they differ (different parametrizations are penalized differently)
    tok_r = fit_token_mle(data, phi, ridge=30.0)
    band_r = fit_bandit_mle(data, mdp, ridge=30.0)
    assert np.max(np.abs(_centred(enum, mdp, tok_r.returns(enum) - band_r.returns(enum), w))) > 1e-3


def test_bandit_token_reward_on_tree_and_lift():
    mdp = TokenMDP.position(2, 3, eos=True, seed=0)
    phi = make_features(mdp, "positional")
    r = phi.token_reward(draw_theta(mdp, phi, seed=1))
    data = sample_preferences(mdp, r, 3000, seed=2)
    band = fit_bandit_mle(data, mdp)
    assert band.num_arms == mdp.num_responses and len(band.arm_codes) <= band.num_arms
    with pytest.raises(ValueError, match="tree"):
        band.token_reward(mdp)
    tree, rt = band.planning_problem(mdp)
    enum_t, enum_m = enumerate_responses(tree), enumerate_responses(mdp)
    np.testing.assert_allclose(enum_t.returns(rt), band.returns(enum_t), atol=1e-12)
    # the lifted tree has the same sequence law under pi_ref and the same responses
    np.testing.assert_array_equal(enum_t.actions, enum_m.actions)
    np.testing.assert_allclose(enum_t.log_prob(tree.log_pi_ref), enum_m.log_prob(mdp.log_pi_ref), atol=1e-12)
    tree2, smap = lift_to_tree(mdp)
    assert len(smap) == mdp.H and tree2.kind == "tree"


def test_dpo_equals_token_mle_plus_soft_planning():
    """Aggregated states (position automaton) and data that identify r up to shaping: tabular DPO
    (ridge 0) = tabular token MLE (ridge 0) on the same states followed by exact soft planning."""
    mdp = TokenMDP.position(3, 3, seed=2)
    tab = make_features(mdp, "tabular")
    true = make_features(mdp, "positional")
    r = true.token_reward(draw_theta(mdp, true, seed=3))
    data = sample_preferences(mdp, r, 5000, seed=4)
    beta = 0.7
    dpo = fit_tabular_dpo(data, mdp, beta=beta, ridge=0.0, tol=1e-11)
    mle = fit_token_mle(data, tab, ridge=0.0, tol=1e-11)
    assert dpo.converged and mle.converged
    plan = soft_bellman(mdp, mle.token_reward(), beta)
    for h in range(mdp.H):
        np.testing.assert_allclose(dpo.log_policy[h], plan.log_policy[h], atol=1e-5)
    # and its implicit reward reproduces the centred fitted returns
    enum = enumerate_responses(mdp)
    w = _weights(mdp, enum)
    np.testing.assert_allclose(_centred(enum, mdp, dpo.returns(enum), w),
                               _centred(enum, mdp, mle.returns(enum), w), atol=1e-5)


def test_dpo_early_stopping_is_regularization():
    mdp = TokenMDP.tree(2, 3, seed=1)
    phi = make_features(mdp, "tree_tabular")
    data = sample_preferences(mdp, phi.token_reward(draw_theta(mdp, phi, seed=0)), 30, seed=1)
    short = fit_tabular_dpo(data, mdp, beta=1.0, max_iter=2)
    long = fit_tabular_dpo(data, mdp, beta=1.0, max_iter=2000)
    assert short.n_iter <= 2 and not short.converged
    kl = [sum(float((np.exp(f.log_policy[h]) * (f.log_policy[h] - mdp.log_pi_ref[h])).sum()) for h in range(3))
          for f in (short, long)]
    assert kl[0] < kl[1]
    ridged = fit_tabular_dpo(data, mdp, beta=1.0, ridge=1.0)
    assert ridged.converged


def test_bad_inputs(unigram):
    mdp, phi, theta = unigram
    data = sample_preferences(mdp, phi.token_reward(theta), 50, seed=0)
    with pytest.raises(ValueError, match="ridge"):
        fit_token_mle(data, phi, ridge=-1)
    with pytest.raises(ValueError, match="norm_bound"):
        fit_token_mle(data, phi, norm_bound=0.0)
    with pytest.raises(ValueError, match="PreferenceData"):
        fit_token_mle((data.first, data.second), phi)
    with pytest.raises(ValueError, match="FeatureMap"):
        fit_token_mle(data, "unigram")
    with pytest.raises(ValueError, match="beta"):
        fit_tabular_dpo(data, mdp, beta=0.0)
    with pytest.raises(ValueError, match="ridge"):
        fit_bandit_mle(data, mdp, ridge=float("nan"))
    other = TokenMDP.position(3, 5, seed=0)
    with pytest.raises(ValueError, match="H="):
        fit_bandit_mle(data, other)
    with pytest.raises(ValueError, match="H="):
        fit_tabular_dpo(data, other, beta=1.0)
    with pytest.raises(ValueError, match="layers"):
        trajectory_features(make_features(other, "unigram"), data.first)


def test_bandit_mle_exists_zermelo_condition():
    mdp = TokenMDP.tree(2, 1, seed=0)            # two arms: y = 0, y = 1
    from rto_sim.preferences import PreferenceData
    from rto_sim.sampling import Trajectories

    def batch(actions):
        a = np.array(actions)[:, None]
        return Trajectories(prompt=np.zeros(len(a), int), actions=a, states=np.zeros_like(a),
                            mask=np.ones_like(a, bool))
    one_way = PreferenceData(batch([0, 0, 0]), batch([1, 1, 1]), np.array([True, True, True]))
    both = PreferenceData(batch([0, 0, 0]), batch([1, 1, 1]), np.array([True, False, True]))
    assert not bandit_mle_exists(one_way, mdp)          # arm 0 always wins: MLE at infinity
    assert bandit_mle_exists(both, mdp)
    fit = fit_bandit_mle(one_way, mdp, ridge=0.0, max_iter=50)
    assert fit.values[0] - fit.values[1] > 5             # drifting to infinity, stopped by the optimizer
    ridged = fit_bandit_mle(one_way, mdp, ridge=1.0)
    assert ridged.converged and 0 < ridged.values[0] - ridged.values[1] < 3
    assert bandit_mle_exists(both, TokenMDP.tree(2, 1, seed=0), require_all_arms=True)


def test_dpo_with_eos_keeps_absorbing_rows():
    mdp = TokenMDP.tree(3, 3, eos=True, seed=0)
    phi = make_features(mdp, "positional")
    data = sample_preferences(mdp, phi.token_reward(draw_theta(mdp, phi, seed=1)), 2000, seed=2)
    fit = fit_tabular_dpo(data, mdp, beta=0.5, ridge=1e-2)
    assert fit.converged
    for h in range(mdp.H):
        p = np.exp(fit.log_policy[h])
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
        ab = mdp.absorbing[h]
        if ab.any():
            np.testing.assert_allclose(p[ab, mdp.eos], 1.0)
    r = fit.implicit_reward()
    assert all(np.all(r[h][mdp.absorbing[h]] == 0) for h in range(mdp.H))


@pytest.mark.parametrize("eos, P, ridge", [(False, 1, 1e-3), (True, 2, 1e-3), (False, 2, 1.0), (True, 1, 0.1)])
def test_dpo_tree_solver_reaches_the_logit_objective_optimum(eos, P, ridge):
    """solver="tree" (sequence coordinates) stops at the same first-order condition of the logit objective as the
    logit solver: converged by the logit gradient, the same objective value and policy where the minimum is unique
    (data that cover every response; the ridge objective is not convex in general and near MLE non-existence may
    have several local minima, which the two paths can reach differently)."""
    mdp = TokenMDP.tree(3, 3, n_prompts=P, eos=eos, seed=5)
    phi = make_features(mdp, "tabular")
    data = sample_preferences(mdp, phi.token_reward(draw_theta(mdp, phi, return_var=1.0, seed=6)), 3000, seed=7)
    a = fit_tabular_dpo(data, mdp, beta=0.5, ridge=ridge)
    b = fit_tabular_dpo(data, mdp, beta=0.5, ridge=ridge, solver="tree")
    auto = fit_tabular_dpo(data, mdp, beta=0.5, ridge=ridge, solver="auto")
    assert b.converged and b.grad_norm <= 1e-9
    assert b.loss == pytest.approx(a.loss, rel=1e-10, abs=1e-8)
    for h in range(mdp.H):
        np.testing.assert_allclose(np.exp(b.log_policy[h]), np.exp(a.log_policy[h]), atol=1e-5)
        np.testing.assert_array_equal(b.log_policy[h], auto.log_policy[h])
        if mdp.absorbing[h].any():                     # absorbing rows stay delta_EOS
            np.testing.assert_array_equal(b.log_policy[h][mdp.absorbing[h]], mdp.log_pi_ref[h][mdp.absorbing[h]])
    # a warm start from the answer needs (almost) no iterations
    assert fit_tabular_dpo(data, mdp, beta=0.5, ridge=ridge, solver="tree", init=b.policy).n_iter <= 5


def test_dpo_tree_solver_refuses_automata_and_bad_names():
    mdp = TokenMDP.position(3, 3, seed=2)
    phi = make_features(mdp, "positional")
    data = sample_preferences(mdp, phi.token_reward(draw_theta(mdp, phi, seed=3)), 100, seed=4)
    with pytest.raises(ValueError, match="prefix-tree"):
        fit_tabular_dpo(data, mdp, beta=1.0, solver="tree")
    with pytest.raises(ValueError, match="solver"):
        fit_tabular_dpo(data, mdp, beta=1.0, solver="newton")
    # "auto" on an automaton is the logit solver
    a = fit_tabular_dpo(data, mdp, beta=1.0, ridge=0.1)
    b = fit_tabular_dpo(data, mdp, beta=1.0, ridge=0.1, solver="auto")
    assert a.loss == b.loss and a.n_iter == b.n_iter


@pytest.mark.parametrize("eos, P", [(False, 1), (True, 2)])
def test_token_mle_tree_solver_same_unique_optimum(eos, P):
    """Tabular features on a tree: solver="tree" solves the same strictly convex problem (unique optimum)."""
    mdp = TokenMDP.tree(3, 4, n_prompts=P, eos=eos, seed=8)
    phi = make_features(mdp, "tree_tabular")
    data = sample_preferences(mdp, phi.token_reward(draw_theta(mdp, phi, return_var=1.0, seed=9)), 400, seed=10)
    a = fit_token_mle(data, phi, ridge=1e-2)
    b = fit_token_mle(data, phi, ridge=1e-2, solver="tree", mdp=mdp)
    c = fit_token_mle(data, phi, ridge=1e-2, solver="auto", mdp=mdp)
    assert b.converged and b.grad_norm <= 5e-9           # L-BFGS-B may stop on its f-tolerance just above 1e-9
    np.testing.assert_allclose(b.theta, a.theta, atol=1e-5)
    np.testing.assert_array_equal(b.theta, c.theta)
    assert b.loss == pytest.approx(a.loss, rel=1e-12)
    # auto keeps plain L-BFGS where the tree path does not apply (other features, ridge 0, a ball)
    uni = make_features(mdp, "unigram")
    assert fit_token_mle(data, uni, solver="auto", mdp=mdp).n_iter == fit_token_mle(data, uni).n_iter
    assert fit_token_mle(data, phi, ridge=0.0, solver="auto", mdp=mdp).n_iter == \
        fit_token_mle(data, phi, ridge=0.0).n_iter
    with pytest.raises(ValueError, match="solver='tree'"):
        fit_token_mle(data, uni, solver="tree", mdp=mdp)
