"""Datasets in TRL's formats, read from local JSONL files.

- prompt-only (GRPO, PPO): ``{"prompt": str}`` or conversational ``{"prompt": [{"role", "content"}, ...]}``;
  any other columns (``"answer"``, ``"solution"``...) are passed to the reward function.
- preference (DPO): ``{"prompt", "chosen", "rejected"}`` as strings, or as message lists
  (conversational), or implicit-prompt ``{"chosen", "rejected"}`` full conversations whose
  shared leading messages are the prompt.
Conversational rows are rendered with the tokenizer's chat template, as TRL's
``maybe_apply_chat_template`` does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Tuple


def load_jsonl(path: str) -> List[Dict[str, Any]]:
    """Rows of a JSONL file (one JSON object per non-empty line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} not found")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise ValueError(f"dataset file {path!r} has no rows")
    return rows


def _is_conversation(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _chat(tokenizer, messages, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational rows need a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(row: Mapping[str, Any], tokenizer) -> str:
    """The prompt of a prompt-only row as text (chat template applied to conversations)."""
    if "prompt" not in row:
        raise ValueError(f"prompt-only rows need a 'prompt' field, got keys {sorted(row)}")
    p = row["prompt"]
    if isinstance(p, str):
        return p
    if _is_conversation(p):
        return _chat(tokenizer, p, add_generation_prompt=True)
    raise ValueError(f"'prompt' must be a string or a list of {{role, content}} messages, got {type(p).__name__}")


def preference_texts(row: Mapping[str, Any], tokenizer) -> Tuple[str, str, str]:
    """``(prompt, chosen, rejected)`` texts of a preference row in any of TRL's preference formats."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"preference rows need '{key}', got keys {sorted(row)}")
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt: the shared leading part
        if _is_conversation(chosen) and _is_conversation(rejected):
            k = 0
            while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
                k += 1
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        elif isinstance(chosen, str) and isinstance(rejected, str):
            k = 0
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1
            # back off to a word boundary so the completions start on whole words
            while k > 0 and not chosen[k - 1].isspace():
                k -= 1
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        else:
            raise ValueError("implicit-prompt rows need 'chosen' and 'rejected' of the same kind")
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return prompt, chosen, rejected
    if _is_conversation(prompt) and _is_conversation(chosen) and _is_conversation(rejected):
        p = _chat(tokenizer, prompt, add_generation_prompt=True)
        c = _chat(tokenizer, list(prompt) + list(chosen), add_generation_prompt=False)
        r = _chat(tokenizer, list(prompt) + list(rejected), add_generation_prompt=False)
        if not (c.startswith(p) and r.startswith(p)):
            raise ValueError("the chat template does not render the prompt as a prefix of prompt + completion")
        return p, c[len(p):], r[len(p):]
    raise ValueError("'prompt', 'chosen' and 'rejected' must all be strings or all message lists")
