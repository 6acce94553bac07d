"""The chunked passes behind the fused-linear ops (see ``fastrlhf/linear.py`` for the math).

Logits ``hidden @ weight.T + bias`` exist one ``[chunk, V]`` block at a time; each block goes
through the row primitives of :mod:`fastrlhf._rows` and is freed (forward) or overwritten by
its own gradient (backward), which then feeds ``dh = g @ W``, ``dW += g^T h`` and ``db += sum(g)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch

from ._rows import first_order_only, out_dtype, row_backward, row_forward
from .support import chunk_top_k, select_rows, support_grad, support_rows

# Budget for one [chunk, V] logits block and the fp32 work of the row primitives on it,
# counted as chunk * V * (logits bytes + 4). 256 MiB on GPU gives 294 rows at Qwen2.5's
# V = 151936 in bf16 (~ Liger's heuristic N * H / V rows for 16k tokens): large enough for
# efficient GEMMs, negligible next to the 4.6 GB the full bf16 logits would take.
# 64 MiB on CPU, where GEMM efficiency saturates at far fewer rows.
CHUNK_BUDGET_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}
# Row counts rounded down to a multiple of 16 keep the GEMM M dimension tensor-core aligned.
CHUNK_ALIGN = 16


def default_chunk_size(n_rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device | str) -> int:
    """Rows per logits block: the largest ``c`` with ``c * V * (itemsize + 4) <= budget``.

    The budget is ``CHUNK_BUDGET_BYTES`` (256 MiB on CUDA, 64 MiB elsewhere); the result is a
    multiple of 16 when at least 16, at least 1, and at most ``n_rows``. Examples: V = 65536
    fp32 on CPU -> 128 rows; V = 151936 bf16 on CUDA -> 288 rows.
    """
    device = torch.device(device)
    budget = CHUNK_BUDGET_BYTES.get(device.type, CHUNK_BUDGET_BYTES["cpu"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, budget // (vocab_size * (itemsize + 4)))
    if rows >= CHUNK_ALIGN:
        rows -= rows % CHUNK_ALIGN
    return max(1, min(rows, n_rows))


# ----------------------------------------------------------------------------------------
# Chunk helpers
# ----------------------------------------------------------------------------------------


def _chunk_bounds(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, n, chunk):
        yield r0, min(r0 + chunk, n)


def _take(t: Optional[torch.Tensor], rows: Optional[torch.Tensor], r0: int, r1: int) -> Optional[torch.Tensor]:
    """Rows ``r0..r1`` of the kept rows: a slice when every row is kept, else a gather."""
    if t is None:
        return None
    return t[r0:r1] if rows is None else t.index_select(0, rows[r0:r1])


def _put(dst: torch.Tensor, rows: Optional[torch.Tensor], r0: int, r1: int, src: torch.Tensor) -> None:
    if rows is None:
        dst[r0:r1] = src
    else:
        dst.index_copy_(0, rows[r0:r1], src.to(dst.dtype))


LOW_PRECISION = (torch.bfloat16, torch.float16)

# Does this device's torch.mm take out_dtype=torch.float32 for bf16/fp16 inputs (an fp32-accumulating
# GEMM whose result is never rounded to the input dtype)? CUDA: yes in recent torch; CPU (torch 2.13):
# no ("Could not run 'aten::mm.dtype' with arguments from the 'CPU' backend"). Probed once per device type.
_OUT_DTYPE_MM: dict = {}


def _has_out_dtype_mm(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _OUT_DTYPE_MM:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones(1, 1, dtype=dtype, device=device)
                ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
        _OUT_DTYPE_MM[key] = ok
    return _OUT_DTYPE_MM[key]


def _vocab_block(n: int, V: int, H: int) -> int:
    """Vocabulary rows per upcast ``[vb, H]`` fp32 weight block: never larger than the ``[n, V]`` logits block."""
    return max(1, min(V, (n * V) // max(1, H)))


def _chunk_logits(h_c: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``h_c @ weight.T + bias`` as ``[n, V]``: the only vocabulary-sized tensor alive.

    fp32 / fp64 inputs: that dtype. bf16 / fp16 inputs: fp32 logits from an fp32-accumulating
    GEMM, never rounded to the input dtype (RL's "fp32 lm_head" precision): ``torch.mm(...,
    out_dtype=torch.float32)`` (tensor cores) where the device has it, else the hidden chunk and
    one ``[vb, H]`` block of the weight at a time upcast to fp32 (exact products, fp32 sums; on
    CPUs without bf16 GEMM units this is also the fast route).
    """
    if weight.dtype not in LOW_PRECISION:
        if bias is None:
            return h_c @ weight.T  # [n, V]
        return torch.addmm(bias, h_c, weight.T)  # [n, V]
    n, H = h_c.shape
    V = weight.shape[0]
    if _has_out_dtype_mm(h_c.device, weight.dtype):
        x = torch.mm(h_c, weight.T, out_dtype=torch.float32)  # [n, V] fp32
    else:
        x = torch.empty(n, V, dtype=torch.float32, device=h_c.device)  # [n, V] fp32
        hf = h_c.float()  # [n, H]
        vb = _vocab_block(n, V, H)
        for v0 in range(0, V, vb):
            x[:, v0 : v0 + vb] = hf @ weight[v0 : v0 + vb].float().T  # [n, vb]
    if bias is not None:
        x += bias.float()
    return x


