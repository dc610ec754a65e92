"""E0 figure: max absolute error of every exact identity (docs/theory.md section 2), with tolerances."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rto_sim.results import atomic_write_bytes, read_table

from .style import plt, run_info, save


def draw(summary: dict, out: Path) -> list[Path]:
    df = read_table(out / "E0" / "results")
    names = list(summary["checks"])
    worst = [max(summary["checks"][n]["measured"], 1e-17) for n in names]
    tol = [summary["checks"][n]["tolerance"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    y = np.arange(len(names))
    ax.barh(y, worst, color=["tab:green" if summary["checks"][n]["verdict"] == "pass" else "tab:red" for n in names])
    ax.scatter(tol, y, marker="|", s=200, color="k", label="tolerance")
    ax.set_xscale("log")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("max |error| over random instances")
    ax.legend(loc="lower right")
    det = df[df.structure != "stochastic"] if "structure" in df else df       # identities 1-11
    A_vals, betas = sorted(int(a) for a in det.A.unique()), sorted(float(b) for b in det.beta.unique())
    n_stoch = int((df.structure == "stochastic").sum()) if "structure" in df else 0
    cap = (f"E0: {det.instance.nunique()} random trees/automata (A in {A_vals}, H <= {det.H.max()}, "
           f"EOS on/off, beta in {betas})" + (f"; identities 12-13 on {n_stoch} stochastic-transition cases"
                                               if n_stoch else "") + f"; {run_info(summary, 1)}")
    paths = save(fig, out, "E0_identities", cap)
    lines = ["| identity | max abs error | tolerance | verdict |", "|---|---|---|---|"]
    for n in names:
        c = summary["checks"][n]
        lines.append(f"| {n} | {c['measured']:.2e} | {c['tolerance']:.0e} | {c['verdict']} |")
    md = out / "E0.md"
    atomic_write_bytes(md, ("\n".join([f"# E0 identities\n\n{cap}\n"] + lines) + "\n").encode())
    return paths + [md]
