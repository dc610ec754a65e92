"""Tests for experiments E5 (overoptimization, S14) and E7 (practical RTO: S12, S13_beta1_zero and S20-S23)."""

from __future__ import annotations

import numpy as np
import pytest

from rto_sim import TokenMDP, draw_theta, enumerate_responses, make_features, soft_bellman
from rto_sim.experiments import e5, e7, run_experiment
from rto_sim.experiments.e7_data import max_logpolicy_diff
from rto_sim.tabular_ppo import scheme_reward_table

# ---------------------------------------------------------------------------------------------------
# E5: exact best-of-n and Gibbs laws
# ---------------------------------------------------------------------------------------------------


def test_best_of_n_law_matches_monte_carlo_and_limits():
    rng = np.random.default_rng(0)
    K = 7
    p = rng.dirichlet(np.ones(K))
    proxy = np.array([0.3, 1.0, -2.0, 1.0, 0.5, 0.0, 0.3])      # ties on purpose
    assert np.allclose(e5.best_of_n_law(p, proxy, 1), p, atol=1e-15)
    q = e5.best_of_n_law(p, proxy, 4)
    assert abs(q.sum() - 1) < 1e-12
    # Monte Carlo with uniform tie-breaking among the samples
    n_mc = 200_000
    draws = rng.choice(K, size=(n_mc, 4), p=p)
    s = proxy[draws] + rng.random((n_mc, 4)) * 1e-9             # random tie-break
    best = draws[np.arange(n_mc), s.argmax(axis=1)]
    freq = np.bincount(best, minlength=K) / n_mc
    assert np.abs(freq - q).max() < 4 * np.sqrt(0.25 / n_mc) + 1e-3
    # n -> infinity: all mass on the top tie group, split in proportion to p
    q_inf = e5.best_of_n_law(p, proxy, 10_000)
    top = proxy == proxy.max()
    assert np.allclose(q_inf[top], p[top] / p[top].sum(), atol=1e-12)


def test_gibbs_law_is_soft_bellman_optimum_on_a_tree():
    mdp = TokenMDP.tree(3, 3, seed=2)
    phi = make_features(mdp, "positional")
    r = phi.token_reward(draw_theta(mdp, phi, seed=3))
    enum = enumerate_responses(mdp)
    t = 0.3
    q = e5.gibbs_law(enum.log_prob(mdp.log_pi_ref), enum.returns(r), t)
    sol = soft_bellman(mdp, r, t)
    assert np.allclose(q, np.exp(enum.log_prob(sol.log_policy)), atol=1e-12)


def test_e5_quick_runs_and_exact_proxy_is_monotone(tmp_path):
    summary = run_experiment("E5", tmp_path, quick=True)
    checks = summary["checks"]
    assert checks["S14_exact"]["verdict"] == "pass"
    assert {"S14_ensemble_worst", "S14_ensemble_uwo"} <= set(checks)
    assert all(c["verdict"] in ("pass", "fail", "inconclusive") for c in checks.values())
    assert (tmp_path / "E5" / "results.parquet").exists()


# ---------------------------------------------------------------------------------------------------
# E7: S12 exact equalities and the quick grid
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [None, 0.05])
def test_s12_exact_planning_equalities_on_a_tree(clip):
    mdp = TokenMDP.tree(3, 4, n_prompts=2, eos=True, seed=5)
    phi = make_features(mdp, "bigram")
    r = phi.token_reward(draw_theta(mdp, phi, return_var=1.0, seed=6))
    rm = phi.token_reward(draw_theta(mdp, phi, return_var=1.0, seed=7))          # a "wrong" RM on purpose
    log_dpo = soft_bellman(mdp, r, 0.1).log_policy
    pol = {}
    for scheme in ("ppo", "rto", "semi_rto", "ddpo", "rs_ppo"):
        table, spread = scheme_reward_table(mdp, scheme, rm, log_dpo, beta1=0.2, dpo_clip=clip)
        assert spread == 0.0
        pol[scheme] = soft_bellman(mdp, table, 0.1).log_policy

    def diff(a, b):
        return max_logpolicy_diff(pol[a], pol[b])

    assert diff("rto", "semi_rto") < 1e-10
    assert diff("rto", "ddpo") < 1e-10
    assert diff("rs_ppo", "ppo") < 1e-10
    assert diff("rto", "ppo") > 1e-3          # a different total is a different optimum


def test_s12_redistributions_are_not_markov_on_aggregated_states():
    mdp = TokenMDP.last_token_automaton(3, 4, eos=True, seed=8)
    phi = make_features(mdp, "bigram")
    r = phi.token_reward(draw_theta(mdp, phi, seed=9))
    log_dpo = soft_bellman(mdp, r, 0.1).log_policy
    _, s_rto = scheme_reward_table(mdp, "rto", r, log_dpo, beta1=0.2, beta3=0.0)
    _, s_ddpo = scheme_reward_table(mdp, "ddpo", r, log_dpo, beta1=0.2, beta3=0.0)
    assert s_rto == 0.0 and s_ddpo > 1e-3


def test_e7_quick_runs_end_to_end(tmp_path):
    """The quick grid end to end: identities pass, every prediction of S20-S23 has a verdict, the table holds one
    progress curve per (cell, critic, mode) and the data part's chosen ridges."""
    summary = run_experiment("E7", tmp_path, quick=True)
    checks = summary["checks"]
    for k in ("S12_shaped", "S12_rs_ppo", "S12_aggregated", "S13_beta1_zero"):
        assert checks[k]["verdict"] == "pass" and checks[k]["kind"] == "identity", (k, checks[k])
    assert checks["S12_shaped"]["measured"] < 1e-10
    cfg = e7.Config.quick()
    for critic in cfg.critics:
        for prefix in ("S20_asymptote", "S21_speedup", "S22_snr"):
            assert checks[f"{prefix}_{critic}"]["kind"] == "prediction"
    for dpo in cfg.dpos:
        assert {f"S23_data_ppo_{dpo}", f"S23_data_converged_{dpo}"} <= set(checks)
        assert checks[f"S23_data_ppo_{dpo}"]["paper"]
    assert all(c["verdict"] in ("pass", "fail", "inconclusive") for c in checks.values())
    df = __import__("pandas").read_parquet(tmp_path / "E7" / "results.parquet")
    prog = df[(df.section == "speed") & (df.metric == "progress")]
    n_runs = sum(len(cfg.modes) * sum(1 for c in cfg.critics if c != "tree_tabular" or H <= cfg.tree_max_H)
                 for H in cfg.horizons) * cfg.seeds
    assert len(prog) == n_runs * (cfg.n_updates["loglinear"] + 1)
    ridges = df[(df.section == "data") & (df.metric == "ridge")]
    assert len(ridges) == cfg.data_seeds * len(cfg.fractions) * (len(cfg.rms) + len(cfg.dpos))
    assert set(ridges.value) <= set(cfg.rm_ridges) | set(cfg.dpo_ridges)
