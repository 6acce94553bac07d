"""Policy-loss forms: CISPO, SAPO, GSPO (``ratio_level="sequence"``), ``ratio_cap`` (TRL's
``delta``), ``kl_is_correction`` (TRL's ``use_bias_correction_kl``) and the rollout corrections.

Layers: hand-derived values on a 2-sequence example (arithmetic in comments); the closed-form
derivatives of ``fastrlhf/token_math.py`` vs autograd on the oracle in fp64; every backend
through the public ops (logits and fused-linear) vs the fp64 oracle with a mask and
ignore_index. Parity with TRL 1.16's own ``GRPOTrainer._compute_loss`` and with verl / OpenRLHF
transcriptions lives in ``tests/test_policy_forms_parity.py``.
"""

import math

import pytest
import torch
from conftest import backends, device_for

import fastrlhf
from fastrlhf import reference as R
from fastrlhf.token_math import policy_loss_from_logprobs

LN = math.log

# ----------------------------------------------------------------------------------------
# The 2-sequence example. old = 0, so logp is the log-ratio u.
#   sequence 0 (A = +1): u = [ln 1.5, ln 0.5]          -> ratios [1.5, 0.5]
#   sequence 1 (A = -1): u = [ln 2, (masked: 7.0)]     -> ratio  [2]
# token-mean over the 3 counted tokens.
# ----------------------------------------------------------------------------------------


def _example():
    logp = torch.tensor([[LN(1.5), LN(0.5)], [LN(2.0), 7.0]], dtype=torch.float64)
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    counted = torch.tensor([[True, True], [True, False]])
    # old - rollout = [ln 4, ln 0.5] and [NaN (-> 0, no correction), masked]
    rollout = torch.tensor([[-LN(4.0), -LN(0.5)], [float("nan"), 3.0]], dtype=torch.float64)
    return logp, old, adv, counted, rollout


def _both(opts, grads=False, rollout=False, ref=None):
    """(ours, oracle) loss and stats (and d loss / d logp) on the example."""
    logp, old, adv, counted, roll = _example()
    extra = dict(rollout_logprobs=roll) if rollout else {}
    if ref is not None:
        extra["ref_logprobs"] = ref
    out = []
    for fn, c in ((policy_loss_from_logprobs, counted), (R.ppo_clip_loss_from_logprobs, counted.double())):
        lp = logp.clone().requires_grad_()
        loss, stats = fn(lp, c, old, adv, **extra, **opts)
        (g,) = torch.autograd.grad(loss, lp)
        out.append((loss.item(), stats, g))
    return out


def _check(opts, want_loss, want=None, want_grad=None, **kw):
    for loss, stats, g in _both(opts, **kw):
        assert loss == pytest.approx(want_loss, abs=1e-12), (opts, loss, want_loss)
        for k, v in (want or {}).items():
            assert stats[k].item() == pytest.approx(v, abs=1e-12), (k, stats[k].item(), v)
        if want_grad is not None:
            torch.testing.assert_close(g, torch.tensor(want_grad, dtype=torch.float64), rtol=0, atol=1e-12)
        assert g[1, 1] == 0, "a masked token gets exactly zero gradient"


def test_hand_clip_and_ratio_cap():
    # clip 0.2: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5, max(2, 1.2) = 2
    # loss = (-1.2 - 0.5 + 2) / 3 = 0.1; d/dlogp: [0, -0.5 / 3], [2 / 3]; clipfrac 1/3
    _check(dict(), 0.1, dict(clipfrac=1 / 3, ratio_mean=4 / 3), [[0.0, -0.5 / 3], [2 / 3, 0.0]])
    # ratio_cap 1.8 (TRL's delta): token (1, 0) becomes max(-(-1) min(2, 1.8), 1.2) = 1.8, derivative 0
    # loss = (-1.2 - 0.5 + 1.8) / 3 = 0.1 / 3
    _check(dict(ratio_cap=1.8), 0.1 / 3, None, [[0.0, -0.5 / 3], [0.0, 0.0]])


