"""The RTO algorithm core: small pure torch functions shared by the simulator and the LLM trainer.

Every equation of "DPO Meets PPO: Reinforced Token Optimization for RLHF" (Zhong et al., ICML 2025)
that the trainers use lives here exactly once: masked statistics, log-probs, DPO/IPO/cDPO and
Bradley-Terry losses, KL estimators, the RTO token reward (RTO eq. 4.7) and its ablations (Semi-RTO,
DDPO, RS-PPO), GAE and REINFORCE++ advantages, the PPO policy and value losses, and KL controllers.

Conventions
-----------
- Token tensors are ``(B, T)`` over *response* tokens, with a float or bool ``mask`` ``(B, T)`` that is
  1 on generated tokens through the first EOS (inclusive) and 0 on pads.
- Rewards, advantages and returns are computed without grad (inputs are detached).
- This module imports torch and the standard library only (no transformers, no deepspeed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "microbatch_loss_weight",
    "gather_logprobs",
    "sequence_logprob",
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "bradley_terry_loss",
    "KL_KINDS",
    "kl_penalty",
    "last_valid_index",
    "dpo_token_reward",
    "REDISTRIBUTION_MODES",
    "redistribute_dpo_rewards",
    "normalize_score",
    "apply_missing_eos_penalty",
    "REWARD_MODES",
    "RewardTerms",
    "compute_rto_rewards",
    "gae_advantages",
    "reinforce_plus_plus_returns",
    "reinforce_plus_plus_advantages",
    "ADVANTAGE_ESTIMATORS",
    "get_advantage_estimator",
    "ppo_policy_loss",
    "POLICY_LOSSES",
    "get_policy_loss",
    "value_loss",
    "entropy_from_logits",
    "explained_variance",
    "FixedKLController",
    "AdaptiveKLController",
]


# ---------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------


def _as_float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Return ``mask`` as a tensor of ``like``'s float dtype and device."""
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return mask.to(device=like.device, dtype=dtype)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask`` is 1.

    Args:
        x: values, any shape, typically ``(B, T)``.
        mask: same shape as ``x``; float or bool, 1 on valid entries.
        dim: reduce over this dimension; ``None`` (default) reduces over everything.

    Returns:
        A scalar (``dim=None``) or ``x`` reduced over ``dim`` (e.g. ``(B,)`` for ``dim=-1``).
        Masked entries contribute exactly 0 even when they hold ``nan``/``inf``.
    """
    m = _as_float_mask(mask, x)
    masked = torch.where(m.bool(), x, torch.zeros_like(x))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1.

    Args:
        x: values, any shape, typically ``(B, T)``.
        mask: same shape as ``x``; float or bool.
        dim: reduce over this dimension; ``None`` (default) reduces over everything.

    Returns:
        Scalar or reduced tensor. A slice with no valid entry gives 0 (the count is clamped to 1).
    """
    m = _as_float_mask(mask, x)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, m, dim) / count.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all entries where ``mask`` is 1 (scalar).

    Args:
        x: values, any shape.
        mask: same shape as ``x``.
        unbiased: divide by ``n - 1`` (Bessel correction, default ``True``) instead of ``n``.

    Raises:
        ValueError: ``unbiased=True`` with fewer than 2 valid entries.
    """
    m = _as_float_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        if n.item() < 2:
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 valid entries in mask, got {n.item():g}"
            )
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with the mean and std of its valid entries: ``(x - mean) / sqrt(var + eps)``.

    Used for advantage whitening over the whole rollout buffer (valid tokens only).

    Args:
        x: values, any shape, typically advantages ``(B, T)``.
        mask: same shape as ``x``.
        shift_mean: subtract the mean (default ``True``); ``False`` only rescales, keeping the mean
            (the OpenRLHF/TRL convention for rewards).
        eps: added to the variance (default ``1e-8``).

    Returns:
        Same shape as ``x``; pads are exactly 0. The variance is the unbiased one (n - 1) when
        there are at least 2 valid entries, so the unbiased masked std of the output is 1.
    """
    m = _as_float_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=bool(m.sum().item() >= 2))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------------------
