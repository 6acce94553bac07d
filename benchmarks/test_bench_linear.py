"""Fused-linear ops (hidden + lm_head weight, logits never materialized), forward + backward.

fastrlhf's ``linear_*`` against the torch composition (full logits) and Liger's chunked
``LigerFusedLinearGRPOLoss`` / ``LigerFusedLinearDPOLoss`` (eager chunks on CPU).
"""

import pytest
import torch

from fastrlhf import bench

CPU_LINEAR = bench.Shape(B=2, T=32, V=4096, H=256)
GPU_LINEAR = bench.Shape(B=16, T=1024, V=151936, H=3584)

CASES = [("linear-logprobs", "fastrlhf"), ("linear-logprobs", "torch"),
         ("linear-grpo", "fastrlhf"), ("linear-grpo", "torch"), ("linear-grpo", "liger"),
         ("linear-dpo", "fastrlhf"), ("linear-dpo", "torch"), ("linear-dpo", "liger")]


@pytest.mark.parametrize("op,impl", CASES, ids=[f"{o}-{i}" for o, i in CASES])
def test_linear_cpu(benchmark, bench_run, op, impl):
    benchmark.group = f"{op} cpu {CPU_LINEAR.label()}"
    bench_run(op, impl, CPU_LINEAR, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("op,impl", CASES, ids=[f"{o}-{i}" for o, i in CASES])
def test_linear_gpu(benchmark, bench_run, op, impl):
    benchmark.group = f"{op} cuda bf16 {GPU_LINEAR.label()}"
    bench_run(op, impl, GPU_LINEAR, "cuda", torch.bfloat16, rounds=10)
