"""Resumable checkpoints (atomic, verified) and Hugging Face exports.

Layout under ``<output_dir>/checkpoints``::

    step-00000010/          engine state (model, optimizer, scheduler), trainer_state.json, rng_rank*.pt,
                            manifest.json (every file and its size; written last)
    latest                  the name of the newest complete checkpoint

A checkpoint is written to a hidden temporary directory and moved into place with ``os.replace`` once
every process has finished writing, so a crash never leaves a half-written ``step-*`` directory or a
``latest`` that points at one. The data position needs no state of its own: the sampler is a pure
function of (seed, step), so the saved step is the dataloader position.

Nothing is unpickled: every ``torch.load`` here (and in the engines) uses ``weights_only=True``, which
accepts tensors and plain data only, so a crafted checkpoint cannot run code. The RNG states are stored as
tensors and plain numbers (:func:`rng_state`). ``resume=latest`` falls back to the newest complete
checkpoint, and says so, when ``latest`` is missing, unreadable, names a missing step or a step whose files
do not match its manifest (a truncated ``engine.pt``, a deleted directory).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch

from rto_llm.distributed import barrier

log = logging.getLogger("rto_llm")

FORMAT = 2                      # trainer_state.json "format": 2 = manifest + weights-only RNG files
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-\d{8}$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, incomplete, corrupt, unsafe to load or from another run."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """``resume`` was requested but there is no checkpoint to resume from."""


# ---------------------------------------------------------------------------------------------------
# RNG state as tensors and plain numbers (loadable with weights_only=True)
# ---------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """The python, numpy, torch (and CUDA) RNG states, as tensors and plain numbers only."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    p, n = state["python"], state["numpy"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def safe_load(path: str, map_location=None):
    """``torch.load(path, weights_only=True)``: tensors and plain data only. A file that holds other Python
    objects (which unpickling could execute) is refused with :class:`CheckpointError`, as is a corrupt one."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing from the checkpoint") from e
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain data, which could run "
            f"code when unpickled (weights_only=True: {first}); checkpoints written by rto-llm never do, so it was "
            "written by something else or tampered with"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint file ({str(e).splitlines()[0]})") from e


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Manifest: which files a complete checkpoint holds
# ---------------------------------------------------------------------------------------------------


def _list_files(path: str) -> dict[str, int]:
    files = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    return files


def write_manifest(path: str) -> None:
    files = {k: v for k, v in _list_files(path).items() if k != MANIFEST}
    _atomic_write_text(os.path.join(path, MANIFEST), json.dumps({"format": FORMAT, "files": files}, indent=1))


def checkpoint_problem(path: str) -> str | None:
    """None if ``path`` is a complete checkpoint, else what is wrong with it (missing, no manifest, a file
    missing or of another size than when it was written)."""
    if not os.path.isdir(path):
        return "the directory does not exist"
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return "it has no trainer_state.json"
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                fmt = json.load(f).get("format", 1)
        except (OSError, ValueError):
            return "trainer_state.json is unreadable"
        return None if fmt < FORMAT else "its manifest.json is missing (the save did not finish)"
    try:
        with open(mpath) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    present = _list_files(path)
    for name, size in sorted(expected.items()):
        if name not in present:
            return f"{name} is missing"
        if present[name] != size:
            return f"{name} is truncated or changed ({present[name]} bytes, {size} when saved)"
    return None


def step_dirs(root: str) -> list[str]:
    """The ``step-*`` directory names under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if _STEP_RE.match(d) and os.path.isdir(os.path.join(root, d)))


