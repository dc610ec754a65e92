import json

import pandas as pd
import pytest

from rto_llm.data import (
    DataError,
    build_preference_examples,
    build_prompt_examples,
    build_sft_examples,
    collate_pairs,
    collate_sft,
    load_examples,
    read_rows,
)
from tests.rto_llm.lm_helpers import data_cfg, write_jsonl

_cfg, _write = data_cfg, write_jsonl


def test_prompt_response_with_chat_template(tmp_path, tiny_tokenizer):
    f = _write(tmp_path / "a.jsonl", [{"prompt": "count up from 1 2", "response": "3 4"}])
    exs, stats = build_sft_examples(read_rows(f), tiny_tokenizer, _cfg())
    tok = tiny_tokenizer
    ids = exs[0]["input_ids"]
    p = exs[0]["prompt_len"]
    assert tok.convert_ids_to_tokens(ids[:p]) == ["<bos>", "<|user|>", "count", "up", "from", "1", "2", "<|assistant|>"]
    assert tok.convert_ids_to_tokens(ids[p:]) == ["3", "4", "<eos>"]  # response ends with exactly one EOS
    assert stats.kept == 1


def test_plain_text_without_template_gets_bos_and_eos(tmp_path, tiny_tokenizer):
    f = _write(tmp_path / "a.jsonl", [{"q": "count 1", "a": "2"}])
    cfg = _cfg(input_key="q", output_key="a", apply_chat_template=False)
    exs, _ = build_sft_examples(read_rows(f), tiny_tokenizer, cfg)
    assert tiny_tokenizer.convert_ids_to_tokens(exs[0]["input_ids"]) == ["<bos>", "count", "1", "2", "<eos>"]
    assert exs[0]["prompt_len"] == 3


