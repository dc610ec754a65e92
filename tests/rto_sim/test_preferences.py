"""Preference data: shapes, Bradley-Terry sampled labels, behaviour policies, trajectory features."""

import numpy as np
import pytest
from scipy.special import expit

from rto_sim import TokenMDP, draw_theta, enumerate_responses, make_features, sample_trajectories
from rto_sim.preferences import Mixture, PreferenceData, sample_preferences, trajectory_features


@pytest.fixture(scope="module")
def inst():
    mdp = TokenMDP.tree(3, 3, n_prompts=2, eos=True, seed=4)
    phi = make_features(mdp, "positional")
    theta = draw_theta(mdp, phi, return_var=4.0, seed=1)     # large spread: labels far from coin flips
    return mdp, phi, theta, phi.token_reward(theta)


def test_shapes_and_chosen_rejected(inst):
    mdp, phi, theta, r = inst
    data = sample_preferences(mdp, r, 500, seed=0)
    assert data.n == 500 and len(data.chosen) == 500 and len(data.rejected) == 500
    np.testing.assert_array_equal(data.first.prompt, data.second.prompt)
    np.testing.assert_array_equal(data.chosen.prompt, data.rejected.prompt)
    fp = data.first_preferred
    np.testing.assert_array_equal(data.chosen.actions[fp], data.first.actions[fp])
    np.testing.assert_array_equal(data.chosen.actions[~fp], data.second.actions[~fp])
    np.testing.assert_array_equal(data.rejected.actions[~fp], data.first.actions[~fp])
    np.testing.assert_allclose(data.return_first, data.first.returns(r))
    sub = data.subset(np.arange(10))
    assert sub.n == 10 and np.array_equal(sub.first_preferred, fp[:10])


def test_labels_are_sampled_from_bradley_terry(inst):
    mdp, phi, theta, r = inst
    data = sample_preferences(mdp, r, 40000, seed=1)
    p = expit(data.return_first - data.return_second)
    y = data.first_preferred.astype(float)
    # calibration overall and in bins of the BT probability (4 standard errors)
    se = np.sqrt(np.sum(p * (1 - p))) / len(p)
    assert abs(y.mean() - p.mean()) < 4 * se
    for lo, hi in [(0.05, 0.3), (0.3, 0.7), (0.7, 0.95)]:
        m = (p > lo) & (p < hi)
        assert m.sum() > 500
        assert abs(y[m].mean() - p[m].mean()) < 4 * np.sqrt(np.sum(p[m] * (1 - p[m]))) / m.sum()
    # never argmax labels: the lower-return response wins sometimes
    assert np.any((data.return_first > data.return_second + 1) & ~data.first_preferred)


def test_same_seed_same_data_and_generator_seed(inst):
    mdp, phi, theta, r = inst
    a, b = sample_preferences(mdp, r, 300, seed=7), sample_preferences(mdp, r, 300, seed=7)
    np.testing.assert_array_equal(a.first.actions, b.first.actions)
    np.testing.assert_array_equal(a.first_preferred, b.first_preferred)
    c = sample_preferences(mdp, r, 300, seed=np.random.default_rng(7))
    assert c.n == 300 and c.seed is None


def _delta_policy(mdp, token):
    pol = [np.zeros((n, mdp.A)) for n in mdp.n_states]
    for p in pol:
        p[:, token] = 1.0
    return pol


def test_mixture_per_response_and_per_pair():
    mdp = TokenMDP.tree(2, 3, seed=0)
    r = [np.zeros((n, 2)) for n in mdp.n_states]
    mix = Mixture([0.3, 0.7], [_delta_policy(mdp, 0), _delta_policy(mdp, 1)])
    data = sample_preferences(mdp, r, 20000, seed=2, behaviour=mix)
    first0 = (data.first.actions == 0).all(1)
    assert abs(first0.mean() - 0.3) < 0.02
    same = (data.first.actions == data.second.actions).all(1)
    assert abs(same.mean() - (0.3**2 + 0.7**2)) < 0.02          # independent components
    pair = sample_preferences(mdp, r, 2000, seed=2, behaviour=Mixture([0.3, 0.7], mix.policies, per="pair"))
    assert (pair.first.actions == pair.second.actions).all()
    with pytest.raises(ValueError, match="weights"):
        Mixture([1.0], [])
    with pytest.raises(ValueError, match="per"):
        Mixture([1.0], [mix.policies[0]], per="token")


def test_policy_and_callable_behaviour(inst):
    mdp, phi, theta, r = inst
    pol = mdp.random_policy(temperature=0.3, seed=9)
    data = sample_preferences(mdp, r, 100, seed=0, behaviour=pol)
    assert data.n == 100

    def law(rng, n):
        x = rng.integers(0, mdp.n_prompts, n)
        return (sample_trajectories(mdp, mdp.pi_ref, n, rng, prompt=x),
                sample_trajectories(mdp, pol, n, rng, prompt=x))
    data = sample_preferences(mdp, r, 50, seed=0, behaviour=law)
    assert data.n == 50
    with pytest.raises(ValueError, match="expected 50"):
        sample_preferences(mdp, r, 50, seed=0, behaviour=lambda rng, n: law(rng, n - 1))
    with pytest.raises(ValueError, match="share the prompt"):
        sample_preferences(mdp, r, 50, seed=0, behaviour=lambda rng, n: (
            sample_trajectories(mdp, pol, n, rng, prompt=np.zeros(n, int)),
            sample_trajectories(mdp, pol, n, rng, prompt=np.ones(n, int))))


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n(inst, n):
    mdp, phi, theta, r = inst
    with pytest.raises(ValueError, match="n_pairs"):
        sample_preferences(mdp, r, n, seed=0)


def test_bad_reward_and_behaviour(inst):
    mdp, phi, theta, r = inst
    with pytest.raises(ValueError):
        sample_preferences(mdp, r[:-1], 10, seed=0)
    with pytest.raises(ValueError):
        sample_preferences(mdp, r, 10, seed=0, behaviour=[np.ones((1, 3))])


def test_trajectory_features_match_returns_and_enumeration(inst):
    mdp, phi, theta, r = inst
    traj = sample_trajectories(mdp, mdp.pi_ref, 2000, np.random.default_rng(0))
    psi = trajectory_features(phi, traj)
    assert psi.shape == (2000, phi.d)
    np.testing.assert_allclose(psi @ theta, traj.returns(r), atol=1e-12)
    enum = enumerate_responses(mdp)
    np.testing.assert_allclose(trajectory_features(phi, enum).toarray(), phi.psi(enum).toarray(), atol=1e-12)


def test_preference_data_validation(inst):
    mdp, phi, theta, r = inst
    data = sample_preferences(mdp, r, 20, seed=0)
    with pytest.raises(ValueError, match="same length"):
        PreferenceData(data.first, data.second, data.first_preferred[:5])
