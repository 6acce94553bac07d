"""Correct or loud under hostile use of the API: one test per item of docs/robustness.md,
"Hostile use of the API" (items 1-16), on every backend where it applies (Triton under the
interpreter on CPU). Each test asserts the wanted behaviour: an exact result or a clear error.

    python -m pytest tests/test_hostile.py -q
"""

from __future__ import annotations

import sys
import threading
import types
import warnings

import pytest
import torch
from conftest import backends, device_for
from test_robustness import LINEAR_OPS, PPO_OPS, _near_policy, call, make_batch, run

import fastrlhf
from fastrlhf import reference as R
from fastrlhf.integrations import IntegrationWarning
from fastrlhf.integrations import trl as ftrl
from fastrlhf.integrations._patch import Target, apply_patch, replace_with

BACKENDS = backends()
NAN, INF = float("nan"), float("inf")
INPLACE_ERROR = "modified by an inplace operation"


def _ppo_ref_grads(b, **kw):
    """fp64 reference loss and gradients in logits, old, adv and ref (autograd on the oracle)."""
    leaves = {k: b[k].detach().double().requires_grad_() for k in ("logits", "old", "adv", "ref")}
    loss, _ = R.ppo_clip_loss(leaves["logits"], b["labels"], leaves["old"], leaves["adv"], mask=b["mask"],
                              ref_logprobs=leaves["ref"], **kw)
    return loss, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


# ----------------------------------------------------------------------------------------
# Item 1: inplace_backward and other consumers of the same logits
# ----------------------------------------------------------------------------------------


