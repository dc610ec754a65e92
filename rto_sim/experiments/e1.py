"""E1: statistical scaling of token MLE vs sentence bandit vs tabular DPO (docs/theory.md sections 3, 6, 7;
predictions S1, S2, S3, S5, S7, S8).

Design (full grid): A = 3, H in 2..7, one prompt, reward classes unigram / positional / bigram /
random (d = 8) / tree_tabular, N in {500, 2000, 8000, 32000} pairs, 20 seeds; every learner sees the
SAME data in a cell (a cell = class x H x N x seed), so learner comparisons are paired.

Environment per reward class. The MDP is the automaton on which the class is naturally tabular, so
that tabular DPO on its states is the "aggregated states" case of docs/theory.md section 4:
    unigram, positional -> TokenMDP.position (state (h));   bigram -> last_token_automaton;
    random, tree_tabular -> TokenMDP.tree.
(On a tree, tabular DPO has one free logit per prefix: sentence-level complexity, like the bandit.)
Reference pi_ref = behaviour mu: uniform by default (`reference`="uniform", the setting of docs/theory.md
section 3's d_eff examples) or softmax(N(0,1)/T) (`reference`="random"). theta* ~ draw_theta with
Var_mu(R) = return_var = 0.25 at every H (keeps the Bradley-Terry slope comparable). theta*, pi_ref
and features are fixed per (class, H) (`instance_seed`); the data seed comes from the cell config.

Learners (module rto_sim.learners): token_mle (the class's features, ridge `ridge`), bandit_mle (one
arm per response, ridge `bandit_ridge`), tabular_dpo (beta = `beta`, ridge `dpo_ridge` on the logits'
deviation from log pi_ref; max_iter `dpo_max_iter`). All ridges use the SUM convention. On the prefix tree
tabular DPO and the tree-tabular token MLE run with solver="auto" (the same objective in one-value-per-response
coordinates, ~10x fewer iterations near MLE non-existence; learners.py); the S7 refits keep the plain
L-BFGS on theta, so S7 still compares two parametrizations.

Metrics per (cell, learner) (tidy rows):
    mse        centred-return MSE under mu: sum_x rho(x) sum_y mu(y|x) (e(y) - E_mu[e|x])^2 with
               e = R_hat - R*, over ALL responses (enumeration); rmse = sqrt(mse)
    fisher_q   N * sum_{y,y'} mu(y) mu(y') sigmoid'(R*(y) - R*(y')) (e(y) - e(y'))^2, i.e.
               N (theta_hat - theta*)^T I (theta_hat - theta*) with I the per-pair Fisher at theta*,
               written in return space so it applies to every learner (S8)
    gap        KL-regularized sub-optimality J_beta(pi*) - J_beta(pi_hat) of the plug-in policy at
               beta (Gibbs policy of the fitted returns; the DPO policy itself for DPO), exact
    kl_gap_err |gap - beta KL(pi_hat || pi*)| (S5 identity; token/DPO via the engine recursions
               soft_bellman / sub_optimality / evaluate, bandit via enumeration)
    bt_slope   s = mean over the data pairs of sigmoid'(R*(y1) - R*(y2))
    fit_time_s, n_iter, converged
and per (class, H): d_eff (rank of the feature-difference covariance under mu), d_eff of the bandit
(K - 1) and of the DPO class (tabular on the MDP's states), K.
S7 extra (tree_tabular cells with N / K >= `s7_min_n_per_arm`): token MLE and bandit refitted with
ridge 0 (tight tolerance); s7_max_abs_diff = max |centred R_hat_token - centred R_hat_bandit|.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..exact import MAX_ENUMERATED, soft_bellman
from ..learners import bandit_mle_exists, fit_bandit_mle, fit_tabular_dpo, fit_token_mle
from ..preferences import sample_preferences
from ..results import Check
from ..sweep import SweepGrid, run_sweep
from . import config_dict
from .e1_instance import REWARD_CLASSES, instance_of
from .stats import band_test, fmt_values, log_mean_se, mean_band_test, pooled_slope, rate_test

LEARNERS = ("token_mle", "bandit_mle", "tabular_dpo")
ASYMPTOTIC = 20          # "N >= 20 d_eff" (S1, S2, S8) and "N >= 20 K" (S3) of docs/theory.md section 6


@dataclass(frozen=True)
class Config:
    """A: vocabulary size; H: horizons; reward_classes, learners: subsets of REWARD_CLASSES and LEARNERS;
    N: preference pairs per data set; seeds: data sets per (class, H, N); random_d: dimension of the "random"
    class; return_var: Var_mu(R) of theta* at every H; n_prompts; reference: "uniform" (pi_ref = mu uniform)
    or "random" (softmax(N(0,1)/ref_temperature)); instance_seed: seed of theta*, pi_ref and the features;
    ridge, bandit_ridge, dpo_ridge: ridges of the token MLE, the bandit MLE and tabular DPO (SUM
    convention); beta: KL coefficient of the plug-in policies and DPO temperature; dpo_max_iter: L-BFGS
    iterations of DPO; s7_min_n_per_arm: S7 refits at N >= this * K; workers: sweep processes."""

    A: int = 3
    H: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
    reward_classes: tuple[str, ...] = REWARD_CLASSES
    learners: tuple[str, ...] = LEARNERS
    N: tuple[int, ...] = (500, 2000, 8000, 32000)
    seeds: int = 20
    random_d: int = 8
    return_var: float = 0.25
    n_prompts: int = 1
    reference: str = "uniform"
    ref_temperature: float = 1.0
    instance_seed: int = 0
    ridge: float = 1e-3
    bandit_ridge: float = 1e-3
    dpo_ridge: float = 1e-3
    beta: float = 1.0
    dpo_max_iter: int = 5000
    s7_min_n_per_arm: int = 20
    workers: int = 2

    @classmethod
    def quick(cls) -> Config:
        return replace(cls(), H=(2, 3), reward_classes=("positional", "tree_tabular"), N=(1000, 4000, 16000))


# ---------------------------------------------------------------------- validation
def validate_config(cfg: Config) -> None:
    """Raise ValueError (naming the field) for a bad E1 config before anything runs."""
    bad = [c for c in cfg.reward_classes if c not in REWARD_CLASSES]
    if bad:
        raise ValueError(f"reward_classes: unknown reward class(es) {bad}; choose from {list(REWARD_CLASSES)}")
    bad = [x for x in cfg.learners if x not in LEARNERS]
    if bad:
        raise ValueError(f"learners: unknown learner(s) {bad}; choose from {list(LEARNERS)}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in cfg.N):
        raise ValueError(f"N: every number of pairs must be an integer >= 1, got {list(cfg.N)}")
    if not isinstance(cfg.seeds, int) or cfg.seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {cfg.seeds!r}")
    A, P = cfg.A, cfg.n_prompts
    if not isinstance(A, int) or A < 2:
        raise ValueError(f"A must be an integer >= 2, got {A!r}")
    for H in cfg.H:
        if not isinstance(H, int) or H < 1:
            raise ValueError(f"H: horizons must be integers >= 1, got {H!r}")
        if P * A**H > MAX_ENUMERATED:
            raise ValueError(f"H={H}: A^H = {A**H} responses per prompt are not enumerable (limit "
                             f"{MAX_ENUMERATED} rows); this experiment measures errors over all responses and has "
                             "no recursion-based metric path: use a smaller H")
    if cfg.reference not in ("uniform", "random"):
        raise ValueError(f"reference must be 'uniform' or 'random', got {cfg.reference!r}")
    for key in ("ridge", "bandit_ridge", "dpo_ridge"):
        if not (np.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)!r}")
    if not cfg.beta > 0:
        raise ValueError(f"beta must be > 0, got {cfg.beta!r}")


# ---------------------------------------------------------------------- one cell
def _rows(learner, **metrics):
    return [{"learner": learner, "metric": k, "value": float(v)} for k, v in metrics.items()]


def e1_cell(cell: dict, rng_seed: int) -> list[dict]:
    """All learners of `cell["learners"]` on one data set; see module docstring for the metrics."""
    inst = instance_of(cell)
    N = int(cell["N"])
    data = sample_preferences(inst.mdp, inst.reward, N, seed=rng_seed)
    rows = _rows("data", bt_slope=data.bt_slope(), d_eff=inst.d_eff, d_eff_bandit=inst.d_eff_bandit,
                 d_eff_dpo=inst.d_eff_dpo, K=inst.K, asym_trace=inst.asymptotic_trace)
    enum = inst.enum
    fits = {}
    for learner in cell["learners"]:
        t0 = time.perf_counter()
        if learner == "token_mle":
            fit = fit_token_mle(data, inst.features, ridge=cell["ridge"], solver="auto", mdp=inst.mdp)
            R_hat = fit.returns(enum)
            sol = soft_bellman(inst.mdp, fit.token_reward(), inst.beta)
            gap, bkl = inst.engine_gap(sol.policy)
        elif learner == "bandit_mle":
            fit = fit_bandit_mle(data, inst.mdp, ridge=cell["bandit_ridge"])
            R_hat = fit.returns(enum)
            gap, bkl = inst.gibbs_gap(R_hat)
        else:
            fit = fit_tabular_dpo(data, inst.mdp, beta=inst.beta, ridge=cell["dpo_ridge"],
                                  max_iter=cell.get("dpo_max_iter", 5000), solver="auto")
            R_hat = fit.returns(enum)          # beta sum log pi/pi_ref = R_hat - V_hat(x): centring removes V
            gap, bkl = inst.engine_gap(fit.policy)
        dt = time.perf_counter() - t0
        fits[learner] = (fit, R_hat)
        mse = inst.mse(R_hat)
        rows += _rows(learner, mse=mse, rmse=np.sqrt(mse), fisher_q=N * inst.fisher_quadratic(R_hat), gap=gap,
                      kl_gap_err=abs(gap - bkl), fit_time_s=dt, n_iter=fit.n_iter, converged=fit.converged)
    if cell["reward_class"] == "tree_tabular" and N >= cell.get("s7_min_n_per_arm", 20) * inst.K:
        tok = fit_token_mle(data, inst.features, ridge=0.0, tol=1e-11)
        band = fit_bandit_mle(data, inst.mdp, ridge=0.0, tol=1e-11)
        diff = inst.centred(tok.returns(enum)) - inst.centred(band.returns(enum))
        rows += _rows("s7", max_abs_diff=np.abs(diff).max(), converged=tok.converged and band.converged,
                      mle_exists=bandit_mle_exists(data, inst.mdp, require_all_arms=True),
                      grad_norm=max(tok.grad_norm, band.grad_norm), rmse_token=np.sqrt(inst.mse(tok.returns(enum))))
    if "token_mle" in fits and "bandit_mle" in fits and cell["reward_class"] == "tree_tabular":
        diff = inst.centred(fits["token_mle"][1]) - inst.centred(fits["bandit_mle"][1])
        rows += _rows("s7_ridge", max_abs_diff=np.abs(diff).max())
    return rows


def grid_of(cfg: Config) -> SweepGrid:
    """The sweep: axes reward_class x H x N x seed; every other setting but `workers` is fixed in each cell (and
    in its seed)."""
    fixed = {k: v for k, v in config_dict(cfg).items() if k not in ("H", "reward_classes", "N", "seeds", "workers")}
    return SweepGrid(axes={"reward_class": list(cfg.reward_classes), "H": list(cfg.H), "N": list(cfg.N),
                           "seed": list(range(cfg.seeds))}, fixed=fixed)


# ---------------------------------------------------------------------- analysis
def wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (class, H, N, seed, learner) with metric columns."""
    keys = ["reward_class", "H", "N", "seed", "learner"]
    return table.pivot_table(index=keys, columns="metric", values="value", aggfunc="first").reset_index()


