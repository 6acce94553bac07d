"""Policy-loss forms beyond PPO-clip, and rollout correction weights (production code, ``[N]``-sized).

Each form is a per-token surrogate ``pg(ratio, logp, A)`` given with its closed-form derivatives:
in ``u``, the log of the ratio (token ``logp - old`` or GSPO's per-sequence mean of it), in
``logp`` directly (CISPO's ``logp`` factor) and in ``A``. :func:`fastrlhf.token_math.policy_terms`
chains ``d/du`` back to the per-token ``logp`` / ``old`` (per token, or through the sequence
mean for ``ratio_level="sequence"``). Semantics are TRL 1.16's ``GRPOTrainer._compute_loss``
(``trl/trainer/grpo_trainer.py`` lines 3083-3147, rollout weights lines 2660-2708); each form
below names its source. ``docs/losses.md`` lists every trainer option and how it maps here.

- ``clip``: PPO-clip ``max(-A min(r, ratio_cap), -A clamp(r, 1 - clip_low, 1 + clip_high))`` (TRL
  lines 3112-3120; ``ratio_cap`` is TRL's ``delta``, INTELLECT-2's two-sided clip), then the dual
  clip ``min(., -A c)`` where ``A < 0`` (Ye et al. 2020; verl ``compute_policy_loss_vanilla``).
- ``cispo``: ``-sg(min(r, clip_high)) A logp`` (TRL lines 3109-3111; MiniMax-M1, ScaleRL): the
  cap is ``clip_high`` itself, not ``1 + clip_high``; the ratio carries no gradient.
- ``sapo``: ``-sigmoid(tau (r - 1)) 4 / tau A``, ``tau = sapo_tau_pos`` if ``A > 0`` else
  ``sapo_tau_neg`` (TRL lines 3121-3124; Gao et al. 2025, arXiv 2511.20347).

Rollout correction (TRL lines 2660-2708; verl ``rollout_corr_helper.compute_rollout_correction_weights``;
OpenRLHF ``PolicyLoss`` tis / icepop): ``c = exp(old - rollout)`` per token, or
``exp(sum_t m_t (old_t - rollout_t))`` per sequence, NaN differences counted as 0, the log
clamped to +-20 (verl's ``SAFETY_BOUND``); ``*_truncate`` clamps ``c`` to ``[min, max]``,
``*_mask`` / ``icepop`` set it to 0 outside. ``c`` multiplies the policy term and carries no
gradient. It depends on ``old`` and ``rollout`` only, so it is known before the logits are read:
every mode (sequence ones too) stays token-local for the fused-linear route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ._validate import check_scalar, check_token_tensor

__all__ = [
    "POLICY_LOSSES", "RATIO_LEVELS", "ROLLOUT_CORRECTIONS", "ROLLOUT_LOG_CLAMP", "FORM_DEFAULTS", "Surrogate",
    "surrogate", "rollout_weights", "rollout_stats", "check_form_args",
]

POLICY_LOSSES = ("clip", "cispo", "sapo")
RATIO_LEVELS = ("token", "sequence")
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop")
# verl rollout_corr_helper.py SAFETY_BOUND (line 75); TRL exponentiates unclamped (same numbers inside).
ROLLOUT_LOG_CLAMP = 20.0
# The per-token options of policy_terms with their defaults (TRL's sapo_temperature_pos / _neg).
FORM_DEFAULTS = dict(policy_loss="clip", ratio_level="token", ratio_cap=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                     kl_is_correction=False)


@dataclass
class Surrogate:
    """Per-token policy term ``pg`` and its derivatives: ``d_u`` through the log-ratio ``u``,
    ``d_logp`` in ``logp`` directly (None: 0), ``d_adv`` in ``A``; ``clipped`` the clip statistic."""

    pg: torch.Tensor
    d_u: torch.Tensor
    d_logp: Optional[torch.Tensor]
    d_adv: torch.Tensor
    clipped: torch.Tensor


def _pick_max(a, b, da, db):
    """``max(a, b)`` with torch's tie rule (half of each derivative), for ``(value, derivative)`` pairs."""
    return torch.where(a > b, da, torch.where(b > a, db, 0.5 * (da + db)))


