"""Advantage estimators: GAE, GRPO's group normalisation, RLOO, REINFORCE, REINFORCE++.

- :func:`gae` (Schulman et al. 2016): over the counted tokens of each row (verl's multi-turn
  GAE); CUDA tensors run the Triton kernel of ``fastrlhf/kernels/gae.py``, others the torch
  scan below.
- :func:`group_advantages` (Shao et al. 2024, sec. 4.1.2): ``(r - mean_group) / (std_group + eps)``.

All are ``[B]`` / ``[B, T]``-sized (no vocabulary dimension) and run under ``no_grad``: advantages
are constants of the policy loss. Same-named oracles live in :mod:`fastrlhf.reference`.

- :func:`rloo_advantages`: REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024,
  "Back to Basics"; TRL's ``RLOOTrainer``): within each group of ``G`` samples of one
  prompt, ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_group)``. No division by a
  std, so near-identical rewards give near-zero advantages.
- :func:`reinforce_advantages`: REINFORCE (Williams 1992) on returns-to-go
  ``G_t = sum_{s >= t} gamma^(s-t) r_s``, with an optional baseline, the batch mean of the
  episode returns ``G_0`` (the classic "average reward" baseline).
- :func:`reinforce_plus_plus_advantages`: REINFORCE++ (Hu 2025, arXiv:2501.03262):
  per-token reward ``r_t = -kl_coef * KL_t`` plus the outcome score on the last token, returns-to-go,
  then whitening over every counted token of the whole batch ("global advantage
  normalization"), with OpenRLHF's biased variance and ``rsqrt(max(var, eps))``.
  ``group_size=G`` first subtracts each prompt's mean score (REINFORCE++-baseline).

Shared conventions: ``rewards`` is either ``[B]`` (one outcome score per sequence, put on the
sequence's last counted token) or ``[B, T]`` (per-token rewards). ``mask [B, T]`` marks the
counted tokens; like ``fastrlhf.gae`` the return recursion skips uncounted tokens (verl's
multi-turn convention), and uncounted tokens get advantage and return 0. The KL penalty in
the reward needs ``logprobs`` and ``ref_logprobs [B, T]`` of the sampled tokens; ``k1``
(``logp - ref_logp``) is the estimator the papers use in the reward (Ziegler et al. 2019; Hu
2025). Outputs are fp32 (fp64 for fp64 rewards).

A weak spot to know (std-normalised advantages): two rewards 1.001 and 1.000 in a GRPO group have
std 7e-4, and dividing by it turns a 0.001 difference into advantages of +-0.71, the same size
as a real success-vs-failure signal. ``group_advantages(..., scale="none")`` (Dr. GRPO) or RLOO
keep the raw scale (+-0.0005 / +-0.001); a larger ``eps`` bounds the blow-up (differences are
amplified ``1 / eps`` times at most). REINFORCE++ whitens over the whole batch, so it only
blows up when the *whole* batch is near-constant; its ``eps`` floors the variance
(std >= ``sqrt(eps)`` = 1e-4 by default).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._backend import resolve_backend
from ._validate import check_scalar
from .token_math import KL_ESTIMATORS, float_dtype, kl_terms

__all__ = ["gae", "group_advantages", "rloo_advantages", "reinforce_advantages", "reinforce_plus_plus_advantages"]

# OpenRLHF's variance floor for the global whitening (``var.clamp(min=1e-8).rsqrt()``).
WHITEN_EPS = 1e-8


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the counted tokens of each row -> ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next`` where
    ``next`` is the next counted token (V and A are 0 after the last one); uncounted tokens
    are skipped (verl's multi-turn GAE) and get 0; ``returns = A + V`` on counted tokens.
    All ``[B, T]``; outputs fp32 (fp64 for fp64 rewards). No gradient (advantages are constants).
    """
    for name, t in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a [B, T] tensor, got {getattr(t, 'shape', type(t))}")
        if t.shape != rewards.shape:
            raise ValueError(f"{name} must have the shape of rewards {tuple(rewards.shape)}, got {tuple(t.shape)}")
        if t.device != rewards.device:
            raise ValueError(f"{name} is on {t.device} but rewards are on {rewards.device}")
    gamma = check_scalar(gamma, "gamma", low=0.0, high=1.0)
    lam = check_scalar(lam, "lam", low=0.0, high=1.0)
    if resolve_backend(backend, rewards.device) == "triton" and rewards.dtype != torch.float64:
        from .kernels.gae import gae_forward

        return gae_forward(rewards.detach(), values.detach(), mask, gamma=gamma, lam=lam)
    with torch.no_grad():
        return _gae_scan(rewards, values, mask, gamma, lam)


