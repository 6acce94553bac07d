"""Benchmark runner: fastrlhf side by side with the kernels users would pick instead.

``fastrlhf bench [op ...] [--mode cpu|gpu]`` (or ``python -m fastrlhf.bench``) sweeps token
counts ``N`` and vocabularies ``V`` for each op, times every implementation in the same run,
and writes a table to stdout, ``results.csv`` / ``results.json`` / ``ratios.csv`` and PNG plots
under ``benchmarks/results/<device-tag>/``.

Implementations (a missing one is a row with status ``skipped`` and the reason, never dropped):
    fastrlhf            the public op, ``backend="auto"`` (Triton on CUDA; native or torch on CPU)
    fastrlhf[<b>]       CPU only: each other available backend named explicitly
    fastrlhf[inplace]   ``inplace_backward=True`` (gradient written into the logits' storage)
    torch               the plain PyTorch composition, ``fastrlhf.reference`` (the oracle)
    torch.compile       ``torch.compile`` of that composition (compiled during warm-up)
    trl                 ``trl.trainer.utils.selective_log_softmax`` / ``selective_log_softmax_and_entropy``
                        / ``entropy_from_logits``, with the loss math on top for PPO / DPO
    liger               Liger-Kernel: its cross entropy, ``triton_grpo_loss``,
                        ``LigerFusedLinearGRPOLoss``, ``LigerFusedLinearDPOLoss``
    flash-attn          ``flash_attn.ops.triton.cross_entropy.cross_entropy_loss``

Metrics (formulas also written into results.json):
    time        median time of one call (forward, or forward + backward). GPU:
                ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median);
                CPU: ``time.perf_counter`` around single calls after warm-up, median; the
                process's CPU time of the same calls (``time.process_time``) is recorded too
                and drives the numbers with ``--timer cpu``: on a shared machine the wall time
                includes other processes' time slices (rows where it is 1.5x the CPU time are
                flagged ``contended``).
    GB/s        ``passes * N * V * bytes(dtype) / time``: the logits ops must read the logits
                once forward (1 pass); forward + backward reads them again and writes their
                gradient (3 passes). This is the minimum traffic of any implementation, so the
                number is an "effective" bandwidth (extra traffic of a baseline lowers it).
                GAE: ``N * (4 + 4 + 1 + 4 + 4)`` bytes (rewards, values, bool mask read;
                advantages, returns written).
    % peak      GB/s over the device's HBM peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s, NVIDIA
                datasheets); on CPU over a STREAM-like copy bandwidth measured once in the
                same run with the same thread count (``2 * bytes / time`` of ``b.copy_(a)``).
    TFLOP/s     fused-linear ops: ``matmuls * 2 * N * H * V / time`` with 1 matmul forward
                (logits) and 3 forward + backward (logits, d hidden, d weight); recomputation
                of the logits in backward is not counted as useful work.
    peak mem    memory the call adds on top of its inputs. GPU: ``max_memory_allocated``
                after ``reset_peak_memory_stats`` minus ``memory_allocated`` before. CPU: each
                measurement runs in a fresh process (forked from a server that has only imported
                the libraries) in which glibc serves every allocation over 64 KiB with mmap and
                gives it back on free (``mallopt``, set before the first allocation); after
                warm-up the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5) and
                the growth of ``VmHWM`` over the ``VmRSS`` before one call is the peak
                (resolution ~0.25 MiB: Linux keeps RSS in per-CPU counters). The
                timed calls come after that, with glibc's steady-state thresholds restored
                (mmap only above 32 MiB), so they do not pay a page fault per fresh block.
    ratios      for every fastrlhf row and every baseline at the same op and shape:
                speedup = baseline time / fastrlhf time, memory ratio = baseline / fastrlhf.
    check       the first call's output (summed) against the ``torch`` row's: ``ok`` or
                ``MISMATCH`` (loose tolerance: it guards against benchmarking a wrong setup).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

# ``python -m fastrlhf.bench``: multiprocessing re-runs the main module by name in each child,
# which already holds it (preloaded by the fork server); runpy warns about exactly that.
warnings.filterwarnings("ignore", message="'fastrlhf.bench' found in sys.modules", category=RuntimeWarning)

# ----------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------

# HBM bandwidth, bytes/s, from NVIDIA's datasheets; matched against the device name in order
# (PCIe / NVL parts of the same chip have different memory systems).
GPU_PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM5 80 GB HBM3
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
)

ELEM_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# GRPO / DPO hyper-parameters used by every implementation (TRL's and the papers' defaults).
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
# CPU, one thread: a median wall time this much above the median CPU time of the same calls
# means other processes held the core during the measurement (flagged in the table).
CONTENDED = 1.5
# Relative tolerance of the output check against the torch row (bf16 sums on GPU drift ~1e-3).
CHECK_RTOL = 2e-2


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One benchmarked operation."""

    name: str
    kind: str  # "logits" | "linear" | "gae"
    backward: bool  # forward + backward (True) or forward only
    passes: int  # passes over the [N, V] logits in the bytes formula (0: not a bandwidth op)
    matmuls: int  # N x H x V matmuls counted as useful FLOPs (fused-linear ops)
    impls: tuple[str, ...]
    doc: str


_LOGITS_FWD = ("fastrlhf", "fastrlhf[native]", "fastrlhf[torch]", "fastrlhf[triton]", "torch", "torch.compile")
_LOGITS_BWD = _LOGITS_FWD[:4] + ("fastrlhf[inplace]",) + _LOGITS_FWD[4:]

