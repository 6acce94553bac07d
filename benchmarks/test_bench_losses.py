"""Policy losses from logits, forward + backward: ppo_clip_loss, grpo_loss and dpo_loss.

fastrlhf's fused losses against the torch composition, TRL's ``selective_log_softmax`` with its
trainers' loss math on top, and (CUDA) torch.compile and, for GRPO, Liger's ``triton_grpo_loss``.
"""

import pytest
import torch

from fastrlhf import bench

CPU_LOGITS = bench.Shape(B=2, T=32, V=4096)
GPU_LOGITS = bench.Shape(B=16, T=1024, V=151936)

CPU_CASES = [(op, impl) for op in ("ppo", "grpo", "dpo")
             for impl in ("fastrlhf", "fastrlhf[torch]", "fastrlhf[inplace]", "torch", "trl")
             if not (op == "dpo" and impl == "fastrlhf[inplace]")]
GPU_CASES = [("grpo", i) for i in ("fastrlhf", "fastrlhf[inplace]", "torch", "torch.compile", "trl", "liger")] + [
    (op, i) for op in ("ppo", "dpo") for i in ("fastrlhf", "torch", "torch.compile", "trl")]


@pytest.mark.parametrize("op,impl", CPU_CASES, ids=[f"{o}-{i}" for o, i in CPU_CASES])
def test_losses_cpu(benchmark, bench_run, op, impl):
    benchmark.group = f"{op} cpu {CPU_LOGITS.label()}"
    bench_run(op, impl, CPU_LOGITS, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("op,impl", GPU_CASES, ids=[f"{o}-{i}" for o, i in GPU_CASES])
def test_losses_gpu(benchmark, bench_run, op, impl):
    benchmark.group = f"{op} cuda bf16 {GPU_LOGITS.label()}"
    bench_run(op, impl, GPU_LOGITS, "cuda", torch.bfloat16, rounds=20)
