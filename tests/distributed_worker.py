"""The 2-process half of tests/test_distributed_trainers.py, run once under ``torchrun --nproc_per_node 2``.

``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT`` runs every
scenario in one process group and writes ``OUT/rank<r>.json`` (plus the runs' directories and
``OUT/grads-<kind>.pt`` on rank 0); the test compares them with one-process runs.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

# the CLI runs of both halves of the test (the one-process half adds nothing)
CLI_COMMON = ["--steps", "2", "--seed", "0", "--warmup-steps", "0", "--task-max-operand", "6",
              "--micro-batch-size", "8", "--no-progress", "--no-plot"]
GRPO_ARGS = ["--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "8", "--grad-accum", "2",
             "--max-new-tokens", "2", "--seed", "0", "--warmup-steps", "0", "--task-max-operand", "6",
             "--no-progress", "--no-plot", "--save-every", "1"]
# the normaliser case: completions of very different lengths on the two ranks' prompts
NORM_PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]
NORM_COMPLETIONS = {"1+1=": ["2", "3"], "2+2=": ["4", "45"], "3+3=": ["612345", "6123456"],
                    "4+4=": ["81234567", "8123456"]}


def cli_run(out: str, algo: str, *argv: str):
    from fastrlhf import cli

    args = cli.build_parser().parse_args(["train", algo, *argv, "--output-dir", out])
    return cli.train(args)


def tiny():
    from fastrlhf.algos import build_char_tokenizer, tiny_causal_lm

    tok = build_char_tokenizer()
    return tiny_causal_lm(len(tok), tokenizer=tok, hidden_size=32, num_layers=2, seed=0, device="cpu"), tok


def normaliser_grads(kind: str):
    """One GRPO update on a fixed rollout; the full gradients (before the optimizer step) by name."""
    from fastrlhf.algos import GRPO, GRPOConfig
    from fastrlhf.algos.batching import encode_completion, encode_prompt, pack_sequences

    model, tok = tiny()
    rows = [{"prompt": p} for p in NORM_PROMPTS]
    cfg = GRPOConfig(prompts_per_step=4, group_size=2, micro_batch_size=8, gradient_accumulation_steps=1,
                     num_inner_epochs=1, beta=0.04, lr=1e-3, progress=False, distributed=kind)
    t = GRPO(model, tok, rows, lambda prompts, completions, **_: [0.0] * len(prompts), cfg)

    def fixed_rollout(rows, k, **_):
        prompts = [encode_prompt(tok, r["prompt"]) for r in rows for _ in range(k)]
        comps = [encode_completion(tok, c) for r in rows for c in NORM_COMPLETIONS[r["prompt"]]]
        rewards = torch.tensor([1.0, 0.0] * len(rows))
        return pack_sequences(prompts, comps, t.pad_id, t.device), rewards, comps

    grads = {}

    def capture():
        for n, p in t.model.named_parameters():
            grads[n] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
        return type(t).optimizer_step(t)

    t.sample_and_score = fixed_rollout
    t.optimizer_step = capture
    t.optimizer = t.build_optimizer()
    t.train_step(t.engine.shard(t.rows_for_step(0)) if t.engine.world > 1 else t.rows_for_step(0))
    return grads


def linear_op_case(rank: int):
    """A sharded lm_head: the op's error text, and the grads of the loss run inside the root forward."""
    from torch.distributed.fsdp import fully_shard

    import fastrlhf
    from fastrlhf.algos.engine import RootForward

    torch.manual_seed(0)
    H, V, N = 16, 37, 12
    head = torch.nn.Linear(H, V, bias=False)
    plain = torch.nn.Linear(H, V, bias=False)
    plain.load_state_dict(head.state_dict())
    hidden = torch.randn(N, H)
    labels = torch.randint(V, (N,))
    old, adv = -torch.rand(N) * 3, torch.randn(N)
    kw = dict(beta=0.0, loss_agg="token-mean")
    sharded = torch.nn.Linear(H, V, bias=False)
    fully_shard(sharded)
    try:
        fastrlhf.linear_grpo_loss(hidden, sharded.weight, labels, old, adv, **kw)
        error = None
    except (TypeError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    root = RootForward(head)
    fully_shard(root)
    loss = root(lambda m: fastrlhf.linear_grpo_loss(hidden, m.weight, labels, old, adv, **kw)[0])
    loss.backward()
    got = head.weight.grad.full_tensor()
    fastrlhf.linear_grpo_loss(hidden, plain.weight, labels, old, adv, **kw)[0].backward()
    return {"error": error, "grad_rel_err": float((got - plain.weight.grad).norm() / plain.weight.grad.norm())}


def main(out: str) -> None:
    from fastrlhf.algos import GRPO, GRPOConfig
    from fastrlhf.algos.dpo import DPO
    from fastrlhf.algos.reward import RewardModel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res: dict = {"rows": {}}

    # 1. DPO and RM through the CLI on DDP and FSDP2, with the rows each rank trained on.
    for cls in (DPO, RewardModel):
        orig = cls.train_step

        def spy(self, rows, orig=orig):
            res["rows"].setdefault(res["run"], []).append([json.dumps(r, sort_keys=True) for r in rows])
            return orig(self, rows)

        cls.train_step = spy
    for algo in ("dpo", "rm"):
        for kind in ("ddp", "fsdp2"):
            res["run"] = f"{algo}-{kind}"
            cli_run(os.path.join(out, res["run"]), algo, *CLI_COMMON, "--distributed", kind)
    res["run"] = "dpo-fsdp2-offload"  # FSDP2's CPUOffloadPolicy
    cli_run(os.path.join(out, res["run"]), "dpo", *CLI_COMMON, "--distributed", "fsdp2", "--cpu-offload")

    # 2. FSDP2 checkpoint + --resume against an uninterrupted run (GRPO: sampling RNG included).
    cli_run(os.path.join(out, "grpo-full"), "grpo", *GRPO_ARGS, "--steps", "4", "--distributed", "fsdp2")
    cli_run(os.path.join(out, "grpo-resumed"), "grpo", *GRPO_ARGS, "--steps", "2", "--distributed", "fsdp2")
    from fastrlhf import cli

    cli.train(cli.build_parser().parse_args(["train", "grpo", "--resume", os.path.join(out, "grpo-resumed"),
                                             "--steps", "4", "--no-progress"]))

    # 3. GRPO on DDP: the prompts each rank's reward function saw, and the reward curve.
    model, tok = tiny()
    calls = []

    def reward(prompts, completions, **_):
        calls.append(list(prompts))
        return [sum(ch == "7" for ch in c) / 2 for c in completions]

    rows = [{"prompt": f"{a}+{b}="} for a in range(4) for b in range(4)]
    cfg = GRPOConfig(steps=12, lr=3e-2, prompts_per_step=4, group_size=4, micro_batch_size=8,
                     gradient_accumulation_steps=2, max_new_tokens=2, beta=0.0, num_inner_epochs=1,
                     progress=False, seed=0, distributed="ddp")
    g = GRPO(model, tok, rows, reward, cfg)
    history = g.train()
    res["grpo"] = {"calls": calls, "rewards": [h["reward"] for h in history],
                   "rows": [[r["prompt"] for r in g.rows_for_step(s)] for s in range(cfg.steps)]}

    # 4. The loss normaliser over ranks, on both engines; 5. the fused-linear op on a sharded lm_head.
    for kind in ("ddp", "fsdp2"):
        grads = normaliser_grads(kind)
        if rank == 0:
            torch.save(grads, os.path.join(out, f"grads-{kind}.pt"))
    res["linear"] = linear_op_case(rank)
    res.pop("run")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
