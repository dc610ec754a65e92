"""The RTO token reward (RTO eq. 4.7) and its ablations: the one place where r_t is assembled.

    r_t = -beta2 * kl_t + redistribute(clip(beta1 * (log pi_dpo - log pi_ref)(y_t), -c, c))
          + [t = last valid] * beta3 * R

The simulator (tabular PPO, exact planning tables) and the LLM trainer both build their rewards here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kl import kl_penalty
from .stats import last_valid_index

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------
# RTO reward assembly (RTO eq. 4.7; docs/practice.md section 1; docs/theory.md section 8)
# ---------------------------------------------------------------------------------------------------


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
        penalty: the score given to unfinished completions (docs/practice.md: "R = ..., or the
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
    """The RTO token reward (RTO eq. 4.7, docs/practice.md section 1)::

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
