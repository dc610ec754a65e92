"""E3: policy quality from learned rewards (docs/theory.md sections 4 and 6, predictions S5, S6, S9).

One prompt, full tree A = 3, H = 6 (K = 729 responses), true linear token reward r* = <phi, theta*> of
class unigram (d = 3, d_eff = 2) or random features (d = 8), theta* scaled so Var_{pi_ref}(R) = 0.25
(`draw_theta`, one theta* per class; seeds vary the data). Pairs from mu = pi_ref, BT labels sampled.

Parts (column `part` of the table):
  gibbs   (S5)  plug-in Gibbs policies pi_hat = soft_bellman(r_hat, beta), beta in {0.1, 1}, from the token
                MLE and the bandit MLE; SubOpt_beta(pi_hat) against beta KL(pi_hat || pi*_beta) (identity 8)
                and its log-log slope in N.
  argmax  (S6)  argmax policies (beta -> 0) on a UNIFORM-reference tree: does the learner output y* and
                was y* in the data? P(y* in data) = 1 - (1 - 1/K)^(2N) ~ 2N/K.
  pess    (S9)  Algorithm 1 (pessimistic soft planning), the Appendix B.1 max-min policy and the greedy
                plug-in at rho calibrated as the (1 - delta) quantile of ||P (theta_hat - theta*)||_{Sigma_D}
                over `cal_seeds` independent data sets per N, evaluated on `eval_seeds` fresh data sets:
                coverage of the event, Theorem 4.2 and B.1 bounds, the first term 2 rho E_{d*}||phi|| in N.
                Norms are taken in the identifiable subspace (rto_sim.pessimism, `project=True`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..exact import argmax_policy, enumerate_responses, soft_bellman, sub_optimality
from ..features import draw_theta, make_features
from ..learners import fit_bandit_mle, fit_token_mle
from ..mdp import TokenMDP
from ..pessimism import (
    ConfidenceSet,
    asymptotic_rho,
    bootstrap_radii,
    calibrate_rho,
    greedy_policy,
    identifiable_basis,
    layered_kl,
    maxmin_policy,
    pessimistic_policy,
    theorem42_bound,
    theory_rho,
)
from ..preferences import response_codes, sample_preferences
from ..results import Check
from .stats import binomial_slack, derived_seed, loglog_slope


@dataclass(frozen=True)
class Config:
    """A, H: the tree; return_var: Var_pi_ref(R) of theta*; ridge, bandit_ridge: ridges of the token and bandit
    MLEs; theta_seed, ref_seed: seeds of theta* and pi_ref; classes: reward class -> feature dimension (None =
    the class's own); betas: KL coefficients. Gibbs part: N_gibbs, seeds_gibbs data sets per N, the bandit
    only up to bandit_max_N and on its first bandit_seeds seeds (slow fits). Argmax part: N_argmax,
    seeds_argmax. Pessimism part: N_pess, cal_seeds data sets to calibrate rho, eval_seeds to evaluate,
    delta; bootstrap rho on n_boot resamples of the first boot_datasets data sets up to boot_max_N."""

    A: int = 3
    H: int = 6
    return_var: float = 0.25
    ridge: float = 1e-3
    bandit_ridge: float = 1.0
    theta_seed: int = 0
    ref_seed: int = 1
    classes: dict[str, int | None] = field(default_factory=lambda: {"unigram": None, "random": 8})
    betas: tuple[float, ...] = (0.1, 1.0)
    N_gibbs: tuple[int, ...] = (500, 2000, 8000, 32000)
    seeds_gibbs: int = 20
    bandit_max_N: int = 8000
    bandit_seeds: int = 5
    N_argmax: tuple[int, ...] = (10, 30, 100, 300)
    seeds_argmax: int = 50
    N_pess: tuple[int, ...] = (250, 1000, 4000)
    cal_seeds: int = 40
    eval_seeds: int = 40
    delta: float = 0.1
    n_boot: int = 20
    boot_datasets: int = 2
    boot_max_N: int = 1000

    @classmethod
    def quick(cls) -> Config:
        return replace(cls(), N_gibbs=(250, 1000, 4000), seeds_gibbs=4, bandit_max_N=1000, bandit_seeds=2,
                       N_argmax=(10, 30, 100), seeds_argmax=12, N_pess=(250, 1000), cal_seeds=10, eval_seeds=10,
                       n_boot=0, boot_datasets=0)


# ---------------------------------------------------------------------- shared helpers (E6 uses them)
def setup_class(A: int, H: int, cls: str, d, theta_seed: int, return_var: float, ref_seed: int = 1,
                reference: str = "random") -> tuple:
    """(mdp, features, theta*, r*) for reward class `cls` (dimension d) on the full tree A^H: pi_ref uniform
    (reference="uniform") or random (seed ref_seed); features seeded theta_seed + 11, theta* theta_seed with
    Var_pi_ref(R) = return_var."""
    if reference == "uniform":
        mdp = TokenMDP.tree(A, H, pi_ref=[np.full((A**h, A), 1.0 / A) for h in range(H)])
    else:
        mdp = TokenMDP.tree(A, H, seed=ref_seed)
    feats = make_features(mdp, cls, d=d, seed=theta_seed + 11)
    theta = draw_theta(mdp, feats, return_var=return_var, seed=theta_seed)
    return mdp, feats, theta, feats.token_reward(theta)


def _setup(cfg: Config, cls: str, d, reference: str = "random") -> tuple:
    return setup_class(cfg.A, cfg.H, cls, d, cfg.theta_seed, cfg.return_var, cfg.ref_seed, reference)


def greedy_response(mdp: TokenMDP, policy) -> np.ndarray:
    """(H,) the tokens of the deterministic policy's response from prompt 0."""
    s, out = 0, []
    for h in range(mdp.H):
        a = int(np.argmax(policy[h][s]))
        out.append(a)
        if h < mdp.H - 1:
            s = mdp.next_state[h][s, a]
    return np.array(out)


def tokens_to_row(y: np.ndarray, A: int) -> int:
    """Row of response y (prompt 0) in `enumerate_responses` of a tree without EOS (base-A order)."""
    return int(np.asarray(y, np.int64) @ (A ** np.arange(len(y) - 1, -1, -1)))


# ---------------------------------------------------------------------- parts
def _gibbs(cfg: Config) -> list:
    rows = []
    for ci, (cls, d) in enumerate(cfg.classes.items()):
        mdp, feats, theta, r = _setup(cfg, cls, d)
        stars = {b: soft_bellman(mdp, r, b) for b in cfg.betas}
        for N in cfg.N_gibbs:
            for seed in range(cfg.seeds_gibbs):
                data = sample_preferences(mdp, r, N, seed=derived_seed(1, ci, N, seed))
                fits = {"token": fit_token_mle(data, feats, ridge=cfg.ridge).token_reward()}
                if N <= cfg.bandit_max_N and seed < cfg.bandit_seeds:
                    fits["bandit"] = fit_bandit_mle(data, mdp, ridge=cfg.bandit_ridge).token_reward(mdp)
                for learner, rhat in fits.items():
                    for b in cfg.betas:
                        pol = soft_bellman(mdp, rhat, b).policy
                        gap = sub_optimality(mdp, pol, r, b)
                        kl = layered_kl(mdp, pol, stars[b].log_policy)
                        rows.append({"part": "gibbs", "class": cls, "learner": learner, "beta": b, "N": N,
                                     "seed": seed, "subopt": gap, "beta_kl": b * kl,
                                     "identity_error": abs(gap - b * kl)})
    return rows


def _argmax(cfg: Config) -> list:
    rows = []
    K = cfg.A ** cfg.H
    for ci, (cls, d) in enumerate(cfg.classes.items()):
        mdp, feats, theta, r = _setup(cfg, cls, d, reference="uniform")
        y_star = greedy_response(mdp, argmax_policy(mdp, r))
        enum = enumerate_responses(mdp)
        R_star = float(enum.returns(r).max())
        code_star = response_codes(np.zeros(1, np.int64), y_star[None, :], mdp.A)[0]
        for N in cfg.N_argmax:
            for seed in range(cfg.seeds_argmax):
                data = sample_preferences(mdp, r, N, seed=derived_seed(2, ci, N, seed))
                codes = np.concatenate([response_codes(t.prompt, t.actions, mdp.A) for t in (data.first, data.second)])
                seen = bool((codes == code_star).any())
                tok = greedy_response(mdp, argmax_policy(mdp, fit_token_mle(data, feats, ridge=cfg.ridge)
                                                         .token_reward()))
                ban = greedy_response(mdp, argmax_policy(mdp, fit_bandit_mle(data, mdp, ridge=cfg.bandit_ridge)
                                                         .token_reward(mdp)))
                for learner, y in (("token", tok), ("bandit", ban)):
                    rows.append({"part": "argmax", "class": cls, "learner": learner, "N": N, "seed": seed,
                                 "picked_star": bool((y == y_star).all()), "star_in_data": seen,
                                 "argmax_regret": R_star - float(enum.returns(r)[tokens_to_row(y, mdp.A)]),
                                 "p_star_in_data": 1 - (1 - 1 / K) ** (2 * N)})
    return rows


def _pess(cfg: Config) -> tuple[list, list]:
    rows, rho_rows = [], []
    delta = cfg.delta
    for ci, (cls, d) in enumerate(cfg.classes.items()):
        mdp, feats, theta, r = _setup(cfg, cls, d)
        U = identifiable_basis(mdp, feats)
        stars = {b: soft_bellman(mdp, r, b) for b in cfg.betas}
        L = max(float(np.sqrt((feats.dense(h) ** 2).sum(-1)).max()) for h in range(mdp.H))
        th = theory_rho(U.shape[1], delta, mdp.H, L, float(np.linalg.norm(theta)), ridge=cfg.ridge)
        for N in cfg.N_pess:
            radii, slopes = [], []
            for seed in range(cfg.cal_seeds):
                data = sample_preferences(mdp, r, N, seed=derived_seed(3, ci, N, seed))
                fit = fit_token_mle(data, feats, ridge=cfg.ridge)
                radii.append(ConfidenceSet(fit.theta, fit.sigma_D, 0.0, U).radius(theta))
                slopes.append(data.bt_slope())
            rho = calibrate_rho(radii, delta)
            boot = []
            for seed in range(cfg.eval_seeds):
                data = sample_preferences(mdp, r, N, seed=derived_seed(4, ci, N, seed))
                fit = fit_token_mle(data, feats, ridge=cfg.ridge)
                cs = ConfidenceSet(fit.theta, fit.sigma_D, rho, U)
                literal = ConfidenceSet(fit.theta, fit.sigma_D, rho, np.eye(feats.d))
                radius = cs.radius(theta)
                if seed < cfg.boot_datasets and cfg.n_boot > 0 and N <= cfg.boot_max_N:
                    boot.append(calibrate_rho(bootstrap_radii(fit, data, feats, U, n_boot=cfg.n_boot,
                                                              seed=derived_seed(5, ci, N, seed)), delta))
                for b in cfg.betas:
                    pess_sol = pessimistic_policy(mdp, feats, cs, b)
                    pess = pess_sol.policy
                    greedy = greedy_policy(mdp, feats, fit.theta, b).policy
                    mm = maxmin_policy(mdp, feats, cs, b)
                    bnd = theorem42_bound(mdp, feats, cs, b, stars[b].policy, pess_sol.log_policy)
                    lit = theorem42_bound(mdp, feats, literal, b, stars[b].policy,
                                          pessimistic_policy(mdp, feats, literal, b).log_policy)
                    rows.append({"part": "pess", "class": cls, "beta": b, "N": N, "seed": seed, "rho": rho,
                                 "radius": radius, "event": radius <= rho,
                                 "subopt_pess": sub_optimality(mdp, pess, r, b),
                                 "subopt_greedy": sub_optimality(mdp, greedy, r, b),
                                 "subopt_b1": sub_optimality(mdp, mm.policy, r, b), "b1_gap": mm.gap,
                                 "b1_converged": mm.converged, "first_term": bnd["first"], "kl_term": bnd["kl"],
                                 "bound_42": bnd["bound"], "bound_b1": bnd["b1"], "coverage": bnd["coverage"],
                                 "bound_42_literal": lit["bound"]})
            s_bar = float(np.mean(slopes))
            rho_rows.append({"part": "rho", "class": cls, "N": N, "rho_calibrated": rho, "d_eff": U.shape[1],
                             "rho_asymptotic": asymptotic_rho(U.shape[1], delta, s_bar), "bt_slope": s_bar,
                             "rho_theory_C1": th["rho"], "upsilon": th["upsilon"], "L": L,
                             "B": float(np.linalg.norm(theta)),
                             "rho_bootstrap_median": float(np.median(boot)) if boot else np.nan})
    return rows, rho_rows


def run(cfg: Config, folder) -> pd.DataFrame:
    """One row per measurement; column `part` (module docstring) says which."""
    g, a = _gibbs(cfg), _argmax(cfg)
    p, rr = _pess(cfg)
    return pd.DataFrame(g + a + p + rr)


# ---------------------------------------------------------------------- checks
def check_s5_identity(g: pd.DataFrame) -> Check:
    """S5: SubOpt of every Gibbs plug-in equals beta KL(pi_hat || pi*) (g: the gibbs rows)."""
    err = float(g.identity_error.max())
    return Check(
        quantity="max |SubOpt_beta(Gibbs plug-in) - beta KL(pi_hat || pi*)|", predicted=0.0, measured=err,
        tolerance=1e-10, verdict="pass" if err <= 1e-10 else "fail",
        note=f"{len(g)} (class, learner, beta, N, seed) cells; KL by the token recursion (identity 8)")


def check_s5_slope(g: pd.DataFrame, cls: str, b: float, cfg: Config) -> Check:
    """S5: the mean SubOpt of the token-MLE Gibbs plug-in falls like N^-1."""
    m = g[(g["class"] == cls) & (g.learner == "token") & (g.beta == b)].groupby("N").subopt.mean()
    sl = loglog_slope(m.index, m.values)
    mb = g[(g["class"] == cls) & (g.learner == "bandit") & (g.beta == b)].groupby("N").subopt.mean()
    return Check(
        quantity=f"log-log slope in N of mean SubOpt of the token-MLE Gibbs plug-in ({cls}, beta={b:g})",
        predicted=-1.0, measured=sl, tolerance=0.15, verdict="pass" if abs(sl + 1) <= 0.15 else "fail",
        note=f"N={list(m.index)}, mean SubOpt {np.round(m.values, 6).tolist()} over {cfg.seeds_gibbs} seeds "
             f"(a second-order quantity, so -1 rather than the -1/2 of the reward error). Bandit MLE "
             f"(K={cfg.A ** cfg.H} arms): slope {loglog_slope(mb.index, mb.values):.2f}, "
             f"mean SubOpt {np.round(mb.values, 5).tolist()}")


def check_s6(a: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S6: the token argmax policy finds an unseen y*, the bandit only a seen one (a: the argmax rows)."""
    t = a[(a["class"] == cls) & (a.learner == "token")]
    bnd = a[(a["class"] == cls) & (a.learner == "bandit")]
    unseen = t[~t.star_in_data]
    p_tok = float(unseen.picked_star.mean()) if len(unseen) else float("nan")
    per_n = bnd.groupby("N").agg(p=("picked_star", "mean"), pred=("p_star_in_data", "first"),
                                 seen=("star_in_data", "mean"), n=("seed", "size"))
    ok_band = bool((per_n.p <= per_n.pred + 2 * np.sqrt(per_n.pred * (1 - per_n.pred) / per_n.n) + 1e-12).all())
    tok_n = t.groupby("N").picked_star.mean()
    unseen_last = unseen[unseen.N == unseen.N.max()].picked_star.mean() if len(unseen) else float("nan")
    ok = (p_tok > float(bnd.picked_star.mean())) and ok_band and unseen_last >= 0.5
    reg = a[a["class"] == cls].groupby(["learner", "N"]).argmax_regret.mean()
    return Check(
        quantity=f"argmax policies ({cls}): P(token learner picks y* | y* not in data) vs P(bandit picks y*)",
        predicted="token finds y* unseen (>= 0.5 at the largest N) and beats the bandit; bandit <= P(y* in data) "
                  "= 1-(1-1/K)^(2N) ~ 2N/K",
        measured=f"token {p_tok:.3f} on {len(unseen)} data sets without y* ({unseen_last:.2f} at the largest N); "
                 "bandit per N " + ", ".join(f"N={n}: {row.p:.3f} (pred <= {row.pred:.3f}, y* seen {row.seen:.3f})"
                                              for n, row in per_n.iterrows()),
        tolerance="bandit within 2 binomial SE of the prediction", verdict="pass" if ok else "fail",
        note="token P(pick y*) per N (all data sets): " + ", ".join(f"N={n}: {v:.2f}" for n, v in tok_n.items())
             + "; mean regret R*(y*) - R*(y_hat): " + ", ".join(
                 f"{lr} N={n}: {v:.3f}" for (lr, n), v in reg.items())
             + f"; uniform pi_ref, {cfg.seeds_argmax} data sets per N, bandit ridge {cfg.bandit_ridge}. "
               "The bandit can only output a response it saw (unseen arms keep the prior value 0)")


def check_s9_coverage(pc: pd.DataFrame, rc: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S9: the calibrated rho covers ||P (theta_hat - theta*)||_Sigma_D with probability >= 1 - delta (pc: the
    class's pess rows, rc: its rho rows)."""
    delta = cfg.delta
    ev = pc[pc.beta == pc.beta.min()]                    # the event does not depend on beta
    cover = float(ev.event.mean())
    slack = binomial_slack(1 - delta, len(ev))
    return Check(
        quantity=f"P(||P(theta_hat - theta*)||_Sigma_D <= calibrated rho) on fresh seeds ({cls})",
        predicted=f">= {1 - delta}", measured=cover, tolerance=f"2 binomial SE = {slack:.3f}",
        verdict="pass" if cover >= 1 - delta - slack else "fail",
        note="calibrated rho per N (cal seeds, (1-delta) quantile): "
             + ", ".join(f"N={int(x.N)}: {x.rho_calibrated:.2f} (asymptotic sqrt(chi2/s) {x.rho_asymptotic:.2f}, "
                         f"bootstrap {x.rho_bootstrap_median:.2f})" for x in rc.itertuples())
             + f"; theory C*sqrt((d+log 1/delta)/Upsilon^2 + lambda B^2) with C=1: {rc.rho_theory_C1.iloc[0]:.1f} "
               f"(Upsilon={rc.upsilon.iloc[0]:.2e}, H={cfg.H}, L={rc.L.iloc[0]:.2f}, B={rc.B.iloc[0]:.3f})")


def check_s9_theorem42(pc: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S9: SubOpt(Algorithm 1) <= the Theorem 4.2 bound with probability >= 1 - delta."""
    holds = pc.subopt_pess <= pc.bound_42 + 1e-12
    frac = float(holds.mean())
    slack = binomial_slack(1 - cfg.delta, len(pc))
    ratio = (pc.subopt_pess / pc.bound_42).median()
    return Check(
        quantity=f"fraction of (seed, beta, N) with SubOpt(Alg. 1) <= 2 rho E_d*||phi|| - beta E_d* KL ({cls})",
        predicted=f">= {1 - cfg.delta}", measured=frac, tolerance=f"2 binomial SE = {slack:.3f}",
        verdict="pass" if frac >= 1 - cfg.delta - slack else "fail",
        note=f"holds on every seed where the event holds: {bool(holds[pc.event].all())}; median SubOpt/bound "
             f"{ratio:.3f}; literal (unprojected) bound median {pc.bound_42_literal.median():.3g} vs projected "
             f"{pc.bound_42.median():.3g}; mean SubOpt pess/greedy/B.1 = {pc.subopt_pess.mean():.4g}/"
             f"{pc.subopt_greedy.mean():.4g}/{pc.subopt_b1.mean():.4g} (pi_ref data: good coverage)")


def check_s9_b1(pc: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S9: SubOpt(B.1 max-min) <= its bound 2 rho ||E_d* phi||_Sigma^-1 with probability >= 1 - delta."""
    frac_b1 = float((pc.subopt_b1 <= pc.bound_b1 + 1e-12).mean())
    slack = binomial_slack(1 - cfg.delta, len(pc))
    return Check(
        quantity=f"fraction with SubOpt(B.1 max-min) <= 2 rho ||E_d* phi||_Sigma^-1 ({cls})",
        predicted=f">= {1 - cfg.delta}", measured=frac_b1, tolerance=f"2 binomial SE = {slack:.3f}",
        verdict="pass" if frac_b1 >= 1 - cfg.delta - slack and pc.b1_converged.all() else "fail",
        note=f"B.1 solved to duality gap <= 1e-8 in {int(pc.b1_converged.sum())}/{len(pc)} cells (max gap "
             f"{pc.b1_gap.max():.1e}); median B.1 bound / Thm 4.2 first term "
             f"{(pc.bound_b1 / pc.first_term).median():.3f} (Jensen: <= 1)")


def check_s9_first_term(pc: pd.DataFrame, cls: str) -> Check:
    """S9: the first term 2 rho E_d*||phi||_Sigma^-1 of Theorem 4.2 does not grow with N."""
    ft = pc.groupby(["beta", "N"]).first_term.mean()
    mono = all(bool((np.diff(ft.loc[b].values) <= 1e-12).all()) for b in ft.index.levels[0])
    return Check(
        quantity=f"mean 2 rho E_d*||phi||_Sigma^-1 over seeds, non-increasing in N ({cls})",
        predicted="non-increasing (~ N^-1/2 at fixed rho)",
        measured={f"beta={b:g}": np.round(ft.loc[b].values, 5).tolist() for b in ft.index.levels[0]},
        tolerance="monotone", verdict="pass" if mono else "fail",
        note=f"N={list(ft.loc[ft.index.levels[0][0]].index)}; log-log slopes "
             + ", ".join(f"beta={b:g}: {loglog_slope(ft.loc[b].index, ft.loc[b].values):.2f}"
                         for b in ft.index.levels[0]))


def checks(table: pd.DataFrame, cfg: Config) -> dict[str, Check]:
    """S5 (gibbs part), S6 per class (argmax part), S9 per class (pess and rho parts)."""
    g = table[table.part == "gibbs"]
    out = {"S5_identity": check_s5_identity(g)}
    for cls in g["class"].unique():
        for b in sorted(g.beta.unique()):
            out[f"S5_slope_{cls}_beta{b:g}"] = check_s5_slope(g, cls, b, cfg)
    a = table[table.part == "argmax"].astype({"picked_star": bool, "star_in_data": bool})
    for cls in a["class"].unique():
        out[f"S6_{cls}"] = check_s6(a, cls, cfg)
    p = table[table.part == "pess"].astype({"event": bool, "b1_converged": bool})
    rr = table[table.part == "rho"]
    for cls in p["class"].unique():
        pc = p[p["class"] == cls]
        out[f"S9_coverage_{cls}"] = check_s9_coverage(pc, rr[rr["class"] == cls], cls, cfg)
        out[f"S9_theorem42_{cls}"] = check_s9_theorem42(pc, cls, cfg)
        out[f"S9_b1_{cls}"] = check_s9_b1(pc, cls, cfg)
        out[f"S9_first_term_{cls}"] = check_s9_first_term(pc, cls)
    return out
