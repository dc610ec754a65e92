"""Shared offline fixtures: a tiny word-level tokenizer, a tiny Llama saved to disk, toy datasets.

Session-scoped so every test (and the later PPO / RTO tests) reuses one model directory.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rto_llm.config import load_config  # noqa: E402
from rto_llm.testing import (  # noqa: E402
    build_tiny_llama,
    build_tiny_tokenizer,
    save_tiny_model,
    toy_preference_rows,
    toy_sft_rows,
    write_jsonl,
)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """A fresh-per-session tiny Llama in eval mode (do not train it in place: copy it)."""
    return build_tiny_llama(tiny_tokenizer).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory with a tiny Llama (hidden 64, 2 layers) and its tokenizer in Hugging Face format."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """JSONL files: ``sft`` (prompt/response) and ``pref`` (prompt/chosen/rejected), 128 rows each."""
    d = tmp_path_factory.mktemp("toy_data")
    return {
        "sft": write_jsonl(str(d / "sft.jsonl"), toy_sft_rows(128)),
        "pref": write_jsonl(str(d / "pref.jsonl"), toy_preference_rows(128)),
    }


@pytest.fixture
def make_cfg(tiny_model_dir, toy_data, tmp_path):
    """``make_cfg(cls, *overrides)``: a stage config on the tiny model and toy data, quiet and offline."""

    def make(cls, *overrides, data="sft"):
        base = [
            f"model.path={tiny_model_dir}",
            f"data.train_path={toy_data[data]}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.batch_size=16",
            "train.micro_batch_size=8",
            "train.device=cpu",
            "log.progress_bar=false",
            "log.tensorboard=false",
        ]
        return load_config(cls, None, base + list(overrides))

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (real pretrained weights) run only when selected, e.g. ``pytest -m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if "slow" in item.keywords and str(item.path).startswith(here):
            item.add_marker(skip)
