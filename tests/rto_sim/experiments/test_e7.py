"""E7 (practical RTO): identity 11 through the trainer, the shared statistics of its readouts, and every verdict of
S20-S23 fed with synthetic data on which it must pass, fail and stay inconclusive."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from rto_sim import TokenMDP, draw_theta, enumerate_responses, make_features
from rto_sim.exact import rto_reward_table
from rto_sim.experiments import e7
from rto_sim.experiments.stats import crossing_time, km_median, percentile_interval, restricted_mean, tost
from rto_sim.identities import random_instance
from rto_sim.mdp import safe_log
from rto_sim.policies import TabularCritic
from rto_sim.tabular_ppo import TabularPPOConfig, TabularPPOTrainer, prefix_dpo_sum, shaping_is_critic_offset

# ---------------------------------------------------------------------------------------------------
# identity 11: potential shaping = critic offset, through the whole trainer
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure, eos", [("tree", True), ("tree", False), ("last_token", True),
                                            ("random_automaton", False)])
def test_rs_ppo_from_zero_equals_ppo_from_the_prefix_dpo_sum(structure, eos):
    inst = random_instance(3, structure, A=3, H=4, eos=eos, n_prompts=2, beta=0.2)
    err, contrast = shaping_is_critic_offset(inst.mdp, inst.reward, inst.beta, inst.seed, n_updates=3)
    assert err < 1e-12
    assert contrast > 1e-4             # with both critics at 0 the runs differ: the identity is not a triviality


def _toy_tree():
    tree = TokenMDP.tree(3, 4, n_prompts=2, eos=True, seed=1)
    phi = make_features(tree, "bigram")
    r = phi.token_reward(draw_theta(tree, phi, return_var=1.0, seed=2))
    log_dpo = [np.where(tree.log_pi_ref[h] > -np.inf, safe_log(p), -np.inf)
               for h, p in enumerate(tree.random_policy(seed=3))]
    return tree, r, log_dpo


def test_prefix_dpo_sum_telescopes_to_the_paid_dpo_rewards():
    tree, _, log_dpo = _toy_tree()
    D = prefix_dpo_sum(tree, log_dpo, beta1=0.5)
    table = rto_reward_table(tree, None, log_dpo, beta1=0.5, beta3=0.0)
    enum = enumerate_responses(tree)
    paid = np.cumsum(enum.gather(table), axis=1)
    for h in range(1, tree.H):
        live = enum.length > h                    # s_h is a live prefix (not after EOS)
        assert np.allclose(D[h][enum.states[live, h]], paid[live, h - 1], atol=1e-12)
    with pytest.raises(ValueError, match="tree"):
        prefix_dpo_sum(TokenMDP.last_token_automaton(3, 3, seed=0), log_dpo[:3], 0.5)


def test_a_wrong_critic_start_breaks_the_identity():
    """Failing data for identity 11: starting PPO's critic at half the prefix DPO sum is NOT RS-PPO."""
    tree, r, log_dpo = _toy_tree()
    cfg = TabularPPOConfig(mode="rs_ppo", beta1=0.5, beta2=0.2, n_updates=3, batch_size=16, epochs=1, n_minibatches=2,
                           lr=0.1, critic_lr=0.1, seed=4)
    D = prefix_dpo_sum(tree, log_dpo, 0.5)
    shaped = TabularPPOTrainer(tree, r, r, log_dpo, cfg).train()
    ppo = TabularPPOConfig(**{**cfg.__dict__, "mode": "ppo"})
    right = TabularPPOTrainer(tree, r, r, log_dpo, ppo, critic=TabularCritic(tree, init=D)).train()
    wrong = TabularPPOTrainer(tree, r, r, log_dpo, ppo, critic=TabularCritic(tree, init=[0.5 * d for d in D])).train()
    J = lambda res: np.array([row["J_true"] for row in res.curve])  # noqa: E731
    assert np.abs(J(shaped) - J(right)).max() < 1e-12
    assert np.abs(J(shaped) - J(wrong)).max() > 1e-4