def surrogate(ratio, d_ratio, logp, adv, *, policy_loss, clip_low, clip_high, dual_clip, ratio_cap, sapo_tau_pos,
              sapo_tau_neg) -> Surrogate:
    """The policy term of ``policy_loss`` per token. ``ratio`` ``[B, T]`` (a sequence ratio already
    broadcast), ``d_ratio = d ratio / d u`` (``ratio`` inside the +-20 log clamp, 0 outside)."""
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    if policy_loss == "cispo":
        cap = clip_high
        wt = ratio.clamp(max=cap)  # sg: no derivative in u
        # TRL's cispo_clip_ratio (grpo_trainer.py line 3285): capped tokens with a positive advantage.
        return Surrogate(-wt * adv * logp, torch.zeros_like(ratio), -wt * adv, -wt * logp, (ratio > cap) & (adv > 0))
    if policy_loss == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, sapo_tau_pos), torch.full_like(adv, sapo_tau_neg))
        s = torch.sigmoid(tau * (ratio - 1.0))
        # d/dr [sigmoid(tau (r - 1)) 4 / tau] = 4 s (1 - s); tau is piecewise constant in A.
        return Surrogate(-s * 4.0 / tau * adv, -adv * 4.0 * s * (1.0 - s) * d_ratio, None, -s * 4.0 / tau,
                         torch.zeros_like(ratio, dtype=torch.bool))
    hi = clip_low if clip_high is None else clip_high
    lo_b, hi_b = 1.0 - clip_low, 1.0 + hi
    r1, dr1 = ratio, d_ratio
    if ratio_cap is not None:  # TRL's delta: the unclipped ratio capped from above (grpo_trainer.py 3115-3116)
        r1, dr1 = ratio.clamp(max=ratio_cap), torch.where(ratio <= ratio_cap, d_ratio, zero)
    rc = ratio.clamp(lo_b, hi_b)
    drc = torch.where((ratio >= lo_b) & (ratio <= hi_b), d_ratio, zero)  # clamp passes on its closed interval
    pg1, pg2 = -adv * r1, -adv * rc
    pg = torch.maximum(pg1, pg2)
    d_u = _pick_max(pg1, pg2, -adv * dr1, -adv * drc)
    d_adv = _pick_max(pg1, pg2, -r1, -rc)
    clipped = pg2 > pg1  # verl's pg_clipfrac: the clipped branch is active
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        neg = adv < 0
        above, tie = neg & (pg > pg3), neg & (pg == pg3)
        d_u = torch.where(above, zero, torch.where(tie, 0.5 * d_u, d_u))
        d_adv = torch.where(above, torch.full_like(d_adv, -dual_clip),
                            torch.where(tie, 0.5 * (d_adv - dual_clip), d_adv))
        pg = torch.where(neg, torch.minimum(pg, pg3), pg)
    return Surrogate(pg, d_u, None, d_adv, clipped)


