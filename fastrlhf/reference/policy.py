"""Oracle of PPO-clip / GRPO and the 2026 policy-loss forms (CISPO, SAPO, GSPO, rollout correction)."""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch

from ._common import LOG_RATIO_CLAMP, _counted_mask, _masked_mean, as_batch_time, loss_agg_weights
from .logprobs import kl_estimate, token_logprobs, token_logprobs_and_entropy

# ----------------------------------------------------------------------------------------
# PPO-clip / GRPO
# ----------------------------------------------------------------------------------------


def ppo_clip_loss_from_logprobs(
    logp: torch.Tensor,
    counted: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    policy_loss: str = "clip",
    ratio_level: str = "token",
    ratio_cap: Optional[float] = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    kl_is_correction: bool = False,
    rollout_logprobs: Optional[torch.Tensor] = None,
    rollout_correction: Optional[str] = None,
    rollout_is_min: Optional[float] = None,
    rollout_is_max: Optional[float] = None,
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """PPO-clip loss on per-token log-probabilities (all ``[B, T]``; ``advantages`` may be ``[B]``).

    ``counted`` is the 0/1 float mask of tokens that count (mask and not ignore_index).
    Differentiable in ``logp`` and ``entropy``. See :func:`ppo_clip_loss` for the math, and
    :func:`policy_surrogate` / :func:`rollout_correction_weights` for the forms (TRL 1.16).
    """
    clip_high = clip_low if clip_high is None else clip_high
    m = counted.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B, 1] broadcast over T
    A = advantages.to(logp.dtype)
    old = old_logprobs.to(logp.dtype)
    log_ratio = logp - old
    if ratio_level == "sequence":  # GSPO (Zheng et al. 2025): the length-normalised sequence log-ratio, [B, 1]
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
    log_ratio = torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg, clipped = policy_surrogate(ratio, logp, A, policy_loss, clip_low, clip_high, dual_clip, ratio_cap,
                                   sapo_tau_pos, sapo_tau_neg)
    stats = {}
    if rollout_correction is not None:  # multiplies the policy term only, no gradient
        is_w, stats = rollout_correction_weights(old, rollout_logprobs.to(logp.dtype), m, rollout_correction,
                                                 rollout_is_min, rollout_is_max)
        pg = pg * is_w
    per_token = pg
    if kl_coef > 0.0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs is required when kl_coef > 0")
        kl = kl_estimate(logp, ref_logprobs.to(logp.dtype), kl_estimator)
        if kl_is_correction:  # TRL's use_bias_correction_kl (grpo_trainer.py line 3104): kl * coef_1
            kl = kl * ratio
        per_token = per_token + kl_coef * kl
        stats["kl"] = _masked_mean(kl.detach(), m)
    if entropy_coef > 0.0:
        if entropy is None:
            raise ValueError("entropy is required when entropy_coef > 0")
        per_token = per_token - entropy_coef * entropy
    w = loss_agg_weights(m, loss_agg)
    loss = (per_token * w).sum()
    with torch.no_grad():
        stats["clipfrac"] = _masked_mean(clipped.to(m.dtype), m)
        stats["ratio_mean"] = _masked_mean(ratio.detach(), m)
        stats["approx_kl"] = _masked_mean(kl_estimate(logp.detach(), old, "k3"), m)  # r = old - logp
        if entropy is not None:
            stats["entropy"] = _masked_mean(entropy.detach(), m)
        stats["num_tokens"] = m.sum()
    return loss, {k: v.detach().float() if v.dtype != torch.float64 else v.detach() for k, v in stats.items()}




def ppo_clip_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    ignore_index: int = -100,
    upcast: bool = True,
    rollout_logprobs: Optional[torch.Tensor] = None,
    **forms,
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """PPO-clip (Schulman et al. 2017, eq. 7) with dual clip (Ye et al. 2020) and KL / entropy terms.

    ``forms``: ``policy_loss``, ``ratio_level``, ``ratio_cap``, ``sapo_tau_pos`` / ``_neg``,
    ``kl_is_correction``, ``rollout_correction``, ``rollout_is_min`` / ``_max`` (see
    :func:`ppo_clip_loss_from_logprobs`).

    Per token: ``ratio = exp(clamp(logp - old, -20, 20))``,
    ``pg = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))``; with ``dual_clip=c``
    ``pg = min(pg, -A * c)`` where ``A < 0``; ``+ kl_coef * kl`` and ``- entropy_coef * H``;
    aggregated with ``loss_agg``.
    """
    if entropy_coef > 0:
        logp, ent = token_logprobs_and_entropy(
            logits, labels, temperature=temperature, ignore_index=ignore_index, upcast=upcast
        )
    else:  # no entropy term: the plain log_softmax + gather composition
        logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, upcast=upcast)
        ent = None
    counted = as_batch_time(_counted_mask(labels, mask, ignore_index)).to(logp.dtype)
    per_sequence = advantages.dim() == 1 and labels.dim() >= 2
    adv = advantages if per_sequence else as_batch_time(advantages)
    return ppo_clip_loss_from_logprobs(
        as_batch_time(logp),
        counted,
        as_batch_time(old_logprobs),
        adv,
        entropy=None if ent is None else as_batch_time(ent),
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        ref_logprobs=None if ref_logprobs is None else as_batch_time(ref_logprobs),
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        loss_agg=loss_agg,
        rollout_logprobs=None if rollout_logprobs is None else as_batch_time(rollout_logprobs),
        **forms,
    )


def grpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.04,
    **kwargs,
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """GRPO (Shao et al. 2024, eq. 3): PPO-clip + ``beta`` * k3 KL to the reference."""
    return ppo_clip_loss(
        logits, labels, old_logprobs, advantages,
        ref_logprobs=ref_logprobs, kl_coef=beta, kl_estimator="k3", **kwargs,
    )


# ----------------------------------------------------------------------------------------
# Policy-loss forms and rollout correction (TRL 1.16 trl/trainer/grpo_trainer.py)
# ----------------------------------------------------------------------------------------


def policy_surrogate(ratio, logp, A, policy_loss="clip", clip_low=0.2, clip_high=None, dual_clip=None,
                     ratio_cap=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05):
    """``(pg, clipped)`` per token for ``ratio`` (``[B, T]``, or ``[B, 1]`` for a sequence ratio).

    - ``clip`` (TRL lines 3112-3120, verl vanilla): ``max(-A min(r, ratio_cap), -A clamp(r, 1 - lo, 1 + hi))``,
      then ``min(., -A c)`` where ``A < 0`` for the dual clip ``c``.
    - ``cispo`` (TRL lines 3109-3111): ``-sg(min(r, clip_high)) A logp``.
    - ``sapo`` (TRL lines 3121-3124): ``-sigmoid(tau (r - 1)) 4 / tau A``, ``tau`` by the sign of ``A``.
    """
    if policy_loss == "cispo":
        return -torch.clamp(ratio, max=clip_high).detach() * A * logp, (ratio > clip_high) & (A > 0)
    if policy_loss == "sapo":
        tau = torch.where(A > 0, torch.full_like(A, sapo_tau_pos), torch.full_like(A, sapo_tau_neg))
        gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
        return -gate * A, torch.zeros_like(gate, dtype=torch.bool)
    clip_high = clip_low if clip_high is None else clip_high
    coef_2 = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    coef_1 = ratio if ratio_cap is None else torch.clamp(ratio, max=ratio_cap)
    pg1, pg2 = -A * coef_1, -A * coef_2
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -A * dual_clip), pg)
    return pg, pg2 > pg1


def rollout_correction_weights(old, rollout, m, mode, lo=None, hi=None):
    """``(weights, stats)``: the rollout (train / inference mismatch) correction of TRL's
    ``_generate_and_score_completions`` (lines 2660-2708), detached.

    ``exp((old - rollout) * m)`` per token, ``exp(sum_t (old_t - rollout_t) m_t)`` per sequence
    (``[B, 1]``), NaN differences -> 0, the log clamped to +-20 (verl's SAFETY_BOUND);
    ``*_truncate`` clamps to ``[lo, hi]``; ``*_mask`` and ``icepop`` zero the weights outside.
    Stats over counted tokens (token modes) or sequences with a counted token.
    """
    with torch.no_grad():
        diff = torch.nan_to_num((old - rollout) * m, nan=0.0)
        per_seq = mode in ("sequence_truncate", "sequence_mask")
        if per_seq:
            diff = diff.sum(-1, keepdim=True)
        raw = torch.exp(torch.clamp(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        low = float("-inf") if lo is None else lo
        high = float("inf") if hi is None else hi
        outside = (raw < low) | (raw > high)
        if mode in ("token_truncate", "sequence_truncate"):
            w = torch.clamp(raw, min=lo, max=hi)
        elif mode in ("token_mask", "sequence_mask", "icepop"):
            w = raw.masked_fill(outside, 0.0)
        else:
            raise ValueError(f"unknown rollout_correction {mode!r}")
        unit = (m.sum(-1, keepdim=True) > 0).to(m.dtype) if per_seq else m
        stats = {"rollout_is_mean": _masked_mean(w, unit),
                 "rollout_is_frac_corrected": _masked_mean(outside.to(m.dtype), unit)}
    return w, stats
