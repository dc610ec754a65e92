"""User errors of the command lines (`rto-sim`, `python -m paper_figures`): one line on stderr, exit code 2.

A *user error* is a mistake in what the user gave or in the environment they pointed us at: a ValueError
raised by a `raise` statement of this project's own validation (a bad `--set` value, a folder of another
config, a corrupt results file), a missing or unwritable file or folder, a full disk. Those are reported as
ONE line naming the field or file and the fix. Anything else (a TypeError, a KeyError, a ValueError raised
by a builtin or inside numpy or pandas, such as int(nan)) is an internal bug and keeps its traceback.
Light module: no numpy/pandas import.
"""

from __future__ import annotations

import argparse
import errno
import linecache
import re
import sys
from pathlib import Path

EXIT_USER_ERROR = 2

# the folders whose ValueErrors are deliberate messages (validation) rather than library failures
_OWN_CODE = tuple(str(Path(__file__).resolve().parent.parent / pkg) for pkg in ("rto_sim", "rto_llm", "paper_figures"))

# errno -> the fix to suggest; an OSError with another errno is treated as an internal problem (traceback)
_OS_FIXES = {
    errno.ENOSPC: "free disk space or choose another --out folder, then rerun the same command (finished "
                  "work is kept)",
    errno.EDQUOT: "free disk quota or choose another --out folder, then rerun the same command",
    errno.EACCES: "choose a folder you can write to (or fix its permissions)",
    errno.EPERM: "choose a folder you can write to (or fix its permissions)",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.ENOTDIR: "choose a folder path (a part of this path is a file)",
    errno.EISDIR: "this path is a folder where a file is expected: choose another path",
    errno.EEXIST: "a file of that name is in the way: choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ELOOP: "the path has a symbolic-link loop: choose another path",
    errno.EFBIG: "the file is too large for this file system: choose another folder",
}


class ResultsFolderError(ValueError):
    """A results folder or file that cannot be used as it is (busy, another config, unreadable file)."""


def _raise_site(exc: BaseException) -> tuple[str | None, str]:
    """(source file, source line) where `exc` was raised; for an exception re-raised from a worker process,
    the worker's innermost frame, read from its remote traceback text."""
    cause = exc.__cause__
    if cause is not None and type(cause).__name__ == "_RemoteTraceback":
        frames = re.findall(r'File "([^"]+)", line \d+, in [^\n]*\n([^\n]*)', str(cause))
        return frames[-1] if frames else (None, "")
    tb, last = exc.__traceback__, None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return None, ""
    name = last.tb_frame.f_code.co_filename
    return name, linecache.getline(name, last.tb_lineno)


def _deliberate(exc: BaseException) -> bool:
    """A ValueError raised by a `raise` statement of this project (a validation message), not by a builtin
    or a library call (int(nan), a numpy broadcast, a pandas parser: internal bugs)."""
    where, line = _raise_site(exc)
    if where is None:
        return True
    return str(Path(where).resolve()).startswith(_OWN_CODE) and line.lstrip().startswith("raise")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None for an internal bug (show the traceback)."""
    if isinstance(exc, ResultsFolderError):
        return _one_line(exc)
    if isinstance(exc, ValueError):
        return _one_line(exc) if _deliberate(exc) else None
    if isinstance(exc, OSError) and exc.errno in _OS_FIXES:
        what = exc.strerror or type(exc).__name__
        name = f"{exc.filename}: " if exc.filename else ""
        return _one_line(f"{name}{what.lower() if what[:1].isupper() else what}; {_OS_FIXES[exc.errno]}")
    try:
        import yaml
    except ImportError:  # pragma: no cover - yaml is a dependency
        return None
    if isinstance(exc, yaml.YAMLError):
        return _one_line(f"YAML error: {exc}; fix the file")
    return None


def report_user_error(prog: str, exc: BaseException) -> int | None:
    """Print the one-line message of a user error to stderr and return the exit code 2; None for a bug."""
    msg = user_error_message(exc)
    if msg is None:
        return None
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return EXIT_USER_ERROR


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (`prog: error: ...; see prog --help`), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {_one_line(message)}; see {self.prog} --help\n")
