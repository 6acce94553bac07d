"""Generalized advantage estimation with masked (skipped) tokens (Triton).

Reference: ``fastrlhf.reference.gae`` (the oracle); public wrapper ``fastrlhf.gae``.

Math (Schulman et al. 2016, eq. 16), per row, scanning t = T-1 .. 0 over counted tokens only:
    delta_t = r_t + gamma * V_next - V_t
    A_t     = delta_t + gamma * lam * A_next
    returns = A_t + V_t
where ``next`` is the next *counted* token (V_next = A_next = 0 after the last one);
uncounted tokens keep (V_next, A_next) unchanged and get A = returns = 0 (verl's multi-turn GAE).

Shapes: rewards, values, mask ``[B, T]`` (any strides); outputs ``[B, T]`` fp32.
Parallelism: ``BLOCK_B`` sequences per program, the scan over T sequential; memory moved is
``3 x B x T`` reads and ``2 x B x T`` writes, negligible next to the logits passes.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _gae_kernel(
    # pointers
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr,
    # sizes
    B, T,
    # strides (elements)
    stride_rb, stride_rt, stride_vb, stride_vt, stride_mb, stride_mt,
    # scalars
    gamma, lam,
    # meta
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    next_v = tl.zeros([BLOCK_B], dtype=tl.float32)
    next_a = tl.zeros([BLOCK_B], dtype=tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        r = tl.load(r_ptr + rows64 * stride_rb + t * stride_rt, mask=rmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows64 * stride_vb + t * stride_vt, mask=rmask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + rows64 * stride_mb + t * stride_mt, mask=rmask, other=0.0) != 0
        delta = r + gamma * next_v - v
        a = delta + gamma * lam * next_a
        out = rows64 * T + t
        tl.store(adv_ptr + out, tl.where(m, a, 0.0), mask=rmask)
        tl.store(ret_ptr + out, tl.where(m, a + v, 0.0), mask=rmask)
        next_v = tl.where(m, v, next_v)
        next_a = tl.where(m, a, next_a)


def gae_forward(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch helper behind :func:`fastrlhf.gae` (inputs validated there)."""
    B, T = rewards.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=rewards.device)  # [B, T]
    ret = torch.empty(B, T, dtype=torch.float32, device=rewards.device)  # [B, T]
    if B == 0 or T == 0:
        return adv, ret
    if mask.dtype == torch.bool:
        mask = mask.to(torch.uint8)  # bool pointers load as int1; bytes are portable
    block_b = min(64, triton.next_power_of_2(B))
    _gae_kernel[(triton.cdiv(B, block_b),)](
        rewards, values, mask, adv, ret,
        B, T,
        *rewards.stride(), *values.stride(), *mask.stride(),
        float(gamma), float(lam),
        BLOCK_B=block_b,
    )
    return adv, ret
