"""Memory features of the trainers on CPU: dtype over fp32 master weights, gradient checkpointing,
optimizers, generation micro-batches, the prompt-length cap (fastrlhf.algos.memory)."""

import importlib.util

import pytest
import torch

from fastrlhf.algos import DPO, GRPO, DPOConfig, GRPOConfig, build_char_tokenizer, tiny_causal_lm

PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(4) for b in range(4)]
PROMPTS = [{"prompt": f"{a}+{b}="} for a in range(4) for b in range(4)]


def dpo(**kw):
    tok = build_char_tokenizer()
    model = tiny_causal_lm(len(tok), tokenizer=tok, hidden_size=32, num_layers=2, seed=0, device="cpu")
    cfg = DPOConfig(steps=2, lr=1e-3, micro_batch_size=4, progress=False, **kw)
    return DPO(model, tok, PAIRS, cfg)


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_compute_keeps_fp32_master_weights(dtype):
    ref, t = dpo(), dpo(dtype=dtype)
    ref.train()
    history = t.train()
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert all(v.dtype == torch.float32 for s in t.optimizer.state.values() for v in s.values() if v.dim())
    assert (t.scaler is not None) == (dtype == "float16")  # loss scaling for fp16 only
    assert abs(history[0]["loss"] - ref.history[0]["loss"]) < 2e-2  # same loss up to rounding
    with t.autocast():
        assert torch.get_autocast_dtype("cpu") == getattr(torch, dtype)


def test_gradient_checkpointing_gives_the_same_update():
    a, b = dpo(), dpo(gradient_checkpointing=True)
    a.train()
    b.train()
    assert getattr(b.model, "is_activation_checkpointing", None) or b.model.is_gradient_checkpointing
    pa, pb = params(a), params(b)
    assert all(torch.allclose(pa[n], pb[n], rtol=0, atol=1e-6) for n in pa)


def test_optimizers():
    t = dpo(optim="adafactor")
    before = params(t)
    t.train()
    assert isinstance(t.optimizer, torch.optim.Adafactor)
    assert any(not torch.equal(before[n], p) for n, p in params(t).items())
    with pytest.raises(ValueError, match="optim must be one of"):
        dpo(optim="sgd")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw_8bit_without_bitsandbytes_says_what_to_install():
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        dpo(optim="adamw_8bit").build_optimizer()


def test_cpu_offload_needs_fsdp2():
    with pytest.raises(ValueError, match="fsdp2"):
        dpo(cpu_offload=True)


def test_generation_micro_batches_and_prompt_cap():
    tok = build_char_tokenizer()
    model = tiny_causal_lm(len(tok), tokenizer=tok, hidden_size=32, num_layers=1, seed=0, device="cpu")
    cfg = GRPOConfig(prompts_per_step=4, group_size=2, micro_batch_size=8, gradient_accumulation_steps=1,
                     max_new_tokens=3, beta=0.0, progress=False, generation_batch_size=1, max_prompt_length=2)
    t = GRPO(model, tok, PROMPTS, lambda prompts, completions, **_: [0.0] * len(prompts), cfg)
    sizes = []
    orig = model.generate

    def spy(*args, **kw):
        sizes.append(kw["input_ids"].shape)
        return orig(*args, **kw)

    model.generate = spy
    batch, rewards, _ = t.sample_and_score(t.rows_for_step(0), 2, max_new_tokens=3, temperature=1.0,
                                           reward_fn=t.reward_fn)
    assert [s[0] for s in sizes] == [2, 2, 2, 2]  # 1 prompt x 2 samples per generate call
    assert all(s[1] <= 2 for s in sizes) and batch.prompt_len <= 2  # prompts keep their last 2 tokens
    assert len(batch) == 8 and rewards.shape == (8,)
