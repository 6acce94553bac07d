"""Fused PPO-clip / GRPO loss from logits: loss and logits' gradient in one launch (Triton).

Reference: ``fastrlhf.reference.ppo_clip_loss`` / ``grpo_loss`` (the oracle of the tests);
public wrappers ``fastrlhf.ppo_clip_loss`` / ``fastrlhf.grpo_loss`` dispatch here on the Triton
backend. DPO needs the sequence sums before any token's gradient is known, so it runs as a
forward pass + gradient pass through ``fastrlhf.kernels.logprobs`` instead.

Math, per token (``w`` the aggregation weight of ``loss_agg``, 0 on uncounted tokens):
    lr    = logp - old;  ratio = exp(clamp(lr, -20, 20))
    pg    = max(-A * ratio, -A * clamp(ratio, 1 - eps_lo, 1 + eps_hi)),  dual clip: min(pg, -A * c) if A < 0
    kl    = k1: logp - ref | k2: (ref - logp)^2 / 2 | k3: exp(r) - r - 1, r = clamp(ref - logp, -20, 20)
    l_t   = pg + kl_coef * kl - entropy_coef * H;          loss = sum_t w_t * l_t
  Upstream gradient of token t (a function of per-token values only, so known in forward):
    dpg/dlogp = 0 where the clipped branch is active (or the dual clip), else -A * ratio
                (0 if |lr| > 20, as the clamp's gradient); ties split half/half as torch.maximum
    dkl/dlogp = k1: 1 | k2: -(ref - logp) | k3: 1 - exp(r) (0 if |ref - logp| > 20)
    g_t = w_t * (dpg/dlogp + kl_coef * dkl/dlogp),   e_t = -w_t * entropy_coef
  and the logits' gradient is that of ``fastrlhf.kernels.logprobs.write_row_grad`` with
  ``(dlogp, dent) = (g_t, e_t)``. ``backward`` only scales by ``grad_output`` (skipped when 1).

Shapes: logits ``[B, T, V]`` strided view; every per-token input/output ``[N]`` fp32.
Memory: the row is read twice (lse pass, gradient pass) and the gradient written once
(3 passes of ``N x V``); rows with ``w_t = 0`` (masked / ignore_index / padding) read nothing
and get zeros. NOT made: any ``[N, V]`` tensor besides the gradient (which
``inplace_backward=True`` writes into the logits themselves, during forward).
Limits: gradients flow to the logits only (old/ref logprobs and advantages are constants, as in
every PPO trainer); ``backward`` may run once per forward (no ``retain_graph`` double backward).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import reference as ref
from .._backend import triton_interpreted
from .._rows import as_rows3d
from .logprobs import launch_config, row_lse_entropy, write_row_grad

LOG_RATIO_CLAMP = ref.LOG_RATIO_CLAMP  # 20, as verl
_KL_CODE = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _ppo_fused_kernel(
    # pointers
    logits_ptr, labels_ptr, old_ptr, adv_ptr, ref_ptr, w_ptr, dlogits_ptr,
    logp_ptr, ent_ptr, tok_loss_ptr, ratio_ptr, clipped_ptr, kl_ptr,
    # sizes
    T, V,
    # strides (elements)
    stride_lb, stride_lt, stride_lv,
    stride_gb, stride_gt, stride_gv,
    # scalars
    inv_temp, ignore_index, ratio_lo, ratio_hi, dual_clip, kl_coef, entropy_coef,
    # meta
    KL_EST: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_ENTROPY: tl.constexpr, ENT_GRAD: tl.constexpr,
    HAS_GRAD: tl.constexpr, MANUAL_RTNE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt
    label = tl.load(labels_ptr + row).to(tl.int64)
    w = tl.load(w_ptr + row)
    valid = (label != ignore_index) & (w != 0.0)  # uncounted rows: no reads, zero gradient

    # Pass 1: logsumexp (+ entropy) of the row, and the label's logit.
    lse, ent = row_lse_entropy(row_ptr, V, stride_lv, inv_temp, valid, HAS_ENTROPY, BLOCK_V)
    in_range = valid & (label >= 0) & (label < V)
    x_lab = tl.load(row_ptr + label * stride_lv, mask=in_range, other=0.0).to(tl.float32) * inv_temp
    logp = tl.where(valid, x_lab - lse, 0.0)

    # Per-token PPO-clip math and its derivative in logp.
    old = tl.load(old_ptr + row)
    adv = tl.load(adv_ptr + row)
    lr = logp - old
    lr_c = tl.minimum(tl.maximum(lr, -20.0), 20.0)
    ratio = tl.exp(lr_c)
    dratio = tl.where((lr >= -20.0) & (lr <= 20.0), ratio, 0.0)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
    clipped = pg2 > pg1  # strictly: the clipped ratio lies outside [lo, hi], its gradient is 0
    pg = tl.maximum(pg1, pg2)
    dpg = tl.where(clipped, 0.0, -adv * dratio)
    if HAS_DUAL:
        pg3 = -adv * dual_clip
        neg = adv < 0
        dpg = tl.where(neg & (pg > pg3), 0.0, tl.where(neg & (pg == pg3), 0.5 * dpg, dpg))
        pg = tl.where(neg, tl.minimum(pg, pg3), pg)
    tok_loss = pg
    dlogp = dpg
    if KL_EST != 0:
        refl = tl.load(ref_ptr + row)
        r = refl - logp
        if KL_EST == 1:
            kl = -r
            dkl = tl.zeros([], dtype=tl.float32) + 1.0
        elif KL_EST == 2:
            kl = 0.5 * r * r
            dkl = -r
        else:
            r_c = tl.minimum(tl.maximum(r, -20.0), 20.0)
            er = tl.exp(r_c)
            kl = er - r_c - 1.0
            dkl = tl.where((r >= -20.0) & (r <= 20.0), 1.0 - er, 0.0)
        tok_loss += kl_coef * kl
        dlogp += kl_coef * dkl
        tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))
    if HAS_ENTROPY:
        ent = tl.where(valid, ent, 0.0)
        tok_loss -= entropy_coef * ent
        tl.store(ent_ptr + row, ent)
    tl.store(logp_ptr + row, logp)
    tl.store(tok_loss_ptr + row, tl.where(valid, tok_loss, 0.0))
    tl.store(ratio_ptr + row, tl.where(valid, ratio, 0.0))
    tl.store(clipped_ptr + row, tl.where(valid & clipped, 1.0, 0.0))

    # Pass 2: the logits' gradient of w * l_t, written once.
    if HAS_GRAD:
        write_row_grad(
            row_ptr, dlogits_ptr + b * stride_gb + t * stride_gt, V, stride_lv, stride_gv,
            lse, ent, w * dlogp, -w * entropy_coef, label, inv_temp, valid,
            True, ENT_GRAD, MANUAL_RTNE, BLOCK_V,
        )


def _flat_f32(t: torch.Tensor, N: int) -> torch.Tensor:
    return t.reshape(N).to(torch.float32).contiguous()  # [N]


def launch_ppo_fused(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    adv_tok: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    weights: torch.Tensor,
    dlogits: Optional[torch.Tensor],
    *,
    inv_temp: float,
    ignore_index: int,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    want_entropy: bool,
) -> Dict[str, torch.Tensor]:
    """Launch the fused kernel; returns the per-token ``[N]`` outputs. Writes ``dlogits`` if given."""
    x3 = as_rows3d(logits)  # [B, T, V]
    B, T, V = x3.shape
    N = B * T
    dev = logits.device
    f32 = dict(dtype=torch.float32, device=dev)
    outs = {k: torch.empty(N, **f32) for k in ("logp", "tok_loss", "ratio", "clipped")}  # [N] each
    outs["entropy"] = torch.empty(N, **f32) if want_entropy else None
    outs["kl"] = torch.empty(N, **f32) if kl_coef > 0 else None
    if N == 0:
        return outs
    g3 = as_rows3d(dlogits) if dlogits is not None else x3
    dummy = outs["logp"]
    block_v, num_warps = launch_config(V)
    _ppo_fused_kernel[(N,)](
        x3, labels.reshape(N).contiguous(), _flat_f32(old_logprobs, N), _flat_f32(adv_tok, N),
        _flat_f32(ref_logprobs, N) if kl_coef > 0 else dummy, _flat_f32(weights, N), g3,
        outs["logp"], outs["entropy"] if want_entropy else dummy, outs["tok_loss"], outs["ratio"],
        outs["clipped"], outs["kl"] if kl_coef > 0 else dummy,
        T, V,
        *x3.stride(),
        *g3.stride(),
        inv_temp, ignore_index, 1.0 - clip_low, 1.0 + clip_high,
        float(dual_clip) if dual_clip is not None else 0.0, kl_coef, entropy_coef,
        KL_EST=_KL_CODE[kl_estimator] if kl_coef > 0 else 0, HAS_DUAL=dual_clip is not None,
        HAS_ENTROPY=want_entropy, ENT_GRAD=entropy_coef > 0, HAS_GRAD=dlogits is not None,
        MANUAL_RTNE=triton_interpreted() and g3.dtype == torch.bfloat16,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return outs


class FusedPPOClipLoss(torch.autograd.Function):
    """Loss (0-d) from logits; the logits' gradient is computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, logits, labels, old_logprobs, adv_tok, ref_logprobs, weights, need_grad, inplace, opts):
        if need_grad:
            dlogits = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        else:
            dlogits = None
        outs = launch_ppo_fused(logits, labels, old_logprobs, adv_tok, ref_logprobs, weights, dlogits, **opts)
        loss = (outs["tok_loss"] * weights.reshape(-1).to(torch.float32)).sum()
        ctx.dlogits = dlogits
        ctx.used = False
        empty = outs["logp"].new_zeros(0)
        token_outs = [outs["logp"], outs["ratio"], outs["clipped"],
                      outs["entropy"] if outs["entropy"] is not None else empty,
                      outs["kl"] if outs["kl"] is not None else empty]
        ctx.mark_non_differentiable(*token_outs)  # per-token values feed the stats only
        return (loss, *token_outs)

    @staticmethod
    def backward(ctx, dloss, *unused):
        if ctx.dlogits is None or dloss is None:
            return (None,) * 9
        if ctx.used:
            raise RuntimeError(
                "the fused PPO loss computes its gradient once in forward; backward through it twice "
                "(retain_graph) is not supported"
            )
        ctx.used = True
        dlogits = ctx.dlogits
        ctx.dlogits = None
        # The loss is almost always the final scalar (dloss = 1): skip a full pass over [N, V].
        if not bool((dloss == 1).all()):
            dlogits.mul_(dloss.to(dlogits.dtype))
        return dlogits, None, None, None, None, None, None, None, None


