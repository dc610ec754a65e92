"""Step 8 of the PPO loop (:mod:`rto_llm.ppo.trainer`): the PPO update on one rollout buffer.

``ppo.epochs`` passes over this process's buffer, shuffled per epoch (seeded from train.seed, the rollout,
the epoch and the rank), in train batches of ``train.batch_size / processes`` rows; one optimizer step of
the actor and one of the critic per train batch. Inside a train batch, micro-batches of
``train.micro_batch_size`` rows accumulate gradients:

- actor micro-step: the clipped policy loss (``rto_sim.core.get_policy_loss``: ``ppo``, or ``dual_clip``)
  of log pi at the rollout temperature against pi_old, with the buffer's advantages;
- critic micro-step: the clipped value loss (``rto_sim.core.value_loss``) against the buffer's returns,
  times ``ppo.vf_coef``.

Each micro-batch loss is weighted by its share of the *global* train batch's units (tokens for
token-mean, rows otherwise: ``microbatch_loss_weight`` x local units / global units) and by the world
size (the engines average gradients over processes), so the accumulated gradient is the gradient of the
whole train batch's loss for any micro-batch size and number of processes (docs/practice.md invariant 13).
A non-finite loss (summed over processes) or gradient norm stops the run before the optimizer step (the shared
guard of ``rto_llm/guard.py``).
"""

from __future__ import annotations

import torch

from rto_llm.distributed import all_reduce_dict, all_reduce_sum
from rto_llm.ppo.experience import Experience, response_logits, response_values
from rto_llm.ppo.metrics import UpdateStats
from rto_sim.core import (
    entropy_from_logits,
    gather_logprobs,
    get_policy_loss,
    masked_mean,
    microbatch_loss_weight,
    value_loss,
)

# per-optimizer-step sums over micro-batches (each weighted by its share of the train batch)
_STEP_KEYS = ("policy_loss", "value_loss", "clipfrac", "approxkl", "ratio_mean", "vf_clipfrac", "entropy")
_ACTOR_KEYS = ("policy_loss", "clipfrac", "approxkl", "ratio_mean", "entropy")


