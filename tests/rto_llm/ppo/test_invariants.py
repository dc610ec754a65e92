"""docs/practice.md section 4, invariants 1-18, on the real rollout path (tiny CPU models)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rto_llm.config import ConfigError, load_config
from rto_llm.models import TokenizerMismatchError, sequence_scores, token_values
from rto_llm.ppo.config import PPOConfig, RTOConfig
from rto_llm.ppo.experience import (
    assemble_rewards,
    compute_advantages,
    response_logits,
    sample_responses,
    score_rollout,
    sequence_score,
    truncate_after_eos,
)
from rto_llm.ppo.metrics import rollout_metrics
from rto_llm.testing import ppo_overrides
from rto_sim.core import gather_logprobs, kl_penalty, last_valid_index, masked_mean, masked_sum, masked_var


def _randomize_critic(tr, scale: float = 0.2):
    """The critic starts as the token-counting RM, whose value is 0 wherever no target token was seen;
    noise makes V(s_t) differ from position to position so that alignment and padding checks bite."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tr.roles.critic.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _pad_sum(x, mask):
    """Sum of |x| on masked-out entries (must be exactly 0)."""
    return float(x.masked_fill(mask.bool(), 0).abs().sum())


def test_inv01_zero_kl_at_init(make_trainer, prompts):
    tr = make_trainer("kl.beta2=0.05")
    exp, _ = tr.make_experience(prompts)
    m = exp.action_mask
    assert m.sum() > 0
    assert torch.equal(exp.old_logprobs, exp.ref_logprobs)  # policy = reference checkpoint: bitwise
    assert float(exp.rewards.kl.abs().sum()) == 0.0
    row = rollout_metrics(exp, tr.cfg.rto, tr.cfg.rollout.max_new_tokens)
    assert row["objective/kl"] == 0.0 and row["objective/non_score_reward"] == 0.0
    assert row["objective/kl_neg_frac"] == 0.0


def test_inv02_first_minibatch_ratio_one(make_trainer, prompts):
    # rollout = one train batch: the single optimizer step's statistics are all measured before it
    tr = make_trainer(rollout=8, train_batch=8, micro=4)
    exp, _ = tr.make_experience(prompts)
    row = tr.ppo_update(exp, rollout=0)
    # exactly (CPU, float32): pi_old was computed in other micro-batches with other padding, but
    # position ids from the mask and dropout off make the training forward reproduce it bit for bit
    assert row["policy/clipfrac_avg"] == 0.0 and row["policy/approxkl_avg"] == 0.0
    assert row["policy/ratio_min"] == 1.0 and row["policy/ratio_max"] == 1.0 and row["policy/ratio_mean"] == 1.0
    # and the update did move the policy (the next rollout's ratio statistics are not trivially 1)
    exp2, _ = tr.make_experience(prompts)
    assert not torch.equal(exp2.old_logprobs[exp2.action_mask], exp2.ref_logprobs[exp2.action_mask])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_inv03_generation_logprobs_equal_recomputed(make_trainer, prompts, temperature):
    tr = make_trainer(f"rollout.temperature={temperature}", max_new_tokens=8)
    torch.manual_seed(1)
    exp, _ = tr.make_experience(prompts)
    m = exp.action_mask
    torch.testing.assert_close(exp.sample_logprobs[m], exp.old_logprobs[m], atol=2e-5, rtol=0)
    assert _pad_sum(exp.sample_logprobs, m) == 0.0 and _pad_sum(exp.old_logprobs, m) == 0.0


def test_inv04_pure_sampling_asserted(fx, tmp_path, make_trainer, prompts):
    for bad in ("rollout.top_p=0.9", "rollout.top_k=50", "rollout.repetition_penalty=1.1", "rollout.min_new_tokens=2"):
        with pytest.raises(ConfigError, match="pure sampling"):
            load_config(PPOConfig, None, ppo_overrides(fx, str(tmp_path), bad))
    # Empirically: the first sampled token follows softmax(logits / T) (no top-k / top-p / penalties).
    tr = make_trainer()
    actor, T, n = tr.roles.actor, 0.7, 4000
    torch.manual_seed(0)
    _, _, resp, _ = sample_responses(actor, [prompts[0]] * n, tr.pad_id, tr.eos_id, 1, T)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        p = torch.softmax(actor(input_ids=ids).logits[0, -1] / T, -1)
    freq = torch.bincount(resp[:, 0], minlength=p.numel()).float() / n
    tv = 0.5 * float((freq - p).abs().sum())
    assert tv < 0.05, tv
    # the tail is sampled too: tokens outside the top-10 appear as often as their probability says
    tail = p.argsort(descending=True)[10:]
    assert float(freq[tail].sum()) == pytest.approx(float(p[tail].sum()), abs=0.03)
    assert float(p[tail].sum()) > 0.2


