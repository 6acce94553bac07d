"""Command line: ``fastrlhf train {dpo,grpo,ppo,rm,rrhf,rft}`` (the main job) and ``fastrlhf bench ...``.

With no ``--model``, ``train`` runs an embedded default that needs no download: a tiny Llama
built from a config, a character-level tokenizer, a short supervised warm-up on small-integer
addition ("12+7=" -> "19"), then the chosen algorithm with an exactly checkable reward.
``--model PATH`` takes any local Hugging Face checkpoint and ``--dataset FILE`` a local JSONL
in TRL's formats. At the end it prints a summary (start -> end reward) and writes
``curves.png`` (reward and loss) next to ``metrics.jsonl`` in ``--output-dir``.

The classic pipeline: ``fastrlhf train rm`` writes a reward model to ``<out>/final`` (a
sequence-classification checkpoint), and ``fastrlhf train ppo --reward-model <out>/final``
optimizes the policy against it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from .cli_config import (
    TensorboardWriter,
    add_algo_arguments,
    apply_config_file,
    config_values,
    dataset_file,
    option,
    resolve_pretrained,
)

ALGOS = ("dpo", "grpo", "ppo", "rm", "rrhf", "rft")

# Embedded default: hyper-parameters tuned so each algorithm shows a clear reward gain within
# a few minutes on 2 CPU cores. The supervised warm-up is deliberately short: it leaves the
# model right on part of the problems, so there is signal for RL to sharpen and room to gain.
TASK_MAX_OPERAND = 10
TASK_DPO_PAIRS_PER_PROBLEM = 4
TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "grpo": dict(steps=300, lr=1e-3, lr_warmup_steps=10, prompts_per_step=16, group_size=8, max_new_tokens=4,
                 micro_batch_size=32, gradient_accumulation_steps=4, beta=0.04, warmup_steps=200),
    "ppo": dict(steps=300, lr=1e-3, lr_warmup_steps=10, prompts_per_step=64, max_new_tokens=4, micro_batch_size=32,
                gradient_accumulation_steps=1, ppo_epochs=2, kl_coef=0.05, warmup_steps=200),
    "dpo": dict(steps=150, lr=1e-4, micro_batch_size=32, gradient_accumulation_steps=1, beta=0.1, warmup_steps=150),
    "rm": dict(steps=150, lr=3e-4, micro_batch_size=16, gradient_accumulation_steps=1, warmup_steps=200),
    "rrhf": dict(steps=200, lr=3e-4, lr_warmup_steps=10, prompts_per_step=16, samples_per_prompt=4, max_new_tokens=4,
                 micro_batch_size=64, gradient_accumulation_steps=1, warmup_steps=200),
    "rft": dict(steps=200, lr=1e-3, lr_warmup_steps=10, prompts_per_step=16, samples_per_prompt=8, max_new_tokens=4,
                micro_batch_size=16, gradient_accumulation_steps=1, warmup_steps=200),
}
# The embedded reward model ranks the right sum above this many of the 18 wrong sums per training
# prompt; the other wrong sums are held out to measure how it generalizes to unseen responses.
TASK_RM_WRONG_PER_PROMPT = 9
ANSWER_COLUMNS = ("answer", "solution", "ground_truth")
ALGO_HELP = {"dpo": "Direct Preference Optimization on preference pairs",
             "grpo": "Group Relative Policy Optimization (online, reward functions)",
             "ppo": "PPO with a critic (or critic-free estimators), reward functions or a reward model",
             "rm": "a Bradley-Terry reward model (sequence-classification checkpoint)",
             "rrhf": "RRHF ranking loss + SFT on the best of k samples",
             "rft": "best-of-n rejection-sampling fine-tuning"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrlhf", description="fastrlhf: RLHF training with fused kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with DPO, GRPO, PPO, a reward model (rm), RRHF or best-of-n RFT "
                                     "(no --model: the embedded arithmetic job)",
                       description="`fastrlhf train <algo> --help` lists that algorithm's options: one flag per "
                                   "field of its config dataclass, plus the run's model, data and rewards.")
    algos = t.add_subparsers(dest="algo", required=True, metavar="{" + ",".join(ALGOS) + "}")
    for algo in ALGOS:
        add_algo_arguments(algos.add_parser(algo, help=ALGO_HELP[algo]), algo)
    sub.add_parser("bench", help="benchmarks (fastrlhf.bench; arguments are passed through)", add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .algos.engine import shutdown

        try:
            train(args)
        finally:
            shutdown()
    return 0


def run_bench(argv: List[str]) -> int:
    from fastrlhf import bench

    return int(bench.main(argv) or 0)


# ----------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------


def answer_match_reward(prompts, completions, **columns) -> List[float]:
    """1.0 when the completion equals the row's answer column (answer / solution / ground_truth)."""
    for key in ANSWER_COLUMNS:
        if key in columns:
            return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, columns[key])]
    raise ValueError(f"the dataset has none of the answer columns {ANSWER_COLUMNS}; pass --reward-fn")


