"""``sum_p_squared=True``: ``sum_p2 = sum_v softmax(x)_v^2`` (verl's ``calculate_sum_pi_squared``) as one more
accumulator of the fused pass, differentiable, on every backend, for the logits and the fused-linear ops."""

import pytest
import torch
from conftest import assert_grad_close, backends

import fastrlhf
from fastrlhf import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_sum_p2_by_hand():
    # Two equal logits and one at -inf: p = (1/2, 1/2, 0), sum p^2 = 1/2; one-hot logits: 1.
    x = torch.tensor([[0.0, 0.0, float("-inf")], [100.0, -100.0, -100.0]])
    for backend in backends():
        _, _, q = fastrlhf.token_logprobs_and_entropy(x, torch.tensor([0, 0]), sum_p_squared=True, backend=backend)
        torch.testing.assert_close(q, torch.tensor([0.5, 1.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 1000, 32000])
def test_sum_p2_matches_fp64_reference(backend, dtype, V):
    torch.manual_seed(V)
    B, T = 2, 5
    x = (torch.randn(B, T, V) * 4).to(dtype)
    y = torch.randint(0, V, (B, T))
    y[0, 1] = -100
    xg = x.clone().requires_grad_()
    lp, ent, q = fastrlhf.token_logprobs_and_entropy(xg, y, temperature=0.7, sum_p_squared=True, backend=backend)
    assert q.shape == (B, T) and q.dtype == torch.float32
    x64 = x.double().requires_grad_()
    lp_r, ent_r, q_r = ref.token_logprobs_and_entropy(x64, y, temperature=0.7, sum_p_squared=True)
    torch.testing.assert_close(q.double(), q_r, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lp.double(), lp_r, atol=2e-5, rtol=1e-5)
    assert q[0, 1] == 0
    u = torch.randn(3, B, T)
    (g,) = torch.autograd.grad((u[0] * lp + u[1] * ent + u[2] * q).sum(), xg)
    (g_r,) = torch.autograd.grad((u[0].double() * lp_r + u[1].double() * ent_r + u[2].double() * q_r).sum(), x64)
    assert g.dtype == dtype
    assert torch.all(g[0, 1] == 0)
    assert_grad_close(g, g_r, dtype)


@pytest.mark.parametrize("backend", backends())
def test_sum_p2_gradient_alone(backend):
    # d sum_p2 / dx_j = 2 p_j (p_j - sum_p2) / T, nothing else asked for.
    torch.manual_seed(1)
    x = torch.randn(4, 33, dtype=torch.float32, requires_grad=True)
    y = torch.randint(0, 33, (4,))
    _, _, q = fastrlhf.token_logprobs_and_entropy(x, y, temperature=2.0, sum_p_squared=True, backend=backend)
    (g,) = torch.autograd.grad(q.sum(), x)
    p = torch.softmax(x.detach().double() / 2.0, -1)
    want = 2 * p * (p - (p * p).sum(-1, keepdim=True)) / 2.0
    torch.testing.assert_close(g.double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_sum_p2(backend, dtype):
    torch.manual_seed(2)
    N, H, V = 10, 16, 301
    h = torch.randn(N, H).to(dtype).requires_grad_()
    W = (torch.randn(V, H) * 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,))
    y[2] = -100
    lp, ent, q = fastrlhf.linear_token_logprobs_and_entropy(h, W, y, sum_p_squared=True, backend=backend,
                                                            chunk_size=4)
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    _, _, q_r = ref.linear_token_logprobs_and_entropy(h64, W64, y, sum_p_squared=True)
    torch.testing.assert_close(q.double(), q_r, atol=3e-6, rtol=1e-5)
    gh, gW = torch.autograd.grad(q.sum(), (h, W))
    gh_r, gW_r = torch.autograd.grad(q_r.sum(), (h64, W64))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gh.double(), gh_r, atol=tol, rtol=tol)
    torch.testing.assert_close(gW.double(), gW_r, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", backends())
def test_sum_p2_fp16_large_logits_no_overflow(backend):
    # |logits| up to 6e4 (fp16's range): the squares are taken relative to the row max.
    x = torch.tensor([[6.0e4, -6.0e4, 5.99e4, 0.0]], dtype=torch.float16)
    _, _, q = fastrlhf.token_logprobs_and_entropy(x, torch.tensor([0]), sum_p_squared=True, backend=backend)
    _, _, q_r = ref.token_logprobs_and_entropy(x.double(), torch.tensor([0]), sum_p_squared=True)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), q_r, atol=1e-6, rtol=1e-5)
