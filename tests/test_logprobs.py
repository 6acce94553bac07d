"""Layer 2: token ops on every backend (Triton under the interpreter on CPU) vs the fp64 reference."""

import pytest
import torch
from conftest import assert_grad_close, backends, device_for

import fastrlhf
from fastrlhf import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, V): tiny odd V, real vocabularies, 2-D and 3-D; V=151936 is above every block size.
SHAPES = [((5,), 7), ((2, 3), 1000), ((3,), 32000), ((2,), 50257), ((1, 2), 151936)]


def _inputs(lead, V, dtype, device, seed=0, scale=3.0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # logits[:, :-1] of a [B, T + 1, V] tensor: leading dims non-contiguous
        full = torch.randn(*lead[:-1], lead[-1] + 1, V, generator=g) * scale
        x = full.to(dtype).to(device)[..., :-1, :]
    else:
        x = (torch.randn(*lead, V, generator=g) * scale).to(dtype).to(device)
    labels = torch.randint(0, V, lead, generator=g).to(device)
    labels.view(-1)[1 % labels.numel()] = -100
    return x, labels


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,V", SHAPES)
def test_logprobs_entropy_fwd_bwd(backend, dtype, lead, V):
    if V > 60000 and dtype != torch.float32:
        pytest.skip("large V covered in fp32; keeps the interpreter run short")
    dev = device_for(backend)
    x, labels = _inputs(lead, V, dtype, dev)
    x.requires_grad_()
    x_before = x.detach().clone()
    lp, ent = fastrlhf.token_logprobs_and_entropy(x, labels, temperature=0.7, backend=backend)
    assert lp.shape == lead and ent.shape == lead and lp.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    lp64, ent64 = R.token_logprobs_and_entropy(x64, labels, temperature=0.7)
    torch.testing.assert_close(lp.double(), lp64, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ent64, atol=2e-5, rtol=0)
    g = torch.Generator().manual_seed(1)
    glp, gent = torch.randn(lead, generator=g).to(dev), torch.randn(lead, generator=g).to(dev)
    (grad,) = torch.autograd.grad((lp * glp + ent * gent).sum(), x)
    (grad64,) = torch.autograd.grad((lp64 * glp.double() + ent64 * gent.double()).sum(), x64)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_grad_close(grad, grad64, dtype)
    ignored = labels == -100
    assert (grad[ignored] == 0).all(), "ignore_index rows must get exactly zero gradient"
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert torch.equal(x.detach(), x_before), "logits must be untouched without inplace_backward"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_noncontiguous_temperature(backend, dtype):
    dev = device_for(backend)
    x, labels = _inputs((2, 5), 300, dtype, dev, noncontig=True)
    assert not x.is_contiguous()
    x.requires_grad_()
    lp = fastrlhf.token_logprobs(x, labels, temperature=1.3, backend=backend)
    x64 = x.detach().double().requires_grad_()
    lp64 = R.token_logprobs(x64, labels, temperature=1.3)
    torch.testing.assert_close(lp.double(), lp64, atol=2e-5, rtol=0)
    up = torch.randn(lp.shape).to(dev)
    (grad,) = torch.autograd.grad((lp * up).sum(), x)
    (grad64,) = torch.autograd.grad((lp64 * up.double()).sum(), x64)
    assert_grad_close(grad, grad64, dtype)


@pytest.mark.parametrize("backend", backends())
def test_entropy_only(backend):
    dev = device_for(backend)
    x, _ = _inputs((3, 4), 513, torch.float32, dev, noncontig=True)
    x.requires_grad_()
    h = fastrlhf.entropy(x, temperature=0.9, backend=backend)
    x64 = x.detach().double().requires_grad_()
    h64 = R.entropy(x64, temperature=0.9)
    torch.testing.assert_close(h.double(), h64, atol=2e-5, rtol=0)
    up = torch.randn(h.shape).to(dev)
    (grad,) = torch.autograd.grad((h * up).sum(), x)
    (grad64,) = torch.autograd.grad((h64 * up.double()).sum(), x64)
    assert_grad_close(grad, grad64, torch.float32)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_writes_into_logits(backend, dtype):
    dev = device_for(backend)
    x, labels = _inputs((4,), 1000, dtype, dev)
    ref_x = x.clone().requires_grad_()
    lp_ref = fastrlhf.token_logprobs(ref_x, labels, backend=backend)
    (grad_ref,) = torch.autograd.grad(lp_ref.sum(), ref_x)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf whose storage may be reused, as a model's output
    ptr = logits.data_ptr()
    lp = fastrlhf.token_logprobs(logits, labels, inplace_backward=True, backend=backend)
    torch.testing.assert_close(lp, lp_ref, atol=0, rtol=0)
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    assert grad.data_ptr() == ptr, "gradient must land in the logits' own storage"
    torch.testing.assert_close(grad, grad_ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", backends())
def test_int32_labels_and_large_logits(backend):
    dev = device_for(backend)
    x, labels = _inputs((6,), 101, torch.float32, dev)
    x = x * 3000  # |logits| ~ 1e4: exp must not overflow
    lp = fastrlhf.token_logprobs(x, labels.int(), backend=backend)
    lp64, ent64 = R.token_logprobs_and_entropy(x.double(), labels)
    torch.testing.assert_close(lp.double(), lp64, atol=2e-5, rtol=1e-6)
    _, ent = fastrlhf.token_logprobs_and_entropy(x.half() if backend == "triton" else x, labels, backend=backend)
    assert torch.isfinite(ent).all()


@pytest.mark.parametrize("backend", backends())
def test_neg_inf_logits(backend):
    dev = device_for(backend)
    x = torch.randn(3, 50).to(dev)
    x[:, 10:20] = float("-inf")  # e.g. a padded vocabulary
    x.requires_grad_()
    labels = torch.tensor([0, 5, 49]).to(dev)
    lp, ent = fastrlhf.token_logprobs_and_entropy(x, labels, backend=backend)
    x64 = x.detach().double().requires_grad_()
    lp64, ent64 = R.token_logprobs_and_entropy(x64, labels)
    torch.testing.assert_close(lp.double(), lp64, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ent64, atol=2e-5, rtol=0)
    (grad,) = torch.autograd.grad((lp + ent).sum(), x)
    (grad64,) = torch.autograd.grad((lp64 + ent64).sum(), x64)
    assert torch.isfinite(grad).all()
    assert_grad_close(grad, grad64, torch.float32)


def test_backends_agree_on_fp32():
    x, labels = _inputs((2, 7), 777, torch.float32, "cpu")
    outs = {b: fastrlhf.token_logprobs_and_entropy(x, labels, backend=b) for b in backends() if device_for(b) == "cpu"}
    base = outs.pop("torch")
    for lp, ent in outs.values():
        torch.testing.assert_close(lp, base[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, base[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", backends())
def test_bad_inputs_raise(backend):
    dev = device_for(backend)
    x = torch.randn(2, 3, 10).to(dev)
    labels = torch.zeros(2, 3, dtype=torch.long).to(dev)
    bad = labels.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match="10"):
        fastrlhf.token_logprobs(x, bad, backend=backend)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="-1"):
        fastrlhf.token_logprobs(x, bad, backend=backend)
    with pytest.raises(ValueError, match="labels"):
        fastrlhf.token_logprobs(x, labels[:, :2], backend=backend)
    with pytest.raises(TypeError, match="labels"):
        fastrlhf.token_logprobs(x, labels.float(), backend=backend)
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            fastrlhf.token_logprobs(x, labels, temperature=t, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        fastrlhf.token_logprobs(x, labels, backend="cuda-magic")


def test_empty_batch():
    for b in backends():
        dev = device_for(b)
        x = torch.randn(0, 10, device=dev, requires_grad=True)
        lp = fastrlhf.token_logprobs(x, torch.zeros(0, dtype=torch.long, device=dev), backend=b)
        assert lp.shape == (0,)
        lp.sum().backward()
        assert x.grad.shape == (0, 10)


def test_env_var_selects_backend(monkeypatch):
    from fastrlhf._backend import resolve_backend

    monkeypatch.setenv("FASTRLHF_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTRLHF_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_large_rows_int64_offsets():
    # N x V > 2^31 elements: row offsets must be int64 (bf16, ~4.3 GB).
    N, V = 16384 + 8, 131072
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    lp = fastrlhf.token_logprobs(x, labels, backend="triton")
    tail = slice(N - 4, N)
    torch.testing.assert_close(lp[tail].double(), R.token_logprobs(x[tail].double(), labels[tail]), atol=2e-5, rtol=0)
