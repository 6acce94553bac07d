"""verl's policy losses (``POLICY_LOSS_REGISTRY``) with verl's signatures and semantics, on fastrlhf's math.

Every function is ``f(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="...",
config=None, rollout_is_weights=None) -> (pg_loss, pg_metrics)`` as verl's, plus a ``*_tuple``
twin with the earlier return ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``. Sources read:
verl 0.9.1 (``pip download verl==0.9.1``) and verl-project/verl @ 1dda039b,
``verl/trainer/ppo/core_algos.py``: ``agg_loss`` (lines 1140-1207), ``compute_policy_loss_vanilla``
(1285-1376), ``compute_policy_loss_gspo`` (1545-1618), ``compute_policy_loss_sapo`` (1621-1703),
``compute_policy_loss_cispo`` (2046-2104). Routes (``docs/integrations.md`` has the measured errors):

- ``vanilla``: PPO-clip with clip-higher and dual clip ``clip_ratio_c``, via
  ``fastrlhf.token_math.policy_loss_from_logprobs`` with the weights folded into the advantages.
- ``sapo``: ``policy_loss_from_logprobs(policy_loss="sapo")`` with ``tau_pos`` / ``tau_neg`` from the
  config (rounded to the advantages' dtype, as verl's ``torch.as_tensor``); verl forces
  ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says, and so does this.
- ``gspo``: verl's GSPO is the *GSPO-token* form (Zheng et al. 2025, eq. 13): token ``t`` of sequence
  ``i`` has the ratio ``sg(s_i) pi_t / sg(pi_t)``, ``log s_i = mean_t (log_prob - old_log_prob)``
  clamped to ``<= 10`` (no lower clamp), so its value is ``s_i`` but its gradient reaches only
  ``log_prob_t`` (``old_log_prob`` gets none). With per-sequence advantages and no per-token weights
  this equals fastrlhf's ``ratio_level="sequence"``; with per-token advantages or
  ``rollout_is_weights`` it does not, so the drop-in takes fastrlhf's clip surrogate
  (``fastrlhf.policy_forms.surrogate``) on verl's ratio and chains its closed-form derivative to
  ``log_prob_t`` alone. No dual clip (verl has none here); ``seq-mean-token-mean`` forced.
- ``cispo``: ``-sg(clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) A log_prob`` (Chen et al. 2025,
  MiniMax-M1). fastrlhf's (TRL's) CISPO weight is ``sg(min(r, cap))``: verl's also has the floor
  ``1 - clip_ratio_low``. ``min(max(r, 1 - lo), 1 + hi)`` is exactly ``clamp(r, 1 - lo, 1 + hi)``, so the
  drop-in gives ``surrogate(policy_loss="cispo")`` the floored ratio and the cap ``1 + clip_ratio_high``.

``rollout_is_weights`` (verl's TIS / IcePop weights, made without gradient by
``rollout_corr_helper.compute_rollout_correction_weights``) multiply the per-token loss and carry
no gradient. Gradients (closed form, ``fastrlhf.token_math.KnownGradLoss``) reach ``log_prob``,
``advantages`` and, where verl's does, ``old_log_prob``. Metrics are verl's masked means (``+1e-8``).
Masked tokens never reach the loss (NaN there gives a finite loss; verl's ``loss_mat * mask`` would not).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from ..policy_forms import surrogate
from ..token_math import KnownGradLoss, as_batch_time, float_dtype, policy_loss_from_logprobs
from ._patch import ensure_tensor

__all__ = [
    "AGG_MODES",
    "compute_policy_loss_vanilla",
    "compute_policy_loss_vanilla_tuple",
    "compute_policy_loss_gspo",
    "compute_policy_loss_gspo_tuple",
    "compute_policy_loss_sapo",
    "compute_policy_loss_sapo_tuple",
    "compute_policy_loss_cispo",
    "compute_policy_loss_cispo_tuple",
]

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
# core_algos.py: clamp of the per-token log ratio (vanilla, sapo, cispo; lines 1338, 1665, 2070) and the
# upper clamp of GSPO's log s_i (line 1590).
LOG_RATIO_CLAMP = 20.0
GSPO_LOG_RATIO_MAX = 10.0
# verl ActorConfig defaults (verl/workers/config/actor.py lines 168-169).
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05


def _agg_weights(
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights ``w`` with ``loss = sum(loss_mat * w)`` for verl 0.9.1's ``agg_loss`` (``[B, T]``).

    token-mean ``m / n_tok * dp``; token-sum ``m * dp``; seq-mean-token-sum ``m / n_seq * dp``
    (``/ loss_scale_factor``, default ``T``, for -norm); seq-mean-token-mean
    ``m / (sum_t m + 1e-8) / n_seq * dp`` (the ``+ 1e-8`` in the mask's dtype, as verl); where ``n_tok``
    is ``batch_num_tokens`` (default: the micro-batch's counted tokens) and ``n_seq`` is
    ``global_batch_size`` (default: its sequences with a counted token). Locally the same
    normalisations as ``fastrlhf.token_math.loss_agg_weights`` (token-mean, seq-mean-token-mean),
    except that verl's seq-mean-token-sum(-norm) count only
    non-empty sequences.
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    m = as_batch_time(loss_mask).to(dtype)  # [B, T]
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    if loss_agg_mode == "token-mean":
        n_tok = m.sum().clamp_min(1.0) if batch_num_tokens is None else batch_num_tokens
        return m / n_tok * dp_size
    if loss_agg_mode == "token-sum":
        return m * dp_size
    per_seq = m.sum(-1, keepdim=True)  # [B, 1]
    n_seq = (per_seq > 0).sum().clamp_min(1).to(dtype) if global_batch_size is None else global_batch_size
    if loss_agg_mode == "seq-mean-token-mean":
        # verl adds the 1e-8 in the mask's own arithmetic: for int / bool / fp32 masks that is fp32, where
        # n + 1e-8 == n; only an fp64 mask sees it.
        counts = as_batch_time(loss_mask).sum(-1, keepdim=True) + 1e-8  # [B, 1]
        return m / counts.to(dtype) / n_seq * dp_size
    w = m / n_seq * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        w = w / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return w


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's ActorConfig / DictConfig / a plain namespace or dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # a .get with another meaning: fall back to the attribute
            pass
    return getattr(config, key, default)


def _inputs(old_log_prob, log_prob, advantages, response_mask, config):
    """``[B, T]`` views of the inputs (autograd flows through them), after verl's checks."""
    if config is None:
        raise ValueError("config is required (verl's actor config: clip_ratio, clip_ratio_low/high, ...)")
    for name, t in (("old_log_prob", old_log_prob), ("log_prob", log_prob), ("advantages", advantages),
                    ("response_mask", response_mask)):
        ensure_tensor(t, name)
        if t.shape != log_prob.shape:
            raise ValueError(f"{name} must have the shape of log_prob {tuple(log_prob.shape)}, got {tuple(t.shape)}")
    return (as_batch_time(old_log_prob), as_batch_time(log_prob), as_batch_time(advantages),
            as_batch_time(response_mask))


