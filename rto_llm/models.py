"""Model roles: actor / reference (causal LM), reward model and critic (scalar head), DPO token rewards.

- ``load_causal_lm``: actor (trained) or reference (frozen, eval mode).
- ``load_scalar_model``: a ``*ForSequenceClassification`` model with one output (``num_labels=1``) and a
  small head. The reward model reads its score at the last real token (:func:`sequence_scores`); the
  critic reads one value per token (:func:`token_values`) and can be initialized from a reward model.
  Reward mean/std over the RM training set are stored in the model's ``config.json``.
- :class:`DPOTokenRewardProvider`: the pi_ref / pi_dpo pair of the RTO token reward, from two full models
  or from one base model plus a LoRA adapter (adapter off = reference, on = DPO; one copy of the base);
  :func:`adapter_disabled` switches the adapter off (pi_ref).
- :func:`forward_logprobs`: token log-probs (SFT / DPO layout) with next-token alignment and position ids
  from the attention mask, so padding does not change them.

Heavy packages (transformers, peft) are imported inside functions.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from rto_sim.core import gather_logprobs, last_valid_index

log = logging.getLogger(__name__)

REWARD_MEAN_KEY = "rto_reward_mean"
REWARD_STD_KEY = "rto_reward_std"


class TokenizerMismatchError(ValueError):
    """The roles of a run do not share a tokenizer, or PAD == EOS."""


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def resolve_path(path: str, allow_hub: bool, what: str = "model") -> str:
    """A local directory, or a hub name when the user allowed downloads; a clear error otherwise."""
    if os.path.isdir(path):
        return path
    if allow_hub:
        return path
    raise FileNotFoundError(
        f"{what} path {path!r} is not a local directory; set allow_hub=true to download it from the hub"
    )


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str, allow_hub: bool = False, gguf_file: str = "", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_path(path, allow_hub, "tokenizer")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(
        path, local_files_only=not allow_hub, trust_remote_code=trust_remote_code, **kwargs
    )


def model_tokenizer(mcfg):
    """The tokenizer of a ``ModelConfig``: ``tokenizer_path``, else the model directory (or its GGUF file)."""
    gguf = "" if mcfg.tokenizer_path else mcfg.gguf_file
    return load_tokenizer(mcfg.tokenizer_path or mcfg.path, mcfg.allow_hub, gguf, mcfg.trust_remote_code)


def _load_kwargs(mcfg) -> dict:
    kw = {"dtype": _dtype(mcfg.dtype), "local_files_only": not mcfg.allow_hub}
    if mcfg.trust_remote_code:
        kw["trust_remote_code"] = True
    if mcfg.gguf_file:
        kw["gguf_file"] = mcfg.gguf_file
    if mcfg.attn_implementation:
        kw["attn_implementation"] = mcfg.attn_implementation
    return kw


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability (nn.Dropout modules and attention-dropout attributes)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def freeze(model: nn.Module) -> nn.Module:
    """A frozen role: no grads, eval mode, dropout off."""
    model.requires_grad_(False)
    model.eval()
    disable_dropout(model)
    return model


def prepare_trainable(model: nn.Module, mcfg) -> nn.Module:
    """Dropout off unless ``model.dropout``; gradient checkpointing and LoRA as configured."""
    if not mcfg.dropout:
        disable_dropout(model)
    if mcfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if mcfg.lora_rank > 0:
        model = apply_lora(model, mcfg)
    model.train()
    return model


def apply_lora(model: nn.Module, mcfg, task_type: str = "CAUSAL_LM") -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("model.lora_rank > 0 needs peft: pip install peft") from e
    targets = mcfg.lora_target_modules
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lcfg = LoraConfig(
        r=mcfg.lora_rank,
        lora_alpha=mcfg.lora_alpha,
        lora_dropout=mcfg.lora_dropout,
        target_modules=target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, lcfg)


def clear_gguf_marker(model: nn.Module) -> nn.Module:
    """transformers dequantizes a GGUF file into ordinary float weights but keeps a GGUF "quantizer" that
    makes ``save_pretrained`` refuse; drop it so the model trains and exports like any other."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_causal_lm(mcfg, trainable: bool, path: str | None = None) -> nn.Module:
    """Actor (``trainable=True``) or reference (frozen, eval mode) causal LM from ``path or mcfg.path``."""
    from transformers import AutoModelForCausalLM

    src = resolve_path(path or mcfg.path, mcfg.allow_hub)
    model = clear_gguf_marker(AutoModelForCausalLM.from_pretrained(src, **_load_kwargs(mcfg)))
    return prepare_trainable(model, mcfg) if trainable else freeze(model)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a ``*ForSequenceClassification`` model (LoRA-wrapped or not)."""
    model = _unwrap_peft(model)
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(f"{type(model).__name__} has no 'score' / 'classifier' head")


def backbone(model: nn.Module) -> nn.Module:
    model = _unwrap_peft(model)
    return getattr(model, model.base_model_prefix)


def load_scalar_model(mcfg, trainable: bool, path: str | None = None, head_init_std: float = 0.0) -> nn.Module:
    """Reward model or critic: backbone + one linear output per token (``num_labels=1``).

    A directory that already holds a scalar model (a trained RM) keeps its head; a causal-LM directory
    gets a new head drawn from N(0, std^2) with std = ``head_init_std`` or 1/sqrt(hidden + 1) (small, so
    initial scores are near 0 and the first updates do not blow up).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    src = resolve_path(path or mcfg.path, mcfg.allow_hub)
    kw = _load_kwargs(mcfg)
    hf_cfg = AutoConfig.from_pretrained(
        src, local_files_only=kw["local_files_only"], trust_remote_code=mcfg.trust_remote_code,
        **({"gguf_file": mcfg.gguf_file} if mcfg.gguf_file else {}),
    )
    is_scalar = any(a.endswith("ForSequenceClassification") for a in (hf_cfg.architectures or []))
    hf_cfg.num_labels = 1
    kw.pop("trust_remote_code", None)
    model = clear_gguf_marker(AutoModelForSequenceClassification.from_pretrained(
        src, config=hf_cfg, trust_remote_code=mcfg.trust_remote_code, **kw
    ))
    if not is_scalar:
        head = score_head(model)
        std = head_init_std or 1.0 / math.sqrt(head.in_features + 1)
        with torch.no_grad():
            head.weight.normal_(0.0, std)
            if head.bias is not None:
                head.bias.zero_()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(hf_cfg, "pad_token_id", None)
    if trainable:
        if mcfg.lora_rank > 0:
            # The head is new or task specific: train it fully next to the LoRA adapter.
            model = apply_lora(model, mcfg, task_type="SEQ_CLS")
            mcfg = _without_lora(mcfg)
        return prepare_trainable(model, mcfg)
    return freeze(model)


