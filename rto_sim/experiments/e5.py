"""E5: reward-model overoptimization (docs/theory.md S14; Gao et al. 2023; Coste et al. 2024).

Per seed: a tree MDP (A = 3, H = 6, no EOS: K = 729 responses per prompt), a true token reward r* of class
`reward_class` scaled so E_x Var_{pi_ref} R* = return_var, and N Bradley-Terry pairs from pi_ref (nested:
the first N of the largest N). Proxies R_hat(y) fitted on the pairs:

    token_mle   `fit_token_mle` on the true reward class (structured, d parameters), ridge `mle_ridge`
    bandit      `fit_bandit_mle` (one value per response), ridge `bandit_ridge`
    dpo         `fit_tabular_dpo` (beta_dpo, ridge `dpo_ridge`); proxy = sum_h beta log(pi_dpo/pi_ref)(y)
                (the DPO implicit sequence reward; its per-prompt constant does not change the policies)
    exact       R* itself (the control)

Ensembles: `n_members` bootstrap resamples of the N pairs, one fit each; "worst" = min over members,
"uwo" = mean - uw_k * std over members (uncertainty-weighted); "single" = the fit on all N pairs.

Policies, all computed EXACTLY from the enumerated pi_ref (no sampling):
    best-of-n   the law of argmax_proxy among n iid pi_ref samples: for the responses sorted by proxy,
                G = pi_ref-mass of responses whose proxy is <= that of y, q(y) = (G^n - G_<^n) p(y) / p(group)
                (ties broken uniformly among samples, so a tie group shares its mass in proportion to p);
                n in bon_n
    Gibbs       q ∝ pi_ref exp(R_hat / t), t in gibbs_t (the KL-regularized RL optimum at beta = t)
For each: gold E_q R*, KL(q || pi_ref), sqrt(KL) (per prompt, averaged with rho).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..exact import enumerate_responses
from ..features import draw_theta, make_features
from ..learners import fit_bandit_mle, fit_tabular_dpo, fit_token_mle
from ..mdp import TokenMDP
from ..preferences import sample_preferences
from ..results import Check
from .stats import ci_verdict, fmt_interval, min_detectable_effect, t_interval

PROXIES = ("token_mle", "bandit", "dpo")
ENSEMBLES = ("single", "worst", "uwo")


@dataclass(frozen=True)
class Config:
    """A, H, n_prompts: the tree (no EOS); reward_class, return_var: the true reward r*; N: preference pairs
    (nested subsets); proxies: subset of PROXIES; mle_ridge, bandit_ridge: ridges of the token and bandit MLEs;
    beta_dpo, dpo_ridge: tabular DPO; n_members: bootstrap members of an ensemble, uw_k: k of the
    uncertainty-weighted ensemble; bon_n: best-of-n sizes; gibbs_t: Gibbs temperatures (strong optimization
    last); seeds: instances, numbered from seed0."""

    A: int = 3
    H: int = 6
    n_prompts: int = 2
    reward_class: str = "bigram"
    return_var: float = 0.25
    N: tuple[int, ...] = (300, 1000, 3000)
    proxies: tuple[str, ...] = PROXIES
    mle_ridge: float = 1e-3
    bandit_ridge: float = 0.01
    beta_dpo: float = 0.1
    dpo_ridge: float = 0.01
    n_members: int = 5
    uw_k: float = 1.0
    bon_n: tuple[int, ...] = tuple(int(2**k) for k in range(0, 17))
    gibbs_t: tuple[float, ...] = tuple(float(t) for t in np.logspace(1, -2.5, 22))
    seeds: int = 20
    seed0: int = 0

    @classmethod
    def quick(cls) -> Config:
        return replace(cls(), n_prompts=1, N=(300, 3000), proxies=("token_mle", "bandit"), seeds=2)


# ---------------------------------------------------------------------------------------------------
# exact policies from a proxy ranking
# ---------------------------------------------------------------------------------------------------


def best_of_n_law(p: np.ndarray, proxy: np.ndarray, n: int) -> np.ndarray:
    """Exact law of the best-of-n response under `proxy` for ONE prompt.

    p: (K,) pi_ref(y | x) (sums to 1); proxy: (K,) R_hat(y); n >= 1. Returns q (K,). Ties in the proxy
    are broken uniformly among the samples, so a tie group g gets (G_g^n - G_{g-1}^n) and shares it in
    proportion to p, where G_g is the pi_ref-mass of the groups up to g in increasing proxy order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    levels, group = np.unique(proxy, return_inverse=True)          # groups in increasing proxy order
    mass = np.bincount(group, weights=p, minlength=len(levels))
    G = np.minimum(np.cumsum(mass), 1.0)
    G_prev = np.concatenate([[0.0], G[:-1]])
    win = G**n - G_prev**n                                             # P(best sample lies in group g)
    share = np.where(mass[group] > 0, p / np.where(mass[group] > 0, mass[group], 1.0), 0.0)
    return win[group] * share