def _clip_range(config) -> tuple[float, float]:
    clip_ratio = _cfg(config, "clip_ratio")
    low = _cfg(config, "clip_ratio_low")
    high = _cfg(config, "clip_ratio_high")
    low = clip_ratio if low is None else low
    high = clip_ratio if high is None else high
    if low is None or high is None:
        raise ValueError("config must set clip_ratio (or both clip_ratio_low and clip_ratio_high)")
    return low, high


def _token_weights(m, loss_agg_mode, config, rollout_is_weights, dtype) -> torch.Tensor:
    """``s [B, T]``: verl's ``agg_loss`` weight of each token (``config.global_batch_info``) times its
    rollout IS weight: ``loss = sum_t s_t pg_t``."""
    batch_info: dict[str, Any] = dict(_cfg(config, "global_batch_info", None) or {})
    s = _agg_weights(m, loss_agg_mode, dtype=dtype, **batch_info)
    if rollout_is_weights is not None:
        ensure_tensor(rollout_is_weights, "rollout_is_weights")
        isw = as_batch_time(rollout_is_weights).detach().to(dtype)
        if isw.shape != s.shape:
            raise ValueError(f"rollout_is_weights must have the shape of log_prob, got {tuple(isw.shape)}")
        if bool((isw < 0).any()):
            raise ValueError("rollout_is_weights must be >= 0 (importance weights)")
        s = s * isw
    return s


def _verl_masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # verl/utils/torch_functional.py masked_mean: masked_sum / (mask.sum() + 1e-8)
    return torch.where(m.bool(), x, 0.0).mul(m).sum() / (m.sum() + 1e-8)


