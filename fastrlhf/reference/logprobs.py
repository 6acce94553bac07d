"""Oracle of the token ops (log-softmax + gather composition), the KL estimators and the sampler-support mask."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import KL_ESTIMATORS, LOG_RATIO_CLAMP, _compute_dtype, _finite_or_zero

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
