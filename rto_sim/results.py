"""Results on disk: atomic writes, tidy tables and prediction summaries.

Long because every write the simulator makes goes through it (atomic files, folder locks and claims, tidy tables,
summaries), so that crash safety has one implementation.

Every experiment writes `OUT/<name>/results.{parquet,csv}` (tidy: one row per measurement),
`OUT/<name>/summary.json` ({"checks": {id: Check}}) and `OUT/<name>/config.json`. Files are written to
a temporary name (`.<name>.<pid>.<random>.tmp`) and renamed, so an interrupted run never leaves a
half-written file; the temporary files of a killed run are deleted at the next start (`clean_stale_tmp`).

A run owns its folder through `claimed_folder`: an exclusive lock file `.lock` (pid inside, taken over
with a message when its pid is dead), then the claim (`claim_folder`): a folder holding results of a
different config is refused rather than overwritten; `overwrite=True` deletes the old results before it
writes the new config.json, so config.json and the results never disagree, even after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from threadpoolctl import threadpool_limits

from .errors import ResultsFolderError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid file alone
    fcntl = None



def single_thread_blas():
    """Context manager: numpy/scipy BLAS (and OpenMP) pools limited to one thread. The experiments run
    thousands of tiny L-BFGS fits, for which a threaded BLAS on a small shared machine was measured ~10x
    slower (up to 80x under load); parallelism comes from the sweep's worker processes instead."""
    return threadpool_limits(limits=1)


def _tmp_prefix(path: Path) -> str:
    """Temporary files are named `.<name>.<pid>.<random>.tmp` next to their target: the pid says whether the
    writer is still alive (`clean_stale_tmp`)."""
    return f".{path.name}.{os.getpid()}."


def _with_filename(e: OSError, path: Path) -> OSError:
    """`e` with the file name set (an ENOSPC raised by write() names no file)."""
    if e.filename is None and e.errno is not None:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    return e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        new = _with_filename(e, path)
        if new is e:
            raise
        raise new from e
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False) if fmt == "parquet" else df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except OSError as e:
        new = _with_filename(e, path)
        if new is e:
            raise
        raise new from e
    finally:
        _unlink_quietly(tmp)
    return path


def read_table_file(path: str | os.PathLike) -> pd.DataFrame:
    """Read one `.parquet` or `.csv` table; a file that cannot be parsed (truncated, empty, not a table)
    raises `ResultsFolderError` naming it. OS errors (missing file, permissions) pass through."""
    path = Path(path)
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except OSError as e:
        if e.errno is not None:
            raise
        problem = e
    except Exception as e:          # pyarrow.ArrowInvalid, pandas.errors.*, UnicodeDecodeError, ...
        problem = e
    first = " ".join(str(problem).split())[:160] or type(problem).__name__
    raise ResultsFolderError(f"results file {path} is unreadable ({first}): it is corrupt or truncated; delete "
                             "it and rerun the experiment (or the sweep) that wrote it") from problem


def read_table(path_stem: str | os.PathLike) -> pd.DataFrame:
    for fmt in ("parquet", "csv"):
        p = Path(f"{path_stem}.{fmt}")
        if p.exists():
            return read_table_file(p)
    raise FileNotFoundError(errno.ENOENT, "no results table (.parquet or .csv): run the experiment first",
                            f"{path_stem}.parquet")


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


