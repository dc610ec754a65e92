"""Processes, devices and the training engine (plain torch or DeepSpeed ZeRO) behind one interface.

Long because plain torch and DeepSpeed ZeRO 0-3 sit behind one engine interface here, so that no trainer branches on
the backend.

Launch: one process (``rto-llm sft ...``), or many through ``torchrun`` / ``deepspeed`` (they set RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). CPU runs use the gloo backend, CUDA runs nccl.

Loss-scaling convention (identical for both backends, so a run gives the same result on 1 or N
processes): the trainer passes each micro-batch loss already weighted by its share of the *global*
batch, times the world size. Backends average gradients over processes and never rescale by the
number of accumulation steps, so the accumulated gradient is the gradient of the global-batch loss.

ZeRO-3 (``deepspeed.zero_stage=3``): models are built partitioned (:func:`zero3_init`: transformers'
``HfDeepSpeedConfig`` makes ``from_pretrained`` run under ``deepspeed.zero.Init``), frozen roles are sharded
by an inference-only engine (:func:`shard_frozen`, no optimizer), and generation gathers the actor's
parameters once per rollout (:meth:`DeepSpeedEngine.generation_context`) instead of at every decoding step.
"""

from __future__ import annotations

import json
import math
import os
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rto_llm import quiet_deepspeed_cpu_notice


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
    if use_cuda and not torch.cuda.is_available():
        from rto_llm.config import ConfigError

        raise ConfigError("train.device=cuda but torch finds no CUDA device (torch.cuda.is_available() is false): "
                          "use train.device=cpu or auto, or install a CUDA build of torch")
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


def shutdown(info: DistInfo) -> None:
    """End of a successful multi-process run (a launcher's WORLD_SIZE > 1): wait until every process is done
    (rank 0 may still be writing the export that the others skip), then destroy the process group while the
    interpreter is fully alive. A process that left early, or a gloo group left to interpreter finalization,
    aborted the process in CI ("terminate called without an active exception", exit -6; see
    pytorch/pytorch#190489). Not called after an error: another process may still be in a collective, and a
    barrier or destroy then can deadlock (torchtitan does the same). A one-process group (tests, in-process
    stages) is left alone for the next stage of the same process."""
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


# ---------------------------------------------------------------------------------------------------
# DeepSpeed: import, configs, ZeRO-3 construction of trained and frozen models
# ---------------------------------------------------------------------------------------------------

def import_deepspeed():
    """``import deepspeed`` without its "Setting accelerator to CPU" notice (only that record is dropped:
    :func:`rto_llm.quiet_deepspeed_cpu_notice`, also attached when the package is imported)."""
    quiet_deepspeed_cpu_notice()
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("deepspeed.enabled=true needs DeepSpeed: pip install deepspeed") from e
    return deepspeed


def is_zero3(dscfg) -> bool:
    """DeepSpeed enabled with ZeRO stage 3 (parameters partitioned over processes)."""
    return bool(dscfg is not None and dscfg.enabled and dscfg.zero_stage == 3)


