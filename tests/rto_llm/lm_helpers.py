"""Helpers shared by the LLM tests (``tests/rto_llm`` and ``tests/rto_llm/ppo``; import as
``tests.rto_llm.lm_helpers``): log-prob computations that only tests need, written independently of the trainers' own
forward helpers, and the comparison of two training runs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from rto_llm.models import position_ids_from_mask
from rto_sim.core import gather_logprobs

TOL = 1e-5


def response_logprobs(model, input_ids, attention_mask, response_start: int, temperature: float = 1.0):
    """``(B, T - response_start)`` log-probs of ``input_ids[:, response_start:]`` (the PPO layout: left-padded
    prompts of one width, then responses): one full forward pass, position ids from the attention mask,
    next-token alignment, ``log softmax(logits / temperature)``."""
    assert response_start >= 1, "the first response token needs a context token"
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return gather_logprobs(out.logits[:, response_start - 1 : -1], input_ids[:, response_start:], temperature)


@torch.no_grad()
def provider_logprobs(provider, input_ids, attention_mask, response_start: int):
    """``(log pi_ref, log pi_dpo)`` of the response tokens from a ``DPOTokenRewardProvider``; both at T = 1
    (the DPO implicit reward is defined on the unscaled models)."""
    with provider.reference_context():
        ref = response_logprobs(provider.reference, input_ids, attention_mask, response_start)
    dpo_model = provider.reference if provider.adapter else provider.dpo_model  # adapter on: pi_dpo
    return ref, response_logprobs(dpo_model, input_ids, attention_mask, response_start)


def read_metrics(out_dir) -> list[dict]:
    """The rows of ``out_dir/metrics.jsonl``."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_runs_match(ref_dir, got_dir, n_steps: int, init_dir, grad_norm_rel: float | None = None) -> None:
    """Two runs of a stage trainer agree: every step's loss within ``TOL`` (and the gradient norm within
    ``grad_norm_rel`` relative, when given), the exported final weights within ``TOL``; and training moved
    the weights away from ``init_dir`` by far more than ``TOL`` (so the comparison can fail)."""
    ref, got = read_metrics(ref_dir), read_metrics(got_dir)
    assert [r["step"] for r in got] == list(range(1, n_steps + 1))
    for r, g in zip(ref, got):
        assert g["train/loss"] == pytest.approx(r["train/loss"], abs=TOL)
        if grad_norm_rel is not None:
            assert g["train/grad_norm"] == pytest.approx(r["train/grad_norm"], rel=grad_norm_rel)
    a = load_file(os.path.join(ref_dir, "final", "model.safetensors"))
    b = load_file(os.path.join(got_dir, "final", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=TOL, rtol=0)
    init = load_file(os.path.join(init_dir, "model.safetensors"))
    assert max((init[k] - a[k]).abs().max().item() for k in a) > 100 * TOL  # training really moved weights


def data_cfg(**kw):
    """A DataConfig with a placeholder train_path and the given fields."""
    from rto_llm.config import DataConfig

    return DataConfig(**{"train_path": "x", **kw})


def write_jsonl(path, rows) -> str:
    """Write `rows` as JSON lines to `path`; returns the path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
