"""OpenRLHF drop-ins: OpenRLHF's logprob, entropy, KL, PPO and DPO losses with its signatures, on fastrlhf.

Usage (in each Ray actor process, before the actor model / trainer is built)::

    import fastrlhf.integrations.openrlhf as fr_orlhf
    fr_orlhf.patch()

Sources read (OpenRLHF 0.11.2, ``pip download openrlhf==0.11.2``; OpenRLHF/OpenRLHF on GitHub):
``openrlhf/models/utils.py`` and ``openrlhf/models/loss.py``.

- ``log_probs_from_logits(logits, labels, temperature=1.0)``: fastrlhf ``token_logprobs``; output
  in the logits' dtype as OpenRLHF returns it. Difference: OpenRLHF divides the caller's logits
  in place (``logits.div_(temperature)``); ours leaves them untouched (its own callers pass
  already-scaled logits and temperature 1).
- ``compute_entropy(logits)``: fastrlhf ``entropy``, logits' dtype.
- ``compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
  unbiased_gradient=False)``: ``fastrlhf.kl_estimate`` (k1/k2/k3 of ``log_probs - log_probs_base``
  in fp32, clamped to [-10, 10]) plus OpenRLHF's straight-through unbiased-gradient option.
- ``PolicyLoss`` (``nn.Module``, same constructor and ``forward`` -> ``(loss, clip_ratio, ppo_kl,
  vllm_kl, is_filter_ratio)``): PPO-clip from ``fastrlhf.token_math.policy_loss_from_logprobs``
  (ratio clamp +-20, asymmetric clip, dual clip), ``token_level_loss`` aggregation, GSPO and the
  train/rollout importance-sampling correction (token/seq level, mask/clip, ratio/binary_kl/tv).
- ``VllmISPolicyLoss``: the same for OpenRLHF v0.11.0's ``PolicyLoss`` API (OpenRLHF @ 3c3be623:
  ``enable_vllm_is_correction``, ``vllm_is_truncated_threshold``, ``vllm_is_correction_type`` tis /
  icepop / seq-mask-tis; returns ``(loss, clip_ratio, ppo_kl, vllm_kl)``). ``patch()`` picks the class
  whose constructor and ``forward`` match the installed ``PolicyLoss``.
- ``DPOLoss(beta, label_smoothing=0.0, ipo=False)`` -> ``(loss, chosen_rewards, rejected_rewards)``:
  ``fastrlhf.dpo.pair_loss`` (sigmoid / cDPO label smoothing / IPO).

Only the first two touch ``[N, V]`` logits; the rest is ``[N]``-sized (no memory saved) and is
here so that every loss term of a patched run is fastrlhf's.
"""

from __future__ import annotations

import types
from typing import Optional, Union

import torch
import torch.nn as nn

from .. import logprobs as ops
from ..dpo import pair_loss
from ..ppo import kl_estimate
from ..token_math import KL_ESTIMATORS, as_batch_time, policy_loss_from_logprobs
from ._patch import (
    PatchHandle,
    Target,
    apply_patch,
    check_params,
    ensure_tensor,
    param_names,
    replace_with,
    replace_with_class,
)

__all__ = [
    "log_probs_from_logits",
    "compute_entropy",
    "compute_approx_kl",
    "PolicyLoss",
    "VllmISPolicyLoss",
    "DPOLoss",
    "patch",
]