# ---------------------------------------------------------------------- folder claims
LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
_TMP_RE = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]{8}\.tmp$")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running on this machine (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _open_paths() -> set[str] | None:
    """Every file held open by a process on this machine (Linux /proc), or None where unknown."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    held = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                held.add(os.readlink(f"/proc/{d}/fd/{fd}"))
            except OSError:
                pass
    return held


def clean_stale_tmp(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporary files (`.*.tmp`) that a killed run left in `folder`; returns them. A file is
    kept while its writer is alive: the writer's pid is in the name (`_tmp_prefix`); for a name without a
    pid, while some process holds it open (Linux) or for an hour (elsewhere)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed, held = [], None
    for p in files:
        if not p.is_file():
            continue
        m = _TMP_RE.match(p.name)
        if m:
            stale = not pid_alive(int(m.group(1)))
        else:
            if held is None:
                held = _open_paths()
            stale = (str(p.resolve()) not in held) if held is not None else (time.time() - p.stat().st_mtime > 3600)
        if stale:
            _unlink_quietly(p)
            removed.append(p)
    return removed


class FolderLock:
    """Exclusive claim of a results folder: `folder/.lock` holds the owner's pid while it works.

    The file is created with O_CREAT | O_EXCL semantics (a hard link of a complete pid file, so a reader never
    sees it empty) and, where the OS has it, also held under `flock`, which the kernel releases when the
    owner dies. A lock whose pid is dead (and not flock-held) is stale: it is taken over with a message on
    stderr. A lock of a live process is refused (`ResultsFolderError`), or waited for up to `wait` seconds.
    Use as a context manager; `release()` deletes the file."""

    def __init__(self, folder: str | os.PathLike, wait: float = 0.0):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _holder(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def _try_once(self) -> int | None:
        """Take the lock; returns None on success, else the pid of the live holder (0 if unknown)."""
        with _dir_guard(self.folder):       # serializes check-and-take between claimants (microseconds)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=_tmp_prefix(self.path), suffix=".tmp")
            try:
                try:
                    os.write(fd, f"{os.getpid()}\n".encode())
                    os.fsync(fd)
                except OSError as e:
                    os.close(fd)
                    raise _with_filename(e, self.path) from e
                os.close(fd)
                try:
                    _exclusive_create(tmp, self.path)   # a complete pid file, created only if none exists
                except FileExistsError:
                    pid = self._holder()
                    if (pid is not None and pid_alive(pid)) or self._flock_held():
                        return pid or 0
                    if pid is None and self._young():
                        return 0                        # being written by a claimant of another kind
                    os.replace(tmp, self.path)          # stale: its owner is dead; take it over
                    owner = f"pid {pid} is not running" if pid else "it has no live owner"
                    print(f"rto-sim: taking over the stale lock {self.path} ({owner})", file=sys.stderr)
            finally:
                _unlink_quietly(tmp)
            self._fd = os.open(self.path, os.O_RDWR)
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # released by the kernel if we die
                except BlockingIOError:
                    os.close(self._fd)
                    self._fd = None
                    return self._holder() or 0
                except OSError:
                    pass                                # no flock on this file system: the pid file alone
            return None

    def _flock_held(self) -> bool:
        if fcntl is None:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _young(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < 5
        except OSError:
            return False

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        while True:
            pid = self._try_once()
            if pid is None:
                return self
            if time.monotonic() >= deadline:
                who = f"pid {pid}" if pid else "another process"
                raise ResultsFolderError(
                    f"{self.folder} is in use by another run ({who}): wait for it to finish or choose another "
                    f"folder; if no run is using it, delete {self.path}")
            time.sleep(0.1)

    def release(self) -> None:
        if self._fd is None:
            return
        if self._holder() == os.getpid():
            _unlink_quietly(self.path)
        os.close(self._fd)
        self._fd = None


def _exclusive_create(src: Path | str, dst: Path) -> None:
    """Create `dst` with the content of `src` only if `dst` does not exist (FileExistsError otherwise): a hard
    link, atomic and never seen half-written; O_CREAT | O_EXCL where the file system has no hard links."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
            raise
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, Path(src).read_bytes())
        finally:
            os.close(fd)


@contextlib.contextmanager
def _dir_guard(folder: Path):
    """A short exclusive flock on the folder itself (no-op where flock does not exist)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass                                # no flock here: claimants are not serialized, the pid file remains
        yield
    finally:
        os.close(fd)


def _result_entries(folder: Path) -> list[Path]:
    """What in `folder` are results: everything but config.json, the lock and temporary files."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name not in (CONFIG_NAME, LOCK_NAME) and not _is_tmp(p.name))


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        _unlink_quietly(p)