def _other_consumers(x):
    return {
        "square": lambda: (x**2).sum(),
        "entropy": lambda: fastrlhf.entropy(x, backend="torch").sum(),
        "token_logprobs": lambda: fastrlhf.token_logprobs(x, torch.zeros(x.shape[:-1], dtype=torch.long),
                                                          backend="torch").sum(),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("other", ["square", "entropy", "token_logprobs"])
@pytest.mark.parametrize("order", ["other_first", "ours_first"])
def test_item01_inplace_backward_with_another_consumer_is_exact_or_raises(backend, other, order):
    """Item 1: with ``inplace_backward=True`` another consumer of the same logits either gets its
    exact gradient (its backward ran before ours overwrote them) or autograd's in-place error; never a
    gradient computed from gradient values. ``other_first``: our node is created last, so autograd
    runs our backward first and the other consumer must raise."""
    dev = device_for(backend)
    b = make_batch(device=dev)
    base = b["logits"].detach().clone().requires_grad_()

    def loss_fn(inplace):
        x = base * 1.0  # a non-leaf, as a model's output
        consumers = _other_consumers(x)
        if order == "other_first":
            z = consumers[other]()
            lp = fastrlhf.token_logprobs(x, b["labels"], inplace_backward=inplace, backend=backend)
        else:
            lp = fastrlhf.token_logprobs(x, b["labels"], inplace_backward=inplace, backend=backend)
            z = consumers[other]()
        return lp.sum() + z

    (want,) = torch.autograd.grad(loss_fn(False), base)
    loss = loss_fn(True)
    if order == "other_first":
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            torch.autograd.grad(loss, base)
        return
    (got,) = torch.autograd.grad(loss, base)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item01_inplace_backward_bumps_the_version_counter(backend):
    """Item 1: the in-place gradient pass is visible to autograd on every backend (version bump)."""
    dev = device_for(backend)
    b = make_batch(device=dev)
    base = b["logits"].detach().clone().requires_grad_()
    x = base * 1.0
    v0 = x._version
    lp = fastrlhf.token_logprobs(x, b["labels"], inplace_backward=True, backend=backend)
    assert x._version == v0  # forward leaves the logits alone
    lp.sum().backward()
    assert x._version > v0


def test_item01_docs_say_what_inplace_backward_forbids():
    doc = fastrlhf.token_logprobs.__doc__
    assert "inplace_backward" in doc and "in-place error" in doc and "second differentiation" in doc


# ----------------------------------------------------------------------------------------
# Item 2: gradients of old_logprobs, advantages and ref_logprobs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["ppo_clip_loss", "linear_ppo_clip_loss"])
def test_item02_gradients_of_old_adv_ref_on_every_backend(backend, op):
    """Item 2: every backend returns the exact gradients of old_logprobs, advantages and ref_logprobs."""
    dev = device_for(backend)
    b = _near_policy(make_batch(device=dev))
    b["logits"] = (b["hidden"] @ b["weight"].T + b["bias"]) if op.startswith("linear_") else b["logits"]
    kw = dict(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, clip_high=0.28)
    _, want = _ppo_ref_grads(b, **kw)
    leaves = {k: b[k].detach().clone().requires_grad_() for k in ("logits", "old", "adv", "ref", "hidden")}
    first = (leaves["hidden"], b["weight"]) if op.startswith("linear_") else (leaves["logits"],)
    extra = dict(bias=b["bias"]) if op.startswith("linear_") else {}
    loss, _ = getattr(fastrlhf, op)(*first, b["labels"], leaves["old"], leaves["adv"], mask=b["mask"],
                                    ref_logprobs=leaves["ref"], backend=backend, **extra, **kw)
    got = torch.autograd.grad(loss, [leaves["old"], leaves["adv"], leaves["ref"]])
    for name, g in zip(("old", "adv", "ref"), got):
        assert g is not None, name
        torch.testing.assert_close(g.double(), want[name], atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------
# Item 3: non-finite hyper-parameters
# ----------------------------------------------------------------------------------------

HYPER = [("ppo_clip_loss", k) for k in ("clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef",
                                         "temperature")]
HYPER += [("grpo_loss", "beta"), ("dpo_loss", "beta"), ("dpo_loss", "label_smoothing")]
HYPER += [("linear_ppo_clip_loss", k) for k in ("clip_high", "kl_coef", "entropy_coef", "temperature")]
HYPER += [("linear_grpo_loss", "beta"), ("linear_dpo_loss", "beta")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,name", HYPER, ids=[f"{o}-{n}" for o, n in HYPER])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_item03_non_finite_hyper_parameters_raise(backend, op, name, value):
    """Item 3: NaN / +-inf hyper-parameters raise ``ValueError`` naming the argument (a NaN coefficient
    would otherwise switch its term off, a NaN clip give a NaN loss)."""
    b = make_batch(device=device_for(backend))
    with pytest.raises(ValueError, match=rf"{name} must be"):
        call(op, b, backend=backend, **{name: value})


# ----------------------------------------------------------------------------------------
# Item 4: double backward
# ----------------------------------------------------------------------------------------

DOUBLE_OPS = ("token_logprobs", "token_logprobs_and_entropy", "entropy", "ppo_clip_loss", "grpo_loss", "dpo_loss",
              "linear_token_logprobs", "linear_ppo_clip_loss", "linear_dpo_loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", DOUBLE_OPS)
def test_item04_double_backward_raises_clearly(backend, op):
    """Item 4: ``create_graph=True`` gives the exact first derivative, and differentiating it again
    raises autograd's once-differentiable error (never a silently dropped second-order term)."""
    b = make_batch(device=device_for(backend))
    leaf = "hidden" if op.startswith("linear_") else "logits"
    _, want = run(op, b, backend)
    b = dict(b)
    x = b[leaf].detach().clone().requires_grad_()
    b[leaf] = x
    _, scalar = call(op, b, backend=backend)
    (g,) = torch.autograd.grad(scalar, x, create_graph=True)
    torch.testing.assert_close(g, want[leaf])
    with pytest.raises(RuntimeError, match="fastrlhf ops are once differentiable"):
        (g * g).sum().backward()


# ----------------------------------------------------------------------------------------
# Item 5 / 6: when and where inplace_backward writes
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "ppo_clip_loss", "grpo_loss", "dpo_loss"])
def test_item05_inplace_backward_writes_during_backward_only(backend, op):
    """Item 5: forward leaves the logits untouched on every backend; backward writes the gradient
    into them, and the gradient that flows on is the exact one."""
    b = make_batch(device=device_for(backend))
    _, want = run(op, b, backend)
    base = b["logits"].detach().clone().requires_grad_()
    x = base * 1.0
    before = x.detach().clone()
    b = dict(b, logits=x)
    _, scalar = call(op, b, backend=backend, inplace_backward=True)
    assert torch.equal(x.detach(), before), "inplace_backward changed the logits during forward"
    (g,) = torch.autograd.grad(scalar, base)
    torch.testing.assert_close(g, want["logits"])
    torch.testing.assert_close(x.detach(), g)  # the logits' storage now holds the gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "ppo_clip_loss"])
def test_item06_expanded_logits_with_inplace_backward_raise(backend, op):
    """Item 6: stride-0 (expanded) logits cannot take an in-place gradient: ``ValueError`` everywhere."""
    b = make_batch(device=device_for(backend))
    row = b["logits"][:1].detach().clone().requires_grad_()
    b = dict(b, logits=row.expand_as(b["logits"]))
    with pytest.raises(ValueError, match="stride-0"):
        call(op, b, backend=backend, inplace_backward=True)


# ----------------------------------------------------------------------------------------
# Items 7 / 8: the upstream gradient is applied in fp32, rounding once
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["ppo_clip_loss", "grpo_loss", "linear_ppo_clip_loss"])
def test_item07_fp16_with_gradscaler_upstream_is_finite(backend, op):
    """Item 7: fp16 logits / hidden states with an upstream gradient of 65536 (GradScaler's initial
    scale) give finite gradients equal to 65536 x the fp32 ones (to fp16 rounding)."""
    b = _near_policy(make_batch(device=device_for(backend)))
    leaves = ("hidden", "weight") if op.startswith("linear_") else ("logits",)
    b16 = dict(b, **{k: b[k].half() for k in ("logits", "hidden", "weight", "bias")})
    ref = dict(b, **{k: b16[k].float() for k in ("logits", "hidden", "weight", "bias")})
    x = {k: b16[k].detach().clone().requires_grad_() for k in leaves}
    _, scalar = call(op, dict(b16, **x), backend=backend)
    got = torch.autograd.grad(scalar * 65536.0, list(x.values()))
    _, want = run(op, ref, backend)
    for k, g in zip(leaves, got):
        assert torch.isfinite(g).all(), f"d {k} not finite"
        w = want[k] * 65536.0
        err = (g.double() - w.double()).abs().max().item()
        assert err <= 2e-3 * w.abs().max().item() + 1e-3, f"d {k}: {err}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["token_logprobs_and_entropy", "ppo_clip_loss"])