def _without_lora(mcfg):
    import dataclasses

    return dataclasses.replace(mcfg, lora_rank=0)


def reward_stats(model: nn.Module) -> tuple[float, float]:
    """(mean, std) of the reward model's scores over its training set (0, 1 when not recorded)."""
    cfg = model.config
    return float(getattr(cfg, REWARD_MEAN_KEY, 0.0)), float(getattr(cfg, REWARD_STD_KEY, 1.0))


def set_reward_stats(model: nn.Module, mean: float, std: float) -> None:
    setattr(model.config, REWARD_MEAN_KEY, float(mean))
    setattr(model.config, REWARD_STD_KEY, float(std))


# ---------------------------------------------------------------------------------------------------
# Tokenizer compatibility (docs/practice.md invariants 8 and 12)
# ---------------------------------------------------------------------------------------------------


def check_tokenizers(tokenizers: dict, models: dict | None = None) -> None:
    """Refuse to start unless all roles share vocabulary and special tokens, and PAD != EOS.

    Args:
        tokenizers: role name -> tokenizer (e.g. {"actor": tok, "reward": tok_rm}).
        models: optional role name -> model; each model's embedding table must cover the vocabulary.

    Raises:
        TokenizerMismatchError: naming the roles and what differs.
    """
    for role, tok in tokenizers.items():
        if tok.pad_token_id is None:
            raise TokenizerMismatchError(f"{role} tokenizer has no PAD token; add a dedicated pad token")
        if tok.eos_token_id is None:
            raise TokenizerMismatchError(f"{role} tokenizer has no EOS token")
        if tok.pad_token_id == tok.eos_token_id:
            raise TokenizerMismatchError(
                f"{role} tokenizer: PAD == EOS (id {tok.pad_token_id}); masks would hide the EOS action and "
                "the policy could not learn to stop. Add a distinct pad token (e.g. '<|pad|>')."
            )
    roles = list(tokenizers)
    base_role, base = roles[0], tokenizers[roles[0]]
    base_vocab = base.get_vocab()
    for role in roles[1:]:
        tok = tokenizers[role]
        vocab = tok.get_vocab()
        if vocab != base_vocab:
            only_a = sorted(set(base_vocab) - set(vocab))[:5]
            only_b = sorted(set(vocab) - set(base_vocab))[:5]
            moved = sorted(k for k in set(vocab) & set(base_vocab) if vocab[k] != base_vocab[k])[:5]
            raise TokenizerMismatchError(
                f"tokenizers of {base_role!r} and {role!r} differ: sizes {len(base_vocab)} vs {len(vocab)}; "
                f"only in {base_role}: {only_a}; only in {role}: {only_b}; different ids: {moved}"
            )
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if getattr(tok, attr) != getattr(base, attr):
                raise TokenizerMismatchError(
                    f"{attr} differs: {base_role}={getattr(base, attr)} vs {role}={getattr(tok, attr)}"
                )
    for role, model in (models or {}).items():
        n_emb = model.get_input_embeddings().num_embeddings
        if n_emb < len(base):
            raise TokenizerMismatchError(
                f"{role} model has {n_emb} embeddings but the tokenizer has {len(base)} tokens"
            )


