import copy
import json
import os

import pytest
import torch

from rto_llm.config import ModelConfig
from rto_llm.models import (
    DPOTokenRewardProvider,
    TokenizerMismatchError,
    apply_lora,
    check_tokenizers,
    forward_logprobs,
    freeze,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    prepare_trainable,
    reward_stats,
    sequence_scores,
    set_reward_stats,
    token_values,
)
from rto_llm.testing import build_tiny_llama, build_tiny_tokenizer
from tests.rto_llm.lm_helpers import provider_logprobs, response_logprobs


def _batch(tok, texts, left=False, extra=0):
    seqs = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, seqs)) + extra
    ids = torch.full((len(seqs), T), tok.pad_token_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def test_pad_equal_eos_is_refused():
    with pytest.raises(TokenizerMismatchError, match="PAD == EOS"):
        check_tokenizers({"policy": build_tiny_tokenizer(pad_token="<eos>")})


def test_mismatched_vocab_is_refused(tiny_tokenizer):
    other = build_tiny_tokenizer(extra_words=("extra",))
    with pytest.raises(TokenizerMismatchError, match=r"'policy' and 'reward' differ.*only in reward: \['extra'\]"):
        check_tokenizers({"policy": tiny_tokenizer, "reward": other})
    check_tokenizers({"policy": tiny_tokenizer, "reference": build_tiny_tokenizer()})  # same: accepted


def test_embedding_smaller_than_vocab_is_refused(tiny_tokenizer):
    small = build_tiny_llama(tiny_tokenizer, vocab_size=10)
    with pytest.raises(TokenizerMismatchError, match="10 embeddings"):
        check_tokenizers({"policy": tiny_tokenizer}, {"policy": small})


def _tiny_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_does_not_change_logprobs(arch, tiny_llama, tiny_tokenizer):
    """0 vs 10 extra left pads (PPO layout: prompt left-padded, response starts at a fixed column)."""
    tok = tiny_tokenizer
    model = tiny_llama if arch == "llama" else _tiny_gpt2(tok)
    ids0, m0 = _batch(tok, ["count up from 1 2 3 4 5 6", "count 7 8"], left=True)
    ids1, m1 = _batch(tok, ["count up from 1 2 3 4 5 6", "count 7 8"], left=True, extra=10)
    resp = 2  # the last two tokens of each row are the "response"
    lp0 = response_logprobs(model, ids0, m0, ids0.shape[1] - resp)
    lp1 = response_logprobs(model, ids1, m1, ids1.shape[1] - resp)
    assert lp0.shape == (2, resp)
    torch.testing.assert_close(lp0, lp1, atol=1e-5, rtol=0)
    if arch == "gpt2":
        # absolute position embeddings: without position ids from the mask, left pads shift positions
        out = model(input_ids=ids1, attention_mask=m1).logits[:, -resp - 1 : -1]
        naive = torch.log_softmax(out, -1).gather(-1, ids1[:, -resp:, None]).squeeze(-1)
        assert (naive - lp0).abs().max() > 1e-3


def test_logprobs_match_teacher_forced_nll(tiny_llama, tiny_tokenizer):
    ids, mask = _batch(tiny_tokenizer, ["count up from 1 2 3"])
    start = 4
    labels = ids.clone()
    labels[:, :start] = -100
    nll = tiny_llama(input_ids=ids, attention_mask=mask, labels=labels).loss
    lp = response_logprobs(tiny_llama, ids, mask, start)
    torch.testing.assert_close(-lp.mean(), nll, atol=1e-6, rtol=0)
    # the (B, T) layout with a response mask gives the same numbers, zero elsewhere
    rmask = torch.zeros_like(mask)
    rmask[:, start:] = 1
    full = forward_logprobs(tiny_llama, ids, mask, response_mask=rmask)
    torch.testing.assert_close(full[:, start:], lp)
    assert (full[:, :start] == 0).all()
    # temperature divides the logits
    lp_t = response_logprobs(tiny_llama, ids, mask, start, temperature=2.0)
    logits = tiny_llama(input_ids=ids).logits[:, start - 1 : -1] / 2.0
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, start:, None]).squeeze(-1)
    torch.testing.assert_close(lp_t, ref, atol=1e-5, rtol=0)


def test_reward_model_scores_last_real_token(tiny_model_dir, tiny_tokenizer):
    rm = load_scalar_model(ModelConfig(path=tiny_model_dir), trainable=False)
    head = rm.score
    assert head.weight.std().item() < 2.0 / (65**0.5)  # small init: std 1/sqrt(hidden + 1)
    texts = ["count up from 1 2 3", "hello 4"]
    ids_r, m_r = _batch(tiny_tokenizer, texts, left=False, extra=3)
    ids_l, m_l = _batch(tiny_tokenizer, texts, left=True, extra=3)
    s_r = sequence_scores(rm, ids_r, m_r)
    s_l = sequence_scores(rm, ids_l, m_l)
    torch.testing.assert_close(s_r, s_l, atol=1e-5, rtol=0)
    v = token_values(rm, ids_r, m_r)
    assert s_r[1] == v[1, m_r[1].sum() - 1]  # the last real token, not the last column
    assert s_r[1] != v[1, -1]


