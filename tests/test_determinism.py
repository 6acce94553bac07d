"""Determinism (docs/robustness.md, "Determinism"): the same inputs give bitwise-identical values and gradients.

Checked on every backend, for every public op, through the harness of ``test_robustness``:

- run to run (three runs, fresh leaves each time), at the default thread count;
- native and torch row passes: independent of the thread count (1 vs 2 vs 3 threads);
- batch invariance of the row passes: a token's values and gradient do not depend on which
  other tokens share its batch (RL trainers recompute old / reference log-probs with other
  micro-batch sizes than the training step; any drift there shows up as a fake policy change);
- chunking invariance of the torch row path (``TORCH_CHUNK_BYTES``);
- bf16 / fp16 logits give exactly the fp32 computation on their upcast values, with the
  gradient rounded once, to nearest even, on store (the same bits on every backend's path).

Exceptions (docs/robustness.md, "Determinism"): the fused-linear ops make their logits with
a matmul per chunk of rows, and the BLAS reduction order depends on the chunk's row count and
the thread count, so their values and gradients are bitwise reproducible run to run for a
fixed ``chunk_size`` and thread count, but not across those (measured here: 1-7 of 32 logp
differ in the last bits between chunk sizes 1 and 2; tests/test_linear.py bounds the
difference). No op uses atomics in its logits path on any backend.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, backends, device_for
from test_robustness import ALL_OPS, LINEAR_OPS, assert_same, make_batch, run

import fastrlhf
from fastrlhf import _rows

BACKENDS = backends()
ROW_BACKENDS = [b for b in BACKENDS if b in ("native", "torch")]


def shape_for(backend):
    """Tiny under the Triton interpreter; else large enough (N x V >= 2^15) for native's OpenMP
    region to really split rows over threads."""
    return dict(B=4, T=2, V=13) if backend == "triton" else dict(B=4, T=8, V=2048, H=16)


def assert_runs_equal(a, b, what):
    (va, ga), (vb, gb) = a, b
    assert va.keys() == vb.keys() and ga.keys() == gb.keys()
    for k in va:
        assert_same(va[k], vb[k], f"{what}: {k}")
    for k in ga:
        assert_same(ga[k], gb[k], f"{what}: d {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
def test_run_to_run_bitwise(backend, op):
    dev = device_for(backend)
    b = make_batch(device=dev, **shape_for(backend))
    first = run(op, b, backend)
    for i in range(2):
        assert_runs_equal(run(op, b, backend), first, f"run {i + 2} vs run 1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_advantages_and_kl_run_to_run_bitwise(backend):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 50, generator=g).to(dev), torch.randn(3, 50, generator=g).to(dev)
    m = (torch.rand(3, 50, generator=g) > 0.2).to(dev)
    first = fastrlhf.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    again = fastrlhf.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    for x, y in zip(first, again):
        assert_same(x, y, "gae")
    rewards = torch.randn(8, 16, generator=g)
    assert_same(fastrlhf.group_advantages(rewards, 16), fastrlhf.group_advantages(rewards, 16), "group_advantages")
    lp, ref = torch.randn(100, generator=g), torch.randn(100, generator=g)
    assert_same(fastrlhf.kl_estimate(lp, ref), fastrlhf.kl_estimate(lp, ref), "kl_estimate")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("op", [op for op in ALL_OPS if op not in LINEAR_OPS])
def test_thread_count_does_not_change_bits(backend, op, restore_threads):
    """Each row is reduced by one thread in a fixed order, whatever the number of threads
    (native: OpenMP over rows; torch: reductions over the contiguous last dim of a chunk)."""
    b = make_batch(**shape_for(backend))
    torch.set_num_threads(1)
    one = run(op, b, backend)
    for n in (2, 3):
        torch.set_num_threads(n)
        assert_runs_equal(run(op, b, backend), one, f"{n} threads vs 1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance(backend):
    """A token alone (a [1, 1, V] batch) gets the bits it gets inside the full batch: values
    and its row of the logits' gradient, for logp + entropy and for entropy alone."""
    dev = device_for(backend)
    b = make_batch(device=dev, **shape_for(backend))
    B_, T_ = b["labels"].shape

    def both(x, labels):
        x = x.detach().requires_grad_()
        lp, ent = fastrlhf.token_logprobs_and_entropy(x, labels, backend=backend, temperature=0.8)
        h = fastrlhf.entropy(x, backend=backend, temperature=0.8)
        (g,) = torch.autograd.grad(lp.sum() + 0.5 * ent.sum() - 0.25 * h.sum(), x)
        return lp, ent, h, g

    full = both(b["logits"], b["labels"])
    for bi, ti in [(0, 1), (B_ - 1, T_ - 1), (B_ // 2, 0)]:
        one = both(b["logits"][bi : bi + 1, ti : ti + 1], b["labels"][bi : bi + 1, ti : ti + 1])
        for name, x1, xf in zip(("logp", "entropy", "entropy op", "d logits"), one, full):
            assert_same(x1[0, 0], xf[bi, ti], f"{name} of token {(bi, ti)}")


def test_torch_path_chunking_does_not_change_bits(monkeypatch):
    """The torch row path processes TORCH_CHUNK_BYTES worth of rows at a time; rows are
    reduced independently, so the chunk size must not change a bit."""
    b = make_batch(**shape_for("torch"))
    base = {op: run(op, b, "torch") for op in ("token_logprobs_and_entropy", "ppo_clip_loss", "dpo_loss")}
    V = b["logits"].shape[-1]
    for rows in (1, 3):
        monkeypatch.setattr(_rows, "TORCH_CHUNK_BYTES", rows * 4 * V)
        for op, want in base.items():
            assert_runs_equal(run(op, b, "torch"), want, f"{rows} rows per chunk")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_fp32_math_rounded_once(backend, dtype):
    """Half-precision logits are upcast on load, the math is the fp32 math, and the gradient
    is rounded once to nearest even on store: the bf16 / fp16 results equal, bit for bit, the
    fp32 results on the upcast logits (gradient cast with torch's RTNE). A store that
    truncates (a classic fp32 -> bf16 shortcut) fails here, though it would pass a
    2x-rounding-error tolerance."""
    dev = device_for(backend)
    b = make_batch(device=dev, **shape_for(backend))
    b_half = dict(b, logits=b["logits"].to(dtype))
    b_up = dict(b, logits=b_half["logits"].float())
    for op in ("token_logprobs_and_entropy", "entropy", "ppo_clip_loss", "dpo_loss"):
        v_half, g_half = run(op, b_half, backend)
        v_up, g_up = run(op, b_up, backend)
        for k in v_up:
            assert_same(v_half[k], v_up[k], f"{op}: {k}")
        assert g_half["logits"].dtype == dtype
        assert_same(g_half["logits"], g_up["logits"].to(dtype), f"{op}: d logits")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("op", ALL_OPS)
def test_gpu_run_to_run_bitwise(op):
    """On CUDA the Triton kernels write every output element from one program, no atomics:
    bitwise reproducible, at a real vocabulary size."""
    b = make_batch(B=4, T=64, V=32000, H=256, dtype=torch.bfloat16, device="cuda")
    first = run(op, b, "triton")
    for i in range(2):
        assert_runs_equal(run(op, b, "triton"), first, f"run {i + 2} vs run 1")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_batch_invariance():
    b = make_batch(B=4, T=64, V=32000, dtype=torch.bfloat16, device="cuda")
    x = b["logits"]
    lp, ent = fastrlhf.token_logprobs_and_entropy(x, b["labels"], backend="triton")
    lp1, ent1 = fastrlhf.token_logprobs_and_entropy(x[1:2, 5:9], b["labels"][1:2, 5:9], backend="triton")
    assert_same(lp1, lp[1:2, 5:9], "logp")
    assert_same(ent1, ent[1:2, 5:9], "entropy")
