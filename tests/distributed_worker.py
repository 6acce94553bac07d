"""The 2-process half of tests/test_distributed_trainers.py, run once under ``torchrun --nproc_per_node 2``.

``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT`` runs every
scenario in one process group and writes ``OUT/rank<r>.json`` (plus the runs' directories and
``OUT/grads-<kind>.pt`` on rank 0); the test compares them with one-process runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch
import torch.distributed as dist

# the CLI runs of both halves of the test (the one-process half adds nothing)
CLI_COMMON = ["--steps", "2", "--seed", "0", "--warmup-steps", "0", "--task-max-operand", "6",
              "--micro-batch-size", "8", "--no-progress", "--no-plot"]
LORA = ["--lora-r", "4"]
PPO_ARGS = ["--steps", "1", "--seed", "0", "--warmup-steps", "100", "--task-max-operand", "6",
            "--prompts-per-step", "4", "--micro-batch-size", "4", "--max-new-tokens", "3", "--no-progress", "--no-plot"]
GRPO_ARGS = ["--prompts-per-step", "4", "--group-size", "4", "--micro-batch-size", "8", "--grad-accum", "2",
             "--max-new-tokens", "2", "--seed", "0", "--warmup-steps", "0", "--task-max-operand", "6",
             "--no-progress", "--no-plot", "--save-every", "1"]
# the normaliser case: completions of very different lengths on the two ranks' prompts
NORM_PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]
NORM_ALGOS = ("grpo", "grpo-reinforce++", "grpo-drgrpo", "ppo", "ppo-seq", "rft")
NORM_COMPLETIONS = {"1+1=": ["2", "3"], "2+2=": ["4", "45"], "3+3=": ["612345", "6123456"],
                    "4+4=": ["81234567", "8123456"]}


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# ZeRO-3 with every parameter partitioned (DeepSpeed keeps parameters under 1e5 elements whole by default)
DS_CONFIG = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def engine_args(kind: str, out: str):
    """The CLI flags of engine ``kind`` (``deepspeed``: with DS_CONFIG written under ``out``)."""
    if kind != "deepspeed":
        return ["--distributed", kind]
    path = os.path.join(out, "ds_config.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(DS_CONFIG, f)
    return ["--distributed", "deepspeed", "--deepspeed-config", path]


def cli_run(out: str, algo: str, *argv: str):
    from fastrlhf import cli

    args = cli.build_parser().parse_args(["train", algo, *argv, "--output-dir", out])
    return cli.train(args)


def tiny():
    from fastrlhf.algos import build_char_tokenizer, tiny_causal_lm

    tok = build_char_tokenizer()
    return tiny_causal_lm(len(tok), tokenizer=tok, hidden_size=32, num_layers=2, seed=0, device="cpu"), tok


# RFT's case: min_reward=1 keeps 3 of the 4 prompts' best completions, so the ranks keep 1 and 2
RFT_REWARDS = {"1+1=": [1.0, 0.0], "2+2=": [0.0, 1.0], "3+3=": [0.0, 0.5], "4+4=": [1.0, 0.0]}


KINDS = ("ddp", "fsdp2") + (("deepspeed",) if HAS_DEEPSPEED else ())


def build(algo: str, kind: str, *, micro_batch_size: int = 8, grad_accum: int = 1, out: str = ""):
    """A tiny trainer of ``algo`` (one of NORM_ALGOS) on NORM_PROMPTS, 2 completions each."""
    from fastrlhf.algos import GRPO, PPO, RFT, GRPOConfig, PPOConfig, RFTConfig

    model, tok = tiny()
    rows = [{"prompt": p} for p in NORM_PROMPTS]
    common = dict(prompts_per_step=4, micro_batch_size=micro_batch_size, gradient_accumulation_steps=grad_accum,
                  lr=1e-3, progress=False, distributed=kind,
                  deepspeed_config=engine_args(kind, out)[-1] if kind == "deepspeed" else None)
    reward = lambda prompts, completions, **_: [0.0] * len(prompts)  # noqa: E731  (the rollout is fixed)
    if algo == "grpo":
        return GRPO(model, tok, rows, reward, GRPOConfig(group_size=2, num_inner_epochs=1, beta=0.04, **common))
    if algo == "grpo-drgrpo":  # a loss divided by the padded completion width: the ranks' widths differ
        return GRPO(model, tok, rows, reward, GRPOConfig(group_size=2, num_inner_epochs=1, beta=0.0,
                                                         loss_agg="seq-mean-token-sum-norm", scale_rewards="none",
                                                         **common))
    if algo == "grpo-reinforce++":  # advantages whitened over the whole rollout, with a KL reward
        return GRPO(model, tok, rows, reward, GRPOConfig(group_size=2, num_inner_epochs=1, beta=0.0,
                                                         advantage_estimator="reinforce++", reward_kl_coef=0.05,
                                                         **common))
    if algo in ("ppo", "ppo-seq"):  # actor + critic; a sequence-mean policy loss next to the token-mean value loss
        return PPO(model, tok, rows, reward, PPOConfig(
            samples_per_prompt=2, ppo_epochs=1, kl_coef=0.05, vf_coef=0.5, entropy_coef=0.01,
            loss_agg="seq-mean-token-mean" if algo == "ppo-seq" else "token-mean", **common))
    return RFT(model, tok, rows, reward, RFTConfig(samples_per_prompt=2, sft_epochs=1, min_reward=1.0, **common))


def fix_rollout(t, algo: str):
    """Replace ``t``'s sampling by NORM_COMPLETIONS with fixed rewards."""
    from fastrlhf.algos.batching import encode_completion, encode_prompt, pack_sequences

    def fixed_rollout(rows, k, **_):
        prompts = [encode_prompt(t.tokenizer, r["prompt"]) for r in rows for _ in range(k)]
        comps = [encode_completion(t.tokenizer, c) for r in rows for c in NORM_COMPLETIONS[r["prompt"]]]
        if algo == "rft":
            rewards = torch.tensor([x for r in rows for x in RFT_REWARDS[r["prompt"]]])
        else:
            rewards = torch.tensor([1.0, 0.0] * len(rows))
        return pack_sequences(prompts, comps, t.pad_id, t.device), rewards, comps

    t.sample_and_score = fixed_rollout


