"""Training data: read rows, map keys, apply the chat template, tokenize, truncate, collate.

Row formats (key names are configurable, see ``DataConfig``):

- prompt only (PPO):            ``{"prompt": str}`` or ``{"messages": [...]}`` (all messages = prompt)
- prompt / response (SFT):      ``{"prompt": str, "response": str}``
- chat messages (SFT):          ``{"messages": [{"role", "content"}, ...]}``; last message = response
- preference pairs (RM / DPO):  ``{"prompt": str, "chosen": str, "rejected": str}`` or
                                ``{"chosen": [messages], "rejected": [messages]}`` (shared prefix = prompt)

Tokenization: prompt and response are tokenized separately, so the prompt/response boundary is exact.
The response always ends with EOS (appended when the template does not put it there; anything after
the last EOS, e.g. a template newline, is dropped).

Truncation never cuts a response: a prompt longer than ``max_prompt_len`` or too long to fit next to
its response loses tokens on the *left*; a row whose response cannot fit next to one prompt token is
dropped. Both are counted in :class:`DataStats` and logged.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A malformed row or file; the message names the file, the line (or row) and the reason."""


@dataclass
class Row:
    data: dict
    where: str  # "file:line" (JSONL), "file[row]" (JSON / Parquet) or "hf:name[row]"


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    malformed_skipped: int = 0
    prompt_truncated: int = 0
    dropped_response_too_long: int = 0
    examples_of_problems: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        if len(self.examples_of_problems) < 5:
            self.examples_of_problems.append(msg)

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.rows} rows kept; {self.malformed_skipped} malformed skipped; "
            f"{self.prompt_truncated} prompts left-truncated; "
            f"{self.dropped_response_too_long} dropped (response does not fit max_len)"
        )


# ---------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(
            p for ext in ("jsonl", "json", "parquet") for p in glob.glob(os.path.join(path, f"*.{ext}"))
        )
        if not found:
            raise DataError(f"{path}: directory holds no .jsonl/.json/.parquet files")
        return found
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file (for a Hugging Face dataset write 'hf:NAME')")
    return [path]


def read_rows(path: str, split: str = "train", on_malformed: str = "error", stats: DataStats | None = None):
    """Read raw rows from local files or ``hf:NAME`` (Hugging Face ``datasets``, imported lazily)."""
    stats = stats if stats is not None else DataStats()
    rows: list[Row] = []
    if path.startswith("hf:"):
        try:
            import datasets
        except ImportError as e:
            raise DataError("hf: datasets need the 'datasets' package: pip install datasets") from e
        name = path[3:]
        ds = datasets.load_from_disk(name) if os.path.isdir(name) else datasets.load_dataset(name, split=split)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        return [Row(dict(r), f"{path}[{i}]") for i, r in enumerate(ds)]
    for fname in _files(path):
        if fname.endswith(".jsonl"):
            with open(fname) as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                    except ValueError as e:
                        _malformed(f"{fname}:{lineno}", f"invalid JSON ({e})", on_malformed, stats)
                        continue
                    rows.append(Row(obj, f"{fname}:{lineno}"))
        elif fname.endswith(".json"):
            with open(fname) as f:
                obj = json.load(f)
            if isinstance(obj, dict) and "data" in obj:
                obj = obj["data"]
            if not isinstance(obj, list):
                raise DataError(f"{fname}: expected a JSON list of objects (or {{'data': [...]}})")
            rows += [Row(r, f"{fname}[{i}]") for i, r in enumerate(obj)]
        elif fname.endswith(".parquet"):
            import pandas as pd

            df = pd.read_parquet(fname)
            rows += [Row(r, f"{fname}[{i}]") for i, r in enumerate(df.to_dict(orient="records"))]
        else:
            raise DataError(f"{fname}: unsupported file type (use .jsonl, .json or .parquet)")
    return rows


