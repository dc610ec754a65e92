"""`rto-sim experiment E0` end to end: tidy table, summary.json, refusal to overwrite another config."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from rto_sim.cli import main
from rto_sim.experiments import run_experiment
from rto_sim.identities import IDENTITIES


def test_e0_quick_writes_table_and_summary(tmp_path):
    assert main(["experiment", "E0", "--out", str(tmp_path), "--quick", "--format", "csv"]) == 0
    summary = json.loads((tmp_path / "E0" / "summary.json").read_text())
    assert summary["all_pass"]
    assert set(summary["checks"]) == set(IDENTITIES) | {"12_markov_beats_predetermined", "13_dpo_residual_stochastic"}
    for c in summary["checks"].values():
        assert c["verdict"] == "pass" and c["measured"] <= c["tolerance"] and c["kind"] == "identity"
    assert summary["checks"]["12_markov_beats_predetermined"]["paper"].startswith("RTO Proposition C.2")
    df = pd.read_csv(tmp_path / "E0" / "results.csv")
    assert {"identity", "structure", "A", "H", "eos", "beta", "max_abs_error", "config_hash"} <= set(df.columns)
    assert set(df.structure) == {"tree", "last_token", "random_automaton", "stochastic"}


def test_results_folder_of_another_config_is_refused(tmp_path):
    run_experiment("E0", tmp_path, quick=True)
    before = (tmp_path / "E0" / "summary.json").read_bytes()
    with pytest.raises(ValueError, match="another config"):
        run_experiment("E0", tmp_path, quick=False)
    assert (tmp_path / "E0" / "summary.json").read_bytes() == before
    assert main(["experiment", "E0", "--out", str(tmp_path)]) == 2


def test_unknown_experiment_and_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("E42", tmp_path)
    with pytest.raises(ValueError, match="unknown config keys"):
        run_experiment("E0", tmp_path, quick=True, bogus=1)


def test_import_rto_sim_is_light():
    code = "import rto_sim, sys; print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
