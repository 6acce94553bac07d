"""The trainers that sample from the policy every step (GRPO, PPO, RRHF, RFT): their config fields,
generation and scoring.

Implementation choices (and where they come from):

1. Generation through ``model.generate`` (transformers), run inside the engine's root forward
   so FSDP2's all-gathers fire; under FSDP2 with ``synced_gpus=True`` (transformers' flag for
   ZeRO-3 / FSDP: a rank that finished keeps stepping so the layers' all-gathers stay matched).
2. ``generation_batch_size`` prompts per ``generate`` call bound the KV cache; prompts longer
   than ``max_prompt_length`` keep their last tokens (the question usually ends the prompt).
3. Rewards through TRL's reward-function call (``fastrlhf.algos.rewards``); rows may carry
   their own responses and scores (RRHF's offline rankings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from .batching import SequenceBatch, cut_at_eos, encode_completion, encode_prompt, micro_batches, pack_sequences
from .data import prompt_text
from .rewards import RewardFn, call_reward_fn
from .trainer import TrainConfig, Trainer


@dataclass
class RolloutConfig(TrainConfig):
    """Fields of the algorithms that sample from the policy every step (GRPO, PPO, RRHF, RFT)."""

    prompts_per_step: int = 16
    """Prompts sampled per step."""
    max_new_tokens: int = 64
    """Longest completion sampled."""
    temperature: float = 1.0
    """Sampling temperature (GRPO and PPO score their logprobs at the same one; RRHF, RFT at 1)."""
    generation_batch_size: Optional[int] = None
    """Prompts per generate call (None: all of the step's prompts at once)."""
    max_prompt_length: Optional[int] = None
    """Prompts longer than this keep their last tokens (None: no limit)."""


class RolloutTrainer(Trainer):
    """A trainer whose step samples from the policy for ``prompts_per_step`` rows, scored by ``reward_fn``.

    ``reward_fn(prompts=, completions=, completion_ids=, **columns) -> [float]`` (TRL's call);
    None only where rows carry their own scores (``reward_fn_required=False``).
    """

    def __init__(self, model, tokenizer, config: RolloutConfig, dataset: Sequence[Mapping[str, Any]],
                 reward_fn: Optional[RewardFn], *, reward_fn_required: bool = True):
        if (reward_fn is not None or reward_fn_required) and not callable(reward_fn):
            raise TypeError("reward_fn must be callable")
        super().__init__(model, tokenizer, config, dataset)
        self.reward_fn = reward_fn

    @property
    def rows_per_step(self) -> int:
        return self.config.prompts_per_step

    def global_width(self, batch: SequenceBatch) -> SequenceBatch:
        """``batch`` with its completions right-padded to the longest of every rank's (itself in one process),
        so that a loss normalised by the padded width (``seq-mean-token-sum-norm``, Dr. GRPO) divides by
        the one-process width; a collective."""
        if self.engine.world == 1:
            return batch
        return batch.padded_to(max(self.engine.gather([batch.labels.shape[1]])), self.pad_id)

    # -- rollouts -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, do_sample: bool = True,
                 ) -> List[List[int]]:
        """``num_samples`` completions per prompt (consecutive), each cut after its first eos."""
        from transformers import GenerationConfig

        batch = pack_sequences(prompt_ids, [[]] * len(prompt_ids), self.pad_id, self.device)
        P = batch.prompt_len
        ids = batch.input_ids[:, :P].repeat_interleave(num_samples, 0)  # [B * G, P]
        attn = batch.attention_mask[:, :P].repeat_interleave(num_samples, 0)
        eos = self.tokenizer.eos_token_id
        gen = GenerationConfig(
            do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None, max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id, eos_token_id=eos, bos_token_id=self.tokenizer.bos_token_id,
        )
        # FSDP2 / ZeRO-3: a rank that finished keeps stepping so that the layers' all-gathers stay matched
        synced = self.engine.kind in ("fsdp2", "deepspeed")
        step = (self.config.generation_batch_size or len(prompt_ids)) * num_samples
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for sl in micro_batches(ids.shape[0], step):
                with self.autocast():
                    gen_ids = self.call(self.model, lambda m, i, a: m.generate(
                        input_ids=i, attention_mask=a, generation_config=gen, synced_gpus=synced), ids[sl], attn[sl])
                out += [cut_at_eos(row, eos, self.pad_id) for row in gen_ids[:, P:].tolist()]
        finally:
            self.model.train(was_training)
        return out

    def sample_and_score(self, rows: Sequence[Mapping[str, Any]], k: int, *, max_new_tokens: int,
                         temperature: float, reward_fn: Optional[RewardFn], offline: bool = False,
                         ) -> Tuple[SequenceBatch, torch.Tensor, List[List[int]]]:
        """``k`` responses per row and their rewards: the rollout of every online algorithm.

        Responses are sampled from the current policy, or with ``offline=True`` taken from a
        row's ``"responses"`` (RRHF's offline rankings), and scored by ``reward_fn`` (TRL's
        call), or with ``offline=True`` by the row's ``"scores"``. Returns the packed
        ``[B * k]`` batch (the ``k`` responses of a row are consecutive), the ``[B * k]`` fp32
        rewards and the completion token ids.
        """
        tok = self.tokenizer
        prompts = [prompt_text(r, tok) for r in rows]
        prompt_ids = [encode_prompt(tok, p) for p in prompts]
        if getattr(self.config, "max_prompt_length", None) is not None:
            prompt_ids = [p[-self.config.max_prompt_length:] for p in prompt_ids]
        completions: List[Optional[List[int]]] = [None] * (len(rows) * k)
        texts: List[Optional[str]] = [None] * (len(rows) * k)
        given = [i for i, r in enumerate(rows) if offline and "responses" in r]
        for i in given:
            if len(rows[i]["responses"]) != k:
                raise ValueError(f"row {i} has {len(rows[i]['responses'])} responses; samples_per_prompt is {k}")
            for j, resp in enumerate(rows[i]["responses"]):
                completions[i * k + j] = encode_completion(tok, resp)
                texts[i * k + j] = resp
        to_sample = [i for i in range(len(rows)) if i not in given]
        if to_sample:
            sampled = self.generate([prompt_ids[i] for i in to_sample], num_samples=k,
                                    max_new_tokens=max_new_tokens, temperature=temperature)
            decoded = tok.batch_decode(sampled, skip_special_tokens=True)
            for n, i in enumerate(to_sample):
                for j in range(k):
                    completions[i * k + j] = sampled[n * k + j]
                    texts[i * k + j] = decoded[n * k + j]
        rewards = torch.zeros(len(rows) * k, dtype=torch.float32, device=self.device)
        unscored = []
        for i, r in enumerate(rows):
            if offline and "scores" in r:
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
                [completions[n] for n in unscored], [rows[n // k] for n in unscored], self.device)
        batch = pack_sequences([p for p in prompt_ids for _ in range(k)], completions, self.pad_id, self.device)
        return batch, rewards, completions
