"""E8 figures: neural PPO / RTO (the LLM stages) against exact truth (rto-llm experiment E8).

Learning curves of the exact SubOpt and gold return (paper Fig. 4a/4b, Table 2 arms), the RTO speed-up per
horizon, data scaling with the data ratio's bootstrap interval (Fig. 4c), the DPO implicit reward of the policy
over training (Fig. 6) and the gold-return-vs-KL frontier. Bands are 95% t-intervals of the mean over paired
seeds (the range of the seeds when there are only 2, as in the quick grid); every caption names the config hash,
seeds and wall time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats

from rto_sim.results import read_table

from .style import plt, run_info, save

COLORS = {"ppo": "k", "rto": "tab:red", "rto_paper": "tab:pink", "semi_rto": "tab:orange", "ddpo": "tab:purple",
          "rs_ppo": "tab:blue", "reinforce_pp": "0.5", "rto_reinforce_pp": "tab:green"}
STYLE = {"reinforce_pp": "--", "rto_reinforce_pp": "--"}


def _band(g, x: str, y: str = "value"):
    """(x values, mean, half-width) of column y grouped by x: the 95% t-interval over seeds with 3 or more
    seeds, half the range of the seeds with 2 (a t-interval on one degree of freedom would swamp the panel)."""
    s = g.groupby(x)[y]
    n = s.count().to_numpy()
    t = np.array([stats.t.ppf(0.975, k - 1) if k > 2 else 0.0 for k in n])
    hw = t * s.std(ddof=1).fillna(0).to_numpy() / np.sqrt(np.clip(n, 1, None))
    half_range = ((s.max() - s.min()) / 2).to_numpy()
    return s.mean().index.to_numpy(), s.mean().to_numpy(), np.where(n > 2, hw, half_range)


def _look(arm: str) -> tuple:
    """(color, line style) of an arm; "<arm>_slow" (the slow_lr runs) is dotted in the arm's color."""
    base = arm.removesuffix("_slow")
    return COLORS.get(base), (":" if arm != base else STYLE.get(base, "-"))


def _line(ax, g, x, label, y="value"):
    xs, m, hw = _band(g, x, y)
    c, ls = _look(label)
    ax.plot(xs, m, ls, color=c, label=label, lw=1.2)
    ax.fill_between(xs, m - hw, m + hw, color=c, alpha=0.12)


def smoke() -> dict:
    """The overrides of E8's smoke size (`python -m paper_figures --quick`): rto_llm.experiments.e8.SMOKE."""
    from rto_llm.experiments.e8 import SMOKE

    return dict(SMOKE)


def _eval(df, metric):
    d = df[(df.section == "eval") & (df.metric == metric)].copy()
    return d.astype({"seed": int, "H": int, "step": int})


