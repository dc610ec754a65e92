"""E1 / E1b: quick grids assert the robust predictions; d_eff values; bad input."""

import json

import numpy as np
import pytest

from rto_sim.experiments import config_dict, e1, e1_instance, e1b, run_experiment


@pytest.fixture(scope="module")
def e1_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("e1")
    return run_experiment("E1", out, quick=True), out


def test_e1_quick_robust_predictions(e1_quick):
    summary, out = e1_quick
    checks = summary["checks"]
    assert summary["quick"]
    for cls in e1.Config.quick().reward_classes:
        s1 = checks[f"S1_{cls}"]
        assert -0.55 <= s1["measured"]["slope"] <= -0.45, (cls, s1)   # S1: token RMSE ~ N^-1/2
        assert s1["verdict"] != "fail" and s1["kind"] == "prediction"  # the quick grid may lack the power to pass
        assert checks[f"S5_slope_{cls}"]["verdict"] != "fail"
    assert checks["S5_gap_identity"]["measured"] < 1e-8 and checks["S5_gap_identity"]["kind"] == "identity"
    s7 = checks["S7"]
    assert s7["verdict"] == "pass" and s7["measured"] < 1e-5       # tree-tabular == bandit
    assert s7["kind"] == "identity" and checks["S3_tree_tabular"]["kind"] == "identity"
    assert (out / "E1" / "aggregate.csv").exists() and (out / "E1" / "results.parquet").exists()
    json.loads((out / "E1" / "summary.json").read_text())


def test_e1_quick_rerun_is_resumed_and_identical(e1_quick):
    summary, out = e1_quick
    again = run_experiment("E1", out, quick=True)                # every cell already on disk: nothing recomputed
    assert again["wall_time_s"] < summary["wall_time_s"]
    assert {k: c["measured"] for k, c in again["checks"].items()} == \
        {k: c["measured"] for k, c in summary["checks"].items()}


def test_e1b_quick(tmp_path):
    summary = run_experiment("E1b", tmp_path, quick=True)
    c = summary["checks"]
    assert c["S4_growth"]["verdict"] != "fail"                   # sqrt(K) growth while N/K >= 20
    assert abs(c["S4_growth"]["measured"]["slope"] - 0.5) <= 0.1
    assert abs(c["S4_token"]["measured"]["slope"]) <= 0.1        # token error flat in H
    assert c["S4_plateau"]["kind"] == "identity"
    assert set(c) == {"S4_growth", "S4_overfit", "S4_plateau", "S4_token"}
    drift = (tmp_path / "E1b" / "bt_slope_drift.csv").read_text().splitlines()
    assert len(drift) == 1 + len(e1b.Config.quick().H)


@pytest.mark.parametrize("cls, expected", [("unigram", lambda A, H, K: A - 1),
                                           ("positional", lambda A, H, K: H * (A - 1)),
                                           ("tree_tabular", lambda A, H, K: K - 1), ("random", lambda A, H, K: 8)])
def test_d_eff_matches_theory(cls, expected):
    cfg = {**config_dict(e1.Config.quick()), "reward_class": cls, "A": 3, "H": 3}
    inst = e1_instance.instance_of(cfg)
    assert inst.d_eff == expected(3, 3, 27)
    assert inst.d_eff_bandit == 26
    # the DPO class is tabular on the MDP's states: H (A - 1) on the position automaton, K - 1 on the tree
    assert inst.d_eff_dpo == (3 * 2 if e1_instance.MDP_OF_CLASS[cls] == "position" else 26)
    assert inst.mse(inst.R) == 0.0 and abs(inst.fisher_quadratic(inst.R)) < 1e-15
    # returns have Var_mu = 0.25 (fixed across H)
    assert abs(inst.w @ inst.centred(inst.R) ** 2 - 0.25) < 1e-9


def test_fisher_quadratic_matches_feature_space_fisher():
    inst = e1_instance.instance_of({**config_dict(e1.Config.quick()), "reward_class": "positional", "A": 3, "H": 3})
    from rto_sim.preferences import trajectory_features
    Psi = trajectory_features(inst.features, inst.enum).toarray()
    R = inst.R
    p = 1 / (1 + np.exp(-(R[:, None] - R[None, :])))
    mu = np.exp(inst.log_mu)
    D = Psi[:, None, :] - Psi[None, :, :]
    I = np.einsum("i,j,ij,ijk,ijl->kl", mu, mu, p * (1 - p), D, D)
    delta = np.random.default_rng(0).standard_normal(inst.features.d)
    assert abs(inst.fisher_quadratic(R + Psi @ delta) - delta @ I @ delta) < 1e-10


@pytest.mark.parametrize("override, match", [
    ({"learners": ["token_mle", "ppo"]}, "unknown learner"),
    ({"reward_classes": ["quadratic"]}, "unknown reward class"),
    ({"N": [0, 100]}, "N: every number"),
    ({"H": [2, 12]}, "not enumerable"),
    ({"reference": "peaked"}, "reference"),
])
def test_e1_bad_input(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        run_experiment("E1", tmp_path, quick=True, **override)
    assert not (tmp_path / "E1" / "sweep").exists()                # nothing ran


def test_e1b_bad_input(tmp_path):
    with pytest.raises(ValueError, match="N"):
        run_experiment("E1b", tmp_path, quick=True, N=0)
    with pytest.raises(ValueError, match="not enumerable"):
        run_experiment("E1b", tmp_path / "b", quick=True, H=[2, 20])
    with pytest.raises(ValueError, match="bandit_ridges"):
        run_experiment("E1b", tmp_path / "c", quick=True, bandit_ridges=[-1.0])


def test_folder_of_another_config_refused(tmp_path):
    run_experiment("E1b", tmp_path, quick=True, H=[2, 3], seeds=2)
    before = (tmp_path / "E1b" / "summary.json").read_text()
    with pytest.raises(ValueError, match="another config"):
        run_experiment("E1b", tmp_path, quick=True, H=[2, 4], seeds=2)
    assert (tmp_path / "E1b" / "summary.json").read_text() == before
