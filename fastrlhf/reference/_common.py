"""Shared pieces of the oracle: constants, loss aggregation weights, the [B, T] view."""

from __future__ import annotations

from typing import Optional

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")

# ratio = exp(clamp(logp - old_logp, -20, 20)): exp(20) = 4.9e8 stays finite in fp32 and
# only ever matters for clipped (zero-gradient) tokens; verl clamps at the same value.
LOG_RATIO_CLAMP = 20.0


def _compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    if not upcast:
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finite_or_zero(logsm: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, logsm, torch.zeros_like(logsm))


# ----------------------------------------------------------------------------------------
# Loss aggregation
# ----------------------------------------------------------------------------------------


def loss_agg_weights(m: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Weights ``w`` with ``loss = sum(per_token * w)`` for a ``[B, T]`` 0/1 mask ``m``.

    - token-mean: ``m / sum(m)``
    - seq-mean-token-mean: ``m / sum_t(m) / #sequences with a counted token``
    - seq-mean-token-sum: ``m / B``
    - seq-mean-token-sum-norm (Dr. GRPO): ``m / (B * T)``
    An all-zero mask gives all-zero weights (loss 0, no NaN).
    """
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    B, T = m.shape
    if loss_agg == "token-mean":
        return m / m.sum().clamp_min(1.0)
    if loss_agg == "seq-mean-token-mean":
        per_seq = m.sum(-1, keepdim=True)  # [B, 1]
        n_seq = (per_seq > 0).sum().clamp_min(1)
        return m / per_seq.clamp_min(1.0) / n_seq
    if loss_agg == "seq-mean-token-sum":
        return m / max(B, 1)
    return m / max(B * T, 1)


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp_min(1.0)


def as_batch_time(t: torch.Tensor) -> torch.Tensor:
    """View a per-token tensor ``[...]`` as ``[B, T]`` (1-D -> ``[1, N]``; >2-D -> flatten leading)."""
    if t.dim() == 1:
        return t.unsqueeze(0)
    if t.dim() == 2:
        return t
    return t.reshape(-1, t.shape[-1])



def _counted_mask(labels: torch.Tensor, mask: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.reshape(labels.shape).bool()
    return counted
