"""Sampler-support logprobs: log-probabilities renormalised over the kept set of the sampler.

Rollout engines sample from the top-k / top-p kept set ``S`` of each token and report logprobs
renormalised over it (vLLM's ``processed_logprobs``); a trainer scoring the full vocabulary then
carries ``log sum_{v in S} p_v`` in every ratio (TRL #6789: mean ratio 0.896 at top_p = 0.8,
1.001 once renormalised over the replayed set). Per row ``n`` with ``x = logits[n] / T``:

    lse_S    = logsumexp_{v in S} x_v,          logp_S(y) = x_y - lse_S
    p_S(v)   = exp(x_v - lse_S) on S, 0 elsewhere
    H_S      = lse_S - sum_{v in S} p_S(v) x_v, sum_p2_S = sum_{v in S} p_S(v)^2
    d/dx_v   = (dlogp (onehot_v - p_v) - dH p_v (x_v - E_S) + 2 dQ p_v (p_v - sum_p2_S)) / T on S,
               exactly 0 outside S                                    (E_S = lse_S - H_S)

Forms of ``S`` (see :func:`resolve_support`):
    ``support=(token_ids, offsets)``: vLLM's CSR ("mask replay"): row n keeps
        ``token_ids[offsets[n]:offsets[n+1]]``; int32 / int64, ``offsets`` of length N + 1,
        non-decreasing from 0 to ``len(token_ids)``, ids in ``[0, V)`` and distinct within a row.
    ``top_k=k``: the k largest tempered logits (``x = logits * (1 / T)`` in fp32), ties resolved as
        ``torch.topk`` on them. Reads ``[N, V]`` once more (``torch.topk``).
    top-p is not offered: the nucleus is a function of the *sampler's* probabilities (its own
    precision, penalties and processors); recomputed from the trainer's logits it differs exactly
    where the two disagree, near the p threshold, so it cannot replay the sampler's set. The CSR
    set the engine returns is the exact one.

Algorithm: the kept sets are tiny (median 2, p99 ~82 tokens), so only their ``nnz`` logits are
read (one gather, no ``[N, V]`` pass in forward). Per row the values are laid out in a padded
``[n, P]`` block (P a power of two >= the row's set size) and reduced by a fixed halving tree of
elementwise adds, padding -0.0 (``a + (-0.0) == a`` for every a): a row's bits depend only on its
own set, never on the batch, its position, padding rows or chunking (no atomics, no
``index_add``). Backward writes a zeroed ``[..., V]`` gradient (the logits' dtype; with
``inplace_backward`` into the logits) and then the ``nnz`` support entries; only ``[nnz]`` and
``[N]`` tensors are saved, not the logits.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ._rows import as_rows3d, first_order_only, out_dtype

# Elements of one padded [rows, P] block of support values (fp32): bounds the temporaries.
SUPPORT_BLOCK_ELEMS = 1 << 22


def _check_csr(token_ids, offsets, N: int, V: int) -> Tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("support token_ids", token_ids), ("support offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if offsets.numel() != N + 1:
        raise ValueError(f"support offsets must have N + 1 = {N + 1} entries (N tokens), got {offsets.numel()}")
    off = offsets.long()
    if int(off[0]) != 0 or int(off[-1]) != token_ids.numel():
        raise ValueError(f"support offsets must start at 0 and end at len(token_ids) = {token_ids.numel()}, "
                         f"got {int(off[0])} .. {int(off[-1])}")
    if N and bool((off[1:] < off[:-1]).any()):
        raise ValueError("support offsets must be non-decreasing")
    ids = token_ids.long()
    if ids.numel() and bool(((ids < 0) | (ids >= V)).any()):
        bad = ids[(ids < 0) | (ids >= V)][0]
        raise ValueError(f"support token_ids contains {int(bad)}, outside [0, {V})")
    return ids, off


def check_top_k(top_k, V: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= V:
        raise ValueError(f"top_k must be an int in [1, V = {V}], got {top_k!r}")


def resolve_support(logits: torch.Tensor, labels: torch.Tensor, support, top_k, temperature: float,
                    ignore_index: int, vocab: int = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids [nnz] int64, offsets [N + 1] int64)`` from ``support=(token_ids, offsets)`` or ``top_k``,
    checked: every counted label must lie in its row's set (``ValueError`` naming the row). ``vocab``:
    the global vocabulary when ``logits`` is one rank's shard (then only ``support=``)."""
    if support is not None and top_k is not None:
        raise ValueError("pass either support=(token_ids, offsets) or top_k, not both")
    V = logits.shape[-1] if vocab is None else vocab
    if vocab is not None and top_k is not None:
        raise NotImplementedError("top_k= with a process_group (vocab-parallel logits) is not supported: pass the "
                                  "sampler's kept sets as support=(token_ids, offsets)")
    N = logits.numel() // logits.shape[-1] if logits.shape[-1] else 0
    dev = logits.device
    if top_k is not None:
        check_top_k(top_k, V)
        x = logits.reshape(N, V).to(out_dtype(logits)) * (1.0 / temperature)  # [N, V] tempered
        ids = torch.topk(x, top_k, dim=-1).indices.reshape(-1)  # [N * k]
        off = torch.arange(0, N + 1, device=dev, dtype=torch.int64) * top_k
        name = "top_k"
    else:
        if not isinstance(support, (tuple, list)) or len(support) != 2:
            raise TypeError("support must be a (token_ids, offsets) pair (vLLM's CSR kept sets)")
        ids, off = _check_csr(support[0].to(dev), support[1].to(dev), N, V)
        name = "support"
    row_of = torch.repeat_interleave(torch.arange(N, device=dev), off[1:] - off[:-1])  # [nnz]
    key = row_of * V + ids
    if key.numel() and torch.unique(key).numel() != key.numel():
        raise ValueError(f"{name}: a token id appears twice in one row's set")
    lab = labels.reshape(-1).long()
    counted = lab != ignore_index
    hits = torch.zeros(N, dtype=torch.int64, device=dev).index_add_(0, row_of, (ids == lab[row_of]).long())
    missing = counted & (hits == 0)
    if bool(missing.any()):
        n = int(missing.nonzero()[0, 0])
        raise ValueError(f"labels[{n}] = {int(lab[n])} is outside its row's {name} set (the sampler could not "
                         f"have drawn it): check that the kept sets are aligned with the labels")
    return ids, off


