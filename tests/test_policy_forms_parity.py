"""Parity of the policy-loss forms with the trainers' own code at pinned versions.

- TRL 1.16 (installed): ``GRPOTrainer._compute_loss`` itself (``trl/trainer/grpo_trainer.py``
  lines 3020-3304) is called on a stand-in ``self`` whose ``_get_per_token_logps_and_entropies``
  returns the fp64 logp of the test's logits, so the loss and its gradient are TRL's code
  path. The vLLM importance-sampling ratio is built in ``_generate_and_score_completions``, too
  entangled to call; lines 2660-2708 are transcribed in :func:`_trl_is_ratio`.
- verl @ 1dda039b (verl-project/verl): ``verl/trainer/ppo/core_algos.py`` ``compute_policy_loss_gspo``
  (lines 1545-1618), ``compute_policy_loss_sapo`` (1621-1703), ``compute_policy_loss_cispo``
  (2046-2104), ``agg_loss`` (1140-1207); ``verl/trainer/ppo/rollout_corr_helper.py``
  ``compute_rollout_correction_weights`` (522-657). Transcribed.
- OpenRLHF @ 3c3be623: ``openrlhf/models/loss.py`` ``PolicyLoss.forward`` (lines 155-230). Transcribed.

fastrlhf runs in fp64 (torch backend) against the trainers' fp64 formulas: agreement to rounding
(1e-12); the TRL cases also run fastrlhf in fp32. ``docs/losses.md`` quotes the measured errors.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import fastrlhf
from fastrlhf import reference as R

B, T, V = 4, 7, 97


def _data(seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    lp = R.token_logprobs(x, labels)
    old = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout[0, 3] = float("nan")  # a token vLLM could not score
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return x, labels, mask, old, ref, rollout, adv


# ----------------------------------------------------------------------------------------
# TRL 1.16: its own _compute_loss
# ----------------------------------------------------------------------------------------

trainer_mod = pytest.importorskip("trl.trainer.grpo_trainer")


def _trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    # TRL 1.16 trl/trainer/grpo_trainer.py lines 2660-2708 (_generate_and_score_completions), transcribed
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


class _Acc:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(logp, mask, old, ref, adv, *, loss_type, level="token", beta=0.0, eps=0.2, eps_high=None, delta=None,
              bias_kl=False, is_ratio=None):
    """TRL's ``GRPOTrainer._compute_loss`` on a stand-in ``self`` (one process, no accumulation)."""
    args = SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.05, steps_per_generation=1)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, args=args, loss_type=loss_type, epsilon_low=eps,
        epsilon_high=eps if eps_high is None else eps_high, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=_Acc(), _metrics=defaultdict(lambda: defaultdict(list)),
        _entropy_bonus_enabled=False, max_completion_length=T, get_off_policy_mask=None,
    )
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=mask.sum())
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return trainer_mod.GRPOTrainer._compute_loss(fake, None, inputs)


# TRL loss_type -> fastrlhf options (loss_agg and form)
TRL_TYPES = {
    "grpo": dict(loss_agg="seq-mean-token-mean"),
    "bnpo": dict(loss_agg="token-mean"),
    "dr_grpo": dict(loss_agg="seq-mean-token-sum-norm"),
    "dapo": dict(loss_agg="token-mean"),
    "cispo": dict(loss_agg="token-mean", policy_loss="cispo"),
    "sapo": dict(loss_agg="seq-mean-token-mean", policy_loss="sapo"),
    "luspo": dict(loss_agg="seq-mean-token-sum"),
}
TRL_CASES = [
    ("grpo", "token", dict(beta=0.04)),
    ("grpo", "sequence", dict(beta=0.04, eps=3e-4, eps_high=4e-4)),
    ("bnpo", "token", dict(eps_high=0.28, delta=1.3)),
    ("dr_grpo", "token", dict(beta=0.04, bias_kl=True)),
    ("dapo", "token", dict(eps_high=0.28, is_mode=("token_truncate", None, 1.5))),
    ("dapo", "token", dict(is_mode=("token_mask", 0.7, 1.4), beta=0.02)),
    ("cispo", "token", dict(eps_high=1.2, is_mode=("sequence_truncate", 0.5, 2.0))),
    ("sapo", "token", dict(beta=0.04, bias_kl=True, is_mode=("sequence_mask", 0.3, 2.5))),
    ("sapo", "sequence", dict()),
    ("luspo", "sequence", dict(eps=0.05, beta=0.04, bias_kl=True)),
]


