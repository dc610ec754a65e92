"""Tests for rto_sim.core, named after the docs/practice.md section 4 invariants they pin."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rto_sim import core

SETTINGS = settings(max_examples=50, deadline=None)
DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


@st.composite
def ragged_batch(draw, max_b: int = 4, max_t: int = 8):
    """(seed, lengths, T): a batch of right-padded responses, every row with >= 1 valid token."""
    b = draw(st.integers(1, max_b))
    t = draw(st.integers(1, max_t))
    lengths = draw(st.lists(st.integers(1, t), min_size=b, max_size=b))
    seed = draw(st.integers(0, 2**31 - 1))
    return seed, lengths, t


def make_mask(lengths, t) -> torch.Tensor:
    """(B, T) float mask, 1 on the first lengths[b] tokens."""
    ar = torch.arange(t).unsqueeze(0)
    return (ar < torch.tensor(lengths).unsqueeze(1)).to(DTYPE)


def unpack(batch) -> tuple[torch.Generator, int, int, torch.Tensor]:
    """(generator seeded by the batch, B, T, mask) of a `ragged_batch` draw."""
    seed, lengths, t = batch
    return torch.Generator().manual_seed(seed), len(lengths), t, make_mask(lengths, t)


def rand(gen, shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=DTYPE) * scale


def perturb_pads(x: torch.Tensor, mask: torch.Tensor, gen, value: float | None = None) -> torch.Tensor:
    """Copy of ``x`` with garbage (large values, or ``value``) on masked-out positions."""
    junk = torch.randn(x.shape, generator=gen, dtype=x.dtype) * 1e3 if value is None else value
    return torch.where(mask.bool(), x, torch.as_tensor(junk, dtype=x.dtype))


def naive_gae(rewards, values, lengths, gamma, lam):
    """Reference GAE with python loops over each row's valid tokens; V after the last token is 0."""
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=DTYPE)
    ret = torch.zeros(b, t, dtype=DTYPE)
    for i in range(b):
        n = lengths[i]
        running = 0.0
        for k in reversed(range(n)):
            next_v = values[i, k + 1].item() if k + 1 < n else 0.0
            delta = rewards[i, k].item() + gamma * next_v - values[i, k].item()
            running = delta + gamma * lam * running
            adv[i, k] = running
            ret[i, k] = running + values[i, k].item()
    return adv, ret


# ---------------------------------------------------------------------------------------------------
# masked statistics and log-probs
# ---------------------------------------------------------------------------------------------------


def test_masked_stats_hand_values():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]], dtype=DTYPE)
    m = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=DTYPE)
    assert core.masked_sum(x, m).item() == 15.0
    assert core.masked_mean(x, m).item() == 3.0
    assert torch.equal(core.masked_mean(x, m, dim=-1), torch.tensor([1.5, 4.0], dtype=DTYPE))
    assert torch.equal(core.masked_sum(x, m.bool(), dim=-1), torch.tensor([3.0, 12.0], dtype=DTYPE))
    assert core.masked_var(x, m).item() == pytest.approx(2.5)  # values 1..5, unbiased
    assert core.masked_var(x, m, unbiased=False).item() == pytest.approx(2.0)


def test_gather_logprobs_matches_manual_and_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = rand(gen, (2, 3, 5), 3.0)
    tokens = torch.randint(0, 5, (2, 3), generator=gen)
    lp = core.gather_logprobs(logits, tokens)
    for b in range(2):
        for t in range(3):
            expected = logits[b, t, tokens[b, t]] - torch.logsumexp(logits[b, t], -1)
            assert lp[b, t].item() == pytest.approx(expected.item(), abs=1e-12)
    lp_t = core.gather_logprobs(logits, tokens, temperature=2.0)
    torch.testing.assert_close(lp_t, core.gather_logprobs(logits / 2.0, tokens))
    assert not torch.allclose(lp_t, lp)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=DTYPE)
    seq = core.sequence_logprob(lp, mask)
    torch.testing.assert_close(seq, torch.stack([lp[0, :2].sum(), lp[1, 0]]))
    with pytest.raises(ValueError, match="temperature"):
        core.gather_logprobs(logits, tokens, temperature=0.0)


