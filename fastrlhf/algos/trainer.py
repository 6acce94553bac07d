"""The Trainer base every algorithm extends: config, data order, rollouts, the one update loop, checkpoints.

Implementation choices (and where they come from):

1. The reference model is a frozen ``eval()`` deep copy of the initial policy (TRL); with
   LoRA it is the same model with its adapters disabled (TRL's ``peft`` path).
2. One update loop for every algorithm (:meth:`Trainer.run_updates`): ``epochs`` passes
   over the step's units (sequences, preference pairs, rankings, prompt groups), reshuffled
   each pass, split into micro-batches of ``micro_batch_size`` units; an optimizer step every
   ``gradient_accumulation_steps`` micro-batches and at the end of a pass. Each micro-batch's
   loss is divided by ``update_units / micro_units``: its share of the update (TRL / HF
   Trainer's "loss divided by the number of micro-batches" when they are all full).
3. AdamW, global-norm gradient clipping (CleanRL detail 11, "global gradient clipping"),
   optional linear lr warm-up (verl's ``lr_warmup_steps``); the lr is a pure function of the step.
4. bf16 autocast on CUDA with fp32 master weights (verl's FSDP mixed precision).
5. The batch of step ``s`` is a pure function of ``(seed, s)`` (a seeded permutation per epoch),
   and checkpoints store the optimizer and every RNG state, so a resumed run continues exactly
   where it stopped.
6. Per-step metrics go to ``metrics.jsonl`` (one JSON object per line); tokens/s counts the
   non-pad tokens of the step's sequences over its wall time; peak memory is
   ``torch.cuda.max_memory_allocated`` on GPU and the process's peak RSS on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from fastrlhf._memory import peak_rss_bytes

from .batching import SequenceBatch, cut_at_eos, encode_completion, encode_prompt, micro_batches, pack_sequences
from .data import prompt_text
from .models import apply_lora, check_fusable, forward_hidden, freeze, head_op, output_head
from .rewards import RewardFn, call_reward_fn

LossFn = Callable[[torch.Tensor], Tuple[torch.Tensor, Mapping[str, Any]]]


@dataclass
class TrainConfig:
    """Fields every algorithm has; each algorithm's config extends this one."""

    steps: int = 100
    """Optimizer steps (DPO) or rollout steps (GRPO, PPO) to train for."""
    lr: float = 1e-4
    """AdamW learning rate (constant after the warm-up)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up from lr / lr_warmup_steps over this many steps (0: constant lr)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: tuple = (0.9, 0.999)
    """AdamW betas."""
    micro_batch_size: int = 8
    """Sequences (DPO: pairs) per forward/backward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients are summed before one optimizer update."""
    max_grad_norm: Optional[float] = 1.0
    """Global gradient-norm clip (None: no clipping)."""
    seed: int = 0
    """Seeds the data order, sampling and initialisation of added heads."""
    fused_linear: bool = True
    """Use the fused-linear ops (hidden + lm_head weight); False: logits ops on materialized logits."""
    bf16: bool = True
    """bf16 autocast when the model is on CUDA (ignored on CPU)."""
    output_dir: Optional[str] = None
    """Where metrics.jsonl and checkpoints go (None: nothing is written)."""
    save_every: int = 0
    """Save a checkpoint every this many steps (0: only when asked)."""
    save_total_limit: Optional[int] = 2
    """Keep only this many newest checkpoint-<step> directories in output_dir (None: keep all)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    lora_r: int = 0
    """LoRA rank through peft (0: full fine-tuning)."""
    lora_alpha: int = 16
    """LoRA alpha (scaling = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: Any = "all-linear"
    """peft target_modules ("all-linear" or a list of module names)."""


@dataclass
class RolloutConfig(TrainConfig):
    """Fields of the algorithms that sample from the policy every step (GRPO, PPO, RRHF, RFT)."""

    prompts_per_step: int = 16
    """Prompts sampled per step."""
    max_new_tokens: int = 64
    """Longest completion sampled."""
    temperature: float = 1.0
    """Sampling temperature (GRPO and PPO score their logprobs at the same one; RRHF, RFT at 1)."""


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


def check_rollout_fits_updates(config: RolloutConfig, samples_name: str) -> None:
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


# ----------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------


class Trainer:
    """Owns the policy, its frozen reference, the optimizer, the data order, metrics and checkpoints.

    Subclasses implement :meth:`train_step` (one optimizer step for DPO, one rollout plus its
    updates for GRPO/PPO) with :meth:`run_updates`, and say how many dataset rows a step
    consumes (:attr:`rows_per_step`).
    """

    name = "train"
    needs_reference = True

    def __init__(self, model, tokenizer, config: TrainConfig, dataset: Sequence[Mapping[str, Any]]):
        if config.micro_batch_size < 1 or config.gradient_accumulation_steps < 1:
            raise ValueError("micro_batch_size and gradient_accumulation_steps must be >= 1")
        if not dataset:
            raise ValueError("dataset must contain at least one row")
        self.config = config
        self.tokenizer = tokenizer
        self.dataset = list(dataset)
        self.step = 0
        self.history: List[Dict[str, float]] = []
        if config.fused_linear:
            check_fusable(model)
        self.device = next(model.parameters()).device
        # The reference is the initial policy: copied before any adapter is added.
        self.ref_model = None
        if self.needs_reference and config.lora_r <= 0:
            self.ref_model = freeze(copy.deepcopy(model))
        self.model = apply_lora(model, config)
        self.model.train()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("tokenizer needs a pad_token_id or an eos_token_id")
        self._perm_cache: Dict[int, np.ndarray] = {}
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # -- set-up ---------------------------------------------------------------------------

    def trainable_modules(self) -> Dict[str, torch.nn.Module]:
        """Modules whose trainable parameters are optimized and checkpointed."""
        return {"policy": self.model}

    def build_optimizer(self) -> torch.optim.Optimizer:
        params = [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        c = self.config
        return torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.adam_betas), weight_decay=c.weight_decay)

    def _params(self) -> List[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # -- data -----------------------------------------------------------------------------

    @property
    def rows_per_step(self) -> int:
        raise NotImplementedError

    def rows_for_step(self, step: int) -> List[Mapping[str, Any]]:
        """The dataset rows of ``step``: a seeded permutation per epoch, so a pure function of (seed, step)."""
        n = self.rows_per_step
        rows = []
        for i in range(step * n, (step + 1) * n):
            epoch, j = divmod(i, len(self.dataset))
            if epoch not in self._perm_cache:
                rng = np.random.default_rng([self.config.seed, epoch])
                self._perm_cache = {epoch: rng.permutation(len(self.dataset))}
            rows.append(self.dataset[int(self._perm_cache[epoch][j])])
        return rows

    # -- forward helpers ------------------------------------------------------------------

    def autocast(self):
        if self.device.type == "cuda" and self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def reference(self):
        """Yields the reference model: the frozen copy, or the policy with LoRA adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
        elif self.config.lora_r > 0:
            with self.model.disable_adapter():
                yield self.model
        else:
            raise RuntimeError("this trainer has no reference model")

    def completion_hidden(self, model, batch: SequenceBatch) -> torch.Tensor:
        """Hidden states ``[B, R, H]`` whose next-token predictions score the completion tokens."""
        hidden = forward_hidden(model, batch.input_ids, batch.attention_mask)  # [B, P + R, H]
        P, R = batch.prompt_len, batch.labels.shape[1]
        return hidden[:, P - 1 : P - 1 + R]  # [B, R, H]

    def op(self, name: str, hidden: torch.Tensor, *args, model=None, **kwargs):
        weight, bias = output_head(self.model if model is None else model)
        return head_op(name, hidden, weight, bias, *args, fused=self.config.fused_linear, **kwargs)

    @torch.no_grad()
    def completion_logprobs(self, model, batch: SequenceBatch, temperature: float = 1.0) -> torch.Tensor:
        """Per-token logprobs ``[B, R]`` (0 on padding) of the completions under ``model``, no grad."""
        out = torch.zeros(batch.labels.shape, dtype=torch.float32, device=self.device)
        for sl in micro_batches(len(batch), self.config.micro_batch_size):
            mb = batch.select(sl)
            with self.autocast():
                hidden = self.completion_hidden(model, mb)
                out[sl] = self.op("token_logprobs", hidden, mb.labels, model=model, temperature=temperature)
        return out

    # -- rollouts -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, do_sample: bool = True,
                 ) -> List[List[int]]:
        """``num_samples`` completions per prompt (consecutive), each cut after its first eos."""
        from transformers import GenerationConfig

        batch = pack_sequences(prompt_ids, [[]] * len(prompt_ids), self.pad_id, self.device)
        P = batch.prompt_len
        ids = batch.input_ids[:, :P].repeat_interleave(num_samples, 0)  # [B * G, P]
        attn = batch.attention_mask[:, :P].repeat_interleave(num_samples, 0)
        eos = self.tokenizer.eos_token_id
        gen = GenerationConfig(
            do_sample=do_sample, temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None, max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id, eos_token_id=eos, bos_token_id=self.tokenizer.bos_token_id,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                out = self.model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
        finally:
            self.model.train(was_training)
        return [cut_at_eos(row, eos, self.pad_id) for row in out[:, P:].tolist()]

    def sample_and_score(self, rows: Sequence[Mapping[str, Any]], k: int, *, max_new_tokens: int,
                         temperature: float, reward_fn: Optional[RewardFn], offline: bool = False,
                         ) -> Tuple[SequenceBatch, torch.Tensor, List[List[int]]]:
        """``k`` responses per row and their rewards: the rollout of every online algorithm.

        Responses are sampled from the current policy, or with ``offline=True`` taken from a
        row's ``"responses"`` (RRHF's offline rankings), and scored by ``reward_fn`` (TRL's
        call), or with ``offline=True`` by the row's ``"scores"``. Returns the packed
        ``[B * k]`` batch (the ``k`` responses of a row are consecutive), the ``[B * k]`` fp32
        rewards and the completion token ids.
        """
        tok = self.tokenizer
        prompts = [prompt_text(r, tok) for r in rows]
        prompt_ids = [encode_prompt(tok, p) for p in prompts]
        completions: List[Optional[List[int]]] = [None] * (len(rows) * k)
        texts: List[Optional[str]] = [None] * (len(rows) * k)
        given = [i for i, r in enumerate(rows) if offline and "responses" in r]
        for i in given:
            if len(rows[i]["responses"]) != k:
                raise ValueError(f"row {i} has {len(rows[i]['responses'])} responses; samples_per_prompt is {k}")
            for j, resp in enumerate(rows[i]["responses"]):
                completions[i * k + j] = encode_completion(tok, resp)
                texts[i * k + j] = resp
        to_sample = [i for i in range(len(rows)) if i not in given]
        if to_sample:
            sampled = self.generate([prompt_ids[i] for i in to_sample], num_samples=k,
                                    max_new_tokens=max_new_tokens, temperature=temperature)
            decoded = tok.batch_decode(sampled, skip_special_tokens=True)
            for n, i in enumerate(to_sample):
                for j in range(k):
                    completions[i * k + j] = sampled[n * k + j]
                    texts[i * k + j] = decoded[n * k + j]
        rewards = torch.zeros(len(rows) * k, dtype=torch.float32, device=self.device)
        unscored = []
        for i, r in enumerate(rows):
            if offline and "scores" in r:
                if len(r["scores"]) != k:
                    raise ValueError(f"row {i} has {len(r['scores'])} scores for {k} responses")
                rewards[i * k : (i + 1) * k] = torch.as_tensor([float(s) for s in r["scores"]])
            else:
                unscored += range(i * k, (i + 1) * k)
        if unscored:
            if reward_fn is None:
                raise ValueError("rows without 'scores' need a reward_fn")
            rewards[unscored] = call_reward_fn(
                reward_fn, [prompts[n // k] for n in unscored], [texts[n] for n in unscored],
                [completions[n] for n in unscored], [rows[n // k] for n in unscored], self.device)
        batch = pack_sequences([p for p in prompt_ids for _ in range(k)], completions, self.pad_id, self.device)
        return batch, rewards, completions

    # -- the update loop ------------------------------------------------------------------

    def optimizer_step(self) -> float:
        """Clip, step, zero the gradients; returns the pre-clip global gradient norm."""
        params = self._params()
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])
            )
        # The lr is a pure function of the step (no scheduler state to checkpoint).
        scale = min(1.0, (self.step + 1) / self.config.lr_warmup_steps) if self.config.lr_warmup_steps > 0 else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def run_updates(self, n: int, loss_fn: LossFn, *, epochs: int = 1, shuffle: bool = True,
                    micro_batch_size: Optional[int] = None, units: Optional[Callable[[torch.Tensor], int]] = None,
                    ) -> Dict[str, float]:
        """The one update loop of every trainer; returns the mean of each metric over the micro-batches.

        ``epochs`` passes over ``n`` units (``torch.randperm`` order when ``shuffle``, else in
        order), cut into micro-batches of ``micro_batch_size`` units (default
        ``config.micro_batch_size``); ``loss_fn(idx)`` gets a micro-batch's unit indices
        (``[b]`` int64 on the device) and returns ``(loss, stats)`` with ``loss`` a mean over
        the micro-batch. Every ``gradient_accumulation_steps`` micro-batches, and at the end of
        a pass, one :meth:`optimizer_step`. ``units(idx)`` measures a micro-batch (default:
        its number of units; e.g. its tokens for a token-mean over the update); the loss is
        divided by ``update_units / micro_units`` before ``backward``, so the update's gradient
        is that of the unit-weighted mean of its micro-batches.

        Returned: ``loss`` and every stat averaged over micro-batches (stats named ``num_*``
        are dropped: counts, not means), and ``grad_norm`` (the pre-clip norm of each update,
        weighted by its micro-batches). Empty when ``n == 0`` (no update, no RNG draw).
        """
        mbs = micro_batch_size or self.config.micro_batch_size
        accum = self.config.gradient_accumulation_steps
        sums: Dict[str, float] = {}
        count = 0
        for _ in range(epochs if n > 0 else 0):
            order = torch.randperm(n).to(self.device) if shuffle else torch.arange(n, device=self.device)
            micro = [order[sl] for sl in micro_batches(n, mbs)]
            for u in range(0, len(micro), accum):
                update = micro[u : u + accum]
                sizes = [len(idx) if units is None else units(idx) for idx in update]
                total = sum(sizes)
                for idx, size in zip(update, sizes):
                    loss, stats = loss_fn(idx)
                    (loss / (total / size)).backward()
                    for key, v in {"loss": loss.detach(), **stats}.items():
                        if not key.startswith("num_"):
                            sums[key] = sums.get(key, 0.0) + float(v)
                    count += 1
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + self.optimizer_step() * len(update)
        return {k: v / count for k, v in sums.items()}

    # -- the step loop --------------------------------------------------------------------

    def train_step(self, rows: List[Mapping[str, Any]]) -> Dict[str, float]:
        raise NotImplementedError

    def train(self, steps: Optional[int] = None) -> List[Dict[str, float]]:
        """Train until ``steps`` (default ``config.steps``) steps are done; returns the metrics history."""
        from tqdm.auto import tqdm

        total = self.config.steps if steps is None else steps
        if self.optimizer is None:
            self.optimizer = self.build_optimizer()
        bar = tqdm(total=total, initial=min(self.step, total), desc=self.name, disable=not self.config.progress,
                   dynamic_ncols=True)
        try:
            while self.step < total:
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                t0 = time.perf_counter()
                stats = self.train_step(self.rows_for_step(self.step))
                dt = time.perf_counter() - t0
                self.step += 1
                tokens = stats.pop("tokens", 0.0)
                record = {"step": self.step, **stats, "tokens_per_s": tokens / max(dt, 1e-9), "step_time_s": dt,
                          "peak_mem_mb": peak_memory_mb(self.device), "lr": self.optimizer.param_groups[0]["lr"]}
                self.log(record)
                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "reward") if k in record})
        finally:
            bar.close()
        return self.history

    def log(self, record: Dict[str, float]) -> None:
        self.history.append(record)
        if self.config.output_dir:
            os.makedirs(self.config.output_dir, exist_ok=True)
            with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, path: Optional[str] = None) -> str:
        """Write trainable weights, optimizer, RNG states, step and history to ``path/trainer_state.pt``."""
        if path is None:
            if not self.config.output_dir:
                raise ValueError("save_checkpoint needs a path or config.output_dir")
            path = os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        os.makedirs(path, exist_ok=True)
        if self.optimizer is None:
            self.optimizer = self.build_optimizer()
        state = {
            "step": self.step,
            "modules": {
                name: {n: p.detach().cpu() for n, p in m.named_parameters() if p.requires_grad}
                for name, m in self.trainable_modules().items()
            },
            "optimizer": self.optimizer.state_dict(),
            "rng": get_rng_state(),
            "history": self.history,
            "config": dataclasses.asdict(self.config),
            "algo": self.name,
        }
        torch.save(state, os.path.join(path, "trainer_state.pt"))
        if self.config.output_dir and self.config.save_total_limit:
            for old in all_checkpoints(self.config.output_dir)[: -self.config.save_total_limit]:
                if os.path.abspath(old) != os.path.abspath(path):
                    shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore a :meth:`save_checkpoint` directory (or the latest ``checkpoint-*`` under ``path``)."""
        path = latest_checkpoint(path) or path
        file = os.path.join(path, "trainer_state.pt")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no trainer_state.pt under {path!r}")
        state = torch.load(file, map_location="cpu", weights_only=False)
        if state.get("algo") != self.name:
            raise ValueError(f"{path!r} is a {state.get('algo')} checkpoint, not {self.name}")
        for name, module in self.trainable_modules().items():
            saved = state["modules"][name]
            params = dict(module.named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
            if missing:
                raise ValueError(f"checkpoint {path!r} lacks {len(missing)} trainable tensors of {name}: {missing[:3]}")
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].copy_(t)
        if self.optimizer is None:
            self.optimizer = self.build_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        if self.config.output_dir:  # metrics.jsonl ends at the resumed step, as if never interrupted
            os.makedirs(self.config.output_dir, exist_ok=True)
            with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)


class RolloutTrainer(Trainer):
    """A trainer whose step samples from the policy for ``prompts_per_step`` rows, scored by ``reward_fn``.

    ``reward_fn(prompts=, completions=, completion_ids=, **columns) -> [float]`` (TRL's call);
    None only where rows carry their own scores (``reward_fn_required=False``).
    """

    def __init__(self, model, tokenizer, config: RolloutConfig, dataset: Sequence[Mapping[str, Any]],
                 reward_fn: Optional[RewardFn], *, reward_fn_required: bool = True):
        if (reward_fn is not None or reward_fn_required) and not callable(reward_fn):
            raise TypeError("reward_fn must be callable")
        super().__init__(model, tokenizer, config, dataset)
        self.reward_fn = reward_fn

    @property
    def rows_per_step(self) -> int:
        return self.config.prompts_per_step


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