@pytest.mark.parametrize("loss_type,level,case", TRL_CASES,
                         ids=[f"{a}-{b}-{i}" for i, (a, b, _) in enumerate(TRL_CASES)])
def test_matches_trl_compute_loss(loss_type, level, case):
    """fastrlhf in fp64 vs TRL's code in fp64, and fastrlhf in fp32 (inputs rounded to fp32) vs the same."""
    case = dict(case)
    x, labels, mask, old, ref, rollout, adv = _data()
    is_mode = case.pop("is_mode", None)
    is_ratio = None if is_mode is None else _trl_is_ratio(old, rollout, mask.double(), *is_mode)
    x64 = x.clone().requires_grad_()
    logp = R.token_logprobs(x64, labels)
    want = _trl_loss(logp, mask.double(), old, ref, adv, loss_type=loss_type, level=level, is_ratio=is_ratio, **case)
    (g_want,) = torch.autograd.grad(want, x64)
    ours = dict(TRL_TYPES[loss_type], ratio_level=level, clip_low=case.get("eps", 0.2),
                clip_high=case.get("eps_high", case.get("eps", 0.2)), kl_is_correction=case.get("bias_kl", False))
    if case.get("delta") is not None:
        ours["ratio_cap"] = case["delta"]
    if loss_type == "sapo":
        # TRL line 3122 builds the temperatures with torch.where(A > 0, 1.0, 1.05) from Python floats: a
        # float32 tensor, so its 1.05 is 1.0499999523. Given that same number, the fp64 results agree to
        # rounding; with 1.05 itself they differ by 4e-8 (measured), TRL's rounding.
        ours["sapo_tau_neg"] = torch.tensor(1.05, dtype=torch.float32).item()
    if is_mode is not None:
        ours.update(rollout_correction=is_mode[0], rollout_is_min=is_mode[1], rollout_is_max=is_mode[2])
    for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        # fp64: the formula itself (to rounding); fp32: also the rounding of every input to fp32
        xd = x.to(dt).requires_grad_()
        extra = dict(rollout_logprobs=rollout.to(dt)) if is_mode is not None else {}
        got, _ = fastrlhf.grpo_loss(xd, labels, old.to(dt), adv.to(dt), ref.to(dt), beta=case.get("beta", 0.0),
                                    mask=mask, backend="torch" if dt == torch.float64 else "auto", **ours, **extra)
        (g_got,) = torch.autograd.grad(got, xd)
        assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item())), (dt, got.item(), want.item())
        assert (g_got.double() - g_want).abs().max().item() <= tol * max(1.0, g_want.abs().max().item())


def test_trl_nan_rollout_and_the_oracle_agree_on_the_is_ratio():
    _, _, mask, old, _, rollout, _ = _data()
    for mode, lo, hi in (("token_truncate", 0.5, 1.5), ("token_mask", 0.8, 1.2), ("sequence_truncate", None, 2.0),
                         ("sequence_mask", 0.5, 2.0)):
        want = _trl_is_ratio(old, rollout, mask.double(), mode, lo, hi)
        got, _ = R.rollout_correction_weights(old, rollout, mask.double(), mode, lo, hi)
        torch.testing.assert_close(got.expand_as(old) * mask, want.expand_as(old) * mask, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------------
# verl @ 1dda039b, transcribed
# ----------------------------------------------------------------------------------------


def _verl_seq_mean_token_mean(loss_mat, loss_mask):
    # core_algos.py agg_loss, "seq-mean-token-mean" branch (lines 1193-1201), dp_size 1
    seq_mask = torch.sum(loss_mask, dim=-1)
    seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
    seq_mask = (seq_mask > 0).to(loss_mat.dtype)
    return (seq_losses * seq_mask).sum() / seq_mask.sum()


def _verl_gspo(old, logp, adv, m, lo, hi):
    # core_algos.py compute_policy_loss_gspo, lines 1578-1595 (GSPO-token: sg(s_i) * pi / sg(pi))
    negative_approx_kl = logp - old
    seq_lengths = torch.sum(m, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * m, dim=-1) / seq_lengths
    log_seq_importance_ratio = logp - logp.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -adv * seq_importance_ratio
    pg_losses2 = -adv * torch.clamp(seq_importance_ratio, 1 - lo, 1 + hi)
    return _verl_seq_mean_token_mean(torch.maximum(pg_losses1, pg_losses2), m)


def _verl_sapo(old, logp, adv, m, tau_pos=1.0, tau_neg=1.05):
    # core_algos.py compute_policy_loss_sapo, lines 1650-1685
    negative_approx_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    taus = torch.where(adv > 0, torch.as_tensor(tau_pos, dtype=adv.dtype), torch.as_tensor(tau_neg, dtype=adv.dtype))
    gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
    return _verl_seq_mean_token_mean(-gates * adv, m)


def _verl_is_weights(log_ratio, m, rollout_is, upper, lower=None):
    # rollout_corr_helper.py compute_rollout_correction_weights, lines 570-600 (SAFETY_BOUND = 20)
    if rollout_is == "token":
        raw = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    else:
        s = (log_ratio * m).sum(-1).unsqueeze(-1)
        raw = torch.exp(torch.clamp(s, min=-20.0, max=20.0)).expand_as(log_ratio)
    raw = raw * m
    if lower is None:
        return raw.clamp(max=upper)
    return torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))