def _restore_args(args: argparse.Namespace) -> argparse.Namespace:
    """``--resume DIR``: the run's saved arguments, with ``--steps`` (to extend a run) taken from the command."""
    path = os.path.join(args.resume, "args.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume {args.resume!r}: no args.json there (not a fastrlhf run directory)")
    with open(path) as f:
        saved = json.load(f)
    if saved["algo"] != args.algo:
        raise ValueError(f"--resume {args.resume!r} is a {saved['algo']} run, not {args.algo}")
    steps, resume, progress = args.steps, args.resume, getattr(args, "progress", None)
    ns = argparse.Namespace(**saved)
    if "no_progress" in saved:  # args.json of a run started before the generated flags
        ns.progress = None if not saved["no_progress"] else False
        ns.fused_linear = False if saved.get("no_fused_linear") else None
    ns.resume, ns.output_dir, ns.progress, ns.overwrite, ns.config = resume, resume, progress, False, None
    if steps is not None:
        ns.steps = steps
    return ns


def _absolute_paths(args: argparse.Namespace) -> None:
    """Local paths in ``args`` made absolute, hub ids resolved to their cached snapshot (``file.py:fn`` too)."""
    for key in ("output_dir", "resume", "deepspeed_config"):
        if getattr(args, key, None):
            setattr(args, key, os.path.abspath(getattr(args, key)))
    for key, kind in (("model", "model"), ("reward_model", "model"), ("dataset", "dataset"),
                      ("eval_dataset", "dataset")):
        if getattr(args, key, None):
            setattr(args, key, resolve_pretrained(getattr(args, key), "--" + key.replace("_", "-"), kind))
    fns = getattr(args, "reward_fn", None) or []
    args.reward_fn = [fns] if isinstance(fns, str) else list(fns)  # args.json of older runs holds one string
    for i, fn in enumerate(args.reward_fn):
        if ":" in fn and os.path.exists(fn.rsplit(":", 1)[0]):
            path, name = fn.rsplit(":", 1)
            args.reward_fn[i] = f"{os.path.abspath(path)}:{name}"


def _config(args, cls, embedded: bool):
    """The algorithm's config: dataclass defaults < the embedded task's < ``--config`` YAML < command line."""
    values = config_values(args, cls, dict(TASK_DEFAULTS[args.algo]) if embedded else {})
    return cls(**values, output_dir=args.output_dir)


