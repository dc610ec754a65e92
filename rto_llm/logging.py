"""Metrics: a JSONL file (always), TensorBoard (default, offline), Weights & Biases (optional, lazy), and a
tqdm progress bar with live loss and throughput. Only the main process logs."""

from __future__ import annotations

import json
import logging
import math
import os
import time

log = logging.getLogger("rto_llm")


def setup_console_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


class MetricsLogger:
    def __init__(self, lcfg, output_dir: str, stage: str, total_steps: int, config: dict, is_main: bool,
                 initial_step: int = 0):
        self.enabled = is_main
        self.every = max(1, lcfg.every)
        self.tb = self.wandb = self.bar = None
        if not is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        # Resumed runs append (rto_llm.lifecycle.resume_run first cut the file back to the checkpoint's step).
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if lcfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard files are append-only: on resume, purge_step hides the events logged after the
                # checkpoint (steps > initial_step) from TensorBoard, so no step appears twice there either
                self.tb = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=initial_step + 1 if initial_step
                                        else None)
            except ImportError:
                log.warning("tensorboard is not installed: TensorBoard logging is off (pip install tensorboard)")
        if lcfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("log.wandb=true needs wandb: pip install wandb") from e
            self.wandb = wandb.init(project=lcfg.wandb_project, name=lcfg.run_name or stage, config=config)
        if lcfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=stage, dynamic_ncols=True)
        self._t = time.perf_counter()

    def log(self, step: int, metrics: dict, force: bool = False) -> None:
        """Record ``metrics`` after optimizer step ``step`` (1-based); files only every N steps or if force."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k in _BAR_KEYS}
            self.bar.set_postfix(shown, refresh=False)
        if step % self.every and not force:
            return
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            log.error("step %d: non-finite metrics %s", step, bad)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


_BAR_KEYS = ("train/loss", "train/accuracy", "perf/tokens_per_s", "train/reward_margin")