# Loss reduction (the one helper that owns token-mean vs sequence-mean)
# ---------------------------------------------------------------------------------------------------

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def aggregate_loss(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar.

    Modes:
        - ``"token-mean"`` (default): sum over valid tokens / number of valid tokens in the batch.
        - ``"seq-mean-token-sum"``: per-sequence sum over valid tokens, then mean over sequences.
        - ``"seq-mean-token-mean"``: per-sequence mean over valid tokens, then mean over sequences.

    Gradient accumulation: the three modes are *not* additive over micro-batches as written. For
    ``"token-mean"`` a micro-batch loss must be multiplied by ``n_tokens(micro) / n_tokens(batch)``
    (not by ``1 / n_micro``); for the two seq-mean modes by ``n_seqs(micro) / n_seqs(batch)``. Summing
    the weighted micro-batch losses then equals the full-batch loss, and so do the gradients. Use
    :func:`microbatch_loss_weight` for that factor.

    Args:
        loss_mat: per-token losses ``(B, T)``.
        mask: ``(B, T)`` valid-token mask.
        mode: one of :data:`LOSS_AGG_MODES`.

    Returns:
        Scalar loss.
    """
    m = _as_float_mask(mask, loss_mat)
    if mode == "token-mean":
        return masked_mean(loss_mat, m)
    if mode == "seq-mean-token-sum":
        return masked_sum(loss_mat, m, dim=-1).mean()
    if mode == "seq-mean-token-mean":
        return masked_mean(loss_mat, m, dim=-1).mean()
    raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")


def microbatch_loss_weight(micro_mask: Tensor, batch_mask: Tensor, mode: str = "token-mean") -> float:
    """Weight for a micro-batch loss so that accumulated gradients equal the full-batch gradient.

    ``sum_k weight_k * aggregate_loss(loss_k, mask_k, mode) == aggregate_loss(loss, mask, mode)``.

    Args:
        micro_mask: ``(b, T)`` mask of the micro-batch.
        batch_mask: ``(B, T)`` mask of the whole (optimizer-step) batch, or any tensor whose valid
            count / row count equals the full batch's.
        mode: one of :data:`LOSS_AGG_MODES` (default ``"token-mean"``).

    Returns:
        ``n_tokens(micro) / n_tokens(batch)`` for token-mean, ``n_seqs(micro) / n_seqs(batch)``
        otherwise.
    """
    if mode == "token-mean":
        total = float(batch_mask.float().sum().item())
        return float(micro_mask.float().sum().item()) / max(total, 1.0)
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return micro_mask.shape[0] / batch_mask.shape[0]
    raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------------


def gather_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token log-probabilities ``log softmax(logits / temperature)[tokens]``.

    The logits must already be aligned with the tokens (logits at position t predict token t).

    Args:
        logits: ``(B, T, V)``.
        tokens: ``(B, T)`` long token ids.
        temperature: sampling temperature T (default 1.0). Use the rollout temperature for pi,
            pi_old and pi_ref; the DPO implicit reward uses the unscaled model (T = 1).

    Returns:
        ``(B, T)`` log-probs in float32 (or the logits' dtype if wider).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return torch.gather(logp, dim=-1, index=tokens.long().unsqueeze(-1)).squeeze(-1)


def sequence_logprob(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sequence log-probability ``log pi(y | x) = sum_t m_t log pi(y_t | x, y_<t)``.

    Args:
        token_logprobs: ``(B, T)``.
        mask: ``(B, T)``.

    Returns:
        ``(B,)``.
    """
    return masked_sum(token_logprobs, mask, dim=-1)


# ---------------------------------------------------------------------------------------------------
# Preference losses: DPO / IPO / cDPO and Bradley-Terry
# ---------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "cdpo")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023), IPO (Azar et al. 2023) and conservative DPO losses.

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):

    - ``"sigmoid"``: ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)`` with
      ``eps = label_smoothing`` (default 0: plain DPO).
    - ``"cdpo"``: the same formula (conservative DPO, Mitchell 2023); ``label_smoothing`` must be
      in ``(0, 0.5)``.
    - ``"ipo"``: ``(h - 1 / (2 beta))^2``. h is built from whatever the caller passes: sequence *sums*
      of token log-probs here (the IPO paper's definition); TRL's ``ipo`` passes per-token *averages*
      instead. To get that variant, pass ``sequence_logprob / length``.

    Args:
        policy_chosen_logps: ``(B,)`` log pi(y_w | x).
        policy_rejected_logps: ``(B,)`` log pi(y_l | x).
        ref_chosen_logps: ``(B,)`` log pi_ref(y_w | x).
        ref_rejected_logps: ``(B,)`` log pi_ref(y_l | x).
        beta: DPO temperature beta (default 0.1), > 0.
        loss_type: one of :data:`DPO_LOSS_TYPES` (default ``"sigmoid"``).
        label_smoothing: eps, the assumed probability that a label is flipped (default 0.0).

    Returns:
        ``(losses (B,), chosen_rewards (B,), rejected_rewards (B,))``; the implicit rewards
        ``beta * (log pi - log pi_ref)`` are detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type in ("sigmoid", "cdpo"):
        if loss_type == "cdpo" and label_smoothing == 0.0:
            raise ValueError("loss_type='cdpo' needs label_smoothing in (0, 0.5), got 0.0")
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Pairwise Bradley-Terry reward-model loss ``-log sigmoid(r(y_w) - r(y_l) - margin)``.

    Args:
        chosen_scores: ``(B,)`` r(x, y_w).
        rejected_scores: ``(B,)`` r(x, y_l).
        margin: optional ``(B,)`` or scalar margin (Llama-2 style); ``None`` (default) means 0.

    Returns:
        ``(B,)`` per-pair losses.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


# ---------------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence")
# ---------------------------------------------------------------------------------------------------

KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1", mask: Tensor | None = None
) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With ``log_r = log pi(y_t) - log pi_ref(y_t)``:

    - ``"k1"`` (default): ``log_r``; unbiased, can be negative per token. This is the term that
      enters the RTO reward as ``-beta2 * k1`` (practice.md section 1).
    - ``"k2"``: ``0.5 * log_r^2``; biased, >= 0.
    - ``"k3"``: ``exp(-log_r) - 1 + log_r``; unbiased, >= 0.

    Args:
        logprobs: ``(B, T)`` log pi (the rollout policy pi_old when building rewards).
        ref_logprobs: ``(B, T)`` log pi_ref, at the same temperature.
        kind: one of :data:`KL_KINDS`.
        mask: optional ``(B, T)``; if given, masked positions are exactly 0 in the output.

    Returns:
        ``(B, T)`` per-token estimates.
    """
    log_r = logprobs - ref_logprobs
    if mask is not None:
        log_r = torch.where(mask.bool(), log_r, torch.zeros_like(log_r))
    if kind == "k1":
        kl = log_r
    elif kind == "k2":
        kl = 0.5 * log_r**2
    elif kind == "k3":
        kl = torch.expm1(-log_r) + log_r
    else:
        raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")
    return kl


# ---------------------------------------------------------------------------------------------------
# RTO reward assembly (RTO eq. 4.7; practice.md section 1; theory.md section 8)
# ---------------------------------------------------------------------------------------------------


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last valid (mask = 1) token of each row: the EOS token, or the last token when
    the response was truncated.

    Args:
        mask: ``(B, T)``.

    Returns:
        ``(B,)`` long.

    Raises:
        ValueError: some row has no valid token.
    """
    valid = mask.bool()
    empty = ~valid.any(dim=-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"mask has rows with no valid token (rows {rows}); every response needs >= 1 token")
    T = valid.shape[-1]
    return (T - 1 - valid.flip(-1).long().argmax(dim=-1)).long()


