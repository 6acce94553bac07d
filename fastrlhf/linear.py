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

Dtypes: ``hidden``, ``weight`` and ``bias`` share one dtype (fp32 / bf16 / fp16, or fp64). For
bf16 / fp16 inputs the logits block is fp32 from an fp32-accumulating GEMM and is never rounded
to the input dtype (the "fp32 lm_head" precision RL trainers ask for: TRL's
``cast_lm_head_to_fp32``, vLLM's fp32 head): ``torch.mm(..., out_dtype=torch.float32)`` on CUDA,
an upcast of the hidden chunk and of one ``[vb, H]`` weight block at a time elsewhere
(``_linear_chunks._chunk_logits``). In backward the fp32 logits gradient is rounded once to the
input dtype before the two bf16 GEMMs (fp32-accumulating, ``out_dtype``) on CUDA, and kept fp32
against upcast weight blocks on CPU. fp32 / fp64 inputs: logits in that dtype, as ``hidden @
weight.T``. Under ``torch.autocast`` the three are cast to the autocast dtype first (as
autocast's own matmul would). Per-token outputs are fp32 (fp64 for fp64 inputs). The weight
(and bias) gradient is accumulated over chunks in fp32 by default (``accum_dtype=``): summing
many per-chunk contributions in bf16 is a known cause of training divergence.

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

from typing import Optional

import torch

from ._backend import resolve_backend
from ._linear_chunks import LinearLogprobsEntropy, LinearTokenSeparableLoss, default_chunk_size
from ._rows import out_dtype
from ._validate import FLOAT_DTYPES, check_dpo_refs, check_ignore_index, check_labels, check_temperature
from .dpo import check_dpo_args, pair_loss, sequence_logps, with_nll_term
from .logprobs import mask_as_ignored
from .policy_forms import rollout_stats, rollout_weights
from .ppo import _grpo, check_ppo_args
from .support import check_top_k, resolve_support
from .token_math import (
    counted_tokens,
    loss_agg_weights,
    per_token,
    policy_loss_from_logprobs,
    policy_stats,
    policy_terms,
)

Stats = dict

__all__ = [
    "linear_token_logprobs",
    "linear_token_logprobs_and_entropy",
    "linear_ppo_clip_loss",
    "linear_grpo_loss",
    "linear_dpo_loss",
    "default_chunk_size",
    "LinearLogprobsEntropy",
]

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
    for name, t in (("weight", weight), ("hidden", hidden), ("bias", bias)):
        if type(t).__name__ == "DTensor":  # an FSDP2 / tensor-parallel shard (torch.distributed.tensor)
            raise TypeError(
                f"{name} is a DTensor (e.g. an lm_head sharded by FSDP2's fully_shard); the linear_* ops need the "
                "full [V, H] weight as a plain tensor. Call the op inside the FSDP root module's forward, where "
                "FSDP2 has gathered the root's parameters (fastrlhf.algos.engine.RootForward does this), or keep "
                "the lm_head out of the sharded modules. Not weight.full_tensor(): its gradient skips FSDP's "
                "gradient reduction over the ranks"
            )
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
        block_dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        chunk = default_chunk_size(max(N, 1), V, block_dtype, hidden.device)  # the logits block is fp32 for bf16
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


def _support_spec(h2, weight, lab, support, top_k, temperature, ignore_index):
    """``None``, ``("csr", ids, off)`` (checked against the labels) or ``("top_k", k)`` for the chunks."""
    if support is None and top_k is None:
        return None
    V = weight.shape[0]
    if top_k is not None:
        if support is not None:
            raise ValueError("pass either support=(token_ids, offsets) or top_k, not both")
        check_top_k(top_k, V)
        return ("top_k", top_k)
    logits_like = torch.empty((), dtype=weight.dtype, device=h2.device).expand(lab.numel(), V)  # no memory
    return ("csr",) + resolve_support(logits_like, lab, support, None, temperature, ignore_index)


def _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, want_entropy, chunk_size, accum_dtype,
                    backend, want_sp2=False, support=None, top_k=None):
    """Checks, then ``(logp, ent)`` shaped like ``labels`` (``ent`` None unless wanted); ``want_sp2``:
    ``(logp, ent, sum_p2)``. ``support`` / ``top_k``: over each row's kept set (:mod:`fastrlhf.support`)."""
    h2, weight, bias, lab, temperature, backend, chunk, accum_dtype = _prepare(
        hidden, weight, bias, labels, temperature, ignore_index, chunk_size, accum_dtype, backend
    )
    spec = _support_spec(h2, weight, lab, support, top_k, temperature, ignore_index)
    logp, ent, sp2 = LinearLogprobsEntropy.apply(
        h2, weight, bias, lab, temperature, ignore_index, want_entropy, backend, chunk, accum_dtype, want_sp2, spec
    )
    shape = labels.shape
    out = logp.view(shape), (ent.view(shape) if ent is not None else None)
    return out + (sp2.view(shape),) if want_sp2 else out


def _use_fused_ppo(hidden, weight, bias, data) -> bool:
    """PPO / GRPO form their gradients in forward (:class:`LinearTokenSeparableLoss`) when autograd will
    want gradients of the parameters only; gradients of old / ref logprobs or advantages take the
    two-pass route (same per-token math, exact gradients in every input)."""
    if not torch.is_grad_enabled():
        return False
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (hidden, weight, bias)):
        return False
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in data)


