"""fastrlhf.integrations.verl against verl's own formulas, and patch() on stand-in module trees.

verl needs ray (and more) to import, so CI does not install it. The ``_verl_*`` functions below
are verl's formulas transcribed from verl 0.9.1 (``pip download verl==0.9.1``; the same bodies
on volcengine/verl main): ``verl/utils/torch_functional.py`` (``masked_sum``, ``masked_mean``,
``entropy_from_logits``) and ``verl/trainer/ppo/core_algos.py`` (``agg_loss``, ``kl_penalty``,
``kl_penalty_forward``, ``compute_policy_loss_vanilla``). Token ops are checked against the fp64
oracle (fastrlhf.reference). Where verl itself imports, the last tests run against it.
"""

import importlib
import importlib.util

import pytest
import torch
from conftest import assert_grad_close

import fastrlhf.integrations.verl as V
from fastrlhf import reference as R
from fastrlhf.integrations import IntegrationWarning

# ----------------------------------------------------------------------------------------
# verl 0.9.1's formulas (transcribed; see the module docstring)
# ----------------------------------------------------------------------------------------


def _verl_masked_sum(values, mask, axis=None):
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis)


def _verl_masked_mean(values, mask, axis=None):
    return _verl_masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def _verl_entropy_from_logits(logits):
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def _verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                   loss_scale_factor=None):
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        return _verl_masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return _verl_masked_sum(loss_mat, loss_mask) * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = _verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    seq_mask = torch.sum(loss_mask, dim=-1)
    seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
    seq_mask = (seq_mask > 0).float()
    if global_batch_size is None:
        global_batch_size = seq_mask.sum()
    return _verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size


def _verl_kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)  # low_var_kl / k3


def _verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    forward_score = _verl_kl_penalty_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return forward_score
    backward_score = 0.5 * (logprob - ref_logprob).square()
    return backward_score - backward_score.detach() + forward_score.detach()


def _verl_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                              rollout_is_weights=None):
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    clip_ratio_c = config.get("clip_ratio_c", 3.0)
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = _verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = _verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = _verl_masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(),
                                          response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = _verl_agg_loss(pg_losses, response_mask, loss_agg_mode, **config.global_batch_info)
    metrics = {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
               "actor/pg_clipfrac_lower": pg_clipfrac_lower.item()}
    return pg_loss, metrics


