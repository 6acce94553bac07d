"""Fused-linear ops: logprobs, entropy and RLHF losses from hidden states and the lm_head weight.

The logits ``hidden @ weight.T (+ bias)`` are the biggest tensor of an RLHF step
(``N x V x 2`` bytes in bf16: 5 GB at 16k tokens x 152k vocabulary, and as much again for
their gradient). These ops compute the same values as the logits ops of ``fastrlhf.ops``
without ever holding more than one ``[chunk, V]`` block of logits (the approach of Liger
Kernel's fused linear cross-entropy, Hsu et al. 2024, and of Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models", without their fused matmul kernel).

Math, per token ``n`` with ``x_n = (h_n @ W.T + b) / temperature`` (``[V]``):
    ``lse_n = logsumexp(x_n)``, ``logp_n = x_n[label_n] - lse_n``, ``ent_n = lse_n - sum(p_n * x_n)``
    and, for upstream gradients ``dlogp_n, dent_n`` (from any loss built on logp/entropy),
    ``g_n = d/dlogits_n = (dlogp_n * (onehot(label_n) - p_n) - dent_n * p_n * (x_n - E_n)) / temperature``
    (``p_n = exp(x_n - lse_n)``, ``E_n = sum(p_n * x_n)``; the row primitives of ``fastrlhf._rows``),
    ``dh_n = g_n @ W``, ``dW = sum_n g_n^T h_n``, ``db = sum_n g_n``.

Algorithm (``LinearLogprobsEntropy``):
    forward, per chunk of rows: ``logits_c = h_c @ W.T + b`` -> ``row_forward`` -> keep only the
    ``[N]`` values ``logp, ent, lse``; the block is freed before the next chunk.
    backward, per chunk: recompute ``logits_c`` (one extra matmul; the price of not storing
    ``N x V``), ``row_backward`` writes ``g_c`` into that same block in place, then
    ``dh_c = g_c @ W``, ``dW += g_c^T h_c``, ``db += sum(g_c)``.
    Rows whose label is ``ignore_index`` have logp = entropy = 0 and zero gradient by
    definition, so they are dropped before the matmul: prompt and padding tokens cost nothing.
    DPO and the token ops are this function followed by the ``[N]``-sized loss math shared
    with the logits path (``reference.dpo_loss_from_logprobs``): DPO's token gradients depend
    on sequence sums, known only after the whole forward.
    PPO / GRPO (``LinearTokenSeparableLoss``): every ``loss_agg`` mode is ``sum_n w_n f_n(logp_n,
    ent_n)`` with ``w`` fixed by the mask, so each chunk's upstream gradients are known as soon
    as its logp/entropy are; the chunk's logits gradient is formed right away (Liger's scheme)
    and backward only scales the stored ``dh, dW, db``: 3 instead of 4 ``N x V x H`` matmuls.
    Used when autograd will want the gradients (grad mode on, a parameter requiring grad, no
    gradient wanted for advantages / old / ref logprobs); otherwise the two-pass route.

Shapes: ``hidden [..., H]`` (2-D ``[N, H]`` or 3-D ``[B, T, H]``, any strides), ``weight [V, H]``,
``bias [V]``, ``labels [...] = hidden.shape[:-1]``.

Dtypes: ``hidden``, ``weight`` and ``bias`` share one dtype (fp32 / bf16 / fp16, or fp64); the
logits block is computed in that dtype, exactly as ``hidden @ weight.T`` would be. Under
``torch.autocast`` the three are cast to the autocast dtype first (as autocast's own matmul
would). Per-token outputs are fp32 (fp64 for fp64 inputs). The weight (and bias) gradient is
accumulated over chunks in fp32 by default (``accum_dtype=``): summing many per-chunk
contributions in bf16 is a known cause of training divergence.

Memory, beyond the inputs: forward one ``[chunk, V]`` logits block plus the row primitive's
bounded temporaries, and ``[N]`` saved values; backward the same block (the gradient
overwrites it), ``dh [N, H]``, the ``[V, H]`` weight-gradient accumulator (fp32) and, for
low-precision weights, ``[vocab_block, H]`` partial products no larger than the logits block.
No ``[N, V]`` tensor is ever made. The chunk follows a memory budget (``default_chunk_size``).

Limits: the vocabulary is not split, so one chunk holds at least one full row of ``V``
logits (2 MiB in fp32 at V = 262144, far below the budget: vocab chunking is not needed for
any current model). ``process_group`` (vocab-parallel lm_head) is not supported yet.
Open: a Cut-Cross-Entropy style Triton kernel fusing the matmul tile with the online
logsumexp (GPU only) would also skip the logits block's round trip through memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import reference as ref
from ._backend import resolve_backend
from ._rows import out_dtype, row_backward, row_forward
from ._validate import FLOAT_DTYPES, check_dpo_refs, check_labels, check_temperature
from .ops import Stats, _check_ppo_args, mask_as_ignored, ppo_loss_from_token_values

__all__ = [
    "linear_token_logprobs",
    "linear_token_logprobs_and_entropy",
    "linear_ppo_clip_loss",
    "linear_grpo_loss",
    "linear_dpo_loss",
    "default_chunk_size",
    "LinearLogprobsEntropy",
]

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


def _chunk_logits(h_c: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if bias is None:
        return h_c @ weight.T  # [n, V]: the only vocabulary-sized tensor alive
    return torch.addmm(bias, h_c, weight.T)  # [n, V]


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


class LinearLogprobsEntropy(torch.autograd.Function):
    """``(logp [N], entropy [N] or None)`` from ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]``.

    Only ``[N]`` tensors (and the indices of the kept rows) are saved; backward recomputes
    each chunk's logits. Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, want_entropy, backend, chunk,
                accum_dtype):
        N = hidden.shape[0]
        odt = out_dtype(weight)
        inv_temp = 1.0 / temperature
        n_keep, rows = _kept_rows(labels, ignore_index)
        logp = torch.zeros(N, dtype=odt, device=hidden.device)  # [N]
        lse = torch.zeros(N, dtype=odt, device=hidden.device)  # [N]
        ent = torch.zeros(N, dtype=odt, device=hidden.device) if want_entropy else None  # [N]
        with torch.autocast(hidden.device.type, enabled=False):
            for r0, r1 in _chunk_bounds(n_keep, chunk):
                x = _chunk_logits(_take(hidden, rows, r0, r1), weight, bias)  # [n, V]
                lp, en, ls = row_forward(
                    backend, x.unsqueeze(0), _take(labels, rows, r0, r1), inv_temp, ignore_index, want_entropy
                )
                del x  # free the block before the next chunk's matmul allocates another
                _put(logp, rows, r0, r1, lp)
                _put(lse, rows, r0, r1, ls)
                if want_entropy:
                    _put(ent, rows, r0, r1, en)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse, ent)
        ctx.n_keep = n_keep
        ctx.inv_temp = inv_temp
        ctx.ignore_index = ignore_index
        ctx.want_entropy = want_entropy
        ctx.backend = backend
        ctx.chunk = chunk
        ctx.accum_dtype = accum_dtype
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, dlogp, dent):
        hidden, weight, bias, labels, rows, lse, ent = ctx.saved_tensors
        if not ctx.want_entropy:
            dent = None
        none = (None,) * 7
        if dlogp is None and dent is None:
            return (None, None, None) + none
        dt = lse.dtype
        dlogp = dlogp.reshape(-1).to(dt).contiguous() if dlogp is not None else None  # [N]
        dent = dent.reshape(-1).to(dt).contiguous() if dent is not None else None  # [N]
        dh, dW, db = _grad_buffers(hidden, weight, bias, rows, ctx.needs_input_grad[:3], ctx.accum_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0, r1 in _chunk_bounds(ctx.n_keep, ctx.chunk):
                h_c = _take(hidden, rows, r0, r1)  # [n, H]
                g = _chunk_logits(h_c, weight, bias)  # [n, V] recomputed, then overwritten by its gradient
                g3 = g.unsqueeze(0)  # [1, n, V]
                row_backward(
                    ctx.backend, g3, _take(labels, rows, r0, r1), _take(lse, rows, r0, r1),
                    _take(ent, rows, r0, r1), _take(dlogp, rows, r0, r1), _take(dent, rows, r0, r1),
                    ctx.inv_temp, ctx.ignore_index, g3,
                )
                _chunk_param_grads(g, h_c, weight, rows, r0, r1, dh, dW, db)
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
    ``dW [V, H]``), then scaled by the upstream gradient of the loss.

    ``token_grads(sel, logp_c, ent_c) -> (dlogp_c, dent_c or None)`` gives the chunk's upstream
    gradients (``sel`` picks the chunk's rows of any ``[N]`` tensor); ``finish(logp, ent)``
    returns the loss value from the full ``[N]`` values (and may record stats on the side).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_grads, finish, temperature, ignore_index, want_entropy,
                backend, chunk, accum_dtype):
        N = hidden.shape[0]
        odt = out_dtype(weight)
        inv_temp = 1.0 / temperature
        n_keep, rows = _kept_rows(labels, ignore_index)
        logp = torch.zeros(N, dtype=odt, device=hidden.device)  # [N]
        ent = torch.zeros(N, dtype=odt, device=hidden.device) if want_entropy else None  # [N]
        dh, dW, db = _grad_buffers(hidden, weight, bias, rows, ctx.needs_input_grad[:3], accum_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0, r1 in _chunk_bounds(n_keep, chunk):
                h_c = _take(hidden, rows, r0, r1)  # [n, H]
                lab_c = _take(labels, rows, r0, r1)
                g = _chunk_logits(h_c, weight, bias)  # [n, V] logits, then overwritten by their gradient
                g3 = g.unsqueeze(0)  # [1, n, V]
                lp, en, ls = row_forward(backend, g3, lab_c, inv_temp, ignore_index, want_entropy)
                _put(logp, rows, r0, r1, lp)
                if want_entropy:
                    _put(ent, rows, r0, r1, en)
                dlogp_c, dent_c = token_grads(lambda t, r0=r0, r1=r1: _take(t, rows, r0, r1), lp, en)
                row_backward(backend, g3, lab_c, ls, en, dlogp_c, dent_c, inv_temp, ignore_index, g3)
                _chunk_param_grads(g, h_c, weight, rows, r0, r1, dh, dW, db)
                del g
        dW, db = _finish_param_grads(dW, db, weight, bias)
        loss = finish(logp, ent)
        ctx.save_for_backward(dh, dW, db)
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        dh, dW, db = ctx.saved_tensors
        none = (None,) * 9
        if dloss is None:
            return (None, None, None) + none
        if bool(dloss == 1):  # loss.backward(): hand the buffers over (autograd takes them without a copy)
            return (dh, dW, db) + none
        # d(c * loss) = c * d(loss); out of place, so a retained graph keeps the unscaled gradients.
        return tuple(None if t is None else t * dloss.to(t.dtype) for t in (dh, dW, db)) + none


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------


def _no_process_group(process_group) -> None:
    if process_group is not None:
        raise NotImplementedError(
            "process_group (a vocab-parallel lm_head) is not supported by the linear_* ops yet: pass the full "
            "[V, H] weight, or compute the sharded logits and use the logits ops, which take process_group"
        )


def _check_linear_inputs(hidden, weight, bias, labels, ignore_index) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., H] with at least 2 dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H] (the lm_head / tied embedding), got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if V == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden [..., H] must have H = weight.shape[1] = {H}, got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be fp32/bf16/fp16 (or fp64), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype} "
            "(cast one of them, or run under torch.autocast)"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be [V] = [{V}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    # dtype, device and range checks of the logits path against a zero-storage stand-in for
    # the [..., V] logits (an expanded 0-d tensor: no memory).
    logits_like = torch.empty((), dtype=hidden.dtype, device=hidden.device).expand(*hidden.shape[:-1], V)
    check_labels(labels, logits_like, ignore_index)


def _autocast(hidden, weight, bias):
    """Under ``torch.autocast``, cast to its dtype as its own matmul would (fp64 is left alone)."""
    dev = hidden.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dt)

    return cast(hidden), cast(weight), cast(bias)


