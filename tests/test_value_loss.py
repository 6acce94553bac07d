"""``fastrlhf.clipped_value_loss``: PPO's clipped value loss (verl ``compute_value_loss``, OpenRLHF ``ValueLoss``).

Two layers: values derived by hand in the comments (loss under every aggregation, clip
fraction, the gradient of each branch), then the op against ``fastrlhf.reference`` on random
inputs. Inputs are quarters, so every hand value is exact in binary floating point.
"""

import math

import pytest
import torch

import fastrlhf
from fastrlhf import reference as R

# Three counted tokens, clip = 0.5, one case per branch of max((V - R)^2, (V_clip - R)^2):
#   A (row 0, t 0): V_old 1, V 1.25, R 2: |V - V_old| = 0.25 <= 0.5, so V_clip = V;
#      both terms (1.25 - 2)^2 = 0.5625.                                  l = 0.5625, not clipped
#   B (row 0, t 1): V_old 0, V 1, R 2: V_clip = 0 + 0.5 = 0.5;
#      (1 - 2)^2 = 1 < (0.5 - 2)^2 = 2.25: moving past the clip range earns no credit.  l = 2.25, clipped
#   C (row 1, t 0): V_old 0, V 1, R 0: V_clip = 0.5; (1 - 0)^2 = 1 > (0.5 - 0)^2 = 0.25.  l = 1, not clipped
#   (row 1, t 1) is masked out: V 5, V_old 0, R -3 would add (5 + 3)^2 = 64.
V = [[1.25, 1.0], [1.0, 5.0]]
V_OLD = [[1.0, 0.0], [0.0, 0.0]]
RET = [[2.0, 2.0], [0.0, -3.0]]
MASK = [[1, 1], [1, 0]]


def hand_inputs(dtype=torch.float64):
    t = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    return t(V).requires_grad_(), t(V_OLD), t(RET), torch.tensor(MASK, dtype=torch.bool)


@pytest.mark.parametrize(
    "loss_agg, expected",
    [
        ("token-mean", 0.5 * (0.5625 + 2.25 + 1.0) / 3),  # 0.5 * 3.8125 / 3 counted tokens
        ("seq-mean-token-mean", 0.5 * ((0.5625 + 2.25) / 2 + 1.0) / 2),  # rows 1.40625 and 1 -> 0.6015625
        ("seq-mean-token-sum", 0.5 * 3.8125 / 2),  # sum over B = 2 rows: 0.953125
        ("seq-mean-token-sum-norm", 0.5 * 3.8125 / 4),  # sum over B * T = 4: 0.4765625
    ],
)
def test_hand_values_every_aggregation(loss_agg, expected):
    v, old, ret, m = hand_inputs()
    loss, stats = fastrlhf.clipped_value_loss(v, old, ret, m, clip=0.5, loss_agg=loss_agg)
    assert loss.shape == () and loss.dtype == torch.float64
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-15)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3, abs=1e-15)  # B only
    assert float(stats["num_tokens"]) == 3
    ref_loss, ref_stats = R.clipped_value_loss(v, old, ret, m, clip=0.5, loss_agg=loss_agg)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), abs=1e-15)
    assert float(stats["clipfrac"]) == float(ref_stats["clipfrac"])


def test_hand_gradient_of_each_branch():
    # token-mean weights w = 1/3; d(0.5 * w * (x - R)^2)/dV = w * (x - R) * dx/dV:
    #   A: inside the clip range both terms are (V - R)^2:   (1/3) * (1.25 - 2) = -0.25
    #   B: the clipped term wins and V_clip is constant in V:  0
    #   C: the unclipped term wins:                           (1/3) * (1 - 0) = 1/3
    #   masked token:                                         0
    v, old, ret, m = hand_inputs()
    loss, _ = fastrlhf.clipped_value_loss(v, old, ret, m, clip=0.5)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[-0.25, 0.0], [1 / 3, 0.0]], dtype=torch.float64),
                               atol=1e-15, rtol=0)


def test_no_clip_is_half_the_squared_error():
    # clip=None (OpenRLHF's clip_eps=None): 0.5 * token-mean of (V - R)^2 = 0.5 * (0.5625 + 1 + 1) / 3
    v, old, ret, m = hand_inputs()
    loss, stats = fastrlhf.clipped_value_loss(v, old, ret, m, clip=None)
    assert float(loss.detach()) == pytest.approx(0.5 * 2.5625 / 3, abs=1e-15)
    assert float(stats["clipfrac"]) == 0.0


