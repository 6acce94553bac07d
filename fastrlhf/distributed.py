"""Vocab-parallel (tensor-parallel) logits: exact global token ops from vocabulary shards.

Each rank of ``process_group`` holds ``logits[..., V_r]``, a contiguous shard of the vocabulary,
shards in rank order (sizes may differ: 151936 over 3 ranks is fine); labels are global ids.
Per row, with ``x`` the temperature-scaled logits and each rank's local ``(lse_r, H_r)`` from
one streaming pass over its shard:

    lse   = log sum_r exp(lse_r)                       all-reduce MAX, then SUM of exp(lse_r - max)
    E     = sum_r exp(lse_r - lse) * (lse_r - H_r)     all-reduce SUM  (E = sum_v p_v x_v)
    x_lab = the label's logit, from the rank owning it all-reduce SUM (0 elsewhere)
    logp  = x_lab - lse,   H = lse - E
    S2    = sum_r exp(2 (lse_r - lse)) * S2_r          all-reduce SUM  (sum_p_squared; S2_r the shard's own)

i.e. three or four all-reduces of ``[N]`` fp32 tensors; the vocabulary is never gathered. The
backward needs no communication: each rank writes the gradient of its own shard from the global
``lse``, ``E`` and ``S2`` (``inv_temp * (dlogp * (onehot - p) - dH * p * (x - E) + 2 dS2 * p * (p - S2))``;
the one-hot term only on the rank that owns the label).

Backends: the local passes use the requested backend; the gradient pass of ``native`` runs on
the chunked torch path (the native pass rejects labels outside its shard by design).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ._rows import (
    alloc_row_outputs,
    as_rows3d,
    check_inplace,
    finish_row_forward,
    first_order_only,
    row_backward_from_ctx,
    row_forward,
)

__all__ = ["shard_offset", "VocabParallelLogprobsEntropy"]


def shard_offset(local_vocab: int, group) -> Tuple[int, int]:
    """``(offset of this rank's shard, global V)`` from every rank's shard size (one tiny all-gather)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    nccl = dist.get_backend(group) == "nccl"  # NCCL only moves CUDA tensors
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local_vocab], dtype=torch.int64, device=dev), group=group)
    sizes = [int(s.item()) for s in sizes]
    return sum(sizes[:rank]), sum(sizes)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


class VocabParallelLogprobsEntropy(torch.autograd.Function):
    """``(logp?, entropy?, sum_p2?)`` of the global softmax from this rank's vocabulary shard."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward,
                backend, group, offset, want_sp2=False):
        x3 = as_rows3d(logits)  # [B, T, V_r]
        if inplace_backward:
            check_inplace(logits)
        B, T, V_r = x3.shape
        N = B * T
        inv_temp = 1.0 / temperature
        sp2_r = alloc_row_outputs(x3, False, False)[2] if want_sp2 else None  # [N] sum of q^2, q the shard's softmax
        _, ent_r, lse_r = row_forward(backend, x3, None, inv_temp, ignore_index, True, sp2_r)  # [N] each, local
        lse_r = lse_r.float()
        ent_r = ent_r.float()
        gmax = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, group)  # [N]
        gmax_safe = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
        mass_r = torch.exp(lse_r - gmax_safe)  # this shard's share of sum exp, relative to the max
        lse = gmax_safe + torch.log(_all_reduce(mass_r.clone(), dist.ReduceOp.SUM, group))
        w_r = torch.exp(lse_r - lse)  # softmax mass of this shard
        e_r = torch.where(w_r > 0, w_r * (lse_r - ent_r), torch.zeros_like(w_r))
        big_e = _all_reduce(e_r, dist.ReduceOp.SUM, group)  # E = sum_v p_v x_v
        ent = lse - big_e  # [N]
        sp2 = None
        if want_sp2:  # p_v = q_v * w_r on this shard, so S2 = sum_r w_r^2 S2_r
            sp2 = _all_reduce(torch.where(w_r > 0, w_r * w_r * sp2_r.float(), torch.zeros_like(w_r)),
                              dist.ReduceOp.SUM, group)
        lab_local = None
        logp = None
        if labels is not None:
            lab = labels.reshape(-1).long()
            valid = lab != ignore_index
            local = lab - offset
            mine = valid & (local >= 0) & (local < V_r)
            n_idx = torch.arange(N, device=logits.device)
            safe = torch.where(mine, local, torch.zeros_like(local))
            x_lab = x3[n_idx // T, n_idx % T, safe].float() * inv_temp  # [N] gather, not [N, V]
            x_lab = _all_reduce(torch.where(mine, x_lab, torch.zeros_like(x_lab)), dist.ReduceOp.SUM, group)
            logp = torch.where(valid, x_lab - lse, torch.zeros_like(lse))
            ent = torch.where(valid, ent, torch.zeros_like(ent))
            sp2 = None if sp2 is None else torch.where(valid, sp2, torch.zeros_like(sp2))
            # Rows whose label lives on another rank still get a gradient, without a one-hot term:
            # a sentinel outside [0, V_r) that is not ignore_index.
            sentinel = V_r if ignore_index != V_r else V_r + 1
            lab_local = torch.where(mine, local, torch.full_like(local, sentinel))
            lab_local = torch.where(valid, lab_local, torch.full_like(local, ignore_index)).contiguous()
        # The gradient pass of native rejects labels outside its shard by design: torch rows there.
        return finish_row_forward(ctx, logits, lab_local, lse, ent, logp, inv_temp=inv_temp,
                                  ignore_index=ignore_index, inplace_backward=inplace_backward,
                                  backend="torch" if backend == "native" else backend, want_logp=want_logp,
                                  want_entropy=want_entropy, sp2=sp2)

    @staticmethod
    @first_order_only
    def backward(ctx, *grads):
        return (row_backward_from_ctx(ctx, grads),) + (None,) * 10


def vocab_parallel_token_values(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    temperature: float,
    ignore_index: int,
    want_logp: bool,
    want_entropy: bool,
    inplace_backward: bool,
    backend: str,
    group,
    offset: int,
    want_sp2: bool = False,
):
    return VocabParallelLogprobsEntropy.apply(
        logits, labels, temperature, ignore_index, want_logp, want_entropy, inplace_backward, backend, group, offset,
        want_sp2,
    )
