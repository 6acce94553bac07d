"""Native C++ CPU backend vs the plain PyTorch composition and the element-wise floor, side by side.

Baseline (what a trainer writes): ``torch.log_softmax(x, -1).gather(-1, labels[:, None])``
and its autograd. It reads the logits, writes the ``[N, V]`` log-softmax, and its backward
allocates a zero ``[N, V]`` for the gather's gradient and another ``[N, V]`` for the result.
``fastrlhf.token_logprobs(x, labels, backend="native")`` reads the logits once in forward
(writing ``3 x N`` floats), and once more in backward, writing only the gradient.
Floor: ``torch.exp(x, out=y)`` on the same logits into a preallocated, already touched
``y`` -- one exp per element, one read and one write, no allocation: a forward that must
compute an exp of every logit cannot beat it by much.

Bytes moved by the native path (fp32): forward ``4 N V`` read; backward ``4 N V`` read +
``4 N V`` written; the GB/s columns use these formulas. ``ns/elem/core`` is
``wall time x threads / (N V)`` (``cpu ns/elem``: process CPU time of all threads / (N V)).

Transparent huge pages (THP), per variant: ``torch`` runs with THP switched off for its
process by ``prctl(PR_SET_THP_DISABLE)`` (so it gets 4 KiB pages whatever the system's THP
mode); ``torch+THP`` runs with THP allowed and ``THP_MEM_ALLOC_ENABLE=1`` (torch's allocator
then madvises its large blocks, c10/core/alloc_cpu.cpp); ``native`` runs with THP allowed
(the backward madvises its gradient buffer, csrc/rows.cpp); ``native-noTHP`` is native with
THP switched off like ``torch``. With the system in ``never`` mode no variant gets huge
pages; the JSON records the mode and each child's ``AnonHugePages`` after one step.

Each variant runs in a fresh subprocess: it builds the inputs, resets the peak-RSS mark
(``/proc/self/clear_refs``), runs one warm-up step, records ``VmHWM - VmRSS(before)`` (the
memory the step itself added at its peak), then times ``--repeat`` steps. The variants run
in ``--rounds`` interleaved rounds (each round runs every variant once) and the medians are
over all rounds' steps, so that load from other processes on a shared machine hits every
variant alike. glibc's malloc keeps freed mid-sized blocks in its arenas, so
``MALLOC_MMAP_THRESHOLD_=1 MiB`` is set for the children: every large tensor is an mmap
returned on free and the peak RSS is the peak of live tensors.

Usage: ``python benchmarks/bench_native_cpu.py [--n 4096 --v 32000 --repeat 5 --rounds 3 --threads 0]``
(``--threads 0``: torch's default). Writes ``benchmarks/results/cpu/native_N{n}_V{v}.json``
and a markdown table beside it. Linux only (reads ``/proc``). Not a test: it times, it
asserts nothing; it prints whether the targets (forward >= 3x the composition,
forward+backward >= 2x the composition with THP, forward <= 1.5x the exp floor) were met.
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
import ctypes, json, sys, time

variant, mode, N, V, repeat, threads, no_thp = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
thp_disabled = False
if no_thp:  # before any large allocation: PR_SET_THP_DISABLE = 41, PR_GET_THP_DISABLE = 42
    libc = ctypes.CDLL(None, use_errno=True)
    thp_disabled = libc.prctl(41, 1, 0, 0, 0) == 0 and libc.prctl(42, 0, 0, 0, 0) == 1

import torch
import fastrlhf
from fastrlhf import _native

if threads > 0:
    torch.set_num_threads(threads)

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)

def anon_huge_bytes():
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1

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

y = torch.empty_like(x).fill_(0.0) if variant == "exp_floor" else None  # touched: no page faults

def prepare():
    if variant == "native_inplace":
        # Stands for the model's logits, which the backward overwrites: made outside the timing.
        return x.detach().clone().requires_grad_()
    return x

def step(logits):
    if variant == "exp_floor":
        return torch.exp(logits, out=y)
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
huge = anon_huge_bytes()
del logits, out
times, cpu = [], []
for _ in range(repeat):
    logits = prepare()
    t0, c0 = time.perf_counter(), time.process_time()
    out = step(logits)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    del logits, out
simd = _native._ext().simd_level() if _native.available() else None
print(json.dumps({"times": times, "cpu": cpu, "peak_extra_bytes": peak_extra, "peak_exact": exact,
                  "threads": torch.get_num_threads(), "thp_disabled": thp_disabled, "anon_huge_bytes": huge,
                  "simd": simd}))
"""

