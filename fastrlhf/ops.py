"""Public ops of fastrlhf (the contract of ``shared/API.md``), dispatched to a backend.

Token ops and DPO are built on one autograd function over the row primitives of
``fastrlhf._rows`` (forward: one streaming pass per row writing only ``[N]`` outputs;
backward: one pass recomputing the softmax from the saved logsumexp and writing the
logits' gradient). PPO/GRPO on the Triton backend use the fused kernel of
``fastrlhf.kernels.losses`` (loss and logits' gradient in one launch); on the other
backends they run the reference's ``[N]``-sized per-token math on top of that function.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch

from . import reference as ref
from ._backend import resolve_backend
from ._rows import as_rows3d, finish_row_forward, row_backward_from_ctx, row_forward
from ._validate import (
    check_dpo_refs,
    check_labels,
    check_logits,
    check_temperature,
    check_token_tensor,
)

__all__ = [
    "token_logprobs",
    "token_logprobs_and_entropy",
    "entropy",
    "kl_estimate",
    "ppo_clip_loss",
    "grpo_loss",
    "dpo_loss",
    "gae",
    "group_advantages",
]

Stats = Mapping[str, torch.Tensor]


def _vocab_offset(logits: torch.Tensor, process_group) -> Tuple[int, int]:
    """``(offset of this rank's vocabulary shard, global V)``; ``(0, V)`` without a group."""
    if process_group is None:
        return 0, logits.shape[-1]
    from .distributed import shard_offset

    return shard_offset(logits.shape[-1], process_group)


def _no_process_group(process_group) -> None:
    """The fused-linear ops take the full lm_head weight; a vocab-parallel weight is not supported there."""
    if process_group is not None:
        raise NotImplementedError(
            "process_group (vocab-parallel) is supported by the logits ops; the linear_* ops need the full weight"
        )


def _token_values(logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend,
                  process_group, offset):
    """``logp`` / ``entropy`` / both, from full logits or from this rank's vocabulary shard."""
    if process_group is None:
        return RowLogprobsEntropy.apply(
            logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend
        )
    from .distributed import vocab_parallel_token_values

    return vocab_parallel_token_values(
        logits, labels, temperature=temperature, ignore_index=ignore_index, want_logp=want_logp,
        want_entropy=want_entropy, inplace_backward=inplace_backward, backend=backend, group=process_group,
        offset=offset,
    )


class RowLogprobsEntropy(torch.autograd.Function):
    """``(logp?, entropy?)`` per row of ``logits``; only ``[N]`` tensors are saved."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend):
        x3 = as_rows3d(logits)  # [B, T, V] view
        if inplace_backward and x3.data_ptr() != logits.data_ptr():
            raise ValueError("inplace_backward=True needs logits whose leading dims can be merged without a copy")
        lab = labels.reshape(-1).contiguous() if labels is not None else None  # [N]
        inv_temp = 1.0 / temperature
        logp, ent, lse = row_forward(backend, x3, lab, inv_temp, ignore_index, want_entropy)
        return finish_row_forward(ctx, logits, lab, lse, ent, logp, inv_temp=inv_temp, ignore_index=ignore_index,
                                  inplace_backward=inplace_backward, backend=backend, want_logp=want_logp,
                                  want_entropy=want_entropy)

    @staticmethod
    def backward(ctx, *grads):
        return (row_backward_from_ctx(ctx, grads),) + (None,) * 7


def _prepare(logits, labels, temperature, ignore_index, backend, process_group=None):
    """Check inputs; ``(temperature, concrete backend, vocab offset of this rank's shard)``."""
    check_logits(logits)
    temperature = check_temperature(temperature)
    offset, vocab = _vocab_offset(logits, process_group)
    if labels is not None:
        check_labels(labels, logits, ignore_index, vocab_size=vocab)
    return temperature, resolve_backend(backend, logits.device, logits.dtype, logits), offset


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Log-probability of each label: ``logp = x[label] - logsumexp(x)``, ``x = logits / temperature``.

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16; leading dims may be non-contiguous.
        labels: ``[...]`` int32/int64, aligned with ``logits`` (the caller shifts).
        temperature: float > 0; the gradient flows through the division.
        ignore_index: label giving logp 0 and exactly zero gradient.
        inplace_backward: write the logits' gradient into the logits' own storage (saves
            ``N x V`` bytes; the logits are overwritten in backward).
        backend: ``"auto"`` / ``"triton"`` / ``"native"`` / ``"torch"`` (or ``$FASTRLHF_BACKEND``).

    Returns:
        ``logp [...]`` fp32. Memory: no ``[N, V]`` temporary besides the logits' gradient.
    """
    temperature, backend, offset = _prepare(logits, labels, temperature, ignore_index, backend, process_group)
    return _token_values(logits, labels, temperature, ignore_index, True, False, inplace_backward, backend,
                         process_group, offset)


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` per token from one pass over the vocabulary; both differentiable.

    ``entropy = logsumexp(x) - sum(softmax(x) * x)``; both are 0 where ``labels == ignore_index``.
    See :func:`token_logprobs` for the arguments.
    """
    temperature, backend, offset = _prepare(logits, labels, temperature, ignore_index, backend, process_group)
    return _token_values(logits, labels, temperature, ignore_index, True, True, inplace_backward, backend,
                         process_group, offset)


def entropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per row, ``[...]`` fp32, differentiable."""
    temperature, backend, offset = _prepare(logits, None, temperature, -100, backend, process_group)
    return _token_values(logits, None, temperature, -100, False, True, inplace_backward, backend,
                         process_group, offset)


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k3",
    clamp: Optional[Tuple[float, float]] = None,
) -> torch.Tensor:
    """Per-token KL(policy || ref) estimate: k1, k2 or k3 (Schulman 2020); see ``reference.kl_estimate``."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if logp.device != ref_logp.device:
        raise ValueError(f"ref_logp is on {ref_logp.device} but logp is on {logp.device}")
    if clamp is not None and (len(clamp) != 2 or clamp[0] > clamp[1]):
        raise ValueError(f"clamp must be (lo, hi) with lo <= hi, got {clamp!r}")
    dt = torch.float64 if torch.float64 in (logp.dtype, ref_logp.dtype) else torch.float32  # fp32 at least
    return ref.kl_estimate(logp.to(dt), ref_logp.to(dt), estimator, clamp)


def _check_ppo_args(logits, labels, old_logprobs, advantages, mask, ref_logprobs, kl_coef, kl_estimator,
                    clip_low, clip_high, dual_clip, loss_agg, entropy_coef):
    check_token_tensor(old_logprobs, labels, "old_logprobs")
    if old_logprobs is None:
        raise ValueError("old_logprobs is required")
    if advantages is None:
        raise ValueError("advantages is required")
    check_token_tensor(advantages, labels, "advantages", allow_per_sequence=True)
    check_token_tensor(mask, labels, "mask")
    check_token_tensor(ref_logprobs, labels, "ref_logprobs")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef > 0")
    if kl_estimator not in ref.KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {ref.KL_ESTIMATORS}, got {kl_estimator!r}")
    if loss_agg not in ref.LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {ref.LOSS_AGG_MODES}, got {loss_agg!r}")
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high is not None and clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if entropy_coef < 0:
        raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")


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
) -> Tuple[torch.Tensor, Stats]:
    """PPO-clip policy loss from logits (Schulman et al. 2017, eq. 7), fused with the logprob pass.

    Per token, ``logp`` computed from ``logits / temperature``:
    ``ratio = exp(clamp(logp - old_logprobs, -20, 20))``;
    ``pg = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))`` (``clip_high``
    defaults to ``clip_low``; DAPO's clip-higher sets it larger); ``dual_clip=c > 1``
    (Ye et al. 2020): ``pg = min(pg, -A * c)`` where ``A < 0``; ``+ kl_coef * kl_estimate(logp,
    ref_logprobs, kl_estimator)``; ``- entropy_coef * entropy``. Aggregated over counted tokens
    (``mask`` true and label not ``ignore_index``) by ``loss_agg``: ``token-mean``,
    ``seq-mean-token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-sum-norm`` (Dr. GRPO).

    ``advantages``: ``[B, T]`` per token or ``[B]`` per sequence. ``compute_entropy=True``
    reports the ``entropy`` stat without an entropy bonus.

    Returns ``(loss, stats)`` with stats ``clipfrac`` (fraction of counted tokens whose clipped
    term is active, as verl), ``ratio_mean``, ``approx_kl`` (k3 of old vs new), ``kl`` (when
    ``kl_coef > 0``), ``entropy`` (when computed), ``num_tokens``.

    Memory: no ``[N, V]`` tensor besides the logits' gradient (written into the logits with
    ``inplace_backward=True``).
    """
    temperature, backend, offset = _prepare(logits, labels, temperature, ignore_index, backend, process_group)
    _check_ppo_args(logits, labels, old_logprobs, advantages, mask, ref_logprobs, kl_coef, kl_estimator,
                    clip_low, clip_high, dual_clip, loss_agg, entropy_coef)
    want_entropy = entropy_coef > 0 or compute_entropy
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg)
    labels = mask_as_ignored(labels, mask, ignore_index)
    if backend == "triton" and process_group is None:
        from .kernels.losses import fused_ppo_clip_loss

        return fused_ppo_clip_loss(
            logits, labels, old_logprobs, advantages, mask=mask, ref_logprobs=ref_logprobs,
            temperature=temperature, ignore_index=ignore_index, want_entropy=want_entropy,
            inplace_backward=inplace_backward, **opts,
        )
    out = _token_values(logits, labels, temperature, ignore_index, True, want_entropy, inplace_backward, backend,
                        process_group, offset)
    logp, ent = out if want_entropy else (out, None)
    return ppo_loss_from_token_values(logp, ent, labels, old_logprobs, advantages, mask, ref_logprobs,
                                      ignore_index, **opts)


