"""Oracle of the advantage estimators, the clipped value loss and masked whitening."""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch

from ._common import _masked_mean, as_batch_time, loss_agg_weights
from .logprobs import kl_estimate

# ----------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over counted tokens.

    Uncounted tokens are skipped by the recursion (verl's multi-turn GAE): ``next`` is the
    next counted token of the row, V and A are 0 after the last one; they get A = returns = 0.
    """
    B, T = rewards.shape
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dt)
    v = values.to(dt)
    m = mask.bool()
    adv = torch.zeros(B, T, dtype=dt, device=rewards.device)
    next_v = torch.zeros(B, dtype=dt, device=rewards.device)
    next_a = torch.zeros(B, dtype=dt, device=rewards.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_a
        mt = m[:, t]
        adv[:, t] = torch.where(mt, a, torch.zeros_like(a))
        next_v = torch.where(mt, v[:, t], next_v)
        next_a = torch.where(mt, a, next_a)
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, sec. 4.1.2): ``(r - mean_g) / (std_g + eps)``.

    Unbiased std within each group of ``group_size``; ``scale="none"`` only centres
    (Dr. GRPO, Liu et al. 2025). A group of one has std 0 (advantage 0).
    """
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    shape = rewards.shape
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dt).reshape(-1, group_size)  # [B, G]
    centred = r - r.mean(-1, keepdim=True)
    if scale == "group":
        if group_size > 1:
            std = r.std(-1, keepdim=True, correction=1)
        else:
            std = torch.zeros_like(r)
        centred = centred / (std + eps)
    return centred.reshape(shape)



# ----------------------------------------------------------------------------------------
# The rest of the RLHF pipeline: critic-free advantages, reward-model and RRHF
# losses. Plain loops over rows, tokens and pairs: slow, and obviously the formula.
# ----------------------------------------------------------------------------------------



def _outcome_token_rewards(rewards, mask, logprobs, ref_logprobs, kl_coef, kl_estimator):
    """``[B, T]`` float64-or-fp32 token rewards: score on the last counted token, minus kl_coef * KL."""
    B, T = mask.shape
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    m = mask.bool()
    tok = torch.zeros(B, T, dtype=dt)
    for b in range(B):
        counted = [t for t in range(T) if m[b, t]]
        if rewards.dim() == 1:
            if counted:
                tok[b, counted[-1]] = float(rewards[b])
        else:
            for t in counted:
                tok[b, t] = float(rewards[b, t])
        if kl_coef > 0:
            kl = kl_estimate(logprobs[b].to(dt).cpu(), ref_logprobs[b].to(dt).cpu(), kl_estimator)
            for t in counted:
                tok[b, t] -= kl_coef * kl[t]
    return tok.to(rewards.device), m


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = r_t + gamma * G_next`` where ``next`` is the next counted token; 0 on uncounted tokens."""
    B, T = rewards.shape
    out = torch.zeros_like(rewards)
    m = mask.bool()
    for b in range(B):
        g = 0.0
        for t in reversed(range(T)):
            if m[b, t]:
                g = float(rewards[b, t]) + gamma * g
                out[b, t] = g
    return out


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j`` per group."""
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    flat = rewards.to(dt).reshape(-1)
    out = torch.zeros_like(flat)
    for g0 in range(0, flat.numel(), group_size):
        for i in range(g0, g0 + group_size):
            others = [float(flat[j]) for j in range(g0, g0 + group_size) if j != i]
            out[i] = flat[i] - sum(others) / len(others)
    return out.reshape(rewards.shape)


