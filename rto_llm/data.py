"""Training data: read rows, recognize their format, apply the chat template, tokenize, truncate, collate.

Long because it accepts every TRL dataset type from four file kinds and the hub, and each format needs its own one-
line error; the pieces form one pipeline (read, recognize, template, tokenize, collate).

Row formats: TRL's dataset types (https://huggingface.co/docs/trl/dataset_formats), *standard* (text) or
*conversational* (lists of ``{"role", "content"}`` messages). Key names are options of ``DataConfig``
(``input_key`` "prompt", ``output_key`` "response", ``completion_key`` "completion", ``messages_key``
"messages", ``text_key`` "text", ``chosen_key`` "chosen", ``rejected_key`` "rejected", ``margin_key``):

==================  ==========================================  ==============================================
type (stages)       standard                                    conversational
==================  ==========================================  ==============================================
language modeling   ``{"text": str}``                           ``{"messages": [...]}`` (last = assistant)
(sft)
prompt-completion   ``{"prompt": str, "completion": str}``,     ``{"prompt": [msgs], "completion": [assistant
(sft)               ``{"prompt": str, "response": str}``        msgs]}``
prompt-only         ``{"prompt": str}``                         ``{"prompt": [msgs]}``
(ppo, rto)
preference          ``{"prompt", "chosen", "rejected"}``;        ``{"prompt": [msgs], "chosen": [assistant msgs],
(rm, dpo)           implicit prompt ``{"chosen", "rejected"}``  "rejected": [...]}``; implicit prompt
                                                                ``{"chosen": [msgs], "rejected": [msgs]}``
==================  ==========================================  ==============================================

The prompt stages (ppo, rto) also take their prompts from prompt-completion, preference and conversational
rows (a conversation without its final assistant message). A ``chosen`` list that starts with a non-assistant
message is a whole conversation (its prefix is the prompt; a ``prompt`` key next to it is ignored).

Formatting: conversational rows, and standard rows with an explicit prompt (one user turn, one assistant
turn), go through the tokenizer's chat template when it has one (``data.apply_chat_template``), else their
contents are joined with newlines. Standard language-modeling text and implicit-prompt text pairs are raw
text (nothing to template): the tokenizer adds its BOS, and an implicit prompt is the longest common token
prefix of chosen and rejected.

Tokenization: prompt and response are tokenized separately, so the prompt/response boundary is exact.
The response always ends with EOS (appended when the template does not put it there; anything after
the last EOS, e.g. a template newline, is dropped).

Truncation never cuts a response: a prompt longer than ``max_prompt_len`` or too long to fit next to
its response loses tokens on the *left*; a row whose response cannot fit next to one prompt token is
dropped. Both are counted in :class:`DataStats` and logged.

Reading (:func:`read_rows`): ``.jsonl`` is decoded line by line with the standard ``json`` module, so a bad
line (not UTF-8, not JSON, not an object) is reported as ``file:line`` (``data.on_malformed=skip`` drops and
counts it); ``.json`` (a list, or ``{"data": [...]}``) is parsed whole by ``json`` as well (pyarrow's JSON
reader would turn date-like strings into timestamps). ``.parquet``, ``.csv`` and ``.arrow`` files go through
``datasets.load_dataset(builder, data_files=...)`` (Arrow cache; pandas when ``datasets`` is missing);
``hf:NAME`` through ``datasets.load_dataset(NAME, data.subset, split=..., streaming=data.streaming)`` (a hub
download needs ``model.allow_hub``), ``hf:DIR`` from ``save_to_disk`` through ``load_from_disk``.
"""

from __future__ import annotations

import codecs
import csv
import functools
import glob
import itertools
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
    where: str  # "file:line" (JSONL), "file[row]" (JSON / Parquet / CSV) or "hf:name[row]"


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

