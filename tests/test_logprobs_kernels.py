"""The Triton row kernels' work, not just their values: an ignored row (label == ignore_index)
costs no loop iteration over the logits in the forward or the gradient pass, and the gradient
pass's split of a row across programs (used on GPUs when there are few rows) changes no bit
(that one runs on CUDA too).

The work is counted under the Triton interpreter: every masked load / store the kernels issue
goes through ``InterpreterBuilder``, whose calls are recorded with the addresses they touch."""

import pytest
import torch
from conftest import HAS_CUDA

from fastrlhf._rows import torch_row_backward
from fastrlhf.kernels import _common
from fastrlhf.kernels import logprobs as K

interpreter_only = pytest.mark.skipif(not _common.interpreted(), reason="counts need the Triton interpreter")

BLOCK = 2048  # small interpreter blocks: V below spans several full blocks plus a tail
V = 3 * BLOCK + 100


@pytest.fixture
def accesses(monkeypatch):
    """Records ``(kind, addresses, active lanes)`` of every block load / store the kernels make."""
    from triton.runtime.interpreter import InterpreterBuilder

    log = []
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def counted_load(self, ptrs, mask, *args):
        log.append(("load", ptrs.data.reshape(-1).copy(), mask.data.reshape(-1).copy()))
        return load(self, ptrs, mask, *args)

    def counted_store(self, ptrs, value, mask, *args):
        log.append(("store", ptrs.data.reshape(-1).copy(), mask.data.reshape(-1).copy(), value.data.reshape(-1).copy()))
        return store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", counted_load)
    monkeypatch.setattr(InterpreterBuilder, "create_masked_store", counted_store)
    monkeypatch.setattr(K, "INTERPRET_BLOCK_V", BLOCK)
    return log


def _touching(log, kind, t, row):
    """The block accesses (more than one lane) of ``kind`` that start in row ``row`` of ``t``."""
    lo = t.data_ptr() + row * t.stride(1) * t.element_size()
    hi = lo + t.shape[2] * t.element_size()
    # by the block's first address: the previous row's tail block runs on into this row, masked
    return [a for a in log if a[0] == kind and a[1].size > 1 and lo <= a[1][0] < hi]


@interpreter_only
@pytest.mark.parametrize("entropy", [False, True])
def test_ignored_row_costs_no_loop_iteration(accesses, entropy):
    x3 = torch.randn(1, 2, V).to(torch.bfloat16)  # [1, N=2, V]: row 0 counts, row 1 is ignored
    labels = torch.tensor([5, -100])
    logp, ent, lse = (torch.empty(2), torch.empty(2) if entropy else None, torch.empty(2))
    K.logprobs_forward(x3, labels, 1.0, -100, logp, ent, lse)
    valid = _touching(accesses, "load", x3, 0)
    ignored = _touching(accesses, "load", x3, 1)
    assert len(valid) == V // BLOCK + 1 and all(a[2].any() for a in valid)  # 3 full blocks + the tail
    # The ignored row: only the masked tail block is issued, with no active lane (no byte read).
    assert len(ignored) == 1 and not ignored[0][2].any()
    assert logp[1] == 0 and lse[1] == 0 and (not entropy or ent[1] == 0)

    accesses.clear()
    out3 = torch.full_like(x3, float("nan"))
    K.logprobs_backward(x3, labels, lse, ent, torch.ones(2), torch.ones(2) if entropy else None, 1.0, -100, out3)
    assert len(_touching(accesses, "load", x3, 0)) == V // BLOCK + 1
    ignored = _touching(accesses, "load", x3, 1)
    assert len(ignored) == 1 and not ignored[0][2].any()  # the masked tail again, nothing read
    stores = _touching(accesses, "store", out3, 1)
    assert all((a[3][a[2]] == 0).all() for a in stores)  # zeros and nothing else
    assert (out3[0, 1] == 0).all() and torch.isfinite(out3[0, 0]).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_split_changes_no_bit(monkeypatch, inplace):
    """Rows split across 2 or 3 programs (GPU launches with few rows) give the same bits as one
    program per row, with the label (one-hot) in the first, a middle, the last full block and the tail."""
    monkeypatch.setattr(K, "INTERPRET_BLOCK_V", BLOCK)
    monkeypatch.setattr(K, "MAX_BLOCK_V", BLOCK)
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(0)
    x3 = (torch.randn(1, 5, V, generator=g) * 3).to(torch.bfloat16).to(dev)
    labels = torch.tensor([7, BLOCK + 3, 3 * BLOCK - 1, V - 1, -100], device=dev)
    logp, ent, lse = (torch.empty(5, device=dev) for _ in range(3))
    K.logprobs_forward(x3, labels, 0.7, -100, logp, ent, lse)
    dlogp, dent = (torch.randn(5, generator=g).to(dev) for _ in range(2))
    outs = []
    for splits in (1, 2, 3):
        monkeypatch.setattr(K, "grad_splits", lambda *a, n=splits: n)
        src = x3.clone()
        out = src if inplace else torch.empty_like(x3)
        K.logprobs_backward(src, labels, lse, ent, dlogp, dent, 0.7, -100, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert (outs[0][0, 4] == 0).all()
    # and they are right, one-hot column included (the torch backend's gradient as the oracle)
    ref = torch.empty(1, 5, V, dtype=torch.float32, device=dev)
    torch_row_backward(x3.float(), labels, lse, ent, dlogp, dent, 0.7, -100, ref)
    torch.testing.assert_close(outs[0].float(), ref, atol=1e-6, rtol=1e-2)
    hot = (0, torch.arange(4), labels[:4])  # a missed one-hot would be off by dlogp / T, not one bf16 ulp
    torch.testing.assert_close(outs[0][hot].float(), ref[hot], atol=0, rtol=2**-8)


def test_long_row_accuracy():
    """lse / logp / entropy of 152k-long rows stay at fp32 resolution (~1e-6 at |lse| ~ 16): the
    forward's per-thread online state must not drift over its ~37 blocks. The tests' shared 2e-5
    tolerance would let a systematic drift of ~1e-5 (a rescale that is not exactly 1) pass; on
    CUDA this is the check of the compiled arithmetic (ex2.approx.ftz, FMA contraction)."""
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(1)
    n, v = 8, 151936
    x3 = (torch.randn(1, n, v, generator=g) * 3).to(torch.bfloat16).to(dev)  # [1, n, V]
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    logp, ent, lse = (torch.empty(n, device=dev) for _ in range(3))
    K.logprobs_forward(x3, labels, 1.0, -100, logp, ent, lse)
    xs = x3[0].double()  # [n, V]
    lse64 = torch.logsumexp(xs, -1)
    ent64 = lse64 - (torch.softmax(xs, -1) * xs).sum(-1)
    lp64 = xs.gather(1, labels[:, None])[:, 0] - lse64
    for ours, ref in ((lse, lse64), (logp, lp64), (ent, ent64)):
        torch.testing.assert_close(ours.double(), ref, atol=5e-6, rtol=0)