# ---------------------------------------------------------------------------------------------------
# inv 7: masked positions change nothing
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(batch=ragged_batch(), junk=st.sampled_from([None, float("nan"), float("inf"), -1e30]))
def test_inv7_masked_logits_do_not_change_losses(batch, junk):
    gen, b, t, mask = unpack(batch)
    logp, old, ref, dpo = (rand(gen, (b, t)) - 2.0 for _ in range(4))
    values, adv, rewards = rand(gen, (b, t)), rand(gen, (b, t)), rand(gen, (b, t))
    score = rand(gen, (b,))

    def run(logp, old, ref, dpo, values, adv, rewards):
        logp = logp.clone().requires_grad_(True)
        values = values.clone().requires_grad_(True)
        out = {}
        for mode in core.LOSS_AGG_MODES:
            pl, stats = core.ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0, loss_agg_mode=mode)
            vl, vstats = core.value_loss(values, old, rewards, mask, loss_agg_mode=mode)
            (pl + vl).backward()
            out[f"pl_{mode}"], out[f"vl_{mode}"] = pl.detach(), vl.detach()
            out[f"glogp_{mode}"] = logp.grad[mask.bool()].clone()
            out[f"gval_{mode}"] = values.grad[mask.bool()].clone()
            logp.grad, values.grad = None, None
            out.update({f"{k}_{mode}": v for k, v in {**stats, **vstats}.items()})
        terms = core.compute_rto_rewards(
            score, logp.detach(), ref, mask, beta2=0.05, beta1=0.1, dpo_logprobs=dpo, dpo_clip=0.5
        )
        for name in ("token_level_rewards", "dpo_rewards", "kl", "score_rewards"):
            out[name] = getattr(terms, name)
        for kind in core.KL_KINDS:
            out[f"kl_{kind}"] = core.kl_penalty(logp.detach(), ref, kind=kind, mask=mask)
        a, r = core.gae_advantages(rewards, values.detach(), mask, gamma=0.99, lam=0.9)
        out["gae_adv"], out["gae_ret"] = a, r
        out["rpp_adv"], out["rpp_ret"] = core.reinforce_plus_plus_advantages(rewards, mask)
        out["whiten"] = core.masked_whiten(adv, mask)
        out["ev"] = core.explained_variance(values.detach(), rewards, mask)
        return out

    clean = run(logp, old, ref, dpo, values, adv, rewards)
    dirty = run(*(perturb_pads(x, mask, gen, junk) for x in (logp, old, ref, dpo, values, adv, rewards)))
    assert clean.keys() == dirty.keys()
    for key in clean:
        torch.testing.assert_close(dirty[key], clean[key], equal_nan=True, msg=key)
        if clean[key].dim() == 2:  # pads are exactly 0 in every per-token output
            assert torch.all(clean[key][~mask.bool()] == 0), key


# ---------------------------------------------------------------------------------------------------
# inv 9: reward placement
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(batch=ragged_batch())
def test_inv9_reward_placement_advantage_equals_score(batch):
    gen, b, t, mask = unpack(batch)
    score = rand(gen, (b,))
    logp, ref = rand(gen, (b, t)), rand(gen, (b, t))
    terms = core.compute_rto_rewards(score, logp, ref, mask, beta2=0.0, mode="ppo")
    adv, ret = core.gae_advantages(terms.token_level_rewards, torch.zeros(b, t, dtype=DTYPE), mask, 1.0, 1.0)
    expected = score.unsqueeze(1).expand(b, t) * mask
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected)
    assert torch.all(adv[~mask.bool()] == 0)


@SETTINGS
@given(batch=ragged_batch(), beta2=st.floats(0.001, 1.0))
def test_inv9_reward_sum_is_score_minus_beta2_k1(batch, beta2):
    gen, b, t, mask = unpack(batch)
    lengths = batch[1]
    score = rand(gen, (b,))
    logp, ref = rand(gen, (b, t)) - 2, rand(gen, (b, t)) - 2
    terms = core.compute_rto_rewards(score, logp, ref, mask, beta2=beta2, beta3=1.0)
    k1_sum = ((logp - ref) * mask).sum(-1)
    torch.testing.assert_close(terms.token_level_rewards.sum(-1), score - beta2 * k1_sum)
    # the score sits on the last valid token and nowhere else
    last = torch.tensor(lengths) - 1
    torch.testing.assert_close(terms.score_rewards[torch.arange(b), last], score)
    assert torch.count_nonzero(terms.score_rewards) == torch.count_nonzero(score)
    torch.testing.assert_close(core.last_valid_index(mask), last)


def test_inv9_score_on_eos_token_hand_example():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=DTYPE)
    z = torch.zeros(2, 5, dtype=DTYPE)
    terms = core.compute_rto_rewards(torch.tensor([2.0, -3.0], dtype=DTYPE), z, z, mask, beta2=0.1, beta3=0.5)
    expected = torch.tensor([[0, 0, 1.0, 0, 0], [0, 0, 0, 0, -1.5]], dtype=DTYPE)
    torch.testing.assert_close(terms.token_level_rewards, expected)
    torch.testing.assert_close(terms.score_rewards, expected)


