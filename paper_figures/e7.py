"""E7 figures: practical RTO in the simulator (docs/sim_practical_rto.md).

    E7_learning_curves    progress (fraction of the gap to the best policy of the actor class, in the arm's own
                          objective) vs episodes, per critic (columns) and horizon (rows), one line per reward mode
    E7_speedup_vs_H       speed-up of dense over delayed DPO rewards (RTO/DDPO, RS-PPO/PPO) vs H per critic, at both
                          progress thresholds, with paired bootstrap 95% intervals (Fig. 4a/4b analogue)
    E7_advantage_snr      estimator quality against the exact advantage vs H per scheme and critic: correlation
                          (what PPO sees after whitening) and the cosine of the batch gradient with the exact gradient
    E7_data_scaling       final true objective vs number of preference pairs: PPO at the RL budget (solid) and the
                          exact-planning target of each arm (dashed), with the data-efficiency ratios (Fig. 4c)
    E7_beta_sweep         converged target of RTO over (beta3, beta1/beta_dpo) at the smallest and the full data size
Bands and bars are 95% intervals over seeds (normal for means, bootstrap for ratios)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rto_sim.experiments import e7 as e7_exp
from rto_sim.experiments import make_config
from rto_sim.results import read_table

from .style import plt, run_info, save

COLORS = {"ppo": "k", "rto": "tab:red", "semi_rto": "tab:orange", "ddpo": "tab:purple", "rs_ppo": "tab:blue",
          "ppo:bandit": "k", "rto:bandit:tree": "tab:red", "rto:bandit:automaton": "tab:green",
          "ppo:token_mle": "0.5", "rto:token_mle:tree": "salmon", "rto:token_mle:automaton": "lightgreen"}
STYLE = {"rto": "-", "rs_ppo": "-", "ddpo": "--", "ppo": "--", "semi_rto": ":"}
CRITIC_LABEL = {"none": "no critic (REINFORCE++)", "position_last_token": "linear critic (h, last token)",
                "tabular": "tabular critic (automaton)", "tree_tabular": "tabular critic (prefix tree)"}


def mean_band(g, x: str):
    """(x, mean, half-width of a 95% normal interval over seeds) of `value` grouped by x."""
    s = g.groupby(x)["value"]
    n = s.count().clip(lower=1)
    return s.mean().index.to_numpy(), s.mean().to_numpy(), 1.96 * (s.std(ddof=1).fillna(0) / np.sqrt(n)).to_numpy()


def _line(ax, g, x, label, color=None, ls="-", marker=None):
    xs, m, hw = mean_band(g, x)
    ax.plot(xs, m, ls, label=label, color=color, lw=1.2, marker=marker, ms=3)
    ax.fill_between(xs, m - hw, m + hw, color=color, alpha=0.12)


def _config(summary: dict):
    cfg = summary.get("config") or {}
    try:
        return make_config("E7", summary.get("quick", False), **{k: v for k, v in cfg.items()})
    except Exception:                                   # an older config: the current defaults
        return make_config("E7", summary.get("quick", False))


def draw(summary: dict, out: Path) -> list[Path]:
    df = read_table(out / "E7" / "results")
    cfg = _config(summary)
    info = run_info(summary)
    paths = []
    sp = df[df.section == "speed"]
    if len(sp):
        paths += _learning_curves(sp, cfg, info, out)
        paths += _speedup(df, cfg, info, out)
        paths += _snr(sp, cfg, info, out)
    if (df.section == "data").any():
        paths += _data_scaling(df, cfg, info, out)
        paths += _beta_sweep(df, cfg, info, out)
    return paths


def _primary(sp, cfg):
    actor, B, opt = e7_exp.primary(cfg)
    return sp[(sp.actor == actor) & (sp.batch_size.astype(int) == B) & (sp.optimizer == opt)], (actor, B, opt)


def _learning_curves(sp, cfg, info, out) -> list[Path]:
    d, (actor, B, opt) = _primary(sp, cfg)
    d = d[(d.metric == "progress") & (d["update"].astype(int) >= 0)].copy()
    d["episodes"] = d["update"].astype(int) * B
    Hs = sorted(d.H.astype(int).unique())
    critics = [c for c in cfg.critics if c in set(d.critic)]
    fig, axes = plt.subplots(len(Hs), len(critics), figsize=(3.0 * len(critics), 2.1 * len(Hs)), squeeze=False,
                             sharex=True, sharey=True)
    for i, H in enumerate(Hs):
        for j, critic in enumerate(critics):
            ax = axes[i][j]
            g = d[(d.H.astype(int) == H) & (d.critic == critic)]
            for scheme, gs in g.groupby("scheme"):
                _line(ax, gs, "episodes", scheme, COLORS.get(scheme), STYLE.get(scheme, "-"))
            for lv in cfg.thresholds:
                ax.axhline(lv, color="0.7", lw=0.6, ls=":")
            if i == 0:
                ax.set_title(CRITIC_LABEL.get(critic, critic), fontsize=8)
            if j == 0:
                ax.set_ylabel(f"H = {H}\nprogress")
            if i == len(Hs) - 1:
                ax.set_xlabel("episodes")
            if not len(g):
                ax.text(0.5, 0.5, "not run at this H", ha="center", va="center", transform=ax.transAxes, fontsize=7)
    axes[0][0].legend(fontsize=6)
    n = int(d.seed.nunique())
    return save(fig, out, "E7_learning_curves",
                f"E7 learning speed: progress = (J - J(pi_ref)) / (J*_class - J(pi_ref)) in each pair's objective vs "
                f"episodes; last-token automata (A = {cfg.A}, no EOS), exact RM and DPO, {actor} actor, batch {B}, "
                f"{opt}; dense (solid) vs delayed (dashed); {n} paired seeds, 95% bands; {info}")


def _speedup(df, cfg, info, out) -> list[Path]:
    actor, B, opt = e7_exp.primary(cfg)
    critics = [c for c in cfg.critics if c in set(df.critic.dropna())]
    fig, axes = plt.subplots(1, len(critics), figsize=(3.0 * len(critics), 2.8), squeeze=False, sharey=True)
    n = 0
    for lv, mk in zip(cfg.thresholds, ("o", "s", "^")):
        t = e7_exp.speedup_table(df, cfg, lv)
        t = t[(t.actor == actor) & (t.batch_size == B) & (t.optimizer == opt)]
        for ax, critic in zip(axes[0], critics):
            for k, (pair, g) in enumerate(t[t.critic == critic].groupby("pair")):
                g = g.sort_values("H")
                x = g.H.to_numpy() * (1 + 0.03 * (k - 0.5) + 0.01 * lv)
                color = "tab:red" if pair.startswith("rto") else "tab:blue"
                ax.errorbar(x, g.speedup, yerr=[g.speedup - g.low, g.high - g.speedup], fmt=mk + "-", ms=3, lw=1,
                            color=color, alpha=1.0 if lv == cfg.speedup_threshold else 0.5, capsize=2,
                            label=f"{pair} @ {lv:g}")
                n = max(n, int(g.n.max()))
    for ax, critic in zip(axes[0], critics):
        ax.axhline(1.0, color="0.4", lw=0.8)
        ax.axhspan(1 / cfg.speedup_margin, cfg.speedup_margin, color="0.85", alpha=0.4, lw=0)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="horizon H", title=CRITIC_LABEL.get(critic, critic))
        ax.title.set_fontsize(8)
    axes[0][0].set_ylabel("speed-up (episodes delayed / dense)")
    axes[0][0].legend(fontsize=6)
    return save(fig, out, "E7_speedup_vs_H",
                f"E7 speed-up of dense over delayed DPO rewards (restricted mean episodes to 50% / 80% of the gap, "
                f"censored at the budget; > 1 = dense faster; grey = no-effect margin) vs H; {actor} actor, batch {B}, "
                f"{opt}; {n} paired seeds, paired bootstrap 95% intervals; {info}")


def _snr(sp, cfg, info, out) -> list[Path]:
    d, (actor, B, opt) = _primary(sp, cfg)
    critics = [c for c in cfg.critics if c in set(d.critic)]
    u = cfg.snr_update
    fig, axes = plt.subplots(2, len(critics), figsize=(3.0 * len(critics), 4.6), squeeze=False, sharex=True)
    for row, metric, lab in ((0, "adv_corr", "corr(A_hat, A^pi)"), (1, "grad_cos", "cos(batch grad, exact grad)")):
        for j, critic in enumerate(critics):
            ax = axes[row][j]
            g = d[(d.metric == metric) & (d.critic == critic) & (d["update"].astype(int) == u)]
            for scheme, gs in g.groupby("scheme"):
                gs = gs.assign(H=gs.H.astype(int))
                _line(ax, gs, "H", scheme, COLORS.get(scheme), STYLE.get(scheme, "-"), marker="o")
            ax.set_xscale("log", base=2)
            if row == 0:
                ax.set_title(CRITIC_LABEL.get(critic, critic), fontsize=8)
            else:
                ax.set_xlabel("horizon H")
            if j == 0:
                ax.set_ylabel(lab)
    axes[0][0].legend(fontsize=6)
    n = int(d.seed.nunique())
    return save(fig, out, "E7_advantage_snr",
                f"E7 advantage estimators against the EXACT advantage A^pi of the pair's objective, at PPO update {u} "
                f"(rollout of that update, before its epochs): correlation over valid tokens (SNR = c^2 / (1 - c^2)) "
                f"and cosine of the full-batch PPO gradient with the exact policy gradient; {actor} actor, batch {B}, "
                f"{opt}; {n} seeds, 95% bands; {info}")


def _data_scaling(df, cfg, info, out) -> list[Path]:
    d = df[df.section == "data"]
    fig, axes = plt.subplots(1, len(cfg.rms), figsize=(4.6 * len(cfg.rms), 3.3), squeeze=False, sharey=True)
    kinds = (("converged", "converged", "--", None), ("ppo", "PPO, budget", "-", "o"))   # kind, label, line, marker
    curves = {kind: e7_exp.data_curves(df, cfg, kind) for kind, *_ in kinds}             # once, not per panel
    for ax, rm in zip(axes[0], cfg.rms):
        for kind, label, ls, marker in kinds:
            for arm in [a for a in curves[kind].columns if a.split(":")[1] == rm]:
                g = curves[kind][arm].rename("value").reset_index()
                _line(ax, g, "n_data", f"{arm} ({label})", COLORS.get(arm), ls, marker=marker)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="preference pairs n", title=f"RM = {rm}")
        ax.legend(fontsize=5.5)
    axes[0][0].set_ylabel("final J_norm (true objective)")
    ratios = []
    for dpo in cfg.dpos:
        for kind in ("ppo", "converged"):
            c = e7_exp.check_s23_data(df, cfg, kind, dpo)
            if c is not None:
                lo, hi = c.measured["ci95"]
                ratios.append(f"{dpo}/{kind}: {c.measured['ratio']:.2g} [{lo:.2g}, {hi:.2g}]")
    n = int(d.seed.nunique())
    ridges = d[d.metric == "ridge"].groupby(["learner", "n_data"])["value"].median()
    n_full = ridges.index.get_level_values(1).max()
    rtxt = "; ".join(f"{k[0]}: {v:g}" for k, v in ridges.items() if k[1] == n_full)
    return save(fig, out, "E7_data_scaling",
                f"E7 data efficiency (Fig. 4c analogue): final true J_norm vs pairs, PPO at a fixed RL budget (solid) "
                f"and the exact-planning target of each arm (dashed); ridges chosen by held-out BT likelihood (median "
                f"at full data: {rtxt}); data-efficiency ratio RTO/PPO (RM bandit) with bootstrap 95% CI: "
                f"{'; '.join(ratios)}; {n} seeds; {info}")


def _beta_sweep(df, cfg, info, out) -> list[Path]:
    d = df[(df.section == "data") & (df.metric == "converged")]
    d = d[d.arm.str.startswith("rto")]
    if d.empty:
        return []
    ns = sorted(d.n_data.astype(int).unique())
    arms = sorted(d.arm.unique())
    sizes = sorted({ns[0], ns[-1]})
    fig, axes = plt.subplots(len(sizes), len(arms), figsize=(2.8 * len(arms), 2.9 * len(sizes)), squeeze=False)
    fig.subplots_adjust(hspace=0.55, wspace=0.35)
    ppo = df[(df.section == "data") & (df.metric == "converged") & df.arm.str.startswith("ppo")]
    for i, n in enumerate(sizes):
        for j, arm in enumerate(arms):
            ax = axes[i][j]
            g = d[(d.arm == arm) & (d.n_data.astype(int) == n)]
            piv = g.groupby(["arm_beta3", "arm_ratio"])["value"].mean().unstack("arm_ratio")
            im = ax.imshow(piv.to_numpy(), origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.grid(False)
            ax.set_xticks(range(piv.shape[1]), [f"{x:g}" for x in piv.columns], fontsize=6)
            ax.set_yticks(range(piv.shape[0]), [f"{x:g}" for x in piv.index], fontsize=6)
            for (a, b), v in np.ndenumerate(piv.to_numpy()):
                ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=5.5, color="w")
            rm = arm.split(":")[1]
            ref = ppo[(ppo.arm == f"ppo:{rm}") & (ppo.n_data.astype(int) == n)]["value"].mean()
            ax.set_title(f"{arm}, n = {n}\nPPO target {ref:.2f}", fontsize=6)
            if i == len(sizes) - 1:
                ax.set_xlabel("beta1 / beta_dpo", fontsize=7)
            if j == 0:
                ax.set_ylabel("beta3", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="converged J_norm")
    n_seeds = int(d.seed.nunique())
    return save(fig, out, "E7_beta_sweep",
                f"E7 converged (exact-planning) target of RTO over (beta3, beta1/beta_dpo), mean over {n_seeds} seeds, "
                f"at the smallest and the full data size; beta3 = 0 is the DPO reward alone; {info}")
