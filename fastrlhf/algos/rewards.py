"""Reward functions: TRL's call convention, a reward model as a function, user functions by name."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable, List, Mapping, Sequence

import torch

from .models import freeze

RewardFn = Callable[..., Sequence[float]]


def call_reward_fn(fn: RewardFn, prompts: List[str], completions: List[str], completion_ids: List[List[int]],
                   rows: List[Mapping[str, Any]], device) -> torch.Tensor:
    """``fn(prompts=, completions=, completion_ids=, **columns)`` -> ``[n]`` fp32 (TRL's reward-function call).

    ``columns`` are the other dataset fields (e.g. ``answer``), one entry per completion.
    """
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
    out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    rewards = torch.as_tensor([float(x) if x is not None else float("nan") for x in out], dtype=torch.float32)
    if rewards.shape != (len(completions),):
        raise ValueError(f"reward function returned {tuple(rewards.shape)} values for {len(completions)} completions")
    if not torch.isfinite(rewards).all():
        raise ValueError("reward function returned a non-finite reward (NaN / inf / None)")
    return rewards.to(device)


def reward_model_fn(reward_model, tokenizer) -> RewardFn:
    """A reward function scoring ``prompt + completion`` with a sequence-classification model (logit 0)."""
    device = next(reward_model.parameters()).device
    freeze(reward_model)

    @torch.no_grad()
    def score(prompts, completions, **_):
        texts = [p + c for p, c in zip(prompts, completions)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        return reward_model(**enc).logits[:, 0].float().tolist()

    return score


def load_reward_fn(spec: str) -> RewardFn:
    """``"module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    if ":" not in spec:
        raise ValueError(f"reward function must be 'module:function' or 'file.py:function', got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        s = importlib.util.spec_from_file_location("fastrlhf_user_reward", mod_name)
        if s is None or s.loader is None:
            raise FileNotFoundError(f"cannot load reward module {mod_name!r}")
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r} does not name a callable")
    return fn