# ---------------------------------------------------------------------------------------------------
# inv 10: GAE limits
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(batch=ragged_batch(), gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0))
def test_inv10_gae_matches_naive_reference(batch, gamma, lam):
    gen, b, t, mask = unpack(batch)
    lengths = batch[1]
    rewards, values = rand(gen, (b, t)), rand(gen, (b, t))
    adv, ret = core.gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


@SETTINGS
@given(batch=ragged_batch(), gamma=st.floats(0.5, 1.0))
def test_inv10_gae_lambda_limits(batch, gamma):
    gen, b, t, mask = unpack(batch)
    lengths = batch[1]
    rewards, values = rand(gen, (b, t)), rand(gen, (b, t))
    # lam = 0: one-step TD errors, with V after the terminal token = 0
    adv0, _ = core.gae_advantages(rewards, values, mask, gamma, 0.0)
    next_v = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(b, 1, dtype=DTYPE)], dim=1)
    torch.testing.assert_close(adv0, (rewards + gamma * next_v - values) * mask)
    # lam = 1: returns are the discounted reward-to-go, whatever the values
    _, ret1 = core.gae_advantages(rewards, values, mask, gamma, 1.0)
    rtg = core.reinforce_plus_plus_returns(rewards, mask, gamma)
    torch.testing.assert_close(ret1, rtg)
    for i, n in enumerate(lengths):
        expected = sum(gamma**k * rewards[i, k].item() for k in range(n))
        assert rtg[i, 0].item() == pytest.approx(expected, abs=1e-9)


def test_inv10_value_after_terminal_is_zero():
    mask = torch.tensor([[1, 1, 0, 0]], dtype=DTYPE)
    rewards = torch.tensor([[0.0, 1.0, 50.0, 50.0]], dtype=DTYPE)
    values = torch.tensor([[0.5, 0.25, 1e6, 1e6]], dtype=DTYPE)
    adv, ret = core.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0 + 0.25 - 0.5, 1.0 - 0.25, 0, 0]], dtype=DTYPE))
    torch.testing.assert_close(ret, torch.tensor([[0.25, 1.0, 0, 0]], dtype=DTYPE))


# ---------------------------------------------------------------------------------------------------
# inv 13: masked statistics and gradient accumulation
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(batch=ragged_batch(), shift=st.floats(-100, 100), scale=st.floats(0.01, 100))
def test_inv13_masked_whitening_mean0_std1(batch, shift, scale):
    seed, lengths, t = batch
    if sum(lengths) < 2:
        lengths = [*lengths[:-1], 2] if t >= 2 else lengths + [1]
        t = max(t, max(lengths))
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(lengths, t)
    x = rand(gen, mask.shape, scale) + shift
    w = core.masked_whiten(x, mask)
    assert core.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    var = core.masked_var(x, mask).item()
    assert core.masked_var(w, mask).item() == pytest.approx(var / (var + 1e-8), rel=1e-9)  # eps = 1e-8
    if var > 1e-3:
        assert core.masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-5)
    assert torch.all(w[~mask.bool()] == 0)
    # shift_mean=False keeps the mean and rescales only
    w2 = core.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(core.masked_mean(w2, mask), core.masked_mean(x, mask))


@SETTINGS
@given(
    batch=ragged_batch(max_b=6),
    mode=st.sampled_from(core.LOSS_AGG_MODES),
    n_micro=st.integers(1, 3),
)
def test_inv13_gradient_accumulation_matches_full_batch(batch, mode, n_micro):
    gen, b, t, mask = unpack(batch)
    logp = rand(gen, (b, t)).requires_grad_(True)
    old, adv = rand(gen, (b, t)), rand(gen, (b, t))
    full, _ = core.ppo_policy_loss(logp, old, adv, mask, loss_agg_mode=mode)
    (g_full,) = torch.autograd.grad(full, logp)

    total = torch.zeros((), dtype=DTYPE)
    grad = torch.zeros_like(logp)
    for idx in torch.arange(b).chunk(n_micro):
        lp = logp.detach()[idx].requires_grad_(True)
        loss, _ = core.ppo_policy_loss(lp, old[idx], adv[idx], mask[idx], loss_agg_mode=mode)
        weighted = loss * core.microbatch_loss_weight(mask[idx], mask, mode)
        (g,) = torch.autograd.grad(weighted, lp)
        grad[idx] += g
        total += weighted.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(grad, g_full)


