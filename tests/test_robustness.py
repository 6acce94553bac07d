"""Hostile inputs and huge shapes on every public op and every backend (docs/robustness.md).

What each case must produce is written down in ``docs/robustness.md``; this file is its
executable form. Every op of the public API is driven through one harness (``run``), on every
backend of ``conftest.backends()`` (Triton under the interpreter on CPU, so shapes stay tiny):

- non-finite logits (or hidden states): the damage stays in that token's own outputs; every
  other token's values and gradients are bitwise those of a clean run; NaN in a token that
  does not count (``ignore_index`` / ``mask = 0``) changes nothing at all;
- every token uncounted: loss 0 (DPO: its zero-margin value), exactly zero gradients, no NaN;
- empty batches; int32 vs int64 labels (bitwise equal); out-of-range labels (``ValueError``);
  dtype / device / shape mismatches (clear errors naming the argument);
- logits that are not unit-stride over the vocabulary (transposes, ``[..., ::2]``);
- logits of +-1e4 in fp16 / bf16; temperature <= 0 (``ValueError``);
- N x V past 2^31 elements (int64 offsets) on CPU through zero-stride views, V = 262144, and a
  CUDA test (``@pytest.mark.gpu``) with real memory for Triton.

Every test states the wanted behaviour; the hostile uses of the API itself (in-place
backward, non-finite hyper-parameters, torch.compile, ...) are in ``tests/test_hostile.py``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, assert_grad_close, backends, device_for

import fastrlhf
from fastrlhf import reference as R

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = backends()
NAN, INF = float("nan"), float("inf")

TOKEN_OPS = ("token_logprobs", "token_logprobs_and_entropy", "entropy")
LOSS_OPS = ("ppo_clip_loss", "grpo_loss", "dpo_loss")
LINEAR_TOKEN_OPS = ("linear_token_logprobs", "linear_token_logprobs_and_entropy")
LINEAR_LOSS_OPS = ("linear_ppo_clip_loss", "linear_grpo_loss", "linear_dpo_loss")
LOGITS_OPS = TOKEN_OPS + LOSS_OPS
LINEAR_OPS = LINEAR_TOKEN_OPS + LINEAR_LOSS_OPS
ALL_OPS = LOGITS_OPS + LINEAR_OPS
LABEL_OPS = tuple(op for op in ALL_OPS if op != "entropy")
PPO_OPS = ("ppo_clip_loss", "grpo_loss", "linear_ppo_clip_loss", "linear_grpo_loss")
DPO_OPS = ("dpo_loss", "linear_dpo_loss")

# The harness batch: B = 4 sequences (two DPO pairs) of T = 2 tokens. Token (0, 0) carries
# ignore_index and token (3, 1) has mask 0, as prompt and padding tokens do.
B, T, V, H = 4, 2, 13, 6
IGNORED = (0, 0)
MASKED = (3, 1)


# ----------------------------------------------------------------------------------------
# Harness: one call convention for every public op
# ----------------------------------------------------------------------------------------


def make_batch(B=B, T=T, V=V, H=H, dtype=torch.float32, seed=0, device="cpu"):
    """Every input any op needs, on ``device``; logits / hidden / weight / bias in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    if B * T:
        labels[IGNORED] = -100
    mask = torch.ones(B, T)
    if B > MASKED[0] and T > MASKED[1]:
        mask[MASKED] = 0.0
    old = torch.randn(B, T, generator=g) * 0.3 - math.log(V)  # near the logp of a random policy
    batch = dict(
        logits=(torch.randn(B, T, V, generator=g) * 2).to(dtype),
        hidden=torch.randn(B, T, H, generator=g).to(dtype),
        weight=(torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(dtype),
        bias=(torch.randn(V, generator=g) * 0.5).to(dtype),
        labels=labels,
        mask=mask,
        old=old,
        ref=old + 0.2 * torch.randn(B, T, generator=g),
        adv=torch.randn(B, T, generator=g),
        adv_seq=torch.randn(B, generator=g),
        ref_c=torch.randn(B // 2, generator=g) - 3.0,
        ref_r=torch.randn(B // 2, generator=g) - 3.0,
    )
    return {k: v.to(device) for k, v in batch.items()}


def _near_policy(b, temperature=1.0):
    """Old / reference logprobs near the current ones (PPO ratios near 1, KL small)."""
    lp = R.token_logprobs(b["logits"].double(), b["labels"], temperature=temperature).float()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn((2,) + tuple(lp.shape), generator=g).to(lp.device)
    return dict(b, old=lp + 0.1 * noise[0], ref=lp + 0.1 * noise[1])


def leaves_of(op, b=None):
    if not op.startswith("linear_"):
        return ("logits",)
    return ("hidden", "weight") + (("bias",) if b is None or b.get("bias") is not None else ())


def call(op, b, *, backend="torch", lib=fastrlhf, **kw):
    """``(values dict, scalar to differentiate)``: the op of ``lib`` (fastrlhf or the reference)."""
    extra = dict(backend=backend) if lib is fastrlhf else {}
    extra.update(kw)
    lin = op.startswith("linear_")
    first = (b["hidden"], b["weight"]) if lin else (b["logits"],)
    if lin:
        extra.setdefault("bias", b.get("bias"))
    fn = getattr(lib, op)
    base = op.removeprefix("linear_")
    g = torch.Generator().manual_seed(123)
    up = torch.randn(b["labels"].shape, generator=g, dtype=torch.float64).to(b["labels"].device)
    up2 = torch.randn(b["labels"].shape, generator=g, dtype=torch.float64).to(b["labels"].device)
    if base == "token_logprobs":
        lp = fn(*first, b["labels"], **extra)
        return {"logp": lp}, (lp.double() * up).sum()
    if base == "token_logprobs_and_entropy":
        lp, ent = fn(*first, b["labels"], **extra)
        return {"logp": lp, "entropy": ent}, (lp.double() * up).sum() + (ent.double() * up2).sum()
    if base == "entropy":
        ent = fn(*first, **extra)
        return {"entropy": ent}, (ent.double() * up2).sum()
    if base == "ppo_clip_loss":
        opts = dict(mask=b["mask"], ref_logprobs=b["ref"], kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0)
        opts.update(extra)
        loss, stats = fn(*first, b["labels"], b["old"], b["adv"], **opts)
    elif base == "grpo_loss":
        opts = dict(beta=0.04, mask=b["mask"], loss_agg="seq-mean-token-mean", clip_high=0.28)
        opts.update(extra)
        loss, stats = fn(*first, b["labels"], b["old"], b["adv_seq"], b["ref"], **opts)
    elif base == "dpo_loss":
        loss, stats = fn(*first, b["labels"], b["ref_c"], b["ref_r"], **extra)
    else:
        raise ValueError(op)
    return {"loss": loss, **{k: v for k, v in stats.items()}}, loss


def run(op, b, backend, *, lib=fastrlhf, views=None, **kw):
    """Run ``op`` on fresh leaf copies of ``b``; ``(values, grads)`` with grads keyed by leaf name.

    ``views`` maps a leaf name to a function applied after the copy (e.g. ``t[..., ::2]``), so
    that the op sees that exact layout (``clone`` would densify a non-dense view)."""
    b = dict(b)
    names = leaves_of(op, b)
    leaves = {n: b[n].detach().clone().requires_grad_() for n in names}
    for n in names:
        b[n] = (views or {}).get(n, lambda t: t)(leaves[n])
    values, scalar = call(op, b, backend=backend, lib=lib, **kw)
    grads = dict(zip(names, torch.autograd.grad(scalar, [leaves[n] for n in names])))
    return {k: v.detach() for k, v in values.items()}, grads


def _reference_run(op, b, **kw):
    """The oracle through the same harness (``fastrlhf.reference`` has the same signatures)."""
    return run(op, b, None, lib=R, **kw)


def poison(b, op, where, value, col=None):
    """A copy of ``b`` with one logit (or, for linear ops, one hidden unit) of token ``where`` set."""
    b = dict(b)
    if op.startswith("linear_"):
        b["hidden"] = b["hidden"].clone()
        b["hidden"][where + (0,)] = value
    else:
        b["logits"] = b["logits"].clone()
        if col is None:
            col = (int(b["labels"][where]) + 1) % b["logits"].shape[-1]  # not the label's own logit
        b["logits"][where + (col,)] = value
    return b


def assert_same(a, b, msg=""):
    """Bitwise equality that treats NaN == NaN (``torch.equal`` does not)."""
    assert a.shape == b.shape and a.dtype == b.dtype, msg
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    assert bool(same.all()), f"{msg}: {(~same).sum().item()} entries differ"


def token_rows(t, where):
    """Everything of a per-token ``[B, T, ...]`` tensor except token ``where``."""
    keep = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    keep[where] = False
    return t[keep]


def pair_rows(t, pair):
    """Everything of ``[2B', T, ...]`` except the chosen and rejected rows of DPO pair ``pair``."""
    keep = torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
    keep[pair] = False
    keep[pair + t.shape[0] // 2] = False
    return t[keep]


# ----------------------------------------------------------------------------------------
# Non-finite logits: confined to their own token
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "op,value",
    [(op, NAN) for op in TOKEN_OPS + LINEAR_TOKEN_OPS] + [(op, INF) for op in TOKEN_OPS],  # inf hidden: NaN logits
    ids=[f"{op}-nan" for op in TOKEN_OPS + LINEAR_TOKEN_OPS] + [f"{op}-inf" for op in TOKEN_OPS],
)
def test_nonfinite_logit_stays_in_its_token(backend, op, value):
    dev = device_for(backend)
    b = make_batch(device=dev)
    where = (1, 0)
    clean_v, clean_g = run(op, b, backend)
    bad = poison(b, op, where, value)
    before = {k: v.clone() for k, v in bad.items()}
    vals, grads = run(op, bad, backend)
    for k, v in vals.items():
        assert not torch.isfinite(v[where]), f"{k} of the poisoned token must not look valid"
        assert_same(token_rows(v, where), token_rows(clean_v[k], where), f"{k} of the other tokens")
    if op.startswith("linear_"):
        assert_same(token_rows(grads["hidden"], where), token_rows(clean_g["hidden"], where), "d hidden")
        # dW and db sum over every token: a counted NaN token poisons them (documented).
        assert not torch.isfinite(grads["weight"]).all()
    else:
        assert_same(token_rows(grads["logits"], where), token_rows(clean_g["logits"], where), "d logits")
    for k in before:
        assert_same(bad[k], before[k], f"input {k} modified")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_neg_inf_vocabulary_entries_are_legal(backend, dtype):
    """-inf logits (a masked / padded vocabulary) are a valid input; a row that is -inf
    everywhere is not (its softmax is undefined) and stays confined like a NaN."""
    dev = device_for(backend)
    b = make_batch(dtype=dtype, device=dev)
    b["logits"][..., 3:6] = -INF
    b["labels"] = torch.where(b["labels"].ge(3) & b["labels"].lt(6), 0, b["labels"])
    vals, grads = run("token_logprobs_and_entropy", b, backend)
    b64 = dict(b, logits=b["logits"].double())
    ref_v, ref_g = run("token_logprobs_and_entropy", b64, "torch")
    for k in vals:
        assert torch.isfinite(vals[k]).all()
        torch.testing.assert_close(vals[k].double(), ref_v[k], atol=2e-5, rtol=0)
    assert torch.isfinite(grads["logits"]).all() and (grads["logits"][..., 3:6] == 0).all()
    assert_grad_close(grads["logits"], ref_g["logits"], dtype)
    # A whole row of -inf: undefined (NaN or inf) for that token only, never a crash.
    where = (2, 1)
    b["logits"][where] = -INF
    vals2, grads2 = run("token_logprobs_and_entropy", b, backend)
    assert not torch.isfinite(vals2["logp"][where])
    for k in vals:
        assert_same(token_rows(vals2[k], where), token_rows(vals[k], where), k)
    assert_same(token_rows(grads2["logits"], where), token_rows(grads["logits"], where), "d logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LABEL_OPS)
def test_nan_in_an_ignored_token_changes_nothing(backend, op):
    """A token whose label is ignore_index (prompt, padding) may hold any garbage."""
    dev = device_for(backend)
    b = make_batch(device=dev)
    clean_v, clean_g = run(op, b, backend)
    vals, grads = run(op, poison(b, op, IGNORED, NAN), backend)
    for k in clean_v:
        assert_same(vals[k], clean_v[k], k)
    for k in clean_g:
        assert_same(grads[k], clean_g[k], f"d {k}")
    if not op.startswith("linear_"):
        assert (grads["logits"][IGNORED] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PPO_OPS)
def test_nan_in_a_masked_token_changes_nothing(backend, op):
    """mask = 0 means "does not count", like ignore_index: a NaN logit there (e.g. a padding
    position after a fully masked attention row) must not reach the loss or any gradient."""
    dev = device_for(backend)
    b = make_batch(device=dev)
    clean_v, clean_g = run(op, b, backend)
    vals, grads = run(op, poison(b, op, MASKED, NAN), backend)
    for k in clean_v:
        assert_same(vals[k], clean_v[k], k)
    for k in clean_g:
        assert_same(grads[k], clean_g[k], f"d {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LOSS_OPS + LINEAR_LOSS_OPS)
def test_nan_in_a_counted_token_poisons_the_loss_not_the_other_gradients(backend, op):
    """A counted NaN token makes the loss NaN (it is part of the sum: hiding it would hide a
    diverged model). The gradient of every token whose loss term does not involve it is
    unchanged: every other token for PPO/GRPO, every other pair for DPO."""
    dev = device_for(backend)
    b = make_batch(device=dev)
    where = (1, 0)  # counted (label valid, mask 1); DPO pair 1 (chosen row 1, rejected row 3)
    clean_v, clean_g = run(op, b, backend)
    vals, grads = run(op, poison(b, op, where, NAN), backend)
    assert torch.isnan(vals["loss"])
    key = "hidden" if op.startswith("linear_") else "logits"
    if op in DPO_OPS:
        assert_same(pair_rows(grads[key], 1), pair_rows(clean_g[key], 1), f"d {key} of the other pair")
    else:
        assert_same(token_rows(grads[key], where), token_rows(clean_g[key], where), f"d {key} of other tokens")


# ----------------------------------------------------------------------------------------
# Nothing counts: every token masked or ignored
# ----------------------------------------------------------------------------------------


def _all_uncounted(b, how):
    b = dict(b, ref_c=torch.zeros_like(b["ref_c"]), ref_r=torch.zeros_like(b["ref_r"]))
    if how == "ignore_index":
        b["labels"] = torch.full_like(b["labels"], -100)
    else:
        b["mask"] = torch.zeros_like(b["mask"])
    return b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "op,how", [(op, "ignore_index") for op in LABEL_OPS] + [(op, "mask") for op in PPO_OPS],
    ids=[f"{op}-ignore_index" for op in LABEL_OPS] + [f"{op}-mask" for op in PPO_OPS],
)
def test_every_token_uncounted(backend, op, how):
    dev = device_for(backend)
    b = _all_uncounted(make_batch(device=dev), how)
    vals, grads = run(op, b, backend)
    for k, v in vals.items():
        assert torch.isfinite(v).all(), k
    if op in PPO_OPS:
        assert vals["loss"].item() == 0.0 and vals["num_tokens"].item() == 0.0
    elif op in DPO_OPS:
        # Sequence logps are 0 on both sides: zero margin, loss = -logsigmoid(0) = log 2.
        assert vals["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert all((v == 0).all() for v in vals.values())
    for k, g in grads.items():
        assert (g == 0).all(), f"d {k} must be exactly zero"


# ----------------------------------------------------------------------------------------
# Empty batches
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("kind", ["no_sequences", "no_tokens"])
def test_empty_batch(backend, op, kind):
    """B = 0 (no sequences) or T = 0 (no tokens): N = 0. Empty per-token outputs, zero losses,
    gradients of the right shape (zeros for the weight and bias), no NaN, no crash."""
    dev = device_for(backend)
    shape = dict(B=0, T=T) if kind == "no_sequences" else dict(B=B, T=0)
    b = make_batch(device=dev, **shape)
    b["ref_c"], b["ref_r"] = torch.zeros_like(b["ref_c"]), torch.zeros_like(b["ref_r"])
    vals, grads = run(op, b, backend)
    for k, v in vals.items():
        assert torch.isfinite(v).all(), f"{k} = {v}"
        if "loss" not in vals:  # per-token outputs
            assert v.shape == b["labels"].shape and v.dtype == torch.float32
    if "loss" in vals:
        # DPO: B pairs of empty sequences have zero margin (log 2); no pairs at all give 0.
        expected = math.log(2) if op in DPO_OPS and kind == "no_tokens" else 0.0
        assert vals["loss"].item() == pytest.approx(expected, abs=1e-6)
    for k, g in grads.items():
        assert g.shape == b[k].shape and (g == 0).all(), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:std\\(\\)")  # torch warns on the std of an empty [0, G] tensor
def test_empty_advantages_and_kl(backend):
    dev = device_for(backend)
    for shape in ((0, 5), (3, 0)):
        z = torch.zeros(shape, device=dev)
        adv, ret = fastrlhf.gae(z, z, z.bool(), gamma=0.99, lam=0.95, backend=backend)
        assert adv.shape == shape and ret.shape == shape
    assert fastrlhf.group_advantages(torch.zeros(0, 4), 4).shape == (0, 4)
    assert fastrlhf.group_advantages(torch.zeros(0), 4).shape == (0,)
    assert fastrlhf.kl_estimate(torch.zeros(0), torch.zeros(0)).shape == (0,)


# ----------------------------------------------------------------------------------------
# Labels: int32 == int64, out of range -> ValueError
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LABEL_OPS)
def test_int32_and_int64_labels_are_bitwise_equal(backend, op):
    dev = device_for(backend)
    b = make_batch(device=dev)
    v64, g64 = run(op, b, backend)
    v32, g32 = run(op, dict(b, labels=b["labels"].int()), backend)
    for k in v64:
        assert_same(v32[k], v64[k], k)
    for k in g64:
        assert_same(g32[k], g64[k], f"d {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", LABEL_OPS)
def test_out_of_range_labels_raise(backend, op):
    dev = device_for(backend)
    b = make_batch(device=dev)
    before = b["logits"].clone()
    bad_values = [(V, torch.int64), (-1, torch.int64), (-101, torch.int32), (2**31 - 1, torch.int32),
                  (2**40, torch.int64)]
    for bad, dt in bad_values:
        labels = b["labels"].clone().to(dt)
        labels[2, 1] = bad
        with pytest.raises(ValueError, match=f"labels contains {bad}"):
            call(op, dict(b, labels=labels), backend=backend)
    # With ignore_index=-1 the default -100 is just another out-of-range label.
    with pytest.raises(ValueError, match="labels contains -100"):
        call(op, b, backend=backend, ignore_index=-1)
    assert_same(b["logits"], before, "logits modified by a failed call")


# ----------------------------------------------------------------------------------------
# Mixed dtypes, devices and shapes: clear errors naming the argument
# ----------------------------------------------------------------------------------------

# (op, input key, replacement, exception, message). "meta" tensors stand in for "another
# device": a CPU-only machine has no second real device, and the checks compare devices only.
# GRPO takes per-sequence advantages ("adv_seq"); ``[..., :1]`` breaks the shape of either.
PER_TOKEN = {"old": "old_logprobs", "adv": "advantages", "mask": "mask", "ref": "ref_logprobs"}


def _adv_key(op, key):
    return "adv_seq" if key == "adv" and "grpo" in op else key


def _to_meta(t):
    return t.to("meta")


def _mismatch_cases():
    cases = []
    for op in LABEL_OPS:
        cases += [
            (op, "labels", lambda t: t.float(), TypeError, "labels must be int32 or int64"),
            (op, "labels", _to_meta, ValueError, "labels .*meta|meta.*labels"),
            (op, "labels", lambda t: t[:, :1], ValueError, "labels"),
        ]
    for op in LOGITS_OPS:
        cases.append((op, "logits", lambda t: t.long(), TypeError, "logits must be"))
    for op in LINEAR_OPS:
        cases += [
            (op, "hidden", lambda t: t.double(), TypeError, "weight dtype"),
            (op, "bias", lambda t: t.half(), TypeError, "bias dtype"),
            (op, "weight", _to_meta, ValueError, "weight is on meta"),
            (op, "weight", lambda t: t[:, :-1], ValueError, "H = weight.shape"),
        ]
    for op in PPO_OPS:
        for key, name in PER_TOKEN.items():
            key = _adv_key(op, key)
            cases += [
                (op, key, _to_meta, ValueError, f"{name} is on meta"),
                (op, key, lambda t: t[..., :1], ValueError, f"{name} must have the shape"),
            ]
            if key != "mask":
                cases.append((op, key, lambda t: t.long(), TypeError, f"{name} must be a floating-point"))
    for op in DPO_OPS:
        cases += [
            (op, "ref_c", lambda t: t[:0], ValueError, "ref_chosen_logps must be"),
            (op, "ref_r", lambda t: t.unsqueeze(1), ValueError, "ref_rejected_logps must be"),
            pytest.param(op, "ref_c", _to_meta, ValueError, "ref_chosen_logps is on meta"),
        ]
    return cases


MISMATCHES = _mismatch_cases()


def _mismatch_id(case):
    values = case.values if hasattr(case, "values") else case
    kind = {TypeError: "dtype"}.get(values[3], "meta" if values[2] is _to_meta else "shape")
    if values[3] is TypeError and values[1] == "logits":
        kind = "int"
    return f"{values[0]}-{values[1]}-{kind}"


@pytest.mark.parametrize("op,key,change,exc,msg", MISMATCHES, ids=[_mismatch_id(c) for c in MISMATCHES])
def test_mismatched_inputs_raise_clearly(op, key, change, exc, msg):
    """Validation happens before any backend runs, so one backend ("torch") covers them all."""
    b = make_batch()
    b[key] = change(b[key])
    with pytest.raises(exc, match=msg):
        call(op, b, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_and_group_advantages_reject_bad_inputs(backend):
    dev = device_for(backend)
    r = torch.randn(2, 5, device=dev)
    with pytest.raises(ValueError, match="mask is on meta"):
        fastrlhf.gae(r, r, torch.ones(2, 5, device="meta"), backend=backend)
    with pytest.raises(ValueError, match="values must have the shape"):
        fastrlhf.gae(r, r[:, :4], r > 0, backend=backend)
    with pytest.raises(ValueError, match="gamma"):
        fastrlhf.gae(r, r, r > 0, gamma=1.5, backend=backend)
    with pytest.raises(ValueError, match="G = 4"):
        fastrlhf.group_advantages(torch.randn(6), 4)
    with pytest.raises(ValueError, match="ref_logp"):
        fastrlhf.kl_estimate(torch.randn(3, 2), torch.randn(2))


# ----------------------------------------------------------------------------------------
# Logits that are not unit-stride over the vocabulary
# ----------------------------------------------------------------------------------------


# (storage the gradient lands on, the view the op gets): [B, V, T] storage viewed as
# [B, T, V] (stride(-1) = T), and every other entry of a [B, T, 2V] buffer (stride(-1) = 2).
STRIDED = {
    "transposed": ((B, V, T), lambda t: t.transpose(1, 2)),
    "every_other": ((B, T, 2 * V), lambda t: t[..., ::2]),
}


def _stride_params():
    out = []
    for backend in BACKENDS + ["auto"]:
        for layout in ("transposed", "every_other"):
            out.append(pytest.param(backend, layout, id=f"{backend}-{layout}"))
    return out


@pytest.mark.parametrize("backend,layout", _stride_params())
def test_vocab_stride_not_one(backend, layout):
    """Triton and torch read any stride; native needs stride(-1) == 1 and says so; auto must work."""
    dev = device_for(backend)
    shape, view = STRIDED[layout]
    g = torch.Generator().manual_seed(3)
    b = make_batch(device=dev)
    b["logits"] = (torch.randn(shape, generator=g) * 2).to(dev)
    assert view(b["logits"]).stride(-1) != 1
    ops = ("token_logprobs_and_entropy", "entropy", "ppo_clip_loss", "dpo_loss")
    if backend == "native":
        for op in ops:
            with pytest.raises(ValueError, match="stride"):
                call(op, dict(b, logits=view(b["logits"])), backend=backend)
        return
    for op in ops:
        vals, grads = run(op, b, backend, views={"logits": view})
        ref_v, ref_g = _reference_run(op, dict(b, logits=b["logits"].double()), views={"logits": view})
        for k in ref_v:
            assert abs(vals[k].double() - ref_v[k].double()).max().item() <= 2e-5, (op, k)
        torch.testing.assert_close(grads["logits"].double(), ref_g["logits"], atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------
# Logits of +-1e4 in fp16 / bf16
# ----------------------------------------------------------------------------------------


def _big_logits(sign, dtype, dev, shape=(B, T, V)):
    """``sign * 1e4 + k * ulp`` with ``k`` in -2..2 (fp16's ulp at 1e4 is 8, bf16's 64): exact in
    ``dtype``, a few ulps apart with ties, as a model with a huge logit offset would give."""
    ulp = 8.0 if dtype == torch.float16 else 64.0
    g = torch.Generator().manual_seed(11)
    k = torch.randint(-2, 3, shape, generator=g).double()
    x = (sign * 1e4 + k * ulp).to(dtype)
    assert torch.equal(x.double(), (sign * 1e4 + k * ulp).to(dtype).double())
    return x.to(dev)


def _big_params():
    out = []
    for backend in BACKENDS:
        for dtype in (torch.float16, torch.bfloat16):
            for sign in (1.0, -1.0):
                name = f"{backend}-{str(dtype).split('.')[-1]}-{'+' if sign > 0 else '-'}1e4"
                out.append(pytest.param(backend, dtype, sign, id=name))
    return out


def ulp32(x: float) -> float:
    """Spacing of fp32 numbers at magnitude ``x``."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 2.0**-126))) - 23)


def _big_batch(sign, dtype, dev, temperature=1.0):
    b = make_batch(device=dev)
    b["logits"] = _big_logits(sign, dtype, dev)
    # Old / reference logprobs near the true ones, so that PPO ratios stay near 1 instead of
    # exp(+-20) amplifying every rounding (as they would for any implementation).
    return _near_policy(b, temperature)


@pytest.mark.parametrize("backend,dtype,sign", _big_params())
def test_logits_of_1e4_in_half_precision(backend, dtype, sign):
    """No overflow (every value and gradient finite) and accuracy as the other tests, the
    error against fp64 at most twice that of PyTorch's own fp32 composition (the reference
    with ``upcast=True``), plus the fp32 spacing at the logits' magnitude: logsumexp is kept
    in fp32 as an absolute number, so ``logp = x - lse`` and ``p = exp(x - lse)`` carry its
    rounding (ulp_32(1e4) ~ 1e-3), which PyTorch's ``log_softmax`` avoids by subtracting the
    max first (docs/robustness.md, "Precision at huge logits"). Regression: the torch path's
    entropy was lse - sum(p * x), off by 4.8 here (fixed in _rows.py)."""
    dev = device_for(backend)
    for op in ("token_logprobs_and_entropy", "entropy", "ppo_clip_loss", "dpo_loss"):
        for temperature in (1.0, 0.5):
            b = _big_batch(sign, dtype, dev, temperature)
            ulp_x = ulp32(1e4 / temperature)
            vals, grads = run(op, b, backend, temperature=temperature)
            ref64_v, ref64_g = _reference_run(op, dict(b, logits=b["logits"].double()), temperature=temperature)
            ref32_v, ref32_g = _reference_run(op, b, temperature=temperature)  # fp32 math on the half inputs
            for k in ref64_v:
                assert torch.isfinite(vals[k]).all(), (op, k)
                err = (vals[k].double() - ref64_v[k].double()).abs().max().item()
                own = (ref32_v[k].double() - ref64_v[k].double()).abs().max().item()
                assert err <= 2 * own + 2 * ulp_x, (op, k, temperature, err, own)
            g, g64, g32 = grads["logits"], ref64_g["logits"], ref32_g["logits"]
            assert torch.isfinite(g).all(), op
            err = (g.double() - g64).abs().max().item()
            own = max((g32.double() - g64).abs().max().item(), (g64.to(dtype).double() - g64).abs().max().item())
            assert err <= 2 * own + 2 * ulp_x / temperature, (op, "grad", temperature, err, own)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_ops_with_logits_of_1e4(backend, dtype):
    """The fused-linear path makes its logits with a matmul in ``dtype``; with ``H = 1`` and
    ``hidden = 1`` that matmul is exact, so the logits are exactly the +-1e4 values above."""
    dev = device_for(backend)
    b = _big_batch(1.0, dtype, dev)
    k = torch.tensor([0, 0, 0, -1, -1, -2, -2, 1, 1, 1, -2, 0, -1], dtype=torch.float64)  # 3-way tie at the max
    ulp = 8.0 if dtype == torch.float16 else 64.0
    b["weight"] = (1e4 + k * ulp).to(dtype).reshape(V, 1).to(dev)
    b["hidden"] = torch.ones(B, T, 1, dtype=dtype, device=dev)
    b["bias"] = None
    b["logits"] = b["weight"].reshape(1, 1, V).expand(B, T, V)  # what hidden @ weight.T is, exactly
    lp = R.token_logprobs(b["logits"].double(), b["labels"]).float()
    b["old"], b["ref"] = lp - 0.05, lp + 0.05
    for op in ("linear_token_logprobs_and_entropy", "linear_ppo_clip_loss"):
        vals, _ = run(op, b, backend)
        ref64_v, _ = _reference_run(op, dict(b, hidden=b["hidden"].double(), weight=b["weight"].double()))
        ref32_v, _ = _reference_run(op, b)
        for k in ref64_v:
            assert torch.isfinite(vals[k]).all(), (op, k)
            err = (vals[k].double() - ref64_v[k].double()).abs().max().item()
            own = (ref32_v[k].double() - ref64_v[k].double()).abs().max().item()
            assert err <= 2 * own + 2 * ulp32(1e4), (op, k, err, own)


# ----------------------------------------------------------------------------------------
# Temperature
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
def test_temperature_must_be_positive_and_finite(backend, op):
    dev = device_for(backend)
    b = make_batch(device=dev)
    for t in (0.0, -0.0, -1.0, NAN, INF, -INF):
        with pytest.raises(ValueError, match="temperature"):
            call(op, b, backend=backend, temperature=t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperature_is_finite(backend):
    """temperature = 1e-4 turns logits of ~3 into ~3e4: still far from fp32 overflow."""
    dev = device_for(backend)
    b = make_batch(device=dev)
    vals, grads = run("token_logprobs_and_entropy", b, backend, temperature=1e-4)
    ref_v, _ = _reference_run("token_logprobs_and_entropy", dict(b, logits=b["logits"].double()), temperature=1e-4)
    for k in vals:
        assert torch.isfinite(vals[k]).all()
        assert (vals[k].double() - ref_v[k]).abs().max().item() <= 2 * ulp32(b["logits"].abs().max().item() * 1e4)
    assert torch.isfinite(grads["logits"]).all()


# ----------------------------------------------------------------------------------------
# Huge shapes: N x V past 2^31 elements, V = 262144
# ----------------------------------------------------------------------------------------

# 8193 rows of V = 262144 (Gemma's 256000 rounded up to a power of two): 2^31 + 2^18 elements,
# so every flat element offset past row 8192 needs 64 bits. Expanded from one row (stride 0
# over N), the view costs 1 MiB; the passes still read all 2^31 elements.
HUGE_N, HUGE_V = 8193, 262144
assert HUGE_N * HUGE_V > 2**31


def _huge_labels(N, V, seed=0):
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed))
    labels[0], labels[-1], labels[N // 2] = V - 1, 0, -100
    return labels


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("native", "torch")])
def test_rows_past_2_31_elements_cpu(backend):
    """Forward over N x V > 2^31 elements: every row equals the same row computed alone.

    native: logprobs and entropy of a 3-D ``[B, T, V]`` view (the b / t split of the flat row
    index and both row strides). torch: logprobs of an ``[N, V]`` view (its chunked pass costs
    ~10 s per 2^31 elements on one core and has no index arithmetic of its own to check)."""
    g = torch.Generator().manual_seed(0)
    if backend == "torch":
        base = torch.randn(1, HUGE_V, generator=g) * 2  # [1, V]
        x = base.expand(HUGE_N, HUGE_V)  # [N, V], strides (0, 1)
        labels = _huge_labels(HUGE_N, HUGE_V)
        lp = fastrlhf.token_logprobs(x, labels, backend=backend)
        logsm = torch.log_softmax(base[0].double(), -1)  # [V]
        expect = torch.where(labels == -100, 0.0, logsm[labels.clamp_min(0)])
        assert lp.shape == (HUGE_N,)
        torch.testing.assert_close(lp.double(), expect, atol=2e-5, rtol=0)
        return
    # [B, T, V] = [129, 64, V]: 64 distinct rows, repeated over B with stride_b = 0.
    Bh, Th = 129, 64
    base3 = torch.randn(Th, HUGE_V, generator=g) * 2  # [T, V], 64 MiB
    x3 = base3.unsqueeze(0).expand(Bh, Th, HUGE_V)  # [B, T, V], strides (0, V, 1)
    assert x3.numel() > 2**31
    labels3 = _huge_labels(Bh * Th, HUGE_V, seed=1).view(Bh, Th)
    lp3, ent3 = fastrlhf.token_logprobs_and_entropy(x3, labels3, backend=backend)
    logsm3 = torch.log_softmax(base3.double(), -1)  # [T, V]
    t_idx = torch.arange(Th).expand(Bh, Th)
    counted = labels3 != -100
    expect_lp = torch.where(counted, logsm3[t_idx, labels3.clamp_min(0)], 0.0)
    expect_h = torch.where(counted, -(logsm3.exp() * logsm3).sum(-1).expand(Bh, Th), 0.0)
    assert lp3.shape == (Bh, Th)
    torch.testing.assert_close(lp3.double(), expect_lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent3.double(), expect_h, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_262144_forward_and_backward(backend):
    """The largest vocabulary of the contract (more than any BLOCK_V), values and gradients."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 3, HUGE_V, generator=g) * 2).to(dev).requires_grad_()
    labels = torch.tensor([[0, HUGE_V - 1, 123457]], device=dev)
    b = _near_policy(dict(make_batch(B=1, T=3, device=dev), logits=x.detach(), labels=labels))
    for op in ("token_logprobs_and_entropy", "ppo_clip_loss"):
        vals, grads = run(op, b, backend)
        ref_v, ref_g = _reference_run(op, dict(b, logits=b["logits"].double()))
        for k in ref_v:
            assert (vals[k].double() - ref_v[k]).abs().max().item() <= 2e-5, (op, k)
        torch.testing.assert_close(grads["logits"].double(), ref_g["logits"], atol=1e-6, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_rows_past_2_31_elements_triton():
    """Real memory on CUDA: [2, 4100, 262144] bf16 = 2^31 + 2^22 elements (4.3 GB, and as much
    for the gradient). Values and gradients of the last sequence, whose rows sit past element
    2^31, against the reference run on that sequence alone."""
    Bg, Tg, Vg = 2, 4100, HUGE_V
    assert Bg * Tg * Vg > 2**31
    torch.manual_seed(0)
    x = torch.randn(Bg, Tg, Vg, device="cuda", dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, Vg, (Bg, Tg), device="cuda")
    labels[:, -1] = Vg - 1
    lp, ent = fastrlhf.token_logprobs_and_entropy(x, labels, backend="triton")
    (grad,) = torch.autograd.grad((lp + ent).sum(), x)
    tail = slice(Tg - 8, Tg)
    x64 = x.detach()[1:, tail].double().requires_grad_()  # [1, 8, V]: rows past 2^31 elements
    lp64, ent64 = R.token_logprobs_and_entropy(x64, labels[1:, tail])
    torch.testing.assert_close(lp[1:, tail].double(), lp64, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent[1:, tail].double(), ent64, atol=2e-5, rtol=0)
    (grad64,) = torch.autograd.grad((lp64 + ent64).sum(), x64)
    assert_grad_close(grad[1:, tail], grad64, torch.bfloat16)
    del grad
    # The fused PPO kernel (loss + gradient in one launch). seq-mean-token-sum weights a token
    # by 1 / B only, so the last sequence's gradient is its own loss's gradient / B.
    old = lp.detach() + 0.1 * torch.randn_like(lp)
    adv = torch.randn(Bg, Tg, device="cuda")
    loss, _ = fastrlhf.ppo_clip_loss(x, labels, old, adv, loss_agg="seq-mean-token-sum", backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach()[1:].double().requires_grad_()  # [1, T, V] fp64: 8.6 GB
    loss64, _ = R.ppo_clip_loss(x64, labels[1:], old[1:].double(), adv[1:].double(), loss_agg="seq-mean-token-sum")
    (grad64,) = torch.autograd.grad(loss64 / Bg, x64)
    assert_grad_close(grad[1:, tail], grad64[:, tail], torch.bfloat16)


# ----------------------------------------------------------------------------------------
# Environment: Triton imported before fastrlhf (CPU only)
# ----------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA or "triton" not in BACKENDS, reason="the interpreter is only chosen without CUDA")
def test_triton_imported_before_fastrlhf():
    """``import triton`` (or anything importing it, e.g. torch's error paths) before fastrlhf
    sets TRITON_INTERPRET: backend='triton' must then work or say what to do, not crash inside
    the interpreter."""
    code = (
        "import triton, torch, fastrlhf\n"
        "try:\n"
        "    fastrlhf.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend='triton')\n"
        "    print('WORKS')\n"
        "except (RuntimeError, ValueError) as e:\n"
        "    print('CLEAR' if 'TRITON_INTERPRET' in str(e) else 'UNCLEAR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.startswith(("WORKS", "CLEAR")), out.stdout + out.stderr[-2000:]


# ----------------------------------------------------------------------------------------
# Log-ratios beyond the +-20 clamp (stale old_logprobs, a diverged policy)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "backend", BACKENDS
)
def test_log_ratio_beyond_the_clamp(backend):
    """old_logprobs 30 nats away from the policy: ratios are clamped at exp(+-20), every value
    and gradient stays finite, and every backend reports the same loss, stats and gradient."""
    dev = device_for(backend)
    b = _near_policy(make_batch(device=dev))
    b["old"] = b["old"] - 30.0  # r = old - logp ~ -30: ratio = exp(+20) after the clamp
    vals, grads = run("ppo_clip_loss", b, backend)
    want_v, want_g = run("ppo_clip_loss", b, "torch")
    for k in want_v:
        assert torch.isfinite(vals[k]), k
        assert abs(vals[k].item() - want_v[k].item()) <= 1e-5 * max(1.0, abs(want_v[k].item())), k
    assert torch.isfinite(grads["logits"]).all()
    torch.testing.assert_close(grads["logits"], want_g["logits"], atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------
# Half-precision per-token inputs
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_estimate_of_half_precision_logprobs(dtype):
    lp = torch.tensor([-3.0, -3.0, -1.0, -10.0]).to(dtype)
    ref = torch.tensor([-2.984375, -3.015625, -1.0078125, -9.0]).to(dtype)  # exact in both dtypes
    for est in ("k1", "k2", "k3"):
        kl = fastrlhf.kl_estimate(lp, ref, est)
        assert kl.dtype == torch.float32, est
        torch.testing.assert_close(kl.double(), R.kl_estimate(lp.double(), ref.double(), est), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_old_and_ref_logprobs(backend):
    """bf16 old / ref logprobs and advantages (a bf16 rollout engine) are read and upcast:
    the same loss as their fp32 upcast, since the values are the same numbers."""
    dev = device_for(backend)
    b = _near_policy(make_batch(device=dev))
    half = dict(b, old=b["old"].bfloat16(), ref=b["ref"].bfloat16(), adv=b["adv"].bfloat16())
    up = dict(b, old=half["old"].float(), ref=half["ref"].float(), adv=half["adv"].float())
    v_half, g_half = run("ppo_clip_loss", half, backend)
    v_up, g_up = run("ppo_clip_loss", up, backend)
    for k in v_up:
        assert_same(v_half[k], v_up[k], k)
    assert_same(g_half["logits"], g_up["logits"], "d logits")
