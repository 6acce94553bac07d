"""``fastrlhf bench [op ...] [options]`` (also ``python -m fastrlhf.bench``): the sweep of a run.

Builds the (op, implementation, shape) tasks of a mode, measures each (:mod:`.measure`) and
writes the report (:mod:`.report`) under ``benchmarks/results/<device-tag>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Optional

import torch

import fastrlhf
from fastrlhf._backend import resolve_backend

from .cases import static_skip
from .env import cpu_model, default_out_dir, device_tag, gpu_peak_bandwidth, installed, versions
from .measure import Runner
from .registry import DTYPES, IMPL_ORDER, MODES, OPS, shapes_for
from .report import FORMULAS, report, rerender


def _parse_ints(s: Optional[str]) -> Optional[list[int]]:
    return [int(x) for x in s.split(",") if x.strip()] if s else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastrlhf bench",
        description="Benchmark fastrlhf ops against plain PyTorch, torch.compile, TRL, Liger-Kernel and "
                    "flash-attn in one run: table on stdout, CSV/JSON/PNG under benchmarks/results/<device>/.",
    )
    ops = ", ".join(f"{o.name} ({o.public})" for o in OPS.values())
    p.add_argument("ops", nargs="*", metavar="op", help=f"ops to run (default: all): {ops}")
    p.add_argument("--mode", choices=("cpu", "gpu"), default=None,
                   help="cpu: small shapes, fp32, perf_counter; gpu: RLHF shapes, bf16, do_bench "
                        "(default: gpu when CUDA is available)")
    p.add_argument("--impl", default=None, help="comma-separated implementations (default: all)")
    p.add_argument("--n", default=None, help="comma-separated token counts N (overrides the mode's sweep)")
    p.add_argument("--v", default=None, help="comma-separated vocabulary sizes V")
    p.add_argument("--h", default=None, help="comma-separated hidden sizes H (fused-linear ops)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="logits / hidden dtype")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per measurement (default 1: results comparable on a shared machine)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="CPU: the time behind ms, GB/s, ratios and plots: wall (perf_counter, default) or "
                        "this process's CPU time (process_time; immune to other processes on a shared machine, "
                        "meaningful with --threads 1). Both are always recorded (wall_ms, cpu_ms)")
    p.add_argument("--min-time", type=float, default=0.3, help="CPU: seconds of timed calls per measurement")
    p.add_argument("--min-reps", type=int, default=3, help="CPU: minimum timed calls")
    p.add_argument("--max-reps", type=int, default=50, help="CPU: maximum timed calls")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1; compiles torch.compile)")
    p.add_argument("--rep-ms", type=int, default=200, help="GPU: do_bench time budget per measurement (ms)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a measurement is abandoned")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one fresh process per measurement (always on CPU, where peak RSS needs it; "
                        "optional on GPU, where it survives a crashed kernel)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device-tag>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list ops and implementations, then exit")
    p.add_argument("--from-json", metavar="RESULTS_JSON", default=None,
                   help="re-render table, CSVs and plots from an earlier results.json (no measuring; "
                        "written next to it unless --out)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastrlhf bench [op ...] [options]``; returns the process exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.from_json:
        return rerender(args.from_json, args.out, plots=not args.no_plots)
    if args.list:
        for op in OPS.values():
            print(f"{op.name:<26} fastrlhf.{op.public}: {op.doc}\n{'':<26} impls: {', '.join(op.impls)}")
        return 0
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {list(OPS)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    mode = args.mode or ("gpu" if cuda else "cpu")
    if mode == "gpu" and not cuda:
        print("--mode gpu needs a CUDA device; none is available (use --mode cpu)", file=sys.stderr)
        return 2
    if args.warmup < 1:
        print("--warmup must be >= 1", file=sys.stderr)
        return 2
    cfg = MODES[mode]
    dtype = args.dtype or cfg.dtype
    device = "cuda" if mode == "gpu" else "cpu"
    isolate = True if mode == "cpu" else bool(args.isolate)
    if mode == "cpu" and args.isolate is False:
        print("note: CPU mode always isolates measurements (peak RSS is only meaningful per fresh process)",
              file=sys.stderr)
    impl_filter = [s.strip() for s in args.impl.split(",")] if args.impl else None
    if impl_filter:
        bad = [i for i in impl_filter if i not in IMPL_ORDER]
        if bad:
            print(f"unknown implementation(s) {bad}; choose from {list(IMPL_ORDER)}", file=sys.stderr)
            return 2

    backends = fastrlhf.available_backends()
    auto_backend = resolve_backend("auto", torch.device(device))
    if mode == "gpu":
        gpu_name = torch.cuda.get_device_name(0)
        tag, device_name = device_tag(mode, gpu_name), gpu_name
    else:
        tag, device_name = "cpu", f"{cpu_model()} ({os.cpu_count()} cores)"
    out_dir = args.out or default_out_dir(tag)
    os.makedirs(out_dir, exist_ok=True)

    n, v, h = _parse_ints(args.n), _parse_ints(args.v), _parse_ints(args.h)
    op_names = args.ops or list(OPS)
    tasks, rows = [], []
    for op_name in op_names:
        op = OPS[op_name]
        for shape in shapes_for(op, cfg, n, v, h):
            for impl in op.impls:
                if impl_filter and impl not in impl_filter:
                    continue
                if mode == "gpu" and impl.startswith("fastrlhf[") and impl != "fastrlhf[inplace]":
                    continue  # explicit backends: CPU mode only
                row = dict(device=tag, op=op_name, impl=impl, dtype=dtype, N=shape.N, B=shape.B, T=shape.T,
                           V=shape.V, H=shape.H, backend=_impl_backend(impl, auto_backend))
                reason = static_skip(op, impl, mode, backends, auto_backend)
                if reason:
                    row.update(status="skipped", reason=reason)
                    rows.append(row)
                    continue
                task = dict(op=op_name, impl=impl, shape=dataclasses.asdict(shape), dtype=dtype, device=device,
                            threads=args.threads, warmup=args.warmup, min_reps=args.min_reps,
                            max_reps=args.max_reps, min_time_s=args.min_time, rep_ms=args.rep_ms,
                            timer=args.timer)
                tasks.append((row, task))
                rows.append(row)

    # CPU mode preloads the baselines it will run into the fork server. GPU mode does not: importing
    # them may query CUDA, and a CUDA driver initialised before fork() is unusable in the children.
    used = {task["impl"] for _, task in tasks}
    heavy = {"torch.compile": "torch._inductor.compile_fx", "trl": "trl.trainer.utils",
             "liger": "liger_kernel.chunked_loss"}
    preload = [m for impl, m in heavy.items() if impl in used and installed(m.split(".")[0])] if mode == "cpu" else []
    runner = Runner(isolate, args.threads, args.timeout, preload)

    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety, not a requirement
        tqdm = None
    t_start = time.perf_counter()
    peak_bw = gpu_peak_bandwidth(device_name) if mode == "gpu" else None
    peak_src = "NVIDIA datasheet HBM bandwidth" if peak_bw else None
    copy_bw = runner.stream_bandwidth(args.threads, device, args.timer if mode == "cpu" else "wall")
    if mode == "cpu" and copy_bw:
        peak_bw = copy_bw
        peak_src = (f"measured STREAM-like copy (2 x 256 MiB / {args.timer} time of b.copy_(a), best of 8), "
                    f"{args.threads} thread(s)")
    elif peak_bw is None and copy_bw:  # a GPU without a datasheet entry: its measured copy bandwidth
        peak_bw = copy_bw
        peak_src = "measured device copy (2 x 1 GiB / time of b.copy_(a)); no datasheet entry for this GPU"
    bar = tqdm(total=len(tasks), desc="fastrlhf bench", unit="run", file=sys.stderr, dynamic_ncols=True) \
        if tqdm else None
    for row, task in tasks:
        if bar:
            bar.set_postfix_str(f"{row['op']} {row['impl']} N={row['N']} V={row['V']}", refresh=False)
        row.update(runner.run(task))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    elapsed = time.perf_counter() - t_start

    for r in rows:
        r.setdefault("status", "error")
    meta = {
        "mode": mode,
        "device": device_name,
        "device_tag": tag,
        "dtype": dtype,
        "threads": args.threads if mode == "cpu" else None,
        "isolated_processes": isolate,
        "timer_choice": args.timer if mode == "cpu" else "cuda-events",
        "auto_backend": auto_backend,
        "available_backends": backends,
        "versions": versions(),
        "command": "fastrlhf bench " + " ".join(list(sys.argv[1:] if argv is None else argv)),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "host": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()},
        "peak_bandwidth_gbps": peak_bw / 1e9 if peak_bw else None,
        "peak_bandwidth_source": peak_src,
        "measured_copy_bandwidth_gbps": copy_bw / 1e9 if copy_bw else None,
        "timer": "triton.testing.do_bench (CUDA events, median)" if mode == "gpu"
        else (f"{'time.process_time' if args.timer == 'cpu' else 'time.perf_counter'} median of >= "
              f"{args.min_reps} calls and >= {args.min_time} s after {args.warmup} warm-up call(s) and the memory "
              "call; wall_ms (perf_counter) and cpu_ms (process_time) both recorded"),
        "memory": "torch.cuda.max_memory_allocated - memory_allocated before the call" if mode == "gpu"
        else "VmHWM - VmRSS around one call in a fresh process (clear_refs=5, mallopt mmap threshold 64 KiB)",
        "formulas": FORMULAS,
        "ops": {name: OPS[name].doc for name in op_names},
    }
    report(rows, meta, out_dir, plots=not args.no_plots)
    return 0


def _impl_backend(impl: str, auto_backend: str) -> str:
    if impl in ("fastrlhf", "fastrlhf[inplace]"):
        return auto_backend
    if impl.startswith("fastrlhf["):
        return impl[len("fastrlhf["):-1]
    return ""
