"""Results folders (issue 12): the whole config is validated before anything is written, the folder is claimed
under an exclusive lock, `--overwrite` replaces config and results together or not at all (simulated crashes),
a failed run leaves nothing behind, stale temporary files and locks are cleaned up, and every user error of
`rto-sim` / `python -m paper_figures` is one line on stderr with exit code 2.

This module is also a tiny experiment (`Config`, `run`, `checks`, `validate_config`), registered as "EX" by the
`ex` fixture, so that the bookkeeping of `run_experiment` is tested in milliseconds."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rto_sim import results
from rto_sim.cli import main
from rto_sim.experiments import EXPERIMENTS, config_dict, make_config, run_experiment
from rto_sim.results import Check, FolderLock, ResultsFolderError, config_hash


# ---------------------------------------------------------------------- the test experiment "EX"
@dataclass(frozen=True)
class Config:
    """N: draws per seed; seeds: repetitions; sleep: seconds the run waits (races); sweep: run as a sweep."""

    N: int = 100
    seeds: int = 20
    sleep: float = 0.0
    sweep: bool = False

    @classmethod
    def quick(cls) -> Config:
        return replace(cls(), seeds=3)


def validate_config(cfg: Config) -> None:
    if cfg.N < 1:
        raise ValueError(f"N must be an integer >= 1, got {cfg.N}")


def ex_cell(cell, rng_seed):
    if os.environ.get("EX_CRASH_CELL") == str(cell["seed"]):
        raise RuntimeError("simulated crash in a cell")
    return [{"metric": "mean", "value": float(np.random.default_rng(rng_seed).random(cell["N"]).mean())}]


def run(cfg: Config, folder) -> pd.DataFrame:
    if os.environ.get("EX_CRASH") == "1":
        raise RuntimeError("simulated crash")
    time.sleep(cfg.sleep)
    if cfg.sweep:
        from rto_sim.sweep import SweepGrid, run_sweep
        return run_sweep(ex_cell, SweepGrid(axes={"seed": list(range(cfg.seeds))}, fixed={"N": cfg.N}),
                         Path(folder) / "sweep", backend="serial", progress=False)
    return pd.DataFrame([{"seed": s, "mean": float(np.random.default_rng(s).random(cfg.N).mean())}
                         for s in range(cfg.seeds)])


def checks(table: pd.DataFrame, cfg: Config) -> dict[str, Check]:
    return {"EX_rows": Check(quantity="rows", predicted=cfg.seeds, measured=len(table), tolerance=0,
                             verdict="pass" if len(table) == cfg.seeds else "fail")}


@pytest.fixture
def ex(monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, "EX", __name__)
    monkeypatch.delenv("EX_CRASH", raising=False)
    monkeypatch.delenv("EX_CRASH_CELL", raising=False)
    return "EX"


def _hash(**overrides) -> str:
    return config_hash(config_dict(make_config("EX", **overrides)))


def _state(folder: Path) -> dict:
    """config hash of config.json, summary.json and the results table (None where absent)."""
    def read(p, f):
        return f(p) if p.exists() else None
    return {"config": read(folder / "config.json", lambda p: json.loads(p.read_text())["config_hash"]),
            "summary": read(folder / "summary.json", lambda p: json.loads(p.read_text())["config_hash"]),
            "results": read(folder / "results.parquet", lambda p: set(pd.read_parquet(p).config_hash))}


def _consistent(folder: Path) -> bool:
    """config.json and every result beside it belong to one config."""
    s = _state(folder)
    return ((s["summary"] is None or s["summary"] == s["config"])
            and (s["results"] is None or s["results"] == {s["config"]}))


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------- validation before anything is written
def test_a_run_that_fails_validation_leaves_nothing(ex, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    for bad, match in [({"seeds": -1}, "'seeds' of EX must be an integer >= 1"),
                       ({"seeds": 0}, "'seeds' of EX must be an integer >= 1"),
                       ({"N": 0}, "N must be an integer >= 1"),                      # the module's own check
                       ({"sleep": float("nan")}, "'sleep' must hold finite numbers")]:
        with pytest.raises(ValueError, match=match):
            run_experiment(ex, out, **bad)
        assert not out.exists()
    with pytest.raises(ValueError, match="format"):
        run_experiment(ex, out, fmt="xlsx")
    assert not out.exists()
    line = _one_line_error(capsys, main(["experiment", ex, "--out", str(out), "--set", "seeds=-1"]))
    assert "seeds" in line and "--set seeds=" in line and not out.exists()
    # a run that fails after the claim, before producing anything, leaves nothing either
    monkeypatch.setenv("EX_CRASH", "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(ex, out)
    assert not out.exists()


def test_a_leftover_config_without_results_does_not_block(ex, tmp_path):
    folder = tmp_path / "EX"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "config": {"seeds": -1}}))
    summary = run_experiment(ex, tmp_path)
    assert summary["all_pass"] and _state(folder)["config"] == _hash() and _consistent(folder)


# ---------------------------------------------------------------------- --overwrite: all or nothing
def test_overwrite_replaces_config_and_results_together(ex, tmp_path, monkeypatch):
    folder = tmp_path / "EX"
    run_experiment(ex, tmp_path, seeds=20)
    assert _state(folder)["config"] == _hash(seeds=20) and _consistent(folder)
    with pytest.raises(ValueError, match="another config"):            # refused without --overwrite
        run_experiment(ex, tmp_path, seeds=2)
    assert _state(folder)["config"] == _hash(seeds=20) and _consistent(folder)
    # simulated crash of the overwriting run after the claim: the old results went with the old config (and the
    # new config.json, with no result beside it, is removed again)
    monkeypatch.setenv("EX_CRASH", "1")
    with pytest.raises(RuntimeError):
        run_experiment(ex, tmp_path, seeds=2, overwrite=True)
    assert _state(folder) == {"config": None, "summary": None, "results": None}
    monkeypatch.delenv("EX_CRASH")
    run_experiment(ex, tmp_path, seeds=20)                                # claims it back (no results there)
    # simulated crash in the middle of deleting the old results: config.json is replaced last
    real_remove, calls = results._remove, []

    def crash_after_one(p):
        if calls:
            raise OSError(errno.EIO, "simulated crash while deleting", str(p))
        calls.append(p)
        real_remove(p)
    monkeypatch.setattr(results, "_remove", crash_after_one)
    with pytest.raises(OSError):
        run_experiment(ex, tmp_path, seeds=2, overwrite=True)
    assert _state(folder)["config"] == _hash(seeds=20) and _consistent(folder)
    monkeypatch.setattr(results, "_remove", real_remove)
    summary = run_experiment(ex, tmp_path, seeds=2, overwrite=True)
    assert _state(folder) == {"config": _hash(seeds=2), "summary": _hash(seeds=2), "results": {_hash(seeds=2)}}
    assert summary["checks"]["EX_rows"]["measured"] == 2


def test_overwrite_replaces_an_old_sweep_and_a_crash_mid_sweep_resumes(ex, tmp_path, monkeypatch):
    folder = tmp_path / "EX"
    run_experiment(ex, tmp_path, seeds=4, sweep=True)
    monkeypatch.setenv("EX_CRASH_CELL", "3")
    with pytest.raises(RuntimeError, match="crash in a cell"):
        run_experiment(ex, tmp_path, seeds=5, sweep=True, overwrite=True)
    assert _state(folder)["config"] == _hash(seeds=5, sweep=True) and _consistent(folder)
    assert len(list((folder / "sweep" / "cells").glob("*.parquet"))) == 3          # finished cells kept
    monkeypatch.delenv("EX_CRASH_CELL")
    summary = run_experiment(ex, tmp_path, seeds=5, sweep=True)                      # resumes, no --overwrite
    assert summary["checks"]["EX_rows"]["measured"] == 5 and _consistent(folder)


def test_results_of_an_unknown_config_are_refused(ex, tmp_path):
    folder = tmp_path / "EX"
    run_experiment(ex, tmp_path)
    (folder / "config.json").write_text("{truncated")
    before = (folder / "summary.json").read_bytes()
    with pytest.raises(ValueError, match=r"config.json is unreadable.*--overwrite"):
        run_experiment(ex, tmp_path)
    assert (folder / "summary.json").read_bytes() == before
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        run_experiment(ex, tmp_path)
    run_experiment(ex, tmp_path, overwrite=True)
    assert _consistent(folder) and _state(folder)["config"] == _hash()


# ---------------------------------------------------------------------- the folder lock
def test_a_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(ex, tmp_path, capsys):
    folder = tmp_path / "EX"
    run_experiment(ex, tmp_path)
    before = _state(folder)
    with FolderLock(folder):
        with pytest.raises(ResultsFolderError, match=rf"in use by another run \(pid {os.getpid()}"):
            run_experiment(ex, tmp_path, seeds=2, overwrite=True)
        line = _one_line_error(capsys, main(["experiment", ex, "--out", str(tmp_path), "--overwrite"]))
        assert "in use" in line and ".lock" in line
    assert _state(folder) == before and not (folder / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(f"{dead.pid}\n")
    run_experiment(ex, tmp_path, seeds=2, overwrite=True)
    assert f"taking over the stale lock {folder / '.lock'} (pid {dead.pid}" in capsys.readouterr().err
    assert not (folder / ".lock").exists() and _state(folder)["config"] == _hash(seeds=2)
    (folder / ".lock").write_text(f"{os.getpid()}\n")                  # a live pid (ours): respected
    with pytest.raises(ResultsFolderError, match="in use"):
        run_experiment(ex, tmp_path, seeds=2)


def _race(out: str, seeds: int, barrier, queue) -> None:
    EXPERIMENTS["EX"] = __name__
    barrier.wait()
    try:
        run_experiment("EX", out, seeds=seeds, sleep=0.5, overwrite=True)
        queue.put((seeds, "ok"))
    except ValueError as e:
        queue.put((seeds, str(e)))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_racing_runs_one_wins_and_the_folder_stays_consistent(ex, tmp_path):
    ctx = mp.get_context("fork")
    for _ in range(2):
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(tmp_path), s, barrier, queue)) for s in (2, 3, 4, 5)]
        for p in procs:
            p.start()
        outcome = dict(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        winners = [s for s, r in outcome.items() if r == "ok"]
        assert winners and all(r == "ok" or "in use" in r for r in outcome.values()), outcome
        state = _state(tmp_path / "EX")
        assert _consistent(tmp_path / "EX") and state["config"] in {_hash(seeds=s, sleep=0.5) for s in winners}
        assert state["summary"] == state["config"]


# ---------------------------------------------------------------------- temporary files of killed runs
def test_stale_tmp_files_are_removed_at_the_next_start(ex, tmp_path):
    folder = tmp_path / "EX"
    run_experiment(ex, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f".results.parquet.{dead.pid}.abcdefgh.tmp"
    live = folder / f".summary.json.{os.getpid()}.abcdefgh.tmp"
    old_style = folder / ".config.json.k2j3h4g5.tmp"                   # no pid in the name, held by nobody
    for p in (stale, live, old_style):
        p.write_bytes(b"partial")
    run_experiment(ex, tmp_path)
    assert not stale.exists() and not old_style.exists() and live.exists()
    with open(old_style, "wb") as held:                                # held open by a live process: kept
        results.clean_stale_tmp(folder)
        assert old_style.exists()
        held.close()
    assert results.clean_stale_tmp(folder) == [old_style]


# ---------------------------------------------------------------------- environment errors: one line, exit 2
def test_disk_full_is_one_line_and_leaves_no_tmp(ex, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def full(self, path, *a, **k):
        Path(path).write_bytes(b"PAR1 partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    line = _one_line_error(capsys, main(["experiment", ex, "--out", str(out)]))
    assert "results.parquet: no space left on device" in line and "free disk space" in line
    assert not out.exists()                                             # nothing was produced: nothing is left
    monkeypatch.undo()
    monkeypatch.setitem(EXPERIMENTS, "EX", __name__)

    def no_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_fsync)                           # the first write (config.json) fails
    line = _one_line_error(capsys, main(["experiment", ex, "--out", str(tmp_path / "out2")]))
    assert "no space left on device" in line and not (tmp_path / "out2").exists()


def test_unwritable_or_file_out_is_one_line(ex, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = _one_line_error(capsys, main(["experiment", ex, "--out", str(a_file)]))
    assert str(a_file) in line and "not a folder" in line
    line = _one_line_error(capsys, main(["experiment", ex, "--out", str(a_file / "sub")]))
    assert str(a_file) in line

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", denied)
    line = _one_line_error(capsys, main(["experiment", ex, "--out", str(tmp_path / "ro")]))
    assert "permission denied" in line and "write to" in line
    monkeypatch.undo()
    if sys.platform == "linux" and os.path.isdir("/sys"):                 # sysfs: not writable, even for root
        monkeypatch.setitem(EXPERIMENTS, "EX", __name__)
        line = _one_line_error(capsys, main(["experiment", ex, "--out", "/sys/rto_sim_test_out"]))
        assert "/sys" in line


@pytest.mark.parametrize("argv, words", [
    (["experiment", "E42", "--out", "{out}"], ["unknown experiment 'E42'"]),
    (["experiment", "E0", "--out", "{out}", "--set", "H=3"], ["'H' expects a list of (an integer)", "--set H="]),
    (["experiment", "E0", "--out", "{out}", "--set", "seeds=1.5"], ["'seeds' expects an integer"]),
    (["experiment", "E0", "--out", "{out}", "--set", "seeds=-1"], ["'seeds' of E0 must be an integer >= 1"]),
    (["experiment", "E0", "--out", "{out}", "--set", "seeds=true"], ["'seeds' expects an integer"]),
    (["experiment", "E0", "--out", "{out}", "--set", "bogus=1"], ["unknown config keys for E0: ['bogus']"]),
    (["experiment", "E0", "--out", "{out}", "--set", "beta=NaN"], ["'beta' must hold finite numbers"]),
    (["experiment", "E0", "--out", "{out}", "--set", "seeds"], ["--set expects KEY=VALUE"]),
    (["experiment", "E0", "--out", "{out}", "--set", "seeds=2", "--set", "seeds=3"], ["'seeds' twice"]),
    (["experiment", "E0", "--out", "{out}", "--format", "xlsx"], ["invalid choice: 'xlsx'"]),
    (["experiment", "E0"], ["--out"]),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:                                              # argparse usage errors
        code = e.code
    line = _one_line_error(capsys, code)
    assert all(w in line for w in words), line
    assert not out.exists()


def test_repeated_set_options_all_apply(ex, tmp_path):
    assert main(["experiment", ex, "--out", str(tmp_path), "--set", "seeds=2", "--set", "N=5"]) == 0
    assert json.loads((tmp_path / "EX" / "config.json").read_text())["config"] == {"N": 5, "seeds": 2, "sleep": 0.0,
                                                                                     "sweep": False}


def test_internal_bugs_keep_their_traceback(ex, tmp_path, monkeypatch):
    from rto_sim.errors import user_error_message
    from rto_sim.mdp import safe_log

    with pytest.raises(ValueError) as e:     # raised by numpy inside rto_sim code, not by a validation `raise`
        safe_log("not a number")
    assert user_error_message(e.value) is None
    with pytest.raises(ValueError) as e:
        make_config("E0", seeds=1.5)
    assert "'seeds' expects an integer" in user_error_message(e.value)
    def bug(cfg, folder):
        raise KeyError("an internal bug")
    monkeypatch.setattr(sys.modules[__name__], "run", bug)
    with pytest.raises(KeyError):
        main(["experiment", ex, "--out", str(tmp_path)])

    def numpy_bug(cfg, folder):
        np.zeros(3) + np.zeros(4)          # a ValueError raised inside numpy: a bug, not a user error
    monkeypatch.setattr(sys.modules[__name__], "run", numpy_bug)
    with pytest.raises(ValueError, match="broadcast"):
        main(["experiment", ex, "--out", str(tmp_path / "b")])


# ---------------------------------------------------------------------- paper_figures input handling
def test_paper_figures_corrupt_inputs_are_one_line(tmp_path, capsys, monkeypatch):
    import paper_figures.__main__ as pf
    from paper_figures.__main__ import main as figures
    from rto_sim.results import read_table

    def draw(summary, out):                  # reads the table like every figure does (figures: their own tests)
        read_table(out / "E0" / "results")
        return []
    monkeypatch.setitem(pf.FIGURES, "E0", draw)
    out, report = tmp_path / "out", tmp_path / "R.md"
    args = ["--out", str(out), "--quick", "--only", "E0", "--report", str(report)]
    assert figures(args) == 0
    capsys.readouterr()
    summary = out / "E0" / "summary.json"
    good = summary.read_bytes()
    for bad in (b"", b"{truncated", b"[1, 2]", b'{"config_hash": "x"}'):
        summary.write_bytes(bad)
        line = _one_line_error(capsys, figures(args))
        assert str(summary) in line and "delete it or rerun" in line
    summary.write_bytes(good)
    table = out / "E0" / "results.parquet"
    data = table.read_bytes()
    for bad in (data[: len(data) // 2], b"", b"not parquet"):
        table.write_bytes(bad)
        line = _one_line_error(capsys, figures(args))
        assert str(table) in line and "delete it and rerun" in line
    table.write_bytes(data)
    for argv, word in ((["--only", "E99"], "unknown name"), (["--llm-logs", str(tmp_path / "none")], "--llm-logs")):
        with pytest.raises(SystemExit) as e:
            figures(["--out", str(out), "--quick", *argv])
        assert word in _one_line_error(capsys, e.value.code)
    assert figures(args) == 0
