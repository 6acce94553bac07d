"""What DPO, GRPO and PPO share: the model plumbing, batches, the training loop and checkpoints.

Implementation choices (and where they come from):

1. Losses on the last hidden state and the lm_head weight (``fastrlhf.linear_*`` ops), so the
   ``[B, T, V]`` logits are never built; ``fused_linear=False`` runs the logits ops on
   ``hidden @ weight.T`` instead (same math, for comparison). Hidden states come from the
   decoder stack (``model.get_decoder()``), which already applies the final norm.
2. Sequences are laid out as a left-padded prompt followed by a right-padded completion, so
   every completion starts at the same column ``P`` and the hidden states that score it are
   ``hidden[:, P-1 : P-1+R]`` (TRL's layout). Position ids are ``cumsum(attention_mask) - 1``,
   as ``generate`` uses for left-padded prompts, so training logprobs match sampling ones.
3. The reference model is a frozen ``eval()`` deep copy of the initial policy (TRL); with
   LoRA it is the same model with its adapters disabled (TRL's ``peft`` path), which costs no
   memory.
4. AdamW, global-norm gradient clipping (CleanRL detail 11, "global gradient clipping"),
   gradient accumulation over micro-batches with the loss divided by the number of
   micro-batches (TRL / HF Trainer), optional linear lr warm-up (verl's ``lr_warmup_steps``).
5. bf16 autocast on CUDA with fp32 master weights (verl's FSDP mixed precision);
   ``attn_implementation="flash_attention_2"`` when ``flash_attn`` is importable, else "sdpa".
6. The batch of step ``s`` is a pure function of ``(seed, s)`` (a seeded permutation per epoch),
   and checkpoints store the optimizer and every RNG state, so a resumed run continues exactly
   where it stopped.
7. Per-step metrics go to ``metrics.jsonl`` (one JSON object per line); tokens/s counts the
   non-pad tokens of the step's sequences over its wall time; peak memory is
   ``torch.cuda.max_memory_allocated`` on GPU and the process's peak RSS on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import fastrlhf

IGNORE_INDEX = -100

RewardFn = Callable[..., Sequence[float]]


# ----------------------------------------------------------------------------------------
# Configuration shared by every algorithm
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------


def attn_implementation(device: Optional[torch.device | str] = None) -> str:
    """``"flash_attention_2"`` when flash-attn is importable and the device is CUDA, else ``"sdpa"``."""
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(path: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """A local Hugging Face checkpoint as ``(model, tokenizer)``; pad token set to eos if missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model must be a local Hugging Face checkpoint directory, got {path!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation=attn_implementation(device), dtype=dtype or torch.float32
    ).to(device)
    return model, tokenizer


def unwrap_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def output_head(model):
    """``(weight [V, H], bias [V] or None)`` of the lm_head."""
    head = unwrap_model(model).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (lm_head) to fuse")
    if hasattr(head, "base_layer"):  # a peft adapter on the lm_head: its weight alone is not the head
        raise ValueError("LoRA on the lm_head is not supported; leave it out of lora_target_modules")
    return head.weight, getattr(head, "bias", None)