# openrlhf/models/utils.py: IS weight cap of the unbiased KL gradient, and the KL value clamp.
KL_IS_WEIGHT_CLIP = 10.0
KL_CLAMP = (-10.0, 10.0)


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """OpenRLHF's ``log_probs_from_logits``: ``log_softmax(logits / temperature)[labels]``, logits' dtype.

    One fastrlhf pass (``token_logprobs``; Triton on CUDA), computed in fp32 whatever the logits'
    dtype; no ``[N, V]`` log-softmax. The logits are not modified (OpenRLHF 0.11.2 divides
    them in place by ``temperature``).
    """
    ensure_tensor(logits, "logits")
    return ops.token_logprobs(logits, labels, temperature=temperature).to(logits.dtype)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's ``compute_entropy``: ``logsumexp(x) - sum(softmax(x) * x)`` per row, logits' dtype."""
    ensure_tensor(logits, "logits")
    return ops.entropy(logits).to(logits.dtype)


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: Optional[torch.Tensor] = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> torch.Tensor:
    """OpenRLHF's ``compute_approx_kl``: per-token KL(pi || pi_ref) estimate (Schulman 2020), fp32.

    With ``l = log_probs - log_probs_base`` (fp32): ``k1 = l``, ``k2 = l^2 / 2``,
    ``k3 = exp(-l) - 1 + l``; clamped to [-10, 10] (``fastrlhf.kl_estimate``). The k3 branch of
    OpenRLHF clamps ``l >= -10`` before ``exp`` and fastrlhf clamps ``|l| <= 20``: both only
    act where the final clamp already holds the value at 10 with zero gradient.
    ``unbiased_gradient=True``: same value, gradient of ``w * l^2 / 2`` with the detached IS weight
    ``w = min(exp(log_probs - log_probs_old), 10)`` (1 without ``log_probs_old``).
    """
    ensure_tensor(log_probs, "log_probs")
    ensure_tensor(log_probs_base, "log_probs_base")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    lp = log_probs.float()
    base = log_probs_base.float()
    value = kl_estimate(lp, base, kl_estimator, clamp=KL_CLAMP)
    if not unbiased_gradient:
        return value
    log_ratio = lp - base
    if log_probs_old is None:
        w = 1.0
    else:
        ensure_tensor(log_probs_old, "log_probs_old")
        w = (lp - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = w * (log_ratio**2 / 2.0)
    return value.detach() + surrogate - surrogate.detach()


def _masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor], dim=None) -> torch.Tensor:
    # openrlhf/models/utils.py::masked_mean
    if mask is None:
        return x.mean(dim=dim)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def _set_clip_options(loss, clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type) -> None:
    """The PPO / GSPO options both ``PolicyLoss`` APIs share, checked and stored on ``loss``."""
    if policy_loss_type not in ("ppo", "gspo"):
        raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
    loss.clip_eps_low = clip_eps_low
    loss.clip_eps_high = clip_eps_high
    loss.dual_clip = dual_clip
    # GSPO's loss is per sequence (OpenRLHF forces it).
    loss.token_level_loss = False if policy_loss_type == "gspo" else token_level_loss
    loss.policy_loss_type = policy_loss_type


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` (openrlhf/models/loss.py, 0.11.2): PPO-clip / GSPO with IS correction.

    Constructor and ``forward(log_probs, old_log_probs, advantages, action_mask=None,
    rollout_log_probs=None, dp_size=1, batch_num_tokens=None, global_batch_size=None)`` as
    OpenRLHF; returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` (the last two None
    without IS correction). The per-token PPO math is fastrlhf's own
    (``ppo_clip_loss_from_logprobs``): ``ratio = exp(clamp(logp - old, -20, 20))``,
    ``max(-A ratio, -A clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high))``, dual clip
    ``min(., -A dual_clip)`` where ``A < 0`` (Ye et al. 2020). The IS-correction coefficient (a
    detached weight >= 0) scales the advantages, which scales the per-token loss exactly
    (PPO-clip is positively homogeneous in A). ``token_level_loss``: token-mean (else per-sequence
    token-mean, mean over non-empty sequences), rescaled to the global batch by ``dp_size`` /
    ``batch_num_tokens`` / ``global_batch_size``. GSPO (Zheng et al. 2025): one ratio per sequence,
    ``exp(mean_t log ratio)``; fastrlhf's +-20 clamp of the log ratio applies to it as well.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: list = (0.5, 5.0),
    ) -> None:
        super().__init__()
        _set_clip_options(self, clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type)
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError(
                "is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio"
            )
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    def _is_correction(self, old_log_probs, rollout_log_probs, action_mask):
        """Train/rollout mismatch weight (detached) per token, filtered units, vllm_kl, filter ratio."""
        if rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required when is_correction_level != 'off'")
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()  # log(pi_train / pi_rollout)
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = _masked_mean(is_log_ratio, action_mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = _masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        if self.is_correction_mode == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, 0.0)
            filtered = ~keep
        if seq_level:
            filter_ratio = filtered.float().mean()
        else:
            filter_ratio = _masked_mean(filtered.float(), action_mask, dim=None)
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
        return coef.detach(), vllm_kl, filter_ratio

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        rollout_log_probs: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ):
        correcting = self.is_correction_level != "off"
        coef = vllm_kl = filter_ratio = None
        if correcting and self.policy_loss_type == "ppo":
            coef, vllm_kl, filter_ratio = self._is_correction(old_log_probs, rollout_log_probs, action_mask)
        loss, clip_ratio, ppo_kl = _clip_loss(self, log_probs, old_log_probs, advantages, action_mask,
                                              rollout_log_probs if correcting else None, coef, dp_size,
                                              batch_num_tokens, global_batch_size)
        return loss, clip_ratio, ppo_kl, vllm_kl, filter_ratio


def _clip_loss(cfg, log_probs, old_log_probs, advantages, action_mask, gspo_rollout, coef, dp_size, batch_num_tokens,
               global_batch_size):
    """OpenRLHF's PPO / GSPO loss (``aggregate_loss`` included), ``clip_ratio`` and ``ppo_kl``; ``cfg`` has
    the clip options. ``gspo_rollout``: GSPO's ratio is taken against it (IS enabled); ``coef``: the
    detached IS weight per token (or per sequence, ``[B, 1]``) of PPO, None for none."""
    for name, t in (("log_probs", log_probs), ("old_log_probs", old_log_probs), ("advantages", advantages)):
        ensure_tensor(t, name)
    raw_log_ratio = log_probs - old_log_probs
    mask = torch.ones_like(log_probs) if action_mask is None else action_mask
    m = as_batch_time(mask).to(log_probs.dtype)  # [B, T]
    lp = as_batch_time(log_probs)
    old = as_batch_time(old_log_probs)
    A = as_batch_time(advantages).to(lp.dtype)
    gspo = cfg.policy_loss_type == "gspo"
    if gspo:
        log_ratio = lp - as_batch_time(gspo_rollout) if gspo_rollout is not None else lp - old
        seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
        # One ratio per sequence, fed through the same PPO math as (logp, old) = (seq, 0).
        lp_in, old_in = seq.expand_as(lp), torch.zeros_like(lp)
    else:
        lp_in, old_in = lp, old
    scale = torch.ones_like(A) if coef is None else as_batch_time(coef.expand_as(log_probs)).to(lp.dtype)

    # Aggregation weights per token (OpenRLHF's aggregate_loss) folded into the advantages,
    # then summed: sum_t pg(A_t) * s_t = sum_t pg(s_t * A_t) for s_t >= 0.
    if cfg.token_level_loss:
        denom = m.sum() if batch_num_tokens is None else batch_num_tokens / dp_size
        s = m / denom
    else:
        counts = m.sum(-1, keepdim=True)  # [B, 1]
        n_seq = (counts > 0).float().sum() if global_batch_size is None else global_batch_size / dp_size
        s = m / (counts + 1e-8) * (counts > 0).to(m.dtype) / n_seq
    loss, _ = policy_loss_from_logprobs(
        lp_in.reshape(1, -1), m.bool().reshape(1, -1), old_in.reshape(1, -1),
        (A * scale * s).reshape(1, -1), clip_low=cfg.clip_eps_low, clip_high=cfg.clip_eps_high,
        dual_clip=cfg.dual_clip, loss_agg="seq-mean-token-sum",
    )
    with torch.no_grad():
        ratio = torch.exp(torch.clamp(lp_in - old_in, -20.0, 20.0))
        if gspo:
            ratio = ratio * m
        surr1 = ratio * A
        surr2 = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * A
        clip_ratio = _masked_mean(torch.lt(surr2, surr1).float(), None if action_mask is None else m)
        ppo_kl = _masked_mean(-raw_log_ratio.detach(), action_mask)
    return loss, clip_ratio, ppo_kl


VLLM_IS_CORRECTION_TYPES = ("tis", "icepop", "seq-mask-tis")


class VllmISPolicyLoss(nn.Module):
    """OpenRLHF v0.11.0's ``PolicyLoss`` (OpenRLHF @ 3c3be623, ``openrlhf/models/loss.py`` lines 116-230):
    PPO-clip / GSPO with the vLLM importance-sampling correction of that API.

    Constructor ``(clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
    policy_loss_type="ppo", enable_vllm_is_correction=False, vllm_is_truncated_threshold=None,
    vllm_is_correction_type="tis")``; ``forward`` as :class:`PolicyLoss`, returning ``(loss, clip_ratio,
    ppo_kl, vllm_kl)`` (``vllm_kl`` None unless PPO with the correction). With ``(low, high) =
    vllm_is_truncated_threshold`` and ``w = exp(old_log_probs - rollout_log_probs)`` per token, the
    detached weight on PPO's per-token loss is (fastrlhf's rollout correction in brackets):

    - ``tis``: ``clamp(w, low, high)`` (``rollout_correction="token_truncate"``, ``rollout_is_min=low``,
      ``rollout_is_max=high``; fastrlhf clamps ``log w`` to +-20 first, which only matters for a bound
      beyond ``e^20``);
    - ``icepop``: ``w`` where ``low <= w <= high``, else 0 (``"icepop"``); 0, not NaN, where ``w``
      overflows (OpenRLHF's ``w * mask`` gives ``inf * 0 = NaN`` there);
    - ``seq-mask-tis``: ``w`` (not clamped) where the sequence's geometric mean
      ``exp(masked_mean(log w))`` lies in ``[low, high]``, else 0 (no single fastrlhf mode: the drop-in
      applies the exact per-token weight).

    ``policy_loss_type="gspo"`` with the correction enabled takes the sequence ratio against
    ``rollout_log_probs`` instead of ``old_log_probs`` (fastrlhf ``ratio_level="sequence"`` with
    ``old_logprobs=rollout_log_probs``), no weight; GSPO forces the per-sequence loss.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        enable_vllm_is_correction: bool = False,
        vllm_is_truncated_threshold: list = None,
        vllm_is_correction_type: str = "tis",
    ) -> None:
        super().__init__()
        _set_clip_options(self, clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type)
        if vllm_is_correction_type not in VLLM_IS_CORRECTION_TYPES:
            raise ValueError(f"vllm_is_correction_type must be one of {VLLM_IS_CORRECTION_TYPES}, "
                             f"got {vllm_is_correction_type!r}")
        self.enable_vllm_is_correction = enable_vllm_is_correction
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        self.vllm_is_correction_type = vllm_is_correction_type

    def _vllm_is(self, old_log_probs, rollout_log_probs, action_mask):
        """The detached IS weight per token (loss.py lines 197-217) and ``vllm_kl`` (line 218)."""
        if rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required when enable_vllm_is_correction=True")
        if self.vllm_is_truncated_threshold is None:
            raise ValueError("vllm_is_truncated_threshold (low, high) is required when enable_vllm_is_correction=True")
        low, high = self.vllm_is_truncated_threshold
        log_w = (old_log_probs - rollout_log_probs).detach()
        w = log_w.exp()
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        if self.vllm_is_correction_type == "icepop":
            coef = torch.where((w >= low) & (w <= high), w, zero)
        elif self.vllm_is_correction_type == "seq-mask-tis":
            seq_w = _masked_mean(log_w, action_mask, dim=-1).exp().unsqueeze(-1)  # [B, 1] geometric mean
            coef = torch.where((seq_w >= low) & (seq_w <= high), w, zero)
        else:
            coef = w.clamp(min=low, max=high)
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
        return coef, vllm_kl

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        rollout_log_probs: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ):
        correcting = bool(self.enable_vllm_is_correction)
        coef = vllm_kl = None
        if correcting and self.policy_loss_type == "ppo":
            coef, vllm_kl = self._vllm_is(old_log_probs, rollout_log_probs, action_mask)
        if correcting and self.policy_loss_type == "gspo" and rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required for gspo when enable_vllm_is_correction=True")
        loss, clip_ratio, ppo_kl = _clip_loss(self, log_probs, old_log_probs, advantages, action_mask,
                                              rollout_log_probs if correcting else None, coef, dp_size,
                                              batch_num_tokens, global_batch_size)
        return loss, clip_ratio, ppo_kl, vllm_kl


