"""Oracle of the fused-linear ops: the logits ops applied to the full ``hidden @ weight.T (+ bias)``."""

from __future__ import annotations

from .dpo import dpo_loss
from .logprobs import token_logprobs, token_logprobs_and_entropy
from .policy import grpo_loss, ppo_clip_loss

# ----------------------------------------------------------------------------------------
# Fused-linear variants: the logits ops applied to hidden @ weight.T (+ bias)
# ----------------------------------------------------------------------------------------


def _linear_logits(hidden, weight, bias):
    logits = hidden @ weight.T  # [..., V]  the full logits the fused-linear ops never build
    if bias is not None:
        logits = logits + bias
    return logits


def linear_token_logprobs(hidden, weight, labels, *, bias=None, **kwargs):
    return token_logprobs(_linear_logits(hidden, weight, bias), labels, **kwargs)


def linear_token_logprobs_and_entropy(hidden, weight, labels, *, bias=None, **kwargs):
    return token_logprobs_and_entropy(_linear_logits(hidden, weight, bias), labels, **kwargs)


def linear_ppo_clip_loss(hidden, weight, labels, old_logprobs, advantages, *, bias=None, **kwargs):
    return ppo_clip_loss(_linear_logits(hidden, weight, bias), labels, old_logprobs, advantages, **kwargs)


def linear_grpo_loss(hidden, weight, labels, old_logprobs, advantages, ref_logprobs=None, *, bias=None, **kwargs):
    return grpo_loss(_linear_logits(hidden, weight, bias), labels, old_logprobs, advantages, ref_logprobs, **kwargs)


def linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, *, bias=None, **kwargs):
    return dpo_loss(_linear_logits(hidden, weight, bias), labels, ref_chosen_logps, ref_rejected_logps, **kwargs)
