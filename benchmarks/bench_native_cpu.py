"""Native C++ CPU backend vs the plain PyTorch composition: time and peak extra memory.

Baseline (what a trainer writes): ``torch.log_softmax(x, -1).gather(-1, labels[:, None])``
and its autograd. It reads the logits, writes the ``[N, V]`` log-softmax, and its backward
allocates a zero ``[N, V]`` for the gather's gradient and another ``[N, V]`` for the result.
``fastrlhf.token_logprobs(x, labels, backend="native")`` reads the logits once in forward
(writing ``3 x N`` floats), and once more in backward, writing only the gradient.

Bytes moved by the native path (fp32): forward ``4 N V`` read; backward ``4 N V`` read +
``4 N V`` written; the GB/s columns use these formulas.

Each variant runs in a fresh subprocess: it builds the inputs, resets the peak-RSS mark
(``/proc/self/clear_refs``), runs one warm-up step, records ``VmHWM - VmRSS(before)`` (the
memory the step itself added at its peak), then times ``--repeat`` steps. glibc's malloc keeps
freed mid-sized blocks in its arenas, so ``MALLOC_MMAP_THRESHOLD_=1 MiB`` is set for the
children: every large tensor is an mmap returned on free and the peak RSS is the peak of live
tensors (``[N, V]`` tensors are mmaps under the default settings anyway). ``torch+THP`` is the
baseline with ``THP_MEM_ALLOC_ENABLE=1`` (torch's allocator asks for transparent huge pages),
the same page-fault saving the native backward applies to its gradient buffer.

Times are wall clock (median and min over ``--repeat`` steps) and process CPU time (all
threads): on a shared machine the wall time includes waiting for a core, the CPU time not.

Usage: ``python benchmarks/bench_native_cpu.py [--n 4096 --v 32000 --repeat 5 --threads 0]``
(``--threads 0``: torch's default). Writes ``benchmarks/results/cpu/native_N{n}_V{v}.json``.
Linux only (reads ``/proc``). Not a test: it times, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import torch
import fastrlhf

variant, mode, N, V, repeat, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
if threads > 0:
    torch.set_num_threads(threads)

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False

g = torch.Generator().manual_seed(0)
x = torch.randn(N, V, generator=g)  # [N, V] fp32, touched
labels = torch.randint(0, V, (N,), generator=g)  # [N]
up = torch.randn(N, generator=g)  # random upstream gradient of logp
backward = mode == "fwd_bwd"
if backward:
    x.requires_grad_()

def composition(x):
    return torch.log_softmax(x, -1).gather(-1, labels[:, None]).squeeze(-1)  # [N, V] log-softmax kept

def prepare():
    if variant == "native_inplace":
        # Stands for the model's logits, which the backward overwrites: made outside the timing.
        return x.detach().clone().requires_grad_()
    return x

def step(logits):
    if variant.startswith("torch"):
        lp = composition(logits)
    elif variant == "native_inplace":
        lp = fastrlhf.token_logprobs(logits, labels, inplace_backward=True, backend="native")
    else:
        lp = fastrlhf.token_logprobs(logits, labels, backend="native")
    if backward:
        # autograd.grad, not .backward(): a leaf's .grad accumulation may clone the gradient,
        # which a model's logits (a non-leaf) never see.
        (grad,) = torch.autograd.grad((lp * up).sum(), logits)
        return grad
    return lp

if variant == "native_inplace":
    x.requires_grad_(False)
step(prepare())  # warm-up: library initialisation and thread pools are not measured
logits = prepare()
before = status("VmRSS")
exact = reset_peak()
out = step(logits)
peak_extra = status("VmHWM") - before
del logits, out
times, cpu = [], []
for _ in range(repeat):
    logits = prepare()
    t0, c0 = time.perf_counter(), time.process_time()
    out = step(logits)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    del logits, out
print(json.dumps({"times": times, "cpu": cpu, "peak_extra_bytes": peak_extra, "peak_exact": exact,
                  "threads": torch.get_num_threads()}))
"""

# (variant, mode, extra environment)
VARIANTS = [
    ("torch", "fwd", {}),
    ("native", "fwd", {}),
    ("torch", "fwd_bwd", {}),
    ("torch+THP", "fwd_bwd", {"THP_MEM_ALLOC_ENABLE": "1"}),
    ("native", "fwd_bwd", {}),
    ("native_inplace", "fwd_bwd", {}),
]


def run_child(variant, mode, env_extra, args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), **env_extra)
    cmd = [sys.executable, "-c", CHILD, variant, mode, str(args.n), str(args.v), str(args.repeat), str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} {mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_info():
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    thp = ""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)), check=False).stdout.strip()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "transparent_hugepage": thp,
        "git_commit": commit,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (rows)")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size")
    p.add_argument("--repeat", type=int, default=5, help="timed steps per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch / OpenMP threads (0: torch's default)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu/native_N{n}_V{v}.json)")
    args = p.parse_args()

    load_before = os.getloadavg()
    results = []
    for variant, mode, env_extra in VARIANTS:
        r = run_child(variant, mode, env_extra, args)
        t_med, t_min = statistics.median(r["times"]), min(r["times"])
        logits_bytes = 4 * args.n * args.v
        results.append({
            "variant": variant, "mode": mode, "median_s": t_med, "min_s": t_min, "times_s": r["times"],
            "cpu_median_s": statistics.median(r["cpu"]),
            "peak_extra_mib": r["peak_extra_bytes"] / 2**20, "peak_exact": r["peak_exact"],
            "threads": r["threads"],
        })
        if variant.startswith("native"):  # bytes the native passes move (module docstring)
            results[-1]["native_gbps"] = (logits_bytes if mode == "fwd" else 3 * logits_bytes) / t_med / 1e9
        print(f"{variant:>15} {mode:>8}: median {t_med * 1e3:8.1f} ms  min {t_min * 1e3:8.1f} ms  "
              f"(cpu {statistics.median(r['cpu']) * 1e3:8.1f} ms)  peak extra {r['peak_extra_bytes'] / 2**20:8.1f} MiB",
              flush=True)

    def find(variant, mode):
        return next(r for r in results if r["variant"] == variant and r["mode"] == mode)

    def ratio(base, new):
        return {k: base[f] / new[f] for k, f in (("median", "median_s"), ("min", "min_s"), ("cpu", "cpu_median_s"))}

    speedups = {mode: ratio(find("torch", mode), find("native", mode)) for mode in ("fwd", "fwd_bwd")}
    speedups["fwd_bwd_vs_torch_thp"] = ratio(find("torch+THP", "fwd_bwd"), find("native", "fwd_bwd"))
    print("speed-up of native over the torch composition (wall median / wall min / CPU time):")
    for k, v in speedups.items():
        print(f"  {k:>22}: {v['median']:.2f}x / {v['min']:.2f}x / {v['cpu']:.2f}x")

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu",
                                   f"native_N{args.n}_V{args.v}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    record = {
        "benchmark": "token_logprobs fp32: fastrlhf native vs torch.log_softmax(x, -1).gather(...)",
        "command": " ".join(["python"] + sys.argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "N": args.n, "V": args.v, "dtype": "float32", "repeat": args.repeat,
        "machine": machine_info(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "expected_peak_extra_mib": {
            "native fwd": 3 * 4 * args.n / 2**20,
            "native fwd_bwd": (4 * args.n * args.v + 6 * 4 * args.n) / 2**20,
        },
        "results": results,
        "speedup": speedups,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
