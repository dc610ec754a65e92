"""The life of a run around the training loop: what is checked before any model loads, what a resume
verifies, what is cleaned up, and the summary printed at the end (shared by SFT, RM, DPO, PPO and RTO).

Before the models load (:func:`preflight`):

- a fresh run (no ``--resume``) refuses a non-empty ``train.output_dir`` (it would mix two runs' metrics,
  checkpoints and exports) unless ``checkpoint.overwrite`` (``--overwrite``), which deletes the previous run's
  outputs (:data:`RUN_OUTPUTS`) first;
- a resume finds its checkpoint (``latest`` with a logged fallback to the newest complete one) and refuses a
  checkpoint of another stage or one written with another run-defining config, naming the differing keys.
  Keys that never matter (logging, checkpoint frequency, evaluation: :data:`FREE_ON_RESUME`) may change; the
  few in :data:`rto_llm.config.RESUME_CHANGEABLE` (run length, device, moved paths) only when listed in
  ``checkpoint.allow_changes`` (``--resume-allow-changes k1,k2``).

When the loop starts (:func:`resume_run`): the checkpoint's model identity (class, parameter count, hash of the
parameter names and shapes) must match the model just built, then the state is loaded and ``metrics.jsonl``
(and the eval helper's ``samples.jsonl``) is cut back to the checkpoint's step, so no row appears twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil

from rto_llm import checkpoint as ckpt
from rto_llm.config import RESUME_CHANGEABLE, ConfigError, to_dict
from rto_llm.distributed import barrier

log = logging.getLogger("rto_llm")

# keys that may differ between a checkpoint and the resuming run: they do not change the training math
FREE_ON_RESUME = ("log.", "checkpoint.", "eval.", "train.stop_after", "train.output_dir", "train.device",
                  "perf.peak_tflops", "perf.stop_on_nonfinite", "data.eval_path", "data.eval_split")
# what a run writes into train.output_dir (deleted by --overwrite; any entry makes the directory "used")
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "samples.jsonl", "config.yaml", "final", "final.tmp", "hf", "tb",
               "wandb")


class ResumeMismatchError(ConfigError):
    """The checkpoint was written by another stage, another run-defining config or another model."""


@dataclasses.dataclass
class ResumePlan:
    path: str
    state: dict


# ---------------------------------------------------------------------------------------------------
# Run identity: the run-defining config and the model
# ---------------------------------------------------------------------------------------------------


def flat_config(cfg) -> dict:
    """``{"section.key": value}`` of every field."""
    return {f"{sec}.{k}": v for sec, fields in to_dict(cfg).items() for k, v in fields.items()}


def _free(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in FREE_ON_RESUME)


def run_signature(cfg) -> dict:
    """The run-defining part of the config (everything but :data:`FREE_ON_RESUME`)."""
    return {k: v for k, v in flat_config(cfg).items() if not _free(k)}


def run_identity(cfg) -> dict:
    """Stored in every checkpoint's trainer_state.json: the run-defining config and its hash."""
    sig = run_signature(cfg)
    digest = hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()
    return {"config": sig, "config_hash": digest[:16]}


def module_identity(module) -> dict:
    """Class, parameter count and a hash of the parameter names and shapes (ZeRO-3: the full shapes)."""
    shapes = [(n, list(getattr(p, "ds_shape", p.shape))) for n, p in module.named_parameters()]
    numel = sum(math.prod(s) for _, s in shapes)
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()
    return {"class": type(module).__name__, "tensors": len(shapes), "numel": int(numel), "shapes_sha256": digest[:16]}


def engine_identity(engine) -> dict:
    """:func:`module_identity` of an engine's model, or ``{name: ...}`` for an EngineGroup."""
    if hasattr(engine, "engines"):
        return {name: module_identity(e.module) for name, e in engine.engines.items() if e is not None}
    return module_identity(engine.module)


def _describe(ident: dict) -> str:
    return f"{ident['class']} with {ident['numel']:,} parameters in {ident['tensors']} tensors"


def check_model_identity(saved: dict | None, engine, path: str) -> None:
    if not saved:
        log.warning("resume: %s records no model identity (an older checkpoint): not verified", path)
        return
    now = engine_identity(engine)
    if hasattr(engine, "engines"):
        pairs = [(name, saved.get(name), now.get(name)) for name in sorted(set(saved) | set(now))]
    else:
        pairs = [("model", saved, now)]
    for name, a, b in pairs:
        if a != b:
            was = _describe(a) if a else "no such model"
            got = _describe(b) if b else "no such model"
            raise ResumeMismatchError(
                f"{path} holds another {name}: the checkpoint has a {was} (shapes {a and a.get('shapes_sha256')}), "
                f"this run built a {got} (shapes {b and b.get('shapes_sha256')}); resume with the model.path "
                "(and role paths) the checkpoint was trained from, or start a new run"
            )


