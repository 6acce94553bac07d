"""fastrlhf.integrations.verl against verl's own formulas, and patch() on stand-in module trees.

verl needs ray (and more) to import, so CI does not install it. The ``_verl_*`` functions below
are verl's formulas transcribed from verl 0.9.1 (``pip download verl==0.9.1``; the same bodies
on volcengine/verl main): ``verl/utils/torch_functional.py`` (``masked_sum``, ``masked_mean``,
``entropy_from_logits``) and ``verl/trainer/ppo/core_algos.py`` (``agg_loss``, ``kl_penalty``,
``kl_penalty_forward``, ``compute_policy_loss_vanilla``), and from verl-project/verl @ 1dda039b:
``core_algos.py`` ``compute_policy_loss_gspo`` (lines 1545-1618), ``compute_policy_loss_sapo``
(1621-1703), ``compute_policy_loss_cispo`` (2046-2104) and ``rollout_corr_helper.py``
``compute_rollout_correction_weights`` (522-657). Token ops are checked against the fp64 oracle
(fastrlhf.reference). Where verl itself imports, the last tests run against it.
"""

import importlib
import importlib.util

import pytest
import torch
from conftest import assert_grad_close, backends

import fastrlhf
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


def _verl_metrics(pg_clipfrac, ppo_kl, pg_clipfrac_lower):
    return {"actor/pg_clipfrac": pg_clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
            "actor/pg_clipfrac_lower": pg_clipfrac_lower.item()}


def _verl_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                           rollout_is_weights=None):
    # verl @ 1dda039b verl/trainer/ppo/core_algos.py compute_policy_loss_gspo, lines 1573-1618
    clip_ratio_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_ratio_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = _verl_agg_loss(pg_losses, response_mask, "seq-mean-token-mean", **config.global_batch_info)
    pg_clipfrac = _verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    ppo_kl = _verl_masked_mean(-negative_approx_kl, response_mask)
    return pg_loss, _verl_metrics(pg_clipfrac, ppo_kl, torch.tensor(0.0))


def _verl_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                           rollout_is_weights=None):
    # verl @ 1dda039b verl/trainer/ppo/core_algos.py compute_policy_loss_sapo, lines 1649-1703
    tau_pos = torch.as_tensor(config.tau_pos, dtype=advantages.dtype, device=advantages.device)
    tau_neg = torch.as_tensor(config.tau_neg, dtype=advantages.dtype, device=advantages.device)
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    taus = torch.where(advantages > 0, tau_pos, tau_neg)
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    pg_losses = -gates * advantages
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = _verl_agg_loss(pg_losses, response_mask, "seq-mean-token-mean", **config.global_batch_info)
    ppo_kl = _verl_masked_mean(-negative_approx_kl, response_mask)
    return pg_loss, _verl_metrics(torch.tensor(0.0), ppo_kl, torch.tensor(0.0))


def _verl_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights=None):
    # verl @ 1dda039b verl/trainer/ppo/core_algos.py compute_policy_loss_cispo, lines 2062-2104
    clip_ratio_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_ratio_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = _verl_masked_mean(-negative_approx_kl, response_mask)
    clipped_ratio = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = -clipped_ratio.detach() * advantages * log_prob
    pg_clipfrac = _verl_masked_mean((ratio != clipped_ratio).float(), response_mask)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = _verl_agg_loss(pg_losses, response_mask, loss_agg_mode, **config.global_batch_info)
    return pg_loss, _verl_metrics(pg_clipfrac, ppo_kl, torch.tensor(0.0))


def _verl_rollout_is_weights(log_ratio, response_mask, rollout_is, rollout_is_threshold):
    # verl @ 1dda039b verl/trainer/ppo/rollout_corr_helper.py compute_rollout_correction_weights,
    # lines 565-625 (threshold "lo_hi" -> IcePop, a float -> TIS; no batch normalisation)
    if isinstance(rollout_is_threshold, str):
        lower, upper = (float(v) for v in rollout_is_threshold.split("_", 1))
    else:
        lower, upper = None, float(rollout_is_threshold)
    if rollout_is == "token":
        raw = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    else:
        log_ratio_sum = _verl_masked_sum(log_ratio, response_mask, axis=-1).unsqueeze(-1)
        raw = torch.exp(torch.clamp(log_ratio_sum, min=-20.0, max=20.0)).expand_as(log_ratio)
    raw = raw * response_mask
    if lower is None:
        return raw.clamp(max=upper).detach()
    kept = (raw >= lower) & (raw <= upper)
    return torch.where(kept, raw, torch.zeros_like(raw)).detach()


