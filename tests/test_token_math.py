"""The closed-form PPO-clip derivatives of ``fastrlhf/token_math.py`` against autograd on the oracle.

Production computes every token's derivative (in logp, entropy, old, advantages, ref) in forward
and only scales it in backward; the oracle ``reference.ppo_clip_loss_from_logprobs`` is plain
autograd-able PyTorch. Both run in fp64 here, so agreement is to rounding.
"""

import math

import pytest
import torch

from fastrlhf import reference as R
from fastrlhf.token_math import loss_agg_weights, policy_loss_from_logprobs

B, T = 4, 9

CONFIGS = {
    "clip": dict(clip_low=0.2),
    "clip-higher": dict(clip_low=0.2, clip_high=0.28),
    "dual-clip": dict(clip_low=0.2, dual_clip=3.0),
    "k1": dict(kl_coef=0.1, kl_estimator="k1"),
    "k2": dict(kl_coef=0.2, kl_estimator="k2"),
    "k3+entropy": dict(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01, clip_high=0.3, dual_clip=2.0),
}


def _batch(seed, per_sequence):
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    logp = -torch.rand(B, T, generator=g, **d) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g, **d)  # ratios on both sides of the clip range
    ref = logp + 0.5 * torch.randn(B, T, generator=g, **d)
    ent = torch.rand(B, T, generator=g, **d) * 2
    adv = torch.randn(B, generator=g, **d) if per_sequence else torch.randn(B, T, generator=g, **d)
    counted = torch.rand(B, T, generator=g) > 0.3
    counted[3] = False  # a sequence with no counted token
    if not per_sequence:
        adv[0, :3] = 0.0  # A = 0: max() ties whatever the ratio (torch splits the gradient half-half)
    old[1, 2] = logp[1, 2] - 25.0  # |log ratio| > 20: the clamp's zero derivative
    return logp, old, ref, ent, adv, counted


@pytest.mark.parametrize("per_sequence", [False, True], ids=["per-token-A", "per-seq-A"])
@pytest.mark.parametrize("loss_agg", R.LOSS_AGG_MODES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_closed_form_gradients_match_autograd_on_the_oracle(config, loss_agg, per_sequence):
    opts = CONFIGS[config]
    tensors = [t.clone().requires_grad_() for t in _batch(3, per_sequence)[:5]]
    counted = _batch(3, per_sequence)[5]
    logp, old, ref, ent, adv = tensors
    kw = dict(opts, loss_agg=loss_agg, entropy=ent, ref_logprobs=ref if opts.get("kl_coef") else None)
    loss, stats = policy_loss_from_logprobs(logp, counted, old, adv, **kw)
    (loss * 0.37).backward()  # a non-unit upstream gradient: backward scales the stored derivatives
    ours = [None if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    loss64, stats64 = R.ppo_clip_loss_from_logprobs(logp, counted.double(), old, adv, **kw)
    (loss64 * 0.37).backward()
    torch.testing.assert_close(loss.detach(), loss64.detach(), rtol=0, atol=1e-12)
    for name, mine, t in zip(("logp", "old", "ref", "entropy", "advantages"), ours, tensors):
        want = t.grad if t.grad is not None else torch.zeros_like(t)
        got = mine if mine is not None else torch.zeros_like(t)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"d loss / d {name}")
    for k, v in stats64.items():
        torch.testing.assert_close(stats[k], v, rtol=0, atol=1e-12, msg=k)


def test_uncounted_garbage_never_reaches_loss_stats_or_gradients():
    logp, old, ref, ent, adv, counted = _batch(5, False)
    bad = ~counted
    for t in (old, ref, adv, ent):
        t[bad] = float("nan")
    logp = logp.clone().requires_grad_()
    loss, stats = policy_loss_from_logprobs(logp, counted, old, adv, entropy=ent, ref_logprobs=ref, kl_coef=0.1,
                                            entropy_coef=0.01)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v.item()) for v in stats.values())
    assert torch.isfinite(logp.grad).all() and (logp.grad[bad] == 0).all()


def test_loss_agg_weights_by_hand():
    # Two rows of T = 4: row 0 counts 3 tokens, row 1 counts 1, a third row counts none.
    counted = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    w = {m: loss_agg_weights(counted, m, torch.float64) for m in R.LOSS_AGG_MODES}
    assert w["token-mean"][0, 0] == 1 / 4  # 4 counted tokens
    assert w["seq-mean-token-mean"][0, 0] == 1 / (3 * 2) and w["seq-mean-token-mean"][1, 1] == 1 / (1 * 2)
    assert w["seq-mean-token-sum"][0, 0] == 1 / 3  # B = 3 rows
    assert w["seq-mean-token-sum-norm"][1, 1] == 1 / 12  # B * T
    for m in R.LOSS_AGG_MODES:
        assert (w[m][~counted] == 0).all()
