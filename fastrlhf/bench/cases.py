"""One callable per (op, implementation, shape): seeded inputs, the call, its backward.

Every implementation of an op gets the same inputs (seed 0). ``Case.fn()`` runs one forward
(+ backward to the inputs) and returns a tensor whose sum is the value checked against the
``torch`` row. fastrlhf is called through its public API only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Optional

import torch

import fastrlhf

from .baselines import baseline
from .env import installed
from .registry import CLIP_EPS, DPO_BETA, GAE_GAMMA, GAE_LAM, GRPO_BETA, OPS, OpSpec, Shape, Skip


@dataclasses.dataclass
class Case:
    """``fn()`` runs one forward (+ backward) and returns a tensor whose sum is the check value."""

    fn: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]  # what backward differentiates with respect to
    note: str = ""


def static_skip(op: OpSpec, impl: str, mode: str, backends: dict[str, bool], auto_backend: str) -> Optional[str]:
    """Reason an implementation cannot run in this mode, known without running it (None: try it)."""
    on_gpu = mode == "gpu"
    if impl.startswith("fastrlhf[") and impl != "fastrlhf[inplace]":
        backend = impl[len("fastrlhf["):-1]
        if on_gpu:
            return "explicit backends are benchmarked in CPU mode only (on CUDA auto is triton)"
        if backend == "triton":
            return "triton on CPU runs under the Triton interpreter (TRITON_INTERPRET=1), far too slow to time"
        if not backends.get(backend, False):
            return f"backend {backend!r} unavailable (fastrlhf.available_backends())"
        if backend == auto_backend:
            return f"same as the fastrlhf row (auto resolves to {auto_backend} here)"
    if op.kind == "gae" and impl == "torch.compile":
        return ("the GAE baseline is a Python loop over T; torch.compile unrolls it into a T-step graph "
                "(minutes to compile per shape), not a baseline anyone deploys")
    if impl == "trl" and not installed("trl"):
        return "trl not installed (pip install trl)"
    if impl == "liger":
        if not installed("liger_kernel"):
            return "liger_kernel not installed (pip install liger-kernel)"
        if not on_gpu and op.kind == "logits":
            return "Liger's cross entropy / triton_grpo_loss are Triton kernels that need CUDA"
    if impl == "flash-attn":
        if not installed("flash_attn"):
            return "flash_attn not installed (CUDA-only package)"
        if not on_gpu:
            return "flash-attn's Triton cross entropy needs CUDA"
    return None


# ----------------------------------------------------------------------------------------
# Inputs: one dict of tensors per case, deterministic for a given seed
# ----------------------------------------------------------------------------------------


def _token_side_inputs(inp: dict[str, Any], B: int, T: int, g: torch.Generator, device: torch.device) -> None:
    """Old / ref logprobs near ``inp["logp"]``, advantages and a mask with a padded tail."""
    logp = inp.pop("logp")
    inp["old"] = (logp + 0.05 * torch.randn(B, T, generator=g).to(device)).contiguous()  # [B, T]
    inp["ref"] = (logp + 0.05 * torch.randn(B, T, generator=g).to(device)).contiguous()  # [B, T]
    inp["adv"] = torch.randn(B, generator=g).to(device)  # per-sequence GRPO advantages [B]
    inp["adv_tokens"] = torch.randn(B, T, generator=g).to(device)  # per-token PPO advantages [B, T]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, T - T // 8:] = False  # padded tail of each completion
    inp["mask"] = mask.to(device)


def _logits_inputs(op: OpSpec, shape: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    # DPO: the B rows are the chosen responses followed by the rejected ones (B = 2 x pairs).
    B, T, V = shape.B, shape.T, shape.V
    # The [B, T, V] tensor is drawn on the device itself (16k x 152k would be 10 GB on the host).
    gd = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, T, V, generator=gd, device=device, dtype=dtype)  # [B, T, V]
    labels = torch.randint(0, V, (B, T), generator=g).to(device)  # [B, T] int64
    inp: dict[str, Any] = {"logits": logits, "labels": labels}
    inp["grad_logp"] = torch.randn(B, T, generator=g).to(device)  # upstream gradients [B, T]
    inp["grad_ent"] = torch.randn(B, T, generator=g).to(device)
    if op.name in ("ppo", "grpo"):
        with torch.no_grad():  # old / ref logprobs near the current ones, so ratios sit near 1
            inp["logp"] = fastrlhf.token_logprobs(logits, labels, backend="torch")  # [B, T]
        _token_side_inputs(inp, B, T, g, device)
    if op.name == "dpo":
        labels[:, : T // 4] = -100  # prompt tokens carry no loss
        inp["ref_c"] = inp["ref_r"] = torch.zeros(B // 2, device=device)
    if op.backward:
        logits.requires_grad_(True)
    return inp


def _linear_inputs(op: OpSpec, shape: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, V, H = shape.B, shape.T, shape.V, shape.H
    gd = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, H, generator=gd, device=device, dtype=dtype).requires_grad_(True)  # [B, T, H]
    # lm_head init ~ N(0, 1/H): logits of unit scale, as a trained model's
    weight = torch.randn(V, H, generator=gd, device=device, dtype=dtype).mul_(H**-0.5).requires_grad_(True)  # [V, H]
    labels = torch.randint(0, V, (B, T), generator=g).to(device)  # [B, T]
    # old / ref logprobs near log(1/V): computing the true ones would cost a full matmul here.
    base = -math.log(V)
    inp: dict[str, Any] = {"hidden": hidden, "weight": weight, "labels": labels}
    inp["old"] = (base + 0.05 * torch.randn(B, T, generator=g)).to(device).contiguous()
    inp["ref"] = (base + 0.05 * torch.randn(B, T, generator=g)).to(device).contiguous()
    inp["adv"] = torch.randn(B, generator=g).to(device)
    inp["mask"] = torch.ones(B, T, dtype=torch.bool, device=device)
    inp["grad_logp"] = torch.randn(B, T, generator=g).to(device)
    if op.name == "linear-dpo":
        if B % 2:
            raise Skip(f"DPO needs an even number of rows (chosen + rejected), got B={B}")
        labels[:, : T // 4] = -100  # prompt tokens
        inp["ref_c"] = inp["ref_r"] = torch.zeros(B // 2, device=device)
    return inp


def _gae_inputs(shape: Shape, device: torch.device) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T = shape.B, shape.T
    lengths = torch.randint(T // 2, T + 1, (B, 1), generator=g)
    return {
        "rewards": torch.randn(B, T, generator=g).to(device),  # [B, T]
        "values": torch.randn(B, T, generator=g).to(device),  # [B, T]
        "mask": (torch.arange(T).unsqueeze(0) < lengths).to(device),  # right-padded responses [B, T]
    }


# ----------------------------------------------------------------------------------------
# fastrlhf's calls and the wrapping into a Case
# ----------------------------------------------------------------------------------------


def _fastrlhf_call(op: OpSpec, impl: str, inp: dict[str, Any]) -> Callable[[], Any]:
    """``fastrlhf`` (auto), ``fastrlhf[<backend>]`` or ``fastrlhf[inplace]`` (auto, gradient in place)."""
    tag = impl[len("fastrlhf["):-1] if impl.startswith("fastrlhf[") else "auto"
    kw: dict[str, Any] = {"backend": "auto" if tag == "inplace" else tag}
    if tag == "inplace":
        kw["inplace_backward"] = True
    f, x, y = fastrlhf, inp.get("logits"), inp.get("labels")
    loss_kw = dict(mask=inp.get("mask"), clip_low=CLIP_EPS, loss_agg="token-mean")
    calls = {
        "logprobs": lambda: f.token_logprobs(x, y, **kw),
        "logprobs-fwdbwd": lambda: f.token_logprobs(x, y, **kw),
        "entropy": lambda: f.entropy(x, **kw),
        "logprobs-entropy-fwdbwd": lambda: f.token_logprobs_and_entropy(x, y, **kw),
        "ppo": lambda: f.ppo_clip_loss(x, y, inp["old"], inp["adv_tokens"], **loss_kw, **kw)[0],
        "grpo": lambda: f.grpo_loss(x, y, inp["old"], inp["adv"], inp["ref"], beta=GRPO_BETA, **loss_kw, **kw)[0],
        "dpo": lambda: f.dpo_loss(x, y, inp["ref_c"], inp["ref_r"], beta=DPO_BETA, **kw)[0],
        "linear-logprobs": lambda: f.linear_token_logprobs(inp["hidden"], inp["weight"], y, **kw),
        "linear-grpo": lambda: f.linear_grpo_loss(inp["hidden"], inp["weight"], y, inp["old"], inp["adv"],
                                                  inp["ref"], beta=GRPO_BETA, **loss_kw, **kw)[0],
        "linear-dpo": lambda: f.linear_dpo_loss(inp["hidden"], inp["weight"], y, inp["ref_c"], inp["ref_r"],
                                                beta=DPO_BETA, **kw)[0],
        "gae": lambda: f.gae(inp["rewards"], inp["values"], inp["mask"], gamma=GAE_GAMMA, lam=GAE_LAM, **kw)[0],
    }
    return calls[op.name]


def _grad(outputs, inputs: list[torch.Tensor], grad_outputs=None) -> None:
    """Backward to ``inputs`` and drop the gradients, as the lm_head's backward would consume them.

    ``torch.autograd.grad`` rather than ``.backward()``: accumulating into a leaf's ``.grad``
    clones a gradient that aliases its input, which would hide what ``inplace_backward`` saves.
    """
    if grad_outputs is not None:  # upstream gradients in each output's dtype (e.g. a bf16 loss)
        if isinstance(outputs, torch.Tensor):
            grad_outputs = grad_outputs.to(outputs.dtype)
        else:
            grad_outputs = tuple(g.to(o.dtype) for g, o in zip(grad_outputs, outputs))
    torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs)


def _case(op: OpSpec, fwd: Callable[[], Any], leaves: list[torch.Tensor], inp: dict[str, Any], note: str) -> Case:
    """Forward only under ``no_grad``; else forward + backward to ``leaves`` with the op's upstream gradients."""
    if not op.backward:
        def forward_only():
            with torch.no_grad():
                return fwd()

        return Case(forward_only, [], note)
    if op.name == "logprobs-entropy-fwdbwd":
        upstream = (inp["grad_logp"], inp["grad_ent"])
    elif op.name in ("logprobs-fwdbwd", "linear-logprobs"):
        upstream = inp["grad_logp"]
    else:  # a scalar loss
        upstream = None

    def fn():
        out = fwd()
        _grad(out, leaves, upstream)
        if isinstance(out, tuple):
            return out[0].detach().double().sum() + out[1].detach().double().sum()
        return out.detach()

    return Case(fn, leaves, note)


def build_case(op_name: str, impl: str, shape: Shape, device: str | torch.device, dtype: torch.dtype) -> Case:
    """The callable for one measurement (also used by the pytest-benchmark suites)."""
    op = OPS[op_name]
    device = torch.device(device)
    try:
        if op.kind == "logits":
            inp = _logits_inputs(op, shape, device, dtype)
            leaves = [inp["logits"]]
        elif op.kind == "linear":
            inp = _linear_inputs(op, shape, device, dtype)
            leaves = [inp["hidden"], inp["weight"]]
        else:
            inp = _gae_inputs(shape, device)
            leaves = []
        if impl.startswith("fastrlhf"):
            return _case(op, _fastrlhf_call(op, impl, inp), leaves, inp, "")
        fwd, own_leaves, note = baseline(op, impl, inp)
        return _case(op, fwd, own_leaves or leaves, inp, note)
    except (ImportError, AttributeError) as e:
        raise Skip(f"{impl} unavailable: {type(e).__name__}: {e}") from e
