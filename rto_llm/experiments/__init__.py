"""Experiments that train neural policies with the LLM stages: ``rto-llm experiment NAME --out DIR [--quick]``.

Same contract and on-disk format as the simulator's experiments (``rto_sim/experiments/__init__.py``, README
"Adding an experiment"): a module exposes a frozen ``Config`` (full grid as defaults, ``Config.quick()``),
``run(cfg, folder) -> DataFrame`` (tidy), ``checks(table, cfg) -> {id: Check}`` and optionally
``validate_config(cfg)``. :func:`run_experiment` writes ``OUT/NAME/{results.parquet, summary.json,
config.json}`` exactly as ``rto_sim.experiments.run_experiment`` does, so ``paper_figures`` and REPORT.md read
them unchanged. The registry lives here because the simulator never imports the LLM trainer.

    rto-llm experiment E8 --out results --quick
    rto-llm experiment E8 --out results --set seeds=4 'H=[3]'
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
import time
from pathlib import Path

LLM_EXPERIMENTS = {
    "E8": "rto_llm.experiments.e8",   # neural RTO against exact truth (docs/theory.md section 11; S15-S19)
}

COUNT_FIELDS = ("seeds", "workers")


def get_experiment(name: str):
    if name not in LLM_EXPERIMENTS:
        raise ValueError(f"unknown LLM experiment {name!r}; available: {', '.join(sorted(LLM_EXPERIMENTS))} "
                         "(the simulator's experiments run with `rto-sim experiment`)")
    return importlib.import_module(LLM_EXPERIMENTS[name])


def make_config(name: str, quick: bool = False, **overrides):
    """The `Config` of experiment `name` (full or quick grid) with `overrides` type-checked and applied."""
    from rto_sim.experiments import check_overrides

    cls = get_experiment(name).Config
    cfg = cls.quick() if quick else cls()
    return dataclasses.replace(cfg, **check_overrides(cfg, overrides, name)) if overrides else cfg


def _non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def check_config(name: str, cfg) -> None:
    """Finite numbers, `seeds` / `workers` integers >= 1, then the module's `validate_config(cfg)`; raises
    ValueError naming the field before anything is written."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _non_finite(value):
            raise ValueError(f"config key {f.name!r} of {name} must hold finite numbers, got {value!r}")
        if f.name in COUNT_FIELDS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"config key {f.name!r} of {name} must be an integer >= 1, got {value!r}; for example "
                             f"--set {f.name}=2")
    own = getattr(get_experiment(name), "validate_config", None)
    if own is not None:
        own(cfg)


def run_experiment(name: str, out: str | Path, quick: bool = False, fmt: str = "parquet", overwrite: bool = False,
                   **overrides) -> dict:
    """Run one LLM experiment into `out/name/` (resuming finished sweep cells); returns the summary dict."""
    from rto_sim import results as R
    from rto_sim.experiments import config_dict

    if fmt not in ("parquet", "csv"):
        raise ValueError(f"format must be 'parquet' or 'csv', got {fmt!r}")
    mod = get_experiment(name)
    cfg = make_config(name, quick, **overrides)
    check_config(name, cfg)
    cfg_json = config_dict(cfg)
    folder = Path(out) / name
    if hasattr(R, "claimed_folder"):     # lock + claim (rto_sim.results); older versions: claim only
        R.check_writable(folder)
        claim = R.claimed_folder(folder, cfg_json, overwrite=overwrite)
    else:  # pragma: no cover
        R.claim_folder(folder, cfg_json, overwrite=overwrite)
        claim = _null_context()
    with claim:
        t0 = time.perf_counter()
        table = mod.run(cfg, folder)
        checks = mod.checks(table, cfg)
        wall = time.perf_counter() - t0
        table = table.assign(experiment=name, config_hash=R.config_hash(cfg_json))
        R.write_table(table, folder / "results", fmt)
        summary = {"experiment": name, "quick": quick, "config_hash": R.config_hash(cfg_json), "wall_time_s": wall,
                   "config": cfg_json, "checks": {k: c.to_dict() for k, c in checks.items()},
                   "all_pass": all(c.verdict == "pass" for c in checks.values())}
        R.atomic_write_json(folder / "summary.json", summary)
    return summary


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: list[str] | None = None) -> int:
    """``rto-llm experiment NAME --out DIR [--quick] [--format parquet|csv] [--overwrite] [--set KEY=VALUE ...]``"""
    import argparse

    parser = argparse.ArgumentParser(prog="rto-llm experiment",
                                     description="Run an experiment that trains neural policies with the LLM stages "
                                                 "and evaluates them exactly; writes OUT/NAME/{results.parquet, "
                                                 "summary.json, config.json}. A rerun resumes finished cells.")
    parser.add_argument("name", help=f"experiment id: one of {', '.join(sorted(LLM_EXPERIMENTS))}")
    parser.add_argument("--out", required=True, help="results folder; the experiment writes OUT/NAME/")
    parser.add_argument("--quick", action="store_true", help="the reduced grid (a few minutes on 2 CPU cores)")
    parser.add_argument("--format", default="parquet", choices=["parquet", "csv"], help="results table format")
    parser.add_argument("--overwrite", action="store_true", help="replace results written by another config")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override Config fields (JSON values, checked against the field types), e.g. "
                             "--set seeds=4 'H=[3]'")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            parser.error(f"--set expects KEY=VALUE (e.g. --set seeds=4), got {item!r}")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    try:
        summary = run_experiment(args.name, args.out, quick=args.quick, fmt=args.format, overwrite=args.overwrite,
                                 **overrides)
    except KeyboardInterrupt:
        print(f"rto-llm experiment: interrupted; rerun the same command to resume ({args.out}/{args.name}: finished "
              "cells are kept)", file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"rto-llm experiment: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    checks = summary["checks"]
    width = max((len(k) for k in checks), default=10)
    print(f"{args.name}: {len(checks)} checks, wall {summary['wall_time_s']:.1f}s -> {Path(args.out) / args.name}")
    for k, c in checks.items():
        m = c["measured"]
        ms = f"{m:.3g}" if isinstance(m, float) else (str(m)[:60] + ("..." if len(str(m)) > 60 else ""))
        print(f"  {k:<{width}}  {c['verdict']:<12} measured={ms}")
    return 0


__all__ = ["LLM_EXPERIMENTS", "check_config", "get_experiment", "main", "make_config", "run_experiment"]