def _malformed(where: str, reason: str, on_malformed: str, stats: DataStats) -> None:
    msg = f"{where}: {reason}"
    if on_malformed != "skip":
        raise DataError(f"malformed row at {msg} (set data.on_malformed=skip to drop such rows)")
    stats.malformed_skipped += 1
    stats.note(msg)


# ---------------------------------------------------------------------------------------------------
# Rows -> (prompt text, response text)
# ---------------------------------------------------------------------------------------------------


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise ValueError(f"missing key {key!r} (row keys: {sorted(row)})")
    v = row[key]
    if not isinstance(v, str):
        raise ValueError(f"key {key!r} must be a string, got {type(v).__name__}")
    return v


def _messages(row: dict, key: str) -> list[dict]:
    if key not in row:
        raise ValueError(f"missing key {key!r} (row keys: {sorted(row)})")
    msgs = row[key]
    if hasattr(msgs, "tolist"):  # numpy arrays from parquet
        msgs = msgs.tolist()
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"key {key!r} must be a non-empty list of messages")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"key {key!r}: every message needs string 'role' and 'content', got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


class Formatter:
    """Turns message lists / strings into prompt and response *text* with the chat template."""

    def __init__(self, tokenizer, apply_chat_template: bool = True):
        self.tok = tokenizer
        self.chat = bool(apply_chat_template and getattr(tokenizer, "chat_template", None))

    def prompt(self, messages: list[dict]) -> str:
        if self.chat:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n".join(m["content"] for m in messages)

    def pair(self, messages: list[dict]) -> tuple[str, str]:
        """(prompt text, response text) for messages whose last one is the assistant response."""
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"the last message must have role 'assistant', got {messages[-1]['role']!r}")
        prompt = self.prompt(messages[:-1])
        if not self.chat:
            return prompt, messages[-1]["content"]
        full = self.tok.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return prompt, full[len(prompt) :]


def _tokenize_pair(fmt: Formatter, prompt: str, response: str) -> tuple[list[int], list[int]]:
    tok = fmt.tok
    # A rendered chat template already carries its special tokens; plain text gets BOS from the tokenizer.
    p_ids = tok(prompt, add_special_tokens=not fmt.chat)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    if eos in r_ids:
        last = len(r_ids) - 1 - r_ids[::-1].index(eos)
        r_ids = r_ids[: last + 1]  # drop template whitespace after the final EOS
    else:
        r_ids = r_ids + [eos]
    return list(p_ids), list(r_ids)


def _fit(prompt: list[int], resp_len: int, max_len: int, max_prompt_len: int):
    """Left-truncate the prompt so that it fits; ``(prompt or None, truncated)``.

    None when the response cannot fit next to at least one prompt token (the first response token
    needs a context token to be predicted from).
    """
    if resp_len > max_len - 1:
        return None, False
    keep = min(len(prompt), max_prompt_len, max_len - resp_len)
    return prompt[len(prompt) - keep :], keep < len(prompt)


def _parsed_rows(rows: list[Row], cfg, stats: DataStats, parse):
    """``(row, parse(row.data))`` for the first ``cfg.max_samples`` rows (all when 0), counting them; a row
    whose ``parse`` raises ValueError is malformed (the run stops, or it is skipped and counted)."""
    for row in rows[: cfg.max_samples or None]:
        stats.rows += 1
        try:
            parsed = parse(row.data)
        except ValueError as e:
            _malformed(row.where, str(e), cfg.on_malformed, stats)
            continue
        yield row, parsed


