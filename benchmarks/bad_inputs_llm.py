"""A battery of bad inputs against the ``rto-llm`` CLI (tiny models on the CPU, one subprocess per input).

Each input is a mistake a user makes (a wrong setting, file, data, resume or a diverging run) or damage a run
meets (a truncated checkpoint, a crafted pickle, a kill). Every outcome is classified:

- ``clear error``: exit code 2, no traceback, the last stderr line starts with ``rto-llm`` and says what the
  input's expected message says (a regex per input);
- ``recovered``: the documented recovery happened (a fallback to the previous complete checkpoint, announced
  on stderr, and the run finished with every step logged once);
- ``unclear error``: exit 2 without traceback, but not the expected message;
- ``traceback``: a Python traceback for a user error;
- ``silently accepted``: exit 0 for an input that must be refused;
- ``data lost``: the input's post-check failed (a non-finite checkpoint, a good checkpoint pruned, a
  ``latest`` at a broken step, a previous run deleted, duplicated metric rows, code from a pickle executed);
- ``other``: anything else (another exit code, a timeout).

    .venv/bin/python benchmarks/bad_inputs_llm.py                 # all inputs, counts at the end
    .venv/bin/python benchmarks/bad_inputs_llm.py -k resume       # the inputs whose name contains "resume"
    .venv/bin/python benchmarks/bad_inputs_llm.py --out benchmarks/results/bad_inputs_llm.md

Target: 0 tracebacks, 0 silently accepted, 0 data lost, 0 unclear.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from _battery import report, stderr_outcome

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Case:
    name: str
    argv: Callable[[str], list[str]]          # output dir -> CLI arguments (stage first)
    expect: str = "error"                      # "error" or "recover"
    pattern: str = ""                          # regex the last stderr line must match (error) / stderr (recover)
    setup: Callable[[str], None] | None = None  # output dir -> prepare (a previous run, damage)
    check: Callable[[str], str | None] | None = None  # output dir -> None if no data was lost, else why


# ---------------------------------------------------------------------------------------------------
# Fixtures: a tiny model, data files, the PPO / RTO models
# ---------------------------------------------------------------------------------------------------

FX: dict[str, str] = {}


def build_fixtures(root: str) -> None:
    from rto_llm.testing import save_tiny_model, toy_preference_rows, toy_sft_rows, write_jsonl, write_ppo_fixture

    FX["model"] = save_tiny_model(os.path.join(root, "tiny"))
    FX["wide"] = save_tiny_model(os.path.join(root, "tiny_wide"), hidden_size=32)
    FX["sft"] = write_jsonl(os.path.join(root, "sft.jsonl"), toy_sft_rows(64))
    FX["pref"] = write_jsonl(os.path.join(root, "pref.jsonl"), toy_preference_rows(64))
    FX["ppo"] = json.dumps(write_ppo_fixture(os.path.join(root, "ppo"), dpo="full"))
    FX["root"] = root
    with open(os.path.join(root, "bad.yaml"), "w") as f:
        f.write("train:\n  lr: 1e-3\n  batch_size: [8\n")
    with open(os.path.join(root, "list.yaml"), "w") as f:
        f.write("- train\n- lr\n")
    with open(os.path.join(root, "section.yaml"), "w") as f:
        f.write("train: 5\n")
    with open(os.path.join(root, "wrongstage.yaml"), "w") as f:
        f.write("dpo:\n  beta: 0.1\n")
    os.makedirs(os.path.join(root, "empty_dir"), exist_ok=True)
    with open(os.path.join(root, "malformed.jsonl"), "w") as f:
        f.write('{"prompt": "a", "response": "b"}\n{"prompt": "a", "respo\n')
    with open(os.path.join(root, "nokeys.jsonl"), "w") as f:
        f.write('{"question": "a", "answer": "b"}\n' * 20)
    with open(os.path.join(root, "empty.jsonl"), "w") as f:
        f.write("")
    with open(os.path.join(root, "data.txt"), "w") as f:
        f.write("hello\n")
    with open(os.path.join(root, "norejected.jsonl"), "w") as f:
        f.write('{"prompt": "a", "chosen": "b"}\n' * 20)
    with open(os.path.join(root, "latin1.yaml"), "wb") as f:
        f.write(b"train:\n  output_dir: caf\xe9\n")
    os.makedirs(os.path.join(root, "no_data_dir"), exist_ok=True)
    with open(os.path.join(root, "no_data_dir", "notes.txt"), "w") as f:
        f.write("not data\n")


def sft(out: str, *extra: str) -> list[str]:
    return ["sft", f"model.path={FX['model']}", f"data.train_path={FX['sft']}", f"train.output_dir={out}",
            "train.device=cpu", "train.batch_size=8", "train.micro_batch_size=4", "log.progress_bar=false",
            "log.tensorboard=false", "train.max_steps=3", "train.lr=1e-3", *extra]


def pref(stage: str, out: str, *extra: str) -> list[str]:
    return [stage, *sft(out)[1:], f"data.train_path={FX['pref']}", *extra]


def ppo(stage: str, out: str, *extra: str) -> list[str]:
    from rto_llm.testing import ppo_overrides

    paths = json.loads(FX["ppo"])
    more = [f"rto.dpo_path={paths['dpo']}"] if stage == "rto" else []
    return [stage, *ppo_overrides(paths, out), "ppo.max_rollouts=2", *more, *extra]


# ---------------------------------------------------------------------------------------------------
# Running and checking
# ---------------------------------------------------------------------------------------------------


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return e


def cli(argv: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rto_llm.cli", *argv], capture_output=True, text=True,
                          env=env(), cwd=REPO, timeout=timeout)


def run_ok(argv: list[str]) -> None:
    r = cli(argv)
    if r.returncode != 0:
        raise RuntimeError(f"set-up run failed ({r.returncode}): {r.stderr[-2000:]}")


def engine_files(out: str) -> list[str]:
    files = []
    for dirpath, _, names in os.walk(os.path.join(out, "checkpoints")):
        files += [os.path.join(dirpath, n) for n in names if n == "engine.pt"]
    return files


def finite_file(path: str) -> bool:
    state = torch.load(path, weights_only=True)["model"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def check_no_nonfinite_saved(out: str) -> str | None:
    """Every checkpoint and export holds finite weights; latest names a complete checkpoint."""
    from safetensors.torch import load_file

    from rto_llm import checkpoint as ckpt

    for f in engine_files(out):
        if not finite_file(f):
            return f"non-finite weights saved in {f}"
    root = os.path.join(out, "checkpoints")
    if os.path.exists(os.path.join(root, "latest")):
        name = open(os.path.join(root, "latest")).read().strip()
        if ckpt.checkpoint_problem(os.path.join(root, name)):
            return f"latest names a broken checkpoint {name}"
    hf = os.path.join(out, "hf")
    names = os.listdir(hf) if os.path.isdir(hf) else []
    exports = [os.path.join(out, "final")] + [os.path.join(hf, x) for x in names]
    for d in exports:
        st = os.path.join(d, "model.safetensors")
        if os.path.isfile(st) and not all(bool(torch.isfinite(v).all()) for v in load_file(st).values()):
            return f"non-finite weights exported to {d}"
    return None


def check_steps_once(out: str, n: int) -> str | None:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"train/' in line or '"objective/' in line]
    if steps != list(range(1, n + 1)):
        return f"metrics.jsonl steps {steps}, expected 1..{n} once each"
    return None


def check_previous_run_intact(out: str) -> str | None:
    root = os.path.join(out, "checkpoints")
    if not os.path.isfile(os.path.join(root, "latest")) or not os.path.isfile(os.path.join(out, "metrics.jsonl")):
        return "the previous run's checkpoints or metrics were deleted"
    return check_steps_once(out, 3)


def check_marker(out: str) -> str | None:
    return "code from a crafted pickle ran" if os.path.exists(os.path.join(out, "PWNED")) else None


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(out: str, relpath: str) -> None:
    """Replace a checkpoint file by a crafted pickle and refresh the manifest (as an attacker would)."""
    from rto_llm import checkpoint as ckpt

    step = os.path.join(out, "checkpoints", open(os.path.join(out, "checkpoints", "latest")).read().strip())
    torch.save({"payload": _Evil(os.path.join(out, "PWNED"))}, os.path.join(step, relpath))
    ckpt.write_manifest(step)


def prior_sft(out: str, *extra: str, stop: int = 2) -> None:
    run_ok(sft(out, "train.max_steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=3",
               f"train.stop_after={stop}", *extra))


def damage(kind: str) -> Callable[[str], None]:
    def setup(out: str) -> None:
        prior_sft(out, stop=3)
        root = os.path.join(out, "checkpoints")
        last = os.path.join(root, "step-00000003")
        if kind == "truncate":
            p = os.path.join(last, "engine.pt")
            with open(p, "r+b") as f:
                f.truncate(os.path.getsize(p) // 2)
        elif kind == "delete":
            shutil.rmtree(last)
        elif kind == "garbage":
            with open(os.path.join(root, "latest"), "w") as f:
                f.write("\x00\x01garbage")
        elif kind == "no_pointer":
            os.remove(os.path.join(root, "latest"))
            shutil.rmtree(last)
        elif kind == "no_manifest":
            os.remove(os.path.join(last, "manifest.json"))
    return setup


def kill_mid_run(out: str) -> None:
    """Start a run, SIGKILL it after a checkpoint and a few more logged steps."""
    argv = sft(out, "train.max_steps=60", "checkpoint.save_every=5", "train.lr=1e-4")
    p = subprocess.Popen([sys.executable, "-m", "rto_llm.cli", *argv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env(), cwd=REPO)
    metrics = os.path.join(out, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < 600:
        n = sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0
        if n >= 7:      # a checkpoint at step 5, and steps after it already logged
            break
        if p.poll() is not None:
            raise RuntimeError("the run to be killed finished first")
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def cases() -> list[Case]:
    R = FX["root"]
    C = []

    def err(name, argv, pattern, setup=None, check=None):
        C.append(Case(name, argv, "error", pattern, setup, check))

    # --- the command line and the config file ---------------------------------------------------
    err("config_missing", lambda o: ["sft", "--config", f"{R}/nope.yaml"], r"--config .*nope.yaml: no such file")
    err("config_is_dir", lambda o: ["sft", "--config", R], r"is a directory")
    err("yaml_syntax", lambda o: ["sft", "--config", f"{R}/bad.yaml"], r"bad.yaml:\d+:\d+: YAML syntax error")
    err("yaml_top_level_list", lambda o: ["sft", "--config", f"{R}/list.yaml"], r"top level must be a mapping")
    err("yaml_section_not_mapping", lambda o: ["sft", "--config", f"{R}/section.yaml"], r"train: is a section")
    err("yaml_other_stage_section", lambda o: ["sft", "--config", f"{R}/wrongstage.yaml"],
        r"unknown config key 'dpo'")
    err("config_not_utf8", lambda o: ["sft", "--config", f"{R}/latin1.yaml"], r"latin1.yaml: cannot be read")
    err("unknown_key", lambda o: sft(o, "train.lrr=1"), r"unknown config key 'train.lrr'")
    err("unknown_section", lambda o: sft(o, "optim.lr=1"), r"unknown config key 'optim.lr'")
    err("override_without_equals", lambda o: sft(o, "train.lr"), r"must look like section.key=value")
    err("unknown_flag", lambda o: sft(o, "--bogus"), r"unrecognized arguments: --bogus")
    err("int_wrong_type", lambda o: sft(o, "train.batch_size=eight"), r"train.batch_size: expected int")
    err("bool_wrong_type", lambda o: sft(o, "log.tensorboard=maybe"), r"log.tensorboard: expected bool")
    err("choice_wrong", lambda o: sft(o, "train.lr_scheduler=exp"), r"not one of")
    err("lr_nan", lambda o: sft(o, "train.lr=nan"), r"train.lr: 'nan' is not a finite number")
    err("lr_inf", lambda o: sft(o, "train.lr=inf"), r"not a finite number")
    err("beta_nan_rto", lambda o: ppo("rto", o, "rto.beta1=nan"), r"rto.beta1: 'nan' is not a finite number")
    err("lr_negative", lambda o: sft(o, "train.lr=-1"), r"train.lr must be > 0")
    err("lr_zero", lambda o: sft(o, "train.lr=0"), r"train.lr must be > 0")
    err("warmup_ratio_out_of_range", lambda o: sft(o, "train.warmup_ratio=1.5"), r"warmup_ratio must be in")
    err("batch_size_zero", lambda o: sft(o, "train.batch_size=0"), r"batch_size must be >= 1")
    err("max_steps_negative", lambda o: sft(o, "train.max_steps=-3"), r"max_steps must be >= 0")
    err("grad_clip_negative", lambda o: sft(o, "train.grad_clip=-1"), r"grad_clip must be >= 0")
    err("adam_beta2_one", lambda o: sft(o, "train.adam_beta2=1.0"), r"adam_beta2 must be in")
    err("log_every_zero", lambda o: sft(o, "log.every=0"), r"log.every must be >= 1")
    err("keep_last_negative", lambda o: sft(o, "checkpoint.keep_last=-1"), r"keep_last must be >= 0")
    err("save_hf_every_negative", lambda o: sft(o, "checkpoint.save_hf_every=-1"), r"save_hf_every must be >= 0")
    err("model_path_empty", lambda o: sft(o, "model.path="), r"model.path is required")
    err("prompt_len_ge_max_len", lambda o: sft(o, "data.max_prompt_len=600"), r"max_prompt_len .* must be <")
    err("dpo_beta_zero", lambda o: pref("dpo", o, "dpo.beta=0"), r"dpo.beta must be > 0")
    err("cdpo_without_smoothing", lambda o: pref("dpo", o, "dpo.loss_type=cdpo"), r"needs dpo.label_smoothing")
    err("ppo_top_p", lambda o: ppo("ppo", o, "rollout.top_p=0.9"), r"pure sampling")
    err("rto_negative_beta1", lambda o: ppo("rto", o, "rto.beta1=-0.1"), r"beta1 must be >= 0")
    err("ppo_rollout_not_multiple", lambda o: ppo("ppo", o, "rollout.batch_size=12"), r"must be a multiple")
    err("ppo_max_steps", lambda o: ppo("ppo", o, "train.max_steps=5"), r"set ppo.max_rollouts")
    err("allow_changes_lr", lambda o: sft(o, "--resume", "--resume-allow-changes", "train.lr"),
        r"train.lr may not change on resume")
    err("resume_and_overwrite", lambda o: sft(o, "--resume", "--overwrite"), r"contradict")
    err("allow_changes_without_resume", lambda o: sft(o, "--resume-allow-changes", "train.max_steps"),
        r"only applies to a resumed run")

    # --- files, data, devices (after or before the models load) ---------------------------------
    err("model_path_missing", lambda o: sft(o, f"model.path={R}/no_model"), r"no_model")
    err("model_dir_empty", lambda o: sft(o, f"model.path={R}/empty_dir"), r"empty_dir")
    err("tokenizer_dir_empty", lambda o: sft(o, f"model.tokenizer_path={R}/empty_dir"),
        r"model.tokenizer_path=.* without tokenizer.json")
    err("gguf_file_missing", lambda o: sft(o, "model.gguf_file=model.gguf"), r"model.gguf_file='model.gguf' is not")
    err("data_missing", lambda o: sft(o, f"data.train_path={R}/nope.jsonl"), r"data error: .*nope.jsonl")
    err("data_dir_without_data", lambda o: sft(o, f"data.train_path={R}/no_data_dir"), r"holds no .jsonl")
    err("data_malformed_json", lambda o: sft(o, f"data.train_path={R}/malformed.jsonl"), r"malformed.jsonl:2")
    err("data_missing_keys", lambda o: sft(o, f"data.train_path={R}/nokeys.jsonl"), r"nokeys.jsonl:1")
    err("data_empty", lambda o: sft(o, f"data.train_path={R}/empty.jsonl"), r"no usable rows")
    err("data_txt", lambda o: sft(o, f"data.train_path={R}/data.txt"), r"unsupported file type")
    err("pref_missing_rejected", lambda o: pref("rm", o, f"data.train_path={R}/norejected.jsonl"),
        r"norejected.jsonl:1")
    err("batch_larger_than_data", lambda o: sft(o, "train.batch_size=256", "train.micro_batch_size=8"),
        r"larger than the dataset")
    err("batch_not_multiple", lambda o: sft(o, "train.batch_size=10"), r"must be a multiple")
    if not torch.cuda.is_available():
        err("device_cuda_without_gpu", lambda o: sft(o, "train.device=cuda"), r"train.device=cuda but")
    err("bf16_without_deepspeed", lambda o: sft(o, "deepspeed.bf16=true"), r"deepspeed.bf16 needs deepspeed.enabled")
    err("deepspeed_config_file_missing", lambda o: sft(o, "deepspeed.enabled=true",
                                                       f"deepspeed.config_file={R}/ds.json"), r"ds.json")
    err("dpo_ref_path_missing", lambda o: pref("dpo", o, f"dpo.ref_path={R}/no_ref"), r"no_ref")
    err("ppo_reward_path_missing", lambda o: ppo("ppo", o, f"reward.path={R}/no_rm"), r"no_rm")
    err("rto_dpo_path_missing", lambda o: ppo("rto", o, f"rto.dpo_path={R}/no_dpo"), r"no_dpo")
    err("ppo_prompts_fewer_than_rollout", lambda o: ppo("ppo", o, "rollout.batch_size=128"),
        r"larger than the prompt set")

    # --- diverging runs ------------------------------------------------------------------------
    err("sft_lr_1e30", lambda o: sft(o, "train.lr=1e30", "train.max_steps=8", "checkpoint.save_every=1",
                                     "checkpoint.keep_last=1"), r"stopped: step \d+: non-finite",
        check=check_no_nonfinite_saved)
    err("dpo_lr_1e30", lambda o: pref("dpo", o, "train.lr=1e30", "train.max_steps=8", "checkpoint.save_every=1"),
        r"stopped: step \d+: non-finite", check=check_no_nonfinite_saved)
    err("rm_lr_1e30", lambda o: pref("rm", o, "train.lr=1e30", "train.max_steps=8", "checkpoint.save_every=1"),
        r"stopped: step \d+: non-finite", check=check_no_nonfinite_saved)
    err("ppo_lr_1e30_guard_off", lambda o: ppo("ppo", o, "train.lr=1e30", "critic.lr=1e30", "ppo.max_rollouts=6",
                                               "checkpoint.save_every=1", "perf.stop_on_nonfinite=false",
                                               "checkpoint.save_hf_every=1"),
        r"stopped: rollout \d+: .*(non-finite|NaN/inf)", check=check_no_nonfinite_saved)

    # --- resume ------------------------------------------------------------------------------
    err("resume_without_checkpoint", lambda o: sft(o, "--resume"), r"no checkpoint yet")
    err("resume_changed_lr", lambda o: sft(o, "train.max_steps=4", "checkpoint.save_every=1",
                                           "checkpoint.keep_last=3", "--resume", "train.lr=5e-4"),
        r"train.lr \(checkpoint 0.001, now 0.0005\)", setup=prior_sft)
    err("resume_changed_batch", lambda o: sft(o, "train.max_steps=4", "checkpoint.save_every=1",
                                              "checkpoint.keep_last=3", "--resume", "train.batch_size=4"),
        r"train.batch_size \(checkpoint 8, now 4\)", setup=prior_sft)
    err("resume_changed_max_steps_unflagged", lambda o: sft(o, "train.max_steps=6", "checkpoint.save_every=1",
                                                            "checkpoint.keep_last=3", "--resume"),
        r"--resume-allow-changes train.max_steps", setup=prior_sft)
    err("resume_dpo_from_sft", lambda o: pref("dpo", o, "train.max_steps=4", "checkpoint.save_every=1",
                                              "checkpoint.keep_last=3", "--resume"),
        r"checkpoint of stage 'sft', not 'dpo'", setup=prior_sft)
    err("resume_rm_from_sft", lambda o: pref("rm", o, "train.max_steps=4", "checkpoint.save_every=1",
                                             "checkpoint.keep_last=3", "--resume"),
        r"checkpoint of stage 'sft', not 'rm'", setup=prior_sft)
    err("resume_other_model", lambda o: sft(o, "train.max_steps=4", "checkpoint.save_every=1",
                                            "checkpoint.keep_last=3", f"model.path={FX['wide']}", "--resume",
                                            "--resume-allow-changes", "model.path"),
        r"holds another model", setup=prior_sft)
    err("resume_crafted_rng_pickle", lambda o: sft(o, "train.max_steps=4", "checkpoint.save_every=1",
                                                   "checkpoint.keep_last=3", "--resume"),
        r"refused to load", setup=lambda o: (prior_sft(o), plant(o, "rng_rank0.pt")), check=check_marker)
    err("resume_crafted_engine_pickle", lambda o: sft(o, "train.max_steps=4", "checkpoint.save_every=1",
                                                      "checkpoint.keep_last=3", "--resume"),
        r"refused to load", setup=lambda o: (prior_sft(o), plant(o, "engine.pt")), check=check_marker)
    err("resume_explicit_incomplete_dir", lambda o: sft(o, "train.max_steps=4", "checkpoint.save_every=1",
                                                        "checkpoint.keep_last=3",
                                                        f"--resume={o}/checkpoints/step-00000003"),
        r"manifest.json is missing", setup=damage("no_manifest"))
    err("resume_explicit_not_a_dir", lambda o: sft(o, f"--resume={o}/nowhere"), r"no such directory")
    err("resume_every_checkpoint_broken", lambda o: sft(o, "train.max_steps=4", "checkpoint.save_every=1",
                                                        "checkpoint.keep_last=3", "--resume"),
        r"no other complete checkpoint", setup=lambda o: (prior_sft(o, stop=3), [
            os.remove(os.path.join(o, "checkpoints", d, "manifest.json"))
            for d in os.listdir(os.path.join(o, "checkpoints")) if d.startswith("step-")]))
    err("fresh_start_in_used_dir", lambda o: sft(o), r"is not empty", setup=lambda o: run_ok(sft(o)),
        check=check_previous_run_intact)
    err("ppo_resume_from_sft", lambda o: ppo("ppo", o, "--resume"), r"checkpoint of stage 'sft', not 'ppo'",
        setup=prior_sft)

    def recover(name, argv, setup, check, pattern=r"falling back to the newest complete checkpoint"):
        C.append(Case(name, argv, "recover", pattern, setup, check))

    resume4 = lambda o: sft(o, "train.max_steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=3",  # noqa: E731
                            "--resume")
    for kind in ("truncate", "delete", "garbage", "no_pointer"):
        recover(f"resume_latest_{kind}", resume4, damage(kind), lambda o: check_steps_once(o, 4))
    recover("resume_after_kill", lambda o: sft(o, "train.max_steps=60", "checkpoint.save_every=5", "train.lr=1e-4",
                                               "--resume"),
            kill_mid_run, lambda o: check_steps_once(o, 60), pattern=r"resumed from .*step-000000\d\d")
    return C


def classify(case: Case, r: subprocess.CompletedProcess | None, lost: str | None) -> tuple[str, str]:
    if r is None:
        return "other", "timeout"
    lines, decided = stderr_outcome(r.stderr, lost)
    if decided:
        return decided
    last = lines[-1] if lines else ""
    if case.expect == "error":
        if r.returncode == 0:
            return "silently accepted", "exit 0"
        if r.returncode == 2:
            ok = last.startswith("rto-llm") and re.search(case.pattern, last)
            return ("clear error" if ok else "unclear error"), last
        return "other", f"exit {r.returncode}: {last}"
    if r.returncode == 0 and re.search(case.pattern, r.stderr):
        return "recovered", next((x for x in lines if re.search(case.pattern, x)), "")
    return ("unclear error" if r.returncode == 2 else "other"), f"exit {r.returncode}: {last}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="run only the inputs whose name contains this")
    ap.add_argument("--workdir", default="", help="keep fixtures and outputs here (default: a temp dir)")
    ap.add_argument("--out", default="", help="also write the results as a markdown table to this file")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = args.workdir or tempfile.mkdtemp(prefix="bad_inputs_llm_")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    build_fixtures(os.path.join(work, "fixtures"))
    selected = [c for c in cases() if args.k in c.name]
    results = []
    for i, case in enumerate(selected, 1):
        out = os.path.join(work, "runs", case.name)
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        try:
            if case.setup:
                case.setup(out)
            r = cli(case.argv(out))
        except subprocess.TimeoutExpired:
            r = None
        lost = case.check(out) if case.check and r is not None else None
        kind, detail = classify(case, r, lost)
        results.append((case.name, kind, detail, time.time() - t))
        print(f"[{i:2d}/{len(selected)}] {kind:17s} {case.name:36s} {detail[:160]}", flush=True)
    code = report([k for _, k, _, _ in results], [(n, k, d.replace(work, "$WORK")) for n, k, d, _ in results], t0,
                  args.out, "Bad inputs against `rto-llm` (`benchmarks/bad_inputs_llm.py`)",
                  "tiny models on the CPU (`$WORK` is the script's temporary directory)",
                  ("input", "outcome", "last stderr line / finding"))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return code

if __name__ == "__main__":
    sys.exit(main())
