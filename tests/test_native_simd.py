"""The native backend's SIMD kernels (fastrlhf/csrc/simd.h): vectorized for real, exact where
they must be, and deterministic.

- The built ``_C`` is disassembled (``objdump -d``): the AVX2 row kernels
  (``simd_avx2::row_stats`` / ``grad_row``) must contain packed FMAs on ymm registers and no
  scalar FMA, the AVX-512 ones packed FMAs on zmm. This is the check: GCC 12
  had left the ``omp simd`` loops scalar (``vfmadd213ss``) without anyone noticing.
- Dispatch picks the widest kernels the CPU reports (``/proc/cpuinfo``).
- Every kernel table this CPU runs: loads of all 65536 bf16 / fp16 bit patterns equal torch's;
  stores equal torch's for every non-NaN input and c10's NaN rule (``c10::BFloat16``: 0x7FC0;
  ``c10::Half``: sign | 0x7E00); exp within 1 ulp of fp64 on [ln FLT_MIN, 0], 0 below it and
  at -inf, NaN for NaN; row values and gradients vs the fp64 reference.
- AVX2 and AVX-512 give the same bits (same lanes, reduction tree and FMAs); the portable
  kernels agree to rounding.
- A row's bits depend on nothing but the row: not on the thread count, the batch size, its
  position in the batch or its alignment in memory.
"""

import os
import platform
import re
import shutil
import subprocess

import pytest
import torch

from fastrlhf import _native
from fastrlhf import reference as R

pytestmark = pytest.mark.skipif(not _native.available(), reason=f"native extension not built: {_native.load_error()}")

IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _C():
    return _native._ext()


def _levels():
    return _C().simd_levels() if _native.available() else []


@pytest.fixture
def simd_level():
    """Restores the kernel table the process started with."""
    before = _C().simd_level()
    yield _C().set_simd_level
    _C().set_simd_level(before)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return None


# ---------------------------------------------------------------------------------------
# The disassembly: packed FMAs in the row kernels
# ---------------------------------------------------------------------------------------

