"""fastrlhf.integrations.openrlhf against OpenRLHF's own formulas, and patch() on stand-in module trees.

OpenRLHF imports deepspeed and flash-attn at module level, so CI does not install it. The
``_orl_*`` functions below are OpenRLHF's formulas transcribed from OpenRLHF 0.11.2
(``pip download openrlhf==0.11.2``; OpenRLHF/OpenRLHF on GitHub): ``openrlhf/models/utils.py``
(``compute_approx_kl``, ``masked_mean``) and ``openrlhf/models/loss.py`` (``aggregate_loss``,
``PolicyLoss.forward``, ``DPOLoss.forward``), and v0.11.0's ``PolicyLoss`` (OpenRLHF @ 3c3be623,
``openrlhf/models/loss.py`` lines 116-230: tis / icepop / seq-mask-tis, gspo with IS). Token ops are
checked against the fp64 oracle (fastrlhf.reference). Where OpenRLHF itself imports, the last test
runs against it.
"""

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as TF
from conftest import assert_grad_close, backends

import fastrlhf
import fastrlhf.integrations.openrlhf as O
from fastrlhf import reference as R
from fastrlhf.integrations import IntegrationWarning

# ----------------------------------------------------------------------------------------
# OpenRLHF 0.11.2's formulas (transcribed; see the module docstring)
# ----------------------------------------------------------------------------------------


def _orl_masked_mean(tensor, mask, dim=None):
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def _orl_compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
                           unbiased_gradient=False):
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k1":
        value = log_ratio
    elif kl_estimator == "k2":
        value = log_ratio**2 / 2.0
    else:
        k3_log_ratio = log_ratio.clamp(min=-10)
        value = (-k3_log_ratio).exp() - 1 + k3_log_ratio
    value = value.clamp(min=-10, max=10)
    if not unbiased_gradient:
        return value
    w = 1.0 if log_probs_old is None else (log_probs.float() - log_probs_old.float()).exp().clamp(max=10.0).detach()
    surrogate = w * (log_ratio**2 / 2.0)
    return value.detach() + surrogate - surrogate.detach()


def _orl_aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None,
                        global_batch_size=None):
    if token_level_loss:
        if batch_num_tokens is None:
            return _orl_masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    token_counts = loss_mask.sum(dim=-1)
    seq_loss = (loss * loss_mask).sum(dim=-1) / (token_counts + 1e-8)
    seq_mask = (token_counts > 0).float()
    if global_batch_size is None:
        return _orl_masked_mean(seq_loss, seq_mask, dim=None)
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