def test_hand_cispo():
    # cap 1.25: weights sg(min(r, 1.25)) = [1.25, 0.5], [1.25]; l = -w A logp:
    # -1.25 ln 1.5, -0.5 ln 0.5 = +0.5 ln 2, -1.25 (-1) ln 2 = +1.25 ln 2
    want = (-1.25 * LN(1.5) + 0.5 * LN(2) + 1.25 * LN(2)) / 3
    # d/dlogp = -w A / 3 (no derivative through the ratio); TRL's clip stat: r > cap and A > 0 -> 1/3
    _check(dict(policy_loss="cispo", clip_high=1.25), want, dict(clipfrac=1 / 3),
           [[-1.25 / 3, -0.5 / 3], [1.25 / 3, 0.0]])


def test_hand_sapo():
    # tau = 1 where A > 0, 1.05 where A <= 0; l = -sigmoid(tau (r - 1)) 4 / tau A
    s = torch.sigmoid
    v = [-4 * s(torch.tensor(0.5)).item(), -4 * s(torch.tensor(-0.5)).item(),
         4 / 1.05 * s(torch.tensor(1.05)).item()]
    # sigmoid(0.5) + sigmoid(-0.5) = 1, so the first two sum to -4: loss = (-4 + 4 / 1.05 sigmoid(1.05)) / 3
    assert abs(v[0] + v[1] + 4) < 1e-6
    # d/dlogp = -A 4 s (1 - s) r / 3 (d sigmoid(tau (r - 1)) 4 / tau / dr = 4 s (1 - s))
    g = [[-4 * 0.25 * (1 - math.tanh(0.25) ** 2) * 1.5 / 3,  # s(1-s) at 0.5 = (1 - tanh(0.25)^2) / 4
          -4 * 0.25 * (1 - math.tanh(0.25) ** 2) * 0.5 / 3],
         [4 * 0.25 * (1 - math.tanh(0.525) ** 2) * 2 / 3, 0.0]]
    want = (-4 + 4 / 1.05 / (1 + math.exp(-1.05))) / 3
    _check(dict(policy_loss="sapo"), want, dict(clipfrac=0.0), g)


def test_hand_gspo():
    # sequence 0: log w = (ln 1.5 + ln 0.5) / 2 = ln 0.75 / 2 -> w = sqrt(0.75) in [0.8, 1.2]: unclipped,
    # both tokens carry -A w = -sqrt(0.75); sequence 1: one counted token, w = 2 -> max(2, 1.2) = 2.
    w0 = math.sqrt(0.75)
    # token-mean: (2 (-w0) + 2) / 3; d/dlogp_t = m_t / n_i sum_s (1/3) d pg_s / d log w:
    # sequence 0: (1/2) 2 (1/3) (-w0) = -w0 / 3 each; sequence 1: (1/3) 2
    _check(dict(ratio_level="sequence"), (2 - 2 * w0) / 3, dict(ratio_mean=(2 * w0 + 2) / 3, clipfrac=0.0),
           [[-w0 / 3, -w0 / 3], [2 / 3, 0.0]])
    # seq-mean-token-mean: (-w0 + 2) / 2; weights 1/4 (sequence 0 tokens), 1/2 (sequence 1): d/dlogp
    # sequence 0: (1/2) 2 (1/4) (-w0) = -w0 / 4 each; sequence 1: (1/2) 2 = 1
    _check(dict(ratio_level="sequence", loss_agg="seq-mean-token-mean"), (2 - w0) / 2, None,
           [[-w0 / 4, -w0 / 4], [1.0, 0.0]])


