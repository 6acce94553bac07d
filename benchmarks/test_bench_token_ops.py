"""Token ops: logprobs (forward; forward + backward), entropy, logprobs + entropy.

fastrlhf (auto and each CPU backend) against the plain PyTorch composition and TRL's
kernels on CPU; on CUDA also torch.compile, Liger's and flash-attn's cross entropy.
"""

import pytest
import torch

from fastrlhf import bench

CPU_LOGITS = bench.Shape(B=2, T=32, V=4096)
GPU_LOGITS = bench.Shape(B=16, T=1024, V=151936)

CPU_IMPLS = ("fastrlhf", "fastrlhf[torch]", "fastrlhf[inplace]", "torch", "trl")
GPU_IMPLS = ("fastrlhf", "fastrlhf[inplace]", "torch", "torch.compile", "trl", "liger", "flash-attn")
OPS = {
    "logprobs": ("fastrlhf", "fastrlhf[torch]", "torch", "trl", "liger", "flash-attn", "torch.compile"),
    "logprobs-fwdbwd": ("fastrlhf", "fastrlhf[torch]", "fastrlhf[inplace]", "torch", "trl", "liger", "flash-attn",
                        "torch.compile"),
    "entropy": ("fastrlhf", "fastrlhf[torch]", "torch", "trl", "torch.compile"),
    "logprobs-entropy-fwdbwd": ("fastrlhf", "fastrlhf[torch]", "fastrlhf[inplace]", "torch", "trl", "torch.compile"),
}
CPU_CASES = [(op, impl) for op, impls in OPS.items() for impl in impls if impl in CPU_IMPLS]
GPU_CASES = [(op, impl) for op, impls in OPS.items() for impl in impls if impl in GPU_IMPLS]


@pytest.mark.parametrize("op,impl", CPU_CASES, ids=[f"{o}-{i}" for o, i in CPU_CASES])
def test_token_ops_cpu(benchmark, bench_run, op, impl):
    benchmark.group = f"{op} cpu {CPU_LOGITS.label()}"
    bench_run(op, impl, CPU_LOGITS, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("op,impl", GPU_CASES, ids=[f"{o}-{i}" for o, i in GPU_CASES])
def test_token_ops_gpu(benchmark, bench_run, op, impl):
    benchmark.group = f"{op} cuda bf16 {GPU_LOGITS.label()}"
    bench_run(op, impl, GPU_LOGITS, "cuda", torch.bfloat16, rounds=20)