def newest_complete_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (the ``latest`` one when it is complete), or None."""
    name = _read_pointer(root)
    if name and checkpoint_problem(os.path.join(root, name)) is None:
        return os.path.join(root, name)
    for d in reversed(step_dirs(root)):
        if checkpoint_problem(os.path.join(root, d)) is None:
            return os.path.join(root, d)
    return None


def _read_pointer(root: str) -> str | None:
    try:
        with open(os.path.join(root, "latest")) as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_RE.match(name) else None


# ---------------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------------


def save_checkpoint(root: str, step: int, engine, trainer_state: dict, info, keep_last: int = 2,
                    guard=None) -> str:
    """Write ``root/step-<step>`` atomically (all processes call this); returns its path.

    The parameters are checked first (every process): non-finite weights raise ``NonFiniteError`` and nothing
    is written, pruned or pointed at. ``guard`` (a :class:`rto_llm.guard.NonFiniteGuard`) words the message."""
    from rto_llm.guard import NonFiniteGuard

    (guard or NonFiniteGuard(root)).check_params(engine, step, f"save checkpoint step-{step:08d}")
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
        from rto_llm.lifecycle import engine_identity

        state = {**trainer_state, "format": FORMAT, "step": step, "world_size": info.world_size,
                 "model": engine_identity(engine)}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
    barrier()
    if info.is_main:
        write_manifest(tmp)     # last: a directory with a manifest is complete
        if os.path.exists(final):  # re-saving a step: move the old copy aside first
            old = os.path.join(root, f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
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
    (``get_state()`` -> dict of tensors and plain data, written by the main process as ``state_file``;
    ``set_state(dict)`` on load)."""

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
        self.set_state(safe_load(os.path.join(path, self.state_file)))


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for d in step_dirs(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Find and load
# ---------------------------------------------------------------------------------------------------


def find_checkpoint(root: str, resume: str) -> str:
    """``resume`` = 'latest' (the checkpoint ``root/latest`` names, or the newest complete one when that is
    unusable: the fallback is logged) or a checkpoint directory (which must be complete)."""
    if resume != "latest":
        if not os.path.isdir(resume):
            raise CheckpointNotFoundError(f"checkpoint.resume={resume!r}: no such directory")
        problem = checkpoint_problem(resume)
        if problem:
            raise CheckpointError(f"checkpoint.resume={resume!r} is not a complete checkpoint: {problem}")
        return resume
    pointer = os.path.join(root, "latest")
    name = _read_pointer(root)
    if name is not None:
        problem = checkpoint_problem(os.path.join(root, name))
        if problem is None:
            return os.path.join(root, name)
        why = f"{pointer} names {name}, but {problem}"
    elif os.path.exists(pointer):
        why = f"{pointer} is unreadable or does not name a step-XXXXXXXX directory"
    else:
        why = f"{pointer} does not exist"
    dirs = step_dirs(root)
    if not dirs and not os.path.exists(pointer):
        raise CheckpointNotFoundError(f"checkpoint.resume=latest but {pointer} does not exist (no checkpoint yet)")
    for d in reversed(dirs):
        if d != name and checkpoint_problem(os.path.join(root, d)) is None:
            log.warning("resume: %s; falling back to the newest complete checkpoint %s", why, os.path.join(root, d))
            return os.path.join(root, d)
    raise CheckpointError(f"checkpoint.resume=latest: {why}, and no other complete checkpoint is under {root}")


def read_trainer_state(path: str) -> dict:
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/trainer_state.json is unreadable: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}/trainer_state.json has no integer 'step'")
    return state


def load_checkpoint(path: str, engine, info) -> dict:
    """Restore engine state and this process's RNG; returns the trainer state (with ``step``)."""
    state = read_trainer_state(path)
    if state.get("world_size", 1) != info.world_size:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} processes; resuming on {info.world_size} is not supported "
            f"(launch {state['world_size']} processes)"
        )
    engine.load(path)
    set_rng_state(safe_load(os.path.join(path, f"rng_rank{info.rank}.pt")))
    return state


# ---------------------------------------------------------------------------------------------------
# Hugging Face export
# ---------------------------------------------------------------------------------------------------


def export_hf(path: str, model, tokenizer, state_dict: dict | None, info, extra_files: dict | None = None) -> None:
    """Hugging Face format (``save_pretrained``; a LoRA model saves its adapter) written atomically."""
    if not info.is_main:
        return
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
    kwargs = {"state_dict": state_dict} if state_dict is not None and not hasattr(model, "peft_config") else {}
    model.save_pretrained(tmp, **kwargs)
    tokenizer.save_pretrained(tmp)
    for name, content in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(content)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
