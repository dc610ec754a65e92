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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.distributed as dist

from rto_llm import checkpoint as ckpt
from rto_llm.config import ConfigError
from rto_llm.data import load_examples
from rto_llm.distributed import all_reduce_sum, create_engine, init_distributed
from rto_llm.logging import setup_console_logging
from rto_llm.models import (
    REWARD_MEAN_KEY,
    DPOTokenRewardProvider,
    TokenizerMismatchError,
    check_tokenizers,
    freeze,
    is_adapter_dir,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    reward_stats,
)
from rto_llm.ppo.config import check_ppo_config
from rto_llm.ppo.experience import (
    Experience,
    Roles,
    assemble_rewards,
    compute_advantages,
    delimiter_table,
    layout,
    response_logits,
    response_values,
    sample_responses,
    score_rollout,
    sequence_score,
)
from rto_llm.ppo.metrics import RedFlags, UpdateStats, nonfinite_keys, peak_tflops, rollout_flops, rollout_metrics
from rto_llm.trainers.base import begin_run, peak_memory_gb
from rto_sim.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gather_logprobs,
    get_policy_loss,
    masked_mean,
    microbatch_loss_weight,
    value_loss,
)

log = logging.getLogger("rto_llm")


_BAR = ("objective/scores", "objective/kl", "val/response_length", "policy/clipfrac_avg")


class NonFiniteError(RuntimeError):
    """NaN or inf in a loss, a gradient norm or a metric: the run stops; the last checkpoint is intact."""


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def _is_scalar_model_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except FileNotFoundError:
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters()) if model is not None else 0