def test_messages_and_preference_formats_from_json_and_parquet(tmp_path, tiny_tokenizer):
    msgs = [{"role": "system", "content": "ok"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "1 2"}]
    (tmp_path / "m.json").write_text(json.dumps([{"conv": msgs}]))
    exs, _ = build_sft_examples(read_rows(str(tmp_path / "m.json")), tiny_tokenizer, _cfg(messages_key="conv"))
    toks = tiny_tokenizer.convert_ids_to_tokens(exs[0]["input_ids"])
    assert toks[: exs[0]["prompt_len"]][-1] == "<|assistant|>" and "<|system|>" in toks
    pairs = [{"c": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "1"}],
              "r": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "2 3"}]}]
    pd.DataFrame(pairs).to_parquet(tmp_path / "p.parquet")
    exs, _ = build_preference_examples(read_rows(str(tmp_path / "p.parquet")), tiny_tokenizer,
                                       _cfg(chosen_key="c", rejected_key="r"))
    e = exs[0]
    assert e["chosen_prompt_len"] == e["rejected_prompt_len"]
    assert e["chosen_ids"][: e["chosen_prompt_len"]] == e["rejected_ids"][: e["rejected_prompt_len"]]
    assert tiny_tokenizer.convert_ids_to_tokens(e["rejected_ids"][e["rejected_prompt_len"]:]) == ["2", "3", "<eos>"]
    batch = collate_pairs(exs, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["loss_mask"].sum().item() == 2 + 3


def test_prompt_only_rows(tmp_path, tiny_tokenizer):
    f = _write(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    exs, _ = build_prompt_examples(read_rows(f), tiny_tokenizer, _cfg())
    assert tiny_tokenizer.convert_ids_to_tokens(exs[0]["prompt_ids"])[-1] == "<|assistant|>"


def test_prompt_left_truncated_and_counted(tmp_path, tiny_tokenizer):
    long_prompt = " ".join(["1"] * 30)
    f = _write(tmp_path / "a.jsonl", [{"prompt": long_prompt, "response": "2 3"}, {"prompt": "ok", "response": "4"}])
    exs, stats = build_sft_examples(read_rows(f), tiny_tokenizer, _cfg(max_len=16, max_prompt_len=10))
    assert stats.prompt_truncated == 1 and stats.kept == 2
    e = exs[0]
    assert e["prompt_len"] == 10 and len(e["input_ids"]) == 13
    # the response is intact and the kept prompt is its right end (left truncation)
    assert tiny_tokenizer.convert_ids_to_tokens(e["input_ids"][-3:]) == ["2", "3", "<eos>"]
    assert tiny_tokenizer.convert_ids_to_tokens(e["input_ids"][9]) == "<|assistant|>"


def test_response_that_cannot_fit_is_dropped_and_reported(tmp_path, tiny_tokenizer, caplog):
    f = _write(tmp_path / "a.jsonl", [{"prompt": "ok", "response": " ".join(["5"] * 20)},
                                      {"prompt": "ok", "response": "1"}])
    cfg = _cfg(train_path=f, max_len=12, max_prompt_len=6)
    with caplog.at_level("WARNING"):
        exs, stats = load_examples("sft", f, "train", tiny_tokenizer, cfg)
    assert stats.dropped_response_too_long == 1 and len(exs) == 1
    assert "1 dropped (response does not fit max_len)" in caplog.text
    assert f"{f}:1" in caplog.text  # the offending row is named
    # a preference pair is dropped when either response cannot fit
    g = _write(tmp_path / "b.jsonl", [{"prompt": "ok", "chosen": "1", "rejected": " ".join(["5"] * 20)}])
    exs, stats = build_preference_examples(read_rows(g), tiny_tokenizer, cfg)
    assert exs == [] and stats.dropped_response_too_long == 1


def test_malformed_jsonl_fails_with_file_and_line(tmp_path, tiny_tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "respo\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_rows(str(f))
    rows = [{"prompt": "a", "response": "1"}, {"prompt": "a"}, {"prompt": 3, "response": "1"}]
    g = _write(tmp_path / "keys.jsonl", rows)
    with pytest.raises(DataError, match=r"keys\.jsonl:2: needs 'prompt'\+'response' or 'messages'"):
        build_sft_examples(read_rows(g), tiny_tokenizer, _cfg())
    h = _write(tmp_path / "msg.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(DataError, match=r"msg\.jsonl:1: the last message must have role 'assistant'"):
        build_sft_examples(read_rows(h), tiny_tokenizer, _cfg())


def test_skip_malformed_counts(tmp_path, tiny_tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "response": "1"}\nnot json\n{"prompt": 3, "response": "1"}\n[1]\n'
                 '{"prompt": "b", "response": "2"}\n')
    cfg = _cfg(train_path=str(f), on_malformed="skip")
    exs, stats = load_examples("sft", str(f), "train", tiny_tokenizer, cfg)
    assert len(exs) == 2 and stats.malformed_skipped == 3
    assert "3 malformed skipped" in stats.summary()


def test_missing_file_and_hf_prefix_errors(tmp_path):
    import importlib.util

    with pytest.raises(DataError, match="no such file"):
        read_rows(str(tmp_path / "nope.jsonl"))
    if importlib.util.find_spec("datasets") is None:  # optional package: a clear message, not a crash
        with pytest.raises(DataError, match="pip install datasets"):
            read_rows("hf:some/dataset")


def test_collate_sft_masks_only_response(tiny_tokenizer, tmp_path):
    f = _write(tmp_path / "a.jsonl", [{"prompt": "1", "response": "2 3"}, {"prompt": "1 2 3 4", "response": "5"}])
    exs, _ = build_sft_examples(read_rows(f), tiny_tokenizer, _cfg())
    b = collate_sft(exs, tiny_tokenizer.pad_token_id)
    assert b["loss_mask"].sum(1).tolist() == [3, 2]
    assert (b["input_ids"][b["attention_mask"] == 0] == tiny_tokenizer.pad_token_id).all()
    # the loss mask covers exactly the last tokens of each row (right padding)
    for i, e in enumerate(exs):
        n = len(e["input_ids"])
        assert b["loss_mask"][i, e["prompt_len"] : n].all() and b["loss_mask"][i, :e["prompt_len"]].sum() == 0
