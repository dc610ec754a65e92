"""The models of a PPO / RTO run and how they are loaded.

Roles: the actor (trained, causal LM), the critic (trained, scalar head; none with REINFORCE++), and the
frozen reference, reward model and, for RTO, the DPO model (eval mode, no grad, dropout off). With a
LoRA-adapter DPO model the reference *is* the peft model: adapter off = pi_ref, adapter on = pi_dpo (one copy
of the base weights). A DPO reference other than the PPO reference is a separate frozen model.

:func:`load_roles` refuses to start when a role's path holds the wrong kind of model (:func:`check_role_kinds`:
a reward model as the actor, reference or DPO model, a causal LM as the reward model), when roles do not share
the actor's tokenizer (vocabulary and special tokens; docs/practice.md invariant 12), when PAD == EOS
(invariant 8) or when the reward model's tokenizer has another chat template than the actor's. Every role's
tokenizer gets the run's PAD policy (``model.pad_token``) and every model is fitted to the actor's tokenizer
(the rows of an added PAD). The reward model may be a LoRA adapter (merged on load, with its score mean/std).
:func:`frozen_on_device` moves offloaded frozen roles to the device for the scoring pass only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from rto_llm.config import ConfigError
from rto_llm.distributed import is_partitioned, is_zero3, shard_frozen, zero3_init
from rto_llm.models import (
    CAUSAL_LM,
    REWARD_MODEL,
    DPOTokenRewardProvider,
    TokenizerMismatchError,
    adapter_disabled,
    check_model_kind,
    check_tokenizers,
    freeze,
    is_adapter_dir,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
)

log = logging.getLogger("rto_llm")


@dataclass
class Roles:
    """The models of a run. ``reference`` is the PPO pi_ref; with a LoRA-adapter DPO model it is the
    peft model whose adapter is the DPO model (``reference_context`` gives pi_ref)."""

    actor: torch.nn.Module
    reference: torch.nn.Module
    reward_model: torch.nn.Module
    critic: torch.nn.Module | None = None
    dpo_model: torch.nn.Module | None = None  # full DPO model; None with an adapter or without DPO
    dpo_adapter: bool = False  # True: pi_dpo = reference with its adapter on
    dpo_reference: torch.nn.Module | None = None  # a separate DPO reference (only if really different)
    frozen_engines: list = field(default_factory=list)  # ZeRO-3: the inference engines sharding frozen roles

    def reference_context(self):
        """Context in which ``reference`` computes pi_ref (adapter off when the DPO model is an adapter)."""
        return adapter_disabled(self.reference) if self.dpo_adapter else nullcontext()

    def named(self) -> dict[str, torch.nn.Module]:
        """The loaded models by role name (tokenizer checks name the roles this way)."""
        models = {"actor": self.actor, "reference": self.reference, "reward": self.reward_model,
                  "critic": self.critic, "dpo": self.dpo_model}
        return {k: v for k, v in models.items() if v is not None}


def n_params(model) -> int:
    """Parameter count (the full count also when the parameters are ZeRO-3 partitions)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) if model is not None else 0


def load_roles(cfg, tokenizer, device: torch.device) -> Roles:
    """Check the roles' tokenizers against the actor's ``tokenizer``, load every role of ``cfg`` (a
    ``PPOConfig``), check their embedding tables, and place the frozen ones (on ``device`` unless
    offloaded). The actor and critic stay where they were loaded: their engines place them."""
    check_role_kinds(cfg)
    _check_role_tokenizers(cfg, tokenizer)
    roles = _load_models(cfg, tokenizer, device)
    check_tokenizers({"actor": tokenizer}, roles.named())
    for role in (roles.reference, roles.reward_model, roles.dpo_model, roles.dpo_reference):
        if role is not None:
            freeze(role)
    if is_zero3(cfg.deepspeed):
        roles.frozen_engines = _shard_frozen_roles(roles, cfg)
    for role in _offloadable(roles, cfg, kl=not cfg.kl.offload, reward=not cfg.reward.offload):
        role.to(device)
    return roles


