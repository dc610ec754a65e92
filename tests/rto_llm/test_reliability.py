"""The trainer's lifecycle under bad inputs (issue 12): safe loading, the non-finite guard, resume checks and
fallbacks, one-line CLI errors, periodic Hugging Face exports, checks before any model loads.

Each test feeds the defect it pins (a crafted pickle, lr=1e30, a changed config, a truncated file, ...) and
checks the run refuses or recovers as documented in rto_llm/README.md "What is guaranteed"."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from rto_llm import checkpoint as ckpt
from rto_llm.checkpoint import CheckpointError
from rto_llm.config import ConfigError, DPOConfig, RMConfig, SFTConfig, load_config
from rto_llm.guard import NonFiniteError
from rto_llm.lifecycle import ResumeMismatchError
from rto_llm.trainers.dpo import DPOTrainer
from rto_llm.trainers.rm import RMTrainer
from rto_llm.trainers.sft import SFTTrainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = ("checkpoint.export_hf=false",)


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _strip(hist):
    return [{k: v for k, v in h.items() if not k.startswith("perf/")} for h in hist]


def _finite_state(path) -> bool:
    state = torch.load(path, weights_only=True)["model"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


class _Evil:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker) -> None:
    """Replace ``path`` (inside a checkpoint) by a crafted pickle and fix the manifest, as an attacker would."""
    torch.save({"payload": _Evil(str(marker))}, path)
    step_dir = os.path.dirname(path)
    while not os.path.isfile(os.path.join(step_dir, "trainer_state.json")):
        step_dir = os.path.dirname(step_dir)
    ckpt.write_manifest(step_dir)


def _assert_dangerous(path, marker) -> None:
    """The planted file really runs code under weights_only=False (so refusing it is what the test checks)."""
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)
    os.remove(marker)


# ---------------------------------------------------------------------------------------------------
# 1. Nothing is unpickled
# ---------------------------------------------------------------------------------------------------


def test_no_weights_only_false_anywhere_in_the_packages():
    hits = []
    for pkg in ("rto_llm", "rto_sim"):
        for dirpath, _, names in os.walk(os.path.join(REPO, pkg)):
            for n in names:
                if n.endswith(".py"):
                    text = open(os.path.join(dirpath, n)).read()
                    if "weights_only=False" in text:
                        hits.append(os.path.join(dirpath, n))
    assert hits == []


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()     # cached gaussians are part of the state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expect = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:4] == expect[:4] and torch.equal(got[4], expect[4])


@pytest.mark.parametrize("target", ["rng_rank0.pt", "engine.pt"])
def test_crafted_pickle_in_a_checkpoint_is_refused_not_executed(make_cfg, tmp_path, target):
    cfg = make_cfg(SFTConfig, "train.max_steps=3", *QUIET)
    SFTTrainer(cfg).train(stop_after=1)
    path = os.path.join(cfg.train.output_dir, "checkpoints", "step-00000001", target)
    marker = tmp_path / "pwned"
    _plant(path, marker)
    _assert_dangerous(path, marker)
    resumed = SFTTrainer(make_cfg(SFTConfig, "train.max_steps=3", "checkpoint.resume=latest", *QUIET))
    with pytest.raises(CheckpointError, match="refused to load"):
        resumed.train()
    assert not os.path.exists(marker)


def test_crafted_pickle_in_ppo_state_is_refused(tmp_path):
    from rto_llm.distributed import DistInfo

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    loaded = []
    group = ckpt.EngineGroup({}, lambda: {"kl_coef": 0.1}, loaded.append, info, state_file="ppo_state.pt")
    group.save(str(tmp_path))
    group.load(str(tmp_path))
    assert loaded == [{"kl_coef": 0.1}]       # plain state loads
    marker = tmp_path / "pwned"
    torch.save({"kl_coef": _Evil(str(marker))}, tmp_path / "ppo_state.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        group.load(str(tmp_path))
    assert not os.path.exists(marker) and len(loaded) == 1


def test_crafted_pickle_in_a_deepspeed_checkpoint_is_refused(make_cfg, tmp_path):
    pytest.importorskip("deepspeed")
    common = ("train.max_steps=3", "deepspeed.enabled=true", "deepspeed.zero_stage=2", *QUIET)
    SFTTrainer(make_cfg(SFTConfig, *common)).train(stop_after=1)
    ds_dir = os.path.join(make_cfg(SFTConfig).train.output_dir, "checkpoints", "step-00000001", "ds")
    optim = [f for f in os.listdir(ds_dir) if "optim_states" in f]
    assert optim
    # DeepSpeed's own files load under weights_only=True (with its few plain classes allowed) ...
    resumed = SFTTrainer(make_cfg(SFTConfig, *common, "checkpoint.resume=latest"))
    assert [h["step"] for h in resumed.train()] == [2, 3]
    # ... a planted object does not
    shutil.rmtree(os.path.join(make_cfg(SFTConfig).train.output_dir, "final"), ignore_errors=True)
    marker = tmp_path / "pwned"
    _plant(os.path.join(ds_dir, optim[0]), marker)
    again = SFTTrainer(make_cfg(SFTConfig, *common, "checkpoint.resume=" + os.path.dirname(ds_dir)))
    with pytest.raises(CheckpointError, match="refused to load"):
        again.train()
    assert not os.path.exists(marker)


# ---------------------------------------------------------------------------------------------------
# 2. The non-finite guard
# ---------------------------------------------------------------------------------------------------


def test_huge_lr_stops_and_never_saves_or_exports_nonfinite_weights(make_cfg):
    cfg = make_cfg(SFTConfig, "train.lr=1e30", "train.max_steps=8", "checkpoint.save_every=1",
                   "checkpoint.keep_last=1")
    with pytest.raises(NonFiniteError, match="non-finite") as err:
        SFTTrainer(cfg).train()
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    latest = open(os.path.join(root, "latest")).read()
    assert os.path.join(root, latest) in str(err.value)          # names the last good checkpoint
    for d in ckpt.step_dirs(root):
        assert ckpt.checkpoint_problem(os.path.join(root, d)) is None
        assert _finite_state(os.path.join(root, d, "engine.pt"))
    assert not os.path.exists(os.path.join(cfg.train.output_dir, "final"))


def _nan_grads_from(model, step_box, bad_step):
    p = next(model.parameters())
    p.register_hook(lambda g: g * float("nan") if step_box[0] == bad_step else g)


@pytest.mark.parametrize("engine", ["torch", "zero0", "zero2"])
def test_guard_checks_the_gradient_norm_before_the_optimizer_step(make_cfg, engine):
    """Finite loss, NaN gradients at step 2: stop before the step; weights and optimizer are untouched."""
    extra = () if engine == "torch" else ("deepspeed.enabled=true", f"deepspeed.zero_stage={engine[-1]}")
    if extra:
        pytest.importorskip("deepspeed")
    tr = SFTTrainer(make_cfg(SFTConfig, "train.lr=1e-3", "train.max_steps=4", *extra, *QUIET))
    done = [0]          # optimizer steps entered so far; step 2's backward runs while done == [1]
    _nan_grads_from(tr.engine.module, done, 1)
    before, lrs = {}, {}
    orig_step = tr.engine.optimizer_step

    def step(check=None):
        done[0] += 1
        before[done[0]] = {k: v.clone() for k, v in tr.engine.module.state_dict().items()}
        lrs[done[0]] = tr.engine.lr()
        return orig_step(check=check)

    tr.engine.optimizer_step = step
    with pytest.raises(NonFiniteError, match="step 2: non-finite gradient norm") as err:
        tr.train()
    assert "no checkpoint was saved" in str(err.value)
    after = tr.engine.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before[2].items())       # step 2 changed no weight
    assert not all(torch.equal(after[k], v) for k, v in before[1].items())   # (step 1 did change them)
    assert tr.engine.lr() == lrs[2]                                           # nor the schedule


def test_guard_stops_on_a_nonfinite_loss_and_names_the_checkpoint(make_cfg):
    tr = SFTTrainer(make_cfg(SFTConfig, "train.max_steps=4", "checkpoint.save_every=2", *QUIET))
    orig, calls = tr.micro_batch_loss, [0]

    def loss_nan_at_step_3(model, batch):
        calls[0] += 1
        loss, m, u = orig(model, batch)
        return (loss * float("nan"), m, u) if calls[0] > 4 else (loss, m, u)   # 2 micro-batches per step

    tr.micro_batch_loss = loss_nan_at_step_3
    with pytest.raises(NonFiniteError, match="step 3: non-finite loss") as err:
        tr.train()
    assert "checkpoints/step-00000002" in str(err.value)
    assert [r["step"] for r in _rows(tr.cfg.train.output_dir)] == [1, 2]


def test_nonfinite_weights_are_never_saved_pointed_at_or_exported(make_cfg):
    tr = SFTTrainer(make_cfg(SFTConfig, "train.max_steps=2", "checkpoint.save_every=1", *QUIET))
    tr.train()
    root = tr.ckpt_dir
    before = sorted(os.listdir(root))
    with torch.no_grad():
        next(tr.engine.module.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="parameters hold NaN/inf; refusing to save"):
        tr.save_checkpoint(3)
    with pytest.raises(NonFiniteError, match="refusing to export"):
        tr.export(os.path.join(tr.cfg.train.output_dir, "final"))
    assert sorted(os.listdir(root)) == before and open(os.path.join(root, "latest")).read() == "step-00000002"
    assert not os.path.exists(os.path.join(tr.cfg.train.output_dir, "final"))


def _float_fields(cls):
    import dataclasses
    from typing import get_type_hints

    cfg = cls()
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        hints = get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if hints[f.name] is float:
                yield f"{sec.name}.{f.name}"


def test_every_float_field_refuses_nan_and_inf(tmp_path):
    from rto_llm.config import _coerce
    from rto_llm.ppo.config import PPOConfig, RTOConfig

    checked = 0
    for cls in (SFTConfig, RMConfig, DPOConfig, PPOConfig, RTOConfig):
        for key in _float_fields(cls):
            for bad in ("nan", "inf", "-inf", "NaN"):
                with pytest.raises(ConfigError, match=f"{key}: .* is not a finite number"):
                    load_config(cls, None, [f"{key}={bad}"])
            assert _coerce("1e-3", float, key, True) == 1e-3       # finite values still parse
            checked += 1
    assert checked > 30
    y = tmp_path / "c.yaml"
    y.write_text("model: {path: m}\ndata: {train_path: d}\ntrain: {lr: .nan}\n")
    with pytest.raises(ConfigError, match="train.lr: nan is not a finite number"):
        load_config(SFTConfig, str(y))


# ---------------------------------------------------------------------------------------------------
# 3. Resume: what is checked, fallbacks, logs, output directory
# ---------------------------------------------------------------------------------------------------


def test_resume_refuses_a_changed_config_naming_the_keys(make_cfg):
    cfg = make_cfg(SFTConfig, "train.max_steps=4", *QUIET)
    SFTTrainer(cfg).train(stop_after=2)
    saved_yaml = open(os.path.join(cfg.train.output_dir, "config.yaml")).read()
    with pytest.raises(ResumeMismatchError, match=r"train.batch_size \(checkpoint 16, now 8\).*train.lr") as err:
        SFTTrainer(make_cfg(SFTConfig, "train.max_steps=4", "train.lr=1e-3", "train.batch_size=8",
                            "checkpoint.resume=latest", *QUIET))
    assert "cannot change within a run" in str(err.value)
    assert open(os.path.join(cfg.train.output_dir, "config.yaml")).read() == saved_yaml   # not rewritten


def test_resume_allows_listed_changes_only(make_cfg):
    cfg = make_cfg(SFTConfig, "train.max_steps=4", *QUIET)
    SFTTrainer(cfg).train(stop_after=2)
    with pytest.raises(ResumeMismatchError, match="--resume-allow-changes train.max_steps"):
        SFTTrainer(make_cfg(SFTConfig, "train.max_steps=6", "checkpoint.resume=latest", *QUIET))
    with pytest.raises(ConfigError, match="train.lr may not change on resume"):
        make_cfg(SFTConfig, "checkpoint.allow_changes=train.lr", "checkpoint.resume=latest")
    tr = SFTTrainer(make_cfg(SFTConfig, "train.max_steps=6", "checkpoint.resume=latest",
                             "checkpoint.allow_changes=train.max_steps", "log.every=2", *QUIET))
    assert [h["step"] for h in tr.train()] == [3, 4, 5, 6]     # log.every and checkpoint keys may change freely


def _rewrite_state(path, state) -> None:
    with open(path, "w") as f:
        json.dump(state, f)
    ckpt.write_manifest(os.path.dirname(path))


def test_resume_compares_settings_newer_than_the_checkpoint_with_their_defaults(make_cfg, caplog):
    tr = SFTTrainer(make_cfg(SFTConfig, "train.max_steps=3", "train.lr=1e-3", *QUIET))
    tr.train(stop_after=1)
    path = os.path.join(tr.ckpt_dir, "step-00000001", "trainer_state.json")
    state = json.load(open(path))
    del state["config"]["train.adam_eps"]                # "added later", run at its default: accepted
    state["config"]["train.retired_option"] = 3          # "removed since": ignored with a warning
    _rewrite_state(path, state)
    with caplog.at_level(logging.WARNING, logger="rto_llm"):
        SFTTrainer(make_cfg(SFTConfig, "train.max_steps=3", "train.lr=1e-3", "checkpoint.resume=latest", *QUIET))
    assert "train.retired_option" in caplog.text
    del state["config"]["train.lr"]                      # "added later", but this run sets it: refused
    _rewrite_state(path, state)
    with pytest.raises(ResumeMismatchError, match=r"train.lr \(checkpoint 1e-05, now 0.001\)"):
        SFTTrainer(make_cfg(SFTConfig, "train.max_steps=3", "train.lr=1e-3", "checkpoint.resume=latest", *QUIET))


def test_resume_refuses_a_checkpoint_of_another_stage(make_cfg):
    SFTTrainer(make_cfg(SFTConfig, "train.max_steps=2", *QUIET)).train(stop_after=1)
    with pytest.raises(ResumeMismatchError, match="checkpoint of stage 'sft', not 'dpo'"):
        DPOTrainer(make_cfg(DPOConfig, "train.max_steps=2", "checkpoint.resume=latest", *QUIET, data="pref"))


def test_resume_refuses_a_checkpoint_of_another_model(make_cfg, tmp_path):
    from rto_llm.testing import save_tiny_model

    SFTTrainer(make_cfg(SFTConfig, "train.max_steps=2", *QUIET)).train(stop_after=1)
    other = save_tiny_model(str(tmp_path / "wider"), hidden_size=32)
    tr = SFTTrainer(make_cfg(SFTConfig, "train.max_steps=2", "checkpoint.resume=latest", f"model.path={other}",
                             "checkpoint.allow_changes=model.path", *QUIET))
    with pytest.raises(ResumeMismatchError, match="holds another model: the checkpoint has a LlamaForCausalLM"):
        tr.train()


def _six_steps(make_cfg, out, *extra):
    return SFTTrainer(make_cfg(SFTConfig, "train.lr=1e-3", "train.max_steps=6", "checkpoint.save_every=2",
                               "checkpoint.keep_last=3", f"train.output_dir={out}", *QUIET, *extra))


@pytest.mark.parametrize("damage", ["truncated", "deleted", "garbage_pointer", "no_pointer"])
def test_resume_falls_back_to_the_newest_complete_checkpoint(make_cfg, tmp_path, caplog, damage):
    full = _six_steps(make_cfg, tmp_path / "full")
    h_full = full.train()
    out = tmp_path / "part"
    _six_steps(make_cfg, out).train(stop_after=4)
    root = out / "checkpoints"
    assert ckpt.step_dirs(str(root)) == ["step-00000002", "step-00000004"]
    if damage == "truncated":
        p = root / "step-00000004" / "engine.pt"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "deleted":
        shutil.rmtree(root / "step-00000004")
    elif damage == "garbage_pointer":
        (root / "latest").write_text("../../etc")
        shutil.rmtree(root / "step-00000004")
    else:
        (root / "latest").unlink()
        shutil.rmtree(root / "step-00000004")
    with caplog.at_level(logging.WARNING, logger="rto_llm"):
        resumed = _six_steps(make_cfg, out, "checkpoint.resume=latest")
        h = resumed.train()
    assert "falling back to the newest complete checkpoint" in caplog.text and "step-00000002" in caplog.text
    assert _strip(h) == _strip(h_full[2:])                                   # resumed at step 2, exactly
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6]            # rows 3-4 not duplicated


def test_an_explicit_incomplete_checkpoint_is_refused(make_cfg):
    tr = SFTTrainer(make_cfg(SFTConfig, "train.max_steps=4", *QUIET))
    tr.train(stop_after=2)
    step = os.path.join(tr.ckpt_dir, "step-00000002")
    os.remove(os.path.join(step, "manifest.json"))
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        SFTTrainer(make_cfg(SFTConfig, "train.max_steps=4", f"checkpoint.resume={step}", *QUIET))


def test_resume_after_a_crash_logs_every_step_once(make_cfg, tmp_path):
    """A crash after step 5 (checkpoint at 4): the resumed run logs 5 and 6 once, equal to a clean run."""
    clean = _six_steps(make_cfg, tmp_path / "clean")
    clean.train()
    out = tmp_path / "crash"
    tr = _six_steps(make_cfg, out, "checkpoint.save_every=4")
    orig, calls = tr.micro_batch_loss, [0]

    def crash_in_step_6(model, batch):
        calls[0] += 1
        if calls[0] > 10:
            raise KeyboardInterrupt("killed")
        return orig(model, batch)

    tr.micro_batch_loss = crash_in_step_6
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5]
    _six_steps(make_cfg, out, "checkpoint.save_every=4", "checkpoint.resume=latest").train()
    got, want = _rows(out), _rows(tmp_path / "clean")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in got] == [r["train/loss"] for r in want]


def test_a_used_output_dir_is_refused_and_overwrite_clears_it(make_cfg):
    cfg = make_cfg(SFTConfig, "train.max_steps=3", "checkpoint.save_every=1")
    SFTTrainer(cfg).train()
    out = cfg.train.output_dir
    assert {"checkpoints", "final", "metrics.jsonl"} <= set(os.listdir(out))
    with pytest.raises(ConfigError, match="is not empty .*--resume.*--overwrite"):
        SFTTrainer(make_cfg(SFTConfig, "train.max_steps=2"))
    with pytest.raises(ConfigError, match="contradict"):
        SFTTrainer(make_cfg(SFTConfig, "checkpoint.resume=latest", "checkpoint.overwrite=true"))
    SFTTrainer(make_cfg(SFTConfig, "train.max_steps=2", "checkpoint.overwrite=true", *QUIET)).train()
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step-00000002"]
    assert not os.path.exists(os.path.join(out, "final"))


# ---------------------------------------------------------------------------------------------------
# 4. One-line errors from the CLI
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def cli_base(tiny_model_dir, toy_data, tmp_path):
    return ["sft", f"model.path={tiny_model_dir}", f"data.train_path={toy_data['sft']}", "train.device=cpu",
            f"train.output_dir={tmp_path / 'cli'}", "train.batch_size=8", "train.micro_batch_size=8",
            "log.progress_bar=false", "log.tensorboard=false", "train.max_steps=2"]


def _one_line_error(capsys, argv, pattern):
    from rto_llm.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    import re

    assert re.search(pattern, err[-1]), err[-1]
    assert err[-1].startswith("rto-llm ")
    return err[-1]


def test_cli_user_errors_are_one_line_with_exit_code_2(capsys, cli_base, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  lr: 1e-3\n  batch_size: [8\n")
    cases = [
        (["sft", "--config", str(tmp_path / "missing.yaml")], r"--config .*missing.yaml: no such file"),
        (["sft", "--config", str(bad_yaml)], r"bad.yaml:\d+:\d+: YAML syntax error"),
        (cli_base + ["train.lrr=1"], r"unknown config key 'train.lrr'"),
        (cli_base + ["train.batch_size=eight"], r"train.batch_size: expected int"),
        (cli_base + ["train.lr=nan"], r"train.lr: 'nan' is not a finite number"),
        (cli_base + [f"data.train_path={tmp_path / 'nope.jsonl'}"], r"data error: .*nope.jsonl: no such file"),
        (cli_base + [f"model.path={tmp_path / 'nomodel'}"], r"nomodel"),
        (cli_base + [f"model.path={tmp_path}"], r"model.path=.* is a directory without config.json"),
        (cli_base + ["train.batch_size=12"], r"train.batch_size \(12\) must be a multiple"),
        (cli_base + ["--resume"], r"checkpoint error: .*no checkpoint yet"),
    ]
    if not torch.cuda.is_available():
        cases.append((cli_base + ["train.device=cuda"], r"train.device=cuda but torch finds no CUDA device"))
    for argv, pattern in cases:
        _one_line_error(capsys, argv, pattern)


def test_cli_runtime_user_errors_after_loading_are_one_line(capsys, cli_base):
    from rto_llm.cli import main

    assert main(cli_base + ["train.stop_after=1"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, cli_base + ["--resume", "train.lr=1e-3"], r"config error: .*train.lr \(checkpoint")
    # the override right after --resume is an override (not a DIR) and, being last, wins over an earlier one
    _one_line_error(capsys, cli_base + ["train.lr=1e-5", "--resume", "train.lr=1e-3"],
                    r"train.lr \(checkpoint 1e-05, now 0.001\)")
    _one_line_error(capsys, cli_base, r"is not empty")
    _one_line_error(capsys, cli_base + ["--overwrite", "train.lr=1e30", "train.max_steps=6"],
                    r"stopped: step \d: non-finite")


def test_cli_internal_bugs_keep_their_traceback(cli_base, monkeypatch):
    from rto_llm.cli import main

    def bug(self, examples):
        raise KeyError("a bug")

    monkeypatch.setattr(SFTTrainer, "collate", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(cli_base)


def test_cli_as_a_process_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rto_llm.cli", "sft", "--config", str(tmp_path / "x.yaml")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("rto-llm sft: config error: --config")


# ---------------------------------------------------------------------------------------------------
# 5. Periodic Hugging Face exports
# ---------------------------------------------------------------------------------------------------


def test_save_hf_every_writes_loadable_models(make_cfg):
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(SFTConfig, "train.lr=1e-3", "train.max_steps=4", "checkpoint.save_hf_every=2")
    tr = SFTTrainer(cfg)
    tr.train()
    hf = os.path.join(cfg.train.output_dir, "hf")
    assert sorted(os.listdir(hf)) == ["step-00000002", "step-00000004"]
    final = AutoModelForCausalLM.from_pretrained(os.path.join(cfg.train.output_dir, "final")).state_dict()
    at4 = AutoModelForCausalLM.from_pretrained(os.path.join(hf, "step-00000004")).state_dict()
    at2 = AutoModelForCausalLM.from_pretrained(os.path.join(hf, "step-00000002")).state_dict()
    assert all(torch.equal(at4[k], v) for k, v in final.items())
    assert not all(torch.equal(at2[k], v) for k, v in final.items())


def test_save_hf_every_lora_adapters_load_with_peft(make_cfg, tiny_model_dir):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(SFTConfig, "train.lr=1e-2", "train.max_steps=2", "model.lora_rank=4",
                   "checkpoint.save_hf_every=1", *QUIET)
    SFTTrainer(cfg).train()
    path = os.path.join(cfg.train.output_dir, "hf", "step-00000002")
    assert os.path.isfile(os.path.join(path, "adapter_config.json"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path)
    assert any("lora" in n for n, _ in model.named_parameters())


def test_save_hf_every_reward_model_carries_its_statistics(make_cfg):
    from rto_llm.models import REWARD_MEAN_KEY

    cfg = make_cfg(RMConfig, "train.max_steps=2", "checkpoint.save_hf_every=1", *QUIET, data="pref")
    RMTrainer(cfg).train()
    with open(os.path.join(cfg.train.output_dir, "hf", "step-00000001", "config.json")) as f:
        assert REWARD_MEAN_KEY in json.load(f)


# ---------------------------------------------------------------------------------------------------
# 6. Loop ergonomics
# ---------------------------------------------------------------------------------------------------


def test_data_and_batch_errors_come_before_any_model_loads(make_cfg, monkeypatch, tmp_path):
    def no_model(self):
        raise AssertionError("the model was loaded before the data and batch checks")

    monkeypatch.setattr(SFTTrainer, "build_model", no_model)
    with pytest.raises(ConfigError, match="must be a multiple"):
        SFTTrainer(make_cfg(SFTConfig, "train.batch_size=12"))
    with pytest.raises(ConfigError, match="larger than the dataset"):
        SFTTrainer(make_cfg(SFTConfig, "train.batch_size=256", "train.micro_batch_size=8"))
    from rto_llm.data import DataError

    with pytest.raises(DataError, match="no such file"):
        SFTTrainer(make_cfg(SFTConfig, f"data.train_path={tmp_path / 'none.jsonl'}"))


def test_save_every_zero_writes_one_resumable_checkpoint_at_the_end(make_cfg):
    cfg = make_cfg(SFTConfig, "train.max_steps=3", *QUIET)
    SFTTrainer(cfg).train()
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step-00000003"]
    assert ckpt.checkpoint_problem(os.path.join(root, "step-00000003")) is None


def test_a_summary_is_printed_at_the_end(make_cfg, caplog):
    cfg = make_cfg(SFTConfig, "train.max_steps=2")
    with caplog.at_level(logging.INFO, logger="rto_llm"):
        SFTTrainer(cfg).train()
    text = caplog.text
    assert "sft finished: steps 1-2 of 2 in" in text and "train/loss=" in text
    assert os.path.join(cfg.train.output_dir, "metrics.jsonl") in text
    assert "checkpoint: " + os.path.join(cfg.train.output_dir, "checkpoints", "step-00000002") in text
    assert "model: " + os.path.join(cfg.train.output_dir, "final") in text


def test_help_texts_name_the_unit_of_each_stage():
    from rto_llm.config import config_help
    from rto_llm.ppo.config import RTOConfig

    text = config_help(RTOConfig)
    for key in ("checkpoint.save_every", "checkpoint.save_hf_every", "log.every", "train.stop_after"):
        doc = text.split(f"  {key} ", 1)[1].split("\n", 2)[1]
        assert "rollouts in ppo/rto" in doc, (key, doc)
    assert "0 = one at the end" in text


def test_pickle_module_is_not_used_for_checkpoints():
    """The checkpoint code never calls pickle.load itself (only torch.load with weights_only=True)."""
    src = open(os.path.join(REPO, "rto_llm", "checkpoint.py")).read()
    assert "pickle.load" not in src and pickle.UnpicklingError.__name__ in src