class _Config(dict):
    """verl's actor config as the loss reads it: attributes plus ``.get``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


def _config(clip_ratio=0.2, low=None, high=None, c=None, batch_info=None):
    cfg = _Config(clip_ratio=clip_ratio, clip_ratio_low=low, clip_ratio_high=high, global_batch_info=batch_info or {})
    if c is not None:
        cfg["clip_ratio_c"] = c
    return cfg


def _mask(B, T, seed):
    m = (torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3).float()
    m[1] = 0  # a fully masked sequence: the seq-mean modes must skip it
    return m


# ----------------------------------------------------------------------------------------
# Token ops
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(20, 57), (3, 7, 57)])
@pytest.mark.parametrize("inplace", [False, True])
def test_logprobs_from_logits(dtype, shape, inplace):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels.view(-1)[::5] = -100  # flash-attn's ignore_index, which verl's GPU path inherits
    up = torch.randn(shape[:-1], generator=g, dtype=torch.float64)

    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # a non-leaf, as the model's logits are (in-place backward overwrites it)
    out = V.logprobs_from_logits(x, labels, inplace_backward=inplace)
    assert out.dtype == torch.float32 and out.shape == shape[:-1]
    (out.double() * up).sum().backward()

    x64 = logits.double().requires_grad_(True)
    exact = R.token_logprobs(x64, labels)
    (exact * up).sum().backward()
    torch.testing.assert_close(out.double(), exact.detach(), atol=1e-5, rtol=1e-5)
    assert_grad_close(leaf.grad, x64.grad, dtype)
    assert (out[labels == -100] == 0).all() and (leaf.grad[labels == -100] == 0).all()
    if inplace:  # the gradient was written into the logits' storage
        assert torch.equal(x.detach(), leaf.grad)


def test_logprobs_from_logits_inplace_falls_back_when_rows_cannot_merge():
    base = torch.randn(2, 3, 8, 30, requires_grad=True)
    x = base.transpose(1, 2)  # 4-D, leading dims not mergeable without a copy
    labels = torch.randint(0, 30, x.shape[:-1])
    out = V.logprobs_from_logits(x, labels)  # inplace_backward=True by default
    out.sum().backward()
    x64 = base.detach().double().requires_grad_(True)
    R.token_logprobs(x64.transpose(1, 2), labels).sum().backward()
    torch.testing.assert_close(base.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 9, 61, generator=g, dtype=torch.float64) * 2).to(dtype)
    up = torch.randn(4, 9, generator=g, dtype=torch.float64).to(dtype).double()
    x = logits.clone().requires_grad_(True)
    out = V.entropy_from_logits(x)
    assert out.dtype == dtype and out.shape == (4, 9)  # verl's softmax runs in the logits' dtype
    (out.double() * up).sum().backward()
    x64 = logits.double().requires_grad_(True)
    exact = R.entropy(x64)
    (exact * up).sum().backward()
    own = (exact.detach().to(dtype).double() - exact.detach()).abs().max().item()
    assert (out.double() - exact.detach()).abs().max().item() <= 2 * own + 1e-5
    assert_grad_close(x.grad, x64.grad, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(out, _verl_entropy_from_logits(logits), atol=1e-5, rtol=1e-5)

    flat = logits.reshape(-1, 61)
    chunked = V.entropy_from_logits_with_chunking(flat, chunk_size=7)
    assert chunked.dtype == torch.float32 and chunked.shape == (36,)
    torch.testing.assert_close(chunked.double(), exact.detach().reshape(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        V.entropy_from_logits_with_chunking(flat, chunk_size=0)


# ----------------------------------------------------------------------------------------
# KL, aggregation, policy loss
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+",
                                  "abs+", "k2+"])
def test_kl_penalty(name):
    g = torch.Generator().manual_seed(2)
    logprob = (torch.randn(6, 11, generator=g) * 4).requires_grad_(True)  # wide enough to hit the +-10 clamp
    ref_logprob = torch.randn(6, 11, generator=g) * 4
    ours = V.kl_penalty(logprob, ref_logprob, name)
    theirs = _verl_kl_penalty(logprob, ref_logprob, name)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    g_ours, = torch.autograd.grad(ours.sum(), logprob)
    g_theirs, = torch.autograd.grad(theirs.sum(), logprob)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-6)
    if name.rstrip("+") in ("k3", "low_var_kl"):
        assert (ours >= 0).all() and ours.max() <= 10.0


def test_kl_penalty_rejects_unknown_names():
    a, b = torch.zeros(3), torch.zeros(3)
    with pytest.raises(NotImplementedError, match="full"):
        V.kl_penalty(a, b, "full")
    with pytest.raises(NotImplementedError, match="kl_penalty"):
        V.kl_penalty(a, b, "k4")


BATCH_INFOS = [{}, dict(dp_size=2, batch_num_tokens=37, global_batch_size=11), dict(loss_scale_factor=5)]


@pytest.mark.parametrize("mode", V.AGG_MODES)
@pytest.mark.parametrize("info", BATCH_INFOS, ids=["local", "global", "scale"])
def test_agg_loss(mode, info):
    g = torch.Generator().manual_seed(3)
    mask = _mask(5, 8, 4)
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    ours, theirs = V.agg_loss(x, mask, mode, **info), _verl_agg_loss(x, mask, mode, **info)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0], atol=1e-7,
                               rtol=1e-6)


def test_agg_loss_masked_nan_and_errors():
    mask = _mask(4, 6, 5)
    x = torch.randn(4, 6).masked_fill(mask == 0, float("nan"))  # NaN where masked never reaches the loss
    for mode in V.AGG_MODES:
        assert torch.isfinite(V.agg_loss(x, mask, mode))
    with pytest.raises(ValueError, match="batch_num_tokens"):
        V.agg_loss(x, mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        V.agg_loss(x, mask, "seq-mean-token-mean", dp_size=2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        V.agg_loss(x, mask, "token-mean-unbiased")
    with pytest.raises(ValueError, match="loss_mask"):
        V.agg_loss(x, mask[:, :3], "token-mean")


@pytest.mark.parametrize("mode", V.AGG_MODES)
@pytest.mark.parametrize("cfg", [dict(), dict(low=0.2, high=0.28, c=2.5), dict(clip_ratio=0.1, c=10.0)],
                         ids=["default", "clip-higher", "dual-clip"])
@pytest.mark.parametrize("with_is,info", [(False, {}), (True, {}),
                                          (True, dict(dp_size=2, batch_num_tokens=30, global_batch_size=9))],
                         ids=["plain", "is-weights", "is-weights-global"])
def test_compute_policy_loss_vanilla(mode, cfg, with_is, info):
    g = torch.Generator().manual_seed(6)
    B, T = 5, 8
    mask = _mask(B, T, 7)
    log_prob = (torch.randn(B, T, generator=g) * 0.5 - 1).requires_grad_(True)
    old = log_prob.detach() + torch.randn(B, T, generator=g) * 0.4  # ratios well outside [0.8, 1.2]
    adv = torch.randn(B, T, generator=g) * 2
    isw = torch.rand(B, T, generator=g) * 2 if with_is else None
    config = _config(batch_info=info, **cfg)
    ours, m_ours = V.compute_policy_loss_vanilla(old, log_prob, adv, mask, mode, config, isw)
    theirs, m_theirs = _verl_policy_loss_vanilla(old, log_prob, adv, mask, mode, config, isw)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, log_prob)[0], torch.autograd.grad(theirs, log_prob)[0],
                               atol=1e-7, rtol=1e-6)
    assert m_ours.keys() == m_theirs.keys()
    for k in m_ours:
        assert m_ours[k] == pytest.approx(m_theirs[k], abs=1e-6)
    tup = V.compute_policy_loss_vanilla_tuple(old, log_prob, adv, mask, mode, config, isw)
    assert len(tup) == 4 and torch.equal(tup[0], ours)
    assert [t.item() for t in tup[1:]] == pytest.approx(list(m_ours.values()), abs=1e-7)


def test_policy_loss_is_the_fastrlhf_reference_ppo():
    """token-mean, no IS weights: exactly fastrlhf's reference PPO-clip with dual clip c."""
    g = torch.Generator().manual_seed(8)
    mask = _mask(4, 10, 9)
    log_prob = torch.randn(4, 10, generator=g) - 1
    old = log_prob + torch.randn(4, 10, generator=g) * 0.3
    adv = torch.randn(4, 10, generator=g)
    ours, _ = V.compute_policy_loss_vanilla(old, log_prob, adv, mask, "token-mean", _config(low=0.2, high=0.3, c=3))
    ref, _ = R.ppo_clip_loss_from_logprobs(log_prob, mask, old, adv, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_policy_loss_errors():
    t = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="config"):
        V.compute_policy_loss_vanilla(t, t, t, t)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        V.compute_policy_loss_vanilla(t, t, t, t, config=_config(c=1.0))
    with pytest.raises(ValueError, match="rollout_is_weights"):
        V.compute_policy_loss_vanilla(t, t, t, t, config=_config(), rollout_is_weights=-torch.ones(2, 3))
    with pytest.raises(ValueError, match="advantages"):
        V.compute_policy_loss_vanilla(t, t, torch.zeros(2, 4), t, config=_config())


