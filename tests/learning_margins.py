"""Reward gains of the slow learning-curve tests over many seeds: the data behind their margins.

    python tests/learning_margins.py {grpo,ppo,ppo_rm,rrhf,rft} 0,1,2,...,15 out.json

Prints, per seed, the mean reward of the first and of the last 10 steps (the quantity the
`slow` tests average over LEARNING_SEEDS), with the configurations of those tests. Not
collected by pytest (no test_ prefix).
"""

import copy
import json
import sys
import time

import torch

from fastrlhf.algos import (
    GRPO,
    PPO,
    RFT,
    RRHF,
    ArithmeticTask,
    GRPOConfig,
    PPOConfig,
    RewardModel,
    RewardModelConfig,
    RFTConfig,
    RRHFConfig,
    build_char_tokenizer,
    reward_model_fn,
    supervised_finetune,
    tiny_causal_lm,
)
from fastrlhf.cli import task_ranking_rows


def main(algo: str, seeds, out: str) -> None:
    tok = build_char_tokenizer()
    task = ArithmeticTask(max_operand=10, seed=0)
    torch.manual_seed(0)
    warm = tiny_causal_lm(len(tok), hidden_size=64, num_layers=2, tokenizer=tok, seed=0, device="cpu")
    supervised_finetune(warm, tok, task.sft_rows(), steps=200, batch_size=32, lr=3e-3, seed=0)
    reward = task.reward
    if algo == "ppo_rm":
        torch.manual_seed(0)
        rm = RewardModel(copy.deepcopy(warm), tok, task_ranking_rows(task, seed=0),
                         RewardModelConfig(progress=False, seed=0, steps=150, lr=3e-4, micro_batch_size=16))
        rm.train()
        reward = reward_model_fn(rm.model, tok)
    rows = task.prompt_rows("train")
    results = {}
    for seed in seeds:
        t0 = time.time()
        torch.manual_seed(seed)
        common = dict(progress=False, seed=seed, max_new_tokens=4, lr_warmup_steps=10)
        if algo == "grpo":
            t = GRPO(copy.deepcopy(warm), tok, rows, reward, GRPOConfig(
                **common, prompts_per_step=16, group_size=8, micro_batch_size=32, gradient_accumulation_steps=4,
                lr=1e-3, beta=0.04))
            steps = 50
        elif algo in ("ppo", "ppo_rm"):
            t = PPO(copy.deepcopy(warm), tok, rows, reward, PPOConfig(
                **common, prompts_per_step=64, micro_batch_size=32, ppo_epochs=2, lr=1e-3, kl_coef=0.05))
            steps = 50 if algo == "ppo" else 100
        elif algo == "rrhf":
            t = RRHF(copy.deepcopy(warm), tok, rows, reward, RRHFConfig(
                **common, prompts_per_step=16, samples_per_prompt=4, micro_batch_size=64, lr=3e-4))
            steps = 100
        else:
            t = RFT(copy.deepcopy(warm), tok, rows, reward, RFTConfig(
                **common, prompts_per_step=16, samples_per_prompt=8, micro_batch_size=16, lr=1e-3))
            steps = 60
        results[seed] = [h["reward"] for h in t.train(steps=steps)]
        first, last = sum(results[seed][:10]) / 10, sum(results[seed][-10:]) / 10
        print(f"{algo} seed {seed}: {first:.3f} -> {last:.3f} (gain {last - first:+.3f}, {time.time() - t0:.0f} s)",
              flush=True)
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3])
