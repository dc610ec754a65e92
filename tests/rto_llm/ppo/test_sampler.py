"""The rollout sampler (``experience.sample_responses``) on the installed transformers: every decoding path
(dynamic KV cache, static KV cache, the static path asked to compile on CPU, a LoRA-wrapped actor, the
pre-5.x ``past_key_values`` argument name) draws the same tokens with the same log-probs as a reference
sampler without any cache that recomputes the full forward pass at every step (docs/practice.md
invariants 3 and 4: recomputable log-probs, pure sampling), and none of them uses a deprecated argument."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from rto_llm.data import pad_sequences
from rto_llm.models import position_ids_from_mask
from rto_llm.ppo import experience
from rto_llm.ppo.experience import KVDecoder, sample_responses
from rto_llm.testing import build_tiny_llama, build_tiny_tokenizer

SEED, T, MAX_NEW = 3, 0.8, 12


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_llama(tok, hidden_size=32, seed=1).eval()


@pytest.fixture(scope="module")
def prompts(tok):
    rng = torch.Generator().manual_seed(0)
    lengths = [1, 2, 3, 5, 7, 9, 4, 6, 2, 8, 3, 5]  # uneven: left padding of 0 to 8 columns
    return [[tok.bos_token_id] + torch.randint(4, len(tok), (n,), generator=rng).tolist() for n in lengths]


@pytest.fixture(autouse=True)
def _fresh_log_once():
    experience._logged_once.clear()


@torch.no_grad()
def reference_sample(model, prompts, pad_id, eos_id, max_new_tokens, temperature):
    """No cache: the full forward pass over prompt + response so far at every step, same random draws."""
    seq, am = pad_sequences(prompts, pad_id, left=True)
    finished = torch.zeros(seq.shape[0], dtype=torch.bool)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=seq, attention_mask=am, position_ids=position_ids_from_mask(am),
                       use_cache=False).logits[:, -1]
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        tok = torch.multinomial(logp.exp(), 1).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        lp = torch.where(finished, torch.zeros_like(logp[:, 0]), logp.gather(-1, tok[:, None]).squeeze(-1))
        tokens.append(tok)
        logps.append(lp)
        am = torch.cat([am, (~finished).long()[:, None]], 1)
        seq = torch.cat([seq, tok[:, None]], 1)
        finished |= tok == eos_id
        if finished.all():
            break
    return torch.stack(tokens, 1), torch.stack(logps, 1)


def _sample(model, tok, prompts, **kw):
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated argument (past_key_values in 5.x)
        warnings.filterwarnings("error", message=".*(past_key_values|cache).*")
        _, _, resp, lp = sample_responses(model, prompts, tok.pad_token_id, tok.eos_token_id, MAX_NEW, T, **kw)
    return resp, lp


@pytest.fixture(scope="module")
def reference(model, tok, prompts):
    torch.manual_seed(SEED)
    resp, lp = reference_sample(model, prompts, tok.pad_token_id, tok.eos_token_id, MAX_NEW, T)
    finished_early = (resp == tok.eos_token_id).any(1) & (resp[:, -1] == tok.pad_token_id)
    assert finished_early.any() and not finished_early.all()  # the test covers finished and running rows
    return resp, lp


def _assert_same(got, ref):
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=2e-5, rtol=0)


def test_dynamic_cache_matches_the_no_cache_reference(model, tok, prompts, reference):
    _assert_same(_sample(model, tok, prompts), reference)


def test_decoder_uses_the_cache_argument_of_the_installed_transformers(model):
    import inspect

    dec = KVDecoder(model, 2, 8)
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert dec.cache_kw == expected and not dec.static
    from transformers import DynamicCache

    assert isinstance(dec.cache, DynamicCache)


def test_static_cache_matches_dynamic_and_reference(model, tok, prompts, reference, caplog):
    pytest.importorskip("transformers", minversion="4.46")
    dec = KVDecoder(model, len(prompts), 20, static=True)
    assert dec.static, "the tiny Llama supports a static cache on this transformers"
    assert dec.max_len == KVDecoder.STATIC_BUCKET  # lengths are bucketed: other prompt widths reuse shapes
    with caplog.at_level(logging.WARNING, logger="rto_llm"):
        first = _sample(model, tok, prompts, static_cache=True)
        second = _sample(model, tok, prompts[:5], static_cache=True)
    _assert_same(first, reference)
    torch.manual_seed(SEED)
    _assert_same(second, reference_sample(model, prompts[:5], tok.pad_token_id, tok.eos_token_id, MAX_NEW, T))
    assert not caplog.records
    assert getattr(model, "_rto_static_cache", None) is None  # without compile the cache is not kept


def test_compile_off_cuda_falls_back_with_one_log_line(model, tok, prompts, reference, caplog):
    with caplog.at_level(logging.WARNING, logger="rto_llm"):
        got = _sample(model, tok, prompts, static_cache=True, compile=True)
        held = model._rto_static_cache[1]  # kept for CUDA-graph reuse (here: compile fell back)
        again = _sample(model, tok, prompts, compile=True)  # the held cache is reset and reused
        assert model._rto_static_cache[1] is held
        _sample(model, tok, prompts[:5], compile=True)  # another batch size: a new cache replaces it
        assert model._rto_static_cache[1] is not held
    _assert_same(got, reference)
    _assert_same(again, reference)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "rollout.compile" in lines[0] and "CUDA" in lines[0]
    model._rto_static_cache = None


def test_model_without_static_cache_support_falls_back(tok, prompts, reference, caplog):
    plain = build_tiny_llama(tok, hidden_size=32, seed=1).eval()
    plain._can_compile_fullgraph = False
    plain._supports_static_cache = False
    with caplog.at_level(logging.WARNING, logger="rto_llm"):
        got = _sample(plain, tok, prompts, static_cache=True)
        _sample(plain, tok, prompts, static_cache=True)
    _assert_same(got, reference)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "does not support a static cache" in lines[0]


def test_lora_wrapped_actor_samples_alike_on_both_caches(tok, prompts):
    peft = pytest.importorskip("peft")
    base = build_tiny_llama(tok, hidden_size=32, seed=2)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    lora = peft.get_peft_model(base, lcfg).eval()
    torch.manual_seed(SEED)
    ref = reference_sample(lora, prompts, tok.pad_token_id, tok.eos_token_id, MAX_NEW, T)
    _assert_same(_sample(lora, tok, prompts), ref)
    _assert_same(_sample(lora, tok, prompts, static_cache=True), ref)


class _OldStyleLM(torch.nn.Module):
    """A causal LM whose forward still calls the cache ``past_key_values`` (transformers < 5)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **{_cache_name(self.inner): past_key_values}, use_cache=use_cache)