def draw(summary: dict, out: Path) -> list[Path]:
    from rto_llm.experiments.e8 import normalized_subopt

    df = read_table(out / "E8" / "results")
    cfg = summary["config"]
    seeds = int(df.loc[df.section == "eval", "seed"].nunique())
    info = f"{seeds} paired seeds; {run_info(summary)}"
    Hs = sorted(int(h) for h in df.loc[df.section == "eval", "H"].unique())
    budget = f"{cfg['rollouts']} rollouts x {cfg['rollout_batch']} responses, beta2 {cfg['beta2']}"
    paths: list[Path] = []
    ns = normalized_subopt(df)
    full = ns[np.isclose(ns.fraction, 1.0)]
    ret = _eval(df, "gold_return")
    ret = ret[np.isclose(ret.fraction, 1.0)]
    r0 = ret[ret.step == 0].groupby(["seed", "H"])["value"].mean().rename("r0")
    ret = ret.join(r0, on=["seed", "H"]).assign(gain=lambda d: d["value"] - d["r0"])

    # Fig. 4a/4b: learning curves, one column per H
    fig, axes = plt.subplots(2, len(Hs), figsize=(4.3 * len(Hs), 6), squeeze=False)
    for j, H in enumerate(Hs):
        for arm, g in full[full.H == H].groupby("arm"):
            _line(axes[0][j], g, "step", arm, "s")
        for arm, g in ret[ret.H == H].groupby("arm"):
            _line(axes[1][j], g, "step", arm, "gain")
        axes[0][j].set(title=f"H = {H}", xlabel="rollout", ylabel="exact SubOpt / SubOpt(SFT)")
        axes[1][j].set(xlabel="rollout", ylabel="gold return gain E_pi R - E_SFT R")
    axes[0][0].legend(fontsize=6)
    paths += save(fig, out, "E8_learning_curves",
                  f"E8 learning curves of neural policies trained by rto-llm ppo / rto, evaluated exactly at beta2 "
                  f"(Fig. 4a/4b, Table 2 arms); {budget}; {info}")

    # horizon: speed-up (AUC difference) per H
    from rto_llm.experiments.e8 import Config, run_summaries

    summ = run_summaries(df, Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}))
    pairs = [("rto", "ppo"), ("rto_paper", "ppo"), ("rto_reinforce_pp", "reinforce_pp"), ("rto", "ddpo"),
             ("rs_ppo", "ppo"), ("rto_slow", "ppo_slow"), ("rs_ppo_slow", "ppo_slow")]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(pairs)
    for i, (a, b) in enumerate(pairs):
        xs, ms, hws = [], [], []
        for j, H in enumerate(Hs):
            d = summ[(summ.H == H) & np.isclose(summ.fraction, 1.0)].pivot(index="seed", columns="arm", values="auc")
            if a not in d or b not in d:
                continue
            diff = (d[b] - d[a]).dropna().to_numpy()
            if len(diff) == 0:
                continue
            hw = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0
            xs.append(j + (i - len(pairs) / 2 + 0.5) * width)
            ms.append(diff.mean())
            hws.append(hw)
        if xs:
            c, ls = _look(a)
            ax.errorbar(xs, ms, yerr=hws, fmt="s" if ls == ":" else "o", color=c, label=f"AUC({b}) - AUC({a})",
                        capsize=3, ms=4)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(range(len(Hs)), [f"H = {H}" for H in Hs])
    ax.set(ylabel="speed-up (normalized SubOpt AUC)", title="dense-reward speed-up vs horizon (S15, S16, S18)")
    ax.legend(fontsize=6)
    paths += save(fig, out, "E8_horizon", f"E8 paired AUC differences with 95% t-intervals; positive = the first "
                                          f"arm learns faster; {info}")

    # Fig. 4c: data scaling with the ratio's interval, one panel per H of data_H
    dHs = [int(h) for h in (cfg["data_H"] if isinstance(cfg["data_H"], list) else [cfg["data_H"]])]
    dHs = [h for h in dHs if summ[(summ.H == h)].fraction.nunique() > 1]
    if dHs:
        fig, axes = plt.subplots(1, len(dHs), figsize=(4.8 * len(dHs), 3.4), squeeze=False)
    for ax, dH in zip(axes[0] if dHs else [], dHs):
        d = summ[(summ.H == dH) & summ.arm.isin(["ppo", "rto"])]
        for arm, g in d.groupby("arm"):
            _line(ax, g, "fraction", arm, "final")
        ppo1 = d[(d.arm == "ppo") & np.isclose(d.fraction, 1.0)]["final"].mean()
        ax.axhline(ppo1, color="k", lw=0.7, ls=":", label="PPO with all pairs")
        ax.set_xscale("log", base=2)
        chk = summary["checks"].get(f"S17_data_ratio_H{dH}", {}).get("measured", {})
        title = f"H = {dH}"
        if chk:
            if "ratio_text" in chk:
                title += f"\ndata ratio RTO/PPO {chk['ratio_text']}, 95% CI {chk['ci95_text']} (paper ~1/8)"
            else:
                lo, hi = (float(x) for x in chk["ci95"])      # inf / nan are stored as strings in summary.json
                title += f"\ndata ratio RTO/PPO {float(chk['ratio']):.3g}, 95% CI [{lo:.3g}, {hi:.3g}] (paper ~1/8)"
        ax.set_title(title, fontsize=8)
        ax.set(xlabel=f"fraction of the {cfg['n_pairs']} preference pairs (RM and DPO)",
               ylabel="final SubOpt / SubOpt(SFT)")
        ax.legend(fontsize=6)
    if dHs:
        paths += save(fig, out, "E8_data_scaling", f"E8 final exact SubOpt at a fixed RL budget vs preference data "
                                                   f"(Fig. 4c); {budget}; {info}")

    # Fig. 6: DPO implicit reward of the policy over training
    dr = _eval(df, "dpo_reward")
    dr = dr[np.isclose(dr.fraction, 1.0)]
    fig, axes = plt.subplots(1, len(Hs), figsize=(4.3 * len(Hs), 3.2), squeeze=False)
    for j, H in enumerate(Hs):
        for arm, g in dr[dr.H == H].groupby("arm"):
            _line(axes[0][j], g, "step", arm)
        axes[0][j].set(title=f"H = {H}", xlabel="rollout", ylabel="E_pi beta_dpo log pi_dpo/pi_ref")
    axes[0][0].legend(fontsize=6)
    paths += save(fig, out, "E8_dpo_reward", f"E8 exact DPO implicit reward of each arm's policy during training "
                                             f"(Fig. 6; DPO beta {cfg['beta_dpo']}); {info}")

    # gold-vs-KL frontier
    kl = _eval(df, "kl")
    kl = kl[np.isclose(kl.fraction, 1.0)][["seed", "H", "arm", "step", "value"]].rename(columns={"value": "kl"})
    fr = ret.merge(kl, on=["seed", "H", "arm", "step"])
    fig, axes = plt.subplots(1, len(Hs), figsize=(4.3 * len(Hs), 3.2), squeeze=False)
    for j, H in enumerate(Hs):
        for arm, g in fr[fr.H == H].groupby("arm"):
            m = g.groupby("step")[["kl", "gain"]].mean()
            c, ls = _look(arm)
            axes[0][j].plot(m["kl"], m["gain"], linestyle=ls, marker=".", color=c, label=arm, lw=1)
        axes[0][j].set(title=f"H = {H}", xlabel="KL(pi || pi_ref) (exact, nats)", ylabel="gold return gain")
    axes[0][0].legend(fontsize=6)
    paths += save(fig, out, "E8_frontier", f"E8 gold return against KL along training (seed means per evaluation; "
                                           f"beta-free comparison); {info}")
    return paths
