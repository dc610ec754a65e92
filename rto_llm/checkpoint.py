"""Resumable checkpoints (atomic) and Hugging Face exports.

Layout under ``<output_dir>/checkpoints``::

    step-00000010/          engine state (model, optimizer, scheduler), trainer_state.json, rng_rank*.pt
    latest                  the name of the newest complete checkpoint

A checkpoint is written to a hidden temporary directory and moved into place with ``os.replace`` once
every process has finished writing, so a crash never leaves a half-written ``step-*`` directory or a
``latest`` that points at one. The data position needs no state of its own: the sampler is a pure
function of (seed, step), so the saved step is the dataloader position.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from rto_llm.distributed import barrier


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(root: str, step: int, engine, trainer_state: dict, info, keep_last: int = 2) -> str:
    """Write ``root/step-<step>`` atomically (all processes call this); returns its path."""
    name = f"step-{step:08d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp")
    if info.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    engine.save(tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{info.rank}.pt"))
    if info.is_main:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, "step": step, "world_size": info.world_size}, f, indent=1)
    barrier()
    if info.is_main:
        if os.path.exists(final):  # re-saving a step: move the old copy aside first
            old = os.path.join(root, f".{name}.old")
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, "latest"), name)
        _prune(root, keep_last)
    barrier()
    return final


class EngineGroup:
    """Several engines behind the one-engine interface of :func:`save_checkpoint` / :func:`load_checkpoint`:
    each engine in its own subdirectory (None entries are skipped), plus the trainer's own state
    (``get_state()`` -> dict, written by the main process as ``state_file``; ``set_state(dict)`` on load)."""

    def __init__(self, engines: dict, get_state, set_state, info, state_file: str = "trainer_extra.pt"):
        self.engines, self.get_state, self.set_state = engines, get_state, set_state
        self.info, self.state_file = info, state_file

    def save(self, path: str) -> None:
        for name, eng in self.engines.items():
            if eng is not None:
                os.makedirs(os.path.join(path, name), exist_ok=True)
                eng.save(os.path.join(path, name))
        if self.info.is_main:
            torch.save(self.get_state(), os.path.join(path, self.state_file))

    def load(self, path: str) -> None:
        for name, eng in self.engines.items():
            if eng is not None:
                eng.load(os.path.join(path, name))
        self.set_state(torch.load(os.path.join(path, self.state_file), weights_only=False))


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    for d in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def find_checkpoint(root: str, resume: str) -> str:
    """``resume`` = 'latest' (newest under ``root``) or a checkpoint directory."""
    if resume == "latest":
        pointer = os.path.join(root, "latest")
        if not os.path.isfile(pointer):
            raise FileNotFoundError(f"checkpoint.resume=latest but {pointer} does not exist (no checkpoint yet)")
        with open(pointer) as f:
            return os.path.join(root, f.read().strip())
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a checkpoint directory")
    return resume


def load_checkpoint(path: str, engine, info) -> dict:
    """Restore engine state and this process's RNG; returns the trainer state (with ``step``)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state.get("world_size", 1) != info.world_size:
        raise ValueError(
            f"{path} was written by {state['world_size']} processes; resuming on {info.world_size} is not supported"
        )
    engine.load(path)
    set_rng_state(torch.load(os.path.join(path, f"rng_rank{info.rank}.pt"), weights_only=False))
    return state


def export_hf(path: str, model, tokenizer, state_dict: dict | None, info, extra_files: dict | None = None) -> None:
    """Hugging Face format (``save_pretrained``; a LoRA model saves its adapter) written atomically."""
    if not info.is_main:
        return
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {"state_dict": state_dict} if state_dict is not None and not hasattr(model, "peft_config") else {}
    model.save_pretrained(tmp, **kwargs)
    tokenizer.save_pretrained(tmp)
    for name, content in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(content)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