def _orl_policy_loss(cfg, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                     batch_num_tokens=None, global_batch_size=None):
    """PolicyLoss(**cfg).forward (constructor defaults of 0.11.2 filled in)."""
    c = dict(clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True, policy_loss_type="ppo",
             is_correction_level="off", is_correction_mode="mask", is_correction_gating="ratio",
             is_correction_threshold=(0.5, 5.0))
    c.update(cfg)
    token_level_loss = False if c["policy_loss_type"] == "gspo" else c["token_level_loss"]
    raw_policy_log_ratio = log_probs - old_log_probs
    if c["policy_loss_type"] == "ppo":
        ratio = raw_policy_log_ratio.clamp(min=-20.0, max=20.0).exp()
    else:
        log_ratio = log_probs - rollout_log_probs if c["is_correction_level"] != "off" else raw_policy_log_ratio
        ratio = (log_ratio * action_mask).sum(dim=-1) / action_mask.sum(dim=-1).clamp(min=1)
        ratio = ratio.exp().unsqueeze(-1) * action_mask
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - c["clip_eps_low"], 1 + c["clip_eps_high"]) * advantages
    if c["dual_clip"] is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, c["dual_clip"] * advantages)
        loss = -torch.where(advantages < 0, clip2, clip1)
    vllm_kl = is_filter_ratio = None
    if c["is_correction_level"] != "off" and c["policy_loss_type"] == "ppo":
        low, high = c["is_correction_threshold"]
        seq_level = c["is_correction_level"] == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()
        token_is = is_log_ratio.exp()
        if c["is_correction_gating"] == "ratio":
            stat = _orl_masked_mean(is_log_ratio, action_mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
            if c["is_correction_gating"] == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = _orl_masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        if c["is_correction_mode"] == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, 0.0)
            filtered = ~keep
        loss = coef * loss
        is_filter_ratio = filtered.float().mean() if seq_level else _orl_masked_mean(filtered.float(), action_mask)
        vllm_kl = _orl_masked_mean(rollout_log_probs - old_log_probs, action_mask)
    loss = _orl_aggregate_loss(loss, action_mask, token_level_loss=token_level_loss, dp_size=dp_size,
                               batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    clip_ratio = _orl_masked_mean(torch.lt(surr2, surr1).float(), action_mask)
    ppo_kl = _orl_masked_mean(-raw_policy_log_ratio.detach(), action_mask)
    return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


def _orl0110_policy_loss(cfg, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                         dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """OpenRLHF @ 3c3be623 openrlhf/models/loss.py PolicyLoss (v0.11.0 API): __init__ lines 121-153 (defaults
    filled in), forward lines 155-230; aggregate_loss (lines 11-38) is the 0.11.2 one transcribed above."""
    c = dict(clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True, policy_loss_type="ppo",
             enable_vllm_is_correction=False, vllm_is_truncated_threshold=None, vllm_is_correction_type="tis")
    c.update(cfg)
    token_level_loss = False if c["policy_loss_type"] == "gspo" else c["token_level_loss"]
    raw_policy_log_ratio = log_probs - old_log_probs
    if c["policy_loss_type"] == "ppo":
        ratio = raw_policy_log_ratio.clamp(min=-20.0, max=20.0).exp()
    else:
        log_ratio = log_probs - rollout_log_probs if c["enable_vllm_is_correction"] else raw_policy_log_ratio
        ratio = (log_ratio * action_mask).sum(dim=-1) / action_mask.sum(dim=-1).clamp(min=1)
        ratio = ratio.exp().unsqueeze(-1) * action_mask
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - c["clip_eps_low"], 1 + c["clip_eps_high"]) * advantages
    if c["dual_clip"] is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, c["dual_clip"] * advantages)
        loss = -torch.where(advantages < 0, clip2, clip1)
    vllm_kl = None
    if c["enable_vllm_is_correction"] and c["policy_loss_type"] == "ppo":
        low_threshold, high_threshold = c["vllm_is_truncated_threshold"]
        rollout_log_ratio = old_log_probs - rollout_log_probs
        if c["vllm_is_correction_type"] == "icepop":
            vllm_is = torch.exp(rollout_log_ratio).detach()
            mask = (vllm_is >= low_threshold) & (vllm_is <= high_threshold)
            vllm_is = vllm_is * mask
            loss = vllm_is * loss
        elif c["vllm_is_correction_type"] == "seq-mask-tis":
            seq_log_ratio = _orl_masked_mean(rollout_log_ratio, action_mask, dim=-1)
            seq_is = torch.exp(seq_log_ratio)
            seq_mask = (seq_is >= low_threshold) & (seq_is <= high_threshold)
            vllm_is = torch.exp(rollout_log_ratio).detach()
            loss = seq_mask.unsqueeze(-1) * vllm_is * loss
        else:
            vllm_is = torch.exp(rollout_log_ratio).clamp(min=low_threshold, max=high_threshold).detach()
            loss = vllm_is * loss
        vllm_kl = _orl_masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
    loss = _orl_aggregate_loss(loss, action_mask, token_level_loss=token_level_loss, dp_size=dp_size,
                               batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    clip_ratio = _orl_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
    ppo_kl = _orl_masked_mean(-raw_policy_log_ratio.detach(), action_mask, dim=None)
    return loss, clip_ratio, ppo_kl, vllm_kl


def _orl_dpo_loss(beta, label_smoothing, ipo, pc, pr, rc, rr):
    logits = (pc - pr) - (rc - rr)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = -TF.logsigmoid(beta * logits) * (1 - label_smoothing) - TF.logsigmoid(-beta * logits) * label_smoothing
    return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


# ----------------------------------------------------------------------------------------
# Token ops
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(20, 57), (3, 7, 57)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_from_logits(dtype, shape, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    up = torch.randn(shape[:-1], generator=g, dtype=torch.float64).to(dtype).double()
    x = logits.clone().requires_grad_(True)
    out = O.log_probs_from_logits(x, labels, temperature=temperature)
    assert out.dtype == dtype and out.shape == shape[:-1]  # OpenRLHF returns the logits' dtype
    assert torch.equal(x.detach(), logits)  # not divided in place
    (out.double() * up).sum().backward()
    x64 = logits.double().requires_grad_(True)
    exact = R.token_logprobs(x64, labels, temperature=temperature)
    (exact * up).sum().backward()
    own = (exact.detach().to(dtype).double() - exact.detach()).abs().max().item()
    assert (out.double() - exact.detach()).abs().max().item() <= 2 * own + 1e-5
    assert_grad_close(x.grad, x64.grad, dtype)


def test_compute_entropy():
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(torch.bfloat16)
    out = O.compute_entropy(logits)
    assert out.dtype == torch.bfloat16
    exact = R.entropy(logits.double())
    assert (out.double() - exact).abs().max().item() <= 2 * (exact.to(torch.bfloat16).double() - exact).abs().max()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased,with_old", [(False, False), (True, False), (True, True)])
def test_compute_approx_kl(estimator, unbiased, with_old):
    g = torch.Generator().manual_seed(2)
    lp = (torch.randn(6, 9, generator=g) * 5).requires_grad_(True)  # wide: reaches the +-10 clamps
    base = torch.randn(6, 9, generator=g) * 5
    old = (lp.detach() + torch.randn(6, 9, generator=g)) if with_old else None
    ours = O.compute_approx_kl(lp, base, old, estimator, unbiased)
    theirs = _orl_compute_approx_kl(lp, base, old, estimator, unbiased)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), lp)[0], torch.autograd.grad(theirs.sum(), lp)[0],
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="kl_estimator"):
        O.compute_approx_kl(lp, base, kl_estimator="k4")