def _gae_scan(rewards, values, mask, gamma: float, lam: float):
    """The backward scan on ``[B]`` columns: the TD errors of all tokens at once, then one step per t."""
    B, T = rewards.shape
    dt = float_dtype(rewards)
    m = mask.bool()
    zero = torch.zeros((), dtype=dt, device=rewards.device)
    v = torch.where(m, values.to(dt), zero)
    # V of the next counted token of each position: carry the last counted value backwards.
    v_next = torch.empty_like(v)
    carry = torch.zeros(B, dtype=dt, device=rewards.device)
    for t in range(T - 1, -1, -1):
        v_next[:, t] = carry
        carry = torch.where(m[:, t], v[:, t], carry)
    delta = torch.where(m, rewards.to(dt) + gamma * v_next - v, zero)  # [B, T] TD errors
    adv = torch.empty_like(delta)
    running = torch.zeros(B, dtype=dt, device=rewards.device)
    for t in range(T - 1, -1, -1):
        running = torch.where(m[:, t], delta[:, t] + gamma * lam * running, running)
        adv[:, t] = running
    adv = torch.where(m, adv, zero)
    return adv, torch.where(m, adv + v, zero)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO outcome advantages: ``(r - mean_group) / (std_group + eps)``, unbiased std.

    ``rewards``: ``[B * G]`` (consecutive groups of ``group_size``) or ``[B, G]``; same shape
    out, fp32 (fp64 for fp64). ``scale="none"`` only centres (Dr. GRPO, Liu et al. 2025). A
    group of one has std 0 (advantage 0). Note: with near-identical rewards in a group (1.001 vs
    1.000) the std is tiny and the division blows the difference up to about +-0.7;
    ``scale="none"`` or a larger ``eps`` avoids that.
    """
    _check_grouped(rewards, group_size, 1)
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    eps = check_scalar(eps, "eps", low=0.0)
    r = rewards.detach().to(float_dtype(rewards)).reshape(-1, group_size)  # [B, G]
    if scale == "none":
        return (r - r.mean(-1, keepdim=True)).reshape(rewards.shape)
    if group_size == 1 or r.numel() == 0:
        return torch.zeros_like(r).reshape(rewards.shape)
    std, mean = torch.std_mean(r, dim=-1, keepdim=True, correction=1)
    return ((r - mean) / (std + eps)).reshape(rewards.shape)


def _check_grouped(rewards, group_size: int, min_group: int, name: str = "rewards") -> None:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < min_group:
        raise ValueError(f"group_size must be an int >= {min_group}, got {group_size!r}")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"{name} [B, G] must have G = group_size = {group_size}, got {tuple(rewards.shape)}")
    if rewards.dim() not in (1, 2) or rewards.numel() % group_size:
        raise ValueError(f"{name} must be [B * G] or [B, G] with G = {group_size}, got {tuple(rewards.shape)}")


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages: ``A_i = r_i - mean_{j != i} r_j`` within each group.

    Ahmadian et al. 2024 ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs"); Kool et al. 2019. Each sample's baseline is the mean
    reward of the *other* ``G - 1`` samples of its prompt, an unbiased baseline (it does not
    depend on the sample itself). Equal to ``G / (G - 1) * (r_i - mean_group)``.

    Args:
        rewards: ``[B * G]`` (consecutive groups) or ``[B, G]`` sequence rewards.
        group_size: ``G >= 2`` samples per prompt.

    Returns:
        Advantages of the shape of ``rewards``, fp32 (fp64 for fp64 rewards).
    """
    _check_grouped(rewards, group_size, 2)
    r = rewards.detach().to(float_dtype(rewards)).reshape(-1, group_size)  # [B, G]
    # sum_{j != i} r_j = sum_j r_j - r_i: one reduction instead of G masked means.
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)  # [B, G]
    return (r - baseline).reshape(rewards.shape)


