"""Native C++ CPU backend (fastrlhf._C) through the public ops vs the fp64 reference.

Forward values and gradients (random upstream grads) of every op the row passes serve:
token_logprobs, token_logprobs_and_entropy, entropy, ppo_clip_loss, grpo_loss, dpo_loss;
fp32 / bf16 / fp16, real vocabularies, 2-D, 3-D and non-contiguous logits, temperature,
in-place backward, ignored tokens (exactly zero gradient), -inf logits, and bad inputs that
must raise instead of crashing. Skipped when the extension is not built, except
``test_native_is_built`` under ``FASTRLHF_REQUIRE_NATIVE=1`` (CI builds it).
"""

import os

import pytest
import torch
from conftest import assert_grad_close

import fastrlhf
from fastrlhf import _native
from fastrlhf import reference as R
from fastrlhf._backend import resolve_backend

needs_native = pytest.mark.skipif(
    not _native.available(), reason=f"native extension not built: {_native.load_error()}"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [7, 1000, 32000, 50257]  # tiny odd, a block-size fraction, Llama-2, GPT-2
# Leading layouts: [N, V]; [B, T, V]; logits[:, :-1] of [B, T + 1, V] (non-contiguous rows);
# [N, V] rows of a wider buffer (row stride V + 3, as a padded lm_head output).
LAYOUTS = ["2d", "3d", "shifted", "padded"]
VAL_ATOL = 2e-5
GRAD_ATOL = 1e-5


def test_native_is_built():
    if os.environ.get("FASTRLHF_REQUIRE_NATIVE") == "1":
        assert _native.available(), f"FASTRLHF_REQUIRE_NATIVE=1 but fastrlhf._C failed to load: {_native.load_error()}"
        assert fastrlhf.available_backends()["native"]
    elif not _native.available():
        pytest.skip(f"native extension not built: {_native.load_error()}")


@needs_native
def test_auto_backend_picks_native_on_cpu():
    assert fastrlhf.available_backends()["native"] is True
    assert resolve_backend("auto", torch.device("cpu")) == "native"


def _leaf_and_logits(layout, V, dtype, seed, scale=3.0):
    """``(leaf, logits)``: ``logits`` is a view of the leaf (the tensor gradients land on)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "2d":
        leaf = (torch.randn(6, V, generator=g) * scale).to(dtype).requires_grad_()
        return leaf, leaf
    if layout == "3d":
        leaf = (torch.randn(2, 3, V, generator=g) * scale).to(dtype).requires_grad_()
        return leaf, leaf
    if layout == "shifted":
        leaf = (torch.randn(2, 4, V, generator=g) * scale).to(dtype).requires_grad_()
        return leaf, leaf[:, :-1]  # [2, 3, V], stride_t = V, stride_b = 4 V
    leaf = (torch.randn(6, V + 3, generator=g) * scale).to(dtype).requires_grad_()
    return leaf, leaf[:, :V]  # [6, V], row stride V + 3


def _labels(shape, V, seed):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, V, shape, generator=g)
    flat = labels.view(-1)
    flat[1] = -100
    flat[-1] = -100
    return labels


def _run_token_op(op, logits, labels, temperature, backend, upstream, **kw):
    if op == "token_logprobs":
        outs = (fastrlhf.token_logprobs(logits, labels, temperature=temperature, backend=backend, **kw),)
    elif op == "token_logprobs_and_entropy":
        outs = fastrlhf.token_logprobs_and_entropy(logits, labels, temperature=temperature, backend=backend, **kw)
    else:
        outs = (fastrlhf.entropy(logits, temperature=temperature, backend=backend, **kw),)
    return outs, sum((o.double() * u).sum() for o, u in zip(outs, upstream))


def _run_reference(op, logits64, labels, temperature):
    if op == "token_logprobs":
        return (R.token_logprobs(logits64, labels, temperature=temperature),)
    if op == "token_logprobs_and_entropy":
        return R.token_logprobs_and_entropy(logits64, labels, temperature=temperature)
    return (R.entropy(logits64, temperature=temperature),)


@needs_native
@pytest.mark.parametrize("op", ["token_logprobs", "token_logprobs_and_entropy", "entropy"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_ops_match_reference(op, layout, V, dtype, temperature):
    leaf, logits = _leaf_and_logits(layout, V, dtype, seed=V)
    lead = logits.shape[:-1]
    labels = _labels(lead, V, seed=V)
    before = leaf.detach().clone()
    g = torch.Generator().manual_seed(7)
    upstream = [torch.randn(lead, generator=g, dtype=torch.float64) for _ in range(2)]

    outs, total = _run_token_op(op, logits, labels, temperature, "native", upstream)
    (grad,) = torch.autograd.grad(total, leaf)

    leaf64 = leaf.detach().double().requires_grad_()  # the exact values the kernel saw
    logits64 = leaf64[:, :-1] if layout == "shifted" else (leaf64[:, :V] if layout == "padded" else leaf64)
    outs64 = _run_reference(op, logits64, labels, temperature)
    (grad64,) = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs64, upstream)), leaf64)

    for o, o64 in zip(outs, outs64):
        assert o.shape == lead and o.dtype == torch.float32
        torch.testing.assert_close(o.double(), o64, atol=VAL_ATOL, rtol=1e-6)
    assert grad.dtype == dtype and grad.shape == leaf.shape
    assert_grad_close(grad, grad64, dtype, atol32=GRAD_ATOL, rtol32=1e-5)
    if op != "entropy":
        ignored = labels == -100
        rows = grad[:, :-1] if layout == "shifted" else grad[..., :V]
        assert (rows[ignored] == 0).all(), "ignore_index rows must get exactly zero gradient"
        for o in outs:
            assert (o[ignored] == 0).all()
    assert torch.equal(leaf.detach(), before), "logits must be untouched without inplace_backward"


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 1000), (2, 3, 32000)])
def test_inplace_backward_writes_the_gradient_into_the_logits(dtype, shape):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_()
    labels = _labels(shape[:-1], shape[-1], seed=3)
    logits = x * 1  # a non-leaf whose storage the backward may overwrite (the model's output)
    up = torch.randn(shape[:-1], generator=g)
    lp = fastrlhf.token_logprobs(logits, labels, temperature=0.8, inplace_backward=True, backend="native")
    (lp * up).sum().backward()

    x64 = x.detach().double().requires_grad_()
    lp64 = R.token_logprobs(x64, labels, temperature=0.8)
    (lp64 * up.double()).sum().backward()
    torch.testing.assert_close(lp.double(), lp64.detach(), atol=VAL_ATOL, rtol=1e-6)
    assert_grad_close(x.grad, x64.grad, dtype, atol32=GRAD_ATOL, rtol32=1e-5)
    assert torch.equal(logits.detach(), x.grad), "the logits' storage must now hold their gradient"
    assert (x.grad[labels == -100] == 0).all()


@needs_native
def test_neg_inf_logits_give_no_nan():
    # Masked vocabulary entries (e.g. a padded vocab filled with -inf) contribute p = 0 and
    # must give finite values and a zero gradient, never 0 * inf = NaN.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 1000, generator=g) * 3
    x[..., 900:] = float("-inf")
    x[0, 0, :500] = float("-inf")
    labels = _labels((2, 3), 900, seed=5)
    x.requires_grad_()
    lp, ent = fastrlhf.token_logprobs_and_entropy(x, labels, temperature=0.9, backend="native")
    h = fastrlhf.entropy(x, temperature=0.9, backend="native")
    up = torch.randn(3, 2, 3, generator=g)
    (grad,) = torch.autograd.grad((lp * up[0] + ent * up[1] + h * up[2]).sum(), x)

    x64 = x.detach().double().requires_grad_()
    lp64, ent64 = R.token_logprobs_and_entropy(x64, labels, temperature=0.9)
    h64 = R.entropy(x64, temperature=0.9)
    (grad64,) = torch.autograd.grad((lp64 * up[0] + ent64 * up[1] + h64 * up[2]).sum(), x64)
    for o, o64 in ((lp, lp64), (ent, ent64), (h, h64)):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double(), o64, atol=VAL_ATOL, rtol=1e-6)
    assert torch.isfinite(grad).all()
    assert (grad[..., 900:] == 0).all()
    torch.testing.assert_close(grad.double(), grad64, atol=GRAD_ATOL, rtol=1e-5)


@needs_native
def test_many_rows_exercise_the_thread_pool():
    # 300 rows x 1000 is above the single-thread threshold: rows are split across threads.
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(300, 1000, generator=g) * 4).requires_grad_()
    labels = _labels((300,), 1000, seed=11)
    labels[::3] = -100
    up = torch.randn(300, generator=g)
    lp = fastrlhf.token_logprobs(x, labels, backend="native")
    (grad,) = torch.autograd.grad((lp * up).sum(), x)
    x64 = x.detach().double().requires_grad_()
    lp64 = R.token_logprobs(x64, labels)
    (grad64,) = torch.autograd.grad((lp64 * up.double()).sum(), x64)
    torch.testing.assert_close(lp.double(), lp64, atol=VAL_ATOL, rtol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, atol=GRAD_ATOL, rtol=1e-5)
    assert (grad[::3] == 0).all()


@needs_native
def test_empty_inputs():
    x = torch.randn(0, 50, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    lp = fastrlhf.token_logprobs(x, labels, backend="native")
    assert lp.shape == (0,)
    lp.sum().backward()
    assert x.grad.shape == (0, 50)


# ----------------------------------------------------------------------------------------
# Losses: PPO / GRPO / DPO with backend="native" vs the fp64 reference
# ----------------------------------------------------------------------------------------


def _assert_stats_close(stats, stats64):
    # The reference always computes the entropy; the op reports it only when it computed it.
    assert set(stats) == set(stats64) - ({"entropy"} - set(stats))
    for k in stats:
        torch.testing.assert_close(stats[k].double(), stats64[k].double(), atol=VAL_ATOL, rtol=1e-5, msg=k)


def _policy_batch(B, T, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g) * 2).to(dtype).requires_grad_()
    labels = _labels((B, T), V, seed)
    with torch.no_grad():
        logp = R.token_logprobs(x.double(), labels)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()  # ratios on both clip sides
    ref_lp = (logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    mask = torch.rand(B, T, generator=g) > 0.2
    return x, labels, old, ref_lp, mask, g


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_clip_loss_matches_reference(dtype, loss_agg):
    x, labels, old, ref_lp, mask, g = _policy_batch(3, 5, 1000, dtype, seed=21)
    adv = torch.randn(3, 5, generator=g)
    kw = dict(mask=mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, ref_logprobs=ref_lp, kl_coef=0.05,
              entropy_coef=0.01, temperature=0.9, loss_agg=loss_agg)
    loss, stats = fastrlhf.ppo_clip_loss(x, labels, old, adv, backend="native", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    loss64, stats64 = R.ppo_clip_loss(x64, labels, old, adv, **kw)
    (grad64,) = torch.autograd.grad(loss64, x64)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), loss64, atol=VAL_ATOL, rtol=1e-5)
    _assert_stats_close(stats, stats64)
    assert_grad_close(grad, grad64, dtype, atol32=GRAD_ATOL, rtol32=1e-5)
    assert (grad[labels == -100] == 0).all()
    assert (grad[~mask] == 0).all(), "masked tokens must get exactly zero gradient"


@needs_native
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_reference(beta):
    x, labels, old, ref_lp, mask, g = _policy_batch(4, 6, 32000, torch.float32, seed=22)
    adv = R.group_advantages(torch.randn(4, generator=g), group_size=2)  # per sequence
    kw = dict(mask=mask, loss_agg="seq-mean-token-mean")
    ref_arg = ref_lp if beta > 0 else None
    loss, stats = fastrlhf.grpo_loss(x, labels, old, adv, ref_arg, beta=beta, backend="native", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    loss64, stats64 = R.grpo_loss(x64, labels, old, adv, ref_arg, beta=beta, **kw)
    (grad64,) = torch.autograd.grad(loss64, x64)
    torch.testing.assert_close(loss.double(), loss64, atol=VAL_ATOL, rtol=1e-5)
    _assert_stats_close(stats, stats64)
    torch.testing.assert_close(grad.double(), grad64, atol=GRAD_ATOL, rtol=1e-5)
    assert (grad[~mask] == 0).all()


@needs_native
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dpo_loss_matches_reference(loss_type, dtype):
    B, T, V = 2, 5, 1000
    g = torch.Generator().manual_seed(23)
    leaf = (torch.randn(2 * B, T + 1, V, generator=g) * 2).to(dtype).requires_grad_()
    logits = leaf[:, :-1]  # the caller's shift: non-contiguous [2B, T, V]
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # prompt tokens
    ref_c, ref_r = torch.randn(B, generator=g) - 20, torch.randn(B, generator=g) - 20
    kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0,
              temperature=1.1)
    loss, stats = fastrlhf.dpo_loss(logits, labels, ref_c, ref_r, backend="native", **kw)
    (grad,) = torch.autograd.grad(loss, leaf)
    leaf64 = leaf.detach().double().requires_grad_()
    loss64, stats64 = R.dpo_loss(leaf64[:, :-1], labels, ref_c, ref_r, **kw)
    (grad64,) = torch.autograd.grad(loss64, leaf64)
    torch.testing.assert_close(loss.double(), loss64, atol=VAL_ATOL, rtol=1e-5)
    _assert_stats_close(stats, stats64)
    assert_grad_close(grad, grad64, dtype, atol32=GRAD_ATOL, rtol32=1e-5)
    assert (grad[:, :2] == 0).all() and (grad[:, -1] == 0).all()


# ----------------------------------------------------------------------------------------
# Bad inputs raise Python exceptions (public ops and the row primitives themselves)
# ----------------------------------------------------------------------------------------


@needs_native
def test_fp64_logits_are_rejected_by_the_native_backend():
    x = torch.randn(4, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="fp64"):
        fastrlhf.token_logprobs(x, torch.zeros(4, dtype=torch.long), backend="native")
    assert not _native.supports_dtype(torch.float64) and _native.supports_dtype(torch.bfloat16)


@needs_native
def test_supports_tells_auto_which_logits_native_takes():
    assert _native.supports(torch.randn(2, 3, 10)[:, :-1])  # leading strides are fine
    assert _native.supports(torch.randn(4, 10, dtype=torch.bfloat16))
    assert not _native.supports(torch.randn(4, 10, dtype=torch.float64))
    assert not _native.supports(torch.randn(10, 4).T)  # stride over V != 1
    assert not _native.supports(torch.empty(4, 10, device="meta"))


@needs_native
def test_unsupported_dtypes_raise():
    with pytest.raises(TypeError, match="logits"):
        fastrlhf.token_logprobs(torch.zeros(4, 10, dtype=torch.int32), torch.zeros(4, dtype=torch.long),
                                backend="native")
    with pytest.raises(ValueError, match="labels"):
        _native.row_forward(torch.randn(1, 4, 10), torch.zeros(4), 1.0, -100, False)
    with pytest.raises(ValueError, match="fp32"):
        _native.row_forward(torch.randn(1, 4, 10).to(torch.complex64), None, 1.0, -100, True)


@needs_native
def test_vocab_stride_must_be_one():
    x = torch.randn(2, 10, 5).transpose(1, 2)  # [2, 5, 10] with stride over V = 5
    labels = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="stride"):
        fastrlhf.token_logprobs(x, labels, backend="native")
    with pytest.raises(ValueError, match="stride"):
        fastrlhf.entropy(x, backend="native")


@needs_native
def test_shape_mismatches_raise():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="labels"):
        fastrlhf.token_logprobs(x, torch.zeros(5, dtype=torch.long), backend="native")
    x3 = x.unsqueeze(0)
    with pytest.raises(ValueError, match="labels"):
        _native.row_forward(x3, torch.zeros(5, dtype=torch.long), 1.0, -100, False)
    with pytest.raises(ValueError, match="labels must be contiguous"):
        _native.row_forward(x3, torch.zeros(4, 2, dtype=torch.long)[:, 0], 1.0, -100, False)
    with pytest.raises(ValueError, match="\\[B, T, V\\]"):
        _native.row_forward(x, None, 1.0, -100, True)
    _, _, lse = _native.row_forward(x3, None, 1.0, -100, True)
    with pytest.raises(ValueError, match="gradient must match"):
        _native.row_backward(x3, None, lse, None, None, None, 1.0, -100, torch.empty(1, 4, 11))
    with pytest.raises(ValueError, match="stride 0"):
        _native.row_backward(x3, None, lse, None, None, None, 1.0, -100, torch.empty(1, 1, 10).expand(1, 4, 10))
    with pytest.raises(ValueError, match="lse"):
        _native.row_backward(x3, None, lse[:3], None, None, None, 1.0, -100, torch.empty_like(x3))
    with pytest.raises(ValueError, match="dent"):
        _native.row_backward(x3, None, lse, None, None, torch.ones(4), 1.0, -100, torch.empty_like(x3))
    with pytest.raises(ValueError, match="CPU"):
        _native.row_forward(torch.empty(1, 4, 10, device="meta"), None, 1.0, -100, True)


@needs_native
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [10, -1, 1 << 30])
def test_out_of_range_labels_raise(label_dtype, bad):
    x = torch.randn(2, 3, 10, requires_grad=True)
    labels = torch.zeros(2, 3, dtype=label_dtype)
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=str(bad)):
        fastrlhf.token_logprobs(x, labels, backend="native")
    # The C++ pass checks too (the public check could be bypassed by calling the primitives).
    with pytest.raises(ValueError, match=f"labels contains {bad} at flat position 5"):
        _native.row_forward(x.detach(), labels.view(-1), 1.0, -100, True)
    _, _, lse = _native.row_forward(x.detach(), None, 1.0, -100, False)
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        _native.row_backward(x.detach(), labels.view(-1), lse, None, torch.ones(6), None, 1.0, -100,
                             torch.empty(2, 3, 10))
