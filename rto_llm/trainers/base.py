"""The shared training loop. A stage subclass says how to build its model, collate a micro-batch and
compute the micro-batch loss; everything else (data order, accumulation, logging, checkpoints) is here.

One optimizer step, in order:
  1. global batch indices = the sampler at (seed, step): a pure function, so resuming needs only step
  2. this process's slice of the global batch, cut into micro-batches
  3. per micro-batch: loss (stage) -> weight = its share of the global batch's units (tokens or pairs)
     -> backward(loss * weight * world_size)  [the backend averages over processes]
  4. optimizer step (grad clip, AdamW, LR schedule); metrics summed over processes; log; checkpoint
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import defaultdict

import torch

from rto_llm import checkpoint as ckpt
from rto_llm import lifecycle
from rto_llm.config import ConfigError, save_config, to_dict
from rto_llm.data import load_examples, step_indices
from rto_llm.distributed import all_reduce_sum, barrier, create_engine, init_distributed, zero3_init
from rto_llm.evaluation import supervised_eval
from rto_llm.guard import NonFiniteGuard
from rto_llm.logging import MetricsLogger, setup_console_logging
from rto_llm.models import check_model_kind, check_tokenizers, model_tokenizer

log = logging.getLogger("rto_llm")

# metrics shown in the summary at the end of a run (those the stage logs)
SUMMARY_KEYS = ("train/loss", "train/accuracy", "train/reward_margin", "train/grad_norm", "train/lr", "eval/loss",
                "eval/accuracy")


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def begin_run(cfg, info, ckpt_dir: str, engines, stage: str, total: int, stop_after: int | None,
              plan=None, unit: str = "step"):
    """Shared start of every training loop: resume from ``cfg.checkpoint.resume`` (``plan``: the checkpoint
    :func:`rto_llm.lifecycle.preflight` found and checked; its model identity is verified here, then ``engines``
    are restored and metrics.jsonl is cut back to its step), save the resolved config, open the metrics logger.
    Returns ``(start, end, logger)``: the loop runs steps (or rollouts) ``start .. end - 1``, ``end`` honouring
    ``stop_after`` (a deliberate interruption)."""
    start = 0
    if cfg.checkpoint.resume:
        start = lifecycle.resume_run(cfg, info, engines, stage, total, plan, unit)
    if info.is_main:
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.train.output_dir, "config.yaml"))
    logger = MetricsLogger(cfg.log, cfg.train.output_dir, stage, total, to_dict(cfg), info.is_main, start)
    end = total if stop_after is None else min(total, start + stop_after)
    return start, end, logger


class Trainer:
    stage = "base"
    data_kind = "sft"  # "sft" | "preference"
    model_kind = "any"  # what model.path must hold: "causal_lm", "reward_model" or "any" (models.check_model_kind)

    # ---- stage hooks ----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict:
        raise NotImplementedError

    def loss_units(self, examples: list[dict]) -> float:
        """How many units (tokens or pairs) the loss averages over in ``examples``."""
        return float(len(examples))

    def micro_batch_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float], float]:
        """(loss averaged over the micro-batch's units, metrics averaged the same way, number of units)."""
        raise NotImplementedError

    def trained_init(self):
        """The context in which ``build_model`` constructs the trained model: under ZeRO-3 it is built partitioned
        (``distributed.zero3_init``: no process holds the full model), otherwise a no-op. Models that must run a
        forward pass before the engine exists (a frozen reference) are built outside it."""
        ds = self.cfg.deepspeed
        return zero3_init(ds, "bfloat16" if ds.bf16 else self.cfg.model.dtype, self.info.device)

    def before_engine(self) -> None:
        """Stage set-up that needs the model and data but not the optimizer (e.g. reference log-probs)."""

    def export_extras(self) -> dict[str, str]:
        return {}

    # ---- set-up ---------------------------------------------------------------------------------
    def __init__(self, cfg):
        self.cfg = cfg
        self.info = init_distributed(cfg.train.device)
        setup_console_logging(self.info.is_main)
        self.ckpt_dir = os.path.join(cfg.train.output_dir, "checkpoints")
        self.guard = NonFiniteGuard(self.ckpt_dir, "step")
        # before any model loads: output directory, resume checkpoint and config, data and batch sizes
        self.resume_plan = lifecycle.preflight(cfg, self.info, self.stage)
        ckpt.seed_everything(cfg.train.seed)
        check_model_kind(cfg.model.path, self.model_kind, "model.path", cfg.model.gguf_file)  # before data
        self.tokenizer = model_tokenizer(cfg.model)
        check_tokenizers({"policy": self.tokenizer})
        self.pad_id = self.tokenizer.pad_token_id
        d = cfg.data
        self.train_examples, self.data_stats = load_examples(
            self.data_kind, d.train_path, d.train_split, self.tokenizer, d
        )
        self.eval_examples = (
            load_examples(self.data_kind, d.eval_path, d.eval_split, self.tokenizer, d)[0] if d.eval_path else []
        )
        self.eval_history: list[dict] = []  # one row per evaluation (eval section): {"step": n, "eval/...": ...}
        self._plan_batches()
        self.model = self.build_model()
        check_tokenizers({"policy": self.tokenizer}, {"policy": self.model})
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.pad_id
        self.model.to(self.info.device)
        self.before_engine()
        self.engine = create_engine(self.model, cfg.train, cfg.deepspeed, self.total_steps, self.grad_accum, self.info)

    def _plan_batches(self) -> None:
        t, W = self.cfg.train, self.info.world_size
        if t.batch_size % (t.micro_batch_size * W):
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x number of processes ({W})"
            )
        self.per_rank = t.batch_size // W
        self.grad_accum = self.per_rank // t.micro_batch_size
        self.steps_per_epoch = len(self.train_examples) // t.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size ({t.batch_size}) is larger than the dataset ({len(self.train_examples)} rows)"
            )
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch

    def batch_indices(self, step: int) -> list[int]:
        """Global batch of step ``step``: a fresh permutation per epoch from (seed, epoch); drop-last."""
        t = self.cfg.train
        return step_indices(len(self.train_examples), t.seed, step, self.steps_per_epoch, t.batch_size)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.info.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ---- the loop -------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> list[dict]:
        """Train to ``total_steps`` (or return after ``stop_after`` steps of this call, after saving a
        checkpoint: a deliberate interruption). Returns the per-step metrics."""
        cfg, info = self.cfg, self.info
        t_run = time.perf_counter()
        start, end, logger = begin_run(cfg, info, self.ckpt_dir, self.engine, self.stage, self.total_steps, stop_after,
                                       plan=self.resume_plan)
        history = []
        model = self.engine.module
        model.train()
        if start == 0:
            supervised_eval(self, 0, logger)  # eval.at_start
        for step in range(start, end):
            t0 = time.perf_counter()
            global_idx = self.batch_indices(step)
            units_total = self.loss_units([self.train_examples[i] for i in global_idx])
            local = global_idx[info.rank * self.per_rank : (info.rank + 1) * self.per_rank]
            sums: dict[str, float] = defaultdict(float)
            tokens = 0.0
            lr = self.engine.lr()
            mb = cfg.train.micro_batch_size
            for k in range(0, len(local), mb):
                batch = self._to_device(self.collate([self.train_examples[i] for i in local[k : k + mb]]))
                loss, metrics, units = self.engine.run(self.micro_batch_loss, batch)
                share = units / units_total
                self.engine.backward(loss * (share * info.world_size))
                self.engine.micro_step()
                sums["loss"] += loss.item() * share
                for name, v in metrics.items():
                    sums[name] += v * share
                tokens += float(batch["attention_mask"].sum())
            names = sorted(sums)
            reduced = all_reduce_sum(torch.tensor([sums[n] for n in names] + [tokens], dtype=torch.float64))
            # non-finite guard: the loss summed over processes (NaN on one process is NaN on all), then the
            # gradient norm inside the engine, both before the optimizer step
            self.guard.check(reduced[names.index("loss")], "loss", step)
            grad_norm = self.engine.optimizer_step(check=lambda n, s=step: self.guard.check(n, "gradient norm", s))
            dt = time.perf_counter() - t0
            row = {f"train/{n}": float(v) for n, v in zip(names, reduced[:-1].tolist())}
            row.update({
                "train/grad_norm": grad_norm, "train/lr": lr, "train/epoch": step / self.steps_per_epoch,
                "perf/tokens_per_s": float(reduced[-1]) / dt, "perf/step_s": dt,
                "perf/peak_mem_gb": peak_memory_gb(info.device),
            })
            history.append({"step": step + 1, **row})
            logger.log(step + 1, row, force=step + 1 == end)
            supervised_eval(self, step + 1, logger)  # every eval.every steps and after the last
            self.after_step(step + 1, end, stop_after)
        exported = []
        if end == self.total_steps:
            self.finish()
            if cfg.checkpoint.export_hf:
                exported.append(os.path.join(cfg.train.output_dir, "final"))
                self.export(exported[-1])
        logger.close()
        if info.is_main:
            log.info("%s", lifecycle.run_summary(self.stage, "step", history, start, end, self.total_steps,
                                                 time.perf_counter() - t_run, cfg.train.output_dir, SUMMARY_KEYS,
                                                 exported))
        return history

    def after_step(self, n: int, end: int, stop_after: int | None) -> None:
        """Checkpoints after step ``n`` (1-based): every ``save_every`` steps (with 0: at the last step), at a
        deliberate interruption, and a Hugging Face export every ``save_hf_every`` steps."""
        c = self.cfg.checkpoint
        last = n == self.total_steps
        if (c.save_every and n % c.save_every == 0) or (not c.save_every and last) or (
                stop_after is not None and n == end < self.total_steps):
            self.save_checkpoint(n)
        if c.save_hf_every and n % c.save_hf_every == 0:
            self.prepare_export()
            self.export(os.path.join(self.cfg.train.output_dir, "hf", f"step-{n:08d}"), n)

    def save_checkpoint(self, step: int) -> str:
        state = {"stage": self.stage, "total_steps": self.total_steps, **lifecycle.run_identity(self.cfg)}
        return ckpt.save_checkpoint(self.ckpt_dir, step, self.engine, state, self.info, self.cfg.checkpoint.keep_last,
                                    guard=self.guard)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics averaged over the evaluation set (same loss and weighting as training)."""
        model = self.engine.module
        model.eval()
        exs = self.eval_examples[self.info.rank :: self.info.world_size]
        units_total = self.loss_units(self.eval_examples)
        sums: dict[str, float] = defaultdict(float)
        mb = self.cfg.eval.batch_size or self.cfg.train.micro_batch_size
        for k in range(0, len(exs), mb):
            batch = self._to_device(self.collate(exs[k : k + mb]))
            loss, metrics, units = self.engine.run(self.micro_batch_loss, batch)
            sums["loss"] += loss.item() * units / units_total
            for name, v in metrics.items():
                sums[name] += v * units / units_total
        model.train()
        names = sorted(sums)
        reduced = all_reduce_sum(torch.tensor([sums[n] for n in names], dtype=torch.float64)).tolist()
        return {f"eval/{n}": float(v) for n, v in zip(names, reduced)}

    def finish(self) -> None:
        """Stage hook after the last step, before the export (e.g. reward statistics)."""

    def prepare_export(self) -> None:
        """Stage hook before an intermediate Hugging Face export (checkpoint.save_hf_every)."""

    def export(self, path: str, step: int | None = None) -> None:
        """Hugging Face export of the trained model to ``path`` (never of non-finite weights)."""
        self.guard.check_params(self.engine, self.total_steps if step is None else step, f"export {path}")
        state_dict = self.engine.full_state_dict()
        ckpt.export_hf(path, self.engine.module, self.tokenizer, state_dict, self.info, self.export_extras())
        barrier()
        if self.info.is_main:
            log.info("exported %s model to %s", self.stage, path)
