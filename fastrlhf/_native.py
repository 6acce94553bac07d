"""Loader of the native C++ CPU backend (``fastrlhf._C``, built from ``fastrlhf/csrc``).

The extension is optional: when it was not built, ``available()`` is False and CPU tensors
use the chunked torch path.
"""

from __future__ import annotations

_C = None
_error: str | None = None
_loaded = False


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


def row_forward(x3, labels, inv_temp, ignore_index, want_entropy):
    raise RuntimeError("native backend not built")


def row_backward(x3, labels, lse, ent, dlogp, dent, inv_temp, ignore_index, out3):
    raise RuntimeError("native backend not built")
