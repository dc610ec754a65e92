"""Masked statistics, the loss-reduction helper and log-probabilities.

Token tensors are ``(B, T)`` over response tokens with a float or bool ``mask`` ``(B, T)`` that is 1 on
generated tokens through the first EOS and 0 on pads. Masked entries never leak into a result.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


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