def _logp_and_grad_fn(x, labels):
    x64 = x.clone().requires_grad_()
    return x64, R.token_logprobs(x64, labels)


def test_matches_verl_gspo_and_sapo():
    """verl's GSPO is GSPO-token (sg(s_i) pi / sg(pi)): with per-sequence advantages and
    seq-mean-token-mean (verl forces it) its value and logits gradient equal TRL's / ours.
    fp64 on both sides: agreement to rounding."""
    x, labels, mask, old, _, _, adv = _data(1)
    m = mask.double()
    A = adv.unsqueeze(-1).expand(B, T)  # verl advantages are [B, T]
    for fn, ours in ((lambda lp: _verl_gspo(old, lp, A, m, 3e-4, 4e-4),
                      dict(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4)),
                     (lambda lp: _verl_sapo(old, lp, A, m), dict(policy_loss="sapo"))):
        x64, lp = _logp_and_grad_fn(x, labels)
        want = fn(lp)
        (g_want,) = torch.autograd.grad(want, x64)
        xf = x.clone().requires_grad_()
        got, _ = fastrlhf.ppo_clip_loss(xf, labels, old, adv, mask=mask, backend="torch",
                                        loss_agg="seq-mean-token-mean", **ours)
        (g_got,) = torch.autograd.grad(got, xf)
        # verl divides each sequence by (n_i + 1e-8) (agg_loss line 1195): a relative 1e-8 / n_i difference
        assert abs(got.item() - want.item()) <= 1e-8 * abs(want.item())
        assert (g_got.double() - g_want).abs().max().item() <= 1e-8 * g_want.abs().max().item()


def test_matches_verl_cispo_where_no_ratio_is_below_one_minus_clip_low():
    """verl's CISPO weight is sg(clamp(r, 1 - lo, 1 + hi)) (core_algos.py lines 2066-2077); TRL's
    (ours) is sg(min(r, cap)). They agree (cap = 1 + hi) where no ratio is below 1 - lo; verl's
    lower clamp is not offered. fp64 on both sides: agreement to rounding."""
    x, labels, mask, old, _, _, adv = _data(2, spread=0.05)
    m = mask.double()
    lp = R.token_logprobs(x, labels)
    old = torch.minimum(old, lp + 0.1)  # r >= e^-0.1 > 0.8
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    clipped_ratio_sg = torch.clamp(ratio, 1 - 0.2, 1 + 0.04).detach()
    pg = -clipped_ratio_sg * adv.unsqueeze(-1) * lp
    want = (pg * m).sum() / m.sum()  # agg_loss token-mean
    got, _ = fastrlhf.ppo_clip_loss(x, labels, old, adv, mask=mask, backend="torch", policy_loss="cispo",
                                    clip_high=1.04)
    assert abs(got.item() - want.item()) <= 1e-12


