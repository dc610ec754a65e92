"""The shipped example configs run: the tiny CPU path (examples/tiny_cpu: a PAD-less Llama-3-style tiny model
through sft -> rm -> dpo -> ppo and rto) and the paper's Llama-3-8B RTO config as shipped (DeepSpeed ZeRO-3,
bf16, hf:openbmb/UltraFeedback-style rows with input_key=instruction) on a tiny Llama-3-shaped model built from
a config, with a local tokenizer (<|begin_of_text|>, <|eot_id|> as EOS, a Llama-3-like chat template, no PAD),
overriding only paths and sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from rto_llm.models import AUTO_PAD_TOKEN, load_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, os.path.join(EXAMPLES, "tiny_cpu"))


def _relocated(config: str, prefix: str, root: str) -> list[str]:
    """Overrides moving every ``prefix/...`` path of a shipped YAML under ``root``."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    return [f"{sec}.{k}={os.path.join(root, v[len(prefix) + 1:])}" for sec, vals in cfg.items() for k, v in vals.items()
            if isinstance(v, str) and v.startswith(prefix + "/")]


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_tiny_cpu_path_runs_all_stages_from_the_shipped_configs(tmp_path):
    """make_tiny.py, then sft, rm, dpo, ppo and rto through the CLI with the shipped YAMLs (paths moved to
    tmp_path; fewer steps than shipped to keep the suite short)."""
    import make_tiny

    from rto_llm.cli import main

    root = str(tmp_path / "tiny")
    make_tiny.make(root, n=64)
    assert load_tokenizer(os.path.join(root, "base")).pad_token is None  # Llama-3 style: no PAD
    fewer = {"sft": ["train.max_steps=6"], "rm": ["train.max_steps=6"], "dpo": ["train.max_steps=4"],
             "ppo": ["ppo.max_rollouts=2"], "rto": ["ppo.max_rollouts=2"]}
    for stage, extra in fewer.items():
        config = os.path.join(EXAMPLES, "tiny_cpu", f"{stage}.yaml")
        assert main([stage, "--config", config, *_relocated(config, "runs/tiny", root), "log.progress_bar=false",
                     *extra]) == 0, stage
        rows = _metrics(os.path.join(root, stage))
        assert len(rows) == int(extra[0].split("=")[1]), stage
        tok = load_tokenizer(os.path.join(root, stage, "final"))
        assert tok.pad_token == AUTO_PAD_TOKEN and tok.pad_token != tok.eos_token, stage
    sft = _metrics(os.path.join(root, "sft"))
    assert sft[-1]["train/loss"] < sft[0]["train/loss"]
    rto = _metrics(os.path.join(root, "rto"))
    assert rto[0]["objective/kl"] == 0.0 and "rto/dpo_reward_token_mean" in rto[0]


@pytest.fixture(scope="module")
def llama3_fixture(tmp_path_factory):
    """PAD-less Llama-3-style actor (= SFT model and reference), token-counting RM, full DPO model; prompts in
    the UltraFeedback layout (instruction, models, completions, ...)."""
    from rto_llm.testing import toy_sft_rows, write_jsonl, write_ppo_fixture

    root = tmp_path_factory.mktemp("llama3")
    fx = write_ppo_fixture(str(root), dpo="full", llama3_style=True)
    rows = [{"source": "toy", "instruction": r["prompt"], "models": ["a", "b"],
             "completions": [{"response": r["response"], "overall_score": 5.0}], "correct_answers": [],
             "incorrect_answers": []} for r in toy_sft_rows(16, seed=3)]
    fx["ultrafeedback"] = write_jsonl(str(root / "ultrafeedback.jsonl"), rows)
    return fx


def test_llama3_8b_ultrafeedback_rto_config_runs_as_shipped(llama3_fixture, tmp_path):
    pytest.importorskip("deepspeed")
    fx = llama3_fixture
    config = os.path.join(EXAMPLES, "llama3_8b_ultrafeedback_rto.yaml")
    paths = [f"model.path={fx['actor']}", f"reward.path={fx['rm']}", f"rto.dpo_path={fx['dpo']}",
             f"data.train_path={fx['ultrafeedback']}", f"train.output_dir={tmp_path / 'run'}"]
    sizes = ["data.max_prompt_len=48", "data.max_len=64", "train.batch_size=4", "train.micro_batch_size=2",
             "rollout.batch_size=8", "rollout.generation_batch_size=8", "rollout.forward_batch_size=8",
             "rollout.max_new_tokens=8", "ppo.max_rollouts=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-m", "rto_llm.cli", "rto", "--config", config, *paths, *sizes,
                          "log.progress_bar=false"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    rows = _metrics(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # actor == reference, same PAD rows
    tok = load_tokenizer(str(tmp_path / "run" / "final"))
    assert tok.pad_token == AUTO_PAD_TOKEN and tok.eos_token == "<|eot_id|>"
    with open(tmp_path / "run" / "final" / "config.json") as f:
        hf = json.load(f)
    assert hf["pad_token_id"] == tok.pad_token_id and hf["vocab_size"] == len(tok)
