"""PPO's clipped value-function loss (the critic's loss), as a pure function of ``[B, T]`` tensors.

Math (Schulman et al. 2017's PPO code, openai/baselines ``ppo2``; CleanRL's "37 implementation
details", detail 9):

    V_clip = V_old + clamp(V - V_old, -clip, clip)
    l_t    = max((V_t - R_t)^2, (V_clip_t - R_t)^2)
    loss   = 0.5 * aggregate(l, mask)

The ``max`` makes the loss pessimistic: moving a value more than ``clip`` away from the
rollout's value earns no credit for getting closer to the return. The gradient is
``d loss / d V_t = w_t * (V_t - R_t)`` where the unclipped term is the max, and 0 where the
clipped one is (strictly) larger and ``V`` lies outside the clip range; ``w_t`` is the
aggregation weight. Gradients flow to ``values`` only (``old_values`` and ``returns`` are
constants of the rollout).

Conventions checked against the two trainers we follow:
- verl ``compute_value_loss`` (``verl/trainer/ppo/core_algos.py`` l. 1799-1838 at b178a3c):
  ``clip_by_value(vpreds, values - c, values + c)`` (the same ``V_clip``), ``0.5 *
  agg_loss(max(...), loss_agg_mode)``, and ``vf_clipfrac = masked_mean((V_clip - R)^2 >
  (V - R)^2)``: our ``clipfrac`` is that, with a strict ``>``.
- OpenRLHF ``ValueLoss`` (``openrlhf/models/loss.py`` l. 233-269 at 3c3be62): the same ``max``
  and the ``0.5`` outside the mean; ``clip_eps=None`` there means no clipping (``clip=None``
  here); ``token_level_loss=True`` is our ``"token-mean"``, ``False`` our
  ``"seq-mean-token-mean"``. It reports no clip fraction.

``loss_agg`` has the meanings of ``fastrlhf.ppo_clip_loss`` (one set for the whole package):
``token-mean`` = sum(l * m) / sum(m); ``seq-mean-token-mean`` = mean over sequences with a
counted token of their token-mean; ``seq-mean-token-sum`` = sum(l * m) / B;
``seq-mean-token-sum-norm`` = sum(l * m) / (B * T) (verl divides by T only). An all-zero mask
gives loss 0, never NaN.

Memory: ``[B, T]``-sized temporaries only (no vocabulary dimension); plain PyTorch on every
device, since there is no vocabulary loop to fuse.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

__all__ = ["clipped_value_loss", "VALUE_LOSS_AGG_MODES"]

VALUE_LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check(values, old_values, returns, mask, clip, loss_agg) -> None:
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
            raise ValueError(f"clip must be a finite number >= 0 (or None: no clipping), got {clip!r}")
    if loss_agg not in VALUE_LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {VALUE_LOSS_AGG_MODES}, got {loss_agg!r}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() < 1:
        raise ValueError(f"values must be [B, T] (or [N]), got a scalar of shape {tuple(values.shape)}")
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if name != "mask" and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if name == "mask" and (t.is_complex() or (t.dtype not in _MASK_DTYPES and not t.is_floating_point())):
            raise TypeError(f"mask must be bool, integer or floating 0/1, got {t.dtype}")
        if tuple(t.shape) != tuple(values.shape):
            raise ValueError(f"{name} must have the shape of values {tuple(values.shape)}, got {tuple(t.shape)}")
        if t.device != values.device:
            raise ValueError(f"{name} is on {t.device} but values are on {values.device}")


def _aggregate(per_token: torch.Tensor, m: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Scalar aggregate of ``per_token [B, T]`` over the 0/1 float mask ``m [B, T]``."""
    B, T = m.shape
    masked = per_token * m  # [B, T]
    if loss_agg == "token-mean":
        return masked.sum() / m.sum().clamp_min(1.0)
    if loss_agg == "seq-mean-token-mean":
        lengths = m.sum(-1)  # [B]
        seq_means = masked.sum(-1) / lengths.clamp_min(1.0)  # [B], 0 for an empty sequence
        return seq_means.sum() / (lengths > 0).sum().clamp_min(1)
    if loss_agg == "seq-mean-token-sum":
        return masked.sum() / max(B, 1)
    return masked.sum() / max(B * T, 1)  # seq-mean-token-sum-norm


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    loss_agg: str = "token-mean",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped value loss ``0.5 * agg(max((V - R)^2, (V_old + clamp(V - V_old, -clip, clip) - R)^2))``.

    Args:
        values: ``[B, T]`` the critic's current predictions (differentiable).
        old_values: ``[B, T]`` the critic's values at rollout time (``V_old``).
        returns: ``[B, T]`` the regression targets ``R`` (e.g. GAE's ``advantages + values``).
        mask: ``[B, T]`` bool / integer / float 0-1: the tokens that count. A 1-D ``[N]`` input
            is one sequence; more than two dims are flattened to ``[-1, T]``.
        clip: the clip range ``c >= 0`` around ``V_old`` (verl's ``cliprange_value``, OpenRLHF's
            ``value_clip``); ``None`` drops the clipped term (plain ``0.5 * (V - R)^2``).
        loss_agg: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum`` |
            ``seq-mean-token-sum-norm`` (module docstring).

    Returns:
        ``(loss, stats)``: ``loss`` a scalar (fp32; fp64 for fp64 values) with gradient to
        ``values``; ``stats`` detached: ``clipfrac`` (fraction of counted tokens where the
        clipped term is strictly larger: verl's ``vf_clipfrac``; 0 when ``clip`` is None) and
        ``num_tokens``.
    """
    _check(values, old_values, returns, mask, clip, loss_agg)
    dt = torch.float64 if values.dtype == torch.float64 else torch.float32
    T = values.shape[-1]
    v = values.to(dt).reshape(-1, T)  # [B, T]
    old = old_values.detach().to(dt).reshape(-1, T)
    ret = returns.detach().to(dt).reshape(-1, T)
    m = mask.detach().to(dt).reshape(-1, T)
    unclipped = (v - ret) ** 2  # [B, T]
    if clip is None:
        per_token = unclipped
        clipped_wins = torch.zeros_like(m)
    else:
        v_clipped = old + (v - old).clamp(-clip, clip)
        clipped = (v_clipped - ret) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipped_wins = (clipped > unclipped).detach().to(dt)
    loss = 0.5 * _aggregate(per_token, m, loss_agg)
    with torch.no_grad():
        n = m.sum()
        stats = {"clipfrac": (clipped_wins * m).sum() / n.clamp_min(1.0), "num_tokens": n}
    return loss, stats
