"""Stage configurations: one dataclass per stage, built from shared sections.

Long because every option of the offline stages is declared here once, with its default and its help text (the CLI's
--help is generated from it).

A run is configured by a YAML file plus dotted command-line overrides (``train.lr=1e-5``). Every field
has a default and a one-line doc (``rto-llm <stage> --help`` prints them all). Unknown keys and values
of the wrong type are errors that name the key.

Supported field types: ``str``, ``int``, ``float``, ``bool`` and ``Literal[...]`` (a fixed set of
choices). A float field accepts an int and a numeric string (PyYAML reads ``1e-5`` as a string).
"""

from __future__ import annotations

import dataclasses
import math
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


def check_at_least(sec: Any, prefix: str, bound: int, *names: str, note: str = "") -> None:
    """Each field ``names`` of section ``sec`` must be >= ``bound``; the ConfigError names the first that is not."""
    for name in names:
        if getattr(sec, name) < bound:
            raise ConfigError(f"{prefix}.{name} must be >= {bound}{note}, got {getattr(sec, name)}")


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
    pad_token: str = opt(
        "auto", "PAD token (must differ from EOS): auto = keep the tokenizer's PAD when it differs from EOS, else add "
        "'<|pad|>' and resize every role's embeddings (saved with every export); keep = never change the tokenizer; "
        "or a token string (e.g. '<|finetune_right_pad_id|>'), added when new."
    )

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path is required: a local model directory (or a hub name)")
        check_at_least(self, prefix, 0, "lora_rank")
        if self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{prefix}.lora_alpha must be > 0 and {prefix}.lora_dropout in [0, 1)")


