"""The rest of the RLHF pipeline: critic-free advantages, the reward-model and RRHF
losses, and the RewardModel / RRHF / RFT trainers, the estimator options of GRPO / PPO, the CLI.

Two layers, as elsewhere: hand-derived values (in the comments) on the ops and on
``fastrlhf.reference``, then ops vs reference on random inputs (every backend for RRHF); then
the trainers on a tiny model (CPU, seeded; learning tests assert trends, never times).
"""

import copy
import importlib.util
import json
import math

import pytest
import torch
from conftest import HAS_CUDA, backends, device_for
from test_algos import assert_rewarded_rises, candidate_rollout, reward_gain_over_seeds, train_on_fixed_rollout

import fastrlhf
from fastrlhf import reference as R
from fastrlhf.algos import (
    GRPO,
    PPO,
    RFT,
    RRHF,
    ArithmeticTask,
    GRPOConfig,
    PPOConfig,
    RewardModel,
    RewardModelConfig,
    RFTConfig,
    RRHFConfig,
    build_char_tokenizer,
    reward_model_fn,
    reward_model_from_causal_lm,
    supervised_finetune,
    tiny_causal_lm,
)
from fastrlhf.algos.reward import last_token_index, ordered_pairs, ranking_of
from fastrlhf.cli import task_ranking_rows

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------
# RLOO
# ----------------------------------------------------------------------------------------


def test_rloo_group_of_four_hand_values():
    r = torch.tensor([4.0, 2.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    # group 1, sum 8: A_i = r_i - (8 - r_i) / 3
    #   4 - 4/3 = 8/3;  2 - 6/3 = 0;  0 - 8/3 = -8/3;  2 - 6/3 = 0
    # group 2: all equal -> every baseline equals the reward -> 0
    expected = torch.tensor([8 / 3, 0.0, -8 / 3, 0.0, 0.0, 0.0, 0.0, 0.0])
    for fn in (fastrlhf.rloo_advantages, R.rloo_advantages):
        torch.testing.assert_close(fn(r, 4), expected)
    out2d = fastrlhf.rloo_advantages(r.view(2, 4), 4)
    assert out2d.shape == (2, 4)
    torch.testing.assert_close(out2d.flatten(), expected)
    # the identity A = G / (G - 1) * (r - mean), i.e. centred rewards scaled up, never divided by a std
    torch.testing.assert_close(fastrlhf.rloo_advantages(r, 4), 4 / 3 * fastrlhf.group_advantages(r, 4, scale="none"))


def test_rloo_random_matches_reference():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6 * 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fastrlhf.rloo_advantages(r, 5), R.rloo_advantages(r, 5))
    assert fastrlhf.rloo_advantages(r, 5).dtype == torch.float64


# ----------------------------------------------------------------------------------------
# REINFORCE and REINFORCE++
# ----------------------------------------------------------------------------------------


def test_reinforce_returns_and_batch_mean_baseline_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [9.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    # gamma = 0.5. Row 0: G_2 = 2, G_1 = 0 + 0.5 * 2 = 1, G_0 = 1 + 0.5 * 1 = 1.5.
    # Row 1: token 0 is not counted (reward 9 ignored, return 0): G_2 = 0, G_1 = 1.
    # Baseline: mean of the episode returns G at the first counted token = (1.5 + 1) / 2 = 1.25.
    exp_returns = torch.tensor([[1.5, 1.0, 2.0], [0.0, 1.0, 0.0]])
    exp_adv = torch.tensor([[0.25, -0.25, 0.75], [0.0, -0.25, -1.25]])
    for fn in (fastrlhf.reinforce_advantages, R.reinforce_advantages):
        adv, ret = fn(rewards, mask, gamma=0.5, baseline="mean")
        torch.testing.assert_close(ret, exp_returns)
        torch.testing.assert_close(adv, exp_adv)
        adv0, ret0 = fn(rewards, mask, gamma=0.5)  # no baseline: the returns themselves
        torch.testing.assert_close(adv0, exp_returns)
    # a hole in the mask is skipped by the recursion (verl's multi-turn convention, as fastrlhf.gae):
    # G_0 = r_0 + gamma * r_2 = 1 + 0.5 * 2 = 2
    adv, ret = fastrlhf.reinforce_advantages(torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[1, 0, 1]]), gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[2.0, 0.0, 2.0]]))


def test_reinforce_plus_plus_whitening_hand_values():
    scores = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    # Outcome scores on the last counted token, gamma = 1: returns [[1, 1], [0, -]].
    # Counted returns {1, 1, 0}: mean 2/3, biased variance ((1/3)^2 * 2 + (2/3)^2) / 3 = 2/9,
    # std sqrt(2)/3, so A = (1 - 2/3) / (sqrt(2)/3) = 1/sqrt(2) and (0 - 2/3) / (sqrt(2)/3) = -sqrt(2).
    s2 = math.sqrt(2.0)
    expected = torch.tensor([[1 / s2, 1 / s2], [-s2, 0.0]])
    for fn in (fastrlhf.reinforce_plus_plus_advantages, R.reinforce_plus_plus_advantages):
        adv, ret = fn(scores, mask)
        torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        torch.testing.assert_close(adv, expected)
    m = mask.bool()
    assert abs(float(adv[m].mean())) < 1e-6 and float(adv[m].var(correction=0)) == pytest.approx(1.0, abs=1e-5)

    # With the k1 KL penalty in the reward: kl_coef 0.1, logp - ref_logp = [[0.5, 1.0], [2.0, -]]
    # token rewards [[-0.05, 1 - 0.1], [0 - 0.2]] -> returns [[0.85, 0.90], [-0.20]];
    # mean 1.55 / 3 = 0.516667, deviations (0.333333, 0.383333, -0.716667),
    # biased var (0.111111 + 0.146944 + 0.513611) / 3 = 0.257222, std 0.507171
    # -> A = (0.65724, 0.75583, -1.41307)
    logp = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    kl = dict(logprobs=logp, ref_logprobs=torch.zeros(2, 2), kl_coef=0.1, kl_estimator="k1")
    for fn in (fastrlhf.reinforce_plus_plus_advantages, R.reinforce_plus_plus_advantages):
        adv, ret = fn(scores, mask, **kl)
        torch.testing.assert_close(ret, torch.tensor([[0.85, 0.90], [-0.20, 0.0]]))
        torch.testing.assert_close(adv, torch.tensor([[0.65724, 0.75583], [-1.41307, 0.0]]), atol=1e-4, rtol=0)


