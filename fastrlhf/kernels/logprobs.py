"""Token log-probabilities and entropy from logits, streaming over the vocabulary (Triton).

Reference: ``fastrlhf.reference.token_logprobs`` / ``token_logprobs_and_entropy`` / ``entropy``
(the oracle the tests compare against). These kernels implement the two row primitives that
``fastrlhf._rows`` dispatches (``row_forward`` / ``row_backward``); every op on logits (token
ops, PPO / GRPO, DPO) is a forward pass here plus, in backward, one gradient pass. This module
is a leaf: it takes tensors and scalars and knows no other fastrlhf module.

Math, per row with ``x = logits[n] / temperature``:
    lse     = logsumexp(x)
    logp    = x[label] - lse
    H       = lse - sum(p * x) = log(s) - sum(e * (x - m)) / s,  e = exp(x - m), s = sum(e)
  Gradient, with ``p = exp(x - lse)`` and ``E = sum(p * x) = lse - H``:
    d logp / dx_j = onehot_j - p_j
    d H    / dx_j = -p_j * (x_j - E)
    dlogits_j     = (dlogp * (onehot_j - p_j) - dH * p_j * (x_j - E)) / temperature

Shapes: logits ``[B, T, V]`` as a strided view (2-D ``[N, V]`` is ``[1, N, V]``); labels
``[N]``; outputs ``logp``, ``entropy``, ``lse`` ``[N]``.
Dtypes: logits fp32/bf16/fp16 (fp64 is read and computed in fp32); accumulation fp32; outputs
fp32 (the buffer's dtype); the gradient is stored in the logits' dtype.
Memory: forward reads ``N x V`` logits once and writes ``3 x N x 4`` bytes; backward reads
them once more and writes the ``[N, V]`` gradient (into the logits with ``inplace_backward``).
NOT made: the ``[N, V]`` fp32 logits copy, log-softmax, softmax or one-hot.
Limits: any V (looped in blocks of ``BLOCK_V``); row offsets in int64 (N x V > 2^31 is fine);
rows whose label is ``ignore_index`` are skipped (no read) and get 0 / zero gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import interpreted, to_bf16_rtne

# 4096 elements per block: 8 KiB of bf16 per load, 16 per thread at 8 warps, which keeps
# enough bytes in flight per SM to saturate HBM (the usual choice of fused softmax kernels).
MAX_BLOCK_V = 4096
# Under the CPU interpreter each loop iteration costs Python overhead, so larger blocks are
# much faster there; numerics are unaffected (fp32 accumulation either way).
INTERPRET_BLOCK_V = 16384


@triton.jit
def row_lse_entropy(
    row_ptr, V, stride_v, inv_temp, valid,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One streaming pass over a row: ``(lse, entropy)`` of ``x = row * inv_temp`` (entropy
    only when ``HAS_ENTROPY``). ``valid`` False loads nothing (masked loads move no bytes)."""
    cols = tl.arange(0, BLOCK_V)
    # One comparison rather than (offs < V) & valid: triton >= 3.7's interpreter rejects the
    # mask that `vector & scalar` makes; invalid rows get n_load = 0 and read nothing.
    n_load = tl.where(valid, V, 0)
    m = tl.zeros([], dtype=tl.float32) - float("inf")  # running max
    s = tl.zeros([], dtype=tl.float32)  # sum exp(x - m)
    sx = tl.zeros([], dtype=tl.float32)  # sum exp(x - m) * (x - m)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs.to(tl.int64) * stride_v, mask=offs < n_load, other=float("-inf"))
        x = x.to(tl.float32) * inv_temp
        # Online logsumexp: with m' = max(m, max(x_blk)),
        #   s' = s * exp(m - m') + sum(exp(x_blk - m')).
        # For entropy, sx = sum e * (x - m) shifts by (m - m') per term:
        #   sx' = exp(m - m') * (sx + s * (m - m')) + sum(e_blk * (x_blk - m')).
        # Keeping x - m (not x) avoids cancelling lse against E when |logits| is large.
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no NaN
        alpha = tl.exp(m - m_safe)
        xm = x - m_safe
        e = tl.exp(xm)
        if HAS_ENTROPY:
            shift = tl.where(s > 0, s * (m - m_safe), 0.0)
            sx = alpha * (sx + shift) + tl.sum(tl.where(e > 0, e * xm, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    lse = m + tl.log(s)
    ent = tl.log(s) - sx / s
    return lse, ent


@triton.jit
def write_row_grad(
    row_ptr, out_ptr, V, stride_v, stride_gv,
    lse, ent, dlogp, dent, label, inv_temp, valid,
    HAS_DLOGP: tl.constexpr, HAS_DENT: tl.constexpr, MANUAL_RTNE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Second pass over a row: ``out = inv_temp * (dlogp * (onehot(label) - p) - dent * p * (x - E))``
    with ``p = exp(x - lse)``, ``E = lse - ent``; zeros when not ``valid`` (nothing is read)."""
    cols = tl.arange(0, BLOCK_V)
    n_load = tl.where(valid, V, 0)  # see row_lse_entropy
    big_e = lse - ent  # E = sum(p * x)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        cmask = offs < V
        x = tl.load(row_ptr + offs.to(tl.int64) * stride_v, mask=offs < n_load, other=0.0)
        x = x.to(tl.float32) * inv_temp
        p = tl.exp(x - lse)
        g = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_DLOGP:
            g = tl.where(offs == label, dlogp, 0.0) - p * dlogp
        if HAS_DENT:
            g -= dent * tl.where(p > 0, p * (x - big_e), 0.0)  # p = 0 at x = -inf: no 0 * inf
        g = tl.where(valid, g * inv_temp, 0.0)
        if MANUAL_RTNE:
            g = to_bf16_rtne(g)
        tl.store(out_ptr + offs.to(tl.int64) * stride_gv, g.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    logits_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr,
    # sizes
    T, V,
    # strides (elements)
    stride_lb, stride_lt, stride_lv,
    # scalars
    inv_temp, ignore_index,
    # meta
    HAS_LABELS: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index  # ignored rows read nothing: padding costs no bandwidth
    else:
        valid = V >= 0  # every row counts (a tensor, like the labelled branch's)
    lse, ent = row_lse_entropy(row_ptr, V, stride_lv, inv_temp, valid, HAS_ENTROPY, BLOCK_V)
    if HAS_LABELS:
        in_range = valid & (label >= 0) & (label < V)
        x_lab = tl.load(row_ptr + label * stride_lv, mask=in_range, other=0.0).to(tl.float32) * inv_temp
        tl.store(logp_ptr + row, tl.where(valid, x_lab - lse, 0.0))
        lse = tl.where(valid, lse, 0.0)
        ent = tl.where(valid, ent, 0.0)
    tl.store(lse_ptr + row, lse)
    if HAS_ENTROPY:
        tl.store(ent_ptr + row, ent)


@triton.jit
def _logprobs_bwd_kernel(
    # pointers
    logits_ptr, labels_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, dlogits_ptr,
    # sizes
    T, V,
    # strides (elements)
    stride_lb, stride_lt, stride_lv,
    stride_gb, stride_gt, stride_gv,
    # scalars
    inv_temp, ignore_index,
    # meta
    HAS_LABELS: tl.constexpr, HAS_DLOGP: tl.constexpr, HAS_DENT: tl.constexpr, MANUAL_RTNE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
    else:
        label = -1
        valid = V >= 0  # every row counts (a tensor, like the labelled branch's)
    lse = tl.load(lse_ptr + row)
    dlogp = 0.0
    dent = 0.0
    ent = 0.0
    if HAS_DLOGP:
        dlogp = tl.load(dlogp_ptr + row)
    if HAS_DENT:
        dent = tl.load(dent_ptr + row)
        ent = tl.load(ent_ptr + row)
    write_row_grad(
        logits_ptr + b * stride_lb + t * stride_lt, dlogits_ptr + b * stride_gb + t * stride_gt,
        V, stride_lv, stride_gv, lse, ent, dlogp, dent, label, inv_temp, valid,
        HAS_DLOGP, HAS_DENT, MANUAL_RTNE, BLOCK_V,
    )


def launch_config(V: int) -> Tuple[int, int]:
    cap = INTERPRET_BLOCK_V if interpreted() else MAX_BLOCK_V
    block_v = min(cap, triton.next_power_of_2(V))
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def logprobs_forward(
    x3: torch.Tensor,
    labels: Optional[torch.Tensor],
    inv_temp: float,
    ignore_index: int,
    logp: Optional[torch.Tensor],
    ent: Optional[torch.Tensor],
    lse: torch.Tensor,
) -> None:
    """Row forward (see ``fastrlhf._rows``): fills ``logp [N]`` (when labels are given),
    ``ent [N]`` (when given) and ``lse [N]``, fp32 buffers allocated by the caller."""
    B, T, V = x3.shape
    N = B * T
    want_entropy = ent is not None
    if N == 0:
        return
    block_v, num_warps = launch_config(V)
    _logprobs_fwd_kernel[(N,)](
        x3, labels if labels is not None else lse, logp if logp is not None else lse,
        ent if ent is not None else lse, lse,
        T, V,
        *x3.stride(),
        inv_temp, ignore_index,
        HAS_LABELS=labels is not None, HAS_ENTROPY=want_entropy, BLOCK_V=block_v,
        num_warps=num_warps,
    )


def logprobs_backward(
    x3: torch.Tensor,
    labels: Optional[torch.Tensor],
    lse: torch.Tensor,
    ent: Optional[torch.Tensor],
    dlogp: Optional[torch.Tensor],
    dent: Optional[torch.Tensor],
    inv_temp: float,
    ignore_index: int,
    out3: torch.Tensor,
) -> None:
    """Row backward (see ``fastrlhf._rows``): writes the logits' gradient into ``out3`` (may alias ``x3``)."""
    B, T, V = x3.shape
    N = B * T
    if N == 0:
        return
    if dent is not None and ent is None:
        raise ValueError("an entropy gradient needs the saved entropy")
    block_v, num_warps = launch_config(V)
    _logprobs_bwd_kernel[(N,)](
        x3, labels if labels is not None else lse, lse, ent if ent is not None else lse,
        dlogp if dlogp is not None else lse, dent if dent is not None else lse, out3,
        T, V,
        *x3.stride(),
        *out3.stride(),
        inv_temp, ignore_index,
        HAS_LABELS=labels is not None, HAS_DLOGP=dlogp is not None, HAS_DENT=dent is not None,
        MANUAL_RTNE=interpreted() and out3.dtype == torch.bfloat16, BLOCK_V=block_v, num_warps=num_warps,
    )