def fused_ppo_clip_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    want_entropy: bool,
    inplace_backward: bool,
    clip_low: float,
    clip_high: Optional[float],
    dual_clip: Optional[float],
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    loss_agg: str,
) -> Tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
    """Triton path of :func:`fastrlhf.ppo_clip_loss` (inputs already validated by the wrapper)."""
    counted = labels != ignore_index  # [...]
    if mask is not None:
        counted = counted & mask.bool()
    m = ref.as_batch_time(counted).to(torch.float32)  # [B, T]
    weights = ref.loss_agg_weights(m, loss_agg)  # [B, T]
    if advantages.dim() == 1 and labels.dim() >= 2:
        adv_tok = advantages.reshape(-1, 1).expand(m.shape)  # per sequence -> [B, T]
    else:
        adv_tok = advantages
    if inplace_backward and as_rows3d(logits).data_ptr() != logits.data_ptr():
        raise ValueError("inplace_backward=True needs logits whose leading dims can be merged without a copy")
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    opts = dict(
        inv_temp=1.0 / temperature, ignore_index=ignore_index, clip_low=clip_low,
        clip_high=clip_low if clip_high is None else clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, want_entropy=want_entropy,
    )
    loss, logp, ratio, clipped, ent, kl = FusedPPOClipLoss.apply(
        logits, labels, old_logprobs, adv_tok, ref_logprobs, weights, need_grad, inplace_backward, opts
    )
    with torch.no_grad():
        mf = m.reshape(-1)
        n = mf.sum()
        denom = n.clamp_min(1.0)
        r = (_flat_f32(old_logprobs, mf.numel()) - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        stats = {
            "clipfrac": (clipped * mf).sum() / denom,
            "ratio_mean": (ratio * mf).sum() / denom,
            "approx_kl": ((torch.exp(r) - r - 1.0) * mf).sum() / denom,
            "num_tokens": n,
        }
        if kl_coef > 0:
            stats["kl"] = (kl * mf).sum() / denom
        if want_entropy:
            stats["entropy"] = (ent * mf).sum() / denom
    return loss, stats