def test_item08_half_gradient_rounded_once_with_any_upstream(backend, dtype, op):
    """Item 8: with an upstream gradient of 3.7 (not 1), the bf16/fp16 logits' gradient is the fp32
    gradient on their upcast values, scaled in fp32 and rounded once: bitwise."""
    b = _near_policy(make_batch(device=device_for(backend)))
    half = b["logits"].to(dtype)
    grads = {}
    for name, logits in (("half", half), ("fp32", half.float())):
        x = logits.detach().clone().requires_grad_()
        _, scalar = call(op, dict(b, logits=x), backend=backend)
        (grads[name],) = torch.autograd.grad(scalar * 3.7, x)
    assert grads["half"].dtype == dtype
    assert torch.equal(grads["half"], grads["fp32"].to(dtype))


# ----------------------------------------------------------------------------------------
# Item 9: garbage in uncounted tokens
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PPO_OPS)
@pytest.mark.parametrize("value", [NAN, INF])
def test_item09_garbage_at_uncounted_tokens_contributes_nothing(backend, op, value):
    """Item 9: NaN / inf in advantages, old_logprobs or ref_logprobs at mask=0 or ignore_index tokens
    (and a per-sequence advantage of a sequence with no counted token) change no bit of the loss,
    the stats or any gradient."""
    b = make_batch(device=device_for(backend))
    b["labels"][2] = -100  # sequence 2 has no counted token: its per-sequence advantage is unused
    clean_v, clean_g = run(op, b, backend)
    dirty = dict(b)
    for k in ("old", "adv", "ref"):
        dirty[k] = b[k].clone()
        dirty[k][0, 0] = value  # ignore_index
        dirty[k][3, 1] = value  # mask = 0
        dirty[k][2] = value
    dirty["adv_seq"] = b["adv_seq"].clone()
    dirty["adv_seq"][2] = value
    vals, grads = run(op, dirty, backend)
    for k in clean_v:
        assert torch.equal(vals[k], clean_v[k]), k
    for k in clean_g:
        assert torch.equal(grads[k], clean_g[k]), f"d {k}"


