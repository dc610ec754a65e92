"""Policy quality vs sampling temperature, exactly (rto_sim/temperature.py, RTO Fig. 5)."""

import numpy as np
import pytest
from scipy.special import logsumexp

from rto_sim.exact import enumerate_responses, evaluate, soft_bellman
from rto_sim.features import draw_theta, make_features
from rto_sim.mdp import TokenMDP
from rto_sim.temperature import temper_policy, temperature_sweep, tempering_error


def _setup(seed=0, eos=True):
    mdp = TokenMDP.tree(A=3, H=4, eos=eos, seed=seed)
    phi = make_features(mdp, "positional")
    r = phi.token_reward(draw_theta(mdp, phi, return_var=0.25, seed=seed + 1))
    pol = soft_bellman(mdp, r, 0.1).policy          # a sharper policy than pi*_0.5
    return mdp, r, pol


def test_T1_returns_the_policy_itself():
    mdp, r, pol = _setup()
    sw = temperature_sweep(mdp, pol, r, beta=0.5, temperatures=[1.0])
    ev = evaluate(mdp, pol, r, 0.5)
    assert sw.J[0] == pytest.approx(ev.J, abs=1e-12)
    assert sw.expected_return[0] == pytest.approx(ev.expected_return, abs=1e-12)
    assert sw.kl[0] == pytest.approx(ev.kl, abs=1e-12)
    assert sw.subopt[0] == pytest.approx(sw.J_star - ev.J, abs=1e-12)
    for a, b in zip(temper_policy(mdp, pol, 1.0), pol):
        np.testing.assert_allclose(a, b, atol=1e-14)


def test_T_to_zero_is_greedy_and_inf_is_uniform():
    mdp, r, pol = _setup()
    greedy = mdp.force_absorbing([np.eye(mdp.A)[p.argmax(axis=1)] for p in pol])   # no ties here
    ev = evaluate(mdp, greedy, r, 0.5)
    sw = temperature_sweep(mdp, pol, r, beta=0.5, temperatures=[0.5, 0.2, 0.1, 1e-3, 0.0])
    errs = np.abs(sw.J - ev.J)
    assert errs[-1] < 1e-12 and errs[-2] < 1e-6
    assert np.all(np.diff(errs[:3]) < 0) and errs[0] > 1e-2   # converging as T decreases
    unif = temper_policy(mdp, pol, np.inf)
    live = ~mdp.absorbing[1]
    np.testing.assert_allclose(unif[1][live], 1 / mdp.A)


def test_ties_split_uniformly_at_T0():
    mdp = TokenMDP.tree(A=3, H=1, seed=0)
    pol = [np.array([[0.4, 0.4, 0.2]])]
    np.testing.assert_allclose(temper_policy(mdp, pol, 0.0)[0], [[0.5, 0.5, 0.0]])


def test_zeros_and_absorbing_rows_preserved():
    mdp, r, pol = _setup()
    pol = [p.copy() for p in pol]
    pol[0][0] = [0.0, 0.7, 0.3]
    for T in (0.3, 2.0, np.inf):
        q = temper_policy(mdp, pol, T)
        assert q[0][0, 0] == 0.0
        for h in range(1, mdp.H):
            ab = mdp.absorbing[h]
            np.testing.assert_array_equal(q[h][ab], np.eye(mdp.A)[[mdp.eos] * ab.sum()])


def test_forbidden_token_mass_is_refused():
    mdp = TokenMDP.tree(A=3, H=1, seed=0, pi_ref=[np.array([[0.5, 0.5, 0.0]])])
    with pytest.raises(ValueError, match="pi_ref forbids"):
        temper_policy(mdp, [np.array([[0.2, 0.3, 0.5]])], 0.5)
    q = temper_policy(mdp, [np.array([[0.2, 0.8, 0.0]])], 0.5)
    assert q[0][0, 2] == 0.0


def test_per_state_law_against_enumeration():
    """Sequence law of pi_T: prod_h pi(y_h|s_h)^(1/T) / Z_T(s_h), with Z_T(s) computed per state, and it sums
    to one per prompt; it differs from the sequence-tempered law pi(y|x)^(1/T) / Z."""
    mdp, r, pol = _setup()
    T = 0.5
    enum = enumerate_responses(mdp)
    logq = enum.log_prob([np.log(np.maximum(p, 1e-300)) for p in temper_policy(mdp, pol, T)])
    logp = enum.log_prob([np.log(np.maximum(p, 1e-300)) for p in pol])
    logZ = [logsumexp(np.log(np.maximum(p, 1e-300)) / T, axis=1) for p in pol]   # (n_h,) per state
    logZ = [np.where(mdp.absorbing[h], 0.0, z) for h, z in enumerate(logZ)]
    expect = logp / T - sum(logZ[h][enum.states[:, h]] for h in range(mdp.H))
    np.testing.assert_allclose(logq, expect, atol=1e-9)
    assert np.exp(logq).sum() == pytest.approx(1.0, abs=1e-12)
    seq = logp / T - logsumexp(logp / T)
    assert np.abs(seq - logq).max() > 1e-2


def _sequence_tempered_policy(mdp, pol, T):
    """WRONG implementation: the Markov conditionals of the sequence law pi(y|x)^(1/T) / Z(x) (backward
    recursion W(s) = sum_a pi(a|s)^(1/T) W(s'))."""
    out = [None] * mdp.H
    logW_next = None
    for h in range(mdp.H - 1, -1, -1):
        z = np.log(np.maximum(pol[h], 1e-300)) / T
        if h < mdp.H - 1:
            z = z + logW_next[mdp.next_state[h]]
        lse = logsumexp(z, axis=1)
        out[h] = np.exp(z - lse[:, None])
        logW_next = np.where(mdp.absorbing[h], 0.0, lse)
    return mdp.force_absorbing(out)


def test_checker_accepts_right_and_detects_wrong_tempering():
    mdp, r, pol = _setup()
    T = 0.5
    right = temper_policy(mdp, pol, T)
    assert tempering_error(mdp, pol, T, right) < 1e-12
    wrong_seq = _sequence_tempered_policy(mdp, pol, T)
    assert tempering_error(mdp, pol, T, wrong_seq) > 1e-2
    unnormalized = mdp.force_absorbing([p ** (1 / T) for p in pol])
    assert tempering_error(mdp, pol, T, unnormalized) > 1e-2
    assert tempering_error(mdp, pol, T, pol) > 1e-2                  # untempered
    # and the wrong laws give different exact values
    J_right = evaluate(mdp, right, r, 0.5).J
    J_seq = evaluate(mdp, wrong_seq, r, 0.5).J
    assert abs(J_right - J_seq) > 1e-4


def test_sweep_shapes_rows_and_validation():
    mdp, r, pol = _setup()
    temps = [0.25, 0.5, 0.7, 1.0, 1.5, 2.0]
    sw = temperature_sweep(mdp, pol, r, beta=0.5, temperatures=temps)
    assert sw.J.shape == (6,) and len(sw.rows()) == 6
    assert np.all(sw.subopt >= -1e-12) and np.all(sw.kl >= -1e-12)
    np.testing.assert_allclose(sw.J, sw.expected_return - 0.5 * sw.kl, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        temperature_sweep(mdp, pol, r, beta=0.5, temperatures=[-1.0])
    with pytest.raises(ValueError, match="0 < T"):
        tempering_error(mdp, pol, 0.0, pol)