def gibbs_law(logp: np.ndarray, proxy: np.ndarray, t: float) -> np.ndarray:
    """q ∝ pi_ref exp(proxy / t) for ONE prompt (logp (K,) log pi_ref)."""
    z = logp + proxy / t
    z = z - z.max()
    q = np.exp(z)
    return q / q.sum()


def _kl(q: np.ndarray, logp: np.ndarray) -> float:
    m = q > 0
    return float(np.sum(q[m] * (np.log(q[m]) - logp[m])))


def sweep(logp_by_prompt, gold_by_prompt, proxy_by_prompt, rho, cfg: Config) -> list[dict]:
    """Gold, KL and sqrt(KL) of best-of-n and Gibbs policies of one proxy, averaged over prompts with rho."""
    rows = []
    for family, params in (("bon", cfg.bon_n), ("gibbs", cfg.gibbs_t)):
        for i, par in enumerate(params):
            gold = kl = 0.0
            for w, logp, g, s in zip(rho, logp_by_prompt, gold_by_prompt, proxy_by_prompt):
                q = best_of_n_law(np.exp(logp), s, int(par)) if family == "bon" else gibbs_law(logp, s, par)
                gold += w * float(q @ g)
                kl += w * _kl(q, logp)
            rows.append({"family": family, "step": i, "param": float(par), "gold": gold, "kl": max(kl, 0.0),
                         "sqrt_kl": float(np.sqrt(max(kl, 0.0)))})
    return rows


# ---------------------------------------------------------------------------------------------------
# proxies
# ---------------------------------------------------------------------------------------------------


def _fit_proxy(kind: str, data, mdp, phi, enum, cfg) -> np.ndarray:
    """(rows of enum,) proxy R_hat(y) for every enumerated response."""
    if kind == "token_mle":
        return fit_token_mle(data, phi, ridge=cfg.mle_ridge).returns(enum)
    if kind == "bandit":
        return fit_bandit_mle(data, mdp, ridge=cfg.bandit_ridge).returns(enum)
    if kind == "dpo":
        return fit_tabular_dpo(data, mdp, beta=cfg.beta_dpo, ridge=cfg.dpo_ridge).returns(enum)
    raise ValueError(f"proxy must be one of {PROXIES}, got {kind!r}")


def _add_rows(ctx, proxy_all: np.ndarray, **keys) -> None:
    """Append the tidy rows of `sweep` for one proxy (all enumerated responses) to ctx's row list."""
    rows, logp, gold, split, rho, cfg, seed = ctx
    for row in sweep(logp, gold, [proxy_all[i] for i in split], rho, cfg):
        for metric in ("gold", "kl", "sqrt_kl"):
            rows.append({**keys, "seed": seed, "family": row["family"], "step": row["step"],
                         "param": row["param"], "metric": metric, "value": row[metric]})