def test_reinforce_plus_plus_baseline_centres_each_group():
    # group_size=2: scores [1, 0 | 3, 3] -> centred [0.5, -0.5 | 0, 0] before the whitening;
    # one token each: mean 0, biased variance (0.25 + 0.25) / 4 = 1/8, so A = +-0.5 * sqrt(8) = +-sqrt(2)
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0])
    mask = torch.ones(4, 1)
    for fn in (fastrlhf.reinforce_plus_plus_advantages, R.reinforce_plus_plus_advantages):
        adv, ret = fn(scores, mask, group_size=2)
        torch.testing.assert_close(ret.flatten(), torch.tensor([0.5, -0.5, 0.0, 0.0]))
        torch.testing.assert_close(adv.flatten(), torch.tensor([math.sqrt(2), -math.sqrt(2), 0.0, 0.0]))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("outcome", [True, False])
def test_reinforce_family_random_matches_reference(estimator, outcome):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 7
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # a row with nothing counted
    rewards = torch.randn(B, generator=g) if outcome else torch.randn(B, T, generator=g)
    kl = dict(logprobs=-torch.rand(B, T, generator=g), ref_logprobs=-torch.rand(B, T, generator=g), kl_coef=0.2,
              kl_estimator=estimator)
    for baseline in ("none", "mean"):
        ours = fastrlhf.reinforce_advantages(rewards, mask, gamma=0.9, baseline=baseline, **kl)
        ref = R.reinforce_advantages(rewards, mask, gamma=0.9, baseline=baseline, **kl)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ours = fastrlhf.reinforce_plus_plus_advantages(rewards, mask, gamma=0.9, **kl)
    ref = R.reinforce_plus_plus_advantages(rewards, mask, gamma=0.9, **kl)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (ours[0][~mask] == 0).all() and (ours[1][~mask] == 0).all()


def test_std_normalisation_weak_spot():
    """Rewards 1.001 vs 1.000: GRPO's std division turns a 0.001 difference into +-0.71."""
    r = torch.tensor([1.001, 1.000], dtype=torch.float64)
    # std (unbiased) of two values d apart = d / sqrt(2) = 7.07e-4; (r - mean) = +-5e-4;
    # 5e-4 / (7.07e-4 + 1e-6) = 0.7061: as large as a real success-vs-failure signal.
    blown = fastrlhf.group_advantages(r, 2)
    torch.testing.assert_close(blown, torch.tensor([0.7061, -0.7061], dtype=torch.float64), atol=2e-4, rtol=0)
    # scale="none" (Dr. GRPO) keeps the raw scale: +-5e-4
    torch.testing.assert_close(fastrlhf.group_advantages(r, 2, scale="none"),
                               torch.tensor([5e-4, -5e-4], dtype=torch.float64))
    # a larger eps bounds the amplification: 5e-4 / (7.07e-4 + 0.1) = 4.96e-3
    torch.testing.assert_close(fastrlhf.group_advantages(r, 2, eps=0.1),
                               torch.tensor([4.965e-3, -4.965e-3], dtype=torch.float64), atol=1e-5, rtol=0)
    # RLOO never divides: r_i - r_j = +-1e-3
    torch.testing.assert_close(fastrlhf.rloo_advantages(r, 2), torch.tensor([1e-3, -1e-3], dtype=torch.float64))
    # REINFORCE++'s whitening is global: with a real 1-vs-0 group in the batch the near-tie stays
    # near-tied (returns 1.001, 1.0, 1, 0: mean 0.75025, std 0.43316 -> the tie differs by 2.3e-3) ...
    rr = torch.tensor([1.001, 1.000, 1.0, 0.0], dtype=torch.float64)
    adv, _ = fastrlhf.reinforce_plus_plus_advantages(rr, torch.ones(4, 1))
    assert float(adv[0, 0] - adv[1, 0]) == pytest.approx(1e-3 / 0.43316, rel=1e-3)
    # ... but a batch of nothing else is blown up to +-1 as well (eps floors only var < 1e-8).
    adv, _ = fastrlhf.reinforce_plus_plus_advantages(r, torch.ones(2, 1))
    torch.testing.assert_close(adv.flatten(), torch.tensor([1.0, -1.0], dtype=torch.float64), atol=1e-6, rtol=0)


