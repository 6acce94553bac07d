"""Peak host memory of PPO-clip from hidden states: fused-linear path vs. logits + ppo_clip_loss.

Each measurement runs in a fresh subprocess: it builds the inputs, resets the peak-RSS mark
(``/proc/self/clear_refs``; without it, the peak after setup), runs forward + backward, and
reports ``VmHWM - VmRSS(before)``, the memory the step itself added at its peak.
glibc's malloc raises its mmap threshold dynamically (up to 32 MiB) after large frees, and
then keeps freed chunk-sized blocks in its arenas (one per thread), so RSS overstates what is
live; ``MALLOC_MMAP_THRESHOLD_=1 MiB`` (the default here, ``--glibc-default`` turns it off)
makes every large tensor an mmap returned on free, so the peak RSS is the peak of live
tensors. Measured 2 threads, N=4096 H=256 V=65536: 138 MiB vs 2122 MiB with the fixed
threshold; 358 MiB vs 2122 MiB with glibc's default.

What the two paths hold at their peak (fp32, N tokens, vocabulary V, hidden H):
    logits:  logits [N, V] + their gradient [N, V] + dW [V, H]             ~ 8 N V bytes
    linear:  one [chunk, V] block + row temporaries + dW [V, H] + dh [N, H] ~ 4 V H + O(chunk V)

Usage: ``python benchmarks/bench_linear_memory.py [--n 4096 --h 256 --v 65536] [--json]``
(Linux only: reads ``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import torch
import fastrlhf
from fastrlhf._memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from fastrlhf.linear import default_chunk_size

mode, N, H, V, backend = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def step(hidden, weight, labels, old, adv):
    if mode == "linear":
        loss, _ = fastrlhf.linear_ppo_clip_loss(hidden, weight, labels, old, adv, backend=backend)
    else:
        logits = hidden @ weight.T  # [B, T, V]
        loss, _ = fastrlhf.ppo_clip_loss(logits, labels, old, adv, backend=backend)
    loss.backward()

def inputs(N, H, V):
    g = torch.Generator().manual_seed(0)
    B = 4 if N % 4 == 0 else 1
    hidden = torch.randn(B, N // B, H, generator=g).requires_grad_()  # [B, T, H]
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()  # [V, H]
    labels = torch.randint(0, V, (B, N // B), generator=g)
    old = -torch.rand(B, N // B, generator=g) * 12.0
    adv = torch.randn(B, N // B, generator=g)
    return hidden, weight, labels, old, adv

step(*inputs(64, 16, 512))  # warm-up: lazy init of kernels / thread pools is not the step's cost
args = inputs(N, H, V)
reset_peak_rss()  # without it (old kernels), the peak after setup
before = rss_bytes()
t0 = time.perf_counter()
step(*args)
seconds = time.perf_counter() - t0
peak = peak_rss_bytes()
print(json.dumps({"mode": mode, "growth_bytes": peak - before, "seconds": seconds,
                  "chunk": default_chunk_size(N, V, torch.float32, "cpu")}))
"""


def _start(mode: str, n: int, h: int, v: int, backend: str, threads: int | None, glibc_default: bool):
    env = dict(os.environ)
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(n), str(h), str(v), backend],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _result(mode: str, proc: subprocess.Popen, timeout: float | None) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} measurement failed:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure_pair(n: int, h: int, v: int, backend: str = "auto", threads: int | None = None,
                 glibc_default: bool = False, timeout: float | None = None) -> tuple[dict, dict]:
    """``(linear, logits)``: one forward+backward of each path, in two fresh processes run side by
    side (peak RSS is per process, so they do not disturb each other's measurement)."""
    procs = {m: _start(m, n, h, v, backend, threads, glibc_default) for m in ("linear", "logits")}
    try:
        return _result("linear", procs["linear"], timeout), _result("logits", procs["logits"], timeout)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--v", type=int, default=65536)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    t0 = time.perf_counter()
    lin, base = measure_pair(a.n, a.h, a.v, a.backend, a.threads, a.glibc_default)
    ratio = lin["growth_bytes"] / base["growth_bytes"]
    res = {"N": a.n, "H": a.h, "V": a.v, "chunk": lin["chunk"], "linear": lin, "logits": base, "ratio": ratio,
           "wall_s": time.perf_counter() - t0}
    if a.json:
        print(json.dumps(res))
        return
    mib = 2**20
    print(f"N={a.n} H={a.h} V={a.v} fp32, chunk={lin['chunk']} rows")
    print(f"  logits + ppo_clip_loss : +{base['growth_bytes'] / mib:8.1f} MiB  {base['seconds']:.2f} s")
    print(f"  linear_ppo_clip_loss   : +{lin['growth_bytes'] / mib:8.1f} MiB  {lin['seconds']:.2f} s")
    print(f"  ratio                  : {ratio:.3f}")


if __name__ == "__main__":
    main()
