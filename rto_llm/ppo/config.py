"""Configs of the ``ppo`` and ``rto`` stages: one dataclass each, defaults = the paper's settings.

RTO paper (Zhong et al., ICML 2025; docs/practice.md section 1), UltraFeedback / Llama-3-8B: beta1 0.05,
per-token DPO clip c 0.05, beta2 0.01 fixed, beta3 1, actor lr 5e-7, critic lr 9e-6 (critic from a 1B
RM), rollout 1024 prompts, train batch 128 (8 optimizer steps per rollout), 1 PPO epoch, gamma 1,
lambda 0.95, clip 0.2, value clip 0.2, Adam (0.9, 0.95), grad clip 1.0, cosine schedule with 3% warm-up
and a 10% floor, temperature 1.0, top_p 1.0, top_k 0.

``PPOConfig`` and ``RTOConfig`` differ only in the reward: PPO uses ``rto.mode=ppo`` and ``beta1=0``
(no DPO model is loaded or run); RTO uses ``rto.mode=rto`` and ``beta1=0.05``.

Units: a *rollout* (one PPO step) generates ``rollout.batch_size`` responses, then runs
``ppo.epochs`` passes of optimizer steps of ``train.batch_size`` responses each.
``train.micro_batch_size`` rows go through one forward pass (gradient accumulation in between).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from rto_llm.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    TrainConfig,
    check_at_least,
    opt,
    section,
)


@dataclass
class RolloutOptions:
    """Generation of the rollout buffer (pure sampling only: see docs/practice.md section 2)."""

    batch_size: int = opt(1024, "Prompts per rollout (one PPO step), over all processes (paper 1024).")
    generation_batch_size: int = opt(64, "Prompts per generate call on one process.")
    forward_batch_size: int = opt(16, "Rows per no-grad forward pass when scoring the rollout (all roles).")
    max_new_tokens: int = opt(1024, "Maximum response tokens; responses without EOS by then are truncated.")
    temperature: float = opt(1.0, "Sampling temperature T; log-probs of pi, pi_old, pi_ref use logits / T.")
    top_p: float = opt(1.0, "Must be 1.0: nucleus sampling would make ratios and KL describe another policy.")
    top_k: int = opt(0, "Must be 0 (off): top-k sampling would make ratios and KL describe another policy.")
    repetition_penalty: float = opt(1.0, "Must be 1.0: a penalty changes the sampling distribution.")
    min_new_tokens: int = opt(0, "Must be 0: forbidding EOS changes the sampling distribution.")
    static_cache: bool = opt(
        False, "Preallocated KV cache (transformers' StaticCache) instead of a growing one; same samples. Falls "
        "back to the dynamic cache (one log line) where the model or transformers does not support it."
    )
    compile: bool = opt(
        False, "CUDA-graph decoding: torch.compile(mode='reduce-overhead') over the static cache (implies "
        "static_cache; same samples). CUDA only: elsewhere one log line and eager decoding."
    )
    zero3_gather: Literal["rollout", "step"] = opt(
        "rollout", "ZeRO-3 generation: rollout = gather the actor's parameters once per rollout (one full copy "
        "of the actor per GPU while generating); step = gather layer by layer at every decoding step (slow)."
    )

    def validate(self, prefix: str) -> None:
        check_at_least(self, prefix, 1, "batch_size", "generation_batch_size", "forward_batch_size", "max_new_tokens")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature must be > 0, got {self.temperature}")
        assert_pure_sampling(self.top_p, self.top_k, self.repetition_penalty, self.min_new_tokens, prefix)


def assert_pure_sampling(top_p: float, top_k: int, repetition_penalty: float, min_new_tokens: int,
                         prefix: str = "rollout") -> None:
    """Refuse any sampling setting other than pure sampling at temperature T (docs/practice.md invariant 4)."""
    bad = []
    if top_p != 1.0:
        bad.append(f"{prefix}.top_p={top_p} (need 1.0)")
    if top_k != 0:
        bad.append(f"{prefix}.top_k={top_k} (need 0)")
    if repetition_penalty != 1.0:
        bad.append(f"{prefix}.repetition_penalty={repetition_penalty} (need 1.0)")
    if min_new_tokens != 0:
        bad.append(f"{prefix}.min_new_tokens={min_new_tokens} (need 0)")
    if bad:
        raise ConfigError(
            "PPO rollouts must use pure sampling, otherwise the PPO ratio and the KL describe another "
            "distribution (mean k1 goes negative): " + ", ".join(bad)
        )


@dataclass
class RewardOptions:
    """Reward model and the sequence score R = clip(normalize(r_RM), -10, 10) or the missing-EOS penalty."""

    path: str = opt("", "Reward-model directory (a *ForSequenceClassification model, e.g. from `rto-llm rm`).")
    normalize: bool = opt(True, "Normalize scores with the mean/std saved in the RM config before clipping.")
    score_clip: float = opt(10.0, "Clip of the normalized score to [-c, c] (0 = no clip).")
    missing_eos_penalty: float = opt(-1.0, "Score given to completions without EOS (see missing_eos_mode).")
    missing_eos_mode: Literal["replace", "subtract", "off"] = opt(
        "replace", "replace: R = penalty; subtract: R = R - penalty (TRL); off: no penalty."
    )
    beta3: float = opt(1.0, "beta3, the scale of the sequence score in the token reward (>= 0).")
    offload: bool = opt(False, "Keep the RM on the CPU between rollouts (moved to the device to score).")
    allow_template_mismatch: bool = opt(
        False, "Run even if the RM's tokenizer has another chat template than the actor's (it then scores "
        "text formatted unlike its training data)."
    )

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path is required: a reward-model directory (train one with `rto-llm rm`)")
        check_at_least(self, prefix, 0, "beta3")
        check_at_least(self, prefix, 0, "score_clip", note=" (0 = off)")


@dataclass
class KLOptions:
    """The KL term -beta2 * k(log pi_old - log pi_ref) per token, and the reference model pi_ref."""

    beta2: float = opt(0.01, "beta2, the KL coefficient (paper: 0.01, fixed); initial value if adaptive.")
    kind: Literal["k1", "k2", "k3"] = opt("k1", "KL estimator in the reward (k1 = log-ratio, unbiased).")
    adaptive: bool = opt(False, "Adaptive beta2 (Ziegler et al. 2019) towards target per-sequence KL.")
    target: float = opt(6.0, "Target KL per sequence (nats) of the adaptive controller.")
    horizon: float = opt(10000.0, "Horizon (samples) of the adaptive controller.")
    ref_path: str = opt("", "Reference model pi_ref; empty = model.path (the SFT model the actor starts from).")
    ref_ema_decay: float = opt(0.0, "Reference EMA: ref <- d * ref + (1 - d) * actor after each rollout (0 = off).")
    offload: bool = opt(False, "Keep the reference (and DPO model) on the CPU between rollouts.")

    def validate(self, prefix: str) -> None:
        check_at_least(self, prefix, 0, "beta2")
        if not 0.0 <= self.ref_ema_decay < 1.0:
            raise ConfigError(f"{prefix}.ref_ema_decay must be in [0, 1), got {self.ref_ema_decay}")
        if self.target <= 0 or self.horizon <= 0:
            raise ConfigError(f"{prefix}.target and {prefix}.horizon must be > 0")


@dataclass
class RTOOptions:
    """The DPO token reward clip(beta1 * (log pi_dpo - log pi_ref)(y_t), -c, c) and its ablations."""

    mode: Literal["ppo", "rto", "semi_rto", "ddpo", "rs_ppo"] = opt(
        "ppo", "Reward: ppo (no DPO term), rto (dense), semi_rto, ddpo, rs_ppo (RTO section 5 ablations)."
    )
    beta1: float = opt(0.0, "beta1, the DPO reward scale (RTO paper 0.05); 0 = no DPO model at all.")
    dpo_clip: float = opt(0.05, "Per-token clip c of the DPO reward (authors' code 0.05); 0 = no clip.")
    dpo_path: str = opt("", "DPO model: a full model directory or a LoRA adapter over the reference.")
    dpo_ref_path: str = opt(
        "", "The model the DPO model was trained against; empty = the PPO reference (loaded once)."
    )
    delimiters: str = opt(".,!,?,\\n", "Comma-separated delimiter strings ending a segment (semi_rto only).")

    def validate(self, prefix: str) -> None:
        check_at_least(self, prefix, 0, "beta1", note=" (0 switches the DPO reward off)")
        check_at_least(self, prefix, 0, "dpo_clip", note=" (0 = no clip)")
        if self.uses_dpo and not self.dpo_path:
            raise ConfigError(f"{prefix}.mode={self.mode} with beta1={self.beta1} needs {prefix}.dpo_path")

    @property
    def uses_dpo(self) -> bool:
        """True when the DPO model is needed (beta1 > 0 and mode != ppo)."""
        return self.mode != "ppo" and self.beta1 > 0


@dataclass
class CriticOptions:
    """The critic (value model) V(s_t): a scalar-head model, initialized from the reward model."""

    path: str = opt("", "Critic init directory; empty = reward.path (critic initialized from the RM).")
    lr: float = opt(9e-6, "Critic peak learning rate (paper 9e-6); other optimizer settings as train.")
    warmup_rollouts: int = opt(0, "Rollouts at the start that train only the critic (actor frozen).")
    gradient_checkpointing: bool = opt(False, "Recompute critic activations in the backward pass.")

    def validate(self, prefix: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr must be > 0, got {self.lr}")
        check_at_least(self, prefix, 0, "warmup_rollouts")


@dataclass
class PPOOptions:
    """PPO update: epochs over the rollout buffer, advantage estimator, clipped losses."""

    epochs: int = opt(1, "PPO epochs over each rollout buffer (paper 1).")
    max_rollouts: int = opt(0, "Stop after this many rollouts (PPO steps); 0 = train.epochs over the prompts.")
    advantage_estimator: Literal["gae", "reinforce++"] = opt(
        "gae", "gae (with the critic) or reinforce++ (no critic: whitened reward-to-go)."
    )
    gamma: float = opt(1.0, "Discount gamma (paper 1).")
    lam: float = opt(0.95, "GAE lambda (paper 0.95).")
    whiten_advantages: bool = opt(True, "Whiten advantages over the whole rollout buffer (valid tokens).")
    clip_eps: float = opt(0.2, "PPO ratio clip eps (paper 0.2).")
    dual_clip: float = opt(0.0, "Dual-clip constant c > 1 (Ye et al. 2020); 0 = off.")
    value_clip: float = opt(0.2, "Value clip eps (paper 0.2); 0 = no value clipping.")
    vf_coef: float = opt(1.0, "Weight of the value loss (the critic has its own optimizer).")
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = opt(
        "token-mean", "Reduction of per-token losses over a train batch (micro-batches weighted to match)."
    )
    shuffle: bool = opt(True, "Shuffle the buffer before each PPO epoch (seeded from train.seed, rollout, epoch).")

    def validate(self, prefix: str) -> None:
        check_at_least(self, prefix, 1, "epochs")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"{prefix}.gamma and {prefix}.lam must be in [0, 1]")
        if self.clip_eps <= 0:
            raise ConfigError(f"{prefix}.clip_eps must be > 0, got {self.clip_eps}")
        if self.dual_clip and self.dual_clip <= 1.0:
            raise ConfigError(f"{prefix}.dual_clip must be > 1 or 0 (off), got {self.dual_clip}")
        check_at_least(self, prefix, 0, "value_clip")


@dataclass
class PerfOptions:
    """Throughput accounting."""

    peak_tflops: float = opt(0.0, "Peak dense TFLOP/s of one device for MFU; 0 = guess from the GPU name.")
    stop_on_nonfinite: bool = opt(True, "Stop (keeping the last good checkpoint) on NaN/inf anywhere.")
    frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Dtype of the frozen roles (reference, RM, DPO); auto = bfloat16 with deepspeed.bf16, else model.dtype."
    )


def _ppo_train() -> TrainConfig:
    return TrainConfig(output_dir="runs/ppo", batch_size=128, micro_batch_size=4, lr=5e-7)


@dataclass
class PPOConfig:
    """Stage `ppo`: PPO with a reward model, per-token KL penalty and a critic (RTO mode `ppo`)."""

    model: ModelConfig = section(ModelConfig, "Actor: the SFT model PPO starts from (also pi_ref by default).")
    data: DataConfig = section(lambda: DataConfig(max_len=2048, max_prompt_len=1024), "Prompts.")
    train: TrainConfig = section(_ppo_train, "Actor optimization (train.batch_size = responses per step).")
    rollout: RolloutOptions = section(RolloutOptions, "Rollout generation.")
    reward: RewardOptions = section(RewardOptions, "Reward model and sequence score.")
    kl: KLOptions = section(KLOptions, "KL penalty and reference model.")
    rto: RTOOptions = section(RTOOptions, "DPO token reward (RTO).")
    critic: CriticOptions = section(CriticOptions, "Critic.")
    ppo: PPOOptions = section(PPOOptions, "PPO update.")
    perf: PerfOptions = section(PerfOptions, "Throughput and safety.")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "DeepSpeed ZeRO (actor and critic).")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints (save_every counts rollouts).")
    log: LogConfig = section(LogConfig, "Logging (one row per rollout).")
    eval: EvalConfig = section(EvalConfig, "Evaluation on data.eval_path prompts (every N rollouts, at the end).")


def _rto_options() -> RTOOptions:
    return RTOOptions(mode="rto", beta1=0.05, dpo_clip=0.05)


def _rto_train() -> TrainConfig:
    return dataclasses.replace(_ppo_train(), output_dir="runs/rto")


@dataclass
class RTOConfig(PPOConfig):
    """Stage `rto`: PPO whose reward adds RTO's dense DPO token reward (beta1 = 0.05, c = 0.05)."""

    train: TrainConfig = section(_rto_train, "Actor optimization (train.batch_size = responses per step).")
    rto: RTOOptions = section(_rto_options, "DPO token reward (RTO).")


