"""Sampler-support logprobs (``support=(token_ids, offsets)`` in vLLM's CSR form, ``top_k=``): values
against an fp64 ``log_softmax`` of the logits masked to the kept set, gradients only on the set."""

import pytest
import torch
from conftest import assert_grad_close, backends

import fastrlhf
from fastrlhf import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_csr(N, V, labels, sizes, seed=0):
    """Row n keeps ``sizes[n % len(sizes)]`` distinct ids, its label among them (unless ignored)."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for n in range(N):
        k = min(sizes[n % len(sizes)], V)
        s = torch.randperm(V, generator=g)[:k]
        lab = int(labels.reshape(-1)[n])
        if lab >= 0 and lab not in s.tolist():
            s[0] = lab
        sets.append(s)
    ids = torch.cat(sets)
    off = torch.tensor([0] + [len(s) for s in sets]).cumsum(0)
    return ids, off


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[1], [2], [82], ["V"], [1, 2, 82, "V"]], ids=lambda s: "-".join(map(str, s)))
def test_csr_support_matches_masked_fp64_log_softmax(backend, dtype, sizes):
    torch.manual_seed(0)
    B, T, V = 2, 4, 1000
    sizes = [V if k == "V" else k for k in sizes]
    x = (torch.randn(B, T, V) * 3).to(dtype)
    y = torch.randint(0, V, (B, T))
    y[1, 2] = -100
    support = make_csr(B * T, V, y, sizes)
    xg = x.clone().requires_grad_()
    lp, ent, q = fastrlhf.token_logprobs_and_entropy(xg, y, support=support, temperature=0.8, sum_p_squared=True,
                                                     backend=backend)
    x64 = x.double().requires_grad_()
    lp_r, ent_r, q_r = ref.token_logprobs_and_entropy(x64, y, support=support, temperature=0.8, sum_p_squared=True)
    assert lp.shape == (B, T) and lp.dtype == torch.float32
    for a, b in ((lp, lp_r), (ent, ent_r), (q, q_r)):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-5)
    if sizes == [1]:
        assert torch.all(lp == 0) and torch.all(q[y != -100] == 1)  # a singleton set: p = 1
    u = torch.randn(3, B, T)
    (g,) = torch.autograd.grad((u[0] * lp + u[1] * ent + u[2] * q).sum(), xg)
    (g_r,) = torch.autograd.grad((u[0].double() * lp_r + u[1].double() * ent_r + u[2].double() * q_r).sum(), x64)
    outside = torch.isinf(ref.support_mask(x, support))
    assert torch.all(g[outside] == 0) and torch.all(g[1, 2] == 0)
    assert_grad_close(g, g_r, dtype)
    # token_logprobs agrees with the logp of the pair
    torch.testing.assert_close(fastrlhf.token_logprobs(x, y, support=support, temperature=0.8, backend=backend), lp)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_matches_masked_fp64_log_softmax(backend, k):
    torch.manual_seed(k)
    N, V = 6, 257
    x = torch.randn(N, V) * 2
    top = torch.topk(x / 1.3, k, dim=-1).indices
    y = top[torch.arange(N), torch.randint(0, k, (N,))]  # labels drawn from the kept set
    xg = x.clone().requires_grad_()
    lp, ent = fastrlhf.token_logprobs_and_entropy(xg, y, top_k=k, temperature=1.3, backend=backend)
    x64 = x.double().requires_grad_()
    lp_r, ent_r = ref.token_logprobs_and_entropy(x64, y, top_k=k, temperature=1.3)
    torch.testing.assert_close(lp.double(), lp_r, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_r, atol=2e-6, rtol=1e-5)
    (g,) = torch.autograd.grad((lp + ent).sum(), xg)
    (g_r,) = torch.autograd.grad((lp_r + ent_r).sum(), x64)
    assert int((g != 0).sum(-1).max()) <= k
    torch.testing.assert_close(g.double(), g_r, atol=1e-6, rtol=1e-5)


def test_renormalised_ratio_is_one_on_the_sampler_set():
    # The sampler's processed logprob over its kept set equals ours: ratio exp(ours - sampler) = 1.
    torch.manual_seed(3)
    N, V = 64, 500
    x = torch.randn(N, V) * 2
    y = torch.topk(x, 20, dim=-1).indices[:, 0]
    sampler = torch.log_softmax(torch.topk(x.double(), 20, -1).values, -1)[:, 0]  # processed_logprobs
    full = fastrlhf.token_logprobs(x, y)
    ours = fastrlhf.token_logprobs(x, y, top_k=20)
    assert (full.double() - sampler).mean() < -1e-3  # the full-vocabulary ratio is biased low
    torch.testing.assert_close(ours.double(), sampler, atol=2e-6, rtol=0)


def test_inplace_backward_writes_zeros_then_the_support():
    torch.manual_seed(4)
    x = torch.randn(5, 40)
    y = torch.randint(0, 40, (5,))
    support = make_csr(5, 40, y, [3])
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(fastrlhf.token_logprobs(xr, y, support=support).sum(), xr)
    leaf = x.clone().requires_grad_()
    xi = leaf * 1.0
    fastrlhf.token_logprobs(xi, y, support=support, inplace_backward=True).sum().backward()
    torch.testing.assert_close(leaf.grad, want, atol=0, rtol=0)
    assert torch.equal(xi.detach(), want)  # the logits' storage holds the gradient


@pytest.mark.parametrize("loss", ["ppo", "grpo"])
def test_losses_take_the_support(loss):
    torch.manual_seed(5)
    B, T, V = 2, 3, 60
    x = torch.randn(B, T, V, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    support = make_csr(B * T, V, y, [4])
    old = torch.randn(B, T) * 0.1 - 1.0
    adv = torch.randn(B, T)
    if loss == "ppo":
        out, _ = fastrlhf.ppo_clip_loss(x, y, old, adv, support=support)
    else:
        out, _ = fastrlhf.grpo_loss(x, y, old, adv, beta=0.0, support=support)
    lp = ref.token_logprobs(x, y, support=support)
    want, _ = ref.ppo_clip_loss_from_logprobs(lp, torch.ones(B, T, dtype=torch.bool), old, adv)
    torch.testing.assert_close(out.double(), want.double(), atol=1e-6, rtol=1e-5)
    (g,) = torch.autograd.grad(out, x)
    assert torch.all(g[torch.isinf(ref.support_mask(x, support))] == 0)
    assert torch.any(g != 0)


def test_bad_support_is_a_value_error_naming_the_argument():
    x = torch.randn(3, 10)
    y = torch.tensor([1, 2, -100])
    ids = torch.tensor([1, 2, 3, 2, 5])
    ok = (ids, torch.tensor([0, 2, 4, 5]))
    fastrlhf.token_logprobs(x, y, support=ok)  # row 2 is ignored: its set is not checked against a label
    with pytest.raises(ValueError, match=r"labels\[0\] = 4 is outside"):
        fastrlhf.token_logprobs(x, torch.tensor([4, 2, -100]), support=ok)
    with pytest.raises(ValueError, match="offsets must have N \\+ 1"):
        fastrlhf.token_logprobs(x, y, support=(ids, torch.tensor([0, 2, 5])))
    with pytest.raises(ValueError, match="non-decreasing"):
        fastrlhf.token_logprobs(x, y, support=(ids, torch.tensor([0, 3, 2, 5])))
    with pytest.raises(ValueError, match="start at 0"):
        fastrlhf.token_logprobs(x, y, support=(ids, torch.tensor([0, 2, 4, 4])))
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        fastrlhf.token_logprobs(x, y, support=(torch.tensor([1, 2, 10, 2, 5]), ok[1]))
    with pytest.raises(ValueError, match="int32 or int64"):
        fastrlhf.token_logprobs(x, y, support=(ids.float(), ok[1]))
    with pytest.raises(ValueError, match="appears twice"):
        fastrlhf.token_logprobs(x, y, support=(torch.tensor([1, 1, 2, 2, 5]), ok[1]))
    with pytest.raises(ValueError, match="top_k"):
        fastrlhf.token_logprobs(x, y, top_k=0)
    with pytest.raises(ValueError, match="either"):
        fastrlhf.token_logprobs(x, y, support=ok, top_k=2)
