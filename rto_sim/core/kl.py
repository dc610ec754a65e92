"""KL estimators (k1 / k2 / k3) and the KL coefficient controllers (beta2)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


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
      enters the RTO reward as ``-beta2 * k1`` (docs/practice.md section 1).
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
