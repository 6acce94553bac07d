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
    sum_p2  = sum p^2 = S2 / S^2,  S2 = sum e^2  (optional: one more accumulator, ``HAS_SP2``)
    d sum_p2 / dx_j = 2 p_j (p_j - sum_p2)
    dlogits_j     = (dlogp * (onehot_j - p_j) - dH * p_j * (x_j - E) + 2 dQ * p_j (p_j - sum_p2)) / temperature
  Both kernels work in base 2 (one ``MUFU.EX2`` per element, its exponent one FFMA):
  ``y = x * c - K`` with ``c = log2(e) / temperature``, so ``exp(x / T - k) = 2^y``; and with
  ``x - E = y ln2 + H`` (``K`` = lse in log2 units) the whole gradient is
  ``dlogits = p * (A + B * y) + onehot * dlogp / T`` with per-row scalars
  ``A = -(dlogp + dH * H) / T``, ``B = -dH ln2 / T``: one FFMA and one FMUL per element. A ``sum_p2``
  gradient (``HAS_DSP2``) makes it ``p * (A + B * y + C * p)`` with ``C = 2 dQ / T`` and
  ``A -= 2 dQ sum_p2 / T``: one more FFMA per element.

Shapes: logits ``[B, T, V]`` as a strided view (2-D ``[N, V]`` is ``[1, N, V]``); labels
``[N]``; outputs ``logp``, ``entropy``, ``lse`` ``[N]``.
Dtypes: logits fp32/bf16/fp16 (fp64 is read and computed in fp32); accumulation fp32; outputs
fp32 (the buffer's dtype); the gradient is stored in the logits' dtype.
Memory: forward reads ``N x V`` logits once and writes ``3 x N x 4`` bytes; backward reads
them once more and writes the ``[N, V]`` gradient (into the logits with ``inplace_backward``).
NOT made: the ``[N, V]`` fp32 logits copy, log-softmax, softmax or one-hot.
Limits: any V (full blocks of ``BLOCK_V`` unmasked, then one masked tail block); row offsets in
int64 (N x V > 2^31 is fine); rows whose label is ``ignore_index`` run no loop iteration over
the logits: the forward reads nothing and writes 0, the gradient pass only stores zeros. 128-bit
accesses need 16-byte aligned rows (V a multiple of 8 for bf16, of 4 for fp32): the JIT
specialises on V % 16 and the row stride, and other V compile to narrower accesses.
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
# Elements one thread loads per 128-bit access of bf16 (8 x 16 bit); the forward's block is a
# [BLOCK_V / (THREADS * VEC), THREADS, VEC] tile so that a thread's elements lie on axes 0 and 2.
VEC = tl.constexpr(8)
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(z) = 2^(z log2(e)), what MUFU.EX2 computes
LN2 = tl.constexpr(0.6931471805599453)  # ln(2) = 1 / log2(e)
# Lower clamp of a base-2 exponent where it also multiplies its own 2^y (entropy terms): 2^-256 is
# 0 in fp32 (the smallest denormal is 2^-149), so no term changes, but 0 * -inf (a -inf logit,
# the masked tail) becomes 0 * -256 = 0 with one FMNMX instead of a compare and a select. Small
# enough that -256 x a per-row scale cannot overflow.
Y_MIN = tl.constexpr(-256.0)
# Programs per SM the gradient pass aims for when it splits rows across programs (few rows).
GRAD_PROGRAMS_PER_SM = 4


@triton.jit
def fast_exp2(y, USE_PTX: tl.constexpr):
    """``2^y`` as one ``MUFU.EX2``. On the GPU ``ex2.approx.ftz.f32``: tl.exp2 is the non-ftz form,
    which adds a compare and two predicated multiplies per element to produce denormal results.
    Every exponent here is relative to the row max or the lse (y <= ~0), so a flushed result is a
    term below 2^-126 of the largest one: in the forward's sums (>= 1) it is far below fp32's 2^-24
    relative resolution, and a gradient p < 2^-126 is below what any stored dtype resolves next to
    the row's large terms (bf16 / fp16 flush it anyway). Inline PTX does not run under the
    interpreter (nor on ROCm): ``USE_PTX`` False is tl.exp2."""
    if USE_PTX:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [y], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(y)


@triton.jit
def load_f32(x, USE_PTX: tl.constexpr):
    """Loaded logits to fp32. bf16 on the GPU: two bf16 share a 32-bit register (low half first),
    and each becomes an fp32 in one integer op, ``shl 16`` for the low, ``and 0xffff0000`` for the
    high half; ``.to(tl.float32)`` compiles to three ops per pair (a PRMT to move the high half
    down, then two shifts). Exact either way: bf16 is fp32's top 16 bits."""
    if USE_PTX and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r",
                                         [x], dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def online_lse_block(x, m, m2, s, sx, s2, c, HAS_ENTROPY: tl.constexpr, HAS_SP2: tl.constexpr,
                     USE_PTX: tl.constexpr):
    """Fold a ``[THREADS, R, VEC]`` block of raw fp32 logits (-inf where masked; thread t holds
    ``x[t]``) into per-thread state ``[THREADS]``: ``m`` max of raw x, ``m2 = fl(m c)`` (-inf
    before any finite logit), ``s = sum 2^(x c - m2)``, ``sx = sum 2^y y`` (base 2).

    Online logsumexp per thread: with m2' = fl(max(m, max(x_blk)) c),
      s' = s 2^(m2 - m2') + sum 2^y,  sx' = 2^(m2 - m2') (sx + s (m2 - m2')) + sum 2^y y,
      s2' = s2 2^(2 (m2 - m2')) + sum 2^(2y)  (sum p^2 = s2 / s^2),
      y = x_blk c - m2' (one FFMA).
    ``m2`` is carried, not recomputed as ``m * c``: the compiler contracts ``m * c - m2'`` into an
    FFMA, which makes the rescale 2^(rounding residual of m c) != 1 on every block where the max
    did not change, a drift of ~1e-5 in lse / entropy over a 152k row (measured on an H100).
    Axes 1 and 2 belong to one thread, so the reductions are register-only: no shuffle or barrier
    per block, one cross-thread combine per row (``finish_lse``)."""
    m_new = tl.maximum(m, tl.max(tl.max(x, 2), 1))
    m2_new = tl.where(m_new == float("-inf"), float("-inf"), m_new * c)
    m2_y = tl.where(m_new == float("-inf"), 0.0, m2_new)  # only -inf so far: y = -inf, not NaN
    alpha = fast_exp2(m2 - m2_y, USE_PTX)  # per thread: 1 / (elements per thread) per element
    y = tl.fma(x, c, -m2_y[:, None, None])  # x c exact inside the FFMA: only y's own rounding
    e = fast_exp2(y, USE_PTX)
    if HAS_ENTROPY:
        shift = tl.where(s > 0, s * (m2 - m2_y), 0.0)  # s = 0 while m2 = -inf: not 0 * -inf
        sx = alpha * (sx + shift) + tl.sum(tl.sum(e * tl.maximum(y, Y_MIN), 2), 1)
    if HAS_SP2:
        s2 = s2 * (alpha * alpha) + tl.sum(tl.sum(e * e, 2), 1)
    s = s * alpha + tl.sum(tl.sum(e, 2), 1)
    return m_new, m2_new, s, sx, s2


@triton.jit
def finish_lse(m, m2, s, sx, s2, c, inv_temp, HAS_ENTROPY: tl.constexpr, HAS_SP2: tl.constexpr,
               USE_PTX: tl.constexpr):
    """Combine the per-thread state of ``online_lse_block``: ``(lse, entropy)`` in natural units.

    With M the row max and M2 = fl(M c) = max of the threads' m2 (= M c - d, d the FFMA-exact
    rounding residual), the sums are S = sum 2^(x c - M2) = 2^d sum e^((x - M) / T):
    lse = M / T + ln S - d ln2 keeps lse exact to fp32 even when |logits| ~ 1e4 (the residual
    would otherwise shift every term). In the entropy d cancels: H = ln S - ln2 SX / S; in
    sum p^2 = S2 / S^2 too (S2 carries 2^(2d))."""
    big_m = tl.max(m, 0)
    big_m2 = tl.max(m2, 0)
    big_m2 = tl.where(big_m2 == float("-inf"), 0.0, big_m2)
    a = fast_exp2(m2 - big_m2, USE_PTX)  # 0 for a thread that saw no finite logit
    big_s = tl.sum(s * a, 0)
    log_s = tl.log(big_s)
    d = tl.fma(big_m, c, -big_m2)
    lse = big_m * inv_temp + (log_s - d * LN2)
    ent = log_s
    if HAS_ENTROPY:
        big_sx = tl.sum(a * (sx + tl.where(s > 0, s * (m2 - big_m2), 0.0)), 0)
        ent = log_s - LN2 * big_sx / big_s
    sp2 = log_s
    if HAS_SP2:
        sp2 = tl.sum(s2 * (a * a), 0) / (big_s * big_s)
    return lse, ent, sp2


@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    logits_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr, sp2_ptr,
    # sizes
    T, V,
    # strides (elements)
    stride_lb, stride_lt, stride_lv,
    # scalars
    inv_temp, ignore_index,
    # meta
    HAS_LABELS: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_SP2: tl.constexpr, USE_PTX: tl.constexpr,
    BLOCK_V: tl.constexpr, THREADS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b * stride_lb + t * stride_lt
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
    else:
        valid = V >= 0  # every row counts (a tensor, like the labelled branch's)
    R: tl.constexpr = BLOCK_V // (THREADS * VEC)
    # Element (t, r * VEC + j) of a block is column r * THREADS * VEC + t * VEC + j: thread t owns
    # VEC contiguous columns (one 128-bit load of bf16) per r, a warp reads 512 contiguous bytes.
    cols = (tl.arange(0, THREADS)[:, None, None] * VEC + tl.arange(0, R)[None, :, None] * (THREADS * VEC)
            + tl.arange(0, VEC)[None, None, :])
    c = inv_temp * LOG2E
    m = tl.full([THREADS], float("-inf"), tl.float32)
    m2 = tl.full([THREADS], float("-inf"), tl.float32)
    s = tl.zeros([THREADS], dtype=tl.float32)
    sx = tl.zeros([THREADS], dtype=tl.float32)
    s2 = tl.zeros([THREADS], dtype=tl.float32)
    # Full blocks without a mask; an ignored row runs none of them (the bound is 0) and loads
    # nothing in the tail, so padding costs neither bandwidth nor issue slots.
    n_full = V // BLOCK_V
    # The pointers step by one block (int64) instead of being recomputed from the trip index:
    # an index used in int64 addressing is widened by LLVM to a 64-bit loop counter (5 ops a trip,
    # not 2).
    ptrs = row_ptr + cols.to(tl.int64) * stride_lv
    step = tl.full([], BLOCK_V, tl.int64) * stride_lv
    for _ in range(0, tl.where(valid, n_full, 0)):
        x = load_f32(tl.load(ptrs), USE_PTX)
        m, m2, s, sx, s2 = online_lse_block(x, m, m2, s, sx, s2, c, HAS_ENTROPY, HAS_SP2, USE_PTX)
        ptrs += step
    offs = n_full * BLOCK_V + cols
    x = tl.load(row_ptr + offs.to(tl.int64) * stride_lv, mask=offs < tl.where(valid, V, 0), other=float("-inf"))
    m, m2, s, sx, s2 = online_lse_block(load_f32(x, USE_PTX), m, m2, s, sx, s2, c, HAS_ENTROPY, HAS_SP2, USE_PTX)
    lse, ent, sp2 = finish_lse(m, m2, s, sx, s2, c, inv_temp, HAS_ENTROPY, HAS_SP2, USE_PTX)
    if HAS_LABELS:
        in_range = valid & (label >= 0) & (label < V)
        x_lab = tl.load(row_ptr + label * stride_lv, mask=in_range, other=0.0).to(tl.float32) * inv_temp
        tl.store(logp_ptr + row, tl.where(valid, x_lab - lse, 0.0))
        lse = tl.where(valid, lse, 0.0)
        ent = tl.where(valid, ent, 0.0)
        sp2 = tl.where(valid, sp2, 0.0)
    tl.store(lse_ptr + row, lse)
    if HAS_ENTROPY:
        tl.store(ent_ptr + row, ent)
    if HAS_SP2:
        tl.store(sp2_ptr + row, sp2)


@triton.jit
def row_grad(x, c, k, a, bb, cc, USE_PTX: tl.constexpr, HAS_DENT: tl.constexpr, HAS_DSP2: tl.constexpr):
    """``p (A + B y + C p)`` (``p A`` without entropy and sum_p2) for raw fp32 logits ``x``; ``y = x c - K``."""
    y = tl.fma(x, c, -k)
    p = fast_exp2(y, USE_PTX)
    if HAS_DENT:
        t = tl.fma(tl.maximum(y, Y_MIN), bb, a)  # clamp: p = 0 at x = -inf, not 0 * inf
    else:
        t = a
    if HAS_DSP2:
        t = tl.fma(p, cc, t)
    return p * t


@triton.jit
def _logprobs_bwd_kernel(
    # pointers
    logits_ptr, labels_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, sp2_ptr, dsp2_ptr, dlogits_ptr,
    # sizes
    T, V, blocks_per_split,
    # strides (elements)
    stride_lb, stride_lt, stride_lv,
    stride_gb, stride_gt, stride_gv,
    # scalars
    inv_temp, ignore_index,
    # meta
    HAS_LABELS: tl.constexpr, HAS_DLOGP: tl.constexpr, HAS_DENT: tl.constexpr, HAS_DSP2: tl.constexpr,
    MANUAL_RTNE: tl.constexpr, USE_PTX: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Grid (rows, splits): split k writes full blocks [k * blocks_per_split, ...) of the row, the
    # last split also the masked tail. No reduction, so the split (chosen from N) changes no bit.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    is_last = split == tl.num_programs(1) - 1
    b = row // T
    t = row - b * T
    x_ptr = logits_ptr + b * stride_lb + t * stride_lt
    g_ptr = dlogits_ptr + b * stride_gb + t * stride_gt
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
    else:
        label = -1
        valid = V >= 0  # every row counts (a tensor, like the labelled branch's)
    # Per-row scalars (0 on ignored rows, whatever their upstream grads): y = x c - K is the
    # exponent of p in base 2, with K = fl(lse log2 e) and d = lse log2(e) - K (FFMA-exact), so
    # p = 2^(y - d); d is folded into A and B instead of costing an op per element.
    lse = tl.load(lse_ptr + row)
    c = inv_temp * LOG2E
    k = lse * LOG2E
    d = tl.fma(lse, LOG2E, -k)
    dls = 0.0
    if HAS_DLOGP:
        dls = tl.where(valid, tl.load(dlogp_ptr + row) * inv_temp, 0.0)
    a = -dls
    bb = 0.0
    if HAS_DENT:
        des = tl.where(valid, tl.load(dent_ptr + row) * inv_temp, 0.0)
        h = tl.load(ent_ptr + row)
        a = a - des * h
        bb = -des * LN2
        a = a - bb * d  # x - E = (y - d) ln2 + H
    cc = 0.0
    if HAS_DSP2:
        dqs = tl.where(valid, tl.load(dsp2_ptr + row) * inv_temp, 0.0)
        a = a - 2.0 * dqs * tl.load(sp2_ptr + row)
        cc = 2.0 * dqs
    scale = tl.exp2(-d)
    a = a * scale
    bb = bb * scale
    cc = cc * (scale * scale)  # p_true^2 = (2^y)^2 2^(-2d)
    # The one-hot column: read before any store (in-place backward overwrites the logits), added
    # after the loop by the split that owns it (see below).
    has_hot = valid & (label >= 0) & (label < V)
    if HAS_DLOGP:
        x_hot = tl.load(x_ptr + label * stride_lv, mask=has_hot, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_V)
    n_full = V // BLOCK_V
    b0 = split * blocks_per_split
    n_mine = tl.maximum(tl.minimum(blocks_per_split, n_full - b0), 0)
    for i in range(0, tl.where(valid, n_mine, 0)):
        offs = (b0 + i) * BLOCK_V + cols
        x = tl.load(x_ptr + offs.to(tl.int64) * stride_lv).to(tl.float32)
        g = row_grad(x, c, k, a, bb, cc, USE_PTX, HAS_DENT, HAS_DSP2)
        if MANUAL_RTNE:
            g = to_bf16_rtne(g)
        tl.store(g_ptr + offs.to(tl.int64) * stride_gv, g.to(dlogits_ptr.dtype.element_ty))
    # Ignored rows: zeros and nothing else (no loads, no exp).
    for i in range(0, tl.where(valid, 0, n_mine)):
        offs = (b0 + i) * BLOCK_V + cols
        tl.store(g_ptr + offs.to(tl.int64) * stride_gv, tl.zeros([BLOCK_V], dlogits_ptr.dtype.element_ty))
    offs = n_full * BLOCK_V + cols
    hi = tl.where(is_last, V, 0)
    x = tl.load(x_ptr + offs.to(tl.int64) * stride_lv, mask=offs < tl.where(valid, hi, 0), other=float("-inf"))
    g = row_grad(x.to(tl.float32), c, k, a, bb, cc, USE_PTX, HAS_DENT, HAS_DSP2)
    g = tl.where(valid, g, 0.0)  # exactly 0 on ignored rows whatever their saved lse (tail only)
    if MANUAL_RTNE:
        g = to_bf16_rtne(g)
    tl.store(g_ptr + offs.to(tl.int64) * stride_gv, g.to(dlogits_ptr.dtype.element_ty), mask=offs < hi)
    if HAS_DLOGP:
        # One-hot fix-up: the label's element was written as p (A + B y) above; overwrite it with
        # that value + dlogp / T, recomputed from the saved logit in the same FFMA / EX2 order.
        # The barrier orders it after the loop's store of the same address by another thread
        # (bar.sync makes the block's earlier global writes visible: the later store wins).
        lo_hot = tl.minimum(b0, n_full) * BLOCK_V
        hi_hot = tl.where(is_last, V, (b0 + n_mine) * BLOCK_V)
        mine = has_hot & (label >= lo_hot) & (label < hi_hot)
        g_hot = row_grad(x_hot + tl.zeros([1], tl.float32), c, k, a, bb, cc, USE_PTX, HAS_DENT, HAS_DSP2) + dls
        if MANUAL_RTNE:
            g_hot = to_bf16_rtne(g_hot)
        tl.debug_barrier()
        hot_ptr = g_ptr + label * stride_gv + tl.zeros([1], tl.int64)
        tl.store(hot_ptr, g_hot.to(dlogits_ptr.dtype.element_ty), mask=mine & (tl.zeros([1], tl.int32) == 0))


def launch_config(V: int) -> Tuple[int, int]:
    cap = INTERPRET_BLOCK_V if interpreted() else MAX_BLOCK_V
    block_v = min(cap, max(triton.next_power_of_2(V), 32 * 4 * VEC))
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def use_ptx(x: torch.Tensor) -> bool:
    """Inline PTX (the ftz exp2) only where it is compiled for an NVIDIA GPU."""
    return not interpreted() and torch.version.hip is None


def logprobs_forward(
    x3: torch.Tensor,
    labels: Optional[torch.Tensor],
    inv_temp: float,
    ignore_index: int,
    logp: Optional[torch.Tensor],
    ent: Optional[torch.Tensor],
    lse: torch.Tensor,
    sp2: Optional[torch.Tensor] = None,
) -> None:
    """Row forward (see ``fastrlhf._rows``): fills ``logp [N]`` (when labels are given),
    ``ent [N]`` and ``sp2 [N]`` (sum p^2; when given) and ``lse [N]``, fp32 buffers allocated by the caller.

    One program per row, never split across programs: the per-row reduction order then depends
    only on V, so a row's bits do not depend on the batch size or its position in it."""
    B, T, V = x3.shape
    N = B * T
    want_entropy = ent is not None
    if N == 0:
        return
    block_v, num_warps = launch_config(V)
    _logprobs_fwd_kernel[(N,)](
        x3, labels if labels is not None else lse, logp if logp is not None else lse,
        ent if ent is not None else lse, lse, sp2 if sp2 is not None else lse,
        T, V,
        *x3.stride(),
        inv_temp, ignore_index,
        HAS_LABELS=labels is not None, HAS_ENTROPY=want_entropy, HAS_SP2=sp2 is not None, USE_PTX=use_ptx(x3),
        BLOCK_V=block_v, THREADS=32 * num_warps, num_warps=num_warps,
    )


def grad_splits(N: int, V: int, block_v: int, device: torch.device) -> int:
    """Programs per row of the gradient pass: 1 unless N rows alone leave SMs idle (fused-linear
    chunks of a few hundred rows), then enough to give every SM ``GRAD_PROGRAMS_PER_SM``."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(GRAD_PROGRAMS_PER_SM * sms, N)
    return max(1, min(want, V // block_v))


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
    sp2: Optional[torch.Tensor] = None,
    dsp2: Optional[torch.Tensor] = None,
) -> None:
    """Row backward (see ``fastrlhf._rows``): writes the logits' gradient into ``out3`` (may alias ``x3``)."""
    B, T, V = x3.shape
    N = B * T
    if N == 0:
        return
    if dent is not None and ent is None:
        raise ValueError("an entropy gradient needs the saved entropy")
    if dsp2 is not None and sp2 is None:
        raise ValueError("a sum_p2 gradient needs the saved sum_p2")
    block_v, num_warps = launch_config(V)
    splits = grad_splits(N, V, block_v, x3.device)
    blocks_per_split = triton.cdiv(V // block_v, splits)
    if blocks_per_split:
        splits = triton.cdiv(V // block_v, blocks_per_split)  # no split without a full block
    _logprobs_bwd_kernel[(N, splits)](
        x3, labels if labels is not None else lse, lse, ent if ent is not None else lse,
        dlogp if dlogp is not None else lse, dent if dent is not None else lse,
        sp2 if sp2 is not None else lse, dsp2 if dsp2 is not None else lse, out3,
        T, V, blocks_per_split,
        *x3.stride(),
        *out3.stride(),
        inv_temp, ignore_index,
        HAS_LABELS=labels is not None, HAS_DLOGP=dlogp is not None, HAS_DENT=dent is not None,
        HAS_DSP2=dsp2 is not None, MANUAL_RTNE=interpreted() and out3.dtype == torch.bfloat16, USE_PTX=use_ptx(x3),
        BLOCK_V=block_v, num_warps=num_warps,
    )
