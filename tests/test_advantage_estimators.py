"""``fastrlhf.masked_whiten`` and ``fastrlhf.estimate_advantages`` (the one estimator dispatch of GRPO and PPO).

Hand-derived values in the comments first, then the dispatch against the individual ops
and against ``fastrlhf.reference`` on random inputs, then the input checks.
"""

import math

import pytest
import torch

import fastrlhf
from fastrlhf import reference as R

# ----------------------------------------------------------------------------------------
# masked_whiten
# ----------------------------------------------------------------------------------------


def test_whiten_hand_values():
    # counted x = 1, 2, 3: mean 2, unbiased var ((-1)^2 + 0 + 1^2) / (3 - 1) = 1 -> (x - 2) / 1;
    # the uncounted 100 gets 0 and does not move the mean.
    x = torch.tensor([1.0, 2.0, 3.0, 100.0], dtype=torch.float64)
    m = torch.tensor([1, 1, 1, 0])
    s = 1 / math.sqrt(1 + 1e-8)  # rsqrt(var + eps)
    torch.testing.assert_close(fastrlhf.masked_whiten(x, m), torch.tensor([-s, 0, s, 0], dtype=torch.float64))
    # shift_mean=False adds the mean back (verl): (x - 2) * s + 2
    torch.testing.assert_close(fastrlhf.masked_whiten(x, m, shift_mean=False),
                               torch.tensor([2 - s, 2.0, 2 + s, 0.0], dtype=torch.float64))


def test_whiten_is_over_the_whole_tensor_not_per_row():
    # [B, T] = [[0, 4], [8, pad]]: one mean 4 and var (16 + 0 + 16) / 2 = 16 over all three -> (x - 4) / 4
    x = torch.tensor([[0.0, 4.0], [8.0, -7.0]], dtype=torch.float64)
    m = torch.tensor([[True, True], [True, False]])
    out = fastrlhf.masked_whiten(x, m, eps=1e-30)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))


def test_whiten_degenerate_counts():
    x = torch.tensor([5.0, 7.0])
    # one counted entry: var 0 (divisor clamped to 1), the entry becomes 0 (or its mean, 5)
    assert fastrlhf.masked_whiten(x, torch.tensor([1, 0])).tolist() == [0.0, 0.0]
    assert fastrlhf.masked_whiten(x, torch.tensor([1, 0]), shift_mean=False).tolist() == [5.0, 0.0]
    # none counted: zeros; a constant: zeros (eps keeps 0 / 0 away)
    assert fastrlhf.masked_whiten(x, torch.tensor([0, 0])).tolist() == [0.0, 0.0]
    assert fastrlhf.masked_whiten(torch.full((4,), 3.0), torch.ones(4)).tolist() == [0.0] * 4


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_reference(shift_mean):
    g = torch.Generator().manual_seed(0)
    x = 3 + 2 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    m = torch.rand(6, 9, generator=g) > 0.4
    out = fastrlhf.masked_whiten(x, m, shift_mean=shift_mean)
    torch.testing.assert_close(out, R.masked_whiten(x, m, shift_mean=shift_mean), atol=1e-12, rtol=1e-12)
    assert out.dtype == x.dtype and out.shape == x.shape
    if shift_mean:  # zero mean, unit (unbiased) variance over the counted entries
        assert float(out[m].mean()) == pytest.approx(0.0, abs=1e-12)
        assert float(out[m].var(correction=1)) == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_whiten_bad_eps_is_named(eps):
    with pytest.raises(ValueError, match="eps"):
        fastrlhf.masked_whiten(torch.ones(3), torch.ones(3), eps=eps)


def test_whiten_input_errors():
    with pytest.raises(ValueError, match="mask must be a tensor of the shape of x"):
        fastrlhf.masked_whiten(torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fastrlhf.masked_whiten(torch.ones(3, dtype=torch.long), torch.ones(3))


# ----------------------------------------------------------------------------------------
# estimate_advantages: hand values
# ----------------------------------------------------------------------------------------

# Four sequences in two groups of G = 2; scores r = [1, 0 | 3, 1]; lengths 2, 1, 2, 2 (T = 2).
SCORES = torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=torch.float64)
MASK = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)


def per_token(seq_values):
    """``[B]`` -> ``[B, T]`` on the counted tokens of MASK, 0 elsewhere."""
    v = torch.as_tensor(seq_values, dtype=torch.float64)[:, None].expand(MASK.shape)
    return torch.where(MASK, v, torch.zeros_like(v))


def run(estimator, **kw):
    return fastrlhf.estimate_advantages(estimator, SCORES, MASK, group_size=2, **kw)


