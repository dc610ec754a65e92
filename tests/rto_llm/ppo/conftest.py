"""Fixtures for the PPO / RTO tests: tiny actor, token-counting reward model, DPO model (full and
LoRA adapter), prompts; all written once per session, CPU only, no network. The helpers shared with
``tests/rto_llm`` are in ``tests.rto_llm.lm_helpers``."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from rto_llm.config import load_config  # noqa: E402
from rto_llm.ppo.config import PPOConfig  # noqa: E402
from rto_llm.testing import ppo_overrides, write_ppo_fixture  # noqa: E402

# One thread: these models are tiny and the test machine is shared; extra threads only spin.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """Paths of the session's tiny models: actor, rm, dpo (full), dpo_adapter, prompts."""
    return write_ppo_fixture(str(tmp_path_factory.mktemp("ppo_fixture")), dpo="both")


@pytest.fixture
def make_trainer(fx, tmp_path):
    """``make_trainer(*overrides, cls=PPOConfig, **sizes)`` -> a PPOTrainer on the tiny fixture."""
    from rto_llm.ppo.trainer import PPOTrainer

    def make(*overrides, cls=PPOConfig, out=None, **sizes):
        cfg = load_config(cls, None, ppo_overrides(fx, str(out or tmp_path / "run"), *overrides, **sizes))
        return PPOTrainer(cfg)

    return make


@pytest.fixture
def prompts(fx):
    """Token ids of the first 8 prompts (chat template applied, as the trainer loads them)."""
    from rto_llm.config import DataConfig
    from rto_llm.data import load_examples
    from rto_llm.models import load_tokenizer

    tok = load_tokenizer(fx["actor"])
    ex, _ = load_examples("prompt", fx["prompts"], "train", tok, DataConfig(train_path=fx["prompts"]))
    return [e["prompt_ids"] for e in ex[:8]]