# ---------------------------------------------------------------------------------------------------
# Forward helpers
# ---------------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... over real tokens; pads get 0. Left padding then does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs of tokens under a causal LM, with next-token alignment: ``lp[:, t] = log p(x_t | x_<t)``.

    The SFT / DPO layout (one row per sequence, any padding); the PPO stage reads response tokens with
    ``rto_llm.ppo.experience.response_logits`` instead.

    Args:
        model: a causal LM.
        input_ids: ``(B, T)``; any padding (left or right), marked by ``attention_mask``.
        attention_mask: ``(B, T)``, 1 on real tokens.
        response_mask: if given, the result is zero where the mask is 0.

    Returns:
        ``(B, T)`` log-probs in float32, aligned with ``input_ids``; position 0 (no context) is 0.
    """
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    lp = gather_logprobs(out.logits[:, :-1], input_ids[:, 1:], 1.0)  # (B, T - 1)
    lp = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)  # (B, T)
    if response_mask is not None:
        lp = lp * response_mask.to(lp.dtype)
    return lp


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` per-token outputs of a scalar-head model (critic values), float32."""
    hidden = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return score_head(model)(hidden).squeeze(-1).float()


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` reward-model scores read at the last real token of each row (any padding side)."""
    values = token_values(model, input_ids, attention_mask)
    idx = last_valid_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


# ---------------------------------------------------------------------------------------------------
# DPO token-reward provider (RTO eq. 4.7 inputs: log pi_dpo - log pi_ref per token)
# ---------------------------------------------------------------------------------------------------


@contextmanager
def adapter_disabled(model: nn.Module):
    """A frozen peft model with its adapter off inside the block (pi_ref when the adapter is the DPO
    model). peft re-enables ``requires_grad`` of the adapter when it is switched back on, so the frozen
    role is re-frozen afterwards."""
    with model.disable_adapter():
        yield
    model.requires_grad_(False)


class DPOTokenRewardProvider:
    """The models behind RTO's DPO token reward ``log pi_dpo - log pi_ref``.

    Two layouts:
      - full model: ``reference`` and ``dpo_model`` are separate frozen models;
      - adapter: ``reference`` is a peft model whose LoRA adapter is the DPO model. Adapter off gives
        pi_ref, adapter on gives pi_dpo; the base weights exist once. The same object serves as the
        PPO reference role (load it once, never twice).
    """

    def __init__(self, reference: nn.Module, dpo_model: nn.Module | None = None):
        self.reference = freeze(reference)
        self.dpo_model = freeze(dpo_model) if dpo_model is not None else None
        self.adapter = dpo_model is None
        if self.adapter and not hasattr(reference, "disable_adapter"):
            raise TypeError("without a dpo_model, reference must be a peft model carrying the DPO adapter")

    @classmethod
    def from_paths(cls, mcfg, dpo_path: str, ref_path: str | None = None) -> DPOTokenRewardProvider:
        """Adapter directory -> base (``ref_path`` or the adapter's base) + adapter; else two models."""
        if is_adapter_dir(dpo_path):
            from peft import PeftModel

            if not ref_path:
                import json

                with open(os.path.join(dpo_path, "adapter_config.json")) as f:
                    ref_path = json.load(f)["base_model_name_or_path"]
            base = load_causal_lm(mcfg, trainable=False, path=ref_path)
            return cls(PeftModel.from_pretrained(base, dpo_path, is_trainable=False))
        if not ref_path:
            raise ValueError("a full DPO model needs ref_path (the model it was trained against)")
        return cls(load_causal_lm(mcfg, False, ref_path), load_causal_lm(mcfg, False, dpo_path))

    def reference_context(self):
        """Context in which ``reference`` computes pi_ref (adapter off in the adapter layout)."""
        return adapter_disabled(self.reference) if self.adapter else nullcontext()