def tree_sum(t: torch.Tensor) -> torch.Tensor:
    """Row sums of ``[n, P]`` (P a power of two) by a fixed halving tree of elementwise adds."""
    while t.shape[1] > 1:
        h = t.shape[1] // 2
        t = t[:, :h] + t[:, h:]
    return t[:, 0]


def _row_blocks(counts: list, budget: int):
    """Greedy runs of rows ``(n0, n1, P)`` whose padded block ``(n1 - n0) * P`` fits the budget."""
    n0, N = 0, len(counts)
    while n0 < N:
        P, n1 = 1, n0
        while n1 < N:
            p = max(P, 1 << max(0, int(counts[n1]) - 1).bit_length())
            if n1 > n0 and (n1 + 1 - n0) * p > budget:
                break
            P, n1 = p, n1 + 1
        yield n0, n1, P
        n0 = n1


def support_stats(z: torch.Tensor, off: torch.Tensor):
    """``(lse, ent, sp2)`` ``[N]`` of the values ``z [nnz]`` grouped in rows by ``off [N + 1]``
    (an empty row: lse = -inf, ent = sp2 = 0)."""
    N = off.numel() - 1
    dt = z.dtype
    lse = torch.full((N,), float("-inf"), dtype=dt, device=z.device)
    ent = torch.zeros(N, dtype=dt, device=z.device)
    sp2 = torch.zeros(N, dtype=dt, device=z.device)
    counts = (off[1:] - off[:-1]).tolist()
    offs = off.tolist()
    for n0, n1, P in _row_blocks(counts, SUPPORT_BLOCK_ELEMS):
        a, b = offs[n0], offs[n1]
        if a == b:
            continue
        rows = torch.repeat_interleave(torch.arange(n1 - n0, device=z.device), off[n0 + 1:n1 + 1] - off[n0:n1])
        cols = torch.arange(a, b, device=z.device) - off[n0:n1][rows]
        Z = torch.full((n1 - n0, P), float("-inf"), dtype=dt, device=z.device)  # [n, P]
        Z[rows, cols] = z[a:b]
        kept = torch.zeros((n1 - n0, P), dtype=torch.bool, device=z.device)
        kept[rows, cols] = True
        m = Z.amax(-1, keepdim=True)  # [n, 1] exact whatever the order
        m = m.masked_fill(m == float("-inf"), 0.0)
        d = Z - m
        e = torch.exp(d)
        neg0 = torch.full((), -0.0, dtype=dt, device=z.device)
        s = tree_sum(torch.where(kept, e, neg0))
        w = tree_sum(torch.where(kept & (e > 0), e * d, neg0))
        q = tree_sum(torch.where(kept, e * e, neg0))
        log_s = torch.log(s)
        lse[n0:n1] = m.squeeze(1) + log_s
        ent[n0:n1] = torch.where(s > 0, log_s - w / s, torch.zeros_like(s))
        sp2[n0:n1] = torch.where(s > 0, q / (s * s), torch.zeros_like(s))
    return lse, ent, sp2