@contextmanager
def frozen_on_device(roles: Roles, cfg, device: torch.device):
    """Offloaded frozen roles (``kl.offload``, ``reward.offload``) visit ``device`` inside the block."""
    moved = _offloadable(roles, cfg, kl=cfg.kl.offload, reward=cfg.reward.offload)
    for r in moved:
        r.to(device)
    try:
        yield
    finally:
        for r in moved:
            r.to("cpu")


def _offloadable(roles: Roles, cfg, kl: bool, reward: bool) -> list[torch.nn.Module]:
    """The frozen roles behind ``kl.offload`` (reference, DPO models) if ``kl``, and the RM if ``reward``.
    ZeRO-3 sharded roles are left out: DeepSpeed places them (``offload_param`` when offloaded)."""
    out = [r for r in (roles.reference, roles.dpo_model, roles.dpo_reference) if r is not None] if kl else []
    out = out + [roles.reward_model] if reward else out
    return [r for r in out if not is_partitioned(r)]


def _shard_frozen_roles(roles: Roles, cfg) -> list:
    """ZeRO-3: shard every frozen role through an inference-only DeepSpeed engine (no optimizer), in its
    compute dtype (``perf.frozen_dtype``); offloaded roles keep their partitions in CPU memory."""
    engines = []
    for role, offload in ((roles.reference, cfg.kl.offload), (roles.dpo_model, cfg.kl.offload),
                          (roles.dpo_reference, cfg.kl.offload), (roles.reward_model, cfg.reward.offload)):
        if role is not None:
            engines.append(shard_frozen(role, cfg.deepspeed, _frozen_mcfg(cfg, "").dtype, offload=offload))
    return engines


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def check_role_kinds(cfg) -> None:
    """Every role path holds the kind of model its role needs, before anything is loaded: the actor, the
    reference and the DPO models a causal LM, the reward model a reward model (each full or a LoRA adapter);
    a mismatch is one ConfigError line naming the key (``models.check_model_kind``). The critic may start
    from either (a causal LM gets a new value head)."""
    checks = [("model.path", cfg.model.path, CAUSAL_LM), ("kl.ref_path", cfg.kl.ref_path, CAUSAL_LM),
              ("reward.path", cfg.reward.path, REWARD_MODEL)]
    if cfg.rto.uses_dpo:
        checks += [("rto.dpo_path", cfg.rto.dpo_path, CAUSAL_LM), ("rto.dpo_ref_path", cfg.rto.dpo_ref_path, CAUSAL_LM)]
    for key, path, need in checks:
        if path:
            check_model_kind(path, need, key, cfg.model.gguf_file)


def _check_role_tokenizers(cfg, tokenizer) -> None:
    """Every role with a tokenizer on disk must share the actor's (invariant 12; PAD != EOS: 8). Each gets the
    run's PAD policy (``model.pad_token``) first, so roles saved before and after a PAD was added compare equal."""
    paths = {"reference": cfg.kl.ref_path, "reward": cfg.reward.path, "critic": cfg.critic.path,
             "dpo": cfg.rto.dpo_path if cfg.rto.uses_dpo else "", "dpo_reference": cfg.rto.dpo_ref_path}
    toks = {"actor": tokenizer}
    for role, path in paths.items():
        if not path:
            continue
        if _has_tokenizer(path) or is_adapter_dir(path) or (cfg.model.allow_hub and not os.path.isdir(path)):
            toks[role] = load_tokenizer(path, cfg.model.allow_hub, "", cfg.model.trust_remote_code,
                                        cfg.model.pad_token)
        else:
            log.warning("%s directory %s has no tokenizer: only its embedding size is checked", role, path)
    check_tokenizers(toks)
    rm_tok = toks.get("reward")
    template = getattr(tokenizer, "chat_template", None)
    if (rm_tok is not None and getattr(rm_tok, "chat_template", None) != template
            and cfg.data.apply_chat_template and not cfg.reward.allow_template_mismatch):
        raise TokenizerMismatchError(
            "the reward model's tokenizer has another chat template than the actor's: the RM would score "
            "text formatted unlike its training data (set reward.allow_template_mismatch=true to run anyway)"
        )


