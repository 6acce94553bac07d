"""Reward modelling (Ouyang et al. 2022, sec. 3.5; Stiennon et al. 2020) on a transformers causal LM.

One step: take ``micro_batch_size * gradient_accumulation_steps`` rows (preference pairs or
rankings of ``k`` responses), score every response once with the scalar head, form each row's
(better, worse) pairs and accumulate ``fastrlhf.pairwise_reward_loss`` gradients; one
optimizer step.

Implementation choices (and where they come from):

1. The model is an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (TRL's
   ``RewardTrainer``). A causal LM is converted by :func:`reward_model_from_causal_lm`: its
   decoder weights go into the sequence-classification model of the same config, whose linear
   ``score`` head ``[H] -> 1`` is the value head, initialised from ``N(0, 1 / sqrt(H + 1))``
   (OpenAI's lm-human-preferences; Huang et al. 2023, "The N Implementation Details of RLHF
   with PPO"). Saved checkpoints are therefore ordinary sequence-classification checkpoints:
   ``PPO(reward_model=AutoModelForSequenceClassification.from_pretrained(path))`` and
   ``fastrlhf train ppo --reward-model path`` load them as they are.
2. The reward is the head applied to the hidden state of the last counted token (the last 1 of
   the attention mask): the token the sequence-classification forward reads (its rightmost
   non-pad token), with position ids ``cumsum(mask) - 1`` as everywhere in fastrlhf.
3. The scored text is ``prompt + response`` tokenized as one string without special tokens,
   which is exactly what :func:`fastrlhf.algos.reward_model_fn` (PPO's reward call) feeds the
   model; too-long texts keep their *last* ``max_length`` tokens, since the reward is read there.
4. Loss ``-logsigmoid(r_c - r_r - margin)`` (InstructGPT eq. 1), the margin taken from a row's
   ``"margin"`` field (Llama 2, Touvron et al. 2023, eq. 2; TRL's margin column) or
   ``config.margin``; plus ``center_rewards_coef * mean((r_c + r_r)^2)`` (Eisenstein et al.
   2023; TRL's ``center_rewards_coefficient``), which pins the reward's free offset near 0.
5. Rankings of ``k > 2`` responses (``{"prompt", "responses": [...], "scores": [...]}``, or
   ``responses`` best first without scores) give all ``C(k, 2)`` ordered pairs from one forward
   of the ``k`` responses, each pair weighted ``1 / C(k, 2)``, so every prompt counts once
   (InstructGPT: "we train on all comparisons from each prompt as a single batch element",
   which avoided the overfitting of shuffled pairs). Tied scores give no pair.
6. Metrics: pair accuracy, chosen / rejected rewards, margin, and the mean / std of the
   rewards of the step's responses; :meth:`RewardModel.evaluate` gives held-out pair accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

import fastrlhf

from .data import preference_texts, prompt_text
from .engine import barrier
from .models import apply_lora, attn_implementation, forward_hidden, merged_lora_copy, unwrap_model
from .rewards import RewardFn
from .trainer import TrainConfig, Trainer, check_config


@dataclass
class RewardModelConfig(TrainConfig):
    """Reward-model hyper-parameters."""

    margin: float = 0.0
    """Margin m in -logsigmoid(r_c - r_r - m) for rows without their own "margin" field."""
    center_rewards_coef: float = 0.0
    """Weight of mean((r_c + r_r)^2) (Eisenstein et al. 2023; TRL's center_rewards_coefficient; 0: off)."""
    max_length: Optional[int] = 1024
    """Longest scored prompt + response in tokens; longer ones keep their last tokens (None: no limit)."""
    micro_batch_size: int = 8
    """Rows (preference pairs or rankings) per forward/backward pass."""
    lr: float = 1e-5
    """AdamW learning rate."""


# ----------------------------------------------------------------------------------------
# The model: a sequence-classification head on a causal LM's decoder
# ----------------------------------------------------------------------------------------


def score_head(model) -> nn.Module:
    """The scalar head ``[H] -> 1`` of a sequence-classification model (``score``, or ``classifier``)."""
    base = unwrap_model(model)
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            out = getattr(getattr(head, "original_module", head), "out_features", None)  # peft wraps the head
            if out != 1:
                raise ValueError(f"the reward model's {name} head has {out} outputs; a reward model needs num_labels=1")
            return head
    raise ValueError(f"{type(base).__name__} has no score / classifier head: pass an "
                     "AutoModelForSequenceClassification with num_labels=1, or a causal LM to convert")


def is_reward_model(model) -> bool:
    base = unwrap_model(model)
    return any(isinstance(getattr(base, n, None), nn.Module) for n in ("score", "classifier"))


def reward_model_from_causal_lm(model, *, seed: int = 0, pad_token_id: Optional[int] = None):
    """A ``AutoModelForSequenceClassification`` (``num_labels=1``) sharing ``model``'s decoder weights.

    The decoder is copied (``model`` is left untouched); the new ``score`` head is drawn from
    ``N(0, 1 / sqrt(H + 1))`` with ``seed``. ``pad_token_id`` is stored in the config, which the
    sequence-classification forward needs to find the last token of a padded batch.
    """
    from transformers import AutoModelForSequenceClassification

    if unwrap_model(model) is not model:
        raise ValueError("convert the causal LM before adding LoRA adapters (pass lora_r in the config instead)")
    param = next(model.parameters())
    cfg = copy.deepcopy(model.config)
    cfg.num_labels = 1
    cfg.architectures = None
    if pad_token_id is not None:
        cfg.pad_token_id = pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rm = AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attn_implementation(param.device))
        head = score_head(rm)
        nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    head_names = {n for n, _ in rm.named_parameters() if n.split(".")[0] in ("score", "classifier")}
    missing, _unexpected = rm.load_state_dict(model.state_dict(), strict=False)
    lacking = [n for n in missing if n not in head_names]
    if lacking:
        raise ValueError(f"{type(model).__name__} does not share its decoder layout with "
                         f"{type(rm).__name__}: {len(lacking)} weights missing, e.g. {lacking[:3]}")
    return rm.to(device=param.device, dtype=param.dtype)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the last 1 in each row of ``attention_mask`` (any padding side)."""
    L = attention_mask.shape[1]
    return L - 1 - attention_mask.flip(-1).long().argmax(-1)


# ----------------------------------------------------------------------------------------
# Data: pairs and rankings
# ----------------------------------------------------------------------------------------


def ranking_of(row: Mapping[str, Any], tokenizer) -> Tuple[str, List[str], List[float], Optional[float]]:
    """``(prompt, responses, scores, margin)`` of a preference row or a ranking row.

    - ``{"prompt", "chosen", "rejected"}`` in any of TRL's preference formats -> scores ``[1, 0]``;
      an optional ``"margin"`` field is the pair's margin.
    - ``{"prompt", "responses": [str, ...], "scores": [float, ...]}`` (higher is better), or
      ``responses`` ordered best first without ``scores``.
    """
    if "responses" in row:
        responses = row["responses"]
        if not isinstance(responses, (list, tuple)) or len(responses) < 2 or \
                not all(isinstance(r, str) for r in responses):
            raise ValueError("'responses' must be a list of at least 2 strings")
        k = len(responses)
        scores = row.get("scores")
        if scores is None:
            scores = [float(k - i) for i in range(k)]  # best first
        elif len(scores) != k:
            raise ValueError(f"'scores' has {len(scores)} entries for {k} responses")
        return prompt_text(row, tokenizer), list(responses), [float(s) for s in scores], None
    prompt, chosen, rejected = preference_texts(row, tokenizer)
    margin = row.get("margin")
    return prompt, [chosen, rejected], [1.0, 0.0], None if margin is None else float(margin)


def ordered_pairs(scores: Sequence[float]) -> List[Tuple[int, int]]:
    """All ``(better, worse)`` index pairs of a ranking; ties give none."""
    k = len(scores)
    return [(i, j) for i in range(k) for j in range(k) if scores[i] > scores[j]]


@dataclass
class _Ranking:
    ids: List[List[int]]
    pairs: List[Tuple[int, int]]
    margin: float


# ----------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------


class RewardModel(Trainer):
    """Bradley-Terry reward-model training of ``model`` on preference pairs or rankings.

    ``model``: an ``AutoModelForSequenceClassification`` with ``num_labels=1``, or a causal LM
    (converted by :func:`reward_model_from_causal_lm`; the trainer's ``model`` is then the new
    one). ``dataset``: rows as :func:`ranking_of` reads them. :meth:`save_pretrained` writes a
    checkpoint that ``PPO`` takes as its ``reward_model``; :meth:`reward_fn` scores completions
    directly (TRL's reward-function call).
    """

    name = "rm"
    needs_reference = False

    def __init__(self, model, tokenizer, dataset: Sequence[Mapping[str, Any]],
                 config: Optional[RewardModelConfig] = None):
        config = config or RewardModelConfig()
        check_config(config, at_least=dict(center_rewards_coef=0.0))
        if config.max_length is not None and config.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {config.max_length}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if not is_reward_model(model):
            model = reward_model_from_causal_lm(model, seed=config.seed, pad_token_id=pad)
        score_head(model)  # num_labels must be 1
        if getattr(unwrap_model(model).config, "pad_token_id", None) is None:
            unwrap_model(model).config.pad_token_id = pad
        # LoRA with peft's SEQ_CLS task type, which keeps the new score head fully trainable
        # (the base class would add CAUSAL_LM adapters, freezing the head).
        model = apply_lora(model, config, task_type="SEQ_CLS")
        super().__init__(model, tokenizer, dataclasses.replace(config, lora_r=0), dataset)
        self.config = config

    @property
    def rows_per_step(self) -> int:
        return self.config.micro_batch_size * self.config.gradient_accumulation_steps

    # -- scoring ---------------------------------------------------------------------------

    def encode(self, prompt: str, response: str) -> List[int]:
        ids = self.tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt + response {prompt + response!r} tokenizes to nothing")
        return ids[-self.config.max_length:] if self.config.max_length is not None else ids

    def _pad(self, seqs: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``[n, L]`` ids and attention mask."""
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            attn[i, L - len(s):] = 1
        return ids.to(self.device), attn.to(self.device)

    def sequence_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[n]`` fp32 rewards: the scalar head on the last counted token's hidden state."""
        def fn(model):  # inside the model's (engine root's) forward
            hidden = forward_hidden(model, input_ids, attention_mask)  # [n, L, H]
            last = last_token_index(attention_mask)  # [n]
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [n, H]
            return score_head(model)(h).squeeze(-1).float()

        return self.call(self.model, fn)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> List[float]:
        """Rewards of ``prompt + completion`` texts under the current model (eval mode, no grad)."""
        seqs = [self.encode(p, c) for p, c in zip(prompts, completions)]
        was_training = self.model.training
        self.model.eval()
        out: List[float] = []
        try:
            for i in range(0, len(seqs), 4 * self.config.micro_batch_size):
                with self.autocast():
                    out += self.sequence_rewards(*self._pad(seqs[i : i + 4 * self.config.micro_batch_size])).tolist()
        finally:
            self.model.train(was_training)
        return out

    def reward_fn(self) -> RewardFn:
        """``fn(prompts=, completions=, **_) -> [float]`` scoring with this model (for GRPO / RRHF / RFT)."""

        def fn(prompts, completions, **_):
            return self.score(prompts, completions)

        return fn

    # -- loss ------------------------------------------------------------------------------

    def tokenize(self, rows: Sequence[Mapping[str, Any]]) -> List[_Ranking]:
        out = []
        for n, row in enumerate(rows):
            prompt, responses, scores, margin = ranking_of(row, self.tokenizer)
            pairs = ordered_pairs(scores)
            if not pairs:
                raise ValueError(f"row {n} has no strictly ordered pair of responses (all scores tie): {scores}")
            out.append(_Ranking([self.encode(prompt, r) for r in responses], pairs,
                                self.config.margin if margin is None else margin))
        return out

    def _rewards(self, chunk: Sequence[_Ranking]) -> torch.Tensor:
        """``[n]`` rewards of every response of ``chunk``, in order."""
        with self.autocast():
            return self.sequence_rewards(*self._pad([ids for rk in chunk for ids in rk.ids]))

    def _pair_loss(self, rewards: torch.Tensor, chunk: Sequence[_Ranking]):
        """Bradley-Terry loss over every ordered pair of ``chunk``: ``(loss, stats, r_better, r_worse)``."""
        better, worse, margins, weights = [], [], [], []
        offset = 0
        for rk in chunk:
            for i, j in rk.pairs:
                better.append(offset + i)
                worse.append(offset + j)
                margins.append(rk.margin)
                weights.append(1.0 / len(rk.pairs))  # each prompt counts once (InstructGPT eq. 1)
            offset += len(rk.ids)
        dev = rewards.device
        rb = rewards[torch.tensor(better, device=dev)]
        rw = rewards[torch.tensor(worse, device=dev)]
        loss, stats = fastrlhf.pairwise_reward_loss(
            rb, rw, margin=torch.tensor(margins, device=dev), center_coef=self.config.center_rewards_coef,
            weights=torch.tensor(weights, device=dev),
        )
        return loss, stats, rb, rw

    def train_step(self, rows: List[Mapping[str, Any]]) -> Dict[str, float]:
        items = self.tokenize(rows)
        all_rewards = []

        def loss_fn(idx: torch.Tensor):
            chunk = [items[i] for i in idx.tolist()]
            rewards = self._rewards(chunk)
            all_rewards.append(rewards.detach())
            loss, stats, _, _ = self._pair_loss(rewards, chunk)
            return loss, stats

        # one optimizer step: the rows are exactly gradient_accumulation_steps micro-batches, in order
        out = self.run_updates(len(items), loss_fn, shuffle=False)
        r = torch.cat(all_rewards)
        out.update(reward_mean=float(r.mean()), reward_std=float(r.std()) if r.numel() > 1 else 0.0,
                   tokens=float(sum(len(s) for it in items for s in it.ids)))
        return out

    @torch.no_grad()
    def evaluate(self, rows: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
        """On held-out ``rows``: ``accuracy`` (fraction of all pairs ranked right), the loss, reward stats."""
        items = self.tokenize(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            step = 4 * self.config.micro_batch_size
            r = torch.cat([self._rewards(items[i : i + step]) for i in range(0, len(items), step)])
        finally:
            self.model.train(was_training)
        loss, _, rb, rw = self._pair_loss(r, items)
        return {"accuracy": float((rb > rw).float().mean()), "loss": float(loss), "reward_mean": float(r.mean()),
                "reward_std": float(r.std()) if r.numel() > 1 else 0.0, "reward_margin": float((rb - rw).mean()),
                "num_pairs": float(rb.numel())}

    # -- export ----------------------------------------------------------------------------

    def save_pretrained(self, path: str) -> str:
        """Write the reward model (LoRA merged) and tokenizer as a sequence-classification checkpoint."""
        model = self.model
        lora = unwrap_model(model) is not model
        if self.engine.kind != "none":
            if not lora:
                model.config.pad_token_id = self.pad_id
                return super().save_pretrained(path)
            state = self.engine.full_state_dict(self.roots[id(model)])  # a collective: every rank calls it
            if not self.engine.is_main:
                barrier()
                return path
            model = merged_lora_copy(model, state)  # peft: the adapters merged into a rebuilt copy
        elif lora:  # peft: merge the adapters into a copy
            model = copy.deepcopy(model).merge_and_unload()
        model.config.pad_token_id = self.pad_id
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.engine.kind != "none":
            barrier()
        return path