def test_inv05_padding_invariance(make_trainer, prompts):
    tr = make_trainer()
    _randomize_critic(tr)
    exp, _ = tr.make_experience(prompts)
    assert exp.values[exp.action_mask].std() > 1e-3
    outs = []
    for extra in (0, 10):
        seq = torch.cat([torch.full((exp.batch_size, extra), tr.pad_id), exp.sequences], 1)
        am = torch.cat([torch.zeros(exp.batch_size, extra, dtype=torch.long), exp.attention_mask], 1)
        outs.append(score_rollout(tr.roles, seq, am, exp.action_mask, exp.prompt_width + extra, 1.0, 3, need_dpo=False))
    m = exp.action_mask
    for k in ("old_logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(outs[0][k][m], outs[1][k][m], atol=1e-5, rtol=0)
        torch.testing.assert_close(outs[0][k][m], getattr(exp, k)[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0]["raw_scores"], outs[1]["raw_scores"], atol=1e-5, rtol=0)
    assert outs[0]["raw_scores"].std() > 1e-3


def test_inv06_next_token_alignment(make_trainer, prompts):
    tr = make_trainer()
    _randomize_critic(tr)
    exp, _ = tr.make_experience(prompts)
    assert exp.values[exp.action_mask].std() > 1e-3
    P = exp.prompt_width
    for i in range(3):
        am = exp.attention_mask[i].bool()
        ids = exp.sequences[i][am].unsqueeze(0)  # unpadded prompt + response through EOS
        n_prompt = int(exp.attention_mask[i, :P].sum())
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        with torch.no_grad():
            nll = tr.roles.actor(input_ids=ids, labels=labels).loss  # HF shifts the labels itself
        ours = -masked_mean(exp.old_logprobs[i], exp.action_mask[i])
        assert float(ours) == pytest.approx(float(nll), abs=1e-5)
        # the value of action y_t is V(s_t), read at the token before y_t; V(s_0) sees the prompt only
        n = int(exp.action_mask[i].sum())
        with torch.no_grad():
            v_full = token_values(tr.roles.critic, ids, torch.ones_like(ids))[0]
            v_prompt = token_values(tr.roles.critic, ids[:, :n_prompt], torch.ones_like(ids[:, :n_prompt]))[0, -1]
        torch.testing.assert_close(exp.values[i, :n], v_full[n_prompt - 1 : n_prompt - 1 + n], atol=1e-5, rtol=0)
        assert float(exp.values[i, 0]) == pytest.approx(float(v_prompt), abs=1e-5)


def test_inv07_masked_positions_change_nothing(make_trainer, prompts, fx):
    tr = make_trainer("rto.mode=rto", "rto.beta1=0.5", "kl.beta2=0.05", f"rto.dpo_path={fx['dpo']}")
    exp, _ = tr.make_experience(prompts)
    m = exp.action_mask
    assert (~m).sum() > 0, "need some masked response positions"
    garbage = exp.select(torch.arange(exp.batch_size))
    for name in ("old_logprobs", "ref_logprobs", "values", "dpo_logprobs", "sample_logprobs", "entropy"):
        t = getattr(garbage, name).clone()
        t[~m] = torch.randn(int((~m).sum())) * 1e3
        setattr(garbage, name, t)
    seq = garbage.sequences.clone()
    resp = seq[:, garbage.prompt_width :]
    resp[~m] = torch.randint(0, 20, (int((~m).sum()),))  # tokens under attention 0
    garbage.sequences = seq
    for e in (exp, garbage):
        assemble_rewards(e, 0.05, tr.cfg.reward, "k1", tr.cfg.rto)
        compute_advantages(e, tr.cfg.ppo)
    for name in ("advantages", "returns"):
        assert torch.equal(getattr(exp, name), getattr(garbage, name)), name
    for name in ("token_level_rewards", "kl", "dpo_rewards"):
        assert torch.equal(getattr(exp.rewards, name), getattr(garbage.rewards, name)), name
    r1 = rollout_metrics(exp, tr.cfg.rto, tr.cfg.rollout.max_new_tokens)
    r2 = rollout_metrics(garbage, tr.cfg.rto, tr.cfg.rollout.max_new_tokens)
    assert r1 == r2
    # losses: the same update on both buffers gives the same statistics and the same weights
    state = {k: v.clone() for k, v in tr.roles.actor.state_dict().items()}
    opt_state = tr.actor_engine.optimizer.state_dict()
    u1 = tr.ppo_update(exp, rollout=0)
    w1 = {k: v.clone() for k, v in tr.roles.actor.state_dict().items()}
    tr2 = make_trainer("rto.mode=rto", "rto.beta1=0.5", "kl.beta2=0.05", f"rto.dpo_path={fx['dpo']}")
    tr2.roles.actor.load_state_dict(state)
    tr2.actor_engine.optimizer.load_state_dict(opt_state)
    u2 = tr2.ppo_update(garbage, rollout=0)
    w2 = tr2.roles.actor.state_dict()
    drop = ("grad_norm/critic", "loss/value_avg", "val/clipfrac_avg")  # the critics differ (fresh heads)
    assert {k: v for k, v in u1.items() if k not in drop} == {k: v for k, v in u2.items() if k not in drop}
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_inv08_pad_equal_to_eos_refused(fx, tmp_path):
    from rto_llm.ppo.trainer import PPOTrainer
    from rto_llm.testing import build_tiny_tokenizer

    bad = tmp_path / "actor_pad_eos"
    import shutil

    shutil.copytree(fx["actor"], bad)
    build_tiny_tokenizer(pad_token="<eos>").save_pretrained(bad)
    # model.pad_token=keep: the tokenizer as saved (the default, auto, adds a dedicated PAD before the check)
    cfg = load_config(PPOConfig, None, ppo_overrides({**fx, "actor": str(bad)}, str(tmp_path / "run"),
                                                     "model.pad_token=keep"))
    with pytest.raises(TokenizerMismatchError, match="PAD == EOS"):
        PPOTrainer(cfg)


def test_inv09_reward_placement(make_trainer, prompts):
    tr = make_trainer("kl.beta2=0.0", "ppo.gamma=1.0", "ppo.lam=1.0", "reward.missing_eos_mode=off", max_new_tokens=30)
    torch.manual_seed(0)
    tr.ppo_update(tr.make_experience(prompts)[0], rollout=0)  # move the policy off the reference
    exp, _ = tr.make_experience(prompts)
    exp.values = torch.zeros_like(exp.values)
    assemble_rewards(exp, 0.0, tr.cfg.reward, "k1", tr.cfg.rto)
    compute_advantages(exp, dataclasses.replace(tr.cfg.ppo, whiten_advantages=False))
    m = exp.action_mask
    expected = exp.scores.unsqueeze(1).expand_as(exp.advantages)
    torch.testing.assert_close(exp.advantages[m], expected[m], atol=1e-6, rtol=0)
    assert _pad_sum(exp.advantages, m) == 0.0
    # the score sits on the last valid token, which is the EOS token when the response has one
    last = last_valid_index(m)
    rows = torch.arange(exp.batch_size)
    assert torch.equal(exp.rewards.score_rewards[rows, last], exp.scores)
    assert float(exp.rewards.score_rewards.abs().sum()) == pytest.approx(float(exp.scores.abs().sum()))
    resp = exp.sequences[:, exp.prompt_width :]
    assert exp.has_eos.any()
    assert bool((resp[rows, last] == tr.eos_id)[exp.has_eos].all())
    # with beta2 > 0: sum_t r_t = R - beta2 * sum_t k1_t
    assemble_rewards(exp, 0.3, tr.cfg.reward, "k1", tr.cfg.rto)
    k1 = kl_penalty(exp.old_logprobs, exp.ref_logprobs, "k1", mask=m)
    assert k1.abs().sum() > 0
    torch.testing.assert_close(
        masked_sum(exp.rewards.token_level_rewards, m, -1), exp.scores - 0.3 * masked_sum(k1, m, -1), atol=1e-6, rtol=0
    )


def test_inv10_gae_limits(make_trainer, prompts):
    tr = make_trainer("kl.beta2=0.1")
    _randomize_critic(tr)
    tr.ppo_update(tr.make_experience(prompts)[0], rollout=0)
    exp, _ = tr.make_experience(prompts)
    m, r, v = exp.action_mask, exp.rewards.token_level_rewards, exp.values
    assert v[m].abs().sum() > 0
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1) * torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], 1)
    compute_advantages(exp, dataclasses.replace(tr.cfg.ppo, lam=0.0, gamma=1.0, whiten_advantages=False))
    torch.testing.assert_close(exp.advantages[m], (r + v_next - v)[m], atol=1e-6, rtol=0)
    # the value after the terminal action is 0: the last valid token's TD error is r_T - V_T
    last = last_valid_index(m)
    rows = torch.arange(exp.batch_size)
    torch.testing.assert_close(exp.advantages[rows, last], (r - v)[rows, last], atol=1e-6, rtol=0)
    compute_advantages(exp, dataclasses.replace(tr.cfg.ppo, lam=1.0, gamma=1.0, whiten_advantages=False))
    to_go = r.masked_fill(~m, 0).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(exp.returns[m], to_go[m], atol=1e-5, rtol=0)


