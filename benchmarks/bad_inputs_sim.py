"""A battery of bad inputs against ``rto-sim``, ``python -m paper_figures`` and the ``rto_sim`` Python API.

Long because it is a catalogue: each of its ~80 bad inputs is a few lines of set-up and an expected message.

Each input is a mistake a user makes (a wrong ``--set`` value, option, path or YAML file; NaN in theta; beta
too small; an MDP too large for memory) or damage a run meets (a corrupt results file, a kill, a full or
read-only disk, a concurrent run, stale locks and temporary files). The CLIs run as subprocesses (one per
input; damage such as a full disk or a crash is simulated by a monkeypatched write in a ``python -c``
wrapper around the CLI's ``main``); API inputs run in this process. Every outcome is classified:

- ``clear error``: exit code 2 with exactly one stderr line naming the field or file (a regex per input), or,
  for the API, a ValueError whose message matches;
- ``recovered``: the documented recovery happened (a stale lock taken over, stale temporary files removed,
  an unreadable sweep cell recomputed, a killed sweep resumed to the same table, no orphan worker left);
- ``unclear error``: exit 2 (or a ValueError) but not the expected message, or more than one stderr line;
- ``traceback``: a Python traceback (or an exception other than ValueError) for a user error;
- ``silently accepted``: success (or only a warning) for an input that must be refused;
- ``data lost``: the input's post-check failed (results changed or deleted, config.json disagreeing with the
  results beside it, a file left behind by a refused run, an orphan worker, a resumed table that differs);
- ``other``: anything else (another exit code, a timeout).

    .venv/bin/python benchmarks/bad_inputs_sim.py                  # all inputs, counts at the end
    .venv/bin/python benchmarks/bad_inputs_sim.py -k sweep         # the inputs whose name contains "sweep"
    .venv/bin/python benchmarks/bad_inputs_sim.py --out benchmarks/results/bad_inputs_sim.md

Target: 0 tracebacks, 0 silently accepted, 0 data lost, 0 unclear.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from _battery import report, stderr_outcome

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
TEMPLATE: Path = Path()           # a finished `rto-sim experiment E0 --quick` folder (OUT), copied per input


@dataclasses.dataclass
class Case:
    name: str
    kind: str                                            # "cli" (subprocess) or "api" (in-process)
    expect: str = "error"                                # "error" or "recover"
    pattern: str = ""                                    # regex: the error line / the recovery evidence
    argv: Callable[[Path], list[str]] | None = None      # case dir -> command line (cli)
    call: Callable[[Path], object] | None = None         # case dir -> API call (api)
    setup: Callable[[Path], None] | None = None          # case dir -> prepare (a previous run, damage)
    check: Callable[[Path], str | None] | None = None    # case dir -> None if no data was lost, else why
    codes: tuple = (2,)                                  # accepted exit codes of an error
    timeout: int = 300


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def sim(*args: str) -> list[str]:
    return [sys.executable, "-m", "rto_sim", *args]


def figures(*args: str) -> list[str]:
    return [sys.executable, "-m", "paper_figures", *args]


def wrapped(patch: str, argv: list[str], module: str = "rto_sim.cli") -> list[str]:
    """`python -c`: apply `patch` (simulated damage) then run the CLI's main with `argv`."""
    code = "import errno, os, signal, sys\n" + textwrap.dedent(patch) + \
        f"\nfrom {module} import main\nsys.exit(main({argv!r}))\n"
    return [sys.executable, "-c", code]


def copy_template(d: Path) -> None:
    shutil.copytree(TEMPLATE, d / "out")