@dataclass
class DataConfig:
    """Where the training rows come from, which keys hold what, and how they are tokenized."""

    train_path: str = opt(
        "", "A .jsonl/.json/.parquet/.csv file, a directory of them, 'hf:NAME' for a Hugging Face dataset (needs "
        "model.allow_hub) or 'hf:DIR' for a local one (save_to_disk or a dataset repository)."
    )
    train_split: str = opt("train", "Split name for Hugging Face datasets.")
    subset: str = opt("", "Subset (config) name of an hf:NAME dataset, e.g. 'default'; empty = the dataset's default.")
    streaming: bool = opt(
        False, "Stream an hf:NAME dataset instead of downloading and caching all of it (with max_samples: only the "
        "first rows are read)."
    )
    eval_path: str = opt(
        "", "Held-out data (same formats; prompt rows for ppo/rto), evaluated as the eval section says; empty = none."
    )
    eval_split: str = opt("test", "Split name of the evaluation dataset.")
    input_key: str = opt("prompt", "Key of the prompt (text or a message list).")
    output_key: str = opt("response", "Key of the response (text or assistant messages; SFT prompt/response rows).")
    messages_key: str = opt("messages", "Key of a chat message list (SFT); its last message is the target.")
    completion_key: str = opt(
        "completion", "Key of a TRL prompt-completion row's completion (text or assistant messages), used when "
        "output_key is absent."
    )
    text_key: str = opt("text", "Key of a language-modeling row's text (SFT: loss on every token after BOS).")
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
    epochs: int = opt(1, "Passes over the training data (ppo/rto: over the prompts, unless ppo.max_rollouts).")
    max_steps: int = opt(
        0, "Stop after this many optimizer steps (0 = epochs * steps per epoch; ppo/rto: use ppo.max_rollouts)."
    )
    stop_after: int = opt(
        0, "Return after N steps (optimizer steps; rollouts in ppo/rto) of this invocation, after saving a "
        "checkpoint (time-limited jobs; 0 = run to the end)."
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
        check_at_least(self, prefix, 1, "batch_size", "micro_batch_size", "epochs")
        check_at_least(self, prefix, 0, "max_steps", "stop_after", note=" (0 = off)")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{prefix}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{prefix}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{prefix}.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"{prefix}.adam_eps must be > 0, got {self.adam_eps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"{prefix}.weight_decay and {prefix}.grad_clip must be >= 0 (grad_clip 0 = off)")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO (optional; without it training runs on plain torch)."""

    enabled: bool = opt(False, "Train through DeepSpeed (lazy import); false = plain torch.")
    zero_stage: Literal[0, 1, 2, 3] = opt(2, "ZeRO stage: 2 shards optimizer + grads, 3 also params.")
    offload: bool = opt(False, "Offload optimizer states (and ZeRO-3 parameters) to CPU memory.")
    bf16: bool = opt(False, "bf16 mixed precision with fp32 master weights (needs hardware support).")
    config_file: str = opt("", "A DeepSpeed JSON file merged over the generated config (expert use).")


# Keys that may differ from a checkpoint's config on resume when listed in checkpoint.allow_changes: the length
# of the run (the LR schedule is re-stretched to the new total), memory knobs that leave the update unchanged up
# to float rounding (micro-batch size, checkpointing, offload, generation/forward batching), and paths of moved
# files (the model identity is still checked). Logging, checkpoint, eval and device settings may always change
# (rto_llm/lifecycle.py FREE_ON_RESUME).
RESUME_CHANGEABLE = (
    "train.max_steps", "train.epochs", "ppo.max_rollouts",
    "train.micro_batch_size", "model.gradient_checkpointing", "critic.gradient_checkpointing", "deepspeed.offload",
    "kl.offload", "reward.offload", "rollout.generation_batch_size", "rollout.forward_batch_size",
    "rollout.static_cache", "rollout.compile", "rollout.zero3_gather",
    "model.path", "model.tokenizer_path", "data.train_path", "reward.path", "critic.path", "kl.ref_path",
    "rto.dpo_path", "rto.dpo_ref_path", "dpo.ref_path",
)


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (atomic) and the final Hugging Face export."""

    save_every: int = opt(
        0, "Save a resumable checkpoint every N steps (optimizer steps; rollouts in ppo/rto); 0 = one at the end."
    )
    keep_last: int = opt(2, "Number of resumable checkpoints kept (older ones are deleted; 0 = keep all).")
    resume: str = opt("", "'latest' or a checkpoint directory to resume from (--resume [DIR]); empty = fresh start.")
    export_hf: bool = opt(True, "Export the final model in Hugging Face format to output_dir/final.")
    save_hf_every: int = opt(
        0, "Also export a Hugging Face model (a LoRA run: its adapter) to output_dir/hf/step-XXXXXXXX every N "
        "steps (optimizer steps; rollouts in ppo/rto); 0 = off."
    )
    overwrite: bool = opt(
        False, "Fresh start in a non-empty train.output_dir (--overwrite): delete the previous run's checkpoints, "
        "metrics and exports first (without it such a directory is refused)."
    )
    allow_changes: str = opt(
        "", "Comma-separated keys allowed to differ from the checkpoint's config on resume "
        "(--resume-allow-changes): " + ", ".join(RESUME_CHANGEABLE) + "."
    )

    def validate(self, prefix: str) -> None:
        check_at_least(self, prefix, 0, "save_every", "keep_last", "save_hf_every")
        bad = [k for k in (k.strip() for k in self.allow_changes.split(",")) if k and k not in RESUME_CHANGEABLE]
        if bad:
            raise ConfigError(
                f"{prefix}.allow_changes: {', '.join(bad)} may not change on resume (only "
                f"{', '.join(RESUME_CHANGEABLE)}; logging, checkpoint and eval settings may always change)"
            )


@dataclass
class LogConfig:
    """Metrics: JSONL file always; TensorBoard by default; Weights & Biases optional."""

    every: int = opt(1, "Log metrics every N steps (optimizer steps; rollouts in ppo/rto).")
    tensorboard: bool = opt(True, "Write TensorBoard event files to output_dir/tb.")
    wandb: bool = opt(False, "Log to Weights & Biases (needs the wandb package).")
    wandb_project: str = opt("rto-llm", "Weights & Biases project.")
    run_name: str = opt("", "Run name for the loggers; empty = stage name.")
    progress_bar: bool = opt(True, "Show a tqdm progress bar with live loss and throughput.")

    def validate(self, prefix: str) -> None:
        check_at_least(self, prefix, 1, "every")


@dataclass
class StageEvalConfig:
    """Evaluation on data.eval_path (SFT / RM / DPO): the stage's loss and metrics on the held-out rows."""

    every: int = opt(0, "Evaluate every N optimizer steps (0 = only after the last step); needs data.eval_path.")
    at_start: bool = opt(False, "Also evaluate the starting model (logged at step 0).")
    batch_size: int = opt(0, "Rows per evaluation forward pass; 0 = train.micro_batch_size.")

    def validate(self, prefix: str) -> None:
        check_at_least(self, prefix, 0, "every", "batch_size")


@dataclass
class EvalConfig(StageEvalConfig):
    """Evaluation of the policy on data.eval_path prompts (PPO / RTO; see rto_llm/evaluation.py): RM score,
    KL, length, EOS, win rate against the reference, optional gold reward, sample completions."""

    every: int = opt(0, "Evaluate every N rollouts and after the last one (0 = off, or only at the end when "
                        "data.eval_path is set); needs data.eval_path.")
    at_start: bool = opt(True, "Also evaluate the starting policy (step 0) when evaluation is on.")
    batch_size: int = opt(0, "Prompts per generate call and rows per forward pass; 0 = rollout.generation_batch_size "
                             "/ rollout.forward_batch_size.")
    max_prompts: int = opt(256, "Use the first N prompts of data.eval_path (0 = all).")
    num_samples: int = opt(4, "Sample completions logged per evaluation (samples.jsonl and TensorBoard text).")
    temperature: float = opt(0.0, "Sampling temperature of the evaluation; 0 = rollout.temperature.")
    win_rate: bool = opt(True, "Sample one reference response per prompt (once; cached) for the RM win rate.")
    gold: str = opt("", "Gold reward: '' (none), 'module:function' or 'file.py:function' (f(prompts: list[str], "
                        "responses: list[str]) -> list[float]), or 'task:DIR' (exact evaluation on a token task).")
    gold_beta: float = opt(0.0, "KL coefficient of the exact task evaluation (eval.gold=task:DIR); 0 = the run's "
                                "current beta2.")
    seed: int = opt(0, "Seed of the evaluation's own random stream (every evaluation reuses the same draws).")
    flag_window: int = opt(4, "Red flag 'RM up, gold down': fitted trends over the last N evaluations (>= 3).")
    flag_z: float = opt(2.0, "Red flag 'RM up, gold down': both trends must exceed z standard errors.")
    length_collapse_frac: float = opt(0.5, "Red flag 'length collapse': mean length below this fraction of the "
                                           "first evaluation's.")
    eos_first_max: float = opt(0.5, "Red flag 'length collapse': more than this fraction of responses are EOS at "
                                    "the first token.")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_at_least(self, prefix, 0, "max_prompts", "num_samples")
        if self.temperature < 0 or self.gold_beta < 0:
            raise ConfigError(f"{prefix}.temperature and {prefix}.gold_beta must be >= 0 (0 = the run's value)")
        if self.flag_window < 3:
            raise ConfigError(f"{prefix}.flag_window must be >= 3 (a trend needs three points), got {self.flag_window}")
        check_at_least(self, prefix, 0, "flag_z")
        if not 0.0 < self.length_collapse_frac < 1.0 or not 0.0 < self.eos_first_max <= 1.0:
            raise ConfigError(f"{prefix}.length_collapse_frac must be in (0, 1) and {prefix}.eos_first_max in (0, 1]")
        g = self.gold
        if g and not g.startswith("task:") and (":" not in g or not g.rpartition(":")[0] or not g.rpartition(":")[2]):
            raise ConfigError(f"{prefix}.gold={g!r}: expected 'module:function', 'path/to/file.py:function' or "
                              "'task:DIR' (e.g. eval.gold=my_gold:score)")


def check_eval_sections(cfg: Any) -> None:
    """Cross-section checks of the ``eval`` section: evaluation needs data.eval_path; a gold reward needs
    evaluation to be on. Nothing the user sets is ignored silently."""
    ev, data = getattr(cfg, "eval", None), getattr(cfg, "data", None)
    if ev is None or data is None:
        return
    if ev.every > 0 and not data.eval_path:
        raise ConfigError(f"eval.every={ev.every} needs evaluation data: set data.eval_path (a file of held-out "
                          "rows, prompt rows for ppo/rto), or eval.every=0 to train without evaluation")
    if getattr(ev, "gold", "") and not (ev.every > 0 or data.eval_path):
        raise ConfigError(f"eval.gold={ev.gold!r} is set but evaluation is off: set data.eval_path (and eval.every=N "
                          "for evaluations during training)")


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
class _StageConfig:
    """The sections every offline stage (sft, rm, dpo) has, in this order; a stage redefines the model, data and
    train defaults in place and adds its own section last."""

    model: ModelConfig = section(ModelConfig, "Model to train.")
    data: DataConfig = section(DataConfig, "Training rows.")
    train: TrainConfig = section(TrainConfig, "Optimization.")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "DeepSpeed ZeRO.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
    log: LogConfig = section(LogConfig, "Logging.")
    eval: StageEvalConfig = section(StageEvalConfig, "Evaluation on data.eval_path (every N steps, at the end).")


@dataclass
class SFTConfig(_StageConfig):
    """Stage `sft`: supervised fine-tuning, loss on response tokens only."""

    model: ModelConfig = section(ModelConfig, "Model to fine-tune.")
    data: DataConfig = section(DataConfig, "Prompt/response or chat-message rows.")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/sft", lr=1e-5), "Optimization.")
    sft: SFTOptions = section(SFTOptions, "SFT loss.")


@dataclass
class RMConfig(_StageConfig):
    """Stage `rm`: reward model, pairwise Bradley-Terry loss, score at the last real token."""

    model: ModelConfig = section(ModelConfig, "Backbone (a causal LM or a reward model) to train.")
    data: DataConfig = section(lambda: DataConfig(), "Preference pairs.")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/rm", lr=9e-6), "Optimization.")
    rm: RMOptions = section(RMOptions, "Reward-model options.")


@dataclass
class DPOConfig(_StageConfig):
    """Stage `dpo`: DPO / IPO / cDPO against a frozen reference (the RTO stage's token-reward model)."""

    model: ModelConfig = section(ModelConfig, "Policy to train (also the reference unless dpo.ref_path).")
    data: DataConfig = section(DataConfig, "Preference pairs.")
    train: TrainConfig = section(lambda: TrainConfig(output_dir="runs/dpo", lr=5e-7), "Optimization.")
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
        v = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                v = float(value)
            except ValueError:
                pass
        if v is not None:
            if not math.isfinite(v):
                raise ConfigError(f"{key}: {value!r} is not a finite number (NaN and inf are refused)")
            return v
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
    check_eval_sections(cfg)
    check_hub_data(cfg)


def check_hub_data(cfg: Any) -> None:
    """``hf:NAME`` data that is not a local directory downloads from the hub: only with ``model.allow_hub``."""
    import os

    model, data = getattr(cfg, "model", None), getattr(cfg, "data", None)
    if model is None or data is None or model.allow_hub:
        return
    for key in ("train_path", "eval_path"):
        path = getattr(data, key, "")
        if path.startswith("hf:") and not os.path.isdir(path[3:]):
            raise ConfigError(
                f"data.{key}={path!r} downloads a Hugging Face dataset: set model.allow_hub=true (or use a local "
                "file, or hf:DIR for a dataset saved with save_to_disk)"
            )


def read_yaml(path: str) -> Any:
    """The YAML file ``path``; a missing file or a syntax error is a ConfigError naming the file and line."""
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"--config {path}: no such file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"--config {path}: is a directory, expected a YAML file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot be read ({e})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: YAML syntax error: {what} (fix the file; every value is `key: value` under "
                          "its section)") from e


def load_config(cls: type, yaml_path: str | None = None, overrides: list[str] | tuple = ()) -> Any:
    """Build a stage config: defaults, then the YAML file, then ``key.sub=value`` overrides."""
    cfg = cls()
    if yaml_path:
        data = read_yaml(yaml_path)
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
