"""The two row primitives every backend implements, and the chunked torch implementation.

Logits are handled as a ``[B, T, V]`` view with arbitrary strides (2-D ``[N, V]`` is
``[1, N, V]``), so slices such as ``logits[:, :-1]`` are read in place, never copied.

``row_forward(x3, labels, inv_temp, ignore_index, want_entropy, sp2_out=None) -> (logp, ent, lse)``
    Per row ``n`` with ``x = logits[n] * inv_temp``: ``lse = logsumexp(x)``,
    ``logp = x[label] - lse`` and ``ent = lse - sum(softmax(x) * x)``; ``logp = ent = 0`` on
    rows whose label is ``ignore_index``. ``labels=None``: every row counts, ``logp`` is None.
    All outputs ``[N]`` fp32 (fp64 for fp64 logits); ``ent`` is None unless ``want_entropy``.
    ``sp2_out`` (an ``[N]`` buffer of the outputs' dtype) receives ``sum(softmax(x)^2)`` (0 on
    ignored rows), one more accumulator of the same pass.

``row_backward(x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3, sp2=None, dsp2=None)``
    Writes ``d/dlogits`` of ``sum(dlogp * logp + dent * ent + dsp2 * sp2)`` into ``out3`` ([B, T, V],
    may alias ``x3`` for in-place backward):
    ``inv_temp * (dlogp * (onehot(label) - p) - dent * p * (x - E) + 2 dsp2 * p * (p - sp2))`` with
    ``p = exp(x - lse)`` and ``E = lse - ent = sum(p * x)``; exactly 0 on ignored rows.
    ``dlogp``/``dent``/``dsp2`` may be None.
    A label outside ``[0, V)`` that is not ``ignore_index`` counts but adds no one-hot term (the
    label lives on another vocab shard, ``fastrlhf.distributed``); the public ops reject such
    labels before any backend sees them, and the native backend rejects them itself.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ._torch_rows import (  # noqa: F401  (re-exported: the torch twin of the kernels)
    alloc_row_outputs,
    as_rows3d,
    out_dtype,
    row_sums,
    torch_row_backward,
    torch_row_forward,
)

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


def row_forward(backend: str, x3, labels, inv_temp, ignore_index, want_entropy, sp2_out=None):
    """``(logp [N] | None, ent [N] | None, lse [N])`` on ``backend`` (see the module docstring)."""
    ignore_index = int(ignore_index)  # a 0-d tensor from a caller: every launcher takes a Python int
    if torch.compiler.is_compiling():  # traced from a caller (the linear_* chunk loop): the opaque op
        logp, ent, sp2, lse = row_forward_op(x3, labels, float(inv_temp), ignore_index, want_entropy,
                                             sp2_out is not None, False, 0, backend)
        if sp2_out is not None:
            sp2_out.copy_(sp2)
        return (logp if labels is not None else None), (ent if want_entropy else None), lse
    if backend == "triton":
        from .kernels.logprobs import logprobs_forward

        logp, ent, lse = alloc_row_outputs(x3, labels is not None, want_entropy)
        logprobs_forward(x3, labels, inv_temp, ignore_index, logp, ent, lse, sp2=sp2_out)
        return logp, ent, lse
    if backend == "native":
        from ._native import row_forward as native_forward

        return native_forward(x3, labels, inv_temp, ignore_index, want_entropy, sp2_out=sp2_out)
    return torch_row_forward(x3, labels, inv_temp, ignore_index, want_entropy, sp2_out, TORCH_CHUNK_BYTES)


def row_backward(backend: str, x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3, sp2=None,
                 dsp2=None) -> None:
    """Writes the logits' gradient into ``out3`` on ``backend`` (see the module docstring)."""
    ignore_index = int(ignore_index)
    if dsp2 is not None and sp2 is None:
        raise ValueError("a sum_p2 gradient needs the saved sum_p2")
    if torch.compiler.is_compiling():  # traced from a caller: the opaque op, then one copy into out3
        out3.copy_(row_backward_op(x3, labels, lse, ent, dlogp, dent, float(inv_temp), ignore_index, backend,
                                   sp2, dsp2))
        return
    if backend == "triton":
        from .kernels.logprobs import logprobs_backward as bwd
    elif backend == "native":
        from ._native import row_backward as bwd
    else:
        bwd = functools.partial(torch_row_backward, chunk_bytes=TORCH_CHUNK_BYTES)
    if dsp2 is None:
        bwd(x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3)
    else:
        bwd(x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3, sp2=sp2, dsp2=dsp2)


