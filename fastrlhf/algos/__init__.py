"""PPO, DPO, GRPO, reward modelling, RRHF and rejection-sampling fine-tuning on Hugging Face
causal LMs, built only on the public ops.

Each algorithm is a config dataclass and a thin :class:`~fastrlhf.algos.trainer.Trainer`
subclass whose ``train_step`` makes a rollout (or takes a batch) and hands a loss function to
the one shared update loop (``Trainer.run_updates``); the losses are the fused-linear ops
(``fastrlhf.linear_*``) on the model's last hidden state and lm_head weight, so the
``[B, T, V]`` logits are never built.

    from fastrlhf.algos import GRPO, GRPOConfig
    trainer = GRPO(model, tokenizer, [{"prompt": "2+3=", "answer": "5"}, ...], reward_fn, GRPOConfig(steps=100))
    trainer.train()

The classic pipeline: SFT -> :class:`RewardModel` on preference pairs -> :class:`PPO` with
``reward_model=`` the saved reward model. The command line (``fastrlhf train
{dpo,grpo,ppo,rm,rrhf,rft}``) lives in :mod:`fastrlhf.cli`.
"""

from .batching import SequenceBatch, pack_sequences
from .data import load_jsonl, preference_texts, prompt_text
from .dpo import DPO, DPOConfig
from .grpo import GRPO, GRPOConfig
from .models import attn_implementation, forward_hidden, load_causal_lm, output_head
from .ppo import PPO, PPOConfig, ValueModel
from .reward import RewardModel, RewardModelConfig, reward_model_from_causal_lm
from .rewards import load_reward_fn, reward_model_fn
from .rft import RFT, RFTConfig
from .rrhf import RRHF, RRHFConfig
from .task import ArithmeticTask, greedy_accuracy, tiny_causal_lm
from .tokenizer import build_char_tokenizer
from .trainer import TrainConfig, Trainer, supervised_finetune

__all__ = [
    "DPO",
    "DPOConfig",
    "GRPO",
    "GRPOConfig",
    "PPO",
    "PPOConfig",
    "ValueModel",
    "RewardModel",
    "RewardModelConfig",
    "reward_model_from_causal_lm",
    "RRHF",
    "RRHFConfig",
    "RFT",
    "RFTConfig",
    "Trainer",
    "TrainConfig",
    "SequenceBatch",
    "pack_sequences",
    "attn_implementation",
    "load_causal_lm",
    "forward_hidden",
    "output_head",
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
