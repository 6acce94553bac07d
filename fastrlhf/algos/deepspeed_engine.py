"""DeepSpeed ZeRO (stage 3 by default) under the trainers: ``--distributed deepspeed``.

    torchrun --nproc_per_node 8 $(which fastrlhf) train dpo --distributed deepspeed [--deepspeed-config ds.json]
    accelerate launch --config_file ds.yaml -m fastrlhf train dpo      # distributed_type: DEEPSPEED

Everything goes through DeepSpeed's own API (:mod:`fastrlhf.algos.engine` calls these):

1. ``deepspeed.init_distributed`` starts the process group (``gloo`` on CPU, where DeepSpeed's
   CPU accelerator is chosen with ``DS_ACCELERATOR=cpu``; ``nccl`` on CUDA).
2. ``deepspeed.initialize(model=root, optimizer=...)`` partitions the root module (the same
   :class:`~fastrlhf.algos.engine.RootForward` DDP and FSDP2 wrap) and wraps our optimizer
   (``zero_allow_untested_optimizer``: torch's AdamW, Adafactor or bitsandbytes' 8-bit AdamW);
   a frozen reference gets ``deepspeed.initialize(model=...)`` without optimizer (ZeRO-3
   inference, TRL's ``prepare_deepspeed``).
3. The lm_head (and a bias) is read outside its own module's forward by the fused-linear ops,
   so it is registered on the root with ``deepspeed.zero.register_external_parameter``: ZeRO-3
   gathers it for the root's forward and backward.
4. Gradient accumulation stays ours (the update loop's per-micro-batch scaling): DeepSpeed's
   ``gradient_accumulation_steps`` is 1, each micro-batch runs under
   ``set_gradient_accumulation_boundary(last)``, ``engine.backward(loss, scale_wrt_gas=False)``,
   and one ``engine.step()`` per update (DeepSpeed's documented manual-boundary recipe);
   DeepSpeed clips (``gradient_clipping = max_grad_norm``) and reports the norm.
5. Checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` (each rank its partitions);
   the ``save_pretrained`` export is ``engine._zero3_consolidated_16bit_state_dict()``, the
   call accelerate's and transformers' DeepSpeed paths use (layer by layer onto rank 0).
6. ``--deepspeed-config FILE`` (or accelerate's ``ACCELERATE_DEEPSPEED_CONFIG_FILE``) supplies
   the rest (offload, bucket sizes, stage); the batch keys, accumulation and clipping are
   always ours, because the trainer's config is what defines them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
from torch import nn


def import_deepspeed(device: Optional[torch.device]):
    """``deepspeed``, with its CPU accelerator when this rank has no GPU."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("distributed='deepspeed' needs DeepSpeed: DS_BUILD_OPS=0 pip install --no-build-isolation "
                          "deepspeed") from e
    return deepspeed


def init_process_group(device: Optional[torch.device]) -> None:
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    import_deepspeed(device).init_distributed(dist_backend="nccl" if on_cuda else "gloo")


def ds_config(path: Optional[str], *, micro_batch_size: int, max_grad_norm: Optional[float],
              trainable: bool) -> Dict[str, Any]:
    """The DeepSpeed config: the file's (default: ZeRO-3), with the trainer's batch, accumulation and clipping."""
    path = path or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    cfg: Dict[str, Any] = {"zero_optimization": {"stage": 3}}
    if path:
        with open(path) as f:
            cfg = json.load(f)
    cfg = dict(cfg)
    for key in ("train_batch_size", "optimizer", "scheduler"):
        if key in cfg and cfg[key] not in ("auto", None):
            if key == "train_batch_size":
                cfg.pop(key)
                continue
            raise ValueError(f"the DeepSpeed config sets {key!r}: the trainer builds its own ({key} comes from "
                             "--optim / --lr / --lr-warmup-steps); remove it from the file")
        cfg.pop(key, None)
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage and not path:
        cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": int(stage)}
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg["gradient_clipping"] = float(max_grad_norm) if max_grad_norm is not None else 0.0
    cfg["zero_allow_untested_optimizer"] = True
    # offload_optimizer with our (client) optimizer: DeepSpeed otherwise insists on its compiled CPU Adam
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg = _drop_auto(cfg)  # HF / accelerate-style files: "auto" means DeepSpeed's own default here
    if not trainable:
        cfg["zero_optimization"] = {**cfg.get("zero_optimization", {})}
        cfg["zero_optimization"].pop("offload_optimizer", None)
    return cfg


def _drop_auto(cfg: Any) -> Any:
    """``cfg`` without the entries whose value is ``"auto"`` (transformers fills those in from the model;
    DeepSpeed itself rejects them), at any depth."""
    if isinstance(cfg, dict):
        return {k: _drop_auto(v) for k, v in cfg.items() if v != "auto"}
    return cfg


def register_heads(root: nn.Module, model: nn.Module) -> None:
    """Register every output head's parameters under ``model`` as external parameters of ``root``."""
    import deepspeed

    seen = set()
    for sub in model.modules():
        get = getattr(sub, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is None or id(head) in seen:
            continue
        seen.add(id(head))
        for p in head.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(root, p)


def initialize(root: nn.Module, model: nn.Module, config: Dict[str, Any], optimizer=None):
    """``deepspeed.initialize`` of ``root`` (with ``optimizer`` when trainable); returns the engine."""
    import deepspeed

    kwargs = {"optimizer": optimizer} if optimizer is not None else {}
    engine, *_ = deepspeed.initialize(model=root, config=config, **kwargs)
    if engine.zero_optimization_stage() == 3:
        register_heads(engine.module, model)
    if optimizer is None:
        engine.eval()
    return engine


def full_state_dict(engine, is_main: bool) -> Optional[Dict[str, torch.Tensor]]:
    """The consolidated module state on rank 0's CPU (None elsewhere); every rank must call it."""
    sd = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 \
        else engine.module.state_dict()
    if not is_main:
        return None
    return {k: v.detach().cpu() for k, v in sd.items()}
