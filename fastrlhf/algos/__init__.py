"""PPO, DPO and GRPO training on Hugging Face causal LMs, built only on the public ops.

Each algorithm is a config dataclass and a thin :class:`~fastrlhf.algos.common.Trainer`
subclass; the losses are the fused-linear ops (``fastrlhf.linear_*``) on the model's last
hidden state and lm_head weight, so the ``[B, T, V]`` logits are never built.

    from fastrlhf.algos import GRPO, GRPOConfig
    trainer = GRPO(model, tokenizer, [{"prompt": "2+3=", "answer": "5"}, ...], reward_fn, GRPOConfig(steps=100))
    trainer.train()

The command line (``fastrlhf train {dpo,grpo,ppo}``) lives in :mod:`fastrlhf.cli`.
"""

from .common import (
    SequenceBatch,
    TrainConfig,
    Trainer,
    attn_implementation,
    fused_linear_available,
    load_causal_lm,
    load_reward_fn,
    pack_sequences,
    reward_model_fn,
    supervised_finetune,
)
from .data import load_jsonl, preference_texts, prompt_text
from .dpo import DPO, DPOConfig
from .grpo import GRPO, GRPOConfig
from .ppo import PPO, PPOConfig, ValueModel
from .task import ArithmeticTask, greedy_accuracy, tiny_causal_lm
from .tokenizer import build_char_tokenizer

__all__ = [
    "DPO",
    "DPOConfig",
    "GRPO",
    "GRPOConfig",
    "PPO",
    "PPOConfig",
    "ValueModel",
    "Trainer",
    "TrainConfig",
    "SequenceBatch",
    "pack_sequences",
    "attn_implementation",
    "fused_linear_available",
    "load_causal_lm",
    "load_reward_fn",
    "reward_model_fn",
    "supervised_finetune",
    "load_jsonl",
    "preference_texts",
    "prompt_text",
    "ArithmeticTask",
    "greedy_accuracy",
    "tiny_causal_lm",
    "build_char_tokenizer",
]
