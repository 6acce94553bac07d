"""Memory features of the trainers: compute dtype over fp32 master weights, gradient checkpointing, optimizers.

Implementation choices (and where they come from):

1. ``dtype`` is the *compute* dtype: parameters (the master weights) and optimizer state stay
   fp32, and forwards run under ``torch.autocast(dtype)`` (one process, DDP) or FSDP2's
   ``MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=float32)`` (verl's and torchtitan's
   mixed precision). ``float16`` adds dynamic loss scaling (``torch.amp.GradScaler``; Micikevicius
   et al. 2018), which bf16's fp32-sized exponent does not need. ``auto`` keeps the historical
   behaviour: bf16 autocast on CUDA when ``bf16=True``, fp32 elsewhere.
2. Gradient checkpointing through transformers' ``gradient_checkpointing_enable`` with the
   non-reentrant ``torch.utils.checkpoint`` (the variant FSDP2 and DDP support): each decoder
   layer's activations are recomputed in backward.
3. Optimizers: ``adamw`` (``torch.optim.AdamW``: 8 bytes of state per parameter), ``adafactor``
   (``torch.optim.Adafactor``, Shazeer & Stern 2018: factored second moment, no first moment,
   about ``4 * (rows + cols)`` bytes per matrix; its own ``lr`` schedule is replaced by ours),
   ``adamw_8bit`` (bitsandbytes' ``AdamW8bit``, Dettmers et al. 2022: 2 bytes of state per
   parameter), when bitsandbytes is importable.
"""

from __future__ import annotations

import importlib.util
from typing import Iterable, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTIMIZERS = ("adamw", "adafactor", "adamw_8bit")


def compute_dtype(config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``config.dtype`` on ``device`` (None: run in the parameters' dtype)."""
    name = getattr(config, "dtype", "auto")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and config.bf16 else None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {('auto', *DTYPES)}, got {name!r}")
    return None if name == "float32" else DTYPES[name]


def autocast(config, device: torch.device):
    """``torch.autocast`` at the compute dtype, or a no-op context."""
    import contextlib

    dt = compute_dtype(config, device)
    return torch.autocast(device.type, dtype=dt) if dt is not None else contextlib.nullcontext()


def grad_scaler(config, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A dynamic loss scaler for float16 compute (None otherwise)."""
    if compute_dtype(config, device) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):  # LoRA: frozen embeddings still need a grad path
        model.enable_input_require_grads()


def make_optimizer(params: Iterable[torch.nn.Parameter], config) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optim`` over ``params``."""
    params = list(params)
    name = getattr(config, "optim", "adamw")
    betas = tuple(config.adam_betas)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "adamw_8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("optim='adamw_8bit' needs bitsandbytes (pip install bitsandbytes); "
                              "or use optim='adamw' or 'adafactor'")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay)
    raise ValueError(f"optim must be one of {OPTIMIZERS}, got {name!r}")
