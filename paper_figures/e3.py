"""E3/E6 figures: the Gibbs plug-in gap vs N (S5), Theorem 4.2 / B.1 bounds vs measured suboptimality at the
data-only rho (S25), SubOpt vs sampling temperature (S24, RTO Fig. 5), and pessimism vs greedy planning under poor
coverage (S10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rto_sim.results import read_table

from .style import plt, run_info, save


def draw_e3(summary: dict, out: Path) -> list[Path]:
    df = read_table(out / "E3" / "results")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    ax = axes[0]
    g = df[df.part == "gibbs"]
    for (cls, learner, beta), d in g.groupby(["class", "learner", "beta"]):
        m = d.groupby("N").subopt.mean()
        ax.plot(m.index, m, "o-" if learner == "token" else "s--", ms=3, lw=1,
                label=f"{learner}, {cls}, beta={beta:g}")
    Ns = np.array(sorted(g.N.unique()), float)
    if len(Ns):
        ref = g[(g.learner == "token") & (g.N == Ns[0])].subopt.mean()
        ax.plot(Ns, ref * Ns[0] / Ns, "k:", lw=1, label="slope -1")
    ax.set(xscale="log", yscale="log", xlabel="preference pairs N", ylabel="KL-regularized gap = beta KL(pi_hat||pi*)",
           title="Gibbs plug-in policies (S5)")
    ax.legend(fontsize=5)
    ax = axes[1]
    p = df[df.part == "pess"]
    for col, bcol, color, label in (("subopt_pess", "bound_42", "tab:red", "Algorithm 1 vs Thm 4.2 bound"),
                                    ("subopt_b1", "bound_b1", "tab:blue", "B.1 planner vs B.1 bound")):
        if col in p and bcol in p:
            ax.scatter(p[bcol], p[col].clip(lower=1e-6), s=5, alpha=0.5, color=color, label=label)
    lim = [1e-4, max(1.0, float(np.nanmax(p[["bound_42", "bound_b1"]].to_numpy())) if len(p) else 1.0)]
    ax.plot(lim, lim, "k--", lw=0.8, label="y = x")
    ax.set(xscale="log", yscale="log", xlabel="bound (data-only rho)", ylabel="measured SubOpt",
           title="Theorem 4.2 / B.1 (S25): points below the line hold")
    ax.legend(fontsize=6)
    cap = (f"E3: A={summary['config'].get('A')}, H={summary['config'].get('H')}; classes "
           f"{list(summary['config'].get('classes', {}))}; Gibbs: mean over {summary['config'].get('seeds_gibbs')} "
           f"seeds; bounds: {summary['config'].get('eval_seeds')} evaluation seeds per N; "
           f"{run_info(summary)}")
    paths = save(fig, out, "E3_policy_quality", cap)
    return paths + draw_temperature(summary, df, out)


def draw_temperature(summary: dict, df, out: Path) -> list[Path]:
    """SubOpt_beta(T) of policies trained at T = 1 and sampled at temperature T (S24; RTO Fig. 5 varies T)."""
    t = df[df.part == "temperature"] if "part" in df else df.iloc[:0]
    if t.empty:
        return []
    classes, betas = list(dict.fromkeys(t["class"])), sorted(t.beta.unique())
    fig, axes = plt.subplots(1, len(classes), figsize=(4.5 * len(classes), 3.3), squeeze=False)
    styles = {"optimum": ("k", "-"), "token": ("tab:red", "-"), "bandit": ("tab:blue", "--")}
    for ax, cls in zip(axes[0], classes):
        for (learner, beta), d in t[t["class"] == cls].groupby(["learner", "beta"]):
            g = d.groupby("temperature").subopt
            m, se = g.mean(), g.std().fillna(0.0) / np.sqrt(g.count())
            color, ls = styles.get(learner, ("0.5", ":"))
            ax.errorbar(m.index, m.clip(lower=1e-4), yerr=1.96 * se, color=color, ls=ls, marker="o" if beta ==
                        betas[0] else "s", ms=3, lw=1, capsize=2, alpha=1.0 if beta == betas[0] else 0.6,
                        label=f"{learner}, beta={beta:g}")
        ax.axvline(1.0, color="0.6", lw=0.8)
        temps = sorted(t.temperature.unique())
        ax.set(xscale="log", yscale="log", xlabel="sampling temperature T (logits / T)",
               ylabel="SubOpt_beta of pi_T (exact; floor 1e-4)", title=f"trained at T = 1, sampled at T ({cls}; S24)")
        ax.set_xticks(temps, [f"{x:g}" for x in temps])
        ax.minorticks_off()
        ax.set_ylim(bottom=1e-4)
        ax.legend(fontsize=5)
    c = summary["config"]
    cap = (f"E3 temperature part: Gibbs plug-ins of the token MLE and the bandit MLE on N={c.get('N_temp')} pairs, "
           f"planned at T = 1 and sampled with per-state logits / T (rto_sim.temperature); mean and 95% CI over "
           f"{c.get('seeds_temp')} data sets; the optimum pi*_beta for reference; {run_info(summary)}")
    return save(fig, out, "E3_temperature", cap)


def draw_e6(summary: dict, out: Path) -> list[Path]:
    df = read_table(out / "E6" / "results")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    laws = list(dict.fromkeys(df.law))
    ax = axes[0]
    Nmax = df.N.max()
    d = df[df.N == Nmax]
    x = np.arange(len(laws))
    for i, (col, color, label) in enumerate((("subopt_greedy", "0.5", "greedy (MLE)"),
                                             ("subopt_pess", "tab:red", "Algorithm 1"),
                                             ("subopt_b1", "tab:blue", "B.1 max-min"))):
        m = d.groupby("law")[col].mean().reindex(laws)
        se = d.groupby("law")[col].std().reindex(laws) / np.sqrt(d.groupby("law")[col].count().reindex(laws))
        ax.bar(x + (i - 1) * 0.27, m, 0.27, yerr=1.96 * se, color=color, label=label, capsize=2)
    ax.set_xticks(x, laws, rotation=20)
    ax.set(ylabel="SubOpt (KL-regularized)", title=f"pessimism vs greedy, N={int(Nmax)} (S10)")
    ax.legend(fontsize=6)
    ax = axes[1]
    for law, g in df.groupby("law"):
        ax.scatter(g.coverage, g.subopt_pess.clip(lower=1e-6), s=5, alpha=0.5, label=law)
    ax.set(xscale="log", yscale="log", xlabel="coverage term ||Sigma_D^-1/2 E psi^pi*||",
           ylabel="Algorithm 1 SubOpt", title="does SubOpt track coverage?")
    ax.legend(fontsize=6)
    cap = (f"E6: equal per-step marginals, different joint laws; {summary['config'].get('feature')} features; "
           f"{summary['config'].get('eval_seeds')} evaluation seeds x {len(summary['config'].get('theta_seeds', []))} "
           f"theta*; bars: mean and 95% CI; "
           f"{run_info(summary)}")
    return save(fig, out, "E6_coverage", cap)
