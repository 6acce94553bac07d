"""TRL's own tests for the functions ``fastrlhf.integrations.trl.patch()`` replaces, run against fastrlhf.

Ported bodies (TRL's assertions and tolerances kept; CPU, small shapes, every fastrlhf backend via
``FASTRLHF_BACKEND``; the Triton kernels run under the interpreter):

- ``tests/test_kernels.py`` (huggingface/trl @ d500a93f5b3bac5932e34e54a807c103318cf667, TRL 1.16 line):
  ``TestLogProbEntropy`` (``trl.kernels.selective_log_softmax_and_entropy`` -> our
  ``fused_selective_log_softmax_and_entropy``) and ``TestChunkedLogProbFunction`` (-> our
  ``ChunkedLogProbFunction``). TRL marks them ``@require_torch_accelerator``; ours run on CPU.
- ``tests/test_utils.py`` (huggingface/trl @ 85dd510ba5eab9018609a9a2ae6122d1eb45ca98):
  ``TestSelectiveLogSoftmax``, ``TestEntropyFromLogits``. Their half-precision cases demand
  ``torch.equal`` with torch's bf16/fp16 ``log_softmax``; fastrlhf computes in fp32 and rounds once,
  so those cases assert instead that ours is at least as close to fp64 and within the measured
  distance of TRL's bits (``docs/integrations.md``).
"""

from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import backends

trl_utils = pytest.importorskip("trl.trainer.utils")
import fastrlhf.integrations.trl as fr  # noqa: E402

selective_log_softmax_and_entropy = fr.fused_selective_log_softmax_and_entropy
ChunkedLogProbFunction = fr.ChunkedLogProbFunction
torch_device = "cpu"

HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(params=backends(), autouse=True)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTRLHF_BACKEND", request.param)
    return request.param


def reference(logits, index, temperature, row_mask):
    logits = logits.float() / temperature
    logprobs = logits.log_softmax(-1)
    selected_logprobs = logprobs.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    if row_mask is not None:
        selected_logprobs = selected_logprobs.masked_fill(~row_mask, 0.0)
        entropy = entropy.masked_fill(~row_mask, 0.0)
    return selected_logprobs, entropy


