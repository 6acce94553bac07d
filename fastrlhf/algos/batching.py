"""Batches of prompt + completion sequences, and how text becomes their token ids.

Sequences are laid out as a left-padded prompt followed by a right-padded completion, so
every completion starts at the same column ``P`` and the hidden states that score it are
``hidden[:, P-1 : P-1+R]`` (TRL's layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100


@dataclass
class SequenceBatch:
    """``B`` sequences of a prompt (left-padded to ``P``) followed by a completion (right-padded to ``R``)."""

    input_ids: torch.Tensor
    """[B, P + R] token ids."""
    attention_mask: torch.Tensor
    """[B, P + R] 1 on real tokens."""
    labels: torch.Tensor
    """[B, R] completion ids, IGNORE_INDEX on padding."""
    prompt_len: int
    """P: the column where every completion starts."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx) -> SequenceBatch:
        return SequenceBatch(self.input_ids[idx], self.attention_mask[idx], self.labels[idx], self.prompt_len)

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX  # [B, R]

    def padded_to(self, width: int, pad_id: int) -> SequenceBatch:
        """The same sequences with completions right-padded to ``width`` columns (no-op when already as wide)."""
        extra = width - self.labels.shape[1]
        if extra <= 0:
            return self
        pad = torch.nn.functional.pad
        return SequenceBatch(pad(self.input_ids, (0, extra), value=pad_id), pad(self.attention_mask, (0, extra)),
                             pad(self.labels, (0, extra), value=IGNORE_INDEX), self.prompt_len)

    def token_lists(self, idx=None) -> Tuple[List[List[int]], List[List[int]]]:
        """The prompt and completion token ids of rows ``idx`` (default: all): the inverse of :func:`pack_sequences`."""
        rows = self if idx is None else self.select(idx)
        P = rows.prompt_len
        prompts = [ids[:P][m[:P].bool()].tolist() for ids, m in zip(rows.input_ids, rows.attention_mask)]
        completions = [lab[lab != IGNORE_INDEX].tolist() for lab in rows.labels]
        return prompts, completions


def pack_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device=None
) -> SequenceBatch:
    """Lay out ``prompts[i] + completions[i]`` as a :class:`SequenceBatch`."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) must pair up")
    if not prompts:
        raise ValueError("prompts must not be empty")
    P = max(len(p) for p in prompts)
    R = max(1, max(len(c) for c in completions))
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    labels = torch.full((B, R), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every sequence needs at least one prompt token")
        ids[i, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        if len(c):
            ids[i, P : P + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            attn[i, P : P + len(c)] = 1
            labels[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
    return SequenceBatch(ids.to(device), attn.to(device), labels.to(device), P)


def cut_at_eos(ids: Sequence[int], eos_id: Optional[int], pad_id: Optional[int]) -> List[int]:
    """Tokens up to and including the first eos; trailing pad dropped."""
    out = []
    for t in ids:
        t = int(t)
        if eos_id is not None and t == eos_id:
            out.append(t)
            return out
        out.append(t)
    while out and pad_id is not None and out[-1] == pad_id and pad_id != eos_id:
        out.pop()
    return out


def micro_batches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``size`` (the last one shorter) covering ``range(n)``."""
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def encode_prompt(tokenizer, text: str) -> List[int]:
    """Prompt ids with the tokenizer's own special tokens (e.g. a leading bos), as TRL tokenizes prompts."""
    return tokenizer(text)["input_ids"]


def encode_completion(tokenizer, text: str, add_eos: bool = True) -> List[int]:
    """Completion ids without special tokens, plus eos (the policy must learn to stop)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else ids