def test_grpo_hand_values():
    # group (1, 0): mean 0.5, unbiased std sqrt(0.5^2 + 0.5^2) = 0.70711 -> +-0.5 / (0.70711 + 1e-6);
    # group (3, 1): mean 2, std sqrt(2) -> +-1 / (1.41421 + 1e-6): +-0.70711 on every counted token.
    a, b = 0.5 / (math.sqrt(0.5) + 1e-6), 1 / (math.sqrt(2) + 1e-6)
    adv, ret = run("grpo")
    torch.testing.assert_close(adv, per_token([a, -a, b, -b]))
    torch.testing.assert_close(ret, per_token([1.0, 0.0, 3.0, 1.0]))  # gamma = 1: the score on every token
    # scale_rewards="none" (Dr. GRPO) only centres: +-0.5, +-1
    torch.testing.assert_close(run("grpo", scale_rewards="none")[0], per_token([0.5, -0.5, 1.0, -1.0]))


def test_rloo_hand_values():
    # A_i = r_i - (the other sample of its group): 1 - 0, 0 - 1, 3 - 1, 1 - 3; advantages = returns
    adv, ret = run("rloo")
    torch.testing.assert_close(adv, per_token([1.0, -1.0, 2.0, -2.0]))
    torch.testing.assert_close(ret, adv)


def test_reinforce_hand_values():
    # baseline = batch mean of the episode returns = (1 + 0 + 3 + 1) / 4 = 1.25
    adv, ret = run("reinforce")
    torch.testing.assert_close(adv, per_token([-0.25, -1.25, 1.75, -0.25]))
    torch.testing.assert_close(ret, per_token([1.0, 0.0, 3.0, 1.0]))


def test_reinforce_plus_plus_hand_values():
    # counted returns 1, 1 | 0 | 3, 3 | 1, 1: n = 7, mean 10/7, biased var 22/7 - (10/7)^2 = 54/49
    # -> A = (G - 10/7) / (sqrt(54) / 7) = (7 G - 10) / sqrt(54)
    f = lambda g: (7 * g - 10) / math.sqrt(54)  # noqa: E731
    adv, _ = run("reinforce++")
    torch.testing.assert_close(adv, torch.tensor([[f(1), f(1)], [f(0), 0], [f(3), f(3)], [f(1), f(1)]],
                                                 dtype=torch.float64))


def test_reinforce_plus_plus_baseline_hand_values():
    # group means subtracted first: 0.5, -0.5 | 1, -1; counted returns .5, .5 | -.5 | 1, 1 | -1, -1:
    # mean 0.5 / 7 = 1/14, biased var 4.75/7 - (1/14)^2 = 33/49 -> A = (14 G - 1) / (2 sqrt(33))
    f = lambda g: (14 * g - 1) / (2 * math.sqrt(33))  # noqa: E731
    adv, ret = run("reinforce++-baseline")
    torch.testing.assert_close(adv, torch.tensor([[f(.5), f(.5)], [f(-.5), 0], [f(1), f(1)], [f(-1), f(-1)]],
                                                 dtype=torch.float64))
    torch.testing.assert_close(ret, per_token([0.5, -0.5, 1.0, -1.0]))


def test_gae_hand_values_with_the_kl_penalty():
    # gamma = 1, lam = 0.5; the score sits on the last counted token.
    # row 0: r = [0, 1], V = [0.5, 0.25]: delta_1 = 1 - 0.25 = 0.75 = A_1;
    #        delta_0 = 0 + 0.25 - 0.5 = -0.25, A_0 = -0.25 + 0.5 * 0.75 = 0.125; returns A + V = [0.625, 1]
    # row 1: one token, r = 0, V = 0: A = 0
    # row 2: r = [0, 3], V = [1, 2]: A_1 = 1; A_0 = (0 + 2 - 1) + 0.5 * 1 = 1.5; returns [2.5, 3]
    # row 3: r = [0, 1], V = 0: A_1 = 1, A_0 = 0.5; returns [0.5, 1]
    values = torch.tensor([[0.5, 0.25], [0.0, 9.0], [1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    adv, ret = run("gae", values=values, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.75], [0, 0], [1.5, 1], [0.5, 1]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 1], [0, 0], [2.5, 3], [0.5, 1]], dtype=torch.float64))
    # kl_coef 0.1, k1 = logp - ref = 0.5 on row 0's first token: its reward -0.05 -> delta_0 = -0.3,
    # A_0 = -0.3 + 0.375 = 0.075; nothing else changes
    logp = torch.zeros(4, 2, dtype=torch.float64)
    ref = logp.clone()
    ref[0, 0] = -0.5
    adv_kl, _ = run("gae", values=values, lam=0.5, logprobs=logp, ref_logprobs=ref, kl_coef=0.1)
    expected = adv.clone()
    expected[0, 0] = 0.075
    torch.testing.assert_close(adv_kl, expected)


