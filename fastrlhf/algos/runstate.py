"""Run state outside the Trainer class: config checks, RNG states (for exact resumption), peak memory, checkpoint
directories, and the supervised warm-up. Re-exported by :mod:`fastrlhf.algos.trainer`.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from fastrlhf._memory import peak_rss_bytes

from .batching import encode_completion, encode_prompt, pack_sequences
from .models import forward_hidden, head_op, output_head

# ----------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------


def check_config(config, *, at_least: Optional[Mapping[str, float]] = None,
                 one_of: Optional[Mapping[str, Sequence[Any]]] = None) -> None:
    """ValueError naming the field when a number is below its floor (NaN included) or a name is not a choice."""
    for name, low in (at_least or {}).items():
        value = getattr(config, name)
        if not value >= low:
            raise ValueError(f"{name} must be >= {low}, got {value!r}")
    for name, choices in (one_of or {}).items():
        value = getattr(config, name)
        if value not in choices:
            raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_rollout_fits_updates(config, samples_name: str) -> None:
    """A step's ``prompts_per_step * samples`` sequences must split into whole updates."""
    rollout = config.prompts_per_step * getattr(config, samples_name)
    update = config.micro_batch_size * config.gradient_accumulation_steps
    if rollout % update:
        raise ValueError(f"prompts_per_step * {samples_name} = {rollout} must be a multiple of "
                         f"micro_batch_size * gradient_accumulation_steps = {update}")


# ----------------------------------------------------------------------------------------
# RNG state (for exact resumption) and memory
# ----------------------------------------------------------------------------------------


def get_rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = peak_rss_bytes()
    return peak / 2**20 if peak is not None else float("nan")


def all_checkpoints(path: str) -> List[str]:
    """The ``checkpoint-<step>`` directories under ``path``, oldest step first."""
    if not os.path.isdir(path):
        return []
    names = [d for d in os.listdir(path) if d.startswith("checkpoint-")]
    steps = sorted(int(d.split("-", 1)[1]) for d in names if d.split("-", 1)[1].isdigit())
    return [os.path.join(path, f"checkpoint-{s}") for s in steps]


def latest_checkpoint(path: str) -> Optional[str]:
    """The ``checkpoint-<step>`` directory with the highest step under ``path`` (None if none)."""
    found = all_checkpoints(path)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------
# Supervised warm-up
# ----------------------------------------------------------------------------------------


def supervised_finetune(model, tokenizer, rows: Sequence[Mapping[str, str]], *, steps: int, batch_size: int = 32,
                        lr: float = 3e-3, seed: int = 0, fused_linear: bool = True, progress: bool = False,
                        ) -> List[float]:
    """Warm-up by next-token NLL of ``completion + eos`` given ``prompt`` (rows with those keys).

    Each step draws ``batch_size`` rows with replacement (seeded), one AdamW step, gradient
    norm clipped at 1. Uses ``fastrlhf.linear_token_logprobs`` (or the logits op) like the
    algorithms do. Returns the loss per step.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    weight, bias = output_head(model)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="sft warm-up", disable=not progress, dynamic_ncols=True):
        idx = torch.randint(len(rows), (batch_size,), generator=gen).tolist()
        prompts = [encode_prompt(tokenizer, rows[i]["prompt"]) for i in idx]
        completions = [encode_completion(tokenizer, rows[i]["completion"]) for i in idx]
        batch = pack_sequences(prompts, completions, pad, device)
        hidden = forward_hidden(model, batch.input_ids, batch.attention_mask)
        hidden = hidden[:, batch.prompt_len - 1 : batch.prompt_len - 1 + batch.labels.shape[1]]  # [B, R, H]
        logp = head_op("token_logprobs", hidden, weight, bias, batch.labels, fused=fused_linear)  # [B, R]
        loss = -(logp.sum() / batch.completion_mask.sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses
