"""Layer 1: the reference (oracle) itself, against hand-derived values and invariants."""

import math

import pytest
import torch

from fastrlhf import reference as R


def test_uniform_logits_give_log_v():
    V = 10
    x = torch.zeros(3, V, dtype=torch.float64)
    lab = torch.tensor([0, 4, 9])
    lp, ent = R.token_logprobs_and_entropy(x, lab)
    torch.testing.assert_close(lp, torch.full((3,), -math.log(V), dtype=torch.float64))
    torch.testing.assert_close(ent, torch.full((3,), math.log(V), dtype=torch.float64))
    torch.testing.assert_close(R.entropy(x), torch.full((3,), math.log(V), dtype=torch.float64))


def test_hand_values_two_classes():
    # logits (0, log 3): p = (1/4, 3/4); H = -(1/4 log 1/4 + 3/4 log 3/4)
    x = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    lp = R.token_logprobs(x, torch.tensor([1]))
    assert lp.item() == pytest.approx(math.log(0.75))
    h = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    assert R.entropy(x).item() == pytest.approx(h)
    # temperature 2: logits (0, log 3 / 2): p1 = sqrt3 / (1 + sqrt3)
    lp_t = R.token_logprobs(x, torch.tensor([1]), temperature=2.0)
    assert lp_t.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))))


def test_logprob_invariants():
    torch.manual_seed(0)
    V = 17
    x = torch.randn(5, V, dtype=torch.float64) * 4
    all_lp = torch.stack([R.token_logprobs(x, torch.full((5,), v)) for v in range(V)], -1)
    assert (all_lp <= 0).all()
    torch.testing.assert_close(all_lp.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    ent = R.entropy(x)
    assert (ent >= 0).all() and (ent <= math.log(V) + 1e-12).all()


def test_ignore_index_gives_zero_and_zero_grad():
    x = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([[1, -100, 3], [-100, 0, 10]])
    lp, ent = R.token_logprobs_and_entropy(x, lab)
    assert lp[0, 1] == 0 and ent[1, 0] == 0
    (lp.sum() + ent.sum()).backward()
    assert (x.grad[0, 1] == 0).all() and (x.grad[1, 0] == 0).all()


def test_neg_inf_logits_no_nan():
    x = torch.tensor([[0.0, float("-inf"), 0.0]], dtype=torch.float64)
    lp, ent = R.token_logprobs_and_entropy(x, torch.tensor([0]))
    assert lp.item() == pytest.approx(math.log(0.5)) and ent.item() == pytest.approx(math.log(2))


def test_kl_estimators_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.0, -1.5, -1.0], dtype=torch.float64)
    r = ref - logp  # (0, 0.5, -0.5)
    torch.testing.assert_close(R.kl_estimate(logp, ref, "k1"), -r)
    torch.testing.assert_close(R.kl_estimate(logp, ref, "k2"), r**2 / 2)
    k3 = R.kl_estimate(logp, ref, "k3")
    torch.testing.assert_close(k3, r.exp() - r - 1)
    assert k3[0] == 0 and (k3 >= 0).all()
    big = R.kl_estimate(torch.tensor([0.0]), torch.tensor([100.0]), "k3", clamp=(-10.0, 10.0))
    assert big.item() == 10.0


def test_k3_nonnegative_random():
    torch.manual_seed(1)
    a, b = torch.randn(1000, dtype=torch.float64) * 5, torch.randn(1000, dtype=torch.float64) * 5
    assert (R.kl_estimate(a, b, "k3") >= 0).all()


def _ppo(logp, old, adv, **kw):
    m = torch.ones_like(logp)
    return R.ppo_clip_loss_from_logprobs(logp, m, old, adv, **kw)


def test_ppo_unclipped_inside_range():
    # ratio e^{0.1} = 1.105 is inside [0.8, 1.2]: loss = -A * ratio exactly.
    logp = torch.tensor([[0.1, -0.1]], dtype=torch.float64)
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    loss, stats = _ppo(logp, old, adv)
    want = (-1.0 * math.exp(0.1) + 2.0 * math.exp(-0.1)) / 2
    assert loss.item() == pytest.approx(want)
    assert stats["clipfrac"].item() == 0.0


def test_ppo_clips_only_on_advantage_side():
    old = torch.zeros(1, 1, dtype=torch.float64)
    hi = torch.tensor([[math.log(1.5)]], dtype=torch.float64)  # ratio 1.5 > 1 + 0.2
    # A > 0, ratio too high: clipped at 1.2, zero gradient.
    lp = hi.clone().requires_grad_()
    loss, st = _ppo(lp, old, torch.ones(1, 1, dtype=torch.float64))
    loss.backward()
    assert loss.item() == pytest.approx(-1.2) and lp.grad.item() == 0 and st["clipfrac"].item() == 1.0
    # A < 0, ratio too high: not clipped (pessimistic bound), loss = 1.5, gradient -A * ratio = 1.5.
    lp = hi.clone().requires_grad_()
    loss, st = _ppo(lp, old, -torch.ones(1, 1, dtype=torch.float64))
    loss.backward()
    assert loss.item() == pytest.approx(1.5) and lp.grad.item() == pytest.approx(1.5)
    assert st["clipfrac"].item() == 0.0