def test_inv11_missing_eos_penalty_on_completion_only(fx, tmp_path):
    import json

    from rto_llm.ppo.trainer import PPOTrainer

    # multi-turn prompts: the chat template closes the earlier assistant turn with EOS inside the prompt
    rows = [{"messages": [{"role": "user", "content": "count up from 1 2"}, {"role": "assistant", "content": "3 4"},
                          {"role": "user", "content": f"count up from {i} {i + 1}"}]} for i in range(8)]
    path = tmp_path / "multi.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(
        PPOConfig, None,
        ppo_overrides({**fx, "prompts": str(path)}, str(tmp_path / "run"), "reward.missing_eos_penalty=-7.5",
                      max_new_tokens=30),
    )
    tr = PPOTrainer(cfg)
    assert all(tr.eos_id in p["prompt_ids"] for p in tr.prompts)
    torch.manual_seed(3)
    exp, _ = tr.make_experience([p["prompt_ids"] for p in tr.prompts])
    assert (~exp.has_eos).any() and exp.has_eos.any(), "need both finished and unfinished completions"
    resp = exp.sequences[:, exp.prompt_width :]
    has_eos = ((resp == tr.eos_id) & exp.action_mask).any(-1)
    assert torch.equal(exp.has_eos, has_eos)
    assert torch.equal(exp.scores[~has_eos], torch.full_like(exp.scores[~has_eos], -7.5))
    torch.testing.assert_close(exp.scores[has_eos], exp.raw_scores[has_eos].clamp(-10, 10))
    # subtract mode (TRL convention) and the truncation helper on hand-made rows
    sub = dataclasses.replace(cfg.reward, missing_eos_mode="subtract", missing_eos_penalty=2.0)
    s = sequence_score(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), sub, 0.0, 1.0)
    assert s.tolist() == [1.0, -1.0]
    eos, pad = tr.eos_id, tr.pad_id
    out, mask, he = truncate_after_eos(torch.tensor([[9, eos, 9, eos], [9, 9, 9, 9]]), eos, pad)
    assert out.tolist() == [[9, eos, pad, pad], [9, 9, 9, 9]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4] and he.tolist() == [True, False]


