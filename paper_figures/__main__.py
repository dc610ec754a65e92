"""Regenerate the figures: `python -m paper_figures --out results [--quick]` (the README's `make figures`).

Runs each experiment into OUT/<name>/ (reusing finished results with the same config), then draws its
figures into OUT/figures/ and a markdown table OUT/<name>.md. A failed check is reported, not hidden.
Experiments run in the order of `FIGURES` (the paper's order of claims), then every other experiment of
the registry (`rto_sim.experiments.EXPERIMENTS`): those have no figure, but their checks are in the report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from rto_sim.experiments import EXPERIMENTS, config_dict, make_config, run_experiment
from rto_sim.results import config_hash

from . import e0, e1, e2, e3, e5, e7, heatmap
from .llm_logs import draw as draw_llm
from .report import write_report

# experiment -> figure function(summary, out) -> paths; order = the paper's order of claims
FIGURES = {"E0": e0.draw, "E2": e2.draw, "E1": e1.draw_e1, "E1b": e1.draw_e1b, "E3": e3.draw_e3, "E6": e3.draw_e6,
           "E7": e7.draw, "E5": e5.draw}


def ensure_results(name: str, out: Path, quick: bool) -> dict:
    cfg = config_dict(make_config(name, quick))
    summ = out / name / "summary.json"
    if summ.exists():
        s = json.loads(summ.read_text())
        if s.get("config_hash") == config_hash(cfg):
            print(f"[{name}] reusing finished results in {out / name}")
            return s
    print(f"[{name}] running ({'quick' if quick else 'full'} grid) ...", flush=True)
    return run_experiment(name, out, quick=quick, overwrite=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_figures")
    ap.add_argument("--out", default="results", help="results folder (experiments write OUT/<name>/)")
    ap.add_argument("--quick", action="store_true", help="reduced grids (a laptop minute)")
    ap.add_argument("--only", nargs="*", default=None, help="subset of experiments")
    ap.add_argument("--gallery", default=None, metavar="DIR",
                    help="also copy the PNG figures into DIR (the README gallery is paper_figures/gallery)")
    ap.add_argument("--llm-logs", default=None, metavar="DIR",
                    help="also draw PPO vs RTO curves from rto_llm metrics.jsonl files below DIR")
    ap.add_argument("--report", default=None,
                    help="claims report path (default paper_figures/REPORT.md; OUT/REPORT_quick.md with --quick)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    failed, summaries, timings = [], {}, {}
    for name in [*FIGURES, *(n for n in EXPERIMENTS if n not in FIGURES)]:
        if args.only and name not in args.only:
            continue
        t1 = time.perf_counter()
        summary = ensure_results(name, out, args.quick)
        for path in FIGURES[name](summary, out) if name in FIGURES else []:
            print(f"[{name}] wrote {path}")
        summaries[name] = summary
        timings[name] = time.perf_counter() - t1
        failed += [f"{name}:{k}" for k, c in summary["checks"].items() if c["verdict"] != "pass"]
    if not args.only or "heatmap" in args.only:
        for path in heatmap.draw(out, args.quick):
            print(f"[heatmap] wrote {path}")
    if args.llm_logs:
        for path in draw_llm(Path(args.llm_logs), out):
            print(f"[llm] wrote {path}")
    if args.gallery:
        Path(args.gallery).mkdir(parents=True, exist_ok=True)
        for png in sorted((out / "figures").glob("*.png")):
            shutil.copy(png, Path(args.gallery) / png.name)
    report = Path(args.report) if args.report else (
        out / "REPORT_quick.md" if args.quick else Path(__file__).parent / "REPORT.md")
    print(f"wrote {write_report(summaries, report, timings)}")
    print("wall time per experiment (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"done in {time.perf_counter() - t0:.1f}s; checks not passing: {failed if failed else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