def test_dual_clip_only_for_negative_advantages():
    old = torch.zeros(1, 1, dtype=torch.float64)
    lp = torch.tensor([[math.log(5.0)]], dtype=torch.float64)  # ratio 5
    neg, _ = _ppo(lp, old, -torch.ones(1, 1, dtype=torch.float64), dual_clip=3.0)
    assert neg.item() == pytest.approx(3.0)  # min(5, 3)
    pos, _ = _ppo(lp, old, torch.ones(1, 1, dtype=torch.float64), dual_clip=3.0)
    pos_nodual, _ = _ppo(lp, old, torch.ones(1, 1, dtype=torch.float64))
    assert pos.item() == pos_nodual.item() == pytest.approx(-1.2)


def test_clip_higher():
    old = torch.zeros(1, 1, dtype=torch.float64)
    lp = torch.tensor([[math.log(1.25)]], dtype=torch.float64)
    a = torch.ones(1, 1, dtype=torch.float64)
    assert _ppo(lp, old, a)[0].item() == pytest.approx(-1.2)
    assert _ppo(lp, old, a, clip_high=0.28)[0].item() == pytest.approx(-1.25)


def test_loss_agg_modes_hand_values():
    # two sequences: (1, 2, pad) and (3, pad, pad)
    pt = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    agg = lambda mode: (pt * R.loss_agg_weights(m, mode)).sum().item()  # noqa: E731
    assert agg("token-mean") == pytest.approx(6 / 3)
    assert agg("seq-mean-token-mean") == pytest.approx((1.5 + 3) / 2)
    assert agg("seq-mean-token-sum") == pytest.approx((3 + 3) / 2)
    assert agg("seq-mean-token-sum-norm") == pytest.approx(6 / 6)
    z = torch.zeros_like(m)
    for mode in R.LOSS_AGG_MODES:
        assert (pt * R.loss_agg_weights(z, mode)).sum().item() == 0.0


def test_dpo_log2_at_zero_margin_and_types():
    z = torch.zeros(4, dtype=torch.float64)
    loss, st = R.dpo_loss_from_logprobs(z, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert st["reward_margin"].item() == 0
    hinge, _ = R.dpo_loss_from_logprobs(z, z, z, z, loss_type="hinge")
    assert hinge.item() == pytest.approx(1.0)
    ipo, _ = R.dpo_loss_from_logprobs(z, z, z, z, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx(1.0)  # (0 - 1 / (2 * 0.5))^2
    rob, _ = R.dpo_loss_from_logprobs(z, z, z, z, loss_type="robust", label_smoothing=0.1)
    assert rob.item() == pytest.approx(math.log(2) * (0.9 - 0.1) / 0.8)
    c = torch.tensor([1.0], dtype=torch.float64)
    r0 = torch.tensor([0.0], dtype=torch.float64)
    loss, st = R.dpo_loss_from_logprobs(c, r0, r0, r0, beta=1.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))
    assert st["reward_accuracy"].item() == 1.0 and st["chosen_rewards"].item() == 1.0


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    r = torch.randn(3, 6, dtype=torch.float64)
    v = torch.randn(3, 6, dtype=torch.float64)
    m = torch.ones(3, 6)
    adv, ret = R.gae(r, v, m, gamma=1.0, lam=1.0)
    rtg = r.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv, rtg - v)
    torch.testing.assert_close(ret, rtg)


def test_gae_skips_uncounted_tokens():
    # tokens 0, 2 counted; token 1 (e.g. a tool response) skipped by the recursion.
    r = torch.tensor([[1.0, 100.0, 2.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 100.0, 0.25, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1, 0, 1, 0]])
    adv, ret = R.gae(r, v, m, gamma=0.9, lam=0.8)
    a2 = 2.0 - 0.25
    a0 = (1.0 + 0.9 * 0.25 - 0.5) + 0.9 * 0.8 * a2
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 0.25, 0.0]], dtype=torch.float64))


def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    a = R.group_advantages(r, 4, eps=0.0 + 1e-12)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 1, 0)
    torch.testing.assert_close(a[:4], torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=torch.float64) / std)
    assert (a[4:] == 0).all()
    torch.testing.assert_close(R.group_advantages(r, 4, scale="none")[:4],
                               torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=torch.float64))


def test_group_advantages_tiny_std_weak_spot():
    # Known weak spot of std normalisation: 1.001 vs 1.000 becomes +-0.87 after division.
    r = torch.tensor([1.001, 1.0, 1.001, 1.0], dtype=torch.float64)
    a = R.group_advantages(r, 4)
    assert a.abs().max().item() > 0.8
    assert R.group_advantages(r, 4, scale="none").abs().max().item() < 1e-3
