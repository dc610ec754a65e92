"""User-supplied features for make_features (kind='user'): the four input forms and their validation."""

import numpy as np
import pytest

from rto_sim.exact import enumerate_responses
from rto_sim.features import draw_theta, make_features, user_features
from rto_sim.mdp import TokenMDP


def test_bandit_with_chosen_feature_vectors():
    """H = 1: every response is one token, so psi(y) = phi(x, y) and R(y) = psi(y)' theta on every response."""
    mdp = TokenMDP.tree(A=4, H=1, seed=0)
    table = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-2.0, 0.5]])
    theta = np.array([0.3, -0.7])
    phi = make_features(mdp, "user", phi=table)
    assert phi.kind == "user" and phi.d == 2
    enum = enumerate_responses(mdp)
    psi = phi.psi(enum).toarray()
    np.testing.assert_array_equal(psi, table[enum.actions[:, 0]])
    np.testing.assert_allclose(enum.returns(phi.token_reward(theta)), psi @ theta, atol=1e-15)
    np.testing.assert_allclose(enum.returns(phi.token_reward(theta)), table @ theta, atol=1e-15)


def test_forms_agree_and_match_return_on_every_response():
    """Per-layer list, flat array and callable describe the same features; R(y) = psi(y)' theta on every
    response of an EOS tree, and phi = 0 after EOS."""
    mdp = TokenMDP.tree(A=3, H=3, n_prompts=2, eos=True, seed=1)
    rng = np.random.default_rng(0)
    d = 4
    layers = [rng.standard_normal((n, mdp.A, d)) for n in mdp.n_states]
    f_list = make_features(mdp, "user", phi=layers)
    f_flat = make_features(mdp, "user", phi=np.concatenate([x.reshape(-1, d) for x in layers]))
    f_call = make_features(mdp, "user", phi=lambda h, s, a: layers[h][s, a])
    for f in (f_flat, f_call):
        for h in range(mdp.H):
            np.testing.assert_array_equal(f.dense(h), f_list.dense(h))
    for h in range(mdp.H):
        assert np.all(f_list.dense(h)[mdp.absorbing[h]] == 0)
    theta = rng.standard_normal(d)
    enum = enumerate_responses(mdp)
    np.testing.assert_allclose(enum.returns(f_list.token_reward(theta)), f_list.psi(enum) @ theta, atol=1e-12)
    assert draw_theta(mdp, f_call, seed=2).shape == (d,)


def test_stationary_table_equals_unigram():
    mdp = TokenMDP.last_token_automaton(A=3, H=4, eos=True, seed=0)
    uni = make_features(mdp, "unigram")
    user = make_features(mdp, "user", phi=np.eye(3))
    for h in range(mdp.H):
        np.testing.assert_array_equal(user.dense(h), uni.dense(h))


def test_callable_not_called_in_absorbing_states():
    mdp = TokenMDP.tree(A=2, H=3, eos=True, seed=0)
    seen = []

    def phi(h, s, a):
        seen.append((h, s))
        assert not mdp.absorbing[h][s]
        return [1.0, float(a)]
    f = user_features(mdp, phi)
    assert f.d == 2 and len(seen) == sum(int((~mdp.absorbing[h]).sum()) * mdp.A for h in range(mdp.H))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((5, 2)), "matches no accepted form"),                      # wrong number of rows
    (np.zeros((3, 0)), "d = 0"),                                         # empty dimension
    (np.array([[1.0, np.nan]] * 3), "NaN or infinite"),
    (np.array([[1.0, np.inf]] * 3), "NaN or infinite"),
    (np.array([["a", "b"]] * 3), "real numbers"),
    (np.zeros((3, 2), complex), "real numbers"),
    (np.zeros(3), "matches no accepted form"),                            # 1-D
    ([np.zeros((1, 3, 2))], "layers but the MDP has H=2"),                # too few layers
    ([np.zeros((1, 3, 2)), np.zeros((4, 3, 2))], r"phi\[1\] has shape"),  # wrong n_h
    ([np.zeros((1, 3, 2)), np.zeros((3, 3, 3))], "different dimensions"),
    ([[1.0, 2.0], [1.0]], "rectangular|phi"),                             # ragged
    (lambda h, s, a: np.zeros((2, 2)), "1-D vector"),
    (lambda h, s, a: np.zeros(1 + a), "same dimension"),
    (lambda h, s, a: [np.nan, 0.0], "NaN or infinite"),
    (lambda h, s, a: np.zeros(0), "d = 0"),
])
def test_bad_user_features_raise(bad, match):
    mdp = TokenMDP.tree(A=3, H=2, seed=0)          # n_states = [1, 3]
    with pytest.raises(ValueError, match=match):
        make_features(mdp, "user", phi=bad)


def test_kind_and_phi_mismatch():
    mdp = TokenMDP.tree(A=3, H=2, seed=0)
    with pytest.raises(ValueError, match="needs phi="):
        make_features(mdp, "user")
    with pytest.raises(ValueError, match="only read with kind='user'"):
        make_features(mdp, "unigram", phi=np.eye(3))
    assert make_features(mdp, "unigram").d == 3          # built-in kinds unchanged
