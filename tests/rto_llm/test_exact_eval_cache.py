"""The cache of rto_llm.exact_eval: a model whose parameters did not change is not run again over the enumeration,
and every way of changing its parameters (optimizer step, load_state_dict, an in-place write through .data, a
peft adapter switched off) invalidates it."""

from __future__ import annotations

import copy

import pytest
import torch

import rto_llm.exact_eval as ee
from rto_llm.token_task import build_task_model, build_task_tokenizer
from rto_sim.token_task import make_token_task


@pytest.fixture(scope="module")
def setup():
    task = make_token_task(3, 3, 2, structure="last_token", feature_kind="bigram", beta=0.5, seed=1)
    tok = build_task_tokenizer(task)
    return task, tok, build_task_model(task, tok, hidden_size=32, seed=1), build_task_model(task, tok, hidden_size=32,
                                                                                            seed=2)


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = ee.enumerated_logprobs

    def spy(model, *a, **k):
        calls.append(model)
        return real(model, *a, **k)

    monkeypatch.setattr(ee, "enumerated_logprobs", spy)
    ee.clear_cache()
    yield calls
    ee.clear_cache()


def test_unchanged_models_are_served_from_the_cache(setup, counted):
    task, tok, pol, ref = setup
    a = ee.evaluate_policy(pol, ref, task, tokenizer=tok)
    assert len(counted) == 2
    b = ee.evaluate_policy(pol, ref, task, tokenizer=tok)
    assert len(counted) == 2                                   # nothing recomputed
    assert (a.J, a.sub_opt, a.kl) == (b.J, b.sub_opt, b.kl)
    c = ee.evaluate_policy(pol, ref, task, tokenizer=tok, cache=False)
    assert len(counted) == 4 and (c.J, c.kl) == (a.J, a.kl)


def test_every_parameter_change_invalidates_the_cache(setup, counted):
    task, tok, pol0, ref = setup
    pol = copy.deepcopy(pol0)
    first = ee.evaluate_policy(pol, ref, task, tokenizer=tok)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-2)
    loss = pol(input_ids=torch.tensor([[1, 4, 5]])).logits.sum()
    loss.backward()
    opt.step()                                                # optimizer step (foreach / fused in-place updates)
    n = len(counted)
    after_step = ee.evaluate_policy(pol, ref, task, tokenizer=tok)
    assert len(counted) == n + 1 and after_step.kl != first.kl     # the policy was rerun, the reference was not
    assert counted[-1] is pol
    pol.load_state_dict(pol0.state_dict())                     # back to the reference weights
    back = ee.evaluate_policy(pol, ref, task, tokenizer=tok)
    assert len(counted) == n + 2 and back.kl == pytest.approx(first.kl, abs=1e-12)
    with torch.no_grad():
        next(pol.parameters()).data.add_(0.5)                 # .data bypasses the version counter: the sum catches it
    moved = ee.evaluate_policy(pol, ref, task, tokenizer=tok)
    assert len(counted) == n + 3 and moved.kl != back.kl


def test_a_peft_adapter_switched_off_is_another_model(setup, counted):
    peft = pytest.importorskip("peft")
    task, tok, pol0, ref = setup
    model = peft.get_peft_model(copy.deepcopy(pol0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       init_lora_weights=False))
    on = ee.evaluate_policy(model, ref, task, tokenizer=tok)
    with model.disable_adapter():
        off = ee.evaluate_policy(model, ref, task, tokenizer=tok)
    plain = ee.evaluate_policy(pol0, ref, task, tokenizer=tok, cache=False)
    assert off.kl == pytest.approx(plain.kl, abs=1e-9) and on.kl != pytest.approx(off.kl, abs=1e-6)