def check_inplace(logits: torch.Tensor) -> None:
    """``inplace_backward=True`` writes the gradient through a ``[B, T, V]`` view of the logits: that view
    must alias them, and no two elements may share memory (an expanded tensor would race)."""
    if as_rows3d(logits).data_ptr() != logits.data_ptr():
        raise ValueError("inplace_backward=True needs logits whose leading dims can be merged without a copy")
    if any(st == 0 and sz > 1 for st, sz in zip(logits.stride(), logits.shape)):
        raise ValueError("inplace_backward=True needs logits with distinct memory per element (got an expanded, "
                         "stride-0 tensor)")


def finish_row_forward(ctx, logits, lab, lse, ent, logp, *, inv_temp, ignore_index, inplace_backward, backend,
                       want_logp, want_entropy, sp2=None):
    """Shared tail of the autograd Functions over the row primitives (full logits and vocab shards):
    save only ``[N]`` tensors and the logits for :func:`row_backward_from_ctx`; return the ``[N]`` outputs
    (the public wrappers reshape them outside the Function, so callers get ordinary tensors)."""
    ctx.save_for_backward(logits, lab, lse, ent, sp2)
    ctx.inv_temp = inv_temp
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = inplace_backward
    ctx.backend = backend
    ctx.want = (want_logp, want_entropy, sp2 is not None)
    ctx.set_materialize_grads(False)
    outs = ([logp] if want_logp else []) + ([ent] if want_entropy else []) + ([sp2] if sp2 is not None else [])
    return tuple(outs) if len(outs) > 1 else outs[0]


