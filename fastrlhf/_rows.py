"""The two row primitives every backend implements, and the chunked torch implementation.

Logits are handled as a ``[B, T, V]`` view with arbitrary strides (2-D ``[N, V]`` is
``[1, N, V]``), so slices such as ``logits[:, :-1]`` are read in place, never copied.

``row_forward(x3, labels, inv_temp, ignore_index, want_entropy) -> (logp, ent, lse)``
    Per row ``n`` with ``x = logits[n] * inv_temp``: ``lse = logsumexp(x)``,
    ``logp = x[label] - lse`` and ``ent = lse - sum(softmax(x) * x)``; ``logp = ent = 0`` on
    rows whose label is ``ignore_index``. ``labels=None``: every row counts, ``logp`` is None.
    All outputs ``[N]`` fp32 (fp64 for fp64 logits); ``ent`` is None unless ``want_entropy``.

``row_backward(x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3)``
    Writes ``d/dlogits`` of ``sum(dlogp * logp + dent * ent)`` into ``out3`` ([B, T, V], may
    alias ``x3`` for in-place backward):
    ``inv_temp * (dlogp * (onehot(label) - p) - dent * p * (x - E))`` with ``p = exp(x - lse)``
    and ``E = lse - ent = sum(p * x)``; exactly 0 on ignored rows. ``dlogp``/``dent`` may be None.
    A label outside ``[0, V)`` that is not ``ignore_index`` counts but adds no one-hot term (the
    label lives on another vocab shard, ``fastrlhf.distributed``); the public ops reject such
    labels before any backend sees them, and the native backend rejects them itself.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

# Budget for one chunk's fp32 temporaries in the torch path (a few [rows, V] buffers live
# at once): 16 MiB keeps the peak far below the [N, V] fp32 log-softmax it replaces.
TORCH_CHUNK_BYTES = 16 * 2**20


def as_rows3d(x: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> a ``[B, T, V]`` view (no copy for 2-D/3-D inputs)."""
    if x.dim() == 2:
        return x.unsqueeze(0)  # [1, N, V]
    if x.dim() == 3:
        return x
    return x.flatten(0, -3)  # [B, T, V]; copies only if leading dims cannot be merged


def out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def alloc_row_outputs(x3: torch.Tensor, has_labels: bool, want_entropy: bool):
    """``(logp | None, ent | None, lse)``: the ``[N]`` outputs of a row forward, in ``out_dtype``."""
    N = x3.shape[0] * x3.shape[1]
    dt = out_dtype(x3)
    lse = torch.empty(N, dtype=dt, device=x3.device)  # [N]
    logp = torch.empty(N, dtype=dt, device=x3.device) if has_labels else None  # [N]
    ent = torch.empty(N, dtype=dt, device=x3.device) if want_entropy else None  # [N]
    return logp, ent, lse


