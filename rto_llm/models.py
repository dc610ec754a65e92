"""Model roles: actor / reference (causal LM), reward model and critic (scalar head), DPO token rewards.

Long because every way a role can be given (full model, LoRA adapter, GGUF, reward-model head, hub name) is resolved
here, in one place, so that the trainers only ask for a role.

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

PAD (``model.pad_token``, :func:`ensure_pad_token`): a tokenizer without a PAD distinct from EOS (Llama-3,
SmolLM2) gets a dedicated ``<|pad|>`` token and every role's embeddings grow to cover it
(:func:`fit_model_to_tokenizer`). The new rows are the mean of the old rows (input and output embeddings; one
row when they are tied), a deterministic function of the base weights, so every role loaded from the same
weights gets the same rows (pi_ref == pi at start), and a LoRA adapter over a resized base is reproduced
exactly when its base is resized again. PAD positions are masked (attention, losses, position ids), so the
PAD *input* row never changes a result; the PAD *output* row enters each softmax's normalizer like any other
token. Every export saves the tokenizer with its PAD and ``pad_token_id`` in ``config.json``.

Kinds (:func:`model_kind`, :func:`check_model_kind`): every role path is checked to hold the kind of model
the role needs (a causal LM or a reward model, a full model or a LoRA adapter of it) before it is loaded.
A LoRA adapter directory is loaded as its base (recursively: the base may itself be an adapter) plus the
adapter, merged into a plain model; a reward-model adapter brings its score head and its score mean/std
(``rto_reward_stats.json``).

Heavy packages (transformers, peft) are imported inside functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from rto_llm.config import ConfigError
from rto_sim.core import gather_logprobs, last_valid_index

log = logging.getLogger(__name__)

REWARD_MEAN_KEY = "rto_reward_mean"
REWARD_STD_KEY = "rto_reward_std"
REWARD_STATS_FILE = "rto_reward_stats.json"  # written next to every reward-model export (also LoRA adapters)
AUTO_PAD_TOKEN = "<|pad|>"
CAUSAL_LM, REWARD_MODEL = "causal_lm", "reward_model"


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


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def _gguf_in(path: str, gguf_file: str = "") -> str:
    """The GGUF file to load from directory ``path``: ``gguf_file`` when it is there, else the directory's only
    ``*.gguf`` file when it has no ``config.json`` (an adapter's GGUF base), else ''."""
    if not os.path.isdir(path):
        return gguf_file
    if gguf_file and os.path.isfile(os.path.join(path, gguf_file)):
        return gguf_file
    if os.path.isfile(os.path.join(path, "config.json")):
        return ""
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    return ggufs[0] if len(ggufs) == 1 else gguf_file


def load_tokenizer(path: str, allow_hub: bool = False, gguf_file: str = "", trust_remote_code: bool = False,
                   pad_token: str = "keep"):
    """The tokenizer at ``path`` (a LoRA adapter without one: its base's), with the PAD policy ``pad_token``
    (:func:`ensure_pad_token`; ``keep`` leaves it as saved)."""
    from transformers import AutoTokenizer

    if is_adapter_dir(path) and not _has_tokenizer(path):
        return load_tokenizer(adapter_base(path), allow_hub, gguf_file, trust_remote_code, pad_token)
    path = resolve_path(path, allow_hub, "tokenizer")
    gguf = "" if _has_tokenizer(path) else _gguf_in(path, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(
        path, local_files_only=not allow_hub, trust_remote_code=trust_remote_code, **kwargs
    )
    ensure_pad_token(tok, pad_token)
    return tok


def model_tokenizer(mcfg):
    """The tokenizer of a ``ModelConfig`` (``tokenizer_path``, else the model directory or its GGUF file) with
    the PAD policy ``model.pad_token`` applied: every stage of a run uses this one tokenizer."""
    gguf = "" if mcfg.tokenizer_path else mcfg.gguf_file
    return load_tokenizer(mcfg.tokenizer_path or mcfg.path, mcfg.allow_hub, gguf, mcfg.trust_remote_code,
                          getattr(mcfg, "pad_token", "auto"))


def ensure_pad_token(tokenizer, pad_token: str = "auto", field: str = "model.pad_token") -> bool:
    """Apply the PAD policy in place; True when the tokenizer changed.

    ``auto``: keep a PAD that differs from EOS, else set PAD to :data:`AUTO_PAD_TOKEN` (added as a special token
    when the vocabulary lacks it); ``keep``: change nothing (:func:`check_tokenizers` refuses PAD == EOS later);
    any other string: that token becomes PAD (added when new). Raises ConfigError when the requested PAD is EOS.
    """
    spec = (pad_token or "keep").strip()
    if spec == "keep":
        return False
    if spec == "auto":
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
            return False
        spec = AUTO_PAD_TOKEN
    if tokenizer.eos_token is not None and spec == str(tokenizer.eos_token):
        raise ConfigError(
            f"{field}={spec!r} is the EOS token; PAD must differ from EOS (docs/practice.md invariant 8): "
            "use auto or another token"
        )
    if tokenizer.pad_token is not None and str(tokenizer.pad_token) == spec:
        return False
    before, old = len(tokenizer), tokenizer.pad_token
    tokenizer.add_special_tokens({"pad_token": spec})
    log.info("tokenizer PAD %r -> %r (id %d%s)", old, spec, tokenizer.pad_token_id,
             ", a new token" if len(tokenizer) > before else "")
    return True


def fit_model_to_tokenizer(model: nn.Module, tokenizer) -> int:
    """Grow ``model``'s token embeddings to cover ``tokenizer`` (a PAD added by :func:`ensure_pad_token`) and
    record its PAD id in the model config. Returns the number of rows added.

    New rows are the mean of the old rows, for the input embeddings and for an untied output layer (its bias
    too): deterministic, so two roles loaded from the same weights stay identical, and the global RNG is left
    as it was. A model with at least ``len(tokenizer)`` rows (vocabularies padded for speed) is not resized.
    """
    n = len(tokenizer)
    emb = model.get_input_embeddings()
    old = emb.num_embeddings
    if old < n:
        with torch.random.fork_rng(devices=[]):
            model.resize_token_embeddings(n, mean_resizing=False)
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        params = [emb.weight] + ([out.weight] if out is not None else [])
        with zero3_gathered(params), torch.no_grad():
            emb.weight[old:] = emb.weight[:old].float().mean(0).to(emb.weight.dtype)
            if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
                out.weight[old:] = out.weight[:old].float().mean(0).to(out.weight.dtype)
                if getattr(out, "bias", None) is not None:
                    out.bias[old:] = out.bias[:old].float().mean().to(out.bias.dtype)
        log.info("%s: token embeddings resized %d -> %d (new rows = mean of the old rows)",
                 type(model).__name__, old, n)
    pad = tokenizer.pad_token_id
    model.config.pad_token_id = pad
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad
    return max(0, n - old)


# ---------------------------------------------------------------------------------------------------
# Model kinds: which kind of model a path holds, and which kind each role needs
# ---------------------------------------------------------------------------------------------------


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _adapter_config(path: str) -> dict:
    with open(os.path.join(path, "adapter_config.json")) as f:
        return json.load(f)


def adapter_base(path: str) -> str:
    """The base model directory (or hub name) of the LoRA adapter at ``path``."""
    base = _adapter_config(path).get("base_model_name_or_path") or ""
    if not base:
        raise ConfigError(f"LoRA adapter {path!r} names no base model (base_model_name_or_path in adapter_config.json)")
    if not os.path.isabs(base) and not os.path.exists(base) and os.path.isdir(os.path.join(path, base)):
        base = os.path.join(path, base)
    return base


def model_kind(path: str, gguf_file: str = "") -> tuple[str, bool, str] | None:
    """``(kind, adapter, detail)`` of the model at ``path``: kind :data:`CAUSAL_LM` or :data:`REWARD_MODEL`,
    whether it is a LoRA adapter, and the architecture (or adapter task type). None when it cannot be told
    without loading (a hub name, an unknown architecture)."""
    if not os.path.isdir(path):
        return None
    if is_adapter_dir(path):
        task = _adapter_config(path).get("task_type") or "CAUSAL_LM"
        return (REWARD_MODEL if task == "SEQ_CLS" else CAUSAL_LM), True, f"LoRA adapter, task_type {task}"
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return (CAUSAL_LM, False, "GGUF") if _gguf_in(path, gguf_file) else None
    with open(cfg_file) as f:
        archs = json.load(f).get("architectures") or []
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            return REWARD_MODEL, False, arch
        if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
            return CAUSAL_LM, False, arch
    return None


_NEEDS = {
    CAUSAL_LM: "a causal LM (a base, `rto-llm sft` or `rto-llm dpo` model, full or LoRA adapter)",
    REWARD_MODEL: "a reward model (an `rto-llm rm` export, full or LoRA adapter)",
}


def check_model_kind(path: str, need: str, field: str, gguf_file: str = "") -> None:
    """Refuse (ConfigError, one line naming ``field``) a path that holds another kind of model than ``need``
    (:data:`CAUSAL_LM`, :data:`REWARD_MODEL`, or ``any``); paths whose kind is unknown pass."""
    found = model_kind(path, gguf_file) if need != "any" else None
    if found is None or found[0] == need:
        return
    kind, _, detail = found
    what = "a reward model" if kind == REWARD_MODEL else "a causal LM"
    why = " (a causal LM has no score head: it would get a random one)" if need == REWARD_MODEL else (
        " (a reward model has no LM head: it would get a random one)")
    raise ConfigError(f"{field}={path!r} is {what} ({detail}); {field} needs {_NEEDS[need]}{why}")


def _dtype_kwarg() -> str:
    """The ``from_pretrained`` argument for the dtype: ``dtype`` from transformers 4.56 on, ``torch_dtype``
    before (where ``dtype`` would reach the model's constructor and fail, or be ignored)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def _load_kwargs(mcfg, src: str | None = None) -> dict:
    kw = {_dtype_kwarg(): _dtype(mcfg.dtype), "local_files_only": not mcfg.allow_hub}
    if mcfg.trust_remote_code:
        kw["trust_remote_code"] = True
    gguf = _gguf_in(src, mcfg.gguf_file) if src is not None else mcfg.gguf_file
    if gguf:
        kw["gguf_file"] = gguf
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


def _run_tokenizer(mcfg, tokenizer):
    """The tokenizer a loaded model must cover: ``tokenizer``, else the run's (``model_tokenizer``), or None
    when ``mcfg.path`` has none to read (a bare weights directory: nothing is fitted)."""
    if tokenizer is not None:
        return tokenizer
    src = mcfg.tokenizer_path or mcfg.path
    if not os.path.isdir(src):
        return model_tokenizer(mcfg) if mcfg.allow_hub else None
    if _has_tokenizer(src) or _gguf_in(src, mcfg.gguf_file) or is_adapter_dir(src):
        return model_tokenizer(mcfg)
    return None


def _mark_source(model: nn.Module, src: str) -> None:
    """Record a local ``src`` as an absolute path, so a LoRA adapter trained on ``model`` names a base that
    resolves from any working directory."""
    if os.path.isdir(src):
        model.name_or_path = model.config._name_or_path = os.path.abspath(src)


def _merge_adapter(base: nn.Module, adapter_dir: str) -> nn.Module:
    """``base`` with the LoRA adapter at ``adapter_dir`` merged into its weights (a plain model again)."""
    from peft import PeftModel

    with zero3_gathered(list(base.parameters())):
        merged = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).merge_and_unload()
    _mark_source(merged, adapter_dir)
    return merged.requires_grad_(True)  # a plain model again: the loader freezes it or trains it


def _causal_lm(mcfg, src: str, tokenizer) -> nn.Module:
    """A causal LM from ``src`` fitted to ``tokenizer`` (an adapter: its base, fitted, plus the adapter)."""
    from transformers import AutoModelForCausalLM

    if os.path.isdir(src) and is_adapter_dir(src):
        return _merge_adapter(_causal_lm(mcfg, resolve_path(adapter_base(src), mcfg.allow_hub), tokenizer), src)
    model = clear_gguf_marker(AutoModelForCausalLM.from_pretrained(src, **_load_kwargs(mcfg, src)))
    _mark_source(model, src)
    if tokenizer is not None:
        fit_model_to_tokenizer(model, tokenizer)
    return model


def load_causal_lm(mcfg, trainable: bool, path: str | None = None, tokenizer=None,
                   field: str = "model.path") -> nn.Module:
    """Actor (``trainable=True``) or reference (frozen, eval mode) causal LM from ``path or mcfg.path``.

    ``path`` must hold a causal LM (a full model, a GGUF file or a LoRA adapter, merged on load; ConfigError
    naming ``field`` otherwise). Its embeddings are fitted to ``tokenizer`` (default: the run's tokenizer,
    :func:`model_tokenizer`), which adds the rows of a new PAD token.
    """
    src = resolve_path(path or mcfg.path, mcfg.allow_hub)
    check_model_kind(src, CAUSAL_LM, field, mcfg.gguf_file)
    model = _causal_lm(mcfg, src, _run_tokenizer(mcfg, tokenizer))
    return prepare_trainable(model, mcfg) if trainable else freeze(model)


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


def _scalar_model(mcfg, src: str, tokenizer, head_init_std: float) -> nn.Module:
    """Backbone + scalar head from ``src`` fitted to ``tokenizer``. A reward-model adapter: its base with the
    adapter (LoRA weights and trained head) merged; a causal-LM adapter: its base with a new head and the
    adapter's backbone weights merged; a causal LM: a new small head; a reward model: its own head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if os.path.isdir(src) and is_adapter_dir(src):
        base_src = resolve_path(adapter_base(src), mcfg.allow_hub)
        trained_head = model_kind(src)[0] == REWARD_MODEL
        base = _scalar_model(mcfg, base_src, tokenizer, 0.0 if trained_head else head_init_std)
        model = _merge_adapter(base, src)
        _read_reward_stats(model, src)
        return model
    kw = _load_kwargs(mcfg, src)
    hf_cfg = AutoConfig.from_pretrained(
        src, local_files_only=kw["local_files_only"], trust_remote_code=mcfg.trust_remote_code,
        **({"gguf_file": kw["gguf_file"]} if "gguf_file" in kw else {}),
    )
    is_scalar = any(a.endswith("ForSequenceClassification") for a in (hf_cfg.architectures or []))
    hf_cfg.num_labels = 1
    kw.pop("trust_remote_code", None)
    model = clear_gguf_marker(AutoModelForSequenceClassification.from_pretrained(
        src, config=hf_cfg, trust_remote_code=mcfg.trust_remote_code, **kw
    ))
    _mark_source(model, src)
    if not is_scalar:
        head = score_head(model)
        std = head_init_std or 1.0 / math.sqrt(head.in_features + 1)
        with torch.no_grad(), zero3_gathered(list(head.parameters())):
            head.weight.normal_(0.0, std)
            if head.bias is not None:
                head.bias.zero_()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(hf_cfg, "pad_token_id", None)
    if tokenizer is not None:
        fit_model_to_tokenizer(model, tokenizer)
    _read_reward_stats(model, src)
    return model


def load_scalar_model(mcfg, trainable: bool, path: str | None = None, head_init_std: float = 0.0, tokenizer=None,
                      field: str = "model.path", need: str = "any") -> nn.Module:
    """Reward model or critic: backbone + one linear output per token (``num_labels=1``).

    A directory that already holds a scalar model (a trained RM, full or LoRA adapter) keeps its head and its
    score mean/std; a causal-LM directory gets a new head drawn from N(0, std^2) with std = ``head_init_std``
    or 1/sqrt(hidden + 1) (small, so initial scores are near 0 and the first updates do not blow up).
    ``need=REWARD_MODEL`` refuses a path that holds a causal LM (ConfigError naming ``field``). Embeddings are
    fitted to ``tokenizer`` (default: the run's tokenizer).
    """
    src = resolve_path(path or mcfg.path, mcfg.allow_hub)
    check_model_kind(src, need, field, mcfg.gguf_file)
    model = _scalar_model(mcfg, src, _run_tokenizer(mcfg, tokenizer), head_init_std)
    if trainable:
        if mcfg.lora_rank > 0:
            # The head is new or task specific: train it fully next to the LoRA adapter.
            model = apply_lora(model, mcfg, task_type="SEQ_CLS")
            mcfg = _without_lora(mcfg)
        return prepare_trainable(model, mcfg)
    return freeze(model)


def zero3_gathered(params: list):
    """Full ``params`` inside the block when they are ZeRO-3 partitions (a model built under
    ``deepspeed.zero.Init``); what rank 0 writes there is scattered back to every process on exit."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


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


def reward_stats_file(mean: float, std: float) -> str:
    """The content of :data:`REWARD_STATS_FILE`, written next to a reward-model export (a LoRA adapter has no
    ``config.json`` of its own, so its mean/std live only there)."""
    return json.dumps({REWARD_MEAN_KEY: float(mean), REWARD_STD_KEY: float(std)}, indent=1) + "\n"


def _read_reward_stats(model: nn.Module, src: str) -> None:
    path = os.path.join(src, REWARD_STATS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            stats = json.load(f)
        set_reward_stats(model, stats[REWARD_MEAN_KEY], stats[REWARD_STD_KEY])


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
            raise TokenizerMismatchError(
                f"{role} tokenizer has no PAD token: set model.pad_token=auto (adds '{AUTO_PAD_TOKEN}') or name one"
            )
        if tok.eos_token_id is None:
            raise TokenizerMismatchError(f"{role} tokenizer has no EOS token")
        if tok.pad_token_id == tok.eos_token_id:
            raise TokenizerMismatchError(
                f"{role} tokenizer: PAD == EOS (id {tok.pad_token_id}); masks would hide the EOS action and "
                f"the policy could not learn to stop: set model.pad_token=auto (adds '{AUTO_PAD_TOKEN}') or name "
                "another token"
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
                f"only in {base_role}: {only_a}; only in {role}: {only_b}; different ids: {moved} (both must come "
                "from the same base; with model.pad_token both get the same PAD)"
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
    def from_paths(cls, mcfg, dpo_path: str, ref_path: str | None = None, tokenizer=None,
                   field: str = "rto.dpo_path", ref_field: str = "kl.ref_path") -> DPOTokenRewardProvider:
        """Adapter directory -> base (``ref_path`` or the adapter's base) + adapter; else two models. Both
        are fitted to ``tokenizer`` (default: the run's tokenizer); a path holding a reward model is refused."""
        check_model_kind(dpo_path, CAUSAL_LM, field, mcfg.gguf_file)
        if is_adapter_dir(dpo_path):
            from peft import PeftModel

            ref_path = ref_path or adapter_base(dpo_path)
            base = load_causal_lm(mcfg, trainable=False, path=ref_path, tokenizer=tokenizer, field=ref_field)
            return cls(PeftModel.from_pretrained(base, dpo_path, is_trainable=False))
        if not ref_path:
            raise ValueError("a full DPO model needs ref_path (the model it was trained against)")
        return cls(load_causal_lm(mcfg, False, ref_path, tokenizer=tokenizer, field=ref_field),
                   load_causal_lm(mcfg, False, dpo_path, tokenizer=tokenizer, field=field))

    def reference_context(self):
        """Context in which ``reference`` computes pi_ref (adapter off in the adapter layout)."""
        return adapter_disabled(self.reference) if self.adapter else nullcontext()