THP_ON = {"THP_MEM_ALLOC_ENABLE": "1"}
# (variant, mode, extra environment, THP switched off for the process)
VARIANTS = [
    ("exp_floor", "fwd", {}, False),
    ("torch", "fwd", {}, True),
    ("torch+THP", "fwd", THP_ON, False),
    ("native", "fwd", {}, False),
    ("torch", "fwd_bwd", {}, True),
    ("torch+THP", "fwd_bwd", THP_ON, False),
    ("native", "fwd_bwd", {}, False),
    ("native-noTHP", "fwd_bwd", {}, True),
    ("native_inplace", "fwd_bwd", {}, False),
]
# targets: (name, numerator variant/mode, denominator variant/mode, bound, kind)
TARGETS = [
    ("forward: torch / native >= 3", ("torch", "fwd"), ("native", "fwd"), 3.0, "min"),
    ("forward+backward: torch+THP / native >= 2", ("torch+THP", "fwd_bwd"), ("native", "fwd_bwd"), 2.0, "min"),
    ("forward: native / exp floor <= 1.5", ("native", "fwd"), ("exp_floor", "fwd"), 1.5, "max"),
]


def run_child(variant, mode, env_extra, no_thp, args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), **env_extra)
    if variant == "native-noTHP":
        variant = "native"
    cmd = [sys.executable, "-c", CHILD, variant, mode, str(args.n), str(args.v), str(args.repeat), str(args.threads),
           str(int(no_thp))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} {mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_info():
    import torch

    from fastrlhf import _native

    cpu, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    simd_flags = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "sse4", "amx")))
    compiler = ""
    if _native.available():
        try:  # the compiler that built _C, from its .comment section
            comment = subprocess.run(["readelf", "-p", ".comment", _native._ext().__file__], capture_output=True,
                                     text=True, check=False).stdout
            compiler = "; ".join(sorted({ln.split("]", 1)[1].strip() for ln in comment.splitlines() if "]" in ln}))
        except OSError:
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
        "cpu_simd_flags": simd_flags,
        "logical_cpus": os.cpu_count(),
        "native_simd": _native._ext().simd_level() if _native.available() else None,
        "native_simd_levels": _native._ext().simd_levels() if _native.available() else [],
        "native_compiler": compiler,
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
    p.add_argument("--repeat", type=int, default=5, help="timed steps per variant and round (after one warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each runs every variant once)")
    p.add_argument("--threads", type=int, default=0, help="torch / OpenMP threads (0: torch's default)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu/native_N{n}_V{v}.json)")
    args = p.parse_args()

    load_before = os.getloadavg()
    elems = args.n * args.v
    logits_bytes = 4 * elems
    raw = {(v, m): [] for v, m, _, _ in VARIANTS}
    for rnd in range(args.rounds):
        for variant, mode, env_extra, no_thp in VARIANTS:
            r = run_child(variant, mode, env_extra, no_thp, args)
            raw[variant, mode].append(r)
            print(f"round {rnd + 1}/{args.rounds} {variant:>15} {mode:>8}: "
                  f"median {statistics.median(r['times']) * 1e3:8.1f} ms", flush=True)

    results = []
    for variant, mode, _, no_thp in VARIANTS:
        rs = raw[variant, mode]
        times = [t for r in rs for t in r["times"]]
        cpu = [c for r in rs for c in r["cpu"]]
        threads = rs[0]["threads"]
        t_med, t_min, c_med = statistics.median(times), min(times), statistics.median(cpu)
        row = {
            "variant": variant, "mode": mode, "median_s": t_med, "min_s": t_min, "times_s": times,
            "cpu_median_s": c_med, "threads": threads,
            "ns_per_elem_core": t_med * threads / elems * 1e9,
            "cpu_ns_per_elem": c_med / elems * 1e9,
            "peak_extra_mib": max(r["peak_extra_bytes"] for r in rs) / 2**20,
            "peak_exact": all(r["peak_exact"] for r in rs),
            "thp": "disabled (prctl)" if no_thp else ("allowed, THP_MEM_ALLOC_ENABLE=1" if variant == "torch+THP"
                                                       else "allowed"),
            "thp_disabled_ok": all(r["thp_disabled"] for r in rs) if no_thp else None,
            "anon_huge_mib_after_step": max(r["anon_huge_bytes"] for r in rs) / 2**20,
            "simd": rs[0]["simd"],
        }
        if variant.startswith("native"):  # bytes the native passes move (module docstring)
            row["native_gbps"] = (logits_bytes if mode == "fwd" else 3 * logits_bytes) / t_med / 1e9
        results.append(row)

    def find(variant, mode):
        return next(r for r in results if r["variant"] == variant and r["mode"] == mode)

    def ratio(base, new):
        return {k: base[f] / new[f] for k, f in (("median", "median_s"), ("min", "min_s"), ("cpu", "cpu_median_s"))}

    speedups = {mode: ratio(find("torch", mode), find("native", mode)) for mode in ("fwd", "fwd_bwd")}
    speedups["fwd_vs_torch_thp"] = ratio(find("torch+THP", "fwd"), find("native", "fwd"))
    speedups["fwd_bwd_vs_torch_thp"] = ratio(find("torch+THP", "fwd_bwd"), find("native", "fwd_bwd"))
    speedups["fwd_native_over_exp_floor"] = ratio(find("native", "fwd"), find("exp_floor", "fwd"))
    targets = []
    for name, num, den, bound, kind in TARGETS:
        value = find(*num)["median_s"] / find(*den)["median_s"]
        targets.append({"target": name, "value": value, "met": value >= bound if kind == "min" else value <= bound})

    table = markdown_table(results, speedups, targets, args)
    print(table)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu",
                                   f"native_N{args.n}_V{args.v}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    record = {
        "benchmark": "token_logprobs fp32: fastrlhf native vs torch.log_softmax(x, -1).gather(...)",
        "command": " ".join(["python"] + sys.argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "N": args.n, "V": args.v, "dtype": "float32", "repeat": args.repeat,
        "machine": machine_info(),
        "rounds": args.rounds,
        "load_average_before_after": [load_before, os.getloadavg()],
        "expected_peak_extra_mib": {
            "native fwd": 3 * 4 * args.n / 2**20,
            "native fwd_bwd": (4 * args.n * args.v + 6 * 4 * args.n) / 2**20,
        },
        "results": results,
        "speedup": speedups,
        "targets": targets,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"# `{record['command']}`\n\n")
        m = record["machine"]
        f.write(f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({', '.join(m['cpu_simd_flags'])}); "
                f"native kernels `{m['native_simd']}` built by {m['native_compiler'] or 'unknown compiler'}; "
                f"torch {m['torch']} ({m['torch_cpu_capability']}); THP `{m['transparent_hugepage']}`; "
                f"git {m['git_commit']}; {record['date_utc']}; load average before/after "
                f"{record['load_average_before_after'][0][0]:.2f} / {record['load_average_before_after'][1][0]:.2f}."
                f"\n\n{table}\n")
    print(f"wrote {out} and {md}")


def markdown_table(results, speedups, targets, args):
    lines = [
        f"N={args.n}, V={args.v}, fp32; medians over {args.rounds} interleaved rounds x {args.repeat} steps.",
        "",
        "| variant | pass | THP | median ms | ns/elem/core | cpu ns/elem | peak extra MiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['variant']} | {r['mode']} | {r['thp']} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['ns_per_elem_core']:.2f} | {r['cpu_ns_per_elem']:.2f} | {r['peak_extra_mib']:.1f} |")
    lines += ["", "| ratio (wall median / wall min / CPU time) | value |", "|---|---|"]
    for k, v in speedups.items():
        lines.append(f"| {k} | {v['median']:.2f}x / {v['min']:.2f}x / {v['cpu']:.2f}x |")
    lines += ["", "| target (wall medians) | value | met |", "|---|---:|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['value']:.2f} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
