"""Oracle of DPO and its variants (sigmoid / hinge / ipo / robust, length normalisation, NLL term)."""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from ._common import DPO_LOSS_TYPES, as_batch_time
from .logprobs import token_logprobs

# ----------------------------------------------------------------------------------------
# DPO (Rafailov et al. 2023, eq. 7) and variants
# ----------------------------------------------------------------------------------------


def dpo_loss_from_logprobs(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """DPO loss on sequence log-probabilities ``[B]`` (sums; token means for ``ipo``)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    dt = chosen_logps.dtype
    ref_c = ref_chosen_logps.to(dt)
    ref_r = ref_rejected_logps.to(dt)
    logits = (chosen_logps - rejected_logps) - (ref_c - ref_r)  # [B]
    h = beta * logits
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - h)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        losses = (-(1.0 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1.0 - 2.0 * eps)
    n_pairs = max(losses.shape[0], 1)  # no pairs: loss and stats 0, not the NaN mean of nothing
    loss = losses.sum() / n_pairs
    with torch.no_grad():
        chosen_r = beta * (chosen_logps.detach() - ref_c)
        rejected_r = beta * (rejected_logps.detach() - ref_r)
        stats = {
            "chosen_rewards": chosen_r.sum() / n_pairs,
            "rejected_rewards": rejected_r.sum() / n_pairs,
            "reward_accuracy": (chosen_r > rejected_r).to(dt).sum() / n_pairs,
            "reward_margin": (chosen_r - rejected_r).sum() / n_pairs,
        }
    return loss, stats


def dpo_sequence_logps(
    logp: torch.Tensor, counted: torch.Tensor, loss_type: str, length_normalize: bool = False
) -> torch.Tensor:
    """Sum (``ipo`` or ``length_normalize``: mean) of per-token logp ``[2B, T]`` over counted tokens -> ``[2B]``."""
    m = counted.to(logp.dtype)
    s = (logp * m).sum(-1)
    if loss_type == "ipo" or length_normalize:
        s = s / m.sum(-1).clamp_min(1.0)
    return s


def dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    length_normalize: bool = False,
    rpo_alpha: Optional[float] = None,
    upcast: bool = True,
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """DPO on ``logits [2B, T, V]``: rows ``0..B-1`` chosen, ``B..2B-1`` rejected (TRL's order).

    ``length_normalize``: per-token mean log-probs (TRL's ``sigmoid_norm``, Liger's ``average_log_prob``).
    ``rpo_alpha``: ``+ rpo_alpha * nll``, the chosen rows' cross-entropy averaged over their counted tokens.
    """
    logp = as_batch_time(token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                        upcast=upcast))  # [2B, T]
    counted = as_batch_time(labels != ignore_index)
    seq = dpo_sequence_logps(logp, counted, loss_type, length_normalize)
    B = seq.shape[0] // 2
    loss, stats = dpo_loss_from_logprobs(
        seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )
    if rpo_alpha is None:
        return loss, stats
    c = counted[:B].to(logp.dtype)
    nll = -(logp[:B] * c).sum() / c.sum().clamp_min(1.0)
    return loss + rpo_alpha * nll, {**stats, "nll_loss": nll.detach()}