def _row_chunks(x3: torch.Tensor, rows: int) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Yield ``(n0, n1, view)`` with ``view`` a ``[n1 - n0, V]`` view of rows ``n0..n1``."""
    B, T, V = x3.shape
    try:
        x2 = x3.view(B * T, V)  # [N, V]
    except RuntimeError:
        x2 = None
    if x2 is not None:
        for n0 in range(0, B * T, rows):
            n1 = min(n0 + rows, B * T)
            yield n0, n1, x2[n0:n1]
        return
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(t0 + rows, T)
            yield b * T + t0, b * T + t1, x3[b, t0:t1]


def _row_view(x3: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    """Rows ``n0..n1`` of ``x3`` as a ``[n, V]`` view (they must not cross a batch row unless mergeable)."""
    B, T, V = x3.shape
    try:
        return x3.view(B * T, V)[n0:n1]
    except RuntimeError:
        b = n0 // T
        if (n1 - 1) // T != b:
            raise ValueError("row range crosses a batch row of a non-mergeable [B, T, V] view") from None
        return x3[b, n0 - b * T : n1 - b * T]


def _rows_per_chunk(V: int) -> int:
    return max(1, TORCH_CHUNK_BYTES // (4 * V))


def _scaled_rows(xv: torch.Tensor, dt: torch.dtype, inv_temp: float) -> Tuple[torch.Tensor, bool]:
    """``(x, private)``: the chunk as ``dt`` times ``inv_temp``; ``private`` when ``x`` is a fresh
    buffer this function may overwrite (not the caller's logits)."""
    x = xv.to(dt)
    private = x.data_ptr() != xv.data_ptr()
    if inv_temp != 1.0:
        x = x.mul_(inv_temp) if private else x * inv_temp
        private = True
    return x, private


def torch_row_forward(
    x3: torch.Tensor,
    labels: Optional[torch.Tensor],
    inv_temp: float,
    ignore_index: int,
    want_entropy: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    B, T, V = x3.shape
    dt = out_dtype(x3)
    logp, ent, lse = alloc_row_outputs(x3, labels is not None, want_entropy)
    for n0, n1, xv in _row_chunks(x3, _rows_per_chunk(V)):
        x, private = _scaled_rows(xv, dt, inv_temp)  # [n, V]
        if labels is not None:
            lab = labels[n0:n1].long()
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab))
            tgt = x.gather(1, safe.unsqueeze(1)).squeeze(1)  # [n], read before x is reused
        m = x.amax(-1, keepdim=True)  # [n, 1]; NaN rows stay NaN
        m = m.masked_fill(m == float("-inf"), 0.0)  # a row of -inf: lse = -inf, as torch.logsumexp
        xm = x.sub_(m) if private else x - m  # [n, V] x - max: the chunk's one or two buffers
        e = torch.exp(xm)  # [n, V]
        sum_e = e.sum(-1)  # [n]
        log_s = torch.log(sum_e)
        row_lse = m.squeeze(1) + log_s
        lse[n0:n1] = row_lse
        if labels is not None:
            logp[n0:n1] = torch.where(valid, tgt - row_lse, torch.zeros_like(tgt))
        if want_entropy:
            # H = log s - sum(e * (x - m)) / s: terms relative to the row max, so no cancellation of
            # lse against sum(p * x) at large |x|. e * (x - m) is 0 * -inf at x = -inf: zeroed.
            e.mul_(xm).masked_fill_(xm == float("-inf"), 0.0)
            h = log_s - e.sum(-1) / sum_e
            if labels is not None:
                h = torch.where(valid, h, torch.zeros_like(h))
            ent[n0:n1] = h
    return logp, ent, lse