# ----------------------------------------------------------------------------------------
# Item 10: masks are 0/1
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PPO_OPS)
@pytest.mark.parametrize("bad", [0.5, 0.25, NAN, -1.0, 2.0])
def test_item10_non_binary_masks_are_rejected(backend, op, bad):
    """Item 10: a float mask holding anything but 0 and 1 raises ``ValueError`` (weights are not a mask)."""
    b = make_batch(device=device_for(backend))
    b["mask"] = b["mask"].clone()
    b["mask"][1, 0] = bad
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        call(op, b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8, torch.float16, torch.float32])
def test_item10_binary_masks_of_any_dtype_are_equal(backend, dtype):
    b = make_batch(device=device_for(backend))
    want, _ = run("ppo_clip_loss", b, backend)
    got, _ = run("ppo_clip_loss", dict(b, mask=b["mask"].to(dtype)), backend)
    assert torch.equal(got["loss"], want["loss"])


def test_item10_dpo_and_rrhf_take_no_mask():
    """Item 10: the DPO / RRHF paths count tokens by ``ignore_index`` only (no mask argument to misread)."""
    import inspect

    for fn in (fastrlhf.dpo_loss, fastrlhf.linear_dpo_loss):
        assert "mask" not in inspect.signature(fn).parameters
    from fastrlhf import ranking_losses

    for fn in (ranking_losses.rrhf_loss, ranking_losses.linear_rrhf_loss):
        assert "mask" not in inspect.signature(fn).parameters


# ----------------------------------------------------------------------------------------
# Item 11: temperature that requires grad
# ----------------------------------------------------------------------------------------

TEMP_OPS = ("token_logprobs", "entropy", "ppo_clip_loss", "dpo_loss", "linear_token_logprobs",
            "linear_ppo_clip_loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", TEMP_OPS)
def test_item11_temperature_requiring_grad_is_rejected(backend, op):
    """Item 11: a temperature tensor that requires grad raises (it would be silently detached);
    a 0-d tensor that needs no gradient gives the float's result."""
    b = make_batch(device=device_for(backend))
    with pytest.raises(ValueError, match="temperature is a tensor that requires grad"):
        call(op, b, backend=backend, temperature=torch.tensor(0.7, requires_grad=True))
    want, _ = run(op, b, backend, temperature=0.7)
    got, _ = run(op, b, backend, temperature=torch.tensor(0.7, dtype=torch.float64))
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ----------------------------------------------------------------------------------------
# Item 12: patch() / undo()
# ----------------------------------------------------------------------------------------


def _orig(a, b=1):
    return ("original", a, b)


def _ours(a, b=1):
    return ("ours", a, b)


@pytest.fixture
def pkg():
    """A stand-in trainer package ``hostile_pkg`` with ``core.fn``; submodules can be added later."""
    root = types.ModuleType("hostile_pkg")
    root.__path__ = []
    core = types.ModuleType("hostile_pkg.core")
    core.fn = _orig
    sys.modules.update({"hostile_pkg": root, "hostile_pkg.core": core})
    yield root, core
    for name in [n for n in sys.modules if n == "hostile_pkg" or n.startswith("hostile_pkg.")]:
        del sys.modules[name]


def _patch_pkg():
    return apply_patch("hostile_pkg", [Target("core", "fn", replace_with(_ours))], label="Hostile",
                       install_hint="-", caller="tests")


def test_item12_undo_restores_modules_imported_while_patched(pkg):
    """Item 12: a submodule imported after ``patch()`` (it copied the replacement by name) gets the
    original back on ``undo()``, module attributes and module-level registries alike."""
    _, core = pkg
    h = _patch_pkg()
    late = types.ModuleType("hostile_pkg.late")
    late.fn = core.fn  # `from .core import fn` while the patch is active
    late.REGISTRY = {"vanilla": core.fn}
    sys.modules["hostile_pkg.late"] = late
    assert late.fn("x")[0] == "ours"
    h.undo()
    assert core.fn is _orig and late.fn is _orig and late.REGISTRY["vanilla"] is _orig