def check_ppo_config(cfg: PPOConfig, world_size: int = 1) -> None:
    """Cross-section checks of a PPO / RTO config (the per-section checks run in ``load_config``)."""
    t, r = cfg.train, cfg.rollout
    if cfg.train.max_steps:
        raise ConfigError("train.max_steps is not used by ppo/rto: set ppo.max_rollouts (rollouts = PPO steps)")
    if r.batch_size % world_size:
        raise ConfigError(f"rollout.batch_size ({r.batch_size}) must be a multiple of the {world_size} processes")
    if r.batch_size % t.batch_size:
        raise ConfigError(
            f"rollout.batch_size ({r.batch_size}) must be a multiple of train.batch_size ({t.batch_size})"
        )
    if t.batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x processes ({world_size})"
        )
    if cfg.kl.ref_ema_decay > 0 and cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("kl.ref_ema_decay needs full actor parameters: use deepspeed.zero_stage <= 2")
    if cfg.kl.ref_ema_decay > 0 and cfg.rto.uses_dpo:
        raise ConfigError(
            "kl.ref_ema_decay > 0 moves pi_ref away from the model the DPO model was trained against; "
            "use it with rto.beta1=0 (or rto.mode=ppo)"
        )
    if cfg.critic.warmup_rollouts and cfg.ppo.advantage_estimator != "gae":
        raise ConfigError("critic.warmup_rollouts needs ppo.advantage_estimator=gae (reinforce++ has no critic)")