def test_advantage_input_errors():
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="group_size"):
        fastrlhf.rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="rewards must be"):
        fastrlhf.rloo_advantages(torch.zeros(5), 2)
    with pytest.raises(TypeError, match="rewards"):
        fastrlhf.rloo_advantages(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="rewards must be"):
        fastrlhf.reinforce_advantages(torch.zeros(3), m)
    with pytest.raises(ValueError, match="mask"):
        fastrlhf.reinforce_advantages(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="logprobs is required"):
        fastrlhf.reinforce_plus_plus_advantages(torch.zeros(2), m, kl_coef=0.1)
    with pytest.raises(ValueError, match="eps"):
        fastrlhf.reinforce_plus_plus_advantages(torch.zeros(2), m, eps=0.0)
    with pytest.raises(ValueError, match="baseline"):
        fastrlhf.reinforce_advantages(torch.zeros(2), m, baseline="group")
    with pytest.raises(ValueError, match="gamma"):
        fastrlhf.reinforce_advantages(torch.zeros(2), m, gamma=1.5)
    with pytest.raises(ValueError, match="group_size"):
        fastrlhf.reinforce_plus_plus_advantages(torch.zeros(2, 3), m, group_size=2)


# ----------------------------------------------------------------------------------------
# Bradley-Terry reward-model loss
# ----------------------------------------------------------------------------------------


def test_pairwise_reward_loss_hand_values():
    # equal rewards: -logsigmoid(0) = log 2, accuracy 0 (ties are not right)
    loss, stats = fastrlhf.pairwise_reward_loss(torch.tensor([0.5]), torch.tensor([0.5]))
    assert float(loss) == pytest.approx(LOG2, abs=1e-6) and float(stats["accuracy"]) == 0.0
    # a margin equal to the gap: -logsigmoid(2 - 2) = log 2
    loss, _ = fastrlhf.pairwise_reward_loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=2.0)
    assert float(loss) == pytest.approx(LOG2, abs=1e-6)
    # centering: r_c = r_r = 1 -> log 2 + 0.01 * (1 + 1)^2 = 0.693147 + 0.04
    loss, _ = fastrlhf.pairwise_reward_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coef=0.01)
    assert float(loss) == pytest.approx(LOG2 + 0.04, abs=1e-6)
    # weights [1, 3]: pair 1 gap +inf-ish (loss 0, right), pair 2 gap 0 (loss log 2, wrong)
    # -> loss (0 + 3 log 2) / 4, accuracy 1/4
    loss, stats = fastrlhf.pairwise_reward_loss(torch.tensor([30.0, 0.0]), torch.tensor([0.0, 0.0]),
                                                weights=torch.tensor([1.0, 3.0]))
    assert float(loss) == pytest.approx(0.75 * LOG2, abs=1e-6)
    assert float(stats["accuracy"]) == pytest.approx(0.25)


def test_pairwise_reward_loss_matches_reference_with_grads():
    g = torch.Generator().manual_seed(2)
    rc = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(margin=torch.rand(9, generator=g, dtype=torch.float64), center_coef=0.05,
              weights=torch.rand(9, generator=g, dtype=torch.float64) + 0.1)
    ours, s1 = fastrlhf.pairwise_reward_loss(rc, rr, **kw)
    ref, s2 = R.pairwise_reward_loss(rc, rr, **kw)
    torch.testing.assert_close(ours, ref)
    for k in s2:
        torch.testing.assert_close(s1[k], s2[k])
    g1 = torch.autograd.grad(ours, (rc, rr))
    g2 = torch.autograd.grad(ref, (rc, rr))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="rejected_rewards"):
        fastrlhf.pairwise_reward_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        fastrlhf.pairwise_reward_loss(torch.zeros(2), torch.zeros(2), weights=torch.tensor([-1.0, 1.0]))


# ----------------------------------------------------------------------------------------
# RRHF
# ----------------------------------------------------------------------------------------


def _one_token_logits(probs):
    """``[n, 1, 2]`` logits whose label-0 token has probability ``p`` (logit log(p / (1 - p))), labels 0."""
    p = torch.tensor(probs, dtype=torch.float64)
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)], -1)[:, None, :]
    return logits, torch.zeros(len(probs), 1, dtype=torch.long)


def test_rrhf_hand_values():
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # order already right: the better response (p = 0.75) scores above the worse (p = 0.25)
    # -> ranking term 0; SFT term -log 0.75 = 0.287682
    logits, labels = _one_token_logits([0.75, 0.25])
    for fn in (fastrlhf.rrhf_loss, R.rrhf_loss):
        loss, stats = fn(logits, labels, rewards, group_size=2)
        assert float(stats["rank_loss"]) == 0.0
        assert float(loss) == pytest.approx(-math.log(0.75), abs=1e-9)
    # order reversed: relu(log 0.75 - log 0.25) = log 3 = 1.098612; SFT -log 0.25 = 1.386294;
    # total 2.484907
    logits, labels = _one_token_logits([0.25, 0.75])
    for fn in (fastrlhf.rrhf_loss, R.rrhf_loss):
        loss, stats = fn(logits, labels, rewards, group_size=2)
        assert float(stats["rank_loss"]) == pytest.approx(math.log(3), abs=1e-9)
        assert float(loss) == pytest.approx(math.log(3) - math.log(0.25), abs=1e-9)
    # rank_coef 0 and sft_coef 0 switch the terms off; tied rewards give no pair, SFT on the first
    loss, _ = fastrlhf.rrhf_loss(logits, labels, rewards, group_size=2, sft_coef=0.0)
    assert float(loss) == pytest.approx(math.log(3), abs=1e-9)
    loss, stats = fastrlhf.rrhf_loss(logits, labels, torch.tensor([2.0, 2.0]), group_size=2)
    assert float(stats["num_pairs"]) == 0 and float(loss) == pytest.approx(-math.log(0.25), abs=1e-9)