def _prepare(hidden, weight, bias, labels, temperature, ignore_index, chunk_size, accum_dtype, backend):
    """Checks and resolved settings: ``(h2 [N, H], weight, bias, labels [N], temperature, backend, chunk, accum)``."""
    if isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor):
        hidden, weight, bias = _autocast(hidden, weight, bias)
    _check_linear_inputs(hidden, weight, bias, labels, ignore_index)
    temperature = check_temperature(temperature)
    resolved = resolve_backend(backend, hidden.device, hidden.dtype)
    if resolved == "native" and backend == "auto" and weight.dtype == torch.float64:
        resolved = "torch"  # the native passes take fp32/bf16/fp16 logits only
    N = labels.numel()
    V = weight.shape[0]
    if chunk_size is None:
        chunk = default_chunk_size(max(N, 1), V, weight.dtype, hidden.device)
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
        chunk = chunk_size
    if accum_dtype is None:
        accum_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    elif accum_dtype not in FLOAT_DTYPES:
        raise TypeError(f"accum_dtype must be one of {FLOAT_DTYPES} or None, got {accum_dtype!r}")
    h2 = hidden.reshape(N, hidden.shape[-1])  # [N, H]; a copy only for leading dims that cannot merge
    lab = labels.reshape(-1).contiguous()  # [N]
    return h2, weight, bias, lab, temperature, resolved, chunk, accum_dtype


