"""The Trainer base every algorithm extends: config, data order, the one update loop, checkpoints
(rollouts: :mod:`fastrlhf.algos.rollout`).

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
4. Compute dtype ``dtype`` over fp32 master weights (verl's FSDP mixed precision); the
   default ``auto`` is bf16 autocast on CUDA (:mod:`fastrlhf.algos.memory`).
5. The batch of step ``s`` is a pure function of ``(seed, s)`` (a seeded permutation per epoch),
   and checkpoints store the optimizer and every RNG state, so a resumed run continues exactly
   where it stopped.
6. Per-step metrics go to ``metrics.jsonl`` (one JSON object per line); tokens/s counts the
   non-pad tokens of the step's sequences over its wall time; peak memory is
   ``torch.cuda.max_memory_allocated`` on GPU and the process's peak RSS on CPU.
7. Several processes (``distributed="ddp"`` / ``"fsdp2"`` under torchrun or accelerate launch):
   every model call runs through the engine's root forward, the config's batch is global and
   split over ranks, and rank 0 alone writes (:mod:`fastrlhf.algos.engine`). Several
   trainable modules (PPO's actor and critic) share one root: one DDP reducer, one FSDP2 root,
   one optimizer, one distributed checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import memory
from .batching import SequenceBatch, micro_batches
from .engine import Engine, barrier, launched_world_size, local_device, resolve_engine, world_size
from .models import apply_lora, check_fusable, forward_hidden, freeze, head_op, output_head
from .runstate import (  # noqa: F401  (re-exported: these names have always lived here)
    all_checkpoints,
    check_config,
    check_rollout_fits_updates,
    get_rng_state,
    latest_checkpoint,
    peak_memory_mb,
    seed_everything,
    set_rng_state,
    supervised_finetune,
)

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
    distributed: str = "auto"
    """auto | none | ddp | fsdp2 | deepspeed (auto: ddp when launched with WORLD_SIZE > 1, deepspeed under
    accelerate's DEEPSPEED config; fastrlhf.algos.engine)."""
    deepspeed_config: Optional[str] = None
    """distributed=deepspeed: a DeepSpeed JSON config (default ZeRO-3; batch, accumulation and clipping are ours)."""
    dtype: str = "auto"
    """Compute dtype over fp32 master weights: auto (bf16 on CUDA if bf16) | float32 | bfloat16 | float16."""
    gradient_checkpointing: bool = False
    """Recompute decoder-layer activations in backward (less activation memory, ~1/3 more compute)."""
    cpu_offload: bool = False
    """FSDP2 only: keep sharded parameters, gradients and optimizer state in host memory."""
    optim: str = "adamw"
    """adamw | adafactor | adamw_8bit (bitsandbytes)."""


def _counts(n) -> Tuple[float, ...]:
    """A normaliser count, or a tuple of them (one per loss term), as a tuple."""
    return tuple(float(c) for c in n) if isinstance(n, (tuple, list)) else (float(n),)


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
        if (resolve_engine(config.distributed) == "fsdp2" and self.device.type == "cpu" and torch.cuda.is_available()
                and (not dist.is_initialized() or dist.get_backend() == "nccl")):
            self.device = local_device()  # sharded from the host, each rank's shards moved to its GPU (not on gloo)
        self.engine = Engine(config.distributed, device=self.device, cpu_offload=config.cpu_offload,
                             param_dtype=memory.compute_dtype(config, self.device),
                             deepspeed=dict(path=config.deepspeed_config, max_grad_norm=config.max_grad_norm,
                                            micro_batch_size=max(1, config.micro_batch_size // (
                                                world_size() if dist.is_initialized() else launched_world_size()))))
        if self.engine.kind == "deepspeed" and memory.compute_dtype(config, self.device) == torch.float16:
            raise ValueError("dtype='float16' is not supported with distributed='deepspeed' (its loss scaling is "
                             "DeepSpeed's): use bfloat16, or DeepSpeed's own fp16 section in --deepspeed-config")
        check_config(config, one_of=dict(optim=memory.OPTIMIZERS))
        # The reference is the initial policy: copied before any adapter is added (and before any wrapping).
        self.ref_model = None
        if self.needs_reference and config.lora_r <= 0:
            self.ref_model = freeze(copy.deepcopy(model))
        self.model = apply_lora(model, config)
        if config.gradient_checkpointing:
            memory.enable_gradient_checkpointing(self.model)
        self.model.train()
        self.scaler = memory.grad_scaler(config, self.device)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        # Root modules every call of a model goes through (none in one process; fastrlhf.algos.engine).
        # With several trainable modules (PPO's actor and critic) one container is the root: one DDP
        # reducer / one FSDP2 root, and one forward per micro-batch runs both.
        self.roots: Dict[int, torch.nn.Module] = {}
        self._root_prefix = "model."
        if self.engine.kind != "none":
            self.engine.local_count(config.micro_batch_size, "micro_batch_size")
            trainable = self.trainable_modules()
            if self.engine.kind == "deepspeed":  # DeepSpeed wraps the model together with its optimizer
                self.optimizer = self.build_optimizer()
            if len(trainable) > 1:
                root = self.engine.wrap(torch.nn.ModuleDict(trainable), optimizer=self.optimizer)
                self._root_prefix = "model.policy."
            else:
                root = self.engine.wrap(self.model, optimizer=self.optimizer)
            for module in trainable.values():
                self.roots[id(module)] = root
            if self.ref_model is not None:
                self.roots[id(self.ref_model)] = self.engine.wrap(self.ref_model, trainable=False)
            self.engine.seed_rank(config.seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("tokenizer needs a pad_token_id or an eos_token_id")
        self._perm_cache: Dict[int, np.ndarray] = {}

    # -- set-up ---------------------------------------------------------------------------

    def trainable_modules(self) -> Dict[str, torch.nn.Module]:
        """Modules whose trainable parameters are optimized and checkpointed."""
        return {"policy": self.model}

    def build_optimizer(self) -> torch.optim.Optimizer:
        params = [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        return memory.make_optimizer(params, self.config)

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
        return memory.autocast(self.config, self.device)

    def call(self, model, fn: Callable, *args):
        """``fn(model, *args)``, through ``model``'s root forward when an engine wraps it (so its hooks fire)."""
        return self.engine.call(self.roots.get(id(model)), model, fn, *args)

    def completion_forward(self, model, batch: SequenceBatch, fn: Callable):
        """``fn(hidden [B, R, H], op)`` run inside ``model``'s forward; ``op(name, hidden, *args)`` is
        :meth:`op` on ``model``'s lm_head (under FSDP2 the all-gathered full weight)."""
        def inner(m):
            weight, bias = output_head(m)
            return fn(self.completion_hidden(m, batch),
                      lambda name, h, *a, **k: head_op(name, h, weight, bias, *a, fused=self.config.fused_linear, **k))

        return self.call(model, inner)

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
        self.engine.check_inside("completion_hidden")
        hidden = forward_hidden(model, batch.input_ids, batch.attention_mask)  # [B, P + R, H]
        P, R = batch.prompt_len, batch.labels.shape[1]
        return hidden[:, P - 1 : P - 1 + R]  # [B, R, H]

    def op(self, name: str, hidden: torch.Tensor, *args, model=None, **kwargs):
        """The fastrlhf op ``name`` on ``hidden`` and the lm_head of ``model`` (default: the policy)."""
        self.engine.check_inside("Trainer.op")
        weight, bias = output_head(self.model if model is None else model)
        return head_op(name, hidden, weight, bias, *args, fused=self.config.fused_linear, **kwargs)

    @torch.no_grad()
    def completion_logprobs(self, model, batch: SequenceBatch, temperature: float = 1.0) -> torch.Tensor:
        """Per-token logprobs ``[B, R]`` (0 on padding) of the completions under ``model``, no grad."""
        out = torch.zeros(batch.labels.shape, dtype=torch.float32, device=self.device)
        for sl in micro_batches(len(batch), self.config.micro_batch_size):
            mb = batch.select(sl)
            with self.autocast():
                out[sl] = self.completion_forward(model, mb, lambda hidden, op, labels=mb.labels: op(
                    "token_logprobs", hidden, labels, temperature=temperature))
        return out

    # -- the update loop ------------------------------------------------------------------

    def optimizer_step(self) -> float:
        """Clip, step, zero the gradients; returns the pre-clip global gradient norm."""
        # The lr is a pure function of the step (no scheduler state to checkpoint).
        scale = min(1.0, (self.step + 1) / self.config.lr_warmup_steps) if self.config.lr_warmup_steps > 0 else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale
        if self.engine.kind == "deepspeed":  # DeepSpeed clips, steps and zeroes (fastrlhf.algos.deepspeed_engine)
            return float(self.engine.step(self.roots[id(self.model)]))
        params = self._params()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        elif self.engine.kind != "none":
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])
            )
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor reduced over the shards
            norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def run_updates(self, n: int, loss_fn: LossFn, *, epochs: int = 1, shuffle: bool = True,
                    micro_batch_size: Optional[int] = None, units: Optional[Callable[[torch.Tensor], int]] = None,
                    norm: Optional[Callable[[torch.Tensor], int]] = None) -> Dict[str, float]:
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
        On several ranks, ``n`` is per rank, ``micro_batch_size`` is divided by the world size and
        each loss is also scaled by ``world * n_r / sum_r n_r``, ``n_r = norm(idx)`` the count it
        is a mean over (default: its units): the global mean (:mod:`fastrlhf.algos.engine`, 4).
        A loss made of terms with different normalisers (PPO: a sequence-mean policy loss plus a
        token-mean value loss) is returned as a tuple of terms, with ``norm`` returning a tuple of
        their counts: each term gets its own global scale. Under DDP the gradients of an
        update's micro-batches accumulate locally and are all-reduced once (``no_sync``).

        Returned: ``loss`` and every stat averaged over micro-batches (stats named ``num_*``
        are dropped: counts, not means), and ``grad_norm`` (the pre-clip norm of each update,
        weighted by its micro-batches). Empty when ``n == 0`` (no update, no RNG draw).
        """
        mbs = micro_batch_size or self.config.micro_batch_size
        world = self.engine.world
        if world > 1:
            mbs = self.engine.local_count(mbs, "micro_batch_size")
        accum = self.config.gradient_accumulation_steps
        root = self.roots.get(id(self.model))
        sums: Dict[str, float] = {}
        count = 0
        for _ in range(epochs if n > 0 else 0):
            order = torch.randperm(n).to(self.device) if shuffle else torch.arange(n, device=self.device)
            micro = [order[sl] for sl in micro_batches(n, mbs)]
            for u in range(0, len(micro), accum):
                update = micro[u : u + accum]
                sizes = [len(idx) if units is None else units(idx) for idx in update]
                total = sum(sizes)
                scales = None
                if world > 1:  # one all-reduce per update: global unit and normaliser counts
                    norms = [_counts(size if norm is None else norm(idx)) for idx, size in zip(update, sizes)]
                    glob = self.engine.all_sum(sizes + [c for counts in norms for c in counts])
                    gsizes, total = glob[: len(update)], max(sum(glob[: len(update)]), 1e-30)
                    gnorms = iter(glob[len(update):])
                    scales = [[world * nr / max(next(gnorms), 1e-30) * gs / total for nr in counts]
                              for counts, gs in zip(norms, gsizes)]
                for i, (idx, size) in enumerate(zip(update, sizes)):
                    with self.engine.micro_batch(root, last=i == len(update) - 1):
                        loss, stats = loss_fn(idx)
                        terms = loss if isinstance(loss, (tuple, list)) else (loss,)
                        loss = sum(terms)
                        if scales is None:
                            scaled = loss / (total / size)
                        else:
                            if len(terms) != len(scales[i]):
                                raise ValueError(f"loss_fn returned {len(terms)} loss terms but norm counted "
                                                 f"{len(scales[i])}")
                            scaled = sum(t * sc for t, sc in zip(terms, scales[i]))
                        if self.scaler is None:
                            self.engine.backward(root, scaled)
                        else:
                            self.scaler.scale(scaled).backward()
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
        bar = tqdm(total=total, initial=min(self.step, total), desc=self.name, dynamic_ncols=True,
                   disable=not self.config.progress or not self.engine.is_main)
        try:
            while self.step < total:
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                t0 = time.perf_counter()
                rows = self.rows_for_step(self.step)
                stats = self.engine.mean_stats(self.train_step(self.engine.shard(rows) if self.engine.world > 1
                                                               else rows))
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
        if self.config.output_dir and self.engine.is_main:
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
        meta = {"step": self.step, "history": self.history, "config": dataclasses.asdict(self.config),
                "algo": self.name}
        if self.engine.kind != "none":  # sharded: torch.distributed.checkpoint (fastrlhf.algos.engine)
            self.engine.save_checkpoint(path, self.roots[id(self.model)], self.optimizer, meta, get_rng_state())
        else:
            state = {
                "step": self.step,
                "modules": {
                    name: {n: p.detach().cpu() for n, p in m.named_parameters() if p.requires_grad}
                    for name, m in self.trainable_modules().items()
                },
                "optimizer": self.optimizer.state_dict(),
                "rng": get_rng_state(),
                **{k: v for k, v in meta.items() if k != "step"},
            }
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, os.path.join(path, "trainer_state.pt"))
        if self.config.output_dir and self.config.save_total_limit and self.engine.is_main:
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
        if self.optimizer is None:
            self.optimizer = self.build_optimizer()
        if self.engine.kind != "none":
            self._restore(self.engine.load_checkpoint(path, self.roots[id(self.model)], self.optimizer), path)
            return
        state = torch.load(file, map_location="cpu", weights_only=False)
        if state.get("algo") != self.name:
            raise ValueError(f"{path!r} is a {state.get('algo')} checkpoint, not {self.name}")
        if "modules" not in state:
            raise ValueError(f"{path!r} is a checkpoint of a distributed run: resume it with --distributed ddp|fsdp2")
        for name, module in self.trainable_modules().items():
            saved = state["modules"][name]
            params = dict(module.named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
            if missing:
                raise ValueError(f"checkpoint {path!r} lacks {len(missing)} trainable tensors of {name}: {missing[:3]}")
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self._restore(state, path)

    def _restore(self, state: Mapping[str, Any], path: str) -> None:
        """RNG, step and history of a loaded checkpoint; rewrites metrics.jsonl to end at its step."""
        if state.get("algo") != self.name:
            raise ValueError(f"{path!r} is a {state.get('algo')} checkpoint, not {self.name}")
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        if self.config.output_dir and self.engine.is_main:  # metrics.jsonl ends at the resumed step
            os.makedirs(self.config.output_dir, exist_ok=True)
            with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)

    def save_pretrained(self, path: str) -> str:
        """The policy (``save_pretrained``) and tokenizer; under an engine rank 0 writes the gathered full state."""
        state = None
        if self.engine.kind != "none":
            # a collective: every rank calls it
            state = self.engine.full_state_dict(self.roots[id(self.model)], self._root_prefix)
        if self.engine.is_main:
            self.model.save_pretrained(path, **({} if state is None else {"state_dict": state}))
            self.tokenizer.save_pretrained(path)
        barrier()
        return path