_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.endswith(_EXTENSIONS))
        if not found:
            raise DataError(f"{path}: directory holds no .jsonl/.json/.parquet/.csv/.arrow files")
        return found
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file (for a Hugging Face dataset write 'hf:NAME')")
    if not path.endswith(_EXTENSIONS):
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet, .csv or .arrow)")
    return [path]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _import_datasets(required: bool):
    """The ``datasets`` package with its progress bars off; None (or a DataError when ``required``) if absent."""
    try:
        import datasets
    except ImportError as e:
        if required:
            raise DataError("hf: datasets need the 'datasets' package: pip install datasets") from e
        return None
    datasets.disable_progress_bars()
    return datasets


def read_rows(path: str, split: str = "train", on_malformed: str = "error", stats: DataStats | None = None, *,
              subset: str = "", streaming: bool = False, allow_hub: bool = True, limit: int = 0) -> list[Row]:
    """Raw rows of local files (a file or a directory of them) or of ``hf:NAME`` / ``hf:DIR``.

    Args:
        split, subset, streaming: split, subset (config) name and streaming of ``hf:`` datasets.
        on_malformed: ``error`` raises on an undecodable JSONL line, ``skip`` drops and counts it in ``stats``.
        allow_hub: False refuses ``hf:NAME`` that is not a local directory (a download). The stage configs
            refuse it at load time unless ``model.allow_hub`` (``config.check_hub_data``).
        limit: stop after this many rows (0 = all): with streaming, only those are read.
    """
    stats = stats if stats is not None else DataStats()
    if path.startswith("hf:"):
        return _read_hf(path, split, subset, streaming, allow_hub, limit)
    rows: list[Row] = []
    for fname in _files(path):
        if limit and len(rows) >= limit:
            break
        if fname.endswith(".jsonl"):
            rows += _read_jsonl(fname, on_malformed, stats)
        elif fname.endswith(".json"):
            rows += _read_json(fname)
        else:
            rows += _read_table(fname, streaming)
    return rows[:limit] if limit else rows


def _read_jsonl(fname: str, on_malformed: str, stats: DataStats) -> list[Row]:
    """One JSON object per line, decoded line by line (UTF-8, a BOM on line 1 allowed; blank lines skipped)."""
    rows = []
    with open(fname, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            where = f"{fname}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                _malformed(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                           on_malformed, stats)
                continue
            except ValueError as e:
                _malformed(where, f"invalid JSON ({e})", on_malformed, stats)
                continue
            if not isinstance(obj, dict):
                _malformed(where, f"invalid JSON row: expected an object, got {type(obj).__name__}", on_malformed,
                           stats)
                continue
            rows.append(Row(obj, where))
    return rows


def _read_json(fname: str) -> list[Row]:
    """A JSON list of objects, or ``{"data": [...]}``; parsed as a whole (a syntax error names line:column)."""
    try:
        with open(fname, encoding="utf-8-sig") as f:
            obj = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{fname}: not valid UTF-8 ({e.reason} at byte {e.start}); a .json file is read whole, "
                        "so data.on_malformed=skip cannot drop part of it (use .jsonl)") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{fname}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); a .json file is read whole, so "
                        "data.on_malformed=skip cannot drop part of it (use .jsonl)") from e
    if isinstance(obj, dict) and "data" in obj:
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{fname}: expected a JSON list of objects (or {{'data': [...]}})")
    return [Row(r, f"{fname}[{i}]") for i, r in enumerate(obj)]