def run(cfg: Config, folder) -> pd.DataFrame:
    """Run the grid (see module docstring): rows (proxy, N, ensemble, seed, family, step, param, metric, value),
    the fit times (family "timing", metric "fit_s") and the wall time (metric "wall_s");
    `run_experiment` pins BLAS to one thread around it."""
    t_start = time.perf_counter()
    rows: list[dict] = []
    for k in range(cfg.seeds):
        seed = cfg.seed0 + k
        mdp = TokenMDP.tree(cfg.A, cfg.H, n_prompts=cfg.n_prompts, seed=40_000 + seed)
        phi = make_features(mdp, cfg.reward_class)
        r_true = phi.token_reward(draw_theta(mdp, phi, return_var=cfg.return_var, seed=50_000 + seed))
        enum = enumerate_responses(mdp)
        split = [np.flatnonzero(enum.prompt == x) for x in range(mdp.n_prompts)]
        logp_all = enum.log_prob(mdp.log_pi_ref)
        gold_all = enum.returns(r_true)
        logp = [logp_all[i] for i in split]
        gold = [gold_all[i] for i in split]

        ctx = (rows, logp, gold, split, mdp.rho, cfg, seed)
        _add_rows(ctx, gold_all, proxy="exact", N=0, ensemble="single")
        full = sample_preferences(mdp, r_true, int(max(cfg.N)), seed=60_000 + seed)
        rng = np.random.default_rng(70_000 + seed)
        for N in cfg.N:
            data = full.subset(slice(0, int(N)))
            boots = [rng.integers(0, int(N), size=int(N)) for _ in range(cfg.n_members)]
            for kind in cfg.proxies:
                t0 = time.perf_counter()
                single = _fit_proxy(kind, data, mdp, phi, enum, cfg)
                members = np.stack([_fit_proxy(kind, data.subset(b), mdp, phi, enum, cfg) for b in boots])
                fit_s = time.perf_counter() - t0
                _add_rows(ctx, single, proxy=kind, N=int(N), ensemble="single")
                _add_rows(ctx, members.min(axis=0), proxy=kind, N=int(N), ensemble="worst")
                uwo = members.mean(axis=0) - cfg.uw_k * members.std(axis=0, ddof=1)
                _add_rows(ctx, uwo, proxy=kind, N=int(N), ensemble="uwo")
                rows.append({"proxy": kind, "N": int(N), "ensemble": "fit", "seed": seed, "family": "timing",
                             "step": 0, "param": 0.0, "metric": "fit_s", "value": fit_s})
    wall = pd.DataFrame([{"family": "timing", "metric": "wall_s", "value": time.perf_counter() - t_start}])
    return pd.concat([pd.DataFrame(rows), wall], ignore_index=True)


# ---------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------


def curve_summary(df: pd.DataFrame, proxy: str, N: int, ensemble: str, family: str) -> dict:
    """Peak of the seed-mean gold curve: step, sqrt(KL) and gold at the peak, and the fall from the peak to
    the strongest optimization (last step), with a 95% CI over seeds (paired)."""
    d = df[(df.proxy == proxy) & (df.N == N) & (df.ensemble == ensemble) & (df.family == family)]
    g = d[d.metric == "gold"].pivot(index="seed", columns="step", values="value")
    s = d[d.metric == "sqrt_kl"].pivot(index="seed", columns="step", values="value")
    mean = g.mean(axis=0)
    peak = int(mean.idxmax())
    last = int(mean.index.max())
    fall = g[peak] - g[last]
    return {"peak_step": peak, "peak_sqrt_kl": float(s[peak].mean()), "peak_gold": float(mean[peak]),
            "end_gold": float(mean[last]), "end_sqrt_kl": float(s[last].mean()), "fall": t_interval(fall.to_numpy()),
            "rise": float(mean[peak] - mean[0])}