@pytest.mark.parametrize("mode,lo,hi,want_loss,frac,mean", [
    # token weights exp(old - rollout) = [4, 0.5], [1] (NaN rollout -> 1); clip terms [-1.2, -0.5], [2]
    # truncate [0.5, 3]: [3, 0.5], [1] (0.5 is on the bound: not corrected) -> (-3.6 - 0.25 + 2) / 3
    ("token_truncate", 0.5, 3.0, (-3.6 - 0.25 + 2) / 3, 1 / 3, 4.5 / 3),
    # mask [0.5, 3]: [0, 0.5], [1] -> (-0.25 + 2) / 3
    ("token_mask", 0.5, 3.0, (-0.25 + 2) / 3, 1 / 3, 1.5 / 3),
    ("icepop", 0.5, 3.0, (-0.25 + 2) / 3, 1 / 3, 1.5 / 3),
    # sequence weights exp(ln 4 + ln 0.5) = 2 and exp(0) = 1; truncate [0.5, 1.5]: 1.5, 1
    # -> (1.5 (-1.2 - 0.5) + 2) / 3; stats over the 2 sequences: 1/2 corrected, mean 1.25
    ("sequence_truncate", 0.5, 1.5, (1.5 * -1.7 + 2) / 3, 0.5, 1.25),
    # mask [0.5, 1.5]: 0, 1 -> 2 / 3
    ("sequence_mask", 0.5, 1.5, 2 / 3, 0.5, 0.5),
    # max only: truncate at 3 from above, nothing below
    ("token_truncate", None, 3.0, (-3.6 - 0.25 + 2) / 3, 1 / 3, 4.5 / 3),
])
def test_hand_rollout_corrections(mode, lo, hi, want_loss, frac, mean):
    _check(dict(rollout_correction=mode, rollout_is_min=lo, rollout_is_max=hi), want_loss,
           dict(rollout_is_frac_corrected=frac, rollout_is_mean=mean), rollout=True)