def normaliser_grads(kind: str, algo: str = "grpo", kept=None, out: str = ""):
    """One update on a fixed rollout; the full gradients (before the optimizer step) by name.

    RFT: appends to ``kept`` the number of rows this rank kept (before they are dealt out)."""
    t = build(algo, kind, out=out)
    fix_rollout(t, algo)
    if algo == "rft" and kind != "none":
        deal_out = t._deal_out
        t._deal_out = lambda batch, rows: kept.append(len(rows)) or deal_out(batch, rows)
    grads = {}

    def capture():
        for name, m in t.trainable_modules().items():
            for n, p in m.named_parameters():
                if kind == "deepspeed":  # ZeRO-3 keeps gradients in its partitions
                    from deepspeed.utils import safe_get_full_grad

                    g = safe_get_full_grad(p)
                elif p.grad is None:
                    continue
                else:
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                if g is not None:
                    grads[f"{name}.{n}"] = g.detach().clone()
        return type(t).optimizer_step(t)

    t.optimizer_step = capture
    if t.optimizer is None:  # DeepSpeed built it with the engine
        t.optimizer = t.build_optimizer()
    t.train_step(t.engine.shard(t.rows_for_step(0)) if t.engine.world > 1 else t.rows_for_step(0))
    return grads


def ddp_no_sync_case():
    """PPO under DDP with 2 micro-batches per update: the buckets all-reduced in each update, the weights' digest."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    t = build("ppo", "ddp", micro_batch_size=4, grad_accum=2)
    fix_rollout(t, "ppo")
    updates, seen = [], []

    def hook(state, bucket):
        seen.append(bucket.index())
        return allreduce_hook(state, bucket)

    t.roots[id(t.model)].register_comm_hook(None, hook)

    def record():
        updates.append(list(seen))
        seen.clear()
        return type(t).optimizer_step(t)

    t.optimizer_step = record
    t.optimizer = t.build_optimizer()
    t.train_step(t.engine.shard(t.rows_for_step(0)))
    digest = [float(p.detach().double().sum()) for m in t.trainable_modules().values() for p in m.parameters()]
    return {"updates": updates, "digest": digest}


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
        for kind in KINDS:
            res["run"] = f"{algo}-{kind}"
            cli_run(os.path.join(out, res["run"]), algo, *CLI_COMMON, *engine_args(kind, out))
    res["run"] = "dpo-fsdp2-offload"  # FSDP2's CPUOffloadPolicy
    cli_run(os.path.join(out, res["run"]), "dpo", *CLI_COMMON, "--distributed", "fsdp2", "--cpu-offload")
    if HAS_DEEPSPEED:  # ZeRO-Offload of the optimizer state, with the trainer's own optimizer
        res["run"] = "dpo-deepspeed-offload"
        path = os.path.join(out, "ds_offload.json")
        with open(path, "w") as f:
            json.dump({"zero_optimization": {**DS_CONFIG["zero_optimization"], "offload_optimizer": {"device": "cpu"}}},
                      f)
        cli_run(os.path.join(out, res["run"]), "dpo", *CLI_COMMON, "--distributed", "deepspeed",
                "--deepspeed-config", path)
    for algo in ("dpo", "rm"):  # LoRA: the adapters (dpo) and the merged export (rm) from sharded states
        for kind in KINDS[1:]:
            res["run"] = f"{algo}-lora-{kind}"
            cli_run(os.path.join(out, res["run"]), algo, *CLI_COMMON, *LORA, *engine_args(kind, out))
    # PPO (actor + critic in one root) through the CLI: its final/ is the policy alone
    cli_run(os.path.join(out, "ppo-fsdp2"), "ppo", *PPO_ARGS, "--distributed", "fsdp2")

    # 2. FSDP2 checkpoint + --resume against an uninterrupted run (GRPO: sampling RNG included).
    cli_run(os.path.join(out, "grpo-full"), "grpo", *GRPO_ARGS, "--steps", "4", "--distributed", "fsdp2")
    cli_run(os.path.join(out, "grpo-resumed"), "grpo", *GRPO_ARGS, "--steps", "2", "--distributed", "fsdp2")
    from fastrlhf import cli

    cli.train(cli.build_parser().parse_args(["train", "grpo", "--resume", os.path.join(out, "grpo-resumed"),
                                             "--steps", "4", "--no-progress"]))
    if HAS_DEEPSPEED:  # the same with DeepSpeed's own checkpoints
        ds = engine_args("deepspeed", out)
        cli_run(os.path.join(out, "grpo-full-deepspeed"), "grpo", *GRPO_ARGS, "--steps", "4", *ds)
        cli_run(os.path.join(out, "grpo-resumed-deepspeed"), "grpo", *GRPO_ARGS, "--steps", "2", *ds)
        cli.train(cli.build_parser().parse_args(["train", "grpo", "--resume",
                                                 os.path.join(out, "grpo-resumed-deepspeed"), "--steps", "4",
                                                 "--no-progress"]))

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

    # 4. The loss normalisers over ranks, on both engines (PPO: actor + critic; RFT: uneven kept rows);
    # 5. the fused-linear op on a sharded lm_head; 6. DDP's no_sync over an update's micro-batches.
    res["rft_kept"] = []
    for algo in NORM_ALGOS:
        for kind in KINDS:
            grads = normaliser_grads(kind, algo, res["rft_kept"], out)
            if rank == 0:
                torch.save(grads, os.path.join(out, f"grads-{algo}-{kind}.pt"))
    res["no_sync"] = ddp_no_sync_case()
    res["linear"] = linear_op_case(rank)
    res.pop("run")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
