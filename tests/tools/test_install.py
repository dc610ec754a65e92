"""The install step never replaces an installed torch (tools/ensure_torch.py, called by `make`)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ensure_torch", ROOT / "tools" / "ensure_torch.py")
ensure_torch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ensure_torch)


def test_an_installed_torch_is_kept_and_pinned_without_its_local_label():
    assert ensure_torch.plan("2.5.1+cu121", "2.13.0") == ("2.5.1", False)
    assert ensure_torch.plan("2.13.0", "2.13.0") == ("2.13.0", False)


def test_no_torch_installs_the_default_pin():
    assert ensure_torch.plan(None, "2.13.0") == ("2.13.0", True)


def test_default_pin_is_read_from_constraints(tmp_path):
    assert ensure_torch.default_pin() == "2.13.0"
    bad = tmp_path / "c.txt"
    bad.write_text("numpy==2.0\n")
    with pytest.raises(SystemExit, match="no 'torch==X' line"):
        ensure_torch.default_pin(bad)


def test_makefile_installs_through_the_pin_not_the_raw_constraints():
    make = (ROOT / "Makefile").read_text()
    assert "tools/ensure_torch.py" in make
    assert "-c constraints.txt" not in make      # the old pin replaced a GPU user's torch on every re-install
