"""RRHF (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback").

One step: for each of ``prompts_per_step`` prompts take ``k = samples_per_prompt`` responses
(sampled from the current policy, or given by the row), score them (the row's ``"scores"`` or
the reward function), then run ``num_inner_epochs`` passes of ``fastrlhf.rrhf_loss`` updates:
a hinge ranking loss on the responses' length-normalised logprobs plus NLL on the best one.

Implementation choices (and where they come from):

1. Loss (RRHF eqs. 1-4, ``fastrlhf.rrhf_loss`` / ``linear_rrhf_loss``): score
   ``p_i = sum_t log pi(y_i,t) / |y_i|^length_penalty``, ranking term
   ``sum_{r_i < r_j} max(0, p_i - p_j)`` (no reference model, no ratio, no clipping), SFT term
   ``-mean_t log pi(y_best,t)``, ``loss = rank_coef * L_rank + sft_coef * L_ft``; paper weights 1
   and 1 (the RRHF repository's ``--rrhf_weight`` / ``--length_penalty`` are our ``rank_coef`` /
   ``length_penalty``). Fused-linear: the ``[B, T, V]`` logits are never built.
2. Responses: the paper ranks responses from several sources (the initial model, other
   models, humans) collected offline; rows ``{"prompt", "responses": [...], "scores": [...]}``
   do that. Prompt-only rows are answered by ``k`` samples of the *current* policy: an online
   variant (RAFT-like), which makes RRHF an iterated best-vs-rest method.
3. Completions end with eos and are scored as in GRPO (completion tokens only, prompt masked).
4. Groups stay whole inside a micro-batch (``micro_batch_size`` a multiple of ``k``); each
   update's loss is the mean over its prompts, accumulated over ``gradient_accumulation_steps``
   micro-batches (the last update of a pass may be smaller).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .rewards import RewardFn
from .rollout import RolloutConfig, RolloutTrainer
from .trainer import check_config


@dataclass
class RRHFConfig(RolloutConfig):
    """RRHF hyper-parameters (paper defaults where it states them; responses scored at temperature 1)."""

    prompts_per_step: int = 8
    """Prompts per step."""
    samples_per_prompt: int = 4
    """k: responses ranked per prompt (sampled, or the length of each row's "responses")."""
    rank_coef: float = 1.0
    """Weight of the ranking term (the RRHF repository's rrhf_weight)."""
    sft_coef: float = 1.0
    """Weight of the NLL term on the best response."""
    length_penalty: float = 1.0
    """p_i = sum logp / length^length_penalty (1: the mean token logprob)."""
    num_inner_epochs: int = 1
    """Passes over each step's ranked responses."""
    micro_batch_size: int = 32
    """Sequences per forward/backward pass (a multiple of samples_per_prompt)."""
    lr: float = 2e-5
    """AdamW learning rate (the paper's, for Alpaca-7B)."""


class RRHF(RolloutTrainer):
    """RRHF of ``model`` on ``dataset`` rows: prompt-only (responses sampled) or with ``responses``.

    ``reward_fn(prompts=, completions=, completion_ids=, **columns) -> [float]`` (TRL's call)
    scores responses whose row has no ``"scores"``.
    """

    name = "rrhf"
    needs_reference = False

    def __init__(self, model, tokenizer, dataset: Sequence[Mapping[str, Any]], reward_fn: Optional[RewardFn] = None,
                 config: Optional[RRHFConfig] = None):
        config = config or RRHFConfig()
        check_config(config, at_least=dict(samples_per_prompt=1, rank_coef=0.0, sft_coef=0.0, length_penalty=0.0))
        if config.micro_batch_size % config.samples_per_prompt:
            raise ValueError(f"micro_batch_size ({config.micro_batch_size}) must be a multiple of samples_per_prompt "
                             f"({config.samples_per_prompt}) so that each prompt's responses share a micro-batch")
        super().__init__(model, tokenizer, config, dataset, reward_fn, reward_fn_required=False)

    def train_step(self, rows: List[Mapping[str, Any]]) -> Dict[str, float]:
        c, k = self.config, self.config.samples_per_prompt
        batch, rewards, _ = self.sample_and_score(rows, k, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                                  reward_fn=self.reward_fn, offline=True)

        def loss_fn(groups: torch.Tensor):  # [g] prompt indices; their k responses are rows g * k + j
            idx = (groups[:, None] * k + torch.arange(k, device=self.device)).reshape(-1)  # [g * k]
            mb = batch.select(idx)
            with self.autocast():
                return self.completion_forward(self.model, mb, lambda hidden, op: op(  # hidden [g * k, R, H]
                    "rrhf_loss", hidden, mb.labels, rewards[idx], group_size=k, rank_coef=c.rank_coef,
                    sft_coef=c.sft_coef, length_penalty=c.length_penalty))

        # units are prompts: each update's loss is the mean over its prompts
        out = self.run_updates(len(rows), loss_fn, epochs=c.num_inner_epochs,
                               micro_batch_size=c.micro_batch_size // k)
        groups = rewards.view(-1, k)
        out.update(
            reward=float(rewards.mean()),
            best_reward=float(groups.max(-1).values.mean()),
            completion_len=float(batch.completion_mask.sum(-1).float().mean()),
            tokens=float(batch.attention_mask.sum()),
        )
        return out
