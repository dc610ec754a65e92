"""E3: policy quality from learned rewards (docs/theory.md sections 4 and 6, predictions S5, S6, S9, S24, S25).

Long because an experiment is one module by contract (Config, run, one check function per prediction); E3 covers
five predictions on three policy classes.

One prompt, full tree A = 3, H = 6 (K = 729 responses), true linear token reward r* = <phi, theta*> of
class unigram (d = 3, d_eff = 2) or random features (d = 8), theta* scaled so Var_{pi_ref}(R) = 0.25
(`draw_theta`, one theta* per class; seeds vary the data). Pairs from mu = pi_ref, BT labels sampled.

Parts (column `part` of the table):
  gibbs   (S5)  plug-in Gibbs policies pi_hat = soft_bellman(r_hat, beta), beta in {0.1, 1}, from the token
                MLE and the bandit MLE; SubOpt_beta(pi_hat) against beta KL(pi_hat || pi*_beta) (identity 8)
                and its log-log slope in N.
  argmax  (S6)  argmax policies (beta -> 0) on a UNIFORM-reference tree: does the learner output y* and
                was y* in the data? P(y* in data) = 1 - (1 - 1/K)^(2N) ~ 2N/K.
  temperature (S24)  policies trained at T = 1 (the optimum, the token-MLE and bandit Gibbs plug-ins on N_temp
                pairs) sampled at temperature T (per-state logits / T, `rto_sim.temperature`): exact SubOpt_beta(T)
                (RTO Fig. 5 varies the sampling temperature).
  pess  (S9, S25) Algorithm 1 (pessimistic soft planning), the Appendix B.1 max-min policy and the greedy
                plug-in on `eval_seeds` data sets per N, each at its own data-only rho (`plugin_rho`: the
                (1 - delta) quantile of the MLE's large-N law with the Fisher information at theta_hat; no
                theta*): coverage of the event ||P (theta_hat - theta*)||_{Sigma_D} <= rho, Theorem 4.2 and B.1
                bounds, the first term 2 rho E_{d*}||phi|| in N. For reference (no verdict uses it) rho is also
                calibrated with theta* as the (1 - delta) quantile of the radius over `cal_seeds` other data
                sets (`rho_cal`, `event_cal`). Norms are taken in the identifiable subspace (`project=True`).
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
    plugin_rho,
    theorem42_bound,
    theory_rho,
)
from ..preferences import response_codes, sample_preferences
from ..results import Check
from ..temperature import temper_policy, temperature_sweep
from .stats import (
    coverage_test,
    derived_seed,
    log_mean_se,
    loglog_slope,
    pooled_slope,
    rate_test,
    t_interval,
    weighted_slope,
)


@dataclass(frozen=True)
class Config:
    """A, H: the tree; return_var: Var_pi_ref(R) of theta*; ridge, bandit_ridge: ridges of the token and bandit
    MLEs; theta_seed, ref_seed: seeds of theta* and pi_ref; classes: reward class -> feature dimension (None =
    the class's own); betas: KL coefficients. Gibbs part: N_gibbs, seeds_gibbs data sets per N, the bandit
    only up to bandit_max_N and on its first bandit_seeds seeds (slow fits). Argmax part: N_argmax,
    seeds_argmax. Pessimism part: N_pess, cal_seeds data sets to calibrate rho, eval_seeds to evaluate,
    delta; bootstrap rho on n_boot resamples of the first boot_datasets data sets up to boot_max_N. Temperature
    part: sampling temperatures, N_temp pairs, seeds_temp data sets."""

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
    temperatures: tuple[float, ...] = (0.25, 0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0)
    N_temp: int = 2000
    seeds_temp: int = 20

    @classmethod
    def quick(cls) -> Config:
        return replace(cls(), N_gibbs=(250, 1000, 4000), seeds_gibbs=4, bandit_max_N=1000, bandit_seeds=2,
                       N_argmax=(10, 30, 100), seeds_argmax=12, N_pess=(250, 1000), cal_seeds=10, eval_seeds=10,
                       n_boot=0, boot_datasets=0, N_temp=1000, seeds_temp=5)


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
            rho_cal = calibrate_rho(radii, delta)            # oracle: uses theta* (reported, not a verdict)
            boot, hats = [], []
            for seed in range(cfg.eval_seeds):
                data = sample_preferences(mdp, r, N, seed=derived_seed(4, ci, N, seed))
                fit = fit_token_mle(data, feats, ridge=cfg.ridge)
                rho = plugin_rho(fit, U, delta)                # data only: the rho the bounds are checked at
                hats.append(rho)
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
                                 "rho_cal": rho_cal, "radius": radius, "event": radius <= rho,
                                 "event_cal": radius <= rho_cal,
                                 "subopt_pess": sub_optimality(mdp, pess, r, b),
                                 "subopt_greedy": sub_optimality(mdp, greedy, r, b),
                                 "subopt_b1": sub_optimality(mdp, mm.policy, r, b), "b1_gap": mm.gap,
                                 "b1_converged": mm.converged, "first_term": bnd["first"], "kl_term": bnd["kl"],
                                 "bound_42": bnd["bound"], "bound_b1": bnd["b1"], "coverage": bnd["coverage"],
                                 "bound_42_literal": lit["bound"]})
            s_bar = float(np.mean(slopes))
            rho_rows.append({"part": "rho", "class": cls, "N": N, "rho_calibrated": rho_cal, "d_eff": U.shape[1],
                             "rho_asymptotic": asymptotic_rho(U.shape[1], delta, s_bar), "bt_slope": s_bar,
                             "rho_theory_C1": th["rho"], "upsilon": th["upsilon"], "L": L,
                             "B": float(np.linalg.norm(theta)), "rho_plugin_median": float(np.median(hats)),
                             "rho_bootstrap_median": float(np.median(boot)) if boot else np.nan})
    return rows, rho_rows


def _temperature(cfg: Config) -> list:
    """SubOpt_beta of policies trained at T = 1 and sampled at temperature T (`rto_sim.temperature`, exact): the
    optimum pi*_beta, the token-MLE and the bandit Gibbs plug-ins on N_temp pairs; with beta KL(pi_T || pi*)
    (identity 8 holds for every tempered policy too)."""
    rows = []
    for ci, (cls, d) in enumerate(cfg.classes.items()):
        mdp, feats, theta, r = _setup(cfg, cls, d)
        stars = {b: soft_bellman(mdp, r, b) for b in cfg.betas}
        for seed in range(cfg.seeds_temp):
            data = sample_preferences(mdp, r, cfg.N_temp, seed=derived_seed(9, ci, cfg.N_temp, seed))
            rewards = {"token": fit_token_mle(data, feats, ridge=cfg.ridge).token_reward(),
                       "bandit": fit_bandit_mle(data, mdp, ridge=cfg.bandit_ridge).token_reward(mdp)}
            for b in cfg.betas:
                pols = {"optimum": stars[b].policy, **{k: soft_bellman(mdp, v, b).policy for k, v in rewards.items()}}
                for learner, pol in pols.items():
                    if learner == "optimum" and seed > 0:
                        continue
                    sw = temperature_sweep(mdp, pol, r, b, cfg.temperatures)
                    for row in sw.rows():
                        kl = b * layered_kl(mdp, temper_policy(mdp, pol, row["temperature"]), stars[b].log_policy)
                        rows.append({"part": "temperature", "class": cls, "learner": learner, "beta": b,
                                     "N": cfg.N_temp, "seed": seed, "temperature": row["temperature"],
                                     "subopt": row["subopt"], "J": row["J"], "kl_ref": row["kl"],
                                     "gold": row["expected_return"], "identity_error": abs(row["subopt"] - kl)})
    return rows


def run(cfg: Config, folder) -> pd.DataFrame:
    """One row per measurement; column `part` (module docstring) says which."""
    g, a = _gibbs(cfg), _argmax(cfg)
    p, rr = _pess(cfg)
    return pd.DataFrame(g + a + p + rr + _temperature(cfg))


# ---------------------------------------------------------------------- checks
S5_BAND = (-1.15, -0.85)          # S5: slope "near -1" (band ours)
FIRST_TERM_BAND = (-np.inf, 0.0)  # S9: the first term does not increase with N
THM42 = ("RTO Theorem 4.2: with probability at least 1 - delta, SubOpt(pi_hat) <= 2 rho E_{d*} ||phi||_{Sigma_D^-1} "
         "- beta E_{d*} KL(pi* || pi_hat)")
B1 = ("RTO Appendix B.1: the max-min policy has SubOpt <= 2 rho ||E_{d*} phi||_{Sigma_D^-1} with probability "
      ">= 1 - delta")


def check_s5_identity(g: pd.DataFrame) -> Check:
    """S5 (identity): SubOpt of every Gibbs plug-in equals beta KL(pi_hat || pi*) (g: the gibbs rows)."""
    err = float(g.identity_error.max())
    return Check(
        quantity="max |SubOpt_beta(Gibbs plug-in) - beta KL(pi_hat || pi*)|", predicted=0.0, measured=err,
        tolerance=1e-10, verdict="pass" if err <= 1e-10 else "fail", kind="identity",
        note=f"{len(g)} (class, learner, beta, N, seed) cells; KL by the token recursion (identity 8)")


def check_s5_slope(g: pd.DataFrame, cls: str, b: float, cfg: Config) -> Check:
    """S5 (prediction): the mean SubOpt of the token-MLE Gibbs plug-in falls like N^-1 (slope interval)."""
    d = g[(g["class"] == cls) & (g.learner == "token") & (g.beta == b)]
    pts = [(np.log(N), *log_mean_se(x.subopt.to_numpy(float))) for N, x in d.groupby("N")]
    x, y, se = (np.array(v, float) for v in zip(*pts))
    res = rate_test(weighted_slope(x, y, se), {}, S5_BAND)
    m = d.groupby("N").subopt.mean()
    mb = g[(g["class"] == cls) & (g.learner == "bandit") & (g.beta == b)].groupby("N").subopt.mean()
    return Check(
        quantity=f"log-log slope in N of mean SubOpt of the token-MLE Gibbs plug-in ({cls}, beta={b:g})",
        predicted=-1.0, measured={"slope": res["est"], "ci95": [res["low"], res["high"]]},
        tolerance=f"slope in {list(S5_BAND)}: pass if the 90% interval lies inside, fail if the 95% one lies outside",
        verdict=res["verdict"],
        note=f"N={list(m.index)}, mean SubOpt {np.round(m.values, 6).tolist()} over {cfg.seeds_gibbs} seeds "
             f"(a second-order quantity, so -1 rather than the -1/2 of the reward error); minimal detectable "
             f"deviation {res['mde']:.3f}. Bandit MLE (K={cfg.A ** cfg.H} arms): slope "
             f"{loglog_slope(mb.index, mb.values):.2f}, mean SubOpt {np.round(mb.values, 5).tolist()}")


def check_s6(a: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S6 (prediction): the token argmax policy finds an unseen y*, the bandit only a seen one (a: the argmax rows)."""
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


def _per_dataset(pc: pd.DataFrame, col: str) -> pd.Series:
    """Per data set (seed, N): whether `col` holds at every beta."""
    return pc.groupby(["seed", "N"])[col].all()


def check_s9_coverage(pc: pd.DataFrame, rc: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S25 (prediction): the data-only rho covers ||P (theta_hat - theta*)||_Sigma_D with probability >= 1 - delta
    (pc: the class's pess rows, rc: its rho rows). Fails if the coverage is significantly below 1 - delta."""
    ev = _per_dataset(pc, "event")                        # the event does not depend on beta
    t = coverage_test(int(ev.sum()), len(ev), 1 - cfg.delta)
    cal = _per_dataset(pc, "event_cal")
    return Check(
        quantity=f"P(||P(theta_hat - theta*)||_Sigma_D <= rho_hat), rho_hat from the data only ({cls})",
        predicted=f">= {1 - cfg.delta}", measured=t["rate"],
        tolerance=f"fail if significantly below (exact binomial, 5%; margin {t['margin']:.3f} at n={t['n']})",
        verdict=t["verdict"],
        note=f"p = {t['p']:.3g}; rho_hat = plugin_rho (large-N law with the Fisher information at theta_hat), per N "
             "(median over data sets) vs the theta*-calibrated (1-delta) quantile of the radius: "
             + ", ".join(f"N={int(x.N)}: {x.rho_plugin_median:.2f} vs {x.rho_calibrated:.2f} (constant-slope "
                         f"sqrt(chi2/s) {x.rho_asymptotic:.2f}, bootstrap {x.rho_bootstrap_median:.2f})"
                         for x in rc.itertuples())
             + f"; coverage of the calibrated rho on these data sets {float(cal.mean()):.3f}; theory "
               f"C*sqrt((d+log 1/delta)/Upsilon^2 + lambda B^2) with C=1: {rc.rho_theory_C1.iloc[0]:.1f} "
               f"(Upsilon={rc.upsilon.iloc[0]:.2e}, H={cfg.H}, L={rc.L.iloc[0]:.2f}, B={rc.B.iloc[0]:.3f})")


def _bound_check(pc: pd.DataFrame, cls: str, cfg: Config, holds: pd.Series, quantity: str, paper: str,
                 extra_ok: bool = True, extra_note: str = "") -> Check:
    """Probability claim of a bound at the data-only rho: the bound must hold on >= 1 - delta of the data sets
    (every beta) AND the event it rests on must have its coverage (both exact binomial tests)."""
    per = pc.assign(holds=holds).groupby(["seed", "N"]).holds.all()
    ev = _per_dataset(pc, "event")
    tb = coverage_test(int(per.sum()), len(per), 1 - cfg.delta)
    te = coverage_test(int(ev.sum()), len(ev), 1 - cfg.delta)
    verdict = "fail" if "fail" in (tb["verdict"], te["verdict"]) or not extra_ok else "pass"
    return Check(
        quantity=quantity, predicted=f">= {1 - cfg.delta}", measured={"bound_holds": tb["rate"], "event": te["rate"]},
        tolerance=f"both significantly >= 1 - delta minus the binomial margin ({tb['margin']:.3f} at n={tb['n']} data "
                  "sets; exact one-sided test at 5%)", verdict=verdict, paper=paper,
        note=f"rho = data-only plugin_rho per data set; p-values bound {tb['p']:.3g}, event {te['p']:.3g}; the bound "
             f"holds on every data set where the event holds: {bool(per[ev].all())}. {extra_note}")


def check_s9_theorem42(pc: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S25 (prediction, the paper's Theorem 4.2) at the data-only rho, with the event's coverage in the verdict."""
    return _bound_check(
        pc, cls, cfg, pc.subopt_pess <= pc.bound_42 + 1e-12,
        f"fraction of data sets with SubOpt(Alg. 1) <= 2 rho E_d*||phi|| - beta E_d* KL at every beta ({cls})", THM42,
        extra_note=f"median SubOpt/bound {(pc.subopt_pess / pc.bound_42).median():.3f}; literal (unprojected) bound "
                   f"median {pc.bound_42_literal.median():.3g} vs projected {pc.bound_42.median():.3g}; mean SubOpt "
                   f"pess/greedy/B.1 = {pc.subopt_pess.mean():.4g}/{pc.subopt_greedy.mean():.4g}/"
                   f"{pc.subopt_b1.mean():.4g} (pi_ref data: good coverage)")


def check_s9_b1(pc: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S25 (prediction, the paper's Appendix B.1 bound) at the data-only rho, with the event's coverage."""
    return _bound_check(
        pc, cls, cfg, pc.subopt_b1 <= pc.bound_b1 + 1e-12,
        f"fraction of data sets with SubOpt(B.1 max-min) <= 2 rho ||E_d* phi||_Sigma^-1 at every beta ({cls})", B1,
        extra_ok=bool(pc.b1_converged.all()),
        extra_note=f"B.1 solved to duality gap <= 1e-8 in {int(pc.b1_converged.sum())}/{len(pc)} cells (max gap "
                   f"{pc.b1_gap.max():.1e}); median B.1 bound / Thm 4.2 first term "
                   f"{(pc.bound_b1 / pc.first_term).median():.3f} (Jensen: <= 1)")


def check_s9_event(pc: pd.DataFrame, cls: str) -> Check:
    """S25 (identity): on every data set where the event holds, both bounds hold (the theorems' deterministic core)."""
    ev = pc[pc.event]
    bad = int(((ev.subopt_pess > ev.bound_42 + 1e-10) | (ev.subopt_b1 > ev.bound_b1 + 1e-10)).sum())
    worst = float(max((ev.subopt_pess - ev.bound_42).max(), (ev.subopt_b1 - ev.bound_b1).max())) if len(ev) else 0.0
    return Check(
        quantity=f"(seed, beta, N) cells with the event where SubOpt exceeds the Thm 4.2 or B.1 bound ({cls})",
        predicted=0, measured=bad, tolerance="0 (max excess <= 1e-10)",
        verdict="pass" if bad == 0 else "fail", kind="identity",
        note=f"{len(ev)} of {len(pc)} cells have the event at the data-only rho; max SubOpt - bound over them "
             f"{worst:.3g}. On the event both bounds follow from the theorems' algebra, so a failure is a bug")


def check_s9_first_term(pc: pd.DataFrame, cls: str) -> Check:
    """S9 (prediction): the first term 2 rho E_d*||phi||_Sigma^-1 of Theorem 4.2 does not increase with N: the
    interval of its log-log slope (pooled over beta, each beta's Bonferroni interval too) against (-inf, 0]. At a
    rho that settles it falls like N^-1/2 (Sigma_D grows like N)."""
    groups = {}
    for b, d in pc.groupby("beta"):
        pts = [(np.log(N), *log_mean_se(x.first_term.to_numpy(float))) for N, x in d.groupby("N")]
        x, y, se = (np.array(v, float) for v in zip(*pts))
        groups[f"beta={b:g}"] = (x, y, se)
    res = rate_test(*pooled_slope(groups), FIRST_TERM_BAND)
    ft = pc.groupby(["beta", "N"]).first_term.mean()
    return Check(
        quantity=f"log-log slope in N of the mean first term 2 rho E_d*||phi||_Sigma^-1 ({cls})",
        predicted="<= 0 (-0.5 at a settled rho)",
        measured={"slope": res["est"], "ci95": [res["low"], res["high"]],
                  "strata_outside": f"{len(res['outside'])}/{len(res['strata'])}"},
        tolerance="slope <= 0: pass if the 90% interval lies below 0, fail if the 95% one or a beta's Bonferroni "
                  "interval lies above", verdict=res["verdict"],
        note="mean first term per beta and N: " + "; ".join(
            f"beta={b:g}: {np.round(ft.loc[b].values, 5).tolist()}" for b in ft.index.levels[0])
             + "; per-beta slopes " + ", ".join(f"{k}: {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"
                                                for k, v in res["strata"].items())
             + f"; minimal detectable deviation {res['mde']:.3f}")


FIG5 = "RTO Fig. 5: RTO's performance is robust to the sampling temperature"


def check_s24_identity(tt: pd.DataFrame) -> Check:
    """S24 (identity): every tempered policy has SubOpt_beta = beta KL(pi_T || pi*) (identity 8), so the optimum
    sampled at T = 1 has SubOpt 0 and every other temperature costs >= 0 (tt: the temperature rows)."""
    err = float(tt.identity_error.max())
    opt = tt[tt.learner == "optimum"]
    at1 = float(opt[np.isclose(opt.temperature, 1.0)].subopt.abs().max()) if len(opt) else 0.0
    neg = float(-min(opt.subopt.min(), 0.0)) if len(opt) else 0.0
    worst = max(err, at1, neg)
    return Check(
        quantity="max |SubOpt(pi_T) - beta KL(pi_T || pi*)| over tempered policies, |SubOpt(pi*, T=1)|, and "
                 "-min SubOpt(pi*_T)", predicted=0.0, measured=worst, tolerance=1e-10,
        verdict="pass" if worst <= 1e-10 else "fail", kind="identity",
        note=f"{len(tt)} (class, beta, policy, seed, T) rows; identity error {err:.2g}, optimum at T=1 {at1:.2g}")


def _paired_by_t(tt: pd.DataFrame, a: str, b: str, ref_t: float | None = None) -> dict:
    """{T: (mean, low, high)} of the paired per-seed difference subopt[a at T] - subopt[b at T (or at ref_t)],
    Bonferroni 95% over the temperatures compared and the betas."""
    piv = tt.pivot_table(index=["beta", "seed"], columns=["learner", "temperature"], values="subopt")
    temps = sorted(tt.temperature.unique())
    cmp_t = [t for t in temps if ref_t is None or not np.isclose(t, ref_t)]
    m = len(cmp_t) * tt.beta.nunique()
    out = {}
    for beta in sorted(tt.beta.unique()):
        d = piv.loc[beta]
        for t in cmp_t:
            diff = d[(a, t)] - d[(b, ref_t if ref_t is not None else t)]
            out[(beta, t)] = t_interval(diff.to_numpy(float), level=1 - 0.05 / m)
    return out


def _sign_verdict(res: dict) -> tuple[str, int, int]:
    """"pass" if every interval lies above 0, "fail" if one lies below 0, else "inconclusive"."""
    above = sum(lo > 0 for _, lo, _ in res.values())
    below = sum(hi < 0 for _, _, hi in res.values())
    return ("fail" if below else ("pass" if above == len(res) else "inconclusive")), above, below


def check_s24_shape(tt: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S24 (prediction): a token-MLE plug-in trained at T = 1 is best sampled at T = 1: SubOpt(T) - SubOpt(1) > 0
    at every other T of the sweep (paired over seeds, Bonferroni over T and beta)."""
    d = tt[(tt["class"] == cls) & (tt.learner.isin(["token"]))]
    res = _paired_by_t(d, "token", "token", ref_t=1.0)
    verdict, above, below = _sign_verdict(res)
    mean = d.groupby(["beta", "temperature"]).subopt.mean()
    band = tt[(tt["class"] == cls) & (tt.learner == "bandit")].groupby(["beta", "temperature"]).subopt.mean()
    best_b = {f"beta={b:g}": float(band.loc[b].idxmin()) for b in band.index.levels[0]}
    return Check(
        quantity=f"SubOpt(T) - SubOpt(T=1) of the token-MLE Gibbs plug-in trained at T = 1 ({cls}, N={cfg.N_temp})",
        predicted="> 0 at every T != 1", measured={"T_above": f"{above}/{len(res)}", "T_below": f"{below}/{len(res)}"},
        tolerance="pass if every Bonferroni 95% paired interval lies above 0, fail if one lies below 0",
        verdict=verdict,
        note="mean SubOpt by T: " + "; ".join(
            f"beta={b:g}: " + ", ".join(f"T={t:g}: {v:.4g}" for t, v in mean.loc[b].items())
            for b in mean.index.levels[0])
        + "; paired differences: " + ", ".join(f"(beta={b:g}, T={t:g}): {m:.3g} [{lo:.3g}, {hi:.3g}]"
                                                 for (b, t), (m, lo, hi) in res.items())
        + f"; the bandit plug-in's best sampling temperature: {best_b}; {cfg.seeds_temp} data sets")


def check_s24_ranking(tt: pd.DataFrame, cls: str, cfg: Config) -> Check:
    """S24 (prediction, the paper's Fig. 5 as the simulator can test it): the token-level plug-in beats the
    sentence-level (bandit) plug-in at every sampling temperature (paired over seeds, Bonferroni)."""
    d = tt[(tt["class"] == cls) & (tt.learner.isin(["token", "bandit"]))]
    res = _paired_by_t(d, "bandit", "token")
    verdict, above, below = _sign_verdict(res)
    return Check(
        quantity=f"SubOpt(bandit plug-in at T) - SubOpt(token plug-in at T) ({cls}, N={cfg.N_temp})",
        predicted="> 0 at every T", measured={"T_token_better": f"{above}/{len(res)}",
                                              "T_bandit_better": f"{below}/{len(res)}"},
        tolerance="pass if every Bonferroni 95% paired interval lies above 0, fail if one lies below 0",
        verdict=verdict, paper=FIG5,
        note="paired differences: " + ", ".join(f"(beta={b:g}, T={t:g}): {m:.3g} [{lo:.3g}, {hi:.3g}]"
                                                for (b, t), (m, lo, hi) in res.items())
        + f"; both policies are Gibbs plug-ins of rewards fitted on the same {cfg.N_temp} pairs and planned at T = 1; "
          "the simulator's analogue of RTO (token-wise reward) against PPO's sentence-level reward")


def checks(table: pd.DataFrame, cfg: Config) -> dict[str, Check]:
    """S5 (gibbs part), S6 per class (argmax part), S9 and S25 per class (pess and rho parts), S24 (temperature
    part)."""
    g = table[table.part == "gibbs"]
    out = {"S5_identity": check_s5_identity(g)}
    for cls in g["class"].unique():
        for b in sorted(g.beta.unique()):
            out[f"S5_slope_{cls}_beta{b:g}"] = check_s5_slope(g, cls, b, cfg)
    a = table[table.part == "argmax"].astype({"picked_star": bool, "star_in_data": bool})
    for cls in a["class"].unique():
        out[f"S6_{cls}"] = check_s6(a, cls, cfg)
    p = table[table.part == "pess"].astype({"event": bool, "event_cal": bool, "b1_converged": bool})
    rr = table[table.part == "rho"]
    for cls in p["class"].unique():
        pc = p[p["class"] == cls]
        out[f"S25_coverage_{cls}"] = check_s9_coverage(pc, rr[rr["class"] == cls], cls, cfg)
        out[f"S25_theorem42_{cls}"] = check_s9_theorem42(pc, cls, cfg)
        out[f"S25_b1_{cls}"] = check_s9_b1(pc, cls, cfg)
        out[f"S25_event_implies_bound_{cls}"] = check_s9_event(pc, cls)
        out[f"S9_first_term_{cls}"] = check_s9_first_term(pc, cls)
    tt = table[table.part == "temperature"]
    if len(tt):
        out["S24_tempered_gap_identity"] = check_s24_identity(tt)
        for cls in tt["class"].unique():
            out[f"S24_best_at_training_T_{cls}"] = check_s24_shape(tt, cls, cfg)
            out[f"S24_ranking_{cls}"] = check_s24_ranking(tt, cls, cfg)
    return out