def test_inv13_naive_microbatch_averaging_is_wrong_for_token_mean():
    # Rows of lengths 1 and 3: averaging the two micro-batch token-means with 1/2 each is not the
    # full-batch token mean; the token-count weighting of microbatch_loss_weight is.
    mask = make_mask([1, 3], 3)
    loss_mat = torch.tensor([[4.0, 0, 0], [1.0, 1.0, 1.0]], dtype=DTYPE)
    full = core.aggregate_loss(loss_mat, mask, "token-mean")
    assert full.item() == pytest.approx(7.0 / 4.0)
    parts = [core.aggregate_loss(loss_mat[i : i + 1], mask[i : i + 1], "token-mean") for i in range(2)]
    assert (0.5 * parts[0] + 0.5 * parts[1]).item() == pytest.approx(2.5)
    weights = [core.microbatch_loss_weight(mask[i : i + 1], mask) for i in range(2)]
    assert weights == [0.25, 0.75]
    assert (weights[0] * parts[0] + weights[1] * parts[1]).item() == pytest.approx(7.0 / 4.0)
    assert core.aggregate_loss(loss_mat, mask, "seq-mean-token-sum").item() == pytest.approx(3.5)
    assert core.aggregate_loss(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx(2.5)


# ---------------------------------------------------------------------------------------------------
# inv 16: KL sign, and KL estimators
# ---------------------------------------------------------------------------------------------------


def test_inv16_kl_enters_reward_as_minus_beta2_k1():
    mask = torch.ones(1, 3, dtype=DTYPE)
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=DTYPE)
    ref = torch.tensor([[-2.0, -1.0, -0.5]], dtype=DTYPE)  # k1 = [1, -1, 0]
    terms = core.compute_rto_rewards(torch.zeros(1, dtype=DTYPE), logp, ref, mask, beta2=0.1)
    torch.testing.assert_close(terms.kl, torch.tensor([[1.0, -1.0, 0.0]], dtype=DTYPE))
    torch.testing.assert_close(terms.token_level_rewards, torch.tensor([[-0.1, 0.1, 0.0]], dtype=DTYPE))
    torch.testing.assert_close(terms.non_score_rewards, terms.token_level_rewards)
    # policy more likely than the reference -> penalized
    assert terms.token_level_rewards[0, 0] < 0


def test_kl_estimators_hand_values():
    logp = torch.tensor([-1.0, -2.0, -1.0], dtype=DTYPE)
    ref = torch.tensor([-2.0, -1.0, -1.0], dtype=DTYPE)
    torch.testing.assert_close(core.kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0, 0.0], dtype=DTYPE))
    torch.testing.assert_close(core.kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.5, 0.0], dtype=DTYPE))
    k3 = torch.tensor([math.exp(-1.0), math.exp(1.0) - 2.0, 0.0], dtype=DTYPE)
    torch.testing.assert_close(core.kl_penalty(logp, ref, "k3"), k3)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 20.0))
def test_kl_k2_k3_are_nonnegative(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    logp, ref = rand(gen, (16,), scale), rand(gen, (16,), scale)
    assert torch.all(core.kl_penalty(logp, ref, "k3") >= 0)
    assert torch.all(core.kl_penalty(logp, ref, "k2") >= 0)


def test_kl_estimators_monte_carlo_unbiased():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=DTYPE), -1)
    q = torch.softmax(torch.tensor([0.0, 0.5, 0.0, -0.5], dtype=DTYPE), -1)
    kl = (p * (p.log() - q.log())).sum().item()
    y = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    for kind in ("k1", "k3"):
        est = core.kl_penalty(p.log()[y], q.log()[y], kind).mean().item()
        assert est == pytest.approx(kl, abs=0.01), kind


# ---------------------------------------------------------------------------------------------------
# inv 17: RTO token rewards
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(batch=ragged_batch(), beta1=st.floats(0.0, 2.0))
def test_inv17_dpo_rewards_zero_when_dpo_equals_ref(batch, beta1):
    gen, b, t, mask = unpack(batch)
    ref = rand(gen, (b, t)) - 2
    r = core.dpo_token_reward(ref.clone(), ref, mask, beta1=beta1, clip=0.05)
    assert torch.all(r == 0)
    terms = core.compute_rto_rewards(
        torch.zeros(b, dtype=DTYPE), ref, ref, mask, beta2=0.01, beta1=beta1, dpo_logprobs=ref.clone()
    )
    assert torch.all(terms.dpo_rewards == 0)
    assert torch.all(terms.token_level_rewards == 0)