def dpo_token_reward(
    dpo_logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    beta1: float,
    clip: float | None = None,
) -> Tensor:
    """RTO's dense DPO token reward ``clip(beta1 * (log pi_dpo(y_t) - log pi_ref(y_t)), -c, c) * m_t``.

    pi_ref is the model the DPO model was trained against. Both log-probs are taken on the
    *unscaled* models (temperature 1): the DPO implicit reward is defined there.

    Args:
        dpo_logprobs: ``(B, T)`` log pi_dpo.
        ref_logprobs: ``(B, T)`` log pi_ref.
        mask: ``(B, T)``.
        beta1: beta1 >= 0, the DPO reward scale (paper 0.05).
        clip: per-token clip c > 0 (paper 0.05, authors' code); ``None`` (default) means no clip.

    Returns:
        ``(B, T)`` detached rewards, exactly 0 on pads.
    """
    if beta1 < 0:
        raise ValueError(f"beta1 must be >= 0 (0 switches the DPO reward off), got {beta1}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip (dpo_clip) must be > 0 or None, got {clip}")
    m = mask.bool()
    log_r = torch.where(m, dpo_logprobs.detach() - ref_logprobs.detach(), torch.zeros_like(dpo_logprobs))
    r = beta1 * log_r
    if clip is not None:
        r = r.clamp(-clip, clip)
    return torch.where(m, r, torch.zeros_like(r))


