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

import functools
from typing import Iterator, Optional, Tuple

import torch

ONCE_DIFFERENTIABLE_ERROR = (
    b"fastrlhf ops are once differentiable: trying to differentiate twice a function that was marked with "
    b"@once_differentiable (create_graph=True gives the exact first derivative; a second derivative is "
    b"not implemented)"
)


def first_order_only(backward):
    """Like ``once_differentiable``, but loud whatever the upstream and reachable from the inputs.

    The backward runs without grad. Under ``create_graph=True`` every gradient returned goes through
    one node that raises ``ONCE_DIFFERENTIABLE_ERROR`` when differentiated again; that node also hangs
    on the saved inputs that require grad, so ``torch.autograd.grad(g, inputs)`` reaches it (with
    ``once_differentiable`` alone the second-order term is silently absent when the upstream needs
    no gradient, or the inputs look unused).
    """

    @functools.wraps(backward)
    def wrapper(ctx, *args):
        with torch.no_grad():
            out = backward(ctx, *args)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return out
        tup = out if isinstance(out, tuple) else (out,)
        if not any(isinstance(t, torch.Tensor) for t in tup):
            return out
        anchors = [t for t in ctx.saved_tensors if isinstance(t, torch.Tensor) and t.requires_grad]

        def fake_requires_grad(t):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach()
                t.requires_grad = True
            return t

        err = torch._C._functions.DelayedError(ONCE_DIFFERENTIABLE_ERROR, len(tup) + len(anchors))
        res = err(*[fake_requires_grad(t) for t in tup], *anchors)
        res = res[: len(tup)]
        return tuple(res) if isinstance(out, tuple) else res[0]

    return wrapper


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
    ignore_index = int(ignore_index)  # a 0-d tensor from a caller: every launcher takes a Python int
    if torch.compiler.is_compiling():  # traced from a caller (the linear_* chunk loop): the opaque op
        logp, ent, lse = row_forward_op(x3, labels, float(inv_temp), ignore_index, want_entropy, False, 0, backend)
        return (logp if labels is not None else None), (ent if want_entropy else None), lse
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
    ignore_index = int(ignore_index)
    if torch.compiler.is_compiling():  # traced from a caller: the opaque op, then one copy into out3
        out3.copy_(row_backward_op(x3, labels, lse, ent, dlogp, dent, float(inv_temp), ignore_index, backend))
        return
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


