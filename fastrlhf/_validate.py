"""Host-side input checks shared by every public op: clear errors naming the argument."""

from __future__ import annotations

import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_temperature(temperature) -> float:
    """A finite float > 0 (a Python number or a 0-d tensor that needs no gradient)."""
    if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        raise ValueError("temperature is a tensor that requires grad: the ops take it as a constant "
                         "(divide the logits yourself to learn a temperature)")
    if isinstance(temperature, (bool, str)):
        raise TypeError(f"temperature must be a finite float > 0, got {type(temperature).__name__} {temperature!r}")
    return check_scalar(temperature, "temperature", low=0.0, low_open=True)


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 2:
        raise ValueError(f"{name} must be [..., V] with at least 2 dims, got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be fp32/bf16/fp16 (or fp64), got {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")


def check_labels(
    labels: torch.Tensor, logits: torch.Tensor, ignore_index: int, name: str = "labels", vocab_size: int | None = None
) -> None:
    """``vocab_size``: the global V when ``logits`` hold one vocab-parallel shard (default ``logits.shape[-1]``)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"{name} is on {labels.device} but logits are on {logits.device}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    check_ignore_index(ignore_index)
    V = logits.shape[-1] if vocab_size is None else vocab_size
    if labels.numel() == 0:
        return
    if torch.compiler.is_compiling():
        # A data-dependent branch would break the graph: under torch.compile the row op checks the
        # range itself, on the real labels (fastrlhf._rows.row_forward_op).
        return
    # One N-sized check (a device sync on GPU) that keeps every kernel's label read in bounds.
    labels = functorch_unwrapped(labels)  # under vmap / func.grad: the values of every mapped slice
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        raise ValueError(f"{name} contains {value}, outside [0, {V}) and not ignore_index={ignore_index}")


def functorch_unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under ``torch.func`` wrappers (vmap's batched tensors hold every slice)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def check_token_tensor(
    t: Optional[torch.Tensor], like: torch.Tensor, name: str, allow_per_sequence: bool = False
) -> None:
    """``t`` must be ``like.shape`` (per token) or, if allowed, ``like.shape[:1]`` (per sequence).

    ``like`` is the labels tensor (already checked against the logits / hidden states). Every
    per-token input but ``mask`` holds real numbers (log-probabilities, advantages): an integer
    or bool tensor there is a caller's mix-up (e.g. labels passed as ``old_logprobs``) that a
    silent cast would hide. ``mask`` may be bool, integer or floating 0/1.
    """
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if name != "mask" and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (log-probabilities / advantages), got {t.dtype}")
    if name == "mask" and (t.is_complex() or t.dtype not in MASK_DTYPES and not t.is_floating_point()):
        raise TypeError(f"mask must be bool, integer or floating 0/1, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but labels are on {like.device}")
    if tuple(t.shape) == tuple(like.shape):
        return
    # Per sequence means one value per row of [B, T] labels; with 3-D labels [B1, B2, T] a 1-D
    # tensor would be ambiguous (B1 or B1 * B2 sequences), so only per-token values are taken there.
    per_seq = allow_per_sequence and like.dim() == 2
    if per_seq and tuple(t.shape) == tuple(like.shape[:1]):
        return
    want = f"{tuple(like.shape)}" + (f" or {tuple(like.shape[:1])}" if per_seq else "")
    extra = " (per-sequence values need 2-D [B, T] labels)" if allow_per_sequence and like.dim() > 2 else ""
    raise ValueError(f"{name} must have the shape of labels {want}{extra}, got {tuple(t.shape)}")


def check_dpo_refs(ref_chosen_logps, ref_rejected_logps, B: int, device: torch.device) -> None:
    """Reference sequence log-probabilities of DPO: two ``[B]`` tensors on the logits' device."""
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B,):
            raise ValueError(f"{name} must be a [B] = [{B}] tensor, got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (sequence log-probabilities), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")


def check_scalar(value, name: str, *, low: float | None = None, low_open: bool = False, high: float | None = None,
                 high_open: bool = False, optional: bool = False) -> float | None:
    """A finite real hyper-parameter -> ``float``: a Python number or a 0-d tensor that needs no
    gradient (bool and strings are rejected), within ``[low, high]`` (open ends when asked).
    NaN and inf are rejected: ``nan < 0`` is False, so a NaN would silently switch a term off."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} is required, got None")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{name} is a tensor that requires grad: hyper-parameters are constants here")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def check_ignore_index(ignore_index) -> int:
    """An int (or 0-d integer tensor) that fits int64 (every backend compares labels with it)."""
    if isinstance(ignore_index, torch.Tensor):
        if ignore_index.dim() != 0 or ignore_index.is_floating_point() or ignore_index.dtype == torch.bool:
            raise TypeError(f"ignore_index must be an int, got a {ignore_index.dtype} tensor of shape "
                            f"{tuple(ignore_index.shape)}")
        ignore_index = int(ignore_index.item())
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return ignore_index