def _zero_section(dscfg, offload_params: bool) -> dict:
    zero: dict = {"stage": dscfg.zero_stage}
    if dscfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params and dscfg.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(tcfg, dscfg, grad_accum: int, world_size: int) -> dict:
    """The DeepSpeed config of a trained model (``dscfg.config_file`` merged over it)."""
    ds_config = {
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": tcfg.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": tcfg.grad_clip,
        "zero_optimization": _zero_section(dscfg, offload_params=dscfg.offload),
        "bf16": {"enabled": dscfg.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dscfg.offload:
        ds_config["zero_force_ds_cpu_optimizer"] = False
    if dscfg.config_file:
        with open(dscfg.config_file) as f:
            ds_config.update(json.load(f))
    return ds_config


def _dtype_flags(dtype) -> dict:
    name = str(dtype).removeprefix("torch.")
    return {"bf16": {"enabled": name == "bfloat16"}, "fp16": {"enabled": name == "float16"}}


def inference_deepspeed_config(dscfg, dtype, world_size: int, offload: bool = False) -> dict:
    """ZeRO-3 config of a frozen role (no optimizer): parameters sharded, kept in ``dtype`` (the frozen
    compute dtype: bf16 / fp16 flags follow it), on the CPU between uses when ``offload``."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "zero_optimization": {"stage": 3, **({"offload_param": {"device": "cpu", "pin_memory": True}}
                                             if offload else {})},
        **_dtype_flags(dtype),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _env_info(device: torch.device | str | None = None) -> DistInfo:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")), dev)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def _deepspeed_comm(deepspeed, device) -> None:
    """The process group (created if needed), also registered with ``deepspeed.comm``: zero.Init and
    DeepSpeed's config read the world size there (1 otherwise)."""
    ensure_process_group(_env_info(device))
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)


@contextmanager
def zero3_init(dscfg, dtype, device=None, offload: bool | None = None):
    """Inside the block, ``from_pretrained`` builds models partitioned over the processes (ZeRO-3).

    Under ``deepspeed.zero_stage=3`` this keeps a ``transformers.integrations.HfDeepSpeedConfig`` alive, so
    transformers constructs the model under ``deepspeed.zero.Init``: no process ever holds the full model
    (rank 0 reads the checkpoint and scatters it). ``dtype`` (name or torch dtype) is the dtype the
    partitioned parameters are created in (zero.Init takes it from the config's bf16 / fp16 flags).
    ``offload`` (default ``dscfg.offload``) places the partitions in CPU memory. A no-op without ZeRO-3.
    """
    if not is_zero3(dscfg):
        yield
        return
    deepspeed = import_deepspeed()
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _deepspeed_comm(deepspeed, device)
    offload = dscfg.offload if offload is None else offload
    config = inference_deepspeed_config(dscfg, dtype, _world_size(), offload=offload)
    hf_config = HfDeepSpeedConfig(config)  # noqa: F841 -- transformers holds a weak reference: keep it alive
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def is_partitioned(model) -> bool:
    """True when ``model``'s parameters are ZeRO-3 partitions (built under zero.Init or by an engine)."""
    return model is not None and any(hasattr(p, "ds_id") for p in model.parameters())


def shard_frozen(model: torch.nn.Module, dscfg, dtype, offload: bool = False):
    """A frozen role sharded through DeepSpeed ZeRO-3 with no optimizer (as OpenRLHF does for the reference
    and reward model). Returns the DeepSpeed engine; keep it alive. Forward passes call ``model`` itself:
    the engine's hooks gather each layer's parameters just in time and release them afterwards."""
    deepspeed = import_deepspeed()
    _deepspeed_comm(deepspeed, next(model.parameters()).device)
    config = inference_deepspeed_config(dscfg, dtype, _world_size(), offload=offload)
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    model.eval()
    return engine


@contextmanager
def gathered_for_generation(ds_engine):
    """The ZeRO-3 model of ``ds_engine`` with full parameters on every process for the whole block, and
    DeepSpeed's per-module gather/release hooks removed (restored afterwards), so a generation of any
    length gathers the parameters once instead of at every decoding step (the approach of TRL's
    ``unwrap_model_for_generation`` and ``deepspeed.runtime.zero.unwrap_model_for_generation``).
    Memory: one full copy of the model per process during the block."""
    deepspeed = import_deepspeed()
    opt = ds_engine.optimizer
    offload = getattr(opt, "parameter_offload", None) or opt
    module = offload.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        for p in module.parameters():
            if hasattr(p, "ds_active_sub_modules"):
                p.ds_active_sub_modules.clear()
        for h in offload.forward_hooks + offload.backward_hooks:
            h.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(module)



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

    def generation_context(self, mode: str = "rollout"):
        """Nothing to gather: the parameters are whole on every process."""
        return nullcontext()

    def micro_step(self) -> None:
        pass

    def optimizer_step(self, check=None) -> float:
        """Average gradients over processes, clip them to ``grad_clip``, then ``check(norm)`` (the global norm
        before clipping; it raises to stop) and only then step the optimizer and the schedule."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.info.world_size > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.info.world_size)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if check is not None:
            check(float(norm))
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
        from rto_llm.checkpoint import safe_load

        state = safe_load(os.path.join(path, "engine.pt"), map_location=self.info.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict | None:
        return self.module.state_dict()


# Classes DeepSpeed pickles into its optimizer states (plain data: an enum, loss-scaler settings, a fragment
# address); allowed by DeepSpeedEngine.load besides torch's weights-only defaults.
DS_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
)


def _ds_safe_globals() -> list:
    import importlib

    out = []
    for name in DS_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return out


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 with a torch AdamW client optimizer (no extension to compile for Adam)."""

    backend = "deepspeed"

    def __init__(self, model: torch.nn.Module, tcfg, dscfg, total_steps: int, grad_accum: int, info: DistInfo):
        deepspeed = import_deepspeed()
        self.info = info
        if dscfg.bf16 and info.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            from rto_llm.config import ConfigError

            raise ConfigError("deepspeed.bf16=true but this GPU does not support bf16; set deepspeed.bf16=false")
        ds_config = deepspeed_config(tcfg, dscfg, grad_accum, info.world_size)
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

    def generation_context(self, mode: str = "rollout"):
        """Context for generating with ``module`` outside the engine: under ZeRO-3 with ``mode="rollout"``
        the parameters are gathered once for the whole block (:func:`gathered_for_generation`); with
        ``mode="step"`` DeepSpeed's hooks gather them layer by layer at every forward (least memory, one
        all-gather per layer per decoding step). ZeRO <= 2: the parameters are whole, nothing to do."""
        if self.zero_stage == 3 and mode == "rollout":
            return gathered_for_generation(self.engine)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step(self) -> None:
        # DeepSpeed updates at the accumulation boundary; that step is taken by optimizer_step, after the check
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def optimizer_step(self, check=None) -> float:
        """The boundary ``engine.step()`` with ``check(norm)`` (it raises to stop) before any weight changes.
        ZeRO 0: the norm of the reduced gradients is computed and checked before the step. ZeRO >= 1: the
        partitioned gradients live inside DeepSpeed's optimizer, whose step skips the update when they are not
        finite (its overflow check); the step is then reported to ``check`` as an infinite norm."""
        pre = None
        if self.zero_stage == 0:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norms = [torch.linalg.vector_norm(g.float()) for g in grads]
            pre = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
            if check is not None:
                check(pre)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else pre if pre is not None else float("nan")
        if check is not None and not getattr(self.engine, "_step_applied", True):
            check(float("inf") if math.isfinite(norm) else norm)  # DeepSpeed skipped the update: overflow
        if check is not None:
            check(norm)
        return norm

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag="ds", save_latest=False)

    def load(self, path: str) -> None:
        """DeepSpeed's own loader, with its ``torch.load`` switched to ``weights_only=True`` (plus the few plain
        DeepSpeed classes its optimizer states hold: :data:`DS_SAFE_GLOBALS`): nothing else is unpickled."""
        from rto_llm.checkpoint import CheckpointError, safe_load

        ce = self.engine.checkpoint_engine
        safe = _ds_safe_globals()

        def weights_only_load(file, map_location=None):
            with torch.serialization.safe_globals(safe):
                return safe_load(file, map_location=map_location)

        ce.load = weights_only_load
        try:
            load_path, _ = self.engine.load_checkpoint(path, tag="ds")
        finally:
            del ce.load
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed found no loadable checkpoint under {path}/ds")

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
        from rto_llm.config import ConfigError

        raise ConfigError("deepspeed.bf16 needs deepspeed.enabled=true (plain torch: use model.dtype=bfloat16)")
    return TorchEngine(model, train_cfg, total_steps, info)