def check_exact(df: pd.DataFrame, cfg: Config) -> Check:
    """S14 control (identity): with the exact proxy gold rises monotonically in sqrt(KL) along both families."""
    worst_step, worst_kl = np.inf, np.inf
    for family in ("bon", "gibbs"):
        d = df[(df.proxy == "exact") & (df.family == family)]
        for _, grp in d.groupby("seed"):
            g = grp[grp.metric == "gold"].sort_values("step")["value"].to_numpy()
            s = grp[grp.metric == "sqrt_kl"].sort_values("step")["value"].to_numpy()
            worst_step = min(worst_step, float(np.diff(g).min()))
            worst_kl = min(worst_kl, float(np.diff(s).min()))
    tol = 1e-9
    return Check(
        quantity="min increment of gold (and of sqrt KL) between consecutive optimization strengths, exact proxy",
        predicted=">= 0 (gold rises monotonically in sqrt(KL))",
        measured={"min_gold_increment": worst_step, "min_sqrt_kl_increment": worst_kl}, tolerance=-tol,
        verdict="pass" if worst_step >= -tol and worst_kl >= -tol else "fail", kind="identity",
        note=f"best-of-n n in 1..{max(cfg.bon_n)} and Gibbs t in {cfg.gibbs_t[0]:.3g}..{cfg.gibbs_t[-1]:.3g}; "
             f"{cfg.seeds} seeds; exact laws from the enumerated pi_ref. Holds by mathematics: best-of-n under the "
             "true reward is stochastically increasing in n, and d E_q R / d(1/t) = Var_q(R) >= 0 for the Gibbs family")


def fall_status(fall: tuple[float, float, float], last_vs_best_earlier: tuple | None = None) -> str:
    """"confirmed" (the fall's 95% interval lies above 0), "contradicted" (the strongest optimization is
    significantly better than every earlier step: `last_vs_best_earlier`, the paired gold at the last step minus
    the best earlier step, has its interval above 0) or "undecided" (the data cannot tell)."""
    m, lo, hi = fall
    if np.isfinite(lo) and lo > 0:
        return "confirmed"
    if last_vs_best_earlier is not None and np.isfinite(last_vs_best_earlier[1]) and last_vs_best_earlier[1] > 0:
        return "contradicted"
    return "undecided"


def last_vs_best_earlier(df: pd.DataFrame, proxy: str, N: int, ensemble: str, family: str) -> tuple:
    """Paired t-interval over seeds of gold(last step) - gold(the earlier step with the best seed mean)."""
    d = df[(df.proxy == proxy) & (df.N == N) & (df.ensemble == ensemble) & (df.family == family)]
    g = d[d.metric == "gold"].pivot(index="seed", columns="step", values="value")
    last = int(g.columns.max())
    best = int(g.drop(columns=last).mean(axis=0).idxmax())
    return t_interval((g[last] - g[best]).to_numpy())