def _grad_matmuls(g: torch.Tensor, h_c: torch.Tensor, weight: torch.Tensor, want_dh: bool, dW, db):
    """``(dh_c [n, H] fp32 or None)`` and ``dW += g^T h_c``, ``db += sum(g)`` for an fp32 logits gradient
    ``g [n, V]`` of bf16/fp16 parameters (the ``_chunk_logits`` fp32 route).

    With ``out_dtype`` GEMMs: ``g`` rounded once to the parameters' dtype (the precision of the
    logits path's gradient), then fp32-accumulating bf16 GEMMs. Otherwise: ``g`` stays fp32 and the
    weight is upcast one ``[vb, H]`` block at a time (temporaries no larger than the logits block).
    """
    n, V = g.shape
    H = h_c.shape[1]
    if db is not None:
        db += g.sum(0, dtype=torch.float32).to(db.dtype)
    if _has_out_dtype_mm(g.device, weight.dtype):
        gl = g.to(weight.dtype)  # [n, V] rounded once
        dh = torch.mm(gl, weight, out_dtype=torch.float32) if want_dh else None  # [n, H]
        if dW is not None:
            vb = _vocab_block(n, V, H)
            for v0 in range(0, V, vb):
                dW[v0 : v0 + vb] += torch.mm(gl[:, v0 : v0 + vb].T, h_c, out_dtype=torch.float32)  # [vb, H]
        return dh
    dh = torch.zeros(n, H, dtype=torch.float32, device=g.device) if want_dh else None  # [n, H]
    hf = h_c.float() if dW is not None else None  # [n, H]
    vb = _vocab_block(n, V, H)
    for v0 in range(0, V, vb):
        gv = g[:, v0 : v0 + vb]  # [n, vb] view
        if want_dh:
            dh.addmm_(gv, weight[v0 : v0 + vb].float())  # [n, H]
        if dW is not None:
            dW[v0 : v0 + vb] += gv.T @ hf  # [vb, H] fp32
    return dh