def rollout_weights(old, rollout, counted, mode, lo, hi) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c [B, T], corrected [B, T] bool, units [B, T] bool)``: the rollout correction weight of
    each token (1 on uncounted tokens), whether it was truncated / masked, and the tokens that
    stand for one unit of the stats (counted tokens; for sequence modes the first counted token
    of each sequence). All inputs ``[B, T]``, detached, in one float dtype."""
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    diff = torch.nan_to_num(torch.where(counted, old - rollout, zero), nan=0.0)  # TRL line 2665: NaN -> no correction
    per_seq = mode.startswith("sequence")
    if per_seq:
        diff = diff.sum(-1, keepdim=True)  # [B, 1]
    raw = torch.exp(diff.clamp(-ROLLOUT_LOG_CLAMP, ROLLOUT_LOG_CLAMP))
    out = torch.zeros_like(raw, dtype=torch.bool)
    if lo is not None:
        out = out | (raw < lo)
    if hi is not None:
        out = out | (raw > hi)
    c = raw.clamp(lo, hi) if mode.endswith("truncate") else torch.where(out, zero, raw)
    c, out = c.expand_as(old), out.expand_as(old)
    units = counted
    if per_seq:
        first = torch.cumsum(counted.to(torch.int32), -1) == 1
        units = counted & first
    return torch.where(counted, c, torch.ones_like(c)), out & counted, units


def rollout_stats(c, corrected, units) -> Dict[str, torch.Tensor]:
    """``rollout_is_mean`` (mean weight) and ``rollout_is_frac_corrected`` (fraction truncated /
    masked), over counted tokens (token modes) or over sequences with a counted token."""
    n = units.sum().clamp_min(1).to(c.dtype)
    zero = torch.zeros((), dtype=c.dtype, device=c.device)
    return {"rollout_is_mean": torch.where(units, c, zero).sum() / n,
            "rollout_is_frac_corrected": (corrected & units).sum().to(c.dtype) / n}


def check_form_args(labels, rollout_logprobs, opts: dict) -> dict:
    """Check the form and rollout-correction options of ``opts`` (in place); return ``opts``."""
    for key, allowed in (("policy_loss", POLICY_LOSSES), ("ratio_level", RATIO_LEVELS)):
        if not isinstance(opts[key], str) or opts[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {opts[key]!r}")
    if not isinstance(opts["kl_is_correction"], bool):
        raise TypeError(f"kl_is_correction must be a bool, got {opts['kl_is_correction']!r}")
    form = opts["policy_loss"]
    opts["ratio_cap"] = check_scalar(opts["ratio_cap"], "ratio_cap", low=0.0, low_open=True, optional=True)
    opts["sapo_tau_pos"] = check_scalar(opts["sapo_tau_pos"], "sapo_tau_pos", low=0.0, low_open=True)
    opts["sapo_tau_neg"] = check_scalar(opts["sapo_tau_neg"], "sapo_tau_neg", low=0.0, low_open=True)
    if form != "clip" and opts["ratio_cap"] is not None:
        raise ValueError(f"ratio_cap (TRL's delta) applies to policy_loss='clip' only, got policy_loss={form!r}")
    if form != "clip" and opts["dual_clip"] is not None:
        raise ValueError(f"dual_clip applies to policy_loss='clip' only, got policy_loss={form!r}")
    if form == "cispo":
        if opts["clip_high"] is None:
            raise ValueError("policy_loss='cispo' needs clip_high: the cap on the ratio itself (TRL's epsilon_high "
                             "for cispo, ScaleRL's 5.0), not 1 + clip_high")
        if opts["clip_high"] <= 0:
            raise ValueError(f"clip_high (the cispo cap) must be > 0, got {opts['clip_high']!r}")
    mode = opts["rollout_correction"]
    lo = check_scalar(opts["rollout_is_min"], "rollout_is_min", low=0.0, optional=True)
    hi = check_scalar(opts["rollout_is_max"], "rollout_is_max", low=0.0, optional=True)
    opts["rollout_is_min"], opts["rollout_is_max"] = lo, hi
    if mode is None:
        for name, v in (("rollout_logprobs", rollout_logprobs), ("rollout_is_min", lo), ("rollout_is_max", hi)):
            if v is not None:
                raise ValueError(f"{name} is given but rollout_correction is None: name the correction mode "
                                 f"(one of {ROLLOUT_CORRECTIONS})")
        return opts
    if not isinstance(mode, str) or mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout_correction must be None or one of {ROLLOUT_CORRECTIONS}, got {mode!r}")
    if rollout_logprobs is None:
        raise ValueError(f"rollout_correction={mode!r} requires rollout_logprobs (the sampler's logprobs, [B, T])")
    check_token_tensor(rollout_logprobs, labels, "rollout_logprobs")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"rollout_is_min must be <= rollout_is_max, got {lo} > {hi}")
    if mode.endswith("truncate") and lo is None and hi is None:
        raise ValueError(f"rollout_correction={mode!r} needs rollout_is_max and/or rollout_is_min (the truncation "
                         "bounds; TRL's vllm_importance_sampling_clip_max defaults to 3.0)")
    return opts
