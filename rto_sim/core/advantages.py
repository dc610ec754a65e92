"""Advantage estimators: GAE and REINFORCE++, registered by name."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .stats import masked_whiten

Tensor = torch.Tensor


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