def _check_token_inputs(rewards, mask, logprobs, ref_logprobs, kl_coef, kl_estimator, gamma) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a [B, T] tensor, got {getattr(mask, 'shape', type(mask))}")
    if mask.is_complex() or not (mask.dtype == torch.bool or mask.is_floating_point()
                                 or mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"mask must be bool, integer or floating 0/1, got {mask.dtype}")
    B, T = mask.shape
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    if tuple(rewards.shape) not in ((B,), (B, T)):
        raise ValueError(f"rewards must be [B] = [{B}] (outcome) or [B, T] = [{B}, {T}] (per token), "
                         f"got {tuple(rewards.shape)}")
    if rewards.device != mask.device:
        raise ValueError(f"mask is on {mask.device} but rewards are on {rewards.device}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    check_scalar(kl_coef, "kl_coef", low=0.0)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef > 0:
        for name, t in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
            if t is None:
                raise ValueError(f"{name} is required when kl_coef > 0")
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must be [B, T] = [{B}, {T}], got {getattr(t, 'shape', type(t))}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _token_rewards(rewards, m, logprobs, ref_logprobs, kl_coef, kl_estimator, dt) -> torch.Tensor:
    """``[B, T]`` per-token rewards: the outcome score on each row's last counted token, minus the KL penalty."""
    if rewards.dim() == 1:
        B, T = m.shape
        # index of the last counted token: T - 1 - (position of the first 1 in the flipped row)
        last = (T - 1 - m.flip(-1).long().argmax(-1)).long()  # [B]
        tok = torch.zeros(B, T, dtype=dt, device=m.device)
        has = m.any(-1)
        tok[torch.arange(B, device=m.device)[has], last[has]] = rewards.to(dt)[has]
    else:
        tok = rewards.to(dt) * m
    if kl_coef > 0:
        kl, _ = kl_terms(logprobs.to(dt), ref_logprobs.to(dt), kl_estimator)  # [B, T]
        tok = tok - kl_coef * kl * m
    return tok


def _returns_to_go(tok: torch.Tensor, m: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = r_t + gamma * G_next`` over counted tokens: GAE with zero values and lambda = 1."""
    returns, _ = gae(tok, torch.zeros_like(tok), m, gamma=gamma, lam=1.0)
    return returns.to(tok.dtype)


@torch.no_grad()
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
    """REINFORCE (Williams 1992) advantages ``A_t = G_t - b`` -> ``(advantages, returns)``, ``[B, T]``.

    ``G_t = sum_{s >= t} gamma^(s - t) r_s`` over the counted tokens of the row, with
    ``r_t = -kl_coef * KL_t`` (``kl_coef > 0``) plus the outcome score on the last counted token
    (``rewards [B]``) or the given per-token rewards (``rewards [B, T]``).

    Args:
        rewards: ``[B]`` outcome scores or ``[B, T]`` per-token rewards.
        mask: ``[B, T]`` bool / 0-1, the counted (response) tokens.
        gamma: discount in ``[0, 1]``.
        baseline: ``"none"`` (``b = 0``) or ``"mean"``: ``b`` = the mean over the batch's rows
            (those with a counted token) of the episode return ``G_0`` at the row's first
            counted token; one scalar for the whole batch.
        logprobs, ref_logprobs: ``[B, T]`` logprobs of the sampled tokens under the policy that
            sampled them and under the reference (needed when ``kl_coef > 0``).
        kl_coef: weight of the per-token KL penalty in the reward (0: none).
        kl_estimator: ``"k1"`` (default, as in the reward of Ziegler et al. 2019), ``"k2"``, ``"k3"``.

    Returns:
        ``(advantages, returns)``, 0 on uncounted tokens.
    """
    _check_token_inputs(rewards, mask, logprobs, ref_logprobs, kl_coef, kl_estimator, gamma)
    if baseline not in ("none", "mean"):
        raise ValueError(f"baseline must be 'none' or 'mean', got {baseline!r}")
    dt = float_dtype(rewards)
    m = mask.bool()
    returns = _returns_to_go(_token_rewards(rewards, m, logprobs, ref_logprobs, kl_coef, kl_estimator, dt), m, gamma)
    if baseline == "none":
        return returns.clone(), returns
    has = m.any(-1)  # [B]
    first = m.long().argmax(-1)  # [B] first counted token
    g0 = returns.gather(1, first[:, None]).squeeze(1)  # [B]
    b = g0[has].mean() if bool(has.any()) else returns.new_zeros(())
    return torch.where(m, returns - b, torch.zeros_like(returns)), returns


@torch.no_grad()
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
    eps: float = WHITEN_EPS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025) -> ``(advantages, returns)``, ``[B, T]``.

    1. Per-token reward ``r_t = -kl_coef * KL_t``, plus the outcome score on the last counted
       token (``rewards [B]``) or the per-token ``rewards [B, T]``.
    2. Returns-to-go ``G_t = r_t + gamma * G_{t+1}`` over the counted tokens.
    3. Global whitening over all counted tokens of the batch:
       ``A = (G - mean) * rsqrt(max(var, eps))``, ``var`` the biased variance (OpenRLHF).

    ``group_size=G`` (``rewards [B * G]``, consecutive groups) subtracts each group's mean score
    before step 1: REINFORCE++-baseline (Hu 2025; OpenRLHF's ``reinforce_baseline``), which keeps
    prompts of different difficulty from dominating the whitening.
    Other arguments as :func:`reinforce_advantages`. ``eps > 0`` floors the variance, so a
    near-constant batch has its return differences amplified by at most ``1 / sqrt(eps)``
    (see the module docstring on the std-normalisation weak spot).
    """
    _check_token_inputs(rewards, mask, logprobs, ref_logprobs, kl_coef, kl_estimator, gamma)
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it floors the variance), got {eps}")
    dt = float_dtype(rewards)
    if group_size is not None:
        if rewards.dim() != 1:
            raise ValueError("group_size (REINFORCE++-baseline) needs outcome rewards [B], got per-token rewards")
        _check_grouped(rewards, group_size, 1)
        r = rewards.detach().to(dt).reshape(-1, group_size)
        rewards = (r - r.mean(-1, keepdim=True)).reshape(-1)
    m = mask.bool()
    returns = _returns_to_go(_token_rewards(rewards, m, logprobs, ref_logprobs, kl_coef, kl_estimator, dt), m, gamma)
    mf = m.to(dt)
    n = mf.sum().clamp_min(1.0)
    mean = (returns * mf).sum() / n
    var = (((returns - mean) * mf) ** 2).sum() / n
    advantages = torch.where(m, (returns - mean) * torch.rsqrt(var.clamp_min(eps)), torch.zeros_like(returns))
    return advantages, returns


# ----------------------------------------------------------------------------------------
# Whitening and the one estimator dispatch the trainers use
# ----------------------------------------------------------------------------------------

__all__ += ["masked_whiten", "estimate_advantages", "ADVANTAGE_ESTIMATORS"]

ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce", "reinforce++", "reinforce++-baseline", "gae")


def _finite_scalar(value, name: str, low: Optional[float] = None, high: Optional[float] = None,
                   low_open: bool = False) -> float:
    """``float(value)``, refused with a ValueError naming ``name`` when non-finite or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(float(value)) < float("inf"):
        raise ValueError(f"{name} must be a finite number, got {value!r}")  # NaN fails the < too
    v = float(value)
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return v


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` over the counted entries of ``x``; 0 on the others.

    ``mean`` and the unbiased ``var`` (divisor ``n - 1``, as TRL's and verl's
    ``masked_whiten``, ``verl/utils/torch_functional.py`` l. 322) are taken over the ``n``
    entries where ``mask`` is set, across the whole tensor (PPO whitens the advantages of the
    whole rollout: CleanRL detail 7). ``shift_mean=False`` adds ``mean`` back (verl): the scale
    is normalised, the sign of a mostly-positive signal kept. ``n = 1`` gives ``var = 0`` (the
    single entry becomes 0, or ``mean`` with ``shift_mean=False``); ``n = 0`` gives all zeros.

    Args:
        x: floating tensor of any shape (differentiable).
        mask: bool / integer / float 0-1 of the shape of ``x``.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: ``> 0``, added to the variance (a constant ``x`` gives 0, not NaN).

    Returns:
        Tensor of the shape and dtype of ``x``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"mask must be a tensor of the shape of x {tuple(x.shape)}, "
                         f"got {getattr(mask, 'shape', type(mask).__name__)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    eps = _finite_scalar(eps, "eps", low=0.0, low_open=True)
    m = mask.to(x.dtype)
    n = m.sum().clamp_min(1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp_min(1.0)
    if shift_mean:
        return (x - mean) * torch.rsqrt(var + eps) * m
    return ((x - mean) * torch.rsqrt(var + eps) + mean) * m


@torch.no_grad()
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
    """Per-token ``(advantages, returns)`` ``[B, T]`` of a named estimator: the one place that maps names to ops.

    ``rewards``: ``[B]`` outcome scores (on each row's last counted token) or ``[B, T]``
    per-token rewards. With ``kl_coef > 0`` the per-token reward also carries
    ``-kl_coef * KL(logprobs, ref_logprobs)`` (``kl_estimator``; Ziegler et al. 2019's k1 by
    default). Samples of one prompt are consecutive groups of ``group_size``.

    ========================  ========================================================================
    ``"grpo"``                :func:`group_advantages` (``scale=scale_rewards``) on every counted token;
                              needs ``[B]`` rewards, ``group_size`` and no KL term (GRPO puts its KL in
                              the loss); returns = the returns-to-go of the raw rewards
    ``"rloo"``                :func:`rloo_advantages` on the scores, then their returns-to-go (with the
                              KL penalty): advantages = returns (OpenRLHF's ``rloo``)
    ``"reinforce"``           :func:`reinforce_advantages` with the batch-mean baseline
    ``"reinforce++"``         :func:`reinforce_plus_plus_advantages` (global whitening)
    ``"reinforce++-baseline"`` the same with ``group_size`` (each prompt's mean score subtracted first)
    ``"gae"``                 :func:`gae` of the per-token rewards with the critic's ``values [B, T]``
    ========================  ========================================================================

    Every estimator but ``"gae"`` refuses ``values``; uncounted tokens get 0 everywhere.
    ``gamma`` (all but ``"grpo"``) and ``lam`` (``"gae"``) lie in ``[0, 1]``.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    gamma = _finite_scalar(gamma, "gamma", low=0.0, high=1.0)
    lam = _finite_scalar(lam, "lam", low=0.0, high=1.0)
    kl_coef = _finite_scalar(kl_coef, "kl_coef", low=0.0)
    if estimator in ("grpo", "rloo", "reinforce++-baseline") and group_size is None:
        raise ValueError(f"estimator {estimator!r} needs group_size (samples per prompt)")
    if (estimator == "gae") != (values is not None):
        raise ValueError("values [B, T] are needed by estimator 'gae' and by no other"
                         f" (estimator={estimator!r}, values {'given' if values is not None else 'missing'})")
    kl = dict(logprobs=logprobs, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator)
    if estimator == "grpo":
        if kl_coef > 0:
            raise ValueError("estimator 'grpo' normalises outcome scores and takes no per-token KL "
                             "penalty (kl_coef must be 0; put the KL in the loss)")
        if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
            raise ValueError(f"estimator 'grpo' needs outcome rewards [B], got {getattr(rewards, 'shape', rewards)}")
        _check_token_inputs(rewards, mask, None, None, 0.0, kl_estimator, gamma)
        m = mask.bool()
        adv = group_advantages(rewards, group_size, scale=scale_rewards)  # [B]
        # returns-to-go of an outcome reward: r * gamma^(counted tokens after t), no scan over T
        after = m.flip(-1).long().cumsum(-1).flip(-1) - 1  # [B, T]
        r = rewards.detach().to(adv.dtype)[:, None]
        zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
        return torch.where(m, adv[:, None], zero), torch.where(m, r * gamma ** after.to(adv.dtype), zero)
    if estimator == "rloo":
        if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
            raise ValueError(f"estimator 'rloo' needs outcome rewards [B], got {getattr(rewards, 'shape', rewards)}")
        return reinforce_advantages(rloo_advantages(rewards, group_size), mask, gamma=gamma, **kl)
    if estimator == "reinforce":
        return reinforce_advantages(rewards, mask, gamma=gamma, baseline="mean", **kl)
    if estimator in ("reinforce++", "reinforce++-baseline"):
        group = group_size if estimator == "reinforce++-baseline" else None
        return reinforce_plus_plus_advantages(rewards, mask, gamma=gamma, group_size=group, **kl)
    # gae: the per-token rewards of the critic-free estimators (score on the last counted token,
    # minus the KL penalty), then the critic's values
    _check_token_inputs(rewards, mask, logprobs, ref_logprobs, kl_coef, kl_estimator, gamma)
    token_rewards = _token_rewards(rewards, mask.bool(), logprobs, ref_logprobs, kl_coef, kl_estimator,
                                   float_dtype(rewards))  # [B, T]
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != tuple(token_rewards.shape):
        got = getattr(values, "shape", values)
        raise ValueError(f"values must be [B, T] = {tuple(token_rewards.shape)}, got {got}")
    return gae(token_rewards, values, mask, gamma=gamma, lam=lam)