# ----------------------------------------------------------------------------------------
# PolicyLoss / DPOLoss
# ----------------------------------------------------------------------------------------

POLICY_CFGS = [
    dict(),
    dict(dual_clip=3.0),
    dict(clip_eps_high=0.28),
    dict(token_level_loss=False),
    dict(policy_loss_type="gspo"),
    dict(is_correction_level="token"),
    dict(is_correction_level="seq"),
    dict(is_correction_level="token", is_correction_mode="clip"),
    dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.0, 0.1)),
    dict(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.05),
         dual_clip=2.0),
]


@pytest.mark.parametrize("cfg", POLICY_CFGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "ppo")
@pytest.mark.parametrize("batch", [{}, dict(dp_size=2, batch_num_tokens=40.0, global_batch_size=9.0)],
                         ids=["local", "global"])
def test_policy_loss(cfg, batch):
    g = torch.Generator().manual_seed(3)
    B, T = 4, 7
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0] = 0
    lp = (torch.randn(B, T, generator=g) * 0.5 - 1).requires_grad_(True)
    old = lp.detach() + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, T, generator=g)
    rollout = old + torch.randn(B, T, generator=g) * 0.2
    ours = O.PolicyLoss(**cfg)(lp, old, adv, action_mask=mask, rollout_log_probs=rollout, **batch)
    theirs = _orl_policy_loss(cfg, lp, old, adv, action_mask=mask, rollout_log_probs=rollout, **batch)
    assert len(ours) == 5
    for o, t in zip(ours, theirs):
        if t is None:
            assert o is None
        else:
            torch.testing.assert_close(o, t, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours[0], lp)[0], torch.autograd.grad(theirs[0], lp)[0],
                               atol=1e-7, rtol=1e-6)


def test_policy_loss_without_mask_and_reference_consistency():
    g = torch.Generator().manual_seed(4)
    lp, old, adv = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    ours = O.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.3, dual_clip=3.0)(lp, old, adv)
    theirs = _orl_policy_loss(dict(clip_eps_high=0.3, dual_clip=3.0), lp, old, adv)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=1e-6)
    ref, _ = R.ppo_clip_loss_from_logprobs(lp, torch.ones_like(lp), old, adv, clip_low=0.2, clip_high=0.3,
                                           dual_clip=3.0)
    torch.testing.assert_close(ours[0], ref, atol=1e-6, rtol=1e-6)


def test_policy_loss_constructor_errors():
    with pytest.raises(ValueError, match="dual_clip"):
        O.PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match="policy_loss_type"):
        O.PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match="is_correction_mode=clip"):
        O.PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError, match="rollout_log_probs"):
        t = torch.zeros(2, 3)
        O.PolicyLoss(is_correction_level="token")(t, t, t, action_mask=torch.ones(2, 3))


