"""PPO-clip / GRPO and the KL estimate on every backend vs the fp64 reference, and vs the trainers' formulas."""


import pytest
import torch
from conftest import backends, device_for

import fastrlhf
from fastrlhf import reference as R

B, T, V = 3, 6, 257

PPO_OPTIONS = [
    dict(),
    dict(clip_high=0.28, loss_agg="seq-mean-token-mean"),
    dict(dual_clip=3.0, loss_agg="seq-mean-token-sum"),
    dict(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01, loss_agg="seq-mean-token-sum-norm"),
    dict(kl_coef=0.2, kl_estimator="k2", temperature=0.7),
    dict(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.02, dual_clip=2.0, clip_high=0.3),
]


def _ppo_batch(dev, seed=0, per_sequence=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T + 1, V, generator=g) * 2).to(dtype)[:, :-1]  # non-contiguous slice
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, -2:] = -100
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    lp0 = R.token_logprobs(x.double(), labels)
    old = (lp0 + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, generator=g) if per_sequence else torch.randn(B, T, generator=g)
    return [t.to(dev) for t in (x, labels, mask, old, ref, adv)]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("opts", PPO_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_ppo_clip_loss_matches_fp64(backend, opts):
    dev = device_for(backend)
    x, labels, mask, old, ref, adv = _ppo_batch(dev)
    x = x.requires_grad_()
    loss, stats = fastrlhf.ppo_clip_loss(x, labels, old, adv, mask=mask, ref_logprobs=ref, backend=backend,
                                         compute_entropy=True, **opts)
    assert loss.shape == () and loss.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    loss64, stats64 = R.ppo_clip_loss(x64, labels, old.double(), adv.double(), mask=mask, ref_logprobs=ref.double(),
                                      **opts)
    assert abs(loss.item() - loss64.item()) <= 1e-5
    up = 1.7  # a non-unit upstream gradient
    (grad,) = torch.autograd.grad(loss * up, x)
    (grad64,) = torch.autograd.grad(loss64 * up, x64)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-4)
    uncounted = (labels == -100) | (mask == 0)
    assert (grad[uncounted] == 0).all(), "masked and ignore_index tokens must get exactly zero gradient"
    for k, v in stats64.items():
        assert k in stats, k
        assert abs(stats[k].item() - v.item()) <= 1e-5, (k, stats[k].item(), v.item())
    assert stats["num_tokens"].item() == (~uncounted).sum().item()