class TestLogProbEntropy:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize(
        ("logprob_weight", "entropy_weight", "use_mask"),
        [(2, None, True), (None, 0.5, True), (2, 0.5, True), (2, 0.5, False)],
    )
    def test_forward_and_backward(self, dtype, logprob_weight, entropy_weight, use_mask):
        """trl tests/test_kernels.py::TestLogProbEntropy::test_forward_and_backward. Includes the in-place
        edit ``logprobs[0, 2] = 0.0`` of a returned output."""
        torch.manual_seed(0)
        vocab_size = 2053
        base_logits = torch.randn(2, 5, vocab_size, device=torch_device, dtype=dtype)
        base_logits[..., :1024].add_(20)
        base_logits[..., 1024:2048].sub_(20)
        base_logits.requires_grad_()
        logits = base_logits[:, 1:4]
        index = torch.randint(vocab_size, (2, 5), device=torch_device)[:, 1:4]
        index[0, 0] = vocab_size - 1
        temperature = 0.7
        sliced_mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], device=torch_device, dtype=torch.bool)[:, 1:4]
        row_mask = sliced_mask if use_mask else None

        logprobs, entropy = selective_log_softmax_and_entropy(
            logits, index, temperature=temperature, row_mask=row_mask
        )
        # Mutating exposed outputs must not corrupt the private statistics saved for backward.
        logprobs[0, 2] = 0.0
        loss = 0.0
        if logprob_weight is not None:
            loss = loss + logprob_weight * logprobs.sum()
        if entropy_weight is not None:
            loss = loss + entropy_weight * entropy.sum()
        loss.backward()
        actual_grad = base_logits.grad.clone()

        reference_logits = base_logits.detach().clone().requires_grad_()
        reference_logprobs, reference_entropy = reference(reference_logits[:, 1:4], index, temperature, row_mask)
        reference_logprobs[0, 2] = 0.0
        reference_loss = 0.0
        if logprob_weight is not None:
            reference_loss = reference_loss + logprob_weight * reference_logprobs.sum()
        if entropy_weight is not None:
            reference_loss = reference_loss + entropy_weight * reference_entropy.sum()
        reference_loss.backward()

        torch.testing.assert_close(logprobs, reference_logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, reference_entropy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(actual_grad, reference_logits.grad, rtol=1e-3, atol=1e-3)

    def test_torch_compile_fullgraph(self, backend):
        """trl tests/test_kernels.py::TestLogProbEntropy::test_torch_compile_fullgraph."""
        torch.manual_seed(0)
        logits = torch.randn(2, 3, 257, device=torch_device, dtype=torch.bfloat16, requires_grad=True)
        index = torch.randint(257, (2, 3), device=torch_device)
        row_mask = torch.tensor([[1, 0, 1], [0, 1, 1]], device=torch_device, dtype=torch.bool)

        def loss(logits, index, row_mask):
            logprobs, entropy = selective_log_softmax_and_entropy(logits, index, temperature=0.8, row_mask=row_mask)
            return (logprobs + 0.1 * entropy).sum()

        torch.compile(loss, fullgraph=True)(logits, index, row_mask).backward()

        assert logits.grad is not None
        assert torch.isfinite(logits.grad).all()
        assert torch.count_nonzero(logits.grad[~row_mask]) == 0


class TestChunkedLogProbFunction:
    """trl tests/test_kernels.py::TestChunkedLogProbFunction (the fused LM head of TRL 1.x)."""

    N, H, V = 64, 32, 128
    CHUNK_SIZE = 32

    def _reference_logprobs_and_entropy(
        self, hidden, weight, labels, temperature, bias=None, logit_scale=1.0, final_logit_softcapping=None
    ):
        logits = hidden @ weight.t()
        if bias is not None:
            logits = logits + bias
        logits = logits.to(torch.float32) * logit_scale
        if final_logit_softcapping is not None:
            logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
        logits = logits / temperature  # [N, V]
        log_p = F.log_softmax(logits, dim=-1)
        logprobs = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        p = torch.softmax(logits, dim=-1)
        entropy = -(p * log_p).sum(dim=-1)
        return logprobs, entropy

    def _inputs(self, dtype=torch.float32, grad=False):
        torch.manual_seed(42)
        hidden = torch.randn(self.N, self.H, dtype=dtype, requires_grad=grad, device=torch_device)
        weight = torch.randn(self.V, self.H, dtype=dtype, requires_grad=grad, device=torch_device)
        labels = torch.randint(0, self.V, (self.N,), device=torch_device)
        return hidden, weight, labels

    @pytest.mark.parametrize("temperature", [1.0, 0.7])
    def test_forward(self, temperature):
        """TRL patches its TOKEN_CHUNK_SIZE to 17 and records torch.mm's rows; ours blocks rows by
        BLOCK_ELEMENTS, patched to 17 rows of V here (the row count check is on our block size)."""
        hidden, weight, labels = self._inputs()
        with patch.object(fr, "BLOCK_ELEMENTS", 17 * self.V):
            assert [r1 - r0 for r0, r1 in fr._row_blocks(self.N, self.V)][-1] == 13
            logprobs_chunked, entropy_chunked, *_ = ChunkedLogProbFunction.apply(
                hidden, weight, None, labels, temperature, self.CHUNK_SIZE
            )
        logprobs_ref, entropy_ref = self._reference_logprobs_and_entropy(hidden, weight, labels, temperature)
        torch.testing.assert_close(logprobs_chunked, logprobs_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy_chunked, entropy_ref, atol=1e-5, rtol=1e-5)

    def test_log_sum_sq_probs(self):
        hidden, weight, labels = self._inputs()
        _, _, log_sum_sq_probs, _, _ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.7, self.CHUNK_SIZE)
        logits = (hidden @ weight.t()) / 0.7
        expected = torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)
        torch.testing.assert_close(log_sum_sq_probs, expected, atol=1e-5, rtol=1e-5)

    def test_mean_logits(self):
        hidden, weight, labels = self._inputs()
        _, _, _, mean_logits, _ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.7, self.CHUNK_SIZE)
        torch.testing.assert_close(mean_logits, (hidden @ weight.t()).mean(-1) / 0.7, atol=1e-5, rtol=1e-5)

    def test_is_top1_matches_argmax_with_ties(self):
        hidden, weight, _ = self._inputs()
        weight[self.V // 2 :] = weight[: self.V - self.V // 2]
        argmax = (hidden @ weight.t()).argmax(-1)
        labels = torch.where(torch.arange(self.N, device=torch_device) % 2 == 0, argmax, argmax + self.V // 2)
        labels = labels.clamp(max=self.V - 1)
        *_, is_top1 = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, self.CHUNK_SIZE)
        torch.testing.assert_close(is_top1, argmax == labels)

    @pytest.mark.parametrize(("logit_scale", "final_logit_softcapping"), [(0.5, None), (1.0, 30.0), (0.5, 30.0)])
    def test_logit_scale_and_softcapping(self, logit_scale, final_logit_softcapping):
        hidden, weight, labels = self._inputs()
        logprobs, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, None, labels, 0.7, self.CHUNK_SIZE, final_logit_softcapping, logit_scale
        )
        logprobs_ref, entropy_ref = self._reference_logprobs_and_entropy(
            hidden, weight, labels, 0.7, logit_scale=logit_scale, final_logit_softcapping=final_logit_softcapping
        )
        torch.testing.assert_close(logprobs, logprobs_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, entropy_ref, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize(("dtype", "tol", "temperature"), [
        (torch.float32, 1e-5, 1.0), (torch.float32, 1e-5, 0.7),
        (torch.bfloat16, 1e-2, 1.0), (torch.bfloat16, 1e-2, 0.7),
    ])
    def test_backward(self, dtype, tol, temperature):
        """test_backward and test_backward_bfloat16."""
        hidden, weight, labels = self._inputs(dtype, grad=True)
        logprobs_chunked, _, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, temperature,
                                                               self.CHUNK_SIZE)
        logprobs_chunked.sum().backward()
        grad_hidden_chunked, grad_weight_chunked = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        logprobs_ref, _ = self._reference_logprobs_and_entropy(hidden, weight, labels, temperature)
        logprobs_ref.sum().backward()
        torch.testing.assert_close(grad_hidden_chunked, hidden.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(grad_weight_chunked, weight.grad, atol=tol, rtol=tol)

    def test_backward_bfloat16_hidden_float32_weight(self):
        torch.manual_seed(42)
        hidden = torch.randn(self.N, self.H, dtype=torch.bfloat16, requires_grad=True, device=torch_device)
        weight = torch.randn(self.V, self.H, dtype=torch.float32, requires_grad=True, device=torch_device)
        labels = torch.randint(0, self.V, (self.N,), device=torch_device)
        logprobs, _, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, self.CHUNK_SIZE)
        logprobs.sum().backward()
        grad_hidden, grad_weight = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        reference, _ = self._reference_logprobs_and_entropy(hidden, weight.to(hidden.dtype), labels, 1.0)
        reference.sum().backward()
        torch.testing.assert_close(logprobs, reference, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(grad_hidden, hidden.grad, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(grad_weight, weight.grad, atol=1e-2, rtol=1e-2)

    def test_backward_uses_autocast_hidden_for_weight_gradient(self):
        torch.manual_seed(42)
        hidden = torch.linspace(1.0, 2.0, self.N * self.H).reshape(self.N, self.H).to(torch.bfloat16).float()
        perturbed_hidden = hidden + 1e-4
        assert torch.equal(hidden.to(torch.bfloat16), perturbed_hidden.to(torch.bfloat16))
        hidden.requires_grad_()
        perturbed_hidden.requires_grad_()
        weight = torch.randn(self.V, self.H, requires_grad=True)
        perturbed_weight = weight.detach().clone().requires_grad_()
        labels = torch.randint(0, self.V, (self.N,))
        with torch.autocast(torch_device, dtype=torch.bfloat16):
            logprobs, _, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, self.CHUNK_SIZE)
            perturbed_logprobs, _, *_ = ChunkedLogProbFunction.apply(
                perturbed_hidden, perturbed_weight, None, labels, 1.0, self.CHUNK_SIZE
            )
        logprobs.sum().backward()
        perturbed_logprobs.sum().backward()
        torch.testing.assert_close(logprobs, perturbed_logprobs, rtol=0, atol=0)
        torch.testing.assert_close(weight.grad, perturbed_weight.grad, rtol=0, atol=0)

    @pytest.mark.parametrize("temperature", [1.0, 0.7])
    @pytest.mark.parametrize("combined", [False, True])
    def test_backward_entropy(self, temperature, combined):
        """test_backward_entropy (entropy alone) and test_backward_combined (2 logp + 0.5 entropy)."""
        hidden, weight, labels = self._inputs(grad=True)

        def objective(lp, ent):
            return (2.0 * lp + 0.5 * ent).sum() if combined else ent.sum()

        logprobs_chunked, entropy_chunked, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, None, labels, temperature, self.CHUNK_SIZE
        )
        objective(logprobs_chunked, entropy_chunked).backward()
        grads = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        objective(*self._reference_logprobs_and_entropy(hidden, weight, labels, temperature)).backward()
        torch.testing.assert_close(grads[0], hidden.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grads[1], weight.grad, atol=1e-4, rtol=1e-4)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_bias(self, dtype):
        hidden, weight, labels = self._inputs(dtype, grad=True)
        bias = torch.randn(self.V, dtype=dtype, requires_grad=True)
        logprobs_chunked, entropy_chunked, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, bias, labels, 0.7, self.CHUNK_SIZE
        )
        (2.0 * logprobs_chunked + 0.5 * entropy_chunked).sum().backward()
        chunked_grads = hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()
        hidden.grad = weight.grad = bias.grad = None
        logprobs_ref, entropy_ref = self._reference_logprobs_and_entropy(hidden, weight, labels, 0.7, bias)
        (2.0 * logprobs_ref + 0.5 * entropy_ref).sum().backward()
        atol, rtol = (5e-2, 2e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)
        torch.testing.assert_close(logprobs_chunked, logprobs_ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(entropy_chunked, entropy_ref, atol=atol, rtol=rtol)
        for actual, expected in zip(chunked_grads, (hidden.grad, weight.grad, bias.grad), strict=True):
            torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)

    def test_backward_skips_frozen_parameter_gradients(self):
        hidden, weight, labels = self._inputs()
        hidden.requires_grad_()
        bias = torch.randn(self.V)
        logprobs, _, *_ = ChunkedLogProbFunction.apply(hidden, weight, bias, labels, 1.0, self.CHUNK_SIZE)
        with patch.object(torch, "zeros", wraps=torch.zeros) as mock_zeros:
            logprobs.sum().backward()
        allocated_shapes = [call.args[0] for call in mock_zeros.call_args_list if call.args]
        assert weight.shape not in allocated_shapes
        assert bias.shape not in allocated_shapes
        assert hidden.grad is not None

    @pytest.mark.parametrize("requires_grad", [(True, False, False), (False, True, False), (False, False, True)])
    def test_backward_with_partially_frozen_inputs(self, requires_grad):
        hidden, weight, labels = self._inputs()
        bias = torch.randn(self.V)
        for t, rg in zip((hidden, weight, bias), requires_grad):
            t.requires_grad_(rg)
        logprobs, _, *_ = ChunkedLogProbFunction.apply(hidden, weight, bias, labels, 1.0, self.CHUNK_SIZE)
        logprobs.sum().backward()
        chunked_grads = hidden.grad, weight.grad, bias.grad
        refs = [t.detach().clone().requires_grad_(rg) for t, rg in zip((hidden, weight, bias), requires_grad)]
        logprobs_ref, _ = self._reference_logprobs_and_entropy(refs[0], refs[1], labels, 1.0, refs[2])
        logprobs_ref.sum().backward()
        for actual, expected in zip(chunked_grads, (r.grad for r in refs), strict=True):
            if expected is not None:
                torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def _skip_fp64(dtype, backend):
    if dtype == torch.float64 and backend != "torch":
        pytest.skip(f"backend={backend!r} takes fp32/bf16/fp16 logits (fp64 runs on the torch backend)")