# ----------------------------------------------------------------------------------------
# estimate_advantages: the dispatch is the individual ops; oracle on random inputs
# ----------------------------------------------------------------------------------------


def random_rollout(B=6, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64)
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return scores, mask, logp, ref, values


def test_dispatch_is_the_individual_ops():
    scores, mask, logp, ref, values = random_rollout()
    kl = dict(logprobs=logp, ref_logprobs=ref, kl_coef=0.05, kl_estimator="k1")
    cases = {
        "rloo": fastrlhf.reinforce_advantages(fastrlhf.rloo_advantages(scores, 3), mask, gamma=0.9, **kl),
        "reinforce": fastrlhf.reinforce_advantages(scores, mask, gamma=0.9, baseline="mean", **kl),
        "reinforce++": fastrlhf.reinforce_plus_plus_advantages(scores, mask, gamma=0.9, **kl),
        "reinforce++-baseline": fastrlhf.reinforce_plus_plus_advantages(scores, mask, gamma=0.9, group_size=3, **kl),
    }
    for name, (adv, ret) in cases.items():
        got = fastrlhf.estimate_advantages(name, scores, mask, group_size=3, gamma=0.9, **kl)
        torch.testing.assert_close(got[0], adv, msg=name)
        torch.testing.assert_close(got[1], ret, msg=name)
    grpo = fastrlhf.group_advantages(scores, 3)
    adv, _ = fastrlhf.estimate_advantages("grpo", scores, mask, group_size=3)
    torch.testing.assert_close(adv[mask], grpo[:, None].expand_as(adv)[mask])
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))


@pytest.mark.parametrize("estimator, kl_coef", [("grpo", 0.0)] + [  # grpo takes no KL (test_input_errors)
    (e, k) for e in ("rloo", "reinforce", "reinforce++", "reinforce++-baseline", "gae") for k in (0.0, 0.1)])
def test_dispatch_matches_reference(estimator, kl_coef):
    scores, mask, logp, ref, values = random_rollout(seed=1)
    kw = dict(group_size=3, gamma=0.95, lam=0.9, logprobs=logp, ref_logprobs=ref, kl_coef=kl_coef,
              values=values if estimator == "gae" else None)
    adv, ret = fastrlhf.estimate_advantages(estimator, scores, mask, **kw)
    ref_adv, ref_ret = R.estimate_advantages(estimator, scores, mask, **kw)
    assert adv.shape == ret.shape == mask.shape
    torch.testing.assert_close(adv, ref_adv, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ret, ref_ret, atol=1e-10, rtol=1e-10)


def test_per_token_rewards_are_accepted():
    scores, mask, logp, ref, values = random_rollout(seed=2)
    tok = torch.where(mask, torch.randn(mask.shape, dtype=torch.float64), torch.zeros(mask.shape, dtype=torch.float64))
    for est, kw in (("reinforce++", {}), ("gae", dict(values=values))):
        adv, _ = fastrlhf.estimate_advantages(est, tok, mask, **kw)
        torch.testing.assert_close(adv, R.estimate_advantages(est, tok, mask, **kw)[0], atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gamma", "lam", "kl_coef"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_bad_hyper_parameters_are_named(name, bad):
    with pytest.raises(ValueError, match=name):
        fastrlhf.estimate_advantages("reinforce", SCORES, MASK, **{name: bad})


def test_input_errors():
    with pytest.raises(ValueError, match="estimator must be one of"):
        fastrlhf.estimate_advantages("ppo", SCORES, MASK)
    for est in ("grpo", "rloo", "reinforce++-baseline"):
        with pytest.raises(ValueError, match="needs group_size"):
            fastrlhf.estimate_advantages(est, SCORES, MASK)
    with pytest.raises(ValueError, match="values"):
        fastrlhf.estimate_advantages("gae", SCORES, MASK)
    with pytest.raises(ValueError, match="values"):
        fastrlhf.estimate_advantages("reinforce", SCORES, MASK, values=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="values must be"):
        fastrlhf.estimate_advantages("gae", SCORES, MASK, values=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="kl_coef must be 0"):
        fastrlhf.estimate_advantages("grpo", SCORES, MASK, group_size=2, logprobs=torch.zeros(4, 2),
                                     ref_logprobs=torch.zeros(4, 2), kl_coef=0.1)
    with pytest.raises(ValueError, match="outcome rewards"):
        fastrlhf.estimate_advantages("grpo", torch.zeros(4, 2), MASK, group_size=2)
    with pytest.raises(ValueError, match="logprobs is required"):
        fastrlhf.estimate_advantages("reinforce", SCORES, MASK, kl_coef=0.1)
