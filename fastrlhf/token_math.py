"""The ``[N]``-sized math of the losses, with closed-form gradients (production code).

Everything here is per token or per sequence, never per vocabulary entry: the vocabulary-sized
work is the row pass of :mod:`fastrlhf._rows`. The PPO-clip / GRPO terms are computed once, in
forward, together with their derivatives in every input (the torch twin of the per-token math a
fused kernel would do); backward only scales them by the upstream gradient, in fp32.
Written independently of the oracle ``fastrlhf/reference/``, which the tests compare against
(and against autograd on it, ``tests/test_token_math.py``).

Conventions (``docs/API.md``): ``[B, T]`` per-token tensors (1-D is ``[1, N]``); ``counted``
tokens have ``mask`` true and a label other than ``ignore_index``; uncounted tokens contribute
exactly nothing, whatever values (NaN included) sit in their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import torch

from ._rows import first_order_only
from .policy_forms import FORM_DEFAULTS, rollout_stats, rollout_weights, surrogate

__all__ = [
    "LOSS_AGG_MODES", "KL_ESTIMATORS", "LOG_RATIO_CLAMP", "float_dtype", "as_batch_time", "counted_tokens",
    "per_token", "loss_agg_weights", "masked_mean", "kl_terms", "PolicyTerms", "policy_terms", "KnownGradLoss",
    "policy_loss_from_logprobs", "policy_stats",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# |log ratio| is clamped before exp (verl's clamp); the clamp's derivative is 0 outside.
LOG_RATIO_CLAMP = 20.0

Stats = Mapping[str, torch.Tensor]


def float_dtype(*ts: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: every per-token output of the package follows this rule."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def as_batch_time(t: torch.Tensor) -> torch.Tensor:
    """A per-token tensor ``[...]`` as ``[B, T]`` (1-D -> ``[1, N]``; >2-D -> leading dims merged; a view
    whenever the strides allow, as for 2-D inputs)."""
    if t.dim() == 2:
        return t
    return t.reshape(1 if t.dim() == 1 else -1, t.shape[-1])  # -1 would be ambiguous for T = 0 in 2-D


def counted_tokens(labels: torch.Tensor, mask: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """Bool ``[B, T]``: the tokens that count (label not ``ignore_index`` and ``mask`` true)."""
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.reshape(labels.shape).bool()
    return as_batch_time(counted)


def per_token(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A per-token ``[...]`` or per-sequence ``[B]`` input as ``[B, T]`` in ``dtype`` (a ``[B]`` tensor is
    broadcast over T; where ``B == 1`` or ``T == 1`` both readings give the same numbers)."""
    if t.dim() == 1 and t.numel() == shape[0]:
        return t.to(dtype).unsqueeze(1).expand(shape)
    return t.to(dtype).reshape(shape)