def test_inv12_tokenizers_shared_and_rm_format(fx, tmp_path, make_trainer, prompts):
    import shutil

    from rto_llm.ppo.trainer import PPOTrainer
    from rto_llm.testing import build_tiny_tokenizer

    rm = tmp_path / "rm_other_vocab"
    shutil.copytree(fx["rm"], rm)
    build_tiny_tokenizer(extra_words=("banana",)).save_pretrained(rm)
    cfg = load_config(PPOConfig, None, ppo_overrides({**fx, "rm": str(rm)}, str(tmp_path / "run")))
    with pytest.raises(TokenizerMismatchError, match="'actor' and 'reward' differ"):
        PPOTrainer(cfg)
    # ... and a reward model whose tokenizer carries another chat template (another training format)
    rm2 = tmp_path / "rm_other_template"
    shutil.copytree(fx["rm"], rm2)
    tok2 = build_tiny_tokenizer()
    tok2.chat_template = tok2.chat_template.replace("<|user|> ", "<|user|>  ")
    tok2.save_pretrained(rm2)
    cfg = load_config(PPOConfig, None, ppo_overrides({**fx, "rm": str(rm2)}, str(tmp_path / "run")))
    with pytest.raises(TokenizerMismatchError, match="chat template"):
        PPOTrainer(cfg)
    # The RM scores exactly the text it was trained on: prompt (chat template) + response through EOS.
    tr = make_trainer()
    exp, _ = tr.make_experience(prompts)
    for i in range(4):
        ids = exp.sequences[i][exp.attention_mask[i].bool()].unsqueeze(0)
        assert ids[0, : len(prompts[i])].tolist() == prompts[i]
        s = sequence_scores(tr.roles.reward_model, ids, torch.ones_like(ids))
        assert float(s) == pytest.approx(float(exp.raw_scores[i]), abs=1e-5)
    assert exp.raw_scores.abs().min() > 1e-3 and exp.raw_scores.std() > 1e-3


