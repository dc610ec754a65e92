"""Experiment registry and the experiment contract: `rto-sim experiment NAME --out DIR [--quick] [--set k=v]`.

Every experiment module (registered in `EXPERIMENTS`) exposes

    Config                   a frozen dataclass: every setting as a documented, typed field whose default is
                             the full grid; `Config.quick()` returns the reduced grid (`--quick`, CI)
    run(cfg, folder)         -> the tidy pandas DataFrame of every measurement; `folder` is the experiment's
                             results folder (for sweep cells and side files)
    checks(table, cfg)       -> {check id: Check}, built from one small function per prediction; it reads
                             only `table` and `cfg`, so a saved table can be checked again
    validate_config(cfg)     (optional) raises ValueError naming the field for a bad config; called before
                             anything is written

`run_experiment` owns the bookkeeping: it builds the config, applies `--set` overrides type-checked against
the field types, validates the whole config, locks and claims the folder, runs, checks, and writes the table
and `summary.json` atomically.
README.md ("Adding an experiment") shows a minimal module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import time
import types
import typing
from pathlib import Path

EXPERIMENTS = {
    "E0": "rto_sim.experiments.e0",     # exact identities (docs/theory.md section 2)
    "E1": "rto_sim.experiments.e1",     # statistical scaling: token MLE vs bandit vs DPO (S1-S3, S5, S7, S8)
    "E1b": "rto_sim.experiments.e1b",   # fixed-N sweep in H (S4)
    "E2": "rto_sim.experiments.e2",     # Proposition 3.2 query counts (S11)
    "E3": "rto_sim.experiments.e3",     # policy quality, Algorithm 1, Theorem 4.2 (S5, S6, S9)
    "E5": "rto_sim.experiments.e5",     # overoptimization (S14)
    "E6": "rto_sim.experiments.e6",     # coverage (S10)
    "E7": "rto_sim.experiments.e7",     # practical RTO: PPO on shaped token rewards (S12, S13)
}


def get_experiment(name: str, registry: dict[str, str] | None = None):
    """The module of experiment `name` in `registry` (default: the simulator's `EXPERIMENTS`)."""
    registry = EXPERIMENTS if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(registry))}")
    try:
        return importlib.import_module(registry[name])
    except ModuleNotFoundError as e:
        if e.name == registry[name]:
            raise ValueError(f"experiment {name!r} is registered but not implemented yet ({registry[name]})") from e
        raise


def make_config(name: str, quick: bool = False, registry: dict[str, str] | None = None, **overrides):
    """The `Config` of experiment `name` (full or quick grid) with `overrides` applied after type checks."""
    cls = get_experiment(name, registry).Config
    cfg = cls.quick() if quick else cls()
    return dataclasses.replace(cfg, **check_overrides(cfg, overrides, name)) if overrides else cfg


def undocumented_fields(cls) -> list[str]:
    """The fields of a Config class that are documented nowhere: a field counts as documented when the class
    docstring names it, or a comment ends its declaration line or stands on the line just above it."""
    import inspect
    import re

    doc = cls.__doc__ or ""
    lines = inspect.getsource(cls).splitlines()
    missing = []
    for f in dataclasses.fields(cls):
        if re.search(rf"\b{re.escape(f.name)}\b", doc):
            continue
        i = next((k for k, line in enumerate(lines) if re.match(rf"\s+{re.escape(f.name)}\s*:", line)), None)
        if i is None or not ("#" in lines[i] or (i > 0 and lines[i - 1].strip().startswith("#"))):
            missing.append(f.name)
    return missing


def config_dict(cfg) -> dict:
    """The JSON form of a Config (`dataclasses.asdict`, tuples as lists): what summary.json and config.json
    store and what `config_hash` hashes."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def check_overrides(cfg, overrides: dict, name: str = "this experiment") -> dict:
    """Overrides checked against the field types of `cfg`'s dataclass and converted (lists to tuples, an
    integer to a float for a float field). Raises ValueError naming the key, the expected type and an example
    for an unknown key or a value of the wrong type (a bool is not a number; a list field needs a list)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown config keys for {name}: {sorted(unknown)}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(type(cfg))
    out = {}
    for key, value in overrides.items():
        if _non_finite(value):
            example = json.dumps(getattr(cfg, key), separators=(",", ":"))
            raise ValueError(f"config key {key!r} must hold finite numbers, got {value!r} (NaN and infinity are "
                             f"refused); for example --set {key}={example}")
        try:
            out[key] = _convert(value, hints[key])
        except TypeError:
            default = getattr(cfg, key)
            example = default if isinstance(default, str) else json.dumps(default, separators=(",", ":"))
            raise ValueError(f"config key {key!r} expects {_describe(hints[key])}, got {value!r}; for example "
                             f"--set {key}={example}") from None
    return out