class PPOUpdate:
    """The update of one run: ``actor_engine`` and ``critic_engine`` (None without a critic) train on
    ``train_local`` rows per optimizer step. ``check_finite(x, what, rollout)`` stops the run on NaN/inf."""

    def __init__(self, cfg, actor_engine, critic_engine, info, train_local: int, check_finite):
        self.cfg, self.info, self.train_local, self.check_finite = cfg, info, train_local, check_finite
        self.actor_engine, self.critic_engine = actor_engine, critic_engine
        p = cfg.ppo
        self.policy_loss = get_policy_loss("dual_clip" if p.dual_clip else "ppo")
        self.policy_kw = {"clip_eps": p.clip_eps, "loss_agg_mode": p.loss_agg}
        if p.dual_clip:
            self.policy_kw["dual_clip"] = p.dual_clip

    def __call__(self, exp: Experience, rollout: int) -> dict[str, float]:
        """``ppo.epochs`` passes over ``exp``; returns the update metrics. The actor stays frozen during
        the first ``critic.warmup_rollouts`` rollouts."""
        train_actor = rollout >= self.cfg.critic.warmup_rollouts
        stats = UpdateStats()
        for epoch in range(self.cfg.ppo.epochs):
            for batch in self.train_batches(exp, rollout, epoch):
                self.optimizer_step(batch, train_actor, stats, rollout)
        row = stats.result()
        row["lr/actor"] = self.actor_engine.lr()
        if self.critic_engine is not None:
            row["lr/critic"] = self.critic_engine.lr()
        row["train/actor_frozen"] = float(not train_actor)
        return row

    def train_batches(self, exp: Experience, rollout: int, epoch: int):
        """This process's train batches of one epoch: the buffer shuffled with a seed from (train.seed,
        rollout, epoch, rank), or in order (``ppo.shuffle=false``)."""
        B, dev = exp.batch_size, exp.sequences.device
        if self.cfg.ppo.shuffle:
            seed = (self.cfg.train.seed * 1_000_003 + rollout * 1009 + epoch) * 64 + self.info.rank
            order = torch.randperm(B, generator=torch.Generator().manual_seed(seed)).to(dev)
        else:
            order = torch.arange(B, device=dev)
        for s in range(0, B, self.train_local):
            yield exp.select(order[s : s + self.train_local])

    def micro_batches(self, batch: Experience):
        """``(micro-batch, weight)``: trimmed micro-batches and their share of the global train batch."""
        mode, n, mbs = self.cfg.ppo.loss_agg, batch.batch_size, self.cfg.train.micro_batch_size
        local = float(batch.action_mask.sum()) if mode == "token-mean" else float(batch.action_mask.shape[0])
        total = float(all_reduce_sum(torch.tensor([local], dtype=torch.float64))[0])
        for k in range(0, n, mbs):
            micro = batch.select(torch.arange(k, min(n, k + mbs), device=batch.sequences.device)).trimmed()
            w = microbatch_loss_weight(micro.action_mask, batch.action_mask, mode)
            yield micro, w * local / total

    def optimizer_step(self, batch: Experience, train_actor: bool, stats: UpdateStats, rollout: int) -> None:
        """Accumulate the micro-batches of one train batch, then one optimizer step per trained model."""
        step = dict.fromkeys(_STEP_KEYS, 0.0)
        for micro, w in self.micro_batches(batch):
            if train_actor:
                self.actor_micro_step(micro, w, step, stats, rollout)
            if self.critic_engine is not None:
                self.critic_micro_step(micro, w, step, rollout)
        step = all_reduce_dict(step)
        # the losses summed over processes (NaN on one process is NaN on all), before any optimizer step
        if train_actor:
            self.check_finite(torch.tensor(step["policy_loss"]), "policy loss", rollout)
        if self.critic_engine is not None:
            self.check_finite(torch.tensor(step["value_loss"]), "value loss", rollout)
        if train_actor:
            stats.add("grad_norm_actor", self._engine_step(self.actor_engine, "actor grad norm", rollout))
            for name in _ACTOR_KEYS:
                stats.add(name, step[name])
        if self.critic_engine is not None:
            stats.add("grad_norm_critic", self._engine_step(self.critic_engine, "critic grad norm", rollout))
            stats.add("value_loss", step["value_loss"])
            stats.add("vf_clipfrac", step["vf_clipfrac"])

    def actor_micro_step(self, micro: Experience, w: float, step: dict, stats: UpdateStats, rollout: int) -> None:
        """Clipped policy loss of one micro-batch; backward with weight ``w`` x world size."""
        T = self.cfg.rollout.temperature
        seq, mask, P = micro.sequences, micro.action_mask, micro.prompt_width
        logits = self.actor_engine.run(response_logits, seq, micro.attention_mask, P)
        logprobs = gather_logprobs(logits, seq[:, P:], T)
        loss, st = self.policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, **self.policy_kw)
        self.actor_engine.backward(loss * (w * self.info.world_size))
        self.actor_engine.micro_step()
        with torch.no_grad():
            ent = masked_mean(entropy_from_logits(logits.detach().float() / T), mask)
        step["policy_loss"] += float(loss.detach()) * w
        step["entropy"] += float(ent) * w
        for name in ("clipfrac", "approxkl", "ratio_mean"):
            step[name] += float(st[name]) * w
        stats.add_ratio_range(float(st["ratio_min"]), float(st["ratio_max"]))

    def critic_micro_step(self, micro: Experience, w: float, step: dict, rollout: int) -> None:
        """Clipped value loss of one micro-batch; backward with weight ``ppo.vf_coef`` x ``w`` x world size."""
        p = self.cfg.ppo
        values = self.critic_engine.run(response_values, micro.sequences, micro.attention_mask, micro.prompt_width)
        vloss, vst = value_loss(values, micro.values, micro.returns, micro.action_mask,
                                clip_eps=p.value_clip or None, loss_agg_mode=p.loss_agg)
        self.critic_engine.backward(vloss * (p.vf_coef * w * self.info.world_size))
        self.critic_engine.micro_step()
        step["value_loss"] += float(vloss.detach()) * w
        step["vf_clipfrac"] += float(vst["vf_clipfrac"]) * w

    def _engine_step(self, engine, what: str, rollout: int) -> float:
        """The optimizer step of ``engine`` (grad clip inside); its gradient norm is checked before the step."""
        return engine.optimizer_step(check=lambda norm: self.check_finite(norm, what, rollout))
