"""Stage configurations: one dataclass per stage, built from shared sections.

A run is configured by a YAML file plus dotted command-line overrides (``train.lr=1e-5``). Every field
has a default and a one-line doc (``rto-llm <stage> --help`` prints them all). Unknown keys and values
of the wrong type are errors that name the key.

Supported field types: ``str``, ``int``, ``float``, ``bool`` and ``Literal[...]`` (a fixed set of
choices). A float field accepts an int and a numeric string (PyYAML reads ``1e-5`` as a string).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or inconsistent with another value."""


def opt(default: Any, doc: str) -> Any:
    """A config field with its default and its one-line documentation."""
    return field(default=default, metadata={"doc": doc})


def section(factory: Any, doc: str) -> Any:
    """A nested config section (a dataclass built by ``factory``)."""
    return field(default_factory=factory, metadata={"doc": doc})


# ---------------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The model that this stage trains, and how it is loaded."""

    path: str = opt("", "Local directory of the model (Hugging Face format), or a hub name if allow_hub.")
    tokenizer_path: str = opt("", "Tokenizer directory or name; empty = same as path.")
    gguf_file: str = opt("", "GGUF file name inside path (transformers dequantizes it on load).")
    allow_hub: bool = opt(False, "Allow downloading path / tokenizer_path from the Hugging Face hub.")
    trust_remote_code: bool = opt(False, "Pass trust_remote_code=True to transformers.")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "Dtype the weights are loaded in (with deepspeed.bf16 keep float32: DeepSpeed casts)."
    )
    dropout: bool = opt(False, "Keep dropout active in the trained model (off by default, see docs/practice.md).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    attn_implementation: str = opt("", "Attention kernel (eager, sdpa, flash_attention_2); empty = default.")
    lora_rank: int = opt(0, "LoRA rank r; 0 = full fine-tuning.")
    lora_alpha: float = opt(16.0, "LoRA scaling alpha.")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch (0 keeps the model deterministic).")
    lora_target_modules: str = opt("all-linear", "Comma-separated module names for LoRA, or all-linear.")

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path is required: a local model directory (or a hub name)")
        if self.lora_rank < 0:
            raise ConfigError(f"{prefix}.lora_rank must be >= 0, got {self.lora_rank}")


@dataclass
class DataConfig:
    """Where the training rows come from, which keys hold what, and how they are tokenized."""

    train_path: str = opt(
        "", "A .jsonl/.json/.parquet file, a directory of them, or 'hf:NAME' for a Hugging Face dataset."
    )
    train_split: str = opt("train", "Split name for Hugging Face datasets.")
    eval_path: str = opt("", "Optional held-out data (same formats); empty = no evaluation.")
    eval_split: str = opt("test", "Split name of the evaluation dataset.")
    input_key: str = opt("prompt", "Key of the prompt text.")
    output_key: str = opt("response", "Key of the response text (SFT prompt/response rows).")
    messages_key: str = opt("messages", "Key of a chat message list (SFT); its last message is the target.")
    chosen_key: str = opt("chosen", "Key of the preferred response (text or message list).")
    rejected_key: str = opt("rejected", "Key of the dispreferred response (text or message list).")
    margin_key: str = opt("", "Key of a per-pair reward margin (reward model); empty = no margin.")
    apply_chat_template: bool = opt(True, "Format with the tokenizer's chat template when it has one.")
    max_len: int = opt(512, "Maximum tokens of prompt + response.")
    max_prompt_len: int = opt(256, "Maximum prompt tokens; longer prompts lose tokens on the left.")
    on_malformed: Literal["error", "skip"] = opt(
        "error", "Malformed row: 'error' stops with file, line and reason; 'skip' drops it and counts."
    )
    max_samples: int = opt(0, "Use only the first N rows (0 = all).")

    def validate(self, prefix: str) -> None:
        if not self.train_path:
            raise ConfigError(f"{prefix}.train_path is required")
        if self.max_prompt_len < 1 or self.max_len < 2:
            raise ConfigError(f"{prefix}.max_len must be >= 2 and {prefix}.max_prompt_len >= 1")
        if self.max_prompt_len >= self.max_len:
            raise ConfigError(
                f"{prefix}.max_prompt_len ({self.max_prompt_len}) must be < {prefix}.max_len ({self.max_len})"
            )


@dataclass
class TrainConfig:
    """Optimization: batch sizes, learning rate schedule, length of the run."""

    output_dir: str = opt("runs/out", "Directory for checkpoints, logs and the exported model.")
    seed: int = opt(42, "Seed of the data order, model init and RNGs.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Device; auto = CUDA when available.")
    batch_size: int = opt(32, "Global batch: rows (or pairs) per optimizer step, over all processes.")
    micro_batch_size: int = opt(4, "Rows (or pairs) per forward pass on one process.")
    epochs: int = opt(1, "Passes over the training data.")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = epochs * steps per epoch).")
    stop_after: int = opt(
        0, "Return after N steps of this invocation with a checkpoint (time-limited jobs; 0 = run to the end)."
    )
    lr: float = opt(1e-5, "Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "Learning-rate schedule.")
    warmup_ratio: float = opt(0.03, "Fraction of steps of linear warm-up.")
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of lr (cosine / linear).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.95, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon (fixed; its placement changes early step sizes).")
    grad_clip: float = opt(1.0, "Global gradient-norm clip (0 = off).")

    def validate(self, prefix: str) -> None:
        for name in ("batch_size", "micro_batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{prefix}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO (optional; without it training runs on plain torch)."""

    enabled: bool = opt(False, "Train through DeepSpeed (lazy import); false = plain torch.")
    zero_stage: Literal[0, 1, 2, 3] = opt(2, "ZeRO stage: 2 shards optimizer + grads, 3 also params.")
    offload: bool = opt(False, "Offload optimizer states (and ZeRO-3 parameters) to CPU memory.")
    bf16: bool = opt(False, "bf16 mixed precision with fp32 master weights (needs hardware support).")
    config_file: str = opt("", "A DeepSpeed JSON file merged over the generated config (expert use).")


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (atomic) and the final Hugging Face export."""

    save_every: int = opt(0, "Save a resumable checkpoint every N optimizer steps (0 = only at the end).")
    keep_last: int = opt(2, "Number of resumable checkpoints kept (older ones are deleted).")
    resume: str = opt("", "'latest' or a checkpoint directory to resume from; empty = fresh start.")
    export_hf: bool = opt(True, "Export the final model in Hugging Face format to output_dir/final.")


@dataclass
class LogConfig:
    """Metrics: JSONL file always; TensorBoard by default; Weights & Biases optional."""

    every: int = opt(1, "Log metrics every N optimizer steps.")
    tensorboard: bool = opt(True, "Write TensorBoard event files to output_dir/tb.")
    wandb: bool = opt(False, "Log to Weights & Biases (needs the wandb package).")
    wandb_project: str = opt("rto-llm", "Weights & Biases project.")
    run_name: str = opt("", "Run name for the loggers; empty = stage name.")
    progress_bar: bool = opt(True, "Show a tqdm progress bar with live loss and throughput.")


# ---------------------------------------------------------------------------------------------------
# Stage-specific sections and stage configs
# ---------------------------------------------------------------------------------------------------


@dataclass
class SFTOptions:
    """Supervised fine-tuning loss."""

    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = opt(
        "token-mean", "How response-token NLLs are averaged over the global batch."
    )


@dataclass
class RMOptions:
    """Reward model (pairwise Bradley-Terry)."""

    head_init_std: float = opt(0.0, "Std of the scalar head init; 0 = 1/sqrt(hidden_size + 1) (small).")


@dataclass
class DPOOptions:
    """Direct preference optimization."""

    beta: float = opt(0.1, "DPO temperature beta (> 0).")
    loss_type: Literal["sigmoid", "ipo", "cdpo"] = opt("sigmoid", "sigmoid = DPO, ipo = IPO, cdpo = cDPO.")
    label_smoothing: float = opt(0.0, "Label-flip probability eps (cdpo needs 0 < eps < 0.5).")
    ref_path: str = opt("", "Reference model directory; empty = model.path (with LoRA: adapter off).")
    precompute_ref: bool = opt(True, "Compute reference log-probs once before training (frees the ref).")

    def validate(self, prefix: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{prefix}.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{prefix}.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "cdpo" and self.label_smoothing == 0.0:
            raise ConfigError(f"{prefix}.loss_type=cdpo needs {prefix}.label_smoothing in (0, 0.5)")


@dataclass
class SFTConfig:
    """Stage `sft`: supervised fine-tuning, loss on response tokens only."""

    model: ModelConfig = section(ModelConfig, "Model to fine-tune.")
    data: DataConfig = section(DataConfig, "Prompt/response or chat-message rows.")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/sft", lr=1e-5), "Optimization.")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "DeepSpeed ZeRO.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
    log: LogConfig = section(LogConfig, "Logging.")
    sft: SFTOptions = section(SFTOptions, "SFT loss.")


@dataclass
class RMConfig:
    """Stage `rm`: reward model, pairwise Bradley-Terry loss, score at the last real token."""

    model: ModelConfig = section(ModelConfig, "Backbone (a causal LM or a reward model) to train.")
    data: DataConfig = section(lambda: DataConfig(), "Preference pairs.")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/rm", lr=9e-6), "Optimization.")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "DeepSpeed ZeRO.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
    log: LogConfig = section(LogConfig, "Logging.")
    rm: RMOptions = section(RMOptions, "Reward-model options.")


@dataclass
class DPOConfig:
    """Stage `dpo`: DPO / IPO / cDPO against a frozen reference (the RTO stage's token-reward model)."""

    model: ModelConfig = section(ModelConfig, "Policy to train (also the reference unless dpo.ref_path).")
    data: DataConfig = section(DataConfig, "Preference pairs.")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/dpo", lr=5e-7), "Optimization.")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "DeepSpeed ZeRO.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
    log: LogConfig = section(LogConfig, "Logging.")
    dpo: DPOOptions = section(DPOOptions, "DPO loss.")


# ---------------------------------------------------------------------------------------------------
# Loading, overrides, validation, help
# ---------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, from_string: bool) -> Any:
    """Check (and for strings from the command line, parse) ``value`` against the declared type."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        kind = type(choices[0])
        try:
            v = _coerce(value, kind, key, from_string)
        except ConfigError:
            v = value
        if v not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return v
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_string and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_string and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _set(cfg: Any, dotted: str, value: Any, from_string: bool) -> None:
    parts = dotted.split(".")
    obj = cfg
    for i, name in enumerate(parts):
        names = {f.name for f in dataclasses.fields(obj)}
        if name not in names:
            where = ".".join(parts[:i]) or type(cfg).__name__
            raise ConfigError(f"unknown config key {dotted!r}: {where} has no field {name!r} (known: {sorted(names)})")
        hints = get_type_hints(type(obj))
        if i < len(parts) - 1:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(parts[: i + 1])} is not a section")
            continue
        if dataclasses.is_dataclass(getattr(obj, name)):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: is a section, expected a mapping, got {value!r}")
            for k, v in value.items():
                _set(cfg, f"{dotted}.{k}", v, from_string)
            return
        setattr(obj, name, _coerce(value, hints[name], dotted, from_string))


def validate(cfg: Any) -> None:
    """Run each section's cross-field checks (``validate(prefix)`` methods)."""
    for f in dataclasses.fields(cfg):
        sec = getattr(cfg, f.name)
        if hasattr(sec, "validate"):
            sec.validate(f.name)


def load_config(cls: type, yaml_path: str | None = None, overrides: list[str] | tuple = ()) -> Any:
    """Build a stage config: defaults, then the YAML file, then ``key.sub=value`` overrides."""
    cfg = cls()
    if yaml_path:
        with open(yaml_path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: the top level must be a mapping of sections")
        for k, v in data.items():
            _set(cfg, str(k), v, from_string=False)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value, from_string=True)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def config_help(cls: type) -> str:
    """Every option of a stage config: ``section.key  type  default  doc``."""
    cfg = cls()
    lines = []
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        lines.append(f"{sec.name}: {sec.metadata.get('doc', '')}")
        hints = get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            lines.append(
                f"  {sec.name}.{f.name} ({_type_name(hints[f.name])}, default {default!r})\n"
                f"      {f.metadata.get('doc', '')}"
            )
    return "\n".join(lines)