def _model_and_tokenizer(args, embedded: bool, warmup_rows, device: str, load_device: Optional[str] = None):
    """Load ``--model`` (onto ``load_device``, default ``device``); or build (and warm up) the embedded tiny
    model, saved to ``<out>/init`` for resumes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .algos.models import attn_implementation, load_causal_lm
    from .algos.task import tiny_causal_lm
    from .algos.tokenizer import build_char_tokenizer
    from .algos.trainer import seed_everything, supervised_finetune

    if not embedded:
        return load_causal_lm(args.model, load_device or device, compute_device=device)
    from .algos import engine

    init = os.path.join(args.output_dir, "init")
    model = None
    if engine.is_main() and not (args.resume and os.path.isdir(init)):  # rank 0 builds and warms up the model
        seed_everything(option(args, "seed"))
        tok = build_char_tokenizer()
        model = tiny_causal_lm(len(tok), tokenizer=tok, seed=option(args, "seed"), device=device)
        warmup = args.warmup_steps if args.warmup_steps is not None else TASK_DEFAULTS[args.algo]["warmup_steps"]
        if warmup_rows and warmup > 0:
            t0 = time.perf_counter()
            losses = supervised_finetune(model, tok, warmup_rows, steps=warmup, seed=option(args, "seed"),
                                         fused_linear=option(args, "fused_linear", True),
                                         progress=option(args, "progress", True))
            print(f"supervised warm-up: {warmup} steps, NLL {losses[0]:.3f} -> {losses[-1]:.3f} "
                  f"({time.perf_counter() - t0:.1f} s)")
        model.save_pretrained(init)
        tok.save_pretrained(init)
    engine.barrier()  # the other ranks (and a resumed run) load the same warmed-up model from init/
    if model is None:
        tok = AutoTokenizer.from_pretrained(init, local_files_only=True)
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(
            init, local_files_only=True, attn_implementation=attn_implementation(device)
        ).to(device)
    return model, tok


def _warmup_rows(algo: str, rows) -> List[Dict[str, str]]:
    """Supervised pairs for warming up the embedded model on a user dataset (chosen / answer completions)."""
    out = []
    for r in rows:
        if not isinstance(r.get("prompt"), str):
            continue
        if algo in ("dpo", "rm") and isinstance(r.get("chosen"), str):
            out.append({"prompt": r["prompt"], "completion": r["chosen"]})
        else:
            for key in ANSWER_COLUMNS:
                if key in r:
                    out.append({"prompt": r["prompt"], "completion": str(r[key])})
                    break
    return out


def task_ranking_rows(task, *, wrong_per_prompt: int = TASK_RM_WRONG_PER_PROMPT, held_out: bool = False,
                      seed: int = 0) -> List[Dict[str, Any]]:
    """Reward-model data for the embedded task's training prompts: the right sum ranked above wrong sums.

    Each prompt gets a seeded shuffle of the wrong sums in ``[0, max sum]``; the first
    ``wrong_per_prompt`` (at most all but one of them, so that every prompt keeps a held-out
    wrong sum however small the task) form the ranking ``{"prompt", "responses": [right,
    wrong...], "scores": [1, 0, ...]}``. ``held_out=True`` instead gives ``{"prompt", "chosen",
    "rejected"}`` pairs of the right sum against the *other* wrong sums: responses the reward
    model never saw.
    """
    problems = task.train_problems + task.eval_problems
    top = max(a + b for a, b in problems)
    rng = random.Random(seed + 2)
    rows: List[Dict[str, Any]] = []
    for r in task.prompt_rows("train"):
        ans = int(r["answer"])
        wrong = [w for w in range(top + 1) if w != ans]
        rng.shuffle(wrong)
        k = min(wrong_per_prompt, len(wrong) - 1)
        if held_out:
            rows += [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(w)} for w in wrong[k:]]
        else:
            rows.append({"prompt": r["prompt"], "responses": [r["answer"]] + [str(w) for w in wrong[:k]],
                         "scores": [1.0] + [0.0] * k})
    return rows


def _is_sequence_classifier(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return any(a.endswith("ForSequenceClassification") for a in json.load(f).get("architectures") or [])
    except (OSError, ValueError):
        return False


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one training job from parsed ``train`` arguments; returns the summary dict."""
    import torch

    from .algos import (
        DPO,
        GRPO,
        PPO,
        RFT,
        RRHF,
        DPOConfig,
        GRPOConfig,
        PPOConfig,
        RewardModel,
        RewardModelConfig,
        RFTConfig,
        RRHFConfig,
        engine,
    )
    from .algos.data import load_jsonl
    from .algos.rewards import WeightedRewards, load_reward_fn, reward_model_fn
    from .algos.task import ArithmeticTask, greedy_accuracy

    if args.resume:
        args = _restore_args(args)
    else:
        apply_config_file(args)  # under the command line; a resumed run has its options in args.json
    device = str(engine.local_device(args.device))
    kind = engine.init_distributed(args.distributed, torch.device(device))  # every rank, before any file is touched
    # FSDP2 on GPUs: a checkpoint loads into host memory and only this rank's shards reach its GPU
    # (fully_shard moves them), never the whole model (fastrlhf.algos.engine, 3)
    load_device = "cpu" if kind == "fsdp2" and device.startswith("cuda") else device
    if args.output_dir is None:  # rank 0's timestamp names the run on every rank
        args.output_dir = engine.broadcast_object(
            os.path.join("runs", f"{args.algo}-{time.strftime('%Y%m%d-%H%M%S')}"))
    _absolute_paths(args)  # so that --resume works from any working directory
    held = not args.resume and os.path.exists(os.path.join(args.output_dir, "args.json"))
    if held and not args.overwrite:
        raise SystemExit(f"{args.output_dir} already holds a run: pass --resume {args.output_dir} to continue "
                         "it, or --overwrite to start over")
    engine.barrier()  # every rank has looked before rank 0 replaces anything
    if engine.is_main():  # rank 0 alone writes the run directory
        if held:
            shutil.rmtree(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
        if not args.resume:
            with open(os.path.join(args.output_dir, "args.json"), "w") as f:
                json.dump({**vars(args), "resume": None}, f, indent=1)
    engine.barrier()
    tensorboard = None
    if getattr(args, "report_to", None) == "tensorboard" and engine.is_main():
        tensorboard = TensorboardWriter(os.path.join(args.output_dir, "tensorboard"))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bars would drown the summary
    embedded = args.model is None
    args.seed = option(args, "seed")
    task = ArithmeticTask(max_operand=option(args, "task_max_operand"), seed=args.seed) if not args.dataset else None

    # Data, and the supervised warm-up rows for the embedded model.
    if task is not None:
        if args.algo == "dpo":
            rows = task.preference_rows("train", pairs_per_problem=TASK_DPO_PAIRS_PER_PROBLEM)
        elif args.algo == "rm":
            rows = task_ranking_rows(task, seed=args.seed)
        else:
            rows = task.prompt_rows("train")
        warmup_rows = task.sft_rows()
    else:
        rows = load_jsonl(dataset_file(args.dataset, "--dataset"))
        warmup_rows = _warmup_rows(args.algo, rows)
    if args.algo == "rm" and not embedded and _is_sequence_classifier(args.model):  # continue a reward model
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(args.model, local_files_only=True).to(load_device)
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:  # a causal LM (RewardModel puts the scalar head on it)
        model, tokenizer = _model_and_tokenizer(args, embedded, warmup_rows, device, load_device)

    # Reward (grpo/ppo/rrhf/rft).
    reward_fn, reward_kw = None, {}
    if args.algo not in ("dpo", "rm"):
        weights = getattr(args, "reward_weights", None) or []
        if weights and not args.reward_fn:
            raise SystemExit("--reward-weights needs --reward-fn (one weight per function)")
        if len(args.reward_fn) == 1 and not weights:
            reward_fn = load_reward_fn(args.reward_fn[0])
        elif args.reward_fn:
            if len(weights) not in (0, len(args.reward_fn)):
                raise SystemExit(f"{len(args.reward_fn)} --reward-fn but {len(weights)} --reward-weights")
            reward_fn = WeightedRewards([load_reward_fn(spec) for spec in args.reward_fn], weights)
        elif args.reward_model:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            rm = AutoModelForSequenceClassification.from_pretrained(args.reward_model, local_files_only=True).to(device)
            rm_tok = AutoTokenizer.from_pretrained(args.reward_model, local_files_only=True)
            if rm_tok.pad_token_id is None:
                rm_tok.pad_token = rm_tok.eos_token
            rm.config.pad_token_id = rm_tok.pad_token_id
            if args.algo == "ppo":
                reward_kw = dict(reward_model=rm, reward_tokenizer=rm_tok)
            else:
                reward_fn = reward_model_fn(rm, rm_tok)
        elif task is not None:
            reward_fn = task.reward
        else:
            if not any(k in rows[0] for k in ANSWER_COLUMNS):
                raise SystemExit(f"--dataset rows have none of {ANSWER_COLUMNS}: pass --reward-fn or --reward-model")
            reward_fn = answer_match_reward

    cfg_cls = {"dpo": DPOConfig, "grpo": GRPOConfig, "ppo": PPOConfig, "rm": RewardModelConfig, "rrhf": RRHFConfig,
               "rft": RFTConfig}[args.algo]
    config = _config(args, cfg_cls, embedded and task is not None)
    if args.algo == "dpo":
        trainer = DPO(model, tokenizer, rows, config)
    elif args.algo == "rm":
        trainer = RewardModel(model, tokenizer, rows, config)
    elif args.algo == "ppo":
        trainer = PPO(model, tokenizer, rows, reward_fn, config, **reward_kw)
    else:
        trainer = {"grpo": GRPO, "rrhf": RRHF, "rft": RFT}[args.algo](model, tokenizer, rows, reward_fn, config)

    eval_rows = None
    if getattr(args, "eval_dataset", None):
        eval_rows = load_jsonl(dataset_file(args.eval_dataset, "--eval-dataset", split="test"))

    def greedy(split_rows) -> float:  # through the engine's root forward (FSDP2: gathered weights)
        with torch.no_grad():
            return trainer.call(trainer.model, lambda m, t, r: greedy_accuracy(
                m, t, r, max_new_tokens=getattr(config, "max_new_tokens", 4)), tokenizer, split_rows)

    def eval_split() -> Dict[str, float]:
        """The task's metric on the eval split: --eval-dataset, else the embedded task's held-out problems."""
        if eval_rows is not None:
            return eval_metrics(args.algo, trainer, eval_rows, greedy)
        if task is None:
            return {}
        if args.algo == "rm":
            return {"eval_pair_accuracy_unseen_prompts": trainer.evaluate(
                task.preference_rows("eval", pairs_per_problem=TASK_DPO_PAIRS_PER_PROBLEM))["accuracy"]}
        out = {"eval_accuracy": greedy(task.prompt_rows("eval"))}
        if args.algo == "dpo":
            out["eval_reward_accuracy"] = trainer.evaluate(task.preference_rows("eval"))["reward_accuracy"]
        return out

    def evaluate() -> Dict[str, float]:
        out = {}
        if task is not None and args.algo == "rm":  # held-out pair accuracy of the reward model
            out["eval_pair_accuracy_unseen_responses"] = trainer.evaluate(
                task_ranking_rows(task, seed=args.seed, held_out=True))["accuracy"]
        elif task is not None:
            out["train_accuracy"] = greedy(task.prompt_rows("train"))
        return {**out, **eval_split()}

    eval_every = option(args, "eval_every", 0)
    if eval_every and eval_rows is None and task is None:
        raise SystemExit("--eval-every needs --eval-dataset (the run has no held-out split)")
    step_log = trainer.log

    def log(record: Dict[str, Any]) -> None:
        """The step loop's one logging call, extended: reward components, periodic eval, tensorboard."""
        if isinstance(reward_fn, WeightedRewards):
            record.update(reward_fn.pop_means())
        if eval_every and record["step"] % eval_every == 0:
            record.update(eval_split())
        step_log(record)
        if tensorboard is not None:
            tensorboard.write(record)

    trainer.log = log  # an instance attribute: trainer.py stays as it is for library users

    if args.resume:
        trainer.load_checkpoint(args.output_dir)
        engine.main_print(f"resumed {args.output_dir} at step {trainer.step}")
    before = evaluate() if trainer.step == 0 else {}
    t0 = time.perf_counter()
    start_step = trainer.step
    history = trainer.train()
    elapsed = time.perf_counter() - t0
    trainer.save_checkpoint()
    after = evaluate()
    final = os.path.join(args.output_dir, "final")
    trainer.save_pretrained(final)  # rm: a sequence-classification checkpoint, LoRA merged
    if not engine.is_main():
        return {}

    summary = summarize(args.algo, history, before, after, elapsed, trainer.step - start_step, config)
    summary.update(output_dir=args.output_dir, final_model=final, engine=trainer.engine.kind,
                   processes=trainer.engine.world)
    if tensorboard is not None:
        tensorboard.close()
    if not args.no_plot and history:
        summary["curves"] = plot_curves(args.algo, history, os.path.join(args.output_dir, "curves.png"))
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary))
    return summary