def test_rrhf_length_normalisation():
    # response 0: two tokens of p = 0.5 (sum log = 2 log 0.5); response 1: one token of p = 0.3.
    # length_penalty 1: p_0 = log 0.5 = -0.693 > p_1 = log 0.3 = -1.204 -> right order, rank 0.
    # length_penalty 0 (plain sums): p_0 = -1.386 < p_1 = -1.204 -> violation 0.182322
    logits = torch.zeros(2, 2, 2, dtype=torch.float64)
    logits[1, 0, 0] = math.log(0.3 / 0.7)
    labels = torch.tensor([[0, 0], [0, -100]])
    rewards = torch.tensor([1.0, 0.0])
    _, stats = fastrlhf.rrhf_loss(logits, labels, rewards, group_size=2, length_penalty=1.0)
    assert float(stats["rank_loss"]) == 0.0
    _, stats = fastrlhf.rrhf_loss(logits, labels, rewards, group_size=2, length_penalty=0.0)
    assert float(stats["rank_loss"]) == pytest.approx(math.log(0.3) - 2 * math.log(0.5), abs=1e-9)


def _rrhf_case(seed=0, k=3, groups=2, T=5, V=37, H=16):
    g = torch.Generator().manual_seed(seed)
    n = k * groups
    hidden = torch.randn(n, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    bias = torch.randn(V, generator=g) * 0.1
    labels = torch.randint(0, V, (n, T), generator=g)
    labels[0, 3:] = -100
    labels[4, 1:] = -100
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.5, -1.0])[:n]
    return hidden, weight, bias, labels, rewards


@pytest.mark.parametrize("backend", backends())
def test_rrhf_loss_every_backend_matches_reference(backend):
    dev = device_for(backend)
    hidden, weight, bias, labels, rewards = (t.to(dev) for t in _rrhf_case())
    logits = (hidden @ weight.T + bias).detach().requires_grad_(True)  # [n, T, V]
    kw = dict(group_size=3, rank_coef=2.0, sft_coef=0.5, length_penalty=1.0, temperature=0.9)
    loss, stats = fastrlhf.rrhf_loss(logits, labels, rewards, backend=backend, **kw)
    x64 = logits.detach().cpu().double().requires_grad_(True)
    ref, ref_stats = R.rrhf_loss(x64, labels.cpu(), rewards.cpu(), **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double().cpu(), ref, atol=1e-5, rtol=1e-5)
    for k in ("rank_loss", "sft_loss"):
        torch.testing.assert_close(stats[k].double().cpu(), ref_stats[k], atol=1e-5, rtol=1e-5)
    upstream = 1.7  # a non-unit upstream gradient
    (g,) = torch.autograd.grad(loss * upstream, logits)
    (g64,) = torch.autograd.grad(ref * upstream, x64)
    torch.testing.assert_close(g.double().cpu(), g64, atol=1e-5, rtol=1e-4)
    assert (g[labels == -100] == 0).all()  # ignored tokens get exactly zero gradient


@pytest.mark.parametrize("backend", backends())
def test_linear_rrhf_loss_every_backend_matches_reference(backend):
    dev = device_for(backend)
    hidden, weight, bias, labels, rewards = _rrhf_case(seed=1)
    leaves = [t.to(dev).requires_grad_(True) for t in (hidden, weight, bias)]
    loss, _ = fastrlhf.linear_rrhf_loss(*leaves[:2], labels.to(dev), rewards.to(dev), bias=leaves[2], group_size=3,
                                        chunk_size=4, backend=backend)
    ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref, _ = R.linear_rrhf_loss(*ref_leaves[:2], labels, rewards, bias=ref_leaves[2], group_size=3)
    torch.testing.assert_close(loss.double().cpu(), ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-5, rtol=1e-4)


def test_rrhf_input_errors():
    logits = torch.zeros(4, 2, 5)
    labels = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of group_size"):
        fastrlhf.rrhf_loss(logits, labels, torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match="rewards must be"):
        fastrlhf.rrhf_loss(logits, labels, torch.zeros(3), group_size=2)
    with pytest.raises(ValueError, match="logits must be"):
        fastrlhf.rrhf_loss(logits[0], labels[0], torch.zeros(2), group_size=2)
    with pytest.raises(ValueError, match="length_penalty"):
        fastrlhf.rrhf_loss(logits, labels, torch.zeros(4), group_size=2, length_penalty=-1.0)


# ----------------------------------------------------------------------------------------
# Trainers: set-up
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(max_operand=10, seed=0)


def small_model(tok, seed=0, hidden=32, layers=1):
    return tiny_causal_lm(len(tok), hidden_size=hidden, num_layers=layers, num_heads=2, tokenizer=tok, seed=seed,
                          device="cpu")


@pytest.fixture(scope="module")
def warm_model(tok, task):
    """The embedded job's model after its supervised warm-up (shared; copied per test)."""
    torch.manual_seed(0)
    m = tiny_causal_lm(len(tok), hidden_size=64, num_layers=2, tokenizer=tok, seed=0, device="cpu")
    supervised_finetune(m, tok, task.sft_rows(), steps=200, batch_size=32, lr=3e-3, seed=0)
    return m


def common(**kw):
    return dict(progress=False, seed=0, **kw)


def rm_trainer(tok, task, model, rows=None, **kw):
    cfg = RewardModelConfig(**common(micro_batch_size=4, lr=1e-3, **kw))
    return RewardModel(model, tok, rows or task.preference_rows("train"), cfg)