class DPOLoss(nn.Module):
    """OpenRLHF's ``DPOLoss`` (Rafailov et al. 2023; cDPO label smoothing; IPO, Azar et al. 2023).

    ``forward(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
    reference_rejected_logps)`` (all ``[B]``) -> ``(loss, chosen_rewards, rejected_rewards)`` with
    ``loss`` from ``fastrlhf.dpo.pair_loss`` (mean over pairs) and the rewards
    ``beta * (policy - reference)`` per pair, detached.
    """

    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.ipo = ipo

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
    ):
        for name, t in (("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps),
                        ("reference_chosen_logps", reference_chosen_logps),
                        ("reference_rejected_logps", reference_rejected_logps)):
            ensure_tensor(t, name)
            if t.shape != policy_chosen_logps.shape:
                raise ValueError(
                    f"{name} must have the shape of policy_chosen_logps {tuple(policy_chosen_logps.shape)}, "
                    f"got {tuple(t.shape)}"
                )
        loss, _ = pair_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta=self.beta, loss_type="ipo" if self.ipo else "sigmoid", label_smoothing=self.label_smoothing,
        )
        chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
        rejected_rewards = self.beta * (policy_rejected_logps - reference_rejected_logps).detach()
        return loss, chosen_rewards, rejected_rewards


