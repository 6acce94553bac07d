"""PPO-clip and GRPO policy losses from logits, and the per-token KL estimate.

Public ops of ``docs/API.md`` ("Policy losses from logits", "KL estimators"):
:func:`ppo_clip_loss`, :func:`grpo_loss`, :func:`kl_estimate`.

How it runs: the row forward of :mod:`fastrlhf.logprobs` (one pass over the logits: logp,
entropy when asked, logsumexp), then the per-token PPO math of :mod:`fastrlhf.token_math` on
``[N]`` tensors, which also forms every token's derivative in closed form. ``backward`` scales
those derivatives by the upstream gradient in fp32 and runs one gradient pass over the logits:
3 passes of ``N x V`` in all (read, read, write) whatever the upstream gradient (``loss / accum``
included), one rounding of a half-precision gradient, the same on every backend.
Gradients flow to the logits and, when they require grad, to ``old_logprobs``, ``advantages``
and ``ref_logprobs`` (exact on every backend).

Kernel: ``fastrlhf/kernels/logprobs.py`` (forward + gradient pass). Oracle:
``fastrlhf/reference/policy.py::ppo_clip_loss`` / ``grpo_loss``. Tests: ``tests/test_ppo.py``.
Benchmark: ``fastrlhf bench grpo``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch

from ._validate import check_ignore_index, check_scalar, check_token_tensor
from .logprobs import mask_as_ignored, prepare, token_values
from .policy_forms import check_form_args
from .token_math import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    counted_tokens,
    float_dtype,
    kl_terms,
    policy_loss_from_logprobs,
)

__all__ = ["ppo_clip_loss", "grpo_loss", "kl_estimate", "check_ppo_args"]

Stats = Mapping[str, torch.Tensor]


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k3",
    clamp: Optional[Tuple[float, float]] = None,
) -> torch.Tensor:
    """Per-token KL(policy || ref) estimate from samples of the policy (Schulman 2020).

    ``r = ref_logp - logp``: ``k1 = -r``, ``k2 = r^2 / 2``, ``k3 = exp(r) - r - 1`` (as
    ``expm1(r) - r``, ``r`` clamped to +-20). ``clamp=(lo, hi)`` clamps the estimate (verl's
    ``low_var_kl`` is k3 with ``(-10, 10)``). fp32 at least; differentiable.
    """
    for name, t in (("logp", logp), ("ref_logp", ref_logp)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if logp.device != ref_logp.device:
        raise ValueError(f"ref_logp is on {ref_logp.device} but logp is on {logp.device}")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None:
        if len(clamp) != 2:
            raise ValueError(f"clamp must be (lo, hi) with lo <= hi, got {clamp!r}")
        lo, hi = check_scalar(clamp[0], "clamp[0]"), check_scalar(clamp[1], "clamp[1]")
        if lo > hi:
            raise ValueError(f"clamp must be (lo, hi) with lo <= hi, got {clamp!r}")
    dt = float_dtype(logp, ref_logp)
    kl, _ = kl_terms(logp.to(dt), ref_logp.to(dt), estimator)
    return kl.clamp(lo, hi) if clamp is not None else kl


def _check_mask_values(mask: Optional[torch.Tensor]) -> None:
    if mask is None or mask.dtype == torch.bool:
        return
    if torch.compiler.is_compiling():
        # No host branch on data in a graph: an in-graph assertion, raised when the graph runs.
        torch._assert_async(((mask == 0) | (mask == 1)).all(), "mask must hold only 0 and 1 (or be bool)")
        return
    # One [B, T] check (a host sync, like the label range check): a fractional or negative mask
    # would otherwise count as 1.
    if bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"mask must hold only 0 and 1 (or be bool), got {bad}; per-token weights are not a mask")


def check_ppo_args(labels, old_logprobs, advantages, mask, ref_logprobs, opts, rollout_logprobs=None) -> dict:
    """Check the per-token inputs and hyper-parameters; return the options as plain floats (with the
    policy-form and rollout-correction options of :func:`fastrlhf.policy_forms.check_form_args`)."""
    if old_logprobs is None:
        raise ValueError("old_logprobs is required")
    if advantages is None:
        raise ValueError("advantages is required")
    check_token_tensor(old_logprobs, labels, "old_logprobs")
    check_token_tensor(advantages, labels, "advantages", allow_per_sequence=True)
    check_token_tensor(mask, labels, "mask")
    check_token_tensor(ref_logprobs, labels, "ref_logprobs")
    _check_mask_values(mask)
    out = dict(opts)
    out["clip_low"] = check_scalar(opts["clip_low"], "clip_low", low=0.0, high=1.0, high_open=True)
    out["clip_high"] = check_scalar(opts["clip_high"], "clip_high", low=0.0, optional=True)
    out["dual_clip"] = check_scalar(opts["dual_clip"], "dual_clip", low=1.0, low_open=True, optional=True)
    out["kl_coef"] = check_scalar(opts["kl_coef"], "kl_coef", low=0.0)
    out["entropy_coef"] = check_scalar(opts["entropy_coef"], "entropy_coef", low=0.0)
    if out["kl_estimator"] not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {out['kl_estimator']!r}")
    if out["loss_agg"] not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {out['loss_agg']!r}")
    if out["kl_coef"] > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef > 0")
    return check_form_args(labels, rollout_logprobs, out)


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
    compute_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
    support=None,
    top_k: Optional[int] = None,
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
) -> Tuple[torch.Tensor, Stats]:
    """PPO-clip policy loss from logits (Schulman et al. 2017, eq. 7) on the fused logprob pass.

    Per token, ``logp`` computed from ``logits / temperature``:
    ``ratio = exp(clamp(logp - old_logprobs, -20, 20))``;
    ``pg = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))`` (``clip_high``
    defaults to ``clip_low``; DAPO's clip-higher sets it larger); ``dual_clip=c > 1``
    (Ye et al. 2020): ``pg = min(pg, -A * c)`` where ``A < 0``; ``+ kl_coef * kl_estimate(logp,
    ref_logprobs, kl_estimator)``; ``- entropy_coef * entropy``. Aggregated over counted tokens
    (``mask`` true and label not ``ignore_index``) by ``loss_agg``: ``token-mean``,
    ``seq-mean-token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-sum-norm`` (Dr. GRPO).

    ``advantages``: ``[B, T]`` per token or ``[B]`` per sequence. ``mask``: bool or 0/1 (other
    values are rejected). ``compute_entropy=True`` reports the ``entropy`` stat without a bonus.
    Hyper-parameters are finite numbers (or 0-d tensors); NaN / inf raise ``ValueError``.
    Uncounted tokens contribute nothing, whatever their inputs hold (NaN padding included).

    Policy-loss forms (TRL 1.16 ``GRPOTrainer._compute_loss`` semantics; ``docs/losses.md``):

    - ``ratio_level="sequence"`` (GSPO, TRL's ``importance_sampling_level``): the ratio is
      ``exp(sum_t m_t (logp_t - old_t) / max(1, sum_t m_t))``, shared by the sequence's tokens,
      differentiable in every token of it (no extra pass over the logits: the row forward gives
      every logp before the loss).
    - ``policy_loss="cispo"``: ``-sg(min(ratio, clip_high)) * A * logp`` (``clip_high`` is the cap
      itself, e.g. 5.0, and is required); ``"sapo"``: ``-sigmoid(tau (ratio - 1)) * 4 / tau * A``
      with ``tau = sapo_tau_pos`` where ``A > 0`` else ``sapo_tau_neg``.
    - ``ratio_cap=delta`` (TRL's ``delta``, ``clip`` only): ``-A * min(ratio, delta)`` as the
      unclipped term.
    - ``kl_is_correction=True`` (TRL's ``use_bias_correction_kl``): the KL term times the ratio,
      with its gradient.
    - ``rollout_correction`` with ``rollout_logprobs`` (the sampler's, ``[B, T]``, NaN = no
      correction) and ``rollout_is_min`` / ``rollout_is_max``: the policy term (not the KL) times
      ``exp(old - rollout)`` per token or ``exp(sum_t m_t (old_t - rollout_t))`` per sequence,
      clamped (``*_truncate``) or zeroed outside ``[min, max]`` (``*_mask``; ``"icepop"`` is
      ``"token_mask"``); no gradient.

    Returns ``(loss, stats)`` with stats ``clipfrac`` (fraction of counted tokens whose clipped
    term is active, as verl; for cispo TRL's capped tokens with ``A > 0``; 0 for sapo),
    ``ratio_mean``, ``approx_kl`` (k3 of old vs new), ``kl`` (when ``kl_coef > 0``), ``entropy``
    (when computed), ``num_tokens``; with a rollout correction ``rollout_is_mean`` and
    ``rollout_is_frac_corrected`` (over counted tokens, or sequences for the sequence modes).

    Memory: no ``[N, V]`` tensor besides the logits' gradient (written into the logits during
    backward with ``inplace_backward=True``; see :func:`fastrlhf.token_logprobs` for what that forbids).
    """
    ignore_index = check_ignore_index(ignore_index)
    temperature, backend, offset = prepare(logits, labels, temperature, ignore_index, backend, process_group)
    opts = check_ppo_args(labels, old_logprobs, advantages, mask, ref_logprobs, dict(
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, loss_agg=loss_agg, policy_loss=policy_loss, ratio_level=ratio_level,
        ratio_cap=ratio_cap, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, kl_is_correction=kl_is_correction,
        rollout_correction=rollout_correction, rollout_is_min=rollout_is_min, rollout_is_max=rollout_is_max,
    ), rollout_logprobs)
    want_entropy = opts["entropy_coef"] > 0 or compute_entropy
    labels = mask_as_ignored(labels, mask, ignore_index)
    out = token_values(logits, labels, temperature, ignore_index, True, want_entropy, inplace_backward, backend,
                       process_group, offset, support=support, top_k=top_k)  # sampler support: fastrlhf.support
    logp, ent = out if want_entropy else (out, None)
    counted = counted_tokens(labels, None, ignore_index)
    return policy_loss_from_logprobs(logp, counted, old_logprobs, advantages, entropy=ent,
                                     ref_logprobs=ref_logprobs if opts["kl_coef"] > 0 else None,
                                     rollout_logprobs=rollout_logprobs, **opts)


def grpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.04,
    **kwargs,
) -> Tuple[torch.Tensor, Stats]:
    """GRPO loss (Shao et al. 2024, eq. 3): :func:`ppo_clip_loss` with ``kl_coef=beta``, k3 KL.

    ``advantages`` per sequence ``[B]`` (or per token ``[B, T]``), e.g. from
    :func:`fastrlhf.group_advantages`. ``beta=0`` needs no ``ref_logprobs``. Other keywords as
    :func:`ppo_clip_loss` (``loss_agg="seq-mean-token-mean"`` is the paper's, ``"token-mean"``
    DAPO's, ``"seq-mean-token-sum-norm"`` Dr. GRPO's).
    """
    return _grpo(ppo_clip_loss, logits, labels, old_logprobs, advantages, ref_logprobs, beta, kwargs)


def _grpo(ppo_fn, first, labels, old_logprobs, advantages, ref_logprobs, beta, kwargs, **extra):
    """GRPO on top of a PPO-clip op (the logits one or its fused-linear twin)."""
    for k in ("kl_coef", "kl_estimator"):
        if k in kwargs:
            raise TypeError(f"grpo_loss sets {k} itself (beta, k3); use ppo_clip_loss for other choices")
    beta = check_scalar(beta, "beta", low=0.0)
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0")
    # beta is checked here under its own name; ppo_fn re-checks it as kl_coef (then always valid).
    return ppo_fn(first, *extra.values(), labels, old_logprobs, advantages,
                  ref_logprobs=ref_logprobs if beta > 0 else None, kl_coef=beta, kl_estimator="k3", **kwargs)
