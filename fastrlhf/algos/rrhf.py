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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .common import (
    RewardFn,
    SequenceBatch,
    TrainConfig,
    Trainer,
    call_reward_fn,
    encode_completion,
    encode_prompt,
    pack_sequences,
)
from .data import prompt_text


@dataclass
class RRHFConfig(TrainConfig):
    """RRHF hyper-parameters (paper defaults where it states them)."""

    prompts_per_step: int = 8
    """Prompts per step."""
    samples_per_prompt: int = 4
    """k: responses ranked per prompt (sampled, or the length of each row's "responses")."""
    max_new_tokens: int = 64
    """Longest sampled response."""
    temperature: float = 1.0
    """Sampling temperature (the loss scores the responses at temperature 1)."""
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


def sample_and_score(trainer: Trainer, rows: Sequence[Mapping[str, Any]], k: int, max_new_tokens: int,
                     temperature: float, reward_fn: Optional[RewardFn],
                     ) -> Tuple[SequenceBatch, torch.Tensor, List[int]]:
    """``k`` responses per row (the row's ``"responses"``, else sampled) and their rewards.

    Returns the packed ``[B * k]`` batch (row-major groups), the ``[B * k]`` rewards (the row's
    ``"scores"``, else ``reward_fn``) and the completion token ids.
    """
    tok = trainer.tokenizer
    prompts = [prompt_text(r, tok) for r in rows]
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    completions: List[Optional[List[int]]] = [None] * (len(rows) * k)
    texts: List[Optional[str]] = [None] * (len(rows) * k)
    to_sample = [i for i, r in enumerate(rows) if "responses" not in r]
    for i, r in enumerate(rows):
        if "responses" in r:
            if len(r["responses"]) != k:
                raise ValueError(f"row {i} has {len(r['responses'])} responses; samples_per_prompt is {k}")
            for j, resp in enumerate(r["responses"]):
                completions[i * k + j] = encode_completion(tok, resp)
                texts[i * k + j] = resp
    if to_sample:
        sampled = trainer.generate([prompt_ids[i] for i in to_sample], num_samples=k, max_new_tokens=max_new_tokens,
                                   temperature=temperature)
        decoded = tok.batch_decode(sampled, skip_special_tokens=True)
        for n, i in enumerate(to_sample):
            for j in range(k):
                completions[i * k + j] = sampled[n * k + j]
                texts[i * k + j] = decoded[n * k + j]
    rewards = torch.zeros(len(rows) * k, dtype=torch.float32, device=trainer.device)
    unscored = []
    for i, r in enumerate(rows):
        if "scores" in r:
            if len(r["scores"]) != k:
                raise ValueError(f"row {i} has {len(r['scores'])} scores for {k} responses")
            rewards[i * k : (i + 1) * k] = torch.as_tensor([float(s) for s in r["scores"]])
        else:
            unscored += range(i * k, (i + 1) * k)
    if unscored:
        if reward_fn is None:
            raise ValueError("rows without 'scores' need a reward_fn")
        rewards[unscored] = call_reward_fn(
            reward_fn, [prompts[n // k] for n in unscored], [texts[n] for n in unscored],
            [completions[n] for n in unscored], [rows[n // k] for n in unscored], trainer.device)
    batch = pack_sequences([p for p in prompt_ids for _ in range(k)], completions, trainer.pad_id, trainer.device)
    return batch, rewards, completions


class RRHF(Trainer):
    """RRHF of ``model`` on ``dataset`` rows: prompt-only (responses sampled) or with ``responses``.

    ``reward_fn(prompts=, completions=, completion_ids=, **columns) -> [float]`` (TRL's call)
    scores responses whose row has no ``"scores"``.
    """

    name = "rrhf"
    needs_reference = False

    def __init__(self, model, tokenizer, dataset: Sequence[Mapping[str, Any]], reward_fn: Optional[RewardFn] = None,
                 config: Optional[RRHFConfig] = None):
        config = config or RRHFConfig()
        if config.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {config.samples_per_prompt}")
        if config.micro_batch_size % config.samples_per_prompt:
            raise ValueError(f"micro_batch_size ({config.micro_batch_size}) must be a multiple of samples_per_prompt "
                             f"({config.samples_per_prompt}) so that each prompt's responses share a micro-batch")
        for name in ("rank_coef", "sft_coef", "length_penalty"):
            if getattr(config, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError("reward_fn must be callable")
        super().__init__(model, tokenizer, config, dataset)
        self.reward_fn = reward_fn

    @property
    def rows_per_step(self) -> int:
        return self.config.prompts_per_step

    def train_step(self, rows: List[Mapping[str, Any]]) -> Dict[str, float]:
        c, k = self.config, self.config.samples_per_prompt
        batch, rewards, _ = sample_and_score(self, rows, k, c.max_new_tokens, c.temperature, self.reward_fn)
        n_groups = len(rows)
        groups_per_micro = c.micro_batch_size // k
        sums: Dict[str, float] = {}
        count = 0
        for _ in range(c.num_inner_epochs):
            order = torch.randperm(n_groups).tolist()
            micro = [order[i : i + groups_per_micro] for i in range(0, n_groups, groups_per_micro)]
            for u in range(0, len(micro), c.gradient_accumulation_steps):
                update = micro[u : u + c.gradient_accumulation_steps]
                groups_in_update = sum(len(g) for g in update)
                for groups in update:
                    idx = torch.tensor([g * k + j for g in groups for j in range(k)], device=self.device)
                    mb = batch.select(idx)
                    with self.autocast():
                        hidden = self.completion_hidden(self.model, mb)  # [b * k, R, H]
                        loss, stats = self.op("rrhf_loss", hidden, mb.labels, rewards[idx], group_size=k,
                                              rank_coef=c.rank_coef, sft_coef=c.sft_coef,
                                              length_penalty=c.length_penalty)
                    # mean over the update's prompts: weight each micro-batch by its share of them
                    (loss * (len(groups) / groups_in_update)).backward()
                    for key, v in {"loss": loss.detach(), **stats}.items():
                        sums[key] = sums.get(key, 0.0) + float(v)
                    count += 1
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + self.optimizer_step() * len(update)

        out = {key: v / count for key, v in sums.items() if key != "num_pairs"}
        groups = rewards.view(-1, k)
        out.update(
            reward=float(rewards.mean()),
            best_reward=float(groups.max(-1).values.mean()),
            completion_len=float(batch.completion_mask.sum(-1).float().mean()),
            tokens=float(batch.attention_mask.sum()),
        )
        return out
