"""Experiment E8 (rto_llm/experiments/e8.py): the contract, every verdict on synthetic data on which it must pass
and must fail, the whole pipeline end to end at a tiny size (killed mid-sweep and resumed), the figures, and the
quickstart at a tiny size."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rto_llm.experiments import LLM_EXPERIMENTS, e8, get_experiment, make_config, run_experiment
from rto_llm.experiments.e8 import (
    Config,
    bootstrap_ratio,
    check_data,
    check_dpo_reward,
    check_dpo_share,
    check_horizon,
    check_pairing,
    check_rs_ppo,
    check_speed,
    check_subopt_nonneg,
    data_ratio,
    effect_verdict,
    equivalence_verdict,
    run_summaries,
)
from rto_sim.experiments import undocumented_fields

REPO = Path(__file__).resolve().parents[2]
TINY = {"seeds": 2, "H": [3, 4], "data_H": [3], "arms": ["ppo", "rto", "rs_ppo", "ddpo"], "fractions": [0.5, 1.0],
        "n_sft": 128, "n_pairs": 32, "n_heldout": 16, "pref_steps": 4, "pref_batch": 16, "rollouts": 2,
        "rollout_batch": 16, "train_batch": 16, "eval_every": 1, "workers": 1, "bootstrap": 50, "hidden_size": 32,
        "slow_arms": ["ppo", "rto"]}


# ---------------------------------------------------------------------------------------------------
# contract
# ---------------------------------------------------------------------------------------------------


def test_e8_follows_the_experiment_contract():
    mod = get_experiment("E8")
    assert LLM_EXPERIMENTS["E8"] == "rto_llm.experiments.e8"
    cls = mod.Config
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().seeds = 1
    assert isinstance(cls.quick(), cls)
    for f in dataclasses.fields(cls):
        assert f.default is not dataclasses.MISSING, f.name
    assert undocumented_fields(cls) == []     # every field documented (docstring or a comment at the field)
    assert list(inspect.signature(mod.run).parameters) == ["cfg", "folder"]
    assert list(inspect.signature(mod.checks).parameters) == ["table", "cfg"]
    mod.validate_config(cls())
    mod.validate_config(cls.quick())
    assert cls().seeds >= 8                        # the full grid pairs at least 8 seeds


def test_the_simulator_never_imports_the_llm_trainer():
    code = ("import sys, rto_sim, rto_sim.experiments, rto_sim.token_task, rto_sim.sweep; "
            "print(any(m == 'rto_llm' or m.startswith('rto_llm.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("over, msg", [({"arms": ["ppo", "bogus"]}, "unknown arms"), ({"data_H": [7]}, "data_H"),
                                       ({"fractions": [0.5]}, "include 1.0"), ({"H": [1, 3]}, "horizons >= 2"),
                                       ({"rollout_batch": 48}, "multiple of train_batch")])
def test_bad_configs_are_refused_before_anything_is_written(tmp_path, over, msg):
    with pytest.raises(ValueError, match=msg):
        run_experiment("E8", tmp_path, quick=True, **over)
    assert not (tmp_path / "E8").exists()


def test_cli_refuses_mistyped_overrides(tmp_path, capsys):
    from rto_llm.cli import main

    assert main(["experiment", "E8", "--out", str(tmp_path), "--quick", "--set", "seeds=1.5"]) == 2
    assert "'seeds' expects an integer" in capsys.readouterr().err
    assert main(["experiment", "E9", "--out", str(tmp_path)]) == 2
    assert "unknown LLM experiment 'E9'" in capsys.readouterr().err
    assert not (tmp_path / "E8").exists()


# ---------------------------------------------------------------------------------------------------
# verdicts on synthetic data
# ---------------------------------------------------------------------------------------------------


def test_effect_verdict():
    rng = np.random.default_rng(0)
    assert effect_verdict(0.2 + 0.01 * rng.standard_normal(8), 0.05)[0] == "pass"
    assert effect_verdict(-0.2 + 0.01 * rng.standard_normal(8), 0.05)[0] == "fail"
    v, why = effect_verdict(0.001 * rng.standard_normal(8), 0.05)      # a precise null: equivalent to 0
    assert v == "fail" and "TOST" in why
    assert effect_verdict(0.02 + 0.3 * rng.standard_normal(8), 0.05)[0] == "inconclusive"   # noisy: no power
    assert effect_verdict([0.3], 0.05)[0] == "inconclusive"
    assert effect_verdict([0.30, 0.31], 0.05)[0] == "inconclusive"           # 2 seeds: below min_seeds = 3
    assert effect_verdict([0.30, 0.31], 0.05, min_seeds=2)[0] == "pass"


def test_equivalence_verdict():
    rng = np.random.default_rng(1)
    assert equivalence_verdict(0.001 * rng.standard_normal(8), 0.05)[0] == "pass"
    assert equivalence_verdict(0.3 + 0.01 * rng.standard_normal(8), 0.05)[0] == "fail"
    assert equivalence_verdict(-0.3 + 0.01 * rng.standard_normal(8), 0.05)[0] == "fail"
    assert equivalence_verdict(0.3 * rng.standard_normal(8), 0.05)[0] == "inconclusive"


CFG = Config(H=(3, 10), seeds=8, rollouts=8, eval_every=2, fractions=(0.125, 0.25, 0.5, 1.0), data_H=(3,),
             bootstrap=300, margin=0.05)


def synth_table(rate: dict, H=(3, 10), seeds=8, fractions=(1.0,), noise=0.01, seed=0, dpo_rise=None,
                share=0.3, offset=None) -> pd.DataFrame:
    """An E8-shaped table: normalized SubOpt s(t) = 0.5 + 0.5 exp(-rate t) per arm (rate(arm, H, fraction) or a
    number), plus noise per seed and offset[arm](seed); SubOpt(0) = 2; J = J* - SubOpt with J* = 1; the DPO reward
    rises by dpo_rise[arm] over training; rto/share_dpo per rollout."""
    rng = np.random.default_rng(seed)
    rows = []
    steps = range(0, CFG.rollouts + 1, CFG.eval_every)
    for s in range(seeds):
        for h in H:
            for f in fractions:
                for arm, r in rate.items():
                    k = r(h, f) if callable(r) else r
                    e = noise * rng.standard_normal() + (offset or {}).get(arm, lambda _: 0.0)(s)
                    for t in steps:
                        sub = 2.0 if t == 0 else 2.0 * (0.5 + 0.5 * np.exp(-k * t) + e)
                        base = dict(seed=s, H=h, fraction=f, arm=arm, section="eval", step=t)
                        rows += [{**base, "metric": "sub_opt", "value": sub}, {**base, "metric": "J", "value": 1 - sub},
                                 {**base, "metric": "subopt_recheck", "value": 0.0},
                                 {**base, "metric": "dpo_reward",
                                  "value": -0.1 + (dpo_rise or {}).get(arm, 0.0) * t / CFG.rollouts
                                  + 0.001 * rng.standard_normal()}]
                    rows += [dict(seed=s, H=h, fraction=f, arm=arm, section="rollout", step=t, metric="share_dpo",
                                  value=share if arm != "ppo" else 0.0) for t in range(1, 4)]
    return pd.DataFrame(rows)


def test_check_speed_must_pass_and_must_fail():
    fast = run_summaries(synth_table({"ppo": 0.1, "rto": 0.4}), CFG)
    c = check_speed(fast, CFG, 3, "rto", "ppo")
    assert c.verdict == "pass" and c.measured["reached_rto"] == 1.0
    slow = run_summaries(synth_table({"ppo": 0.4, "rto": 0.1}), CFG)
    assert check_speed(slow, CFG, 3, "rto", "ppo").verdict == "fail"
    # the same curves up to +-0.005 (mean difference exactly 0): a precise null
    same = run_summaries(synth_table({"ppo": 0.2, "rto": 0.2}, noise=0.0, offset={"rto": lambda s: 0.005 * (-1) ** s}),
                         CFG)
    c = check_speed(same, CFG, 3, "rto", "ppo")
    assert c.verdict == "fail" and "TOST" in c.note                       # a well-measured null fails the claim
    noisy = run_summaries(synth_table({"ppo": 0.2, "rto": 0.22}, noise=0.0, offset={"rto": lambda s: 0.3 * (-1) ** s}),
                          CFG)                                               # a small effect, large seed spread
    assert check_speed(noisy, CFG, 3, "rto", "ppo").verdict == "inconclusive"
    assert check_speed(fast, CFG, 3, "rto", "absent") is None


def test_check_horizon_must_pass_and_must_fail():
    grows = {"ppo": lambda h, f: 0.3 if h == 3 else 0.05, "rto": 0.3, "rs_ppo": 0.3}   # PPO slows down at long H
    assert check_horizon(run_summaries(synth_table(grows), CFG), CFG).verdict == "pass"
    assert check_horizon(run_summaries(synth_table(grows), CFG), CFG, "rs_ppo", "ppo").verdict == "pass"
    shrinks = {"ppo": lambda h, f: 0.05 if h == 3 else 0.3, "rto": 0.3}
    assert check_horizon(run_summaries(synth_table(shrinks), CFG), CFG).verdict == "fail"
    assert check_horizon(run_summaries(synth_table(shrinks), CFG), CFG, "rs_ppo", "ppo") is None   # arm absent


def test_data_ratio_interpolates_and_censors():
    def final(ppo1, rto):          # seed-mean final normalized SubOpt of PPO at f=1 and RTO per fraction
        fr = [0.125, 0.25, 0.5, 1.0]
        return pd.DataFrame({"seed": 0, "fraction": fr, "ppo": [0.9, 0.8, 0.7, ppo1], "rto": rto})

    assert data_ratio(final(0.6, [0.7, 0.6, 0.5, 0.4])) == pytest.approx(0.25)          # exact hit at 1/4
    assert data_ratio(final(0.6, [0.8, 0.7, 0.5, 0.4])) == pytest.approx(2 ** -1.5)     # halfway in log2 f
    assert data_ratio(final(0.6, [0.5, 0.4, 0.3, 0.2])) == pytest.approx(0.0625)        # censored below 1/8
    assert data_ratio(final(0.6, [0.9, 0.8, 0.7, 0.65])) == np.inf                      # never reached


def test_check_data_must_pass_and_must_fail():
    fr = (0.125, 0.25, 0.5, 1.0)
    # RTO reaches PPO's all-data level with 1/4 of the data: the ratio's interval lies below 1
    good = {"ppo": lambda h, f: 0.05 + 0.2 * f, "rto": lambda h, f: 0.25 + 0.2 * f}
    c = check_data(run_summaries(synth_table(good, H=(3,), fractions=fr), CFG), CFG, 3)
    assert c.verdict == "pass" and float(c.measured["ci95"][1]) < 1
    # RTO is worse than PPO at every data size: it never matches, the interval sits at inf
    bad = {"ppo": lambda h, f: 0.05 + 0.2 * f, "rto": lambda h, f: 0.02 + 0.1 * f}
    c = check_data(run_summaries(synth_table(bad, H=(3,), fractions=fr), CFG), CFG, 3)
    assert c.verdict == "fail" and float(c.measured["ratio"]) == np.inf
    est, lo, hi, vals = bootstrap_ratio(pd.DataFrame({"seed": [0, 0, 1, 1], "fraction": [0.5, 1.0] * 2,
                                                      "ppo": [0.9, 0.5, 0.9, 0.5], "rto": [0.5, 0.4] * 2}), 20)
    assert est == lo == hi == 0.25 and len(vals) == 20


def test_check_rs_ppo_equivalence():
    same = run_summaries(synth_table({"rto": 0.3, "rs_ppo": 0.3, "ppo": 0.1}, noise=0.0,
                                     offset={"rs_ppo": lambda s: 0.005 * (-1) ** s}), CFG)
    assert check_rs_ppo(same, CFG, 3).verdict == "pass"
    apart = run_summaries(synth_table({"rto": 0.6, "rs_ppo": 0.05, "ppo": 0.05}, noise=0.002), CFG)
    assert check_rs_ppo(apart, CFG, 3).verdict == "fail"


def test_check_dpo_reward_must_pass_and_must_fail():
    up = synth_table({"ppo": 0.2, "rto": 0.3}, dpo_rise={"rto": 0.5, "ppo": 0.1})
    c = check_dpo_reward(up, CFG, 3)
    assert c.verdict == "pass" and "rise_ppo" in c.measured
    down = synth_table({"ppo": 0.2, "rto": 0.3}, dpo_rise={"rto": -0.5})
    assert check_dpo_reward(down, CFG, 3).verdict == "fail"


def test_identity_and_design_checks_must_fail_on_broken_data():
    t = synth_table({"ppo": 0.2, "rto": 0.3})
    assert check_pairing(t).verdict == "pass" and check_subopt_nonneg(t).verdict == "pass"
    broken = t.copy()
    i = broken.index[(broken.metric == "J") & (broken.step == 0) & (broken.arm == "rto")][0]
    broken.loc[i, "value"] += 1e-6                                                   # arms start apart
    assert check_pairing(broken).verdict == "fail"
    neg = t.copy()
    neg.loc[neg.index[neg.metric == "sub_opt"][3], "value"] = -1e-3
    assert check_subopt_nonneg(neg).verdict == "fail"
    off = t.copy()
    off.loc[off.metric == "subopt_recheck", "value"] = 1e-3                          # trainer != direct evaluation
    assert check_subopt_nonneg(off).verdict == "fail"
    assert check_dpo_share(t, CFG).verdict == "pass"
    assert check_dpo_share(synth_table({"ppo": 0.2, "rto": 0.3}, share=0.05), CFG).verdict == "fail"


# ---------------------------------------------------------------------------------------------------
# end to end: tiny E8 killed mid-sweep, resumed, checked, drawn
# ---------------------------------------------------------------------------------------------------


def _cells(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture(scope="module")
def e8_tiny(tmp_path_factory):
    """A tiny E8 run started with `rto-llm experiment`, killed after its first rl cells, then resumed."""
    out = tmp_path_factory.mktemp("e8")
    sets = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(out / "killed_run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rto_llm.cli", "experiment", "E8", "--out", str(out), "--quick",
                             "--set", *sets], cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    cells = out / "E8" / "rl" / "cells"
    t0 = time.time()
    while len(list(cells.glob("*.parquet"))) < 3 and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.2)
    assert proc.poll() is None, (out / "killed_run.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    before = _cells(cells)
    prep_before = _cells(out / "E8" / "prep" / "cells")
    assert 3 <= len(before) < 28 and len(prep_before) == 4
    t1 = time.perf_counter()
    summary = run_experiment("E8", out, quick=True, **TINY)
    return {"out": out, "summary": summary, "before": before, "prep_before": prep_before,
            "resume_s": time.perf_counter() - t1}


def test_resume_keeps_finished_cells_and_completes(e8_tiny):
    cells = e8_tiny["out"] / "E8" / "rl" / "cells"
    after = _cells(cells)
    assert len(after) == 28     # 2 seeds x (2 H x (4 arms + 2 slow arms) + 2 data arms at fraction 0.5)
    assert all(after[k] == v for k, v in e8_tiny["before"].items())       # finished cells were not recomputed
    assert _cells(e8_tiny["out"] / "E8" / "prep" / "cells") == e8_tiny["prep_before"]
    assert not list(cells.parent.glob("**/*.tmp"))


def test_tiny_run_table_summary_and_identities(e8_tiny):
    from rto_sim.results import read_table

    s, out = e8_tiny["summary"], e8_tiny["out"]
    table = read_table(out / "E8" / "results")
    assert set(table.section) == {"prep", "timing", "eval", "rollout"}
    assert {"sub_opt", "J", "gold_return", "kl", "dpo_reward", "win_rate"} <= set(table[table.section == "eval"].metric)
    prep = set(table[table.section == "prep"].metric)
    assert {"rm_gold_corr", "dpo_gold_corr", "subopt0", "rm_heldout_accuracy"} <= prep
    for cid in ("E8_pairing", "E8_subopt_nonneg"):
        assert s["checks"][cid]["verdict"] == "pass", s["checks"][cid]
    assert {"S15_rto_vs_ppo_H3", "S15_rto_vs_ppo_slow_H4", "S16_horizon_rto", "S16_horizon_density",
            "S18_density_H3", "S17_data_ratio_H3", "S18_rto_vs_ddpo_H4", "S18_rs_ppo_H3", "S19_dpo_reward_H3"} \
        <= set(s["checks"])
    for c in s["checks"].values():
        assert c["verdict"] in ("pass", "fail", "inconclusive")
    # the checks rerun from the saved table give the same summary
    again = e8.checks(table, make_config("E8", quick=True, **TINY))
    assert json.dumps({k: c.to_dict() for k, c in again.items()}, sort_keys=True, default=str) == \
        json.dumps(s["checks"], sort_keys=True, default=str)
    # models are kept for the prep cells only; rl runs keep their logs
    runs = sorted((out / "E8" / "runs").iterdir())
    assert len(runs) == 28 and all(sorted(os.listdir(r)) == ["config.yaml", "metrics.jsonl"] for r in runs)


def test_a_prep_cell_whose_models_were_deleted_is_redone(e8_tiny, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(e8_tiny["out"], out)
    art = out / "E8" / "artifacts" / "s0_H3"
    (art / "done.json").unlink()
    t0 = time.perf_counter()
    run_experiment("E8", out, quick=True, **TINY)
    assert (art / "done.json").exists() and time.perf_counter() - t0 < 600


def test_e8_figures(e8_tiny):
    from paper_figures import e8 as fig

    paths = fig.draw(e8_tiny["summary"], e8_tiny["out"])
    names = {p.stem for p in paths}
    assert names == {"E8_learning_curves", "E8_horizon", "E8_data_scaling", "E8_dpo_reward", "E8_frontier"}
    assert all(p.stat().st_size > 1000 for p in paths)


# ---------------------------------------------------------------------------------------------------
# quickstart
# ---------------------------------------------------------------------------------------------------


def test_quickstart_tiny(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", "rto_llm.quickstart", "--tiny", "--out", str(tmp_path / "qs")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    assert set(s["policies"]) == {"sft", "ppo", "rto"}
    assert s["policies"]["sft"]["kl"] == pytest.approx(0.0, abs=1e-12)
    assert all(v["sub_opt"] >= 0 for v in s["policies"].values())
    for name in ("plot", "summary"):
        assert Path(s["files"][name]).stat().st_size > 500
    assert "SubOpt" in res.stdout and "plot:" in res.stdout
    # the curves come from the trainer's exact evaluation: the last point equals the final exact evaluation
    assert s["curves"]["ppo"][-1]["sub_opt"] == pytest.approx(s["policies"]["ppo"]["sub_opt"], abs=1e-6)


def test_quickstart_sizes_reach_every_step_and_a_large_task_is_evaluated_by_sampling(tmp_path):
    """`quickstart.run(sizes=...)` (what benchmarks/gpu_check.py uses): the task, export and preference sizes and
    each stage's overrides are applied; a task too large to enumerate (8^12 responses per prompt) is evaluated
    by sampling, by the trainers and at the end."""
    from rto_llm import quickstart

    small = ["ppo.max_rollouts=1", "rollout.batch_size=8", "rollout.generation_batch_size=8",
             "rollout.forward_batch_size=8", "train.batch_size=8", "train.micro_batch_size=8", "eval.every=1"]
    sizes = {**quickstart.TINY, "task": {"A": 8, "H": 12, "n_prompts": 2},
             "export": {**quickstart.TINY["export"], "hidden_size": 16, "num_layers": 1},
             "ppo": small, "rto": small}
    s = quickstart.run(tmp_path / "qs", sizes=sizes, verbose=False)
    assert {v["method"] for v in s["policies"].values()} == {"sampled"}
    task = json.loads((tmp_path / "qs" / "task" / "task.json").read_text())
    assert (task["A"], task["H"], task["n_prompts"]) == (8, 12, 2)
    assert len((tmp_path / "qs" / "prefs.jsonl").read_text().splitlines()) == quickstart.TINY["preferences"]["n_pairs"]
    assert [r["step"] for r in s["curves"]["ppo"]] == [0, 1]      # eval.every=1, max_rollouts=1 reached the stage
    assert all(np.isfinite(v[k]) for v in s["policies"].values() for k in ("sub_opt", "J", "kl"))


def test_gpu_check_token_task_sizes_are_valid_stage_configs():
    """benchmarks/gpu_check.py section 5 cannot run here (it needs a GPU): its sizes at least build the task and
    load as the shipped stage configs (every override a known key with a valid value)."""
    import importlib.util

    from rto_llm.cli import STAGES
    from rto_llm.config import load_config
    from rto_llm.experiments.pipeline import stage_overrides
    from rto_llm.quickstart import DEFAULT_CONFIGS, STAGE_FILES, _read_yaml
    from rto_sim.token_task import make_token_task

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    sizes = gpu_check.TOKEN_TASK_GPU
    task = make_token_task(**{**_read_yaml(DEFAULT_CONFIGS / "task.yaml")["task"], **sizes["task"]})
    assert (task.A, task.H) == (16, 24)
    for stage in STAGE_FILES:
        cfg = load_config(STAGES[stage][0], str(DEFAULT_CONFIGS / f"{stage}.yaml"),
                          [*sizes[stage], *stage_overrides(task), "train.device=cpu"])
        assert cfg.train.batch_size % cfg.train.micro_batch_size == 0


def test_quickstart_refuses_a_config_folder_without_the_files(tmp_path, capsys):
    from rto_llm.quickstart import main

    assert main(["--configs", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "missing task.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# paper_figures: E8 at its smoke size (--quick --only E8), and the LLM-logs-only path (--only llm)
# ---------------------------------------------------------------------------------------------------


def test_paper_figures_only_e8_and_only_llm(e8_tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out, report = tmp_path / "out", tmp_path / "REPORT.md"
    res = subprocess.run([sys.executable, "-m", "paper_figures", "--quick", "--only", "E8", "--out", str(out),
                          "--report", str(report)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for stem in ("E8_learning_curves", "E8_horizon", "E8_data_scaling", "E8_dpo_reward", "E8_frontier"):
        assert (out / "figures" / f"{stem}.png").stat().st_size > 1000, stem
    assert not (out / "E0").exists() and not (out / "figures" / "DPO_token_reward_heatmap.png").exists()
    s = json.loads((out / "E8" / "summary.json").read_text())
    assert s["config"]["seeds"] == e8.SMOKE["seeds"] and s["quick"]
    text = report.read_text()
    assert all(f"| E8 (quick) | {cid} |" in text for cid in s["checks"])
    # the rto_llm logs alone: no experiment runs, the report is not rewritten
    logs = e8_tiny["out"] / "E8" / "runs"
    res = subprocess.run([sys.executable, "-m", "paper_figures", "--only", "llm", "--llm-logs", str(logs), "--out",
                          str(tmp_path / "llm"), "--report", str(tmp_path / "R2.md")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "llm" / "figures" / "LLM_ppo_vs_rto.png").exists() and not (tmp_path / "R2.md").exists()
    assert "running" not in res.stdout
