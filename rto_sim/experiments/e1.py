"""E1: statistical scaling of token MLE vs sentence bandit vs tabular DPO (theory.md sections 3, 6, 7;
predictions S1, S2, S3, S5, S7, S8).

Design (full grid): A = 3, H in 2..7, one prompt, reward classes unigram / positional / bigram /
random (d = 8) / tree_tabular, N in {500, 2000, 8000, 32000} pairs, 20 seeds; every learner sees the
SAME data in a cell (a cell = class x H x N x seed), so learner comparisons are paired.

Environment per reward class. The MDP is the automaton on which the class is naturally tabular, so
that tabular DPO on its states is the "aggregated states" case of theory.md section 4:
    unigram, positional -> TokenMDP.position (state (h));   bigram -> last_token_automaton;
    random, tree_tabular -> TokenMDP.tree.
(On a tree, tabular DPO has one free logit per prefix: sentence-level complexity, like the bandit.)
Reference pi_ref = behaviour mu: uniform by default (`reference`="uniform", the setting of theory.md
section 3's d_eff examples) or softmax(N(0,1)/T) (`reference`="random"). theta* ~ draw_theta with
Var_mu(R) = return_var = 0.25 at every H (keeps the Bradley-Terry slope comparable). theta*, pi_ref
and features are fixed per (class, H) (`instance_seed`); the data seed comes from the cell config.

Learners (module rto_sim.learners): token_mle (the class's features, ridge `ridge`), bandit_mle (one
arm per response, ridge `bandit_ridge`), tabular_dpo (beta = `beta`, ridge `dpo_ridge` on the logits'
deviation from log pi_ref; max_iter `dpo_max_iter`). All ridges use the SUM convention.

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

import functools
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit, logsumexp

from ..exact import MAX_ENUMERATED, enumerate_responses, evaluate, soft_bellman, sub_optimality
from ..features import draw_theta, make_features
from ..learners import bandit_mle_exists, fit_bandit_mle, fit_tabular_dpo, fit_token_mle
from ..mdp import TokenMDP
from ..preferences import sample_preferences, trajectory_features
from ..results import Check
from ..sweep import SweepGrid, run_sweep

REWARD_CLASSES = ("unigram", "positional", "bigram", "random", "tree_tabular")
LEARNERS = ("token_mle", "bandit_mle", "tabular_dpo")
MDP_OF_CLASS = {"unigram": "position", "positional": "position", "bigram": "last_token", "random": "tree",
                "tree_tabular": "tree"}
ASYMPTOTIC = 20          # "N >= 20 d_eff" (S1, S2, S8) and "N >= 20 K" (S3) of theory.md section 6


def config(quick: bool) -> dict:
    cfg = {"A": 3, "H": [2, 3, 4, 5, 6, 7], "reward_classes": list(REWARD_CLASSES), "learners": list(LEARNERS),
           "N": [500, 2000, 8000, 32000], "seeds": 20, "random_d": 8, "return_var": 0.25, "n_prompts": 1,
           "reference": "uniform", "ref_temperature": 1.0, "instance_seed": 0, "ridge": 1e-3, "bandit_ridge": 1e-3,
           "dpo_ridge": 1e-3, "beta": 1.0, "dpo_max_iter": 5000, "s7_min_n_per_arm": 20, "workers": 2}
    if quick:
        cfg.update({"H": [2, 3], "reward_classes": ["positional", "tree_tabular"],
                    "N": [1000, 4000, 16000], "seeds": 20})
    return cfg


# ---------------------------------------------------------------------- validation
def validate_config(cfg: dict) -> None:
    """Raise ValueError (naming the field) for a bad E1/E1b config before anything runs."""
    for key in ("A", "H", "N", "seeds", "reward_classes", "learners"):
        if key not in cfg:
            raise ValueError(f"config is missing '{key}'")
    bad = [c for c in cfg["reward_classes"] if c not in REWARD_CLASSES]
    if bad:
        raise ValueError(f"reward_classes: unknown reward class(es) {bad}; choose from {list(REWARD_CLASSES)}")
    bad = [x for x in cfg["learners"] if x not in LEARNERS]
    if bad:
        raise ValueError(f"learners: unknown learner(s) {bad}; choose from {list(LEARNERS)}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in cfg["N"]):
        raise ValueError(f"N: every number of pairs must be an integer >= 1, got {cfg['N']}")
    if not isinstance(cfg["seeds"], int) or cfg["seeds"] < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {cfg['seeds']!r}")
    A, P = cfg["A"], cfg.get("n_prompts", 1)
    if not isinstance(A, int) or A < 2:
        raise ValueError(f"A must be an integer >= 2, got {A!r}")
    for H in cfg["H"]:
        if not isinstance(H, int) or H < 1:
            raise ValueError(f"H: horizons must be integers >= 1, got {H!r}")
        if P * A**H > MAX_ENUMERATED:
            raise ValueError(f"H={H}: A^H = {A**H} responses per prompt are not enumerable (limit "
                             f"{MAX_ENUMERATED} rows); this experiment measures errors over all responses and has "
                             "no recursion-based metric path: use a smaller H")
    if cfg.get("reference", "uniform") not in ("uniform", "random"):
        raise ValueError(f"reference must be 'uniform' or 'random', got {cfg.get('reference')!r}")
    for key in ("ridge", "bandit_ridge", "dpo_ridge"):
        if key in cfg and not (np.isfinite(cfg[key]) and cfg[key] >= 0):
            raise ValueError(f"{key} must be >= 0, got {cfg[key]!r}")
    if "beta" in cfg and not cfg["beta"] > 0:
        raise ValueError(f"beta must be > 0, got {cfg['beta']!r}")


# ---------------------------------------------------------------------- instances (cached per process)
class Instance:
    """Everything fixed per (class, H): MDP, features, theta*, r*, pi*, enumeration, mu weights and the
    pair-weight matrix W[y, y'] = mu(y) mu(y') sigmoid'(R*(y) - R*(y')) (same prompt only)."""

    def __init__(self, reward_class, A, H, n_prompts, reference, ref_temperature, instance_seed, random_d,
                 return_var, beta):
        seed = int(instance_seed) * 1009 + 31 * H + REWARD_CLASSES.index(reward_class)
        kind = MDP_OF_CLASS[reward_class]
        build = {"position": TokenMDP.position, "last_token": TokenMDP.last_token_automaton,
                 "tree": TokenMDP.tree}[kind]
        mdp = build(A, H, n_prompts=n_prompts, seed=seed, ref_temperature=ref_temperature)
        if reference == "uniform":
            mdp = mdp.with_reference([np.full((n, A), 1.0 / A) for n in mdp.n_states])
        self.mdp = mdp
        self.features = make_features(mdp, reward_class, d=random_d if reward_class == "random" else None,
                                      seed=seed + 1)
        self.theta = draw_theta(mdp, self.features, return_var=return_var, seed=seed + 2)
        self.reward = self.features.token_reward(self.theta)
        self.beta = beta
        self.star = soft_bellman(mdp, self.reward, beta)
        self.mdp_star = mdp.with_reference(self.star.policy)
        self.zero = [np.zeros((n, A)) for n in mdp.n_states]
        self.enum = enumerate_responses(mdp)
        e = self.enum
        self.log_mu = e.log_prob(mdp.log_pi_ref)
        self.w = np.exp(self.log_mu) * mdp.rho[e.prompt]             # joint weight rho(x) mu(y|x)
        self.R = e.returns(self.reward)
        self.K = mdp.num_responses
        self.P = mdp.n_prompts
        self._W = None
        # d_eff by SVD; for tabular features on a TREE above max_dim the SVD is skipped and the value
        # P (K - 1) of the tree-tabular identity (theory.md section 3) is used (the SVD confirms it
        # wherever it runs, see tests/test_e1.py).
        self.d_eff_bandit = int(self.P * (self.K - 1))
        self.d_eff = weighted_rank(trajectory_features(self.features, e), self.w, e.prompt, self.P)
        if self.d_eff < 0:
            assert reward_class == "tree_tabular"
            self.d_eff = self.d_eff_bandit
        tab = make_features(mdp, "tabular")
        self.d_eff_dpo = weighted_rank(trajectory_features(tab, e), self.w, e.prompt, self.P)
        if self.d_eff_dpo < 0:
            assert mdp.kind == "tree"
            self.d_eff_dpo = self.d_eff_bandit

    @property
    def W(self) -> np.ndarray:
        """(P, K, K) rho(x) mu(y|x) mu(y'|x) sigmoid'(R*(y) - R*(y')), built on first use."""
        if self._W is None:
            R = self.R.reshape(self.P, self.K)
            mu = np.exp(self.log_mu).reshape(self.P, self.K)
            p = expit(R[:, :, None] - R[:, None, :])
            self._W = self.mdp.rho[:, None, None] * mu[:, :, None] * mu[:, None, :] * p * (1 - p)
        return self._W

    @functools.cached_property
    def asymptotic_trace(self) -> float:
        """tr(Sigma_psi I^+): the exact first-order asymptotic centred-return MSE of the (unregularized)
        token MLE is this / N, with Sigma_psi = E_x Cov_mu(psi | x) and I the per-pair Fisher at theta*
        (no constant-slope approximation). NaN for d > 64 (not needed there)."""
        d = self.features.d
        if d > 64:
            return float("nan")
        P, K = self.P, self.K
        Psi = trajectory_features(self.features, self.enum).toarray().reshape(P, K, d)
        mu = np.exp(self.log_mu).reshape(P, K)
        W = self.W
        fisher = 2 * (np.einsum("pk,pkd,pke->de", W.sum(axis=2), Psi, Psi) - np.einsum("pkd,pkl,ple->de", Psi, W, Psi))
        C = Psi - np.einsum("pk,pkd->pd", mu, Psi)[:, None, :]
        sigma = np.einsum("p,pk,pkd,pke->de", self.mdp.rho, mu, C, C)
        return float(np.trace(sigma @ np.linalg.pinv(fisher, rcond=1e-10, hermitian=True)))

    def bt_slope_exact(self, scale: float = 1.0) -> float:
        """E_x E_{y, y' ~ mu} sigmoid'(scale (R*(y) - R*(y'))): the population BT slope."""
        R = scale * self.R.reshape(self.P, self.K)
        mu = np.exp(self.log_mu).reshape(self.P, self.K)
        p = expit(R[:, :, None] - R[:, None, :])
        return float(self.mdp.rho @ np.einsum("pk,pkl,pl->p", mu, p * (1 - p), mu))

    # --- metrics
    def centred(self, x: np.ndarray) -> np.ndarray:
        m = np.bincount(self.enum.prompt, weights=np.exp(self.log_mu) * x, minlength=self.P)
        return x - m[self.enum.prompt]

    def mse(self, R_hat: np.ndarray) -> float:
        return float(self.w @ self.centred(R_hat - self.R) ** 2)

    def fisher_quadratic(self, R_hat: np.ndarray) -> float:
        """e^T I e, I the per-pair Fisher at theta* in return space: sum_{y,y'} W (e_y - e_y')^2."""
        u = (R_hat - self.R).reshape(self.P, self.K)
        rowsum = self.W.sum(axis=2)
        return float(2 * (np.sum(rowsum * u**2) - np.einsum("pk,pkl,pl->", u, self.W, u)))

    def gibbs_gap(self, R_hat: np.ndarray) -> tuple[float, float]:
        """Sequence level: (J_beta(pi*) - J_beta(pi_hat), beta KL(pi_hat || pi*)) for the Gibbs plug-in
        pi_hat(y|x) ~ mu(y|x) exp(R_hat(y) / beta), by enumeration."""
        return self.sequence_gap(self.log_mu + R_hat / self.beta)

    def sequence_gap(self, log_unnorm: np.ndarray) -> tuple[float, float]:
        b = self.beta
        P, K = self.P, self.K
        lq = log_unnorm.reshape(P, K)
        lq = lq - logsumexp(lq, axis=1, keepdims=True)
        lmu = self.log_mu.reshape(P, K)
        R = self.R.reshape(P, K)
        q = np.exp(lq)
        J_hat = (q * (R - b * (lq - lmu))).sum(1)
        J_star = b * logsumexp(lmu + R / b, axis=1)
        ls = lmu + R / b - J_star[:, None] / b
        kl = (q * (lq - ls)).sum(1)
        return float(self.mdp.rho @ (J_star - J_hat)), float(b * (self.mdp.rho @ kl))

    def engine_gap(self, policy) -> tuple[float, float]:
        """Token recursions: (sub_optimality, beta * sequence KL(pi_hat || pi*) via evaluate)."""
        gap = sub_optimality(self.mdp, policy, self.reward, self.beta)
        kl = evaluate(self.mdp_star, policy, self.zero, 0.0).kl
        return gap, self.beta * kl


def weighted_rank(Psi, w: np.ndarray, prompt: np.ndarray, P: int, rtol: float = 1e-9, max_dim: int = 800) -> int:
    """d_eff = rank of E_x Cov_mu(psi | x) (the feature-difference covariance under mu, up to a factor 2),
    from enumerated psi (N, d) and joint weights w (N,) by SVD; returns -1 when min(N, d) > max_dim
    (too costly: the caller substitutes the known value)."""
    Psi = Psi.toarray() if hasattr(Psi, "toarray") else np.asarray(Psi)
    Psi = Psi[:, np.abs(Psi).sum(0) > 0]
    if Psi.shape[1] == 0:
        return 0
    if min(Psi.shape) > max_dim:
        return -1
    wx = np.bincount(prompt, weights=w, minlength=P)
    mean = np.zeros((P, Psi.shape[1]))
    np.add.at(mean, prompt, w[:, None] * Psi)
    mean /= wx[:, None]
    C = np.sqrt(w)[:, None] * (Psi - mean[prompt])
    s = np.linalg.svd(C, compute_uv=False)
    return int(np.sum(s > rtol * max(s.max(), 1e-300) * max(C.shape)))


@functools.lru_cache(maxsize=3)
def get_instance(reward_class, A, H, n_prompts, reference, ref_temperature, instance_seed, random_d, return_var,
                 beta) -> Instance:
    return Instance(reward_class, A, H, n_prompts, reference, ref_temperature, instance_seed, random_d,
                    return_var, beta)


def instance_of(cell: dict) -> Instance:
    return get_instance(cell["reward_class"], cell["A"], cell["H"], cell.get("n_prompts", 1),
                        cell.get("reference", "uniform"), float(cell.get("ref_temperature", 1.0)),
                        cell.get("instance_seed", 0), cell.get("random_d", 8), float(cell.get("return_var", 0.25)),
                        float(cell.get("beta", 1.0)))


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
            fit = fit_token_mle(data, inst.features, ridge=cell["ridge"])
            R_hat = fit.returns(enum)
            sol = soft_bellman(inst.mdp, fit.token_reward(), inst.beta)
            gap, bkl = inst.engine_gap(sol.policy)
        elif learner == "bandit_mle":
            fit = fit_bandit_mle(data, inst.mdp, ridge=cell["bandit_ridge"])
            R_hat = fit.returns(enum)
            gap, bkl = inst.gibbs_gap(R_hat)
        else:
            fit = fit_tabular_dpo(data, inst.mdp, beta=inst.beta, ridge=cell["dpo_ridge"],
                                  max_iter=cell.get("dpo_max_iter", 5000))
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


def grid_of(cfg: dict) -> SweepGrid:
    fixed = {k: v for k, v in cfg.items() if k not in ("H", "reward_classes", "N", "seeds", "workers")}
    return SweepGrid(axes={"reward_class": cfg["reward_classes"], "H": cfg["H"], "N": cfg["N"],
                           "seed": list(range(cfg["seeds"]))}, fixed=fixed)


# ---------------------------------------------------------------------- analysis
def wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (class, H, N, seed, learner) with metric columns."""
    keys = ["reward_class", "H", "N", "seed", "learner"]
    return table.pivot_table(index=keys, columns="metric", values="value", aggfunc="first").reset_index()


def loglog_slope(df: pd.DataFrame, y: str, group: str = "H") -> tuple[float, dict]:
    """Slope of log(y) on log(N) with one intercept per `group` value (fixed effects); per-group slopes."""
    x, t, per = [], [], {}
    for g, d in df.groupby(group):
        if d["N"].nunique() < 2:
            continue
        lx, ly = np.log(d["N"].to_numpy(float)), np.log(d[y].to_numpy(float))
        per[g] = float(np.polyfit(lx, ly, 1)[0])
        x.append(lx - lx.mean())
        t.append(ly - ly.mean())
    if not x:
        return float("nan"), per
    x, t = np.concatenate(x), np.concatenate(t)
    return float(x @ t / (x @ x)), per


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}: {v:.3g}" for k, v in d.items())


def analyse(table: pd.DataFrame, cfg: dict) -> tuple[dict, pd.DataFrame]:
    """Checks S1, S2, S3, S5, S7, S8 (theory.md section 6) and the per-(class, H, N, learner) aggregate."""
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
    checks = {}
    tok = agg[agg.learner == "token_mle"]
    for cls in cfg["reward_classes"]:
        t = tok[tok.reward_class == cls]
        if t.empty:
            continue
        asym = t[t.N >= ASYMPTOTIC * t.d_eff]
        # S1 ------------------------------------------------------------------
        slope, per = loglog_slope(asym, "rmse")
        ok = np.isfinite(slope)
        checks[f"S1_{cls}"] = Check(
            quantity=f"log-log slope of centred-return RMSE vs N, token MLE, {cls} (N >= {ASYMPTOTIC} d_eff)",
            predicted=-0.5, measured=slope, tolerance="[-0.55, -0.45]",
            verdict=("pass" if -0.55 <= slope <= -0.45 else "fail") if ok else "inconclusive",
            note=(f"pooled fixed-effects slope over H with >= 2 asymptotic N values; per-H slopes {{{_fmt(per)}}}; "
                  f"RMSE = sqrt(mean over {int(t.seeds.max())} seeds of MSE)") if ok else
                 "fewer than two N values with N >= 20 d_eff at every H")
        # S2 ------------------------------------------------------------------
        if not asym.empty:
            ratio = asym.mse / asym.mse_pred
            m = float(ratio.mean())
            exact = float((asym.mse / asym.mse_pred_exact_fisher).mean())
            n_tot = float((asym.seeds * asym.d_eff).sum())
            checks[f"S2_{cls}"] = Check(
                quantity=f"token MSE / (d_eff / (2 s N)), {cls}", predicted=1.0, measured=m, tolerance=0.15,
                verdict="pass" if abs(m - 1) <= 0.15 else "fail",
                note=(f"mean over {len(asym)} (H, N) cells with N >= 20 d_eff, ratio range [{ratio.min():.3g}, "
                      f"{ratio.max():.3g}]; chi-square noise alone gives a relative SE ~ {np.sqrt(2 / n_tot):.2g} on "
                      f"the mean; d_eff per H {{{_fmt(asym.groupby('H').d_eff.first().to_dict())}}}; s range "
                      f"[{asym.s.min():.3f}, {asym.s.max():.3f}]; against the exact-Fisher asymptotic MSE "
                      f"tr(Sigma_psi I^+)/N (no constant-slope approximation) the mean ratio is {exact:.3g}"))
        # S5 ------------------------------------------------------------------
        g_slope, g_per = loglog_slope(t, "gap")
        ident = float(fits[(fits.reward_class == cls)].kl_gap_err.max())
        checks[f"S5_{cls}"] = Check(
            quantity=f"plug-in Gibbs gap: identity gap = beta KL(pi_hat||pi*) and log-log slope in N, {cls}",
            predicted={"identity_max_abs_err": 0.0, "slope": -1.0}, measured={"identity_max_abs_err": ident,
                                                                               "slope": g_slope},
            tolerance={"identity": 1e-8, "slope": "[-1.15, -0.85]"},
            verdict="pass" if ident <= 1e-8 and -1.15 <= g_slope <= -0.85 else "fail",
            note=(f"token MLE planned exactly at beta={cfg['beta']} (soft_bellman); gap by sub_optimality, KL by "
                  f"evaluate on pi* as reference; identity error max over all learners and cells of this class; "
                  f"slope over all N (mean gap over seeds), per-H {{{_fmt(g_per)}}}; slope tolerance is ours "
                  "(theory says 'near -1, not -1/2')"))
        # S8 ------------------------------------------------------------------
        cells = fits[(fits.reward_class == cls) & (fits.learner == "token_mle")]
        cells = cells[cells.N >= ASYMPTOTIC * cells.d_eff]
        if not cells.empty:
            z = cells.fisher_q / cells.d_eff
            mean_ratio = float(z.mean())
            grp = cells.groupby(["H", "N"])
            var_ratio = float((grp.fisher_q.var() / (2 * grp.d_eff.first())).mean())
            k = float(cells.d_eff.mean())
            n = len(cells)
            tol_m = 3 * np.sqrt(2 / k / n)
            tol_v = 3 * np.sqrt((2 + 12 / k) / n)
            checks[f"S8_{cls}"] = Check(
                quantity=f"Fisher check N (theta_hat - theta*)^T I (theta_hat - theta*): mean / d_eff and "
                         f"variance / (2 d_eff), {cls}",
                predicted={"mean/d_eff": 1.0, "var/(2 d_eff)": 1.0},
                measured={"mean/d_eff": mean_ratio, "var/(2 d_eff)": var_ratio},
                tolerance={"mean": round(tol_m, 4), "var": round(tol_v, 4)},
                verdict="pass" if abs(mean_ratio - 1) <= tol_m and abs(var_ratio - 1) <= tol_v else "fail",
                note=(f"{n} fits with N >= 20 d_eff; I = exact per-pair Fisher at theta* (enumeration); "
                      "tolerances = 3 standard errors of a chi-square(d_eff) sample mean / variance"))
    # S3 ----------------------------------------------------------------------
    b = agg[agg.learner == "bandit_mle"].set_index(["reward_class", "H", "N"])
    for cls in cfg["reward_classes"]:
        t = tok[(tok.reward_class == cls)].set_index(["reward_class", "H", "N"])
        j = t.join(b[["rmse"]].rename(columns={"rmse": "rmse_bandit"}), how="inner")
        j = j[j.index.get_level_values("N") >= ASYMPTOTIC * j.K]
        if j.empty:
            if "bandit_mle" in cfg["learners"] and "token_mle" in cfg["learners"]:
                checks[f"S3_{cls}"] = Check(quantity=f"RMSE ratio bandit / token, {cls}",
                                            predicted="(K-1)/sqrt(K d_eff)", measured=None, tolerance=0.15,
                                            verdict="inconclusive", note="no cell with N >= 20 K")
            continue
        ratio = j.rmse_bandit / j.rmse
        pred = (j.K - 1) / np.sqrt(j.K * j.d_eff)
        alt = np.sqrt((j.K - 1) / j.d_eff)
        rel = float((ratio / pred).mean())
        checks[f"S3_{cls}"] = Check(
            quantity=f"RMSE ratio bandit / token at N >= 20 K, {cls} (measured/predicted)",
            predicted=1.0, measured=rel, tolerance=0.15, verdict="pass" if abs(rel - 1) <= 0.15 else "fail",
            note=(f"predicted ratio (K-1)/sqrt(K d_eff) per (H, N): {{{_fmt(dict(zip(map(str, j.index), pred)))}}}; "
                  f"measured {{{_fmt(dict(zip(map(str, j.index), ratio)))}}}; the centred-return asymptotics "
                  f"MSE = d/(2sN) for both learners give sqrt((K-1)/d_eff) instead, mean measured/that = "
                  f"{float((ratio / alt).mean()):.3g}"))
    # S7 ----------------------------------------------------------------------
    if "tree_tabular" in cfg["reward_classes"]:
        s7 = w[w.learner == "s7"]
        s7r = w[w.learner == "s7_ridge"]
        if s7.empty:
            checks["S7"] = Check(quantity="tree-tabular token MLE vs bandit centred returns (ridge 0)", predicted=0.0,
                                 measured=None, tolerance=1e-5, verdict="inconclusive",
                                 note=f"no tree_tabular cell with N >= {cfg['s7_min_n_per_arm']} K")
        else:
            conv = s7[s7.mle_exists == 1]
            worst = float(conv.max_abs_diff.max()) if not conv.empty else float("nan")
            checks["S7"] = Check(
                quantity="max |centred R_hat tree-tabular MLE - centred R_hat bandit MLE| (ridge 0)",
                predicted=0.0, measured=worst, tolerance=1e-5,
                verdict=("pass" if worst <= 1e-5 else "fail") if not conv.empty else "inconclusive",
                note=(f"{len(conv)} of {len(s7)} cells with N >= {cfg['s7_min_n_per_arm']} K have an existing MLE "
                      f"(every arm seen, strongly connected comparison graph) and are compared (max final gradient "
                      f"{float(conv.grad_norm.max()) if not conv.empty else float('nan'):.2g}); "
                      f"with the default ridge {cfg['ridge']} the two differ by at most "
                      f"{float(s7r.max_abs_diff.max()) if not s7r.empty else float('nan'):.3g} (ridge acts on "
                      f"different parametrizations); L-BFGS tolerance 1e-11 on the mean-loss gradient"))
    return checks, agg


def run(cfg: dict, folder) -> tuple[pd.DataFrame, dict]:
    validate_config(cfg)
    grid = grid_of(cfg)
    if "tabular_dpo" in cfg["learners"]:
        import torch  # noqa: F401  (imported once here, inherited by forked workers instead of once per worker)
    t0 = time.perf_counter()
    # longest cells first (tabular DPO on the prefix tree at large H dominates): shortens the parallel tail
    table = run_sweep(e1_cell, grid, Path(folder) / "sweep", workers=cfg.get("workers", 2), progress=True,
                      cost=lambda c: (c["reward_class"] in ("random", "tree_tabular"), c["H"], c["N"]))
    wall = time.perf_counter() - t0
    checks, agg = analyse(table, cfg)
    agg.to_csv(Path(folder) / "aggregate.csv", index=False)
    table = table.assign(sweep_wall_time_s=wall)
    return table, checks