REDISTRIBUTION_MODES = ("rto", "semi_rto", "ddpo", "rs_ppo")


def _at_last_valid(values: Tensor, mask: Tensor) -> Tensor:
    """Place ``values`` ``(B,)`` on each row's last valid token of a zero ``(B, T)`` tensor."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.scatter(-1, last_valid_index(mask).unsqueeze(-1), values.unsqueeze(-1))


def redistribute_dpo_rewards(
    dpo_rewards: Tensor, mask: Tensor, mode: str, delimiter_mask: Tensor | None = None
) -> Tensor:
    """Move DPO token rewards in time for the RTO ablations (RTO section 5).

    Modes:
        - ``"rto"``: unchanged (dense rewards on every token).
        - ``"semi_rto"``: the sum of each segment's rewards is moved to the segment's delimiter token
          (``delimiter_mask``, e.g. sentence ends); tokens after the last delimiter form a segment
          that ends at the last valid token.
        - ``"ddpo"``: the whole sum is moved to the last valid token (delayed DPO reward).
        - ``"rs_ppo"``: dense rewards minus their sum at the last valid token (reward shaping: the
          per-sequence total equals PPO's).

    Per-sequence sums are preserved for rto / semi_rto / ddpo and are 0 for rs_ppo.

    Args:
        dpo_rewards: ``(B, T)`` output of :func:`dpo_token_reward` (already clipped and masked).
        mask: ``(B, T)``.
        mode: one of :data:`REDISTRIBUTION_MODES`.
        delimiter_mask: ``(B, T)`` bool, True on delimiter tokens; required for ``"semi_rto"``.
            Delimiters on pads are ignored.

    Returns:
        ``(B, T)``, 0 on pads.
    """
    m = mask.bool()
    r = torch.where(m, dpo_rewards, torch.zeros_like(dpo_rewards))
    if mode == "rto":
        return r
    if mode == "ddpo":
        return _at_last_valid(r.sum(-1), mask)
    if mode == "rs_ppo":
        return r - _at_last_valid(r.sum(-1), mask)
    if mode == "semi_rto":
        if delimiter_mask is None:
            raise ValueError("redistribute_dpo_rewards(mode='semi_rto') needs delimiter_mask (B, T)")
        if delimiter_mask.shape != mask.shape:
            raise ValueError(
                f"delimiter_mask shape {tuple(delimiter_mask.shape)} != mask {tuple(mask.shape)}"
            )
        last = torch.zeros_like(m).scatter(-1, last_valid_index(mask).unsqueeze(-1), True)
        ends = (delimiter_mask.bool() & m) | last  # (B, T) segment ends
        ends_l = ends.long()
        seg_id = ends_l.cumsum(-1) - ends_l  # (B, T) number of segment ends strictly before t
        seg_sum = torch.zeros_like(r).scatter_add(-1, seg_id, r)  # (B, T) indexed by segment id
        return torch.where(ends & m, seg_sum.gather(-1, seg_id), torch.zeros_like(r))
    raise ValueError(f"mode must be one of {REDISTRIBUTION_MODES}, got {mode!r}")


def normalize_score(score: Tensor, mean: float = 0.0, std: float = 1.0, clip: float | None = 10.0) -> Tensor:
    """Normalized, clipped reward-model score ``clip((r - mean) / std, -clip, clip)``.

    Args:
        score: ``(B,)`` raw RM scores r_RM(x, y).
        mean: RM score mean saved with the reward model (default 0.0).
        std: RM score std (default 1.0), > 0.
        clip: clip bound (default 10.0); ``None`` disables clipping.

    Returns:
        ``(B,)``.
    """
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    out = (score - mean) / std
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


def apply_missing_eos_penalty(
    score: Tensor, has_eos: Tensor, penalty: float | None, subtract: bool = False
) -> Tensor:
    """Apply the missing-EOS penalty to completions that did not finish.

    Args:
        score: ``(B,)`` (normalized) scores R.
        has_eos: ``(B,)`` bool, True when the *completion* (never the prompt) contains EOS.
        penalty: the score given to unfinished completions (practice.md: "R = ..., or the
            missing-EOS penalty when y has no EOS"); ``None`` returns ``score`` unchanged.
        subtract: if True, subtract ``penalty`` from the score instead of replacing it (TRL's
            ``missing_eos_penalty`` convention). Default False.

    Returns:
        ``(B,)``.
    """
    if penalty is None:
        return score
    pen = score - penalty if subtract else torch.full_like(score, float(penalty))
    return torch.where(has_eos.bool().to(score.device), score, pen)


REWARD_MODES = ("ppo",) + REDISTRIBUTION_MODES


@dataclass
class RewardTerms:
    """The per-token reward and its parts (RTO eq. 4.7). All tensors ``(B, T)``, 0 on pads, no grad.

    ``token_level_rewards == -kl_coef * kl + dpo_rewards + score_rewards``.
    """

    token_level_rewards: Tensor  # (B, T) r_t, the reward PPO optimizes
    dpo_rewards: Tensor  # (B, T) DPO term as added to r_t (after clip and redistribution)
    kl: Tensor  # (B, T) per-token KL estimate (kind kl_kind), not scaled by beta2
    score_rewards: Tensor  # (B, T) beta3 * R at the last valid token, 0 elsewhere
    dpo_token_rewards: Tensor  # (B, T) clipped dense DPO reward before redistribution (for logging)
    kl_coef: float = 0.0  # beta2 used

    @property
    def non_score_rewards(self) -> Tensor:
        """``(B, T)`` the KL term ``-beta2 * kl`` (TRL's non_score_reward)."""
        return -self.kl_coef * self.kl


def compute_rto_rewards(
    score: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    beta2: float,
    beta3: float = 1.0,
    dpo_logprobs: Tensor | None = None,
    beta1: float = 0.0,
    dpo_clip: float | None = None,
    mode: str = "rto",
    kl_kind: str = "k1",
    delimiter_mask: Tensor | None = None,
    dpo_ref_logprobs: Tensor | None = None,
) -> RewardTerms:
    """The RTO token reward (RTO eq. 4.7, practice.md section 1)::

        r_t = -beta2 * kl_t + redistribute(clip(beta1 * (log pi_dpo - log pi_ref)(y_t), -c, c))
              + [t = last valid] * beta3 * R

    ``mode="ppo"`` or ``beta1 == 0`` gives plain PPO's reward: the DPO term is skipped entirely and
    ``dpo_logprobs`` is never touched (it may be None, so no DPO forward pass is needed).

    Args:
        score: ``(B,)`` sequence score R (normalized, clipped, missing-EOS penalty applied).
        logprobs: ``(B, T)`` log pi_old at the rollout temperature.
        ref_logprobs: ``(B, T)`` log pi_ref at the rollout temperature (KL term).
        mask: ``(B, T)`` response mask through the first EOS.
        beta2: KL coefficient beta2 >= 0 (paper 0.01, fixed).
        beta3: score scale beta3 >= 0 (default 1.0).
        dpo_logprobs: ``(B, T)`` log pi_dpo on the unscaled model; needed when beta1 > 0 and
            mode != "ppo".
        beta1: DPO reward scale beta1 >= 0 (default 0.0 = off; paper 0.05).
        dpo_clip: per-token clip c (default None = no clip; paper 0.05).
        mode: one of :data:`REWARD_MODES` (default ``"rto"``).
        kl_kind: KL estimator, one of :data:`KL_KINDS` (default ``"k1"``).
        delimiter_mask: ``(B, T)`` bool delimiters, required for ``mode="semi_rto"``.
        dpo_ref_logprobs: ``(B, T)`` log pi_ref for the DPO term on the unscaled model; default
            None reuses ``ref_logprobs`` (correct when the rollout temperature is 1 and the DPO
            reference is the PPO reference).

    Returns:
        :class:`RewardTerms`.
    """
    if mode not in REWARD_MODES:
        raise ValueError(f"mode must be one of {REWARD_MODES}, got {mode!r}")
    if beta1 < 0:
        raise ValueError(f"beta1 must be >= 0 (0 switches the DPO reward off), got {beta1}")
    if beta2 < 0:
        raise ValueError(f"beta2 must be >= 0, got {beta2}")
    if beta3 < 0:
        raise ValueError(f"beta3 must be >= 0, got {beta3}")
    with torch.no_grad():
        m = mask.bool()
        zeros = torch.zeros(mask.shape, dtype=logprobs.dtype, device=logprobs.device)
        kl = kl_penalty(logprobs.detach(), ref_logprobs.detach(), kind=kl_kind, mask=m)
        score_rewards = _at_last_valid(beta3 * score.detach().to(zeros.dtype), mask)
        if mode == "ppo" or beta1 == 0:
            dpo_dense, dpo = zeros, zeros
        else:
            if dpo_logprobs is None:
                raise ValueError(f"dpo_logprobs is required when beta1 > 0 and mode={mode!r}")
            dpo_ref = ref_logprobs if dpo_ref_logprobs is None else dpo_ref_logprobs
            dpo_dense = dpo_token_reward(dpo_logprobs, dpo_ref, m, beta1, clip=dpo_clip)
            dpo = redistribute_dpo_rewards(dpo_dense, m, mode, delimiter_mask=delimiter_mask)
        rewards = -beta2 * kl + dpo + score_rewards
        rewards = torch.where(m, rewards, zeros)
    return RewardTerms(
        token_level_rewards=rewards,
        dpo_rewards=dpo,
        kl=kl,
        score_rewards=score_rewards,
        dpo_token_rewards=dpo_dense,
        kl_coef=float(beta2),
    )


# ---------------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016).

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``returns_t = A_t + V_t``. The value after the terminal (last valid) token is 0: values and
    rewards on pads are zeroed first, so nothing leaks back from pads. ``mask`` is expected to be a
    contiguous prefix per row (right padding), as produced by "through the first EOS".

    Args:
        rewards: ``(B, T)`` token-level rewards r_t.
        values: ``(B, T)`` critic values V(s_t) from the rollout.
        mask: ``(B, T)``.
        gamma: discount (default 1.0).
        lam: GAE lambda (default 0.95).

    Returns:
        ``(advantages (B, T), returns (B, T))``, detached, 0 on pads. Not whitened.
    """
    m = mask.bool()
    r = torch.where(m, rewards.detach(), torch.zeros_like(rewards))
    v = torch.where(m, values.detach(), torch.zeros_like(values))
    T = r.shape[-1]
    advantages = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = torch.where(m, advantages, torch.zeros_like(advantages))
    returns = torch.where(m, advantages + v, torch.zeros_like(advantages))
    return advantages, returns


@torch.no_grad()
def reinforce_plus_plus_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go ``G_t = sum_{k >= t} gamma^(k - t) r_k`` over valid tokens.

    Args:
        rewards: ``(B, T)``.
        mask: ``(B, T)``.
        gamma: discount (default 1.0).

    Returns:
        ``(B, T)`` detached, 0 on pads.
    """
    m = mask.bool()
    r = torch.where(m, rewards.detach(), torch.zeros_like(rewards))
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[-1])):
        running = r[:, t] + gamma * running
        returns[:, t] = running
    return torch.where(m, returns, torch.zeros_like(returns))


@torch.no_grad()
def reinforce_plus_plus_advantages(
    rewards: Tensor, mask: Tensor, gamma: float = 1.0, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): advantages are the reward-to-go whitened over the batch (valid tokens).

    Args:
        rewards: ``(B, T)``.
        mask: ``(B, T)``.
        gamma: discount (default 1.0).
        eps: whitening eps (default 1e-8).

    Returns:
        ``(advantages (B, T), returns (B, T))``, 0 on pads.
    """
    returns = reinforce_plus_plus_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask, eps=eps), returns


def _reinforce_pp_estimator(
    rewards: Tensor, values: Tensor | None, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Registry adapter: REINFORCE++ ignores ``values`` and ``lam``."""
    return reinforce_plus_plus_advantages(rewards, mask, gamma)


AdvantageEstimator = Callable[..., tuple[Tensor, Tensor]]

# name -> fn(rewards (B, T), values (B, T) | None, mask (B, T), gamma, lam) -> (advantages, returns)
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": gae_advantages,
    "reinforce++": _reinforce_pp_estimator,
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """Look up an advantage estimator by name in :data:`ADVANTAGE_ESTIMATORS`.

    Every estimator is called as ``fn(rewards, values, mask, gamma=..., lam=...)`` and returns
    ``(advantages (B, T), returns (B, T))``.
    """
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"advantage_estimator must be one of {sorted(ADVANTAGE_ESTIMATORS)}, got {name!r}"
        ) from None


