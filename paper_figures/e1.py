"""E1/E1b figures: token MLE vs sentence bandit (and tabular DPO) centred-return RMSE vs N (log-log) with the
asymptotic theory lines sqrt(d/(2 s N)) (d = d_eff for the token class, K - 1 for the bandit), and E1b's
error vs H at fixed N."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rto_sim.results import read_table

from .style import plt, run_info, save

STYLE = {"token_mle": ("tab:red", "o-"), "bandit_mle": ("tab:blue", "s-"), "tabular_dpo": ("tab:green", "x--")}


def _stat(df, learner, metric, by):
    d = df[(df.learner == learner) & (df.metric == metric)]
    g = d.groupby(by)["value"]
    n = g.count().clip(lower=1)
    return g.mean(), 1.96 * g.std(ddof=1).fillna(0) / np.sqrt(n)


def draw_e1(summary: dict, out: Path) -> list[Path]:
    df = read_table(out / "E1" / "results")
    classes = list(dict.fromkeys(df.reward_class))
    H0 = int(sorted(df.H.unique())[len(df.H.unique()) // 2])
    fig, axes = plt.subplots(1, len(classes), figsize=(3.1 * len(classes), 3.1), squeeze=False, sharey=True)
    for ax, rc in zip(axes[0], classes):
        d = df[(df.reward_class == rc) & (df.H == H0)]
        for learner, (color, ls) in STYLE.items():
            m, hw = _stat(d, learner, "rmse", "N")
            if len(m):
                ax.errorbar(m.index, m, yerr=hw, fmt=ls, color=color, ms=3, lw=1, label=learner, capsize=2)
        s = d[(d.learner == "data") & (d.metric == "bt_slope")].value.mean()
        Ns = np.array(sorted(d.N.unique()), float)
        for metric, color in (("d_eff", "tab:red"), ("d_eff_bandit", "tab:blue")):
            deff = d[(d.learner == "data") & (d.metric == metric)].value.mean()
            if np.isfinite(deff) and np.isfinite(s):
                ax.plot(Ns, np.sqrt(deff / (2 * s * Ns)), ":", color=color, lw=1,
                        label=f"theory sqrt({metric}/(2sN))")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(title=f"{rc} (H={H0})", xlabel="preference pairs N")
    axes[0][0].set_ylabel("centred-return RMSE")
    axes[0][0].legend(fontsize=5.5)
    seeds = int(df.seed.nunique())
    cap = (f"E1: A={int(df.A.iloc[0])}, H={H0}; mean and 95% CI over {seeds} seeds; dotted: asymptotic theory; "
           f"{run_info(summary)}")
    return save(fig, out, "E1_token_vs_bandit", cap)


def draw_e1b(summary: dict, out: Path) -> list[Path]:
    df = read_table(out / "E1b" / "results")
    fig, ax = plt.subplots(figsize=(5, 3.3))
    rm = df[df.metric == "rmse"]
    m, hw = _stat(rm, "token_mle", "rmse", "H")
    ax.errorbar(m.index, m, yerr=hw, fmt="o-", color="tab:red", ms=3, label="token MLE (unigram)", capsize=2)
    if "fit_ridge" in rm:
        for i, (ridge, g) in enumerate(rm[rm.learner == "bandit_mle"].groupby("fit_ridge")):
            m, hw = _stat(g, "bandit_mle", "rmse", "H")
            ax.errorbar(m.index, m, yerr=hw, fmt="s-", color=plt.get_cmap("Blues")(0.4 + 0.25 * i), ms=3,
                        label=f"bandit, ridge {ridge:g}", capsize=2)
    sd = df[df.metric == "std_mu_R"].groupby("H").value.mean()
    if len(sd):
        ax.plot(sd.index, sd, "k:", lw=1, label="std_mu(R)")
    ax.set_yscale("log")
    ax.set(xlabel="H", ylabel="centred-return RMSE", title=f"error vs H at N = {int(df.N.iloc[0])}")
    ax.legend(fontsize=6)
    cap = (f"E1b: A={int(df.A.iloc[0])}, stationary unigram reward, Var_mu(R) fixed; {int(df.seed.nunique())} "
           f"seeds; {run_info(summary)}")
    return save(fig, out, "E1b_error_vs_H", cap)
