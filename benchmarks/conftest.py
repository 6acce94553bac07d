"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only``.

Shapes: tiny on CPU (N = 64 tokens, V = 4096: seconds for the whole suite, still V-bound
work); on CUDA a Qwen2.5-7B-sized micro-batch (16 x 1024 tokens, V = 151936, H = 3584).

Each benchmark reuses the case builders of ``fastrlhf.bench`` (the same inputs and callables
as ``fastrlhf bench``), first checks the implementation's output against the plain PyTorch
composition (``fastrlhf.bench.baselines``, itself checked against ``fastrlhf.reference`` in
``tests/test_bench_baselines.py``) on the same inputs, then times one forward (+ backward).

The CPU cases take about 20 s on 2 cores (fit for CI); ``@pytest.mark.gpu`` cases skip
without CUDA. An implementation that is
not installed (TRL, Liger-Kernel, flash-attn, the fused-linear ops) skips with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

# Like tests/conftest.py: the Triton interpreter must be chosen before kernels are decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastrlhf import bench  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    # Benchmarks on a shared 2-core machine: one thread gives comparable, stable numbers.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _check(op: str, impl: str, shape: bench.Shape, device: str, dtype: torch.dtype, out: torch.Tensor) -> None:
    """The first call's output against the torch composition's on identical inputs."""
    if impl == "torch":
        return
    ref_out = bench.build_case(op, "torch", shape, device, dtype).fn()
    if dtype == torch.float32:
        rtol, atol = 1e-4, 1e-4
    else:  # bf16 logits: both sides accumulate in fp32, inputs rounded alike
        rtol, atol = 2e-2, 2e-2
    torch.testing.assert_close(out.double(), ref_out.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{impl} {op} {shape.label()} differs from torch: {m}")


@pytest.fixture
def bench_run(benchmark):
    """``bench_run(op, impl, shape, device, dtype, rounds=5)``: :func:`run_benchmark` on this test's fixture."""
    return lambda *args, **kwargs: run_benchmark(benchmark, *args, **kwargs)


def run_benchmark(benchmark, op: str, impl: str, shape: bench.Shape, device: str, dtype: torch.dtype,
                  rounds: int = 5) -> None:
    """Build, check, and time one (op, impl, shape); skip with the reason when unavailable."""
    try:
        case = bench.build_case(op, impl, shape, device, dtype)
        first = case.fn()
    except bench.Skip as e:
        pytest.skip(str(e))
    _check(op, impl, shape, device, dtype, first)

    spec = bench.OPS[op]
    row = dict(op=op, impl=impl, dtype={v: k for k, v in bench.DTYPES.items()}[dtype],
               N=shape.N, B=shape.B, T=shape.T, V=shape.V, H=shape.H)
    fn = case.fn
    if device == "cuda":
        def fn():  # noqa: F811 -- time the kernels, not just their launch
            case.fn()
            torch.cuda.synchronize()

    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    row["time_ms"] = stats.stats.median * 1e3 if stats is not None else None
    bench.derive(row, None)
    benchmark.extra_info.update(
        {k: row[k] for k in ("N", "V", "H", "dtype") if row[k]},
        bytes=row["bytes"], gbps=row["gbps"], tflops=row["tflops"], op_doc=spec.doc,
    )
