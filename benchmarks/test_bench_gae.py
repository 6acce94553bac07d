"""GAE over right-padded responses: fastrlhf.gae (Triton on CUDA) against the reference loop."""

import pytest
import torch
from conftest import CPU_GAE, GPU_GAE, run_benchmark


@pytest.mark.parametrize("impl", ("fastrlhf", "torch"))
def test_gae_cpu(benchmark, impl):
    benchmark.group = f"gae cpu {CPU_GAE.label()}"
    run_benchmark(benchmark, "gae", impl, CPU_GAE, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ("fastrlhf", "torch"))
def test_gae_gpu(benchmark, impl):
    benchmark.group = f"gae cuda {GPU_GAE.label()}"
    run_benchmark(benchmark, "gae", impl, GPU_GAE, "cuda", torch.float32, rounds=10)