@SETTINGS
@given(batch=ragged_batch(), beta1=st.floats(0.001, 2.0))
def test_inv17_dpo_reward_sum_is_beta1_times_implicit_reward(batch, beta1):
    gen, b, t, mask = unpack(batch)
    dpo, ref = rand(gen, (b, t)) - 2, rand(gen, (b, t)) - 2
    r = core.dpo_token_reward(perturb_pads(dpo, mask, gen), ref, mask, beta1=beta1)
    assert torch.all(r[~mask.bool()] == 0)
    implicit = core.sequence_logprob(dpo, mask) - core.sequence_logprob(ref, mask)
    torch.testing.assert_close(r.sum(-1), beta1 * implicit)
    # with a clip every token lies in [-c, c]
    rc = core.dpo_token_reward(dpo, ref, mask, beta1=beta1, clip=0.05)
    assert torch.all(rc.abs() <= 0.05 + 1e-15)
    torch.testing.assert_close(rc, r.clamp(-0.05, 0.05))


def test_inv17_dpo_reward_hand_example():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=DTYPE)
    dpo = torch.tensor([[-1.0, -3.0, -2.0, 5.0]], dtype=DTYPE)
    ref = torch.tensor([[-2.0, -2.0, -2.1, 0.0]], dtype=DTYPE)
    r = core.dpo_token_reward(dpo, ref, mask, beta1=0.05, clip=0.04)
    torch.testing.assert_close(r, torch.tensor([[0.04, -0.04, 0.005, 0.0]], dtype=DTYPE))


def test_compute_rto_rewards_combines_terms_and_is_detached():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=DTYPE)
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=DTYPE, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0]], dtype=DTYPE)
    dpo = torch.tensor([[-1.0, -2.0, -0.5, -1.0]], dtype=DTYPE, requires_grad=True)
    terms = core.compute_rto_rewards(
        torch.tensor([1.0], dtype=DTYPE, requires_grad=True),
        logp,
        ref,
        mask,
        beta2=0.1,
        beta3=2.0,
        dpo_logprobs=dpo,
        beta1=0.5,
        dpo_clip=0.3,
    )
    # kl = [0.5, 0, -0.5]; dpo = clip(0.5 * [0.5, -1, 0]) = [0.25, -0.3, 0]; score 2 at t = 2
    expected = torch.tensor([[-0.05 + 0.25, -0.3, 0.05 + 2.0, 0.0]], dtype=DTYPE)
    torch.testing.assert_close(terms.token_level_rewards, expected)
    torch.testing.assert_close(
        terms.token_level_rewards, -0.1 * terms.kl + terms.dpo_rewards + terms.score_rewards
    )
    for name in ("token_level_rewards", "dpo_rewards", "kl", "score_rewards", "dpo_token_rewards"):
        assert not getattr(terms, name).requires_grad, name


# ---------------------------------------------------------------------------------------------------
# reward redistribution (RTO section 5 ablations)
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(batch=ragged_batch(), delim_seed=st.integers(0, 2**31 - 1))
def test_redistribution_preserves_sums(batch, delim_seed):
    gen, b, t, mask = unpack(batch)
    lengths = batch[1]
    r = rand(gen, (b, t)) * mask
    delim = torch.rand(b, t, generator=torch.Generator().manual_seed(delim_seed)) < 0.3
    sums = r.sum(-1)
    last = torch.tensor(lengths) - 1
    for mode in ("rto", "semi_rto", "ddpo"):
        out = core.redistribute_dpo_rewards(r, mask, mode, delimiter_mask=delim)
        torch.testing.assert_close(out.sum(-1), sums, msg=mode)
        assert torch.all(out[~mask.bool()] == 0), mode
    torch.testing.assert_close(core.redistribute_dpo_rewards(r, mask, "rto"), r)
    ddpo = core.redistribute_dpo_rewards(r, mask, "ddpo")
    torch.testing.assert_close(ddpo[torch.arange(b), last], sums)
    torch.testing.assert_close(ddpo.abs().sum(-1), sums.abs())  # nothing anywhere else
    rs = core.redistribute_dpo_rewards(r, mask, "rs_ppo")
    torch.testing.assert_close(rs.sum(-1), torch.zeros(b, dtype=DTYPE))
    semi = core.redistribute_dpo_rewards(r, mask, "semi_rto", delimiter_mask=delim)
    ends = (delim & mask.bool()).clone()
    ends[torch.arange(b), last] = True
    assert torch.all(semi[~ends] == 0)  # rewards only on delimiters and the last token


def test_redistribution_semi_rto_hand_example():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=DTYPE)
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 0.0]], dtype=DTYPE)
    delim = torch.tensor([[False, True, False, True, False, True]])  # the one on the pad is ignored
    out = core.redistribute_dpo_rewards(r, mask, "semi_rto", delimiter_mask=delim)
    torch.testing.assert_close(out, torch.tensor([[0.0, 3.0, 0.0, 7.0, 5.0, 0.0]], dtype=DTYPE))
    out_rs = core.redistribute_dpo_rewards(r, mask, "rs_ppo")
    torch.testing.assert_close(out_rs, torch.tensor([[1.0, 2.0, 3.0, 4.0, -10.0, 0.0]], dtype=DTYPE))