def _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, want_entropy, chunk_size, accum_dtype,
                    backend):
    """Checks, then ``(logp, ent)`` shaped like ``labels`` (``ent`` None unless wanted)."""
    h2, weight, bias, lab, temperature, backend, chunk, accum_dtype = _prepare(
        hidden, weight, bias, labels, temperature, ignore_index, chunk_size, accum_dtype, backend
    )
    logp, ent = LinearLogprobsEntropy.apply(
        h2, weight, bias, lab, temperature, ignore_index, want_entropy, backend, chunk, accum_dtype
    )
    shape = labels.shape
    return logp.view(shape), (ent.view(shape) if ent is not None else None)


# PPO / GRPO form their gradients in the forward pass (LinearTokenSeparableLoss) when autograd
# will want them; False always takes the two-pass LinearLogprobsEntropy route (for A/B tests).
FUSE_PPO_BACKWARD = True


def _use_fused_ppo(hidden, weight, bias, data) -> bool:
    if not FUSE_PPO_BACKWARD or not torch.is_grad_enabled():
        return False
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (hidden, weight, bias)):
        return False
    # The fused route treats old_logprobs / advantages / ref_logprobs / mask as constants.
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in data)


def _fused_ppo_clip_loss(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs, temperature,
                         ignore_index, want_entropy, chunk_size, accum_dtype, backend, opts):
    h2, weight, bias, lab, temperature, backend, chunk, accum_dtype = _prepare(
        hidden, weight, bias, labels, temperature, ignore_index, chunk_size, accum_dtype, backend
    )
    odt = out_dtype(weight)
    bt = ref.as_batch_time
    # Per-token constants of the loss, flattened to [N]: sum_n w_n * per_token_n with the
    # aggregation weights w of loss_agg (fixed by the mask alone).
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.bool()
    w = ref.loss_agg_weights(bt(counted).to(odt), opts["loss_agg"]).reshape(-1)  # [N]
    old = old_logprobs.reshape(-1).to(odt)  # [N]
    if advantages.dim() == 1 and labels.dim() >= 2:  # per sequence: broadcast over T
        advantages = advantages.reshape(-1, 1).expand(bt(labels).shape)
    adv = advantages.reshape(-1).to(odt)  # [N]
    refl = ref_logprobs.reshape(-1).to(odt) if ref_logprobs is not None else None  # [N]
    token_opts = {k: v for k, v in opts.items() if k != "loss_agg"}
    entropy_term = opts["entropy_coef"] > 0

    def token_grads(sel, logp_c, ent_c):
        # The reference's per-token math on this chunk, differentiated by autograd. With one
        # "sequence" and the weights w as its mask, loss_agg="seq-mean-token-sum" is exactly
        # sum_n w_n * per_token_n (API.md: mean over sequences of sum_t(pg * m)).
        with torch.enable_grad():
            lp = logp_c.detach().to(odt).requires_grad_()
            en = ent_c.detach().to(odt).requires_grad_() if entropy_term else None
            loss_c, _ = ref.ppo_clip_loss_from_logprobs(
                lp[None], sel(w)[None], sel(old)[None], sel(adv)[None],
                entropy=None if en is None else en[None],
                ref_logprobs=None if refl is None else sel(refl)[None],
                loss_agg="seq-mean-token-sum", **token_opts,
            )
            grads = torch.autograd.grad(loss_c, [lp] if en is None else [lp, en])
        return grads[0], (grads[1] if en is not None else None)

    stats = {}

    def finish(logp, ent):
        shape = labels.shape
        loss, st = ppo_loss_from_token_values(
            logp.view(shape), None if ent is None else ent.view(shape), labels, old_logprobs, advantages, mask,
            ref_logprobs, ignore_index, **opts,
        )
        stats.update(st)
        return loss.detach()

    loss = LinearTokenSeparableLoss.apply(
        h2, weight, bias, lab, token_grads, finish, temperature, ignore_index, want_entropy, backend, chunk,
        accum_dtype,
    )
    return loss, stats