def _functorch_wrapped(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def row_backward_from_ctx(ctx, grads) -> Optional[torch.Tensor]:
    """The logits' gradient from the upstream ``(dlogp?, dentropy?, dsum_p2?)``; None when none is used."""
    logits, lab, lse, ent, sp2 = ctx.saved_tensors
    lab = lab.reshape(-1).contiguous() if lab is not None else None  # [N]
    grads = list(grads)
    dlogp = grads.pop(0) if ctx.want[0] else None
    dent = grads.pop(0) if ctx.want[1] else None
    dsp2 = grads.pop(0) if ctx.want[2] else None
    if dlogp is None and dent is None and dsp2 is None:
        return None
    dlogp = dlogp.reshape(-1).to(lse.dtype).contiguous() if dlogp is not None else None  # [N]
    dent = dent.reshape(-1).to(lse.dtype).contiguous() if dent is not None else None  # [N]
    dsp2 = dsp2.reshape(-1).to(lse.dtype).contiguous() if dsp2 is not None else None  # [N]
    if _functorch_wrapped(logits):
        # Under torch.func.grad the saved tensors are wrappers without storage: go through the custom
        # ops, which the dispatcher unwraps for us.
        args = (lab, lse, ent, dlogp, dent, ctx.inv_temp, int(ctx.ignore_index), ctx.backend, sp2, dsp2)
        if ctx.inplace_backward:
            row_backward_inplace_op(logits, *args)
            return logits
        return row_backward_op(logits, *args)
    if ctx.inplace_backward:
        dlogits = logits  # the gradient overwrites the logits' own storage
    else:
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [..., V]
    row_backward(ctx.backend, as_rows3d(logits), lab, lse, ent, dlogp, dent, ctx.inv_temp, ctx.ignore_index,
                 as_rows3d(dlogits), sp2, dsp2)
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
    def forward(logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend,
                want_sp2):
        x3 = as_rows3d(logits)  # [B, T, V] view
        if inplace_backward:
            check_inplace(logits)
        lab = labels.reshape(-1).contiguous() if labels is not None else None  # [N]
        sp2 = alloc_row_outputs(x3, False, False)[2] if want_sp2 else None  # [N]
        logp, ent, lse = row_forward(backend, x3, lab, 1.0 / temperature, ignore_index, want_entropy, sp2)
        return (*([logp] if want_logp else []), *([ent] if want_entropy else []), *([sp2] if want_sp2 else []),
                lse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend, want_sp2 = inputs
        lse = output[-1]
        ent = output[int(want_logp)] if want_entropy else None
        sp2 = output[-2] if want_sp2 else None
        ctx.mark_non_differentiable(lse)
        # Only inputs and outputs are saved (torch.func's rule): the labels, reshaped again in backward.
        finish_row_forward(ctx, logits, labels, lse, ent, None, inv_temp=1.0 / temperature,
                           ignore_index=ignore_index, inplace_backward=inplace_backward, backend=backend,
                           want_logp=want_logp, want_entropy=want_entropy, sp2=sp2)

    @staticmethod
    @first_order_only
    def backward(ctx, *grads):
        return (row_backward_from_ctx(ctx, grads[:-1]),) + (None,) * 8

    @staticmethod
    def vmap(info, in_dims, logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward,
             backend, want_sp2):
        # Rows are independent: the mapped dimension becomes one more leading (row) dimension.
        def front(t, d):
            if t is None:
                return None
            return t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(info.batch_size, *t.shape)

        out = RowLogprobsEntropy.apply(front(logits, in_dims[0]), front(labels, in_dims[1]), temperature,
                                       ignore_index, want_logp, want_entropy, inplace_backward, backend, want_sp2)
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


def unpack_row_values(out, want_logp: bool, want_entropy: bool, want_sp2: bool = False):
    """The user-facing outputs (``logp``, ``entropy``, ``sum_p2``: those asked for) of
    :class:`RowLogprobsEntropy` / :func:`compiled_row_values`."""
    n = int(want_logp) + int(want_entropy) + int(want_sp2)
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
                   want_entropy: bool, want_sp2: bool, inplace_backward: bool, vocab: int,
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [N] | [0], ent [N] | [0], sum_p2 [N] | [0], lse [N])`` of :func:`row_forward` (``[0]`` for an
    output not asked for). The label range check runs here, on real data (the compiled caller cannot look at values):
    ``vocab`` is the global vocabulary size the labels index; 0 skips the check (labels already
    checked by the caller, or a vocabulary shard's, whose other shards' ids are legal)."""
    if labels is not None and vocab > 0:
        msg = _range_error(labels, vocab, ignore_index)
        if msg is not None:
            raise ValueError(msg)
    x3 = as_rows3d(logits)
    sp2 = alloc_row_outputs(x3, False, False)[2] if want_sp2 else None  # [N]
    logp, ent, lse = row_forward(backend, x3, labels, inv_temp, ignore_index, want_entropy, sp2)
    empty = lse.new_empty(_EMPTY)
    return (logp if logp is not None else empty), (ent if ent is not None else empty.clone()), \
        (sp2 if sp2 is not None else empty.clone()), lse


@row_forward_op.register_fake
def _row_forward_fake(logits, labels, inv_temp, ignore_index, want_entropy, want_sp2, inplace_backward, vocab,
                      backend):
    N = logits.numel() // logits.shape[-1] if logits.shape[-1] else 0
    dt = out_dtype(logits)
    lse = logits.new_empty((N,), dtype=dt)  # [N]
    logp = logits.new_empty((N,) if labels is not None else _EMPTY, dtype=dt)
    ent = logits.new_empty((N,) if want_entropy else _EMPTY, dtype=dt)
    sp2 = logits.new_empty((N,) if want_sp2 else _EMPTY, dtype=dt)
    return logp, ent, sp2, lse


@torch.library.custom_op("fastrlhf::row_backward", mutates_args=())
def row_backward_op(logits: torch.Tensor, labels: Optional[torch.Tensor], lse: torch.Tensor,
                    ent: Optional[torch.Tensor], dlogp: Optional[torch.Tensor], dent: Optional[torch.Tensor],
                    inv_temp: float, ignore_index: int, backend: str, sp2: Optional[torch.Tensor] = None,
                    dsp2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The logits' gradient (a new tensor) of :func:`row_backward`."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [..., V]
    row_backward(backend, as_rows3d(logits), labels, lse, ent, dlogp, dent, inv_temp, ignore_index, as_rows3d(out),
                 sp2, dsp2)
    return out


@row_backward_op.register_fake
def _row_backward_fake(logits, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, backend, sp2=None, dsp2=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastrlhf::row_backward_inplace", mutates_args=("logits",))
def row_backward_inplace_op(logits: torch.Tensor, labels: Optional[torch.Tensor], lse: torch.Tensor,
                            ent: Optional[torch.Tensor], dlogp: Optional[torch.Tensor], dent: Optional[torch.Tensor],
                            inv_temp: float, ignore_index: int, backend: str, sp2: Optional[torch.Tensor] = None,
                            dsp2: Optional[torch.Tensor] = None) -> None:
    """:func:`row_backward` into the logits' own storage (``inplace_backward=True``); the op declares
    the mutation, so the logits' version counter moves and other consumers see it."""
    x3 = as_rows3d(logits)
    row_backward(backend, x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, x3, sp2, dsp2)


def _row_forward_setup(ctx, inputs, output):
    logits, labels, inv_temp, ignore_index, want_entropy, want_sp2, inplace_backward, vocab, backend = inputs
    _, ent, sp2, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse, ent if want_entropy else None, sp2 if want_sp2 else None)
    ctx.inv_temp, ctx.ignore_index, ctx.backend = inv_temp, ignore_index, backend
    ctx.has_labels, ctx.inplace_backward = labels is not None, inplace_backward