def _read_table(fname: str, streaming: bool) -> list[Row]:
    """Parquet / CSV / Arrow through ``datasets.load_dataset(builder, data_files=...)`` (cached)."""
    ext = os.path.splitext(fname)[1]
    datasets = _import_datasets(required=False)
    try:
        if datasets is not None:
            kw = {}
            if ext == ".csv":  # CSV cells are text: no type inference ("2" stays "2"), empty cells are ""
                with open(fname, newline="", encoding="utf-8-sig") as f:
                    header = next(csv.reader(f), [])
                kw = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                      "keep_default_na": False}
            ds = datasets.load_dataset(_BUILDERS[ext], data_files=fname, split="train", streaming=streaming, **kw)
            return [Row(dict(r), f"{fname}[{i}]") for i, r in enumerate(ds)]
        import pandas as pd

        if ext == ".arrow":
            raise DataError(f"{fname}: .arrow files need the 'datasets' package: pip install datasets")
        df = pd.read_parquet(fname) if ext == ".parquet" else pd.read_csv(fname, dtype=str, keep_default_na=False)
        return [Row(r, f"{fname}[{i}]") for i, r in enumerate(df.to_dict(orient="records"))]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- any reader failure becomes one line naming the file
        raise DataError(f"{fname}: cannot read it ({_one_line(e)})") from e


def _read_hf(path: str, split: str, subset: str, streaming: bool, allow_hub: bool, limit: int) -> list[Row]:
    datasets = _import_datasets(required=True)
    name = path[3:]
    local = os.path.isdir(name)
    if not local and not allow_hub:
        raise DataError(f"{path}: downloading a Hugging Face dataset needs model.allow_hub=true (or use a local "
                        "file, or hf:DIR for a dataset saved with save_to_disk)")
    try:
        if local and any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r} (splits: {sorted(ds)}); set data.train_split / "
                                    "data.eval_split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, subset or None, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- unknown subset / split / name: one line with the options
        raise DataError(f"{path} (data.subset={subset!r}, split {split!r}): {_one_line(e)}") from e
    it = itertools.islice(ds, limit) if limit else ds
    return [Row(dict(r), f"{path}[{i}]") for i, r in enumerate(it)]


def _malformed(where: str, reason: str, on_malformed: str, stats: DataStats) -> None:
    msg = f"{where}: {reason}"
    if on_malformed != "skip":
        raise DataError(f"malformed row at {msg} (set data.on_malformed=skip to drop such rows)")
    stats.malformed_skipped += 1
    stats.note(msg)


# ---------------------------------------------------------------------------------------------------
# Rows -> token ids: keys and values
# ---------------------------------------------------------------------------------------------------

# Key names that often hold a field under another name: suggested in the error of a row without the keys.
_ALIASES = {
    "input_key": ("instruction", "question", "query", "input", "problem", "context", "user"),
    "output_key": ("output", "answer", "solution", "target", "assistant", "reply"),
    "messages_key": ("conversations", "conversation", "chat", "dialog", "dialogue", "turns"),
    "chosen_key": ("chosen_response", "response_chosen", "preferred", "better", "winner"),
    "rejected_key": ("rejected_response", "response_rejected", "dispreferred", "worse", "loser"),
    "text_key": ("content", "document", "body"),
}


def _plain(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else v  # numpy arrays from parquet / pandas


def _has(d: dict, key: str) -> bool:
    """The row holds a value under ``key`` (a None from a dataset's unified schema counts as absent)."""
    return bool(key) and d.get(key) is not None


def _keys(d: dict) -> list[str]:
    return sorted(k for k, v in d.items() if v is not None)


def _hint(d: dict, fields: tuple[str, ...]) -> str:
    found = [f"data.{f}={k}" for f in fields for k in _ALIASES.get(f, ()) if _has(d, k)]
    if found:
        return f"; set {' or '.join(found)} if that key holds it"
    return "; name your keys with " + ", ".join(f"data.{f}" for f in fields)


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise ValueError(f"missing key {key!r} (row keys: {_keys(row)})")
    v = row[key]
    if not isinstance(v, str):
        raise ValueError(f"key {key!r} must be a string, got {type(v).__name__}")
    return v


def _message_list(msgs: Any, key: str) -> list[dict]:
    msgs = _plain(msgs)
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"key {key!r} must be a non-empty list of messages, got {type(msgs).__name__}")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"key {key!r}: every message needs string 'role' and 'content', got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _messages(row: dict, key: str) -> list[dict]:
    if key not in row:
        raise ValueError(f"missing key {key!r} (row keys: {_keys(row)})")
    return _message_list(row[key], key)