def _fused_ppo_clip_loss(hidden, weight, bias, labels, old_logprobs, advantages, ref_logprobs, rollout_logprobs,
                         temperature, ignore_index, want_entropy, chunk_size, accum_dtype, backend, opts):
    h2, weight, bias, lab, temperature, backend, chunk, accum_dtype = _prepare(
        hidden, weight, bias, labels, temperature, ignore_index, chunk_size, accum_dtype, backend
    )
    odt = out_dtype(weight)
    counted = counted_tokens(labels, None, ignore_index)  # [B, T]; masked tokens already carry ignore_index
    shape = counted.shape
    rollout = {k: opts[k] for k in ("rollout_correction", "rollout_is_min", "rollout_is_max")}
    token_opts = {k: v for k, v in opts.items() if k != "loss_agg" and k not in rollout}
    # Per-token constants of the loss, flattened to [N]: loss = sum_n w_n * l_n with the
    # aggregation weights w of loss_agg (fixed by the mask alone).
    flat = {
        "w": loss_agg_weights(counted, opts["loss_agg"], odt).reshape(-1),
        "counted": counted.reshape(-1),
        "old": per_token(old_logprobs, shape, odt).reshape(-1),
        "adv": per_token(advantages, shape, odt).reshape(-1),
        "ref": per_token(ref_logprobs, shape, odt).reshape(-1) if ref_logprobs is not None else None,
        "isw": None,
    }
    if rollout["rollout_correction"] is not None:
        # The rollout correction weight depends on old and rollout logprobs only (sequence modes too):
        # known before the logits, so it stays a per-token constant of the fused pass.
        isw, corrected, units = rollout_weights(flat["old"].view(shape), per_token(rollout_logprobs, shape, odt),
                                                counted, rollout["rollout_correction"], rollout["rollout_is_min"],
                                                rollout["rollout_is_max"])
        flat["isw"] = isw.reshape(-1)
    extra = {k: torch.zeros(counted.numel(), dtype=odt, device=counted.device) for k in ("ratio", "clipped", "kl")}

    def token_grads(sel, put, logp_c, ent_c):
        # The per-token PPO math of this chunk, once, with its closed-form derivatives.
        c = {k: None if v is None else sel(v)[None] for k, v in flat.items()}  # [1, n] each
        t = policy_terms(logp_c.to(odt)[None], None if ent_c is None else ent_c.to(odt)[None], c["old"], c["adv"],
                         c["ref"], c["w"], c["counted"], is_weight=c["isw"], **token_opts)
        for k, v in (("ratio", t.ratio), ("clipped", t.clipped), ("kl", t.kl)):
            if v is not None:
                put(extra[k], v[0].to(odt))
        return t.loss, t.d_logp[0], (t.d_entropy[0] if t.d_entropy is not None else None)

    loss, logp, ent = LinearTokenSeparableLoss.apply(
        h2, weight, bias, lab, token_grads, temperature, ignore_index, want_entropy, backend, chunk, accum_dtype,
    )
    with torch.no_grad():
        stats = policy_stats(
            extra["ratio"].view(shape), extra["clipped"].view(shape).bool(),
            extra["kl"].view(shape) if opts["kl_coef"] > 0 else None, logp.view(shape), flat["old"].view(shape),
            ent.view(shape) if want_entropy else None, counted,
        )
        if flat["isw"] is not None:
            stats.update(rollout_stats(flat["isw"].view(shape), corrected, units))
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
    support=None,
    top_k: Optional[int] = None,
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
        support: ``(token_ids, offsets)``, the sampler's kept set per token (vLLM's CSR, as
            :func:`fastrlhf.token_logprobs`): logp renormalised over it, from each chunk's gathered kept
            logits; the logits' gradient is 0 outside the set. A counted label outside its set: ``ValueError``.
        top_k: the kept set is the ``top_k`` largest tempered fp32 logits, chosen per chunk.

    Returns:
        ``logp [...]`` fp32, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    _no_process_group(process_group)
    logp, _ = _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, False, chunk_size,
                              accum_dtype, backend, support=support, top_k=top_k)
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
    sum_p_squared: bool = False,
    support=None,
    top_k: Optional[int] = None,
) -> tuple[torch.Tensor, ...]:
    """``(logp, entropy)`` per token from ``hidden @ weight.T + bias``; both differentiable.

    Same values as :func:`fastrlhf.token_logprobs_and_entropy` on the full logits (both 0 where
    ``labels == ignore_index``); ``sum_p_squared=True`` adds ``sum_p2 = sum_v softmax(x)_v^2``
    (differentiable, same pass). Arguments as :func:`linear_token_logprobs`; with ``support`` / ``top_k``
    all values are over each row's kept set.
    """
    _no_process_group(process_group)
    return _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, True, chunk_size,
                           accum_dtype, backend, want_sp2=bool(sum_p_squared), support=support, top_k=top_k)


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
    policy_loss: str = "clip",
    ratio_level: str = "token",
    ratio_cap: Optional[float] = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    kl_is_correction: bool = False,
    rollout_logprobs: Optional[torch.Tensor] = None,
    rollout_correction: Optional[str] = None,
    rollout_is_min: Optional[float] = None,
    rollout_is_max: Optional[float] = None,
    support=None,
    top_k: Optional[int] = None,
) -> tuple[torch.Tensor, Stats]:
    """:func:`fastrlhf.ppo_clip_loss` (Schulman et al. 2017, eq. 7) on ``hidden @ weight.T + bias``.

    Identical loss, stats and options (clip-higher, dual clip, ``ratio_cap``, KL and entropy
    terms, the four ``loss_agg`` modes, ``policy_loss`` clip / cispo / sapo, ``kl_is_correction``,
    every ``rollout_correction``); the logits exist one ``[chunk, V]`` block at a time. Gradients
    flow to ``hidden``, ``weight`` and ``bias``. ``chunk_size`` / ``accum_dtype`` as
    :func:`linear_token_logprobs`.

    Token-local losses (``ratio_level="token"``, any form and rollout correction: its weight
    depends on old / rollout logprobs only) take the fused route, 3 ``N x V x H`` matmuls (logits,
    then ``dh`` and ``dW`` from each chunk's gradient formed in forward). GSPO's
    ``ratio_level="sequence"`` needs every token's logp of a sequence before any gradient, so it
    takes the two-pass route: 4 matmuls (the logits are recomputed chunk by chunk in backward),
    one ``[chunk, V]`` block at a time either way, like :func:`linear_dpo_loss`.
    ``support`` / ``top_k`` (the sampler's kept set, as :func:`linear_token_logprobs`) also take the
    two-pass route: logp and entropy over each row's kept set, gradients only there.
    """
    _no_process_group(process_group)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    ignore_index = check_ignore_index(ignore_index)
    opts = check_ppo_args(labels, old_logprobs, advantages, mask, ref_logprobs, dict(
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, loss_agg=loss_agg, policy_loss=policy_loss, ratio_level=ratio_level,
        ratio_cap=ratio_cap, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, kl_is_correction=kl_is_correction,
        rollout_correction=rollout_correction, rollout_is_min=rollout_is_min, rollout_is_max=rollout_is_max,
    ), rollout_logprobs)
    want_entropy = opts["entropy_coef"] > 0 or compute_entropy
    ref_logprobs = ref_logprobs if opts["kl_coef"] > 0 else None
    labels = mask_as_ignored(labels, mask, ignore_index)
    token_local = opts["ratio_level"] == "token" and support is None and top_k is None
    if token_local and _use_fused_ppo(hidden, weight, bias, (old_logprobs, advantages, ref_logprobs)):
        return _fused_ppo_clip_loss(hidden, weight, bias, labels, old_logprobs, advantages, ref_logprobs,
                                    rollout_logprobs, temperature, ignore_index, want_entropy, chunk_size, accum_dtype,
                                    backend, opts)
    logp, ent = _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, want_entropy, chunk_size,
                                accum_dtype, backend, support=support, top_k=top_k)
    return policy_loss_from_logprobs(logp, counted_tokens(labels, None, ignore_index), old_logprobs, advantages,
                                     entropy=ent, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, **opts)


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
    return _grpo(linear_ppo_clip_loss, hidden, labels, old_logprobs, advantages, ref_logprobs, beta, kwargs,
                 weight=weight)


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
    length_normalize: bool = False,
    rpo_alpha: Optional[float] = None,
    chunk_size: Optional[int] = None,
    accum_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    process_group=None,
) -> tuple[torch.Tensor, Stats]:
    """:func:`fastrlhf.dpo_loss` (Rafailov et al. 2023, eq. 7) on ``hidden [2B, T, H] @ weight.T + bias``.

    Rows ``0..B-1`` chosen, ``B..2B-1`` rejected (TRL's concatenation); prompt and padding tokens
    carry ``ignore_index`` labels and are skipped entirely. Loss types ``sigmoid`` / ``hinge`` /
    ``ipo`` / ``robust``, ``length_normalize``, ``rpo_alpha`` and stats as the logits version. The token
    gradients depend on the
    sequence sums, so the logits are computed twice (forward, and again chunk by chunk in
    backward); never more than one ``[chunk, V]`` block exists.
    """
    _no_process_group(process_group)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"hidden must be [2B, T, H] (chosen rows then rejected rows), got {tuple(hidden.shape)}")
    beta, label_smoothing = check_dpo_args(loss_type, beta, label_smoothing, rpo_alpha)
    B = hidden.shape[0] // 2
    check_dpo_refs(ref_chosen_logps, ref_rejected_logps, B, hidden.device)
    logp, _ = _linear_forward(hidden, weight, bias, labels, temperature, ignore_index, False, chunk_size,
                              accum_dtype, backend)
    counted = labels != ignore_index
    seq = sequence_logps(logp, counted, mean=loss_type == "ipo" or bool(length_normalize))  # [2B]
    loss, stats = pair_loss(seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                            label_smoothing=label_smoothing)
    return with_nll_term(loss, stats, logp, counted, B, rpo_alpha)