def test_item12_patch_is_idempotent_and_thread_safe(pkg):
    """Item 12: eight threads patching at once: exactly one handle reports the target patched, the
    others skip it; undoing every handle restores the original."""
    _, core = pkg
    handles, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IntegrationWarning)
            handles.append(_patch_pkg())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(bool(h.patched) for h in handles) == 1
    assert core.fn("x")[0] == "ours"
    assert getattr(core.fn, "__wrapped__", None) is _ours  # wrapped once, not a replacement of a replacement
    with pytest.warns(IntegrationWarning, match="already patched"):
        again = _patch_pkg()
    assert again.patched == []
    for h in handles + [again]:
        h.undo()
    assert core.fn is _orig
    h2 = _patch_pkg()  # patchable again after undo
    assert h2.patched == ["hostile_pkg.core.fn"]
    h2.undo()
    h2.undo()  # idempotent
    assert core.fn is _orig


# ----------------------------------------------------------------------------------------
# Item 13: 0-d tensor hyper-parameters
# ----------------------------------------------------------------------------------------

TENSOR_HYPER = [
    ("ppo_clip_loss", dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0,
                           temperature=0.9, ignore_index=-100)),
    ("grpo_loss", dict(beta=0.04, clip_low=0.2, ignore_index=-100)),
    ("dpo_loss", dict(beta=0.1, label_smoothing=0.1, ignore_index=-100)),
    ("token_logprobs", dict(temperature=0.9, ignore_index=-100)),
    ("linear_ppo_clip_loss", dict(clip_low=0.2, kl_coef=0.05, ignore_index=-100)),
    ("linear_grpo_loss", dict(beta=0.04, ignore_index=-100)),
    ("linear_token_logprobs", dict(ignore_index=-100)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,kw", TENSOR_HYPER, ids=[o for o, _ in TENSOR_HYPER])
def test_item13_zero_dim_tensor_hyper_parameters(backend, op, kw):
    """Item 13: hyper-parameters given as 0-d tensors give bitwise the results of Python numbers on
    every backend (Triton included)."""
    b = make_batch(device=device_for(backend))
    want_v, want_g = run(op, b, backend, **kw)
    # fp64 tensors hold the Python floats exactly (an fp32 0.9 is another number).
    got_v, got_g = run(op, b, backend, **{k: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else None)
                                          for k, v in kw.items()})
    for k in want_v:
        assert torch.equal(got_v[k], want_v[k]), k
    for k in want_g:
        assert torch.equal(got_g[k], want_g[k]), f"d {k}"


# ----------------------------------------------------------------------------------------
# Item 14: per-sequence advantages need 2-D labels
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["ppo_clip_loss", "grpo_loss", "linear_ppo_clip_loss"])
def test_item14_per_sequence_advantages_with_3d_labels_raise(backend, op):
    """Item 14: ``[B]`` advantages with 3-D labels are rejected by validation, naming the argument."""
    dev = device_for(backend)
    b = make_batch(device=dev)
    b3 = {k: (v.reshape(2, 2, *v.shape[1:]) if k in ("logits", "hidden", "labels", "mask", "old", "ref") else v)
          for k, v in b.items()}
    b3["adv"] = torch.randn(2, device=dev)
    b3["adv_seq"] = b3["adv"]
    with pytest.raises(ValueError, match=r"advantages must have the shape of labels \(2, 2, 2\).*2-D"):
        call(op, b3, backend=backend)
    b3["adv"] = b["adv"].reshape(2, 2, 2)  # per token works
    b3["adv_seq"] = b3["adv"]
    vals, _ = run(op, b3, backend)
    assert torch.isfinite(vals["loss"])


# ----------------------------------------------------------------------------------------
# Item 15: torch.compile, torch.func
# ----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_item15_token_ops_compile_fullgraph(fresh_dynamo, backend, inplace):
    """Item 15: ``torch.compile(fullgraph=True)`` of a loss over the token ops: same values and
    gradients as eager, on every backend (the row primitives are custom ops under compile)."""
    b = make_batch(device=device_for(backend))

    def loss(base, labels):
        x = base * 1.0
        lp, ent = fastrlhf.token_logprobs_and_entropy(x, labels, temperature=0.8, backend=backend,
                                                      inplace_backward=inplace)
        return (lp + 0.1 * ent).sum() + fastrlhf.entropy(base.detach() * 1.0, backend=backend).sum()

    base = b["logits"].detach().clone().requires_grad_()
    want = loss(base, b["labels"])
    (want_g,) = torch.autograd.grad(want, base)
    got = torch.compile(loss, fullgraph=True)(base, b["labels"])
    (got_g,) = torch.autograd.grad(got, base)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_g, want_g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["ppo_clip_loss", "grpo_loss"])