def _row_forward_backward(ctx, dlogp, dent, dsp2, _dlse):
    logits, labels, lse, ent, sp2 = ctx.saved_tensors
    dlogp = dlogp if ctx.has_labels else None
    dent = dent if ent is not None else None
    dsp2 = dsp2 if sp2 is not None else None
    if dlogp is None and dent is None and dsp2 is None:
        return (None,) * 9
    dlogp = dlogp.to(lse.dtype).contiguous() if dlogp is not None else None  # [N]
    dent = dent.to(lse.dtype).contiguous() if dent is not None else None  # [N]
    dsp2 = dsp2.to(lse.dtype).contiguous() if dsp2 is not None else None  # [N]
    args = (labels, lse, ent, dlogp, dent, ctx.inv_temp, ctx.ignore_index, ctx.backend, sp2, dsp2)
    if ctx.inplace_backward:
        row_backward_inplace_op(logits, *args)
        grad = logits
    else:
        grad = row_backward_op(logits, *args)
    return (grad,) + (None,) * 8


row_forward_op.register_autograd(_row_forward_backward, setup_context=_row_forward_setup)


def compiled_row_values(logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward,
                        backend, vocab, want_sp2=False):
    """:class:`RowLogprobsEntropy`'s outputs through the custom ops (the ``torch.compile`` path)."""
    if inplace_backward:
        check_inplace(logits)
    lab = labels.reshape(-1).contiguous() if labels is not None else None  # [N]
    logp, ent, sp2, lse = row_forward_op(logits, lab, 1.0 / temperature, int(ignore_index), want_entropy, want_sp2,
                                         inplace_backward, int(vocab), backend)
    return (*([logp] if want_logp else []), *([ent] if want_entropy else []), *([sp2] if want_sp2 else []), lse)
