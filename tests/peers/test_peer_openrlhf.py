"""OpenRLHF 0.11.2's own tests for the functions ``fastrlhf.integrations.openrlhf.patch()`` replaces, run against ours.

OpenRLHF's tests load ``openrlhf/models/utils.py`` / ``loss.py`` from its source tree (utils.py imports
deepspeed, the package imports flash-attn); here the same bodies call our drop-ins instead. Source: the
OpenRLHF 0.11.2 wheel (``pip download openrlhf==0.11.2 --no-deps``), which ships ``tests/``:

- ``tests/test_kl_estimator_gradient.py``: all 7 tests -> ``compute_approx_kl`` / ``KL_IS_WEIGHT_CLIP``
  (``test_flag_off_matches_legacy`` checks the k3 form).
- ``tests/test_loss_aggregation.py``: the 9 tests of ``PolicyLoss`` (the others test OpenRLHF's
  ``aggregate_loss`` / ``get_loss_batch_info`` / ``iter_grad_accum_global_norm`` helpers, which
  fastrlhf does not replace).
Bodies verbatim; only the imports differ.
"""

import math

import pytest
import torch

from fastrlhf.integrations.openrlhf import KL_IS_WEIGHT_CLIP, PolicyLoss, compute_approx_kl

ESTIMATORS = ["k1", "k2", "k3"]


def _grad_wrt_log_probs(log_probs, log_probs_base, **kwargs):
    lp = log_probs.clone().detach().requires_grad_(True)
    kl = compute_approx_kl(lp, log_probs_base, **kwargs)
    kl.sum().backward()
    return lp.grad


def test_flag_off_matches_legacy():
    # With unbiased_gradient=False the output must equal the legacy clamped estimator, byte-for-byte.
    torch.manual_seed(42)
    log_probs = torch.randn(4, 8)
    log_probs_base = torch.randn(4, 8)
    for est in ESTIMATORS:
        log_ratio = log_probs.float() - log_probs_base.float()
        if est == "k1":
            legacy = log_ratio
        elif est == "k2":
            legacy = log_ratio**2 / 2.0
        else:
            legacy = (-log_ratio).exp() - 1 + log_ratio
        legacy = legacy.clamp(min=-10, max=10)
        got = compute_approx_kl(log_probs, log_probs_base, kl_estimator=est, unbiased_gradient=False)
        assert torch.allclose(got, legacy), est


def test_forward_value_preserved_under_correction():
    # Straight-through must keep the chosen estimator's forward VALUE (only the gradient changes).
    torch.manual_seed(42)
    log_probs = torch.randn(4, 8)
    log_probs_base = torch.randn(4, 8)
    for est in ESTIMATORS:
        legacy = compute_approx_kl(log_probs, log_probs_base, kl_estimator=est, unbiased_gradient=False)
        corrected = compute_approx_kl(log_probs, log_probs_base, kl_estimator=est, unbiased_gradient=True)
        assert torch.allclose(corrected, legacy), est


def test_gradients_equal_across_estimators_on_policy():
    # On-policy (log_probs_old=None -> w=1): k1/k2/k3 must share the SAME corrected gradient,
    # equal to the analytic reverse-KL gradient  k1 * d/dtheta log pi_theta = log_ratio * 1.
    torch.manual_seed(42)
    log_probs = torch.randn(4, 8)
    log_probs_base = torch.randn(4, 8)
    analytic = log_probs.float() - log_probs_base.float()  # k1 coefficient; d(log_probs)/d(log_probs)=1

    grads = [
        _grad_wrt_log_probs(log_probs, log_probs_base, kl_estimator=e, unbiased_gradient=True) for e in ESTIMATORS
    ]
    for g, est in zip(grads, ESTIMATORS):
        assert torch.allclose(g, analytic, atol=1e-5), est
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.allclose(grads[1], grads[2], atol=1e-6)


def test_importance_weight_scales_gradient_off_policy():
    # Off-policy: gradient must scale by the clamped IS weight w = clamp(exp(log_probs - log_probs_old), max).
    torch.manual_seed(42)
    log_probs = torch.randn(4, 8)
    log_probs_base = torch.randn(4, 8)
    log_probs_old = log_probs - 0.3 * torch.randn(4, 8)  # theta != theta_old

    w = (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP)
    analytic = w * (log_probs.float() - log_probs_base.float())

    for est in ESTIMATORS:
        g = _grad_wrt_log_probs(
            log_probs, log_probs_base, log_probs_old=log_probs_old, kl_estimator=est, unbiased_gradient=True
        )
        assert torch.allclose(g, analytic, atol=1e-5), est


def test_k1_off_gradient_is_broken_baseline():
    # Sanity that the legacy path really is the biased one: k1 without correction has a constant
    # gradient (1 per element) that does NOT depend on the reference -> not a reverse-KL gradient.
    torch.manual_seed(42)
    log_probs = torch.randn(4, 8)
    log_probs_base = torch.randn(4, 8)
    g = _grad_wrt_log_probs(log_probs, log_probs_base, kl_estimator="k1", unbiased_gradient=False)
    assert torch.allclose(g, torch.ones_like(g))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("corrected", [False, True])
