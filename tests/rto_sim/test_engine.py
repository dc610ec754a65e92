"""Engine behaviour: structure, exact quantities on hand-checkable cases, validation, gymnasium env."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rto_sim import (
    TokenMDP,
    draw_theta,
    enumerate_responses,
    evaluate,
    make_features,
    occupancy,
    return_moments,
    sample_trajectories,
    soft_bellman,
    sub_optimality,
)
from rto_sim.gym_env import TokenMDPEnv
from rto_sim.sampling import sample_categorical


def test_tree_sizes_and_enumeration():
    m = TokenMDP.tree(3, 4)
    assert m.n_states == [1, 3, 9, 27] and m.num_responses == 81
    e = enumerate_responses(m)
    assert len(e) == 81 and len({tuple(r) for r in e.actions}) == 81
    assert np.isclose(np.exp(e.log_prob(m.log_pi_ref)).sum(), 1.0)


def test_eos_tree_responses_are_distinct_and_probabilities_sum_to_one():
    m = TokenMDP.tree(3, 4, n_prompts=2, eos=True)
    e = enumerate_responses(m)
    assert len(e) == 2 * m.num_responses == 2 * (1 + 2 + 4 + 8 + 16)
    for p in range(2):
        assert np.isclose(np.exp(e.log_prob(m.log_pi_ref)[e.prompt == p]).sum(), 1.0)
    # after EOS every token is EOS
    first = np.argmax(e.actions == m.eos, axis=1)
    has = (e.actions == m.eos).any(axis=1)
    for row, f, hh in zip(e.actions, first, has):
        if hh:
            assert (row[f:] == m.eos).all()


def test_last_token_automaton_matches_tree_for_bigram_reward():
    """The same bigram reward planned on the tree and on the (h, last token) automaton gives the same
    sequence law: aggregation changes the representation, not the optimum."""
    tree = TokenMDP.tree(3, 4, eos=True, seed=3)
    auto = TokenMDP.last_token_automaton(3, 4, eos=True, seed=3)
    # a reference that depends on the last token only, expressed on both
    ref_auto = auto.pi_ref
    ref_tree = [ref_auto[h][_tree_to_auto(tree, auto, h)] for h in range(4)]
    tree = tree.with_reference(ref_tree)
    ft, fa = make_features(tree, "bigram"), make_features(auto, "bigram")
    theta = np.random.default_rng(0).standard_normal(fa.d)
    st = soft_bellman(tree, ft.token_reward(theta), 0.7)
    sa = soft_bellman(auto, fa.token_reward(theta), 0.7)
    et, ea = enumerate_responses(tree), enumerate_responses(auto)
    assert np.array_equal(et.actions, ea.actions)
    assert np.allclose(et.log_prob(st.log_policy), ea.log_prob(sa.log_policy), atol=1e-12)


def _tree_to_auto(tree, auto, h):
    """Map tree states of layer h to automaton states (prompt, last token)."""
    if h == 0:
        return np.arange(tree.n_states[0])
    return np.maximum(tree.prompt_of[h], 0) * auto.A + tree.last_token[h]


def test_soft_bellman_two_arm_closed_form():
    m = TokenMDP.tree(2, 1, pi_ref=[np.array([[0.25, 0.75]])])
    r = [np.array([[1.0, 0.0]])]
    beta = 0.5
    sol = soft_bellman(m, r, beta)
    z = 0.25 * np.exp(2.0) + 0.75
    assert np.isclose(sol.V[0][0], beta * np.log(z))
    assert np.allclose(sol.policy[0][0], [0.25 * np.exp(2.0) / z, 0.75 / z])
    val = evaluate(m, sol.policy, r, beta)
    assert np.isclose(val.J, sol.V[0][0])
    assert abs(sub_optimality(m, sol.policy, r, beta)) < 1e-12
    assert sub_optimality(m, m.pi_ref, r, beta) > 0


def test_occupancy_and_moments():
    m = TokenMDP.tree(3, 3, n_prompts=2, eos=True, seed=1)
    d = occupancy(m, m.pi_ref)
    assert all(np.isclose(x.sum(), 1.0) for x in d)
    f = make_features(m, "positional")
    theta = draw_theta(m, f, return_var=0.25, seed=2)
    mean, var = return_moments(m, m.pi_ref, f.token_reward(theta))
    assert np.isclose(m.rho @ var, 0.25)
    e = enumerate_responses(m)
    R, p = e.returns(f.token_reward(theta)), np.exp(e.log_prob(m.log_pi_ref))
    for x in range(2):
        sel = e.prompt == x
        mu = (p[sel] * R[sel]).sum()
        assert np.isclose(mu, mean[x]) and np.isclose((p[sel] * (R[sel] - mu) ** 2).sum(), var[x])


def test_sampling_matches_exact_law():
    m = TokenMDP.tree(2, 3, eos=True, seed=5)
    t = sample_trajectories(m, m.pi_ref, 40_000, np.random.default_rng(0))
    e = enumerate_responses(m)
    p = np.exp(e.log_prob(m.log_pi_ref))
    counts = {tuple(r): 0 for r in e.actions}
    for row in t.actions:
        counts[tuple(row)] += 1
    emp = np.array([counts[tuple(r)] for r in e.actions]) / len(t)
    assert np.abs(emp - p).max() < 0.01
    assert (t.mask.sum(1) == np.where((t.actions == m.eos).any(1), np.argmax(t.actions == m.eos, 1) + 1, 3)).all()


def test_inverse_cdf_sampler():
    """`sample_categorical`, the one token sampler (preference data and PPO rollouts): row frequencies match the
    probabilities, rows need not be normalized (same draws for a scaled row), zero-probability tokens never
    come out."""
    p = np.array([[0.2, 0.0, 0.5, 0.3], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    rows = np.repeat(p, 50_000, axis=0)
    a = sample_categorical(rows, np.random.default_rng(1))
    assert np.array_equal(a, sample_categorical(5.0 * rows, np.random.default_rng(1)))
    freq = np.stack([np.bincount(a[i * 50_000:(i + 1) * 50_000], minlength=4) / 50_000 for i in range(3)])
    assert np.abs(freq - p).max() < 0.01 and np.all(freq[p == 0] == 0)
    # sample_trajectories draws through it: same rng, same first tokens as the sampler on pi_ref's first layer
    m = TokenMDP.tree(3, 2, seed=2)
    t = sample_trajectories(m, m.pi_ref, 1000, np.random.default_rng(3), prompt=np.zeros(1000, np.int64))
    first = sample_categorical(np.repeat(m.pi_ref[0], 1000, 0), np.random.default_rng(3))
    assert np.array_equal(t.actions[:, 0], first)


def test_features_dimensions():
    m = TokenMDP.tree(3, 4)
    assert make_features(m, "unigram").d == 3
    assert make_features(m, "positional").d == 12
    assert make_features(m, "bigram").d == 12
    assert make_features(m, "random", d=8).d == 8
    assert make_features(m, "tree_tabular").d == 3 * (1 + 3 + 9 + 27)
    assert make_features(m, "terminal").d == 81


@pytest.mark.parametrize("kwargs, field", [
    (dict(A=1, H=3), "A (vocabulary size)"),
    (dict(A=3, H=0), "H (horizon)"),
    (dict(A=2, H=2, rho=[1.0, 0.0], n_prompts=2), "zero mass"),
    (dict(A=2, H=2, pi_ref=[np.array([[0.5, 0.6]]), np.full((2, 2), 0.5)]), "pi_ref[0] row 0"),
])
def test_bad_mdp_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        TokenMDP.tree(**kwargs)


def test_bad_beta_and_theta():
    m = TokenMDP.tree(2, 2)
    f = make_features(m, "unigram")
    with pytest.raises(ValueError, match="beta must be > 0"):
        soft_bellman(m, f.token_reward(np.ones(2)), 0.0)
    with pytest.raises(ValueError, match=r"dimension d=2"):
        f.token_reward(np.ones(3))
    with pytest.raises(ValueError, match="unknown reward class"):
        make_features(m, "trigram")
    with pytest.raises(ValueError, match="not enumerable"):
        enumerate_responses(TokenMDP.tree(2, 12), max_rows=100)


def test_gym_env_checks_and_is_reproducible():
    m = TokenMDP.tree(3, 4, n_prompts=3, eos=True)
    f = make_features(m, "unigram")
    env = TokenMDPEnv(m, f.token_reward(draw_theta(m, f)))
    check_env(env, skip_render_check=True)

    def rollout(seed):
        env.reset(seed=seed)
        env.action_space.seed(seed)
        out, done = [], False
        while not done:
            obs, r, done, _, info = env.step(env.action_space.sample())
            out.append((obs, r, info["h"]))
        return out
    assert rollout(7) == rollout(7)


def test_gym_env_returns_match_exact_expectation():
    m = TokenMDP.tree(2, 3, eos=True, seed=2)
    f = make_features(m, "positional")
    r = f.token_reward(draw_theta(m, f))
    env = TokenMDPEnv(m, r)
    rng = np.random.default_rng(0)
    rets = []
    pi = m.pi_ref
    offs = m.flat_offsets()
    for i in range(4000):
        obs, _ = env.reset(seed=i)
        tot, done = 0.0, False
        while not done:
            h = int(np.searchsorted(offs, obs, side="right") - 1)
            a = rng.choice(2, p=pi[h][obs - offs[h]])
            obs, rew, done, _, _ = env.step(a)
            tot += rew
        rets.append(tot)
    exact = evaluate(m, pi, r).expected_return
    assert abs(np.mean(rets) - exact) < 4 * np.std(rets) / np.sqrt(len(rets))