class SupportLogprobs(torch.autograd.Function):
    """``(logp, ent, sp2)`` ``[N]`` over each row's kept set; the logits' gradient is 0 outside it."""

    @staticmethod
    def forward(ctx, logits, labels, ids, off, temperature, ignore_index, inplace_backward, group=None, offset=0):
        x3 = as_rows3d(logits)  # [B, T, V] view (this rank's shard [offset, offset + V) with a group)
        B, T, V = x3.shape
        N = B * T
        inv_temp = 1.0 / temperature
        dt = out_dtype(logits)
        row_of = torch.repeat_interleave(torch.arange(N, device=logits.device), off[1:] - off[:-1])  # [nnz]
        z = _owned(x3, row_of, ids, group, offset).to(dt) * inv_temp  # [nnz] the only logits read
        lse, ent, sp2 = support_stats(z, off)
        lab = labels.reshape(-1).long()
        valid = lab != ignore_index
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        n_idx = torch.arange(N, device=logits.device)
        x_lab = _owned(x3, n_idx, safe, group, offset)  # [N] the label's logit (in its set)
        zero = torch.zeros((), dtype=dt, device=logits.device)
        logp = torch.where(valid, x_lab.to(dt) * inv_temp - lse, zero)
        ent = torch.where(valid, ent, zero)
        sp2 = torch.where(valid, sp2, zero)
        ctx.save_for_backward(z, ids, row_of, lab, lse, ent, sp2)
        ctx.shape, ctx.dtype, ctx.T = logits.shape, logits.dtype, T
        ctx.inv_temp, ctx.ignore_index = inv_temp, ignore_index
        ctx.logits = logits if inplace_backward else None
        ctx.offset = offset if group is not None else None
        ctx.set_materialize_grads(False)
        return logp, ent, sp2

    @staticmethod
    @first_order_only
    def backward(ctx, dlogp, dent, dsp2):
        z, ids, row_of, lab, lse, ent, sp2 = ctx.saved_tensors
        nothing = (None,) * 8
        if dlogp is None and dent is None and dsp2 is None:
            return (None,) + nothing
        g = support_grad(z, ids, row_of, lab, lse, ent, sp2, dlogp, dent, dsp2, ctx.inv_temp, ctx.ignore_index)
        if ctx.logits is not None:  # inplace_backward: zeros, then the support entries, into the logits
            grad = ctx.logits
            grad.zero_()
        else:
            grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=z.device)  # [..., V] 0 outside S
        g3 = as_rows3d(grad)
        T = ctx.T
        if ctx.offset is not None:  # vocab-parallel: this rank writes the entries of its own shard
            local = ids - ctx.offset
            mine = (local >= 0) & (local < g3.shape[-1])
            row_of, ids, g = row_of[mine], local[mine], g[mine]
        g3[row_of // T, row_of % T, ids] = g.to(ctx.dtype)
        return (grad,) + nothing


def _owned(x3, rows, ids, group, offset: int) -> torch.Tensor:
    """``x3[rows, ids]`` (``[n]``, rows flattened over ``[B, T]``); with a ``group`` (vocab-parallel shards)
    each id is read on the rank that owns it and the values summed over ranks: an exact gather, the
    other ranks adding 0."""
    T = x3.shape[1]
    if group is None:
        return x3[rows // T, rows % T, ids]
    import torch.distributed as dist

    local = ids - offset
    mine = (local >= 0) & (local < x3.shape[-1])
    vals = x3[rows // T, rows % T, torch.where(mine, local, torch.zeros_like(local))].to(out_dtype(x3))
    vals = torch.where(mine, vals, torch.zeros_like(vals))
    dist.all_reduce(vals, group=group)
    return vals


def support_grad(z, ids, row_of, lab, lse, ent, sp2, dlogp, dent, dsp2, inv_temp: float, ignore_index: int):
    """``g [nnz]``: the logits' gradient on the kept entries (``z [nnz]`` tempered logits of the rows
    ``row_of [nnz]``; ``[N]`` saved values and upstream grads, each None when not wanted); 0 on ignored rows."""
    valid = (lab != ignore_index)[row_of]  # [nnz]
    p = torch.exp(z - lse[row_of])  # [nnz] p_S
    g = torch.zeros_like(z)
    if dlogp is not None:
        dl = dlogp.reshape(-1).to(z.dtype)[row_of]
        g = g + dl * ((ids == lab[row_of]).to(z.dtype) - p)
    if dent is not None:
        E = (lse - ent)[row_of]
        g = g - dent.reshape(-1).to(z.dtype)[row_of] * torch.where(p > 0, p * (z - E), torch.zeros_like(p))
    if dsp2 is not None:
        g = g + 2.0 * dsp2.reshape(-1).to(z.dtype)[row_of] * p * (p - sp2[row_of])
    return torch.where(valid, g * inv_temp, torch.zeros_like(g))


def support_rows(x2, labels, ids, off, inv_temp: float, ignore_index: int, dt):
    """One block of raw logits ``x2 [n, V]`` (a fused-linear chunk) over its kept sets ``ids [nnz]``,
    ``off [n + 1]``: ``(logp, ent, sp2, lse)`` ``[n]`` in ``dt``."""
    n = x2.shape[0]
    row_of = torch.repeat_interleave(torch.arange(n, device=x2.device), off[1:] - off[:-1])  # [nnz]
    lse, ent, sp2 = support_stats(x2[row_of, ids].to(dt) * inv_temp, off)
    lab = labels.long()
    valid = lab != ignore_index
    x_lab = x2[torch.arange(n, device=x2.device), torch.where(valid, lab, torch.zeros_like(lab))]  # [n]
    zero = torch.zeros((), dtype=dt, device=x2.device)
    return (torch.where(valid, x_lab.to(dt) * inv_temp - lse, zero), torch.where(valid, ent, zero),
            torch.where(valid, sp2, zero), lse)


def chunk_top_k(x2, labels, k: int, inv_temp: float, rows0):
    """``(ids [n k], off [n + 1])``: the ``k`` largest tempered fp32 logits of each row of ``x2 [n, V]``
    (every label counted); a label outside its set is a ``ValueError`` naming its token ``rows0[i]``."""
    n = x2.shape[0]
    ids = torch.topk(x2.float() * inv_temp, k, dim=-1).indices  # [n, k]
    missing = ~(ids == labels.long()[:, None]).any(-1)
    if bool(missing.any()):
        i = int(missing.nonzero()[0, 0])
        raise ValueError(f"labels[{int(rows0[i])}] = {int(labels[i])} is outside its row's top_k set (the sampler "
                         "could not have drawn it): check that the kept sets are aligned with the labels")
    return ids.reshape(-1), torch.arange(0, n + 1, device=x2.device, dtype=torch.int64) * k


def select_rows(ids, off, rows):
    """The CSR sets ``(ids, off)`` of the rows ``rows [n]`` (None: all), in that order."""
    if rows is None:
        return ids, off
    counts = (off[1:] - off[:-1])[rows]  # [n]
    new_off = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=off.device)
    torch.cumsum(counts, 0, out=new_off[1:])
    r = torch.repeat_interleave(torch.arange(rows.numel(), device=off.device), counts)  # [nnz']
    j = torch.arange(r.numel(), device=off.device) - new_off[:-1][r]
    return ids[off[rows][r] + j], new_off


def support_token_values(logits, labels, ids, off, temperature, ignore_index, inplace_backward, group=None,
                         offset: int = 0):
    """``(logp, ent, sp2)`` shaped like ``labels``: the support-restricted twin of ``token_values``
    (``group``: ``logits`` is this rank's vocabulary shard starting at ``offset``; ids are global)."""
    if inplace_backward:
        from ._rows import check_inplace

        check_inplace(logits)
    out = SupportLogprobs.apply(logits, labels, ids, off, float(temperature), int(ignore_index), inplace_backward,
                                group, int(offset))
    shape = logits.shape[:-1]
    return tuple(t.view(shape) for t in out)
