"""Verdicts that can fail: the shared statistics (rto_sim/experiments/stats.py) and every rewritten check, fed
synthetic data on which it must pass and data on which it must fail (issue 15)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from rto_sim.experiments import e0, e1, e1b, e3, e6, stats

# ---------------------------------------------------------------------- shared statistics


def test_band_test_pass_fail_inconclusive():
    assert stats.band_test(0.50, 0.01, (0.4, 0.6))["verdict"] == "pass"
    assert stats.band_test(0.30, 0.01, (0.4, 0.6))["verdict"] == "fail"
    assert stats.band_test(0.58, 0.05, (0.4, 0.6))["verdict"] == "inconclusive"    # interval straddles the edge
    assert stats.band_test(float("nan"), 0.1, (0.4, 0.6))["verdict"] == "inconclusive"
    r = stats.band_test(0.5, 0.01, (0.4, 0.6))
    assert r["low"] < 0.5 < r["high"] and r["mde"] == pytest.approx(2.8 * 0.01, rel=0.01)


def test_mean_band_test_is_tost_on_samples():
    rng = np.random.default_rng(0)
    assert stats.mean_band_test(1 + 0.05 * rng.standard_normal(200), (0.9, 1.1))["verdict"] == "pass"
    assert stats.mean_band_test(1.5 + 0.05 * rng.standard_normal(200), (0.9, 1.1))["verdict"] == "fail"
    assert stats.mean_band_test(1 + rng.standard_normal(5), (0.9, 1.1))["verdict"] == "inconclusive"


def test_weighted_slope_recovers_slope_and_its_error():
    rng = np.random.default_rng(1)
    x = np.log([500, 2000, 8000, 32000])
    se = np.full(4, 0.02)
    draws = [stats.weighted_slope(x, -0.5 * x + 3 + se * rng.standard_normal(4), se) for _ in range(3000)]
    b, sb = np.array(draws).T
    assert abs(b.mean() + 0.5) < 0.002
    assert sb[0] == pytest.approx(b.std(), rel=0.08)          # the stated SE is the sampling SE of the slope
    assert np.isnan(stats.weighted_slope([1.0], [1.0], [0.1])[0])


def test_pooled_slope_and_rate_test_catch_one_bad_stratum():
    x = np.log([500, 2000, 8000, 32000])
    se = np.full(4, 0.01)
    good = {h: (x, -0.5 * x + h, se) for h in range(6)}
    res = stats.rate_test(*stats.pooled_slope(good), (-0.55, -0.45))
    assert res["verdict"] == "pass" and res["outside"] == []
    # pooled slope still inside the band, but one stratum far outside: fail (the S5_tree_tabular case)
    bad = {**good, 0: (x, -0.75 * x, se), 1: (x, -0.25 * x, se)}
    pooled, per = stats.pooled_slope(bad)
    assert -0.55 < pooled[0] < -0.45
    res = stats.rate_test(pooled, per, (-0.55, -0.45))
    assert res["verdict"] == "fail" and set(res["outside"]) == {0, 1}


def test_coverage_test_fails_below_target_minus_margin():
    assert stats.coverage_test(90, 100, 0.9)["verdict"] == "pass"
    assert stats.coverage_test(86, 100, 0.9)["verdict"] == "pass"          # within the binomial margin
    assert stats.coverage_test(81, 100, 0.9)["verdict"] == "fail"          # 0.81 of cells: E6's old S10_bounds
    assert stats.coverage_test(0, 0, 0.9)["verdict"] == "inconclusive"
    assert stats.binomial_margin(0.9, 100) == pytest.approx(1.645 * 0.03, rel=1e-3)


def test_min_detectable_effect_and_t_interval_level():
    assert stats.min_detectable_effect(1.0) == pytest.approx(2.8016, rel=1e-3)
    x = np.random.default_rng(2).standard_normal(30)
    m, lo95, hi95 = stats.t_interval(x)
    _, lo99, hi99 = stats.t_interval(x, level=0.99)
    assert lo99 < lo95 < m < hi95 < hi99


# ---------------------------------------------------------------------- E1: S1, S2, S5 (rates and levels)
def e1_fits(slope: float = -0.5, level: float = 1.0, seeds: int = 20, d_eff: int = 2, bad_h=None,
            bad_slope: float = -0.5, gap_slope: float = -1.0) -> pd.DataFrame:
    """Token-MLE fits of one class: MSE = level * d / (2 s N) * (N/500)^(2 slope + 1) * chi2_d/d per seed."""
    rng = np.random.default_rng(0)
    rows = []
    for H in (2, 3, 4, 5):
        for N in (500, 2000, 8000, 32000):
            b = bad_slope if H == bad_h else slope
            mse_pred = d_eff / (2 * 0.2 * N)
            for s in range(seeds):
                mse = level * mse_pred * (N / 500) ** (2 * b + 1) * rng.chisquare(d_eff) / d_eff
                gap = 0.01 * (N / 500) ** (gap_slope if H != bad_h else -1.3) * rng.chisquare(d_eff) / d_eff
                rows.append({"reward_class": "c", "H": H, "N": N, "seed": s, "learner": "token_mle", "mse": mse,
                             "gap": gap, "d_eff": d_eff, "bt_slope": 0.2})
    return pd.DataFrame(rows)


def e1_agg(f: pd.DataFrame) -> pd.DataFrame:
    agg = f.groupby(["reward_class", "H", "N"]).agg(mse=("mse", "mean"), d_eff=("d_eff", "first"),
                                                   s=("bt_slope", "mean")).reset_index()
    agg["mse_pred"] = agg.d_eff / (2 * agg.s * agg.N)
    agg["mse_pred_exact_fisher"] = agg.mse_pred
    return agg


def test_e1_s1_passes_at_half_and_fails_off_rate():
    assert e1.check_s1(e1_fits(seeds=200), "c").verdict == "pass"
    assert e1.check_s1(e1_fits(slope=-0.35), "c").verdict == "fail"
    assert e1.check_s1(e1_fits(bad_h=3, bad_slope=-0.2, seeds=40), "c").verdict == "fail"      # one H off
    assert e1.check_s1(e1_fits(seeds=3), "c").verdict in ("pass", "inconclusive")             # few seeds


def test_e1_s2_level_tost():
    good = e1_fits(seeds=100)
    assert e1.check_s2(good, e1_agg(good), "c").verdict == "pass"
    off = e1_fits(level=1.5, seeds=100)
    assert e1.check_s2(off, e1_agg(off), "c").verdict == "fail"


def test_e1_s5_slope_fails_when_strata_disagree():
    cfg = e1.Config.quick()
    assert e1.check_s5(e1_fits(seeds=60), "c", cfg).verdict == "pass"
    res = e1.check_s5(e1_fits(seeds=60, bad_h=2), "c", cfg)
    assert res.verdict == "fail" and res.measured["strata_outside"] != "0/4"


def test_e1_identities_fail_on_a_bug():
    f = pd.DataFrame({"kl_gap_err": [1e-15, 2e-3]})
    assert e1.check_s5_identity(f).verdict == "fail" and e1.check_s5_identity(f).kind == "identity"
    assert e1.check_s5_identity(f.iloc[:1]).verdict == "pass"


# ---------------------------------------------------------------------- E1b: S4
def e1b_table(growth: float = 0.5, cross_scale: float = 1.0, token_slope: float = 0.0, seeds: int = 20):
    """A synthetic E1b table: bandit RMSE = 0.5 sqrt((K-1)/(2 s N)) ^ (2 growth) scaled, token flat."""
    rng = np.random.default_rng(3)
    cfg = replace(e1b.Config(), seeds=seeds)
    rows = []
    for H in cfg.H:
        K = 2**H
        base = np.sqrt((K - 1) / (2 * 0.2 * cfg.N)) ** (2 * growth) * cross_scale
        for s in range(seeds):
            noise = np.sqrt(rng.chisquare(50) / 50)
            for k, v in {"bt_slope": 0.2, "K": K, "d_eff": 1, "std_mu_R": 0.5, "mle_exists": 1.0}.items():
                rows.append({"H": H, "seed": s, "learner": "data", "metric": k, "value": v, "fit_ridge": np.nan})
            rows.append({"H": H, "seed": s, "learner": "token_mle", "metric": "rmse", "fit_ridge": cfg.ridge,
                         "value": 0.02 * K ** token_slope * noise})
            for lam in cfg.bandit_ridges:
                v = base * noise if lam == min(cfg.bandit_ridges) else 0.5 * noise
                rows.append({"H": H, "seed": s, "learner": "bandit_mle", "metric": "rmse", "fit_ridge": lam,
                             "value": v})
    return pd.DataFrame(rows), cfg


def test_e1b_growth_and_token_slope():
    t, cfg = e1b_table()
    c = e1b.checks(t, cfg)
    assert c["S4_growth"].verdict == "pass" and c["S4_token"].verdict == "pass"
    t, cfg = e1b_table(growth=0.8, token_slope=0.3)
    c = e1b.checks(t, cfg)
    assert c["S4_growth"].verdict == "fail" and c["S4_token"].verdict == "fail"
    assert c["S4_plateau"].kind == "identity"


def test_e1b_overfit_bracket():
    # crossing where (K-1)/(2 s N) = (0.5 / scale)^2, i.e. N/K = scale^2 / (2 s 0.25): scale 3 -> N/K ~ 90 (fail)
    assert e1b.checks(*e1b_table(cross_scale=3.0))["S4_overfit"].verdict == "fail"
    # scale 1.8 -> N/K ~ 32: bracketed by the grid's N/K in [15.6, 31.3] or [31.3, 62.5]
    res = e1b.checks(*e1b_table(cross_scale=1.41))["S4_overfit"]          # N/K ~ 20: inside [10, 40]
    assert res.verdict == "pass", res.measured


# ---------------------------------------------------------------------- E3: S9, S24, S25
def e3_pess(event_rate: float = 1.0, bound_rate: float = 1.0, first_slope: float = -0.5, n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(4)
    rows = []
    for N in (250, 1000, 4000):
        for seed in range(n):
            ev = rng.random() < event_rate
            holds = rng.random() < bound_rate
            for b in (0.1, 1.0):
                rows.append({"class": "c", "beta": b, "N": N, "seed": seed, "event": ev, "event_cal": True,
                             "subopt_pess": 0.1 if holds else 2.0, "bound_42": 1.0, "subopt_b1": 0.1, "bound_b1": 1.0,
                             "b1_converged": True, "b1_gap": 0.0, "first_term": (N / 250) ** first_slope
                             * (1 + 0.05 * rng.standard_normal()), "subopt_greedy": 0.1, "bound_42_literal": 1.0})
    return pd.DataFrame(rows)


def test_e3_s25_coverage_is_part_of_the_verdict():
    cfg = e3.Config()
    rc = pd.DataFrame([{"N": N, "rho_plugin_median": 5.0, "rho_calibrated": 5.0, "rho_asymptotic": 5.0,
                        "rho_bootstrap_median": np.nan, "rho_theory_C1": 300.0, "upsilon": 1e-3, "L": 1.0, "B": 1.0}
                       for N in (250, 1000, 4000)])
    assert e3.check_s9_coverage(e3_pess(), rc, "c", cfg).verdict == "pass"
    assert e3.check_s9_coverage(e3_pess(event_rate=0.75), rc, "c", cfg).verdict == "fail"
    ok, low_event, low_bound = e3_pess(), e3_pess(event_rate=0.7), e3_pess(bound_rate=0.7, event_rate=1.0)
    assert e3.check_s9_theorem42(ok, "c", cfg).verdict == "pass"
    # the bound holds everywhere but the event it rests on covers only 70%: fail
    assert e3.check_s9_theorem42(low_event, "c", cfg).verdict == "fail"
    assert e3.check_s9_b1(low_event, "c", cfg).verdict == "fail"
    assert e3.check_s9_theorem42(low_bound, "c", cfg).verdict == "fail"
    # the identity row: a bound violated while the event holds is a bug
    assert e3.check_s9_event(low_bound, "c").verdict == "fail"
    assert e3.check_s9_event(ok, "c").verdict == "pass"


def test_e3_s9_first_term_must_not_grow():
    assert e3.check_s9_first_term(e3_pess(), "c").verdict == "pass"
    assert e3.check_s9_first_term(e3_pess(first_slope=0.3), "c").verdict == "fail"


def e3_temperature(best_t: float = 1.0, bandit_better: bool = False, n: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    rows = []
    for b in (0.1, 1.0):
        for seed in range(n):
            for t in (0.5, 0.85, 1.0, 1.5):
                tok = 0.01 + 0.05 * (np.log(t) - np.log(best_t)) ** 2 + 0.001 * rng.standard_normal()
                ban = tok + (-0.05 if bandit_better else 0.05) + 0.001 * rng.standard_normal()
                for learner, v in (("token", tok), ("bandit", ban)):
                    rows.append({"class": "c", "learner": learner, "beta": b, "seed": seed, "temperature": t,
                                 "subopt": v, "identity_error": 0.0})
    return pd.DataFrame(rows)


def test_e3_s24_shape_and_ranking():
    cfg = e3.Config()
    assert e3.check_s24_shape(e3_temperature(), "c", cfg).verdict == "pass"
    assert e3.check_s24_shape(e3_temperature(best_t=0.85), "c", cfg).verdict == "fail"
    assert e3.check_s24_ranking(e3_temperature(), "c", cfg).verdict == "pass"
    assert e3.check_s24_ranking(e3_temperature(bandit_better=True), "c", cfg).verdict == "fail"
    bad = e3_temperature().assign(identity_error=1e-3)
    assert e3.check_s24_identity(bad).verdict == "fail"


# ---------------------------------------------------------------------- E6: S10 (3), S25
def e6_table(event_rate: dict | None = None, pess_worse: float = 0.0, n: int = 15) -> pd.DataFrame:
    rng = np.random.default_rng(6)
    rows = []
    for law in ("independent", "copy", "shift"):
        for N in (300, 1000):
            for seed in range(n):
                ev = rng.random() < (event_rate or {}).get(law, 0.97)
                for b in (0.1, 1.0):
                    g = 0.1 + 0.01 * rng.standard_normal()
                    rows.append({"theta_seed": 0, "law": law, "N": N, "seed": seed, "beta": b, "event": ev,
                                 "event_cal": ev, "subopt_pess": g - 0.02 + pess_worse, "subopt_greedy": g,
                                 "subopt_b1": g, "bound_42": 1.0, "bound_b1": 1.0, "b1_gap": 0.0, "rho": 5.0,
                                 "coverage": 1.0, "subopt_pess_ball": g, "per_step_mean": 1.0, "err_star": 0.1,
                                 "err_floor": 0.0})
    return pd.DataFrame(rows)


def test_e6_bounds_fail_when_one_law_lacks_coverage():
    cfg = e6.Config()
    assert e6.check_bounds(e6_table(), cfg).verdict == "pass"
    res = e6.check_bounds(e6_table({"copy": 0.5}), cfg)
    assert res.verdict == "fail" and "copy" in res.measured["laws_failing"]


def test_e6_pessimism_vs_greedy_fails_when_significantly_worse():
    ok = e6_table()
    assert e6.check_pessimism_vs_greedy(ok, e6.cell_means(ok)).verdict == "pass"
    bad = e6_table(pess_worse=0.1)
    assert e6.check_pessimism_vs_greedy(bad, e6.cell_means(bad)).verdict == "fail"


# ---------------------------------------------------------------------- E0: identities 12, 13
def test_e0_stochastic_identities_fail_on_wrong_values():
    t = pd.DataFrame(e0.stochastic_rows(replace(e0.Config.quick(), seeds=1)))
    assert e0.check_c2(t).verdict == "pass" and e0.check_residual(t).verdict == "pass"
    wrong = t.copy()
    wrong.loc[wrong.case == "proposition_c2_p0.5", "max_abs_error"] = 0.5        # Markov = predetermined = 1
    assert e0.check_c2(wrong).verdict == "fail"
    flat = t.copy()
    flat["stochastic_pointwise"] = 0.0                                            # identity held pointwise: bug
    assert e0.check_residual(flat).verdict == "fail"


# ---------------------------------------------------------------------- the report: two tables, quick labels
def test_report_separates_identities_from_predictions_and_labels_quick(tmp_path):
    from paper_figures.report import write_report

    def chk(verdict, kind, paper=""):
        return {"quantity": "q", "predicted": 0, "measured": 1.0, "tolerance": 0.1, "verdict": verdict,
                "note": "", "kind": kind, "paper": paper}
    full = {"experiment": "EX", "quick": False, "checks": {"S1_a": chk("pass", "prediction"),
                                                         "S25_b": chk("fail", "prediction", "RTO Theorem 4.2: ..."),
                                                         "1_c": chk("pass", "identity")}}
    quick = {"experiment": "EQ", "quick": True, "checks": {"S1_d": chk("pass", "prediction")}}
    text = write_report({"EX": full, "EQ": quick}, tmp_path / "R.md").read_text()
    pred, ident = text.index("## Predictions"), text.index("## Identities")
    assert pred < text.index("| S1_a |") < ident < text.index("| 1_c |")
    assert "| our prediction |" in text.split("| S1_a |")[1].split("\n")[0]
    assert "RTO Theorem 4.2" in text.split("| S25_b |")[1].split("\n")[0]
    assert "| **pass (quick grid)** |" in text.split("| S1_d |")[1].split("\n")[0]
    assert "| **pass** |" in text.split("| S1_a |")[1].split("\n")[0]
    assert "Reduced grids" in text


# ---------------------------------------------------------------------- E5: S14 rise and fall
def test_e5_fall_status_and_verdict():
    from rto_sim.experiments import e5
    assert e5.fall_status((0.1, 0.02, 0.18)) == "confirmed"
    assert e5.fall_status((0.0, 0.0, 0.0), (0.2, 0.1, 0.3)) == "contradicted"   # the last step is best, clearly
    assert e5.fall_status((0.0, 0.0, 0.0), (0.02, -0.1, 0.14)) == "undecided"
    assert e5.fall_status((0.05, -0.05, 0.15)) == "undecided"
    cfg = replace(e5.Config.quick(), N=(300, 3000), seeds=20, bon_n=(1, 2, 4), gibbs_t=(1.0, 0.5, 0.1))
    rng = np.random.default_rng(7)

    def table(shape, noise=0.01):
        rows = []
        for N in cfg.N:
            for seed in range(cfg.seeds):
                for fam in ("bon", "gibbs"):
                    for step in range(3):
                        g = shape[N][step] + noise * rng.standard_normal()
                        for metric, v in (("gold", g), ("sqrt_kl", (step + 1) * (1 + N / 3000)), ("kl", 1.0)):
                            rows.append({"proxy": "token_mle", "N": N, "ensemble": "single", "seed": seed,
                                         "family": fam, "step": step, "param": 0.0, "metric": metric, "value": v})
        return pd.DataFrame(rows)
    peaked = {300: [0.0, 0.5, 0.2], 3000: [0.0, 0.4, 0.8]}                 # falls at 300, rises to the end at 3000
    assert e5.check_rise_and_fall(table(peaked), "token_mle", "bon", cfg).verdict == "fail"
    good = {300: [0.0, 0.5, 0.2], 3000: [0.0, 0.9, 0.6]}                  # falls at both; the peak moves up
    res = e5.check_rise_and_fall(table(good), "token_mle", "bon", cfg)
    assert res.verdict == "pass" and res.measured["falls_significantly"]
    down = {300: [0.0, 0.9, 0.2], 3000: [0.0, 0.5, 0.3]}                  # falls at both, the peak moves down
    assert e5.check_rise_and_fall(table(down), "token_mle", "bon", cfg).verdict == "fail"
    faint = {300: [0.0, 0.5, 0.45], 3000: [0.0, 0.9, 0.85]}               # falls too small for 20 noisy seeds
    assert e5.check_rise_and_fall(table(faint, noise=0.5), "token_mle", "bon", cfg).verdict == "inconclusive"


def test_cli_labels_quick_grid_verdicts(tmp_path, capsys):
    from rto_sim.cli import main
    from rto_sim.results import verdict_label

    assert verdict_label({"verdict": "pass"}, quick=True) == "pass (quick grid)"
    assert verdict_label({"verdict": "fail"}, quick=False) == "fail"
    assert main(["experiment", "E0", "--out", str(tmp_path), "--quick", "--set", "H=[2]", "A=[2]"]) == 0
    out = capsys.readouterr().out
    assert "pass (quick grid)" in out and "identity" in out