VLLM_IS_CFGS = [
    dict(),
    dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.5, 1.2)),
    dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.8, 1.25), vllm_is_correction_type="icepop"),
    dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.97, 1.03),
         vllm_is_correction_type="seq-mask-tis"),
    dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.5, 1.5), dual_clip=3.0, clip_eps_high=0.28),
    dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.8, 1.25), vllm_is_correction_type="icepop",
         token_level_loss=False),
    dict(policy_loss_type="gspo"),
    dict(policy_loss_type="gspo", enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.5, 5.0)),
]


@pytest.mark.parametrize("cfg", VLLM_IS_CFGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "ppo")
@pytest.mark.parametrize("batch", [{}, dict(dp_size=2, batch_num_tokens=40.0, global_batch_size=9.0)],
                         ids=["local", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vllm_is_policy_loss_matches_openrlhf_3c3be623(cfg, batch, dtype):
    """All four outputs and the log_probs gradient vs OpenRLHF @ 3c3be623 (transcribed)."""
    g = torch.Generator().manual_seed(7)
    B, T = 5, 8
    mask = (torch.rand(B, T, generator=g) > 0.3).to(dtype)
    mask[0] = 0
    lp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1).to(dtype).requires_grad_(True)
    old = lp.detach() + (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    rollout = old + (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.15).to(dtype)
    ours = O.VllmISPolicyLoss(**cfg)(lp, old, adv, action_mask=mask, rollout_log_probs=rollout, **batch)
    theirs = _orl0110_policy_loss(cfg, lp, old, adv, action_mask=mask, rollout_log_probs=rollout, **batch)
    assert len(ours) == 4
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-13, rtol=1e-12)
    for o, t in zip(ours, theirs):
        if t is None:
            assert o is None
        else:
            torch.testing.assert_close(o, t.to(o.dtype), **tol)
    torch.testing.assert_close(torch.autograd.grad(ours[0], lp)[0], torch.autograd.grad(theirs[0], lp)[0], **tol)
    if cfg.get("vllm_is_correction_type") == "seq-mask-tis":  # the gate is live in this batch: some rows kept,
        w = torch.exp(((old - rollout) * mask).sum(-1) / mask.sum(-1).clamp(min=1))  # some dropped
        kept = (w >= 0.97) & (w <= 1.03)
        assert kept[1:].any() and (~kept[1:]).any()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", ["tis", "icepop", "gspo-is"])
def test_vllm_is_policy_loss_equals_fastrlhf_ops(backend, case):
    """tis = rollout_correction="token_truncate", icepop = "icepop", gspo with IS = ratio_level="sequence"
    against rollout_log_probs: the drop-in on fastrlhf's logprobs equals fastrlhf's fused op on every
    backend (value and logits gradient, fp32)."""
    g = torch.Generator().manual_seed(8)
    B, T, Vocab = 4, 7, 97
    x = torch.randn(B, T, Vocab, generator=g) * 2
    labels = torch.randint(0, Vocab, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    lp0 = fastrlhf.token_logprobs(x, labels, backend="torch")
    old = lp0 + 0.2 * torch.randn(B, T, generator=g)
    rollout = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    cfg, opts, denom = {
        "tis": (dict(vllm_is_correction_type="tis", vllm_is_truncated_threshold=(0.7, 1.3)),
                dict(rollout_correction="token_truncate", rollout_is_min=0.7, rollout_is_max=1.3,
                     rollout_logprobs=rollout), old),
        "icepop": (dict(vllm_is_correction_type="icepop", vllm_is_truncated_threshold=(0.7, 1.3)),
                   dict(rollout_correction="icepop", rollout_is_min=0.7, rollout_is_max=1.3, rollout_logprobs=rollout),
                   old),
        "gspo-is": (dict(policy_loss_type="gspo", vllm_is_truncated_threshold=(0.5, 5.0)),
                    dict(ratio_level="sequence", loss_agg="seq-mean-token-mean"), rollout),
    }[case]
    xa = x.clone().requires_grad_(True)
    lp = fastrlhf.token_logprobs(xa, labels, backend=backend)
    got = O.VllmISPolicyLoss(enable_vllm_is_correction=True, **cfg)(lp, old, adv.unsqueeze(-1).expand(B, T), mask,
                                                                     rollout)[0]
    (g_got,) = torch.autograd.grad(got, xa)
    xb = x.clone().requires_grad_(True)
    want, _ = fastrlhf.ppo_clip_loss(xb, labels, denom, adv, mask=mask, backend=backend, **opts)
    (g_want,) = torch.autograd.grad(want, xb)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)


def test_vllm_is_policy_loss_errors_and_icepop_overflow():
    with pytest.raises(ValueError, match="vllm_is_correction_type"):
        O.VllmISPolicyLoss(vllm_is_correction_type="mis")
    with pytest.raises(ValueError, match="dual_clip"):
        O.VllmISPolicyLoss(dual_clip=0.5)
    t, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="vllm_is_truncated_threshold"):
        O.VllmISPolicyLoss(enable_vllm_is_correction=True)(t, t, t, m, t)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        O.VllmISPolicyLoss(enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.5, 2.0))(t, t, t, m)
    rollout = t.clone()
    rollout[0, 0] = -1000.0  # w = e^1000 = inf: IcePop drops the token (OpenRLHF's inf * 0 gives NaN)
    out = O.VllmISPolicyLoss(enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.5, 2.0),
                             vllm_is_correction_type="icepop")(t, t, torch.ones(2, 3), m, rollout)
    assert torch.isfinite(out[0]) and out[0].item() == pytest.approx(-5 / 6)