def mask_as_ignored(labels: torch.Tensor, mask: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """Labels with ``mask = 0`` tokens set to ``ignore_index``: the row pass then skips them, so a
    NaN logit in a masked token cannot reach the loss (a zero weight times NaN is still NaN)."""
    if mask is None:
        return labels
    return labels.masked_fill(~mask.reshape(labels.shape).bool(), ignore_index)


def ppo_loss_from_token_values(logp, ent, labels, old_logprobs, advantages, mask, ref_logprobs, ignore_index,
                               **opts) -> Tuple[torch.Tensor, Stats]:
    """The ``[N]``-sized part of PPO-clip: per-token math on logp/entropy (shared by all paths)."""
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.bool()
    per_sequence = advantages.dim() == 1 and labels.dim() >= 2
    bt = ref.as_batch_time
    return ref.ppo_clip_loss_from_logprobs(
        bt(logp),
        bt(counted).to(logp.dtype),
        bt(old_logprobs),
        advantages if per_sequence else bt(advantages),
        entropy=None if ent is None else bt(ent),
        ref_logprobs=None if ref_logprobs is None else bt(ref_logprobs),
        **opts,
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
) -> Tuple[torch.Tensor, Stats]:
    """GRPO loss (Shao et al. 2024, eq. 3): :func:`ppo_clip_loss` with ``kl_coef=beta``, k3 KL.

    ``advantages`` per sequence ``[B]`` (or per token ``[B, T]``), e.g. from
    :func:`group_advantages`. ``beta=0`` needs no ``ref_logprobs``. Other keywords as
    :func:`ppo_clip_loss` (``loss_agg="seq-mean-token-mean"`` is the paper's, ``"token-mean"``
    DAPO's, ``"seq-mean-token-sum-norm"`` Dr. GRPO's).
    """
    for k in ("kl_coef", "kl_estimator"):
        if k in kwargs:
            raise TypeError(f"grpo_loss sets {k} itself (beta, k3); use ppo_clip_loss for other choices")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0")
    return ppo_clip_loss(
        logits, labels, old_logprobs, advantages,
        ref_logprobs=ref_logprobs if beta > 0 else None, kl_coef=beta, kl_estimator="k3", **kwargs,
    )


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
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
) -> Tuple[torch.Tensor, Stats]:
    """DPO loss (Rafailov et al. 2023, eq. 7) and variants from ``logits [2B, T, V]``.

    Rows ``0..B-1`` are the chosen responses, ``B..2B-1`` the rejected ones (TRL's
    concatenation); prompt and padding tokens carry ``ignore_index`` labels. Sequence logprob
    = sum over counted tokens (``ipo``: their mean). With ``h = beta * ((lp_c - lp_r) - (ref_c
    - ref_r))`` and ``eps = label_smoothing``: ``sigmoid`` ``-(1-eps) logsigmoid(h) - eps
    logsigmoid(-h)`` (cDPO); ``hinge`` ``relu(1 - h)`` (SLiC); ``ipo`` ``(margin - 1/(2 beta))^2``
    (Azar et al. 2023); ``robust`` (Chowdhury et al. 2024). Reference-free: pass zeros.

    Two passes over the logits: forward (per-token logp + logsumexp), then, once the sequence
    sums fix each token's upstream gradient, the gradient pass in backward.
    Stats: ``chosen_rewards``, ``rejected_rewards``, ``reward_accuracy``, ``reward_margin``.
    """
    check_logits(logits)
    if logits.dim() != 3 or logits.shape[0] % 2:
        raise ValueError(f"logits must be [2B, T, V] (chosen rows then rejected rows), got {tuple(logits.shape)}")
    if loss_type not in ref.DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {ref.DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    B = logits.shape[0] // 2
    check_dpo_refs(ref_chosen_logps, ref_rejected_logps, B, logits.device)
    temperature, backend, offset = _prepare(logits, labels, temperature, ignore_index, backend, process_group)
    logp = _token_values(logits, labels, temperature, ignore_index, True, False, inplace_backward, backend,
                         process_group, offset)
    seq = ref.dpo_sequence_logps(logp, labels != ignore_index, loss_type)  # [2B]
    return ref.dpo_loss_from_logprobs(
        seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )


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
    All ``[B, T]``; outputs fp32. CUDA tensors run one Triton program per sequence.
    """
    for name, t in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a [B, T] tensor, got {getattr(t, 'shape', type(t))}")
        if t.shape != rewards.shape:
            raise ValueError(f"{name} must have the shape of rewards {tuple(rewards.shape)}, got {tuple(t.shape)}")
        if t.device != rewards.device:
            raise ValueError(f"{name} is on {t.device} but rewards are on {rewards.device}")
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    backend = resolve_backend(backend, rewards.device)
    if backend == "triton":
        from .kernels.advantages import gae_triton

        return gae_triton(rewards, values, mask, gamma=gamma, lam=lam)
    with torch.no_grad():
        return ref.gae(rewards, values, mask, gamma=gamma, lam=lam)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO outcome advantages: ``(r - mean_group) / (std_group + eps)``, unbiased std.

    ``rewards``: ``[B * G]`` (consecutive groups of ``group_size``) or ``[B, G]``; same shape
    out. ``scale="none"`` only centres (Dr. GRPO). Note: with near-identical rewards in a
    group (1.001 vs 1.000) the std is tiny and the division blows the difference up to about
    +-0.7; ``scale="none"`` or a larger ``eps`` avoids that.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards [B, G] must have G = group_size = {group_size}, got {tuple(rewards.shape)}")
    if rewards.dim() not in (1, 2) or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B * G] or [B, G] with G = {group_size}, got {tuple(rewards.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return ref.group_advantages(rewards.detach(), group_size, scale=scale, eps=eps)