def test_item15_ppo_compile_fullgraph(fresh_dynamo, backend, op):
    """Item 15: PPO / GRPO (float mask included: checked by an in-graph assertion) compile with
    ``fullgraph=True`` to the eager loss, stats and gradient."""
    b = _near_policy(make_batch(device=device_for(backend)))

    def f(x):
        if op == "grpo_loss":
            loss, stats = fastrlhf.grpo_loss(x, b["labels"], b["old"], b["adv_seq"], b["ref"], mask=b["mask"],
                                             beta=0.04, clip_high=0.28, backend=backend)
        else:
            loss, stats = fastrlhf.ppo_clip_loss(x, b["labels"], b["old"], b["adv"], mask=b["mask"], dual_clip=3.0,
                                                 ref_logprobs=b["ref"], kl_coef=0.05, entropy_coef=0.01,
                                                 backend=backend)
        return loss, stats["clipfrac"]

    x = b["logits"].detach().clone().requires_grad_()
    want, want_cf = f(x)
    (want_g,) = torch.autograd.grad(want, x)
    got, got_cf = torch.compile(f, fullgraph=True)(x)
    (got_g,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_cf, want_cf)
    torch.testing.assert_close(got_g, want_g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item15_dpo_compile_fullgraph_and_linear_with_graph_breaks(fresh_dynamo, backend):
    """Item 15: ``dpo_loss`` compiles with ``fullgraph=True``; the ``linear_*`` ops are not traced
    (their chunk loop reads data) but compile with graph breaks to the eager values and gradients."""
    b = make_batch(device=device_for(backend))
    cases = {
        "dpo_loss": (lambda x: fastrlhf.dpo_loss(x, b["labels"], b["ref_c"], b["ref_r"], temperature=0.9,
                                                 backend=backend)[0], "logits", True),
        "linear_token_logprobs": (lambda h: fastrlhf.linear_token_logprobs(h, b["weight"], b["labels"], bias=b["bias"],
                                                                            temperature=0.9, backend=backend).sum(),
                                  "hidden", False),
    }
    for f, leaf, fullgraph in cases.values():
        x = b[leaf].detach().clone().requires_grad_()
        want = f(x)
        (want_g,) = torch.autograd.grad(want, x)
        got = torch.compile(f, fullgraph=fullgraph)(x)
        (got_g,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_g, want_g)


def test_item15_compiled_out_of_range_label_and_bad_mask_still_raise(fresh_dynamo):
    """Item 15: under compile the label range is checked inside the row op (on real data) and the
    0/1 mask by an in-graph assertion: both still raise when the graph runs."""
    b = make_batch()
    bad = b["labels"].clone()
    bad[1, 1] = 10**6
    with pytest.raises(Exception, match="outside"):
        torch.compile(lambda x, y: fastrlhf.token_logprobs(x, y, backend="torch"), fullgraph=True)(b["logits"], bad)
    mask = b["mask"].clone()
    mask[0, 1] = 0.5
    with pytest.raises(Exception, match="mask must hold only 0 and 1"):
        torch.compile(lambda m: fastrlhf.ppo_clip_loss(b["logits"], b["labels"], b["old"], b["adv"], mask=m,
                                                       backend="torch")[0], fullgraph=True)(mask)


@pytest.mark.parametrize("fn", ["fused_selective_log_softmax_and_entropy", "selective_log_softmax_and_entropy"])
def test_item15_trl_compile_fullgraph(fresh_dynamo, fn):
    """Item 15: TRL's ``tests/test_kernels.py::TestLogProbEntropy::test_torch_compile_fullgraph`` on
    the drop-in replacements, on CPU: bf16 [2, 3, 257], temperature 0.8, a row mask."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 257, dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(257, (2, 3))
    row_mask = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)

    def loss(logits, index, row_mask):
        logprobs, entropy = getattr(ftrl, fn)(logits, index, temperature=0.8, row_mask=row_mask)
        return (logprobs + 0.1 * entropy).sum()

    torch.compile(loss, fullgraph=True)(logits, index, row_mask).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad[~row_mask]) == 0
    eager = logits.detach().clone().requires_grad_()
    loss(eager, index, row_mask).backward()
    torch.testing.assert_close(logits.grad, eager.grad)


def test_item15_trl_selective_log_softmax_compile_fullgraph(fresh_dynamo):
    """Item 15: ``torch.compile(fastrlhf.integrations.trl.selective_log_softmax, fullgraph=True)`` on CPU."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 257, requires_grad=True)
    index = torch.randint(257, (2, 3))
    got = torch.compile(ftrl.selective_log_softmax, fullgraph=True)(logits, index)
    want = torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got.sum(), logits)
    (w,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item15_torch_func_grad_and_vmap(backend):
    """Item 15: ``torch.func.grad`` (and ``grad`` of a PPO loss) and ``torch.func.vmap`` of the token
    ops give the eager results."""
    b = _near_policy(make_batch(device=device_for(backend)))
    x = b["logits"].detach()

    def f(x):
        lp, ent = fastrlhf.token_logprobs_and_entropy(x, b["labels"], temperature=0.8, backend=backend)
        return (lp * 1.5 + 0.1 * ent).sum()

    _, want = run("token_logprobs_and_entropy", b, backend, temperature=0.8)
    xg = x.clone().requires_grad_()
    (want_g,) = torch.autograd.grad(f(xg), xg)
    torch.testing.assert_close(torch.func.grad(f)(x), want_g)

    def ppo(x):
        return call("ppo_clip_loss", dict(b, logits=x), backend=backend)[1]

    (want_ppo,) = torch.autograd.grad(ppo(xg), xg)
    torch.testing.assert_close(torch.func.grad(ppo)(x), want_ppo)

    mapped = torch.func.vmap(lambda xx, ll: fastrlhf.token_logprobs(xx, ll, backend=backend))(x, b["labels"])
    assert torch.equal(mapped, fastrlhf.token_logprobs(x, b["labels"], backend=backend))
    ents = torch.func.vmap(lambda xx: fastrlhf.entropy(xx, backend=backend), in_dims=1, out_dims=1)(x)
    assert torch.equal(ents, fastrlhf.entropy(x, backend=backend))


# ----------------------------------------------------------------------------------------
# Item 16: smaller argument checks
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["dpo_loss", "linear_dpo_loss"])
def test_item16_integer_reference_logps_rejected(backend, op):
    b = make_batch(device=device_for(backend))
    b["ref_c"] = b["ref_c"].long()
    with pytest.raises(TypeError, match="ref_chosen_logps must be a floating-point tensor"):
        call(op, b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "entropy", "ppo_clip_loss", "dpo_loss", "linear_token_logprobs"])