OPS: dict[str, OpSpec] = {
    op.name: op
    for op in (
        OpSpec("logprobs", "logits", False, 1, 0, _LOGITS_FWD + ("trl", "liger", "flash-attn"),
               "token_logprobs forward (no grad)"),
        OpSpec("logprobs-fwdbwd", "logits", True, 3, 0, _LOGITS_BWD + ("trl", "liger", "flash-attn"),
               "token_logprobs forward + backward, random upstream gradient"),
        OpSpec("entropy", "logits", False, 1, 0, _LOGITS_FWD + ("trl",), "entropy forward (no grad)"),
        OpSpec("logprobs-entropy-fwdbwd", "logits", True, 3, 0, _LOGITS_BWD + ("trl",),
               "token_logprobs_and_entropy forward + backward through both outputs"),
        OpSpec("ppo", "logits", True, 3, 0, _LOGITS_BWD + ("trl", "liger"),
               f"grpo_loss (PPO-clip {CLIP_EPS}, k3 KL beta={GRPO_BETA}, token-mean) forward + backward"),
        OpSpec("dpo", "logits", True, 3, 0, _LOGITS_FWD + ("trl",),
               f"dpo_loss (sigmoid, beta={DPO_BETA}) on [2B, T, V] forward + backward"),
        OpSpec("linear-logprobs", "linear", True, 0, 3, ("fastrlhf", "torch", "torch.compile"),
               "linear_token_logprobs(hidden, weight) forward + backward"),
        OpSpec("linear-grpo", "linear", True, 0, 3, ("fastrlhf", "torch", "torch.compile", "liger"),
               "linear_grpo_loss(hidden, weight) forward + backward"),
        OpSpec("linear-dpo", "linear", True, 0, 3, ("fastrlhf", "torch", "torch.compile", "liger"),
               "linear_dpo_loss(hidden, weight), reference-free, forward + backward"),
        OpSpec("gae", "gae", False, 0, 0, ("fastrlhf", "torch", "torch.compile"),
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


class Skip(Exception):
    """An implementation that cannot run here; the message is the reason shown in the table."""


# ----------------------------------------------------------------------------------------
# Environment probes (parent process; no CUDA context is needed except for the device name)
# ----------------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def versions() -> dict[str, Optional[str]]:
    import fastrlhf

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastrlhf": getattr(fastrlhf, "__version__", None),
        "trl": _version("trl"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
    }
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        out["fastrlhf_commit"] = commit or None
    except (OSError, subprocess.SubprocessError):
        out["fastrlhf_commit"] = None
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_peak_bandwidth(name: str) -> Optional[float]:
    for key, bw in GPU_PEAK_BANDWIDTH:
        if key.lower() in name.lower():
            return bw
    return None


def device_tag(mode: str, gpu_name: str = "") -> str:
    """``cpu``; for GPUs the chip (``h100``, ``h200``) or the sanitized device name."""
    if mode == "cpu":
        return "cpu"
    for chip in ("H200", "H100", "A100", "L40S", "A10G", "L4"):
        if chip.lower() in gpu_name.lower():
            return chip.lower()
    return "".join(c if c.isalnum() else "-" for c in gpu_name.lower()).strip("-") or "gpu"


def fastrlhf_linear(name: str) -> Optional[Callable]:
    """``fastrlhf.linear_<name>`` when this build has the fused-linear ops, else None."""
    import fastrlhf

    fn = getattr(fastrlhf, name, None)
    if fn is None:
        try:
            fn = getattr(importlib.import_module("fastrlhf.linear"), name, None)
        except ImportError:
            fn = None
    return fn


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
            if backend == "native":
                from . import _native

                return f"native C++ extension not built ({_native.load_error() or 'fastrlhf._C missing'})"
            return f"backend {backend!r} unavailable"
        if backend == auto_backend:
            return f"same as the fastrlhf row (auto resolves to {auto_backend} here)"
    if op.kind == "linear" and impl.startswith("fastrlhf"):
        name = {"linear-logprobs": "linear_token_logprobs", "linear-grpo": "linear_grpo_loss",
                "linear-dpo": "linear_dpo_loss"}[op.name]
        if fastrlhf_linear(name) is None:
            return f"fastrlhf.{name} is not in this build (fastrlhf/linear.py missing)"
    if op.kind == "gae" and impl == "torch.compile":
        return ("reference.gae is a Python loop over T; torch.compile unrolls it into a T-step graph "
                "(minutes to compile per shape), not a baseline anyone deploys")
    if impl == "trl" and not _installed("trl"):
        return "trl not installed (pip install trl)"
    if impl == "liger":
        if not _installed("liger_kernel"):
            return "liger_kernel not installed (pip install liger-kernel)"
        if not on_gpu and op.kind == "logits":
            return "Liger's cross entropy / triton_grpo_loss are Triton kernels that need CUDA"
    if impl == "flash-attn":
        if not _installed("flash_attn"):
            return "flash_attn not installed (CUDA-only package)"
        if not on_gpu:
            return "flash-attn's Triton cross entropy needs CUDA"
    return None


# ----------------------------------------------------------------------------------------
# Cases: inputs and one callable per (op, impl, shape)
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """``fn()`` runs one forward (+ backward) and returns a tensor whose sum is the check value."""

    fn: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]  # what backward differentiates with respect to
    note: str = ""


def _compiled(fn: Callable) -> Callable:
    # A fresh wrapper per case: dynamo's per-function recompile limit (8) would otherwise
    # silently fall back to eager after a few shapes in one process.
    torch._dynamo.reset()
    return torch.compile(fn)


def _logits_inputs(op: OpSpec, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Logits leaf and the per-token side inputs, deterministic for a given seed."""
    import fastrlhf

    g = torch.Generator(device="cpu").manual_seed(seed)
    # DPO: the B rows are the chosen responses followed by the rejected ones (B = 2 x pairs).
    rows, T, V = shape.B, shape.T, shape.V
    # The [B, T, V] tensor is drawn on the device itself (16k x 152k would be 10 GB on the host).
    gd = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, T, V, generator=gd, device=device, dtype=dtype)  # [B, T, V]
    labels = torch.randint(0, V, (rows, T), generator=g).to(device)  # [B, T] int64
    inp: dict[str, Any] = {"logits": logits, "labels": labels}
    inp["grad_logp"] = torch.randn(rows, T, generator=g).to(device)  # upstream gradients [B, T]
    inp["grad_ent"] = torch.randn(rows, T, generator=g).to(device)
    if op.name == "ppo":
        with torch.no_grad():  # old / ref logprobs near the current ones, so ratios sit near 1
            logp = fastrlhf.token_logprobs(logits, labels, backend="torch")  # [B, T]
        inp["old"] = (logp + 0.05 * torch.randn(rows, T, generator=g).to(device)).contiguous()
        inp["ref"] = (logp + 0.05 * torch.randn(rows, T, generator=g).to(device)).contiguous()
        inp["adv"] = torch.randn(rows, generator=g).to(device)  # per-sequence GRPO advantages [B]
        mask = torch.ones(rows, T, dtype=torch.bool)
        mask[:, T - T // 8:] = False  # padded tail of each completion
        inp["mask"] = mask.to(device)
    if op.name == "dpo":
        labels[:, : T // 4] = -100  # prompt tokens carry no loss
        inp["ref_c"] = torch.zeros(rows // 2, device=device)
        inp["ref_r"] = torch.zeros(rows // 2, device=device)
    if op.backward:
        logits.requires_grad_(True)
    return inp


def _build_logits_case(op: OpSpec, impl: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    import fastrlhf
    from fastrlhf import reference as ref

    inp = _logits_inputs(op, shape, device, dtype)
    logits, labels = inp["logits"], inp["labels"]
    B, T, V = logits.shape
    inputs = [logits] if op.backward else []
    backend, inplace = "auto", False
    if impl.startswith("fastrlhf["):
        tag = impl[len("fastrlhf["):-1]
        inplace = tag == "inplace"
        backend = "auto" if inplace else tag

    # ---- the per-op forward of each implementation: (logits, labels) -> outputs ----
    if op.name in ("logprobs", "logprobs-fwdbwd"):
        if impl.startswith("fastrlhf"):
            fwd = lambda: fastrlhf.token_logprobs(logits, labels, backend=backend, inplace_backward=inplace)
        elif impl in ("torch", "torch.compile"):
            f = ref.token_logprobs if impl == "torch" else _compiled(ref.token_logprobs)
            fwd = lambda: f(logits, labels)
        elif impl == "trl":
            from trl.trainer.utils import selective_log_softmax

            fwd = lambda: selective_log_softmax(logits, labels)
        elif impl == "liger":
            from liger_kernel.transformers.functional import liger_cross_entropy

            # Liger's CE writes the gradient into its input during forward (its only mode).
            fwd = lambda: -liger_cross_entropy(logits.view(-1, V), labels.view(-1), reduction="none").view(B, T)
        elif impl == "flash-attn":
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

            fwd = lambda: -cross_entropy_loss(logits.view(-1, V), labels.view(-1))[0].view(B, T)
        else:
            raise Skip(f"{impl} has no {op.name}")
        if not op.backward:
            return Case(_no_grad(fwd), inputs)
        gl = inp["grad_logp"]

        def fn():
            out = fwd()
            _grad(out, inputs, gl)
            return out.detach()

        return Case(fn, inputs)

    if op.name == "entropy":
        if impl.startswith("fastrlhf"):
            fwd = lambda: fastrlhf.entropy(logits, backend=backend)
        elif impl in ("torch", "torch.compile"):
            f = ref.entropy if impl == "torch" else _compiled(ref.entropy)
            fwd = lambda: f(logits)
        elif impl == "trl":
            from trl.trainer.utils import entropy_from_logits

            fwd = lambda: entropy_from_logits(logits)
        else:
            raise Skip(f"{impl} has no entropy")
        return Case(_no_grad(fwd), inputs)

    if op.name == "logprobs-entropy-fwdbwd":
        if impl.startswith("fastrlhf"):
            fwd = lambda: fastrlhf.token_logprobs_and_entropy(
                logits, labels, backend=backend, inplace_backward=inplace
            )
        elif impl in ("torch", "torch.compile"):
            f = ref.token_logprobs_and_entropy if impl == "torch" else _compiled(ref.token_logprobs_and_entropy)
            fwd = lambda: f(logits, labels)
        elif impl == "trl":
            from trl.trainer.utils import selective_log_softmax_and_entropy

            fwd = lambda: selective_log_softmax_and_entropy(logits, labels)
        else:
            raise Skip(f"{impl} has no logprobs+entropy")
        gl, ge = inp["grad_logp"], inp["grad_ent"]

        def fn():
            logp, ent = fwd()
            _grad((logp, ent), inputs, (gl, ge))
            return logp.detach().double().sum() + ent.detach().double().sum()

        return Case(fn, inputs)

    if op.name == "ppo":
        old, refl, adv, mask = inp["old"], inp["ref"], inp["adv"], inp["mask"]
        kw = dict(beta=GRPO_BETA, mask=mask, clip_low=CLIP_EPS, loss_agg="token-mean")
        if impl.startswith("fastrlhf"):
            loss_fn = lambda: fastrlhf.grpo_loss(logits, labels, old, adv, refl, backend=backend,
                                                 inplace_backward=inplace, **kw)[0]
        elif impl in ("torch", "torch.compile"):
            f = ref.grpo_loss if impl == "torch" else _compiled(ref.grpo_loss)
            loss_fn = lambda: f(logits, labels, old, adv, refl, **kw)[0]
        elif impl == "trl":
            from trl.trainer.utils import selective_log_softmax

            m = mask.float()

            def loss_fn():  # TRL's GRPOTrainer: its logprob kernel, then the per-token loss math
                logp = selective_log_softmax(logits, labels)
                return ref.ppo_clip_loss_from_logprobs(
                    logp, m, old, adv, clip_low=CLIP_EPS, ref_logprobs=refl, kl_coef=GRPO_BETA,
                    loss_agg="token-mean")[0]
        elif impl == "liger":
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            # Liger takes [B, T + 1, V] (it drops the last position itself); its own leaf.
            full = torch.empty(B, T + 1, V, device=device, dtype=logits.dtype)  # [B, T + 1, V]
            full[:, :T].copy_(logits.detach())
            full[:, T:].normal_()
            full.requires_grad_(True)
            inputs = [full]
            m = mask.int().contiguous()
            loss_fn = lambda: triton_grpo_loss(
                full, old, refl, labels, adv, completion_mask=m, temperature=1.0, beta=GRPO_BETA,
                eps_low=CLIP_EPS, eps_high=CLIP_EPS, inplace=True, loss_type="dapo", reduce=True)[0]
        else:
            raise Skip(f"{impl} has no GRPO loss")

        def fn():
            loss = loss_fn()
            _grad(loss, inputs)
            return loss.detach()

        return Case(fn, inputs)

    if op.name == "dpo":
        ref_c, ref_r = inp["ref_c"], inp["ref_r"]
        if impl.startswith("fastrlhf"):
            loss_fn = lambda: fastrlhf.dpo_loss(logits, labels, ref_c, ref_r, beta=DPO_BETA, backend=backend,
                                                inplace_backward=inplace)[0]
        elif impl in ("torch", "torch.compile"):
            f = ref.dpo_loss if impl == "torch" else _compiled(ref.dpo_loss)
            loss_fn = lambda: f(logits, labels, ref_c, ref_r, beta=DPO_BETA)[0]
        elif impl == "trl":
            from trl.trainer.utils import selective_log_softmax

            valid = labels != -100
            safe = labels.clamp_min(0)
            half = B // 2

            def loss_fn():  # TRL's DPOTrainer: its logprob kernel, masked sums, the sigmoid loss
                seq = (selective_log_softmax(logits, safe) * valid).sum(-1)  # [2B]
                return ref.dpo_loss_from_logprobs(seq[:half], seq[half:], ref_c, ref_r, beta=DPO_BETA)[0]
        else:
            raise Skip(f"{impl} has no logits-level DPO loss")

        def fn():
            loss = loss_fn()
            _grad(loss, inputs)
            return loss.detach()

        return Case(fn, inputs)

    raise Skip(f"unknown op {op.name}")


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


def _no_grad(fwd: Callable) -> Callable:
    def fn():
        with torch.no_grad():
            out = fwd()
        return out

    return fn


def _build_linear_case(op: OpSpec, impl: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    from fastrlhf import reference as ref

    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, V, H = shape.B, shape.T, shape.V, shape.H
    gd = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, H, generator=gd, device=device, dtype=dtype).requires_grad_(True)  # [B, T, H]
    # lm_head init ~ N(0, 1/H): logits of unit scale, as a trained model's
    weight = torch.randn(V, H, generator=gd, device=device, dtype=dtype).mul_(H**-0.5).requires_grad_(True)  # [V, H]
    labels = torch.randint(0, V, (B, T), generator=g).to(device)  # [B, T]
    inputs = [hidden, weight]
    # old / ref logprobs near log(1/V): computing the true ones would cost a full matmul here.
    base = -math.log(V)
    old = (base + 0.05 * torch.randn(B, T, generator=g)).to(device).contiguous()
    refl = (base + 0.05 * torch.randn(B, T, generator=g)).to(device).contiguous()
    adv = torch.randn(B, generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    gl = torch.randn(B, T, generator=g).to(device)
    on_gpu = device.type == "cuda"

    if op.name == "linear-logprobs":
        if impl == "fastrlhf":
            f = fastrlhf_linear("linear_token_logprobs")
        elif impl == "torch":
            f = ref.linear_token_logprobs
        elif impl == "torch.compile":
            f = _compiled(ref.linear_token_logprobs)
        else:
            raise Skip(f"{impl} has no fused-linear logprobs")

        def fn():
            out = f(hidden, weight, labels)
            _grad(out, inputs, gl)
            return out.detach()

        return Case(fn, inputs)

    if op.name == "linear-grpo":
        kw = dict(beta=GRPO_BETA, mask=mask, clip_low=CLIP_EPS, loss_agg="token-mean")
        if impl in ("fastrlhf", "torch", "torch.compile"):
            f = {"fastrlhf": fastrlhf_linear("linear_grpo_loss"), "torch": ref.linear_grpo_loss}.get(impl)
            if impl == "torch.compile":
                f = _compiled(ref.linear_grpo_loss)
            loss_fn = lambda: f(hidden, weight, labels, old, adv, refl, **kw)[0]
            note = ""
        elif impl == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            # compiled=True is Liger's default; on CPU its torch.compile of every chunk shape
            # would dominate, so the CPU run uses its eager chunked path.
            mod = LigerFusedLinearGRPOLoss(beta=GRPO_BETA, compiled=on_gpu, epsilon_low=CLIP_EPS,
                                           epsilon_high=CLIP_EPS, loss_type="dapo", temperature=1.0)
            m = mask.int()
            loss_fn = lambda: mod(hidden, weight, labels, m, adv, ref_per_token_logps=refl,
                                  old_per_token_logps=old)[0]
            note = "" if on_gpu else "compiled=False (eager chunks) on CPU"
        else:
            raise Skip(f"{impl} has no fused-linear GRPO")

        def fn():
            loss = loss_fn()
            _grad(loss, inputs)
            return loss.detach()

        return Case(fn, inputs, note)

    if op.name == "linear-dpo":
        if B % 2:
            raise Skip(f"DPO needs an even number of rows (chosen + rejected), got B={B}")
        labels[:, : T // 4] = -100  # prompt tokens
        half = B // 2
        zeros = torch.zeros(half, device=device)
        note = ""
        if impl in ("fastrlhf", "torch", "torch.compile"):
            f = {"fastrlhf": fastrlhf_linear("linear_dpo_loss"), "torch": ref.linear_dpo_loss}.get(impl)
            if impl == "torch.compile":
                f = _compiled(ref.linear_dpo_loss)
            loss_fn = lambda: f(hidden, weight, labels, zeros, zeros, beta=DPO_BETA)[0]
        elif impl == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            # Reference-free on both sides: Liger's module would otherwise run a reference
            # model itself, while fastrlhf takes precomputed reference logprobs.
            mod = LigerFusedLinearDPOLoss(beta=DPO_BETA, compiled=on_gpu, use_ref_model=False)
            loss_fn = lambda: mod(weight, hidden, labels)[0]
            note = "" if on_gpu else "compiled=False (eager chunks) on CPU"
        else:
            raise Skip(f"{impl} has no fused-linear DPO")

        def fn():
            loss = loss_fn()
            _grad(loss, inputs)
            return loss.detach()

        return Case(fn, inputs, note)

    raise Skip(f"unknown op {op.name}")


def _build_gae_case(op: OpSpec, impl: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    import fastrlhf
    from fastrlhf import reference as ref

    g = torch.Generator(device="cpu").manual_seed(0)
    B, T = shape.B, shape.T
    rewards = torch.randn(B, T, generator=g).to(device)  # [B, T]
    values = torch.randn(B, T, generator=g).to(device)  # [B, T]
    lengths = torch.randint(T // 2, T + 1, (B, 1), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths).to(device)  # right-padded responses [B, T]
    if impl == "fastrlhf":
        f = fastrlhf.gae
    elif impl == "torch":
        f = ref.gae
    else:
        raise Skip(f"{impl} has no GAE")
    return Case(_no_grad(lambda: f(rewards, values, mask, gamma=GAE_GAMMA, lam=GAE_LAM)[0]), [])


def build_case(op_name: str, impl: str, shape: Shape, device: str | torch.device, dtype: torch.dtype) -> Case:
    """The callable for one measurement (also used by the pytest-benchmark suites)."""
    op = OPS[op_name]
    device = torch.device(device)
    try:
        if op.kind == "logits":
            return _build_logits_case(op, impl, shape, device, dtype)
        if op.kind == "linear":
            return _build_linear_case(op, impl, shape, device, dtype)
        return _build_gae_case(op, impl, shape, device, dtype)
    except (ImportError, AttributeError) as e:
        raise Skip(f"{impl} unavailable: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------
# Measurement (runs in a fresh child process on CPU; in-process or isolated on GPU)
# ----------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def _malloc_returns_memory() -> bool:
    """Make RSS track live memory: allocations over 64 KiB use mmap and are unmapped on free.

    Setting M_MMAP_THRESHOLD explicitly also turns off glibc's dynamic threshold, which would
    otherwise keep freed blocks of up to 32 MiB resident in the heap and hide their reuse from
    VmHWM. Must be set before the process allocates: chunks already in the heap's free lists
    would be reused (and kept) whatever the threshold says afterwards.
    """
    return _mallopt(64 * 1024, 128 * 1024)


def _malloc_steady_state() -> bool:
    """glibc's default behaviour after warm-up: the dynamic mmap threshold at its 32 MiB cap
    (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit) and the trim threshold at twice that, so blocks
    below 32 MiB are recycled from the heap instead of page-faulted afresh on every call."""
    return _mallopt(32 * 2**20, 64 * 2**20)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _is_device_limitation(e: Exception) -> bool:
    msg = str(e).lower()
    return isinstance(e, (ValueError, RuntimeError, NotImplementedError, AssertionError)) and any(
        w in msg for w in ("cuda", "gpu", "xpu", "device", "triton")
    )


def measure(task: dict[str, Any]) -> dict[str, Any]:
    """Build the case, warm it up, measure its peak memory once, then time it. Returns a result dict."""
    op, impl = task["op"], task["impl"]
    shape = Shape(**task["shape"])
    dtype = DTYPES[task["dtype"]]
    device = torch.device(task["device"])
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(task["threads"])
    case = build_case(op, impl, shape, device, dtype)

    # Warm-up: first call checked and kept for the output check; compilation happens here.
    try:
        first = case.fn()
    except Exception as e:
        if _is_device_limitation(e):
            raise Skip(f"{impl} does not run on {device.type}: {type(e).__name__}: {str(e)[:160]}") from e
        raise
    check = float(first.double().sum()) if isinstance(first, torch.Tensor) else None
    del first
    for _ in range(task["warmup"] - 1):
        case.fn()
    gc.collect()

    res: dict[str, Any] = {"check_value": check, "note": case.note}
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        case.fn()
        torch.cuda.synchronize()
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        from triton.testing import do_bench

        ms = do_bench(case.fn, warmup=25, rep=task["rep_ms"], return_mode="median")
        res.update(time_ms=float(ms), wall_ms=float(ms), reps=None)
    else:
        res["peak_mem_bytes"] = None  # only meaningful in a fresh process with RSS tracking live memory
        if task.get("isolated"):
            if not task.get("malloc_mmap"):
                res["note"] = (res["note"] + " (mallopt unavailable: peak RSS may under-count)").strip()
            base = _proc_status_kib("VmRSS")
            if _reset_peak_rss():
                case.fn()
                res["peak_mem_bytes"] = max(0, _proc_status_kib("VmHWM") - base) * 1024
            # Time with the allocator as it behaves in a long-running process (see above):
            # with every large block mmap-ed, each call would also pay its page faults.
            _malloc_steady_state()
        walls: list[float] = []
        cpus: list[float] = []
        total = 0.0
        while len(walls) < task["max_reps"] and (len(walls) < task["min_reps"] or total < task["min_time_s"]):
            c0, t0 = time.process_time(), time.perf_counter()
            case.fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            walls.append(dt)
            cpus.append(dc)
            total += dt
        wall_ms, cpu_ms = 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)
        res.update(wall_ms=wall_ms, cpu_ms=cpu_ms, time_ms_min=1e3 * min(walls), reps=len(walls),
                   time_ms=cpu_ms if task.get("timer") == "cpu" else wall_ms)
        if task["threads"] == 1 and wall_ms > CONTENDED * cpu_ms:
            # Another process held the core: the wall time includes its time slices.
            res["note"] = (res["note"] + f" contended: wall {wall_ms / cpu_ms:.1f}x CPU time").strip()
    return res


def _child(conn, task: dict[str, Any]) -> None:
    """Entry point of a fresh measurement process: sends back one result dict."""
    if task.get("isolated") and task["device"] == "cpu":
        task["malloc_mmap"] = _malloc_returns_memory()  # before the first allocation of the case
    try:
        res = measure(task)
        res["status"] = "ok"
    except Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # a failure is a result too (OOM, kernel error): report, don't crash the run
        tb = traceback.format_exc(limit=3)
        res = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:300]}", "traceback": tb}
    try:
        conn.send(res)
    finally:
        conn.close()


def _stream_child(conn, threads: int, device: str, timer: str = "wall") -> None:
    """STREAM-like copy bandwidth (bytes read + written per second) with the benchmark's threads.

    ``timer="cpu"`` times the copies with this process's CPU time, like the measurements.
    """
    try:
        if device == "cpu":
            torch.set_num_threads(threads)
        n = (256 if device == "cpu" else 1024) * 2**20 // 4  # 256 MiB (CPU) / 1 GiB (GPU) of fp32
        a = torch.ones(n, device=device)
        b = torch.empty_like(a)
        clock = time.process_time if (timer == "cpu" and device == "cpu") else time.perf_counter
        times = []
        for _ in range(10):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            b.copy_(a)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(clock() - t0)
        conn.send({"bytes_per_s": 2 * n * 4 / min(times[2:])})  # best of 8, as STREAM reports
    except Exception as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


class Runner:
    """Runs tasks, each in a fresh process forked from a server that has imported the libraries."""

    def __init__(self, isolate: bool, threads: int, timeout_s: float, preload: Sequence[str] = ()):
        self.isolate = isolate
        self.timeout_s = timeout_s
        self.ctx = None
        if isolate:
            import multiprocessing as mp

            os.environ["OMP_NUM_THREADS"] = str(threads)
            os.environ["MKL_NUM_THREADS"] = str(threads)
            os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
            self.ctx = mp.get_context("forkserver")
            # The server imports only libraries (no CUDA call), so each forked child starts
            # with the imports done but no allocations, caches or CUDA context of its own.
            # Heavy optional imports (TRL pulls in transformers, inductor) cost seconds per
            # child on a loaded 2-core machine; the caller preloads them where that is safe.
            self.ctx.set_forkserver_preload(["torch", "fastrlhf", "fastrlhf.reference", "fastrlhf.bench", *preload])

    def _in_child(self, target, args) -> dict[str, Any]:
        parent_conn, child_conn = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        proc.start()
        child_conn.close()
        try:
            if parent_conn.poll(self.timeout_s):
                res = parent_conn.recv()
            else:
                res = {"status": "error", "reason": f"timed out after {self.timeout_s:.0f} s"}
        except EOFError:
            res = None
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()  # only the child this runner started
            proc.join()
        if res is None:
            code = proc.exitcode
            why = "killed (out of memory?)" if code is not None and code < 0 else f"exit code {code}"
            res = {"status": "error", "reason": f"measurement process died: {why}"}
        parent_conn.close()
        return res

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = self._run(dict(task, isolated=self.isolate))
        res["wall_s"] = round(time.perf_counter() - t0, 2)  # whole measurement: build, compile, calls
        return res

    def _run(self, task: dict[str, Any]) -> dict[str, Any]:
        if self.isolate:
            return self._in_child(_child, (task,))
        try:
            res = measure(task)
            res["status"] = "ok"
        except Skip as e:
            res = {"status": "skipped", "reason": str(e)}
        except Exception as e:
            res = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return res

    def stream_bandwidth(self, threads: int, device: str, timer: str = "wall") -> Optional[float]:
        if self.isolate:
            res = self._in_child(_stream_child, (threads, device, timer))
        else:
            import multiprocessing as mp

            a, b = mp.Pipe(duplex=False)
            _stream_child(b, threads, device, timer)
            res = a.recv()
        return res.get("bytes_per_s")


# ----------------------------------------------------------------------------------------
# Sweep, derived metrics, reports
# ----------------------------------------------------------------------------------------


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


def derive(row: dict[str, Any], peak_bw: Optional[float]) -> None:
    """Add bytes, GB/s, % of peak and TFLOP/s to a result row (in place)."""
    op = OPS[row["op"]]
    N, V, H = row["N"], row["V"], row["H"]
    t = row.get("time_ms")
    nbytes = None
    if op.kind == "logits":
        nbytes = op.passes * N * V * ELEM_BYTES[DTYPES[row["dtype"]]]
    elif op.kind == "gae":
        nbytes = N * (4 + 4 + 1 + 4 + 4)
    flops = op.matmuls * 2 * N * H * V if op.kind == "linear" else None
    row["bytes"] = nbytes
    row["flops"] = flops
    row["gbps"] = nbytes / (t * 1e-3) / 1e9 if (nbytes and t) else None
    row["pct_peak"] = 100 * row["gbps"] * 1e9 / peak_bw if (row["gbps"] and peak_bw) else None
    row["tflops"] = flops / (t * 1e-3) / 1e12 if (flops and t) else None
    mem = row.get("peak_mem_bytes")
    row["peak_mem_mb"] = mem / 2**20 if mem is not None else None


def add_checks_and_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``check`` and ``speedup_vs_torch`` per row; return the fastrlhf-vs-baseline ratio table."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["N"], r["V"], r["H"]), {})[r["impl"]] = r
    ratios = []
    for (op, N, V, H), by_impl in groups.items():
        torch_row = by_impl.get("torch")
        tv = torch_row.get("check_value") if torch_row and torch_row["status"] == "ok" else None
        tt = torch_row.get("time_ms") if torch_row and torch_row["status"] == "ok" else None
        for r in by_impl.values():
            r["speedup_vs_torch"] = tt / r["time_ms"] if (tt and r.get("time_ms")) else None
            cv = r.get("check_value")
            if r["status"] != "ok" or cv is None or tv is None:
                r["check"] = None
            elif abs(cv - tv) <= CHECK_RTOL * max(abs(tv), 1e-3) or (math.isnan(cv) and math.isnan(tv)):
                r["check"] = "ok"
            else:
                r["check"] = f"MISMATCH ({cv:.6g} vs torch {tv:.6g})"
        for cand in by_impl.values():
            if not cand["impl"].startswith("fastrlhf") or cand["status"] != "ok":
                continue
            for base in BASELINES:
                b = by_impl.get(base)
                if b is None or b["status"] != "ok":
                    continue
                fm, bm = cand.get("peak_mem_mb"), b.get("peak_mem_mb")
                ratios.append({
                    "op": op, "N": N, "V": V, "H": H, "fastrlhf_impl": cand["impl"], "baseline": base,
                    "fastrlhf_time_ms": cand["time_ms"], "baseline_time_ms": b["time_ms"],
                    "speedup": b["time_ms"] / cand["time_ms"],
                    "fastrlhf_mem_mb": fm, "baseline_mem_mb": bm,
                    # below 1 MiB a side holds only a few [N] vectors: a ratio of it would be noise
                    "mem_ratio": bm / fm if (fm is not None and bm is not None and min(fm, bm) >= 1.0) else None,
                })
    return ratios


ROW_FIELDS = ("device", "op", "impl", "backend", "dtype", "N", "B", "T", "V", "H", "status", "reason", "note",
              "time_ms", "wall_ms", "cpu_ms", "time_ms_min", "reps", "bytes", "gbps", "pct_peak", "flops", "tflops",
              "peak_mem_mb", "speedup_vs_torch", "check", "check_value", "wall_s")
RATIO_FIELDS = ("op", "N", "V", "H", "fastrlhf_impl", "baseline", "fastrlhf_time_ms", "baseline_time_ms",
                "speedup", "fastrlhf_mem_mb", "baseline_mem_mb", "mem_ratio")


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def format_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cpu = meta["mode"] == "cpu"
    peak_name = "%copy" if cpu else "%peak"
    # CPU: "ms" is the --timer choice; the other clock is shown beside it.
    other = ("cpu_ms" if meta.get("timer_choice") == "wall" else "wall_ms") if cpu else None
    head = ("shape", "impl", "ms", *((other.replace("_", " "),) if other else ()), "GB/s", peak_name, "TFLOP/s",
            "mem MB", "x torch", "check / reason")
    lines = [f"# fastrlhf bench -- {meta['device']} ({meta['dtype']}, {meta.get('threads') or ''} threads)".rstrip()]
    if meta.get("peak_bandwidth_gbps"):
        lines.append(f"# peak bandwidth: {meta['peak_bandwidth_gbps']:.1f} GB/s ({meta['peak_bandwidth_source']})")
    for op_name in dict.fromkeys(r["op"] for r in rows):
        op = OPS[op_name]
        lines.append("")
        lines.append(f"## {op_name}: {op.doc}")
        body = []
        for r in rows:
            if r["op"] != op_name:
                continue
            shape = Shape(r["B"], r["T"], r["V"], r["H"]).label()
            tail = r.get("check") or "" if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
            if r["status"] == "ok" and r.get("note"):
                tail = f"{tail} ({r['note']})".strip()
            body.append((shape, r["impl"], _fmt(r.get("time_ms"), ".4g"),
                         *((_fmt(r.get(other), ".4g"),) if other else ()), _fmt(r.get("gbps"), ".1f"),
                         _fmt(r.get("pct_peak"), ".1f"), _fmt(r.get("tflops"), ".2f"),
                         _fmt(r.get("peak_mem_mb"), ".1f"), _fmt(r.get("speedup_vs_torch"), ".2f"), tail))
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head[:-1])]
        lines.extend("  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "  " + cols[-1]
                     for cols in (head, *body))
    if ratios:
        lines.append("")
        lines.append("## fastrlhf vs each baseline "
                     "(speedup = baseline time / fastrlhf time; mem = baseline / fastrlhf peak memory)")
        for r in ratios:
            shape = Shape(1, r["N"], r["V"], r["H"]).label()
            lines.append(f"{r['op']:<24} {shape:<24} {r['fastrlhf_impl']:<18} vs {r['baseline']:<14} "
                         f"speedup {r['speedup']:6.2f}x   mem {_fmt(r['mem_ratio'], '.2f')}x")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def write_plots(rows: list[dict[str, Any]], out_dir: str, meta: dict[str, Any]) -> list[str]:
    """One PNG per (op, V, H): time and peak memory vs N, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    keys = dict.fromkeys((r["op"], r["V"], r["H"]) for r in rows)
    for op_name, V, H in keys:
        sel = [r for r in rows if (r["op"], r["V"], r["H"]) == (op_name, V, H) and r["status"] == "ok"]
        if not sel:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in sel)]
        for impl in impls:
            pts = sorted((r["N"], r["time_ms"], r.get("peak_mem_mb")) for r in sel if r["impl"] == impl)
            style = dict(marker="o", linewidth=2.2 if impl.startswith("fastrlhf") else 1.3,
                         linestyle="-" if impl.startswith("fastrlhf") else "--")
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=impl, **style)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                ax_m.plot([p[0] for p in mem], [max(p[1], 1e-2) for p in mem], label=impl, **style)
        clock = {"wall": "wall", "cpu": "CPU"}.get(meta.get("timer_choice"), "GPU")
        for ax, ylabel in ((ax_t, f"median {clock} time per call (ms)"),
                           (ax_m, "peak memory added by the call (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        shape = f"V={V}" + (f", H={H}" if H else "") if V else ""
        fig.suptitle(f"{op_name} {shape} -- {meta['device']}, {meta['dtype']}", fontsize=10)
        fig.tight_layout()
        name = op_name + (f"_V{V}" if V else "") + (f"_H{H}" if H else "") + ".png"
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _parse_ints(s: Optional[str]) -> Optional[list[int]]:
    return [int(x) for x in s.split(",") if x.strip()] if s else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastrlhf bench",
        description="Benchmark fastrlhf ops against plain PyTorch, torch.compile, TRL, Liger-Kernel and "
                    "flash-attn in one run: table on stdout, CSV/JSON/PNG under benchmarks/results/<device>/.",
    )
    p.add_argument("ops", nargs="*", metavar="op", help=f"ops to run (default: all): {', '.join(OPS)}")
    p.add_argument("--mode", choices=("cpu", "gpu"), default=None,
                   help="cpu: small shapes, fp32, perf_counter; gpu: RLHF shapes, bf16, do_bench "
                        "(default: gpu when CUDA is available)")
    p.add_argument("--impl", default=None, help="comma-separated implementations (default: all)")
    p.add_argument("--n", default=None, help="comma-separated token counts N (overrides the mode's sweep)")
    p.add_argument("--v", default=None, help="comma-separated vocabulary sizes V")
    p.add_argument("--h", default=None, help="comma-separated hidden sizes H (fused-linear ops)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="logits / hidden dtype")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per measurement (default 1: results comparable on a shared machine)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="CPU: the time behind ms, GB/s, ratios and plots: wall (perf_counter, default) or "
                        "this process's CPU time (process_time; immune to other processes on a shared machine, "
                        "meaningful with --threads 1). Both are always recorded (wall_ms, cpu_ms)")
    p.add_argument("--min-time", type=float, default=0.3, help="CPU: seconds of timed calls per measurement")
    p.add_argument("--min-reps", type=int, default=3, help="CPU: minimum timed calls")
    p.add_argument("--max-reps", type=int, default=50, help="CPU: maximum timed calls")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1; compiles torch.compile)")
    p.add_argument("--rep-ms", type=int, default=200, help="GPU: do_bench time budget per measurement (ms)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a measurement is abandoned")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one fresh process per measurement (always on CPU, where peak RSS needs it; "
                        "optional on GPU, where it survives a crashed kernel)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-tag>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list ops and implementations, then exit")
    p.add_argument("--from-json", metavar="RESULTS_JSON", default=None,
                   help="re-render table, CSVs and plots from an earlier results.json (no measuring; "
                        "written next to it unless --out)")
    return p


