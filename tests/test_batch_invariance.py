"""Batch invariance: a row's outputs and its gradient row are bitwise identical whatever the batch size
(1, 3, 17 rows), its position in the batch, the padding rows around it and the chunk size (1 and 64
rows: the torch path's row chunks, the fused-linear ops' logits blocks). ``torch.equal`` throughout.

Token ops on every backend (logp, entropy, sum p^2, the entropy op, top-k support); PPO / GRPO with
the probe token the only counted one (the loss normalisation is then the same in every batch); the
fused-linear token ops on every backend (the GEMM included: see ``_linear_chunks.INVARIANT_GEMM_ROWS``).
"""

import pytest
import torch
from conftest import backends

import fastrlhf
from fastrlhf import _rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
V = 33001  # > torch's GRAIN_SIZE (32768): a one-row sum would be split over threads
BATCHES = [(1, [0]), (3, [0, 1, 2]), (17, [0, 8, 16])]  # (rows, probe positions)
CHUNKS = [1, 64]


def _batch(probe_x, probe_y, n, pos, seed):
    """``n`` rows with the probe at ``pos``: random real rows and padding rows (ignore_index) around it."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(n, *probe_x.shape[1:], generator=g) * 3).to(probe_x.dtype)
    Y = torch.randint(0, V, (n,), generator=g)
    Y[torch.rand(n, generator=g) < 0.3] = -100  # padding rows
    X[pos], Y[pos] = probe_x[0], probe_y[0]
    return X, Y


def _chunked(monkeypatch, rows):
    monkeypatch.setattr(_rows, "TORCH_CHUNK_BYTES", rows * 4 * V)


def _token_outputs(x, y, backend):
    x = x.detach().requires_grad_()
    lp, ent, q = fastrlhf.token_logprobs_and_entropy(x, y, temperature=0.9, sum_p_squared=True, backend=backend)
    h = fastrlhf.entropy(x, temperature=0.9, backend=backend)
    y_top = torch.where(y == -100, y, torch.topk(x.detach().float() / 0.9, 5, -1).indices[:, 1])
    lp_k, ent_k = fastrlhf.token_logprobs_and_entropy(x, y_top, temperature=0.9, top_k=5, backend=backend)
    (g,) = torch.autograd.grad((lp + 0.5 * ent + 0.25 * q - 0.125 * h + lp_k + 0.5 * ent_k).sum(), x)
    return [lp, ent, q, h, lp_k, ent_k, g]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_op_rows_are_batch_invariant(backend, dtype, monkeypatch):
    torch.manual_seed(0)
    probe_x = (torch.randn(1, V) * 3).to(dtype)
    probe_y = torch.randint(0, V, (1,))
    alone = _token_outputs(probe_x, probe_y, backend)
    for chunk in CHUNKS:
        _chunked(monkeypatch, chunk)
        for n, positions in BATCHES:
            for pos in positions:
                X, Y = _batch(probe_x, probe_y, n, pos, seed=n * 100 + pos)
                outs = _token_outputs(X, Y, backend)
                for name, a, b in zip(("logp", "entropy", "sum_p2", "entropy op", "top-k logp", "top-k entropy",
                                       "d logits"), alone, outs):
                    assert torch.equal(a[0], b[pos]), f"{name}: row {pos} of {n}, chunk {chunk}"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("loss", ["ppo", "grpo"])
def test_loss_rows_are_batch_invariant(backend, loss, monkeypatch):
    torch.manual_seed(1)
    dtype = torch.bfloat16
    probe_x = (torch.randn(1, V) * 3).to(dtype)
    probe_y = torch.randint(0, V, (1,))

    def run(X, Y, pos):
        n = X.shape[0]
        X = X.view(1, n, V).detach().requires_grad_()
        mask = torch.zeros(1, n, dtype=torch.bool)
        mask[0, pos] = True
        old = torch.full((1, n), -7.0)
        adv = torch.full((1, n), 0.7)
        if loss == "ppo":
            out, _ = fastrlhf.ppo_clip_loss(X, Y.view(1, n), old, adv, mask=mask, entropy_coef=0.01,
                                            backend=backend)
        else:
            out, _ = fastrlhf.grpo_loss(X, Y.view(1, n), old, adv[:, 0], old + 0.1, beta=0.04, mask=mask,
                                        backend=backend)
        (g,) = torch.autograd.grad(out, X)
        return out, g[0, pos]

    want = run(probe_x, probe_y, 0)
    for chunk in CHUNKS:
        _chunked(monkeypatch, chunk)
        for n, positions in BATCHES:
            for pos in positions:
                X, Y = _batch(probe_x, probe_y, n, pos, seed=n + pos)
                got = run(X, Y, pos)
                assert torch.equal(want[0], got[0]), f"loss: row {pos} of {n}, chunk {chunk}"
                assert torch.equal(want[1], got[1]), f"d logits: row {pos} of {n}, chunk {chunk}"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_token_op_rows_are_batch_invariant(backend, dtype):
    torch.manual_seed(2)
    H = 64
    W = (torch.randn(V, H) * 0.2).to(dtype)
    probe_h = torch.randn(1, H).to(dtype)
    probe_y = torch.randint(0, V, (1,))

    def run(hs, ys, chunk):
        hs = hs.detach().requires_grad_()
        lp, ent, q = fastrlhf.linear_token_logprobs_and_entropy(hs, W, ys, sum_p_squared=True, chunk_size=chunk,
                                                                backend=backend)
        (gh,) = torch.autograd.grad((lp + 0.5 * ent + 0.25 * q).sum(), hs)
        return [lp, ent, q, gh]

    alone = run(probe_h, probe_y, 1)
    for chunk in CHUNKS:
        for n, positions in BATCHES:
            for pos in positions:
                g = torch.Generator().manual_seed(n * 7 + pos)
                hs = torch.randn(n, H, generator=g).to(dtype)
                ys = torch.randint(0, V, (n,), generator=g)
                ys[torch.rand(n, generator=g) < 0.3] = -100
                hs[pos], ys[pos] = probe_h[0], probe_y[0]
                outs = run(hs, ys, chunk)
                for name, a, b in zip(("logp", "entropy", "sum_p2", "d hidden"), alone, outs):
                    assert torch.equal(a[0], b[pos]), f"{name}: row {pos} of {n}, chunk {chunk}"