def build_sft_examples(rows: list[Row], tokenizer, cfg, stats: DataStats | None = None):
    """SFT examples ``{"input_ids": prompt + response, "prompt_len": int}``."""
    stats = stats if stats is not None else DataStats()
    fmt = Formatter(tokenizer, cfg.apply_chat_template)

    def parse(d: dict) -> tuple[str, str]:
        if cfg.output_key in d:
            return fmt.pair([{"role": "user", "content": _text(d, cfg.input_key)},
                             {"role": "assistant", "content": _text(d, cfg.output_key)}])
        if cfg.messages_key in d:
            return fmt.pair(_messages(d, cfg.messages_key))
        raise ValueError(f"needs {cfg.input_key!r}+{cfg.output_key!r} or {cfg.messages_key!r} (row keys: {sorted(d)})")

    out = []
    for row, (prompt, response) in _parsed_rows(rows, cfg, stats, parse):
        p_ids, r_ids = _tokenize_pair(fmt, prompt, response)
        p_ids, truncated = _fit(p_ids, len(r_ids), cfg.max_len, cfg.max_prompt_len)
        if p_ids is None:
            stats.dropped_response_too_long += 1
            stats.note(f"{row.where}: response of {len(r_ids)} tokens does not fit max_len={cfg.max_len}")
            continue
        stats.prompt_truncated += truncated
        out.append({"input_ids": p_ids + r_ids, "prompt_len": len(p_ids)})
        stats.kept += 1
    return out, stats


def build_preference_examples(rows: list[Row], tokenizer, cfg, stats: DataStats | None = None):
    """Pairs ``{"chosen_ids", "rejected_ids", "chosen_prompt_len", "rejected_prompt_len", "margin"}``."""
    stats = stats if stats is not None else DataStats()
    fmt = Formatter(tokenizer, cfg.apply_chat_template)

    def parse(d: dict):
        if cfg.chosen_key not in d or cfg.rejected_key not in d:
            raise ValueError(f"needs keys {cfg.chosen_key!r} and {cfg.rejected_key!r} (row keys: {sorted(d)})")
        if isinstance(d[cfg.chosen_key], str):
            user = [{"role": "user", "content": _text(d, cfg.input_key)}]
            pc, rc = fmt.pair(user + [{"role": "assistant", "content": _text(d, cfg.chosen_key)}])
            pr, rr = fmt.pair(user + [{"role": "assistant", "content": _text(d, cfg.rejected_key)}])
        else:
            pc, rc = fmt.pair(_messages(d, cfg.chosen_key))
            pr, rr = fmt.pair(_messages(d, cfg.rejected_key))
        margin = 0.0
        if cfg.margin_key:
            if not isinstance(d.get(cfg.margin_key), (int, float)):
                raise ValueError(f"margin key {cfg.margin_key!r} must hold a number")
            margin = float(d[cfg.margin_key])
        return pc, rc, pr, rr, margin

    out = []
    for row, (pc, rc, pr, rr, margin) in _parsed_rows(rows, cfg, stats, parse):
        pc_ids, rc_ids = _tokenize_pair(fmt, pc, rc)
        pr_ids, rr_ids = _tokenize_pair(fmt, pr, rr)
        if pc_ids == pr_ids:  # shared prompt: truncate it once so both sides keep the same context
            pc_ids, t1 = _fit(pc_ids, max(len(rc_ids), len(rr_ids)), cfg.max_len, cfg.max_prompt_len)
            pr_ids, t2 = pc_ids, False
        else:
            pc_ids, t1 = _fit(pc_ids, len(rc_ids), cfg.max_len, cfg.max_prompt_len)
            pr_ids, t2 = _fit(pr_ids, len(rr_ids), cfg.max_len, cfg.max_prompt_len)
        if pc_ids is None or pr_ids is None:
            stats.dropped_response_too_long += 1
            lens = f"{len(rc_ids)} / {len(rr_ids)} tokens"
            stats.note(f"{row.where}: a response ({lens}) does not fit max_len={cfg.max_len}")
            continue
        stats.prompt_truncated += t1 or t2
        out.append(
            {
                "chosen_ids": pc_ids + rc_ids,
                "rejected_ids": pr_ids + rr_ids,
                "chosen_prompt_len": len(pc_ids),
                "rejected_prompt_len": len(pr_ids),
                "margin": margin,
            }
        )
        stats.kept += 1
    return out, stats