def _turns(v: Any, key: str, role: str) -> list[dict]:
    """A prompt or a response as messages: text becomes one ``role`` message, a list is checked messages."""
    v = _plain(v)
    if isinstance(v, str):
        return [{"role": role, "content": v}]
    if isinstance(v, list):
        return _message_list(v, key)
    raise ValueError(f"key {key!r} must be a string or a list of messages, got {type(v).__name__}")


def _end_with_eos(ids: list[int], eos: int) -> list[int]:
    """Keep ``ids`` through their last EOS (dropping template whitespace after it), or append EOS."""
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        return ids[: last + 1]
    return ids + [eos]


class Formatter:
    """Turns message lists / strings into prompt and response *text* with the chat template."""

    def __init__(self, tokenizer, apply_chat_template: bool = True):
        self.tok = tokenizer
        self.chat = bool(apply_chat_template and getattr(tokenizer, "chat_template", None))

    def prompt(self, messages: list[dict]) -> str:
        if not messages:
            raise ValueError("the prompt has no messages")
        if self.chat:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n".join(m["content"] for m in messages)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return list(self.tok(self.prompt(messages), add_special_tokens=not self.chat)["input_ids"])

    def split(self, prompt: list[dict], response: list[dict]) -> tuple[str, str]:
        """(prompt text, response text) of a conversation ``prompt + response`` whose response messages end
        with the assistant's."""
        if not response:
            raise ValueError("the response has no messages")
        if response[-1]["role"] != "assistant":
            raise ValueError(f"the last message must have role 'assistant', got {response[-1]['role']!r}")
        if not prompt:
            raise ValueError("the conversation has no message before the assistant's response (no prompt)")
        prompt_text = self.prompt(prompt)
        if not self.chat:
            return prompt_text, "\n".join(m["content"] for m in response)
        full = self.tok.apply_chat_template(prompt + response, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return prompt_text, full[len(prompt_text) :]

    def pair(self, messages: list[dict]) -> tuple[str, str]:
        """(prompt text, response text) for messages whose last one is the assistant response."""
        return self.split(messages[:-1], messages[-1:])


def _tokenize_pair(fmt: Formatter, prompt: str, response: str) -> tuple[list[int], list[int]]:
    tok = fmt.tok
    # A rendered chat template already carries its special tokens; plain text gets BOS from the tokenizer.
    p_ids = tok(prompt, add_special_tokens=not fmt.chat)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    return list(p_ids), _end_with_eos(list(r_ids), tok.eos_token_id)


def _text_ids(tok, text: str) -> list[int]:
    """Raw text with the tokenizer's own special tokens (BOS when it adds one)."""
    return list(tok(text, add_special_tokens=True)["input_ids"])


def _implicit_pair(tok, chosen: str, rejected: str, ck: str, rk: str, ik: str):
    """Implicit-prompt text pair: the prompt is the longest common token prefix of chosen and rejected."""
    c, r = _text_ids(tok, chosen), _text_ids(tok, rejected)
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if k == 0:
        raise ValueError(f"implicit prompt: {ck!r} and {rk!r} share no leading tokens to use as the prompt; "
                         f"give the prompt under data.input_key ({ik!r})")
    if k == len(c) or k == len(r):
        raise ValueError(f"implicit prompt: one of {ck!r} / {rk!r} is a prefix of the other, so it has no response "
                         f"tokens; give the prompt under data.input_key ({ik!r})")
    eos = tok.eos_token_id
    return c[:k], _end_with_eos(c[k:], eos), r[:k], _end_with_eos(r[k:], eos)


def _is_conversation(msgs: list[dict]) -> bool:
    """A message list that carries its own prompt (starts with a non-assistant message)."""
    return msgs[0]["role"] != "assistant"


# ---------------------------------------------------------------------------------------------------
# Rows -> token ids per stage
# ---------------------------------------------------------------------------------------------------


def _sft_ids(d: dict, fmt: Formatter, cfg) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of an SFT row: prompt-completion, conversational or language modeling."""
    ik, ok, ck, mk, tk = cfg.input_key, cfg.output_key, cfg.completion_key, cfg.messages_key, cfg.text_key
    resp = next((k for k in (ok, ck) if _has(d, k)), None) or next((k for k in (ok, ck) if k and k in d), None)
    if _has(d, ik) and resp:
        return _tokenize_pair(fmt, *fmt.split(_turns(d[ik], ik, "user"), _turns(d[resp], resp, "assistant")))
    if _has(d, mk):
        return _tokenize_pair(fmt, *fmt.pair(_messages(d, mk)))
    if _has(d, tk):
        ids = _text_ids(fmt.tok, _text(d, tk))
        if len(ids) < 2:
            raise ValueError(f"key {tk!r}: the text has {len(ids)} token(s); one is the context, at least one more "
                             "is needed")
        return ids[:1], _end_with_eos(ids[1:], fmt.tok.eos_token_id)
    raise ValueError(
        f"needs {ik!r}+{ok!r} or {mk!r} (data.input_key, data.output_key, data.messages_key), {ik!r}+{ck!r} "
        f"(data.completion_key) or {tk!r} (data.text_key); row keys: {_keys(d)}"
        + (f"; a preference row ({cfg.chosen_key!r}/{cfg.rejected_key!r}) is for rm / dpo, or set "
           f"data.output_key={cfg.chosen_key} to fine-tune on the chosen responses"
           if _has(d, cfg.chosen_key) and _has(d, cfg.rejected_key) else
           _hint(d, ("input_key", "output_key", "messages_key", "text_key")))
    )


def _preference_ids(d: dict, fmt: Formatter, cfg):
    """(chosen prompt, chosen response, rejected prompt, rejected response) ids of a preference row."""
    ik, ck, rk = cfg.input_key, cfg.chosen_key, cfg.rejected_key
    if ck not in d or rk not in d:
        unpaired = "; unpaired preference rows (prompt/completion/label) are not supported" if "label" in d else ""
        raise ValueError(
            f"needs {ck!r} and {rk!r} (data.chosen_key, data.rejected_key), the prompt under {ik!r} "
            f"(data.input_key) or inside them; row keys: {_keys(d)}"
            + _hint(d, ("chosen_key", "rejected_key", "input_key")) + unpaired
        )
    chosen, rejected = _plain(d[ck]), _plain(d[rk])
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not _has(d, ik):
            return _implicit_pair(fmt.tok, chosen, rejected, ck, rk, ik)
        prompt = _turns(d[ik], ik, "user")
        pairs = (fmt.split(prompt, _turns(chosen, ck, "assistant")),
                 fmt.split(prompt, _turns(rejected, rk, "assistant")))
    elif isinstance(chosen, list) and isinstance(rejected, list):
        cm, rm = _message_list(chosen, ck), _message_list(rejected, rk)
        if _has(d, ik) and not _is_conversation(cm):
            prompt = _turns(d[ik], ik, "user")
            pairs = (fmt.split(prompt, cm), fmt.split(prompt, rm))
        else:  # implicit prompt: each conversation's messages before its last are the prompt
            pairs = (fmt.pair(cm), fmt.pair(rm))
    else:
        raise ValueError(f"keys {ck!r} and {rk!r} must both be text or both be message lists, got "
                         f"{type(chosen).__name__} and {type(rejected).__name__}")
    (pc, rc), (pr, rr) = pairs
    return (*_tokenize_pair(fmt, pc, rc), *_tokenize_pair(fmt, pr, rr))


def _prompt_row_ids(d: dict, fmt: Formatter, cfg) -> list[int]:
    """Prompt ids of any row that has a prompt (prompt-only, prompt-completion, conversational, preference)."""
    ik, mk, ck, rk, tk = cfg.input_key, cfg.messages_key, cfg.chosen_key, cfg.rejected_key, cfg.text_key
    if _has(d, ik):
        return fmt.prompt_ids(_turns(d[ik], ik, "user"))
    if _has(d, mk):
        msgs = _messages(d, mk)
        if msgs[-1]["role"] == "assistant":  # a conversation used as a prompt source: drop its answer
            msgs = msgs[:-1]
        if not msgs:
            raise ValueError(f"key {mk!r}: the conversation has no message before the assistant's (no prompt)")
        return fmt.prompt_ids(msgs)
    if _has(d, ck) and _has(d, rk):
        chosen = _plain(d[ck])
        if isinstance(chosen, list):
            return fmt.prompt_ids(_message_list(chosen, ck)[:-1])
        return _implicit_pair(fmt.tok, _text(d, ck), _text(d, rk), ck, rk, ik)[0]
    if _has(d, tk):
        raise ValueError(f"a language-modeling row ({tk!r}) has no prompt: set data.input_key={tk} to use the whole "
                         "text as the prompt")
    raise ValueError(f"needs a prompt: {ik!r} (data.input_key) or {mk!r} (data.messages_key); row keys: {_keys(d)}"
                     + _hint(d, ("input_key", "messages_key")))


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
            if not isinstance(row.data, dict):
                raise ValueError(f"expected an object (key -> value), got {type(row.data).__name__}")
            parsed = parse(row.data)
        except ValueError as e:
            _malformed(row.where, str(e), cfg.on_malformed, stats)
            continue
        yield row, parsed


def build_sft_examples(rows: list[Row], tokenizer, cfg, stats: DataStats | None = None):
    """SFT examples ``{"input_ids": prompt + response, "prompt_len": int}``."""
    stats = stats if stats is not None else DataStats()
    fmt = Formatter(tokenizer, cfg.apply_chat_template)
    out = []
    for row, (p_ids, r_ids) in _parsed_rows(rows, cfg, stats, lambda d: _sft_ids(d, fmt, cfg)):
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
        ids = _preference_ids(d, fmt, cfg)
        margin = 0.0
        if cfg.margin_key:
            v = d.get(cfg.margin_key)
            try:  # a number, or a numeric string (CSV cells are text)
                margin = float(v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else None
            except ValueError:
                margin = None
            if margin is None:
                raise ValueError(f"margin key {cfg.margin_key!r} must hold a number (row keys: {_keys(d)})")
        return (*ids, margin)

    out = []
    for row, (pc_ids, rc_ids, pr_ids, rr_ids, margin) in _parsed_rows(rows, cfg, stats, parse):
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
    out = []
    for _, ids in _parsed_rows(rows, cfg, stats, lambda d: _prompt_row_ids(d, fmt, cfg)):
        if len(ids) > cfg.max_prompt_len:
            stats.prompt_truncated += 1
            ids = ids[len(ids) - cfg.max_prompt_len :]
        out.append({"prompt_ids": list(ids)})
        stats.kept += 1
    return out, stats


def load_examples(kind: str, path: str, split: str, tokenizer, cfg, allow_hub: bool = True
                  ) -> tuple[list[dict], DataStats]:
    """Read ``path`` and build examples of ``kind`` in {"sft", "preference", "prompt"}; logs the counts.
    ``allow_hub=False`` refuses an ``hf:NAME`` download (the stage configs already refuse it without
    ``model.allow_hub``)."""
    stats = DataStats()
    rows = read_rows(path, split, cfg.on_malformed, stats, subset=getattr(cfg, "subset", ""),
                     streaming=getattr(cfg, "streaming", False), allow_hub=allow_hub, limit=cfg.max_samples)
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
