"""The embedded default job: a tiny Llama built from a config and small-integer addition.

Nothing is downloaded: the model is ``LlamaForCausalLM`` from a ``LlamaConfig`` (random
init), the tokenizer is the character-level one of :mod:`fastrlhf.algos.tokenizer`, and the
task ``"a+b="`` -> ``"c"`` has an exactly checkable reward. A short supervised warm-up makes
the model right some of the time, so RL has a signal to sharpen (as RL fine-tuning of a
pretrained or SFT model does).
"""

from __future__ import annotations

import random
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .batching import encode_prompt, pack_sequences
from .models import attn_implementation, forward_hidden, output_head


class ArithmeticTask:
    """Prompts ``"a+b="`` with ``0 <= a, b < max_operand``; the answer is the decimal sum.

    The problems are split once (seeded) into a train set and a held-out eval set.
    Rows follow TRL's formats: ``{"prompt", "answer"}`` (prompt-only, for GRPO/PPO),
    ``{"prompt", "completion"}`` (SFT) and ``{"prompt", "chosen", "rejected"}`` (DPO).
    """

    def __init__(self, max_operand: int = 10, eval_fraction: float = 0.2, seed: int = 0):
        if max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {max_operand}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        problems = [(a, b) for a in range(max_operand) for b in range(max_operand)]
        random.Random(seed).shuffle(problems)
        n_eval = max(1, int(len(problems) * eval_fraction))
        self.seed = seed
        self.eval_problems = problems[:n_eval]
        self.train_problems = problems[n_eval:]

    @staticmethod
    def row(a: int, b: int) -> Dict[str, str]:
        return {"prompt": f"{a}+{b}=", "answer": str(a + b)}

    def prompt_rows(self, split: str = "train") -> List[Dict[str, str]]:
        problems = self.train_problems if split == "train" else self.eval_problems
        return [self.row(a, b) for a, b in problems]

    def sft_rows(self) -> List[Dict[str, str]]:
        return [{"prompt": r["prompt"], "completion": r["answer"]} for r in self.prompt_rows("train")]

    def preference_rows(self, split: str = "train", pairs_per_problem: int = 1) -> List[Dict[str, str]]:
        """``chosen`` = the right sum, ``rejected`` = a near miss (off by 1..3 or digits swapped)."""
        rng = random.Random(self.seed + 1)
        rows = []
        for r in self.prompt_rows(split):
            ans = int(r["answer"])
            for _ in range(pairs_per_problem):
                rows.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(_near_miss(ans, rng))})
        return rows

    @staticmethod
    def reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **_) -> List[float]:
        """1.0 when the completion (up to eos) is exactly the answer, else 0.0."""
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def _near_miss(ans: int, rng: random.Random) -> int:
    s = str(ans)
    if len(s) > 1 and s[0] != s[-1] and rng.random() < 0.3:
        return int(s[::-1])
    wrong = ans + rng.choice([-3, -2, -1, 1, 2, 3])
    return wrong if wrong >= 0 else ans + 1


def tiny_causal_lm(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                   max_positions: int = 64, seed: int = 0, device: Optional[str] = None, tokenizer=None):
    """A randomly initialised ``LlamaForCausalLM`` from a ``LlamaConfig`` (untied lm_head)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ids = {}
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False, **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation(device))
    return model.to(device)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows: Sequence[Mapping[str, str]], *, max_new_tokens: int = 4,
                    batch_size: int = 128) -> float:
    """Fraction of ``rows`` ({"prompt", "answer"}) whose greedy completion equals the answer."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = pack_sequences([encode_prompt(tokenizer, r["prompt"]) for r in chunk], [[]] * len(chunk), pad, device)
        ids = batch.input_ids[:, : batch.prompt_len]
        attn = batch.attention_mask[:, : batch.prompt_len]
        weight, bias = output_head(model)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        out = []
        # A plain greedy loop (no KV cache): these prompts are a few tokens long.
        for _ in range(max_new_tokens):
            h = forward_hidden(model, ids, attn)[:, -1]  # [B, H]
            nxt = torch.nn.functional.linear(h, weight, bias).argmax(-1)  # [B]  one position only
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], 1)
            attn = torch.cat([attn, (~done | (nxt == eos)).long()[:, None]], 1)
            if bool(done.all()):
                break
        gen = torch.stack(out, 1).tolist()
        for r, g in zip(chunk, gen):
            text = tokenizer.decode([t for t in g if t not in (eos, pad)])
            correct += int(text.strip() == r["answer"])
    model.train(was_training)
    return correct / max(len(rows), 1)
