"""The models of a PPO / RTO run and how they are loaded.

Roles: the actor (trained, causal LM), the critic (trained, scalar head; none with REINFORCE++), and the
frozen reference, reward model and, for RTO, the DPO model (eval mode, no grad, dropout off). With a
LoRA-adapter DPO model the reference *is* the peft model: adapter off = pi_ref, adapter on = pi_dpo (one copy
of the base weights). A DPO reference other than the PPO reference is a separate frozen model.

:func:`load_roles` refuses to start when roles do not share the actor's tokenizer (vocabulary and special
tokens; docs/practice.md invariant 12), when PAD == EOS (invariant 8) or when the reward model's tokenizer has
another chat template than the actor's. :func:`frozen_on_device` moves offloaded frozen roles to the
device for the scoring pass only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from rto_llm.config import ConfigError
from rto_llm.models import (
    DPOTokenRewardProvider,
    TokenizerMismatchError,
    adapter_disabled,
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

    def reference_context(self):
        """Context in which ``reference`` computes pi_ref (adapter off when the DPO model is an adapter)."""
        return adapter_disabled(self.reference) if self.dpo_adapter else nullcontext()

    def named(self) -> dict[str, torch.nn.Module]:
        """The loaded models by role name (tokenizer checks name the roles this way)."""
        models = {"actor": self.actor, "reference": self.reference, "reward": self.reward_model,
                  "critic": self.critic, "dpo": self.dpo_model}
        return {k: v for k, v in models.items() if v is not None}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters()) if model is not None else 0


def load_roles(cfg, tokenizer, device: torch.device) -> Roles:
    """Check the roles' tokenizers against the actor's ``tokenizer``, load every role of ``cfg`` (a
    ``PPOConfig``), check their embedding tables, and place the frozen ones (on ``device`` unless
    offloaded). The actor and critic stay where they were loaded: their engines place them."""
    _check_role_tokenizers(cfg, tokenizer)
    roles = _load_models(cfg, tokenizer.pad_token_id)
    check_tokenizers({"actor": tokenizer}, roles.named())
    for role in (roles.reference, roles.reward_model, roles.dpo_model, roles.dpo_reference):
        if role is not None:
            freeze(role)
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
    """The frozen roles behind ``kl.offload`` (reference, DPO models) if ``kl``, and the RM if ``reward``."""
    out = [r for r in (roles.reference, roles.dpo_model, roles.dpo_reference) if r is not None] if kl else []
    return out + [roles.reward_model] if reward else out


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


def _check_role_tokenizers(cfg, tokenizer) -> None:
    """Every role with a tokenizer on disk must share the actor's (invariant 12; PAD != EOS: 8)."""
    paths = {"reference": cfg.kl.ref_path, "reward": cfg.reward.path, "critic": cfg.critic.path,
             "dpo": cfg.rto.dpo_path if cfg.rto.uses_dpo else "", "dpo_reference": cfg.rto.dpo_ref_path}
    toks = {"actor": tokenizer}
    for role, path in paths.items():
        if not path:
            continue
        if _has_tokenizer(path) or (cfg.model.allow_hub and not os.path.isdir(path)):
            toks[role] = load_tokenizer(path, cfg.model.allow_hub, "", cfg.model.trust_remote_code)
        elif not is_adapter_dir(path):  # an adapter's vocabulary is its base's (the reference, checked)
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


def _load_models(cfg, pad_id: int) -> Roles:
    """Load the roles in a fixed order (actor, reference / DPO models, RM, critic): a fresh critic head
    draws from the RNG."""
    m = cfg.model
    actor = load_causal_lm(m, trainable=True)
    if getattr(actor.config, "pad_token_id", None) is None:
        actor.config.pad_token_id = pad_id
    ref_path = cfg.kl.ref_path or m.path
    frozen = _frozen_mcfg(cfg, ref_path)
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
    reward_model = load_scalar_model(_frozen_mcfg(cfg, cfg.reward.path), trainable=False)
    critic = None
    if cfg.ppo.advantage_estimator == "gae":
        critic_cfg = dataclasses.replace(
            m, path=cfg.critic.path or cfg.reward.path, lora_rank=0,
            gradient_checkpointing=cfg.critic.gradient_checkpointing,
        )
        critic = load_scalar_model(critic_cfg, trainable=True)
    return Roles(actor=actor, reference=reference, reward_model=reward_model, critic=critic,
                 dpo_model=dpo_model, dpo_adapter=adapter, dpo_reference=dpo_reference)