@pytest.mark.parametrize("ipo", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_loss(ipo, label_smoothing):
    g = torch.Generator().manual_seed(5)
    xs = [(torch.randn(6, generator=g) * 3).requires_grad_(True) for _ in range(4)]
    ours = O.DPOLoss(0.2, label_smoothing, ipo)(*xs)
    theirs = _orl_dpo_loss(0.2, label_smoothing, ipo, *xs)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, atol=1e-6, rtol=1e-6)
    for go, gt in zip(torch.autograd.grad(ours[0], xs[:2]), torch.autograd.grad(theirs[0], xs[:2])):
        torch.testing.assert_close(go, gt, atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="reference_rejected_logps"):
        O.DPOLoss(0.1)(xs[0], xs[1], xs[2], torch.zeros(5))


# ----------------------------------------------------------------------------------------
# patch() on stand-in trees of OpenRLHF's layout
# ----------------------------------------------------------------------------------------

_UTILS = '''
import torch

def log_probs_from_logits(logits, labels, temperature=1.0):
    raise AssertionError("the stand-in's own function must not run once patched")

def compute_entropy(logits):
    raise AssertionError("the stand-in's own function must not run once patched")

{kl}
'''

_KL_NEW = '''def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
                      unbiased_gradient=False):
    raise AssertionError'''
_KL_OLD = '''def compute_approx_kl(log_probs, log_probs_base, action_mask=None, kl_estimator="k1"):
    return log_probs - log_probs_base'''

_LOSS = '''
import torch.nn as nn

class PolicyLoss(nn.Module):
    def __init__(self, {policy_init}):
        super().__init__()

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        raise AssertionError

class DPOLoss(nn.Module):
    def __init__(self, beta, label_smoothing=0.0, ipo=False):
        super().__init__()

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        raise AssertionError
'''

_NEW_INIT = ("clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True, policy_loss_type='ppo', "
             "is_correction_level='off', is_correction_mode='mask', is_correction_gating='ratio', "
             "is_correction_threshold=(0.5, 5.0)")
_OLD_INIT = "clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True, policy_loss_type='ppo'"
_V0110_INIT = ("clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True, policy_loss_type='ppo', "
               "enable_vllm_is_correction=False, vllm_is_truncated_threshold=None, vllm_is_correction_type='tis'")

_ACTOR = '''
from {pkg}.models.utils import compute_entropy, log_probs_from_logits, compute_approx_kl
from {pkg}.models import PolicyLoss, DPOLoss
'''


def _tree(pkg, kl, policy_init):
    return {
        "models/utils.py": _UTILS.format(kl=kl),
        "models/loss.py": _LOSS.format(policy_init=policy_init),
        "models/__init__.py": "from .loss import PolicyLoss, DPOLoss\nfrom .utils import log_probs_from_logits\n",
        "trainer/ppo_actor.py": _ACTOR.format(pkg=pkg),
    }