def _accumulate_param_grads(
    dW: Optional[torch.Tensor], db: Optional[torch.Tensor], g: torch.Tensor, h_c: torch.Tensor
) -> None:
    """``dW += g^T h_c`` and ``db += sum_rows(g)`` with ``g [n, V]``, ``h_c [n, H]``.

    Same dtype: one in-place GEMM. Otherwise (bf16 model, fp32 accumulator) the product is
    formed in the model dtype (the GEMM itself accumulates in fp32 on GPUs) one vocabulary
    block at a time, so the ``[vb, H]`` temporary is never larger than the logits block, and
    added to the wide accumulator.
    """
    if dW is not None and dW.dtype == g.dtype:
        dW.addmm_(g.T, h_c)  # [V, H]
        dW = None
    if db is not None and db.dtype == g.dtype:
        db += g.sum(0)  # [V]
        db = None
    if dW is None and db is None:
        return
    n, V = g.shape
    vb = max(1, min(V, (n * V) // max(1, h_c.shape[1])))
    for v0 in range(0, V, vb):
        gv = g[:, v0 : v0 + vb]  # [n, vb] view
        if dW is not None:
            dW[v0 : v0 + vb] += torch.mm(gv.T, h_c)  # [vb, H] in the model dtype
        if db is not None:
            db[v0 : v0 + vb] += gv.sum(0, dtype=db.dtype)


# ----------------------------------------------------------------------------------------
# The two chunked passes shared by both autograd functions
# ----------------------------------------------------------------------------------------


def _kept_rows(labels: torch.Tensor, ignore_index: int) -> tuple[int, Optional[torch.Tensor]]:
    """``(n_keep, rows)``: rows whose label is not ``ignore_index`` (``rows`` None when all are).

    Ignored rows are 0 with zero gradient by definition, so only the others are computed (the
    count is a host sync, already paid by the label range check).
    """
    valid = labels != ignore_index  # [N]
    n_keep = int(valid.sum())
    rows = None if n_keep == labels.numel() else valid.nonzero().squeeze(1)  # [n_keep] int64
    return n_keep, rows


def _grad_buffers(hidden, weight, bias, rows, need, accum_dtype):
    """Zeroed ``dh [N, H]`` (uninitialised when every row is written), ``dW [V, H]``, ``db [V]`` accumulators."""
    need_h, need_w, need_b = need
    alloc = torch.empty if rows is None else torch.zeros  # skipped rows keep an exact zero
    dh = alloc(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None  # [N, H]
    dW = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device) if need_w else None  # [V, H]
    db = torch.zeros(weight.shape[:1], dtype=accum_dtype, device=weight.device) if need_b else None  # [V]
    return dh, dW, db


def _chunk_param_grads(g, h_c, weight, rows, r0, r1, dh, dW, db) -> None:
    """Given the chunk's logits gradient ``g [n, V]``: ``dh_c = g @ W``, ``dW += g^T h_c``, ``db += sum(g)``."""
    if g.dtype != weight.dtype:  # fp32 gradient of the fp32 logits of a bf16/fp16 model
        d = _grad_matmuls(g, h_c, weight, dh is not None, dW, db)
        if d is not None:
            if rows is None:
                dh[r0:r1] = d
            else:
                dh.index_copy_(0, rows[r0:r1], d.to(dh.dtype))
        return
    if dh is not None:
        if rows is None:
            torch.mm(g, weight, out=dh[r0:r1])  # [n, H]
        else:
            dh.index_copy_(0, rows[r0:r1], g @ weight)
    if dW is not None or db is not None:
        _accumulate_param_grads(dW, db, g, h_c)


def _finish_param_grads(dW, db, weight, bias):
    if dW is not None and dW.dtype != weight.dtype:
        dW = dW.to(weight.dtype)
    if db is not None and db.dtype != bias.dtype:
        db = db.to(bias.dtype)
    return dW, db


# ----------------------------------------------------------------------------------------
# Autograd functions
# ----------------------------------------------------------------------------------------


# Batch invariance of the logits block: CPU GEMMs pick their kernel by M, and with M < 12 rows a row's
# logits differ in the last bit from the same row inside a larger GEMM (measured with torch 2.13's CPU
# BLAS for M in {1, 2, 3, 5, 6, 7, 9, 10, 11}; M = 4, 8 and >= 12 agree with M = 64..160). A chunk of
# fewer rows is padded with zero rows to INVARIANT_GEMM_ROWS, so every row goes through the same kernel
# whatever the chunk size or batch (an empirical property of the BLAS, tested by
# tests/test_batch_invariance.py; GPU GEMMs choose tiles by shape too: see the README).
INVARIANT_GEMM_ROWS = 16


def _padded_rows(h_c: torch.Tensor) -> torch.Tensor:
    n = h_c.shape[0]
    if n >= INVARIANT_GEMM_ROWS:
        return h_c
    pad = h_c.new_zeros(INVARIANT_GEMM_ROWS - n, h_c.shape[1])  # [16 - n, H]
    return torch.cat([h_c, pad])  # [16, H]


def _chunk_csr(ids, off, r0: int, r1: int):
    """The kept sets of kept rows ``r0..r1``: ``(ids [nnz_c], off [r1 - r0 + 1])`` (views; two host reads)."""
    a, b = int(off[r0]), int(off[r1])
    return ids[a:b], off[r0:r1 + 1] - a


class LinearLogprobsEntropy(torch.autograd.Function):
    """``(logp [N], entropy [N] or None, sum_p2 [N] or None)`` from ``hidden [N, H]``, ``weight [V, H]``,
    ``bias [V]``.

    Only ``[N]`` tensors (and the indices of the kept rows) are saved; backward recomputes
    each chunk's logits. Gradients flow to ``hidden``, ``weight`` and ``bias``.
    ``support``: ``("csr", ids, off)`` (checked, :func:`fastrlhf.support.resolve_support`) or
    ``("top_k", k)``: every value over each row's kept set, from the chunk's gathered kept logits
    (:mod:`fastrlhf.support`); the chunk's gradient block is 0 outside the set. The kept sets of
    the kept rows are saved (``[nnz]``; top_k's are chosen on each forward chunk).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, want_entropy, backend, chunk,
                accum_dtype, want_sp2=False, support=None):
        N = hidden.shape[0]
        odt = out_dtype(weight)
        inv_temp = 1.0 / temperature
        n_keep, rows = _kept_rows(labels, ignore_index)
        ids_k, off_k, top_parts = None, None, []
        if support is not None and support[0] == "csr":
            ids_k, off_k = select_rows(support[1], support[2], rows)  # the kept rows' sets, in kept order
        logp = torch.zeros(N, dtype=odt, device=hidden.device)  # [N]
        lse = torch.zeros(N, dtype=odt, device=hidden.device)  # [N]
        ent = torch.zeros(N, dtype=odt, device=hidden.device) if want_entropy else None  # [N]
        sp2 = torch.zeros(N, dtype=odt, device=hidden.device) if want_sp2 else None  # [N]
        with torch.autocast(hidden.device.type, enabled=False):
            for r0, r1 in _chunk_bounds(n_keep, chunk):
                x = _chunk_logits(_padded_rows(_take(hidden, rows, r0, r1)), weight, bias)[: r1 - r0]  # [n, V]
                sq = torch.empty(r1 - r0, dtype=odt, device=hidden.device) if want_sp2 else None  # [n]
                lab_c = _take(labels, rows, r0, r1)
                if support is None:
                    lp, en, ls = row_forward(backend, x.unsqueeze(0), lab_c, inv_temp, ignore_index, want_entropy, sq)
                else:
                    if support[0] == "top_k":
                        rows0 = torch.arange(r0, r1) if rows is None else rows[r0:r1]
                        ids_c, off_c = chunk_top_k(x, lab_c, support[1], inv_temp, rows0)
                        top_parts.append(ids_c)
                    else:
                        ids_c, off_c = _chunk_csr(ids_k, off_k, r0, r1)
                    lp, en, sq_c, ls = support_rows(x, lab_c, ids_c, off_c, inv_temp, ignore_index, odt)
                    if want_sp2:
                        sq.copy_(sq_c)
                del x  # free the block before the next chunk's matmul allocates another
                _put(logp, rows, r0, r1, lp)
                _put(lse, rows, r0, r1, ls)
                if want_entropy:
                    _put(ent, rows, r0, r1, en)
                if want_sp2:
                    _put(sp2, rows, r0, r1, sq)
        if support is not None and support[0] == "top_k":
            ids_k = torch.cat(top_parts) if top_parts else torch.zeros(0, dtype=torch.int64, device=hidden.device)
            off_k = torch.arange(0, n_keep + 1, device=hidden.device, dtype=torch.int64) * support[1]
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse, ent, sp2, ids_k, off_k)
        ctx.n_keep = n_keep
        ctx.inv_temp = inv_temp
        ctx.ignore_index = ignore_index
        ctx.want_entropy = want_entropy
        ctx.backend = backend
        ctx.chunk = chunk
        ctx.accum_dtype = accum_dtype
        ctx.set_materialize_grads(False)
        return logp, ent, sp2

    @staticmethod
    @first_order_only
    def backward(ctx, dlogp, dent, dsp2):
        hidden, weight, bias, labels, rows, lse, ent, sp2, ids_k, off_k = ctx.saved_tensors
        if not ctx.want_entropy:
            dent = None
        if sp2 is None:
            dsp2 = None
        none = (None,) * 9
        if dlogp is None and dent is None and dsp2 is None:
            return (None, None, None) + none
        dt = lse.dtype
        dlogp = dlogp.reshape(-1).to(dt).contiguous() if dlogp is not None else None  # [N]
        dent = dent.reshape(-1).to(dt).contiguous() if dent is not None else None  # [N]
        dsp2 = dsp2.reshape(-1).to(dt).contiguous() if dsp2 is not None else None  # [N]
        dh, dW, db = _grad_buffers(hidden, weight, bias, rows, ctx.needs_input_grad[:3], ctx.accum_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0, r1 in _chunk_bounds(ctx.n_keep, ctx.chunk):
                n = r1 - r0
                h_c = _padded_rows(_take(hidden, rows, r0, r1))  # [max(n, 16), H] (zero rows padded)
                g = _chunk_logits(h_c, weight, bias)  # [., V] recomputed, then overwritten by its gradient
                g3 = g[:n].unsqueeze(0)  # [1, n, V]
                saved = [_take(t, rows, r0, r1) for t in (labels, lse, ent, dlogp, dent, sp2, dsp2)]
                if ids_k is None:
                    lab_c, lse_c, ent_c, dlogp_c, dent_c, sp2_c, dsp2_c = saved
                    row_backward(ctx.backend, g3, lab_c, lse_c, ent_c, dlogp_c, dent_c, ctx.inv_temp,
                                 ctx.ignore_index, g3, sp2_c, dsp2_c)
                else:  # the kept logits' gradient, then the block is 0 except on the kept sets
                    ids_c, off_c = _chunk_csr(ids_k, off_k, r0, r1)
                    row_of = torch.repeat_interleave(torch.arange(n, device=g.device), off_c[1:] - off_c[:-1])
                    z = g[row_of, ids_c].to(dt) * ctx.inv_temp  # [nnz]
                    lab_c, lse_c, ent_c, dlogp_c, dent_c, sp2_c, dsp2_c = saved
                    gs = support_grad(z, ids_c, row_of, lab_c.long(), lse_c, ent_c, sp2_c, dlogp_c, dent_c, dsp2_c,
                                      ctx.inv_temp, ctx.ignore_index)
                    g.zero_()
                    g[row_of, ids_c] = gs.to(g.dtype)
                if g.shape[0] == n:
                    _chunk_param_grads(g, h_c, weight, rows, r0, r1, dh, dW, db)
                else:  # padded rows: zero gradient, their dh rows dropped
                    g[n:].zero_()
                    dh_c = None if dh is None else dh.new_empty(g.shape[0], dh.shape[1])  # [16, H]
                    _chunk_param_grads(g, h_c, weight, None, 0, g.shape[0], dh_c, dW, db)
                    if dh_c is not None:
                        _put(dh, rows, r0, r1, dh_c[:n])
                del g
        dW, db = _finish_param_grads(dW, db, weight, bias)
        return (dh, dW, db) + none


class LinearTokenSeparableLoss(torch.autograd.Function):
    """A loss ``sum_n f_n(logp_n, ent_n)`` whose per-token upstream gradients are known in forward.

    PPO / GRPO are such losses: every ``loss_agg`` mode is ``sum_n w_n * per_token_n`` with
    weights ``w`` fixed by the mask. So each chunk's logits gradient is formed right after its
    forward (Liger Kernel's fused linear cross-entropy does the same), which saves the logits
    recomputation of :class:`LinearLogprobsEntropy` (one of four ``N x V x H`` matmuls).
    The gradients are computed whenever this runs and held until backward (``dh [N, H]``,
    ``dW [V, H]``), then scaled by the upstream gradient of the loss (in fp32).

    ``token_grads(sel, put, logp_c, ent_c) -> (loss_c, dlogp_c, dent_c or None)`` gives the chunk's
    share of the loss and its upstream gradients; ``sel(t)`` picks the chunk's rows of any ``[N]``
    tensor and ``put(dst, src)`` writes the chunk's values into one. Returns ``(loss, logp, ent)``
    (``logp`` / ``ent`` ``[N]`` carry no gradient; ``ent`` is empty unless wanted).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_grads, temperature, ignore_index, want_entropy, backend,
                chunk, accum_dtype):
        N = hidden.shape[0]
        odt = out_dtype(weight)
        inv_temp = 1.0 / temperature
        n_keep, rows = _kept_rows(labels, ignore_index)
        logp = torch.zeros(N, dtype=odt, device=hidden.device)  # [N]
        ent = torch.zeros(N if want_entropy else 0, dtype=odt, device=hidden.device)  # [N]
        loss = torch.zeros((), dtype=odt, device=hidden.device)
        dh, dW, db = _grad_buffers(hidden, weight, bias, rows, ctx.needs_input_grad[:3], accum_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0, r1 in _chunk_bounds(n_keep, chunk):
                h_c = _take(hidden, rows, r0, r1)  # [n, H]
                lab_c = _take(labels, rows, r0, r1)
                # [n, V] logits (the GEMM padded as in LinearLogprobsEntropy: the same bits), then their gradient
                g = _chunk_logits(_padded_rows(h_c), weight, bias)[: r1 - r0]
                g3 = g.unsqueeze(0)  # [1, n, V]
                lp, en, ls = row_forward(backend, g3, lab_c, inv_temp, ignore_index, want_entropy)
                _put(logp, rows, r0, r1, lp)
                if want_entropy:
                    _put(ent, rows, r0, r1, en)
                loss_c, dlogp_c, dent_c = token_grads(
                    lambda t, r0=r0, r1=r1: _take(t, rows, r0, r1),
                    lambda dst, src, r0=r0, r1=r1: _put(dst, rows, r0, r1, src), lp, en,
                )
                loss += loss_c
                row_backward(backend, g3, lab_c, ls, en, dlogp_c, dent_c, inv_temp, ignore_index, g3)
                _chunk_param_grads(g, h_c, weight, rows, r0, r1, dh, dW, db)
                del g
        ctx.save_for_backward(dh, dW, db)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp, ent)
        ctx.set_materialize_grads(False)
        return loss, logp, ent

    @staticmethod
    @first_order_only
    def backward(ctx, dloss, _dlogp, _dent):
        dh, dW, db = ctx.saved_tensors
        none = (None,) * 8
        if dloss is None:
            return (None, None, None) + none
        w_dtype, b_dtype = ctx.param_dtypes
        if bool(dloss == 1):  # loss.backward(): hand the buffers over (no [V, H] copy; cast only if needed)
            return (dh, None if dW is None else dW.to(w_dtype), None if db is None else db.to(b_dtype)) + none
        # d(c * loss) = c * d(loss), scaled in fp32 (an fp16 upstream 65536 would be inf) and rounded
        # once into the parameters' dtype; out of place, so a retained graph keeps the unscaled values.
        scale = dloss.float()
        dh = None if dh is None else (dh.float() * scale).to(dh.dtype)
        dW = None if dW is None else (dW.float() * scale).to(w_dtype)
        db = None if db is None else (db.float() * scale).to(b_dtype)
        return (dh, dW, db) + none