def rrhf_trainer(tok, task, model, rows=None, fused=True, **kw):
    cfg = RRHFConfig(**common(prompts_per_step=4, samples_per_prompt=4, max_new_tokens=4, micro_batch_size=8,
                              gradient_accumulation_steps=1, lr=1e-3, fused_linear=fused, **kw))
    return RRHF(model, tok, rows or task.prompt_rows("train"), task.reward, cfg)


def rft_trainer(tok, task, model, fused=True, **kw):
    cfg = RFTConfig(**common(prompts_per_step=4, samples_per_prompt=4, max_new_tokens=4, micro_batch_size=2,
                             gradient_accumulation_steps=1, lr=1e-3, fused_linear=fused, **kw))
    return RFT(model, tok, task.prompt_rows("train"), task.reward, cfg)


MAKERS = {"rm": rm_trainer, "rrhf": rrhf_trainer, "rft": rft_trainer}


# ----------------------------------------------------------------------------------------
# Reward model: conversion, scoring, pairs
# ----------------------------------------------------------------------------------------


def test_reward_model_from_causal_lm_shares_the_decoder(tok):
    lm = small_model(tok)
    rm = reward_model_from_causal_lm(lm, seed=3, pad_token_id=tok.pad_token_id)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    lm_params = dict(lm.named_parameters())
    shared = [n for n, _ in rm.named_parameters() if n in lm_params]
    assert len(shared) == len(lm_params) - 1  # every weight but the lm_head
    for n in shared:
        assert torch.equal(dict(rm.named_parameters())[n], lm_params[n]), n
    # head ~ N(0, 1 / sqrt(H + 1)) (lm-human-preferences), seeded
    w = rm.score.weight
    assert w.shape == (1, 32) and 0.05 < float(w.detach().std()) < 0.35
    torch.testing.assert_close(w, reward_model_from_causal_lm(lm, seed=3).score.weight)


def test_last_token_index_any_padding():
    m = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(m).tolist() == [3, 2, 2, 3]


def test_rankings_give_all_ordered_pairs(tok):
    assert sorted(ordered_pairs([3.0, 1.0, 2.0])) == [(0, 1), (0, 2), (2, 1)]
    assert ordered_pairs([1.0, 1.0]) == []
    p, responses, scores, margin = ranking_of({"prompt": "q", "responses": ["a", "b", "c"]}, tok)
    assert (p, responses, scores, margin) == ("q", ["a", "b", "c"], [3.0, 2.0, 1.0], None)  # best first
    assert ranking_of({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 0.5}, tok)[2:] == ([1.0, 0.0], 0.5)
    with pytest.raises(ValueError, match="scores"):
        ranking_of({"prompt": "q", "responses": ["a", "b"], "scores": [1.0]}, tok)


def test_ranking_loss_counts_each_prompt_once(tok, task):
    """A ranking of k responses is its C(k, 2) pairs, each weighted 1 / C(k, 2) (InstructGPT eq. 1)."""
    t = rm_trainer(tok, task, small_model(tok))
    rows = [{"prompt": "1+2=", "responses": ["3", "4", "9"], "scores": [2.0, 1.0, 0.0]},
            {"prompt": "5+5=", "chosen": "10", "rejected": "11"}]
    items = t.tokenize(rows)
    with torch.no_grad():
        r = t._rewards(items)  # [5]: 3 responses, then 2
        loss, stats, _, _ = t._pair_loss(r, items)
    # prompt 1: pairs (0,1), (0,2), (1,2), weight 1/3 each; prompt 2: one pair, weight 1
    rb, rw = r[[0, 0, 1, 3]], r[[1, 2, 2, 4]]
    ref, _ = R.pairwise_reward_loss(rb.double(), rw.double(), weights=torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(ValueError, match="no strictly ordered pair"):
        t.tokenize([{"prompt": "q", "responses": ["a", "b"], "scores": [1.0, 1.0]}])


def test_reward_model_scores_like_the_saved_classifier(tok, task, tmp_path):
    """The trainer's reward (last counted token, position ids from the mask) is what PPO's
    ``reward_model_fn`` reads from the saved ``AutoModelForSequenceClassification`` checkpoint."""
    from transformers import AutoModelForSequenceClassification

    t = rm_trainer(tok, task, small_model(tok))
    t.train(steps=2)
    t.save_pretrained(str(tmp_path))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    prompts = ["1+2=", "13+4=", "0+0="]
    completions = ["3", "17", "100"]
    ours = t.score(prompts, completions)
    theirs = reward_model_fn(loaded, tok)(prompts=prompts, completions=completions)
    assert len(set(round(x, 4) for x in ours)) == 3  # distinct texts, distinct rewards
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=1e-4)
    # the trainer also takes the sequence-classification model as is (no second conversion)
    again = RewardModel(loaded, tok, task.preference_rows("train"), RewardModelConfig(**common()))
    torch.testing.assert_close(torch.tensor(again.score(prompts, completions)), torch.tensor(ours), atol=1e-5,
                               rtol=1e-5)


# ----------------------------------------------------------------------------------------
# A few steps of each trainer; estimators; checkpoints
# ----------------------------------------------------------------------------------------

STATS = {
    "rm": {"loss", "accuracy", "chosen_rewards", "rejected_rewards", "reward_margin", "reward_mean", "reward_std",
           "grad_norm", "tokens_per_s", "peak_mem_mb"},
    "rrhf": {"loss", "rank_loss", "sft_loss", "rank_accuracy", "reward", "best_reward", "grad_norm", "tokens_per_s"},
    "rft": {"loss", "reward", "best_reward", "kept_frac", "grad_norm", "tokens_per_s"},
}