def test_inv13_whitening_and_microbatch_invariance(make_trainer, prompts, tmp_path):
    tr = make_trainer(rollout=8, train_batch=8, micro=8)
    exp, _ = tr.make_experience(prompts)
    m = exp.action_mask
    assert float(masked_mean(exp.advantages, m)) == pytest.approx(0.0, abs=1e-6)
    assert float(masked_var(exp.advantages, m)) == pytest.approx(1.0, abs=1e-5)
    assert _pad_sum(exp.advantages, m) == 0.0
    tr.ppo_update(exp, rollout=0)
    results = []
    for micro in (8, 4, 2):
        t = make_trainer(rollout=8, train_batch=8, micro=micro, out=tmp_path / f"m{micro}")
        u = t.ppo_update(exp, rollout=0)
        results.append((u, {k: v.clone() for k, v in t.roles.actor.state_dict().items()},
                        {k: v.clone() for k, v in t.roles.critic.state_dict().items()}))
    (u0, a0, c0) = results[0]
    for u, a, c in results[1:]:
        for k in ("loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "grad_norm/actor", "grad_norm/critic"):
            assert u[k] == pytest.approx(u0[k], rel=1e-5, abs=1e-7), k
        for k in a0:
            torch.testing.assert_close(a[k], a0[k], atol=1e-6, rtol=1e-5)
        for k in c0:
            torch.testing.assert_close(c[k], c0[k], atol=1e-6, rtol=1e-5)


def test_inv14_rollout_tensors_fixed_across_epochs(make_trainer, prompts):
    tr = make_trainer("ppo.epochs=3", rollout=8, train_batch=4, micro=2)
    exp, _ = tr.make_experience(prompts)
    before = {k: v.clone() for k, v in exp.tensors().items()}
    assert not any(v.requires_grad for v in before.values())
    u = tr.ppo_update(exp, rollout=0)
    assert u["policy/approxkl_avg"] > 0  # the policy moved during the epochs
    for k, v in exp.tensors().items():
        assert torch.equal(v, before[k]), k


def test_inv15_frozen_models_unchanged_and_eval(make_trainer, prompts, fx):
    tr = make_trainer("rto.mode=rto", "rto.beta1=0.1", f"rto.dpo_path={fx['dpo']}", cls=RTOConfig)
    frozen = {"reference": tr.roles.reference, "reward": tr.roles.reward_model, "dpo": tr.roles.dpo_model}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in frozen.items()}
    actor_before = {k: v.clone() for k, v in tr.roles.actor.state_dict().items()}
    exp, _ = tr.make_experience(prompts)
    tr.ppo_update(exp, rollout=0)
    for n, m in frozen.items():
        assert not m.training and not any(p.requires_grad for p in m.parameters()), n
        after = m.state_dict()
        assert all(torch.equal(before[n][k], after[k]) for k in after), n
    assert any(not torch.equal(actor_before[k], v) for k, v in tr.roles.actor.state_dict().items())