def loss_agg_weights(counted: torch.Tensor, loss_agg: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w [B, T]`` with ``loss = sum(w * per_token_loss)`` for the bool ``counted [B, T]``.

    ``token-mean``: ``1 / #counted``; ``seq-mean-token-mean``: ``1 / (#counted in the row x #rows
    with a counted token)``; ``seq-mean-token-sum``: ``1 / B``; ``seq-mean-token-sum-norm``
    (Dr. GRPO): ``1 / (B * T)``; 0 on uncounted tokens. No counted token: all 0 (loss 0, no NaN).
    """
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    B, T = counted.shape
    ones = counted.to(dtype)
    if loss_agg == "token-mean":
        denom = ones.sum().clamp_min(1.0)
    elif loss_agg == "seq-mean-token-mean":
        row_counts = ones.sum(1, keepdim=True)  # [B, 1]
        denom = row_counts.clamp_min(1.0) * (row_counts > 0).sum().clamp_min(1).to(dtype)
    elif loss_agg == "seq-mean-token-sum":
        denom = torch.tensor(float(max(B, 1)), dtype=dtype, device=counted.device)
    else:
        denom = torch.tensor(float(max(B * T, 1)), dtype=dtype, device=counted.device)
    return ones / denom


def masked_mean(x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over counted tokens (0 when none); uncounted values, NaN included, are never read."""
    total = torch.where(counted, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    return total / counted.sum().clamp_min(1).to(x.dtype)


def kl_terms(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str):
    """``(kl, dkl/dlogp)`` per token for KL(policy || ref) from samples of the policy (Schulman 2020).

    With ``r = ref - logp``: ``k1 = -r`` (derivative 1), ``k2 = r^2 / 2`` (``-r``),
    ``k3 = exp(r) - r - 1`` computed as ``expm1(r) - r`` (accurate near 0, where KL lives), ``r``
    clamped to +-20 first (derivative ``-expm1(r)`` inside the clamp, 0 outside).
    ``dkl/dref = -dkl/dlogp`` for all three.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    r = ref_logp - logp
    if estimator == "k1":
        return -r, torch.ones_like(r)
    if estimator == "k2":
        return 0.5 * r * r, -r
    r_c = r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    em1 = torch.expm1(r_c)
    inside = (r >= -LOG_RATIO_CLAMP) & (r <= LOG_RATIO_CLAMP)
    return em1 - r_c, torch.where(inside, -em1, torch.zeros_like(em1))


@dataclass
class PolicyTerms:
    """Per-token values ``[B, T]`` of the PPO-clip objective and their derivatives.

    ``loss = sum(w * tok_loss)``; ``d_*`` are derivatives of that loss (weights included) in
    ``logp``, ``entropy``, ``old_logprobs``, ``advantages`` and ``ref_logprobs``.
    """

    loss: torch.Tensor
    tok_loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    kl: Optional[torch.Tensor]
    d_logp: torch.Tensor
    d_entropy: Optional[torch.Tensor]
    d_old: torch.Tensor
    d_adv: torch.Tensor
    d_ref: Optional[torch.Tensor]


def policy_terms(
    logp: torch.Tensor,
    entropy: Optional[torch.Tensor],
    old: torch.Tensor,
    adv: torch.Tensor,
    ref: Optional[torch.Tensor],
    w: torch.Tensor,
    counted: torch.Tensor,
    *,
    clip_low: float,
    clip_high: Optional[float],
    dual_clip: Optional[float],
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    policy_loss: str = "clip",
    ratio_level: str = "token",
    ratio_cap: Optional[float] = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    kl_is_correction: bool = False,
    is_weight: Optional[torch.Tensor] = None,
) -> PolicyTerms:
    """The per-token policy loss with closed-form derivatives: PPO-clip (Schulman et al. 2017,
    eq. 7) with clip-higher, ``ratio_cap`` and dual clip (Ye et al. 2020), or CISPO / SAPO
    (:mod:`fastrlhf.policy_forms`), times the rollout correction weight ``is_weight``, plus a KL
    penalty (times the ratio when ``kl_is_correction``) and an entropy bonus.

    All inputs ``[B, T]`` in one float dtype (``adv`` already broadcast per token), detached.
    ``u = logp - old`` per token, or (``ratio_level="sequence"``, GSPO) the sequence's mean
    ``sum_t m_t (logp_t - old_t) / max(1, sum_t m_t)`` shared by its tokens; ``ratio =
    exp(clamp(u, -20, 20))``. ``l = is_weight * pg(ratio, logp, A) + kl_coef * kl(logp, ref) *
    (ratio if kl_is_correction) - entropy_coef * H``. With ``D_s = w_s dl_s/du``, the derivative
    in ``logp_t`` is ``w_t dl_t/dlogp_t + D_t`` per token, ``w_t dl_t/dlogp_t + m_t / n_i sum_s D_s``
    for a sequence ratio; in ``old_t`` minus the ``D`` part. A sequence ratio needs every token of
    its sequence: call it on whole rows. Derivatives follow torch's conventions exactly (those of
    autograd on the oracle): a clamp passes the gradient on its closed interval, a tie of ``max``
    / ``min`` splits it half-half.
    """
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Uncounted tokens: inputs replaced by 0 before any arithmetic, so garbage there (NaN padding)
    # cannot reach the loss, the stats or the gradients.
    logp, old, adv = (torch.where(counted, t, zero) for t in (logp, old, adv))
    u = logp - old
    if ratio_level == "sequence":
        n = counted.sum(-1, keepdim=True).clamp_min(1).to(logp.dtype)  # [B, 1]
        u = (u.sum(-1, keepdim=True) / n).expand_as(logp)  # uncounted tokens hold 0
    ratio = torch.exp(u.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    d_ratio = torch.where((u >= -LOG_RATIO_CLAMP) & (u <= LOG_RATIO_CLAMP), ratio, zero)
    s = surrogate(ratio, d_ratio, logp, adv, policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high,
                  dual_clip=dual_clip, ratio_cap=ratio_cap, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg)
    tok_loss, d_u, d_direct, d_a = s.pg, s.d_u, s.d_logp, s.d_adv
    if is_weight is not None:  # the rollout correction weight: a constant (no gradient)
        c = torch.where(counted, is_weight, zero)
        tok_loss, d_u, d_a = c * tok_loss, c * d_u, c * d_a
        d_direct = None if d_direct is None else c * d_direct
    d_direct = torch.zeros_like(logp) if d_direct is None else d_direct
    kl = d_ref = None
    if kl_coef > 0:
        kl, dkl = kl_terms(logp, torch.where(counted, ref, zero), kl_estimator)
        if kl_is_correction:  # TRL's use_bias_correction_kl: kl * coef_1, with coef_1's gradient
            d_u = d_u + kl_coef * kl * d_ratio
            kl, dkl = kl * ratio, dkl * ratio
        tok_loss = tok_loss + kl_coef * kl
        d_direct = d_direct + kl_coef * dkl
        d_ref = -w * kl_coef * dkl
    d_entropy = None
    if entropy_coef > 0:
        ent = torch.where(counted, entropy, zero)
        tok_loss = tok_loss - entropy_coef * ent
        d_entropy = -entropy_coef * w
    tok_loss = torch.where(counted, tok_loss, zero)
    loss = (w * tok_loss).sum()
    through = torch.where(counted, w * d_u, zero)  # d loss / d u of each token
    if ratio_level == "sequence":
        through = torch.where(counted, (through.sum(-1, keepdim=True) / n).expand_as(logp), zero)
    d_logp = w * d_direct + through
    d_old = -through
    d_adv = w * d_a
    return PolicyTerms(loss, tok_loss, ratio, s.clipped & counted, kl, d_logp, d_entropy, d_old, d_adv, d_ref)


class KnownGradLoss(torch.autograd.Function):
    """A 0-d ``value`` whose derivatives in ``inputs`` were computed in forward (``grads``, one per
    input, None for no gradient). Backward scales them by the upstream gradient in fp32 (never in
    the inputs' half precision: GradScaler's 65536 overflows fp16) and casts once."""

    @staticmethod
    def forward(value, grads, *inputs):
        return value.detach().clone()

    @staticmethod
    def setup_context(ctx, inputs, output):  # forward without ctx: torch.func.grad can trace it
        _, grads, *tensors = inputs
        ctx.grads = grads
        ctx.shapes = [None if t is None else (t.shape, t.dtype) for t in tensors]
        ctx.set_materialize_grads(False)

    @staticmethod
    @first_order_only
    def backward(ctx, dloss):
        out = []
        for g, meta in zip(ctx.grads, ctx.shapes):
            if g is None or meta is None or dloss is None:
                out.append(None)
                continue
            shape, dtype = meta
            g = g * dloss.to(g.dtype)
            if g.shape != shape:  # a per-sequence input broadcast over T: sum its tokens' derivatives
                g = g.sum(-1) if g.dim() == 2 and len(shape) == 1 else g.reshape(shape)
            out.append(g.to(dtype))
        return (None, None, *out)


class _EagerKnownGradLoss(KnownGradLoss):
    """:class:`KnownGradLoss` with a classic ``forward(ctx, ...)``: outside ``torch.func`` transforms this
    skips ``Function.apply``'s per-call ``inspect.signature`` binding of a ``setup_context`` forward."""

    setup_context = torch.autograd.Function.setup_context

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        KnownGradLoss.setup_context(ctx, (value, grads, *inputs), None)
        return KnownGradLoss.forward(value, grads, *inputs)