def _convert(value, tp):
    """`value` as type `tp` (int, float, bool, str, X | None, tuple[X, ...], dict[str, X]); TypeError if not."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(value, arg)
                except TypeError:
                    pass
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(_convert(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise TypeError
        return {k: _convert(v, args[1]) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, bool, str) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise TypeError


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of ({_describe(args[0])})"
    if origin is dict:
        return f"a mapping from strings to ({_describe(args[1])})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


COUNT_FIELDS = ("seeds", "workers")    # contract-level: where a Config has them, integers >= 1


def _non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def check_config(name: str, cfg, registry: dict[str, str] | None = None) -> None:
    """Every check of a Config that can be made before anything runs or is written: numbers are finite,
    `seeds` / `workers` are integers >= 1, then the experiment's own `validate_config(cfg)` if it has one.
    Raises ValueError naming the field and the fix."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _non_finite(value):
            raise ValueError(f"config key {f.name!r} of {name} must hold finite numbers, got {value!r}; "
                             f"for example --set {f.name}={json.dumps(getattr(type(cfg)(), f.name))}")
        if f.name in COUNT_FIELDS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"config key {f.name!r} of {name} must be an integer >= 1, got {value!r}; for example "
                             f"--set {f.name}=3")
    own = getattr(get_experiment(name, registry), "validate_config", None)
    if own is not None:
        own(cfg)


def run_experiment(name: str, out: str | Path, quick: bool = False, fmt: str = "parquet",
                   overwrite: bool = False, registry: dict[str, str] | None = None, single_thread: bool = True,
                   **overrides) -> dict:
    """Run one experiment into `out/name/`; returns the summary dict.

    Order of events: the whole config is built and validated (types, finiteness, the experiment's own
    `validate_config`) and `out` is checked to be a writable folder path before anything is written; then the
    folder is locked and claimed (`rto_sim.results.claimed_folder`: refused if another run holds it or if it
    holds results of another config; `overwrite` deletes the old results before the new config.json is
    written); a run that fails before producing any result leaves nothing behind.

    `registry` maps names to modules (default `EXPERIMENTS`; `rto_llm.experiments` passes its own);
    `single_thread` limits numpy/scipy BLAS to one thread (the simulator's many tiny fits; the LLM
    experiments leave torch its threads)."""
    # imported here so that the registry (and `rto-sim --help`) does not load pandas
    from ..results import (
        atomic_write_json,
        check_writable,
        claimed_folder,
        config_hash,
        single_thread_blas,
        write_table,
    )

    if fmt not in ("parquet", "csv"):
        raise ValueError(f"format must be 'parquet' or 'csv', got {fmt!r}")
    mod = get_experiment(name, registry)
    cfg = make_config(name, quick, registry, **overrides)
    check_config(name, cfg, registry)
    cfg_json = config_dict(cfg)
    folder = Path(out) / name
    check_writable(folder)
    with claimed_folder(folder, cfg_json, overwrite=overwrite):
        t0 = time.perf_counter()
        with single_thread_blas() if single_thread else contextlib.nullcontext():
            table = mod.run(cfg, folder)
            checks = mod.checks(table, cfg)
        wall = time.perf_counter() - t0
        table = table.assign(experiment=name, config_hash=config_hash(cfg_json))
        write_table(table, folder / "results", fmt)
        summary = {"experiment": name, "quick": quick, "config_hash": config_hash(cfg_json), "wall_time_s": wall,
                   "config": cfg_json, "checks": {k: c.to_dict() for k, c in checks.items()},
                   "all_pass": all(c.verdict == "pass" for c in checks.values())}
        atomic_write_json(folder / "summary.json", summary)
    return summary