def torch_row_backward(
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
    B, T, V = x3.shape
    dt = out_dtype(x3)
    for n0, n1, xv in _row_chunks(x3, _rows_per_chunk(V)):
        ov = _row_view(out3, n0, n1)
        x, private = _scaled_rows(xv, dt, inv_temp)  # [n, V]
        row_lse = lse[n0:n1].to(dt).unsqueeze(1)
        logp_v = x.sub_(row_lse) if private else x - row_lse  # [n, V] log p
        g = torch.exp(logp_v)  # [n, V] p, becomes the gradient in place
        d = torch.zeros(n1 - n0, 1, dtype=dt, device=x.device)  # [n, 1] dlogp, 0 on ignored rows
        if labels is not None:
            lab = labels[n0:n1].long()
            valid = lab != ignore_index
            if dlogp is not None:
                d = torch.where(valid, dlogp[n0:n1].to(dt), torch.zeros((), dtype=dt, device=x.device)).unsqueeze(1)
        if dent is not None:
            # dent * p * (x - E), with x - E = log p + H; p = 0 (x = -inf) gives 0, not 0 * -inf.
            term = logp_v.add_(ent[n0:n1].to(dt).unsqueeze(1)).mul_(g).masked_fill_(g == 0, 0.0)
            term.mul_(dent[n0:n1].to(dt).unsqueeze(1))
            g.mul_(d).add_(term).neg_()  # -(dlogp * p + dent * p * (x - E))
        else:
            g.mul_(d).neg_()
        if labels is not None:
            hit = valid & (lab >= 0) & (lab < V)  # a label outside this (vocab shard's) row: no one-hot
            safe = torch.where(hit, lab, torch.zeros_like(lab))
            g.scatter_add_(1, safe.unsqueeze(1), torch.where(hit.unsqueeze(1), d, torch.zeros_like(d)))
            g.masked_fill_(~valid.unsqueeze(1), 0.0)  # exactly 0, also where logits are NaN
        if inv_temp != 1.0:
            g.mul_(inv_temp)
        ov.copy_(g)  # safe when ov aliases xv: every read of xv happened above


def row_forward(backend: str, x3, labels, inv_temp, ignore_index, want_entropy):
    """``(logp [N] | None, ent [N] | None, lse [N])`` on ``backend`` (see the module docstring)."""
    if backend == "triton":
        from .kernels.logprobs import logprobs_forward

        logp, ent, lse = alloc_row_outputs(x3, labels is not None, want_entropy)
        logprobs_forward(x3, labels, inv_temp, ignore_index, logp, ent, lse)
        return logp, ent, lse
    if backend == "native":
        from ._native import row_forward as native_forward

        return native_forward(x3, labels, inv_temp, ignore_index, want_entropy)
    return torch_row_forward(x3, labels, inv_temp, ignore_index, want_entropy)


def row_backward(backend: str, x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3) -> None:
    """Writes the logits' gradient into ``out3`` on ``backend`` (see the module docstring)."""
    if backend == "triton":
        from .kernels.logprobs import logprobs_backward as bwd
    elif backend == "native":
        from ._native import row_backward as bwd
    else:
        bwd = torch_row_backward
    bwd(x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3)


def check_inplace(logits: torch.Tensor) -> None:
    """``inplace_backward=True`` writes the gradient through a ``[B, T, V]`` view of the logits: that view
    must alias them, and no two elements may share memory (an expanded tensor would race)."""
    if as_rows3d(logits).data_ptr() != logits.data_ptr():
        raise ValueError("inplace_backward=True needs logits whose leading dims can be merged without a copy")
    if any(st == 0 and sz > 1 for st, sz in zip(logits.stride(), logits.shape)):
        raise ValueError("inplace_backward=True needs logits with distinct memory per element (got an expanded, "
                         "stride-0 tensor)")


def finish_row_forward(ctx, logits, lab, lse, ent, logp, *, inv_temp, ignore_index, inplace_backward, backend,
                       want_logp, want_entropy):
    """Shared tail of the autograd Functions over the row primitives (full logits and vocab shards):
    save only ``[N]`` tensors and the logits for :func:`row_backward_from_ctx`; return the ``[N]`` outputs
    (the public wrappers reshape them outside the Function, so callers get ordinary tensors)."""
    ctx.save_for_backward(logits, lab, lse, ent)
    ctx.inv_temp = inv_temp
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = inplace_backward
    ctx.backend = backend
    ctx.want = (want_logp, want_entropy)
    ctx.set_materialize_grads(False)
    outs = ([logp] if want_logp else []) + ([ent] if want_entropy else [])
    return tuple(outs) if len(outs) > 1 else outs[0]


def row_backward_from_ctx(ctx, grads) -> Optional[torch.Tensor]:
    """The logits' gradient from the upstream ``(dlogp?, dentropy?)``; None when neither is used."""
    logits, lab, lse, ent = ctx.saved_tensors
    grads = list(grads)
    dlogp = grads.pop(0) if ctx.want[0] else None
    dent = grads.pop(0) if ctx.want[1] else None
    if dlogp is None and dent is None:
        return None
    dlogp = dlogp.reshape(-1).to(lse.dtype).contiguous() if dlogp is not None else None  # [N]
    dent = dent.reshape(-1).to(lse.dtype).contiguous() if dent is not None else None  # [N]
    if ctx.inplace_backward:
        dlogits = logits  # the gradient overwrites the logits' own storage
    else:
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [..., V]
    row_backward(ctx.backend, as_rows3d(logits), lab, lse, ent, dlogp, dent, ctx.inv_temp, ctx.ignore_index,
                 as_rows3d(dlogits))
    if ctx.inplace_backward and ctx.backend != "torch":
        # The kernels wrote through a raw pointer: tell autograd the logits changed, so any other
        # consumer that saved them raises its usual in-place error instead of reading gradients.
        torch.autograd.graph.increment_version(logits)
    return dlogits


class RowLogprobsEntropy(torch.autograd.Function):
    """``(logp [N]?, entropy [N]?)`` per row of ``logits``; only ``[N]`` tensors are saved.

    Backward is one gradient pass over the logits (first derivatives only: a second
    differentiation raises autograd's ``once_differentiable`` error instead of a wrong value).
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend):
        x3 = as_rows3d(logits)  # [B, T, V] view
        if inplace_backward:
            check_inplace(logits)
        lab = labels.reshape(-1).contiguous() if labels is not None else None  # [N]
        inv_temp = 1.0 / temperature
        logp, ent, lse = row_forward(backend, x3, lab, inv_temp, ignore_index, want_entropy)
        return finish_row_forward(ctx, logits, lab, lse, ent, logp, inv_temp=inv_temp, ignore_index=ignore_index,
                                  inplace_backward=inplace_backward, backend=backend, want_logp=want_logp,
                                  want_entropy=want_entropy)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        return (row_backward_from_ctx(ctx, grads),) + (None,) * 7
