"""Results on disk: atomic writes, tidy tables and prediction summaries.

Every experiment writes `OUT/<name>/results.{parquet,csv}` (tidy: one row per measurement),
`OUT/<name>/summary.json` ({"checks": {id: Check}}) and `OUT/<name>/config.json`. Files are written to
a temporary name and renamed, so an interrupted run never leaves a half-written file. A folder written
by a different config is refused rather than overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from threadpoolctl import threadpool_limits


def single_thread_blas():
    """Context manager: numpy/scipy BLAS (and OpenMP) pools limited to one thread. The experiments run
    thousands of tiny L-BFGS fits, for which a threaded BLAS on a small shared machine was measured ~10x
    slower (up to 80x under load); parallelism comes from the sweep's worker processes instead."""
    return threadpool_limits(limits=1)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def _clean(o):
    """NaN/inf are not JSON: store them as strings so the file stays valid JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(_clean(obj), indent=2, sort_keys=False, default=_json_default).encode())


def write_table(df: pd.DataFrame, path_stem: str | os.PathLike, fmt: str = "parquet") -> Path:
    """Write a tidy table atomically as `<stem>.parquet` or `<stem>.csv`."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"format must be 'parquet' or 'csv', got {fmt!r}")
    path = Path(f"{path_stem}.{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False) if fmt == "parquet" else df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_table(path_stem: str | os.PathLike) -> pd.DataFrame:
    for fmt in ("parquet", "csv"):
        p = Path(f"{path_stem}.{fmt}")
        if p.exists():
            return pd.read_parquet(p) if fmt == "parquet" else pd.read_csv(p)
    raise FileNotFoundError(f"no results table at {path_stem}.parquet or .csv")


def config_hash(config: dict) -> str:
    """Stable short hash of a JSON-able config (keys sorted)."""
    blob = json.dumps(config, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


CHECK_KINDS = ("identity", "prediction")
VERDICTS = ("pass", "fail", "inconclusive")


@dataclass
class Check:
    """One prediction or identity: what theory/paper says, what we measured, and the verdict.

    verdict: "pass" (within tolerance), "fail" (measured disagrees) or "inconclusive" (not enough data
    to decide); `note` says how it was measured and anything a reader must know."""

    quantity: str
    predicted: Any
    measured: Any
    tolerance: Any
    verdict: str
    note: str = ""
    kind: str = "prediction"    # "identity": holds by mathematics or by construction (a failure is a bug);
    #                             "prediction": an empirical claim that could come out either way
    paper: str = ""             # the paper's own statement where the paper makes the claim; "" = our prediction

    def __post_init__(self):
        if self.kind not in CHECK_KINDS:
            raise ValueError(f"Check.kind must be one of {CHECK_KINDS}, got {self.kind!r}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"Check.verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def claim_folder(folder: Path, config: dict, overwrite: bool = False) -> None:
    """Make `folder` the home of results for `config`. Refuses a folder holding another config's results
    (nothing is overwritten) unless `overwrite`."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "config.json"
    h = config_hash(config)
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("config_hash") != h and not overwrite:
            raise ValueError(f"{folder} holds results of another config (hash {old.get('config_hash')}, this run "
                             f"{h}); choose another --out folder or pass --overwrite to replace them")
    atomic_write_json(cfg_path, {"config_hash": h, "config": config})
