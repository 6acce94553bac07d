"""GAE over right-padded responses: fastrlhf.gae (Triton on CUDA) against the reference loop."""

import pytest
import torch

from fastrlhf import bench

CPU_GAE = bench.Shape(B=8, T=256)
GPU_GAE = bench.Shape(B=256, T=1024)


@pytest.mark.parametrize("impl", ("fastrlhf", "torch"))
def test_gae_cpu(benchmark, bench_run, impl):
    benchmark.group = f"gae cpu {CPU_GAE.label()}"
    bench_run("gae", impl, CPU_GAE, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ("fastrlhf", "torch"))
def test_gae_gpu(benchmark, bench_run, impl):
    benchmark.group = f"gae cuda {GPU_GAE.label()}"
    bench_run("gae", impl, GPU_GAE, "cuda", torch.float32, rounds=10)
