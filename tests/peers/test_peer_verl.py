"""verl 0.9.1's own CPU tests for the functions ``fastrlhf.integrations.verl.patch()`` replaces, run against ours.

verl's modules import ray / tensordict / transformers at the top (``verl/__init__.py`` ->
``verl/protocol.py`` imports ray), so the tests call our drop-ins in place of verl's functions.
Sources: the verl 0.9.1 wheel (``pip download verl==0.9.1 --no-deps``), which ships them:

- ``tests/trainer/ppo/test_loss_aggregation_on_cpu.py`` (all 3 tests) -> ``agg_loss``.
- ``tests/trainer/ppo/test_core_algos_on_cpu.py``: ``test_kl_penalty_straight_through_value_matches_base``,
  ``test_kl_penalty_k3_plus_uses_k2_gradient`` -> ``kl_penalty``.
- ``tests/utils/test_linear_cross_entropy.py`` (volcengine/verl @ 76f6ce7c493af0e3406d03b27fc858b89a2a11dc,
  CUDA-only there): its fp32-logits reference and tolerances, on CPU at small shapes, against
  ``fastrlhf.linear_token_logprobs_and_entropy``.
Plus verl's label-shape and dtype conventions (items 3-4), with the verl source lines they follow.
"""

import pytest
import torch

import fastrlhf
from fastrlhf.integrations.verl import agg_loss, kl_penalty, logprobs_from_logits
from tests.conftest import backends


def test_token_sum_masks_tokens_and_scales_for_dp():
    loss_mat = torch.tensor([[1.0, 2.0, 30.0], [4.0, 50.0, 6.0]])
    loss_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    loss = agg_loss(loss_mat, loss_mask, loss_agg_mode="token-sum", dp_size=4)
    assert loss.item() == pytest.approx((1.0 + 2.0 + 4.0 + 6.0) * 4)


@pytest.mark.parametrize("num_micro_batches", [1, 2, 4])
def test_token_sum_is_microbatch_invariant(num_micro_batches):
    loss_mat = torch.arange(1, 25, dtype=torch.float32).reshape(8, 3)
    loss_mask = torch.tensor([[1.0, 1.0, 0.0]] * 8)
    step = loss_mat.shape[0] // num_micro_batches
    accumulated = sum(
        agg_loss(loss_mat[i : i + step], loss_mask[i : i + step], loss_agg_mode="token-sum")
        for i in range(0, loss_mat.shape[0], step)
    )
    whole = agg_loss(loss_mat, loss_mask, loss_agg_mode="token-sum")
    torch.testing.assert_close(accumulated, whole)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_token_sum_matches_global_sum_after_fsdp_mean_reduction(dp_size):
    loss_mat = torch.arange(1, 25, dtype=torch.float32).reshape(8, 3)
    loss_mask = torch.tensor([[1.0, 1.0, 0.0]] * 8)
    rank_step = loss_mat.shape[0] // dp_size
    rank_losses = [
        agg_loss(loss_mat[i : i + rank_step], loss_mask[i : i + rank_step], loss_agg_mode="token-sum",
                 dp_size=dp_size)
        for i in range(0, loss_mat.shape[0], rank_step)
    ]
    fsdp_reduced = torch.stack(rank_losses).mean()
    global_sum = agg_loss(loss_mat, loss_mask, loss_agg_mode="token-sum")
    torch.testing.assert_close(fsdp_reduced, global_sum)


@pytest.mark.parametrize("name,base", [("k1+", "k1"), ("kl+", "kl"), ("abs+", "abs"), ("k3+", "k3"),
                                       ("low_var_kl+", "low_var_kl")])
def test_kl_penalty_straight_through_value_matches_base(name, base):
    torch.manual_seed(0)
    logprob = torch.randn(4, 8, requires_grad=True)
    ref_logprob = torch.randn(4, 8)
    plus_value = kl_penalty(logprob, ref_logprob, name)
    base_value = kl_penalty(logprob, ref_logprob, base)
    assert torch.allclose(plus_value, base_value)


def test_kl_penalty_k3_plus_uses_k2_gradient():
    torch.manual_seed(0)
    logprob = torch.randn(4, 8, requires_grad=True)
    ref_logprob = torch.randn(4, 8)
    out_plus = kl_penalty(logprob, ref_logprob, "k3+").sum()
    (grad_plus,) = torch.autograd.grad(out_plus, logprob)
    logprob_k2 = logprob.detach().clone().requires_grad_(True)
    out_k2 = kl_penalty(logprob_k2, ref_logprob, "k2").sum()
    (grad_k2,) = torch.autograd.grad(out_k2, logprob_k2)
    assert torch.allclose(grad_plus, grad_k2)


# --- verl's shapes and dtypes ---------------------------------------


@pytest.mark.parametrize("backend", backends())
def test_logprobs_from_logits_accepts_flat_labels(backend, monkeypatch):
    """verl/utils/torch_functional.py:96-102 (0.9.1): the flash-attn path does ``labels.reshape(-1)`` and views
    the output as ``logits.shape[:-1]``, so labels ``[1, N]`` with logits ``[N, V]`` are valid."""
    monkeypatch.setenv("FASTRLHF_BACKEND", backend)
    torch.manual_seed(0)
    logits = torch.randn(7, 50)
    labels = torch.randint(0, 50, (1, 7))
    out = logprobs_from_logits(logits, labels, inplace_backward=False)
    assert out.shape == (7,)
    expected = logits.log_softmax(-1).gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, torch.randint(0, 50, (1, 6)))