class _Explodes:
    """Stands in for dpo_logprobs: any use raises."""

    def __getattr__(self, name):
        raise AssertionError(f"dpo_logprobs was touched ({name})")

    def __sub__(self, other):
        raise AssertionError("dpo_logprobs was touched (-)")

    __rsub__ = __sub__


@pytest.mark.parametrize(("mode", "beta1"), [("rto", 0.0), ("ppo", 0.05), ("ddpo", 0.0)])
def test_beta1_zero_never_touches_dpo_logprobs(mode, beta1):
    mask = make_mask([2, 3], 3)
    logp, ref = torch.full((2, 3), -1.0, dtype=DTYPE), torch.full((2, 3), -1.2, dtype=DTYPE)
    for dpo in (_Explodes(), None):
        terms = core.compute_rto_rewards(
            torch.ones(2, dtype=DTYPE), logp, ref, mask, beta2=0.1, beta1=beta1, dpo_logprobs=dpo, mode=mode
        )
        assert torch.all(terms.dpo_rewards == 0)
        torch.testing.assert_close(
            terms.token_level_rewards.sum(-1), torch.tensor([1 - 0.04, 1 - 0.06], dtype=DTYPE)
        )


# ---------------------------------------------------------------------------------------------------
# score normalization and missing EOS
# ---------------------------------------------------------------------------------------------------


def test_normalize_score_and_missing_eos_penalty():
    s = torch.tensor([1.0, 3.0, 100.0, -100.0], dtype=DTYPE)
    torch.testing.assert_close(
        core.normalize_score(s, mean=1.0, std=2.0), torch.tensor([0.0, 1.0, 10.0, -10.0], dtype=DTYPE)
    )
    assert core.normalize_score(s, mean=0.0, std=1.0, clip=None)[2].item() == 100.0
    has_eos = torch.tensor([True, False, True, False])
    torch.testing.assert_close(
        core.apply_missing_eos_penalty(s, has_eos, -5.0), torch.tensor([1.0, -5.0, 100.0, -5.0], dtype=DTYPE)
    )
    torch.testing.assert_close(
        core.apply_missing_eos_penalty(s, has_eos, 1.0, subtract=True),
        torch.tensor([1.0, 2.0, 100.0, -101.0], dtype=DTYPE),
    )
    assert core.apply_missing_eos_penalty(s, has_eos, None) is s


# ---------------------------------------------------------------------------------------------------
# REINFORCE++ and registries
# ---------------------------------------------------------------------------------------------------


def test_reinforce_plus_plus_hand_example_and_registry():
    mask = make_mask([3, 2], 3)
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, 9.0]], dtype=DTYPE)
    ret = core.reinforce_plus_plus_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[1.5, 1.0, 2.0], [2.0, 4.0, 0.0]], dtype=DTYPE))
    adv, ret2 = core.get_advantage_estimator("reinforce++")(rewards, None, mask, gamma=0.5, lam=0.95)
    torch.testing.assert_close(ret2, ret)
    torch.testing.assert_close(adv, core.masked_whiten(ret, mask))
    assert core.get_advantage_estimator("gae") is core.gae_advantages
    assert set(core.ADVANTAGE_ESTIMATORS) == {"gae", "reinforce++"}


# ---------------------------------------------------------------------------------------------------
# PPO losses (inv 2 and hand examples)
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(batch=ragged_batch())
def test_inv2_ratio_one_clipfrac_zero_approxkl_zero(batch):
    gen, b, t, mask = unpack(batch)
    logp = (rand(gen, (b, t)) - 2).requires_grad_(True)
    adv = rand(gen, (b, t))
    loss, stats = core.ppo_policy_loss(logp, logp.detach().clone(), adv, mask)
    for key in ("ratio_mean", "ratio_min", "ratio_max"):
        assert stats[key].item() == 1.0, key
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0
    torch.testing.assert_close(loss, -core.masked_mean(adv, mask))
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, -adv * mask / mask.sum())