def test_k3_extreme_finite_log_probs_match_clipped_reference(dtype, corrected):
    log_probs = torch.tensor([-100.0, -90.0, -11.0, -10.0, -3.0, -1.0, -0.1, 0.0], dtype=dtype, requires_grad=True)
    base = torch.zeros_like(log_probs)
    actual = compute_approx_kl(log_probs, base, kl_estimator="k3", unbiased_gradient=corrected)
    actual.sum().backward()

    reference_input = log_probs.detach().double().requires_grad_(True)
    reference = ((-reference_input).exp() - 1 + reference_input).clamp(-10, 10)
    reference.sum().backward()
    expected_grad = reference_input.detach() if corrected else reference_input.grad
    torch.testing.assert_close(actual, reference.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(log_probs.grad, expected_grad.to(dtype), atol=1e-6, rtol=1e-5)


def test_k3_kl_regularization_does_not_corrupt_optimizer_update():
    logits = torch.nn.Parameter(torch.tensor([[0.0, -100.0], [0.0, -1.0]]))
    reference_logits = torch.tensor([[0.0, 0.0], [0.0, -0.2]])
    optimizer = torch.optim.AdamW([logits], lr=1e-3)
    log_probs = logits.log_softmax(-1)[:, 1]
    base = reference_logits.log_softmax(-1)[:, 1]
    loss = compute_approx_kl(log_probs, base, kl_estimator="k3").mean() * 1e-3
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() > 0
    optimizer.step()
    assert torch.isfinite(logits).all()


def test_policy_loss_token_mean_aggregation_matches_full_batch():
    log_probs = torch.tensor([[-0.20, -0.40, -0.10], [-0.70, -0.30, -0.20], [-0.60, -0.10, -0.50]])
    old_log_probs = log_probs.detach() - torch.tensor([[0.03, -0.04, 0.01], [0.02, 0.05, -0.03], [0.04, 0.0, -0.02]])
    advantages = torch.tensor([[1.0, -0.5, 0.0], [0.3, -1.2, 0.5], [1.5, 0.0, -0.7]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])

    loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2)
    full_loss, *_ = loss_fn(log_probs, old_log_probs, advantages, action_mask=mask)
    batch_num_tokens = mask.sum()

    rank0_loss, *_ = loss_fn(
        log_probs[:2],
        old_log_probs[:2],
        advantages[:2],
        action_mask=mask[:2],
        dp_size=2,
        batch_num_tokens=batch_num_tokens,
    )
    rank1_loss, *_ = loss_fn(
        log_probs[2:],
        old_log_probs[2:],
        advantages[2:],
        action_mask=mask[2:],
        dp_size=2,
        batch_num_tokens=batch_num_tokens,
    )

    assert torch.allclose((rank0_loss + rank1_loss) / 2, full_loss)


def test_policy_kl_metric_uses_policy_ratio_when_vllm_correction_is_enabled():
    log_probs = torch.tensor([[-0.2, -0.4]])
    old_log_probs = torch.tensor([[-0.3, -0.1]])
    rollout_log_probs = torch.tensor([[-1.3, -1.1]])
    advantages = torch.ones_like(log_probs)
    mask = torch.ones_like(log_probs)

    loss_fn = PolicyLoss(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=[0.1, 10.0])
    _, _, ppo_kl, vllm_kl, _ = loss_fn(
        log_probs,
        old_log_probs,
        advantages,
        action_mask=mask,
        rollout_log_probs=rollout_log_probs,
    )

    assert torch.allclose(ppo_kl, (old_log_probs - log_probs).mean())
    assert torch.allclose(vllm_kl, (rollout_log_probs - old_log_probs).mean())


def test_icepop_filters_overflowing_ratio_without_nan():
    log_probs = torch.zeros((1, 2), requires_grad=True)
    loss_fn = PolicyLoss(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=[0.5, 5.0])
    loss, *_ = loss_fn(
        log_probs,
        torch.zeros_like(log_probs),
        torch.ones_like(log_probs),
        action_mask=torch.ones_like(log_probs),
        rollout_log_probs=torch.tensor([[-1000.0, 0.0]]),
    )
    loss.backward()

    assert torch.allclose(loss, torch.tensor(-0.5))
    assert torch.isfinite(log_probs.grad).all()
    assert log_probs.grad[0, 0] == 0


def test_policy_kl_metric_is_not_clamped():
    log_probs = torch.tensor([[100.0]])
    old_log_probs = torch.zeros_like(log_probs)
    advantages = torch.ones_like(log_probs)
    mask = torch.ones_like(log_probs)

    _, _, ppo_kl, _, _ = PolicyLoss()(log_probs, old_log_probs, advantages, action_mask=mask)

    assert torch.allclose(ppo_kl, (old_log_probs - log_probs).mean())


