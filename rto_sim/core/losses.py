"""Preference losses (DPO / IPO / cDPO, Bradley-Terry) and the PPO policy and value losses.

Each objective shows its equation top to bottom; the token-mean vs sequence-mean reduction is owned by
:func:`rto_sim.core.stats.aggregate_loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .stats import aggregate_loss, masked_mean

Tensor = torch.Tensor


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
