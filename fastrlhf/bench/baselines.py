"""What a user would write instead of fastrlhf: the baselines of ``fastrlhf bench``.

``torch``: the plain PyTorch compositions below, as trainers write them (TRL's trainers,
CleanRL): ``log_softmax(logits.float())`` and a gather, the loss math on ``[B, T]``
log-probabilities. Each reads the logits and keeps (at least) an ``[N, V]`` fp32 log-softmax
for backward, the tensor fastrlhf never makes. ``torch.compile`` compiles the same functions.
``trl``, ``liger`` and ``flash-attn`` are the third-party kernels, imported when a case is
built (a missing package is a skipped row). Not an oracle: tests check these against
``fastrlhf.reference`` (``tests/test_bench_baselines.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .registry import CLIP_EPS, DPO_BETA, GAE_GAMMA, GAE_LAM, GRPO_BETA, OpSpec, Skip

# ----------------------------------------------------------------------------------------
# Plain PyTorch ("torch" rows)
# ----------------------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T, V], [B, T] -> [B, T]``: the [B, T, V] fp32 log-softmax is saved for backward."""
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)  # [B, T, V]
    return -(logp.exp() * logp).sum(-1)


def token_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), -1)  # [B, T, V], shared by both outputs
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def ppo_loss_from_logprobs(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                           ref: torch.Tensor | None = None, *, clip: float = CLIP_EPS,
                           beta: float = 0.0) -> torch.Tensor:
    """TRL's GRPOTrainer loss: PPO-clip, ``+ beta * k3`` KL when ``ref`` is given, token mean.

    ``adv`` broadcasts against ``logp [B, T]`` (``[B, 1]`` per sequence or ``[B, T]``).
    """
    ratio = torch.exp(logp - old)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    if ref is not None:
        d = ref - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)  # k3 (Schulman 2020)
    m = mask.float()
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def ppo_clip_loss(logits, labels, old, adv, mask, *, clip: float = CLIP_EPS) -> torch.Tensor:
    return ppo_loss_from_logprobs(token_logprobs(logits, labels), old, adv, mask, clip=clip)


def grpo_loss(logits, labels, old, adv, ref, mask, *, clip: float = CLIP_EPS, beta: float = GRPO_BETA):
    """``adv [B]``: one advantage per sequence."""
    return ppo_loss_from_logprobs(token_logprobs(logits, labels), old, adv.unsqueeze(-1), mask, ref,
                                  clip=clip, beta=beta)


def sequence_logps(logp_fn: Callable, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's DPOTrainer: per-token logprobs summed over the tokens with a label (not -100) -> ``[2B]``."""
    valid = labels != -100
    return (logp_fn(logits, labels.masked_fill(~valid, 0)) * valid).sum(-1)


def dpo_loss_from_logps(seq: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, *,
                        beta: float = DPO_BETA) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7) on ``seq [2B]``: chosen rows first, then rejected."""
    half = seq.shape[0] // 2
    margin = (seq[:half] - seq[half:]) - (ref_c - ref_r)
    return -F.logsigmoid(beta * margin).mean()


def dpo_loss(logits, labels, ref_c, ref_r, *, beta: float = DPO_BETA) -> torch.Tensor:
    return dpo_loss_from_logps(sequence_logps(token_logprobs, logits, labels), ref_c, ref_r, beta=beta)


def linear_token_logprobs(hidden, weight, labels):
    return token_logprobs(hidden @ weight.T, labels)  # [B, T, V] logits made, then the same


def linear_grpo_loss(hidden, weight, labels, old, adv, ref, mask, **kw):
    return grpo_loss(hidden @ weight.T, labels, old, adv, ref, mask, **kw)


def linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, **kw):
    return dpo_loss(hidden @ weight.T, labels, ref_c, ref_r, **kw)


def gae(rewards, values, mask, *, gamma: float = GAE_GAMMA, lam: float = GAE_LAM):
    """The loop of TRL's PPOTrainer (CleanRL's too) on right-padded rows: padding zeroed first."""
    m = mask.float()
    rewards, values = rewards * m, values * m
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_adv.append(last)
    adv = torch.stack(reversed_adv[::-1], dim=1) * m  # [B, T]
    return adv, (adv + values) * m


# ----------------------------------------------------------------------------------------
# One forward per (op, baseline): () -> output, on the tensors of a case
# ----------------------------------------------------------------------------------------


def _torch_calls(f: Any, inp: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """``f``: this module's functions, eager or compiled (:class:`_Functions`)."""
    x, y = inp.get("logits"), inp.get("labels")
    return {
        "logprobs": lambda: f.token_logprobs(x, y),
        "logprobs-fwdbwd": lambda: f.token_logprobs(x, y),
        "entropy": lambda: f.entropy(x),
        "logprobs-entropy-fwdbwd": lambda: f.token_logprobs_and_entropy(x, y),
        "ppo": lambda: f.ppo_clip_loss(x, y, inp["old"], inp["adv_tokens"], inp["mask"]),
        "grpo": lambda: f.grpo_loss(x, y, inp["old"], inp["adv"], inp["ref"], inp["mask"]),
        "dpo": lambda: f.dpo_loss(x, y, inp["ref_c"], inp["ref_r"]),
        "linear-logprobs": lambda: f.linear_token_logprobs(inp["hidden"], inp["weight"], y),
        "linear-grpo": lambda: f.linear_grpo_loss(inp["hidden"], inp["weight"], y, inp["old"], inp["adv"],
                                                  inp["ref"], inp["mask"]),
        "linear-dpo": lambda: f.linear_dpo_loss(inp["hidden"], inp["weight"], y, inp["ref_c"], inp["ref_r"]),
        "gae": lambda: f.gae(inp["rewards"], inp["values"], inp["mask"])[0],
    }