def _frozen_mcfg(cfg, path: str):
    """The model section for a frozen role at ``path``: ``perf.frozen_dtype``, no LoRA, no checkpointing."""
    dtype = cfg.perf.frozen_dtype
    if dtype == "auto":
        dtype = "bfloat16" if cfg.deepspeed.enabled and cfg.deepspeed.bf16 else cfg.model.dtype
    return dataclasses.replace(cfg.model, path=path, dtype=dtype, lora_rank=0, gradient_checkpointing=False)


def _load_models(cfg, tokenizer, device=None) -> Roles:
    """Load the roles in a fixed order (actor, reference / DPO models, RM, critic): a fresh critic head
    draws from the RNG. Every model's embeddings are fitted to the actor's ``tokenizer`` (rows of a PAD added
    by ``model.pad_token``, the same deterministic rows in every role). Under ZeRO-3 every model is built
    partitioned (``zero3_init``): trained roles in the training dtype, frozen ones in their compute dtype."""
    m = cfg.model
    ds = cfg.deepspeed
    train_dtype = "bfloat16" if ds.bf16 else m.dtype
    with zero3_init(ds, train_dtype, device):
        actor = load_causal_lm(m, trainable=True, tokenizer=tokenizer)
    ref_path = cfg.kl.ref_path or m.path
    frozen = _frozen_mcfg(cfg, ref_path)
    with zero3_init(ds, frozen.dtype, device, offload=cfg.kl.offload):
        reference, dpo_model, dpo_reference, adapter = _load_reference_and_dpo(cfg, frozen, ref_path, tokenizer)
    with zero3_init(ds, frozen.dtype, device, offload=cfg.reward.offload):
        reward_model = load_scalar_model(_frozen_mcfg(cfg, cfg.reward.path), trainable=False, tokenizer=tokenizer,
                                         field="reward.path", need=REWARD_MODEL)
    critic = None
    if cfg.ppo.advantage_estimator == "gae":
        critic_cfg = dataclasses.replace(
            m, path=cfg.critic.path or cfg.reward.path, lora_rank=0,
            gradient_checkpointing=cfg.critic.gradient_checkpointing,
        )
        with zero3_init(ds, train_dtype, device):
            critic = load_scalar_model(critic_cfg, trainable=True, tokenizer=tokenizer,
                                       field="critic.path" if cfg.critic.path else "reward.path")
    return Roles(actor=actor, reference=reference, reward_model=reward_model, critic=critic,
                 dpo_model=dpo_model, dpo_adapter=adapter, dpo_reference=dpo_reference)


def _load_reference_and_dpo(cfg, frozen, ref_path: str, tokenizer):
    """(reference, dpo_model, dpo_reference, adapter): the PPO reference and, for RTO, the DPO model (a
    LoRA adapter over the reference, or a full model) and a separate DPO reference if really different."""
    dpo_model, dpo_reference, adapter = None, None, False
    ref_key = "kl.ref_path" if cfg.kl.ref_path else "model.path"
    if cfg.rto.uses_dpo:
        dpo_ref = cfg.rto.dpo_ref_path
        if dpo_ref and os.path.abspath(dpo_ref) == os.path.abspath(ref_path):
            dpo_ref = ""  # the same model: load it once
        if is_adapter_dir(cfg.rto.dpo_path):
            if dpo_ref:
                raise ConfigError("rto.dpo_ref_path with a LoRA-adapter DPO model: its reference is its base")
            provider = DPOTokenRewardProvider.from_paths(frozen, cfg.rto.dpo_path, ref_path, tokenizer=tokenizer,
                                                         ref_field=ref_key)
            reference, adapter = provider.reference, True
        else:
            reference = load_causal_lm(frozen, trainable=False, path=ref_path, tokenizer=tokenizer, field=ref_key)
            dpo_model = load_causal_lm(frozen, trainable=False, path=cfg.rto.dpo_path, tokenizer=tokenizer,
                                       field="rto.dpo_path")
            if dpo_ref:
                dpo_reference = load_causal_lm(frozen, trainable=False, path=dpo_ref, tokenizer=tokenizer,
                                               field="rto.dpo_ref_path")
    else:
        reference = load_causal_lm(frozen, trainable=False, path=ref_path, tokenizer=tokenizer, field=ref_key)
    return reference, dpo_model, dpo_reference, adapter
