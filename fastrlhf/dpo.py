"""DPO loss and its variants from logits (``docs/API.md``, "DPO loss from logits").

How it runs: the row forward of :mod:`fastrlhf.logprobs` (per-token logp and logsumexp), the
sequence sums, then the ``[B]``-sized pair loss below under autograd; a token's upstream
gradient depends on its sequence's sum, so the logits' gradient pass runs in backward
(2 reads and 1 write of ``N x V`` in all).

Kernel: ``fastrlhf/kernels/logprobs.py``. Oracle: ``fastrlhf/reference/dpo.py::dpo_loss``.
Tests: ``tests/test_dpo.py``. Benchmark: ``fastrlhf bench dpo``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from ._validate import check_dpo_refs, check_ignore_index, check_logits, check_scalar
from .logprobs import prepare, token_values
from .token_math import as_batch_time

__all__ = ["dpo_loss", "DPO_LOSS_TYPES", "check_dpo_args", "sequence_logps", "pair_loss", "with_nll_term"]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")

Stats = Mapping[str, torch.Tensor]


def check_dpo_args(loss_type, beta, label_smoothing, rpo_alpha=None) -> Tuple[float, float]:
    if rpo_alpha is not None:
        check_scalar(rpo_alpha, "rpo_alpha", low=0.0)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    beta = check_scalar(beta, "beta", low=0.0, low_open=True)
    high = 0.5 if loss_type == "robust" else 1.0
    eps = check_scalar(label_smoothing, "label_smoothing", low=0.0, high=high, high_open=loss_type == "robust")
    return beta, eps


def sequence_logps(logp: torch.Tensor, counted: torch.Tensor, mean: bool) -> torch.Tensor:
    """``[2B]`` sums (``mean``: averages) of per-token ``logp`` over each row's counted tokens."""
    lp = as_batch_time(logp)
    c = as_batch_time(counted)
    total = torch.where(c, lp, torch.zeros((), dtype=lp.dtype, device=lp.device)).sum(-1)  # [2B]
    if mean:
        total = total / c.sum(-1).clamp_min(1).to(lp.dtype)
    return total


def with_nll_term(loss, stats, logp: torch.Tensor, counted: torch.Tensor, B: int, rpo_alpha):
    """``loss + rpo_alpha * nll`` with ``nll`` the mean negative log-likelihood of the chosen rows' counted
    tokens (TRL's ``rpo_alpha`` / ``compute_nll_loss``, Liger's ``compute_nll_loss``: cross-entropy with
    ``ignore_index``, mean over the tokens); ``stats["nll_loss"]`` when used."""
    if rpo_alpha is None:
        return loss, stats
    lp = as_batch_time(logp)[:B]  # [B, T] chosen rows
    c = as_batch_time(counted)[:B]
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    nll = -torch.where(c, lp, zero).sum() / c.sum().clamp_min(1).to(lp.dtype)
    return loss + rpo_alpha * nll, {**stats, "nll_loss": nll.detach()}


def pair_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta: float, loss_type: str, label_smoothing: float):
    """``(loss, stats)``: mean over pairs of the DPO loss of sequence log-probabilities ``[B]``."""
    dt = chosen.dtype
    margin = (chosen - rejected) - (ref_chosen.to(dt) - ref_rejected.to(dt))  # [B] policy margin over ref
    h = beta * margin
    eps = label_smoothing
    if loss_type == "sigmoid":  # cDPO when eps > 0 (Mitchell 2023)
        per_pair = -(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    elif loss_type == "hinge":  # SLiC (Zhao et al. 2023)
        per_pair = F.relu(1.0 - h)
    elif loss_type == "ipo":  # Azar et al. 2023, eq. 17
        per_pair = (margin - 0.5 / beta) ** 2
    else:  # robust DPO (Chowdhury et al. 2024)
        per_pair = ((eps - 1.0) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1.0 - 2.0 * eps)
    n = max(per_pair.numel(), 1)  # no pairs: loss and stats 0, not the NaN mean of nothing
    loss = per_pair.sum() / n
    with torch.no_grad():
        r_c = beta * (chosen.detach() - ref_chosen.to(dt))
        r_r = beta * (rejected.detach() - ref_rejected.to(dt))
        stats = {
            "chosen_rewards": r_c.sum() / n,
            "rejected_rewards": r_r.sum() / n,
            "reward_accuracy": (r_c > r_r).to(dt).sum() / n,
            "reward_margin": (r_c - r_r).sum() / n,
        }
    return loss, stats


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
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
) -> Tuple[torch.Tensor, Stats]:
    """DPO loss (Rafailov et al. 2023, eq. 7) and variants from ``logits [2B, T, V]``.

    Rows ``0..B-1`` are the chosen responses, ``B..2B-1`` the rejected ones (TRL's
    concatenation); prompt and padding tokens carry ``ignore_index`` labels. Sequence logprob
    = sum over counted tokens (``ipo``: their mean). With ``h = beta * ((lp_c - lp_r) - (ref_c
    - ref_r))`` and ``eps = label_smoothing``: ``sigmoid`` ``-(1-eps) logsigmoid(h) - eps
    logsigmoid(-h)`` (cDPO); ``hinge`` ``relu(1 - h)`` (SLiC); ``ipo`` ``(margin - 1/(2 beta))^2``
    (Azar et al. 2023); ``robust`` (Chowdhury et al. 2024). Reference-free: pass zeros.
    ``length_normalize=True``: every loss type uses the per-token mean log-prob of each response
    (TRL's ``sigmoid_norm``, Liger's ``average_log_prob=True``); the reference log-probs must then be
    means too. ``rpo_alpha``: adds ``rpo_alpha *`` the chosen responses' mean token NLL (TRL's
    ``rpo_alpha``, Pang et al. 2024; Liger's ``compute_nll_loss`` is ``rpo_alpha=1``).
    Stats: ``chosen_rewards``, ``rejected_rewards``, ``reward_accuracy``, ``reward_margin``
    (and ``nll_loss`` with ``rpo_alpha``).
    """
    check_logits(logits)
    if logits.dim() != 3 or logits.shape[0] % 2:
        raise ValueError(f"logits must be [2B, T, V] (chosen rows then rejected rows), got {tuple(logits.shape)}")
    beta, label_smoothing = check_dpo_args(loss_type, beta, label_smoothing, rpo_alpha)
    ignore_index = check_ignore_index(ignore_index)
    B = logits.shape[0] // 2
    check_dpo_refs(ref_chosen_logps, ref_rejected_logps, B, logits.device)
    temperature, backend, offset = prepare(logits, labels, temperature, ignore_index, backend, process_group)
    logp = token_values(logits, labels, temperature, ignore_index, True, False, inplace_backward, backend,
                        process_group, offset)
    counted = labels != ignore_index
    seq = sequence_logps(logp, counted, mean=loss_type == "ipo" or bool(length_normalize))  # [2B]
    loss, stats = pair_loss(seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                            label_smoothing=label_smoothing)
    return with_nll_term(loss, stats, logp, counted, B, rpo_alpha)