def test_hand_kl_is_correction():
    # ref - logp = [ln 2, 0], [0]: k3 = [2 - ln 2 - 1, 0], [0]; kl_coef 0.1
    ref = _example()[0] + torch.tensor([[LN(2.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    k3 = 1 - LN(2)
    _check(dict(kl_coef=0.1), 0.1 + 0.1 * k3 / 3, dict(kl=k3 / 3), ref=ref)
    # x ratio 1.5: 0.1 + 0.1 * 1.5 k3 / 3. Token (0, 0) is clipped (pg derivative 0); d(k3 r)/dlogp =
    # dk3 r + k3 r = -(2 - 1) 1.5 + 1.5 k3, times 0.1 / 3
    g00 = 0.1 * (-1.5 + 1.5 * k3) / 3
    _check(dict(kl_coef=0.1, kl_is_correction=True), 0.1 + 0.1 * 1.5 * k3 / 3, dict(kl=1.5 * k3 / 3),
           [[g00, -0.5 / 3], [2 / 3, 0.0]], ref=ref)


# ----------------------------------------------------------------------------------------
# Closed-form derivatives vs autograd on the oracle (fp64, agreement to rounding)
# ----------------------------------------------------------------------------------------

B, T = 4, 9
FORMS = {
    "cispo": dict(policy_loss="cispo", clip_high=1.3),
    "sapo": dict(policy_loss="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05),
    "gspo": dict(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4),
    "gspo-sapo": dict(ratio_level="sequence", policy_loss="sapo"),
    "gspo-cispo": dict(ratio_level="sequence", policy_loss="cispo", clip_high=1.1),
    "cap+dual": dict(ratio_cap=1.5, dual_clip=2.5, clip_high=0.28),
    "kl-is": dict(kl_coef=0.1, kl_is_correction=True),
    "gspo-kl-is": dict(ratio_level="sequence", kl_coef=0.1, kl_is_correction=True, kl_estimator="k2"),
    "token_truncate": dict(rollout_correction="token_truncate", rollout_is_min=0.7, rollout_is_max=1.4),
    "token_mask": dict(rollout_correction="token_mask", rollout_is_min=0.7, rollout_is_max=1.4),
    "icepop+sapo": dict(rollout_correction="icepop", rollout_is_min=0.7, rollout_is_max=1.4, policy_loss="sapo"),
    "seq_truncate+gspo": dict(rollout_correction="sequence_truncate", rollout_is_max=1.5, ratio_level="sequence"),
    "seq_mask+cispo": dict(rollout_correction="sequence_mask", rollout_is_min=0.5, rollout_is_max=2.0,
                           policy_loss="cispo", clip_high=5.0, kl_coef=0.05),
}


def _batch(seed, per_sequence):
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    logp = -torch.rand(B, T, generator=g, **d) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g, **d)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, **d)
    ent = torch.rand(B, T, generator=g, **d) * 2
    adv = torch.randn(B, generator=g, **d) if per_sequence else torch.randn(B, T, generator=g, **d)
    counted = torch.rand(B, T, generator=g) > 0.3
    counted[3] = False
    rollout = old + 0.3 * torch.randn(B, T, generator=g, **d)
    rollout[0, 1] = float("nan")  # an unscored token: no correction
    return logp, old, ref, ent, adv, counted, rollout


@pytest.mark.parametrize("per_sequence", [False, True], ids=["per-token-A", "per-seq-A"])
@pytest.mark.parametrize("loss_agg", R.LOSS_AGG_MODES)
@pytest.mark.parametrize("form", list(FORMS))
def test_closed_form_gradients_match_autograd_on_the_oracle(form, loss_agg, per_sequence):
    opts = dict(FORMS[form])
    data = _batch(11, per_sequence)
    tensors = [t.clone().requires_grad_() for t in data[:5]]
    counted, rollout = data[5], data[6]
    logp, old, ref, ent, adv = tensors
    kw = dict(opts, loss_agg=loss_agg, entropy=ent, entropy_coef=0.01,
              ref_logprobs=ref if opts.get("kl_coef") else None,
              rollout_logprobs=rollout if opts.get("rollout_correction") else None)
    loss, stats = policy_loss_from_logprobs(logp, counted, old, adv, **kw)
    (loss * 0.37).backward()
    ours = [None if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    loss64, stats64 = R.ppo_clip_loss_from_logprobs(logp, counted.double(), old, adv, **kw)
    (loss64 * 0.37).backward()
    torch.testing.assert_close(loss.detach(), loss64.detach(), rtol=0, atol=1e-12)
    for name, mine, t in zip(("logp", "old", "ref", "entropy", "advantages"), ours, tensors):
        want = t.grad if t.grad is not None else torch.zeros_like(t)
        got = mine if mine is not None else torch.zeros_like(t)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{form}: d loss / d {name}")
        if name != "advantages" or not per_sequence:
            assert (got[~counted] == 0).all(), f"{form}: uncounted tokens get exactly zero d loss / d {name}"
    assert set(stats64) <= set(stats)
    for k, v in stats64.items():
        torch.testing.assert_close(stats[k], v, rtol=0, atol=1e-12, msg=k)


def test_gspo_gradient_reaches_every_token_of_the_sequence():
    logp, old, ref, ent, adv, counted, _ = _batch(2, True)
    lp = logp.clone().requires_grad_()
    loss, _ = policy_loss_from_logprobs(lp, counted, old, adv.abs() + 0.1, ratio_level="sequence", clip_low=0.9,
                                        clip_high=9.0)
    loss.backward()
    # unclipped, A > 0: every counted token of a sequence gets the same -A w / (n B_eff ...) share
    for b in range(3):
        g = lp.grad[b][counted[b]]
        assert (g < 0).all() and torch.allclose(g, g[0].expand_as(g), rtol=1e-12, atol=0)


def test_uncounted_nan_inputs_never_reach_forms():
    logp, old, ref, ent, adv, counted, rollout = _batch(5, False)
    bad = ~counted
    for t in (old, ref, adv, rollout):
        t[bad] = float("nan")
    for opts in FORMS.values():
        lp = logp.clone().requires_grad_()
        kw = dict(opts, ref_logprobs=ref if opts.get("kl_coef") else None,
                  rollout_logprobs=rollout if opts.get("rollout_correction") else None)
        loss, stats = policy_loss_from_logprobs(lp, counted, old, adv, **kw)
        loss.backward()
        assert math.isfinite(loss.item()) and all(math.isfinite(v.item()) for v in stats.values()), opts
        assert torch.isfinite(lp.grad).all() and (lp.grad[bad] == 0).all(), opts


# ----------------------------------------------------------------------------------------
# Every backend, public ops (logits and fused-linear), vs the fp64 oracle
# ----------------------------------------------------------------------------------------

OP_FORMS = {
    "cispo": dict(policy_loss="cispo", clip_high=1.2),
    "sapo+k3": dict(policy_loss="sapo", kl_coef=0.05),
    "gspo": dict(ratio_level="sequence", clip_low=0.05, clip_high=0.08, loss_agg="seq-mean-token-mean"),
    "gspo+seq_mask": dict(ratio_level="sequence", rollout_correction="sequence_mask", rollout_is_min=0.3,
                          rollout_is_max=3.0, kl_coef=0.05, kl_is_correction=True),
    "cap+token_truncate": dict(ratio_cap=1.3, rollout_correction="token_truncate", rollout_is_max=1.2,
                               rollout_is_min=0.9),
    "icepop+kl-is+entropy": dict(rollout_correction="icepop", rollout_is_min=0.8, rollout_is_max=1.25, kl_coef=0.1,
                                 kl_is_correction=True, entropy_coef=0.01),
    "seq_truncate+cispo": dict(rollout_correction="sequence_truncate", rollout_is_max=1.5, policy_loss="cispo",
                               clip_high=5.0, loss_agg="seq-mean-token-sum"),
}
NB, NT, V, H = 3, 6, 257, 16


def _op_data(dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(NB, NT, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (NB, NT), generator=g)
    labels[0, -2:] = -100
    mask = torch.ones(NB, NT)
    mask[1, 4:] = 0
    lp0 = R.linear_token_logprobs(hidden.double(), weight.double(), labels)
    old = (lp0 + 0.3 * torch.randn(NB, NT, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.3 * torch.randn(NB, NT, generator=g, dtype=torch.float64)).float()
    rollout = (old.double() + 0.3 * torch.randn(NB, NT, generator=g, dtype=torch.float64)).float()
    rollout[2, 1] = float("nan")
    adv = torch.randn(NB, generator=g)
    return [t.to(dev) for t in (hidden, weight, labels, mask, old, ref, rollout, adv)]


def _kw(opts, ref, rollout):
    kw = dict(opts)
    if kw.get("kl_coef"):
        kw["ref_logprobs"] = ref
    if kw.get("rollout_correction"):
        kw["rollout_logprobs"] = rollout
    return kw


def _d64(t):
    return t.detach().double() if t.is_floating_point() else t


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("form", list(OP_FORMS))
def test_logits_op_matches_fp64_oracle(backend, form):
    dev = device_for(backend)
    hidden, weight, labels, mask, old, ref, rollout, adv = _op_data(dev)
    x = (hidden @ weight.T).requires_grad_()  # [B, T, V]
    kw = _kw(OP_FORMS[form], ref, rollout)
    loss, stats = fastrlhf.ppo_clip_loss(x, labels, old, adv, mask=mask, backend=backend, **kw)
    x64 = x.detach().double().requires_grad_()
    loss64, stats64 = R.ppo_clip_loss(x64, labels, old.double(), adv.double(), mask=mask,
                                      **{k: _d64(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - loss64.item()) <= 1e-5, (loss.item(), loss64.item())
    (grad,) = torch.autograd.grad(loss * 1.7, x)
    (grad64,) = torch.autograd.grad(loss64 * 1.7, x64)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-4)
    uncounted = (labels == -100) | (mask == 0)
    assert (grad[uncounted] == 0).all(), "masked and ignore_index tokens must get exactly zero gradient"
    for k, v in stats64.items():
        assert abs(stats[k].item() - v.item()) <= 1e-5, (k, stats[k].item(), v.item())


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("form", list(OP_FORMS))
def test_linear_op_matches_fp64_oracle(backend, form):
    dev = device_for(backend)
    hidden, weight, labels, mask, old, ref, rollout, adv = _op_data(dev)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    kw = _kw(OP_FORMS[form], ref, rollout)
    loss, stats = fastrlhf.linear_ppo_clip_loss(hidden, weight, labels, old, adv, mask=mask, chunk_size=5,
                                                backend=backend, **kw)
    fused = type(loss.grad_fn).__name__ == "LinearTokenSeparableLossBackward"
    assert fused == (kw.get("ratio_level", "token") == "token"), "token-local forms take the fused route, GSPO not"
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss64, stats64 = R.linear_ppo_clip_loss(h64, w64, labels, old.double(), adv.double(), mask=mask,
                                             **{k: _d64(v) if isinstance(v, torch.Tensor) else v
                                                for k, v in kw.items()})
    assert abs(loss.item() - loss64.item()) <= 2e-5, (loss.item(), loss64.item())
    grads = torch.autograd.grad(loss, (hidden, weight))
    grads64 = torch.autograd.grad(loss64, (h64, w64))
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=2e-5, rtol=1e-4)
    uncounted = (labels == -100) | (mask == 0)
    assert (grads[0][uncounted] == 0).all(), "masked and ignore_index tokens: exactly zero hidden gradient"
    for k, v in stats64.items():
        assert abs(stats[k].item() - v.item()) <= 2e-5, (k, stats[k].item(), v.item())


@pytest.mark.parametrize("backend", backends())
def test_grpo_loss_takes_the_forms(backend):
    dev = device_for(backend)
    hidden, weight, labels, mask, old, ref, rollout, adv = _op_data(dev)
    x = hidden @ weight.T
    opts = dict(policy_loss="sapo", ratio_level="sequence", rollout_correction="token_mask", rollout_is_min=0.5,
                rollout_is_max=2.0, rollout_logprobs=rollout, kl_is_correction=True)
    loss, _ = fastrlhf.grpo_loss(x, labels, old, adv, ref, beta=0.04, mask=mask, backend=backend, **opts)
    opts["rollout_logprobs"] = rollout.double()
    loss64, _ = R.grpo_loss(x.double(), labels, old.double(), adv.double(), ref.double(), beta=0.04, mask=mask, **opts)
    assert abs(loss.item() - loss64.item()) <= 1e-5


# ----------------------------------------------------------------------------------------
# Argument checks: a clear error naming the keyword
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,exc,match", [
    (dict(policy_loss="ppo"), ValueError, "policy_loss"),
    (dict(ratio_level="seq"), ValueError, "ratio_level"),
    (dict(policy_loss="cispo"), ValueError, "clip_high"),
    (dict(policy_loss="sapo", ratio_cap=2.0), ValueError, "ratio_cap"),
    (dict(policy_loss="cispo", clip_high=5.0, dual_clip=3.0), ValueError, "dual_clip"),
    (dict(ratio_cap=float("nan")), ValueError, "ratio_cap"),
    (dict(ratio_cap=0.0), ValueError, "ratio_cap"),
    (dict(sapo_tau_pos=0.0), ValueError, "sapo_tau_pos"),
    (dict(sapo_tau_neg=float("inf")), ValueError, "sapo_tau_neg"),
    (dict(kl_is_correction=1), TypeError, "kl_is_correction"),
    (dict(rollout_correction="tis"), ValueError, "rollout_correction"),
    (dict(rollout_correction="token_mask"), ValueError, "rollout_logprobs"),
    (dict(rollout_correction="token_truncate", rollout_logprobs="R"), ValueError, "rollout_is_max"),
    (dict(rollout_correction="token_mask", rollout_logprobs="R", rollout_is_min=2.0, rollout_is_max=1.0),
     ValueError, "rollout_is_min"),
    (dict(rollout_correction="token_mask", rollout_logprobs="R", rollout_is_max=float("nan")), ValueError,
     "rollout_is_max"),
    (dict(rollout_correction="token_mask", rollout_logprobs="R", rollout_is_min=-1.0), ValueError, "rollout_is_min"),
    (dict(rollout_logprobs="R"), ValueError, "rollout_correction"),
    (dict(rollout_is_max=2.0), ValueError, "rollout_correction"),
    (dict(rollout_correction="icepop", rollout_logprobs="short"), ValueError, "rollout_logprobs"),
    (dict(rollout_correction="icepop", rollout_logprobs="int"), TypeError, "rollout_logprobs"),
])
@pytest.mark.parametrize("op", ["logits", "linear"])
def test_argument_errors_name_the_keyword(kw, exc, match, op):
    hidden, weight, labels, mask, old, ref, rollout, adv = _op_data("cpu")
    subst = {"R": rollout, "short": rollout[:, :2], "int": labels}
    kw = {k: subst.get(v, v) if isinstance(v, str) and k == "rollout_logprobs" else v for k, v in kw.items()}
    with pytest.raises(exc, match=match):
        if op == "logits":
            fastrlhf.ppo_clip_loss(hidden @ weight.T, labels, old, adv, **kw)
        else:
            fastrlhf.linear_grpo_loss(hidden, weight, labels, old, adv, beta=0.0, **kw)