# ---------------------------------------------------------------------------------------------------
# shared statistics
# ---------------------------------------------------------------------------------------------------


def test_tost_crossing_and_censored_times():
    rng = np.random.default_rng(0)
    eq = tost(rng.normal(0.0, 0.01, 30), margin=0.05)
    assert eq["equivalent"] and not eq["different"] and eq["p"] < 0.05
    far = tost(rng.normal(0.2, 0.01, 30), margin=0.05)
    assert far["different"] and not far["equivalent"]
    wide = tost(rng.normal(0.0, 0.5, 5), margin=0.05)
    assert not wide["equivalent"] and not wide["different"]
    assert crossing_time([0, 1, 2, 3], [0.0, 0.4, 0.6, 1.0], 0.5) == pytest.approx(1.5)
    assert crossing_time([0, 1, 2], [0.0, 0.1, 0.2], 0.5) != crossing_time([0, 1, 2], [0.0, 0.1, 0.2], 0.5)  # nan
    assert restricted_mean([10.0, np.nan, 30.0], budget=100.0) == pytest.approx(140 / 3)
    assert km_median([1.0, 2.0, np.nan, np.nan]) == 2.0 and km_median([1.0, np.nan, np.nan]) == np.inf
    lo, hi = percentile_interval(np.arange(101.0))
    assert lo == pytest.approx(2.5) and hi == pytest.approx(97.5)


def test_data_ratio_recovers_a_known_shift():
    ns = np.array([100.0, 200.0, 400.0, 800.0, 1600.0])
    ppo = np.tile(np.log(ns), (5, 1))
    assert e7.data_ratio(ppo, ppo + np.log(4.0), ns) == pytest.approx(4.0)          # RTO needs 1/4 of the data
    assert e7.data_ratio(ppo, ppo - np.log(2.0), ns) == pytest.approx(0.5)          # RTO needs twice the data
    assert e7.data_ratio(ppo, ppo, ns) == pytest.approx(1.0)
    assert e7.data_ratio(ppo, ppo + 100.0, ns) == pytest.approx(16.0)               # censored at N / n_min


# ---------------------------------------------------------------------------------------------------
# verdicts on synthetic tables
# ---------------------------------------------------------------------------------------------------

CFG = replace(e7.Config.quick(), horizons=(4, 8), critics=("none",), settings=("8:adam",), seeds=12, n_boot=300,
              n_updates={"loglinear": 20, "tabular": 20}, last_k=5, snr_updates=(1, 5), snr_update=5)


def _speed(curve, seeds=12, noise=0.0, H=(4, 8), metric="progress", U=20, seed=0):
    """Synthetic section 'speed': curve(scheme, H, u, rng) -> value for every seed and update."""
    rng = np.random.default_rng(seed)
    rows = []
    for h in H:
        for s in range(seeds):
            for scheme in ("ppo", "rs_ppo", "rto", "ddpo"):
                for u in range(U + 1):
                    rows.append({"section": "speed", "H": h, "seed": s, "actor": "loglinear", "batch_size": 8,
                                 "optimizer": "adam", "critic": "none", "scheme": scheme, "objective": "",
                                 "update": u, "metric": metric,
                                 "value": curve(scheme, h, u, rng) + noise * rng.standard_normal()})
    return pd.DataFrame(rows)


def _ramp(fast, slow):
    return lambda scheme, h, u, rng: min(1.0, u / (fast if scheme in ("rto", "rs_ppo") else slow) *
                                         (1 + 0.05 * rng.standard_normal()))


def test_s21_speedup_passes_fails_and_stays_inconclusive():
    check = lambda t: e7.check_s21_speedup(t, CFG, "none").verdict  # noqa: E731
    assert check(_speed(_ramp(4, 8))) == "pass"                               # dense twice as fast
    assert check(_speed(_ramp(8, 4))) == "fail"                               # dense slower
    assert check(_speed(_ramp(6, 6))) == "fail"                               # no effect (inside 1/1.25..1.25)
    never = _speed(lambda scheme, h, u, rng: 0.3 * u / 20)                    # nobody reaches 0.8: censored
    assert check(never) == "inconclusive"


