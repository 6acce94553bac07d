"""Plain-PyTorch reference of every fastrlhf op: the oracle (a package, one module per op family).

Every public op of ``docs/API.md`` has a same-named, same-signature function here
(``fastrlhf.reference.<op>``). Tests compare the kernels with these (in fp64), and benchmarks
may use them. Production code never imports this package (``tests/test_layout.py`` checks it):
the ``[N]``-sized loss math it shares with the kernels is written again, independently, in
``fastrlhf/token_math.py`` and ``fastrlhf/policy_forms.py``, so a bug in one cannot hide from
the tests that compare against the other.

These functions are written for clarity, not memory: they materialize the full ``[N, V]``
log-softmax (``N x V x 4`` bytes in fp32), exactly what the kernels avoid. No Triton import.

``upcast=True`` (default) computes in fp32, or fp64 when the input is fp64; ``upcast=False``
computes in the input dtype, which measures PyTorch's own error at that precision.

Modules: ``logprobs`` (token ops, KL, sampler support), ``policy`` (PPO-clip / GRPO and the
policy-loss forms), ``dpo``, ``linear`` (fused-linear twins), ``advantages`` (GAE, group,
RLOO, REINFORCE(++), value loss, whitening), ``ranking`` (reward-model loss, RRHF).
"""

from ._common import DPO_LOSS_TYPES, KL_ESTIMATORS, LOG_RATIO_CLAMP, LOSS_AGG_MODES, as_batch_time, loss_agg_weights
from .advantages import (
    clipped_value_loss,
    estimate_advantages,
    gae,
    group_advantages,
    masked_whiten,
    reinforce_advantages,
    reinforce_plus_plus_advantages,
    returns_to_go,
    rloo_advantages,
)
from .dpo import dpo_loss, dpo_loss_from_logprobs, dpo_sequence_logps
from .linear import (
    linear_dpo_loss,
    linear_grpo_loss,
    linear_ppo_clip_loss,
    linear_token_logprobs,
    linear_token_logprobs_and_entropy,
)
from .logprobs import entropy, kl_estimate, support_mask, token_logprobs, token_logprobs_and_entropy
from .policy import grpo_loss, policy_surrogate, ppo_clip_loss, ppo_clip_loss_from_logprobs, rollout_correction_weights
from .ranking import linear_rrhf_loss, pairwise_reward_loss, rrhf_loss, rrhf_loss_from_logprobs

__all__ = [
    "DPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "LOSS_AGG_MODES",
    "as_batch_time",
    "loss_agg_weights",
    "entropy",
    "kl_estimate",
    "support_mask",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "grpo_loss",
    "policy_surrogate",
    "ppo_clip_loss",
    "ppo_clip_loss_from_logprobs",
    "rollout_correction_weights",
    "dpo_loss",
    "dpo_loss_from_logprobs",
    "dpo_sequence_logps",
    "linear_dpo_loss",
    "linear_grpo_loss",
    "linear_ppo_clip_loss",
    "linear_token_logprobs",
    "linear_token_logprobs_and_entropy",
    "clipped_value_loss",
    "estimate_advantages",
    "gae",
    "group_advantages",
    "masked_whiten",
    "reinforce_advantages",
    "reinforce_plus_plus_advantages",
    "returns_to_go",
    "rloo_advantages",
    "linear_rrhf_loss",
    "pairwise_reward_loss",
    "rrhf_loss",
    "rrhf_loss_from_logprobs",
]
