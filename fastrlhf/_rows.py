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


def torch_row_forward(
    x3: torch.Tensor,
    labels: Optional[torch.Tensor],
    inv_temp: float,
    ignore_index: int,
    want_entropy: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    B, T, V = x3.shape
    N = B * T
    dt = out_dtype(x3)
    lse = torch.empty(N, dtype=dt, device=x3.device)  # [N]
    logp = torch.empty(N, dtype=dt, device=x3.device) if labels is not None else None
    ent = torch.empty(N, dtype=dt, device=x3.device) if want_entropy else None
    for n0, n1, xv in _row_chunks(x3, _rows_per_chunk(V)):
        x = xv.to(dt) * inv_temp  # [n, V] fp32 chunk: the only V-sized temporary
        row_lse = torch.logsumexp(x, dim=-1)  # [n]
        lse[n0:n1] = row_lse
        if labels is not None:
            lab = labels[n0:n1].long()
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab))
            tgt = x.gather(1, safe.unsqueeze(1)).squeeze(1)
            logp[n0:n1] = torch.where(valid, tgt - row_lse, torch.zeros_like(tgt))
        if want_entropy:
            p = torch.exp(x - row_lse.unsqueeze(1))  # [n, V]
            # H = -sum(p * log p) with log p = x - lse: lse - sum(p * x) would cancel two numbers of
            # size |x| and lose ~|x| ulp_32(|x|) (4.8 at |x| = 1e4, where H = 2.6).
            # p == 0 (x = -inf) contributes 0, not 0 * -inf; a NaN p (NaN logits) must stay NaN.
            plogp = torch.where(p == 0, torch.zeros_like(p), p * (x - row_lse.unsqueeze(1)))
            h = -plogp.sum(-1)
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
        x = xv.to(dt) * inv_temp  # [n, V]
        row_lse = lse[n0:n1].to(dt).unsqueeze(1)
        p = torch.exp(x - row_lse)  # [n, V]
        g = torch.zeros_like(p)
        if dent is not None:
            e = (row_lse - ent[n0:n1].to(dt).unsqueeze(1))  # E = sum(p * x)
            g -= dent[n0:n1].to(dt).unsqueeze(1) * torch.where(p > 0, p * (x - e), torch.zeros_like(p))
        if labels is not None:
            lab = labels[n0:n1].long()
            valid = lab != ignore_index
            if dlogp is not None:
                d = torch.where(valid, dlogp[n0:n1].to(dt), torch.zeros((), dtype=dt, device=x.device))
                g -= d.unsqueeze(1) * p
                hit = valid & (lab >= 0) & (lab < V)  # a label outside this (vocab shard's) row: no one-hot
                safe = torch.where(hit, lab, torch.zeros_like(lab))
                g.scatter_add_(1, safe.unsqueeze(1), torch.where(hit, d, torch.zeros_like(d)).unsqueeze(1))
            g = torch.where(valid.unsqueeze(1), g, torch.zeros((), dtype=dt, device=x.device))
        g *= inv_temp
        ov.copy_(g)  # safe when ov aliases xv: x was read into the fp32 copy above


def row_forward(backend: str, x3, labels, inv_temp, ignore_index, want_entropy):
    if backend == "triton":
        from .kernels.logprobs import logprobs_forward as fwd
    elif backend == "native":
        from ._native import row_forward as fwd
    else:
        fwd = torch_row_forward
    return fwd(x3, labels, inv_temp, ignore_index, want_entropy)


def row_backward(backend: str, x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3) -> None:
    if backend == "triton":
        from .kernels.logprobs import logprobs_backward as bwd
    elif backend == "native":
        from ._native import row_backward as bwd
    else:
        bwd = torch_row_backward
    bwd(x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3)