# ----------------------------------------------------------------------------------------
# patch() on stand-in trees of verl's layout
# ----------------------------------------------------------------------------------------

_TF = '''
import torch

def logprobs_from_logits(logits, labels, inplace_backward=True):
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

def entropy_from_logits(logits):
    p = torch.softmax(logits, -1)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)
{extra}
'''

_CORE_NEW = '''
from typing import Any, Optional
import torch
import {pkg}.utils.torch_functional as verl_F

POLICY_LOSS_REGISTRY = {{}}

def register_policy_loss(name):
    def deco(fn):
        POLICY_LOSS_REGISTRY[name] = fn
        return fn
    return deco

def get_policy_loss_fn(name):
    return POLICY_LOSS_REGISTRY[name]

def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None):
    return (loss_mat * loss_mask).sum() / loss_mask.sum()

def kl_penalty(logprob, ref_logprob, kl_penalty):
    return logprob - ref_logprob

@register_policy_loss("vanilla")
def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None) -> {ret}:
    raise AssertionError("the stand-in's own loss must not run once patched")
'''

_CORE_OLD = '''
import torch
POLICY_LOSS_REGISTRY = {}

def agg_loss(loss_mat, loss_mask, loss_agg_mode):
    return (loss_mat * loss_mask).sum() / loss_mask.sum()

def kl_penalty(logprob, ref_logprob, kl_penalty):
    return logprob - ref_logprob

def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return None
POLICY_LOSS_REGISTRY["vanilla"] = compute_policy_loss_vanilla
'''

_ACTOR = '''
from {pkg}.utils.torch_functional import logprobs_from_logits
from {pkg}.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty
import {pkg}.utils.torch_functional as verl_F

def entropy_fn():
    return verl_F.entropy_from_logits
'''