def _half_case(ours, theirs, exact64, dtype, max_ulps):
    """Item 8: TRL demands torch.equal with torch's half-precision result. Ours is fp32 math rounded once:
    no farther from fp64 than TRL's, and within ``max_ulps`` units in the last place of TRL's bits."""
    assert ours.dtype == theirs.dtype == dtype
    err_ours = (ours.double() - exact64).abs()
    err_theirs = (theirs.double() - exact64).abs()
    assert err_ours.max() <= err_theirs.max(), "fastrlhf must be at least as close to fp64 as torch's half path"
    ulp = torch.finfo(dtype).eps * theirs.double().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((ours.double() - theirs.double()).abs() <= max_ulps * ulp + 1e-30).all()


class TestSelectiveLogSoftmax:
    """trl tests/test_utils.py::TestSelectiveLogSoftmax, with ``patch()`` active (the call goes through
    ``trl.trainer.utils.selective_log_softmax``)."""

    @pytest.fixture(autouse=True)
    def patched(self):
        with fr.patch():
            yield

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("k", [None, 1, 8])
    def test_selective_log_softmax(self, dtype, k, backend):
        """test_selective_log_softmax (k None) and test_selective_log_softmax_multi_index (k = 1, 8)."""
        _skip_fp64(dtype, backend)
        torch.manual_seed(0)
        vocab_size, batch_size, seq_len = 1024, 4, 32
        shape = (batch_size, seq_len) if k is None else (batch_size, seq_len, k)
        index = torch.randint(low=0, high=vocab_size, size=shape)
        logits = torch.randn(batch_size, seq_len, vocab_size, dtype=dtype)
        gather_idx = index.unsqueeze(-1) if k is None else index
        expected_output = torch.gather(logits.log_softmax(-1), dim=-1, index=gather_idx)
        if k is None:
            expected_output = expected_output.squeeze(-1)
        actual_output = trl_utils.selective_log_softmax(logits, index)
        assert actual_output.shape == expected_output.shape
        if dtype in HALF:
            exact = torch.gather(logits.double().log_softmax(-1), -1, gather_idx)
            _half_case(actual_output, expected_output, exact if k is not None else exact.squeeze(-1), dtype, 2)
        else:
            torch.testing.assert_close(actual_output, expected_output, rtol=1e-5, atol=1e-5)