def test_patch_standin_current_api(standin):
    pkg = "standin_openrlhf_new"
    standin(pkg, _tree(pkg, _KL_NEW, _NEW_INIT))
    actor = importlib.import_module(f"{pkg}.trainer.ppo_actor")
    models = importlib.import_module(f"{pkg}.models")
    originals = (actor.PolicyLoss, actor.DPOLoss, actor.log_probs_from_logits, models.log_probs_from_logits)
    with O.patch(module=pkg) as h:
        assert h.skipped == {} and len(h.patched) == 5
        assert issubclass(actor.PolicyLoss, O.PolicyLoss) and issubclass(models.PolicyLoss, O.PolicyLoss)
        assert issubclass(actor.DPOLoss, O.DPOLoss)
        assert actor.PolicyLoss.__fastrlhf_original__ is originals[0]
        t = torch.randn(2, 5)
        loss, clip_ratio, ppo_kl, vllm_kl, filt = actor.PolicyLoss(dual_clip=3.0)(t, t + 0.1, t, torch.ones(2, 5))
        assert loss.shape == () and vllm_kl is None and filt is None
        logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
        torch.testing.assert_close(actor.log_probs_from_logits(logits, labels), R.token_logprobs(logits, labels))
        assert actor.compute_entropy.__wrapped__ is O.compute_entropy
        assert actor.compute_approx_kl.__wrapped__ is O.compute_approx_kl
    assert (actor.PolicyLoss, actor.DPOLoss, actor.log_probs_from_logits, models.log_probs_from_logits) == originals


def test_patch_standin_v0110_api_gets_vllm_is_class(standin):
    """OpenRLHF @ 3c3be623 (v0.11.0): PolicyLoss(enable_vllm_is_correction, ...) -> VllmISPolicyLoss."""
    pkg = "standin_openrlhf_v0110"
    standin(pkg, _tree(pkg, _KL_NEW, _V0110_INIT))
    actor = importlib.import_module(f"{pkg}.trainer.ppo_actor")
    original = actor.PolicyLoss
    with O.patch(module=pkg) as h:
        assert h.skipped == {} and len(h.patched) == 5
        assert issubclass(actor.PolicyLoss, O.VllmISPolicyLoss) and not issubclass(actor.PolicyLoss, O.PolicyLoss)
        g = torch.Generator().manual_seed(9)
        lp, old, adv = (torch.randn(3, 6, generator=g) for _ in range(3))
        rollout, mask = old + 0.2 * torch.randn(3, 6, generator=g), torch.ones(3, 6)
        cfg = dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.8, 1.2),
                   vllm_is_correction_type="seq-mask-tis")
        out = actor.PolicyLoss(**cfg)(lp, old, adv, mask, rollout)
        want = _orl0110_policy_loss(cfg, lp, old, adv, mask, rollout)
        assert len(out) == 4
        for o, t in zip(out, want):
            torch.testing.assert_close(o, t, atol=1e-6, rtol=1e-6)
    assert actor.PolicyLoss is original


def test_patch_standin_older_api_skips_with_warnings(standin):
    pkg = "standin_openrlhf_old"
    standin(pkg, _tree(pkg, _KL_OLD, _OLD_INIT))
    utils = importlib.import_module(f"{pkg}.models.utils")
    with pytest.warns(IntegrationWarning) as rec:
        h = O.patch(module=pkg)
    with h:
        assert set(h.skipped) == {f"{pkg}.models.utils.compute_approx_kl", f"{pkg}.models.loss.PolicyLoss"}
        assert "action_mask" in h.skipped[f"{pkg}.models.utils.compute_approx_kl"]
        assert len(rec) == 2
        assert utils.log_probs_from_logits.__wrapped__ is O.log_probs_from_logits
        assert not hasattr(utils.compute_approx_kl, "__wrapped__")


def test_patch_without_openrlhf_raises_import_error():
    if importlib.util.find_spec("openrlhf") is not None:
        pytest.skip("openrlhf is installed")
    with pytest.raises(ImportError, match="pip install openrlhf"):
        O.patch()


def test_against_installed_openrlhf():
    """Not in CI (OpenRLHF's imports need deepspeed and flash-attn)."""
    loss_mod = pytest.importorskip("openrlhf.models.loss")
    utils = pytest.importorskip("openrlhf.models.utils")
    g = torch.Generator().manual_seed(6)
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    lp, old, adv = (torch.randn(4, 7, generator=g) for _ in range(3))
    for cfg in POLICY_CFGS[:5]:
        ours = O.PolicyLoss(**cfg)(lp, old, adv, action_mask=mask, rollout_log_probs=old)
        theirs = loss_mod.PolicyLoss(**cfg)(lp, old, adv, action_mask=mask, rollout_log_probs=old)
        torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=1e-6)
    for est in ("k1", "k2", "k3"):
        torch.testing.assert_close(O.compute_approx_kl(lp, old, kl_estimator=est),
                                   utils.compute_approx_kl(lp, old, kl_estimator=est))
    with O.patch() as h:
        assert "openrlhf.models.loss.PolicyLoss" in h.patched
