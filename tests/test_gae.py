"""GAE and the group advantages on every backend vs the fp64 reference."""

import pytest
import torch
from conftest import backends

import fastrlhf
from fastrlhf import reference as R


@pytest.mark.parametrize("backend", backends())
def test_gae_matches_reference(backend):
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(4, 33, generator=g), torch.randn(4, 34, generator=g)[:, 1:]
    m = torch.rand(4, 33, generator=g) > 0.3
    m[3] = False
    adv, ret = fastrlhf.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    adv64, ret64 = R.gae(r.double(), v.double(), m, gamma=0.99, lam=0.95)
    assert adv.shape == (4, 33) and adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), adv64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, atol=1e-5, rtol=1e-5)
    assert (adv[~m] == 0).all() and (adv[3] == 0).all()


def test_group_advantages_and_kl_estimate_api():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]])
    a = fastrlhf.group_advantages(r, 4)
    assert a.shape == r.shape and (a[1] == 0).all()
    torch.testing.assert_close(a.reshape(-1), fastrlhf.group_advantages(r.reshape(-1), 4))
    with pytest.raises(ValueError, match="group_size"):
        fastrlhf.group_advantages(r, 3)
    lp, ref = torch.randn(10), torch.randn(10)
    assert (fastrlhf.kl_estimate(lp, ref) >= 0).all()
    with pytest.raises(ValueError, match="estimator"):
        fastrlhf.kl_estimate(lp, ref, "k4")
