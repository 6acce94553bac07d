"""Reward functions: TRL's call convention, a reward model as a function, user functions by name, weighted sums."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable, Dict, List, Mapping, Sequence

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


class WeightedRewards:
    """Several reward functions as one: ``sum_i w_i * fn_i(...)`` (TRL's ``reward_weights``).

    Each component's mean since the last :meth:`pop_means` is kept, so that a step's metrics can
    show ``reward/<name>`` beside the combined reward (the unweighted component values).
    """

    def __init__(self, fns: Sequence[RewardFn], weights: Sequence[float] = (), names: Sequence[str] = ()):
        weights = list(weights) or [1.0] * len(fns)
        if not fns or len(weights) != len(fns):
            raise ValueError(f"{len(fns)} reward functions but {len(weights)} weights")
        self.fns, self.weights = list(fns), [float(w) for w in weights]
        names = list(names) or [getattr(fn, "__name__", f"fn{i}") for i, fn in enumerate(fns)]
        # Two functions of one name stay apart: the second is name_1, and so on.
        self.names = [n if names.index(n) == i else f"{n}_{i}" for i, n in enumerate(names)]
        self._sums = [0.0] * len(fns)
        self._count = 0

    def __call__(self, prompts, completions, **kwargs) -> List[float]:
        total = [0.0] * len(completions)
        for i, (fn, w) in enumerate(zip(self.fns, self.weights)):
            values = [float(x) for x in fn(prompts=prompts, completions=completions, **kwargs)]
            if len(values) != len(completions):
                raise ValueError(f"reward function {self.names[i]!r} returned {len(values)} values for "
                                 f"{len(completions)} completions")
            self._sums[i] += sum(values)
            total = [t + w * v for t, v in zip(total, values)]
        self._count += len(completions)
        return total

    def pop_means(self) -> Dict[str, float]:
        """``{"reward/<name>": mean}`` over the completions scored since the last call; then reset."""
        out = {f"reward/{n}": s / self._count for n, s in zip(self.names, self._sums)} if self._count else {}
        self._sums, self._count = [0.0] * len(self.fns), 0
        return out
