"""TRL drop-ins: TRL's logprob / entropy functions with TRL's signatures, backed by fastrlhf ops.

Usage::

    import fastrlhf.integrations.trl as fr_trl
    handle = fr_trl.patch()        # before building the trainer; handle.undo() restores TRL
    trainer = GRPOTrainer(...)     # or: with fr_trl.patch(): ...

What is replaced (sources read: ``trl/trainer/utils.py``, ``trl/kernels/chunked_logprob.py``
and ``trl/kernels/logprob_entropy.py`` of TRL 1.16.0, the version tested):

- ``trl.trainer.utils.selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``
  (TRL >= 0.14; ``temperature``/``row_mask`` in 1.x) -> :func:`selective_log_softmax`.
- ``trl.trainer.utils.entropy_from_logits(logits, chunk_size=128)`` -> :func:`entropy_from_logits`.
- ``trl.trainer.utils.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True,
  temperature=1.0, row_mask=None)`` -> :func:`selective_log_softmax_and_entropy`.
- ``trl.kernels.logprob_entropy.selective_log_softmax_and_entropy(logits, index, temperature=1.0,
  row_mask=None)`` (TRL's Triton kernel, CUDA/XPU only; imported by ``trl.trainer.utils`` as
  ``_fused_logprob_entropy``) -> :func:`fused_selective_log_softmax_and_entropy`.
- ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` (also ``trl.trainer.utils.
  _ChunkedLogProbFunction``) -> :class:`ChunkedLogProbFunction`. In TRL 1.x this is the one
  that matters: ``GRPOTrainer``, ``DPOTrainer`` and ``RLOOTrainer`` no longer call
  ``selective_log_softmax``; ``add_fused_lm_head`` makes the model return per-token
  log-probabilities from the last hidden state through this function.

Semantics kept from TRL: output shapes; output dtype (TRL's Triton path, taken on CUDA/XPU,
returns fp32; its torch path returns the logits' dtype: we do the same per device); ``row_mask``
rows give 0 and no gradient; ``entropy_requires_grad=False`` detaches the entropy.
Differences: values are computed in fp32 whatever the logits' dtype (TRL's bf16 torch path
computes ``log_softmax`` in bf16: ours is closer to the exact value); an ``index`` of -100
gives 0 instead of an indexing error.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Optional, Union

import torch

from .. import logprobs as ops
from ._patch import PatchHandle, Target, apply_patch, check_params, ensure_tensor, replace_with, replace_with_class

__all__ = [
    "selective_log_softmax",
    "entropy_from_logits",
    "selective_log_softmax_and_entropy",
    "fused_selective_log_softmax_and_entropy",
    "ChunkedLogProbFunction",
    "patch",
]

# Masked rows are sent to fastrlhf as ignore_index labels: logp = entropy = 0, zero gradient.
_IGNORE = -100

# trl.kernels.chunked_logprob.OPTIONAL_OUTPUTS (TRL 1.16).
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

# Elements of one [rows, V] logits block in ChunkedLogProbFunction: 2^27 = 256 MiB in bf16, the
# size of TRL's own [4096, 32768] tile; a module constant so tests can force small blocks.
BLOCK_ELEMENTS = 2**27


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    # TRL 1.16 takes its Triton kernel (fp32 outputs) for fp16/bf16/fp32 logits on CUDA/XPU
    # (trl/trainer/utils.py::_supports_trl_loss_kernel) and the torch path (logits' dtype) elsewhere.
    if logits.dtype in (torch.float16, torch.bfloat16) and logits.device.type in ("cuda", "xpu"):
        return torch.float32
    return logits.dtype


def _check_index(logits: torch.Tensor, index: torch.Tensor, row_mask: Optional[torch.Tensor]) -> None:
    ensure_tensor(logits, "logits")
    ensure_tensor(index, "index")
    if logits.dim() < 1:
        raise ValueError("logits must be [..., V]")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    one = index.dim() == logits.dim() - 1 and tuple(index.shape) == tuple(logits.shape[:-1])
    many = index.dim() == logits.dim() and tuple(index.shape[:-1]) == tuple(logits.shape[:-1])
    if not (one or many):
        raise ValueError(
            f"index must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])} or "
            f"{tuple(logits.shape[:-1])} + (K,), got {tuple(index.shape)}"
        )
    if row_mask is not None:
        ensure_tensor(row_mask, "row_mask")
        if tuple(row_mask.shape) != tuple(index.shape):
            raise ValueError(f"row_mask must have the shape of index {tuple(index.shape)}, got {tuple(row_mask.shape)}")


def _as_rows(logits: torch.Tensor, index: Optional[torch.Tensor]):
    """fastrlhf ops take ``[..., V]`` with at least 2 dims: lift a single ``[V]`` row to ``[1, V]``."""
    if logits.dim() == 1:
        return logits.unsqueeze(0), (None if index is None else index.unsqueeze(0)), True
    return logits, index, False


def _labels(index: torch.Tensor, row_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return index if row_mask is None else index.masked_fill(row_mask == 0, _IGNORE)


class _GatherK(torch.autograd.Function):
    """``log_softmax(x / T)`` gathered at ``K`` indices per row (``index [..., K]``), fp32.

    Forward: one fastrlhf pass for the first index gives ``lse = x[i_0] / T - logp_0`` (the
    logsumexp once per row, not K times); ``logp_k = x[i_k] / T - lse`` is an ``[..., K]`` gather.
    Backward: ``d/dx = (sum_k g_k onehot(i_k) - G p) / T`` with ``G = sum_k g_k``: fastrlhf's
    backward of that first pass with upstream ``G`` writes ``G (onehot(i_0) - p) / T`` (rounded
    once to the logits' dtype), then the ``K`` gathered entries are overwritten with their exact
    value, computed in fp32 and rounded once. Adding a separately rounded sparse correction
    instead would cancel ``G (1 - p) - G`` in bf16 at ``i_0`` (errors up to 4x the rounding).
    """

    @staticmethod
    def forward(ctx, logits, index, temperature):
        idx = index.long()
        with torch.enable_grad():  # keep the fastrlhf graph: its backward is reused below
            x = logits.detach().requires_grad_(logits.requires_grad)
            logp0 = ops.token_logprobs(x, idx[..., 0], temperature=temperature)  # [...] fp32
        picked = logits.gather(-1, idx).float()  # [..., K]
        lse = picked[..., 0] / temperature - logp0.detach()  # [...]
        ctx.graph = (x, logp0)
        ctx.save_for_backward(logits, idx, lse)
        ctx.temperature = temperature
        return picked / temperature - lse.unsqueeze(-1)

    @staticmethod
    def backward(ctx, g):
        logits, idx, lse = ctx.saved_tensors
        x, logp0 = ctx.graph
        T = ctx.temperature
        g = g.float()
        G = g.sum(-1)  # [...]
        (dlogits,) = torch.autograd.grad(logp0, x, G)  # G (onehot(i_0) - p) / T, logits' dtype
        p = torch.exp(logits.gather(-1, idx).float() / T - lse.unsqueeze(-1))  # [..., K]
        same = (idx.unsqueeze(-1) == idx.unsqueeze(-2)).float()  # [..., K, K]: repeated indices
        exact = ((same * g.unsqueeze(-2)).sum(-1) - G.unsqueeze(-1) * p) / T  # [..., K]
        dlogits.scatter_(-1, idx, exact.to(dlogits.dtype))
        ctx.graph = None
        return dlogits, None, None


def _k_logprobs(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` at ``index [..., K]``, fp32 (see :class:`_GatherK`)."""
    return _GatherK.apply(logits, index, temperature)


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: ``log_softmax(logits / temperature)`` gathered at ``index``.

    Same as ``torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)`` for
    ``index [...]``, and ``torch.gather(logits.log_softmax(-1), -1, index)`` for ``index [..., K]``
    (trl/trainer/utils.py, TRL 1.16), without the ``[..., V]`` log-softmax: one streaming
    fastrlhf pass (``fastrlhf.token_logprobs``). ``row_mask`` (shape of ``index``): entries where
    it is 0 give 0 and no gradient. Output dtype as TRL: fp32 on CUDA/XPU, else the logits' dtype.
    """
    _check_index(logits, index, row_mask)
    x, idx, lifted = _as_rows(logits, index)
    mask = None if row_mask is None else (row_mask.unsqueeze(0) if lifted else row_mask)
    if idx.dim() == x.dim() - 1:
        logp = ops.token_logprobs(x, _labels(idx, mask), temperature=temperature)
    else:
        logp = _k_logprobs(x, idx, temperature)
        if mask is not None:
            logp = logp.masked_fill(mask == 0, 0.0)
    if lifted:
        logp = logp.squeeze(0)
    return logp.to(_out_dtype(logits))


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits``: Shannon entropy (nats) of ``softmax(logits)`` per row, ``logits.shape[:-1]``.

    ``chunk_size`` (rows per chunk in TRL) is accepted and checked; fastrlhf streams the
    vocabulary per row, so no ``[chunk, V]`` softmax is made at all. Differentiable. Output
    dtype as TRL: fp32 on CUDA/XPU, else the logits' dtype.
    """
    ensure_tensor(logits, "logits")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    x, _, lifted = _as_rows(logits, None)
    ent = ops.entropy(x)
    if lifted:
        ent = ent.squeeze(0)
    return ent.to(_out_dtype(logits))


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``trl.trainer.utils.selective_log_softmax_and_entropy``: ``(logprobs, entropy)`` in one pass.

    Both from ``logits / temperature``; ``row_mask`` rows give 0 for both and no gradient;
    ``entropy_requires_grad=False`` returns a detached entropy (TRL computes it under
    ``no_grad``). One fastrlhf pass (``token_logprobs_and_entropy``) for ``index [...]``;
    ``index [..., K]`` (no ``row_mask``, as TRL, whose masking of ``[...]`` entropies by a
    ``[..., K]`` mask fails) takes two. Output dtypes as TRL: fp32 on CUDA/XPU, else the logits'.
    """
    _check_index(logits, index, row_mask)
    x, idx, lifted = _as_rows(logits, index)
    if idx.dim() == x.dim() - 1:
        mask = None if row_mask is None else (row_mask.unsqueeze(0) if lifted else row_mask)
        logp, ent = ops.token_logprobs_and_entropy(x, _labels(idx, mask), temperature=temperature)
    else:
        if row_mask is not None:
            raise ValueError("row_mask needs index of shape logits.shape[:-1] (one index per row)")
        logp = _k_logprobs(x, idx, temperature)
        ent = ops.entropy(x, temperature=temperature)
    if not entropy_requires_grad:
        ent = ent.detach()
    if lifted:
        logp, ent = logp.squeeze(0), ent.squeeze(0)
    out = _out_dtype(logits)
    return logp.to(out), ent.to(out)


def fused_selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's Triton ``trl.kernels.logprob_entropy.selective_log_softmax_and_entropy``: fp32 ``(logprobs, entropy)``.

    Same signature and semantics (one index per row, ``row_mask`` rows give 0 and no gradient,
    both outputs differentiable, fp32), on any device: CUDA runs fastrlhf's Triton kernels,
    CPU its native/torch path.
    """
    _check_index(logits, index, row_mask)
    x, idx, lifted = _as_rows(logits, index)
    if idx.dim() != x.dim() - 1:
        raise ValueError(f"index must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    mask = None if row_mask is None else (row_mask.unsqueeze(0) if lifted else row_mask)
    logp, ent = ops.token_logprobs_and_entropy(x, _labels(idx, mask), temperature=temperature)
    if lifted:
        logp, ent = logp.squeeze(0), ent.squeeze(0)
    return logp.float(), ent.float()


# ----------------------------------------------------------------------------------------
# TRL 1.x fused LM head: per-token logprobs from hidden states (ChunkedLogProbFunction)
# ----------------------------------------------------------------------------------------


def _transform(z: torch.Tensor, logit_scale: float, softcap: Optional[float], temperature: float):
    """TRL's logit transform ``z * scale -> softcap * tanh(. / softcap) -> / T`` as ``(x, temperature)``.

    Without softcapping and with ``scale > 0`` the scale folds into the temperature and ``z``
    goes to fastrlhf untouched (no ``[rows, V]`` fp32 copy); otherwise the transform is applied
    in fp32 (trl/kernels/chunked_logprob.py::_torch_transform), giving fastrlhf temperature 1.
    """
    if softcap is None and logit_scale > 0:
        return z, temperature / logit_scale
    y = z.float() * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    return y / temperature, 1.0


def _row_blocks(n: int, vocab: int):
    rows = max(1, min(n, BLOCK_ELEMENTS // max(vocab, 1)))
    for r0 in range(0, n, rows):
        yield r0, min(r0 + rows, n)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # As TRL: the autocast dtype when autocast is on, else the hidden states' dtype.
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def _gather_ctx(weight, bias):
    """TRL's ZeRO-3 all-gather of the LM head around the backward projection (no-op elsewhere)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except Exception:  # TRL absent or too old: no sharded head to gather
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(weight, bias)


class ChunkedLogProbFunction(torch.autograd.Function):
    """TRL 1.x's ``ChunkedLogProbFunction`` (trl/kernels/chunked_logprob.py): per-token outputs of
    ``hidden @ weight.T (+ bias)`` without the ``[N, V]`` logits, on fastrlhf token ops.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS)`` returns
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]`` (fp32; ``is_top1``
    bool) or None when not in ``outputs``; ``log_probs`` and ``entropy`` are differentiable. With
    ``x = softcap(z * logit_scale) / temperature``: ``log_sum_sq_probs = log sum_v p_v^2``,
    ``mean_logits = mean_v x_v``, ``is_top1 = argmax_v x_v == target`` (first maximum).

    Forward, per block of rows: ``z = hidden_c @ weight.T (+ bias)`` in the compute dtype (the
    autocast dtype, else the hidden states'), then one fastrlhf pass
    (``token_logprobs_and_entropy``) keeps ``[rows]`` values only. Backward recomputes each
    block and differentiates the fastrlhf pass, accumulating the weight/bias gradients in fp32.
    Memory: one ``[rows, V]`` block (``BLOCK_ELEMENTS``) and its gradient; ``chunk_size`` (TRL's
    vocabulary tile width) is accepted and unused, fastrlhf streams the vocabulary itself.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        ctx.set_materialize_grads(False)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
        N, V = hidden.shape[0], weight.shape[0]
        cd = _compute_dtype(hidden)
        want = {name: name in outputs for name in OPTIONAL_OUTPUTS}
        dev = hidden.device
        logp = torch.empty(N, device=dev, dtype=torch.float32)  # [N]
        ent = torch.empty(N, device=dev, dtype=torch.float32) if want["entropy"] else None
        lssp = torch.empty(N, device=dev, dtype=torch.float32) if want["log_sum_sq_probs"] else None
        mean = torch.empty(N, device=dev, dtype=torch.float32) if want["mean_logits"] else None
        top1 = torch.empty(N, device=dev, dtype=torch.bool) if want["is_top1"] else None
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            for r0, r1 in _row_blocks(N, V):
                z = hidden[r0:r1].to(cd) @ w.t()  # [rows, V] in the compute dtype, as TRL's tile
                if b is not None:
                    z += b
                x, t = _transform(z, logit_scale, final_logit_softcapping, temperature)
                tgt = targets[r0:r1]
                if ent is not None:
                    lp, e = ops.token_logprobs_and_entropy(x, tgt, temperature=t)
                    ent[r0:r1] = e
                else:
                    lp = ops.token_logprobs(x, tgt, temperature=t)
                logp[r0:r1] = lp
                if lssp is not None or mean is not None or top1 is not None:
                    xf = x.float() / t  # [rows, V] fp32: only for these logging outputs
                    if lssp is not None:
                        # log sum p^2 = logsumexp(2x) - 2 logsumexp(x)
                        lssp[r0:r1] = torch.logsumexp(2 * xf, -1) - 2 * torch.logsumexp(xf, -1)
                    if mean is not None:
                        mean[r0:r1] = xf.mean(-1)
                    if top1 is not None:
                        top1[r0:r1] = xf.argmax(-1) == tgt  # argmax returns the first maximum, as TRL's rule
                    del xf
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.cfg = (cd, temperature, final_logit_softcapping, logit_scale)
        ctx.mark_non_differentiable(*(o for o in (lssp, mean, top1) if o is not None))
        return logp, ent, lssp, mean, top1

    @staticmethod
    def backward(ctx, dlogp, dent, *_):
        hidden, weight, bias, targets = ctx.saved_tensors
        cd, temperature, softcap, scale = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 6
        if dlogp is None and dent is None:
            return (None, None, None) + none
        N, V = hidden.shape[0], weight.shape[0]
        gh = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_h else None
        gw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        gb = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if (need_b and bias is not None) else None
        with _gather_ctx(weight, bias):
            w = weight.detach().to(cd).requires_grad_(need_w)
            b = None if bias is None else bias.detach().to(cd).requires_grad_(bool(need_b))
            for r0, r1 in _row_blocks(N, V):
                with torch.enable_grad():
                    h = hidden[r0:r1].detach().to(cd).requires_grad_(need_h)
                    z = h @ w.t()  # [rows, V] recomputed
                    if b is not None:
                        z = z + b
                    x, t = _transform(z, scale, softcap, temperature)
                    tgt = targets[r0:r1]
                    outs, grads = [], []
                    if dent is not None:
                        lp, e = ops.token_logprobs_and_entropy(x, tgt, temperature=t)
                        outs, grads = [e], [dent[r0:r1]]
                        if dlogp is not None:
                            outs.append(lp)
                            grads.append(dlogp[r0:r1])
                    else:
                        outs, grads = [ops.token_logprobs(x, tgt, temperature=t)], [dlogp[r0:r1]]
                    wrt = [p for p in (h, w, b) if p is not None and p.requires_grad]
                    if not wrt:
                        break
                    got = dict(zip(map(id, wrt), torch.autograd.grad(outs, wrt, grads)))
                if gh is not None:
                    gh[r0:r1] = got[id(h)]
                if gw is not None:
                    gw += got[id(w)]
                if gb is not None:
                    gb += got[id(b)]
        return (
            None if gh is None else gh.to(hidden.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
        ) + none


def patch(module: Union[str, types.ModuleType, None] = None) -> PatchHandle:
    """Replace TRL's logprob/entropy functions by the fastrlhf-backed ones of this module.

    Every loaded ``trl.*`` module holding one of them by name (or alias) is rewritten; call
    it before building the trainer. Returns a :class:`~fastrlhf.integrations._patch.PatchHandle`
    (``undo()``, or use it as a context manager). Targets the installed TRL lacks, or whose
    signature differs, are skipped with an ``IntegrationWarning``.

    Args:
        module: the package to patch: ``"trl"`` (default), another name, or a module (a
            stand-in tree in tests). Raises ``ImportError`` if it cannot be imported.
    """
    targets = [
        Target("trainer.utils", "selective_log_softmax", replace_with(selective_log_softmax),
               check_params(["logits", "index", "temperature", "row_mask"])),
        Target("trainer.utils", "entropy_from_logits", replace_with(entropy_from_logits),
               check_params(["logits", "chunk_size"])),
        Target("trainer.utils", "selective_log_softmax_and_entropy",
               replace_with(selective_log_softmax_and_entropy),
               check_params(["logits", "index", "entropy_requires_grad", "temperature", "row_mask"])),
        Target("kernels.logprob_entropy", "selective_log_softmax_and_entropy",
               replace_with(fused_selective_log_softmax_and_entropy),
               check_params(["logits", "index", "temperature", "row_mask"])),
        Target("kernels.chunked_logprob", "ChunkedLogProbFunction", replace_with_class(ChunkedLogProbFunction),
               check_params(["hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                             "final_logit_softcapping", "logit_scale", "outputs"], skip_first=True, attr="forward")),
    ]
    return apply_patch("trl" if module is None else module, targets, label="TRL", install_hint="pip install trl",
                       caller="fastrlhf.integrations.trl")
