"""DPO (Rafailov et al. 2023) and its hinge / IPO / robust variants on a transformers causal LM.

One step: take ``micro_batch_size * gradient_accumulation_steps`` preference pairs, score
both completions under the frozen reference once, then accumulate ``fastrlhf.dpo_loss``
gradients over micro-batches and take one optimizer step.

Implementation choices (and where they come from):

1. TRL's batch layout: chosen rows then rejected rows of the same prompts, concatenated into
   one forward (``[2b, T]``), prompt tokens masked out of the labels, completion + eos scored.
2. Reference logprobs computed once per batch, under ``no_grad``, before the policy's
   forward (TRL's ``compute_ref_log_probs``); ``reference_free=True`` uses 0 (Zephyr /
   TRL's ``reference_free``), and no reference model is kept.
3. Sequence logprob = sum over completion tokens; ``ipo`` uses their mean (Azar et al. 2023,
   as TRL).
4. Loss types of ``fastrlhf.dpo_loss``: ``sigmoid`` (DPO eq. 7, with cDPO label smoothing),
   ``hinge`` (SLiC, Zhao et al. 2023), ``ipo``, ``robust`` (Chowdhury et al. 2024).
5. Prompts truncated from the left and completions from the right to
   ``max_prompt_length`` / ``max_completion_length`` tokens (TRL's truncation modes).
6. Optional NLL on the chosen completions, ``rpo_alpha`` (RPO, Pang et al. 2024; TRL's
   ``rpo_alpha``; Llama 3's DPO recipe): keeps the chosen likelihood from falling while the
   margin grows (plain DPO can lower both, Razin et al. 2024).
7. Implicit rewards ``beta * (logp - ref_logp)`` and their accuracy / margin are the logged
   "reward" (TRL's ``rewards/*`` metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from .batching import IGNORE_INDEX, SequenceBatch, encode_completion, encode_prompt, micro_batches, pack_sequences
from .data import preference_texts
from .trainer import TrainConfig, Trainer, check_config


@dataclass
class DPOConfig(TrainConfig):
    """DPO hyper-parameters (defaults follow TRL's DPOConfig)."""

    beta: float = 0.1
    """Temperature of the implicit reward beta * log(pi / pi_ref)."""
    loss_type: str = "sigmoid"
    """sigmoid | hinge | ipo | robust."""
    label_smoothing: float = 0.0
    """Assumed label-noise rate (cDPO for sigmoid, robust DPO)."""
    rpo_alpha: Optional[float] = None
    """Weight of an NLL term on the chosen completions (RPO, Pang et al. 2024; None: plain DPO)."""
    reference_free: bool = False
    """Use a uniform reference (ref logprobs 0) and keep no reference model."""
    max_prompt_length: Optional[int] = 512
    """Prompts longer than this keep their last tokens (None: no limit)."""
    max_completion_length: Optional[int] = 512
    """Completions longer than this keep their first tokens (None: no limit)."""
    micro_batch_size: int = 8
    """Preference pairs per forward/backward pass (2x sequences)."""
    lr: float = 1e-6
    """AdamW learning rate."""


class DPO(Trainer):
    """Direct Preference Optimization of ``model`` on ``dataset`` rows in TRL's preference format."""

    name = "dpo"

    def __init__(self, model, tokenizer, dataset: Sequence[Mapping[str, Any]], config: Optional[DPOConfig] = None):
        config = config or DPOConfig()
        check_config(config, one_of=dict(loss_type=("sigmoid", "hinge", "ipo", "robust")))
        if config.beta <= 0:
            raise ValueError(f"beta must be > 0, got {config.beta}")
        self.needs_reference = not config.reference_free
        super().__init__(model, tokenizer, config, dataset)

    @property
    def rows_per_step(self) -> int:
        return self.config.micro_batch_size * self.config.gradient_accumulation_steps

    def tokenize(self, rows: Sequence[Mapping[str, Any]]) -> SequenceBatch:
        """``[2b, P + R]``: the chosen completions of ``rows``, then their rejected ones."""
        c = self.config
        prompts, chosen, rejected = [], [], []
        for r in rows:
            p, ch, rj = preference_texts(r, self.tokenizer)
            p_ids = encode_prompt(self.tokenizer, p)
            if c.max_prompt_length is not None:
                p_ids = p_ids[-c.max_prompt_length:]
            ch_ids, rj_ids = encode_completion(self.tokenizer, ch), encode_completion(self.tokenizer, rj)
            if c.max_completion_length is not None:
                ch_ids, rj_ids = ch_ids[: c.max_completion_length], rj_ids[: c.max_completion_length]
            prompts.append(p_ids)
            chosen.append(ch_ids)
            rejected.append(rj_ids)
        return pack_sequences(prompts + prompts, chosen + rejected, self.pad_id, self.device)

    @torch.no_grad()
    def reference_logps(self, batch: SequenceBatch) -> torch.Tensor:
        """Sequence logprobs ``[2b]`` under the reference (sum over tokens; ipo: mean); 0 if reference-free."""
        if self.config.reference_free:
            return torch.zeros(len(batch), device=self.device)
        with self.reference() as ref:
            logp = self.completion_logprobs(ref, batch)  # [2b, R]
        seq = logp.sum(-1)
        if self.config.loss_type == "ipo":
            seq = seq / batch.completion_mask.sum(-1).clamp_min(1)
        return seq

    def _loss(self, batch: SequenceBatch, ref_seq: torch.Tensor, idx: torch.Tensor):
        """DPO loss of the pairs ``idx`` (``[b']`` indices into the ``b`` pairs of ``batch``)."""
        c, b = self.config, len(batch) // 2
        mb = batch.select(torch.cat([idx, idx + b]))  # chosen rows, then their rejected rows

        def loss_fn(hidden, op):  # hidden [2b', R, H], inside the policy's forward
            loss, stats = op("dpo_loss", hidden, mb.labels, ref_seq[:b][idx], ref_seq[b:][idx], beta=c.beta,
                             loss_type=c.loss_type, label_smoothing=c.label_smoothing)
            if c.rpo_alpha:
                n = len(idx)  # chosen rows come first
                logp = op("token_logprobs", hidden[:n], mb.labels[:n])  # [b', R]
                nll = -logp.sum() / (mb.labels[:n] != IGNORE_INDEX).sum().clamp_min(1)
                loss = loss + c.rpo_alpha * nll
                stats = {**stats, "nll": nll.detach()}
            return loss, stats

        with self.autocast():
            return self.completion_forward(self.model, mb, loss_fn)

    def train_step(self, rows: List[Mapping[str, Any]]) -> Dict[str, float]:
        batch = self.tokenize(rows)
        ref_seq = self.reference_logps(batch)  # [2b]
        # one optimizer step: the rows are exactly gradient_accumulation_steps micro-batches, in order
        out = self.run_updates(len(rows), lambda idx: self._loss(batch, ref_seq, idx), shuffle=False)
        out["tokens"] = float(batch.attention_mask.sum())
        return out

    @torch.no_grad()
    def evaluate(self, rows: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
        """Loss and implicit-reward stats (accuracy, margin) of the current policy on ``rows``, no grad."""
        sums: Dict[str, float] = {}
        total = 0
        step = self.config.micro_batch_size * self.config.gradient_accumulation_steps
        for i in range(0, len(rows), step):
            chunk = list(rows[i : i + step])
            batch = self.tokenize(chunk)
            ref_seq = self.reference_logps(batch)
            for sl in micro_batches(len(chunk), self.config.micro_batch_size):
                idx = torch.arange(sl.start, sl.stop, device=self.device)
                loss, stats = self._loss(batch, ref_seq, idx)
                w = len(idx)
                for key, v in {"loss": loss, **stats}.items():
                    sums[key] = sums.get(key, 0.0) + float(v) * w
                total += w
        return {k: v / total for k, v in sums.items()}
