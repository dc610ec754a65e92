"""Sweep runner: grid, resume after a crash, determinism across backends/workers, bad input."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rto_sim.sweep import SweepGrid, cell_key, cell_seed, collect, run_sweep


def noisy_cell(cell, rng_seed):
    """Logs each call, optionally crashes (when the flag file exists), returns two random metrics."""
    log = Path(cell["log_dir"])
    if (log / "crash").exists() and cell["x"] == 2:
        raise RuntimeError("simulated kill")
    with open(log / "calls.txt", "a") as f:
        f.write(f"{cell['x']},{cell['seed']}\n")
    rng = np.random.default_rng(rng_seed)
    return [{"metric": "u", "value": float(rng.random()), "learner": "a"},
            {"metric": "v", "value": float(cell["x"] + rng.standard_normal()), "learner": "b"}]


def _grid(tmp_path, **fixed):
    return SweepGrid(axes={"x": [0, 1, 2, 3], "seed": range(3)}, fixed={"log_dir": str(tmp_path), **fixed})


def _calls(tmp_path):
    p = tmp_path / "calls.txt"
    return p.read_text().splitlines() if p.exists() else []


def test_grid_cells_and_yaml(tmp_path):
    g = _grid(tmp_path)
    cells = g.cells()
    assert len(cells) == len(g) == 12 and cells[0] == {"log_dir": str(tmp_path), "x": 0, "seed": 0}
    y = SweepGrid.from_yaml("axes:\n  x: [0, 1, 2, 3]\n  seed: [0, 1, 2]\nfixed:\n  log_dir: " + str(tmp_path))
    assert y.cells() == cells
    assert cell_seed(cells[0]) == cell_seed(dict(cells[0])) and cell_seed(cells[0]) != cell_seed(cells[1])


def test_tidy_table_and_resume_after_crash(tmp_path):
    g = _grid(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "crash").touch()
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_sweep(noisy_cell, g, out, backend="serial", progress=False)
    done_before = sorted(p.stem for p in (out / "cells").glob("*.parquet"))
    assert 0 < len(done_before) < 12                      # finished cells survived the crash
    n_calls = len(_calls(tmp_path))
    (tmp_path / "crash").unlink()
    table = run_sweep(noisy_cell, g, out, backend="serial", progress=False)
    calls = _calls(tmp_path)
    assert len(calls) == 12 and len(set(calls)) == 12     # no finished cell recomputed
    assert len(calls) - n_calls == 12 - len(done_before)
    assert len(table) == 24 and set(table.metric) == {"u", "v"}
    for col in ("x", "seed", "rng_seed", "cell_hash", "wall_time_s", "learner", "value"):
        assert col in table.columns
    assert table.groupby("cell_hash").size().eq(2).all()
    # a third run computes nothing
    again = run_sweep(noisy_cell, g, out, backend="serial", progress=False)
    assert len(_calls(tmp_path)) == 12
    pd.testing.assert_frame_equal(again, table)


def test_subset_then_full_grid_process_pool(tmp_path):
    g = _grid(tmp_path)
    out = tmp_path / "out"
    part = run_sweep(noisy_cell, g, out, workers=2, cells=g.cells()[:5], progress=False)
    assert part.cell_hash.nunique() == 5
    full = run_sweep(noisy_cell, g, out, workers=2, progress=False)
    assert full.cell_hash.nunique() == 12 and len(_calls(tmp_path)) == 12


def test_same_numbers_regardless_of_backend_and_order(tmp_path):
    g = _grid(tmp_path)
    a = run_sweep(noisy_cell, g, tmp_path / "ra", backend="serial", progress=False)
    b = run_sweep(noisy_cell, g, tmp_path / "rb", workers=2, cells=g.cells()[::-1], progress=False)
    cols = ["x", "seed", "metric", "value", "rng_seed"]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))


def test_folder_of_another_config_is_refused(tmp_path):
    out = tmp_path / "out"
    run_sweep(noisy_cell, _grid(tmp_path), out, backend="serial", progress=False)
    before = {p.name: p.read_bytes() for p in (out / "cells").glob("*")}
    meta = (out / "sweep.json").read_text()
    other = SweepGrid(axes={"x": [0, 1], "seed": [0]}, fixed={"log_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="another config"):
        run_sweep(noisy_cell, other, out, backend="serial", progress=False)
    assert {p.name: p.read_bytes() for p in (out / "cells").glob("*")} == before
    assert (out / "sweep.json").read_text() == meta
    assert json.loads(meta)["grid"]["axes"]["x"] == [0, 1, 2, 3]


def test_bad_input(tmp_path):
    g = _grid(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        SweepGrid(axes={"x": []})
    with pytest.raises(ValueError, match="list of values"):
        SweepGrid(axes={"x": 3})
    with pytest.raises(ValueError, match="both axes and fixed"):
        SweepGrid(axes={"x": [1]}, fixed={"x": 2})
    with pytest.raises(ValueError, match="backend"):
        run_sweep(noisy_cell, g, tmp_path / "o", backend="dask")
    with pytest.raises(ValueError, match="workers"):
        run_sweep(noisy_cell, g, tmp_path / "o", workers=0)

    def validate(cell):
        if cell["x"] == 3:
            raise ValueError("x must be < 3")
    with pytest.raises(ValueError, match="x must be < 3"):
        run_sweep(noisy_cell, g, tmp_path / "o2", validate=validate, progress=False)
    assert not (tmp_path / "o2").exists() and _calls(tmp_path) == []    # nothing ran, nothing written
    with pytest.raises(ValueError, match="belong to the grid"):
        run_sweep(noisy_cell, g, tmp_path / "o3", cells=[{"x": 99}])
    bad_rows = tmp_path / "o4"
    with pytest.raises(ValueError, match="'metric' and 'value'"):
        run_sweep(bad_cell, SweepGrid(axes={"x": [1]}), bad_rows, backend="serial", progress=False)
    assert collect(bad_rows, SweepGrid(axes={"x": [1]})).empty


def bad_cell(cell, rng_seed):
    return [{"value": 1.0}]


def test_ray_backend(tmp_path):
    import os

    if os.environ.get("RTO_REQUIRE_OPTIONAL") == "1":      # `make test`: the optional backend must run, not skip
        import ray
    else:
        ray = pytest.importorskip("ray")

    # the cell function lives in this test module: Ray workers must be able to import it
    path = os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])  # the repo: tests.*
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        g = _grid(tmp_path)
        a = run_sweep(noisy_cell, g, tmp_path / "ray", backend="ray", workers=2, progress=False)
        b = run_sweep(noisy_cell, g, tmp_path / "serial", backend="serial", progress=False)
    finally:
        ray.shutdown()
    assert a.cell_hash.nunique() == 12 and cell_key(g.cells()[0]) in set(a.cell_hash)
    key = ["cell_hash", "metric"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert np.array_equal(a["value"].to_numpy(), b["value"].to_numpy())


# ---------------------------------------------------------------------- bad inputs on disk, kills, orphans (issue 12)
def test_yaml_grid_errors_name_the_file(tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("axes:\n  x: [0, 1\nfixed: {}\n")
    for arg in (bad, str(bad)):
        with pytest.raises(ValueError, match=r"grid.yaml: YAML syntax error at line \d+, column \d+"):
            SweepGrid.from_yaml(arg)
    with pytest.raises(ValueError, match="missing.yaml does not exist"):
        SweepGrid.from_yaml(tmp_path / "missing.yaml")
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="grid.yaml needs a mapping with keys 'axes'"):
        SweepGrid.from_yaml(bad)
    bad.write_text("axes: {x: [1]}\nfixd: {a: 1}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['fixd'\]"):
        SweepGrid.from_yaml(bad)
    bad.write_text("axes: {x: [1]}\nfixed: [1, 2]\n")
    with pytest.raises(ValueError, match="'fixed' must be a mapping"):
        SweepGrid.from_yaml(bad)
    with pytest.raises(ValueError, match="sweep grid YAML: YAML syntax error"):
        SweepGrid.from_yaml("axes: {x: [1\n")
    assert SweepGrid.from_yaml("axes: {x: [1, 2]}").cells() == [{"x": 1}, {"x": 2}]


def test_unreadable_cell_files_are_recomputed_with_a_warning(tmp_path):
    g = _grid(tmp_path)
    out = tmp_path / "out"
    first = run_sweep(noisy_cell, g, out, backend="serial", progress=False)
    files = [out / "cells" / f"{cell_key(c)}.parquet" for c in g.cells()[:4]]
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])                      # truncated
    files[1].write_bytes(b"")                                         # 0 bytes
    files[2].write_text("not a parquet file")                         # not parquet
    files[3].write_bytes((out / "cells" / f"{cell_key(g.cells()[5])}.parquet").read_bytes())   # another cell's
    n_calls = len(_calls(tmp_path))
    with pytest.warns(RuntimeWarning) as record:
        again = run_sweep(noisy_cell, g, out, backend="serial", progress=False)
    text = " ".join(str(w.message) for w in record)
    assert all(f.name in text for f in files) and "recomputed" in text
    assert len(_calls(tmp_path)) - n_calls == 4                       # exactly those four cells ran again
    cols = [c for c in first.columns if c != "wall_time_s"]
    pd.testing.assert_frame_equal(again[cols], first[cols])           # row for row the uninterrupted table
    files[1].write_bytes(b"")
    with pytest.raises(ValueError, match=f"{files[1].name} is unreadable"):   # collect alone names the file
        collect(out, g)


def test_corrupt_sweep_json_is_named_and_nothing_is_touched(tmp_path):
    out = tmp_path / "out"
    run_sweep(noisy_cell, _grid(tmp_path), out, backend="serial", progress=False)
    (out / "sweep.json").write_text("{not json")
    before = {p.name: p.read_bytes() for p in (out / "cells").glob("*")}
    with pytest.raises(ValueError, match="sweep.json is unreadable"):
        run_sweep(noisy_cell, _grid(tmp_path), out, backend="serial", progress=False)
    assert {p.name: p.read_bytes() for p in (out / "cells").glob("*")} == before


def slow_cell(cell, rng_seed):
    """Records the worker's pid; sleeps while the flag file `slow` exists (so that a sweep can be killed)."""
    import os
    import time

    log = Path(cell["log_dir"])
    (log / "pids").mkdir(exist_ok=True)
    (log / "pids" / str(os.getpid())).touch()
    if (log / "slow").exists():
        time.sleep(0.4)
    rng = np.random.default_rng(rng_seed)
    return [{"metric": "u", "value": float(rng.random()), "learner": "a"},
            {"metric": "v", "value": float(cell["x"] + rng.standard_normal()), "learner": "b"}]


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from tests.rto_sim.test_sweep import slow_cell
from rto_sim.sweep import SweepGrid, run_sweep
grid = SweepGrid(axes={{"x": list(range(8)), "seed": [0, 1, 2]}}, fixed={{"log_dir": {log!r}}})
run_sweep(slow_cell, grid, {out!r}, workers=2, progress=False)
"""


def test_killed_sweep_leaves_no_orphan_workers_and_resumes_exactly(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from rto_sim.results import pid_alive

    log, out = tmp_path / "log", tmp_path / "out"
    log.mkdir()
    (log / "slow").touch()
    grid = SweepGrid(axes={"x": list(range(8)), "seed": [0, 1, 2]}, fixed={"log_dir": str(log)})     # 24 cells
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parents[2]), log=str(log), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cells = out / "cells"
    deadline = time.monotonic() + 180
    while len(list(cells.glob("*.parquet"))) < 3:
        assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        assert time.monotonic() < deadline, "the sweep did not start"
        time.sleep(0.05)
    proc.kill()                                     # SIGKILL the parent only: no clean-up code runs in it
    proc.wait()
    proc.stderr.close()
    n_done = len(list(cells.glob("*.parquet")))
    assert n_done < 24
    workers = [int(p.name) for p in (log / "pids").iterdir()]
    assert workers and proc.pid not in workers
    deadline = time.monotonic() + 15
    while any(pid_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [w for w in workers if pid_alive(w)]
    for w in survivors:                             # do not leave them behind when the check fails
        os.kill(w, 9)
    assert not survivors, "pool workers survived their parent"
    # temporary files: one of the killed run (its writer is dead) and one of a live writer (this process)
    dead_tmp = cells / f".{cell_key(grid.cells()[0])}.parquet.{proc.pid}.abcdefgh.tmp"
    live_tmp = cells / f".other.parquet.{os.getpid()}.abcdefgh.tmp"
    dead_tmp.write_bytes(b"partial")
    live_tmp.write_bytes(b"partial")
    (log / "slow").unlink()
    resumed = run_sweep(slow_cell, grid, out, workers=2, progress=False)
    assert not dead_tmp.exists() and live_tmp.exists()
    assert sorted(p.name for p in cells.glob(".*.tmp")) == [live_tmp.name]
    reference = run_sweep(slow_cell, grid, tmp_path / "reference", backend="serial", progress=False)
    cols = [c for c in reference.columns if c != "wall_time_s"]
    pd.testing.assert_frame_equal(resumed[cols], reference[cols])     # row for row the uninterrupted sweep