def analysis_tables(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(w, fits, agg): the wide table, one row per fit with its cell's data statistics, and the aggregate per
    (class, H, N, learner) with the predicted MSE d / (2 s N) (aggregate.csv)."""
    w = wide(table)
    data = w[w.learner == "data"].set_index(["reward_class", "H", "N", "seed"])
    dcols = [c for c in ["bt_slope", "d_eff", "d_eff_bandit", "d_eff_dpo", "K", "asym_trace"] if c in w.columns]
    if "asym_trace" not in dcols:
        w = w.assign(asym_trace=np.nan)
        data = data.assign(asym_trace=np.nan)
        dcols.append("asym_trace")
    fits = w[w.learner.isin(LEARNERS)].drop(columns=dcols).join(data[dcols], on=["reward_class", "H", "N", "seed"])
    agg = fits.groupby(["reward_class", "H", "N", "learner"]).agg(
        mse=("mse", "mean"), fisher_q_mean=("fisher_q", "mean"), fisher_q_var=("fisher_q", "var"),
        gap=("gap", "mean"), kl_gap_err_max=("kl_gap_err", "max"), s=("bt_slope", "mean"), d_eff=("d_eff", "first"),
        d_eff_bandit=("d_eff_bandit", "first"), d_eff_dpo=("d_eff_dpo", "first"), K=("K", "first"),
        fit_time_s=("fit_time_s", "mean"), converged=("converged", "mean"), seeds=("mse", "size"),
        asym_trace=("asym_trace", "first")).reset_index()
    agg["rmse"] = np.sqrt(agg["mse"])
    agg["d_learner"] = np.select([agg.learner == "token_mle", agg.learner == "bandit_mle"],
                                 [agg.d_eff, agg.d_eff_bandit], agg.d_eff_dpo)
    agg["mse_pred"] = agg.d_learner / (2 * agg.s * agg.N)
    agg["mse_pred_exact_fisher"] = np.where(agg.learner == "token_mle", agg.asym_trace / agg.N, np.nan)
    return w, fits, agg


S1_BAND = (-0.55, -0.45)      # docs/theory.md S1
S2_BAND = (0.85, 1.15)        # S2: "within ~15%"
S3_BAND = (0.85, 1.15)        # S3: measured / predicted ratio
S5_BAND = (-1.15, -0.85)      # S5: "near -1 (not -1/2)"; the band is ours


def _slope_groups(f: pd.DataFrame, col: str, power: float = 1.0) -> dict:
    """{H: (log N, power * log(seed mean of col), its delta-method SE)} over the N values of each H."""
    groups = {}
    for H, d in f.groupby("H"):
        pts = [(np.log(N), *log_mean_se(g[col].to_numpy(float))) for N, g in d.groupby("N")]
        x, y, se = (np.array(v, float) for v in zip(*pts))
        groups[int(H)] = (x, power * y, power * se)
    return groups


def _strata_text(res: dict) -> str:
    return ", ".join(f"H{k}: {b:.3f} [{lo:.3f}, {hi:.3f}]" for k, (b, lo, hi) in res["strata"].items())


def _rate_check(quantity: str, groups: dict, band: tuple, predicted: float, note: str) -> Check:
    """A rate claim: pooled fixed-effects slope over H with its 95% interval (`rate_test`) and per-H consistency."""
    pooled, per = pooled_slope(groups)
    res = rate_test(pooled, per, band)
    if not np.isfinite(res["est"]):
        return Check(quantity=quantity, predicted=predicted, measured=None, tolerance=f"slope in {list(band)}",
                     verdict="inconclusive", note="fewer than two N values in every stratum")
    return Check(
        quantity=quantity, predicted=predicted,
        measured={"slope": res["est"], "ci95": [res["low"], res["high"]],
                  "strata_outside": f"{len(res['outside'])}/{len(res['strata'])}"},
        tolerance=f"slope in {list(band)}: pass if the 90% interval lies inside, fail if the 95% interval or any "
                  "stratum's Bonferroni interval lies outside",
        verdict=res["verdict"],
        note=(f"{note}; per-H slopes with Bonferroni intervals {{{_strata_text(res)}}}; outside the band: "
              f"{res['outside'] or 'none'}; interval from the seed-to-seed variance of each point (delta method), "
              f"minimal detectable deviation {res['mde']:.3f}"))


def check_s1(fits_tok: pd.DataFrame, cls: str) -> Check:
    """S1 (prediction): token-MLE centred-return RMSE ~ N^-1/2 once N >= 20 d_eff (fits_tok: the class's
    token-MLE fits, one row per seed)."""
    asym = fits_tok[fits_tok.N >= ASYMPTOTIC * fits_tok.d_eff]
    groups = {k: g for k, g in _slope_groups(asym, "mse", 0.5).items() if len(g[0]) >= 2}
    seeds = int(asym.groupby(["H", "N"]).size().max()) if len(asym) else 0
    return _rate_check(f"log-log slope of centred-return RMSE vs N, token MLE, {cls} (N >= {ASYMPTOTIC} d_eff)",
                       groups, S1_BAND, -0.5,
                       f"RMSE = sqrt(seed mean of MSE), {seeds} seeds per cell, pooled over the H with >= 2 "
                       "asymptotic N values")


def check_s2(fits_tok: pd.DataFrame, agg: pd.DataFrame, cls: str) -> Check | None:
    """S2 (prediction): token-MLE MSE = d_eff / (2 s N) in the asymptotic cells (TOST on the mean ratio)."""
    asym = agg[agg.N >= ASYMPTOTIC * agg.d_eff]
    if asym.empty:
        return None
    pred = asym.set_index(["H", "N"]).mse_pred
    f = fits_tok.join(pred, on=["H", "N"], how="inner")
    ratio = f.mse / f.mse_pred
    res = mean_band_test(ratio, S2_BAND)
    exact = float((asym.mse / asym.mse_pred_exact_fisher).mean())
    cell = asym.mse / asym.mse_pred
    return Check(
        quantity=f"token MSE / (d_eff / (2 s N)), {cls}", predicted=1.0,
        measured={"mean": res["est"], "ci95": [res["low"], res["high"]]},
        tolerance=f"ratio in {list(S2_BAND)}: pass if the 90% t-interval lies inside (TOST), fail if the 95% "
                  "interval lies outside",
        verdict=res["verdict"],
        note=(f"{len(ratio)} fits in {len(asym)} (H, N) cells with N >= 20 d_eff; per-cell ratio range "
              f"[{cell.min():.3g}, {cell.max():.3g}]; minimal detectable deviation {res['mde']:.3f}; d_eff per H "
              f"{{{fmt_values(asym.groupby('H').d_eff.first().to_dict())}}}; s range [{asym.s.min():.3f}, "
              f"{asym.s.max():.3f}]; against the exact-Fisher asymptotic MSE tr(Sigma_psi I^+)/N (no constant-slope "
              f"approximation) the mean ratio is {exact:.3g}"))


def check_s5_identity(fits: pd.DataFrame) -> Check:
    """S5 (identity): the plug-in gap equals beta KL(pi_hat || pi*) for every learner and cell (identity 8)."""
    err = float(fits.kl_gap_err.max())
    return Check(
        quantity="max |SubOpt_beta(plug-in) - beta KL(pi_hat || pi*)| over every learner, class and cell",
        predicted=0.0, measured=err, tolerance=1e-8, verdict="pass" if err <= 1e-8 else "fail", kind="identity",
        note=f"{len(fits)} fits; gap by sub_optimality, KL by evaluate on pi* as reference (docs/theory.md identity 8)")


def check_s5(fits_tok: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S5 (prediction): the plug-in gap of the token MLE falls like N^-1 (rate, all N)."""
    return _rate_check(f"log-log slope in N of the mean plug-in gap, token MLE, {cls}", _slope_groups(fits_tok, "gap"),
                       S5_BAND, -1.0,
                       f"token MLE planned exactly at beta={cfg.beta}; mean gap over seeds at every N; the band is "
                       "ours (theory: 'near -1, not -1/2')")


def check_s8(fits_cls: pd.DataFrame, cls: str) -> Check | None:
    """S8 (prediction): N (theta_hat - theta*)^T I (theta_hat - theta*) ~ chi2(d_eff) in the asymptotic token-MLE
    fits."""
    cells = fits_cls[fits_cls.learner == "token_mle"]
    cells = cells[cells.N >= ASYMPTOTIC * cells.d_eff]
    if cells.empty:
        return None
    mean_ratio = float((cells.fisher_q / cells.d_eff).mean())
    grp = cells.groupby(["H", "N"])
    var_ratio = float((grp.fisher_q.var() / (2 * grp.d_eff.first())).mean())
    k = float(cells.d_eff.mean())
    n = len(cells)
    tol_m = 3 * np.sqrt(2 / k / n)
    tol_v = 3 * np.sqrt((2 + 12 / k) / n)
    return Check(
        quantity=f"Fisher check N (theta_hat - theta*)^T I (theta_hat - theta*): mean / d_eff and "
                 f"variance / (2 d_eff), {cls}",
        predicted={"mean/d_eff": 1.0, "var/(2 d_eff)": 1.0},
        measured={"mean/d_eff": mean_ratio, "var/(2 d_eff)": var_ratio},
        tolerance={"mean": round(tol_m, 4), "var": round(tol_v, 4)},
        verdict="pass" if abs(mean_ratio - 1) <= tol_m and abs(var_ratio - 1) <= tol_v else "fail",
        note=(f"{n} fits with N >= 20 d_eff; I = exact per-pair Fisher at theta* (enumeration); "
              "tolerances = 3 standard errors of a chi-square(d_eff) sample mean / variance"))


def check_s3(agg: pd.DataFrame, fits: pd.DataFrame, cls: str, cfg: Config) -> Check | None:
    """S3 (prediction): bandit / token RMSE ratio = (K-1) / sqrt(K d_eff) at N >= 20 K. For the tree-tabular class
    d_eff = K - 1 and the token MLE IS the bandit up to the ridge (S7), so the row is an identity there."""
    kind = "identity" if cls == "tree_tabular" else "prediction"
    b = agg[agg.learner == "bandit_mle"].set_index(["reward_class", "H", "N"])
    t = agg[(agg.learner == "token_mle") & (agg.reward_class == cls)].set_index(["reward_class", "H", "N"])
    j = t.join(b[["rmse"]].rename(columns={"rmse": "rmse_bandit"}), how="inner")
    j = j[j.index.get_level_values("N") >= ASYMPTOTIC * j.K]
    if j.empty:
        if "bandit_mle" in cfg.learners and "token_mle" in cfg.learners:
            return Check(quantity=f"RMSE ratio bandit / token, {cls}", predicted="(K-1)/sqrt(K d_eff)", measured=None,
                         tolerance=0.15, verdict="inconclusive", note="no cell with N >= 20 K", kind=kind)
        return None
    ratio = j.rmse_bandit / j.rmse
    pred = (j.K - 1) / np.sqrt(j.K * j.d_eff)
    alt = np.sqrt((j.K - 1) / j.d_eff)
    # interval of the mean log ratio over cells: delta-method SEs of log RMSE (seeds) of both learners
    f = fits[fits.reward_class == cls]
    fb = fits[fits.learner == "bandit_mle"]
    logs, ses = [], []
    for (_, H, N), p in zip(j.index, pred):
        tk = f[(f.learner == "token_mle") & (f.H == H) & (f.N == N)].mse
        bd = fb[(fb.reward_class == cls) & (fb.H == H) & (fb.N == N)].mse
        (lt, st), (lb, sb) = log_mean_se(tk), log_mean_se(bd)
        logs.append(0.5 * (lb - lt) - np.log(p))
        ses.append(0.5 * np.hypot(st, sb))
    est, se = float(np.mean(logs)), float(np.sqrt(np.sum(np.square(ses)))) / len(ses)
    res = band_test(est, se, tuple(np.log(S3_BAND)))
    rel = float(np.exp(est))
    return Check(
        quantity=f"RMSE ratio bandit / token at N >= 20 K, {cls} (measured/predicted)",
        predicted=1.0, measured={"ratio": rel, "ci95": [float(np.exp(res["low"])), float(np.exp(res["high"]))]},
        tolerance=f"measured/predicted in {list(S3_BAND)} (geometric mean over cells; TOST on the log)",
        verdict=res["verdict"], kind=kind,
        note=(("tree-tabular: d_eff = K - 1, so the prediction is sqrt((K-1)/K) ~ 1 and the two learners coincide "
               "by construction (S7); " if kind == "identity" else "")
              + "predicted ratio (K-1)/sqrt(K d_eff) per (H, N): "
              f"{{{fmt_values(dict(zip(map(str, j.index), pred)))}}}; "
              f"measured {{{fmt_values(dict(zip(map(str, j.index), ratio)))}}}; the centred-return asymptotics "
              f"MSE = d/(2sN) for both learners give sqrt((K-1)/d_eff) instead, mean measured/that = "
              f"{float((ratio / alt).mean()):.3g}"))


def check_s7(w: pd.DataFrame, cfg: Config) -> Check:
    """S7 (identity): the tree-tabular token MLE equals the bandit MLE (ridge 0, where the MLE exists)."""
    s7 = w[w.learner == "s7"]
    s7r = w[w.learner == "s7_ridge"]
    if s7.empty:
        return Check(quantity="tree-tabular token MLE vs bandit centred returns (ridge 0)", predicted=0.0,
                     measured=None, tolerance=1e-5, verdict="inconclusive", kind="identity",
                     note=f"no tree_tabular cell with N >= {cfg.s7_min_n_per_arm} K")
    conv = s7[s7.mle_exists == 1]
    worst = float(conv.max_abs_diff.max()) if not conv.empty else float("nan")
    return Check(
        quantity="max |centred R_hat tree-tabular MLE - centred R_hat bandit MLE| (ridge 0)",
        predicted=0.0, measured=worst, tolerance=1e-5, kind="identity",
        verdict=("pass" if worst <= 1e-5 else "fail") if not conv.empty else "inconclusive",
        note=(f"holds by construction (docs/theory.md section 3: potential shaping absorbs every other direction); "
              f"{len(conv)} of {len(s7)} cells with N >= {cfg.s7_min_n_per_arm} K have an existing MLE "
              f"(every arm seen, strongly connected comparison graph) and are compared (max final gradient "
              f"{float(conv.grad_norm.max()) if not conv.empty else float('nan'):.2g}); "
              f"with the default ridge {cfg.ridge} the two differ by at most "
              f"{float(s7r.max_abs_diff.max()) if not s7r.empty else float('nan'):.3g} (ridge acts on "
              f"different parametrizations); L-BFGS tolerance 1e-11 on the mean-loss gradient"))


def checks(table: pd.DataFrame, cfg: Config) -> dict[str, Check]:
    """S1, S2, S5 (rate), S8 per reward class, the S5 gap identity, then S3 per class and S7 (docs/theory.md
    section 6)."""
    w, fits, agg = analysis_tables(table)
    tok = agg[agg.learner == "token_mle"]
    out: dict[str, Check | None] = {}
    for cls in cfg.reward_classes:
        t = tok[tok.reward_class == cls]
        if t.empty:
            continue
        ft = fits[(fits.reward_class == cls) & (fits.learner == "token_mle")]
        out[f"S1_{cls}"] = check_s1(ft, cls)
        out[f"S2_{cls}"] = check_s2(ft, t, cls)
        out[f"S5_slope_{cls}"] = check_s5(ft, cls, cfg)
        out[f"S8_{cls}"] = check_s8(fits[fits.reward_class == cls], cls)
    out["S5_gap_identity"] = check_s5_identity(fits)
    for cls in cfg.reward_classes:
        out[f"S3_{cls}"] = check_s3(agg, fits, cls, cfg)
    if "tree_tabular" in cfg.reward_classes:
        out["S7"] = check_s7(w, cfg)
    return {k: c for k, c in out.items() if c is not None}


def run(cfg: Config, folder) -> pd.DataFrame:
    """The sweep's tidy table (one row per cell, learner and metric); writes aggregate.csv next to it."""
    validate_config(cfg)
    grid = grid_of(cfg)
    t0 = time.perf_counter()
    # longest cells first (tabular DPO on the prefix tree at large H dominates): shortens the parallel tail
    table = run_sweep(e1_cell, grid, Path(folder) / "sweep", workers=cfg.workers, progress=True,
                      cost=lambda c: (c["reward_class"] in ("random", "tree_tabular"), c["H"], c["N"]))
    wall = time.perf_counter() - t0
    analysis_tables(table)[2].to_csv(Path(folder) / "aggregate.csv", index=False)
    return table.assign(sweep_wall_time_s=wall)