def _plateau(dense, delayed, rising=False):
    def f(scheme, h, u, rng):
        top = dense if scheme in ("rto", "rs_ppo") else delayed
        return top * (u / 20 if rising else min(1.0, u / 4)) + 0.005 * rng.standard_normal()
    return f


def test_s20_asymptote_passes_fails_and_stays_inconclusive():
    check = lambda t: e7.check_s20_asymptote(t, CFG, "none").verdict  # noqa: E731
    assert check(_speed(_plateau(0.9, 0.9))) == "pass"
    assert check(_speed(_plateau(0.9, 0.6))) == "fail"                        # converged to different plateaus
    assert check(_speed(_plateau(0.9, 0.9, rising=True))) == "inconclusive"   # not converged


def test_s22_snr_passes_fails_and_stays_inconclusive():
    def corr(a, b):
        return lambda scheme, h, u, rng: (a if scheme in ("rto", "rs_ppo") else b) + 0.02 * rng.standard_normal()
    check = lambda t: e7.check_s22_snr(t, CFG, "none").verdict  # noqa: E731
    assert check(_speed(corr(0.6, 0.4), metric="adv_corr", U=5)) == "pass"
    assert check(_speed(corr(0.4, 0.6), metric="adv_corr", U=5)) == "fail"
    noisy = _speed(lambda scheme, h, u, rng: 0.5 + 0.3 * rng.standard_normal(), metric="adv_corr", U=5, seeds=3)
    assert check(noisy) == "inconclusive"


def _data(shift, noise=0.01, seeds=12, kind="ppo_J_norm"):
    """Synthetic section 'data': J(n) = 0.2 log2(n) for PPO, RTO's curve shifted by `shift` doublings of data."""
    rng = np.random.default_rng(1)
    rows = []
    for s in range(seeds):
        for n in (125, 250, 500, 1000, 2000):
            for arm in ("ppo:bandit", "rto:bandit:tree"):
                sh = shift if arm.startswith("rto") else 0.0
                val = 0.2 * (np.log2(n) + sh) + noise * rng.standard_normal()
                for u in range(6):
                    rows.append({"section": "data", "seed": s, "fraction": n / 2000, "n_data": n, "arm": arm,
                                 "arm_beta3": 1.0, "arm_ratio": 0.5, "update": u, "metric": kind, "value": val})
    return pd.DataFrame(rows)


def test_s23_data_ratio_passes_fails_and_stays_inconclusive():
    cfg = replace(CFG, dpos=("tree",), last_k=2)
    check = lambda t: e7.check_s23_data(t, cfg, "ppo", "tree")  # noqa: E731
    c = check(_data(2.0))
    assert c.verdict == "pass" and c.measured["ratio"] == pytest.approx(4.0, rel=0.1) and c.paper
    assert check(_data(-1.0)).verdict == "fail"                               # RTO needs more data
    same = check(_data(0.0))
    assert same.verdict == "fail" and "no effect" in same.measured["reading"]
    wide = check(_data(0.0, noise=0.5, seeds=3))
    assert wide.verdict == "inconclusive" and wide.measured["min_detectable_ratio_80pct_power"] > 1.5
    conv = e7.check_s23_data(_data(2.0, kind="converged"), cfg, "converged", "tree")
    assert conv.verdict == "pass"


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="grid"):
        e7.validate_config(replace(CFG, grid="huge"))
    with pytest.raises(ValueError, match="settings"):
        e7.validate_config(replace(CFG, settings=("x:adam",)))
    with pytest.raises(ValueError, match="ppo_arms"):
        e7.validate_config(replace(CFG, ppo_arms=("rto:bandit",)))
    assert e7.speed_grid(replace(CFG, grid="large"))["actors"] == ("loglinear", "tabular")
