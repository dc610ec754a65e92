"""E2 figure: Proposition 3.2 query counts vs H and vs A, with the paper's count A^min(xi+1,H) and the
corrected bound min(A^H, H A^(xi+1) + A^xi); and every instance's count against the paper's count."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rto_sim.results import read_table

from .style import plt, run_info, save

TOKEN = "token_best_first_known_queries"


def _band(ax, df, x, color, label):
    g = df.groupby(x)
    ax.fill_between(g[TOKEN].min().index, g[TOKEN].min(), g[TOKEN].max(), color=color, alpha=0.2)
    ax.plot(g[TOKEN].median().index, g[TOKEN].median(), "o-", color=color, label=label, ms=3)


def draw(summary: dict, out: Path) -> list[Path]:
    df = read_table(out / "E2" / "results")
    df = df[df.p_star < 1]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    ax = axes[0]
    A0 = 3 if 3 in set(df.A) else int(df.A.max())
    d = df[df.A == A0]
    Hs = np.array(sorted(d.H.unique()))
    ax.plot(Hs, float(A0) ** Hs, "k-", label=f"sentence = A^H (A={A0})")
    _band(ax, d, "H", "tab:blue", "token (median, min-max)")
    ax.plot(Hs, d.groupby("H").paper_bound.median(), "--", color="tab:red", label="paper A^min(xi+1,H) (median)")
    ax.plot(Hs, d.groupby("H").corrected_bound.median(), ":", color="tab:green", label="corrected bound (median)")
    ax.set_yscale("log")
    ax.set_xlabel("H")
    ax.set_ylabel("queries")
    ax.legend(fontsize=6)
    ax = axes[1]
    H0 = 6 if 6 in set(df.H) else int(df.H.max())
    d = df[df.H == H0]
    As = np.array(sorted(d.A.unique()))
    ax.plot(As, As.astype(float) ** H0, "k-", label=f"sentence = A^H (H={H0})")
    _band(ax, d, "A", "tab:blue", "token (median, min-max)")
    ax.plot(As, d.groupby("A").paper_bound.median(), "--", color="tab:red", label="paper (median)")
    ax.plot(As, d.groupby("A").corrected_bound.median(), ":", color="tab:green", label="corrected (median)")
    ax.set_yscale("log")
    ax.set_xlabel("A")
    ax.legend(fontsize=6)
    ax = axes[2]
    above = df[TOKEN] > df.paper_bound + 1e-9
    ax.scatter(df.paper_bound[~above], df[TOKEN][~above], s=4, alpha=0.4, color="tab:blue", label="within paper count")
    ax.scatter(df.paper_bound[above], df[TOKEN][above], s=4, alpha=0.4, color="tab:red",
               label=f"above paper count ({int(above.sum())}/{len(df)})")
    lim = [1, max(df[TOKEN].max(), df.paper_bound.max()) * 1.5]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("paper's count A^min(xi+1,H), real xi")
    ax.set_ylabel("measured token queries")
    ax.legend(fontsize=6)
    cap = (f"E2 Proposition 3.2: {len(df)} instances (p* < 1), A in {sorted(int(a) for a in df.A.unique())}, "
           f"H <= {int(df.H.max())}, evaluator families {sorted(df.family.unique())}; token learner = best-first "
           f"pruning; {summary['config'].get('seeds')} seeds per evaluator setting; "
           f"{run_info(summary, 1)}")
    return save(fig, out, "E2_prop32_queries", cap)
