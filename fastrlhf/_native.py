"""Native C++ CPU backend: the row primitives of ``fastrlhf._rows`` on ``fastrlhf._C``.

``fastrlhf._C`` is built from ``fastrlhf/csrc`` (see ``rows.h`` there for the math). It
receives raw buffer addresses, sizes, element strides and a dtype code, so it needs no torch
headers and is tied to no torch ABI; this module therefore does every check before calling
in: CPU tensors, logits fp32 / bf16 / fp16 with a unit stride over V (any leading strides),
labels int32 / int64 contiguous, ``[N]`` fp32 contiguous row tensors. Outputs are allocated
here with torch. A bad input raises ``ValueError`` (or ``TypeError``) naming the argument;
an out-of-range label found by the C++ pass raises ``ValueError`` too.

The extension is optional: when it was not built, ``available()`` is False and CPU tensors
use the chunked torch path. fp64 logits and a vocabulary stride other than 1 are not
supported here (``ValueError``); ``supports(logits)`` tells ``auto`` to use the torch path
for them.
"""

from __future__ import annotations

from typing import Optional

import torch

_C = None
_error: str | None = None
_loaded = False

# Must match fastrlhf::DType in csrc/rows.h (also exported as _C.DTYPE_*).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)


def _load():
    global _C, _error, _loaded
    if not _loaded:
        _loaded = True
        try:
            from . import _C as ext  # type: ignore[attr-defined]

            _C = ext
        except Exception as e:  # not built, or built for another Python
            _error = f"{type(e).__name__}: {e}"
    return _C


def available() -> bool:
    return _load() is not None


def load_error() -> str:
    _load()
    return _error or ""


def supports_dtype(dtype: torch.dtype) -> bool:
    """Whether the native passes take logits of ``dtype`` (fp64 is left to the torch path)."""
    return dtype in _DTYPE_CODES


def supports(logits: torch.Tensor) -> bool:
    """Whether ``backend="native"`` can take these logits as they are: built, CPU, fp32 / bf16 /
    fp16, unit stride over V. ``auto`` should pick the torch path when this is False."""
    return (
        available()
        and logits.device.type == "cpu"
        and logits.dtype in _DTYPE_CODES
        and (logits.shape[-1] <= 1 or logits.stride(-1) == 1)
    )


def _ext():
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the native backend (fastrlhf._C) is not built: {load_error()}")
    return ext


def _check_rows3(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"backend='native' runs on CPU tensors; {name} is on {t.device}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be a [B, T, V] view, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(
            f"backend='native' supports fp32/bf16/fp16 {name}, got {t.dtype}"
            + (" (use backend='torch' for fp64)" if t.dtype == torch.float64 else "")
        )
    if t.shape[2] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")
    if t.shape[2] > 1 and t.stride(2) != 1:
        raise ValueError(
            f"backend='native' needs {name} with unit stride over the vocabulary dim (stride(-1) == 1), "
            f"got strides {tuple(t.stride())}; pass .contiguous() logits"
        )


def _check_labels(labels: Optional[torch.Tensor], N: int) -> tuple[int, int]:
    """``(address, bytes per element)`` of ``labels``, ``(0, 8)`` for None."""
    if labels is None:
        return 0, 8
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.device.type != "cpu":
        raise ValueError(f"labels must be on the CPU, got {labels.device}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32 or int64, got {labels.dtype}")
    if labels.numel() != N:
        raise ValueError(f"labels must hold N = B * T = {N} entries, got shape {tuple(labels.shape)}")
    if not labels.is_contiguous():
        raise ValueError("labels must be contiguous")
    return labels.data_ptr(), labels.element_size()