def _default_out_dir(tag: str) -> str:
    # benchmarks/ sits at the repository root next to the fastrlhf package; fall back to ./benchmarks
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.join(root, "benchmarks") if os.path.isdir(os.path.join(root, "benchmarks")) else "benchmarks"
    return os.path.join(base, "results", tag)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastrlhf bench [op ...] [options]``; returns the process exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.from_json:
        return rerender(args.from_json, args.out, plots=not args.no_plots)
    if args.list:
        for op in OPS.values():
            print(f"{op.name:<26} {op.doc}\n{'':<26} impls: {', '.join(op.impls)}")
        return 0
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {list(OPS)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    mode = args.mode or ("gpu" if cuda else "cpu")
    if mode == "gpu" and not cuda:
        print("--mode gpu needs a CUDA device; none is available (use --mode cpu)", file=sys.stderr)
        return 2
    if args.warmup < 1:
        print("--warmup must be >= 1", file=sys.stderr)
        return 2
    cfg = MODES[mode]
    dtype = args.dtype or cfg.dtype
    device = "cuda" if mode == "gpu" else "cpu"
    isolate = True if mode == "cpu" else bool(args.isolate)
    if mode == "cpu" and args.isolate is False:
        print("note: CPU mode always isolates measurements (peak RSS is only meaningful per fresh process)",
              file=sys.stderr)
    impl_filter = [s.strip() for s in args.impl.split(",")] if args.impl else None
    if impl_filter:
        bad = [i for i in impl_filter if i not in IMPL_ORDER]
        if bad:
            print(f"unknown implementation(s) {bad}; choose from {list(IMPL_ORDER)}", file=sys.stderr)
            return 2

    from . import _backend

    backends = _backend.available_backends()
    auto_backend = _backend.resolve_backend("auto", torch.device(device))
    if mode == "gpu":
        gpu_name = torch.cuda.get_device_name(0)
        tag, device_name = device_tag(mode, gpu_name), gpu_name
    else:
        tag, device_name = "cpu", f"{cpu_model()} ({os.cpu_count()} cores)"
    out_dir = args.out or _default_out_dir(tag)
    os.makedirs(out_dir, exist_ok=True)

    n, v, h = _parse_ints(args.n), _parse_ints(args.v), _parse_ints(args.h)
    op_names = args.ops or list(OPS)
    tasks, rows = [], []
    for op_name in op_names:
        op = OPS[op_name]
        for shape in shapes_for(op, cfg, n, v, h):
            for impl in op.impls:
                if impl_filter and impl not in impl_filter:
                    continue
                if mode == "gpu" and impl.startswith("fastrlhf[") and impl != "fastrlhf[inplace]":
                    continue  # explicit backends: CPU mode only
                row = dict(device=tag, op=op_name, impl=impl, dtype=dtype, N=shape.N, B=shape.B, T=shape.T,
                           V=shape.V, H=shape.H, backend=_impl_backend(impl, auto_backend))
                reason = static_skip(op, impl, mode, backends, auto_backend)
                if reason:
                    row.update(status="skipped", reason=reason)
                    rows.append(row)
                    continue
                task = dict(op=op_name, impl=impl, shape=dataclasses.asdict(shape), dtype=dtype, device=device,
                            threads=args.threads, warmup=args.warmup, min_reps=args.min_reps,
                            max_reps=args.max_reps, min_time_s=args.min_time, rep_ms=args.rep_ms,
                            timer=args.timer)
                tasks.append((row, task))
                rows.append(row)

    # CPU mode preloads the baselines it will run into the fork server. GPU mode does not: importing
    # them may query CUDA, and a CUDA driver initialised before fork() is unusable in the children.
    used = {task["impl"] for _, task in tasks}
    heavy = {"torch.compile": "torch._inductor.compile_fx", "trl": "trl.trainer.utils",
             "liger": "liger_kernel.chunked_loss"}
    preload = [m for impl, m in heavy.items() if impl in used and _installed(m.split(".")[0])] if mode == "cpu" else []
    runner = Runner(isolate, args.threads, args.timeout, preload)

    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety, not a requirement
        tqdm = None
    t_start = time.perf_counter()
    peak_bw = gpu_peak_bandwidth(device_name) if mode == "gpu" else None
    peak_src = "NVIDIA datasheet HBM bandwidth" if peak_bw else None
    copy_bw = runner.stream_bandwidth(args.threads, device, args.timer if mode == "cpu" else "wall")
    if mode == "cpu" and copy_bw:
        peak_bw = copy_bw
        peak_src = (f"measured STREAM-like copy (2 x 256 MiB / {args.timer} time of b.copy_(a), best of 8), "
                    f"{args.threads} thread(s)")
    elif peak_bw is None and copy_bw:  # a GPU without a datasheet entry: its measured copy bandwidth
        peak_bw = copy_bw
        peak_src = "measured device copy (2 x 1 GiB / time of b.copy_(a)); no datasheet entry for this GPU"
    bar = tqdm(total=len(tasks), desc="fastrlhf bench", unit="run", file=sys.stderr, dynamic_ncols=True) \
        if tqdm else None
    for row, task in tasks:
        if bar:
            bar.set_postfix_str(f"{row['op']} {row['impl']} N={row['N']} V={row['V']}", refresh=False)
        row.update(runner.run(task))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    elapsed = time.perf_counter() - t_start

    for r in rows:
        r.setdefault("status", "error")
    meta = {
        "mode": mode,
        "device": device_name,
        "device_tag": tag,
        "dtype": dtype,
        "threads": args.threads if mode == "cpu" else None,
        "isolated_processes": isolate,
        "timer_choice": args.timer if mode == "cpu" else "cuda-events",
        "auto_backend": auto_backend,
        "available_backends": backends,
        "versions": versions(),
        "command": "fastrlhf bench " + " ".join(list(sys.argv[1:] if argv is None else argv)),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "host": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()},
        "peak_bandwidth_gbps": peak_bw / 1e9 if peak_bw else None,
        "peak_bandwidth_source": peak_src,
        "measured_copy_bandwidth_gbps": copy_bw / 1e9 if copy_bw else None,
        "timer": "triton.testing.do_bench (CUDA events, median)" if mode == "gpu"
        else (f"{'time.process_time' if args.timer == 'cpu' else 'time.perf_counter'} median of >= "
              f"{args.min_reps} calls and >= {args.min_time} s after {args.warmup} warm-up call(s) and the memory "
              "call; wall_ms (perf_counter) and cpu_ms (process_time) both recorded"),
        "memory": "torch.cuda.max_memory_allocated - memory_allocated before the call" if mode == "gpu"
        else "VmHWM - VmRSS around one call in a fresh process (clear_refs=5, mallopt mmap threshold 64 KiB)",
        "formulas": FORMULAS,
        "ops": {name: OPS[name].doc for name in op_names},
    }
    report(rows, meta, out_dir, plots=not args.no_plots)
    return 0


