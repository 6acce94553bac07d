"""What ``fastrlhf bench`` measures: the ops, their implementations, the shapes of each mode.

One CLI name per measured call; :attr:`OpSpec.public` is the ``fastrlhf`` function it times
(``benchmarks/README.md`` has the table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch

ELEM_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Loss hyper-parameters used by every implementation (TRL's and the papers' defaults).
GRPO_BETA = 0.04
CLIP_EPS = 0.2
DPO_BETA = 0.1
GAE_GAMMA, GAE_LAM = 1.0, 0.95

IMPL_ORDER = (
    "fastrlhf",
    "fastrlhf[native]",
    "fastrlhf[torch]",
    "fastrlhf[triton]",
    "fastrlhf[inplace]",
    "torch",
    "torch.compile",
    "trl",
    "liger",
    "flash-attn",
)
BASELINES = ("torch", "torch.compile", "trl", "liger", "flash-attn")


class Skip(Exception):
    """An implementation that cannot run here; the message is the reason shown in the table."""


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One benchmarked call of a public op."""

    name: str  # the CLI name
    public: str  # the fastrlhf function it times
    kind: str  # "logits" | "linear" | "gae"
    backward: bool  # forward + backward (True) or forward only
    passes: int  # passes over the [N, V] logits in the bytes formula (0: not a bandwidth op)
    matmuls: int  # N x H x V matmuls counted as useful FLOPs (fused-linear ops)
    impls: tuple[str, ...]
    doc: str


_LOGITS_FWD = ("fastrlhf", "fastrlhf[native]", "fastrlhf[torch]", "fastrlhf[triton]", "torch", "torch.compile")
_LOGITS_BWD = _LOGITS_FWD[:4] + ("fastrlhf[inplace]",) + _LOGITS_FWD[4:]
_LINEAR = ("fastrlhf", "torch", "torch.compile")