def _check_row_values(t: Optional[torch.Tensor], name: str, N: int) -> int:
    """Address of an ``[N]`` fp32 contiguous CPU tensor, 0 for None."""
    if t is None:
        return 0
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu" or t.dtype != torch.float32:
        raise ValueError(f"{name} must be an fp32 CPU tensor, got {t.dtype} on {t.device}")
    if t.numel() != N:
        raise ValueError(f"{name} must hold N = B * T = {N} entries, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t.data_ptr()


def _ignore_index(ignore_index) -> int:
    ii = int(ignore_index)
    if not -(2**63) <= ii < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return ii


def row_forward(
    x3: torch.Tensor,
    labels: Optional[torch.Tensor],
    inv_temp: float,
    ignore_index: int,
    want_entropy: bool,
    sp2_out: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """``(logp, ent, lse)``, each ``[N]`` fp32 (``logp`` None without labels, ``ent`` None
    unless ``want_entropy``); ``sp2_out`` (``[N]`` fp32, optional) receives sum p^2. The spec is
    ``fastrlhf._rows``' docstring."""
    ext = _ext()
    _check_rows3(x3, "logits")
    B, T, V = x3.shape
    N = B * T
    lab_ptr, lab_bytes = _check_labels(labels, N)
    ii = _ignore_index(ignore_index)
    lse = torch.empty(N, dtype=torch.float32)  # [N]
    logp = torch.empty(N, dtype=torch.float32) if labels is not None else None  # [N]
    ent = torch.empty(N, dtype=torch.float32) if want_entropy else None  # [N]
    sp2_ptr = _check_row_values(sp2_out, "sp2_out", N)
    if N == 0:
        return logp, ent, lse
    ext.row_forward(
        x3.data_ptr(), _DTYPE_CODES[x3.dtype], B, T, V, x3.stride(0), x3.stride(1),
        lab_ptr, lab_bytes, ii, float(inv_temp),
        logp.data_ptr() if logp is not None else 0,
        ent.data_ptr() if ent is not None else 0,
        lse.data_ptr(), sp2_ptr, torch.get_num_threads(),
    )
    return logp, ent, lse


def row_backward(
    x3: torch.Tensor,
    labels: Optional[torch.Tensor],
    lse: torch.Tensor,
    ent: Optional[torch.Tensor],
    dlogp: Optional[torch.Tensor],
    dent: Optional[torch.Tensor],
    inv_temp: float,
    ignore_index: int,
    out3: torch.Tensor,
    sp2: Optional[torch.Tensor] = None,
    dsp2: Optional[torch.Tensor] = None,
) -> None:
    """Write ``d/dlogits`` of ``sum(dlogp * logp + dent * ent + dsp2 * sp2)`` into ``out3`` (may alias
    ``x3``); the spec is ``fastrlhf._rows``' docstring."""
    ext = _ext()
    _check_rows3(x3, "logits")
    _check_rows3(out3, "out (the logits' gradient)")
    if out3.shape != x3.shape or out3.dtype != x3.dtype:
        raise ValueError(
            f"the gradient must match the logits: got {tuple(out3.shape)} {out3.dtype}, "
            f"logits {tuple(x3.shape)} {x3.dtype}"
        )
    if any(st == 0 and n > 1 for n, st in zip(out3.shape, out3.stride())):
        raise ValueError(f"the gradient buffer must not repeat memory (stride 0), got strides {tuple(out3.stride())}")
    B, T, V = x3.shape
    N = B * T
    lab_ptr, lab_bytes = _check_labels(labels, N)
    ii = _ignore_index(ignore_index)
    lse_ptr = _check_row_values(lse, "lse", N)
    if lse is None:
        raise ValueError("lse (saved by row_forward) is required")
    ent_ptr = _check_row_values(ent, "ent", N)
    dlogp_ptr = _check_row_values(dlogp, "dlogp", N)
    dent_ptr = _check_row_values(dent, "dent", N)
    sp2_ptr = _check_row_values(sp2, "sp2", N)
    dsp2_ptr = _check_row_values(dsp2, "dsp2", N)
    if dsp2 is not None and sp2 is None:
        raise ValueError("dsp2 needs the sum_p2 saved by row_forward (sp2_out)")
    if dlogp is not None and labels is None:
        raise ValueError("dlogp needs labels (there is no logp without labels)")
    if dent is not None and ent is None:
        raise ValueError("dent needs the entropy saved by row_forward (want_entropy=True)")
    if N == 0:
        return
    ext.row_backward(
        x3.data_ptr(), _DTYPE_CODES[x3.dtype], B, T, V, x3.stride(0), x3.stride(1),
        lab_ptr, lab_bytes, ii, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, sp2_ptr, dsp2_ptr, float(inv_temp),
        out3.data_ptr(), out3.stride(0), out3.stride(1), torch.get_num_threads(),
    )
