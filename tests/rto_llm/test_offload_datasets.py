"""DeepSpeed ZeRO with CPU optimizer offload and bf16 on the SFT stage (one process, CPU, gloo; under ZeRO-3
the model is built partitioned, before the engine exists), and the
Hugging Face ``datasets`` input path (``hf:DIR`` of a dataset saved locally; no network).

Offload: a one-process run with ``deepspeed.offload=true`` (ZeRO-2: optimizer states on the CPU with the
torch AdamW client optimizer, ``zero_force_ds_cpu_optimizer: false``; ZeRO-3: parameters too) matches the
plain-torch run within 1e-5 absolute on every step's loss and on the final weights (float32 sums in another
order). bf16 on CPU: a smoke test (finite losses that fall, moved weights, the first loss within 2% of the
float32 run's: bf16 keeps ~3 significant digits)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from rto_llm.config import SFTConfig, load_config
from rto_llm.distributed import free_port
from tests.rto_llm.lm_helpers import assert_runs_match, read_metrics

STEPS = 4

# The CLI, printing what DeepSpeed was really set up with (the offload / bf16 settings are not just accepted).
_REPORT = (
    "import json, sys, rto_llm.distributed as d\n"
    "init = d.DeepSpeedEngine.__init__\n"
    "def report(self, *a, **k):\n"
    "    built_partitioned = d.is_partitioned(a[0] if a else k['model'])\n"
    "    init(self, *a, **k)\n"
    "    e, o = self.engine, self.engine.optimizer\n"
    "    print('DSREPORT ' + json.dumps({'cpu_offload': bool(e.zero_cpu_offload()),\n"
    "        'offload_param': e.zero_offload_param() is not None, 'bf16': bool(e.bfloat16_enabled()),\n"
    "        'zero_optimizer_offload': bool(getattr(o, 'cpu_offload', False) or getattr(o, 'offload_optimizer', 0)),\n"
    "        'client_optimizer': type(getattr(o, 'optimizer', o)).__name__,\n"
    "        'param_dtype': str(next(self.module.parameters()).dtype), 'built_partitioned': built_partitioned}),\n"
    "        flush=True)\n"
    "d.DeepSpeedEngine.__init__ = report\n"
    "from rto_llm.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _one_process(stage: str, overrides: list[str]) -> dict:
    """The CLI as one process of a one-process launch (the env torchrun would set); DeepSpeed's settings."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    res = subprocess.run([sys.executable, "-c", _REPORT, stage, *overrides], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    lines = [x for x in res.stdout.splitlines() if x.startswith("DSREPORT ")]
    assert len(lines) == 1, res.stdout[-3000:]
    return json.loads(lines[0].removeprefix("DSREPORT "))