def check_fusable(model) -> None:
    """Refuse models whose logits are not ``hidden @ W.T + b`` (soft-capping, logit scaling)."""
    cfg = unwrap_model(model).config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        v = getattr(cfg, attr, None)
        if v not in (None, 1, 1.0):
            raise ValueError(
                f"{type(unwrap_model(model)).__name__} applies {attr}={v} to its logits; "
                "the fused-linear ops assume logits = hidden @ lm_head.weight.T (+ bias): pass fused_linear=False"
            )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: what ``generate`` uses for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state ``[B, L, H]`` of the decoder stack (final norm applied, no lm_head)."""
    decoder = unwrap_model(model).get_decoder()
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def apply_lora(model, config: TrainConfig, task_type: Optional[str] = "CAUSAL_LM"):
    """Wrap ``model`` with peft LoRA adapters when ``config.lora_r > 0`` (base weights frozen)."""
    if config.lora_r <= 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("lora_r > 0 needs peft (pip install peft)") from e
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, lora)


def _linear_op(name: str):
    fn = getattr(fastrlhf, name, None)
    if fn is None:
        try:
            fn = getattr(importlib.import_module("fastrlhf.linear"), name)
        except (ImportError, AttributeError) as e:
            raise RuntimeError(
                f"fused_linear=True needs fastrlhf.{name} (fastrlhf/linear.py); pass fused_linear=False"
            ) from e
    return fn


def fused_linear_available() -> bool:
    try:
        _linear_op("linear_token_logprobs")
    except RuntimeError:
        return False
    return True


def head_op(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias, *args, fused: bool, **kwargs):
    """Call op ``name`` (e.g. ``"grpo_loss"``) on the lm_head output of ``hidden [..., H]``.

    ``fused``: ``fastrlhf.linear_<name>(hidden, weight, ..., bias=bias)`` (logits never built);
    else ``fastrlhf.<name>(hidden @ weight.T + bias, ...)``.
    """
    if fused:
        return _linear_op("linear_" + name)(hidden, weight, *args, bias=bias, **kwargs)
    logits = F.linear(hidden, weight, bias)  # [..., V]  the tensor the fused path never makes
    return getattr(fastrlhf, name)(logits, *args, **kwargs)


# ----------------------------------------------------------------------------------------
# Batches: left-padded prompt + right-padded completion
# ----------------------------------------------------------------------------------------


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
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


# ----------------------------------------------------------------------------------------
# RNG state (for exact resumption)
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
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20  # macOS reports bytes
    except ImportError:  # Windows
        return float("nan")


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------


class Trainer:
    """Owns the policy, its frozen reference, the optimizer, the data order, metrics and checkpoints.

    Subclasses implement :meth:`train_step` (one optimizer step for DPO, one rollout plus its
    updates for GRPO/PPO) and say how many dataset rows a step consumes (:attr:`rows_per_step`).
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
            _linear_op("linear_token_logprobs")  # fail now, not after the first rollout
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

    # -- the loop -------------------------------------------------------------------------

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
# Rewards and supervised warm-up
# ----------------------------------------------------------------------------------------


def call_reward_fn(fn: RewardFn, prompts: List[str], completions: List[str], completion_ids: List[List[int]],
                   rows: List[Mapping[str, Any]], device) -> torch.Tensor:
    """``fn(prompts=, completions=, completion_ids=, **columns)`` -> ``[n]`` fp32 (TRL's reward-function call).

    ``columns`` are the other dataset fields (e.g. ``answer``), one entry per completion.
    """
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
    out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    rewards = torch.as_tensor([float(x) if x is not None else float("nan") for x in out], dtype=torch.float32)
    if rewards.shape != (len(completions),):
        raise ValueError(f"reward function returned {tuple(rewards.shape)} values for {len(completions)} completions")
    if not torch.isfinite(rewards).all():
        raise ValueError("reward function returned a non-finite reward (NaN / inf / None)")
    return rewards.to(device)


def reward_model_fn(reward_model, tokenizer) -> RewardFn:
    """A reward function scoring ``prompt + completion`` with a sequence-classification model (logit 0)."""
    device = next(reward_model.parameters()).device
    freeze(reward_model)

    @torch.no_grad()
    def score(prompts, completions, **_):
        texts = [p + c for p, c in zip(prompts, completions)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        return reward_model(**enc).logits[:, 0].float().tolist()

    return score


def load_reward_fn(spec: str) -> RewardFn:
    """``"module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    if ":" not in spec:
        raise ValueError(f"reward function must be 'module:function' or 'file.py:function', got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        import importlib.util

        s = importlib.util.spec_from_file_location("fastrlhf_user_reward", mod_name)
        if s is None or s.loader is None:
            raise FileNotFoundError(f"cannot load reward module {mod_name!r}")
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r} does not name a callable")
    return fn


def encode_prompt(tokenizer, text: str) -> List[int]:
    """Prompt ids with the tokenizer's own special tokens (e.g. a leading bos), as TRL tokenizes prompts."""
    return tokenizer(text)["input_ids"]


def encode_completion(tokenizer, text: str, add_eos: bool = True) -> List[int]:
    """Completion ids without special tokens, plus eos (the policy must learn to stop)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else ids


def supervised_finetune(model, tokenizer, rows: Sequence[Mapping[str, str]], *, steps: int, batch_size: int = 32,
                        lr: float = 3e-3, seed: int = 0, fused_linear: bool = True, progress: bool = False,
                        ) -> List[float]:
    """Warm-up by next-token NLL of ``completion + eos`` given ``prompt`` (rows with those keys).

    Uses ``fastrlhf.linear_token_logprobs`` (or the logits op) like the algorithms do.
    Returns the loss per step.
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
