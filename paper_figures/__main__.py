"""Regenerate the figures: `python -m paper_figures --out results [--quick]` (the README's `make figures`).

Runs each experiment into OUT/<name>/ (reusing finished results with the same config), then draws its
figures into OUT/figures/ and a markdown table OUT/<name>.md. A failed check is reported, not hidden.
Experiments run in the order of `FIGURES` (the paper's order of claims), then every other experiment of
the registry (`rto_sim.experiments.EXPERIMENTS`): those have no figure, but their checks are in the report.

A user error (an unknown --only name, a missing --llm-logs folder, a corrupt summary.json or results table,
an unwritable --out) is one line on stderr naming the file or option and the fix, exit code 2.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from rto_sim.errors import OneLineArgumentParser, ResultsFolderError, report_user_error
from rto_sim.experiments import EXPERIMENTS, config_dict, make_config, run_experiment
from rto_sim.results import config_hash

from . import e0, e1, e2, e3, e5, e7, e8, heatmap
from .llm_logs import draw as draw_llm
from .report import write_report

# experiment -> figure function(summary, out) -> paths; order = the paper's order of claims
FIGURES = {"E0": e0.draw, "E2": e2.draw, "E1": e1.draw_e1, "E1b": e1.draw_e1b, "E3": e3.draw_e3, "E6": e3.draw_e6,
           "E7": e7.draw, "E5": e5.draw}
# experiments of the LLM trainer (rto_llm.experiments; the simulator never imports it): run after the simulator's.
# E8 runs its quick grid by default (make figures), its full grid with --e8-full, a smoke size with --quick.
LLM_FIGURES = {"E8": e8.draw}


def read_summary(path: Path, name: str, out: Path) -> dict:
    """A finished experiment's summary.json; ResultsFolderError naming the file if it is not a valid summary."""
    try:
        s = json.loads(path.read_text())
        if not (isinstance(s, dict) and isinstance(s.get("config_hash"), str) and isinstance(s.get("checks"), dict)):
            raise ValueError("not a summary: config_hash or checks missing")
        if any(not isinstance(c, dict) or "verdict" not in c for c in s["checks"].values()):
            raise ValueError("a check has no verdict")
    except (ValueError, UnicodeDecodeError) as e:
        cli = "rto-llm" if name in LLM_FIGURES else "rto-sim"
        raise ResultsFolderError(f"{path} is corrupt ({' '.join(str(e).split())[:120]}): delete it or rerun the "
                                 f"experiment ({cli} experiment {name} --out {out} --overwrite)") from None
    return s


def _api(name: str):
    """(make_config, run_experiment) of the registry that holds `name` (rto_sim's or rto_llm's)."""
    if name in LLM_FIGURES:
        from rto_llm.experiments import make_config as llm_make_config
        from rto_llm.experiments import run_experiment as llm_run_experiment

        return llm_make_config, llm_run_experiment
    return make_config, run_experiment


def ensure_results(name: str, out: Path, quick: bool, **overrides) -> dict:
    make, run = _api(name)
    cfg = config_dict(make(name, quick, **overrides))
    summ = out / name / "summary.json"
    if summ.exists():
        s = read_summary(summ, name, out)
        has_table = any((out / name / f"results.{fmt}").exists() for fmt in ("parquet", "csv"))
        if s.get("config_hash") == config_hash(cfg) and has_table:
            print(f"[{name}] reusing finished results in {out / name}")
            return s
    print(f"[{name}] running ({'quick' if quick else 'full'} grid) ...", flush=True)
    return run(name, out, quick=quick, overwrite=True, **overrides)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("python -m paper_figures: interrupted; rerun the same command to resume (finished results are reused)",
              file=sys.stderr)
        return 130
    except Exception as e:
        code = report_user_error("python -m paper_figures", e)
        if code is None:
            raise
        return code


def _main(argv=None) -> int:
    ap = OneLineArgumentParser(prog="python -m paper_figures")
    ap.add_argument("--out", default="results", help="results folder (experiments write OUT/<name>/)")
    ap.add_argument("--quick", action="store_true", help="reduced grids (a laptop minute)")
    ap.add_argument("--only", nargs="*", default=None, help="subset of experiments")
    ap.add_argument("--gallery", default=None, metavar="DIR",
                    help="also copy the PNG figures into DIR (the README gallery is paper_figures/gallery)")
    ap.add_argument("--llm-logs", default=None, metavar="DIR",
                    help="also draw PPO vs RTO curves from rto_llm metrics.jsonl files below DIR")
    ap.add_argument("--e8-full", action="store_true",
                    help="run E8 (neural RTO, rto-llm experiment E8) on its full grid (< 60 min on 2 cores) instead of "
                         "its quick grid; --only llm with --llm-logs draws the rto_llm log curves alone")
    ap.add_argument("--report", default=None,
                    help="claims report path (default paper_figures/REPORT.md; OUT/REPORT_quick.md with --quick)")
    args = ap.parse_args(argv)
    known = [*FIGURES, *(n for n in EXPERIMENTS if n not in FIGURES), *LLM_FIGURES, "heatmap", "llm"]
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        ap.error(f"--only: unknown name(s) {unknown}; choose from {known}")
    if args.llm_logs and not Path(args.llm_logs).is_dir():
        ap.error(f"--llm-logs {args.llm_logs} is not a folder: pass the folder holding the rto_llm metrics.jsonl "
                 "files")
    out = Path(args.out)
    t0 = time.perf_counter()
    failed, summaries, timings = [], {}, {}
    if args.only and "llm" in args.only and not args.llm_logs:
        ap.error("--only llm draws the rto_llm log curves: give --llm-logs DIR")
    draws = {**FIGURES, **LLM_FIGURES}
    for name in [*FIGURES, *(n for n in EXPERIMENTS if n not in FIGURES), *LLM_FIGURES]:
        if args.only and name not in args.only:
            continue
        t1 = time.perf_counter()
        if name in LLM_FIGURES:   # E8: quick grid by default, full with --e8-full, smoke size with --quick
            summary = ensure_results(name, out, not args.e8_full or args.quick,
                                     **(e8.smoke() if args.quick and not args.e8_full else {}))
        else:
            summary = ensure_results(name, out, args.quick)
        for path in draws[name](summary, out) if name in draws else []:
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
    if summaries:                 # --only llm runs no experiment: the report is left as it is
        print(f"wrote {write_report(summaries, report, timings)}")
    print("wall time per experiment (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"done in {time.perf_counter() - t0:.1f}s; checks not passing: {failed if failed else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