def _functions(so_path):
    """``{demangled function name: [instruction lines]}`` of the extension."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so_path], capture_output=True, text=True,
                         check=True).stdout
    funcs, name = {}, None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            funcs[name] = []
        elif name is not None and line.strip():
            funcs[name].append(line)
    return funcs


@pytest.mark.skipif(not IS_X86_64, reason=f"the packed-FMA check reads x86-64 code; this is {platform.machine()}")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.parametrize("isa, reg", [("avx2", "ymm"), ("avx512", "zmm")])
def test_row_kernels_are_vectorized_with_packed_fma(isa, reg):
    funcs = _functions(_C().__file__)
    packed = re.compile(rf"\svfn?m(add|sub)\d{{3}}ps\s.*%{reg}")
    scalar_fma = re.compile(r"\svfn?m(add|sub)\d{3}ss\s")
    # 3 dtypes x (4 forward accumulator sets: entropy x sum p^2 | 7 non-empty sets of gradient terms)
    for kernel, count in (("row_stats", 12), ("grad_row", 21)):
        found = {n: body for n, body in funcs.items() if f"simd_{isa}::{kernel}<" in n}
        assert len(found) == count, (
            f"expected {count} fastrlhf::simd_{isa}::{kernel}<...> functions in {_C().__file__}, found "
            f"{sorted(found)}: the {isa} kernels were not compiled in (or were renamed)"
        )
        for n, body in found.items():
            n_packed = sum(bool(packed.search(ln)) for ln in body)
            # the exp alone is 9 FMAs per vector: rounding 1, Cody-Waite 2, polynomial 5, final 1
            assert n_packed >= 9, f"{n}: {n_packed} packed FMAs on %{reg}; the row loop is not vectorized"
            n_scalar = sum(bool(scalar_fma.search(ln)) for ln in body)
            assert n_scalar == 0, f"{n}: {n_scalar} scalar FMAs (vfmadd...ss): part of the row pass is scalar"


def test_dispatch_picks_the_widest_kernels_the_cpu_has():
    levels = _levels()
    assert levels[-1] == "portable"
    cap = os.environ.get("FASTRLHF_NATIVE_SIMD")
    assert _C().simd_level() == (cap if cap in levels else levels[0])
    if not IS_X86_64:
        assert levels == ["portable"]
        return
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert ("avx2" in levels) == all(f in flags for f in ("avx2", "fma", "f16c"))
    assert ("avx512" in levels) == ("avx512f" in flags and "avx2" in levels)


def test_unknown_or_unsupported_level_is_refused(simd_level):
    before = _C().simd_level()
    with pytest.raises(ValueError, match="not supported"):
        simd_level("sse9")
    assert _C().simd_level() == before
    if "avx512" not in _levels() and IS_X86_64:
        with pytest.raises(ValueError):
            simd_level("avx512")


# ---------------------------------------------------------------------------------------
# Conversions and exp, per kernel table
# ---------------------------------------------------------------------------------------

def _to_f32(src):
    dst = torch.empty(src.numel(), dtype=torch.float32)
    _C().simd_to_f32(src.data_ptr(), CODE[src.dtype], dst.data_ptr(), src.numel())
    return dst


def _from_f32(src, dtype):
    dst = torch.empty(src.numel(), dtype=dtype)
    _C().simd_from_f32(src.data_ptr(), dst.data_ptr(), CODE[dtype], src.numel())
    return dst


def _exp(src):
    dst = torch.empty_like(src)
    _C().simd_exp(src.data_ptr(), dst.data_ptr(), src.numel())
    return dst


def _bits16(t):
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_of_every_16_bit_pattern_matches_torch(level, dtype, simd_level):
    simd_level(level)
    allbits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)  # [65536], 4 full vectors x 4096
    for n in (65536, 65536 - 5):  # with and without a partial last vector
        got = _to_f32(allbits[:n].contiguous())
        want = allbits[:n].float()
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def _store_inputs():
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    # every float whose low 16 bits are a rounding edge (ties, just below / above), all exponents
    hi = torch.arange(65536, dtype=torch.int64) << 16
    lows = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1000, 0x0FFF, 0x2000, 0x1FFF, 0x3000],
                        dtype=torch.int64)
    edges = (hi[:, None] | lows[None, :]).reshape(-1)
    edges = torch.where(edges >= 2**31, edges - 2**32, edges).to(torch.int32)
    return torch.cat([rand, edges, torch.tensor([7, 11, 13], dtype=torch.int32)]).view(torch.float32)


def _c10_nan_bits(x, dtype):
    if dtype == torch.bfloat16:
        return torch.full_like(x.view(torch.int32), 0x7FC0)
    sign = (x.view(torch.int32) >> 16) & 0x8000
    return sign | 0x7E00


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_rounds_like_c10(level, dtype, simd_level):
    simd_level(level)
    x = _store_inputs()  # n is not a multiple of 16: the padded tail path runs too
    got = _bits16(_from_f32(x, dtype))
    nan = x.isnan()
    want = _bits16(x[~nan].to(dtype))  # round to nearest even, overflow to inf, subnormals
    assert torch.equal(got[~nan], want)
    # torch's own vectorized kernels differ on NaN payloads; c10's scalar constructors do not
    assert torch.equal(got[nan], _c10_nan_bits(x[nan], dtype))


@pytest.mark.parametrize("level", _levels())
def test_exp_is_within_one_ulp_and_keeps_the_special_values(level, simd_level):
    simd_level(level)
    x = torch.cat([torch.linspace(-87.33, 0.0, 2_000_003), -torch.rand(100_000, dtype=torch.float32) * 10])
    got = _exp(x).double()
    want = torch.exp(x.double())
    ulp = torch.finfo(torch.float32).eps * want  # spacing of fp32 near want, to within 2x
    assert ((got - want).abs() / ulp).max().item() <= 1.0
    special = torch.tensor([float("-inf"), float("nan"), 0.0, -0.0, -87.34, -100.0, -1e30])
    out = _exp(special)
    assert out[0].item() == 0.0 and out[1].isnan()
    assert out[2].item() == 1.0 and out[3].item() == 1.0
    assert (out[4:] == 0).all(), "below ln(FLT_MIN) the result flushes to 0"


# ---------------------------------------------------------------------------------------
# Row passes per kernel table: accuracy, agreement across tables, independence of the batch
# ---------------------------------------------------------------------------------------

def _rows(dtype, V, N=6, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, N, V, generator=g) * scale).to(dtype)  # [1, N, V]
    labels = torch.randint(0, V, (N,), generator=g)
    if N > 2:
        labels[1] = -100
        x[0, 2, : V // 3] = float("-inf")  # masked entries: p = 0, zero gradient, no NaN
        labels[2] = V - 1  # a finite logit: the one-hot term is not in the masked range
    return x, labels


def _passes(x, labels, temp=0.8):
    """Forward (logp, ent, lse) and the gradient of sum(u1 * logp + u2 * ent), all native."""
    logp, ent, lse = _native.row_forward(x, labels, 1.0 / temp, -100, True)
    g = torch.Generator().manual_seed(1)
    u1, u2 = torch.randn(x.shape[1], generator=g), torch.randn(x.shape[1], generator=g)
    grad = torch.empty_like(x)
    _native.row_backward(x, labels, lse, ent, u1, u2, 1.0 / temp, -100, grad)
    return (logp, ent, lse, grad), (u1, u2)


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 15, 17, 2048, 2049, 32000, 50257])
def test_row_passes_match_the_fp64_reference(level, dtype, V, simd_level):
    simd_level(level)
    x, labels = _rows(dtype, V, seed=V)
    (logp, ent, lse, grad), (u1, u2) = _passes(x, labels)
    x64 = x.double().requires_grad_()  # [1, N, V], the values the kernels saw
    lse64 = torch.logsumexp(x64 / 0.8, -1)[0]
    logp64 = R.token_logprobs(x64, torch.where(labels < 0, 0, labels)[None], temperature=0.8)[0]
    ent64 = R.entropy(x64, temperature=0.8)[0]
    keep = labels != -100
    (g64,) = torch.autograd.grad((torch.where(keep, logp64 * u1 + ent64 * u2, 0.0)).sum(), x64)
    torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(logp.double()[keep], logp64[keep], atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(ent.double()[keep], ent64[keep], atol=2e-5, rtol=1e-6)
    assert (logp[~keep] == 0).all() and (ent[~keep] == 0).all() and (grad[0, ~keep] == 0).all()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(grad.double(), g64.to(dtype).double(), atol=tol, rtol=tol)
    if V >= 3:
        assert (grad[0, 2, : V // 3] == 0).all()


@pytest.mark.skipif(len(_levels()) < 2, reason="this CPU runs only the portable kernels")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [17, 32000, 50257])
def test_kernel_tables_agree(dtype, V, simd_level):
    x, labels = _rows(dtype, V, seed=V + 1)
    outs = {}
    for level in _levels():
        simd_level(level)
        outs[level] = _passes(x, labels)[0]
    if "avx512" in outs and "avx2" in outs:  # same lanes, tree and FMAs: same bits
        for a, b in zip(outs["avx512"], outs["avx2"]):
            assert torch.equal(a, b)
    widest = outs[_levels()[0]]
    for a, b in zip(widest, outs["portable"]):  # portable: separate multiply and add without hardware fmaf
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_bits_depend_on_the_row_only(level, dtype, simd_level, restore_threads):
    """One row's values and gradient, bit for bit: alone, at every position of a 24-row batch
    (above the parallel threshold), with 1 and 2 threads, and at an odd address."""
    simd_level(level)
    V = 4099  # a partial last vector and a partial last block
    row, _ = _rows(dtype, V, N=1, seed=3)
    label = torch.tensor([17])
    torch.set_num_threads(1)
    alone = _passes(row, label)[0]
    others, others_labels = _rows(dtype, V, N=24, seed=4)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for pos in (0, 5, 23):
            batch = others.clone()
            batch[0, pos] = row[0, 0]
            lab = others_labels.clone()
            lab[pos] = 17
            got = _passes(batch, lab)[0]
            for a, b, name in zip(alone, got, ("logp", "ent", "lse")):
                assert torch.equal(a[0], b[pos]), f"{name} of the row at position {pos}, {threads} threads"
            # the gradient depends on the row's own upstream grads: recompute the lone row with them
            g = torch.Generator().manual_seed(1)
            u1, u2 = torch.randn(24, generator=g), torch.randn(24, generator=g)
            lone = torch.empty_like(row)
            _native.row_backward(row, label, alone[2], alone[1], u1[pos : pos + 1].contiguous(),
                                 u2[pos : pos + 1].contiguous(), 1.0 / 0.8, -100, lone)
            assert torch.equal(lone[0, 0], got[3][0, pos]), f"gradient row at position {pos}, {threads} threads"
    # the same row one element off its original alignment (a view into a wider buffer)
    wide = torch.empty(1, 1, V + 1, dtype=dtype)
    wide[0, 0, 1:] = row[0, 0]
    shifted = _passes(wide[:, :, 1:], label)[0]
    for a, b in zip(alone, shifted):
        assert torch.equal(a, b)
