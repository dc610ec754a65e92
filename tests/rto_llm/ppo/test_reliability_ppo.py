"""Lifecycle guarantees of the PPO / RTO loop (issue 12; the stage-trainer side is tests/rto_llm/test_reliability.py):
the non-finite guard with and without perf.stop_on_nonfinite, no duplicated metric rows after a crash, checks
before any model loads, resume checks on rollout counts, periodic Hugging Face exports of the actor."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rto_llm.config import ConfigError
from rto_llm.guard import NonFiniteError
from rto_llm.lifecycle import ResumeMismatchError


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _poison_rm(trainer) -> None:
    with torch.no_grad():
        trainer.roles.reward_model.score.weight.fill_(float("nan"))


def test_guard_without_any_checkpoint_says_so(make_trainer):
    tr = make_trainer("ppo.max_rollouts=2")
    _poison_rm(tr)
    with pytest.raises(NonFiniteError, match="rollout 1: non-finite .*no checkpoint was saved"):
        tr.train()
    assert not os.path.exists(tr.ckpt_dir)


def test_guard_off_never_saves_or_marks_nonfinite_weights_latest(make_trainer, tmp_path):
    out = tmp_path / "off"
    make_trainer("ppo.max_rollouts=3", "perf.stop_on_nonfinite=false", out=out).train(stop_after=1)
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step-00000001"
    tr = make_trainer("ppo.max_rollouts=3", "perf.stop_on_nonfinite=false", "checkpoint.resume=latest",
                      "checkpoint.save_every=1", out=out)
    _poison_rm(tr)      # NaN scores -> NaN losses -> with the guard off the optimizer steps into NaN weights
    with pytest.raises(NonFiniteError, match="the model's parameters hold NaN/inf; refusing to save checkpoint "
                                             "step-0000000[23]; the last good checkpoint is ") as err:
        tr.train()
    assert not all(bool(torch.isfinite(p).all()) for p in tr.roles.actor.parameters())   # the weights are NaN
    latest = (root / "latest").read_text()
    assert str(root / latest) in str(err.value)
    for d in sorted(os.listdir(root)):
        if d.startswith("step-"):      # every saved checkpoint holds finite weights
            for role in ("actor", "critic"):
                state = torch.load(root / d / role / "engine.pt", weights_only=True)["model"]
                assert all(bool(torch.isfinite(v).all()) for v in state.values())
    assert not (out / "final").exists()


def test_resume_after_a_crash_logs_every_rollout_once(make_trainer, tmp_path):
    common = ("ppo.max_rollouts=4", "checkpoint.save_every=2")
    make_trainer(*common, out=tmp_path / "clean").train()
    out = tmp_path / "crash"
    tr = make_trainer(*common, out=out)
    orig = tr.rollout_step

    def crash_in_rollout_4(k):
        if k == 3:
            raise KeyboardInterrupt("killed")
        return orig(k)

    tr.rollout_step = crash_in_rollout_4
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]          # rollout 3 was logged after the last checkpoint
    make_trainer(*common, "checkpoint.resume=latest", out=out).train()
    got, want = _rows(out), _rows(tmp_path / "clean")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["objective/kl"] for r in got] == [r["objective/kl"] for r in want]


def test_prompts_and_batch_sizes_are_checked_before_any_model_loads(make_trainer, monkeypatch):
    import rto_llm.ppo.trainer as trainer_mod

    def no_roles(*a, **k):
        raise AssertionError("the models were loaded before the prompt and batch checks")

    monkeypatch.setattr(trainer_mod, "load_roles", no_roles)
    with pytest.raises(ConfigError, match="larger than the prompt set"):
        make_trainer(rollout=128, train_batch=8)


def test_resume_checks_the_rollout_count_and_the_config(make_trainer, tmp_path):
    out = tmp_path / "r"
    make_trainer("ppo.max_rollouts=2", out=out).train(stop_after=1)
    with pytest.raises(ResumeMismatchError, match=r"ppo.max_rollouts \(checkpoint 2, now 3\).*--resume-allow-changes"):
        make_trainer("ppo.max_rollouts=3", "checkpoint.resume=latest", out=out)
    with pytest.raises(ResumeMismatchError, match=r"kl.beta2 \(checkpoint 0.01, now 0.02\)"):
        make_trainer("ppo.max_rollouts=2", "kl.beta2=0.02", "checkpoint.resume=latest", out=out)
    tr = make_trainer("ppo.max_rollouts=3", "checkpoint.resume=latest", "checkpoint.allow_changes=ppo.max_rollouts",
                      out=out)
    assert [h["step"] for h in tr.train()] == [2, 3]
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]


def test_save_hf_every_exports_the_actor(make_trainer, tmp_path):
    from transformers import AutoModelForCausalLM

    tr = make_trainer("ppo.max_rollouts=2", "checkpoint.save_hf_every=1", "checkpoint.export_hf=false")
    tr.train()
    hf = os.path.join(tr.cfg.train.output_dir, "hf")
    assert sorted(os.listdir(hf)) == ["step-00000001", "step-00000002"]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(hf, "step-00000002"))
    actor = tr.roles.actor.state_dict()
    assert all(torch.equal(v, actor[k]) for k, v in model.state_dict().items())