@pytest.mark.parametrize("value", [True, "1.0", None], ids=["bool", "str", "none"])
def test_item16_temperature_of_wrong_type_rejected(backend, op, value):
    b = make_batch(device=device_for(backend))
    with pytest.raises((TypeError, ValueError), match="temperature"):
        call(op, b, backend=backend, temperature=value)


IGNORE_OPS = ("token_logprobs", "token_logprobs_and_entropy", "ppo_clip_loss", "grpo_loss", "dpo_loss") + LINEAR_OPS
IGNORE_OPS = tuple(op for op in IGNORE_OPS if op != "linear_token_logprobs_and_entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", IGNORE_OPS)
@pytest.mark.parametrize("value,exc", [(0.5, TypeError), (True, TypeError), ("-100", TypeError),
                                       (2**63, ValueError), (-(2**63) - 1, ValueError)],
                         ids=["float", "bool", "str", "2^63", "-2^63-1"])
def test_item16_ignore_index_must_be_an_int64(backend, op, value, exc):
    """Item 16: ``ignore_index`` is an int that fits int64, checked the same way on every backend."""
    b = make_batch(device=device_for(backend))
    with pytest.raises(exc, match="ignore_index must"):
        call(op, b, backend=backend, ignore_index=value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item16_int64_extreme_ignore_index_works(backend):
    b = make_batch(device=device_for(backend))
    lab = b["labels"].clone()
    lab[0, 0] = -(2**63)
    lp = fastrlhf.token_logprobs(b["logits"], lab, ignore_index=-(2**63), backend=backend)
    assert lp[0, 0] == 0 and torch.isfinite(lp).all()


@pytest.mark.parametrize("op", ["grpo_loss", "linear_grpo_loss"])
def test_item16_negative_grpo_beta_names_beta(op):
    b = make_batch()
    with pytest.raises(ValueError, match=r"^beta must be >= 0"):
        call(op, b, beta=-0.1)