def test_ppo_clipping_hand_example():
    mask = torch.ones(1, 4, dtype=DTYPE)
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]], dtype=DTYPE)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=DTYPE)
    old = torch.zeros(1, 4, dtype=DTYPE)
    logp = ratio.log().requires_grad_(True)
    loss, stats = core.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token: max(-A r, -A clip(r)) = [-1.2 (clipped), -0.5, 0.8 (clipped), 1.5]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    (g,) = torch.autograd.grad(loss, logp)  # clipped tokens get no gradient; d(-A r)/dlogp = -A r
    torch.testing.assert_close(g, torch.tensor([[0.0, -0.5 / 4, 0.0, 1.5 / 4]], dtype=DTYPE))


def test_ppo_dual_clip_hand_example():
    mask = torch.ones(1, 3, dtype=DTYPE)
    ratio = torch.tensor([[5.0, 5.0, 2.0]], dtype=DTYPE)
    adv = torch.tensor([[-1.0, 1.0, -1.0]], dtype=DTYPE)
    logp = ratio.log().requires_grad_(True)
    plain, _ = core.ppo_policy_loss(logp, torch.zeros(1, 3, dtype=DTYPE), adv, mask)
    assert plain.item() == pytest.approx((5.0 - 1.2 + 2.0) / 3)
    loss, stats = core.ppo_policy_loss(logp, torch.zeros(1, 3, dtype=DTYPE), adv, mask, dual_clip=3.0)
    # A < 0 and -A r = 5 > 3 -> bounded at 3; A > 0 untouched; -A r = 2 < 3 untouched
    assert loss.item() == pytest.approx((3.0 - 1.2 + 2.0) / 3)
    assert stats["dual_clipfrac"].item() == pytest.approx(1 / 3)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0, 2.0 / 3]], dtype=DTYPE))
    reg_loss, _ = core.get_policy_loss("dual_clip")(logp, torch.zeros(1, 3, dtype=DTYPE), adv, mask)
    torch.testing.assert_close(reg_loss, loss)
    assert core.get_policy_loss("ppo") is core.ppo_policy_loss


def test_value_loss_clipping_hand_example():
    mask = torch.tensor([[1, 1, 0]], dtype=DTYPE)
    values = torch.tensor([[1.0, 1.0, 7.0]], dtype=DTYPE, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]], dtype=DTYPE)
    returns = torch.tensor([[2.0, -1.0, 3.0]], dtype=DTYPE)
    loss, stats = core.value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 0: V_clip = 0.2, errors 1 vs 3.24 -> 1.62 (clipped); token 1: 4 vs 1.44 -> 2.0
    assert loss.item() == pytest.approx((1.62 + 2.0) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    (g,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.5 * 2 * (1.0 + 1.0) / 2, 0.0]], dtype=DTYPE))
    unclipped, st_ = core.value_loss(values, old, returns, mask, clip_eps=None)
    assert unclipped.item() == pytest.approx((0.5 * 1 + 0.5 * 4) / 2)
    assert st_["vf_clipfrac"].item() == 0.0


# ---------------------------------------------------------------------------------------------------
# preference losses
# ---------------------------------------------------------------------------------------------------


def _t(*xs):
    return torch.tensor(xs, dtype=DTYPE)


def test_dpo_loss_zero_margin_is_log2():
    z = torch.zeros(3, dtype=DTYPE)
    losses, cr, rr = core.dpo_loss(z - 1, z - 2, z - 1, z - 2, beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2.0), dtype=DTYPE))
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_dpo_ipo_cdpo_hand_values():
    pc, pr, rc, rr = _t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0)  # h = 1 - (-1) = 2
    losses, chosen_r, rejected_r = core.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)))
    assert chosen_r.item() == pytest.approx(0.1) and rejected_r.item() == pytest.approx(-0.1)
    ipo, _, _ = core.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((2.0 - 5.0) ** 2)
    cdpo, _, _ = core.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="cdpo", label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))
    assert cdpo.item() == pytest.approx(expected)
    smoothed, _, _ = core.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(expected)


def test_dpo_loss_gradient_signs_and_detached_rewards():
    pc = _t(-1.0, -4.0).requires_grad_(True)
    pr = _t(-2.0, -1.0).requires_grad_(True)
    for loss_type in ("sigmoid", "ipo"):
        losses, cr, rr = core.dpo_loss(pc, pr, _t(-2.0, -2.0), _t(-2.0, -2.0), beta=0.1, loss_type=loss_type)
        gc, gr = torch.autograd.grad(losses.sum(), (pc, pr))
        assert torch.all(gc < 0), loss_type  # raising log pi(y_w) lowers the loss (IPO: h < 1/(2 beta))
        assert torch.all(gr > 0), loss_type
        assert not cr.requires_grad and not rr.requires_grad


