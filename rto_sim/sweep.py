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
  cells; the resumed table equals an uninterrupted one row for row. `folder/sweep.json` records the
  grid; a folder written by another grid is refused (nothing is overwritten). The claim is made under
  the folder's lock (`rto_sim.results.FolderLock`, held only for the claim, so shards of one grid may
  run side by side); the temporary files of a killed run are deleted at the next start.
* A cell file that cannot be read back (truncated, 0 bytes, not parquet, another cell's rows) is
  recomputed, with a warning naming it.
* Pool workers die with the sweep's process (Linux: PR_SET_PDEATHSIG; elsewhere a watchdog thread):
  killing a sweep leaves no orphan workers.
* The result is tidy: one row per (cell, metric[, labels]) with every cell field, `rng_seed`,
  `cell_hash` and the cell's `wall_time_s`.

Backends: "process" (concurrent.futures, workers with one BLAS thread each, default),
"serial" (in-process, for debugging and tests),
"ray" (optional; `pip install rto-toolkit[ray]`; uses an existing `ray.init()` or starts a local one).
A YAML grid file has the keys `axes` and `fixed` (`SweepGrid.from_yaml`).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .results import (
    FolderLock,
    ResultsFolderError,
    atomic_write_json,
    check_writable,
    clean_stale_tmp,
    config_hash,
    pid_alive,
    read_table_file,
    write_table,
)

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
        """A grid from a YAML file (a path, or a one-line string ending in .yaml / .yml) or from YAML text.
        A missing file, a YAML syntax error or a wrong layout raises ValueError naming the file (and the line)."""
        text = str(path_or_text)
        is_path = isinstance(path_or_text, os.PathLike) or ("\n" not in text and Path(text).suffix in (".yaml", ".yml"))
        if is_path:
            p = Path(path_or_text)
            where = f"sweep grid file {p}"
            try:
                text = p.read_text()
            except FileNotFoundError:
                raise ValueError(f"{where} does not exist: check the path") from None
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{where} cannot be read ({e}): pass a readable UTF-8 YAML file") from None
        else:
            where = "sweep grid YAML"
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ValueError(f"{where}: YAML syntax error{at}: {problem}; fix the file (a mapping with keys "
                             "'axes' and 'fixed')") from None
        if not isinstance(obj, dict) or "axes" not in obj:
            raise ValueError(f"{where} needs a mapping with keys 'axes' (and optionally 'fixed'), got "
                             f"{type(obj).__name__}")
        unknown = sorted(str(k) for k in obj if k not in ("axes", "fixed"))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}: only 'axes' and 'fixed' are read")
        fixed = obj.get("fixed") or {}
        if not isinstance(fixed, dict):
            raise ValueError(f"{where}: 'fixed' must be a mapping name -> value, got {fixed!r}")
        return cls(axes=obj["axes"], fixed=fixed)

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
    """Claim `folder` for this grid and cell function (under the folder's lock, which is held only for the
    claim: several shards may run in one folder) and delete the temporary files of killed runs."""
    meta = {"grid_hash": config_hash(grid.to_dict()), "cell_fn": f"{fn.__module__}.{fn.__qualname__}",
            "grid": grid.to_dict()}
    path = folder / "sweep.json"
    with FolderLock(folder, wait=60.0):
        removed = clean_stale_tmp(folder)
        if removed:
            print(f"sweep {folder}: removed {len(removed)} temporary file(s) of a killed run", file=sys.stderr)
        if path.exists():
            try:
                old = json.loads(path.read_text())
                if not isinstance(old, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as e:
                raise ResultsFolderError(f"{path} is unreadable ({' '.join(str(e).split())[:120]}): delete it if the "
                                         f"cells in {folder / 'cells'} belong to this grid (they are kept and "
                                         "reused), or choose another results folder") from None
            if old.get("grid_hash") != meta["grid_hash"] or old.get("cell_fn") != meta["cell_fn"]:
                raise ResultsFolderError(
                    f"{folder} holds a sweep of another config (grid hash {old.get('grid_hash')}, cell function "
                    f"{old.get('cell_fn')}); this sweep has grid hash {meta['grid_hash']}: choose another results "
                    "folder (nothing was overwritten)")
        else:
            atomic_write_json(path, meta)
        (folder / "cells").mkdir(exist_ok=True)
    return folder / "cells"


def _read_cell(path: Path, key: str) -> pd.DataFrame:
    """One finished cell's table; ResultsFolderError if the file is unreadable or not this cell's."""
    df = read_table_file(path)
    if "cell_hash" not in df.columns or (len(df) and set(df["cell_hash"]) != {key}):
        raise ResultsFolderError(f"results file {path} does not hold cell {key} (no cell_hash column, or rows of "
                                 "another cell): delete it and rerun the sweep")
    return df


def _finished_cells(cells_dir: Path, keys: list[str]) -> dict[str, pd.DataFrame]:
    """The readable finished cells among `keys`; an unreadable file (truncated, empty, not parquet, another
    cell's) is reported with a warning naming it and left to be recomputed."""
    out = {}
    for key in dict.fromkeys(keys):
        p = cells_dir / f"{key}.parquet"
        if not p.exists():
            continue
        try:
            out[key] = _read_cell(p, key)
        except ResultsFolderError as e:
            warnings.warn(f"sweep: cell file {p} is unreadable and will be recomputed ({e})", RuntimeWarning,
                          stacklevel=3)
    return out


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
    check_writable(folder)
    cells_dir = _claim(Path(folder), grid, cell_fn)
    finished = _finished_cells(cells_dir, [cell_key(c) for c in all_cells])
    done = set(finished)
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
                                                            initializer=_worker_init,
                                                            initargs=(os.getpid(),)) as ex:
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
    return collect(folder, grid, _finished=finished)


THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _worker_init(parent_pid: int | None = None) -> None:
    """One BLAS / torch thread per worker: several workers on few cores with threaded BLAS inside small
    L-BFGS problems spin, measured ~80x slower on a loaded 2-core machine. And the worker dies with the
    sweep's process (`_die_with_parent`): a killed sweep leaves no orphan workers."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    threadpool_limits(limits=1)     # process-wide for this worker (forked workers inherit loaded BLAS pools)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when process `parent_pid` dies: on Linux the kernel sends it SIGKILL
    (prctl PR_SET_PDEATHSIG); elsewhere (or when the worker's parent is not `parent_pid`, e.g. a forkserver)
    a daemon thread polls the parent every 0.5 s."""
    if sys.platform.startswith("linux") and os.getppid() == parent_pid:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:      # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch():
        while pid_alive(parent_pid):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="rto-sim-parent-watchdog", daemon=True).start()


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


def collect(folder: str | os.PathLike, grid: SweepGrid, _finished: dict | None = None) -> pd.DataFrame:
    """The tidy table of the finished cells of `grid` in `folder` (grid order). An unreadable cell file
    raises ValueError naming it (`run_sweep` recomputes such cells instead)."""
    cells_dir = Path(folder) / "cells"
    frames = []
    for c in grid.cells():
        key = cell_key(c)
        if _finished is not None and key in _finished:
            frames.append(_finished[key])
            continue
        p = cells_dir / f"{key}.parquet"
        if p.exists():
            frames.append(_read_cell(p, key))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