def test_patch_standin_new_api(standin):
    pkg = "standin_verl_new"
    chunking = "def entropy_from_logits_with_chunking(logits, chunk_size=2048):\n    return entropy_from_logits(logits)"
    standin(pkg, {
        "__init__.py": "__version__ = '0.9.1-standin'\n",
        "utils/torch_functional.py": _TF.format(extra=chunking),
        "trainer/ppo/core_algos.py": _CORE_NEW.format(pkg=pkg, ret="tuple[torch.Tensor, dict[str, Any]]"),
        "workers/actor.py": _ACTOR.format(pkg=pkg),
    })
    tf = importlib.import_module(f"{pkg}.utils.torch_functional")
    ca = importlib.import_module(f"{pkg}.trainer.ppo.core_algos")
    actor = importlib.import_module(f"{pkg}.workers.actor")
    originals = (tf.logprobs_from_logits, ca.agg_loss, ca.POLICY_LOSS_REGISTRY["vanilla"], actor.kl_penalty)

    with V.patch(module=pkg) as h:
        assert h.version == "0.9.1-standin" and h.skipped == {}
        assert len(h.patched) == 6
        assert actor.logprobs_from_logits.__wrapped__ is V.logprobs_from_logits
        assert actor.entropy_fn().__wrapped__ is V.entropy_from_logits
        assert actor.kl_penalty.__wrapped__ is V.kl_penalty and actor.agg_loss.__wrapped__ is V.agg_loss
        loss_fn = actor.get_policy_loss_fn("vanilla")  # through verl's registry
        assert loss_fn.__wrapped__ is V.compute_policy_loss_vanilla
        assert f"{pkg}.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY['vanilla']" in h.sites
        t = torch.randn(2, 5)
        loss, metrics = loss_fn(t, t + 0.1, t, torch.ones(2, 5), "token-mean", _config())
        assert isinstance(metrics, dict) and loss.shape == ()
    assert (tf.logprobs_from_logits, ca.agg_loss, ca.POLICY_LOSS_REGISTRY["vanilla"], actor.kl_penalty) == originals
    assert actor.logprobs_from_logits is originals[0]


def test_patch_standin_old_api_skips_with_warnings(standin):
    pkg = "standin_verl_old"
    standin(pkg, {"utils/torch_functional.py": _TF.format(extra=""), "trainer/ppo/core_algos.py": _CORE_OLD})
    ca = importlib.import_module(f"{pkg}.trainer.ppo.core_algos")
    with pytest.warns(IntegrationWarning) as rec:
        h = V.patch(module=pkg)
    try:
        assert set(h.skipped) == {f"{pkg}.utils.torch_functional.entropy_from_logits_with_chunking",
                                  f"{pkg}.trainer.ppo.core_algos.agg_loss",
                                  f"{pkg}.trainer.ppo.core_algos.compute_policy_loss_vanilla"}
        assert "does not have it" in h.skipped[f"{pkg}.utils.torch_functional.entropy_from_logits_with_chunking"]
        assert "predates" in h.skipped[f"{pkg}.trainer.ppo.core_algos.compute_policy_loss_vanilla"]
        assert len(rec) == 3
        assert ca.kl_penalty.__wrapped__ is V.kl_penalty  # what the old version has is still patched
        assert ca.POLICY_LOSS_REGISTRY["vanilla"] is ca.compute_policy_loss_vanilla
    finally:
        h.undo()


def test_patch_standin_tuple_return_gets_tuple_variant(standin):
    pkg = "standin_verl_tuple"
    standin(pkg, {
        "utils/torch_functional.py": _TF.format(extra=""),
        "trainer/ppo/core_algos.py": _CORE_NEW.format(
            pkg=pkg, ret="tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]"),
    })
    ca = importlib.import_module(f"{pkg}.trainer.ppo.core_algos")
    with pytest.warns(IntegrationWarning, match="entropy_from_logits_with_chunking"):
        h = V.patch(module=pkg)
    with h:
        assert ca.POLICY_LOSS_REGISTRY["vanilla"].__wrapped__ is V.compute_policy_loss_vanilla_tuple


def test_patch_without_verl_raises_import_error():
    if importlib.util.find_spec("verl") is not None:
        pytest.skip("verl is installed")
    with pytest.raises(ImportError, match="pip install verl"):
        V.patch()


# ----------------------------------------------------------------------------------------
# The real verl, where it imports (not in CI: needs ray, omegaconf, tensordict, ...)
# ----------------------------------------------------------------------------------------


def test_against_installed_verl():
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    tfn = pytest.importorskip("verl.utils.torch_functional")
    g = torch.Generator().manual_seed(10)
    mask = _mask(5, 8, 11)
    lp = torch.randn(5, 8, generator=g) - 1
    old = lp + torch.randn(5, 8, generator=g) * 0.3
    adv = torch.randn(5, 8, generator=g)
    for name in ("k1", "abs", "k2", "k3", "k3+"):
        torch.testing.assert_close(V.kl_penalty(lp, old, name), core.kl_penalty(lp, old, name))
    for mode in V.AGG_MODES:
        torch.testing.assert_close(V.agg_loss(adv, mask, mode), core.agg_loss(adv, mask, mode))
    logits = torch.randn(3, 6, 40, generator=g)
    labels = torch.randint(0, 40, (3, 6), generator=g)
    torch.testing.assert_close(V.logprobs_from_logits(logits, labels), tfn.logprobs_from_logits(logits, labels).float())
    torch.testing.assert_close(V.entropy_from_logits(logits), tfn.entropy_from_logits(logits), atol=1e-5, rtol=1e-5)
    with V.patch() as h:
        assert "verl.utils.torch_functional.logprobs_from_logits" in h.patched
