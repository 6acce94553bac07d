"""Model plumbing shared by every trainer: loading, LoRA, the decoder's last hidden state, the lm_head.

Implementation choices (and where they come from):

1. Losses on the last hidden state and the lm_head weight (``fastrlhf.linear_*`` ops), so the
   ``[B, T, V]`` logits are never built; ``fused=False`` runs the logits ops on
   ``hidden @ weight.T`` instead (same math, for comparison). Hidden states come from the
   decoder stack (``model.get_decoder()``), which already applies the final norm.
2. Position ids are ``cumsum(attention_mask) - 1``, as ``generate`` uses for left-padded
   prompts, so training logprobs match sampling ones.
3. ``attn_implementation="flash_attention_2"`` when ``flash_attn`` is importable on CUDA, else "sdpa".
4. LoRA through peft; with LoRA the reference model is the policy with its adapters disabled
   (TRL's ``peft`` path), which costs no memory.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F

import fastrlhf


def attn_implementation(device: Optional[torch.device | str] = None) -> str:
    """``"flash_attention_2"`` when flash-attn is importable and the device is CUDA, else ``"sdpa"``."""
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(path: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                   compute_device: Optional[str] = None):
    """A local Hugging Face checkpoint as ``(model, tokenizer)`` on ``device``; pad token set to eos if missing.

    ``compute_device``: where it will run when that differs from where it is loaded (FSDP2 / ZeRO-3
    load into host memory and move only each rank's shards; it picks the attention kernel)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model must be a local Hugging Face checkpoint directory, got {path!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation=attn_implementation(compute_device or device),
        dtype=dtype or torch.float32
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
    """``eval()`` and no gradients: a frozen reference or reward model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def apply_lora(model, config, task_type: Optional[str] = "CAUSAL_LM"):
    """Wrap ``model`` with peft LoRA adapters when ``config.lora_r > 0`` (base weights frozen).

    ``config``: a :class:`~fastrlhf.algos.TrainConfig` (its ``lora_*`` fields).
    """
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


def merged_lora_copy(model, state_dict):
    """A CPU copy of the peft ``model`` holding ``state_dict`` (its full state, e.g. gathered from
    FSDP2 shards) with the adapters merged in: a plain transformers model to ``save_pretrained``.

    The copy is rebuilt from the base model's class and config (a wrapped or sharded model can't
    be deep-copied), given the same adapters, loaded strictly and merged by peft itself.
    """
    import copy

    from peft import get_peft_model

    base = unwrap_model(model)
    fresh = get_peft_model(type(base)(copy.deepcopy(base.config)),
                           copy.deepcopy(model.peft_config[model.active_adapter]))
    fresh.load_state_dict(state_dict, strict=True)
    return fresh.merge_and_unload()


def head_op(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias, *args, fused: bool, **kwargs):
    """Call op ``name`` (e.g. ``"grpo_loss"``) on the lm_head output of ``hidden [..., H]``.

    ``fused``: ``fastrlhf.linear_<name>(hidden, weight, ..., bias=bias)`` (logits never built);
    else ``fastrlhf.<name>(hidden @ weight.T + bias, ...)``.
    """
    if fused:
        return getattr(fastrlhf, "linear_" + name)(hidden, weight, *args, bias=bias, **kwargs)
    logits = F.linear(hidden, weight, bias)  # [..., V]  the tensor the fused path never makes
    return getattr(fastrlhf, name)(logits, *args, **kwargs)
