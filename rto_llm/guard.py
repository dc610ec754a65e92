"""The non-finite guard shared by every training loop (SFT, RM, DPO, PPO, RTO).

Three lines of defence, each stopping the run with :class:`NonFiniteError` (one line, naming the last good
checkpoint or saying there is none):

1. every micro-batch loss is checked before its backward pass;
2. the clipped global gradient norm is checked before the optimizer step (``engine.optimizer_step(check=...)``:
   the engine computes the norm, calls the check, and steps only if it returns);
3. the parameters are checked before any checkpoint, Hugging Face export or ``latest`` pointer is written
   (:func:`params_finite`), so non-finite weights are never saved, pruned towards, marked latest or exported,
   even with the guard switched off (``perf.stop_on_nonfinite=false`` in ppo/rto).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """NaN or inf in a loss, a gradient norm, a metric or the weights: the run stops before the optimizer
    step, nothing non-finite is saved, and the message names the last good checkpoint (or says there is none)."""


def is_finite(x) -> bool:
    """True if ``x`` (a tensor or a number) holds no NaN / inf."""
    if torch.is_tensor(x):
        return bool(torch.isfinite(x.detach()).all())
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def last_good_message(ckpt_dir: str) -> str:
    """Where to resume from: the newest complete checkpoint under ``ckpt_dir``, or that there is none."""
    from rto_llm.checkpoint import newest_complete_checkpoint

    path = newest_complete_checkpoint(ckpt_dir)
    fix = "lower train.lr, keep train.grad_clip > 0 or check the data"
    if path is None:
        return f"no checkpoint was saved before this point, so there is nothing to resume from ({fix})"
    return (f"the last good checkpoint is {path} (--resume continues from it with the same config; to {fix}, "
            "start a new run)")


def params_finite(engine) -> bool:
    """True if every parameter of ``engine`` (a training engine, or an EngineGroup of them) is finite; the same
    answer on every process (ZeRO-3 partitions are checked where they live, then all-reduced)."""
    engines = [e for e in getattr(engine, "engines", {"": engine}).values() if e is not None]
    ok = True
    for eng in engines:
        for p in eng.module.parameters():
            t = getattr(p, "ds_tensor", None)  # ZeRO-3: this process's partition
            t = p.data if t is None else t
            if t.numel() and not bool(torch.isfinite(t).all()):
                ok = False
                break
    if dist.is_initialized():
        flag = torch.tensor([1.0 if ok else 0.0], device=engines[0].info.device if engines else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item() > 0)
    return ok


class NonFiniteGuard:
    """Checks values of a run whose checkpoints live in ``ckpt_dir``; ``unit`` names the loop's step ("step" or
    "rollout"). ``enabled=False`` turns checks 1 and 2 off (:meth:`check`); :meth:`check_params` always runs."""

    def __init__(self, ckpt_dir: str, unit: str = "step", enabled: bool = True):
        self.ckpt_dir, self.unit, self.enabled = ckpt_dir, unit, enabled

    def check(self, x, what: str, index: int, before: str = "the optimizer step") -> None:
        """Stop if ``x`` is not finite; ``index`` is the 0-based step (or rollout) being computed."""
        if self.enabled and not is_finite(x):
            self.stop(index, what, before)

    def stop(self, index: int, what: str, before: str):
        raise NonFiniteError(f"{self.unit} {index + 1}: non-finite {what}; stopped before {before}, no weights "
                             f"were changed or saved; {last_good_message(self.ckpt_dir)}")

    def check_params(self, engine, index: int, doing: str) -> None:
        """Before a save or an export (collective: every process calls it)."""
        if not params_finite(engine):
            raise NonFiniteError(f"{self.unit} {index}: the model's parameters hold NaN/inf; refusing to {doing}; "
                                 f"{last_good_message(self.ckpt_dir)}")
