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


def add_experiment_arguments(parser, names, quick_help: str) -> None:
    """The arguments of `rto-sim experiment` and `rto-llm experiment` (one definition for both CLIs)."""
    parser.add_argument("name", help=f"experiment id: one of {', '.join(sorted(names))}")
    parser.add_argument("--out", required=True, help="results folder; the experiment writes OUT/NAME/")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--format", default="parquet", choices=["parquet", "csv"], help="results table format")
    parser.add_argument("--overwrite", action="store_true", help="replace results written by another config")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override fields of the experiment's Config (values parsed as JSON and checked "
                             "against the field types, e.g. --set seeds=5 'H=[2,3]')")


def parse_overrides(parser, items: list[str]) -> dict:
    """`--set KEY=VALUE ...` -> {key: JSON value (or the text itself)}; a malformed or repeated key is a usage
    error naming it."""
    overrides = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            parser.error(f"--set expects KEY=VALUE (e.g. --set seeds=5), got {item!r}")
        if k in overrides:
            parser.error(f"--set gives {k!r} twice: give each key once")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    return overrides


def run_and_print(prog: str, parser, args, run=run_experiment) -> int:
    """Run the experiment the parsed `args` name with `run` (the simulator's or the LLM registry's
    `run_experiment`) and print one line per check; a user error is one line on stderr (exit 2), an interrupt
    says how to resume (exit 130)."""
    try:
        summary = run(args.name, args.out, quick=args.quick, fmt=args.format, overwrite=args.overwrite,
                      **parse_overrides(parser, args.set))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume ({args.out}/{args.name}: finished sweep "
              "cells are kept)", file=sys.stderr)
        return 130
    except Exception as e:
        code = report_user_error(prog, e)
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


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="rto-sim", description="Exact token-MDP simulator for RTO")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("experiment", help="run one experiment and write its results table and summary.json")
    add_experiment_arguments(ex, EXPERIMENTS, "reduced grid for CI (well under a minute)")
    sub.add_parser("list", help="list the experiments")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, mod in sorted(EXPERIMENTS.items()):
            print(f"{name}\t{mod}")
        return 0
    return run_and_print("rto-sim", ex, args)


if __name__ == "__main__":
    sys.exit(main())
