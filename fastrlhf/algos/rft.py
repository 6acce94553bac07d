"""Rejection-sampling fine-tuning (best-of-n): Llama 2's rejection sampling (Touvron et al.
2023, "Iterative Fine-Tuning"), RAFT (Dong et al. 2023), RFT (Yuan et al. 2023, "Scaling
Relationship on Learning Mathematical Reasoning with Large Language Models").

One step: sample ``n = samples_per_prompt`` completions for each of ``prompts_per_step``
prompts with ``model.generate``, score them, keep each prompt's best one, and fine-tune on the
kept completions by next-token NLL, ``sft_epochs`` passes.

Implementation choices (and where they come from):

1. Best-of-n per prompt by the reward (the first sample on ties), as Llama 2 ("we select the
   best answer with the reward model") and RAFT; ``min_reward`` drops prompts whose best is
   still below a threshold (RAFT's / ReST's filter, Gulcehre et al. 2023; for a 0/1 reward,
   ``min_reward=1`` keeps only correct samples, Yuan et al.'s RFT).
2. Online: samples come from the current policy every step (RAFT's iterated form; Llama 2
   and ReST alternate larger grow / improve phases).
3. Loss: token-mean NLL of completion + eos given the prompt, prompt tokens masked (SFT), with
   ``fastrlhf.linear_token_logprobs`` on the last hidden state and the lm_head (the ``[B, T, V]``
   logits are never built). No reference model, no KL term (Llama 2's RS step has none).
4. Updates: ``micro_batch_size`` kept completions per forward, an optimizer step every
   ``gradient_accumulation_steps`` micro-batches (and at the end of a pass), each update's loss
   being the token-mean over its own tokens.
5. Several processes: the ranks keep different numbers of completions, but must run the same
   number of forwards (DDP's all-reduce, FSDP2's all-gathers). The kept completions of every
   rank are gathered (token ids, in rank order: the one-process order of the global batch) and
   dealt out again in equal contiguous shares; the ``world - K % world`` missing rows are
   copies of the first kept one with no counted token (zero loss and gradient). Every rank then
   runs the same micro-batches, and the token-mean is global (``Trainer.run_updates``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .batching import IGNORE_INDEX, SequenceBatch, pack_sequences
from .rewards import RewardFn
from .rollout import RolloutConfig, RolloutTrainer
from .trainer import check_config


@dataclass
class RFTConfig(RolloutConfig):
    """Best-of-n rejection-sampling fine-tuning hyper-parameters (the NLL is taken at temperature 1)."""

    samples_per_prompt: int = 8
    """n: completions sampled per prompt, of which the best is kept."""
    min_reward: Optional[float] = None
    """Keep a prompt's best completion only if its reward >= this (None: always keep it)."""
    sft_epochs: int = 1
    """Passes over each step's kept completions."""
    micro_batch_size: int = 16
    """Kept completions per forward/backward pass."""
    lr: float = 1e-5
    """AdamW learning rate."""


class RFT(RolloutTrainer):
    """Best-of-n rejection-sampling fine-tuning of ``model`` with ``reward_fn`` (TRL's call signature).

    ``dataset``: prompt-only rows; other columns (e.g. ``"answer"``) go to ``reward_fn``.
    """

    name = "rft"
    needs_reference = False

    def __init__(self, model, tokenizer, dataset: Sequence[Mapping[str, Any]], reward_fn: RewardFn,
                 config: Optional[RFTConfig] = None):
        config = config or RFTConfig()
        check_config(config, at_least=dict(samples_per_prompt=1, sft_epochs=1))
        super().__init__(model, tokenizer, config, dataset, reward_fn)

    def train_step(self, rows: List[Mapping[str, Any]]) -> Dict[str, float]:
        c, n = self.config, self.config.samples_per_prompt
        prompt_rows = [{k: v for k, v in r.items() if k not in ("responses", "scores")} for r in rows]
        batch, rewards, _ = self.sample_and_score(prompt_rows, n, max_new_tokens=c.max_new_tokens,
                                                  temperature=c.temperature, reward_fn=self.reward_fn)
        groups = rewards.view(-1, n)  # [B, n]
        best_reward, best = groups.max(-1)  # first maximum on ties
        keep = torch.ones_like(best_reward, dtype=torch.bool)
        if c.min_reward is not None:
            keep &= best_reward >= c.min_reward
        kept = (torch.arange(len(rows), device=self.device) * n + best)[keep]  # rows of the batch to imitate
        data = batch.select(kept) if self.engine.world == 1 else self._deal_out(batch, kept)

        def loss_fn(idx: torch.Tensor):
            mb = data.select(idx)
            with self.autocast():  # hidden [b, R, H]; logp [b, R], 0 on padding
                logp = self.completion_forward(self.model, mb,
                                               lambda hidden, op: op("token_logprobs", hidden, mb.labels))
            return -logp.sum() / mb.completion_mask.sum().clamp_min(1), {}

        def tokens(idx: torch.Tensor) -> int:  # 0 only for a micro-batch of the padding rows of _deal_out
            n = int((data.labels[idx] != IGNORE_INDEX).sum())
            return n if self.engine.world > 1 else max(1, n)  # one process divides by it

        # units are tokens: each update's loss is the token-mean NLL over the update
        out = self.run_updates(0 if data is None else len(data), loss_fn, epochs=c.sft_epochs,
                               units=tokens)  # empty when nothing was kept (on any rank)
        out.update(
            reward=float(rewards.mean()),
            best_reward=float(best_reward.mean()),
            kept_frac=float(keep.float().mean()),
            completion_len=float(batch.completion_mask.sum(-1).float().mean()),
            tokens=float(batch.attention_mask.sum()),
        )
        return out

    def _deal_out(self, batch: SequenceBatch, kept: torch.Tensor) -> Optional[SequenceBatch]:
        """This rank's equal share of every rank's kept rows (None when no rank kept any); see 5."""
        local = [(p, c) for p, c in zip(*batch.token_lists(kept))]
        everyone = self.engine.gather(local)  # rank order: the global batch's order
        if not everyone:
            return None
        share = -(-len(everyone) // self.engine.world)
        padding = [(everyone[0][0], [])] * (share * self.engine.world - len(everyone))  # no counted token
        mine = (everyone + padding)[self.engine.rank * share : (self.engine.rank + 1) * share]
        data = pack_sequences([p for p, _ in mine], [c or [self.pad_id] for _, c in mine], self.pad_id, self.device)
        empty = torch.tensor([not c for _, c in mine], device=self.device)
        data.labels[empty] = IGNORE_INDEX
        return data

