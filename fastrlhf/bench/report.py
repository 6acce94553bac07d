"""Derived metrics, output checks, ratios; the table, CSVs, JSON and plots of a run.

GB/s        ``passes * N * V * bytes(dtype) / time``: the logits ops must read the logits once
            forward (1 pass); forward + backward reads them again and writes their gradient
            (3 passes). The minimum traffic of any implementation, so an "effective" bandwidth
            (a baseline's extra traffic lowers it). GAE: ``N * (4 + 4 + 1 + 4 + 4)`` bytes.
% peak      GB/s over the device's HBM peak (NVIDIA datasheets) or, on CPU, over a STREAM-like
            copy bandwidth measured in the same run with the same thread count.
TFLOP/s     fused-linear ops: ``matmuls * 2 * N * H * V / time`` (3 matmuls forward + backward:
            logits, d hidden, d weight; recomputed logits are not useful work).
ratios      for every fastrlhf row and every baseline at the same op and shape:
            speedup = baseline time / fastrlhf time, memory ratio = baseline / fastrlhf.
check       the first call's output (summed) against the ``torch`` row's: ``ok`` or ``MISMATCH``
            (loose tolerance: it guards against benchmarking a wrongly configured baseline).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from .registry import BASELINES, DTYPES, ELEM_BYTES, IMPL_ORDER, OPS, Shape

# Relative tolerance of the output check against the torch row (bf16 sums on GPU drift ~1e-3).
CHECK_RTOL = 2e-2

FORMULAS = {
    "bytes_logits_ops": "passes * N * V * bytes(dtype); forward 1 pass, forward+backward 3 passes "
                        "(read logits, read logits again, write their gradient)",
    "bytes_gae": "N * (4 + 4 + 1 + 4 + 4): rewards, values, bool mask read; advantages, returns written",
    "flops_linear_ops": "matmuls * 2 * N * H * V; forward+backward counts 3 matmuls (logits, dhidden, "
                        "dweight); recomputation not counted",
    "speedup": "baseline time / fastrlhf time",
    "mem_ratio": "baseline peak memory / fastrlhf peak memory (blank unless both >= 1 MiB)",
}


def report(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: str, plots: bool = True) -> None:
    """Derived metrics, checks and ratios; then results.csv, ratios.csv, results.json, PNGs and the table."""
    peak_bw = meta["peak_bandwidth_gbps"] * 1e9 if meta.get("peak_bandwidth_gbps") else None
    for r in rows:
        derive(r, peak_bw)
    op_order = list(OPS)
    rows.sort(key=lambda r: (op_order.index(r["op"]), r["V"], r["H"], r["N"], IMPL_ORDER.index(r["impl"])))
    ratios = add_checks_and_ratios(rows)
    write_csv(os.path.join(out_dir, "results.csv"), rows, ROW_FIELDS)
    write_csv(os.path.join(out_dir, "ratios.csv"), ratios, RATIO_FIELDS)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": rows, "ratios": ratios}, f, indent=1, default=str)
    written = write_plots(rows, out_dir, meta) if plots else []
    print(format_table(rows, ratios, meta))
    print(f"\nwrote {out_dir}/results.csv, ratios.csv, results.json and {len(written)} plot(s); "
          f"measured in {meta.get('elapsed_s', 0):.0f} s")


def rerender(path: str, out_dir: Optional[str], plots: bool) -> int:
    """``--from-json``: rebuild table, CSVs and plots of an earlier run without measuring again."""
    with open(path) as f:
        data = json.load(f)
    data["meta"]["formulas"] = FORMULAS  # the derived columns are recomputed with today's definitions
    report(data["results"], data["meta"], out_dir or os.path.dirname(os.path.abspath(path)), plots)
    return 0


def derive(row: dict[str, Any], peak_bw: Optional[float]) -> None:
    """Add bytes, GB/s, % of peak and TFLOP/s to a result row (in place)."""
    op = OPS[row["op"]]
    N, V, H = row["N"], row["V"], row["H"]
    t = row.get("time_ms")
    nbytes = None
    if op.kind == "logits":
        nbytes = op.passes * N * V * ELEM_BYTES[DTYPES[row["dtype"]]]
    elif op.kind == "gae":
        nbytes = N * (4 + 4 + 1 + 4 + 4)
    flops = op.matmuls * 2 * N * H * V if op.kind == "linear" else None
    row["bytes"] = nbytes
    row["flops"] = flops
    row["gbps"] = nbytes / (t * 1e-3) / 1e9 if (nbytes and t) else None
    row["pct_peak"] = 100 * row["gbps"] * 1e9 / peak_bw if (row["gbps"] and peak_bw) else None
    row["tflops"] = flops / (t * 1e-3) / 1e12 if (flops and t) else None
    mem = row.get("peak_mem_bytes")
    row["peak_mem_mb"] = mem / 2**20 if mem is not None else None


def add_checks_and_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``check`` and ``speedup_vs_torch`` per row; return the fastrlhf-vs-baseline ratio table."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["N"], r["V"], r["H"]), {})[r["impl"]] = r
    ratios = []
    for (op, N, V, H), by_impl in groups.items():
        torch_row = by_impl.get("torch")
        tv = torch_row.get("check_value") if torch_row and torch_row["status"] == "ok" else None
        tt = torch_row.get("time_ms") if torch_row and torch_row["status"] == "ok" else None
        for r in by_impl.values():
            r["speedup_vs_torch"] = tt / r["time_ms"] if (tt and r.get("time_ms")) else None
            cv = r.get("check_value")
            if r["status"] != "ok" or cv is None or tv is None:
                r["check"] = None
            elif abs(cv - tv) <= CHECK_RTOL * max(abs(tv), 1e-3) or (math.isnan(cv) and math.isnan(tv)):
                r["check"] = "ok"
            else:
                r["check"] = f"MISMATCH ({cv:.6g} vs torch {tv:.6g})"
        for cand in by_impl.values():
            if not cand["impl"].startswith("fastrlhf") or cand["status"] != "ok":
                continue
            for base in BASELINES:
                b = by_impl.get(base)
                if b is None or b["status"] != "ok":
                    continue
                fm, bm = cand.get("peak_mem_mb"), b.get("peak_mem_mb")
                ratios.append({
                    "op": op, "N": N, "V": V, "H": H, "fastrlhf_impl": cand["impl"], "baseline": base,
                    "fastrlhf_time_ms": cand["time_ms"], "baseline_time_ms": b["time_ms"],
                    "speedup": b["time_ms"] / cand["time_ms"],
                    "fastrlhf_mem_mb": fm, "baseline_mem_mb": bm,
                    # below 1 MiB a side holds only a few [N] vectors: a ratio of it would be noise
                    "mem_ratio": bm / fm if (fm is not None and bm is not None and min(fm, bm) >= 1.0) else None,
                })
    return ratios


ROW_FIELDS = ("device", "op", "impl", "backend", "dtype", "N", "B", "T", "V", "H", "status", "reason", "note",
              "time_ms", "wall_ms", "cpu_ms", "time_ms_min", "reps", "bytes", "gbps", "pct_peak", "flops", "tflops",
              "peak_mem_mb", "speedup_vs_torch", "check", "check_value", "wall_s")
RATIO_FIELDS = ("op", "N", "V", "H", "fastrlhf_impl", "baseline", "fastrlhf_time_ms", "baseline_time_ms",
                "speedup", "fastrlhf_mem_mb", "baseline_mem_mb", "mem_ratio")


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def format_table(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cpu = meta["mode"] == "cpu"
    peak_name = "%copy" if cpu else "%peak"
    # CPU: "ms" is the --timer choice; the other clock is shown beside it.
    other = ("cpu_ms" if meta.get("timer_choice") == "wall" else "wall_ms") if cpu else None
    head = ("shape", "impl", "ms", *((other.replace("_", " "),) if other else ()), "GB/s", peak_name, "TFLOP/s",
            "mem MB", "x torch", "check / reason")
    lines = [f"# fastrlhf bench -- {meta['device']} ({meta['dtype']}, {meta.get('threads') or ''} threads)".rstrip()]
    if meta.get("peak_bandwidth_gbps"):
        lines.append(f"# peak bandwidth: {meta['peak_bandwidth_gbps']:.1f} GB/s ({meta['peak_bandwidth_source']})")
    for op_name in dict.fromkeys(r["op"] for r in rows):
        # The run's own description of the op: an older results.json may use a name differently.
        doc = meta.get("ops", {}).get(op_name) or OPS[op_name].doc
        lines.append("")
        lines.append(f"## {op_name}: {doc}")
        body = []
        for r in rows:
            if r["op"] != op_name:
                continue
            shape = Shape(r["B"], r["T"], r["V"], r["H"]).label()
            tail = r.get("check") or "" if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
            if r["status"] == "ok" and r.get("note"):
                tail = f"{tail} ({r['note']})".strip()
            body.append((shape, r["impl"], _fmt(r.get("time_ms"), ".4g"),
                         *((_fmt(r.get(other), ".4g"),) if other else ()), _fmt(r.get("gbps"), ".1f"),
                         _fmt(r.get("pct_peak"), ".1f"), _fmt(r.get("tflops"), ".2f"),
                         _fmt(r.get("peak_mem_mb"), ".1f"), _fmt(r.get("speedup_vs_torch"), ".2f"), tail))
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head[:-1])]
        lines.extend("  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "  " + cols[-1]
                     for cols in (head, *body))
    if ratios:
        lines.append("")
        lines.append("## fastrlhf vs each baseline "
                     "(speedup = baseline time / fastrlhf time; mem = baseline / fastrlhf peak memory)")
        for r in ratios:
            shape = Shape(1, r["N"], r["V"], r["H"]).label()
            lines.append(f"{r['op']:<24} {shape:<24} {r['fastrlhf_impl']:<18} vs {r['baseline']:<14} "
                         f"speedup {r['speedup']:6.2f}x   mem {_fmt(r['mem_ratio'], '.2f')}x")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def write_plots(rows: list[dict[str, Any]], out_dir: str, meta: dict[str, Any]) -> list[str]:
    """One PNG per (op, V, H): time and peak memory vs N, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    keys = dict.fromkeys((r["op"], r["V"], r["H"]) for r in rows)
    for op_name, V, H in keys:
        sel = [r for r in rows if (r["op"], r["V"], r["H"]) == (op_name, V, H) and r["status"] == "ok"]
        if not sel:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in sel)]
        for impl in impls:
            pts = sorted((r["N"], r["time_ms"], r.get("peak_mem_mb")) for r in sel if r["impl"] == impl)
            style = dict(marker="o", linewidth=2.2 if impl.startswith("fastrlhf") else 1.3,
                         linestyle="-" if impl.startswith("fastrlhf") else "--")
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=impl, **style)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                ax_m.plot([p[0] for p in mem], [max(p[1], 1e-2) for p in mem], label=impl, **style)
        clock = {"wall": "wall", "cpu": "CPU"}.get(meta.get("timer_choice"), "GPU")
        for ax, ylabel in ((ax_t, f"median {clock} time per call (ms)"),
                           (ax_m, "peak memory added by the call (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        shape = f"V={V}" + (f", H={H}" if H else "") if V else ""
        fig.suptitle(f"{op_name} {shape} -- {meta['device']}, {meta['dtype']}", fontsize=10)
        fig.tight_layout()
        name = op_name + (f"_V{V}" if V else "") + (f"_H{H}" if H else "") + ".png"
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
