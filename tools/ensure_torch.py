"""Install step of `make`: never replace an installed torch; otherwise install the default pin.

    python tools/ensure_torch.py CONSTRAINTS_OUT

* A torch already in the environment (a GPU user's CUDA build, or any other version) is kept: its
  version is written to CONSTRAINTS_OUT as `torch==X`, so the project install that follows
  (`pip install -c CONSTRAINTS_OUT -e .[...]`) cannot replace it, also after a `git pull` that touches
  pyproject.toml and re-runs the install.
* With no torch, the default version pinned in `constraints.txt` is installed. The environment variable
  TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) selects the index: on a machine that reaches
  only the public PyPI, `torch==X` from PyPI is a CUDA build with several GB of CUDA wheels.

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_pin(constraints: Path = ROOT / "constraints.txt") -> str:
    """The torch version pinned in constraints.txt (`torch==X`)."""
    for line in constraints.read_text().splitlines():
        m = re.fullmatch(r"\s*torch\s*==\s*([^\s#]+)\s*(#.*)?", line)
        if m:
            return m.group(1)
    raise SystemExit(f"{constraints}: no 'torch==X' line; add the default torch version there")


def installed_torch() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(installed: str | None, default: str) -> tuple[str, bool]:
    """(version to pin, whether to install it). An installed torch always wins; a local version label
    such as `+cu128` is dropped from the pin (PEP 440: `==2.7.1` matches `2.7.1+cu128`)."""
    if installed:
        return installed.split("+", 1)[0], False
    return default, True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/ensure_torch.py CONSTRAINTS_OUT", file=sys.stderr)
        return 2
    installed = installed_torch()
    version, install = plan(installed, default_pin())
    if install:
        cmd = [sys.executable, "-m", "pip", "install", "-q", f"torch=={version}"]
        if os.environ.get("TORCH_INDEX"):
            cmd += ["--index-url", os.environ["TORCH_INDEX"]]
        print(f"installing torch=={version}" + (f" from {os.environ['TORCH_INDEX']}" if "--index-url" in cmd else ""))
        subprocess.run(cmd, check=True)
    else:
        print(f"keeping the installed torch {installed} (not replaced by the default pin)")
    Path(argv[0]).write_text(f"torch=={version}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