@pytest.mark.parametrize("algo", ["rm", "rrhf", "rft"])
def test_few_steps_finite_with_stats(tok, task, algo):
    t = MAKERS[algo](tok, task, small_model(tok))
    if algo != "rm":  # a reward that varies even for the untrained model, so the ranking term is live
        t.reward_fn = lambda completions, **_: [float(len(c)) for c in completions]
    hist = t.train(steps=2)
    assert [h["step"] for h in hist] == [1, 2]
    for h in hist:
        assert not STATS[algo] - set(h), f"{algo} metrics lack {STATS[algo] - set(h)}"
        assert all(math.isfinite(float(v)) for v in h.values()), h


def test_rrhf_offline_rankings_fused_equals_logits(tok, task):
    """RRHF on rows that carry their responses and scores (the paper's offline setting), no
    reward function; the fused-linear and the materialized-logits paths take the same step."""
    rows = [{"prompt": f"{a}+1=", "responses": [str(a + 1), str(a), str(a + 2), "x"], "scores": [3, 1, 1, 0]}
            for a in range(4)]
    outs = []
    for fused in (True, False):
        t = RRHF(small_model(tok), tok, rows, None, RRHFConfig(**common(
            prompts_per_step=4, samples_per_prompt=4, micro_batch_size=16, lr=1e-3, fused_linear=fused)))
        h = t.train(steps=1)[0]
        outs.append((h, torch.cat([p.detach().flatten() for p in t.model.parameters()])))
    assert outs[0][0]["loss"] == pytest.approx(outs[1][0]["loss"], rel=1e-5)
    assert outs[0][0]["reward"] == pytest.approx((3 + 1 + 1 + 0) / 4)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        RRHF(small_model(tok), tok, rows, None, RRHFConfig(samples_per_prompt=3, micro_batch_size=8))


def test_rft_keeps_the_best_sample(tok, task):
    t = rft_trainer(tok, task, small_model(tok), min_reward=3.0)
    seen = {}

    def reward(completions, **_):  # longer is better: the kept sample is the longest of its group
        seen["lengths"] = [len(c) for c in completions]
        return [float(len(c)) for c in completions]

    t.reward_fn = reward
    h = t.train(steps=1)[0]
    groups = torch.tensor(seen["lengths"], dtype=torch.float32).view(4, 4)
    assert h["best_reward"] == pytest.approx(float(groups.max(-1).values.mean()))
    assert h["kept_frac"] == pytest.approx(float((groups.max(-1).values >= 3.0).float().mean()))
    t.config.min_reward = 1e9  # nothing kept: no update, no loss
    before = [p.detach().clone() for p in t.model.parameters()]
    h = t.train(steps=2)[-1]
    assert h["kept_frac"] == 0.0 and "loss" not in h
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


@pytest.mark.parametrize("estimator", ["rloo", "reinforce", "reinforce++", "reinforce++-baseline"])
def test_grpo_and_ppo_estimators_run(tok, task, estimator):
    torch.manual_seed(0)
    length = lambda completions, **_: [float(len(c)) for c in completions]  # noqa: E731  varies untrained
    g = GRPO(small_model(tok), tok, task.prompt_rows(), length, GRPOConfig(**common(
        prompts_per_step=2, group_size=4, max_new_tokens=4, micro_batch_size=8, gradient_accumulation_steps=1,
        lr=1e-3, advantage_estimator=estimator, reward_kl_coef=0.0 if estimator == "rloo" else 0.05)))
    p = PPO(small_model(tok), tok, task.prompt_rows(), length, PPOConfig(**common(
        prompts_per_step=4, samples_per_prompt=2, max_new_tokens=4, micro_batch_size=8, ppo_epochs=1, lr=1e-3,
        advantage_estimator=estimator)))
    assert p.critic is None and set(p.trainable_modules()) == {"policy"}
    for t in (g, p):
        for h in t.train(steps=2):
            assert all(math.isfinite(float(v)) for v in h.values()), h
            assert "vf_loss" not in h


def test_grpo_advantages_follow_the_estimator(tok, task):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    mask = torch.ones(8, 3, dtype=torch.bool)
    lp = torch.zeros(8, 3)
    for est, expected in (  # per token [8, 3]: sequence advantages are broadcast over the counted tokens
        ("grpo", fastrlhf.group_advantages(rewards, 4)[:, None].expand(8, 3)),
        ("rloo", fastrlhf.rloo_advantages(rewards, 4)[:, None].expand(8, 3)),
        ("reinforce", fastrlhf.reinforce_advantages(rewards, mask, baseline="mean")[0]),
        ("reinforce++", fastrlhf.reinforce_plus_plus_advantages(rewards, mask)[0]),
        ("reinforce++-baseline", fastrlhf.reinforce_plus_plus_advantages(rewards, mask, group_size=4)[0]),
    ):
        t = GRPO(small_model(tok), tok, task.prompt_rows(), task.reward,
                 GRPOConfig(**common(group_size=4, micro_batch_size=8, gradient_accumulation_steps=1, beta=0.0,
                                     advantage_estimator=est)))
        torch.testing.assert_close(t.advantages(rewards, mask, lp, None), expected)