@pytest.mark.parametrize("name", ["kl", "abs", "mse", "low_var_kl", "k3+"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kl_penalty_returns_input_dtype(name, dtype):
    """verl core_algos.py::kl_penalty_forward computes in the inputs' dtype; ours in fp32, returned in it."""
    torch.manual_seed(0)
    lp, ref = torch.randn(4, 8).to(dtype), torch.randn(4, 8).to(dtype)
    out = kl_penalty(lp, ref, name)
    assert out.dtype == dtype
    exact = kl_penalty(lp.double(), ref.double(), name)
    eps = torch.finfo(dtype).eps  # fp32 math, one rounding into dtype (exp amplifies the inputs' own rounding)
    torch.testing.assert_close(out.double(), exact, rtol=4 * eps, atol=eps)


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_agg_loss_bf16_promotes_through_float_mask_and_sums_in_fp32(mode):
    """verl torch_functional.py::masked_sum is ``(where(mask, x, 0) * mask).sum()``: a float mask makes the result
    fp32. The issue's case: token-sum of a bf16 [8, 1000] loss gave -34.00 (bf16 sum) vs -34.04."""
    torch.manual_seed(0)
    loss_mat = (torch.randn(8, 1000) * 0.1).bfloat16()
    mask = (torch.rand(8, 1000) > 0.1).float()
    out = agg_loss(loss_mat, mask, mode)
    exact = agg_loss(loss_mat.double(), mask.double(), mode)
    assert out.dtype == torch.float32
    assert abs(out.double() - exact).item() <= 1e-5 * max(1.0, abs(exact.item()))
    assert agg_loss(loss_mat, mask.bool(), mode).dtype == torch.bfloat16  # bool mask: verl keeps bf16


# --- verl tests/utils/test_linear_cross_entropy.py, on CPU ----------------------------------


def run_torch_entropy(hidden, weight, labels, temperature, reduction="none"):
    hidden = hidden.squeeze(0).to(torch.float32)
    weight = weight.transpose(0, 1).to(torch.float32)
    logits = torch.matmul(hidden, weight)  # [num_tokens, vocab_size]
    logits /= temperature
    pd = torch.nn.functional.softmax(logits, dim=-1)
    entropy_a = torch.logsumexp(logits, dim=-1)
    entropy_b = torch.sum(pd * logits, dim=-1)
    entropy = entropy_a - entropy_b
    logprobs = torch.nn.functional.cross_entropy(logits, labels.squeeze(0), reduction=reduction)
    logprobs = torch.neg(logprobs)
    return logprobs, entropy


@pytest.mark.parametrize("backend", backends())
def test_linear_cross_entropy_matches_fp32_reference(backend):
    """verify_correctness's kernel-vs-torch assertions (bf16 inputs, fp32 logits reference, temperature 1.5).
    Shapes: 1 x 96 tokens, H 1024, V 4099 (verl: 1388-8192 tokens, H 896-4096, V 32256-152064 on a GPU)."""
    torch.manual_seed(0)
    num_tokens, hidden_size, vocab_size, temperature = 96, 1024, 4099, 1.5
    hidden = torch.empty((1, num_tokens, hidden_size), dtype=torch.bfloat16).uniform_(-0.5, 0.5).requires_grad_()
    weight = torch.empty((vocab_size, hidden_size), dtype=torch.bfloat16).uniform_(-0.5, 0.5).requires_grad_()
    labels = torch.randint(0, vocab_size, (1, num_tokens))
    torch_logprobs, torch_entropy = run_torch_entropy(hidden, weight, labels, temperature)
    kernel_logprobs, kernel_entropy = fastrlhf.linear_token_logprobs_and_entropy(
        hidden, weight, labels, temperature=temperature, backend=backend, chunk_size=32
    )
    kernel_logprobs, kernel_entropy = kernel_logprobs.reshape(-1), kernel_entropy.reshape(-1)
    torch.testing.assert_close(torch_logprobs, kernel_logprobs, atol=1e-3, rtol=2e-4)
    torch.testing.assert_close(torch_entropy, kernel_entropy, atol=5e-3, rtol=5e-4)

    g_entropy = torch.empty((num_tokens,), dtype=torch.bfloat16).uniform_(-0.5, 0.5)
    g_logprobs = torch.empty((num_tokens,), dtype=torch.bfloat16).uniform_(-1, 1)
    d_torch_hidden, d_torch_weight = torch.autograd.grad(
        (torch_entropy, torch_logprobs), (hidden, weight), (g_entropy, g_logprobs))
    d_kernel_hidden, d_kernel_weight = torch.autograd.grad(
        (kernel_entropy, kernel_logprobs), (hidden, weight), (g_entropy.float(), g_logprobs.float()))
    torch.testing.assert_close(d_torch_hidden, d_kernel_hidden, atol=2e-2, rtol=4e-2)
    torch.testing.assert_close(d_torch_weight, d_kernel_weight, atol=2e-2, rtol=4e-2)