class _Config(dict):
    """verl's actor config as the loss reads it: attributes plus ``.get``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


def _config(clip_ratio=0.2, low=None, high=None, c=None, batch_info=None, tau_pos=1.0, tau_neg=1.05):
    cfg = _Config(clip_ratio=clip_ratio, clip_ratio_low=low, clip_ratio_high=high, global_batch_info=batch_info or {},
                  tau_pos=tau_pos, tau_neg=tau_neg)
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
# GSPO (GSPO-token), SAPO, CISPO, rollout IS weights (verl @ 1dda039b)
# ----------------------------------------------------------------------------------------

FORMS = {
    "gspo": (V.compute_policy_loss_gspo, V.compute_policy_loss_gspo_tuple, _verl_policy_loss_gspo),
    "sapo": (V.compute_policy_loss_sapo, V.compute_policy_loss_sapo_tuple, _verl_policy_loss_sapo),
    "cispo": (V.compute_policy_loss_cispo, V.compute_policy_loss_cispo_tuple, _verl_policy_loss_cispo),
}


def _form_batch(seed, dtype, per_token_adv):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    mask = _mask(B, T, seed + 1)
    lp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1).to(dtype)
    old = (lp.double() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4).to(dtype)  # ratios on both sides
    old[4] = lp[4] - 11.0  # GSPO: log s_i = 11 > 10, verl's clamp (no gradient through the ratio there)
    adv = torch.randn(B, T if per_token_adv else 1, generator=g, dtype=torch.float64).expand(B, T).to(dtype)
    isw = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2).to(dtype)
    return mask, lp, old, adv.contiguous(), isw


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_token_adv", [True, False], ids=["token-adv", "seq-adv"])
@pytest.mark.parametrize("with_is,info,mode", [
    (False, {}, "token-mean"),
    (True, {}, "seq-mean-token-sum"),
    (True, dict(dp_size=2, batch_num_tokens=30, global_batch_size=9), "token-mean"),
], ids=["plain", "is-weights", "is-weights-global"])
def test_policy_loss_forms_match_verl(form, dtype, per_token_adv, with_is, info, mode):
    """Value, gradients in log_prob / old_log_prob / advantages, and metrics vs verl's code (transcribed)."""
    ours_fn, tuple_fn, theirs_fn = FORMS[form]
    mask, lp, old, adv, isw = _form_batch(11, dtype, per_token_adv)
    config = _config(low=0.2, high=0.28, batch_info=info, tau_pos=1.0, tau_neg=1.05)
    isw = isw if with_is else None
    results = []
    for fn in (ours_fn, theirs_fn):
        x, o, a = (t.clone().requires_grad_(True) for t in (lp, old, adv))
        loss, metrics = fn(o, x, a, mask, mode, config, isw)
        grads = torch.autograd.grad(loss, (x, o, a), allow_unused=True)
        results.append((loss, metrics, [torch.zeros_like(lp) if gr is None else gr for gr in grads]))
    (ours, m_ours, g_ours), (theirs, m_theirs, g_theirs) = results
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-13, rtol=1e-12)
    assert ours.shape == () and ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, **tol)
    for name, go, gt in zip(("log_prob", "old_log_prob", "advantages"), g_ours, g_theirs):
        torch.testing.assert_close(go, gt, **tol, msg=lambda msg, n=name: f"d/d{n}: {msg}")
    assert m_ours.keys() == m_theirs.keys()
    for k in m_ours:
        assert m_ours[k] == pytest.approx(m_theirs[k], abs=1e-6), k
    tup = tuple_fn(old, lp, adv, mask, mode, config, isw)
    assert len(tup) == 4 and torch.equal(tup[0], ours.detach())
    if form == "gspo":  # the clamped sequence (log s_i = 11) passes no gradient through its ratio
        assert (g_ours[0][4] == 0).all()