def build_prompt_examples(rows: list[Row], tokenizer, cfg, stats: DataStats | None = None):
    """Prompt-only examples ``{"prompt_ids": [...]}`` (for generation), left-truncated to max_prompt_len."""
    stats = stats if stats is not None else DataStats()
    fmt = Formatter(tokenizer, cfg.apply_chat_template)

    def parse(d: dict) -> list[dict]:
        if cfg.input_key in d:
            return [{"role": "user", "content": _text(d, cfg.input_key)}]
        return _messages(d, cfg.messages_key)

    out = []
    for _, msgs in _parsed_rows(rows, cfg, stats, parse):
        ids = fmt.tok(fmt.prompt(msgs), add_special_tokens=not fmt.chat)["input_ids"]
        if len(ids) > cfg.max_prompt_len:
            stats.prompt_truncated += 1
            ids = ids[len(ids) - cfg.max_prompt_len :]
        out.append({"prompt_ids": list(ids)})
        stats.kept += 1
    return out, stats


def load_examples(kind: str, path: str, split: str, tokenizer, cfg) -> tuple[list[dict], DataStats]:
    """Read ``path`` and build examples of ``kind`` in {"sft", "preference", "prompt"}; logs the counts."""
    stats = DataStats()
    rows = read_rows(path, split, cfg.on_malformed, stats)
    builder = {"sft": build_sft_examples, "preference": build_preference_examples, "prompt": build_prompt_examples}
    examples, stats = builder[kind](rows, tokenizer, cfg, stats)
    problems = stats.malformed_skipped or stats.prompt_truncated or stats.dropped_response_too_long
    log.log(logging.WARNING if problems else logging.INFO, "data %s: %s", path, stats.summary())
    for msg in stats.examples_of_problems:
        log.warning("  e.g. %s", msg)
    if not examples:
        raise DataError(f"{path}: no usable rows ({stats.summary()})")
    return examples, stats


# ---------------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, epoch), so a step (or rollout) index is the data position
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of ``n`` examples in epoch ``epoch``: ``torch.randperm(n)`` seeded with ``seed + epoch``."""
    g = torch.Generator().manual_seed(seed + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def step_indices(n: int, seed: int, step: int, steps_per_epoch: int, batch_size: int) -> list[int]:
    """Global example indices of batch ``step`` (0-based): a fresh permutation per epoch, drop-last.
    Shared by the stage trainers (optimizer steps) and the PPO trainer (rollouts)."""
    epoch, pos = divmod(step, steps_per_epoch)
    return list(epoch_permutation(n, seed, epoch)[pos * batch_size : (pos + 1) * batch_size])


# ---------------------------------------------------------------------------------------------------
# Collation (right padding for training; position ids come from the attention mask anyway)
# ---------------------------------------------------------------------------------------------------


def pad_sequences(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (B, T), attention_mask (B, T))`` padded to the longest sequence."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, T - len(s) :] = torch.tensor(s)
            mask[i, T - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def response_mask(prompt_lens: list[int], attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` mask, 1 on response tokens (right-padded rows: after the prompt, before the pads)."""
    pos = torch.arange(attention_mask.shape[1]).unsqueeze(0)
    return ((pos >= torch.tensor(prompt_lens).unsqueeze(1)) & attention_mask.bool()).long()


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, Any]:
    ids, mask = pad_sequences([e["input_ids"] for e in examples], pad_id)
    loss_mask = response_mask([e["prompt_len"] for e in examples], mask)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, Any]:
    """Chosen rows first, then rejected rows, in one padded batch of 2B sequences."""
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    plens = [e["chosen_prompt_len"] for e in examples] + [e["rejected_prompt_len"] for e in examples]
    ids, mask = pad_sequences(seqs, pad_id)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "loss_mask": response_mask(plens, mask),
        "margin": torch.tensor([e["margin"] for e in examples], dtype=torch.float32),
    }