def check_rise_and_fall(df: pd.DataFrame, kind: str, family: str, cfg: Config) -> Check:
    """S14 (prediction): a finite-N proxy's gold rises then falls; the peak moves right and up with N. "fail" if
    the curve never rises or, at some N, the strongest optimization is significantly the best point (no fall), or
    if the falls are confirmed at every N but the peak does not move right and up; "inconclusive" when a fall is
    neither confirmed nor excluded (too few seeds)."""
    summ = {N: curve_summary(df, kind, N, "single", family) for N in cfg.N}
    status = {N: fall_status(v["fall"], last_vs_best_earlier(df, kind, N, "single", family)) for N, v in summ.items()}
    falls = all(st == "confirmed" for st in status.values())
    rises = all(v["rise"] > 0 for v in summ.values())
    Ns = sorted(summ)
    right = all(summ[b]["peak_sqrt_kl"] >= summ[a]["peak_sqrt_kl"] for a, b in zip(Ns, Ns[1:]))
    up = all(summ[b]["peak_gold"] >= summ[a]["peak_gold"] for a, b in zip(Ns, Ns[1:]))
    measured = {f"N={N}": {"peak_sqrt_kl": round(v["peak_sqrt_kl"], 4), "peak_gold": round(v["peak_gold"], 4),
                           "end_gold": round(v["end_gold"], 4), "fall": fmt_interval(v["fall"])}
                for N, v in summ.items()}
    measured.update({"rises": rises, "falls_significantly": falls, "peak_moves_right": right, "peak_moves_up": up})
    last = f"n = {max(cfg.bon_n)}" if family == "bon" else f"t = {cfg.gibbs_t[-1]:.3g}"
    if not rises or "contradicted" in status.values():
        verdict = "fail"
    elif falls:
        verdict = "pass" if (right and up) else "fail"
    else:
        verdict = "inconclusive"
    mde = {N: min_detectable_effect((v["fall"][2] - v["fall"][1]) / 3.92) for N, v in summ.items()
           if np.isfinite(v["fall"][1])}
    return Check(
        quantity=f"{kind} proxy, {family}: seed-mean gold vs sqrt(KL) -- rise, fall from the peak to the "
                 "strongest optimization, peak position vs N",
        predicted="rises then falls (fall > 0); peak sqrt(KL) and peak gold non-decreasing in N",
        measured=measured, tolerance="95% CI of the fall excludes 0 at every N",
        verdict=verdict,
        note=f"{cfg.seeds} seeds; fall = gold at the seed-mean peak minus gold at the last step ({last}), "
             f"paired over seeds; fall per N: {status}; smallest fall detectable with power 0.8 per N: "
             + ", ".join(f"N={N}: {v:.3g}" for N, v in mde.items()))


def check_ensemble(df: pd.DataFrame, ens: str, cfg: Config) -> Check:
    """S14 (prediction): an ensemble (worst-case or uncertainty-weighted) flattens the fall of the single proxy."""
    per_seed = []
    cells = {}
    for kind in cfg.proxies:
        for family in ("bon", "gibbs"):
            for N in cfg.N:
                d = df[(df.proxy == kind) & (df.N == N) & (df.family == family) & (df.metric == "gold")]
                piv = d.pivot_table(index=["seed", "ensemble"], columns="step", values="value")
                last = max(piv.columns)
                drop = piv.max(axis=1) - piv[last]               # per-seed own-peak minus end
                diff = drop.xs("single", level="ensemble") - drop.xs(ens, level="ensemble")
                cells[f"{kind}/{family}/N={N}"] = round(float(diff.mean()), 4)
                per_seed.append(diff)
    avg = pd.concat(per_seed, axis=1).mean(axis=1)
    m, lo, hi = t_interval(avg.to_numpy())
    return Check(
        quantity=f"fall(single) - fall({ens} ensemble of {cfg.n_members}), fall = own peak gold - gold at the "
                 "strongest optimization, averaged over proxies/families/N per seed",
        predicted="> 0 (ensembles flatten the fall)", measured={"mean": m, "ci95": [lo, hi], "cells": cells},
        tolerance="95% CI excludes 0", verdict=ci_verdict(lo, hi, m),
        note=f"{cfg.seeds} seeds; bootstrap members; uwo k = {cfg.uw_k}; power: the smallest flattening this "
             f"comparison detects with probability 0.8 is {min_detectable_effect((hi - lo) / 3.92):.3g} "
             "(2.8 standard errors)")


def checks(table: pd.DataFrame, cfg: Config) -> dict[str, Check]:
    """S14 (module docstring) on the measurement rows (the wall-time row left out)."""
    df = table[table.metric != "wall_s"].astype({"N": int, "seed": int, "step": int})
    out = {"S14_exact": check_exact(df, cfg)}
    for kind in cfg.proxies:
        for family in ("bon", "gibbs"):
            out[f"S14_{kind}_{family}"] = check_rise_and_fall(df, kind, family, cfg)
    for ens in ("worst", "uwo"):
        out[f"S14_ensemble_{ens}"] = check_ensemble(df, ens, cfg)
    return out
