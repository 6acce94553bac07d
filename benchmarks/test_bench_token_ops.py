"""Token ops: logprobs (forward; forward + backward), entropy, logprobs + entropy.

fastrlhf (auto and each CPU backend) against the plain PyTorch composition and TRL's
kernels on CPU; on CUDA also torch.compile, Liger's and flash-attn's cross entropy.
"""

import pytest
import torch
from conftest import CPU_LOGITS, GPU_LOGITS, run_benchmark

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
def test_token_ops_cpu(benchmark, op, impl):
    benchmark.group = f"{op} cpu {CPU_LOGITS.label()}"
    run_benchmark(benchmark, op, impl, CPU_LOGITS, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("op,impl", GPU_CASES, ids=[f"{o}-{i}" for o, i in GPU_CASES])
def test_token_ops_gpu(benchmark, op, impl):
    benchmark.group = f"{op} cuda bf16 {GPU_LOGITS.label()}"
    run_benchmark(benchmark, op, impl, GPU_LOGITS, "cuda", torch.bfloat16, rounds=20)
