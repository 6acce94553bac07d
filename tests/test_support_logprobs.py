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


# ---- fused-linear token ops: each chunk's kept logits, gradients only through S ----

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[1], [2], [82], ["V"], [1, 2, 82, "V"], "top_k"], ids=str)
def test_linear_support_matches_fp64_reference(backend, dtype, sizes):
    torch.manual_seed(3)
    N, H, V = 9, 16, 301
    h = torch.randn(N, H).to(dtype).requires_grad_()
    W = (torch.randn(V, H) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V) * 0.1).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,))
    y[4] = -100
    if sizes == "top_k":
        kw = {"top_k": 5}
        with torch.no_grad():  # labels inside their top-5 set (of the fp32 GEMM's tempered logits)
            x32 = (h.float() @ W.float().T + b.float()) / 0.7
            y = torch.where(y == -100, y, x32.topk(5, -1).indices[torch.arange(N), torch.arange(N) % 5])
    else:
        kw = {"support": make_csr(N, V, y, [V if k == "V" else k for k in sizes])}
    lp, ent, q = fastrlhf.linear_token_logprobs_and_entropy(h, W, y, bias=b, temperature=0.7, sum_p_squared=True,
                                                            backend=backend, chunk_size=4, **kw)
    assert lp.shape == ent.shape == q.shape == (N,) and lp.dtype == torch.float32
    h64, W64, b64 = (t.detach().double().requires_grad_() for t in (h, W, b))
    lp_r, ent_r, q_r = ref.linear_token_logprobs_and_entropy(h64, W64, y, bias=b64, temperature=0.7,
                                                             sum_p_squared=True, **kw)
    for ours, want in ((lp, lp_r), (ent, ent_r), (q, q_r)):
        torch.testing.assert_close(ours.double(), want, atol=2e-5, rtol=1e-5)
    assert lp[4] == 0 and ent[4] == 0 and q[4] == 0
    lp1 = fastrlhf.linear_token_logprobs(h, W, y, bias=b, temperature=0.7, backend=backend, chunk_size=4, **kw)
    assert torch.equal(lp1, lp)
    u = torch.randn(3, N)
    grads = torch.autograd.grad((u[0] * lp + u[1] * ent + u[2] * q).sum(), (h, W, b))
    grads_r = torch.autograd.grad((u[0].double() * lp_r + u[1].double() * ent_r + u[2].double() * q_r).sum(),
                                  (h64, W64, b64))
    for g, g_r in zip(grads, grads_r):
        assert g.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), g_r, atol=1e-5, rtol=1e-5)
        else:  # the fp32 logits gradient rounded once to the input dtype: as the full-vocabulary ops
            assert_grad_close(g, g_r, dtype)


def test_linear_support_gradient_is_zero_outside_the_set():
    # W's rows (vocabulary entries) outside every kept set get exactly zero gradient; a set of size
    # 1 (the label) gives logp = 0 and no gradient at all.
    torch.manual_seed(4)
    N, H, V = 6, 8, 50
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, 20, (N,))
    ids, off = make_csr(N, 20, y, [3])  # sets inside [0, 20)
    lp = fastrlhf.linear_token_logprobs(h, W, y, support=(ids, off), chunk_size=4)
    (gW,) = torch.autograd.grad(lp.sum(), W)
    assert torch.all(gW[20:] == 0) and gW[:20].abs().sum() > 0
    one = fastrlhf.linear_token_logprobs(h, W, y, support=(y.clone(), torch.arange(N + 1)), chunk_size=4)
    assert torch.all(one == 0)
    (gh,) = torch.autograd.grad(one.sum(), h)
    assert torch.all(gh == 0)


def test_linear_label_outside_support_is_a_value_error():
    N, H, V = 4, 8, 30
    h, W = torch.randn(N, H), torch.randn(V, H)
    y = torch.tensor([1, 2, 3, -100])
    ids, off = torch.tensor([1, 2, 5, 0]), torch.tensor([0, 1, 2, 3, 4])  # row 2 keeps {5}, label 3
    with pytest.raises(ValueError, match=r"labels\[2\] = 3 is outside"):
        fastrlhf.linear_token_logprobs(h, W, y, support=(ids, off))
    x = h @ W.T
    y_bad = x.topk(2, -1).indices[:, 1].clone()
    y_bad[2] = x[2].argmin()
    with pytest.raises(ValueError, match=r"labels\[2\] = .* top_k set"):
        fastrlhf.linear_token_logprobs(h, W, y_bad, top_k=2, chunk_size=2)
    with pytest.raises(ValueError, match="not both"):
        fastrlhf.linear_token_logprobs(h, W, y, support=(ids, off), top_k=2)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("loss", ["ppo", "grpo"])
def test_linear_losses_take_the_support(backend, loss):
    torch.manual_seed(6)
    B, T, H, V = 2, 3, 8, 50
    h = torch.randn(B, T, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    support = make_csr(B * T, V, y, [1, 4, 7])
    old = torch.randn(B, T) * 0.1 - 1.0
    adv = torch.randn(B, T)
    if loss == "ppo":
        out, _ = fastrlhf.linear_ppo_clip_loss(h, W, y, old, adv, support=support, backend=backend, chunk_size=2)
    else:
        out, _ = fastrlhf.linear_grpo_loss(h, W, y, old, adv, beta=0.0, support=support, backend=backend)
    h64, W64 = (t.detach().double().requires_grad_() for t in (h, W))
    lp = ref.linear_token_logprobs(h64, W64, y, support=support)
    want, _ = ref.ppo_clip_loss_from_logprobs(lp, torch.ones(B, T, dtype=torch.bool), old.double(), adv.double())
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-5)
    g_h, g_w = torch.autograd.grad(out, (h, W))
    w_h, w_w = torch.autograd.grad(want, (h64, W64))
    torch.testing.assert_close(g_h.double(), w_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_w.double(), w_w, atol=1e-5, rtol=1e-5)
    kept = torch.zeros(V, dtype=torch.bool)
    kept[support[0]] = True
    assert torch.all(g_w[~kept] == 0)  # vocabulary rows outside every kept set get no gradient