@pytest.mark.parametrize("level,threshold,ours", [
    ("token", (2.0, None), dict(rollout_correction="token_truncate", rollout_is_max=2.0)),
    ("token", (1.3, 0.8), dict(rollout_correction="icepop", rollout_is_min=0.8, rollout_is_max=1.3)),
    ("sequence", (1.5, None), dict(rollout_correction="sequence_truncate", rollout_is_max=1.5)),
    ("sequence", (2.0, 0.5), dict(rollout_correction="sequence_mask", rollout_is_min=0.5, rollout_is_max=2.0)),
])
def test_matches_verl_rollout_is_weights(level, threshold, ours):
    """verl's TIS (float threshold) and IcePop ("lo_hi") weights times its vanilla loss
    (core_algos.py lines 1346-1365), rollout logprobs without NaN (verl has none). fp64 on both
    sides: agreement to rounding."""
    x, labels, mask, old, _, rollout, adv = _data(3)
    rollout = torch.nan_to_num(rollout, nan=-1.0)
    m = mask.double()
    lp = R.token_logprobs(x, labels)
    w = _verl_is_weights(old - rollout, m, level, *threshold)
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    A = adv.unsqueeze(-1)
    pg = torch.maximum(-A * ratio, -A * torch.clamp(ratio, 0.8, 1.2)) * w
    want = (pg * m).sum() / m.sum()
    got, stats = fastrlhf.ppo_clip_loss(x, labels, old, adv, mask=mask, backend="torch",
                                        rollout_logprobs=rollout, **ours)
    assert abs(got.item() - want.item()) <= 1e-12


# ----------------------------------------------------------------------------------------
# OpenRLHF @ 3c3be623, transcribed
# ----------------------------------------------------------------------------------------


def _openrlhf_policy_loss(logp, old, adv, m, rollout, policy_loss_type, is_type=None, thr=(0.5, 5.0)):
    # openrlhf/models/loss.py PolicyLoss.forward, lines 166-227 (token_level_loss False for gspo: seq mean)
    raw_policy_log_ratio = logp - old
    if policy_loss_type == "ppo":
        ratio = raw_policy_log_ratio.clamp(min=-20.0, max=20.0).exp()
    else:
        log_ratio = logp - rollout if is_type is not None else raw_policy_log_ratio
        ratio = (log_ratio * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)
        ratio = ratio.exp().unsqueeze(-1) * m
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - 0.2, 1 + 0.2) * adv
    loss = -torch.min(surr1, surr2)
    if is_type is not None and policy_loss_type == "ppo":
        low, high = thr
        rollout_log_ratio = old - rollout
        if is_type == "icepop":
            vllm_is = torch.exp(rollout_log_ratio).detach()
            vllm_is = vllm_is * ((vllm_is >= low) & (vllm_is <= high))
        else:  # tis
            vllm_is = torch.exp(rollout_log_ratio).clamp(min=low, max=high).detach()
        loss = vllm_is * loss
    if policy_loss_type == "gspo":
        return ((loss * m).sum(-1) / m.sum(-1)).mean()  # masked_mean(dim=-1).mean()
    return (loss * m).sum() / m.sum()  # token_level_loss


@pytest.mark.parametrize("ptype,is_type", [("ppo", "tis"), ("ppo", "icepop"), ("gspo", None), ("gspo", "tis")])
def test_matches_openrlhf_policy_loss(ptype, is_type):
    """OpenRLHF's gspo with vLLM IS takes the ratio against the rollout logprobs: ours with
    ``old_logprobs=rollout``. fp64 on both sides: agreement to rounding."""
    x, labels, mask, old, _, rollout, adv = _data(4, spread=0.1)
    rollout = torch.nan_to_num(rollout, nan=-1.0)
    m = mask.double()
    x64, lp = _logp_and_grad_fn(x, labels)
    A = adv.unsqueeze(-1)
    want = _openrlhf_policy_loss(lp, old, A, m, rollout, ptype, is_type)
    (g_want,) = torch.autograd.grad(want, x64)
    if ptype == "gspo":
        ours = dict(ratio_level="sequence", loss_agg="seq-mean-token-mean")
        denom = rollout if is_type is not None else old
    else:
        mode = "icepop" if is_type == "icepop" else "token_truncate"
        ours = dict(rollout_correction=mode, rollout_is_min=0.5, rollout_is_max=5.0, rollout_logprobs=rollout)
        denom = old
    xf = x.clone().requires_grad_()
    got, _ = fastrlhf.ppo_clip_loss(xf, labels, denom, adv, mask=mask, backend="torch", **ours)
    (g_got,) = torch.autograd.grad(got, xf)
    assert abs(got.item() - want.item()) <= 1e-12
    assert (g_got.double() - g_want).abs().max().item() <= 1e-12
