"""Liger-Kernel's DPO test, run against ``fastrlhf.linear_dpo_loss`` / ``fastrlhf.dpo_loss``.

Source: ``test/chunked_loss/test_dpo_loss.py::test_correctness`` and its reference ``HFDPOLoss`` /
``test/utils.py::HFAlignmentLoss`` (linkedin/Liger-Kernel @ 9497a29b79838b30a82f2174685afa65ff122f7c;
liger-kernel 0.8.5 is the benchmarked version). The reference: per-response mean token log-prob
(``average_log_prob=True``) for policy and reference, ``-logsigmoid(beta * margin)``
averaged over pairs, plus ``alpha * nll`` with ``compute_nll_loss`` (cross-entropy of the chosen
responses, ``alpha = 1``) -> ours with ``length_normalize=True`` and ``rpo_alpha=1.0``. Liger's shape
``(3, 47, 31, 123)``, dtypes and tolerances; the large ``(8, 128, 1024, 4096)`` case is left out (CPU time).
"""

import pytest
import torch
import torch.nn.functional as F

import fastrlhf
from tests.conftest import backends


def get_batch_logps(logits, labels, ignore_index, average_log_prob):
    loss_mask = labels != ignore_index
    labels = torch.where(labels == ignore_index, 0, labels)
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token_logps * loss_mask).sum(-1)


def hf_dpo_loss(x, weight, bias, target, ref_logps, beta, ignore_index, compute_nll_loss):
    """HFAlignmentLoss.get_batch_loss_metrics with HFDPOLoss.alignment_loss (average_log_prob=True)."""
    logits = (x @ weight.t() + (bias if bias is not None else 0)).float()
    B = x.shape[0] // 2
    nll = torch.tensor(0.0)
    if compute_nll_loss:
        nll = F.cross_entropy(logits[:B].reshape(-1, logits.shape[-1]), target[:B].reshape(-1),
                              ignore_index=ignore_index)
    logps = get_batch_logps(logits, target, ignore_index, True)
    chosen_logratios = logps[:B] - ref_logps[:B]
    rejected_logratios = logps[B:] - ref_logps[B:]
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return nll * 1.0 + losses.mean()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("B, T, H, V", [(3, 47, 31, 123)])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.bfloat16, 5e-2, 5e-1), (torch.float32, 1e-5, 5e-4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
@pytest.mark.parametrize("ignore_index, beta", [(-100, 0.1), (42, 0.2)])
def test_correctness(backend, B, T, H, V, dtype, atol, rtol, bias, compute_nll_loss, ignore_index, beta):
    if backend == "triton" and not (bias and ignore_index == -100):
        pytest.skip("the Triton interpreter is slow on CPU: its cases are the bias / ignore_index=-100 ones")
    torch.manual_seed(0)
    scalar = 1.0
    _input = torch.randn(2 * B, T, H, dtype=dtype) * scalar
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    ref_x = torch.randn(2 * B, T, H, dtype=dtype) * scalar
    ref_w = (torch.randn(V, H) / H**0.5).to(dtype)
    target = torch.randint(0, V, (2 * B, T), dtype=torch.long)
    num_elements_to_assign = torch.randint(1, B * T, (1,)).item()
    indices_to_assign = torch.randperm(B * T)[:num_elements_to_assign]
    target.view(-1)[indices_to_assign] = ignore_index
    with torch.no_grad():
        ref_logps = get_batch_logps((ref_x @ ref_w.t()).float(), target, ignore_index, True)

    params = [t.detach().clone().requires_grad_() for t in (_input, weight) + ((b,) if bias else ())]
    loss1 = hf_dpo_loss(params[0], params[1], params[2] if bias else None, target, ref_logps, beta,
                        ignore_index, compute_nll_loss)
    loss1.backward()

    ours = [t.detach().clone().requires_grad_() for t in (_input, weight) + ((b,) if bias else ())]
    loss2, stats = fastrlhf.linear_dpo_loss(
        ours[0], ours[1], target, ref_logps[:B], ref_logps[B:], bias=ours[2] if bias else None, beta=beta,
        ignore_index=ignore_index, length_normalize=True, rpo_alpha=1.0 if compute_nll_loss else None,
        backend=backend,
    )
    loss2.backward()
    torch.testing.assert_close(loss1, loss2, atol=atol, rtol=rtol)
    for p1, p2 in zip(params, ours):
        torch.testing.assert_close(p1.grad, p2.grad, atol=atol, rtol=rtol)
    assert ("nll_loss" in stats) == compute_nll_loss

    # The logits op gives the same loss on the materialized logits.
    logits = (ours[0].detach() @ ours[1].detach().t() + (ours[2].detach() if bias else 0)).float()
    loss3, _ = fastrlhf.dpo_loss(logits, target, ref_logps[:B], ref_logps[B:], beta=beta, ignore_index=ignore_index,
                                 length_normalize=True, rpo_alpha=1.0 if compute_nll_loss else None, backend=backend)
    torch.testing.assert_close(loss1, loss3, atol=atol, rtol=rtol)