# ---------------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    loss_agg_mode: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), with optional dual clip (Ye et al. 2020).

    ``rho_t = exp(log pi - log pi_old)``;
    ``L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))``; with dual clip ``c > 1``,
    ``L_t = min(L_t, -c A_t)`` where ``A_t < 0`` (bounds the loss when the ratio is huge).

    Args:
        logprobs: ``(B, T)`` log pi (with grad).
        old_logprobs: ``(B, T)`` log pi_old from the rollout.
        advantages: ``(B, T)`` A_t.
        mask: ``(B, T)``.
        clip_eps: eps (default 0.2).
        dual_clip: c > 1 or None (default, off).
        loss_agg_mode: see :func:`aggregate_loss` (default ``"token-mean"``).

    Returns:
        ``(loss scalar, stats)``; stats are detached scalars over valid tokens: ``clipfrac``
        (fraction where the clipped term is active), ``approxkl`` = mean of ``0.5 * (log rho)^2``
        (k2 estimator of KL(pi_old || pi)), ``ratio_mean``, ``ratio_min``, ``ratio_max`` and, with
        dual clip, ``dual_clipfrac``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    m = mask.bool()
    zeros = torch.zeros_like(logprobs)
    # Zero masked positions *before* exp so garbage on pads can neither overflow nor send nan grads.
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), zeros)
    adv = torch.where(m, advantages.detach(), zeros)
    ratio = torch.exp(log_ratio)
    surr_unclipped = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss_mat = torch.maximum(surr_unclipped, surr_clipped)
    stats: dict[str, Tensor] = {}
    if dual_clip is not None:
        dual = -adv * dual_clip
        use_dual = (adv < 0) & (dual < loss_mat)
        loss_mat = torch.where(adv < 0, torch.minimum(loss_mat, dual), loss_mat)
        stats["dual_clipfrac"] = masked_mean(use_dual.float(), m).detach()
    loss = aggregate_loss(loss_mat, m, loss_agg_mode)
    with torch.no_grad():
        r = ratio.detach()
        stats["clipfrac"] = masked_mean((surr_clipped > surr_unclipped).float(), m)
        stats["approxkl"] = masked_mean(0.5 * log_ratio.detach() ** 2, m)
        stats["ratio_mean"] = masked_mean(r, m)
        stats["ratio_min"] = torch.where(m, r, torch.full_like(r, float("inf"))).min()
        stats["ratio_max"] = torch.where(m, r, torch.full_like(r, float("-inf"))).max()
    return loss, stats


PolicyLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def _dual_clip_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, **kwargs
) -> tuple[Tensor, dict[str, Tensor]]:
    """Registry adapter: :func:`ppo_policy_loss` with ``dual_clip`` defaulting to 3.0."""
    kwargs.setdefault("dual_clip", 3.0)
    return ppo_policy_loss(logprobs, old_logprobs, advantages, mask, **kwargs)


# name -> fn(logprobs, old_logprobs, advantages, mask, **kwargs) -> (loss, stats)
POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo": ppo_policy_loss,
    "dual_clip": _dual_clip_policy_loss,
}


def get_policy_loss(name: str) -> PolicyLoss:
    """Look up a policy loss by name in :data:`POLICY_LOSSES`."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"policy_loss must be one of {sorted(POLICY_LOSSES)}, got {name!r}") from None


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * max((V - G)^2, (V_clip - G)^2)``,
    ``V_clip = V_old + clip(V - V_old, -eps, eps)``.

    Args:
        values: ``(B, T)`` V (with grad).
        old_values: ``(B, T)`` V_old from the rollout.
        returns: ``(B, T)`` targets G.
        mask: ``(B, T)``.
        clip_eps: value clip eps (default 0.2); None disables clipping.
        loss_agg_mode: see :func:`aggregate_loss` (default ``"token-mean"``).

    Returns:
        ``(loss scalar, {"vf_clipfrac": fraction of valid tokens where the clipped error is larger})``.
    """
    m = mask.bool()
    zeros = torch.zeros_like(values)
    v = torch.where(m, values, zeros)
    v_old = torch.where(m, old_values.detach(), zeros)
    g = torch.where(m, returns.detach(), zeros)
    err_unclipped = (v - g) ** 2
    if clip_eps is None:
        loss_mat = 0.5 * err_unclipped
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clipped = v_old + (v - v_old).clamp(-clip_eps, clip_eps)
        err_clipped = (v_clipped - g) ** 2
        loss_mat = 0.5 * torch.maximum(err_unclipped, err_clipped)
        clipfrac = masked_mean((err_clipped > err_unclipped).float(), m).detach()
    return aggregate_loss(loss_mat, m, loss_agg_mode), {"vf_clipfrac": clipfrac}