def test_bradley_terry_loss_matches_logsigmoid():
    c, r = _t(1.0, -0.5, 3.0), _t(0.0, 0.5, 3.0)
    torch.testing.assert_close(core.bradley_terry_loss(c, r), -F.logsigmoid(c - r))
    assert core.bradley_terry_loss(_t(0.0), _t(0.0)).item() == pytest.approx(math.log(2.0))
    m = _t(0.5, 0.0, 1.0)
    torch.testing.assert_close(core.bradley_terry_loss(c, r, margin=m), -F.logsigmoid(c - r - m))
    cg = c.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(core.bradley_terry_loss(cg, r).sum(), cg)
    assert torch.all(g < 0)


# ---------------------------------------------------------------------------------------------------
# diagnostics and KL controllers
# ---------------------------------------------------------------------------------------------------


def test_entropy_from_logits_matches_direct_formula_incl_large_logits():
    gen = torch.Generator().manual_seed(1)
    logits = rand(gen, (2, 3, 7), 2.0)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(core.entropy_from_logits(logits), -(p * p.log()).sum(-1))
    uniform = torch.zeros(1, 1, 11, dtype=DTYPE)
    assert core.entropy_from_logits(uniform).item() == pytest.approx(math.log(11))
    big = logits + 1e4  # a shift changes nothing, and nothing overflows
    torch.testing.assert_close(
        core.entropy_from_logits(big), core.entropy_from_logits(logits), atol=1e-9, rtol=0
    )
    peaked = torch.tensor([[[1e4, 0.0, -1e4]]], dtype=torch.float32)
    h = core.entropy_from_logits(peaked)
    assert torch.isfinite(h).all() and h.item() == pytest.approx(0.0, abs=1e-6)


def test_explained_variance():
    mask = make_mask([3, 2], 3)
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]], dtype=DTYPE)
    assert core.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(0.0)
    assert math.isnan(core.explained_variance(returns, torch.ones_like(returns), mask).item())


def test_kl_controllers():
    fixed = core.FixedKLController(0.01)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.01
    ada = core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ada.update(12.0, 1000)  # error clipped to +0.2
    assert ada.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ada2 = core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ada2.update(4.5, 1000)  # error -0.25 clipped to -0.2
    assert ada2.value == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    ada3 = core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ada3.update(6.6, 1000)  # error 0.1
    assert ada3.value == pytest.approx(0.1 * (1 + 0.1 * 0.1))


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------


def test_bad_input_raises_value_error_naming_field():
    mask = make_mask([2], 2)
    x = torch.zeros(1, 2, dtype=DTYPE)
    s = torch.zeros(1, dtype=DTYPE)
    with pytest.raises(ValueError, match="beta1"):
        core.dpo_token_reward(x, x, mask, beta1=-0.1)
    with pytest.raises(ValueError, match="beta1"):
        core.compute_rto_rewards(s, x, x, mask, beta2=0.1, beta1=-0.1, dpo_logprobs=x)
    with pytest.raises(ValueError, match="beta2"):
        core.compute_rto_rewards(s, x, x, mask, beta2=-0.1)
    with pytest.raises(ValueError, match="dpo_logprobs"):
        core.compute_rto_rewards(s, x, x, mask, beta2=0.1, beta1=0.1)
    with pytest.raises(ValueError, match="mode"):
        core.compute_rto_rewards(s, x, x, mask, beta2=0.1, mode="rtoo")
    with pytest.raises(ValueError, match="mode"):
        core.redistribute_dpo_rewards(x, mask, "nope")
    with pytest.raises(ValueError, match="delimiter_mask"):
        core.redistribute_dpo_rewards(x, mask, "semi_rto")
    with pytest.raises(ValueError, match="advantage_estimator"):
        core.get_advantage_estimator("vtrace")
    with pytest.raises(ValueError, match="policy_loss"):
        core.get_policy_loss("grpo")
    with pytest.raises(ValueError, match="kind"):
        core.kl_penalty(x, x, kind="k4")
    with pytest.raises(ValueError, match="kind"):
        core.compute_rto_rewards(s, x, x, mask, beta2=0.1, kl_kind="k4")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        core.aggregate_loss(x, mask, "sum")
    with pytest.raises(ValueError, match="dual_clip"):
        core.ppo_policy_loss(x, x, x, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        core.dpo_loss(s, s, s, s, loss_type="hinge2")
    with pytest.raises(ValueError, match="label_smoothing"):
        core.dpo_loss(s, s, s, s, loss_type="cdpo")
    with pytest.raises(ValueError, match="clip"):
        core.dpo_token_reward(x, x, mask, beta1=0.1, clip=0.0)
    with pytest.raises(ValueError, match="no valid token"):
        core.last_valid_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="target"):
        core.AdaptiveKLController(0.1, target=0.0, horizon=1.0)
