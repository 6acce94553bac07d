"""GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1) on a transformers causal LM.

One step: sample ``G`` completions for each of ``prompts_per_step`` prompts, score them with
the user's reward function, turn rewards into group advantages, then run
``num_inner_epochs`` passes of PPO-clip updates that reuse the logprobs of the sampling policy.

Implementation choices (and where they come from):

1. Outcome supervision: one scalar reward per completion, advantage
   ``(r - mean_group) / (std_group + eps)`` broadcast to every token (GRPO eq. 3;
   ``fastrlhf.group_advantages``). ``scale_rewards="none"`` only centres (Dr. GRPO, Liu et al. 2025).
2. KL to the frozen reference as a loss term with the k3 estimator and coefficient ``beta``
   (GRPO eq. 4; Schulman 2020), not as a reward penalty; ``beta=0`` drops the reference
   model entirely (DAPO, Yu et al. 2025).
3. PPO-clip on the likelihood ratio against the sampling policy's logprobs, with
   clip-higher: ``clip_high > clip_low`` (DAPO's 0.2 / 0.28) keeps low-probability tokens
   explorable.
4. Old logprobs are recomputed by a no-grad forward right after sampling (verl, TRL),
   at the sampling temperature (logits / T, verl), rather than taken from ``generate``'s scores.
5. ``num_inner_epochs`` (GRPO's mu) passes over the rollout, reshuffled each pass, each split
   into updates of ``micro_batch_size * gradient_accumulation_steps`` sequences (TRL's
   ``num_iterations``, verl's ``ppo_epochs``).
6. Loss aggregation ``loss_agg``: "token-mean" by default (DAPO, verl's default);
   "seq-mean-token-mean" is the paper's; "seq-mean-token-sum-norm" is Dr. GRPO's.
7. Sampling in ``eval()`` mode with ``top_k=0, top_p=1`` so the sampling distribution is the
   one the loss scores (verl).
8. ``advantage_estimator`` swaps choice 1 for another critic-free estimator: ``"rloo"``
   (leave-one-out baseline, Ahmadian et al. 2024, no std division), ``"reinforce"``
   (returns minus the batch-mean baseline), ``"reinforce++"`` (Hu 2025: returns-to-go whitened
   over every completion token of the rollout) or ``"reinforce++-baseline"`` (group mean
   subtracted first). The last three can take a per-token k1 KL penalty in the reward
   (``reward_kl_coef``, REINFORCE++'s form) besides or instead of GRPO's k3 loss term (``beta``).
   The std division of ``"grpo"`` is the estimator's weak spot: rewards 1.001 and 1.000 in a
   group become advantages +-0.71 (``fastrlhf.group_advantages``); ``scale_rewards="none"`` or
   ``"rloo"`` keep the raw 0.001 difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

import fastrlhf

from .rewards import RewardFn
from .rollout import RolloutConfig, RolloutTrainer
from .trainer import check_config, check_rollout_fits_updates


@dataclass
class GRPOConfig(RolloutConfig):
    """GRPO hyper-parameters (defaults follow TRL / verl / DAPO where they agree)."""

    group_size: int = 8
    """G: completions sampled per prompt."""
    beta: float = 0.04
    """Coefficient of the k3 KL to the reference (0: no reference model)."""
    clip_low: float = 0.2
    """PPO clip range below 1 (ratio >= 1 - clip_low)."""
    clip_high: float = 0.28
    """PPO clip range above 1 (DAPO clip-higher; = clip_low for symmetric PPO)."""
    num_inner_epochs: int = 2
    """Passes over each rollout (GRPO's mu), reusing its old logprobs."""
    loss_agg: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."""
    scale_rewards: str = "group"
    """group: divide by the group's std; none: only centre (Dr. GRPO). For advantage_estimator="grpo"."""
    advantage_estimator: str = "grpo"
    """grpo (group-normalised) | rloo | reinforce | reinforce++ | reinforce++-baseline."""
    reward_kl_coef: float = 0.0
    """Per-token k1 KL penalty in the reward (reinforce, reinforce++, reinforce++-baseline; 0: none)."""
    micro_batch_size: int = 32
    """Sequences per forward/backward pass."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer update."""
    lr: float = 1e-5
    """AdamW learning rate."""


GRPO_ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce", "reinforce++", "reinforce++-baseline")


class GRPO(RolloutTrainer):
    """Group Relative Policy Optimization of ``model``, rewarded by ``reward_fn``.

    ``reward_fn(prompts=, completions=, completion_ids=, **columns) -> [float]`` (TRL's call).

    ``dataset``: rows with a ``"prompt"`` string (TRL's prompt-only format); other columns
    (e.g. ``"answer"``) are passed to ``reward_fn`` as keyword lists.
    """

    name = "grpo"

    def __init__(self, model, tokenizer, dataset: Sequence[Mapping[str, Any]], reward_fn: RewardFn,
                 config: Optional[GRPOConfig] = None):
        config = config or GRPOConfig()
        # group_size >= 2: advantages are relative to the group
        check_config(config, at_least=dict(group_size=2, beta=0.0, reward_kl_coef=0.0),
                     one_of=dict(advantage_estimator=GRPO_ADVANTAGE_ESTIMATORS))
        if config.reward_kl_coef > 0 and config.advantage_estimator in ("grpo", "rloo"):
            raise ValueError(f"reward_kl_coef needs a per-token estimator (reinforce, reinforce++, "
                             f"reinforce++-baseline), not {config.advantage_estimator!r}; use beta for a KL loss")
        check_rollout_fits_updates(config, "group_size")
        self.needs_reference = config.beta > 0 or config.reward_kl_coef > 0
        super().__init__(model, tokenizer, config, dataset, reward_fn)

    def advantages(self, rewards: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
                   ref_logp: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-token ``[B * G, R]`` advantages of the rollout (``fastrlhf.estimate_advantages``)."""
        c = self.config
        kl = {}
        if c.reward_kl_coef > 0:
            kl = dict(logprobs=old_logp, ref_logprobs=ref_logp, kl_coef=c.reward_kl_coef, kl_estimator="k1")
        return fastrlhf.estimate_advantages(c.advantage_estimator, rewards, mask, group_size=c.group_size,
                                            scale_rewards=c.scale_rewards, **kl)[0]

    def train_step(self, rows: List[Mapping[str, Any]]) -> Dict[str, float]:
        c, G = self.config, self.config.group_size
        # 1. Rollout: G samples per prompt, scored by the reward function.
        batch, rewards, _ = self.sample_and_score(rows, G, max_new_tokens=c.max_new_tokens,
                                                  temperature=c.temperature, reward_fn=self.reward_fn)  # [B * G]
        batch = self.global_width(batch)  # several ranks: one completion width (a no-op in one process)

        # 2. Logprobs of the sampling policy and of the reference, once per rollout.
        old_logp = self.completion_logprobs(self.model, batch, c.temperature)  # [B * G, R]
        ref_logp = None
        if self.needs_reference:
            with self.reference() as ref:
                ref_logp = self.completion_logprobs(ref, batch, c.temperature)
        # batch statistics (REINFORCE's baseline, REINFORCE++'s whitening) over every rank's rows
        advantages = self.engine.on_all_rows(self.advantages, rewards, batch.completion_mask.float(), old_logp,
                                             ref_logp)  # [B * G, R]

        # 3. num_inner_epochs passes of clipped updates.
        def loss_fn(idx: torch.Tensor):
            mb = batch.select(idx)
            with self.autocast():
                return self.completion_forward(self.model, mb, lambda hidden, op: op(  # hidden [b, R, H]
                    "grpo_loss", hidden, mb.labels, old_logp[idx], advantages[idx],
                    None if ref_logp is None else ref_logp[idx],
                    beta=c.beta, clip_low=c.clip_low, clip_high=c.clip_high, loss_agg=c.loss_agg,
                    temperature=c.temperature, compute_entropy=True,
                ))

        def tokens(idx: torch.Tensor) -> int:  # token-mean: the normaliser over ranks is the token count
            return int(batch.completion_mask[idx].sum())

        out = self.run_updates(len(batch), loss_fn, epochs=c.num_inner_epochs,
                               norm=tokens if c.loss_agg == "token-mean" else None)
        groups = rewards.view(-1, G)
        everyone = torch.tensor(self.engine.gather(rewards.tolist()))
        out.update(
            reward=float(rewards.mean()),
            reward_std=float(everyone.std()) if everyone.numel() > 1 else 0.0,  # over every rank's rewards
            frac_zero_std_groups=float((groups.std(-1) == 0).float().mean()),
            completion_len=float(batch.completion_mask.sum(-1).float().mean()),
            tokens=float(batch.attention_mask.sum()),
        )
        return out