def test_inside_the_clip_range_equals_the_unclipped_loss():
    # |V - V_old| < clip everywhere: V_clip = V, so the loss is the plain 0.5 * mean (V - R)^2
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 5, generator=g, dtype=torch.float64)
    v = old + 0.1 * torch.rand(3, 5, generator=g, dtype=torch.float64)
    ret = torch.randn(3, 5, generator=g, dtype=torch.float64)
    m = torch.ones(3, 5)
    loss, stats = fastrlhf.clipped_value_loss(v, old, ret, m, clip=0.2)
    assert float(loss) == pytest.approx(float(0.5 * ((v - ret) ** 2).mean()), rel=1e-14)
    assert float(stats["clipfrac"]) == 0.0


def test_all_masked_gives_zero_not_nan():
    v, old, ret, _ = hand_inputs()
    for agg in fastrlhf.value_loss.VALUE_LOSS_AGG_MODES:
        loss, stats = fastrlhf.clipped_value_loss(v, old, ret, torch.zeros(2, 2), loss_agg=agg)
        assert float(loss.detach()) == 0.0 and float(stats["clipfrac"]) == 0.0
        loss.backward()
        assert torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 7), (13,), (2, 3, 5)])
def test_matches_reference_with_grads(loss_agg, dtype, shape):
    g = torch.Generator().manual_seed(1)
    old = torch.randn(shape, generator=g).to(dtype)
    v = (old + 0.5 * torch.randn(shape, generator=g).to(dtype)).requires_grad_()
    ret = torch.randn(shape, generator=g).to(dtype)
    m = torch.rand(shape, generator=g) > 0.3
    loss, stats = fastrlhf.clipped_value_loss(v, old, ret, m, clip=0.2, loss_agg=loss_agg)
    (grad,) = torch.autograd.grad(loss, v)
    v64 = v.detach().double().requires_grad_()
    ref, ref_stats = R.clipped_value_loss(v64, old.double(), ret.double(), m, clip=0.2, loss_agg=loss_agg)
    (ref_grad,) = torch.autograd.grad(ref, v64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=tol, abs=tol)
    torch.testing.assert_close(grad.double(), ref_grad, atol=tol, rtol=tol)
    assert grad.shape == v.shape
    assert float(stats["clipfrac"]) == pytest.approx(float(ref_stats["clipfrac"]), abs=1e-6)
    assert 0.0 < float(stats["clipfrac"]) < 1.0  # the random case exercises both branches
    assert torch.equal(grad[~m], torch.zeros_like(grad[~m]))  # masked tokens: exactly zero gradient


def test_inputs_are_not_modified_and_only_values_get_a_gradient():
    v, old, ret, m = hand_inputs()
    old.requires_grad_()
    ret.requires_grad_()
    before = [t.detach().clone() for t in (v, old, ret)]
    loss, _ = fastrlhf.clipped_value_loss(v, old, ret, m, clip=0.5)
    loss.backward()
    assert old.grad is None and ret.grad is None  # constants of the rollout
    assert all(torch.equal(a, b) for a, b in zip(before, (v, old, ret)))


@pytest.mark.parametrize("clip", [float("nan"), float("inf"), -0.1, True, "0.2"])
def test_bad_clip_is_named(clip):
    v, old, ret, m = hand_inputs()
    with pytest.raises(ValueError, match="clip"):
        fastrlhf.clipped_value_loss(v, old, ret, m, clip=clip)


def test_input_errors_name_the_argument():
    v, old, ret, m = hand_inputs()
    with pytest.raises(ValueError, match="loss_agg"):
        fastrlhf.clipped_value_loss(v, old, ret, m, loss_agg="mean")
    with pytest.raises(ValueError, match="old_values must have the shape"):
        fastrlhf.clipped_value_loss(v, old[:, :1], ret, m)
    with pytest.raises(ValueError, match="mask must have the shape"):
        fastrlhf.clipped_value_loss(v, old, ret, m[0])
    with pytest.raises(TypeError, match="returns must be a floating-point"):
        fastrlhf.clipped_value_loss(v, old, ret.long(), m)
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        fastrlhf.clipped_value_loss([1.0], old, ret, m)
    assert math.isfinite(float(fastrlhf.clipped_value_loss(v, old, ret, m.float())[0].detach()))  # float masks too
