"""Processes, devices and the training engine (plain torch or DeepSpeed ZeRO) behind one interface.

Launch: one process (``rto-llm sft ...``), or many through ``torchrun`` / ``deepspeed`` (they set RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). CPU runs use the gloo backend, CUDA runs nccl.

Loss-scaling convention (identical for both backends, so a run gives the same result on 1 or N
processes): the trainer passes each micro-batch loss already weighted by its share of the *global*
batch, times the world size. Backends average gradients over processes and never rescale by the
number of accumulation steps, so the accumulated gradient is the gradient of the global-batch loss.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialize the process group when launched with WORLD_SIZE > 1; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def ensure_process_group(info: DistInfo) -> None:
    """A one-process group when none exists: DeepSpeed needs one even for a single process, and
    :func:`init_distributed` creates one only for WORLD_SIZE > 1 (``deepspeed --num_gpus 1`` / ``torchrun
    --nproc_per_node 1`` / a plain run). Uses MASTER_ADDR / MASTER_PORT when set, else a free local port."""
    if dist.is_initialized():
        return
    if info.world_size != 1:
        raise RuntimeError(f"WORLD_SIZE={info.world_size} but no process group: call init_distributed first")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT") or str(free_port())
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=0, world_size=1)
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_dict(values: dict[str, float], mean: bool = False) -> dict[str, float]:
    """Each value summed (or averaged) over processes, in float64; names in sorted order on every process."""
    names = sorted(values)
    t = all_reduce_sum(torch.tensor([values[n] for n in names], dtype=torch.float64))
    if mean and dist.is_initialized():
        t = t / dist.get_world_size()
    return dict(zip(names, t.tolist()))


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str, min_lr_ratio: float):
    """Multiplier of the peak lr: linear warm-up, then cosine / linear decay to ``min_lr_ratio``."""
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return f


def _optimizer(model: torch.nn.Module, tcfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2), eps=tcfg.adam_eps,
        weight_decay=tcfg.weight_decay,
    )


class StageForward(torch.nn.Module):
    """Runs a stage's loss function inside the engine's forward.

    DeepSpeed keeps per-micro-batch bookkeeping in ``engine.forward`` (ZeRO-3 decides there whether the
    next backward copies or accumulates gradients); calling the wrapped model directly loses gradients
    under accumulation. ``engine(fn, batch)`` therefore calls ``fn(model, batch)`` through this module.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


class TorchEngine:
    """Plain torch: AdamW, LambdaLR, global grad-norm clip; gradients all-reduced by hand when N > 1."""

    backend = "torch"

    def run(self, fn, *args):
        """``fn(model, *args)``: the stage's forward + loss for one micro-batch."""
        return fn(self.module, *args)

    def __init__(self, model: torch.nn.Module, tcfg, total_steps: int, info: DistInfo):
        self.module = model.to(info.device)
        self.info = info
        self.grad_clip = tcfg.grad_clip
        self.optimizer = _optimizer(model, tcfg)
        sched = lr_lambda(total_steps, tcfg.warmup_ratio, tcfg.lr_scheduler, tcfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, sched)
        if info.world_size > 1:  # identical initial weights on every process
            for p in model.parameters():
                dist.broadcast(p.data, src=0)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def micro_step(self) -> None:
        pass

    def optimizer_step(self) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.info.world_size > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.info.world_size)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, path: str) -> None:
        if self.info.is_main:
            torch.save(
                {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()},
                os.path.join(path, "engine.pt"),
            )

    def load(self, path: str) -> None:
        state = torch.load(os.path.join(path, "engine.pt"), map_location=self.info.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict | None:
        return self.module.state_dict()


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 with a torch AdamW client optimizer (no extension to compile for Adam)."""

    backend = "deepspeed"

    def __init__(self, model: torch.nn.Module, tcfg, dscfg, total_steps: int, grad_accum: int, info: DistInfo):
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError("deepspeed.enabled=true needs DeepSpeed: pip install deepspeed") from e
        self.info = info
        if dscfg.bf16 and info.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("deepspeed.bf16=true but this GPU does not support bf16; set deepspeed.bf16=false")
        ds_config = {
            "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": tcfg.micro_batch_size * grad_accum * info.world_size,
            "gradient_clipping": tcfg.grad_clip,
            "zero_optimization": {"stage": dscfg.zero_stage},
            "bf16": {"enabled": dscfg.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if dscfg.offload:
            ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            if dscfg.zero_stage == 3:
                ds_config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
            ds_config["zero_force_ds_cpu_optimizer"] = False
        if dscfg.config_file:
            with open(dscfg.config_file) as f:
                ds_config.update(json.load(f))
        ensure_process_group(info)
        optimizer = _optimizer(model, tcfg)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total_steps, tcfg.warmup_ratio, tcfg.lr_scheduler, tcfg.min_lr_ratio)
        )
        model = model.to(info.device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=StageForward(model), optimizer=optimizer, lr_scheduler=sched, config=ds_config,
            dist_init_required=False,  # the group exists (init_distributed / ensure_process_group)
        )
        self.module = model
        self.zero_stage = dscfg.zero_stage

    def run(self, fn, *args):
        """``fn(model, *args)`` through ``engine.forward`` (see :class:`StageForward`)."""
        return self.engine(fn, *args)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step(self) -> None:
        self.engine.step()  # DeepSpeed only updates at the accumulation boundary

    def optimizer_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag="ds", save_latest=False)

    def load(self, path: str) -> None:
        self.engine.load_checkpoint(path, tag="ds")

    def full_state_dict(self) -> dict | None:
        """The full model state on the main process (gathered from all ranks under ZeRO-3)."""
        if self.zero_stage == 3:
            full = self.engine._zero3_consolidated_16bit_state_dict()
            return None if full is None else {k.removeprefix("model."): v for k, v in full.items()}
        return self.module.state_dict()


def create_engine(model, train_cfg, deepspeed_cfg, total_steps: int, grad_accum: int, info: DistInfo):
    """The engine for ``model``: optimizer settings from ``train_cfg`` (a ``TrainConfig``), DeepSpeed ZeRO
    when ``deepspeed_cfg.enabled`` (a ``DeepSpeedConfig``), else plain torch."""
    if deepspeed_cfg.enabled:
        return DeepSpeedEngine(model, train_cfg, deepspeed_cfg, total_steps, grad_accum, info)
    if deepspeed_cfg.bf16:
        raise ValueError("deepspeed.bf16 needs deepspeed.enabled=true (plain torch: use model.dtype=bfloat16)")
    return TorchEngine(model, train_cfg, total_steps, info)