def _sft_args(model_dir, data_path, out_dir, *extra) -> list[str]:
    return [f"model.path={model_dir}", f"data.train_path={data_path}", f"train.output_dir={out_dir}",
            "train.batch_size=16", "train.micro_batch_size=4", "train.lr=3e-3", f"train.max_steps={STEPS}",
            "train.device=cpu", "log.progress_bar=false", "log.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def torch_sft_run(tiny_model_dir, toy_data, tmp_path_factory):
    """The plain-torch reference: 4 steps of 4 micro-batches of 4 rows (gradient accumulation)."""
    from rto_llm.trainers.sft import SFTTrainer

    out = tmp_path_factory.mktemp("sft_torch")
    SFTTrainer(load_config(SFTConfig, None, _sft_args(tiny_model_dir, toy_data["sft"], out))).train()
    return out


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_cpu_offload_sft_matches_plain_torch(torch_sft_run, tiny_model_dir, toy_data, tmp_path, zero_stage):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    ds = _one_process("sft", _sft_args(tiny_model_dir, toy_data["sft"], out, "deepspeed.enabled=true",
                                       f"deepspeed.zero_stage={zero_stage}", "deepspeed.offload=true"))
    # DeepSpeed runs its offload path (on a CPU-only machine the states stay in host memory either way)
    assert ds["cpu_offload"] and ds["zero_optimizer_offload"] and ds["client_optimizer"] == "AdamW"
    assert ds["offload_param"] == (zero_stage == 3) and not ds["bf16"]
    assert ds["built_partitioned"] == (zero_stage == 3)     # ZeRO-3: the model is partitioned at load (zero3_init)
    assert_runs_match(torch_sft_run, out, STEPS, tiny_model_dir, grad_norm_rel=1e-4)


def test_deepspeed_bf16_on_cpu_runs(torch_sft_run, tiny_model_dir, toy_data, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "bf16"
    ds = _one_process("sft", _sft_args(tiny_model_dir, toy_data["sft"], out, "deepspeed.enabled=true",
                                       "deepspeed.zero_stage=2", "deepspeed.bf16=true"))
    assert ds["bf16"] and ds["param_dtype"] == "torch.bfloat16" and not ds["cpu_offload"]
    got, ref = read_metrics(out), read_metrics(torch_sft_run)
    losses = [r["train/loss"] for r in got]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0 for r in got)
    assert losses[0] == pytest.approx(ref[0]["train/loss"], rel=0.02)  # the same init, bf16 forward
    assert losses[-1] < losses[0]  # lr 3e-3 on a tiny model: the loss falls within 4 steps
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    final = load_file(os.path.join(out, "final", "model.safetensors"))
    assert max((init[k].float() - final[k].float()).abs().max().item() for k in init) > 1e-3


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets: hf:DIR for a dataset saved with save_to_disk (and DatasetDict splits)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def hf_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("datasets")


def test_hf_saved_sft_dataset_with_key_mapping(hf_offline, tmp_path, tiny_tokenizer):
    from rto_llm.config import DataConfig
    from rto_llm.data import DataError, load_examples
    from rto_llm.testing import toy_sft_rows, write_jsonl

    datasets = hf_offline
    rows = toy_sft_rows(12)
    # the same rows under other key names, as a DatasetDict with a train and a test split
    mapped = {"question": [r["prompt"] for r in rows], "answer": [r["response"] for r in rows]}
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({k: v[:8] for k, v in mapped.items()}),
        "test": datasets.Dataset.from_dict({k: v[8:] for k, v in mapped.items()}),
    })
    dd.save_to_disk(str(tmp_path / "sft_dd"))
    cfg = DataConfig(train_path=f"hf:{tmp_path / 'sft_dd'}", input_key="question", output_key="answer")
    train, stats = load_examples("sft", cfg.train_path, "train", tiny_tokenizer, cfg)
    test, _ = load_examples("sft", cfg.train_path, "test", tiny_tokenizer, cfg)
    ref, _ = load_examples("sft", write_jsonl(str(tmp_path / "ref.jsonl"), rows), "train", tiny_tokenizer,
                           DataConfig(train_path="x"))
    assert stats.rows == stats.kept == 8
    assert train == ref[:8] and test == ref[8:]
    assert all(e["prompt_len"] > 0 and len(e["input_ids"]) > e["prompt_len"] for e in train)
    # a single saved Dataset (no splits); a malformed row names hf:DIR[row]
    bad = {"question": ["1 2", "3"], "answer": ["4", None]}
    datasets.Dataset.from_dict(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[1\]: key 'answer' must be a string"):
        load_examples("sft", f"hf:{tmp_path / 'bad'}", "train", tiny_tokenizer, cfg)
    cfg_skip = DataConfig(train_path="x", input_key="question", output_key="answer", on_malformed="skip")
    exs, st = load_examples("sft", f"hf:{tmp_path / 'bad'}", "train", tiny_tokenizer, cfg_skip)
    assert len(exs) == 1 and st.malformed_skipped == 1


def test_hf_saved_preference_and_chat_datasets(hf_offline, tmp_path, tiny_tokenizer):
    from rto_llm.config import DataConfig
    from rto_llm.data import load_examples
    from rto_llm.testing import toy_preference_rows, write_jsonl

    datasets = hf_offline
    rows = toy_preference_rows(10)
    margins = [0.5 * i for i in range(len(rows))]
    cols = {"q": [r["prompt"] for r in rows], "good": [r["chosen"] for r in rows],
            "bad": [r["rejected"] for r in rows], "m": margins}
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "pref"))
    cfg = DataConfig(train_path="x", input_key="q", chosen_key="good", rejected_key="bad", margin_key="m")
    got, stats = load_examples("preference", f"hf:{tmp_path / 'pref'}", "train", tiny_tokenizer, cfg)
    ref_rows = [{**r, "margin": m} for r, m in zip(rows, margins)]
    ref, _ = load_examples("preference", write_jsonl(str(tmp_path / "ref.jsonl"), ref_rows), "train",
                           tiny_tokenizer, DataConfig(train_path="x", margin_key="margin"))
    assert stats.kept == len(rows) and got == ref
    assert [e["margin"] for e in got] == margins
    assert all(e["chosen_ids"] != e["rejected_ids"] for e in got)
    # message-list pairs (list-of-struct columns in Arrow) under mapped keys
    chat = {
        "pos": [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
                for r in rows],
        "neg": [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]
                for r in rows],
    }
    datasets.Dataset.from_dict(chat).save_to_disk(str(tmp_path / "chat"))
    got_chat, _ = load_examples("preference", f"hf:{tmp_path / 'chat'}", "train", tiny_tokenizer,
                                DataConfig(train_path="x", chosen_key="pos", rejected_key="neg"))
    assert [(e["chosen_ids"], e["rejected_ids"]) for e in got_chat] == [
        (e["chosen_ids"], e["rejected_ids"]) for e in ref
    ]


def test_hf_dataset_trains_sft(hf_offline, tiny_model_dir, tmp_path):
    """The SFT trainer reads hf:DIR end to end (one plain-torch step)."""
    from rto_llm.testing import toy_sft_rows
    from rto_llm.trainers.sft import SFTTrainer

    datasets = hf_offline
    rows = toy_sft_rows(16)
    datasets.Dataset.from_dict({"instruction": [r["prompt"] for r in rows], "output": [r["response"] for r in rows]}
                               ).save_to_disk(str(tmp_path / "ds"))
    cfg = load_config(SFTConfig, None, [
        f"model.path={tiny_model_dir}", f"data.train_path=hf:{tmp_path / 'ds'}", "data.input_key=instruction",
        "data.output_key=output", f"train.output_dir={tmp_path / 'run'}", "train.batch_size=8",
        "train.micro_batch_size=4", "train.max_steps=2", "train.device=cpu", "log.progress_bar=false",
        "log.tensorboard=false", "checkpoint.export_hf=false",
    ])
    tr = SFTTrainer(cfg)
    assert len(tr.train_examples) == 16
    hist = tr.train()
    assert [h["step"] for h in hist] == [1, 2] and all(math.isfinite(h["train/loss"]) for h in hist)


def test_hf_prefix_without_datasets_package_says_how_to_install(monkeypatch):
    from rto_llm.data import DataError, read_rows

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: the import raises ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        read_rows("hf:some/dataset")
