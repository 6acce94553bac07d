"""fastrlhf: fused Triton / C++ kernels for RLHF losses that never build vocabulary-sized tensors.

Public API (``docs/API.md``): token ops, KL estimators, PPO/GRPO/DPO losses from logits
and from hidden states + lm_head weight (``linear_*``), GAE and group advantages; beyond the
contract: RLOO / REINFORCE / REINFORCE++ advantages, the Bradley-Terry reward-model loss and
RRHF. Trainers live in ``fastrlhf.algos``, drop-ins for TRL / verl / OpenRLHF in
``fastrlhf.integrations``, the benchmark runner in ``fastrlhf.bench``.
"""

from ._backend import available_backends
from .advantages import (
    estimate_advantages,
    gae,
    group_advantages,
    masked_whiten,
    reinforce_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)
from .dpo import dpo_loss
from .linear import (
    linear_dpo_loss,
    linear_grpo_loss,
    linear_ppo_clip_loss,
    linear_token_logprobs,
    linear_token_logprobs_and_entropy,
)
from .logprobs import entropy, token_logprobs, token_logprobs_and_entropy
from .ppo import grpo_loss, kl_estimate, ppo_clip_loss
from .ranking_losses import linear_rrhf_loss, pairwise_reward_loss, rrhf_loss
from .value_loss import clipped_value_loss

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "entropy",
    "kl_estimate",
    "ppo_clip_loss",
    "grpo_loss",
    "dpo_loss",
    "linear_token_logprobs",
    "linear_token_logprobs_and_entropy",
    "linear_ppo_clip_loss",
    "linear_grpo_loss",
    "linear_dpo_loss",
    "gae",
    "group_advantages",
    "rloo_advantages",
    "reinforce_advantages",
    "reinforce_plus_plus_advantages",
    "masked_whiten",
    "estimate_advantages",
    "clipped_value_loss",
    "pairwise_reward_loss",
    "rrhf_loss",
    "linear_rrhf_loss",
]