def _with_grads(value: torch.Tensor, pairs) -> torch.Tensor:
    """``value`` (0-d) with the closed-form derivatives ``[(input, d value / d input), ...]`` attached."""
    grads = [g if t.requires_grad else None for t, g in pairs]
    if all(g is None for g in grads):
        return value
    return KnownGradLoss.apply(value, grads, *[t if g is not None else None for (t, _), g in zip(pairs, grads)])


def _metrics(clipfrac, ppo_kl, clipfrac_lower) -> dict[str, float]:
    return {"actor/pg_clipfrac": float(clipfrac), "actor/ppo_kl": float(ppo_kl),
            "actor/pg_clipfrac_lower": float(clipfrac_lower)}


# ----------------------------------------------------------------------------------------
# vanilla (PPO-clip)
# ----------------------------------------------------------------------------------------


def _vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    old, lp, A, m = _inputs(old_log_prob, log_prob, advantages, response_mask, config)
    low, high = _clip_range(config)
    clip_ratio_c = _cfg(config, "clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual-clip lower bound, Ye et al. 2020) must be > 1.0, got {clip_ratio_c}")
    A = A.to(lp.dtype)
    counted = m.bool()
    # PPO-clip's per-token loss is positively homogeneous in A (pg(s*A) = s * pg(A) for s >= 0, dual
    # clip included), so sum_t pg(A_t) * s_t = sum_t pg(s_t * A_t): fastrlhf's PPO math on scaled
    # advantages, summed ("seq-mean-token-sum" over one row = plain sum), is verl's loss.
    s = _token_weights(m, loss_agg_mode, config, rollout_is_weights, lp.dtype)
    loss, _ = policy_loss_from_logprobs(
        lp.reshape(1, -1), counted.reshape(1, -1), old.reshape(1, -1), (A * s).reshape(1, -1),
        clip_low=low, clip_high=high, dual_clip=clip_ratio_c, loss_agg="seq-mean-token-sum",
    )
    # Metrics exactly as verl computes them (with the unscaled advantages).
    with torch.no_grad():
        neg_kl = torch.clamp(lp.detach() - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(neg_kl)
        pg1 = -A * ratio
        pg2 = -A * torch.clamp(ratio, 1 - low, 1 + high)
        pg3 = -A * clip_ratio_c
        pg_clipfrac = _verl_masked_mean(torch.gt(pg2, pg1).float(), m)
        ppo_kl = _verl_masked_mean(-neg_kl, m)
        pg_clipfrac_lower = _verl_masked_mean(torch.gt(torch.maximum(pg1, pg2), pg3).float() * (A < 0).float(), m)
    return loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


# ----------------------------------------------------------------------------------------
# GSPO (GSPO-token), SAPO, CISPO
# ----------------------------------------------------------------------------------------


def _detached(counted, dt, *ts):
    """Detached copies in ``dt`` with 0 on uncounted tokens (NaN padding never reaches the math)."""
    zero = torch.zeros((), dtype=dt, device=counted.device)
    return [torch.where(counted, t.detach().to(dt), zero) for t in ts]


def _gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    old, lp, A, m = _inputs(old_log_prob, log_prob, advantages, response_mask, config)
    low, high = _clip_range(config)
    dt = float_dtype(lp)
    counted = m.bool()
    with torch.no_grad():
        lpd, oldd, Ad = _detached(counted, dt, lp, old, A)
        mf = m.to(dt)
        # log s_i = sum_t m_t (log_prob - old) / max(1, sum_t m_t) (core_algos.py lines 1583-1584), one per row
        u = ((lpd - oldd) * mf).sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
        u = u.expand_as(lpd)  # [B, T]
        # log s_it = log_prob_t - sg(log_prob_t) + sg(log s_i), clamped to <= 10 (lines 1589-1590): value
        # exp(min(log s_i, 10)); d s_it / d log_prob_t = s_it where log s_i <= 10 (clamp passes on its
        # closed interval), 0 above; nothing reaches old_log_prob or the other tokens.
        ratio = torch.exp(u.clamp(max=GSPO_LOG_RATIO_MAX))
        d_ratio = torch.where(u <= GSPO_LOG_RATIO_MAX, ratio, torch.zeros((), dtype=dt, device=u.device))
        s = surrogate(ratio, d_ratio, lpd, Ad, policy_loss="clip", clip_low=low, clip_high=high, dual_clip=None,
                      ratio_cap=None, sapo_tau_pos=SAPO_TAU_POS, sapo_tau_neg=SAPO_TAU_NEG)
        w = _token_weights(m, "seq-mean-token-mean", config, rollout_is_weights, dt)  # verl forces it (line 1605)
        value = (w * s.pg).sum()
        pg_clipfrac = _verl_masked_mean(s.clipped.to(dt), m)
        ppo_kl = _verl_masked_mean(-(lp.detach() - old.detach()), m)  # unclamped (line 1612)
    loss = _with_grads(value, [(lp, w * s.d_u), (A, w * s.d_adv)])
    return loss, pg_clipfrac, ppo_kl, torch.zeros((), device=lp.device)


def _sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    old, lp, A, m = _inputs(old_log_prob, log_prob, advantages, response_mask, config)
    counted = m.bool()
    # verl builds the temperatures with torch.as_tensor(config.tau_*, dtype=advantages.dtype) (lines 1653-1654)
    taus = [torch.tensor(float(_cfg(config, k, d)), dtype=advantages.dtype).item()
            for k, d in (("tau_pos", SAPO_TAU_POS), ("tau_neg", SAPO_TAU_NEG))]
    if not (taus[0] > 0 and taus[1] > 0):
        raise ValueError(f"config.tau_pos and config.tau_neg (SAPO temperatures) must be > 0, got {taus}")
    dt = float_dtype(lp)
    w = _token_weights(m, "seq-mean-token-mean", config, rollout_is_weights, dt)  # verl forces it (line 1688)
    loss, _ = policy_loss_from_logprobs(lp, counted, old, A, weights=w, policy_loss="sapo", sapo_tau_pos=taus[0],
                                        sapo_tau_neg=taus[1])
    with torch.no_grad():
        ppo_kl = _verl_masked_mean(-torch.clamp(lp.detach() - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), m)
    zero = torch.zeros((), device=lp.device)
    return loss, zero, ppo_kl, zero


def _cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    old, lp, A, m = _inputs(old_log_prob, log_prob, advantages, response_mask, config)
    low, high = _clip_range(config)
    dt = float_dtype(lp)
    counted = m.bool()
    with torch.no_grad():
        lpd, oldd, Ad = _detached(counted, dt, lp, old, A)
        ratio = torch.exp(torch.clamp(lpd - oldd, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        # verl's weight clamp(r, 1 - lo, 1 + hi) (line 2078) = min(max(r, 1 - lo), 1 + hi): the floor here,
        # the cap in fastrlhf's cispo surrogate (whose weight carries no gradient, as verl's .detach()).
        s = surrogate(ratio.clamp(min=1 - low), torch.zeros_like(ratio), lpd, Ad, policy_loss="cispo",
                      clip_low=low, clip_high=1 + high, dual_clip=None, ratio_cap=None,
                      sapo_tau_pos=SAPO_TAU_POS, sapo_tau_neg=SAPO_TAU_NEG)
        w = _token_weights(m, loss_agg_mode, config, rollout_is_weights, dt)
        value = (w * s.pg).sum()
        pg_clipfrac = _verl_masked_mean((ratio != torch.clamp(ratio, 1 - low, 1 + high)).to(dt), m)
        ppo_kl = _verl_masked_mean(-torch.clamp(lp.detach() - old.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), m)
    loss = _with_grads(value, [(lp, w * s.d_logp), (A, w * s.d_adv)])
    return loss, pg_clipfrac, ppo_kl, torch.zeros((), device=lp.device)


# ----------------------------------------------------------------------------------------
# The public drop-ins: each loss twice, with verl's parameters, returning verl's current
# (pg_loss, pg_metrics) or the earlier (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)
# (fastrlhf.integrations.verl.patch picks by the installed function's return annotation).
# ----------------------------------------------------------------------------------------


def _drop_ins(name: str, impl, default_agg: str, doc: str):
    """verl's ``compute_policy_loss_<name>`` with ``impl``'s math: the dict-returning drop-in and its 4-tuple twin."""

    def as_tuple(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = default_agg,
        config: Any = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return impl(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)

    def as_dict(*args, **kwargs):
        loss, *stats = as_tuple(*args, **kwargs)
        return loss, _metrics(*stats)

    # the same parameters as the tuple form, verl's current return annotation
    as_dict.__signature__ = inspect.signature(as_tuple).replace(
        return_annotation="tuple[torch.Tensor, dict[str, float]]")
    as_dict.__annotations__ = {**as_tuple.__annotations__, "return": "tuple[torch.Tensor, dict[str, float]]"}

    public = f"compute_policy_loss_{name}"
    for fn, fn_name, fn_doc in ((as_dict, public, doc),
                                (as_tuple, public + "_tuple", f":func:`{public}` with the earlier verl return "
                                 "``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)`` (tensors), for verl "
                                 "versions whose function is annotated that way.")):
        fn.__name__ = fn.__qualname__ = fn_name
        fn.__doc__ = fn_doc
        fn.__module__ = __name__
    return as_dict, as_tuple


_VANILLA_DOC = """verl's ``compute_policy_loss_vanilla`` (PPO-clip, Schulman et al. 2017) -> ``(pg_loss, pg_metrics)``.

    Per token ``ratio = exp(clamp(log_prob - old_log_prob, -20, 20))``,
    ``pg = max(-A ratio, -A clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))`` and, where
    ``A < 0``, ``min(pg, -A clip_ratio_c)`` (dual clip, Ye et al. 2020); times
    ``rollout_is_weights`` when given; aggregated as verl's ``agg_loss`` with
    ``config.global_batch_info``. ``config``: verl's actor config (``clip_ratio``,
    ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c`` default 3.0). Metrics (floats):
    ``actor/pg_clipfrac``, ``actor/ppo_kl`` (mean k1 of old vs new), ``actor/pg_clipfrac_lower``.
    """
_GSPO_DOC = """verl's ``compute_policy_loss_gspo`` (GSPO-token, Zheng et al. 2025) -> ``(pg_loss, pg_metrics)``.

    ``pg_t = max(-A_t s_it, -A_t clamp(s_it, 1 - clip_ratio_low, 1 + clip_ratio_high))`` with
    ``s_it = exp(min(log s_i, 10))`` in value and ``d s_it / d log_prob_t = s_it`` (see the module
    docstring), times ``rollout_is_weights``, aggregated ``seq-mean-token-mean`` (``loss_agg_mode`` is
    ignored, as in verl). Metrics: ``pg_clipfrac`` (clipped branch active), ``ppo_kl`` (unclamped),
    ``pg_clipfrac_lower`` 0.
    """
_SAPO_DOC = """verl's ``compute_policy_loss_sapo`` (Gao et al. 2025, arXiv 2511.20347) -> ``(pg_loss, pg_metrics)``.

    ``pg_t = -sigmoid(tau (r_t - 1)) 4 / tau A_t``, ``r_t = exp(clamp(log_prob - old_log_prob, -20, 20))``,
    ``tau = config.tau_pos`` (default 1.0) where ``A_t > 0`` else ``config.tau_neg`` (1.05); times
    ``rollout_is_weights``; ``seq-mean-token-mean`` (``loss_agg_mode`` ignored, as in verl). Metrics:
    ``ppo_kl``; both clip fractions 0.
    """
_CISPO_DOC = """verl's ``compute_policy_loss_cispo`` (CISPO, MiniMax-M1) -> ``(pg_loss, pg_metrics)``.

    ``pg_t = -sg(clamp(r_t, 1 - clip_ratio_low, 1 + clip_ratio_high)) A_t log_prob_t`` with
    ``r_t = exp(clamp(log_prob - old_log_prob, -20, 20))``; times ``rollout_is_weights``; aggregated by
    ``loss_agg_mode``. Metrics: ``pg_clipfrac`` (weight clamped, either side), ``ppo_kl``,
    ``pg_clipfrac_lower`` 0.
    """

compute_policy_loss_vanilla, compute_policy_loss_vanilla_tuple = _drop_ins("vanilla", _vanilla, "token-mean",
                                                                           _VANILLA_DOC)
compute_policy_loss_gspo, compute_policy_loss_gspo_tuple = _drop_ins("gspo", _gspo, "seq-mean-token-mean", _GSPO_DOC)
compute_policy_loss_sapo, compute_policy_loss_sapo_tuple = _drop_ins("sapo", _sapo, "seq-mean-token-mean", _SAPO_DOC)
compute_policy_loss_cispo, compute_policy_loss_cispo_tuple = _drop_ins("cispo", _cispo, "token-mean", _CISPO_DOC)