# ----------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """:func:`fastrlhf.token_logprobs` of the logits ``hidden @ weight.T + bias``, never materialized.

    Args:
        hidden: ``[..., H]`` final hidden states (2-D ``[N, H]`` or 3-D ``[B, T, H]``).
        weight: ``[V, H]`` lm_head (or tied embedding) weight, same dtype and device as ``hidden``.
        labels: ``[...] = hidden.shape[:-1]`` int32/int64, aligned (the caller shifts).
        bias: optional ``[V]``.
        temperature: float > 0; the gradient flows through the division.
        ignore_index: label giving logp 0 and exactly zero gradient (such rows skip the matmul).
        chunk_size: rows per logits block; default :func:`default_chunk_size` (memory budget).
        accum_dtype: dtype of the weight/bias gradient accumulator (default fp32; fp64 for fp64).
        backend: row-primitive backend, ``"auto"`` / ``"triton"`` / ``"native"`` / ``"torch"``.

    Returns:
        ``logp [...]`` fp32, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    _no_process_group(process_group)
    logp, _ = _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, False, chunk_size,
                              accum_dtype, backend)
    return logp


def linear_token_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` per token from ``hidden @ weight.T + bias``; both differentiable.

    Same values as :func:`fastrlhf.token_logprobs_and_entropy` on the full logits (both 0 where
    ``labels == ignore_index``). Arguments as :func:`linear_token_logprobs`.
    """
    _no_process_group(process_group)
    return _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, True, chunk_size,
                           accum_dtype, backend)


def linear_ppo_clip_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
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
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    process_group=None,
) -> tuple[torch.Tensor, Stats]:
    """:func:`fastrlhf.ppo_clip_loss` (Schulman et al. 2017, eq. 7) on ``hidden @ weight.T + bias``.

    Identical loss, stats and options (clip-higher, dual clip, KL and entropy terms, the four
    ``loss_agg`` modes); the logits exist one ``[chunk, V]`` block at a time. Gradients flow to
    ``hidden``, ``weight`` and ``bias``. ``chunk_size`` / ``accum_dtype`` as
    :func:`linear_token_logprobs`.
    """
    _no_process_group(process_group)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    _check_ppo_args(hidden, labels, old_logprobs, advantages, mask, ref_logprobs, kl_coef, kl_estimator,
                    clip_low, clip_high, dual_clip, loss_agg, entropy_coef)
    want_entropy = entropy_coef > 0 or compute_entropy
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg)
    labels = mask_as_ignored(labels, mask, ignore_index)
    if _use_fused_ppo(hidden, weight, bias, (old_logprobs, advantages, mask, ref_logprobs)):
        return _fused_ppo_clip_loss(hidden, weight, bias, labels, old_logprobs, advantages, mask, ref_logprobs,
                                    temperature, ignore_index, want_entropy, chunk_size, accum_dtype, backend, opts)
    logp, ent = _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, want_entropy, chunk_size,
                                accum_dtype, backend)
    return ppo_loss_from_token_values(logp, ent, labels, old_logprobs, advantages, mask, ref_logprobs, ignore_index,
                                      **opts)


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.04,
    **kwargs,
) -> tuple[torch.Tensor, Stats]:
    """:func:`fastrlhf.grpo_loss` (Shao et al. 2024, eq. 3) on ``hidden @ weight.T + bias``.

    :func:`linear_ppo_clip_loss` with ``kl_coef=beta`` and the k3 estimator; ``beta=0`` needs no
    ``ref_logprobs``. Other keywords (``bias``, ``mask``, ``loss_agg``, ``chunk_size``, ...) as
    :func:`linear_ppo_clip_loss`.
    """
    for k in ("kl_coef", "kl_estimator"):
        if k in kwargs:
            raise TypeError(f"linear_grpo_loss sets {k} itself (beta, k3); use linear_ppo_clip_loss for other choices")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0")
    return linear_ppo_clip_loss(
        hidden, weight, labels, old_logprobs, advantages,
        ref_logprobs=ref_logprobs if beta > 0 else None, kl_coef=beta, kl_estimator="k3", **kwargs,
    )


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    process_group=None,
) -> tuple[torch.Tensor, Stats]:
    """:func:`fastrlhf.dpo_loss` (Rafailov et al. 2023, eq. 7) on ``hidden [2B, T, H] @ weight.T + bias``.

    Rows ``0..B-1`` chosen, ``B..2B-1`` rejected (TRL's concatenation); prompt and padding tokens
    carry ``ignore_index`` labels and are skipped entirely. Loss types ``sigmoid`` / ``hinge`` /
    ``ipo`` / ``robust`` and stats as the logits version. The token gradients depend on the
    sequence sums, so the logits are computed twice (forward, and again chunk by chunk in
    backward); never more than one ``[chunk, V]`` block exists.
    """
    _no_process_group(process_group)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"hidden must be [2B, T, H] (chosen rows then rejected rows), got {tuple(hidden.shape)}")
    if loss_type not in ref.DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {ref.DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    B = hidden.shape[0] // 2
    check_dpo_refs(ref_chosen_logps, ref_rejected_logps, B, hidden.device)
    logp, _ = _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, False, chunk_size,
                              accum_dtype, backend)
    seq = ref.dpo_sequence_logps(logp, labels != ignore_index, loss_type)  # [2B]
    return ref.dpo_loss_from_logprobs(
        seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )
