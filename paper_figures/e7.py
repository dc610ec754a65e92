"""E7 figures (paper Fig. 4a/4b, 4c, the beta1 sweep and Fig. 6 analogues): practical RTO in the simulator.
Bands are 95% normal intervals of the mean over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rto_sim.results import read_table

from .style import plt, save

COLORS = {"ppo": "k", "rto": "tab:red", "semi_rto": "tab:orange", "ddpo": "tab:purple", "rs_ppo": "tab:blue",
          "rto_reinforce++": "tab:green"}


def mean_band(g, x: str):
    """(x, mean, half-width of a 95% normal interval over seeds) of `value` grouped by x."""
    s = g.groupby(x)["value"]
    n = s.count().clip(lower=1)
    return s.mean().index.to_numpy(), s.mean().to_numpy(), 1.96 * (s.std(ddof=1).fillna(0) / np.sqrt(n)).to_numpy()


def _line(ax, g, x, label, color=None, ls="-"):
    xs, m, hw = mean_band(g, x)
    ax.plot(xs, m, ls, label=label, color=color, lw=1.2)
    ax.fill_between(xs, m - hw, m + hw, color=color, alpha=0.15)


def draw(summary: dict, out: Path) -> list[Path]:
    df = read_table(out / "E7" / "results")
    # J_norm = (J - J(pi_ref)) / (J(pi*) - J(pi_ref)) puts seeds (different random MDPs) on one scale
    metric = "J_norm" if "J_norm" in set(df.metric) else "J_true"
    ylab = "normalized true J_beta (1 = optimum)" if metric == "J_norm" else "true J_beta (exact)"
    seeds = int(df.loc[df.section == "curves", "seed"].nunique())
    cfg = f"config {summary['config_hash']}; {seeds} seeds; wall {summary['wall_time_s']:.0f}s"
    paths = []
    # Fig 4a/4b analogue: learning curves per scheme
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    cur = df[df.section == "curves"]
    for scheme, g in cur[cur.metric == metric].groupby("scheme"):
        _line(axes[0], g, "update", scheme, COLORS.get(scheme))
    for scheme, g in cur[cur.metric == "kl_ref"].groupby("scheme"):
        _line(axes[1], g, "update", scheme, COLORS.get(scheme))
    axes[0].set(xlabel="PPO update", ylabel=ylab, title="learning curves (Fig. 4a/4b analogue)")
    axes[1].set(xlabel="PPO update", ylabel="KL(pi || pi_ref)", title="KL to reference")
    axes[0].legend(fontsize=6)
    paths += save(fig, out, "E7_learning_curves", f"E7 learning curves of the exact KL-regularized objective; {cfg}")
    # Fig 4c analogue: final objective vs preference-data fraction
    fr = df[(df.section == "fraction") & (df.metric == metric)]
    if len(fr):
        last = fr[fr["update"] == fr["update"].max()]
        rms = sorted(last.rm.dropna().unique())
        fig, axes = plt.subplots(1, len(rms), figsize=(4.5 * len(rms), 3.2), squeeze=False)
        for ax, rm in zip(axes[0], rms):
            for scheme, g in last[last.rm == rm].groupby("scheme"):
                _line(ax, g, "fraction", scheme, COLORS.get(scheme), "o-")
            ax.set_xscale("log", base=2)
            ax.set(xlabel="fraction of preference pairs", ylabel=f"final {ylab}", title=f"data scaling, RM = {rm}")
            ax.legend(fontsize=6)
        paths += save(fig, out, "E7_data_scaling",
                      f"E7 final objective at a fixed RL budget vs data fraction (Fig. 4c analogue); {cfg}")
    # beta1 sweep and DPO reward over training (Fig. 6 analogue)
    b1 = df[df.section == "beta1"]
    if len(b1):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        last = b1[(b1.metric == metric) & (b1["update"] == b1["update"].max())]
        _line(axes[0], last, "beta1", "RTO", "tab:red", "o-")
        axes[0].set_xscale("symlog", linthresh=0.01)
        axes[0].set(xlabel="beta1", ylabel=f"final {ylab}", title="beta1 sweep")
        for beta1, g in b1[b1.metric == "dpo_reward"].groupby("beta1"):
            _line(axes[1], g, "update", f"beta1={beta1:g}")
        axes[1].set(xlabel="PPO update", ylabel="mean DPO token reward per sequence",
                    title="DPO reward over training (Fig. 6 analogue)")
        axes[1].legend(fontsize=6)
        paths += save(fig, out, "E7_beta1_and_dpo_reward", f"E7 beta1 sweep and DPO reward during RTO; {cfg}")
    return paths
