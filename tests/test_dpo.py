"""DPO and its variants on every backend vs the fp64 reference."""

import math

import pytest
import torch
from conftest import backends, device_for

import fastrlhf
from fastrlhf import reference as R

B, T, V = 3, 6, 257


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0),
                                           ("robust", 0.1)])
def test_dpo_loss_matches_fp64(backend, loss_type, eps):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 7, 129, generator=g) * 2).to(dev).requires_grad_()
    labels = torch.randint(0, 129, (4, 7), generator=g).to(dev)
    labels[:, :2] = -100  # prompt tokens
    labels[1, 5:] = -100  # padding
    ref_c, ref_r = (-torch.rand(2, generator=g) * 30).to(dev), (-torch.rand(2, generator=g) * 30).to(dev)
    loss, stats = fastrlhf.dpo_loss(x, labels, ref_c, ref_r, beta=0.2, loss_type=loss_type, label_smoothing=eps,
                                    temperature=0.8, backend=backend)
    x64 = x.detach().double().requires_grad_()
    loss64, stats64 = R.dpo_loss(x64, labels, ref_c.double(), ref_r.double(), beta=0.2, loss_type=loss_type,
                                 label_smoothing=eps, temperature=0.8)
    assert abs(loss.item() - loss64.item()) <= 1e-5
    (grad,) = torch.autograd.grad(loss, x)
    (grad64,) = torch.autograd.grad(loss64, x64)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-4)
    assert (grad[labels == -100] == 0).all()
    for k, v in stats64.items():
        assert abs(stats[k].item() - v.item()) <= 1e-5, k


def test_dpo_reference_free_and_log2():
    x = torch.zeros(2, 3, 11)  # uniform policy: chosen and rejected equally likely
    labels = torch.randint(0, 11, (2, 3))
    z = torch.zeros(1)
    loss, stats = fastrlhf.dpo_loss(x, labels, z, z)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)



def test_dpo_argument_errors():
    x = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    with pytest.raises(ValueError, match="2B"):
        fastrlhf.dpo_loss(x[:1], labels[:1], torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        fastrlhf.dpo_loss(x[:2], labels[:2], torch.zeros(2), torch.zeros(1))
