"""The chunked torch implementation of the row primitives of :mod:`fastrlhf._rows` (any device,
fp64 included; the fallback when neither Triton nor the native extension applies).

Batch invariance: a row's bits depend only on its own values and V. Elementwise ops are exact per
element; the per-row sums go through :func:`row_sums`, which never lets torch split one row's
reduction across threads (torch does that when the output has a single element: a one-row chunk
would otherwise sum in another order than the same row inside a larger chunk).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch


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


def row_sums(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(-1)`` of a ``[n, V]`` tensor with one reduction order per row whatever ``n``.

    With n >= 2 rows torch parallelises over rows and reduces each row serially; with one output it
    splits that row over threads (a different order: measured 13 of 17 rows off by an ulp at
    V = 151936 on 2 threads). A one-row chunk is reduced as two (stride-0) rows instead."""
    if t.shape[0] == 1:
        return t.expand(2, t.shape[1]).sum(-1)[:1]  # [1]
    return t.sum(-1)  # [n]


# Default budget for one chunk's fp32 temporaries; fastrlhf._rows passes its TORCH_CHUNK_BYTES.
CHUNK_BYTES = 16 * 2**20


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


def _rows_per_chunk(V: int, chunk_bytes: Optional[int]) -> int:
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * V))


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
    sp2_out: Optional[torch.Tensor] = None,
    chunk_bytes: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    B, T, V = x3.shape
    dt = out_dtype(x3)
    logp, ent, lse = alloc_row_outputs(x3, labels is not None, want_entropy)
    for n0, n1, xv in _row_chunks(x3, _rows_per_chunk(V, chunk_bytes)):
        x, private = _scaled_rows(xv, dt, inv_temp)  # [n, V]
        valid = None
        if labels is not None:
            lab = labels[n0:n1].long()
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab))
            tgt = x.gather(1, safe.unsqueeze(1)).squeeze(1)  # [n], read before x is reused
        m = x.amax(-1, keepdim=True)  # [n, 1]; NaN rows stay NaN
        m = m.masked_fill(m == float("-inf"), 0.0)  # a row of -inf: lse = -inf, as torch.logsumexp
        xm = x.sub_(m) if private else x - m  # [n, V] x - max: the chunk's one or two buffers
        e = torch.exp(xm)  # [n, V]
        sum_e = row_sums(e)  # [n]
        log_s = torch.log(sum_e)
        row_lse = m.squeeze(1) + log_s
        lse[n0:n1] = row_lse
        if labels is not None:
            logp[n0:n1] = torch.where(valid, tgt - row_lse, torch.zeros_like(tgt))
        if sp2_out is not None:
            # sum p^2 = sum e^2 / s^2 with e = exp(x - m): the max cancels.
            q = row_sums(e * e) / (sum_e * sum_e)
            sp2_out[n0:n1] = q if valid is None else torch.where(valid, q, torch.zeros_like(q))
        if want_entropy:
            # H = log s - sum(e * (x - m)) / s: terms relative to the row max, so no cancellation of
            # lse against sum(p * x) at large |x|. e * (x - m) is 0 * -inf at x = -inf: zeroed.
            e.mul_(xm).masked_fill_(xm == float("-inf"), 0.0)
            h = log_s - row_sums(e) / sum_e
            if valid is not None:
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
    sp2: Optional[torch.Tensor] = None,
    dsp2: Optional[torch.Tensor] = None,
    chunk_bytes: Optional[int] = None,
) -> None:
    B, T, V = x3.shape
    dt = out_dtype(x3)
    for n0, n1, xv in _row_chunks(x3, _rows_per_chunk(V, chunk_bytes)):
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
        q = None
        if dsp2 is not None:
            # d sum_p2 / dx_j = 2 p_j (p_j - sum_p2): formed while g still holds p
            q = (g - sp2[n0:n1].to(dt).unsqueeze(1)).mul_(g).mul_(2.0 * dsp2[n0:n1].to(dt).unsqueeze(1))
        if dent is not None:
            # dent * p * (x - E), with x - E = log p + H; p = 0 (x = -inf) gives 0, not 0 * -inf.
            term = logp_v.add_(ent[n0:n1].to(dt).unsqueeze(1)).mul_(g).masked_fill_(g == 0, 0.0)
            term.mul_(dent[n0:n1].to(dt).unsqueeze(1))
            g.mul_(d).add_(term).neg_()  # -(dlogp * p + dent * p * (x - E))
        else:
            g.mul_(d).neg_()
        if q is not None:
            g.add_(q)
        if labels is not None:
            hit = valid & (lab >= 0) & (lab < V)  # a label outside this (vocab shard's) row: no one-hot
            safe = torch.where(hit, lab, torch.zeros_like(lab))
            g.scatter_add_(1, safe.unsqueeze(1), torch.where(hit.unsqueeze(1), d, torch.zeros_like(d)))
            g.masked_fill_(~valid.unsqueeze(1), 0.0)  # exactly 0, also where logits are NaN
        if inv_temp != 1.0:
            g.mul_(inv_temp)
        ov.copy_(g)  # safe when ov aliases xv: every read of xv happened above
