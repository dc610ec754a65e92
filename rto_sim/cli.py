"""`rto-sim` command line.

    rto-sim experiment E0 --out results [--quick] [--format parquet|csv] [--overwrite] [--set KEY=VALUE ...]
    rto-sim list

A user error (a bad value, a folder of another config or in use, an unwritable or full disk, a corrupt
results file) is one line on stderr naming the field or file and the fix, exit code 2
(`rto_sim.errors`); an internal bug keeps its traceback.
"""

from __future__ import annotations

import json
import sys

from .errors import OneLineArgumentParser, report_user_error
from .experiments import EXPERIMENTS, run_experiment


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="rto-sim", description="Exact token-MDP simulator for RTO")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("experiment", help="run one experiment and write its results table and summary.json")
    ex.add_argument("name", help=f"experiment id: one of {', '.join(sorted(EXPERIMENTS))}")
    ex.add_argument("--out", required=True, help="results folder; the experiment writes OUT/NAME/")
    ex.add_argument("--quick", action="store_true", help="reduced grid for CI (well under a minute)")
    ex.add_argument("--format", default="parquet", choices=["parquet", "csv"], help="results table format")
    ex.add_argument("--overwrite", action="store_true", help="replace results written by another config")
    ex.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="override fields of the experiment's Config (values parsed as JSON and checked against "
                         "the field types, e.g. --set seeds=5 'H=[2,3]')")
    sub.add_parser("list", help="list the experiments")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, mod in sorted(EXPERIMENTS.items()):
            print(f"{name}\t{mod}")
        return 0
    overrides = {}
    for item in args.set:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            parser.error(f"--set expects KEY=VALUE (e.g. --set seeds=5), got {item!r}")
        if k in overrides:
            parser.error(f"--set gives {k!r} twice: give each key once")
        overrides[k] = _parse_value(v)
    try:
        summary = run_experiment(args.name, args.out, quick=args.quick, fmt=args.format,
                                 overwrite=args.overwrite, **overrides)
    except KeyboardInterrupt:
        print(f"rto-sim: interrupted; rerun the same command to resume ({args.out}/{args.name}: finished sweep "
              "cells are kept)", file=sys.stderr)
        return 130
    except Exception as e:
        code = report_user_error("rto-sim", e)
        if code is None:
            raise
        return code
    from .results import verdict_label  # here: `rto-sim --help` does not load pandas

    width = max(len(k) for k in summary["checks"]) if summary["checks"] else 10
    print(f"{args.name}: {len(summary['checks'])} checks, wall {summary['wall_time_s']:.1f}s -> {args.out}/{args.name}")
    for k, c in summary["checks"].items():
        m = c["measured"]
        ms = f"{m:.3g}" if isinstance(m, float) else str(m)
        print(f"  {k:<{width}}  {c.get('kind', 'prediction'):<10}  measured={ms:<12} tol={c['tolerance']!s:<8} "
              f"{verdict_label(c, summary.get('quick', False))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