def _fmt(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check_compatible(state: dict, cfg, stage: str, path: str) -> None:
    """Refuse a checkpoint of another stage or with another run-defining config (naming the keys)."""
    saved_stage = state.get("stage")
    if saved_stage is not None and saved_stage != stage:
        raise ResumeMismatchError(
            f"{path} is a checkpoint of stage '{saved_stage}', not '{stage}': it cannot be resumed by "
            f"rto-llm {stage} (start a new run from its exported model, e.g. model.path=<output_dir>/final)"
        )
    saved = state.get("config")
    if saved is None:
        log.warning("resume: %s records no config (an older checkpoint): the config is not verified", path)
        return
    allowed = {k.strip() for k in cfg.checkpoint.allow_changes.split(",") if k.strip()}
    now = run_signature(cfg)
    absent = "<absent>"
    for k in sorted(set(saved) - set(now)):
        log.warning("resume: the checkpoint's config has %s=%r, which this version does not know: ignored", k, saved[k])
    # a setting added after the checkpoint was written compares against its default
    defaults = flat_config(type(cfg)())
    saved = {**{k: defaults[k] for k in now if k not in saved and k in defaults}, **saved}
    keys = sorted(k for k in now if not _free(k) and saved.get(k, absent) != now[k])
    refused = [k for k in keys if k not in allowed]
    if refused:
        parts = [f"{k} (checkpoint {_fmt(saved.get(k, absent))}, now {_fmt(now.get(k, absent))})" for k in refused]
        changeable = [k for k in refused if k in RESUME_CHANGEABLE]
        fixed = [k for k in refused if k not in RESUME_CHANGEABLE]
        hint = []
        if changeable:
            hint.append(f"to change {', '.join(changeable)} on purpose pass --resume-allow-changes "
                        f"{','.join(changeable)}")
        if fixed:
            hint.append(f"{', '.join(fixed)} cannot change within a run: restore the checkpoint's values (see "
                        f"{os.path.join(path, 'trainer_state.json')}) or start a new run in another train.output_dir")
        raise ResumeMismatchError(f"{path} was written with a different config: {'; '.join(parts)}; "
                                  + "; ".join(hint))
    for k in keys:
        log.warning("resume: %s changed from %s to %s (allowed by checkpoint.allow_changes)", k,
                    _fmt(saved.get(k)), _fmt(now.get(k)))


# ---------------------------------------------------------------------------------------------------
# Before the models load
# ---------------------------------------------------------------------------------------------------


# role directories: an existing local directory must hold a model (or a LoRA adapter), a tokenizer directory a
# tokenizer; a path that does not exist is reported by the loaders (FileNotFoundError naming it)
MODEL_DIR_KEYS = ("model.path", "dpo.ref_path", "reward.path", "critic.path", "kl.ref_path", "rto.dpo_path",
                  "rto.dpo_ref_path")
_MODEL_FILES = ("config.json", "adapter_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_model_dirs(cfg) -> None:
    """A configured local model (or tokenizer) directory that holds none of the expected files is refused before
    anything loads (transformers would fail later with an unrelated message)."""
    flat = flat_config(cfg)
    gguf = flat.get("model.gguf_file", "")
    for key in (*MODEL_DIR_KEYS, "model.tokenizer_path"):
        path = flat.get(key, "")
        if not path or not os.path.isdir(path):
            continue
        if key == "model.path" and gguf:
            if not os.path.isfile(os.path.join(path, gguf)):
                raise ConfigError(f"model.gguf_file={gguf!r} is not a file in model.path={path}")
            continue
        want = _TOKENIZER_FILES if key == "model.tokenizer_path" else _MODEL_FILES
        if not any(os.path.isfile(os.path.join(path, f)) for f in want):
            raise ConfigError(f"{key}={path} is a directory without {' or '.join(want)}: not a Hugging Face "
                              f"{'tokenizer' if key == 'model.tokenizer_path' else 'model'} directory (point it at "
                              "the directory save_pretrained wrote, e.g. <output_dir>/final)")


def preflight(cfg, info, stage: str) -> ResumePlan | None:
    """Output-directory, resume and model-directory checks that need no model (every process, before loading)."""
    check_model_dirs(cfg)
    c, out = cfg.checkpoint, cfg.train.output_dir
    if c.resume and c.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: resume keeps the run in "
                          f"train.output_dir={out}, overwrite deletes it; pass one of them")
    if c.allow_changes and not c.resume:
        raise ConfigError("checkpoint.allow_changes (--resume-allow-changes) only applies to a resumed run: "
                          "add --resume")
    if not c.resume:
        entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
        if entries and not c.overwrite:
            shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
            raise ConfigError(
                f"train.output_dir={out} is not empty ({shown}): continue that run with --resume, pass --overwrite "
                "to delete its checkpoints, metrics and exports first, or choose another train.output_dir"
            )
        if entries and info.is_main:
            removed = [e for e in entries if e in RUN_OUTPUTS]
            for e in removed:
                p = os.path.join(out, e)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
            log.warning("--overwrite: deleted the previous run's %s in %s", ", ".join(removed) or "nothing", out)
        barrier()
        return None
    path = ckpt.find_checkpoint(os.path.join(out, "checkpoints"), c.resume)
    state = ckpt.read_trainer_state(path)
    check_compatible(state, cfg, stage, path)
    return ResumePlan(path, state)


# ---------------------------------------------------------------------------------------------------
# When the loop starts
# ---------------------------------------------------------------------------------------------------


def resume_run(cfg, info, engine, stage: str, total: int, plan: ResumePlan | None = None, unit: str = "step") -> int:
    """Verify and load the checkpoint of ``plan`` (found now when None); cut the logs back to its step.
    Returns the step to continue from."""
    if plan is None:
        plan = ckpt.find_checkpoint(os.path.join(cfg.train.output_dir, "checkpoints"), cfg.checkpoint.resume)
        state = ckpt.read_trainer_state(plan)
        check_compatible(state, cfg, stage, plan)
        plan = ResumePlan(plan, state)
    step = plan.state["step"]
    if step > total:
        raise ResumeMismatchError(
            f"{plan.path} is at {unit} {step}, past the end of this run ({total} {unit}s): raise the run length "
            "(train.max_steps / train.epochs / ppo.max_rollouts with --resume-allow-changes)"
        )
    check_model_identity(plan.state.get("model"), engine, plan.path)
    ckpt.load_checkpoint(plan.path, engine, info)
    if info.is_main:
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(os.path.join(cfg.train.output_dir, name), step)
    barrier()
    log.info("resumed from %s at %s %d", plan.path, unit, step)
    return step


def truncate_jsonl(path: str, step: int) -> int:
    """Drop the rows of ``path`` logged after ``step`` (and a torn last line); returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            s = row.get("step") if isinstance(row, dict) else None
            if isinstance(s, (int, float)) and s > step:
                dropped += 1
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
        log.info("resume: removed %d rows logged after step %d from %s", dropped, step, path)
    return dropped


# ---------------------------------------------------------------------------------------------------
# At the end
# ---------------------------------------------------------------------------------------------------


def run_summary(stage: str, unit: str, history: list[dict], start: int, end: int, total: int, wall_s: float,
                output_dir: str, keys: tuple[str, ...], exported: list[str] = ()) -> str:
    """The lines printed when a run (or an invocation of it) ends."""
    done = end >= total
    head = (f"{stage} {'finished' if done else 'stopped'}: {unit}s {start + 1}-{end} of {total} in {wall_s:.1f} s"
            if end > start else f"{stage}: nothing to do ({unit} {end} of {total})")
    lines = [head]
    if history:
        last = history[-1]
        shown = [f"{k}={last[k]:.4g}" for k in keys if isinstance(last.get(k), (int, float))]
        lines.append(f"  last {unit} ({last.get('step')}): " + (", ".join(shown) or "no metrics"))
    root = os.path.join(output_dir, "checkpoints")
    latest = ckpt.newest_complete_checkpoint(root)
    lines.append(f"  metrics: {os.path.join(output_dir, 'metrics.jsonl')}")
    lines.append(f"  checkpoint: {latest}" + ("" if done else "  (continue with --resume)") if latest
                 else "  checkpoint: none (checkpoint.save_every=0 saves one at the end)")
    for path in exported:
        lines.append(f"  model: {path}")
    return "\n".join(lines)
