"""Small Triton helpers shared by the kernel files (the kernels know no other fastrlhf module)."""

import os

import triton
import triton.language as tl


@triton.jit
def to_bf16_rtne(x):
    """fp32 -> bf16 with round-to-nearest-even, done on the bits.

    Workaround: triton 3.6's interpreter casts fp32 -> bf16 by truncation (even with
    ``fp_downcast_rounding="rtne"``), while the GPU rounds to nearest even. Used only under
    the interpreter (``MANUAL_RTNE``) so CPU tests see the GPU's rounding.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


def interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``, read when kernels are decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
