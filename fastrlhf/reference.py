"""Plain-PyTorch reference of every fastrlhf op: the oracle.

Every public op of ``../shared/API.md`` has a same-named, same-signature function here.
Tests compare the kernels with these (in fp64), benchmarks use them as the "plain PyTorch
composition" baseline, and the non-Triton backends reuse the N-sized per-token loss math
(``ppo_clip_loss_from_logprobs``, ``dpo_loss_from_logprobs``).

These functions are written for clarity, not memory: they materialize the full
``[N, V]`` log-softmax (``N x V x 4`` bytes in fp32), exactly what the kernels avoid.
No Triton import here.

``upcast=True`` (default) computes in fp32, or fp64 when the input is fp64; ``upcast=False``
computes in the input dtype, which measures PyTorch's own error at that precision.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "token_logprobs",
    "token_logprobs_and_entropy",
    "entropy",
    "kl_estimate",
    "ppo_clip_loss",
    "ppo_clip_loss_from_logprobs",
    "policy_surrogate",
    "rollout_correction_weights",
    "grpo_loss",
    "dpo_loss",
    "dpo_loss_from_logprobs",
    "linear_token_logprobs",
    "linear_token_logprobs_and_entropy",
    "linear_ppo_clip_loss",
    "linear_grpo_loss",
    "linear_dpo_loss",
    "gae",
    "group_advantages",
    "LOSS_AGG_MODES",
    "KL_ESTIMATORS",
    "DPO_LOSS_TYPES",
]

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
# Token ops
# ----------------------------------------------------------------------------------------


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    upcast: bool = True,
    sum_p_squared: bool = False,
    support=None,
    top_k: Optional[int] = None,
) -> Tuple[torch.Tensor, ...]:
    """``(logp, entropy)`` per token; 0 (and zero gradient) where ``labels == ignore_index``.

    ``sum_p_squared``: also ``sum_p2 = sum softmax(x)^2``. ``support`` / ``top_k``: every value over the
    distribution renormalised on the kept set (the logits masked to -inf outside it)."""
    x = logits.to(_compute_dtype(logits, upcast)) / temperature  # [..., V]
    if support is not None or top_k is not None:
        x = x + support_mask(logits, support, top_k, temperature).to(x.dtype)  # [..., V] -inf outside S
    logsm = torch.log_softmax(x, dim=-1)  # [..., V]  reads V, writes V (the tensor we avoid)
    valid = labels != ignore_index  # [...]
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [...]
    p = logsm.exp()
    # p * logsm is 0 * -inf = nan where a logit is -inf; such terms contribute 0 (the where
    # is on logsm, not on the product, so that the backward has no 0 * inf either).
    ent = -(p * _finite_or_zero(logsm, p)).sum(-1)  # [...]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    out_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    out = torch.where(valid, logp, zero).to(out_dtype), torch.where(valid, ent, zero).to(out_dtype)
    if sum_p_squared:
        out = out + (torch.where(valid, (p * p).sum(-1), zero).to(out_dtype),)
    return out


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    upcast: bool = True,
    support=None,
    top_k: Optional[int] = None,
) -> torch.Tensor:
    """``logp = x[label] - logsumexp(x)``, ``x = logits / temperature`` (``support`` / ``top_k``: the
    logsumexp over the kept set only)."""
    x = logits.to(_compute_dtype(logits, upcast)) / temperature  # [..., V] (a copy unless fp32 and T = 1)
    if support is not None or top_k is not None:
        x = x + support_mask(logits, support, top_k, temperature).to(x.dtype)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    # The composition everyone writes first: [..., V] log-softmax saved for backward, then a gather.
    logp = torch.log_softmax(x, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    out_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    return torch.where(valid, logp, torch.zeros_like(logp)).to(out_dtype)


def entropy(logits: torch.Tensor, *, temperature: float = 1.0, upcast: bool = True) -> torch.Tensor:
    """``entropy = logsumexp(x) - sum(softmax(x) * x)`` per row."""
    x = logits.to(_compute_dtype(logits, upcast)) / temperature
    logsm = torch.log_softmax(x, dim=-1)
    p = logsm.exp()
    ent = -(p * _finite_or_zero(logsm, p)).sum(-1)
    return ent.to(torch.float64 if ent.dtype == torch.float64 else torch.float32)


# ----------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020)
# ----------------------------------------------------------------------------------------


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k3",
    clamp: Optional[Tuple[float, float]] = None,
) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy.

    ``r = ref_logp - logp``; ``k1 = -r``, ``k2 = r^2 / 2``, ``k3 = exp(r) - r - 1`` as
    ``expm1(r) - r`` (``r`` clamped to +-20 before ``exp``). ``clamp=(lo, hi)`` clamps the estimate (verl's
    ``low_var_kl`` is k3 with ``clamp=(-10, 10)``).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    r = ref_logp - logp
    if estimator == "k1":
        kl = -r
    elif estimator == "k2":
        kl = 0.5 * r * r
    else:
        r = torch.clamp(r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.expm1(r) - r  # exp(r) - 1 without the cancellation near r = 0, where KL lives
    if clamp is not None:
        kl = torch.clamp(kl, clamp[0], clamp[1])
    return kl


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


def _counted_mask(labels: torch.Tensor, mask: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.reshape(labels.shape).bool()
    return counted


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


# ----------------------------------------------------------------------------------------
# Fused-linear variants: the logits ops applied to hidden @ weight.T (+ bias)
# ----------------------------------------------------------------------------------------


def _linear_logits(hidden, weight, bias):
    logits = hidden @ weight.T  # [..., V]  the full logits the fused-linear ops never build
    if bias is not None:
        logits = logits + bias
    return logits


def linear_token_logprobs(hidden, weight, labels, *, bias=None, **kwargs):
    return token_logprobs(_linear_logits(hidden, weight, bias), labels, **kwargs)


def linear_token_logprobs_and_entropy(hidden, weight, labels, *, bias=None, **kwargs):
    return token_logprobs_and_entropy(_linear_logits(hidden, weight, bias), labels, **kwargs)


def linear_ppo_clip_loss(hidden, weight, labels, old_logprobs, advantages, *, bias=None, **kwargs):
    return ppo_clip_loss(_linear_logits(hidden, weight, bias), labels, old_logprobs, advantages, **kwargs)


def linear_grpo_loss(hidden, weight, labels, old_logprobs, advantages, ref_logprobs=None, *, bias=None, **kwargs):
    return grpo_loss(_linear_logits(hidden, weight, bias), labels, old_logprobs, advantages, ref_logprobs, **kwargs)


def linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, *, bias=None, **kwargs):
    return dpo_loss(_linear_logits(hidden, weight, bias), labels, ref_chosen_logps, ref_rejected_logps, **kwargs)


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
# The rest of the RLHF pipeline (issue 10): critic-free advantages, reward-model and RRHF
# losses. Plain loops over rows, tokens and pairs: slow, and obviously the formula.
# ----------------------------------------------------------------------------------------

__all__ += [
    "returns_to_go",
    "rloo_advantages",
    "reinforce_advantages",
    "reinforce_plus_plus_advantages",
    "pairwise_reward_loss",
    "rrhf_loss_from_logprobs",
    "rrhf_loss",
    "linear_rrhf_loss",
]


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


# ----------------------------------------------------------------------------------------
# Value loss, whitening, the estimator dispatch (issue 18): the formulas, element by element
# ----------------------------------------------------------------------------------------

__all__ += ["clipped_value_loss", "masked_whiten", "estimate_advantages"]


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


# ----------------------------------------------------------------------------------------
# Sampler support (top-k / top-p kept sets)
# ----------------------------------------------------------------------------------------


def support_mask(logits: torch.Tensor, support=None, top_k: Optional[int] = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """``[..., V]`` fp64: 0 on each row's kept set, -inf elsewhere. ``support=(token_ids, offsets)``
    is vLLM's CSR (row n keeps ``token_ids[offsets[n]:offsets[n+1]]``); ``top_k`` keeps the k largest
    tempered fp32 logits ``logits * (1 / T)`` (ties as ``torch.topk``)."""
    V = logits.shape[-1]
    N = logits.numel() // V
    mask = torch.full((N, V), float("-inf"), dtype=torch.float64, device=logits.device)  # [N, V]
    if top_k is not None:
        x = logits.reshape(N, V).float() * (1.0 / temperature)
        mask.scatter_(1, torch.topk(x, top_k, dim=-1).indices, 0.0)
    else:
        ids, off = support
        rows = torch.repeat_interleave(torch.arange(N, device=logits.device), (off[1:] - off[:-1]).long())
        mask[rows, ids.long()] = 0.0
    return mask.view(logits.shape)


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
