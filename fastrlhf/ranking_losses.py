"""Ranking losses: the reward model's pairwise loss and RRHF, as public ops.

- :func:`pairwise_reward_loss`: Bradley-Terry loss of a scalar reward model on (chosen,
  rejected) pairs (Ouyang et al. 2022, eq. 1; Stiennon et al. 2020), with an optional margin
  (Touvron et al. 2023, Llama 2, eq. 2; TRL's ``margin`` column) and an optional centering term
  ``center_coef * mean((r_c + r_r)^2)`` that pins the reward's free offset near 0 (Eisenstein
  et al. 2023; TRL's ``center_rewards_coefficient``). Operates on ``[P]`` rewards.
- :func:`rrhf_loss` / :func:`linear_rrhf_loss`: RRHF (Yuan et al. 2023, "RRHF: Rank Responses
  to Align Language Models with Human Feedback", eqs. 1-4) over ``k`` responses per prompt.
  Per response ``p_i = sum_t log pi(y_i,t | x, y_i,<t) / |y_i|^length_penalty``;
  ``L_rank = sum_{r_i < r_j} max(0, p_i - p_j)``; ``L_ft = -mean_t log pi(y_best,t)`` on the
  best-rewarded response (first one on ties); ``loss = rank_coef * L_rank + sft_coef * L_ft``,
  averaged over prompts. The token logprobs come from ``fastrlhf.token_logprobs`` /
  ``fastrlhf.linear_token_logprobs``, so no ``[N, V]`` temporary is made besides the logits'
  gradient (and for the linear variant not even the logits). The ``length_penalty`` exponent
  and the weight on the rank term are the RRHF repository's ``--length_penalty`` /
  ``--rrhf_weight``; its SFT term averages over the padded length, we average over the
  response's tokens.

Same-named oracles (loops over pairs) live in :mod:`fastrlhf.reference`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .linear import linear_token_logprobs
from .logprobs import token_logprobs

__all__ = ["pairwise_reward_loss", "rrhf_loss", "linear_rrhf_loss"]

Stats = Mapping[str, torch.Tensor]


# ----------------------------------------------------------------------------------------
# Reward model: Bradley-Terry on pairs
# ----------------------------------------------------------------------------------------


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: Optional[torch.Tensor | float] = None,
    center_coef: float = 0.0,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Stats]:
    """Bradley-Terry reward-model loss ``-logsigmoid(r_c - r_r - margin)`` over ``P`` pairs.

    Args:
        chosen_rewards, rejected_rewards: ``[P]`` scalar rewards of the preferred and the other
            response of each pair (differentiable).
        margin: ``None`` (0), a float, or ``[P]`` per-pair margins (Llama 2's preference strength).
        center_coef: weight of ``(r_c + r_r)^2`` (Eisenstein et al. 2023; TRL default 0, 0.01
            in its docs' example).
        weights: ``[P]`` non-negative pair weights; the loss is ``sum(w * l) / sum(w)``. For a
            ranking of ``k`` responses split into its ``k (k - 1) / 2`` pairs, weight
            ``1 / C(k, 2)`` per pair counts each prompt once (InstructGPT, eq. 1).

    Returns:
        ``(loss, stats)``; stats (detached): ``accuracy`` (weighted fraction with
        ``r_c > r_r``), ``chosen_rewards``, ``rejected_rewards``, ``reward_margin`` (means).
    """
    for name, t in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a [P] tensor, got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"rejected_rewards must have the shape of chosen_rewards {tuple(chosen_rewards.shape)}, "
                         f"got {tuple(rejected_rewards.shape)}")
    P = chosen_rewards.shape[0]
    if P == 0:
        raise ValueError("chosen_rewards is empty: at least one pair is needed")
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    dt = torch.float64 if chosen_rewards.dtype == torch.float64 else torch.float32
    rc, rr = chosen_rewards.to(dt), rejected_rewards.to(dt)
    if isinstance(margin, torch.Tensor):
        if tuple(margin.shape) not in ((), (P,)):
            raise ValueError(f"margin must be a float or a [P] = [{P}] tensor, got {tuple(margin.shape)}")
        margin = margin.to(device=rc.device, dtype=dt)
    elif margin is None:
        margin = 0.0
    if weights is None:
        w = torch.full((P,), 1.0 / P, dtype=dt, device=rc.device)
    else:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (P,):
            raise ValueError(f"weights must be a [P] = [{P}] tensor, got {getattr(weights, 'shape', type(weights))}")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be non-negative with a positive sum")
        w = weights.to(device=rc.device, dtype=dt)
        w = w / w.sum()
    diff = rc - rr  # [P]
    loss = (-F.logsigmoid(diff - margin) * w).sum()
    if center_coef > 0:
        loss = loss + center_coef * (((rc + rr) ** 2) * w).sum()
    with torch.no_grad():
        stats = {
            "accuracy": ((diff > 0).to(dt) * w).sum(),
            "chosen_rewards": (rc * w).sum(),
            "rejected_rewards": (rr * w).sum(),
            "reward_margin": (diff * w).sum(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


# ----------------------------------------------------------------------------------------
# RRHF
# ----------------------------------------------------------------------------------------


def _check_rrhf_args(rows: int, rewards, group_size, rank_coef, sft_coef, length_penalty) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rows % group_size:
        raise ValueError(f"the number of sequences ({rows}) must be a multiple of group_size = {group_size}")
    if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (rows,):
        raise ValueError(f"rewards must be a [B * k] = [{rows}] tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    for name, v in (("rank_coef", rank_coef), ("sft_coef", sft_coef), ("length_penalty", length_penalty)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def rrhf_loss_from_token_logprobs(
    logp: torch.Tensor,
    counted: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    *,
    rank_coef: float = 1.0,
    sft_coef: float = 1.0,
    length_penalty: float = 1.0,
) -> Tuple[torch.Tensor, Stats]:
    """RRHF on per-token logprobs ``[B * k, T]`` (0 where not ``counted``); see :func:`rrhf_loss`."""
    k = group_size
    m = counted.to(logp.dtype)
    n_tok = m.sum(-1).clamp_min(1.0)  # [B * k]
    total = (logp * m).sum(-1)  # [B * k] sequence logprob
    p = (total / n_tok**length_penalty).view(-1, k)  # [B, k] length-normalised score
    r = rewards.to(device=logp.device, dtype=logp.dtype).view(-1, k)  # [B, k]
    # worse[b, i, j]: response i is ranked below j; its score should not exceed p_j.
    worse = r[:, :, None] < r[:, None, :]  # [B, k, k]
    violation = torch.relu(p[:, :, None] - p[:, None, :])  # [B, k, k]
    rank = (violation * worse).sum((1, 2)).mean()
    best = r.argmax(-1, keepdim=True)  # [B, 1] first maximum on ties
    sft = -(total / n_tok).view(-1, k).gather(1, best).mean()
    loss = rank_coef * rank + sft_coef * sft
    with torch.no_grad():
        n_pairs = worse.sum()
        ordered = ((p[:, :, None] < p[:, None, :]) & worse).sum()
        stats = {
            "rank_loss": rank.detach(),
            "sft_loss": sft.detach(),
            "rank_accuracy": ordered.to(logp.dtype) / n_pairs.clamp_min(1).to(logp.dtype),
            "num_pairs": n_pairs.to(logp.dtype),
            "score": p.detach().mean(),
        }
    return loss, stats


def rrhf_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    rank_coef: float = 1.0,
    sft_coef: float = 1.0,
    length_penalty: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Stats]:
    """RRHF loss (Yuan et al. 2023) from ``logits [B * k, T, V]`` of ``k`` responses per prompt.

    Rows ``g*k .. g*k + k - 1`` are the responses to prompt ``g``; ``rewards [B * k]`` their
    scores (higher is better); prompt and padding tokens carry ``ignore_index`` labels.
    ``p_i = sum_t logp_it / n_i^length_penalty`` over the ``n_i`` counted tokens;
    ``loss = mean_g [rank_coef * sum_{r_i < r_j} relu(p_i - p_j) + sft_coef * (-mean_t logp_best,t)]``,
    ``best`` = the first response with the group's highest reward. Pairs with equal rewards add
    nothing. ``group_size=1`` is plain SFT.

    One pass of ``fastrlhf.token_logprobs`` over the logits (backend as there), the rest is
    ``[B * k]``-sized. Stats: ``rank_loss``, ``sft_loss``, ``rank_accuracy`` (fraction of the
    ranked pairs whose scores are in reward order), ``num_pairs``, ``score`` (mean ``p``).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be [B * k, T, V], got {getattr(logits, 'shape', type(logits))}")
    _check_rrhf_args(logits.shape[0], rewards, group_size, rank_coef, sft_coef, length_penalty)
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                          inplace_backward=inplace_backward, backend=backend)  # [B * k, T]
    return rrhf_loss_from_token_logprobs(logp, labels != ignore_index, rewards, group_size, rank_coef=rank_coef,
                                         sft_coef=sft_coef, length_penalty=length_penalty)


def linear_rrhf_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    rank_coef: float = 1.0,
    sft_coef: float = 1.0,
    length_penalty: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Stats]:
    """:func:`rrhf_loss` on the logits ``hidden [B * k, T, H] @ weight.T + bias``, never materialized.

    The token logprobs come from ``fastrlhf.linear_token_logprobs`` (one ``[chunk, V]`` block at
    a time); gradients flow to ``hidden``, ``weight`` and ``bias``. Other arguments as
    :func:`rrhf_loss` and :func:`fastrlhf.linear_token_logprobs`.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [B * k, T, H], got {getattr(hidden, 'shape', type(hidden))}")
    _check_rrhf_args(hidden.shape[0], rewards, group_size, rank_coef, sft_coef, length_penalty)
    logp = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                 ignore_index=ignore_index, chunk_size=chunk_size, accum_dtype=accum_dtype,
                                 backend=backend)  # [B * k, T]
    return rrhf_loss_from_token_logprobs(logp, labels != ignore_index, rewards, group_size, rank_coef=rank_coef,
                                         sft_coef=sft_coef, length_penalty=length_penalty)
