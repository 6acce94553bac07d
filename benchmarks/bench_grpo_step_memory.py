"""Peak host memory of one GRPO training step: fastrlhf ops vs plain PyTorch losses on full logits.

The step is what ``fastrlhf.algos.GRPO`` does per update on a rollout of ``B`` sequences
(prompt ``P`` + completion ``R`` tokens) of a causal LM with a large vocabulary (tiny layers,
so the vocabulary dominates, as it does for the loss part of a real step):
forward -> GRPO loss (PPO-clip with clip-higher + beta * k3 KL) -> backward -> AdamW update.

Modes (each in a fresh subprocess):
    fastrlhf        the decoder's last hidden state + lm_head weight into
                    ``fastrlhf.linear_grpo_loss`` (what GRPO runs by default): no [N, V] tensor.
    fastrlhf-logits ``model(...).logits`` (full [B, P + R, V] fp32 logits, as transformers
                    builds them) into ``fastrlhf.grpo_loss`` (no log-softmax temporaries).
    torch           ``model(...).logits`` into ``fastrlhf.reference.grpo_loss``: the plain
                    PyTorch composition (log_softmax, gather, softmax for the entropy).

Measurement (Linux): the child builds the model, optimizer state and inputs, resets the peak
RSS mark (``/proc/self/clear_refs``), runs one step and reports ``VmHWM - VmRSS(before)``:
the memory the step added at its peak. AdamW's state is created before the mark (one warm
step on a tiny batch) so only the step's own tensors count. ``MALLOC_MMAP_THRESHOLD_=1 MiB``
makes every large tensor an mmap returned on free, so RSS tracks live tensors
(see ``bench_linear_memory.py``).

Usage: ``python benchmarks/bench_grpo_step_memory.py [--vocab 32000 --batch 8 --prompt-len 32
--completion-len 224 --hidden 128] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, math, sys, time
import torch
import fastrlhf
from fastrlhf import reference
from fastrlhf._memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from fastrlhf.algos import tiny_causal_lm
from fastrlhf.algos.common import forward_hidden, output_head

mode = sys.argv[1]
V, B, P, R, H = (int(x) for x in sys.argv[2:7])
torch.manual_seed(0)

model = tiny_causal_lm(V, hidden_size=H, num_layers=2, num_heads=4, max_positions=P + R, device="cpu")
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

def batch(b):
    ids = torch.randint(0, V, (b, P + R))  # [b, P + R]
    attn = torch.ones_like(ids)
    labels = ids[:, P:].clone()  # [b, R] the completion
    labels[:, R - R // 8:] = -100  # some padding after eos
    old = torch.randn(b, R) * 0.1 - math.log(V)  # sampling-policy logprobs, near an untrained model's
    ref = old + torch.randn(b, R) * 0.05
    adv = torch.randn(b)  # [b] per-sequence group advantages
    return ids, attn, labels, old, ref, adv

def step(ids, attn, labels, old, ref, adv):
    kw = dict(beta=0.04, clip_low=0.2, clip_high=0.28, loss_agg="token-mean")
    if mode == "fastrlhf":
        hidden = forward_hidden(model, ids, attn)[:, P - 1 : P - 1 + R]  # [b, R, H]
        weight, bias = output_head(model)
        loss, _ = fastrlhf.linear_grpo_loss(hidden, weight, labels, old, adv, ref, bias=bias, **kw)
    else:
        logits = model(input_ids=ids, attention_mask=attn).logits[:, P - 1 : P - 1 + R]  # [b, R, V] view
        fn = fastrlhf.grpo_loss if mode == "fastrlhf-logits" else reference.grpo_loss
        loss, _ = fn(logits, labels, old, adv, ref, **kw)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

step(*batch(1))  # creates AdamW's state before the mark
inputs = batch(B)
if not reset_peak_rss():
    raise SystemExit("needs /proc/self/clear_refs (Linux >= 4.0)")
before = rss_bytes()
t0 = time.perf_counter()
loss = step(*inputs)
dt = time.perf_counter() - t0
peak = peak_rss_bytes()
print(json.dumps({"mode": mode, "step_peak_mib": (peak - before) / 2**20, "rss_before_mib": before / 2**20,
                  "step_s": dt, "loss": loss}))
"""

MODES = ("fastrlhf", "fastrlhf-logits", "torch")


def run(mode: str, vocab: int, batch: int, prompt_len: int, completion_len: int, hidden: int, glibc_default: bool):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    args = [sys.executable, "-c", CHILD, mode, str(vocab), str(batch), str(prompt_len), str(completion_len),
            str(hidden)]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000])
    p.add_argument("--batch", type=int, default=8, help="sequences in the update (B * G)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=224)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--glibc-default", action="store_true", help="keep glibc's malloc thresholds")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("this benchmark reads /proc/self/status (Linux only)")
    rows = []
    for v in a.vocab:
        for mode in a.modes:
            r = run(mode, v, a.batch, a.prompt_len, a.completion_len, a.hidden, a.glibc_default)
            r.update(vocab=v, tokens=a.batch * a.completion_len)
            rows.append(r)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    n = a.batch * a.completion_len
    print(f"GRPO step (forward + loss + backward + AdamW), B={a.batch}, P={a.prompt_len}, R={a.completion_len} "
          f"(N={n} completion tokens), hidden {a.hidden}, 2 layers, fp32, CPU")
    print(f"{'vocab':>7} {'mode':>16} {'step peak MiB':>14} {'step s':>8} {'loss':>10}")
    for r in rows:
        print(f"{r['vocab']:>7} {r['mode']:>16} {r['step_peak_mib']:>14.1f} {r['step_s']:>8.2f} {r['loss']:>10.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