# ---------------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)``: ``H = logsumexp(z) - sum_v p_v z_v`` (stable for large z).

    Args:
        logits: ``(B, T, V)``.

    Returns:
        ``(B, T)`` in float32 (or wider).
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Explained variance ``1 - Var[G - V] / Var[G]`` over valid tokens (biased variances).

    Args:
        values: ``(B, T)``.
        returns: ``(B, T)``.
        mask: ``(B, T)``.

    Returns:
        Scalar; ``nan`` when ``Var[G] == 0``. 1 is perfect, 0 is as good as a constant.
    """
    var_g = masked_var(returns, mask, unbiased=False)
    var_res = masked_var(returns - values, mask, unbiased=False)
    if var_g.item() == 0:
        return torch.full_like(var_g, float("nan"))
    return 1.0 - var_res / var_g


# ---------------------------------------------------------------------------------------------------
# KL coefficient controllers (beta2)
# ---------------------------------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient beta2 (the paper's default: 0.01, fixed)."""

    def __init__(self, value: float):
        if value < 0:
            raise ValueError(f"kl coef (beta2) must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, eq. 2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``.

    Args:
        init_kl_coef: initial beta2 >= 0.
        target: target KL per sequence (same units as ``current_kl``), > 0.
        horizon: horizon in samples (Ziegler: 10000), > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update ``value`` after ``n_steps`` samples with observed KL ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