FORMULAS = {
    "bytes_logits_ops": "passes * N * V * bytes(dtype); forward 1 pass, forward+backward 3 passes "
                        "(read logits, read logits again, write their gradient)",
    "bytes_gae": "N * (4 + 4 + 1 + 4 + 4): rewards, values, bool mask read; advantages, returns written",
    "flops_linear_ops": "matmuls * 2 * N * H * V; forward+backward counts 3 matmuls (logits, dhidden, "
                        "dweight); recomputation not counted",
    "speedup": "baseline time / fastrlhf time",
    "mem_ratio": "baseline peak memory / fastrlhf peak memory (blank unless both >= 1 MiB)",
}


def report(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: str, plots: bool = True) -> None:
    """Derived metrics, checks and ratios; then results.csv, ratios.csv, results.json, PNGs and the table."""
    peak_bw = meta["peak_bandwidth_gbps"] * 1e9 if meta.get("peak_bandwidth_gbps") else None
    for r in rows:
        derive(r, peak_bw)
    op_order = list(OPS)
    rows.sort(key=lambda r: (op_order.index(r["op"]), r["V"], r["H"], r["N"], IMPL_ORDER.index(r["impl"])))
    ratios = add_checks_and_ratios(rows)
    write_csv(os.path.join(out_dir, "results.csv"), rows, ROW_FIELDS)
    write_csv(os.path.join(out_dir, "ratios.csv"), ratios, RATIO_FIELDS)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": rows, "ratios": ratios}, f, indent=1, default=str)
    written = write_plots(rows, out_dir, meta) if plots else []
    print(format_table(rows, ratios, meta))
    print(f"\nwrote {out_dir}/results.csv, ratios.csv, results.json and {len(written)} plot(s); "
          f"measured in {meta.get('elapsed_s', 0):.0f} s")


def rerender(path: str, out_dir: Optional[str], plots: bool) -> int:
    """``--from-json``: rebuild table, CSVs and plots of an earlier run without measuring again."""
    with open(path) as f:
        data = json.load(f)
    data["meta"]["formulas"] = FORMULAS  # the derived columns are recomputed with today's definitions
    report(data["results"], data["meta"], out_dir or os.path.dirname(os.path.abspath(path)), plots)
    return 0


def _impl_backend(impl: str, auto_backend: str) -> str:
    if impl in ("fastrlhf", "fastrlhf[inplace]"):
        return auto_backend
    if impl.startswith("fastrlhf["):
        return impl[len("fastrlhf["):-1]
    return ""


if __name__ == "__main__":
    # Re-enter through the package module so the child processes pickle ``fastrlhf.bench._child``.
    from fastrlhf.bench import main as _main

    sys.exit(_main())
