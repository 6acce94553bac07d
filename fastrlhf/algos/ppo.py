"""PPO for language models (Ouyang et al. 2022; Ziegler et al. 2019) with an actor and a critic.

One step: sample a completion per prompt, score it (a reward function or a reward model),
build per-token rewards with a KL penalty to the reference, estimate advantages with GAE
from the critic's values, then run ``ppo_epochs`` passes of clipped actor and critic updates.

Implementation choices (numbers refer to CleanRL's "The 37 Implementation Details of PPO",
Huang et al. 2022; TRL's ``PPOTrainer`` and verl where they add LLM-specific ones):

1. Critic = a copy of the policy's decoder stack with a scalar head on the last hidden state
   (TRL initialises it from the reward model; we copy the policy, as OpenRLHF can); the head
   starts at zero, so the first values are 0 and the first advantages are pure returns.
   Values are read at the same positions as the logits that score each completion token.
2. Sequence-level score on the last completion token; per-token reward ``-kl_coef * k1``
   with ``k1 = logp - ref_logp`` (Ziegler et al. 2019, TRL's ``kl_estimator="k1"``) when
   ``kl_penalty="reward"``; ``kl_penalty="loss"`` instead adds ``kl_coef * k3`` to the loss
   (GRPO-style, verl's ``use_kl_loss``).
3. GAE (detail 5; Schulman et al. 2016) with ``gamma=1, lam=0.95`` (TRL), over the
   completion tokens only (``fastrlhf.estimate_advantages("gae", ...)``, i.e. ``fastrlhf.gae``).
4. Advantage whitening over the whole rollout (detail 7; TRL whitens per batch, CleanRL per
   minibatch), masked to completion tokens (``fastrlhf.masked_whiten``, unbiased variance).
5. Clipped surrogate objective (detail 8) through ``fastrlhf.ppo_clip_loss``.
6. Value-function loss clipping (detail 9): ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with
   ``V_clip = V_old + clamp(V - V_old, -cliprange_value, cliprange_value)``, token-mean
   (``fastrlhf.clipped_value_loss``, verl's ``compute_value_loss``).
7. One optimizer over actor and critic, loss ``pg + vf_coef * vf`` (detail 10; TRL's
   ``PolicyAndValueWrapper``), global gradient clipping (detail 11).
8. Several epochs over shuffled minibatches (details 6, "mini-batch updates"), each
   ``micro_batch_size * gradient_accumulation_steps`` sequences.
9. No entropy bonus by default (``entropy_coef=0``, TRL and verl for LLMs; CleanRL uses 0.01
   for Atari); the entropy is still logged.
10. ``advantage_estimator`` other than ``"gae"`` drops the critic (OpenRLHF's critic-free
    estimators; all dispatched by ``fastrlhf.estimate_advantages``): the same per-token
    rewards (KL penalty + score on the last token) go to REINFORCE++ (Hu 2025: returns-to-go,
    global whitening), its ``group_size`` variant over the ``samples_per_prompt`` samples of a
    prompt (REINFORCE++-baseline), REINFORCE with the batch-mean baseline, or, after the
    leave-one-out baseline on the scores (Ahmadian et al. 2024), to plain returns (OpenRLHF's
    ``rloo``). ``whiten_advantages`` applies to GAE only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

import fastrlhf

from .batching import micro_batches
from .models import apply_lora, forward_hidden, unwrap_model
from .rewards import RewardFn, reward_model_fn
from .rollout import RolloutConfig, RolloutTrainer
from .trainer import check_config, check_rollout_fits_updates


@dataclass
class PPOConfig(RolloutConfig):
    """PPO hyper-parameters (defaults follow TRL's PPOConfig unless noted)."""

    prompts_per_step: int = 64
    """Prompts sampled per rollout step."""
    samples_per_prompt: int = 1
    """Completions sampled per prompt."""
    kl_coef: float = 0.05
    """KL coefficient (per-token penalty in the reward, or loss term; see kl_penalty)."""
    kl_penalty: str = "reward"
    """reward: -kl_coef * k1 added to each token's reward; loss: kl_coef * k3 added to the loss."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_low: float = 0.2
    """Policy ratio clip below 1."""
    clip_high: Optional[float] = None
    """Policy ratio clip above 1 (None: = clip_low)."""
    cliprange_value: float = 0.2
    """Value clipping range around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    whiten_advantages: bool = True
    """Normalise GAE advantages to zero mean, unit variance over the rollout's completion tokens."""
    advantage_estimator: str = "gae"
    """gae (critic) | reinforce | reinforce++ | reinforce++-baseline | rloo (the last four are critic-free)."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    loss_agg: str = "token-mean"
    """Aggregation of the policy loss over tokens (see fastrlhf.ppo_clip_loss)."""
    micro_batch_size: int = 32
    """Sequences per forward/backward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer update."""
    lr: float = 1e-5
    """AdamW learning rate (actor and critic)."""


class ValueModel(nn.Module):
    """Critic: a decoder stack and a scalar head ``[H] -> 1`` on its last hidden state."""

    def __init__(self, decoder: nn.Module, hidden_size: int):
        super().__init__()
        self.decoder = decoder
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy) -> ValueModel:
        base = unwrap_model(policy)
        return cls(copy.deepcopy(base.get_decoder()), base.config.hidden_size)

    def get_decoder(self):
        return self.decoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = forward_hidden(self, input_ids, attention_mask)  # [B, L, H]
        return self.head(hidden).squeeze(-1).float()  # [B, L]


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp_min(1.0)


PPO_ADVANTAGE_ESTIMATORS = ("gae", "reinforce", "reinforce++", "reinforce++-baseline", "rloo")


class PPO(RolloutTrainer):
    """PPO of ``model`` (actor) with a critic, rewarded by ``reward_fn`` or ``reward_model``.

    ``dataset``: prompt-only rows (see :class:`fastrlhf.algos.GRPO`). ``reward_model``: a
    sequence-classification model scoring ``prompt + completion`` (its logit 0). ``critic``:
    optional module ``(input_ids, attention_mask) -> values [B, L]``; by default
    :meth:`ValueModel.from_policy`.
    """

    name = "ppo"

    def __init__(self, model, tokenizer, dataset: Sequence[Mapping[str, Any]], reward_fn: Optional[RewardFn] = None,
                 config: Optional[PPOConfig] = None, *, reward_model=None, reward_tokenizer=None,
                 critic: Optional[nn.Module] = None):
        config = config or PPOConfig()
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("pass exactly one of reward_fn and reward_model")
        check_config(config, at_least=dict(kl_coef=0.0),
                     one_of=dict(kl_penalty=("reward", "loss"), advantage_estimator=PPO_ADVANTAGE_ESTIMATORS))
        if config.advantage_estimator in ("rloo", "reinforce++-baseline") and config.samples_per_prompt < 2:
            raise ValueError(f"advantage_estimator={config.advantage_estimator!r} needs samples_per_prompt >= 2")
        if config.advantage_estimator != "gae" and critic is not None:
            raise ValueError(f"advantage_estimator={config.advantage_estimator!r} is critic-free: pass no critic")
        check_rollout_fits_updates(config, "samples_per_prompt")
        self.needs_reference = config.kl_coef > 0
        if critic is None and config.advantage_estimator == "gae":
            critic = ValueModel.from_policy(model)
            # with LoRA the critic's decoder gets adapters too; its head stays fully trainable
            critic.decoder = apply_lora(critic.decoder, config, task_type=None)
        if reward_model is not None:
            reward_fn = reward_model_fn(reward_model, reward_tokenizer or tokenizer)
        # set before the base class wraps the trainable modules (actor and critic share one engine root)
        self.critic = critic.to(next(model.parameters()).device).train() if critic is not None else None
        super().__init__(model, tokenizer, config, dataset, reward_fn)

    def trainable_modules(self) -> Dict[str, nn.Module]:
        if self.critic is None:
            return {"policy": self.model}
        return {"policy": self.model, "critic": self.critic}

    def completion_values(self, critic, batch) -> torch.Tensor:
        """``critic``'s values ``[B, R]`` at the positions that predict each completion token (call it
        inside the engine's root forward: :meth:`call`)."""
        P, R = batch.prompt_len, batch.labels.shape[1]
        return critic(batch.input_ids, batch.attention_mask)[:, P - 1 : P - 1 + R]

    def train_step(self, rows: List[Mapping[str, Any]]) -> Dict[str, float]:
        c, S = self.config, self.config.samples_per_prompt
        # 1. Rollout and its score.
        batch, scores, _ = self.sample_and_score(rows, S, max_new_tokens=c.max_new_tokens,
                                                 temperature=c.temperature, reward_fn=self.reward_fn)  # [B]
        batch = self.global_width(batch)  # several ranks: one completion width (a no-op in one process)
        mask = batch.completion_mask.float()  # [B, R]

        # 2. Logprobs, reference logprobs and values of the rollout, no grad.
        old_logp = self.completion_logprobs(self.model, batch, c.temperature)  # [B, R]
        ref_logp = None
        if c.kl_coef > 0:
            with self.reference() as ref:
                ref_logp = self.completion_logprobs(ref, batch, c.temperature)
        with torch.no_grad():
            old_values = None
            if self.critic is not None:
                old_values = torch.cat([
                    self.call(self.critic, self.completion_values, batch.select(sl))
                    for sl in micro_batches(len(batch), c.micro_batch_size)
                ]) * mask  # [B, R]

            # 3. Advantages from per-token rewards: the k1 KL penalty on every token (kl_penalty="reward"),
            # the score on the last one; batch statistics over every rank's rows (engine.on_all_rows).
            kl_k1 = torch.zeros_like(old_logp)
            kl = ref_logp is not None and c.kl_penalty == "reward"
            if ref_logp is not None:
                kl_k1 = fastrlhf.kl_estimate(old_logp, ref_logp, "k1") * mask

            def estimate(scores, mask, old_values, old_logp, ref_logp):
                kw = dict(logprobs=old_logp, ref_logprobs=ref_logp, kl_coef=c.kl_coef, kl_estimator="k1") if kl else {}
                advantages, returns = fastrlhf.estimate_advantages(
                    c.advantage_estimator, scores, mask, group_size=S, values=old_values, gamma=c.gamma, lam=c.lam,
                    **kw)
                if c.advantage_estimator == "gae" and c.whiten_advantages:
                    advantages = fastrlhf.masked_whiten(advantages, mask)
                return advantages, returns

            advantages, returns = self.engine.on_all_rows(estimate, scores, mask, old_values, old_logp,
                                                          ref_logp if kl else None)

        # 4. ppo_epochs passes of clipped actor + critic updates.
        kl_loss = c.kl_penalty == "loss" and c.kl_coef > 0

        def loss_fn(idx: torch.Tensor):
            mb = batch.select(idx)

            def forward(hidden, op):  # inside the engine's root forward: actor and critic in one call
                pg = op("ppo_clip_loss", hidden, mb.labels, old_logp[idx], advantages[idx],
                        clip_low=c.clip_low, clip_high=c.clip_high, entropy_coef=c.entropy_coef,
                        ref_logprobs=ref_logp[idx] if kl_loss else None, kl_coef=c.kl_coef if kl_loss else 0.0,
                        kl_estimator="k3", temperature=c.temperature, loss_agg=c.loss_agg, compute_entropy=True)
                return pg, None if self.critic is None else self.completion_values(self.critic, mb)  # [b, R]

            with self.autocast():
                (pg_loss, stats), values = self.completion_forward(self.model, mb, forward)
            out = {("kl_loss" if key == "kl" else key): v for key, v in stats.items()}
            if values is None:
                return pg_loss, {"pg_loss": pg_loss.detach(), **out}
            vf_loss, vf_stats = fastrlhf.clipped_value_loss(values, old_values[idx], returns[idx], mask[idx],
                                                            clip=c.cliprange_value)
            out.update(pg_loss=pg_loss.detach(), vf_loss=vf_loss.detach(), vf_clipfrac=vf_stats["clipfrac"])
            return (pg_loss, c.vf_coef * vf_loss), out

        def counts(idx: torch.Tensor):  # what each term is a mean over (the global normalisers on several ranks)
            tokens = int(mask[idx].sum())
            pg = tokens if c.loss_agg == "token-mean" else len(idx)
            return pg if self.critic is None else (pg, tokens)

        out = self.run_updates(len(batch), loss_fn, epochs=c.ppo_epochs, norm=counts)
        non_score = -c.kl_coef * kl_k1.sum(-1) if kl else torch.zeros_like(scores)  # [B] KL part of the reward
        out.update(
            reward=float(scores.mean()),
            kl=float(kl_k1.sum(-1).mean()),  # k1 estimate of KL(policy || ref) per completion
            non_score_reward=float(non_score.mean()),
            **({"value_mean": float(_masked_mean(old_values, mask))} if self.critic is not None else {}),
            returns_mean=float(_masked_mean(returns, mask)),
            completion_len=float(mask.sum(-1).mean()),
            tokens=float(batch.attention_mask.sum()),
        )
        return out