OPS: dict[str, OpSpec] = {
    op.name: op
    for op in (
        OpSpec("logprobs", "token_logprobs", "logits", False, 1, 0, _LOGITS_FWD + ("trl", "liger", "flash-attn"),
               "token_logprobs forward (no grad)"),
        OpSpec("logprobs-fwdbwd", "token_logprobs", "logits", True, 3, 0,
               _LOGITS_BWD + ("trl", "liger", "flash-attn"),
               "token_logprobs forward + backward, random upstream gradient"),
        OpSpec("entropy", "entropy", "logits", False, 1, 0, _LOGITS_FWD + ("trl",), "entropy forward (no grad)"),
        OpSpec("logprobs-entropy-fwdbwd", "token_logprobs_and_entropy", "logits", True, 3, 0, _LOGITS_BWD + ("trl",),
               "token_logprobs_and_entropy forward + backward through both outputs"),
        OpSpec("ppo", "ppo_clip_loss", "logits", True, 3, 0, _LOGITS_BWD + ("trl",),
               f"ppo_clip_loss (clip {CLIP_EPS}, per-token advantages, no KL, token-mean) forward + backward"),
        OpSpec("grpo", "grpo_loss", "logits", True, 3, 0, _LOGITS_BWD + ("trl", "liger"),
               f"grpo_loss (PPO-clip {CLIP_EPS}, k3 KL beta={GRPO_BETA}, token-mean) forward + backward"),
        OpSpec("dpo", "dpo_loss", "logits", True, 3, 0, _LOGITS_FWD + ("trl",),
               f"dpo_loss (sigmoid, beta={DPO_BETA}) on [2B, T, V] forward + backward"),
        OpSpec("linear-logprobs", "linear_token_logprobs", "linear", True, 0, 3, _LINEAR,
               "linear_token_logprobs(hidden, weight) forward + backward"),
        OpSpec("linear-grpo", "linear_grpo_loss", "linear", True, 0, 3, _LINEAR + ("liger",),
               "linear_grpo_loss(hidden, weight) forward + backward"),
        OpSpec("linear-dpo", "linear_dpo_loss", "linear", True, 0, 3, _LINEAR + ("liger",),
               "linear_dpo_loss(hidden, weight), reference-free, forward + backward"),
        OpSpec("gae", "gae", "gae", False, 0, 0, _LINEAR,
               f"gae(rewards, values, mask, gamma={GAE_GAMMA}, lam={GAE_LAM})"),
    )
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """``N = B * T`` tokens; ``V`` vocabulary (0 for GAE); ``H`` hidden size (linear ops)."""

    B: int
    T: int
    V: int = 0
    H: int = 0

    @property
    def N(self) -> int:
        return self.B * self.T

    def label(self) -> str:
        s = f"N={self.N}"
        if self.V:
            s += f" V={self.V}"
        if self.H:
            s += f" H={self.H}"
        return s


@dataclasses.dataclass
class ModeConfig:
    """Default sweep of a mode; every field can be overridden on the command line."""

    dtype: str
    logits_n: tuple[int, ...]
    logits_v: tuple[int, ...]
    logits_extra: tuple[tuple[int, int], ...]  # extra (N, V) points
    logits_t: int
    linear_n: tuple[int, ...]
    linear_hv: tuple[tuple[int, int], ...]  # (H, V) of real models
    linear_t: int
    gae_n: tuple[int, ...]
    gae_t: int


MODES = {
    # 2 shared cores: small N, one large-vocabulary point. Fused-linear: Llama-2-7B's real
    # (H, V) with few tokens: one fp32 matmul of 32 x 4096 x 32000 takes ~0.4 s on one core.
    "cpu": ModeConfig(
        dtype="fp32",
        logits_n=(256, 1024), logits_v=(32000,), logits_extra=((256, 128256),), logits_t=128,
        linear_n=(16, 32), linear_hv=((4096, 32000),), linear_t=64,
        gae_n=(4096, 16384), gae_t=1024,
    ),
    # RLHF micro-batches of 4k-16k tokens; Llama-2 / Llama-3 / Qwen2.5 vocabularies and widths.
    "gpu": ModeConfig(
        dtype="bf16",
        logits_n=(4096, 8192, 16384), logits_v=(32000, 128256, 151936), logits_extra=(), logits_t=1024,
        linear_n=(4096, 8192, 16384), linear_hv=((4096, 128256), (3584, 151936)), linear_t=1024,
        gae_n=(65536, 262144, 1048576), gae_t=1024,
    ),
}


def shapes_for(op: OpSpec, cfg: ModeConfig, n: Optional[Sequence[int]], v: Optional[Sequence[int]],
               h: Optional[Sequence[int]]) -> list[Shape]:
    """Shapes of one op: ``T`` capped at ``N // 2`` so DPO always has a chosen and a rejected row."""

    def bt(N: int, T: int) -> tuple[int, int]:
        T = max(1, min(T, N // 2))
        if N % T:
            raise ValueError(f"N={N} is not a multiple of the sequence length T={T}")
        return N // T, T

    out: list[Shape] = []
    if op.kind == "logits":
        pts = [(N, V) for V in (v or cfg.logits_v) for N in (n or cfg.logits_n)]
        if not n and not v:
            pts += list(cfg.logits_extra)
        for N, V in pts:
            B, T = bt(N, cfg.logits_t)
            out.append(Shape(B, T, V))
    elif op.kind == "linear":
        hv = list(cfg.linear_hv)
        if h or v:  # explicit widths / vocabularies: their product
            hv = [(H, V) for H in (h or [p[0] for p in cfg.linear_hv]) for V in (v or [p[1] for p in cfg.linear_hv])]
        for H, V in hv:
            for N in n or cfg.linear_n:
                B, T = bt(N, cfg.linear_t)
                out.append(Shape(B, T, V, H))
    else:
        for N in n or cfg.gae_n:
            B, T = bt(N, cfg.gae_t)
            out.append(Shape(B, T))
    return out