def test_gspo_token_differs_from_sequence_ratio_with_per_token_advantages():
    """verl's GSPO-token sends token t's gradient to log_prob_t only; fastrlhf's ratio_level="sequence"
    (TRL's GSPO) spreads it over the sequence. Equal with per-sequence advantages, not with per-token
    ones: the drop-in must follow verl (the test above), and here is the difference it avoids."""
    mask, lp, old, adv, _ = _form_batch(12, torch.float64, per_token_adv=True)
    old[4] = lp[4] - 0.3
    cfg = _config(low=0.2, high=0.28)
    x = lp.clone().requires_grad_(True)
    g_verl, = torch.autograd.grad(V.compute_policy_loss_gspo(old, x, adv, mask, "token-mean", cfg)[0], x)
    from fastrlhf.token_math import policy_loss_from_logprobs
    y = lp.clone().requires_grad_(True)
    seq, _ = policy_loss_from_logprobs(y, mask.bool(), old, adv, loss_agg="seq-mean-token-mean", clip_low=0.2,
                                       clip_high=0.28, ratio_level="sequence")
    g_seq, = torch.autograd.grad(seq, y)
    assert (g_verl - g_seq).abs().max() > 1e-3


def _logits_batch(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, Vocab = 4, 7, 97
    x = torch.randn(B, T, Vocab, generator=g) * 2
    labels = torch.randint(0, Vocab, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    lp = fastrlhf.token_logprobs(x, labels, backend="torch").double()
    old = lp + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return x, labels, mask, old.float(), rollout.float(), adv.float()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", ["gspo", "sapo", "cispo", "vanilla-tis-token", "vanilla-icepop", "vanilla-tis-seq",
                                  "gspo-tis-seq"])
def test_drop_ins_equal_fastrlhf_ops(backend, case):
    """The drop-ins on fastrlhf's logprobs equal fastrlhf's fused op with the matching options, on every
    backend (value and logits gradient, fp32): GSPO with per-sequence advantages = ratio_level="sequence";
    SAPO = policy_loss="sapo"; CISPO where no ratio is below 1 - clip_ratio_low = policy_loss="cispo" with
    clip_high = 1 + clip_ratio_high; verl's TIS / IcePop weights = rollout_correction (GSPO with a
    sequence-level weight only: per-token weights are where GSPO-token leaves ratio_level="sequence")."""
    x, labels, mask, old, rollout, adv = _logits_batch(13)
    cfg = _config(low=0.2, high=0.28)
    A = adv.unsqueeze(-1).expand_as(old).contiguous()
    form, _, corr = case.partition("-")
    fn = {"vanilla": V.compute_policy_loss_vanilla, **{k: v[0] for k, v in FORMS.items()}}[form]
    agg = {"gspo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean"}.get(form, "token-mean")
    ours_opts = {"gspo": dict(ratio_level="sequence", clip_low=0.2, clip_high=0.28),
                 "sapo": dict(policy_loss="sapo"), "cispo": dict(policy_loss="cispo", clip_high=1.28),
                 "vanilla": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)}[form]
    isw = None
    if corr:
        level, thr, opts = {"tis-token": ("token", 1.2, dict(rollout_correction="token_truncate", rollout_is_max=1.2)),
                            "icepop": ("token", "0.8_1.25", dict(rollout_correction="icepop", rollout_is_min=0.8,
                                                                 rollout_is_max=1.25)),
                            "tis-seq": ("sequence", 1.5, dict(rollout_correction="sequence_truncate",
                                                               rollout_is_max=1.5))}[corr]
        isw = _verl_rollout_is_weights(old - rollout, mask, level, thr)
        ours_opts = dict(ours_opts, rollout_logprobs=rollout, **opts)
    if form == "cispo":
        lp0 = fastrlhf.token_logprobs(x, labels, backend="torch")
        assert (torch.exp(lp0 - old)[mask.bool()] > 0.8).all()  # no ratio at verl's floor
    xa = x.clone().requires_grad_(True)
    lp = fastrlhf.token_logprobs(xa, labels, backend=backend)
    got, _ = fn(old, lp, A, mask, agg, cfg, isw)
    (g_got,) = torch.autograd.grad(got, xa)
    xb = x.clone().requires_grad_(True)
    want, _ = fastrlhf.ppo_clip_loss(xb, labels, old, adv, mask=mask, loss_agg=agg, backend=backend, **ours_opts)
    (g_want,) = torch.autograd.grad(want, xb)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)


