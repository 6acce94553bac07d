"""Backend selection: ``backend=`` argument, ``FASTRLHF_BACKEND``, or ``auto``.

``auto``: CUDA tensors -> Triton; CPU tensors -> the native C++ extension when built, else
the chunked torch path. ``backend="triton"`` on CPU tensors runs the same kernels under the
Triton interpreter; that needs ``TRITON_INTERPRET=1`` before the kernels are decorated, which
this module sets itself on machines without CUDA (Triton reads it when ``@triton.jit`` runs).
"""

from __future__ import annotations

import importlib
import os
from typing import Dict

import torch

BACKENDS = ("auto", "triton", "native", "torch")
_ENV = "FASTRLHF_BACKEND"

_triton_error: str | None = None
_triton_checked = False


def _triton_importable() -> bool:
    global _triton_error, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            kernels = importlib.import_module("fastrlhf.kernels.logprobs")
        except Exception as e:  # triton missing (non-Linux) or broken
            _triton_error = f"{type(e).__name__}: {e}"
        else:
            import triton.language.standard as tl_standard
            from triton.runtime.interpreter import InterpretedFunction

            decorated = (kernels._logprobs_fwd_kernel, tl_standard.sum)
            if not torch.cuda.is_available() and not all(isinstance(f, InterpretedFunction) for f in decorated):
                # Triton was imported before fastrlhf could ask for the interpreter: its own @jit
                # library (tl.sum, tl.max, ...) was decorated for a GPU this machine does not have.
                _triton_error = (
                    "no CUDA device, and the Triton kernels were not built for the interpreter: set "
                    "TRITON_INTERPRET=1 before importing triton (or anything that imports it) to run them on CPU"
                )
    return _triton_error is None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def native_available() -> bool:
    from . import _native

    return _native.available()


def available_backends() -> Dict[str, bool]:
    """Which backends this installation can run, e.g. ``{'triton': True, 'native': True, 'torch': True}``.

    ``triton`` on a machine without CUDA means "runs under the interpreter" (slow; for tests).
    """
    return {"triton": _triton_importable(), "native": native_available(), "torch": True}


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype | None = None, logits: torch.Tensor | None = None
) -> str:
    """The concrete backend ("triton", "native" or "torch") for tensors on ``device``.

    ``auto`` on CPU picks native only for what it takes as is (fp32 / bf16 / fp16, unit stride
    over V; checked on ``logits`` when given, on ``dtype`` otherwise), else the torch path.
    """
    if backend == "auto":
        backend = os.environ.get(_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or ${_ENV}), got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if not _triton_importable():
                raise RuntimeError(f"CUDA tensors need the Triton backend, which failed to load: {_triton_error}")
            return "triton"
        if not native_available() or dtype == torch.float64:
            return "torch"
        if logits is not None:
            from . import _native

            return "native" if _native.supports(logits) else "torch"
        return "native"
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError(f"backend='triton' is unavailable: {_triton_error}")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before fastrlhf is imported"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports CUDA (or interpreted CPU) tensors, got {device}")
    elif backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got a tensor on {device}")
        if not native_available():
            from . import _native

            raise RuntimeError(f"backend='native' is unavailable: {_native.load_error()}")
    return backend