def reinforce_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    baseline: str = "none",
    logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE (Williams 1992): ``A_t = G_t - b``, ``b`` = 0 or the batch mean of the episode returns ``G_0``."""
    tok, m = _outcome_token_rewards(rewards, mask, logprobs, ref_logprobs, kl_coef, kl_estimator)
    returns = returns_to_go(tok, m, gamma)
    b = 0.0
    if baseline == "mean":
        episode = [float(returns[i, m[i].nonzero()[0, 0]]) for i in range(m.shape[0]) if m[i].any()]
        b = sum(episode) / len(episode) if episode else 0.0
    adv = torch.where(m, returns - b, torch.zeros_like(returns))
    return adv, returns


def reinforce_plus_plus_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    group_size: Optional[int] = None,
    logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): KL-penalised token rewards, returns-to-go, whitening over all counted tokens.

    ``A = (G - mean) / sqrt(max(var, eps))`` with the biased variance of the counted returns
    (OpenRLHF); ``group_size`` first centres the outcome scores per group (REINFORCE++-baseline).
    """
    if group_size is not None:
        r = rewards.reshape(-1, group_size)
        rewards = (r - r.mean(-1, keepdim=True)).reshape(-1)
    tok, m = _outcome_token_rewards(rewards, mask, logprobs, ref_logprobs, kl_coef, kl_estimator)
    returns = returns_to_go(tok, m, gamma)
    values = returns[m]
    mean = values.mean() if values.numel() else returns.new_zeros(())
    var = ((values - mean) ** 2).mean() if values.numel() else returns.new_zeros(())
    adv = torch.where(m, (returns - mean) / torch.sqrt(torch.clamp(var, min=eps)), torch.zeros_like(returns))
    return adv, returns


# ----------------------------------------------------------------------------------------
# Value loss, whitening, the estimator dispatch: the formulas, element by element
# ----------------------------------------------------------------------------------------



def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    loss_agg: str = "token-mean",
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """``0.5 * agg(max((V - R)^2, (V_old + clamp(V - V_old, -clip, clip) - R)^2))`` and ``clipfrac``."""
    dt = torch.float64 if values.dtype == torch.float64 else torch.float32
    v, old, ret = (as_batch_time(t).to(dt) for t in (values, old_values.detach(), returns.detach()))
    m = as_batch_time(mask).to(dt)
    unclipped = (v - ret) ** 2
    if clip is None:
        per_token, clipped_wins = unclipped, torch.zeros_like(m)
    else:
        v_clip = torch.minimum(torch.maximum(v, old - clip), old + clip)  # verl's clip_by_value
        clipped = (v_clip - ret) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipped_wins = (clipped > unclipped).to(dt)
    loss = 0.5 * (per_token * loss_agg_weights(m, loss_agg)).sum()
    return loss, {"clipfrac": _masked_mean(clipped_wins, m).detach(), "num_tokens": m.sum()}


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``x[mask]`` (unbiased var; 0 for fewer than 2 entries); 0 elsewhere."""
    m = mask.bool()
    counted = x[m]
    mean = counted.mean() if counted.numel() else x.new_zeros(())
    var = counted.var(correction=1) if counted.numel() > 1 else x.new_zeros(())
    out = (x - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


def estimate_advantages(
    estimator: str,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    values: Optional[torch.Tensor] = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    scale_rewards: str = "group",
    logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k1",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(advantages, returns)`` of a named estimator, from the oracles above."""
    kl = dict(logprobs=logprobs, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator)
    m = mask.bool()
    if estimator == "grpo":
        tok, _ = _outcome_token_rewards(rewards, mask, None, None, 0.0, kl_estimator)
        returns = returns_to_go(tok, m, gamma)
        adv = group_advantages(rewards, group_size, scale=scale_rewards)
        return torch.where(m, adv[:, None].expand_as(returns), torch.zeros_like(returns)), returns
    if estimator == "rloo":
        return reinforce_advantages(rloo_advantages(rewards, group_size), mask, gamma=gamma, **kl)
    if estimator == "reinforce":
        return reinforce_advantages(rewards, mask, gamma=gamma, baseline="mean", **kl)
    if estimator == "reinforce++":
        return reinforce_plus_plus_advantages(rewards, mask, gamma=gamma, **kl)
    if estimator == "reinforce++-baseline":
        return reinforce_plus_plus_advantages(rewards, mask, gamma=gamma, group_size=group_size, **kl)
    if estimator == "gae":
        tok, _ = _outcome_token_rewards(rewards, mask, logprobs, ref_logprobs, kl_coef, kl_estimator)
        return gae(tok, values, mask, gamma=gamma, lam=lam)
    raise ValueError(f"unknown estimator {estimator!r}")
