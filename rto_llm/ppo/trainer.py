"""The PPO / RTO trainer: one linear, numbered loop per rollout (one PPO step)::

    1. prompts      the rollout's prompts: a pure function of (seed, rollout index)
    2. generate     pure sampling at temperature T from the actor (left padding, KV cache)
    3. forward      no-grad passes: pi_old and pi_ref at T, pi_dpo and pi_ref at T = 1 (RTO only),
                    critic values, RM scores (experience.score_rollout)
    4. score        R = clip(normalize(r_RM), -10, 10), or the missing-EOS penalty (completion only)
    5. rewards      r_t = -beta2 kl_t + dpo_t + [t = last] beta3 R   (rto_sim.core.compute_rto_rewards)
    6. advantages   GAE (gamma, lambda) or REINFORCE++, whitened over the whole buffer
    7. metrics      rollout statistics; stop on NaN/inf before touching the weights
    8. update       ppo.epochs passes of optimizer steps over shuffled train batches; per micro-batch
                    the clipped policy loss and the clipped value loss, weighted by the micro-batch's
                    share of the train batch (gradient accumulation)
    9. controllers  reference EMA (optional); KL controller update (adaptive beta2) from the
                    KL averaged over processes
   10. log          metrics, red flags, checkpoint (atomic; save_every counts rollouts)

Models: the actor and the critic train through the foundation's engine (DeepSpeed or plain torch); the
reference, reward model and DPO model are frozen (eval mode, no grad, dropout off). With a LoRA-adapter
DPO model the reference *is* the peft model: adapter off = pi_ref, adapter on = pi_dpo.

Where the steps live: set-up in ``roles.py`` (loading, tokenizer checks); 2-6 in ``experience.py``;
7 and 10 in ``metrics.py``; 8 in ``update.py``; every equation in ``rto_sim.core``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from rto_llm import checkpoint as ckpt
from rto_llm import lifecycle
from rto_llm.config import ConfigError
from rto_llm.data import load_examples, step_indices
from rto_llm.distributed import all_reduce_dict, create_engine, init_distributed
from rto_llm.evaluation import PPOEvaluator
from rto_llm.guard import NonFiniteError, NonFiniteGuard  # noqa: F401  (NonFiniteError: re-exported)
from rto_llm.logging import setup_console_logging
from rto_llm.models import REWARD_MEAN_KEY, model_tokenizer, reward_stats
from rto_llm.ppo.config import check_ppo_config
from rto_llm.ppo.experience import (
    Experience,
    assemble_rewards,
    compute_advantages,
    delimiter_table,
    generate,
    score_rollout,
    sequence_score,
)
from rto_llm.ppo.metrics import RedFlags, nonfinite_keys, peak_tflops, rollout_flops, rollout_metrics
from rto_llm.ppo.roles import frozen_on_device, load_roles
from rto_llm.ppo.update import PPOUpdate
from rto_llm.trainers.base import begin_run, peak_memory_gb
from rto_sim.core import AdaptiveKLController, FixedKLController

log = logging.getLogger("rto_llm")

_BAR = ("objective/scores", "objective/kl", "val/response_length", "policy/clipfrac_avg")
_SUMMARY = ("objective/scores", "objective/kl", "objective/rlhf_reward", "val/response_length", "loss/policy_avg",
            "loss/value_avg", "grad_norm/actor")


class PPOTrainer:
    """PPO / RTO on an LLM. ``cfg`` is a ``PPOConfig`` or ``RTOConfig``."""

    stage = "ppo"

    # ---- set-up ---------------------------------------------------------------------------------
    def __init__(self, cfg):
        self.cfg = cfg
        self.stage = "rto" if cfg.rto.uses_dpo else "ppo"
        self.info = info = init_distributed(cfg.train.device)
        setup_console_logging(info.is_main)
        check_ppo_config(cfg, info.world_size)
        self.ckpt_dir = os.path.join(cfg.train.output_dir, "checkpoints")
        self.guard = NonFiniteGuard(self.ckpt_dir, "rollout", enabled=cfg.perf.stop_on_nonfinite)
        # before any model loads: output directory, resume checkpoint and config, prompts and batch sizes
        self.resume_plan = lifecycle.preflight(cfg, info, self.stage)
        if cfg.model.dropout:
            log.warning("model.dropout=true: the first PPO ratio will not be 1 and the KL will be noisy")
        ckpt.seed_everything(cfg.train.seed)
        self.tokenizer = model_tokenizer(cfg.model)
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        # evaluation (eval section): eval prompts and gold reward are checked before any model loads
        self.evaluator = PPOEvaluator(cfg, self.tokenizer, info)
        self.eval_history = self.evaluator.history  # one row per evaluation: {"step": n, "eval/...": ...}
        d = cfg.data
        self.prompts, self.data_stats = load_examples("prompt", d.train_path, d.train_split, self.tokenizer, d)
        self._plan()
        self.roles = load_roles(cfg, self.tokenizer, info.device)
        self.rm_mean, self.rm_std = reward_stats(self.roles.reward_model)
        if cfg.reward.normalize and not hasattr(self.roles.reward_model.config, REWARD_MEAN_KEY):
            log.warning("reward model has no saved mean/std (rto_reward_mean/std): scores are not normalized")
        self.delimiters = delimiter_table(self.tokenizer, cfg.rto.delimiters) if cfg.rto.mode == "semi_rto" else None
        self._build_engines()
        self.kl_ctl = (
            AdaptiveKLController(cfg.kl.beta2, cfg.kl.target, cfg.kl.horizon)
            if cfg.kl.adaptive else FixedKLController(cfg.kl.beta2)
        )
        self.red_flags = RedFlags()
        # Re-seed after loading: the rollouts' random numbers do not depend on which roles were loaded
        # (a peft adapter or a fresh critic head draws from the RNG), so PPO and RTO runs sample alike.
        # Each process samples with its own stream (seed + rank; rank 0 = a one-process run).
        ckpt.seed_everything(cfg.train.seed + info.rank)

    def _plan(self) -> None:
        cfg, W = self.cfg, self.info.world_size
        self.rollout_local = cfg.rollout.batch_size // W
        self.train_local = cfg.train.batch_size // W
        self.grad_accum = self.train_local // cfg.train.micro_batch_size
        self.rollouts_per_epoch = len(self.prompts) // cfg.rollout.batch_size
        if self.rollouts_per_epoch == 0:
            raise ConfigError(
                f"rollout.batch_size ({cfg.rollout.batch_size}) is larger than the prompt set ({len(self.prompts)})"
            )
        self.total_rollouts = cfg.ppo.max_rollouts or cfg.train.epochs * self.rollouts_per_epoch
        self.steps_per_rollout = cfg.ppo.epochs * (cfg.rollout.batch_size // cfg.train.batch_size)
        warm = min(cfg.critic.warmup_rollouts, self.total_rollouts)
        self.actor_total_steps = max(1, (self.total_rollouts - warm) * self.steps_per_rollout)
        self.critic_total_steps = self.total_rollouts * self.steps_per_rollout

    def _build_engines(self) -> None:
        """Actor and critic engines (the critic: ``train`` settings with ``critic.lr``)."""
        cfg, info = self.cfg, self.info
        self.roles.actor.to(info.device)
        self.actor_engine = create_engine(
            self.roles.actor, cfg.train, cfg.deepspeed, self.actor_total_steps, self.grad_accum, info
        )
        self.critic_engine = None
        if self.roles.critic is not None:
            self.roles.critic.to(info.device)
            critic_train = dataclasses.replace(cfg.train, lr=cfg.critic.lr)
            self.critic_engine = create_engine(
                self.roles.critic, critic_train, cfg.deepspeed, self.critic_total_steps, self.grad_accum, info
            )
        self.roles.actor = self.actor_engine.module
        self.roles.critic = self.critic_engine.module if self.critic_engine is not None else None
        self.update = PPOUpdate(cfg, self.actor_engine, self.critic_engine, info, self.train_local, self._check_finite)
        self.engines = ckpt.EngineGroup({"actor": self.actor_engine, "critic": self.critic_engine}, self.extra_state,
                                        self.load_extra_state, info, state_file="ppo_state.pt")

    # ---- state ----------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        state = {"kl_coef": self.kl_ctl.value, "red_flags": self.red_flags.state_dict(),
                 "eval": self.evaluator.state_dict()}
        if self.cfg.kl.ref_ema_decay > 0:
            state["reference"] = {k: v.cpu() for k, v in self.roles.reference.state_dict().items()}
        return state

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.value = state["kl_coef"]
        self.red_flags.load_state_dict(state["red_flags"])
        self.evaluator.load_state_dict(state.get("eval", {}))
        if "reference" in state:
            self.roles.reference.load_state_dict(state["reference"])

    # ---- one rollout: steps 1-9 -------------------------------------------------------------------
    def rollout_step(self, k: int) -> dict[str, float]:
        """Rollout ``k`` (0-based): steps 1-9. Returns its metrics (averaged over processes); logging and
        checkpoints (step 10) are the caller's (:meth:`train`)."""
        t0 = time.perf_counter()
        prompts = self.rollout_prompts(k)  # 1. prompts
        try:
            exp, times = self.make_experience(prompts)  # 2-6. generate, forward, score, rewards, advantages
        except RuntimeError as e:  # NaN/inf logits reach torch.multinomial: the actor's weights diverged
            if "probability tensor contains" not in str(e):
                raise
            self.guard.stop(k, "sampling probabilities (NaN/inf logits from the actor)", "the update")
        row = self.check_rollout(exp, k)  # 7. rollout metrics (stop on NaN/inf)
        t_train = time.perf_counter()
        row.update(self.ppo_update(exp, k))  # 8. PPO update
        times["perf/time_train"] = time.perf_counter() - t_train
        # 9. controllers: reference EMA; KL controller from the KL averaged over processes
        if self.cfg.kl.ref_ema_decay > 0:
            self.update_reference_ema()
        row = {**row, **times, **self._perf(exp, time.perf_counter() - t0)}
        row = all_reduce_dict(row, mean=True) if self.info.world_size > 1 else row
        self.kl_ctl.update(row["objective/kl"], self.cfg.rollout.batch_size)
        self._check_metrics(row, k, "metrics", "the next rollout")
        return row

    # ---- step 1: prompts --------------------------------------------------------------------------
    def prompt_indices(self, rollout: int) -> list[int]:
        """Global prompt indices of rollout ``rollout``: a fresh permutation per epoch, drop-last."""
        n, c = len(self.prompts), self.cfg
        return step_indices(n, c.train.seed, rollout, self.rollouts_per_epoch, c.rollout.batch_size)

    def rollout_prompts(self, rollout: int) -> list[list[int]]:
        """This process's share of rollout ``rollout``'s prompts (a pure function of (seed, rollout))."""
        lo = self.info.rank * self.rollout_local
        return [self.prompts[i]["prompt_ids"] for i in self.prompt_indices(rollout)[lo : lo + self.rollout_local]]

    # ---- steps 2-6: the rollout buffer ------------------------------------------------------------
    @torch.no_grad()
    def make_experience(self, prompt_ids: list[list[int]]) -> tuple[Experience, dict[str, float]]:
        """Steps 2-6 on this process's prompts; returns the filled buffer and phase timings."""
        cfg, dev = self.cfg, self.info.device
        actor = self.roles.actor
        was_training = actor.training
        actor.eval()
        t0 = time.perf_counter()
        # 2. generate
        with self.actor_engine.generation_context(cfg.rollout.zero3_gather):  # ZeRO-3: gather once per rollout
            buffer = generate(actor, prompt_ids, cfg.rollout, self.pad_id, self.eos_id)
        seq, am, action_mask, has_eos, sample_lp, P = (x.to(dev) if torch.is_tensor(x) else x for x in buffer)
        t1 = time.perf_counter()
        # 3. forward passes of every role (no grad)
        with frozen_on_device(self.roles, cfg, dev):
            out = score_rollout(self.roles, seq, am, action_mask, P, cfg.rollout.temperature,
                                cfg.rollout.forward_batch_size, need_dpo=cfg.rto.uses_dpo)
        # 4. sequence score R
        scores = sequence_score(out["raw_scores"], has_eos, cfg.reward, self.rm_mean, self.rm_std)
        exp = Experience(
            sequences=seq, attention_mask=am, action_mask=action_mask, prompt_width=P, has_eos=has_eos,
            sample_logprobs=sample_lp, old_logprobs=out["old_logprobs"], ref_logprobs=out["ref_logprobs"],
            entropy=out["entropy"], dpo_logprobs=out.get("dpo_logprobs"), dpo_ref_logprobs=out.get("dpo_ref_logprobs"),
            values=out["values"], raw_scores=out["raw_scores"], scores=scores,
        )
        # 5. token rewards (RTO eq. 4.7)
        assemble_rewards(exp, self.kl_ctl.value, cfg.reward, cfg.kl.kind, cfg.rto, self.delimiters)
        # 6. advantages
        compute_advantages(exp, cfg.ppo)
        t2 = time.perf_counter()
        actor.train(was_training)
        return exp, {"perf/time_generate": t1 - t0, "perf/time_score": t2 - t1}

    # ---- step 7: rollout metrics ------------------------------------------------------------------
    def check_rollout(self, exp: Experience, rollout: int) -> dict[str, float]:
        """Rollout statistics; NaN/inf stops the run here, before any weight changes."""
        row = rollout_metrics(exp, self.cfg.rto, self.cfg.rollout.max_new_tokens)
        self._check_metrics(row, rollout, "rollout metrics", "the update")
        return row

    # ---- step 8: the PPO update -----------------------------------------------------------------
    def ppo_update(self, exp: Experience, rollout: int) -> dict[str, float]:
        """``ppo.epochs`` passes over ``exp`` in train batches, one optimizer step of actor and critic per
        train batch (:class:`~rto_llm.ppo.update.PPOUpdate`); returns the update metrics."""
        return self.update(exp, rollout)

    # ---- step 9: controllers (the KL controller is updated in rollout_step) -----------------------
    @torch.no_grad()
    def update_reference_ema(self) -> None:
        d = self.cfg.kl.ref_ema_decay
        ref = dict(self.roles.reference.named_parameters())
        for name, p in self.roles.actor.named_parameters():
            if name in ref:
                q = ref[name]
                q.mul_(d).add_(p.detach().to(q.device, q.dtype), alpha=1.0 - d)

    # ---- the loop; step 10 ------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> list[dict]:
        """Run rollouts to ``total_rollouts`` (or return after ``stop_after`` rollouts of this call,
        after saving a checkpoint: a deliberate interruption). Returns the per-rollout metrics."""
        cfg, info = self.cfg, self.info
        t_run = time.perf_counter()
        start, end, logger = begin_run(cfg, info, self.ckpt_dir, self.engines, self.stage, self.total_rollouts,
                                       stop_after, plan=self.resume_plan, unit="rollout")  # steps = rollouts
        history = []
        try:
            if start == 0:
                self.evaluator.maybe_run(self, 0, logger)  # eval.at_start: the starting policy, step 0
            for k in range(start, end):
                row = self.rollout_step(k)
                history.append({"step": k + 1, **row})
                self.log_rollout(k + 1, row, logger, end, stop_after)
        finally:
            logger.close()
        exported = []
        if end == self.total_rollouts and cfg.checkpoint.export_hf:
            exported.append(os.path.join(cfg.train.output_dir, "final"))
            self.export(exported[-1])
        if info.is_main:
            log.info("%s", lifecycle.run_summary(self.stage, "rollout", history, start, end, self.total_rollouts,
                                                 time.perf_counter() - t_run, cfg.train.output_dir, _SUMMARY,
                                                 exported))
        return history

    def log_rollout(self, n: int, row: dict[str, float], logger, end: int, stop_after: int | None) -> None:
        """Step 10 after rollout ``n`` (1-based): red flags, log, checkpoint (every ``save_every``
        rollouts, and at a deliberate interruption)."""
        self.red_flags.check(n, row)
        logger.log(n, row, force=n == end)
        if getattr(logger, "bar", None) is not None:  # live reward / KL / length next to the bar
            logger.bar.set_postfix({k.split("/")[-1]: f"{row[k]:.4g}" for k in _BAR if k in row})
        self.evaluator.maybe_run(self, n, logger)  # every eval.every rollouts and after the last (before a save)
        c = self.cfg.checkpoint
        last = n == self.total_rollouts
        if (c.save_every and n % c.save_every == 0) or (not c.save_every and last) or (
                stop_after is not None and n == end < self.total_rollouts):
            self.save_checkpoint(n)
        if c.save_hf_every and n % c.save_hf_every == 0:
            self.export(os.path.join(self.cfg.train.output_dir, "hf", f"step-{n:08d}"), n)

    # ---- helpers ----------------------------------------------------------------------------------
    def _perf(self, exp: Experience, dt: float) -> dict[str, float]:
        """Throughput of a PPO step of ``dt`` seconds: time, tokens/s, peak memory, MFU (known peak only)."""
        row = {"perf/step_s": dt, "perf/throughput": float(exp.attention_mask.sum()) / dt,
               "perf/peak_mem_gb": peak_memory_gb(self.info.device)}
        peak = peak_tflops(self.info.device, self.cfg.perf.peak_tflops)
        if peak > 0:
            flops = rollout_flops(self.roles, exp, self.cfg.rto.uses_dpo, self.cfg.ppo.epochs)
            row["perf/mfu"] = flops / dt / (peak * 1e12)
        return row

    def _check_finite(self, x, what: str, rollout: int) -> None:
        """The shared non-finite guard (rto_llm/guard.py); ``rollout`` is 0-based."""
        self.guard.check(x, what, rollout)

    def _check_metrics(self, row: dict[str, float], rollout: int, what: str, before: str) -> None:
        bad = nonfinite_keys(row)
        if bad and self.guard.enabled:
            self.guard.stop(rollout, f"{what} {bad}", before)

    def save_checkpoint(self, rollout: int) -> str:
        state = {"stage": self.stage, "total_rollouts": self.total_rollouts, "kl_coef": self.kl_ctl.value,
                 **lifecycle.run_identity(self.cfg)}
        keep = self.cfg.checkpoint.keep_last
        return ckpt.save_checkpoint(self.ckpt_dir, rollout, self.engines, state, self.info, keep, guard=self.guard)

    def export(self, path: str, rollout: int | None = None) -> None:
        """Hugging Face export of the actor (never of non-finite weights)."""
        n = self.total_rollouts if rollout is None else rollout
        self.guard.check_params(self.engines, n, f"export {path}")
        state_dict = self.actor_engine.full_state_dict()
        ckpt.export_hf(path, self.actor_engine.module, self.tokenizer, state_dict, self.info)
        if self.info.is_main:
            log.info("exported the %s actor to %s", self.stage, path)
