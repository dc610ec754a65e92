"""Declarative, resumable parameter sweeps over local cores (or a Ray cluster).

    grid = SweepGrid(axes={"H": [2, 3], "reward_class": ["unigram"], "N": [500, 2000], "seed": range(20)},
                     fixed={"A": 3})
    table = run_sweep(cell_fn, grid, folder, workers=2)

* A *cell* is one point of the cartesian product of `axes`, merged with `fixed` (a flat JSON-able dict).
* `cell_fn(cell: dict, rng_seed: int) -> list[dict]` computes one cell; each row holds "metric" and
  "value" plus any labels (e.g. "learner"). It must be a top-level (picklable) function.
* The random seed of a cell is derived from the cell's config hash (`cell_seed`), never from worker
  order: the same grid gives the same numbers with 1 or 16 workers, serial or Ray.
* Every finished cell is written atomically to `folder/cells/<cell hash>.parquet` by the worker that
  computed it, so a killed sweep restarts where it stopped without losing or recomputing finished
  cells. `folder/sweep.json` records the grid; a folder written by another grid is refused (nothing
  is overwritten).
* The result is tidy: one row per (cell, metric[, labels]) with every cell field, `rng_seed`,
  `cell_hash` and the cell's `wall_time_s`.

Backends: "process" (concurrent.futures, workers with one BLAS thread each, default),
"serial" (in-process, for debugging and tests),
"ray" (optional; `pip install rto-toolkit[ray]`; uses an existing `ray.init()` or starts a local one).
A YAML grid file has the keys `axes` and `fixed` (`SweepGrid.from_yaml`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .results import atomic_write_json, config_hash, write_table

__all__ = ["SweepGrid", "run_sweep", "cell_seed", "cell_key", "BACKENDS"]

BACKENDS = ("process", "serial", "ray")


def _jsonable(v):
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, range):
        return list(v)
    if isinstance(v, tuple):
        return list(v)
    return v


@dataclass
class SweepGrid:
    """Cartesian grid: axes (name -> non-empty list of values, in order) and fixed (name -> value)."""

    axes: dict
    fixed: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.axes, dict) or not self.axes:
            raise ValueError("SweepGrid.axes must be a non-empty dict name -> list of values")
        axes = {}
        for k, v in self.axes.items():
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                raise ValueError(f"SweepGrid.axes[{k!r}] must be a list of values, got {v!r}; wrap a single "
                                 "value in a list or move it to `fixed`")
            v = [_jsonable(x) for x in v]
            if not v:
                raise ValueError(f"SweepGrid.axes[{k!r}] is empty: give at least one value")
            axes[str(k)] = v
        self.axes = axes
        self.fixed = {str(k): _jsonable(v) for k, v in dict(self.fixed).items()}
        both = set(self.axes) & set(self.fixed)
        if both:
            raise ValueError(f"keys {sorted(both)} are both axes and fixed: keep each in one place")
        try:
            json.dumps({"axes": self.axes, "fixed": self.fixed})
        except TypeError as e:
            raise ValueError(f"SweepGrid values must be JSON-able (numbers, strings, lists, dicts): {e}") from e

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> SweepGrid:
        p = Path(path_or_text)
        text = p.read_text() if p.suffix in (".yaml", ".yml") and p.exists() else str(path_or_text)
        obj = yaml.safe_load(text)
        if not isinstance(obj, dict) or "axes" not in obj:
            raise ValueError("a sweep YAML needs a mapping with keys 'axes' (and optionally 'fixed')")
        return cls(axes=obj["axes"], fixed=obj.get("fixed") or {})

    def to_dict(self) -> dict:
        return {"axes": self.axes, "fixed": self.fixed}

    def cells(self) -> list[dict]:
        keys = list(self.axes)
        return [{**self.fixed, **dict(zip(keys, vals))} for vals in itertools.product(*self.axes.values())]

    def __len__(self) -> int:
        n = 1
        for v in self.axes.values():
            n *= len(v)
        return n


def cell_key(cell: dict) -> str:
    """Stable hash of a cell's config (the file name of its results)."""
    return config_hash(cell)


def cell_seed(cell: dict) -> int:
    """Random seed of a cell, derived from its config only (62 bits)."""
    return int(cell_key(cell), 16) >> 2


def _flat(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def _run_cell(fn: Callable, cell: dict, cells_dir: str) -> tuple[str, int]:
    """Compute one cell and write its tidy table atomically (runs in the worker)."""
    key = cell_key(cell)
    seed = cell_seed(cell)
    t0 = time.perf_counter()
    rows = fn(dict(cell), seed)
    wall = time.perf_counter() - t0
    if not isinstance(rows, list) or any(not isinstance(r, dict) or "metric" not in r or "value" not in r
                                         for r in rows):
        raise ValueError(f"cell function {getattr(fn, '__name__', fn)} must return a list of dicts with keys "
                         "'metric' and 'value'")
    base = {k: _flat(v) for k, v in cell.items()}
    df = pd.DataFrame([{**base, **r} for r in rows])
    df["rng_seed"] = seed
    df["cell_hash"] = key
    df["wall_time_s"] = wall
    write_table(df, Path(cells_dir) / key, "parquet")
    return key, len(df)


def _claim(folder: Path, grid: SweepGrid, fn: Callable) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"grid_hash": config_hash(grid.to_dict()), "cell_fn": f"{fn.__module__}.{fn.__qualname__}",
            "grid": grid.to_dict()}
    path = folder / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("grid_hash") != meta["grid_hash"] or old.get("cell_fn") != meta["cell_fn"]:
            raise ValueError(f"{folder} holds a sweep of another config (grid hash {old.get('grid_hash')}, cell "
                             f"function {old.get('cell_fn')}); this sweep has grid hash {meta['grid_hash']}: "
                             "choose another results folder (nothing was overwritten)")
    else:
        atomic_write_json(path, meta)
    return folder / "cells"