def _functorch_wrapped(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def row_backward_from_ctx(ctx, grads) -> Optional[torch.Tensor]:
    """The logits' gradient from the upstream ``(dlogp?, dentropy?)``; None when neither is used."""
    logits, lab, lse, ent = ctx.saved_tensors
    lab = lab.reshape(-1).contiguous() if lab is not None else None  # [N]
    grads = list(grads)
    dlogp = grads.pop(0) if ctx.want[0] else None
    dent = grads.pop(0) if ctx.want[1] else None
    if dlogp is None and dent is None:
        return None
    dlogp = dlogp.reshape(-1).to(lse.dtype).contiguous() if dlogp is not None else None  # [N]
    dent = dent.reshape(-1).to(lse.dtype).contiguous() if dent is not None else None  # [N]
    if _functorch_wrapped(logits):
        # Under torch.func.grad the saved tensors are wrappers without storage: go through the custom
        # ops, which the dispatcher unwraps for us.
        args = (lab, lse, ent, dlogp, dent, ctx.inv_temp, int(ctx.ignore_index), ctx.backend)
        if ctx.inplace_backward:
            row_backward_inplace_op(logits, *args)
            return logits
        return row_backward_op(logits, *args)
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
    """``(logp [N]?, entropy [N]?)`` per row of ``logits``; only ``[N]`` tensors are saved (eager path).

    Backward is one gradient pass over the logits (first derivatives only: a second
    differentiation raises autograd's ``once_differentiable`` error instead of a wrong value).
    ``forward`` takes no ``ctx`` (``setup_context`` does the saving), which ``torch.func.grad``
    needs; ``vmap`` folds the mapped dimension into the rows (every row is independent).
    Under ``torch.compile`` the public ops call :func:`compiled_row_values` instead.
    """

    @staticmethod
    def forward(logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend):
        x3 = as_rows3d(logits)  # [B, T, V] view
        if inplace_backward:
            check_inplace(logits)
        lab = labels.reshape(-1).contiguous() if labels is not None else None  # [N]
        logp, ent, lse = row_forward(backend, x3, lab, 1.0 / temperature, ignore_index, want_entropy)
        return (*([logp] if want_logp else []), *([ent] if want_entropy else []), lse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend = inputs
        lse = output[-1]
        ent = output[int(want_logp)] if want_entropy else None
        ctx.mark_non_differentiable(lse)
        # Only inputs and outputs are saved (torch.func's rule): the labels, reshaped again in backward.
        finish_row_forward(ctx, logits, labels, lse, ent, None, inv_temp=1.0 / temperature,
                           ignore_index=ignore_index, inplace_backward=inplace_backward, backend=backend,
                           want_logp=want_logp, want_entropy=want_entropy)

    @staticmethod
    @first_order_only
    def backward(ctx, *grads):
        return (row_backward_from_ctx(ctx, grads[:-1]),) + (None,) * 7

    @staticmethod
    def vmap(info, in_dims, logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward,
             backend):
        # Rows are independent: the mapped dimension becomes one more leading (row) dimension.
        def front(t, d):
            if t is None:
                return None
            return t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(info.batch_size, *t.shape)

        out = RowLogprobsEntropy.apply(front(logits, in_dims[0]), front(labels, in_dims[1]), temperature,
                                       ignore_index, want_logp, want_entropy, inplace_backward, backend)
        return tuple(t.view(info.batch_size, -1) for t in out), (0,) * len(out)  # [batch, N] each


class EagerRowLogprobsEntropy(RowLogprobsEntropy):
    """:class:`RowLogprobsEntropy` in the classic style (``forward`` takes ``ctx``), for calls outside
    ``torch.func`` transforms: ``Function.apply`` binds a ``setup_context``-style forward's arguments
    with ``inspect.signature`` on every call (tens of microseconds)."""

    setup_context = torch.autograd.Function.setup_context

    @staticmethod
    def forward(ctx, *args):
        out = RowLogprobsEntropy.forward(*args)
        RowLogprobsEntropy.setup_context(ctx, args, out)
        return out


def row_values_function():
    """The autograd Function to call now: the ``torch.func``-ready one under a transform, else the fast one."""
    return RowLogprobsEntropy if torch._C._are_functorch_transforms_active() else EagerRowLogprobsEntropy


def unpack_row_values(out, want_logp: bool, want_entropy: bool):
    """The user-facing outputs (``logp``, ``entropy`` or both) of :class:`RowLogprobsEntropy` /
    :func:`compiled_row_values`."""
    n = int(want_logp) + int(want_entropy)
    return tuple(out[:n]) if n > 1 else out[0]


# ----------------------------------------------------------------------------------------
# torch.compile: the row primitives as opaque custom ops (fake shapes + autograd)
# ----------------------------------------------------------------------------------------
# Eager calls keep the autograd Function above (a custom op's Python dispatch costs ~0.1 ms a
# call, a third of a small CPU step). Under torch.compile the public ops call these instead: dynamo
# cannot look through the native extension (raw pointers) or the Triton launch, but it can place
# an opaque op with a fake implementation in the graph, and AOTAutograd differentiates it with
# the autograd formula registered below, i.e. the same row_backward.

_EMPTY = (0,)


def _range_error(labels: torch.Tensor, V: int, ignore_index: int) -> Optional[str]:
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if labels.numel() and bool(bad.any()):
        return f"labels contains {int(labels[bad][0])}, outside [0, {V}) and not ignore_index={ignore_index}"
    return None


@torch.library.custom_op("fastrlhf::row_forward", mutates_args=())
def row_forward_op(logits: torch.Tensor, labels: Optional[torch.Tensor], inv_temp: float, ignore_index: int,
                   want_entropy: bool, inplace_backward: bool, vocab: int,
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [N] | [0], ent [N] | [0], lse [N])`` of :func:`row_forward` (``[0]`` for an output not asked
    for). The label range check runs here, on real data (the compiled caller cannot look at values):
    ``vocab`` is the global vocabulary size the labels index; 0 skips the check (labels already
    checked by the caller, or a vocabulary shard's, whose other shards' ids are legal)."""
    if labels is not None and vocab > 0:
        msg = _range_error(labels, vocab, ignore_index)
        if msg is not None:
            raise ValueError(msg)
    logp, ent, lse = row_forward(backend, as_rows3d(logits), labels, inv_temp, ignore_index, want_entropy)
    empty = lse.new_empty(_EMPTY)
    return (logp if logp is not None else empty), (ent if ent is not None else empty.clone()), lse


@row_forward_op.register_fake
def _row_forward_fake(logits, labels, inv_temp, ignore_index, want_entropy, inplace_backward, vocab, backend):
    N = logits.numel() // logits.shape[-1] if logits.shape[-1] else 0
    dt = out_dtype(logits)
    lse = logits.new_empty((N,), dtype=dt)  # [N]
    logp = logits.new_empty((N,) if labels is not None else _EMPTY, dtype=dt)
    ent = logits.new_empty((N,) if want_entropy else _EMPTY, dtype=dt)
    return logp, ent, lse


@torch.library.custom_op("fastrlhf::row_backward", mutates_args=())
def row_backward_op(logits: torch.Tensor, labels: Optional[torch.Tensor], lse: torch.Tensor,
                    ent: Optional[torch.Tensor], dlogp: Optional[torch.Tensor], dent: Optional[torch.Tensor],
                    inv_temp: float, ignore_index: int, backend: str) -> torch.Tensor:
    """The logits' gradient (a new tensor) of :func:`row_backward`."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [..., V]
    row_backward(backend, as_rows3d(logits), labels, lse, ent, dlogp, dent, inv_temp, ignore_index, as_rows3d(out))
    return out


@row_backward_op.register_fake
def _row_backward_fake(logits, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastrlhf::row_backward_inplace", mutates_args=("logits",))
def row_backward_inplace_op(logits: torch.Tensor, labels: Optional[torch.Tensor], lse: torch.Tensor,
                            ent: Optional[torch.Tensor], dlogp: Optional[torch.Tensor], dent: Optional[torch.Tensor],
                            inv_temp: float, ignore_index: int, backend: str) -> None:
    """:func:`row_backward` into the logits' own storage (``inplace_backward=True``); the op declares
    the mutation, so the logits' version counter moves and other consumers see it."""
    x3 = as_rows3d(logits)
    row_backward(backend, x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, x3)


def _row_forward_setup(ctx, inputs, output):
    logits, labels, inv_temp, ignore_index, want_entropy, inplace_backward, vocab, backend = inputs
    _, ent, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse, ent if want_entropy else None)
    ctx.inv_temp, ctx.ignore_index, ctx.backend = inv_temp, ignore_index, backend
    ctx.has_labels, ctx.inplace_backward = labels is not None, inplace_backward


def _row_forward_backward(ctx, dlogp, dent, _dlse):
    logits, labels, lse, ent = ctx.saved_tensors
    dlogp = dlogp if ctx.has_labels else None
    dent = dent if ent is not None else None
    if dlogp is None and dent is None:
        return (None,) * 8
    dlogp = dlogp.to(lse.dtype).contiguous() if dlogp is not None else None  # [N]
    dent = dent.to(lse.dtype).contiguous() if dent is not None else None  # [N]
    args = (labels, lse, ent, dlogp, dent, ctx.inv_temp, ctx.ignore_index, ctx.backend)
    if ctx.inplace_backward:
        row_backward_inplace_op(logits, *args)
        grad = logits
    else:
        grad = row_backward_op(logits, *args)
    return (grad,) + (None,) * 7


row_forward_op.register_autograd(_row_forward_backward, setup_context=_row_forward_setup)


def compiled_row_values(logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward,
                        backend, vocab):
    """:class:`RowLogprobsEntropy`'s outputs through the custom ops (the ``torch.compile`` path)."""
    if inplace_backward:
        check_inplace(logits)
    lab = labels.reshape(-1).contiguous() if labels is not None else None  # [N]
    logp, ent, lse = row_forward_op(logits, lab, 1.0 / temperature, int(ignore_index), want_entropy,
                                    inplace_backward, int(vocab), backend)
    return (*([logp] if want_logp else []), *([ent] if want_entropy else []), lse)
