"""Periodic evaluation of the SFT / RM / DPO stages on data.eval_path (the ``eval`` section)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rto_llm.config import ConfigError, DPOConfig, RMConfig, SFTConfig, load_config
from rto_llm.testing import toy_preference_rows, toy_sft_rows, write_jsonl
from rto_llm.trainers.dpo import DPOTrainer
from rto_llm.trainers.rm import RMTrainer
from rto_llm.trainers.sft import SFTTrainer


def _rows(cfg) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(cfg.train.output_dir, "metrics.jsonl"))]


def _eval_rows(cfg) -> list[dict]:
    return [r for r in _rows(cfg) if "eval/loss" in r]


@pytest.fixture
def held_out(tmp_path):
    return {"sft": write_jsonl(str(tmp_path / "eval_sft.jsonl"), toy_sft_rows(24, seed=7)),
            "pref": write_jsonl(str(tmp_path / "eval_pref.jsonl"), toy_preference_rows(24, seed=7))}


@pytest.mark.parametrize("cls, trainer, data, keys", [
    (SFTConfig, SFTTrainer, "sft", {"eval/loss"}),
    (RMConfig, RMTrainer, "pref", {"eval/loss", "eval/accuracy", "eval/reward_margin"}),
    (DPOConfig, DPOTrainer, "pref", {"eval/loss", "eval/accuracy", "eval/reward_margin", "eval/chosen_reward",
                                     "eval/rejected_reward"}),
])
def test_periodic_eval_rows_at_the_right_steps(make_cfg, held_out, cls, trainer, data, keys):
    cfg = make_cfg(cls, "train.max_steps=5", "eval.every=2", "eval.at_start=true", "checkpoint.export_hf=false",
                   f"data.eval_path={held_out[data]}", "train.lr=1e-3", data=data)
    tr = trainer(cfg)
    hist = tr.train()
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5]
    ev = _eval_rows(cfg)
    assert [r["step"] for r in ev] == [0, 2, 4, 5]                  # start, every 2 steps, after the last
    assert all(keys <= set(r) for r in ev), [keys - set(r) for r in ev]
    assert tr.eval_history == ev
    assert ev[-1]["eval/loss"] < ev[0]["eval/loss"]                 # held-out rows improve with training


def test_eval_batch_size_does_not_change_the_result(make_cfg, held_out, tmp_path):
    res = []
    for bs in (0, 3):
        cfg = make_cfg(SFTConfig, "train.max_steps=1", f"eval.batch_size={bs}", "checkpoint.export_hf=false",
                       f"data.eval_path={held_out['sft']}", f"train.output_dir={tmp_path / str(bs)}")
        tr = SFTTrainer(cfg)
        tr.train()
        res.append(tr.eval_history[-1]["eval/loss"])
    assert res[0] == pytest.approx(res[1], abs=1e-5)


def test_eval_does_not_change_sft_training(make_cfg, held_out, tmp_path):
    runs = []
    for name, extra in (("plain", ()), ("eval", ("eval.every=1", "eval.at_start=true",
                                                   f"data.eval_path={held_out['sft']}"))):
        cfg = make_cfg(SFTConfig, "train.max_steps=4", "train.lr=1e-3", "checkpoint.export_hf=false",
                       "model.dropout=true", f"train.output_dir={tmp_path / name}", *extra)
        tr = SFTTrainer(cfg)
        runs.append((tr.train(), tr))
    (ha, a), (hb, b) = runs
    strip = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in ha]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in hb]
    sa, sb = a.engine.module.state_dict(), b.engine.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and len(b.eval_history) == 5


def test_eval_config_errors_name_the_field(tiny_model_dir, toy_data, capsys):
    base = [f"model.path={tiny_model_dir}", f"data.train_path={toy_data['sft']}"]
    with pytest.raises(ConfigError, match="eval.every=5 needs evaluation data: set data.eval_path"):
        load_config(SFTConfig, None, base + ["eval.every=5"])
    with pytest.raises(ConfigError, match="eval.every must be >= 0"):
        load_config(SFTConfig, None, base + ["eval.every=-1"])
    with pytest.raises(ConfigError, match="unknown config key 'eval.gold'"):     # the generation options are ppo/rto
        load_config(DPOConfig, None, base + ["eval.gold=m:f"])
    from rto_llm.cli import main

    for stage, want in (("sft", "eval.every (int, default 0)"), ("rto", "eval.gold (str, default '')"),
                        ("ppo", "eval.num_samples (int, default 4)")):
        with pytest.raises(SystemExit):
            main([stage, "--help"])
        assert want in capsys.readouterr().out


def test_two_process_zero3_dpo_evaluates_like_one_process(make_cfg, held_out, tmp_path):
    """DeepSpeed ZeRO-3, 2 processes (each evaluates half of the pairs): the same training losses and the same
    evaluation rows as one plain-torch process."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    from rto_llm.distributed import free_port

    ev = ["eval.every=2", "eval.at_start=true", f"data.eval_path={held_out['pref']}"]
    cfg = make_cfg(DPOConfig, "train.lr=1e-3", "train.max_steps=4", f"train.output_dir={tmp_path / 'single'}", *ev,
                   data="pref")
    DPOTrainer(cfg).train()
    ds_dir = tmp_path / "ds"
    args = [f"model.path={cfg.model.path}", f"data.train_path={cfg.data.train_path}", "log.progress_bar=false",
            "log.tensorboard=false", "train.device=cpu", f"train.batch_size={cfg.train.batch_size}", "train.lr=1e-3",
            "train.max_steps=4", "train.micro_batch_size=4", "deepspeed.enabled=true", "deepspeed.zero_stage=3",
            f"train.output_dir={ds_dir}", *ev]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "rto_llm.cli", "dpo", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    one, two = _rows(cfg), [json.loads(x) for x in open(ds_dir / "metrics.jsonl")]
    train = [[r["train/loss"] for r in rows if "train/loss" in r] for rows in (one, two)]
    assert len(train[0]) == 4 and train[1] == pytest.approx(train[0], abs=1e-5)
    evals = [[r for r in rows if "eval/loss" in r] for rows in (one, two)]
    assert [r["step"] for r in evals[1]] == [r["step"] for r in evals[0]] == [0, 2, 4]
    for a, b in zip(*evals):
        for k in ("eval/loss", "eval/accuracy", "eval/reward_margin"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k