def patch(module: Union[str, types.ModuleType, None] = None) -> PatchHandle:
    """Replace OpenRLHF's logprob/entropy/KL functions and PolicyLoss/DPOLoss by this module's.

    Rewrites every loaded ``openrlhf.*`` module holding them by name (``openrlhf.models``,
    ``openrlhf.models.actor``, ``openrlhf.trainer.ray.ppo_actor``, ...). Call before the actor
    and trainer are built, in each Ray actor process. Returns a handle (``undo()``, context
    manager). Targets missing from, or with another signature in, the installed OpenRLHF are
    skipped with an ``IntegrationWarning``.

    Args:
        module: ``"openrlhf"`` (default), another package name, or a module (stand-in trees in
            tests). ``ImportError`` if it cannot be imported.
    """
    mu, ml = "models.utils", "models.loss"
    targets = [
        Target(mu, "log_probs_from_logits", replace_with(log_probs_from_logits),
               check_params(["logits", "labels", "temperature"])),
        Target(mu, "compute_entropy", replace_with(compute_entropy), check_params(["logits"])),
        Target(mu, "compute_approx_kl", replace_with(compute_approx_kl),
               check_params(["log_probs", "log_probs_base", "log_probs_old", "kl_estimator", "unbiased_gradient"])),
        Target(ml, "PolicyLoss", _make_policy_loss, _check_policy_loss),
        Target(ml, "DPOLoss", replace_with_class(DPOLoss), _check_module_class(DPOLoss)),
    ]
    return apply_patch("openrlhf" if module is None else module, targets, label="OpenRLHF",
                       install_hint="pip install openrlhf", caller="fastrlhf.integrations.openrlhf")


def _check_module_class(ours: type):
    """Both the constructor and ``forward`` of the installed class must take exactly our parameters."""
    init_check = check_params(param_names(ours.__init__, skip_first=True), exact=True, skip_first=True,
                              attr="__init__")
    fwd_check = check_params(param_names(ours.forward, skip_first=True), exact=True, skip_first=True,
                             attr="forward")

    def check(original):
        return init_check(original) or fwd_check(original)

    return check


# The PolicyLoss APIs implemented: 0.11.2's (is_correction_*) and v0.11.0's (enable_vllm_is_correction, ...).
POLICY_LOSS_CLASSES = (PolicyLoss, VllmISPolicyLoss)


def _policy_loss_class(original) -> Optional[type]:
    return next((c for c in POLICY_LOSS_CLASSES if _check_module_class(c)(original) is None), None)


def _check_policy_loss(original) -> Optional[str]:
    return None if _policy_loss_class(original) is not None else _check_module_class(PolicyLoss)(original)


def _make_policy_loss(original):
    return replace_with_class(_policy_loss_class(original))(original)