@pytest.mark.parametrize("backend", backends())
def test_grpo_loss_per_sequence_advantages(backend):
    dev = device_for(backend)
    x, labels, mask, old, ref, adv = _ppo_batch(dev, per_sequence=True)
    x = x.requires_grad_()
    loss, stats = fastrlhf.grpo_loss(x, labels, old, adv, ref, beta=0.04, mask=mask, backend=backend,
                                     loss_agg="seq-mean-token-mean")
    x64 = x.detach().double().requires_grad_()
    loss64, _ = R.grpo_loss(x64, labels, old.double(), adv.double(), ref.double(), beta=0.04, mask=mask,
                            loss_agg="seq-mean-token-mean")
    assert abs(loss.item() - loss64.item()) <= 1e-5
    (grad,) = torch.autograd.grad(loss, x)
    (grad64,) = torch.autograd.grad(loss64, x64)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-4)
    assert "kl" in stats
    # beta = 0 needs no reference log-probabilities
    loss0, stats0 = fastrlhf.grpo_loss(x.detach(), labels, old, adv, beta=0.0, backend=backend)
    assert torch.isfinite(loss0) and "kl" not in stats0


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 3e4], ids=["randn", "6e4"])
def test_ppo_low_precision_logits(backend, dtype, scale):
    # scale 3e4: |logits| up to ~6e4 (fp16's max is 65504): no overflow in the tempered logits,
    # their exponents or the gradient; the gradient within 2x its own rounding to the dtype.
    if scale > 1 and dtype != torch.float16:
        pytest.skip("the 6e4 case is fp16's range")
    dev = device_for(backend)
    x, labels, mask, old, ref, adv = _ppo_batch(dev, dtype=dtype)
    if scale > 1:
        x = (x.float() / x.float().abs().amax() * 6e4).to(dtype)
        lp0 = R.token_logprobs(x.double(), labels).float()
        old, ref = lp0 + 0.3 * torch.randn_like(lp0), lp0 + 0.3 * torch.randn_like(lp0)
    x = x.requires_grad_()
    loss, _ = fastrlhf.ppo_clip_loss(x, labels, old, adv, mask=mask, ref_logprobs=ref, kl_coef=0.1, backend=backend)
    x64 = x.detach().double().requires_grad_()
    loss64, _ = R.ppo_clip_loss(x64, labels, old.double(), adv.double(), mask=mask, ref_logprobs=ref.double(),
                                kl_coef=0.1)
    assert abs(loss.item() - loss64.item()) <= 1e-5
    (grad,) = torch.autograd.grad(loss, x)
    (grad64,) = torch.autograd.grad(loss64, x64)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    own = (grad64.to(dtype).double() - grad64).abs().max().item()
    assert (grad.double() - grad64).abs().max().item() <= 2 * own + 1e-7


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("loss_agg", R.LOSS_AGG_MODES)
def test_fully_masked_sequence_and_batch_no_nan(backend, loss_agg):
    dev = device_for(backend)
    x, labels, mask, old, ref, adv = _ppo_batch(dev)
    mask[2] = 0  # one sequence with no counted token
    x = x.requires_grad_()
    loss, stats = fastrlhf.ppo_clip_loss(x, labels, old, adv, mask=mask, loss_agg=loss_agg, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[2] == 0).all()
    loss64, _ = R.ppo_clip_loss(x.detach().double(), labels, old.double(), adv.double(), mask=mask, loss_agg=loss_agg)
    assert abs(loss.item() - loss64.item()) <= 1e-5
    loss, stats = fastrlhf.ppo_clip_loss(x, labels, old, adv, mask=torch.zeros_like(mask), backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0 and (grad == 0).all() and stats["num_tokens"].item() == 0
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("backend", backends())
def test_ppo_inplace_backward(backend):
    dev = device_for(backend)
    x, labels, mask, old, ref, adv = _ppo_batch(dev)
    x = x.contiguous()
    leaf = x.clone().requires_grad_()
    loss_ref, _ = fastrlhf.ppo_clip_loss(leaf, labels, old, adv, mask=mask, backend=backend)
    (grad_ref,) = torch.autograd.grad(loss_ref, leaf)
    leaf2 = x.clone().requires_grad_()
    logits = leaf2 * 1.0
    loss, _ = fastrlhf.ppo_clip_loss(logits, labels, old, adv, mask=mask, inplace_backward=True, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(grad, grad_ref, atol=1e-7, rtol=0)



def test_loss_argument_errors():
    x, labels, mask, old, ref, adv = _ppo_batch("cpu")
    with pytest.raises(ValueError, match="ref_logprobs"):
        fastrlhf.ppo_clip_loss(x, labels, old, adv, kl_coef=0.1)
    with pytest.raises(ValueError, match="loss_agg"):
        fastrlhf.ppo_clip_loss(x, labels, old, adv, loss_agg="mean")
    with pytest.raises(ValueError, match="advantages"):
        fastrlhf.ppo_clip_loss(x, labels, old, adv[:, :2])
    with pytest.raises(ValueError, match="old_logprobs"):
        fastrlhf.ppo_clip_loss(x, labels, old[:2], adv)
    with pytest.raises(ValueError, match="dual_clip"):
        fastrlhf.ppo_clip_loss(x, labels, old, adv, dual_clip=0.5)
    with pytest.raises(ValueError, match="2B"):
        fastrlhf.dpo_loss(x[:1], labels[:1], torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        fastrlhf.dpo_loss(x[:2], labels[:2], torch.zeros(2), torch.zeros(1))



# Agreement with the trainers users come from. Their formulas, transcribed from source:
# ---------------------------------------------------------------------------------------


def _trl_grpo_loss(logp, old, ref, adv, mask, beta, eps_lo, eps_hi, loss_type, max_len):
    # TRL v0.19 trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_lo, 1 + eps_hi)
    per_token_loss = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token_loss = per_token_loss + beta * kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)  # dr_grpo


@pytest.mark.parametrize("trl_type,ours", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                           ("dr_grpo", "seq-mean-token-sum-norm")])
def test_agrees_with_trl_grpo_loss_types(trl_type, ours):
    x, labels, mask, old, ref, adv = _ppo_batch("cpu", per_sequence=True)
    labels = labels.clamp_min(0)  # TRL has no ignore_index here; padding is in the mask
    x64 = x.double()
    logp = R.token_logprobs(x64, labels)
    want = _trl_grpo_loss(logp, old.double(), ref.double(), adv.double(), mask.double(), 0.04, 0.2, 0.28,
                          trl_type, T)
    got, _ = fastrlhf.grpo_loss(x, labels, old, adv, ref, beta=0.04, mask=mask, clip_high=0.28, loss_agg=ours)
    assert abs(got.item() - want.item()) <= 1e-5


def test_agrees_with_verl_vanilla_policy_loss_dual_clip_and_low_var_kl():
    # verl v0.4 verl/trainer/ppo/core_algos.py compute_policy_loss (vanilla) and kl_penalty("low_var_kl")
    x, labels, mask, old, ref, adv = _ppo_batch("cpu")
    labels = labels.clamp_min(0)
    logp = R.token_logprobs(x.double(), labels)
    m = mask.double()
    neg_kl = torch.clamp(logp - old.double(), -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    A = adv.double()
    pg1, pg2 = -A * ratio, -A * torch.clamp(ratio, 1 - 0.2, 1 + 0.28)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -A * 3.0
    pg = torch.where(A < 0, torch.min(pg3, clip1), clip1)
    want = (pg * m).sum() / m.sum()  # agg_loss token-mean
    got, stats = fastrlhf.ppo_clip_loss(x, labels, old, adv, mask=mask, clip_high=0.28, dual_clip=3.0)
    assert abs(got.item() - want.item()) <= 1e-5
    clipfrac = (torch.gt(pg2, pg1).double() * m).sum() / m.sum()
    assert abs(stats["clipfrac"].item() - clipfrac.item()) <= 1e-6
    kl = ref.double() - logp
    low_var_kl = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    torch.testing.assert_close(fastrlhf.kl_estimate(logp, ref.double(), "k3", clamp=(-10, 10)), low_var_kl)


def test_agrees_with_openrlhf_policy_loss_and_approx_kl():
    # OpenRLHF v0.8 openrlhf/models/loss.py PolicyLoss and openrlhf/models/utils.py compute_approx_kl
    x, labels, mask, old, ref, adv = _ppo_batch("cpu")
    labels = labels.clamp_min(0)
    logp = R.token_logprobs(x.double(), labels)
    m = mask.double()
    ratio = (logp - old.double()).exp()
    surr1 = ratio * adv.double()
    surr2 = ratio.clamp(1 - 0.2, 1 + 0.2) * adv.double()
    loss = -torch.min(surr1, surr2)
    want = ((loss * m).sum(-1) / m.sum(-1)).mean()  # masked_mean(dim=-1).mean()
    got, _ = fastrlhf.ppo_clip_loss(x, labels, old, adv, mask=mask, loss_agg="seq-mean-token-mean")
    assert abs(got.item() - want.item()) <= 1e-5
    log_ratio = logp - ref.double()
    torch.testing.assert_close(fastrlhf.kl_estimate(logp, ref.double(), "k1"), log_ratio)
    torch.testing.assert_close(fastrlhf.kl_estimate(logp, ref.double(), "k2"), log_ratio**2 / 2.0)
    torch.testing.assert_close(fastrlhf.kl_estimate(logp, ref.double(), "k3"), (-log_ratio).exp() - 1 + log_ratio)


def test_grpo_with_a_scaled_upstream_moves_three_passes_and_rounds_once(monkeypatch):
    """``(loss * 0.25).backward()`` on the Triton path: one forward launch (reads N x V), one gradient
    launch (reads and writes N x V), and no torch op on an [N, V]-sized tensor besides allocating the
    gradient: 3 passes, not 5 (no post-hoc ``dlogits.mul_(dloss)``). The bf16 gradient is the exact
    one times 0.25 rounded once (within one bf16 ulp of it)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    if "triton" not in backends():
        pytest.skip("the Triton backend is not available")
    import fastrlhf.kernels.logprobs as K

    N_, V_ = 4 * 5, 300
    launches, nv_ops, inside = [], [], [False]

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            launches.append(name)
            inside[0] = True  # the interpreter's own tensor traffic inside a launch is the kernel's
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] = False
        return wrapper

    monkeypatch.setattr(K, "logprobs_forward", counted("forward", K.logprobs_forward))
    monkeypatch.setattr(K, "logprobs_backward", counted("gradient", K.logprobs_backward))

    class NVOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            big = any(isinstance(t, torch.Tensor) and t.numel() >= N_ * V_ for t in tree_leaves((args, kwargs, out)))
            allocation = func.__name__.split(".")[0] in ("empty", "empty_strided", "empty_like")
            moves_data = not func.is_view and not allocation
            if big and not inside[0] and moves_data:
                nv_ops.append(str(func))
            return out

    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(4, 5, V_, generator=g)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V_, (4, 5), generator=g)
    old = -torch.rand(4, 5, generator=g) * 5
    ref = old + 0.3 * torch.randn(4, 5, generator=g)
    adv = torch.randn(4, generator=g)
    with NVOps():
        loss, _ = fastrlhf.grpo_loss(logits, labels, old, adv, ref, beta=0.04, backend="triton")
        (loss * 0.25).backward()
    assert launches == ["forward", "gradient"], launches
    assert not nv_ops, f"extra [N, V] passes: {nv_ops}"

    x64 = logits.detach().double().requires_grad_()
    loss64, _ = R.grpo_loss(x64, labels, old.double(), adv.double(), ref.double(), beta=0.04)
    (loss64 * 0.25).backward()
    exact = x64.grad
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    assert ((logits.grad.double() - exact).abs() <= ulp).all()