class _Engines:
    """Actor + critic engines and the trainer's own state behind the one-engine checkpoint interface."""

    def __init__(self, trainer: PPOTrainer):
        self.t = trainer

    def save(self, path: str) -> None:
        for name, eng in (("actor", self.t.actor_engine), ("critic", self.t.critic_engine)):
            if eng is not None:
                os.makedirs(os.path.join(path, name), exist_ok=True)
                eng.save(os.path.join(path, name))
        if self.t.info.is_main:
            torch.save(self.t.extra_state(), os.path.join(path, "ppo_state.pt"))

    def load(self, path: str) -> None:
        for name, eng in (("actor", self.t.actor_engine), ("critic", self.t.critic_engine)):
            if eng is not None:
                eng.load(os.path.join(path, name))
        self.t.load_extra_state(torch.load(os.path.join(path, "ppo_state.pt"), weights_only=False))


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
        if cfg.model.dropout:
            log.warning("model.dropout=true: the first PPO ratio will not be 1 and the KL will be noisy")
        ckpt.seed_everything(cfg.train.seed)
        m = cfg.model
        self.tokenizer = load_tokenizer(
            m.tokenizer_path or m.path, m.allow_hub, "" if m.tokenizer_path else m.gguf_file, m.trust_remote_code
        )
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self._check_tokenizers()
        self.roles = self._load_roles()
        check_tokenizers(
            {"actor": self.tokenizer},
            {k: v for k, v in (("actor", self.roles.actor), ("reference", self.roles.reference),
                               ("reward", self.roles.reward_model), ("critic", self.roles.critic),
                               ("dpo", self.roles.dpo_model)) if v is not None},
        )
        self.rm_mean, self.rm_std = reward_stats(self.roles.reward_model)
        if cfg.reward.normalize and not hasattr(self.roles.reward_model.config, REWARD_MEAN_KEY):
            log.warning("reward model has no saved mean/std (rto_reward_mean/std): scores are not normalized")
        self.delimiters = delimiter_table(self.tokenizer, cfg.rto.delimiters) if cfg.rto.mode == "semi_rto" else None
        d = cfg.data
        self.prompts, self.data_stats = load_examples("prompt", d.train_path, d.train_split, self.tokenizer, d)
        self._plan()
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
        self.ckpt_dir = os.path.join(cfg.train.output_dir, "checkpoints")
        self._perm_cache: tuple[int, list[int]] | None = None

    def _check_tokenizers(self) -> None:
        """Every role with a tokenizer on disk must share the actor's (invariant 12; PAD != EOS: 8)."""
        cfg = self.cfg
        paths = {"reference": cfg.kl.ref_path, "reward": cfg.reward.path, "critic": cfg.critic.path,
                 "dpo": cfg.rto.dpo_path if cfg.rto.uses_dpo else "", "dpo_reference": cfg.rto.dpo_ref_path}
        toks = {"actor": self.tokenizer}
        for role, path in paths.items():
            if not path:
                continue
            if _has_tokenizer(path) or (cfg.model.allow_hub and not os.path.isdir(path)):
                toks[role] = load_tokenizer(path, cfg.model.allow_hub, "", cfg.model.trust_remote_code)
            elif not is_adapter_dir(path):  # an adapter's vocabulary is its base's (the reference, checked)
                log.warning("%s directory %s has no tokenizer: only its embedding size is checked", role, path)
        check_tokenizers(toks)
        rm_tok = toks.get("reward")
        template = getattr(self.tokenizer, "chat_template", None)
        if (rm_tok is not None and getattr(rm_tok, "chat_template", None) != template
                and cfg.data.apply_chat_template and not cfg.reward.allow_template_mismatch):
            raise TokenizerMismatchError(
                "the reward model's tokenizer has another chat template than the actor's: the RM would score "
                "text formatted unlike its training data (set reward.allow_template_mismatch=true to run anyway)"
            )

    def _frozen_mcfg(self, path: str):
        cfg = self.cfg
        dtype = cfg.perf.frozen_dtype
        if dtype == "auto":
            dtype = "bfloat16" if cfg.deepspeed.enabled and cfg.deepspeed.bf16 else cfg.model.dtype
        return dataclasses.replace(cfg.model, path=path, dtype=dtype, lora_rank=0, gradient_checkpointing=False)

    def _load_roles(self) -> Roles:
        cfg, m = self.cfg, self.cfg.model
        actor = load_causal_lm(m, trainable=True)
        if getattr(actor.config, "pad_token_id", None) is None:
            actor.config.pad_token_id = self.pad_id
        ref_path = cfg.kl.ref_path or m.path
        frozen = self._frozen_mcfg(ref_path)
        dpo_model, dpo_reference, adapter = None, None, False
        if cfg.rto.uses_dpo:
            dpo_ref = cfg.rto.dpo_ref_path
            if dpo_ref and os.path.abspath(dpo_ref) == os.path.abspath(ref_path):
                dpo_ref = ""  # the same model: load it once
            if is_adapter_dir(cfg.rto.dpo_path):
                if dpo_ref:
                    raise ConfigError("rto.dpo_ref_path with a LoRA-adapter DPO model: its reference is its base")
                provider = DPOTokenRewardProvider.from_paths(frozen, cfg.rto.dpo_path, ref_path)
                reference, adapter = provider.reference, True
            else:
                reference = load_causal_lm(frozen, trainable=False, path=ref_path)
                dpo_model = load_causal_lm(frozen, trainable=False, path=cfg.rto.dpo_path)
                if dpo_ref:
                    dpo_reference = load_causal_lm(frozen, trainable=False, path=dpo_ref)
        else:
            reference = load_causal_lm(frozen, trainable=False, path=ref_path)
        if not _is_scalar_model_dir(cfg.reward.path):
            raise ConfigError(
                f"reward.path={cfg.reward.path!r} is not a trained reward model (*ForSequenceClassification); "
                "a causal LM would get a random score head"
            )
        reward_model = load_scalar_model(self._frozen_mcfg(cfg.reward.path), trainable=False)
        critic = None
        if cfg.ppo.advantage_estimator == "gae":
            critic_cfg = dataclasses.replace(
                cfg.model, path=cfg.critic.path or cfg.reward.path, lora_rank=0,
                gradient_checkpointing=cfg.critic.gradient_checkpointing,
            )
            critic = load_scalar_model(critic_cfg, trainable=True)
        dev = self.info.device
        for role in (reference, reward_model, dpo_model, dpo_reference):
            if role is not None:
                freeze(role)
        if not cfg.kl.offload:
            for role in (reference, dpo_model, dpo_reference):
                if role is not None:
                    role.to(dev)
        if not cfg.reward.offload:
            reward_model.to(dev)
        return Roles(actor=actor, reference=reference, reward_model=reward_model, critic=critic,
                     dpo_model=dpo_model, dpo_adapter=adapter, dpo_reference=dpo_reference)

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
        cfg = self.cfg
        if cfg.kl.ref_ema_decay > 0 and cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
            raise ConfigError("kl.ref_ema_decay needs full actor parameters: use deepspeed.zero_stage <= 2")
        if cfg.deepspeed.enabled and not dist.is_initialized():
            # DeepSpeed needs a process group even for one process (torchrun / deepspeed set the env).
            port = os.environ.get("MASTER_PORT") or str(_free_port())
            addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
            backend = "nccl" if self.info.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=0, world_size=1)
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(k, v)
        self.roles.actor.to(self.info.device)
        self.actor_engine = create_engine(self.roles.actor, cfg, self.actor_total_steps, self.grad_accum, self.info)
        self.critic_engine = None
        if self.roles.critic is not None:
            ccfg = SimpleNamespace(train=dataclasses.replace(cfg.train, lr=cfg.critic.lr), deepspeed=cfg.deepspeed)
            self.roles.critic.to(self.info.device)
            self.critic_engine = create_engine(
                self.roles.critic, ccfg, self.critic_total_steps, self.grad_accum, self.info
            )
        self.roles.actor = self.actor_engine.module
        self.roles.critic = self.critic_engine.module if self.critic_engine is not None else None
        self.engines = _Engines(self)

    # ---- state ----------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        state = {"kl_coef": self.kl_ctl.value, "red_flags": self.red_flags.state_dict()}
        if self.cfg.kl.ref_ema_decay > 0:
            state["reference"] = {k: v.cpu() for k, v in self.roles.reference.state_dict().items()}
        return state

    def load_extra_state(self, state: dict) -> None:
        self.kl_ctl.value = state["kl_coef"]
        self.red_flags.load_state_dict(state["red_flags"])
        if "reference" in state:
            self.roles.reference.load_state_dict(state["reference"])

    def prompt_indices(self, rollout: int) -> list[int]:
        """Global prompt indices of rollout ``rollout``: a fresh permutation per epoch, drop-last."""
        epoch, pos = divmod(rollout, self.rollouts_per_epoch)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.prompts), generator=g).tolist())
        B = self.cfg.rollout.batch_size
        return self._perm_cache[1][pos * B : (pos + 1) * B]

    @contextmanager
    def _frozen_on_device(self):
        """Offloaded frozen roles visit the device for the scoring pass only."""
        cfg, dev = self.cfg, self.info.device
        moved = []
        if cfg.kl.offload:
            moved += [r for r in (self.roles.reference, self.roles.dpo_model, self.roles.dpo_reference) if r]
        if cfg.reward.offload:
            moved.append(self.roles.reward_model)
        for r in moved:
            r.to(dev)
        try:
            yield
        finally:
            for r in moved:
                r.to("cpu")

    # ---- steps 1-7: one rollout -----------------------------------------------------------------
    @torch.no_grad()
    def make_experience(self, prompt_ids: list[list[int]]) -> tuple[Experience, dict[str, float]]:
        """Steps 2-6 on this process's prompts; returns the filled buffer and phase timings."""
        cfg, dev = self.cfg, self.info.device
        r = cfg.rollout
        actor = self.roles.actor
        was_training = actor.training
        actor.eval()
        # 2. generate
        t0 = time.perf_counter()
        chunks, responses, logps = [], [], []
        for s in range(0, len(prompt_ids), r.generation_batch_size):
            p, pm, resp, lp = sample_responses(
                actor, prompt_ids[s : s + r.generation_batch_size], self.pad_id, self.eos_id,
                r.max_new_tokens, r.temperature,
            )
            chunks.append((p, pm))
            responses.append(resp)
            logps.append(lp)
        seq, am, action_mask, has_eos, sample_lp, P = layout(chunks, responses, logps, self.pad_id, self.eos_id)
        t1 = time.perf_counter()
        # 3. forward passes of every role (no grad)
        with self._frozen_on_device():
            out = score_rollout(
                self.roles, seq.to(dev), am.to(dev), action_mask.to(dev), P, r.temperature, r.forward_batch_size,
                need_dpo=cfg.rto.uses_dpo,
            )
        # 4. sequence score R
        has_eos = has_eos.to(dev)
        scores = sequence_score(out["raw_scores"], has_eos, cfg.reward, self.rm_mean, self.rm_std)
        exp = Experience(
            sequences=seq.to(dev), attention_mask=am.to(dev), action_mask=action_mask.to(dev), prompt_width=P,
            has_eos=has_eos, sample_logprobs=sample_lp.to(dev), old_logprobs=out["old_logprobs"],
            ref_logprobs=out["ref_logprobs"], entropy=out["entropy"], dpo_logprobs=out.get("dpo_logprobs"),
            dpo_ref_logprobs=out.get("dpo_ref_logprobs"), values=out["values"], raw_scores=out["raw_scores"],
            scores=scores,
        )
        # 5. token rewards (RTO eq. 4.7) and 6. advantages
        assemble_rewards(exp, self.kl_ctl.value, cfg.reward, cfg.kl.kind, cfg.rto, self.delimiters)
        compute_advantages(exp, cfg.ppo)
        t2 = time.perf_counter()
        actor.train(was_training)
        return exp, {"perf/time_generate": t1 - t0, "perf/time_score": t2 - t1}

    # ---- step 8: the PPO update -----------------------------------------------------------------
    def _global_units(self, mask: torch.Tensor) -> tuple[float, float]:
        mode = self.cfg.ppo.loss_agg
        local = float(mask.sum()) if mode == "token-mean" else float(mask.shape[0])
        total = float(all_reduce_sum(torch.tensor([local], dtype=torch.float64))[0])
        return local, total

    def ppo_update(self, exp: Experience, rollout: int) -> dict[str, float]:
        """``ppo.epochs`` passes over ``exp`` in train batches; returns the update metrics."""
        cfg, info = self.cfg, self.info
        p = cfg.ppo
        T = cfg.rollout.temperature
        train_actor = rollout >= cfg.critic.warmup_rollouts
        policy_loss = get_policy_loss("dual_clip" if p.dual_clip else "ppo")
        policy_kw = {"clip_eps": p.clip_eps, "loss_agg_mode": p.loss_agg}
        if p.dual_clip:
            policy_kw["dual_clip"] = p.dual_clip
        critic = self.roles.critic
        stats = UpdateStats()
        B = exp.batch_size
        for epoch in range(p.epochs):
            if p.shuffle:
                g = torch.Generator().manual_seed(
                    (cfg.train.seed * 1_000_003 + rollout * 1009 + epoch) * 64 + info.rank
                )
                order = torch.randperm(B, generator=g).to(exp.sequences.device)
            else:
                order = torch.arange(B, device=exp.sequences.device)
            for s in range(0, B, self.train_local):
                mb = exp.select(order[s : s + self.train_local])
                local_units, global_units = self._global_units(mb.action_mask)
                step = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approxkl": 0.0,
                        "ratio_mean": 0.0, "vf_clipfrac": 0.0, "entropy": 0.0}
                for k in range(0, mb.batch_size, cfg.train.micro_batch_size):
                    n = min(mb.batch_size, k + cfg.train.micro_batch_size)
                    micro = mb.select(torch.arange(k, n, device=mb.sequences.device)).trimmed()
                    w = microbatch_loss_weight(micro.action_mask, mb.action_mask, p.loss_agg)
                    w = w * local_units / global_units  # share of the global train batch
                    seq, am, mask, P = micro.sequences, micro.attention_mask, micro.action_mask, micro.prompt_width
                    if train_actor:
                        logits = self.actor_engine.run(response_logits, seq, am, P)
                        logprobs = gather_logprobs(logits, seq[:, P:], T)
                        loss, st = policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, **policy_kw)
                        self._check_finite(loss, "policy loss", rollout)
                        self.actor_engine.backward(loss * (w * info.world_size))
                        self.actor_engine.micro_step()
                        with torch.no_grad():
                            ent = masked_mean(entropy_from_logits(logits.detach().float() / T), mask)
                        del logits
                        step["policy_loss"] += float(loss.detach()) * w
                        step["entropy"] += float(ent) * w
                        for name in ("clipfrac", "approxkl", "ratio_mean"):
                            step[name] += float(st[name]) * w
                        stats.add_ratio_range(float(st["ratio_min"]), float(st["ratio_max"]))
                    if critic is not None:
                        values = self.critic_engine.run(response_values, seq, am, P)
                        vloss, vst = value_loss(
                            values, micro.values, micro.returns, mask, clip_eps=p.value_clip or None,
                            loss_agg_mode=p.loss_agg,
                        )
                        self._check_finite(vloss, "value loss", rollout)
                        self.critic_engine.backward(vloss * (p.vf_coef * w * info.world_size))
                        self.critic_engine.micro_step()
                        step["value_loss"] += float(vloss.detach()) * w
                        step["vf_clipfrac"] += float(vst["vf_clipfrac"]) * w
                names = sorted(step)
                red = all_reduce_sum(torch.tensor([step[n] for n in names], dtype=torch.float64)).tolist()
                step = dict(zip(names, red))
                if train_actor:
                    gn = self.actor_engine.optimizer_step()
                    self._check_finite(torch.tensor(gn), "actor grad norm", rollout)
                    stats.add("grad_norm_actor", gn)
                    for name in ("policy_loss", "clipfrac", "approxkl", "ratio_mean", "entropy"):
                        stats.add(name, step[name])
                if critic is not None:
                    gn = self.critic_engine.optimizer_step()
                    self._check_finite(torch.tensor(gn), "critic grad norm", rollout)
                    stats.add("grad_norm_critic", gn)
                    stats.add("value_loss", step["value_loss"])
                    stats.add("vf_clipfrac", step["vf_clipfrac"])
        row = stats.result()
        row["lr/actor"] = self.actor_engine.lr()
        if self.critic_engine is not None:
            row["lr/critic"] = self.critic_engine.lr()
        row["train/actor_frozen"] = float(not train_actor)
        return row

    def _check_finite(self, x: torch.Tensor, what: str, rollout: int) -> None:
        if self.cfg.perf.stop_on_nonfinite and not bool(torch.isfinite(x).all()):
            raise NonFiniteError(
                f"rollout {rollout}: non-finite {what}; stopping before the optimizer step "
                f"(the last checkpoint under {self.ckpt_dir} is intact)"
            )

    # ---- step 9: controllers ----------------------------------------------------------------------
    @torch.no_grad()
    def update_reference_ema(self) -> None:
        d = self.cfg.kl.ref_ema_decay
        ref = dict(self.roles.reference.named_parameters())
        for name, p in self.roles.actor.named_parameters():
            if name in ref:
                q = ref[name]
                q.mul_(d).add_(p.detach().to(q.device, q.dtype), alpha=1.0 - d)

    # ---- one rollout: steps 1-9 -------------------------------------------------------------------
    def rollout_step(self, k: int) -> dict[str, float]:
        """Rollout ``k`` (0-based): prompts, generation, scoring, rewards, advantages, PPO update,
        controllers. Returns its metrics (averaged over processes). Logging and checkpoints are the
        caller's (:meth:`train`)."""
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        # 1. prompts of this rollout (a pure function of (seed, k): the data position is k)
        idx = self.prompt_indices(k)[info.rank * self.rollout_local : (info.rank + 1) * self.rollout_local]
        prompts = [self.prompts[i]["prompt_ids"] for i in idx]
        # 2-6. generate, forward passes, score, rewards, advantages
        exp, times = self.make_experience(prompts)
        # 7. rollout metrics; stop on NaN/inf before any weight changes
        row = rollout_metrics(exp, cfg.rto, cfg.rollout.max_new_tokens)
        bad = nonfinite_keys(row)
        if bad and cfg.perf.stop_on_nonfinite:
            raise NonFiniteError(
                f"rollout {k}: non-finite rollout metrics {bad}; stopping before the update "
                f"(the last checkpoint under {self.ckpt_dir} is intact)"
            )
        # 8. PPO epochs over the buffer
        t_train = time.perf_counter()
        row.update(self.ppo_update(exp, k))
        times["perf/time_train"] = time.perf_counter() - t_train
        # 9. controllers: reference EMA; KL controller from the KL averaged over processes
        if cfg.kl.ref_ema_decay > 0:
            self.update_reference_ema()
        dt = time.perf_counter() - t0
        row.update(times)
        row["perf/step_s"] = dt
        row["perf/throughput"] = float(exp.attention_mask.sum()) / dt
        row["perf/peak_mem_gb"] = peak_memory_gb(info.device)
        peak = peak_tflops(info.device, cfg.perf.peak_tflops)
        if peak > 0:
            row["perf/mfu"] = self._step_flops(exp) / dt / (peak * 1e12)
        row = self._mean_over_processes(row)
        self.kl_ctl.update(row["objective/kl"], cfg.rollout.batch_size)
        bad = nonfinite_keys(row)
        if bad and cfg.perf.stop_on_nonfinite:
            raise NonFiniteError(f"rollout {k}: non-finite metrics {bad}; the last checkpoint is intact")
        return row

    # ---- the loop -------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> list[dict]:
        """Run rollouts to ``total_rollouts`` (or return after ``stop_after`` rollouts of this call,
        after saving a checkpoint: a deliberate interruption). Returns the per-rollout metrics."""
        cfg, info = self.cfg, self.info
        start, end, logger = begin_run(cfg, info, self.ckpt_dir, self.engines, self.stage, self.total_rollouts,
                                       stop_after)    # steps here are rollouts
        history = []
        try:
            for k in range(start, end):
                row = self.rollout_step(k)
                # 10. log, red flags, checkpoint
                self.red_flags.check(k + 1, row)
                history.append({"step": k + 1, **row})
                logger.log(k + 1, row, force=k + 1 == end)
                if getattr(logger, "bar", None) is not None:  # live reward / KL / length next to the bar
                    logger.bar.set_postfix({n.split("/")[-1]: f"{row[n]:.4g}" for n in _BAR if n in row})
                every = cfg.checkpoint.save_every
                if (every and (k + 1) % every == 0) or (stop_after is not None and k + 1 == end < self.total_rollouts):
                    self.save_checkpoint(k + 1)
        finally:
            logger.close()
        if end == self.total_rollouts:
            if cfg.checkpoint.export_hf:
                self.export(os.path.join(cfg.train.output_dir, "final"))
        return history

    def _step_flops(self, exp: Experience) -> float:
        r = self.roles
        gen = float(exp.action_mask.sum())
        seq = float(exp.attention_mask.sum())
        n_dpo = n_params(r.dpo_model) if self.cfg.rto.uses_dpo and not r.dpo_adapter else 0
        if self.cfg.rto.uses_dpo and r.dpo_adapter:
            n_dpo = n_params(r.reference)
        return rollout_flops(
            n_params(r.actor), n_params(r.critic), n_params(r.reference), n_params(r.reward_model), n_dpo,
            gen, seq, seq * self.cfg.ppo.epochs,
        )

    def _mean_over_processes(self, row: dict[str, float]) -> dict[str, float]:
        if self.info.world_size == 1:
            return row
        names = sorted(row)
        vals = all_reduce_sum(torch.tensor([row[n] for n in names], dtype=torch.float64)) / self.info.world_size
        return dict(zip(names, vals.tolist()))

    def save_checkpoint(self, rollout: int) -> str:
        state = {"stage": self.stage, "total_rollouts": self.total_rollouts, "kl_coef": self.kl_ctl.value}
        keep = self.cfg.checkpoint.keep_last
        return ckpt.save_checkpoint(self.ckpt_dir, rollout, self.engines, state, self.info, keep)

    def export(self, path: str) -> None:
        state_dict = self.actor_engine.full_state_dict()
        ckpt.export_hf(path, self.actor_engine.module, self.tokenizer, state_dict, self.info)
        if self.info.is_main:
            log.info("exported the %s actor to %s", self.stage, path)


def run(cfg) -> list[dict]:
    """Build a trainer from ``cfg`` and train it; returns the per-rollout metrics."""
    return PPOTrainer(cfg).train()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use `rto-llm ppo` / `rto-llm rto` (or rto_llm.ppo.cli.main)")