def test_seq_mask_gates_on_the_per_sequence_geometric_mean_ratio():
    # Row 0: token ratios e^1 and e^-1 (geometric mean 1) -> kept, each token weighted by its own ratio.
    # Row 1: geometric mean e^2 > 5 -> the whole sequence is dropped.
    logp = torch.zeros(2, 2)
    rollout = torch.tensor([[-1.0, 1.0], [-2.0, -2.0]])
    loss_fn = PolicyLoss(is_correction_level="seq", is_correction_threshold=[0.5, 5.0])
    loss, _, _, _, filt = loss_fn(
        logp, logp, torch.ones(2, 2), action_mask=torch.ones(2, 2), rollout_log_probs=rollout
    )
    torch.testing.assert_close(loss, -torch.tensor([1.0, -1.0]).exp().sum() / 4)
    torch.testing.assert_close(filt, torch.tensor(0.5))


def test_binary_kl_trust_region_masks_tokens_and_sequences():
    # On-policy PPO ratio (old == logp) so the surrogate is the REINFORCE gradient. Token 0 is far off
    # the behavior policy (mu=1/3, pi=1), token 1 matches it (mu=pi=1/2). Token-level binary_kl drops
    # token 0 and keeps token 1 with IS weight 1: loss = -(0 + 1) / 2. Seq-level (FlashREINFORCE) drops
    # the whole sequence on its mean KL.
    logp = torch.tensor([[0.0, math.log(0.5)]])
    mu = torch.tensor([[-math.log(3.0), math.log(0.5)]])
    adv, mask = torch.ones(1, 2), torch.ones(1, 2)
    tok = PolicyLoss(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=[0, 0.05])
    loss, _, _, _, filt = tok(logp, logp, adv, action_mask=mask, rollout_log_probs=mu)
    torch.testing.assert_close(loss, torch.tensor(-0.5))
    torch.testing.assert_close(filt, torch.tensor(0.5))
    seq = PolicyLoss(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=[0, 3e-3])
    loss, _, _, _, filt = seq(logp, logp, adv, action_mask=mask, rollout_log_probs=mu)
    torch.testing.assert_close(loss, torch.tensor(0.0))
    torch.testing.assert_close(filt, torch.tensor(1.0))
    # Two-sided: pi << mu on the sampled token is dropped just the same.
    _, _, _, _, filt = seq(mu, mu, adv, action_mask=mask, rollout_log_probs=logp)
    torch.testing.assert_close(filt, torch.tensor(1.0))
    # A tiny mismatch (pi=0.5 vs mu=0.505, binary KL ~5e-5) stays inside delta=3e-3.
    close = torch.full((1, 2), math.log(0.5))
    _, _, _, _, filt = seq(close, close, adv, action_mask=mask, rollout_log_probs=torch.full((1, 2), math.log(0.505)))
    torch.testing.assert_close(filt, torch.tensor(0.0))


def test_tv_trust_region_masks_by_sampled_token_probability_gap():
    # |pi - mu| on the sampled token: 0.6 vs 0.5 -> 0.1 > 0.05 dropped; 0.52 vs 0.5 kept with IS weight 0.52/0.5.
    logp = torch.tensor([[math.log(0.6), math.log(0.52)]])
    mu = torch.full((1, 2), math.log(0.5))
    loss_fn = PolicyLoss(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=[0, 0.05])
    loss, _, _, _, filt = loss_fn(logp, logp, torch.ones(1, 2), action_mask=torch.ones(1, 2), rollout_log_probs=mu)
    torch.testing.assert_close(filt, torch.tensor(0.5))
    torch.testing.assert_close(loss, torch.tensor(-(0.52 / 0.5) / 2))


def test_invalid_is_correction_combinations_are_rejected():
    for kw in (
        dict(is_correction_level="seq", is_correction_mode="clip"),
        dict(is_correction_level="token", is_correction_mode="clip", is_correction_gating="binary_kl"),
        dict(is_correction_level="token", is_correction_gating="kl"),
        dict(is_correction_level="geo"),
    ):
        with pytest.raises(ValueError):
            PolicyLoss(is_correction_threshold=[0, 0.05], **kw)
    with pytest.raises(ValueError, match="upper bound only"):  # the ratio band [0.5, 5] would reject everything
        PolicyLoss(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=[0.5, 5.0])


def test_seq_mean_token_mean_weighs_every_sequence_the_same():
    # Two rows of unequal length: loss = -(A0 + A1) / 2, gradient -A_i / (T_i * B) per token.
    logp = torch.full((2, 2), -0.6931, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[2.0, 2.0], [1.0, 0.0]])
    loss, *_ = PolicyLoss(token_level_loss=False)(logp, logp.detach(), adv, action_mask=mask)
    torch.testing.assert_close(loss, torch.tensor(-1.5))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5], [-0.5, 0.0]]))