def test_inv16_kl_sign(make_trainer, prompts):
    tr = make_trainer("kl.beta2=0.2")
    tr.ppo_update(tr.make_experience(prompts)[0], rollout=0)
    exp, _ = tr.make_experience(prompts)
    m = exp.action_mask
    k1 = exp.old_logprobs - exp.ref_logprobs
    assert k1[m].abs().sum() > 0
    terms = exp.rewards
    kl_term = terms.token_level_rewards - terms.dpo_rewards - terms.score_rewards
    torch.testing.assert_close(kl_term[m], -0.2 * k1[m], atol=1e-6, rtol=0)
    # tokens the policy now likes more than the reference are penalized, the others rewarded
    assert bool((kl_term[m & (k1 > 1e-6)] < 0).all()) and bool((kl_term[m & (k1 < -1e-6)] > 0).all())


def test_inv17_rto_token_rewards(make_trainer, prompts, fx):
    # DPO model = its reference: all DPO rewards are exactly 0
    tr = make_trainer("rto.beta1=0.5", f"rto.dpo_path={fx['actor']}", cls=RTOConfig)
    exp, _ = tr.make_experience(prompts)
    assert float(exp.rewards.dpo_token_rewards.abs().sum()) == 0.0 and float(exp.rewards.dpo_rewards.abs().sum()) == 0.0
    # a real DPO model, no clip: per-sequence sum = beta1 * (log pi_dpo(y|x) - log pi_ref(y|x)), pads 0
    tr = make_trainer("rto.beta1=0.5", "rto.dpo_clip=0", f"rto.dpo_path={fx['dpo']}", cls=RTOConfig)
    exp, _ = tr.make_experience(prompts)
    m = exp.action_mask
    seq_ids, am, P = exp.sequences, exp.attention_mask, exp.prompt_width
    with torch.no_grad():
        lp_dpo = gather_logprobs(response_logits(tr.roles.dpo_model, seq_ids, am, P), seq_ids[:, P:])
        lp_ref = gather_logprobs(response_logits(tr.roles.reference, seq_ids, am, P), seq_ids[:, P:])
    implicit = masked_sum(lp_dpo - lp_ref, m, -1)
    assert implicit.abs().min() > 1e-4
    torch.testing.assert_close(masked_sum(exp.rewards.dpo_rewards, m, -1), 0.5 * implicit, atol=1e-5, rtol=0)
    assert _pad_sum(exp.rewards.dpo_rewards, m) == 0.0 and _pad_sum(exp.rewards.dpo_token_rewards, m) == 0.0
    # with the clip, each token reward is in [-c, c]
    tr = make_trainer("rto.beta1=0.5", "rto.dpo_clip=0.01", f"rto.dpo_path={fx['dpo']}", cls=RTOConfig)
    exp, _ = tr.make_experience(prompts)
    assert float(exp.rewards.dpo_token_rewards.abs().max()) == pytest.approx(0.01)
    assert rollout_metrics(exp, tr.cfg.rto, 6)["rto/dpo_clipfrac"] > 0


def test_inv18_resume_bitwise(make_trainer, tmp_path, fx):
    common = ("ppo.max_rollouts=3", "kl.adaptive=true", f"rto.dpo_path={fx['dpo']}")
    full = make_trainer(*common, cls=RTOConfig, out=tmp_path / "full", rollout=8, train_batch=4, micro=2)
    h_full = full.train()
    part = make_trainer(*common, cls=RTOConfig, out=tmp_path / "part", rollout=8, train_batch=4, micro=2)
    h1 = part.train(stop_after=1)
    del part
    torch.manual_seed(12345)  # a different RNG state before resuming: the checkpoint must restore it
    resumed = make_trainer(*common, "checkpoint.resume=latest", cls=RTOConfig, out=tmp_path / "part",
                           rollout=8, train_batch=4, micro=2)
    h2 = resumed.train()
    strip = lambda h: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in h]  # noqa: E731
    assert strip(h1 + h2) == strip(h_full)
    assert h_full[-1]["objective/beta2"] != h_full[0]["objective/beta2"]  # the adaptive coefficient moved
    for a, b in ((full.roles.actor, resumed.roles.actor), (full.roles.critic, resumed.roles.critic)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = full.actor_engine.optimizer.state_dict(), resumed.actor_engine.optimizer.state_dict()
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])
    assert full.actor_engine.lr() == resumed.actor_engine.lr()
    assert math.isfinite(h_full[-1]["objective/kl"])