def eval_metrics(algo: str, trainer, rows, greedy) -> Dict[str, float]:
    """``--eval-dataset`` rows scored with the task's metric: reward / pair accuracy for preference rows
    (dpo, rm), greedy exact-match accuracy for prompt rows with an answer column."""
    first = rows[0]
    if algo == "rm" and ("chosen" in first or "responses" in first):
        return {"eval_pair_accuracy": trainer.evaluate(rows)["accuracy"]}
    if algo == "dpo" and "chosen" in first:
        return {"eval_reward_accuracy": trainer.evaluate(rows)["reward_accuracy"]}
    key = next((k for k in ANSWER_COLUMNS if k in first), None)
    if key is None or not isinstance(first.get("prompt"), str):
        raise SystemExit(f"--eval-dataset: {algo} evaluates prompt rows with one of {ANSWER_COLUMNS}"
                         + (" or preference pairs" if algo in ("dpo", "rm") else ""))
    return {"eval_accuracy": greedy([{"prompt": r["prompt"], "answer": str(r[key])} for r in rows])}


def _window_mean(history, key: str, first: bool) -> Optional[float]:
    """Mean of ``key`` over the first ``min(10, n/10)`` steps (the start) or the last ``n/10`` (the end)."""
    vals = [h[key] for h in history if key in h]
    if not vals:
        return None
    k = max(1, len(vals) // 10)
    part = vals[: min(k, 10)] if first else vals[-k:]
    return sum(part) / len(part)


def reward_key(algo: str) -> str:
    return {"dpo": "reward_accuracy", "rm": "accuracy"}.get(algo, "reward")


def summarize(algo, history, before, after, elapsed, steps_run, config) -> Dict[str, Any]:
    """Start -> end figures: means over the first steps and the last tenth, and the evals before / after."""
    s: Dict[str, Any] = {"algo": algo, "steps": len(history), "steps_this_run": steps_run,
                         "train_time_s": round(elapsed, 1), "fused_linear": config.fused_linear}
    keys = [reward_key(algo), "best_reward", "loss", "kl", "entropy", "clipfrac", "reward_margin", "tokens_per_s"]
    for key in keys:
        a, b = _window_mean(history, key, True), _window_mean(history, key, False)
        if a is not None:
            s[key] = [round(a, 4), round(b, 4)]
    if history:
        s["peak_mem_mb"] = round(max(h["peak_mem_mb"] for h in history), 1)
    for key in set(before) | set(after):
        s[key] = [before.get(key), after.get(key)]
    return s


def format_summary(s: Dict[str, Any]) -> str:
    lines = [f"fastrlhf train {s['algo']}: {s['steps']} steps ({s['steps_this_run']} this run) in "
             f"{s['train_time_s']} s, fused_linear={s['fused_linear']}"]
    names = {"reward": "train reward (first steps -> last 10% of steps)",
             "reward_accuracy": "train reward accuracy (first steps -> last 10%)",
             "accuracy": "train pair accuracy (first steps -> last 10%)",
             "best_reward": "best-of-group reward (first steps -> last 10%)",
             "reward_margin": "train reward margin", "loss": "loss", "kl": "KL to reference",
             "entropy": "entropy", "clipfrac": "clip fraction", "tokens_per_s": "tokens/s",
             "train_accuracy": "greedy accuracy on the training prompts (before -> after)",
             "eval_accuracy": "greedy accuracy on held-out prompts (before -> after)",
             "eval_reward_accuracy": "held-out reward accuracy (before -> after)",
             "eval_pair_accuracy_unseen_responses": "pair accuracy, unseen wrong answers (before -> after)",
             "eval_pair_accuracy_unseen_prompts": "pair accuracy, held-out problems (before -> after)"}
    for key, label in names.items():
        if key in s:
            a, b = s[key]
            fa = "-" if a is None else f"{a:.4g}"
            fb = "-" if b is None else f"{b:.4g}"
            lines.append(f"  {label}: {fa} -> {fb}")
    if "peak_mem_mb" in s:
        lines.append(f"  peak memory: {s['peak_mem_mb']} MB")
    lines.append(f"  output: {s['output_dir']} (metrics.jsonl, summary.json, final/)"
                 + (f"; curves: {s['curves']}" if s.get("curves") else ""))
    if s["algo"] == "rm":
        lines.append(f"  reward model for PPO: fastrlhf train ppo --reward-model {s['final_model']}")
    return "\n".join(lines)


def plot_curves(algo: str, history, path: str) -> Optional[str]:
    """Reward and loss against step (raw and a moving average) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)", file=sys.stderr)
        return None
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, (reward_key(algo), "loss")):
        ys = [h.get(key, float("nan")) for h in history]
        ax.plot(steps, ys, alpha=0.35, lw=1, label=key)
        w = max(1, len(ys) // 20)
        if w > 1:
            smooth = [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]
            ax.plot(steps, smooth, lw=2, label=f"{key} (moving mean, {w})")
        ax.set_xlabel("step")
        ax.set_title(f"{algo}: {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