def test_critic_from_reward_model_keeps_head_and_stats(tiny_model_dir, tmp_path):
    rm = load_scalar_model(ModelConfig(path=tiny_model_dir), trainable=True)
    with torch.no_grad():
        rm.score.weight.fill_(0.01)
    set_reward_stats(rm, 1.5, 2.5)
    rm.save_pretrained(tmp_path / "rm")
    critic = load_scalar_model(ModelConfig(path=str(tmp_path / "rm")), trainable=True)
    assert torch.equal(critic.score.weight, rm.score.weight)
    assert reward_stats(critic) == (1.5, 2.5)


def test_dropout_off_in_frozen_and_trained_roles(tiny_model_dir):
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, attention_dropout=0.5)
    ids, mask = _batch(tok, ["count up from 1 2 3"])
    prepare_trainable(model, ModelConfig(path="x"))
    assert model.training
    a = response_logprobs(model, ids, mask, 2)
    b = response_logprobs(model, ids, mask, 2)
    assert torch.equal(a, b)
    kept = prepare_trainable(build_tiny_llama(tok, attention_dropout=0.5), ModelConfig(path="x", dropout=True))
    assert not torch.equal(response_logprobs(kept, ids, mask, 2), response_logprobs(kept, ids, mask, 2))
    ref = load_causal_lm(ModelConfig(path=tiny_model_dir), trainable=False)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_local_only_unless_hub_allowed(tmp_path):
    with pytest.raises(FileNotFoundError, match="allow_hub=true"):
        load_causal_lm(ModelConfig(path="someorg/some-model"), trainable=False)
    with pytest.raises(FileNotFoundError, match="allow_hub"):
        load_tokenizer(str(tmp_path / "missing"))


def test_lora_dpo_provider_shares_base_weights(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("peft")
    mcfg = ModelConfig(path=tiny_model_dir, lora_rank=4)
    base = load_causal_lm(ModelConfig(path=tiny_model_dir), trainable=False)
    reference = copy.deepcopy(base)
    peft_model = apply_lora(base, mcfg)
    with torch.no_grad():  # make the adapter non-trivial (B starts at 0)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    provider = DPOTokenRewardProvider(peft_model)
    ids, mask = _batch(tiny_tokenizer, ["count up from 1 2 3", "hello 4 5"], left=True)
    ref_lp, dpo_lp = provider_logprobs(provider, ids, mask, 4)
    torch.testing.assert_close(ref_lp, response_logprobs(reference, ids, mask, 4), atol=1e-6, rtol=0)
    assert (ref_lp - dpo_lp).abs().max() > 1e-4
    # one copy of the base: parameters = base + adapter
    n_base = sum(p.numel() for p in reference.parameters())
    n_lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in peft_model.parameters()) == n_base + n_lora
    assert all(not p.requires_grad for p in peft_model.parameters())


def test_provider_from_saved_adapter_and_full_model(tiny_model_dir, tiny_tokenizer, tmp_path):
    pytest.importorskip("peft")
    mcfg = ModelConfig(path=tiny_model_dir, lora_rank=4)
    peft_model = apply_lora(load_causal_lm(ModelConfig(path=tiny_model_dir), trainable=True), mcfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.load(open(os.path.join(tmp_path, "adapter", "adapter_config.json")))["r"] == 4
    ids, mask = _batch(tiny_tokenizer, ["count up from 1 2 3"])
    p1 = DPOTokenRewardProvider.from_paths(ModelConfig(path=tiny_model_dir), str(tmp_path / "adapter"), tiny_model_dir)
    assert p1.adapter
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(tmp_path / "full")
    p2 = DPOTokenRewardProvider.from_paths(ModelConfig(path=tiny_model_dir), str(tmp_path / "full"), tiny_model_dir)
    assert not p2.adapter
    (ref1, dpo1), (ref2, dpo2) = provider_logprobs(p1, ids, mask, 3), provider_logprobs(p2, ids, mask, 3)
    torch.testing.assert_close(dpo1, dpo2, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref1, ref2, atol=1e-6, rtol=0)


def test_freeze_is_eval_and_no_grad(tiny_tokenizer):
    m = freeze(build_tiny_llama(tiny_tokenizer))
    assert not m.training and all(not p.requires_grad for p in m.parameters())