def _cache_name(m) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"


def test_pre_5x_argument_name_is_detected(model, tok, prompts, reference):
    old = _OldStyleLM(model).eval()
    assert KVDecoder(old, 2, 8).cache_kw == "past_key_values"
    _assert_same(_sample(old, tok, prompts), reference)


def test_generate_passes_the_rollout_options(model, tok, prompts, monkeypatch):
    from rto_llm.ppo.config import RolloutOptions

    seen = []
    real = experience.sample_responses

    def spy(*a, **k):
        seen.append(a[6:])
        return real(*a, **k)

    monkeypatch.setattr(experience, "sample_responses", spy)
    ropts = RolloutOptions(generation_batch_size=5, max_new_tokens=4)
    for name, value in (("static_cache", True), ("compile", False)):
        if hasattr(ropts, name):
            setattr(ropts, name, value)
    experience.generate(model, prompts, ropts, tok.pad_token_id, tok.eos_token_id)
    assert len(seen) == 3 and all(s == (getattr(ropts, "static_cache", False), False) for s in seen)


@pytest.mark.slow
def test_compiled_decoding_samples_alike(tok, prompts, request, monkeypatch):
    """The torch.compile path itself (inductor on CPU, ~1 min to compile; CUDA graphs need a GPU: see
    benchmarks/gpu_check.py): same tokens and log-probs as the no-cache reference, graphs reused."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: run with -m slow")
    monkeypatch.setattr(KVDecoder, "allow_cpu_compile", True)
    m = build_tiny_llama(tok, hidden_size=32, seed=1).eval()
    torch.manual_seed(SEED)
    ref = reference_sample(m, prompts, tok.pad_token_id, tok.eos_token_id, MAX_NEW, T)
    _assert_same(_sample(m, tok, prompts, compile=True), ref)
    assert m._rto_compiled_forward is not None and not experience._logged_once  # compiled, no fallback
    _assert_same(_sample(m, tok, prompts, compile=True), ref)


def test_bf16_and_sdpa_reach_generation(make_trainer, monkeypatch):
    """model.dtype and model.attn_implementation are what the trainer's sampler decodes with."""
    seen = []

    class Spy(KVDecoder):
        def __init__(self, model, *a, **k):
            seen.append((next(model.parameters()).dtype, model.config._attn_implementation))
            super().__init__(model, *a, **k)

    monkeypatch.setattr(experience, "KVDecoder", Spy)
    tr = make_trainer("model.dtype=bfloat16", "model.attn_implementation=sdpa", "rollout.static_cache=true")
    exp, _ = tr.make_experience(tr.rollout_prompts(0))
    assert seen and all(s == (torch.bfloat16, "sdpa") for s in seen)
    assert exp.sample_logprobs.dtype == torch.float32 and bool(torch.isfinite(exp.sample_logprobs).all())