class TestEntropyFromLogits:
    """trl tests/test_utils.py::TestEntropyFromLogits::test_entropy_from_logits_2_dims, ``patch()`` active."""

    @pytest.fixture(autouse=True)
    def patched(self):
        with fr.patch():
            yield

    @pytest.mark.parametrize("shape", [(768,), (32, 768), (8, 16, 768), (2, 4, 8, 768)])
    @pytest.mark.parametrize("chunk_size", [1, 16])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
    def test_entropy_from_logits_2_dims(self, dtype, chunk_size, shape, backend):
        _skip_fp64(dtype, backend)
        torch.manual_seed(0)
        logits = torch.randn(*shape, dtype=dtype)
        if dtype in (torch.float64, torch.float32):
            p = logits.softmax(-1)
            entropy = -torch.sum(p * p.log(), dim=-1)
        else:
            logps = logits.log_softmax(dim=-1)
            entropy = -(torch.exp(logps) * logps).sum(-1)
        predicted_entropy = trl_utils.entropy_from_logits(logits, chunk_size=chunk_size)
        if dtype in HALF:
            p64 = logits.double().softmax(-1)
            _half_case(predicted_entropy, entropy, -(p64 * p64.log()).sum(-1), dtype, 2)
        else:
            torch.testing.assert_close(predicted_entropy, entropy, rtol=1e-5, atol=1e-5)
