"""Token ops: log-probability of each label and entropy per row, from logits.

Public ops of ``docs/API.md`` ("Token ops"): :func:`token_logprobs`,
:func:`token_logprobs_and_entropy`, :func:`entropy`. Each is one autograd Function over the row
primitives of :mod:`fastrlhf._rows` (forward: one streaming pass per row writing only ``[N]``
outputs; backward: one pass recomputing the softmax from the saved logsumexp and writing the
logits' gradient), on the backend :mod:`fastrlhf._backend` picks. The losses of
:mod:`fastrlhf.ppo` and :mod:`fastrlhf.dpo` are built on :func:`token_values`.

Kernel: ``fastrlhf/kernels/logprobs.py`` (Triton), ``fastrlhf/csrc/rows.cpp`` (native), the
chunked torch twin in ``fastrlhf/_rows.py``. Oracle: ``fastrlhf/reference/logprobs.py`` (same names).
Tests: ``tests/test_logprobs.py``. Benchmark: ``fastrlhf bench logprobs`` / ``entropy``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._backend import resolve_backend
from ._rows import compiled_row_values, row_values_function, unpack_row_values
from ._validate import check_ignore_index, check_labels, check_logits, check_temperature

__all__ = ["token_logprobs", "token_logprobs_and_entropy", "entropy", "prepare", "token_values"]


def _vocab_offset(logits: torch.Tensor, process_group) -> Tuple[int, int]:
    """``(offset of this rank's vocabulary shard, global V)``; ``(0, V)`` without a group."""
    if process_group is None:
        return 0, logits.shape[-1]
    from .distributed import shard_offset

    return shard_offset(logits.shape[-1], process_group)


def prepare(logits, labels, temperature, ignore_index, backend, process_group=None):
    """Check inputs; ``(temperature, concrete backend, vocab offset of this rank's shard)``."""
    check_logits(logits)
    temperature = check_temperature(temperature)
    offset, vocab = _vocab_offset(logits, process_group)
    if labels is not None:
        check_labels(labels, logits, ignore_index, vocab_size=vocab)
    return temperature, resolve_backend(backend, logits.device, logits.dtype, logits), offset


def token_values(logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend,
                 process_group=None, offset=0, *, want_sp2=False, support=None, top_k=None):
    """``logp`` / ``entropy`` / ``sum_p2``: those asked for (one tensor, or a tuple in that order), shaped
    like ``logits.shape[:-1]``, from full logits or from this rank's vocabulary shard. ``support`` /
    ``top_k``: renormalised over each row's kept set (:mod:`fastrlhf.support`). Inputs already checked
    by :func:`prepare`."""
    ignore_index = check_ignore_index(ignore_index)  # a 0-d tensor becomes an int for every backend
    if support is not None or top_k is not None:
        return _support_values(logits, labels, temperature, ignore_index, want_logp, want_entropy, want_sp2,
                               inplace_backward, process_group, support, top_k)
    if process_group is None and torch.compiler.is_compiling():
        # Opaque custom ops with fake shapes and registered autograd (fastrlhf._rows): traceable.
        vocab = logits.shape[-1]
        out = unpack_row_values(compiled_row_values(logits, labels, temperature, ignore_index, want_logp,
                                                    want_entropy, inplace_backward, backend, vocab, want_sp2),
                                want_logp, want_entropy, want_sp2)
    elif process_group is None:
        out = unpack_row_values(row_values_function().apply(
            logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend, want_sp2
        ), want_logp, want_entropy, want_sp2)
    else:
        from .distributed import vocab_parallel_token_values

        out = vocab_parallel_token_values(
            logits, labels, temperature=temperature, ignore_index=ignore_index, want_logp=want_logp,
            want_entropy=want_entropy, inplace_backward=inplace_backward, backend=backend, group=process_group,
            offset=offset, want_sp2=want_sp2,
        )
    shape = logits.shape[:-1]
    # Reshaped here, outside the autograd Function: the caller gets ordinary tensors it may edit in place.
    if isinstance(out, tuple):
        return tuple(t.view(shape) for t in out)
    return out.view(shape)


def _support_values(logits, labels, temperature, ignore_index, want_logp, want_entropy, want_sp2,
                    inplace_backward, process_group, support, top_k):
    if labels is None:
        raise ValueError("support= / top_k= need labels")
    from .support import resolve_support, support_token_values

    offset, vocab = 0, None
    if process_group is not None:  # vocab-parallel shards: global ids, each kept logit read where it lives
        from .distributed import shard_offset

        offset, vocab = shard_offset(logits.shape[-1], process_group)
    ids, off = resolve_support(logits, labels, support, top_k, temperature, ignore_index, vocab=vocab)
    logp, ent, sp2 = support_token_values(logits, labels, ids, off, temperature, ignore_index, inplace_backward,
                                          process_group, offset)
    out = tuple(t for t, w in ((logp, want_logp), (ent, want_entropy), (sp2, want_sp2)) if w)
    return out if len(out) > 1 else out[0]


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
    support=None,
    top_k: Optional[int] = None,
) -> torch.Tensor:
    """Log-probability of each label: ``logp = x[label] - logsumexp(x)``, ``x = logits / temperature``.

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16; leading dims may be non-contiguous.
        labels: ``[...]`` int32/int64, aligned with ``logits`` (the caller shifts).
        temperature: float > 0; the gradient flows through the division.
        ignore_index: label giving logp 0 and exactly zero gradient.
        inplace_backward: write the logits' gradient into the logits' own storage during backward
            (saves ``N x V`` bytes). The logits then hold the gradient, so nothing else may need
            their values afterwards: another op that saved them for its own backward raises
            autograd's in-place error, and a second differentiation is refused.
        backend: ``"auto"`` / ``"triton"`` / ``"native"`` / ``"torch"`` (or ``$FASTRLHF_BACKEND``).
        process_group: vocab-parallel logits (each rank its contiguous shard; see ``fastrlhf.distributed``).
        support: ``(token_ids, offsets)``, the sampler's kept set per token in vLLM's CSR form (row n keeps
            ``token_ids[offsets[n]:offsets[n+1]]``): ``logp = x[label] - logsumexp_{v in S} x_v``, the
            gradient only on S (0 elsewhere). A label outside its row's set is a ``ValueError``.
        top_k: the kept set is the ``top_k`` largest tempered logits (ties as ``torch.topk``).
            See :mod:`fastrlhf.support` (and why top-p is replayed through ``support``).

    Returns:
        ``logp [...]`` fp32. Memory: no ``[N, V]`` temporary besides the logits' gradient (with
        ``support`` the forward reads only the kept logits; ``top_k`` reads ``[N, V]`` once for topk).
    """
    temperature, backend, offset = prepare(logits, labels, temperature, ignore_index, backend, process_group)
    return token_values(logits, labels, temperature, ignore_index, True, False, inplace_backward, backend,
                        process_group, offset, support=support, top_k=top_k)


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
    sum_p_squared: bool = False,
    support=None,
    top_k: Optional[int] = None,
) -> Tuple[torch.Tensor, ...]:
    """``(logp, entropy)`` per token from one pass over the vocabulary; both differentiable.

    ``entropy = logsumexp(x) - sum(softmax(x) * x)``; both are 0 where ``labels == ignore_index``.
    ``sum_p_squared=True`` returns ``(logp, entropy, sum_p2)`` with ``sum_p2 = sum_v softmax(x)_v^2``
    (verl's ``calculate_sum_pi_squared``), one more accumulator of the same pass, differentiable
    (``d sum_p2 / dx_j = 2 p_j (p_j - sum_p2)``). With ``support`` / ``top_k`` all three are over the
    renormalised kept-set distribution. See :func:`token_logprobs` for the other arguments.
    """
    temperature, backend, offset = prepare(logits, labels, temperature, ignore_index, backend, process_group)
    return token_values(logits, labels, temperature, ignore_index, True, True, inplace_backward, backend,
                        process_group, offset, want_sp2=bool(sum_p_squared), support=support, top_k=top_k)


def entropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per row, ``[...]`` fp32, differentiable."""
    temperature, backend, offset = prepare(logits, None, temperature, -100, backend, process_group)
    return token_values(logits, None, temperature, -100, False, True, inplace_backward, backend,
                        process_group, offset)


def mask_as_ignored(labels: torch.Tensor, mask: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """Labels with ``mask = 0`` tokens set to ``ignore_index``: the row pass then skips them (no read,
    zero gradient), so a NaN logit in a masked token cannot reach the loss."""
    if mask is None:
        return labels
    return labels.masked_fill(~mask.reshape(labels.shape).bool(), ignore_index)