def test_forms_errors_and_masked_nan():
    t = torch.zeros(2, 3)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for fn, _, _ in FORMS.values():
        with pytest.raises(ValueError, match="config"):
            fn(t, t, t, m)
        with pytest.raises(ValueError, match="rollout_is_weights"):
            fn(t, t, t, m, config=_config(), rollout_is_weights=-torch.ones(2, 3))
        nan = t.masked_fill(m == 0, float("nan"))  # padding never reaches the loss
        loss, _ = fn(nan, nan, nan, m, config=_config())
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="tau_pos"):
        V.compute_policy_loss_sapo(t, t, t, m, config=_config(tau_pos=0.0))


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

@register_policy_loss("gspo")
def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None) -> {ret}:
    raise AssertionError("the stand-in's own loss must not run once patched")

@register_policy_loss("sapo")
def compute_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None) -> {ret}:
    raise AssertionError("the stand-in's own loss must not run once patched")

@register_policy_loss("cispo")
def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
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
    registry = dict(ca.POLICY_LOSS_REGISTRY)

    with V.patch(module=pkg) as h:
        assert h.version == "0.9.1-standin" and h.skipped == {}
        assert len(h.patched) == 9
        assert actor.logprobs_from_logits.__wrapped__ is V.logprobs_from_logits
        assert actor.entropy_fn().__wrapped__ is V.entropy_from_logits
        assert actor.kl_penalty.__wrapped__ is V.kl_penalty and actor.agg_loss.__wrapped__ is V.agg_loss
        loss_fn = actor.get_policy_loss_fn("vanilla")  # through verl's registry
        assert loss_fn.__wrapped__ is V.compute_policy_loss_vanilla
        assert f"{pkg}.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY['vanilla']" in h.sites
        t = torch.randn(2, 5)
        loss, metrics = loss_fn(t, t + 0.1, t, torch.ones(2, 5), "token-mean", _config())
        assert isinstance(metrics, dict) and loss.shape == ()
        mask, lp, old, adv, isw = _form_batch(14, torch.float32, per_token_adv=True)
        for name, (ours, _, theirs) in FORMS.items():  # verl's registry now gives fastrlhf's GSPO / SAPO / CISPO
            fn = actor.get_policy_loss_fn(name)
            assert fn.__wrapped__ is ours and f"{pkg}.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY[{name!r}]" in h.sites
            got, m_got = fn(old, lp, adv, mask, "token-mean", _config(), isw)
            want, m_want = theirs(old, lp, adv, mask, "token-mean", _config(), isw)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
            assert m_got.keys() == m_want.keys()
    assert (tf.logprobs_from_logits, ca.agg_loss, ca.POLICY_LOSS_REGISTRY["vanilla"], actor.kl_penalty) == originals
    assert actor.logprobs_from_logits is originals[0]
    assert ca.POLICY_LOSS_REGISTRY == registry and ca.compute_policy_loss_gspo is registry["gspo"]


def test_patch_standin_old_api_skips_with_warnings(standin):
    pkg = "standin_verl_old"
    standin(pkg, {"utils/torch_functional.py": _TF.format(extra=""), "trainer/ppo/core_algos.py": _CORE_OLD})
    ca = importlib.import_module(f"{pkg}.trainer.ppo.core_algos")
    with pytest.warns(IntegrationWarning) as rec:
        h = V.patch(module=pkg)
    try:
        new_forms = {f"{pkg}.trainer.ppo.core_algos.compute_policy_loss_{n}" for n in ("gspo", "sapo", "cispo")}
        assert set(h.skipped) == {f"{pkg}.utils.torch_functional.entropy_from_logits_with_chunking",
                                  f"{pkg}.trainer.ppo.core_algos.agg_loss",
                                  f"{pkg}.trainer.ppo.core_algos.compute_policy_loss_vanilla"} | new_forms
        assert "does not have it" in h.skipped[f"{pkg}.utils.torch_functional.entropy_from_logits_with_chunking"]
        assert all("does not have it" in h.skipped[k] for k in new_forms)
        assert "predates" in h.skipped[f"{pkg}.trainer.ppo.core_algos.compute_policy_loss_vanilla"]
        assert len(rec) == 6
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
        for name in ("vanilla", "gspo", "sapo", "cispo"):
            assert ca.POLICY_LOSS_REGISTRY[name].__wrapped__ is getattr(V, f"compute_policy_loss_{name}_tuple")
        t = torch.randn(2, 5)
        assert len(ca.POLICY_LOSS_REGISTRY["gspo"](t, t + 0.1, t, torch.ones(2, 5), "token-mean", _config())) == 4


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