def policy_stats(ratio, clipped, kl, logp, old, entropy, counted) -> Dict[str, torch.Tensor]:
    """The stats of the PPO-clip losses over counted tokens (all ``[B, T]``; ``kl``/``entropy`` may be None):
    ``clipfrac``, ``ratio_mean``, ``approx_kl`` (k3 of old vs new), ``kl``, ``entropy``, ``num_tokens``."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    r = (torch.where(counted, old, zero) - torch.where(counted, logp, zero)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    stats = {
        "clipfrac": masked_mean(clipped.to(logp.dtype), counted),
        "ratio_mean": masked_mean(ratio, counted),
        "approx_kl": masked_mean(torch.expm1(r) - r, counted),
        "num_tokens": counted.sum().to(logp.dtype),
    }
    if kl is not None:
        stats["kl"] = masked_mean(kl, counted)
    if entropy is not None:
        stats["entropy"] = masked_mean(entropy, counted)
    return stats


def policy_loss_from_logprobs(
    logp: torch.Tensor,
    counted: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    loss_agg: str = "token-mean",
    weights: Optional[torch.Tensor] = None,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    rollout_logprobs: Optional[torch.Tensor] = None,
    rollout_correction: Optional[str] = None,
    rollout_is_min: Optional[float] = None,
    rollout_is_max: Optional[float] = None,
    **forms,
):
    """``(loss, stats)`` of the policy loss from per-token values: ``logp``, ``counted`` (bool) and
    the other per-token inputs ``[B, T]`` (``advantages`` may be ``[B]``); ``entropy`` when the loss
    or the stats use it. Differentiable in ``logp``, ``entropy``, ``old_logprobs``, ``advantages``
    and ``ref_logprobs`` (closed-form derivatives, see :func:`policy_terms`); ``rollout_logprobs``
    carries none. ``weights`` overrides the ``loss_agg`` weights (a global normaliser under data
    parallelism, say). ``forms``: ``policy_loss``, ``ratio_level``, ``ratio_cap``,
    ``sapo_tau_pos`` / ``_neg``, ``kl_is_correction``. Options as :func:`fastrlhf.ppo_clip_loss`
    (already checked by the callers).
    """
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_estimator=kl_estimator, entropy_coef=entropy_coef, **{**FORM_DEFAULTS, **forms})
    dt = float_dtype(logp)
    lp = as_batch_time(logp)
    shape = lp.shape
    counted = counted.reshape(shape).bool()
    w = loss_agg_weights(counted, loss_agg, dt) if weights is None else weights.reshape(shape).to(dt)
    ent = as_batch_time(entropy).to(dt) if entropy is not None else None
    with torch.no_grad():
        old = per_token(old_logprobs, shape, dt)
        adv = per_token(advantages, shape, dt)
        ref = per_token(ref_logprobs, shape, dt) if ref_logprobs is not None else None
        isw = None
        if rollout_correction is not None:
            isw, corrected, units = rollout_weights(old, per_token(rollout_logprobs, shape, dt), counted,
                                                    rollout_correction, rollout_is_min, rollout_is_max)
        terms = policy_terms(lp.detach().to(dt), None if ent is None else ent.detach(), old, adv, ref, w, counted,
                             is_weight=isw, **opts)
        stats = policy_stats(terms.ratio, terms.clipped, terms.kl, lp.detach().to(dt), old,
                             None if ent is None else ent.detach(), counted)
        if isw is not None:
            stats.update(rollout_stats(isw, corrected, units))
    inputs: Sequence[Optional[torch.Tensor]] = (logp, entropy, old_logprobs, advantages, ref_logprobs)
    grads = [terms.d_logp, terms.d_entropy, terms.d_old, terms.d_adv, terms.d_ref]
    grads = [None if (t is None or not t.requires_grad) else g for t, g in zip(inputs, grads)]
    if any(g is not None for g in grads):
        # Inputs without a gradient go in as None (the same tensor twice, e.g. ref = old, would stop dynamo).
        fn = KnownGradLoss if torch._C._are_functorch_transforms_active() else _EagerKnownGradLoss
        loss = fn.apply(terms.loss, grads, *[t if g is not None else None for t, g in zip(inputs, grads)])
    else:
        loss = terms.loss
    return loss, stats