def run_sweep(cell_fn: Callable, grid: SweepGrid, folder: str | os.PathLike, workers: int | None = None,
              backend: str = "process", progress: bool = True, validate: Callable[[dict], None] | None = None,
              cells: list[dict] | None = None, start_method: str | None = None,
              cost: Callable[[dict], float] | None = None) -> pd.DataFrame:
    """Run every cell of `grid` not already in `folder` and return the tidy table of ALL its cells.

    cell_fn(cell, rng_seed) -> rows (module doc); workers: processes (default os.cpu_count());
    backend: "process" | "serial" | "ray"; progress: tqdm bar; validate(cell) raises ValueError on a bad
    cell (called on every cell before anything runs or is written); cells: run only this subset of the
    grid's cells (e.g. to shard), the table still lists only finished cells of the grid; start_method:
    multiprocessing start method of the "process" backend (default "fork" where available: works from
    scripts without a __main__ guard; "spawn" needs one); cost: optional estimate of a cell's run time:
    cells are then started longest first, which shortens the tail of a parallel sweep (the numbers do not
    depend on the order: each cell's seed comes from its config)."""
    if not callable(cell_fn):
        raise ValueError("cell_fn must be a callable (cell, rng_seed) -> list of row dicts")
    if not isinstance(grid, SweepGrid):
        raise ValueError("grid must be a SweepGrid")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    all_cells = grid.cells()
    todo_cells = all_cells if cells is None else cells
    keys = {cell_key(c) for c in all_cells}
    if any(cell_key(c) not in keys for c in todo_cells):
        raise ValueError("cells: every cell must belong to the grid")
    if validate is not None:
        for c in all_cells:
            validate(c)
    cells_dir = _claim(Path(folder), grid, cell_fn)
    cells_dir.mkdir(exist_ok=True)
    done = {p.stem for p in cells_dir.glob("*.parquet")}
    todo, seen = [], set()
    for c in todo_cells:
        k = cell_key(c)
        if k not in done and k not in seen:
            todo.append(c)
            seen.add(k)
    if cost is not None:
        todo.sort(key=cost, reverse=True)
    bar = None
    if progress and todo:
        bar = tqdm(total=len(todo), desc=f"sweep {Path(folder).name}", unit="cell", leave=False)
    try:
        if not todo:
            pass
        elif backend == "serial":
            for c in todo:
                _run_cell(cell_fn, c, str(cells_dir))
                if bar is not None:
                    bar.update(1)
        elif backend == "process":
            method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with _single_thread_env(), ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method),
                                                            initializer=_worker_init) as ex:
                futs = [ex.submit(_run_cell, cell_fn, c, str(cells_dir)) for c in todo]
                try:
                    for f in as_completed(futs):
                        f.result()
                        if bar is not None:
                            bar.update(1)
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
        else:
            _run_ray(cell_fn, todo, str(cells_dir), workers, bar)
    finally:
        if bar is not None:
            bar.close()
    return collect(folder, grid)


THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _worker_init() -> None:
    """One BLAS / torch thread per worker: several workers on few cores with threaded BLAS inside small
    L-BFGS problems spin, measured ~80x slower on a loaded 2-core machine."""
    threadpool_limits(limits=1)     # process-wide for this worker (forked workers inherit loaded BLAS pools)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@contextlib.contextmanager
def _single_thread_env():
    """Spawned workers (fresh interpreters) start with one BLAS/OpenMP thread, unless the user set these
    variables (forked workers are limited by `_worker_init`)."""
    old = {k: os.environ.get(k) for k in THREAD_ENV}
    for k in THREAD_ENV:
        os.environ.setdefault(k, "1")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_ray(cell_fn, todo, cells_dir, workers, bar):
    try:
        import ray  # optional heavy package (pip install 'rto-toolkit[ray]'): imported only for this backend
    except ImportError as e:
        raise ValueError("backend='ray' needs the optional package ray: pip install 'rto-toolkit[ray]'") from e
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(_run_cell)
    pending = [remote.remote(cell_fn, c, cells_dir) for c in todo]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
        if bar is not None:
            bar.update(len(ready))


def collect(folder: str | os.PathLike, grid: SweepGrid) -> pd.DataFrame:
    """The tidy table of the finished cells of `grid` in `folder` (grid order)."""
    cells_dir = Path(folder) / "cells"
    frames = []
    for c in grid.cells():
        p = cells_dir / f"{cell_key(c)}.parquet"
        if p.exists():
            frames.append(pd.read_parquet(p))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
