"""Issue 13's GPU comparison in one short run: fastrlhf vs Liger-Kernel vs TRL's Triton kernel vs
plain torch vs torch.compile at N = 16384, V = 151936, bf16 (called by ``gpu_check.sh``).

Cases (``--list`` prints them; fastrlhf's public ops, every baseline through its own public API):
  logp-fwd              token log-probs, no grad                         passes 1
  logp-entropy-fwd      log-probs + entropy, no grad                     passes 1
  logp-fwdbwd           log-probs forward + backward, random upstream    passes 3
  grpo                  fused GRPO (k3, beta 0.04, token-mean) fwd+bwd, upstream gradient 1     passes 3
  grpo-dloss0.25        the same, upstream gradient 0.25                 passes 3
  grpo-half-ignored     the same, 50% of the tokens masked (upstream 1)  passes 3 (all rows counted)
  linear-grpo           fused-linear GRPO at H = 4096 from hidden [N, H] and weight [V, H], fwd+bwd
  lm-head-matmul        the bare ``hidden @ weight.T`` forward + backward to both (what any loss adds to)

Bandwidth: ``bytes = passes x N x V x 2`` (bf16): the least traffic any implementation has; GB/s
is effective (``bytes / median time``), % of HBM peak against NVIDIA's datasheets: H100 SXM
3.35 TB/s, H100 PCIe 2.0 TB/s, H100 NVL 3.9 TB/s, H200 4.8 TB/s. The fused-linear cases report
TFLOP/s of the three useful matmuls, ``3 x 2 N H V``. Time: CUDA events around single calls,
median of up to ``--reps`` calls after one untimed call (which compiles torch.compile and the
Triton kernels); no L2 flush: the 5 GB logits dwarf the 50 MB L2. Peak memory:
``max_memory_allocated`` over one call minus what was allocated before it (the inputs).

Order: every eager case first, then the torch.compile ones (compiling dominates a short window);
cases not started before ``--deadline-s`` are recorded as skipped with that reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

B, T, V, H = 16, 1024, 151936, 4096
N = B * T
GRPO_BETA, CLIP_EPS = 0.04, 0.2
PEAK_BYTES_PER_S = [  # (substring of the device name, bytes/s, source); first match wins
    ("H200", 4.8e12, "NVIDIA H200 datasheet"),
    ("H100 NVL", 3.9e12, "NVIDIA H100 NVL datasheet"),
    ("H100 PCIe", 2.0e12, "NVIDIA H100 PCIe datasheet"),
    ("H100", 3.35e12, "NVIDIA H100 SXM datasheet"),
]
CASES = {  # name: (passes of N x V bf16, or None for the matmul cases, description)
    "logp-fwd": (1, "token log-probs, no grad"),
    "logp-entropy-fwd": (1, "log-probs + entropy, no grad"),
    "logp-fwdbwd": (3, "log-probs forward + backward, random upstream gradient"),
    "grpo": (3, "fused GRPO fwd+bwd, upstream gradient 1"),
    "grpo-dloss0.25": (3, "fused GRPO fwd+bwd, upstream gradient 0.25"),
    "grpo-half-ignored": (3, "fused GRPO fwd+bwd, 50% of tokens masked"),
    "linear-grpo": (None, "fused-linear GRPO, H=4096, fwd+bwd to hidden and weight"),
    "lm-head-matmul": (None, "bare hidden @ weight.T fwd + bwd to both"),
}
IMPLS = {
    "logp-fwd": ("fastrlhf", "liger-ce", "liger-sls", "trl", "torch", "torch.compile"),
    "logp-entropy-fwd": ("fastrlhf", "trl", "torch", "torch.compile"),
    "logp-fwdbwd": ("fastrlhf", "liger-ce", "trl", "torch", "torch.compile"),
    "grpo": ("fastrlhf", "liger", "trl", "torch", "torch.compile"),
    "grpo-dloss0.25": ("fastrlhf", "liger", "trl", "torch", "torch.compile"),
    "grpo-half-ignored": ("fastrlhf", "liger", "trl", "torch", "torch.compile"),
    "linear-grpo": ("fastrlhf", "liger", "torch", "torch.compile"),
    "lm-head-matmul": ("torch",),
}


class Skip(Exception):
    pass


def plan():
    """``[(case, impl)]`` in run order: eager first, torch.compile last."""
    pairs = [(c, i) for c in CASES for i in IMPLS[c]]
    return [p for p in pairs if p[1] != "torch.compile"] + [p for p in pairs if p[1] == "torch.compile"]


def _inputs(torch, case, dev):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, T), generator=g).to(dev)  # [B, T]
    inp = {"labels": labels}
    if case in ("linear-grpo", "lm-head-matmul"):
        inp["hidden"] = (torch.randn(B, T, H, generator=g) * 0.5).to(dev, torch.bfloat16).requires_grad_()
        inp["weight"] = (torch.randn(V, H, generator=g) * H ** -0.5).to(dev, torch.bfloat16).requires_grad_()
    else:
        logits = torch.empty(B, T, V, device=dev, dtype=torch.bfloat16)  # [B, T, V], 5 GB
        logits.normal_(0, 2, generator=torch.Generator(dev).manual_seed(0))
        inp["logits"] = logits.requires_grad_(case not in ("logp-fwd", "logp-entropy-fwd"))
    base = -math.log(V)
    inp["old"] = (base + 0.05 * torch.randn(B, T, generator=g)).to(dev)  # [B, T]
    inp["ref"] = (base + 0.05 * torch.randn(B, T, generator=g)).to(dev)  # [B, T]
    inp["adv"] = torch.randn(B, generator=g).to(dev)  # [B] per sequence
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    if case == "grpo-half-ignored":
        mask[:, : T // 2] = False  # prompt-like half of every row
    inp["mask"] = mask
    inp["gout"] = torch.randn(B, T, generator=g).to(dev)  # [B, T] upstream gradient
    return inp


def _compiled(torch, f):
    return torch.compile(f, dynamic=False)


def build(torch, case, impl, inp):
    """A zero-argument callable doing one timed call of ``impl`` on ``case``."""
    import fastrlhf
    from fastrlhf import reference as ref

    labels, mask = inp["labels"], inp["mask"]
    grad = lambda out, wrt, gout=None: torch.autograd.grad(out, wrt, gout)  # noqa: E731

    if case in ("logp-fwd", "logp-entropy-fwd", "logp-fwdbwd"):
        logits = inp["logits"]
        ent = case == "logp-entropy-fwd"
        if impl == "fastrlhf":
            f = (lambda: fastrlhf.token_logprobs_and_entropy(logits, labels)) if ent else \
                (lambda: fastrlhf.token_logprobs(logits, labels))
        elif impl in ("torch", "torch.compile"):
            r = ref.token_logprobs_and_entropy if ent else ref.token_logprobs
            r = _compiled(torch, r) if impl == "torch.compile" else r
            f = lambda: r(logits, labels)  # noqa: E731
        elif impl == "trl":
            from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

            # TRL's Triton kernel computes both; for log-probs only the entropy is extra work.
            f = (lambda: selective_log_softmax_and_entropy(logits, labels)) if ent else \
                (lambda: selective_log_softmax_and_entropy(logits, labels)[0])
        elif impl == "liger-ce":
            from liger_kernel.transformers.functional import liger_cross_entropy

            f = lambda: -liger_cross_entropy(logits.view(-1, V), labels.view(-1), reduction="none").view(B, T)  # noqa
        elif impl == "liger-sls":
            from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

            full = torch.empty(B, T + 1, V, device=logits.device, dtype=logits.dtype)  # [B, T + 1, V]
            full[:, :T].copy_(logits)
            ids = torch.cat([labels, labels[:, :1]], 1)  # [B, T + 1]
            f = lambda: fused_selective_log_softmax(full, ids, temperature=1.0)  # noqa: E731
        else:
            raise Skip(f"{impl} has no {case}")
        if case != "logp-fwdbwd":
            return f
        return lambda: grad(f(), logits, inp["gout"])

    if case.startswith("grpo"):
        logits, old, refl, adv = inp["logits"], inp["old"], inp["ref"], inp["adv"]
        dloss = torch.tensor(0.25 if case == "grpo-dloss0.25" else 1.0, device=logits.device)
        kw = dict(beta=GRPO_BETA, mask=mask, clip_low=CLIP_EPS, loss_agg="token-mean")
        if impl == "fastrlhf":
            loss = lambda: fastrlhf.grpo_loss(logits, labels, old, adv, refl, **kw)[0]  # noqa: E731
        elif impl in ("torch", "torch.compile"):
            r = ref.grpo_loss if impl == "torch" else _compiled(torch, ref.grpo_loss)
            loss = lambda: r(logits, labels, old, adv, refl, **kw)[0]  # noqa: E731
        elif impl == "trl":
            from trl.trainer.utils import selective_log_softmax

            m = mask.float()
            loss = lambda: ref.ppo_clip_loss_from_logprobs(  # noqa: E731  TRL's GRPOTrainer: its kernel + loss math
                selective_log_softmax(logits, labels), m, old, adv, clip_low=CLIP_EPS, ref_logprobs=refl,
                kl_coef=GRPO_BETA, loss_agg="token-mean")[0]
        elif impl == "liger":
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            full = torch.empty(B, T + 1, V, device=logits.device, dtype=logits.dtype)  # [B, T + 1, V]
            full[:, :T].copy_(logits.detach())
            full.requires_grad_(True)
            m = mask.int().contiguous()
            loss = lambda: triton_grpo_loss(  # noqa: E731
                full, old, refl, labels, adv, completion_mask=m, temperature=1.0, beta=GRPO_BETA, eps_low=CLIP_EPS,
                eps_high=CLIP_EPS, inplace=True, loss_type="dapo", reduce=True)[0]
            return lambda: grad(loss(), full, dloss)
        else:
            raise Skip(f"{impl} has no {case}")
        return lambda: grad(loss(), logits, dloss)

    hidden, weight = inp["hidden"], inp["weight"]
    if case == "lm-head-matmul":
        gl = torch.randn(B, T, V, device=hidden.device, dtype=hidden.dtype)  # [B, T, V] upstream
        return lambda: grad(hidden @ weight.T, (hidden, weight), gl)
    old, refl, adv = inp["old"], inp["ref"], inp["adv"]
    kw = dict(beta=GRPO_BETA, mask=mask, clip_low=CLIP_EPS, loss_agg="token-mean")
    if impl == "fastrlhf":
        loss = lambda: fastrlhf.linear_grpo_loss(hidden, weight, labels, old, adv, refl, **kw)[0]  # noqa: E731
    elif impl in ("torch", "torch.compile"):
        r = ref.linear_grpo_loss if impl == "torch" else _compiled(torch, ref.linear_grpo_loss)
        loss = lambda: r(hidden, weight, labels, old, adv, refl, **kw)[0]  # noqa: E731
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        mod = LigerFusedLinearGRPOLoss(beta=GRPO_BETA, compiled=True, epsilon_low=CLIP_EPS, epsilon_high=CLIP_EPS,
                                       loss_type="dapo", temperature=1.0)
        m = mask.int()
        loss = lambda: mod(hidden, weight, labels, m, adv, ref_per_token_logps=refl,  # noqa: E731
                           old_per_token_logps=old)[0]
    else:
        raise Skip(f"{impl} has no {case}")
    return lambda: grad(loss(), (hidden, weight))


def measure(torch, fn, reps, budget_s):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()  # untimed: compiles
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    times, start = [], time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), peak, first_s, len(times)


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _available(impl):
    mod = {"liger": "liger_kernel", "liger-ce": "liger_kernel", "liger-sls": "liger_kernel", "trl": "trl"}.get(impl)
    if mod is None:
        return None
    try:
        __import__(mod)
    except Exception as e:  # not installed, or its imports fail on this image
        return f"{mod} not importable ({type(e).__name__}: {e})"[:200]
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", choices=list(CASES), help="cases (default: all)")
    ap.add_argument("--impl", action="append", help="implementations (default: all of each case)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=2.0, help="timed seconds per measurement (at least 3 calls)")
    ap.add_argument("--deadline-s", type=float, default=240.0, help="start no case after this many seconds")
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json / gpu_check.md (default results/<gpu>)")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    todo = [(c, i) for c, i in plan() if (not args.case or c in args.case) and (not args.impl or i in args.impl)]
    if args.list:
        for c, i in todo:
            passes = CASES[c][0]
            print(f"{c:20s} {i:14s} {CASES[c][1]}" + (f"  (bytes = {passes} x N x V x 2)" if passes else ""))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (see --list)")
        return 0
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak_bw, peak_src = next(((bw, src) for key, bw, src in PEAK_BYTES_PER_S if key in name), (None, None))
    tag = next((k.split()[0].lower() for k, _, _ in PEAK_BYTES_PER_S if k in name), name.split()[-1].lower())
    out_dir = args.out or ROOT / "benchmarks" / "results" / tag
    t_start = time.perf_counter()
    rows, cur_case, inp = [], None, None
    for case, impl in todo:
        passes = CASES[case][0]
        row = {"case": case, "impl": impl, "N": N, "V": V, "H": H if passes is None else None}
        reason = _available(impl)
        if time.perf_counter() - t_start > args.deadline_s:
            reason = f"time budget: not started before {args.deadline_s:.0f} s"
        if reason:
            rows.append({**row, "status": "skipped", "reason": reason})
            print(f"{case:20s} {impl:14s} skipped: {reason}", flush=True)
            continue
        try:
            if case != cur_case:
                inp, cur_case = None, None
                torch.cuda.empty_cache()
                inp, cur_case = _inputs(torch, case, dev), case
            fn = build(torch, case, impl, inp)
            ms, peak, first_s, n = measure(torch, fn, args.reps, args.budget_s)
            row.update(status="ok", ms=round(ms, 4), reps=n, first_call_s=round(first_s, 2),
                       peak_mem_mb=round(peak / 2 ** 20, 1))
            if passes:
                gbps = passes * N * V * 2 / (ms * 1e-3) / 1e9
                row.update(bytes=passes * N * V * 2, gbps=round(gbps, 1),
                           pct_peak=round(100 * gbps * 1e9 / peak_bw, 1) if peak_bw else None)
            else:
                row.update(tflops=round(3 * 2 * N * H * V / (ms * 1e-3) / 1e12, 1))
            del fn
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # OOM, kernel error: recorded, the run goes on
            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
            traceback.print_exc()
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"{case:20s} {impl:14s} " + " ".join(f"{k}={row[k]}" for k in
              ("status", "ms", "gbps", "pct_peak", "tflops", "peak_mem_mb", "reason") if row.get(k) is not None),
              flush=True)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    meta = {
        "device": name, "peak_bytes_per_s": peak_bw, "peak_source": peak_src,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": _version("triton"), "fastrlhf_commit": commit, "liger_kernel": _version("liger-kernel"),
                     "trl": _version("trl"), "cuda": torch.version.cuda},
        "command": " ".join(sys.argv),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"N": N, "B": B, "T": T, "V": V, "H": H, "dtype": "bfloat16"},
        "formulas": {"bytes": "passes x N x V x 2", "tflops": "3 x 2 N H V / time"},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# gpu_check on {name}", "", f"Commit {commit}, torch {torch.__version__}, triton {_version('triton')}, "
             f"liger-kernel {_version('liger-kernel')}, trl {_version('trl')}; N={N}, V={V}, H={H}, bf16; "
             f"HBM peak {peak_bw} B/s ({peak_src}).", "",
             "| case | impl | ms | GB/s | % HBM peak | TFLOP/s | peak MB | status |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['case']} | {r['impl']} | {r.get('ms', '')} | {r.get('gbps', '')} | "
                     f"{r.get('pct_peak', '')} | {r.get('tflops', '')} | {r.get('peak_mem_mb', '')} | "
                     f"{r['status']}{': ' + r['reason'] if r.get('reason') else ''} |")
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/gpu_check.json and gpu_check.md")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