def _read_config_hash(cfg_path: Path) -> tuple[str | None, str | None]:
    """(hash recorded in config.json or None, problem if the file is unreadable)."""
    if not cfg_path.exists():
        return None, None
    try:
        old = json.loads(cfg_path.read_text())
        if not isinstance(old, dict) or not isinstance(old.get("config_hash"), str):
            return None, "no config_hash in it"
        return old["config_hash"], None
    except (ValueError, UnicodeDecodeError) as e:
        return None, " ".join(str(e).split())[:120]


def claim_folder(folder: Path, config: dict, overwrite: bool = False) -> None:
    """Make `folder` the home of results for `config`; the caller holds the folder's `FolderLock`
    (`claimed_folder` does both).

    * same config (hash in config.json): nothing changes, the run resumes (finished sweep cells are reused);
    * a folder holding results of another config (or of an unknown one: no or unreadable config.json) is
      refused, nothing is touched; with `overwrite` the old results are deleted FIRST and config.json is
      replaced last, so a crash at any point leaves either the old config with (part of) its own results or
      the new config with no old results: config.json and the results never disagree;
    * a config.json with no results beside it (e.g. of a run that crashed before producing anything) is
      simply replaced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / CONFIG_NAME
    h = config_hash(config)
    old_hash, problem = _read_config_hash(cfg_path)
    if old_hash == h:
        return
    results = _result_entries(folder)
    if results and not overwrite:
        names = ", ".join(p.name for p in results[:4]) + (", ..." if len(results) > 4 else "")
        if problem is not None:
            why = f"its {cfg_path} is unreadable ({problem})"
        elif old_hash is None:
            why = f"it has no {CONFIG_NAME}"
        else:
            why = f"they are results of another config (hash {old_hash}, this run {h})"
        raise ResultsFolderError(f"{folder} holds results ({names}) and {why}; choose another --out folder or pass "
                                 "--overwrite to replace them (nothing was changed)")
    for p in results:               # overwrite: the old results go first, config.json last
        _remove(p)
    atomic_write_json(cfg_path, {"config_hash": h, "config": config})


@contextlib.contextmanager
def claimed_folder(folder: str | os.PathLike, config: dict, overwrite: bool = False):
    """Lock `folder`, claim it for `config` (`claim_folder`) and clean the temporary files of killed runs;
    yields the folder. If the body fails before any result exists, what the claim created is removed again
    (config.json, the lock, the folders it made), so a failed run leaves nothing behind; partial results
    (finished sweep cells) are kept for the resume."""
    folder = Path(folder)
    top = _first_missing(folder)
    try:
        lock = FolderLock(folder).acquire()
    except BaseException:
        _remove_empty_dirs(folder, top)
        raise
    try:
        clean_stale_tmp(folder)
        claim_folder(folder, config, overwrite)
        yield folder
    except BaseException:
        if not _result_entries(folder):
            _unlink_quietly(folder / CONFIG_NAME)
            lock.release()
            _remove_empty_dirs(folder, top)
        raise
    finally:
        lock.release()


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (None if it exists)."""
    folder = folder.absolute()
    top = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        top = p
    return top


def _remove_empty_dirs(folder: Path, top: Path | None) -> None:
    """Remove `folder` and its parents up to `top` (the first folder this run created) while empty."""
    if top is None:
        return
    p = folder.absolute()
    while True:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return
        p = p.parent


def check_writable(path: str | os.PathLike) -> None:
    """Raise a clear error now, before a long run, if `path` cannot become a results folder: it is a file, or
    the nearest existing folder above it cannot be written."""
    path = Path(path)
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise OSError(errno.ENOTDIR, "is a file, not a folder", str(p))
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "folder is not writable", str(p))


def verdict_label(check: dict, quick: bool) -> str:
    """How a verdict is printed (CLI, REPORT.md): a verdict of the reduced grid (`--quick`) is labelled
    "pass (quick grid)", never shown as a confirmation of the full claim."""
    return f"{check['verdict']} (quick grid)" if quick else check["verdict"]