def test_estimator_config_errors(tok, task):
    m = small_model(tok)
    with pytest.raises(ValueError, match="advantage_estimator"):
        GRPO(m, tok, task.prompt_rows(), task.reward, GRPOConfig(advantage_estimator="gae"))
    with pytest.raises(ValueError, match="reward_kl_coef"):
        GRPO(m, tok, task.prompt_rows(), task.reward, GRPOConfig(advantage_estimator="rloo", reward_kl_coef=0.1))
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PPO(m, tok, task.prompt_rows(), task.reward, PPOConfig(advantage_estimator="rloo"))
    with pytest.raises(ValueError, match="critic-free"):
        PPO(m, tok, task.prompt_rows(), task.reward, PPOConfig(advantage_estimator="reinforce++"),
            critic=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="num_labels"):
        from transformers import AutoModelForSequenceClassification, LlamaConfig

        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, num_labels=2)
        RewardModel(AutoModelForSequenceClassification.from_config(cfg), tok, task.preference_rows())


def _state(t):
    params = {f"{name}.{n}": p.detach().clone() for name, m in t.trainable_modules().items()
              for n, p in m.named_parameters()}
    return params, copy.deepcopy(t.optimizer.state_dict())


def _assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)


@pytest.mark.parametrize("algo", ["rm", "rrhf", "rft"])
def test_checkpoint_resume_is_exact(tok, task, algo, tmp_path):
    a = MAKERS[algo](tok, task, small_model(tok), output_dir=str(tmp_path / "a"))
    a.train(steps=2)
    ckpt = a.save_checkpoint()
    a.train(steps=4)
    torch.manual_seed(123)  # the checkpoint must restore the RNG
    b = MAKERS[algo](tok, task, small_model(tok), output_dir=str(tmp_path / "b"))
    b.load_checkpoint(ckpt)
    assert b.step == 2
    b.train(steps=4)
    _assert_same(_state(b), _state(a))
    assert b.history[-1]["loss"] == a.history[-1]["loss"]


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
def test_reward_model_lora_trains_the_head_and_saves_merged(tok, task, tmp_path):
    from transformers import AutoModelForSequenceClassification

    t = rm_trainer(tok, task, small_model(tok), lora_r=4, lora_alpha=8)
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert any("lora" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    t.train(steps=3)
    t.save_pretrained(str(tmp_path))
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    prompts, completions = ["1+2=", "4+4="], ["3", "9"]
    torch.testing.assert_close(torch.tensor(reward_model_fn(merged, tok)(prompts=prompts, completions=completions)),
                               torch.tensor(t.score(prompts, completions)), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["rm", "rrhf", "rft"])
def test_cuda_bf16_steps(tok, task, algo):
    """On CUDA: bf16 autocast around fp32 master weights, Triton-backed fused-linear ops."""
    assert HAS_CUDA
    t = MAKERS[algo](tok, task, small_model(tok).to("cuda"))
    assert t.device.type == "cuda" and t.config.bf16
    for h in t.train(steps=2):
        assert all(math.isfinite(float(v)) for v in h.values()), h
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


# ----------------------------------------------------------------------------------------
# Learning, robust by design: on a fixed rollout in the default suite (see
# tests/test_algos.py), as learning curves averaged over seeds behind the `slow` marker.
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_rm(tok, task, warm_model, tmp_path_factory):
    """The embedded job's reward model: rankings of the right sum above 9 of the 18 wrong sums
    for each training prompt, from the warmed-up policy (InstructGPT initialises the RM from SFT)."""
    torch.manual_seed(0)
    t = RewardModel(copy.deepcopy(warm_model), tok, task_ranking_rows(task, seed=0),
                    RewardModelConfig(**common(steps=150, lr=3e-4, micro_batch_size=16)))
    before = t.evaluate(task_ranking_rows(task, seed=0, held_out=True))
    t.train()
    path = tmp_path_factory.mktemp("rm")
    t.save_pretrained(str(path))
    return t, path, before


def test_reward_model_held_out_pair_accuracy_above_0_9(trained_rm, task):
    """No sampling: 150 steps on fixed rankings (measured: accuracy 0.56 -> 0.99, margin 3.4)."""
    t, _, before = trained_rm
    held = task_ranking_rows(task, seed=0, held_out=True)  # the right sum vs wrong sums never trained on
    after = t.evaluate(held)
    assert after["num_pairs"] == 80 * 9
    assert before["accuracy"] < 0.7, before
    assert after["accuracy"] > 0.9, after
    assert after["reward_margin"] > 1.0 and after["reward_std"] > 0


def test_ppo_raises_the_trained_reward_models_score(tok, task, trained_rm):
    """PPO against the reward model on a fixed rollout: the RM's expected score over each prompt's
    candidates, weighted by the policy's probabilities of them, rises (measured +0.87 in 5 steps)."""
    rm, _, _ = trained_rm
    rows, batch, _, comps = rollout = candidate_rollout(tok, task)
    texts = tok.batch_decode(comps, skip_special_tokens=True)
    scores = torch.tensor(rm.score([r["prompt"] for r in rows for _ in range(4)], texts))  # [16]
    cfg = PPOConfig(**common(prompts_per_step=4, samples_per_prompt=4, max_new_tokens=4, micro_batch_size=4,
                             gradient_accumulation_steps=2, ppo_epochs=2, lr=1e-3))
    t = PPO(small_model(tok), tok, task.prompt_rows("train"), rm.reward_fn(), cfg)
    before, after = train_on_fixed_rollout(t, (rows, batch, scores, comps), steps=5)
    expected = [float((lp.view(4, 4).softmax(-1) * scores.view(4, 4)).sum(-1).mean()) for lp in (before, after)]
    assert expected[1] > expected[0] + 0.3, expected
    assert_rewarded_rises(before, after, rollout[2], margin=0.2)  # the RM ranks the right sums first


@pytest.mark.parametrize("algo", ["rrhf", "rft"])
def test_rrhf_and_rft_raise_the_best_completion(tok, task, algo):
    # The SFT term (RRHF) / SFT on the best (RFT) lifts tokens the candidates share, so the others
    # may rise too; asserted: the best rises, and by more than the others.
    # measured (5 steps): rrhf best +1.52, others +0.29; rft best +1.70, others +0.67 nats
    rollout = candidate_rollout(tok, task)
    before, after = train_on_fixed_rollout(MAKERS[algo](tok, task, small_model(tok)), rollout, steps=5)
    gain = after - before
    best, rest = float(gain[rollout[2] > 0].mean()), float(gain[rollout[2] == 0].mean())
    assert best > 0.5 and best - rest > 0.5, (best, rest)


@pytest.mark.slow
def test_ppo_with_the_trained_reward_model_raises_its_reward(tok, task, warm_model, trained_rm):
    from transformers import AutoModelForSequenceClassification

    _, path, _ = trained_rm
    rm = AutoModelForSequenceClassification.from_pretrained(str(path))  # the saved checkpoint, as the CLI loads it
    fn = reward_model_fn(rm, tok)

    def make(seed):
        cfg = PPOConfig(progress=False, seed=seed, prompts_per_step=64, max_new_tokens=4, micro_batch_size=32,
                        ppo_epochs=2, lr=1e-3, lr_warmup_steps=10, kl_coef=0.05)
        return PPO(copy.deepcopy(warm_model), tok, task.prompt_rows("train"), fn, cfg)

    # per-seed gains of the reward model's score over 16 seeds (tests/learning_margins.py ppo_rm 0,...,15):
    # mean +0.451, sd 0.285, min -0.282 (one seed of 16 below 0); the 4-seed mean has sd ~0.14, so its
    # sign is asserted, ~3.2 sd below its expectation
    assert reward_gain_over_seeds(make, steps=100) > 0.0


@pytest.mark.slow
def test_rrhf_reward_rises(tok, task, warm_model):
    def make(seed):
        cfg = RRHFConfig(progress=False, seed=seed, prompts_per_step=16, samples_per_prompt=4, max_new_tokens=4,
                         micro_batch_size=64, lr=3e-4, lr_warmup_steps=10)
        return RRHF(copy.deepcopy(warm_model), tok, task.prompt_rows("train"), task.reward, cfg)

    # per-seed gains over 16 seeds (tests/learning_margins.py rrhf 0,...,15): mean +0.209, sd 0.020, min +0.172;
    # the 4-seed mean has sd ~0.010, so 0.15 sits ~6 sd below its expectation
    assert reward_gain_over_seeds(make, steps=100) > 0.15


@pytest.mark.slow
def test_rft_reward_rises(tok, task, warm_model):
    def make(seed):
        cfg = RFTConfig(progress=False, seed=seed, prompts_per_step=16, samples_per_prompt=8, max_new_tokens=4,
                        micro_batch_size=16, lr=1e-3, lr_warmup_steps=10)
        return RFT(copy.deepcopy(warm_model), tok, task.prompt_rows("train"), task.reward, cfg)

    # per-seed gains over 16 seeds (tests/learning_margins.py rft 0,...,15): mean +0.187, sd 0.029,
    # min +0.134; the 4-seed mean has sd ~0.015, so 0.1 sits ~6 sd below its expectation
    assert reward_gain_over_seeds(make, steps=60) > 0.1


# ----------------------------------------------------------------------------------------
# CLI: train rm, then ppo --reward-model; rrhf; rft
# ----------------------------------------------------------------------------------------

FAST = ["--steps", "2", "--warmup-steps", "3", "--no-progress", "--no-plot"]


def test_cli_rm_then_ppo_with_it(tmp_path, capsys):
    from fastrlhf import cli

    rm_dir = tmp_path / "rm"
    assert cli.main(["train", "rm", "--output-dir", str(rm_dir), "--micro-batch-size", "4", *FAST]) == 0
    out = capsys.readouterr().out
    assert "fastrlhf train rm: 2 steps" in out and f"--reward-model {rm_dir / 'final'}" in out
    summary = json.loads((rm_dir / "summary.json").read_text())
    assert len(summary["accuracy"]) == 2 and len(summary["eval_pair_accuracy_unseen_responses"]) == 2
    config = json.loads((rm_dir / "final" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    ppo_dir = tmp_path / "ppo"
    cli.main(["train", "ppo", "--reward-model", str(rm_dir / "final"), "--output-dir", str(ppo_dir),
              "--prompts-per-step", "4", "--micro-batch-size", "4", "--grad-accum", "1", *FAST])
    rewards = [json.loads(x)["reward"] for x in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    assert not any(r in (0.0, 1.0) for r in rewards)  # the RM's scalar, not the 0/1 task reward


@pytest.mark.parametrize("algo", ["rrhf", "rft"])
def test_cli_rrhf_rft(algo, tmp_path):
    from fastrlhf import cli

    s = cli.train(cli.build_parser().parse_args(
        ["train", algo, "--output-dir", str(tmp_path), "--prompts-per-step", "4", "--samples-per-prompt", "2",
         "--micro-batch-size", "8", *FAST]))
    assert s["steps"] == 2 and len(s["reward"]) == 2 and len(s["best_reward"]) == 2 and "eval_accuracy" in s
    assert (tmp_path / "final" / "config.json").exists()