class _Functions:
    """This module's plain-torch functions by name; with ``compiled``, under ``torch.compile``
    (compiled at the first call, i.e. in the untimed warm-up)."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        if compiled:
            # A fresh dynamo state per case: its per-function recompile limit (8) would otherwise
            # silently fall back to eager after a few shapes in one process.
            torch._dynamo.reset()

    def __getattr__(self, name: str) -> Callable:
        fn = globals()[name]
        fn = torch.compile(fn) if self.compiled else fn
        setattr(self, name, fn)
        return fn


def _trl(op: OpSpec, inp: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """TRL's logprob / entropy kernels (``trl.trainer.utils``), its trainers' loss math on top."""
    from trl.trainer import utils as trl

    x, y = inp["logits"], inp["labels"]
    if op.name in ("logprobs", "logprobs-fwdbwd"):
        return lambda: trl.selective_log_softmax(x, y)
    if op.name == "entropy":
        return lambda: trl.entropy_from_logits(x)
    if op.name == "logprobs-entropy-fwdbwd":
        return lambda: trl.selective_log_softmax_and_entropy(x, y)
    if op.name in ("ppo", "grpo"):
        ref, adv = (inp["ref"], inp["adv"].unsqueeze(-1)) if op.name == "grpo" else (None, inp["adv_tokens"])
        return lambda: ppo_loss_from_logprobs(trl.selective_log_softmax(x, y), inp["old"], adv, inp["mask"], ref,
                                              beta=GRPO_BETA)
    if op.name == "dpo":
        return lambda: dpo_loss_from_logps(sequence_logps(trl.selective_log_softmax, x, y), inp["ref_c"], inp["ref_r"])
    raise Skip(f"trl has no {op.name}")


def _liger(op: OpSpec, inp: dict[str, torch.Tensor], on_gpu: bool) -> tuple[Callable[[], Any], list, str]:
    """Liger-Kernel: its cross entropy, ``triton_grpo_loss`` and chunked fused-linear losses."""
    # compiled=True is Liger's default; on CPU its torch.compile of every chunk shape would
    # dominate, so the CPU run uses its eager chunked path.
    note = "" if on_gpu else "compiled=False (eager chunks) on CPU"
    if op.name == "logprobs" or op.name == "logprobs-fwdbwd":
        from liger_kernel.transformers.functional import liger_cross_entropy

        x, y = inp["logits"], inp["labels"]
        B, T, V = x.shape
        # Liger's CE writes the gradient into its input during forward (its only mode).
        return lambda: -liger_cross_entropy(x.view(-1, V), y.view(-1), reduction="none").view(B, T), None, ""
    if op.name == "grpo":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        x = inp["logits"]
        B, T, V = x.shape
        # Liger takes [B, T + 1, V] (it drops the last position itself); its own leaf.
        full = torch.empty(B, T + 1, V, device=x.device, dtype=x.dtype)  # [B, T + 1, V]
        full[:, :T].copy_(x.detach())
        full[:, T:].normal_()
        full.requires_grad_(True)
        m = inp["mask"].int().contiguous()
        return (lambda: triton_grpo_loss(
            full, inp["old"], inp["ref"], inp["labels"], inp["adv"], completion_mask=m, temperature=1.0,
            beta=GRPO_BETA, eps_low=CLIP_EPS, eps_high=CLIP_EPS, inplace=True, loss_type="dapo", reduce=True)[0],
            [full], "")
    if op.name == "linear-grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        mod = LigerFusedLinearGRPOLoss(beta=GRPO_BETA, compiled=on_gpu, epsilon_low=CLIP_EPS,
                                       epsilon_high=CLIP_EPS, loss_type="dapo", temperature=1.0)
        m = inp["mask"].int()
        return (lambda: mod(inp["hidden"], inp["weight"], inp["labels"], m, inp["adv"], ref_per_token_logps=inp["ref"],
                            old_per_token_logps=inp["old"])[0], None, note)
    if op.name == "linear-dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Reference-free on both sides: Liger's module would otherwise run a reference model
        # itself, while fastrlhf takes precomputed reference logprobs.
        mod = LigerFusedLinearDPOLoss(beta=DPO_BETA, compiled=on_gpu, use_ref_model=False)
        return lambda: mod(inp["weight"], inp["hidden"], inp["labels"])[0], None, note
    raise Skip(f"liger has no {op.name}")


def _flash_attn(op: OpSpec, inp: dict[str, torch.Tensor]) -> Callable[[], Any]:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    if op.name not in ("logprobs", "logprobs-fwdbwd"):
        raise Skip(f"flash-attn has no {op.name}")
    x, y = inp["logits"], inp["labels"]
    B, T, V = x.shape
    return lambda: -cross_entropy_loss(x.view(-1, V), y.view(-1))[0].view(B, T)


def baseline(op: OpSpec, impl: str, inp: dict[str, torch.Tensor]) -> tuple[Callable[[], Any], list | None, str]:
    """``(forward, leaves, note)`` of a baseline; ``leaves`` None: the case's own inputs."""
    on_gpu = next(iter(inp.values())).device.type == "cuda"
    if impl in ("torch", "torch.compile"):
        return _torch_calls(_Functions(impl == "torch.compile"), inp)[op.name], None, ""
    if impl == "trl":
        return _trl(op, inp), None, ""
    if impl == "liger":
        return _liger(op, inp, on_gpu)
    if impl == "flash-attn":
        return _flash_attn(op, inp), None, ""
    raise Skip(f"unknown implementation {impl!r}")
