"""Oracle of the ranking losses: the Bradley-Terry reward-model loss and RRHF."""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .linear import _linear_logits
from .logprobs import token_logprobs


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin=None,
    center_coef: float = 0.0,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """Bradley-Terry: weighted mean of ``-logsigmoid(r_c - r_r - margin)`` + ``center_coef * (r_c + r_r)^2``."""
    dt = torch.float64 if chosen_rewards.dtype == torch.float64 else torch.float32
    P = chosen_rewards.shape[0]
    w = torch.ones(P, dtype=dt) if weights is None else weights.to(dt)
    margins = [0.0] * P if margin is None else (
        [float(margin)] * P if not isinstance(margin, torch.Tensor) or margin.dim() == 0 else margin.tolist())
    terms, correct, chosen, rejected, gap = [], 0.0, 0.0, 0.0, 0.0
    for i in range(P):
        rc, rr = chosen_rewards[i].to(dt), rejected_rewards[i].to(dt)
        term = -F.logsigmoid(rc - rr - margins[i])
        if center_coef > 0:
            term = term + center_coef * (rc + rr) ** 2
        terms.append(w[i] * term)
        c, r = float(rc.detach()), float(rr.detach())
        correct += float(w[i]) * float(c > r)
        chosen += float(w[i]) * c
        rejected += float(w[i]) * r
        gap += float(w[i]) * (c - r)
    total = float(w.sum())
    loss = torch.stack(terms).sum() / total
    stats = {k: torch.tensor(v / total, dtype=dt) for k, v in
             (("accuracy", correct), ("chosen_rewards", chosen), ("rejected_rewards", rejected),
              ("reward_margin", gap))}
    return loss, stats


def rrhf_loss_from_logprobs(
    logp: torch.Tensor,
    counted: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    *,
    rank_coef: float = 1.0,
    sft_coef: float = 1.0,
    length_penalty: float = 1.0,
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """RRHF (Yuan et al. 2023, eqs. 1-4) on per-token logprobs ``[B * k, T]``, one prompt and one pair at a time."""
    m = counted.to(logp.dtype)
    totals = (logp * m).sum(-1)  # [B * k]
    lengths = m.sum(-1).clamp_min(1.0)
    per_prompt = []
    rank_terms, sft_terms = [], []
    for g0 in range(0, logp.shape[0], group_size):
        idx = range(g0, g0 + group_size)
        p = {i: totals[i] / lengths[i] ** length_penalty for i in idx}
        rank = logp.new_zeros(())
        for i in idx:
            for j in idx:
                if float(rewards[i]) < float(rewards[j]):
                    rank = rank + torch.relu(p[i] - p[j])
        best = max(idx, key=lambda i: (float(rewards[i]), -i))  # highest reward, first on ties
        sft = -totals[best] / lengths[best]
        rank_terms.append(rank)
        sft_terms.append(sft)
        per_prompt.append(rank_coef * rank + sft_coef * sft)
    loss = torch.stack(per_prompt).mean()
    stats = {"rank_loss": torch.stack(rank_terms).mean().detach(), "sft_loss": torch.stack(sft_terms).mean().detach()}
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
    upcast: bool = True,
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """RRHF from ``logits [B * k, T, V]``: full log-softmax + gather, then the pair loops."""
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, upcast=upcast)
    return rrhf_loss_from_logprobs(logp, labels != ignore_index, rewards, group_size, rank_coef=rank_coef,
                                   sft_coef=sft_coef, length_penalty=length_penalty)


def linear_rrhf_loss(hidden, weight, labels, rewards, *, bias=None, **kwargs):
    return rrhf_loss(_linear_logits(hidden, weight, bias), labels, rewards, **kwargs)