def digest(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file below `folder` (the lock and temporary files excluded)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock" and not p.name.endswith(".tmp")}


def unchanged(setup: Callable[[Path], None]) -> tuple[Callable[[Path], None], Callable[[Path], str | None]]:
    """A setup that records the digest of d/out, and a check that it did not change."""
    def s(d: Path) -> None:
        setup(d)
        (d / "before.json").write_text(json.dumps(digest(d / "out")))

    def c(d: Path) -> str | None:
        before, after = json.loads((d / "before.json").read_text()), digest(d / "out")
        if before != after:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            return f"files changed or deleted: {changed[:4]}"
        return None
    return s, c


def nothing_left(path_of: Callable[[Path], Path]) -> Callable[[Path], str | None]:
    def c(d: Path) -> str | None:
        p = path_of(d)
        return f"a refused run left {p} behind" if p.exists() else None
    return c


def consistent(d: Path) -> str | None:
    """config.json and the results beside it (summary, table) belong to one config; no .tmp left."""
    f = d / "out" / "E0"
    if list(f.rglob("*.tmp")) if f.exists() else []:
        return f"temporary files left: {[p.name for p in f.rglob('*.tmp')]}"
    if not f.exists() or not (f / "config.json").exists():
        return None if not (f.exists() and (list(f.glob("results.*")) or (f / "summary.json").exists())) else \
            "results without config.json"
    cfg = json.loads((f / "config.json").read_text())["config_hash"]
    if (f / "summary.json").exists() and json.loads((f / "summary.json").read_text())["config_hash"] != cfg:
        return "summary.json belongs to another config than config.json"
    if (f / "results.parquet").exists():
        import pandas as pd
        if set(pd.read_parquet(f / "results.parquet").config_hash) != {cfg}:
            return "results.parquet belongs to another config than config.json"
    return None


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


LIVE: list[subprocess.Popen] = []          # processes this script started to hold a lock (ended at the end)


def hold_lock(d: Path) -> None:
    copy_template(d)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    LIVE.append(p)
    (d / "out" / "E0" / ".lock").write_text(f"{p.pid}\n")


# ---------------------------------------------------------------------------------------------------
# sweep scenarios (run in a subprocess, then checked here)
# ---------------------------------------------------------------------------------------------------
# the sweep cell of tests/rto_sim/test_sweep.py (records worker pids, sleeps while the flag file `slow` exists)


def sweep_grid(log: Path):
    from rto_sim.sweep import SweepGrid
    return SweepGrid(axes={"x": list(range(8)), "seed": [0, 1, 2]}, fixed={"log_dir": str(log)})


def killed_sweep(d: Path) -> object:
    """Kill -9 a running process-pool sweep; no worker may survive; the resumed table equals an uninterrupted
    one row for row. Returns the recovery evidence or raises."""
    import pandas as pd

    from rto_sim.results import pid_alive
    from rto_sim.sweep import run_sweep
    from tests.rto_sim.test_sweep import slow_cell

    log, out = d / "log", d / "out"
    log.mkdir(parents=True)
    (log / "slow").touch()
    code = ("from tests.rto_sim.test_sweep import slow_cell\nfrom bad_inputs_sim import sweep_grid\n"
            "from rto_sim.sweep import run_sweep\nfrom pathlib import Path\n"
            f"run_sweep(slow_cell, sweep_grid(Path({str(log)!r})), {str(out)!r}, workers=2, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(list((out / "cells").glob("*.parquet"))) < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the sweep ended or never started before the kill")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    workers = [int(p.name) for p in (log / "pids").iterdir()]
    deadline = time.monotonic() + 15
    while any(pid_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [w for w in workers if pid_alive(w)]
    for w in orphans:
        os.kill(w, signal.SIGKILL)
    if orphans:
        return DataLost(f"{len(orphans)} pool workers survived the killed parent")
    (out / "cells" / f".x.parquet.{proc.pid}.abcdefgh.tmp").write_bytes(b"partial")
    (log / "slow").unlink()
    resumed = run_sweep(slow_cell, sweep_grid(log), out, workers=2, progress=False)
    if list((out / "cells").glob("*.tmp")):
        return DataLost("the killed run's temporary file was not removed")
    ref = run_sweep(slow_cell, sweep_grid(log), d / "ref", backend="serial", progress=False)
    cols = [c for c in ref.columns if c != "wall_time_s"]
    try:
        pd.testing.assert_frame_equal(resumed[cols], ref[cols])
    except AssertionError as e:
        return DataLost(f"resumed table differs: {str(e)[:100]}")
    return Recovered(f"no orphan of {len(workers)} workers; resumed table equals the uninterrupted one "
                     f"({len(ref)} rows); stale .tmp removed")


def damaged_cell(damage: str) -> Callable[[Path], object]:
    def call(d: Path) -> object:
        import pandas as pd

        from rto_sim.sweep import cell_key, run_sweep
        from tests.rto_sim.test_sweep import slow_cell

        log = d / "log"
        log.mkdir(parents=True)
        g = sweep_grid(log)
        first = run_sweep(slow_cell, g, d / "out", backend="serial", progress=False)
        p = d / "out" / "cells" / f"{cell_key(g.cells()[0])}.parquet"
        data = p.read_bytes()
        p.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not a parquet file"}[damage])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            again = run_sweep(slow_cell, g, d / "out", backend="serial", progress=False)
        cols = [c for c in first.columns if c != "wall_time_s"]
        try:
            pd.testing.assert_frame_equal(again[cols], first[cols])
        except AssertionError:
            return DataLost("the table after recomputing the damaged cell differs")
        named = [str(x.message) for x in w if p.name in str(x.message)]
        if not named:
            return DataLost("no warning named the damaged cell file")
        return Recovered(named[0])
    return call


class Recovered(str):
    pass


class DataLost(str):
    pass


# ---------------------------------------------------------------------------------------------------
# the inputs
# ---------------------------------------------------------------------------------------------------
def cases() -> list[Case]:
    out = []

    def cli(name, argv, pattern, setup=None, check=None, codes=(2,), expect="error"):
        out.append(Case(name, "cli", expect, pattern, argv=argv, setup=setup, check=check, codes=codes))

    def api(name, call, pattern, expect="error"):
        out.append(Case(name, "api", expect, pattern, call=call))

    def e0(d, *extra):
        return sim("experiment", "E0", "--out", str(d / "out"), "--quick", *extra)

    fresh = nothing_left(lambda d: d / "out")
    # --- rto-sim: options and --set values -------------------------------------------------------------
    cli("unknown experiment", lambda d: sim("experiment", "E42", "--out", str(d / "out")),
        r"unknown experiment 'E42'; available: E0", check=fresh)
    for key, value, pat in [
            ("H", "3", r"'H' expects a list of \(an integer\), got 3; for example --set H="),
            ("H", '[2,"x"]', r"'H' expects a list of \(an integer\)"),
            ("seeds", "1.5", r"'seeds' expects an integer, got 1.5"),
            ("seeds", "-1", r"'seeds' of E0 must be an integer >= 1, got -1"),
            ("seeds", "0", r"'seeds' of E0 must be an integer >= 1, got 0"),
            ("seeds", "true", r"'seeds' expects an integer, got True"),
            ("seeds", "1e20", r"'seeds' expects an integer"),
            ("bogus", "1", r"unknown config keys for E0: \['bogus'\]; valid keys"),
            ("beta", "NaN", r"'beta' must hold finite numbers, got nan"),
            ("beta", "[Infinity]", r"'beta' must hold finite numbers"),
            ("n_prompts", "null", r"'n_prompts' expects an integer, got None")]:
        cli(f"--set {key}={value}", lambda d, k=key, v=value: e0(d, "--set", f"{k}={v}"), pat, check=fresh)
    cli("--set without =", lambda d: e0(d, "--set", "seeds"), r"--set expects KEY=VALUE", check=fresh)
    cli("--set with an empty key", lambda d: e0(d, "--set", "=3"), r"--set expects KEY=VALUE", check=fresh)
    cli("--set the same key twice", lambda d: e0(d, "--set", "seeds=2", "--set", "seeds=3"), r"'seeds' twice",
        check=fresh)
    cli("--format xlsx", lambda d: e0(d, "--format", "xlsx"), r"invalid choice: 'xlsx'", check=fresh)
    cli("missing --out", lambda d: sim("experiment", "E0"), r"required: --out")
    cli("no subcommand", lambda d: sim(), r"required: command")
    cli("unknown option", lambda d: e0(d, "--bogus"), r"unrecognized arguments: --bogus", check=fresh)
    # --- rto-sim: the output folder -----------------------------------------------------------------------
    cli("--out is a file", lambda d: sim("experiment", "E0", "--quick", "--out", str(d / "f")),
        r"/f: is a file, not a folder", setup=lambda d: (d.mkdir(parents=True), (d / "f").write_text("x")))
    cli("--out below a file", lambda d: sim("experiment", "E0", "--quick", "--out", str(d / "f" / "sub")),
        r"/f: is a file, not a folder", setup=lambda d: (d.mkdir(parents=True), (d / "f").write_text("x")))
    if sys.platform == "linux" and os.path.isdir("/sys"):
        cli("--out on a read-only file system (/sys)", lambda d: sim("experiment", "E0", "--quick", "--out",
                                                                     "/sys/rto_sim_bad_input"),
            r"/sys/rto_sim_bad_input.*(not permitted|permission denied|read-only).*choose")
    cli("--out not writable (EACCES)", lambda d: wrapped(
        "import pathlib\ndef denied(self, *a, **k):\n    raise PermissionError(errno.EACCES, 'Permission denied', "
        "str(self))\npathlib.Path.mkdir = denied\n", ["experiment", "E0", "--quick", "--out", str(d / "out")]),
        r"/out/E0: permission denied; choose a folder you can write to", check=fresh)
    s, c = unchanged(copy_template)
    cli("folder of another config", lambda d: sim("experiment", "E0", "--out", str(d / "out")),
        r"holds results .* another config .* --overwrite", setup=s, check=c)

    def corrupt_config(d):
        copy_template(d)
        (d / "out" / "E0" / "config.json").write_text("{truncated")
    s, c = unchanged(corrupt_config)
    cli("corrupt config.json beside results", e0, r"config.json is unreadable .* --overwrite", setup=s, check=c)

    def no_config(d):
        copy_template(d)
        (d / "out" / "E0" / "config.json").unlink()
    s, c = unchanged(no_config)
    cli("results without config.json", e0, r"has no config.json; .* --overwrite", setup=s, check=c)
    s, c = unchanged(hold_lock)
    cli("folder in use by a live run", lambda d: e0(d, "--overwrite", "--set", "seeds=2"),
        r"is in use by another run \(pid \d+\)", setup=s, check=c)

    def stale_lock(d):
        copy_template(d)
        (d / "out" / "E0" / ".lock").write_text(f"{dead_pid()}\n")
    cli("stale lock of a dead pid", e0, r"taking over the stale lock", setup=stale_lock, expect="recover",
        check=lambda d: "lock left behind" if (d / "out" / "E0" / ".lock").exists() else consistent(d))

    def leftover_config(d):
        (d / "out" / "E0").mkdir(parents=True)
        (d / "out" / "E0" / "config.json").write_text(json.dumps({"config_hash": "0" * 16, "config": {"seeds": -1}}))
    cli("config.json left by a failed run", e0, r"checks, wall", setup=leftover_config, expect="recover",
        check=consistent)

    def stale_tmp(d):
        copy_template(d)
        (d / "out" / "E0" / f".results.parquet.{dead_pid()}.abcdefgh.tmp").write_bytes(b"partial")
        (d / "out" / "E0" / ".summary.json.zzzzzzzz.tmp").write_bytes(b"partial")
    cli("stale .tmp files of a killed run", e0, r"checks, wall", setup=stale_tmp, expect="recover",
        check=consistent)
    enospc_parquet = ("import pandas as pd\ndef full(self, path, *a, **k):\n    open(path, 'wb').write(b'PAR1')\n"
                      "    raise OSError(errno.ENOSPC, 'No space left on device')\npd.DataFrame.to_parquet = full\n")
    cli("disk full while writing the results", lambda d: wrapped(enospc_parquet, [
        "experiment", "E0", "--quick", "--out", str(d / "out")]),
        r"results.parquet: no space left on device; free disk space", check=consistent)
    cli("disk full during --overwrite", lambda d: wrapped(enospc_parquet, [
        "experiment", "E0", "--quick", "--out", str(d / "out"), "--overwrite", "--set", "seeds=2"]),
        r"no space left on device", setup=copy_template, check=consistent)
    cli("disk full at the first write (config.json)", lambda d: wrapped(
        "def nofsync(fd):\n    raise OSError(errno.ENOSPC, 'No space left on device')\nos.fsync = nofsync\n",
        ["experiment", "E0", "--quick", "--out", str(d / "out")]), r"no space left on device", check=fresh)
    kill_run = ("import rto_sim.experiments.e0 as m\ndef run(cfg, folder):\n"
                "    os.kill(os.getpid(), signal.SIGKILL)\nm.run = run\n")
    cli("kill -9 during an --overwrite run", lambda d: wrapped(kill_run, [
        "experiment", "E0", "--quick", "--out", str(d / "out"), "--overwrite", "--set", "seeds=2"]),
        r"", setup=copy_template, check=consistent, codes=(-9,))
    kill_delete = ("import rto_sim.results as r\n_real = r._remove\n_n = []\ndef rm(p):\n    if _n:\n"
                   "        os.kill(os.getpid(), signal.SIGKILL)\n    _n.append(p)\n    _real(p)\nr._remove = rm\n")
    cli("kill -9 while --overwrite deletes the old results", lambda d: wrapped(kill_delete, [
        "experiment", "E0", "--quick", "--out", str(d / "out"), "--overwrite", "--set", "seeds=2"]),
        r"", setup=copy_template, check=consistent, codes=(-9,))
    cli("Ctrl-C during a run", lambda d: wrapped(
        "import rto_sim.experiments.e0 as m\ndef run(cfg, folder):\n    raise KeyboardInterrupt\nm.run = run\n",
        ["experiment", "E0", "--quick", "--out", str(d / "out")]), r"interrupted; rerun the same command",
        check=fresh, codes=(130,))
    # --- paper_figures --------------------------------------------------------------------------------------
    def pf(d, *extra):
        return figures("--out", str(d / "out"), "--quick", "--only", "E0", "--report", str(d / "R.md"), *extra)

    def damage(rel: str, data: bytes | Callable[[bytes], bytes]):
        def setup(d):
            copy_template(d)
            p = d / "out" / rel
            p.write_bytes(data(p.read_bytes()) if callable(data) else data)
        return unchanged(setup)
    cli("paper_figures --only E99", lambda d: figures("--out", str(d / "out"), "--only", "E99"),
        r"--only: unknown name\(s\) \['E99'\]")
    cli("paper_figures --llm-logs missing", lambda d: figures("--out", str(d / "out"), "--llm-logs", str(d / "x")),
        r"--llm-logs .* is not a folder")
    cli("paper_figures unknown option", lambda d: figures("--bogus"), r"unrecognized arguments: --bogus")
    cli("paper_figures --out is a file", lambda d: figures("--out", str(d / "f"), "--quick", "--only", "E0"),
        r"/f: is a file, not a folder", setup=lambda d: (d.mkdir(parents=True), (d / "f").write_text("x")))
    for label, rel, data, pat in [
            ("truncated summary.json", "E0/summary.json", lambda b: b[: len(b) // 2], r"summary.json is corrupt"),
            ("empty summary.json", "E0/summary.json", b"", r"summary.json is corrupt"),
            ("summary.json not a summary", "E0/summary.json", b"[1, 2]", r"summary.json is corrupt"),
            ("summary.json without verdicts", "E0/summary.json",
             lambda b: json.dumps({**json.loads(b), "checks": {"x": {}}}).encode(), r"summary.json is corrupt"),
            ("truncated results.parquet", "E0/results.parquet", lambda b: b[: len(b) // 2],
             r"results.parquet is unreadable .* delete it and rerun"),
            ("empty results.parquet", "E0/results.parquet", b"", r"results.parquet is unreadable"),
            ("results.parquet not parquet", "E0/results.parquet", b"hello", r"results.parquet is unreadable")]:
        s, c = damage(rel, data)
        cli(f"paper_figures: {label}", pf, pat, setup=s, check=c)
    # --- sweeps -------------------------------------------------------------------------------------------------
    from rto_sim.sweep import SweepGrid, run_sweep

    def yaml_file(text):
        def call(d):
            d.mkdir(parents=True, exist_ok=True)
            (d / "grid.yaml").write_text(text)
            return SweepGrid.from_yaml(d / "grid.yaml")
        return call
    api("sweep YAML syntax error", yaml_file("axes:\n  x: [0, 1\n"), r"grid.yaml: YAML syntax error at line \d+")
    api("sweep YAML is a list", yaml_file("- 1\n- 2\n"), r"grid.yaml needs a mapping with keys 'axes'")
    api("sweep YAML unknown key", yaml_file("axes: {x: [1]}\nfixd: {}\n"), r"unknown keys \['fixd'\]")
    api("sweep YAML empty axis", yaml_file("axes: {x: []}\n"), r"axes\['x'\] is empty")
    api("sweep YAML missing file", lambda d: SweepGrid.from_yaml(d / "nope.yaml"), r"nope.yaml does not exist")

    def cell(c, s):
        return [{"metric": "m", "value": float(c["x"])}]

    def other_grid(d):
        run_sweep(cell, SweepGrid(axes={"x": [1, 2]}), d / "out", backend="serial", progress=False)
        return run_sweep(cell, SweepGrid(axes={"x": [1, 3]}), d / "out", backend="serial", progress=False)
    api("sweep folder of another grid", other_grid, r"holds a sweep of another config")

    def bad_sweep_json(d):
        run_sweep(cell, SweepGrid(axes={"x": [1, 2]}), d / "out", backend="serial", progress=False)
        (d / "out" / "sweep.json").write_text("{oops")
        return run_sweep(cell, SweepGrid(axes={"x": [1, 2]}), d / "out", backend="serial", progress=False)
    api("sweep.json corrupt", bad_sweep_json, r"sweep.json is unreadable")
    api("sweep workers=0", lambda d: run_sweep(cell, SweepGrid(axes={"x": [1]}), d, workers=0), r"workers must be")
    api("sweep backend=dask", lambda d: run_sweep(cell, SweepGrid(axes={"x": [1]}), d, backend="dask"), r"backend")
    for damage_kind in ("truncated", "empty", "text"):
        api(f"sweep cell file {damage_kind}", damaged_cell(damage_kind), r"recomputed", expect="recover")
    api("sweep killed with kill -9", killed_sweep, r"no orphan", expect="recover")
    # --- the exact engine and the API --------------------------------------------------------------------------
    import numpy as np

    from rto_sim import (
        TokenMDP,
        draw_theta,
        enumerate_responses,
        evaluate,
        make_features,
        return_moments,
        rto_reward_table,
        soft_bellman,
    )
    from rto_sim.experiments import make_config
    from rto_sim.results import read_table

    m = TokenMDP.tree(A=3, H=4, eos=True, seed=0)
    phi = make_features(m, "unigram")
    r = phi.token_reward(draw_theta(m, phi, return_var=0.25, seed=1))
    nan_r = [x.copy() for x in r]
    nan_r[1][0, 0] = np.nan
    nan_pol = [p.copy() for p in m.pi_ref]
    nan_pol[2][0, 1] = np.nan
    api("soft_bellman at beta=1e-308", lambda d: soft_bellman(m, [x * 1e3 for x in r], 1e-308),
        r"beta=1e-308: beta is too small for the reward scale")
    api("soft_bellman beta='a'", lambda d: soft_bellman(m, r, "a"), r"beta must be a positive number")
    api("soft_bellman beta=NaN", lambda d: soft_bellman(m, r, float("nan")), r"beta must be > 0")
    api("NaN in theta", lambda d: phi.token_reward(np.array([0.1, np.nan, 0.2])), r"theta has NaN")
    api("theta of the wrong shape", lambda d: phi.token_reward(np.zeros(5)), r"theta has shape \(5,\)")
    api("NaN in a reward", lambda d: soft_bellman(m, nan_r, 0.5), r"reward\[1\] has non-finite entries")
    api("NaN in a policy", lambda d: evaluate(m, nan_pol, r, 0.5), r"policy\[2\] has negative or non-finite")
    api("reward too large for float64", lambda d: evaluate(m, m.pi_ref, phi.token_reward(np.full(3, 1e308)), 0.5),
        r"expected return overflows: the reward scale")
    api("return variance overflow", lambda d: return_moments(m, m.pi_ref, phi.token_reward(np.full(3, 1e200))),
        r"return variance overflows")
    api("NaN in log_pi_dpo", lambda d: rto_reward_table(m, r, [np.full((n, 3), np.nan) for n in m.n_states],
                                                        beta1=0.1), r"log_pi_dpo\[0\] holds NaN")
    api("rto_reward_table beta1=NaN", lambda d: rto_reward_table(m, r, beta1=float("nan")),
        r"beta1 must be a finite number")
    ref0 = TokenMDP.tree(A=3, H=2, seed=0).pi_ref
    ref0[0][0] = [0.5, 0.5, 0.0]
    m0 = TokenMDP.tree(A=3, H=2, seed=0, pi_ref=ref0)
    api("policy outside pi_ref's support", lambda d: evaluate(m0, [np.full((n, 3), 1 / 3) for n in m0.n_states],
                                                              [np.zeros((n, 3)) for n in m0.n_states], 0.5),
        r"KL\(policy \|\| pi_ref\) is infinite")
    api("prefix tree A=2, H=40 (too large)", lambda d: TokenMDP.tree(A=2, H=40),
        r"1,099,511,627,775 states.* more than the limit MAX_TABLE_ENTRIES")
    api("prefix tree H=10**9", lambda d: TokenMDP.tree(A=3, H=10**9), r"MAX_HORIZON")
    api("last-token automaton too large", lambda d: TokenMDP.last_token_automaton(A=100, H=50_000, n_prompts=100),
        r"MAX_TABLE_ENTRIES")
    api("enumerate 4^10 responses", lambda d: enumerate_responses(TokenMDP.tree(A=4, H=10)), r"exceeds max_rows")
    api("vocabulary A=1", lambda d: TokenMDP.tree(A=1, H=3), r"A \(vocabulary size\) must be an integer >= 2")
    api("horizon H=True", lambda d: TokenMDP.tree(A=2, H=True), r"H \(horizon\) must be an integer")
    api("rho not summing to 1", lambda d: TokenMDP.tree(A=2, H=2, n_prompts=2, rho=[0.5, 0.6]), r"rho must sum to 1")
    api("unknown reward class", lambda d: make_features(m, "quadratic"), r"unknown reward class 'quadratic'")
    api("draw_theta return_var=-1", lambda d: draw_theta(m, phi, return_var=-1), r"return_var must be > 0")
    api("make_config seeds=True", lambda d: make_config("E0", seeds=True), r"'seeds' expects an integer")

    def corrupt_table(d):
        d.mkdir(parents=True)
        (d / "results.parquet").write_bytes(b"PAR1garbage")
        return read_table(d / "results")
    api("read_table of a corrupt parquet", corrupt_table, r"results.parquet is unreadable")
    return out


# ---------------------------------------------------------------------------------------------------
# running and classifying
# ---------------------------------------------------------------------------------------------------
def run_cli(case: Case, d: Path) -> tuple[str, str]:
    if case.setup:
        case.setup(d)
    d.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(case.argv(d), capture_output=True, text=True, env=ENV, cwd=d, timeout=case.timeout)
    except subprocess.TimeoutExpired:
        return "other", "timeout"
    lost = case.check(d) if case.check else None
    lines, decided = stderr_outcome(r.stderr, lost)
    if decided:
        return decided
    last = lines[-1] if lines else ""
    if case.expect == "recover":
        if r.returncode == 0 and re.search(case.pattern, r.stderr + r.stdout):
            evidence = next((x for x in lines if re.search(case.pattern, x)), "")
            return "recovered", evidence or "exit 0; the folder is consistent (config.json, results, no .tmp)"
        return "other", f"exit {r.returncode}: {last}"
    if r.returncode == 0 and case.codes != (2,) and not case.pattern:
        return "other", "exit 0: the simulated damage did not happen"
    if r.returncode == 0:
        return "silently accepted", "exit 0"
    if r.returncode in case.codes:
        if case.codes != (2,) and not case.pattern:        # a kill: what matters is the post-check
            return "recovered", f"exit {r.returncode}; the folder is consistent"
        ok = len(lines) == 1 and re.search(case.pattern, last)
        return ("clear error" if ok else "unclear error"), last if len(lines) <= 1 else f"{len(lines)} lines: {last}"
    return "other", f"exit {r.returncode}: {last}"


def run_api(case: Case, d: Path) -> tuple[str, str]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            result = case.call(d)
        except ValueError as e:
            msg = " ".join(str(e).split())
            if case.expect == "error" and re.search(case.pattern, msg):
                return "clear error", msg
            return "unclear error", msg
        except Exception as e:                                  # noqa: BLE001 - classified, not hidden
            return "traceback", f"{type(e).__name__}: {e}"
    if isinstance(result, DataLost):
        return "data lost", str(result)
    if case.expect == "recover" and isinstance(result, Recovered) and re.search(case.pattern, result):
        return "recovered", str(result)
    noisy = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    return "silently accepted", ("warned only: " + noisy[0]) if noisy else "no error"


def main(argv: list[str] | None = None) -> int:
    global TEMPLATE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="run only the inputs whose name contains this")
    ap.add_argument("--workdir", default="", help="keep outputs here (default: a temp dir)")
    ap.add_argument("--out", default="", help="also write the results as a markdown table to this file")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bad_inputs_sim_"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    t0 = time.time()
    TEMPLATE = work / "template"
    shutil.rmtree(TEMPLATE, ignore_errors=True)
    subprocess.run(sim("experiment", "E0", "--quick", "--out", str(TEMPLATE)), check=True, env=ENV,
                   capture_output=True)
    selected = [c for c in cases() if args.k in c.name]
    results = []
    try:
        for i, case in enumerate(selected, 1):
            d = work / "runs" / re.sub(r"[^A-Za-z0-9_.=-]+", "_", case.name)
            shutil.rmtree(d, ignore_errors=True)
            t = time.time()
            kind, detail = run_cli(case, d) if case.kind == "cli" else run_api(case, d)
            results.append((case.name, case.kind, kind, detail, time.time() - t))
            print(f"[{i:2d}/{len(selected)}] {kind:17s} {case.name:44s} {detail[:150]}", flush=True)
    finally:
        for p in LIVE:
            p.kill()
            p.wait()
    code = report([k for _, _, k, _, _ in results], [(n, via, k, d) for n, via, k, d, _ in results], t0, args.out,
                  "Bad inputs against `rto-sim`, `paper_figures` and the `rto_sim` API "
                  "(`benchmarks/bad_inputs_sim.py`)",
                  "on the shared 2-core CPU machine", ("input", "via", "outcome", "error line / finding"))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return code

if __name__ == "__main__":
    sys.exit(main())
