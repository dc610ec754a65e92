"""Every TRL dataset type (standard and conversational: language modeling, prompt-only, prompt-completion,
preference with explicit and implicit prompt), the readers (JSONL line by line, JSON, Parquet / CSV through
``datasets.load_dataset(data_files=...)``, local dataset repositories with subsets and streaming, hub downloads
refused without ``model.allow_hub``) and the one-line errors that name the keys found and the options to set."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from rto_llm.config import ConfigError, SFTConfig, load_config
from rto_llm.data import (
    DataError,
    build_preference_examples,
    build_prompt_examples,
    build_sft_examples,
    load_examples,
    read_rows,
)
from rto_llm.testing import build_llama3_style_tokenizer
from tests.rto_llm.lm_helpers import data_cfg, write_jsonl

_cfg, _write = data_cfg, write_jsonl


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok3():
    """Llama-3-style tokenizer (no PAD needed for data building) with a Llama-3-like chat template."""
    return build_llama3_style_tokenizer()


def _toks(tok, ids):
    return tok.convert_ids_to_tokens(ids)


HEADER_A = ["<|start_header_id|>", "assistant", "<|end_header_id|>"]


# ---------------------------------------------------------------------------------------------------
# SFT: language modeling, prompt-completion (standard and conversational), conversational LM
# ---------------------------------------------------------------------------------------------------


def test_sft_formats_give_the_same_example(tmp_path, tok3):
    """prompt/response, prompt/completion (text and messages), mixed text/messages and {"messages"} are one
    conversation: the same tokens and the same prompt/response boundary."""
    rows = [
        {"prompt": "count up from 1 2", "response": "3 4"},
        {"prompt": "count up from 1 2", "completion": "3 4"},
        {"prompt": [_u("count up from 1 2")], "completion": [_a("3 4")]},
        {"prompt": [_u("count up from 1 2")], "completion": "3 4"},
        {"prompt": "count up from 1 2", "completion": [_a("3 4")]},
        {"messages": [_u("count up from 1 2"), _a("3 4")]},
    ]
    exs, stats = build_sft_examples(read_rows(_write(tmp_path / "a.jsonl", rows)), tok3, _cfg())
    assert stats.kept == len(rows)
    assert all(e == exs[0] for e in exs)
    e = exs[0]
    toks = _toks(tok3, e["input_ids"])
    assert toks[: e["prompt_len"]][-3:] == HEADER_A
    assert toks[e["prompt_len"]:] == ["3", "4", "<|eot_id|>"]  # the response ends with exactly one EOS


def test_sft_language_modeling_text(tmp_path, tok3):
    """{"text"}: raw text (no chat template); the first token (BOS) is the context, every later token is
    learned and EOS is appended."""
    f = _write(tmp_path / "lm.jsonl", [{"text": "count up from 1 2 3"}, {"body": "1 2"}])
    exs, _ = build_sft_examples(read_rows(f), tok3, _cfg(max_samples=1))
    e = exs[0]
    assert _toks(tok3, e["input_ids"]) == ["<|begin_of_text|>", "count", "up", "from", "1", "2", "3", "<|eot_id|>"]
    assert e["prompt_len"] == 1
    exs, _ = build_sft_examples(read_rows(f)[1:], tok3, _cfg(text_key="body"))
    assert _toks(tok3, exs[0]["input_ids"]) == ["<|begin_of_text|>", "1", "2", "<|eot_id|>"]


def test_sft_key_mapping_and_errors_name_keys_and_options(tmp_path, tok3):
    f = _write(tmp_path / "ins.jsonl", [{"instruction": "count 1", "output": "2"}])
    with pytest.raises(DataError, match=r"ins\.jsonl:1: needs 'prompt'\+'response' or 'messages' .*row keys: "
                                        r"\['instruction', 'output'\]; set data\.input_key=instruction or "
                                        r"data\.output_key=output if that key holds it"):
        build_sft_examples(read_rows(f), tok3, _cfg())
    exs, _ = build_sft_examples(read_rows(f), tok3, _cfg(input_key="instruction", output_key="output"))
    assert _toks(tok3, exs[0]["input_ids"])[exs[0]["prompt_len"]:] == ["2", "<|eot_id|>"]
    # a conversation of one user message: no response
    g = _write(tmp_path / "one.jsonl", [{"messages": [_u("hi")]}])
    with pytest.raises(DataError, match=r"one\.jsonl:1: the last message must have role 'assistant'"):
        build_sft_examples(read_rows(g), tok3, _cfg())
    # an assistant message alone: no prompt (was: "Cannot apply chat template to an empty conversation")
    h = _write(tmp_path / "lone.jsonl", [{"messages": [_a("hi")]}])
    with pytest.raises(DataError, match=r"lone\.jsonl:1: the conversation has no message before the assistant"):
        build_sft_examples(read_rows(h), tok3, _cfg())
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": [{"role": "user"}], "completion": "1"}])
    with pytest.raises(DataError, match=r"key 'prompt': every message needs string 'role' and 'content'"):
        build_sft_examples(read_rows(bad), tok3, _cfg())


# ---------------------------------------------------------------------------------------------------
# Preference: explicit and implicit prompt, standard and conversational
# ---------------------------------------------------------------------------------------------------


def test_preference_conversational_explicit_prompt(tmp_path, tok3):
    """TRL's conversational preference: "prompt" messages, "chosen"/"rejected" assistant-only messages (it used
    to fail with "Cannot apply chat template to an empty conversation"); equal to the standard row and to the
    implicit-prompt conversational row, and to a whole conversation next to a "prompt" key (ultrafeedback_
    binarized style: the conversation wins)."""
    rows = [
        {"prompt": [_u("count up from 1 2")], "chosen": [_a("3 4")], "rejected": [_a("4 3 wrong")]},
        {"prompt": "count up from 1 2", "chosen": "3 4", "rejected": "4 3 wrong"},
        {"chosen": [_u("count up from 1 2"), _a("3 4")], "rejected": [_u("count up from 1 2"), _a("4 3 wrong")]},
        {"prompt": "count up from 1 2", "chosen": [_u("count up from 1 2"), _a("3 4")],
         "rejected": [_u("count up from 1 2"), _a("4 3 wrong")]},
    ]
    exs, stats = build_preference_examples(read_rows(_write(tmp_path / "p.jsonl", rows)), tok3, _cfg())
    assert stats.kept == 4 and all(e == exs[0] for e in exs)
    e = exs[0]
    assert e["chosen_prompt_len"] == e["rejected_prompt_len"]
    assert _toks(tok3, e["chosen_ids"])[: e["chosen_prompt_len"]][-3:] == HEADER_A
    assert _toks(tok3, e["rejected_ids"])[e["rejected_prompt_len"]:] == ["4", "3", "wrong", "<|eot_id|>"]


def test_preference_standard_implicit_prompt(tmp_path, tok3):
    """{"chosen": text, "rejected": text}: raw text, the prompt is the longest common token prefix."""
    f = _write(tmp_path / "i.jsonl", [{"chosen": "count up from 1 2 3 4", "rejected": "count up from 1 2 4 3 wrong"}])
    exs, _ = build_preference_examples(read_rows(f), tok3, _cfg())
    e = exs[0]
    assert _toks(tok3, e["chosen_ids"][: e["chosen_prompt_len"]]) == ["<|begin_of_text|>", "count", "up", "from",
                                                                      "1", "2"]
    assert _toks(tok3, e["chosen_ids"][e["chosen_prompt_len"]:]) == ["3", "4", "<|eot_id|>"]
    assert _toks(tok3, e["rejected_ids"][e["rejected_prompt_len"]:]) == ["4", "3", "wrong", "<|eot_id|>"]
    g = _write(tmp_path / "pre.jsonl", [{"chosen": "count 1 2", "rejected": "count 1 2 3"}])
    with pytest.raises(DataError, match=r"pre\.jsonl:1: implicit prompt: one of 'chosen' / 'rejected' is a prefix"):
        build_preference_examples(read_rows(g), tok3, _cfg())


def test_preference_errors_name_keys_and_options(tmp_path, tok3):
    f = _write(tmp_path / "k.jsonl", [{"question": "1", "preferred": "2", "dispreferred": "3"}])
    with pytest.raises(DataError, match=r"k\.jsonl:1: needs 'chosen' and 'rejected' \(data\.chosen_key, "
                                        r"data\.rejected_key\).*row keys: \['dispreferred', 'preferred', 'question'\]"
                                        r"; set data\.chosen_key=preferred or data\.rejected_key=dispreferred or "
                                        r"data\.input_key=question"):
        build_preference_examples(read_rows(f), tok3, _cfg())
    exs, _ = build_preference_examples(read_rows(f), tok3,
                                       _cfg(input_key="question", chosen_key="preferred", rejected_key="dispreferred"))
    assert len(exs) == 1
    g = _write(tmp_path / "kto.jsonl", [{"prompt": "1", "completion": "2", "label": True}])
    with pytest.raises(DataError, match="unpaired preference rows .* are not supported"):
        build_preference_examples(read_rows(g), tok3, _cfg())
    h = _write(tmp_path / "mix.jsonl", [{"prompt": "1", "chosen": "2", "rejected": [_a("3")]}])
    with pytest.raises(DataError, match="must both be text or both be message lists"):
        build_preference_examples(read_rows(h), tok3, _cfg())


# ---------------------------------------------------------------------------------------------------
# Prompt-only (PPO / RTO), from every row type that has a prompt
# ---------------------------------------------------------------------------------------------------


def test_prompt_rows_from_every_type(tmp_path, tok3):
    rows = [
        {"prompt": "count up from 1 2"},
        {"prompt": [_u("count up from 1 2")]},
        {"prompt": "count up from 1 2", "completion": "3 4"},
        {"messages": [_u("count up from 1 2"), _a("3 4")]},  # a conversation: its answer is dropped
        {"chosen": [_u("count up from 1 2"), _a("3 4")], "rejected": [_u("count up from 1 2"), _a("4")]},
        {"prompt": [_u("count up from 1 2")], "chosen": [_a("3 4")], "rejected": [_a("4")]},
    ]
    exs, stats = build_prompt_examples(read_rows(_write(tmp_path / "p.jsonl", rows)), tok3, _cfg())
    assert stats.kept == len(rows) and all(e == exs[0] for e in exs)
    toks = _toks(tok3, exs[0]["prompt_ids"])
    assert toks[0] == "<|begin_of_text|>" and toks[-3:] == HEADER_A


def test_prompt_errors_name_keys_and_options(tmp_path, tok3):
    """{"instruction": ...} (UltraFeedback) used to fail with "missing key 'messages'" and no hint."""
    f = _write(tmp_path / "uf.jsonl", [{"instruction": "count 1", "models": ["a"], "source": "x"}])
    with pytest.raises(DataError, match=r"uf\.jsonl:1: needs a prompt: 'prompt' \(data\.input_key\) or 'messages' "
                                        r"\(data\.messages_key\); row keys: \['instruction', 'models', 'source'\]; "
                                        r"set data\.input_key=instruction if that key holds it"):
        build_prompt_examples(read_rows(f), tok3, _cfg())
    assert len(build_prompt_examples(read_rows(f), tok3, _cfg(input_key="instruction"))[0]) == 1
    g = _write(tmp_path / "lm.jsonl", [{"text": "count 1"}])
    with pytest.raises(DataError, match="has no prompt: set data.input_key=text"):
        build_prompt_examples(read_rows(g), tok3, _cfg())


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------


def test_jsonl_decoded_line_by_line_bad_lines_name_file_and_line(tmp_path, tok3):
    f = tmp_path / "mixed.jsonl"
    good = json.dumps({"prompt": "count 1", "response": "2"}).encode()
    f.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\n" + b'{"prompt": "\xff\xfe", "response": "2"}\n' + b"{nope\n"
                  + b"[1, 2]\n" + good + b"\n")
    lines = f.read_bytes().split(b"\n")
    for line, reason in ((3, r"not valid UTF-8 \(byte 0xff at column 13\)"), (4, "invalid JSON"),
                         (5, "invalid JSON row: expected an object, got list")):
        g = tmp_path / f"only{line}.jsonl"
        g.write_bytes(b"\n".join(lines[:2] + [b""] * (line - 3) + [lines[line - 1]]) + b"\n")
        with pytest.raises(DataError, match=rf"only{line}\.jsonl:{line}: {reason}"):
            read_rows(str(g))
    cfg = _cfg(train_path=str(f), on_malformed="skip")
    exs, stats = load_examples("sft", str(f), "train", tok3, cfg)
    assert len(exs) == 2 and stats.malformed_skipped == 3  # BOM and CRLF are fine; 3 bad lines skipped
    assert [r.where.rsplit(":", 1)[1] for r in read_rows(str(f), on_malformed="skip")] == ["1", "6"]


def test_json_keeps_date_like_strings_and_reports_line_and_column(tmp_path, tok3):
    """.json is parsed by the json module: a date-like prompt stays a string (pyarrow's JSON reader would make
    it a timestamp), and a syntax error names line and column."""
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"prompt": "2024-01-01", "response": "1"}]}))
    exs, _ = build_sft_examples(read_rows(str(tmp_path / "d.json")), tok3, _cfg(apply_chat_template=False))
    assert len(exs) == 1
    (tmp_path / "bad.json").write_text('[{"prompt": "a",\n  "response": }]')
    with pytest.raises(DataError, match=r"bad\.json:2:15: invalid JSON"):
        read_rows(str(tmp_path / "bad.json"))


def test_parquet_and_csv_through_load_dataset(tmp_path, tok3, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    rows = [{"prompt": [_u("count up from 1 2")], "chosen": [_a("3 4")], "rejected": [_a("4")]}]
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    exs, _ = build_preference_examples(read_rows(str(tmp_path / "p.parquet")), tok3, _cfg())
    ref, _ = build_preference_examples(read_rows(_write(tmp_path / "p.jsonl", rows)), tok3, _cfg())
    assert exs == ref
    pd.DataFrame([{"prompt": "count 1", "completion": "2"}]).to_csv(tmp_path / "c.csv", index=False)
    rows_csv = read_rows(str(tmp_path / "c.csv"))
    assert rows_csv[0].data == {"prompt": "count 1", "completion": "2"} and rows_csv[0].where.endswith("c.csv[0]")
    assert [c[0][0] for c in calls] == ["parquet", "csv"]
    assert all("data_files" in c[1] for c in calls)


def test_local_dataset_repository_with_subsets_and_streaming(tmp_path, tok3, monkeypatch):
    """hf:DIR of a dataset repository (README configs): data.subset picks the subset, data.streaming streams
    it, data.max_samples reads only the first rows; an unknown subset is one line naming it."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "repo"
    (repo / "prefs").mkdir(parents=True)
    (repo / "prompts").mkdir()
    _write(repo / "prefs" / "train.jsonl",
           [{"prompt": f"count {i}", "chosen": str(i + 1), "rejected": "wrong"} for i in range(6)])
    _write(repo / "prompts" / "train.jsonl", [{"prompt": [_u(f"count {i}")]} for i in range(5)])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: prefs\n  data_files:\n  - split: train\n    path: prefs/*.jsonl\n"
        "- config_name: prompts\n  data_files:\n  - split: train\n    path: prompts/*.jsonl\n---\n"
    )
    path = f"hf:{repo}"
    exs, _ = load_examples("preference", path, "train", tok3, _cfg(subset="prefs"))
    assert len(exs) == 6
    exs, stats = load_examples("prompt", path, "train", tok3, _cfg(subset="prompts", streaming=True, max_samples=3))
    assert len(exs) == 3 and stats.rows == 3
    with pytest.raises(DataError, match=r"data\.subset='nope'"):
        read_rows(path, subset="nope")


def test_hub_download_needs_allow_hub(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train_path='hf:openbmb/UltraFeedback' downloads a Hugging Face "
                                          r"dataset: set model\.allow_hub=true"):
        load_config(SFTConfig, None, ["model.path=m", "data.train_path=hf:openbmb/UltraFeedback"])
    cfg = load_config(SFTConfig, None, ["model.path=m", "data.train_path=hf:openbmb/UltraFeedback",
                                        "model.allow_hub=true", "data.subset=default", "data.streaming=true"])
    assert cfg.data.subset == "default" and cfg.data.streaming
    load_config(SFTConfig, None, ["model.path=m", f"data.train_path=hf:{tmp_path}"])  # a local directory
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="needs model.allow_hub=true"):
        read_rows("hf:openbmb/UltraFeedback", allow_hub=False)
