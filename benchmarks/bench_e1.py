"""Wall time of the full E1 grid (issue target: < 5 minutes on 2 cores) and per-fit time of each learner.

Runs E1 (A = 3, H 2..7, 5 reward classes, N in {500, 2000, 8000, 32000}, 20 seeds: 2,400 cells, each
fitting the token MLE, the sentence bandit MLE and tabular DPO on the same data, plus the metrics)
into a fresh folder and prints cells/second, the wall time, and the mean / max fit time of each
learner by reward class and H, read back from the results table.

    .venv/bin/python benchmarks/bench_e1.py [--workers 2] [--seeds 20] [--out DIR] [--write-md]

--seeds < 20 runs a documented fraction of the grid and extrapolates the full-grid time linearly in
the number of cells (cells of one seed cost the same on average). --write-md writes the printed
figures and the command to benchmarks/results/e1.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from rto_sim.experiments import e1, run_experiment


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=20, help="seeds per cell (20 = the full grid)")
    ap.add_argument("--out", default=None, help="results folder (default: a fresh temporary folder, removed)")
    ap.add_argument("--write-md", action="store_true", help="write benchmarks/results/e1.md")
    args = ap.parse_args()
    full = e1.Config()
    tmp = None
    if args.out is None:
        tmp = tempfile.mkdtemp(prefix="bench_e1_")
        out = Path(tmp)
    else:
        out = Path(args.out)
    n_cells = len(full.reward_classes) * len(full.H) * len(full.N) * args.seeds
    n_full = len(full.reward_classes) * len(full.H) * len(full.N) * full.seeds
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = run_experiment("E1", out, quick=False, seeds=args.seeds, workers=args.workers)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    table = pd.read_parquet(out / "E1" / "results.parquet")
    ft = table[table.metric == "fit_time_s"]
    per_learner = ft.groupby("learner").value.agg(["mean", "median", "max", "sum"])
    by_class = ft.pivot_table(index=["reward_class", "H"], columns="learner", values="value", aggfunc="mean")
    cell_time = table.groupby("cell_hash").wall_time_s.first()
    lines = [
        f"E1 grid: {n_cells} cells ({args.seeds} seeds; full grid {n_full} cells), {args.workers} worker processes",
        f"wall time {wall:.1f} s (run_experiment, incl. analysis) -> {n_cells / wall:.2f} cells/s",
        f"sum of per-cell compute {cell_time.sum():.1f} s (mean {cell_time.mean() * 1e3:.0f} ms/cell, "
        f"max {cell_time.max():.2f} s)",
    ]
    if n_cells != n_full:
        lines.append(f"extrapolated full-grid wall time: {wall * n_full / n_cells:.0f} s")
    lines.append(f"load average (1 min) before/after: {load0:.2f} / {load1:.2f} on {os.cpu_count()} CPUs")
    lines.append("")
    lines.append("per-fit time by learner (s):")
    lines.append(per_learner.round(4).to_string())
    lines.append("")
    lines.append("mean per-fit time by reward class and H (s):")
    lines.append(by_class.round(4).to_string())
    lines.append("")
    lines.append("checks: " + ", ".join(f"{k}={c['verdict']}" for k, c in summary["checks"].items()))
    text = "\n".join(lines)
    print(text)
    if args.write_md:
        cmd = "PYTHONPATH=. .venv/bin/python benchmarks/bench_e1.py " + " ".join(sys.argv[1:])
        md = (f"# E1 benchmark (full statistical-scaling grid)\n\nCommand: `{cmd}`\n\n"
              f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. Other "
              "processes may share the CPU: the load average before and after is printed below; under load expect "
              "the wall time to grow by roughly the load / cores ratio.\n\n"
              "Target (issue): full E1 grid under 5 minutes on this 2-core machine.\n\n"
              f"```\n{text}\n```\n")
        Path(__file__).parent.joinpath("results", "e1.md").write_text(md)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
