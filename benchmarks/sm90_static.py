"""Static issue-rate analysis of the Triton kernels on Hopper (sm_90a), without a GPU.

A memory-bound row kernel is fast only if the SM can issue its instructions faster than HBM
delivers the bytes. This tool compiles every Triton kernel of ``fastrlhf/kernels`` (and the
same jobs from Liger-Kernel, compiled only, never run) for sm_90a with exactly the
specialisation its launcher produces at N = 16384 rows, V = 151936, bf16, disassembles the
cubin with the triton wheel's own ``nvdisasm``/``ptxas``, and reports per kernel pass:
registers, spill bytes, shared memory, the global load/store widths in the steady loop, SASS
issue slots per element and the issue time against HBM time on H100 and H200.

How a launch is specialised (the point of this tool; ``tests/test_sm90_static.py`` runs it):
  1. The package's real launcher (``fastrlhf.kernels.logprobs.logprobs_forward``, ...) is called
     with ``meta`` tensors of the production shapes (no memory; ``data_ptr() == 0`` is 16-byte
     aligned like the CUDA caching allocator's blocks) while ``JITFunction.run`` is replaced by a
     recorder: we get (kernel, args, kwargs, grid) exactly as the launcher builds them.
  2. Triton's own binder (``create_function_from_signature`` + ``JITFunction._pack_args``, what
     ``JITFunction.run`` calls) turns them into the signature, constexprs and attributes: a
     stride equal to 1 becomes a constexpr, pointers and ints divisible by 16 get
     ``tt.divisibility = 16``, ints above 2^31 become i64.
  3. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``; capability 90 makes
     Triton emit PTX for ``sm_90a`` and run ``ptxas --gpu-name=sm_90a`` (see
     ``sm_arch_from_capability`` in ``triton/backends/nvidia/compiler.py``).

How slots per element are counted:
  * ``nvdisasm -c`` lists the SASS with branch labels. A loop is a backward ``BRA`` (target at
    or before the branch); the steady loop of a pass is an outermost loop whose body contains
    a global load (``LDG``). A kernel with two loops over V (lse pass, then gradient pass)
    has two passes; a pass is ``lse`` if its loop has no global store, ``grad`` if it has.
  * Every SASS instruction in the loop body (loop label through the backward branch,
    predicated-off ones included: they still take an issue slot) is one issue slot of one warp
    scheduler. Hopper has no dual issue: a scheduler issues at most one warp instruction per
    clock, so a body of ``I`` instructions costs ``I`` scheduler cycles per warp per trip.
  * Elements per thread per trip = ``BLOCK / (32 x num_warps)`` times the unroll factor ptxas
    chose (total ``LDG`` bits in the body / (elements per thread x element bits); 1 today).
    ``slots_per_elem = I / elements per thread per trip``. The loop is not peeled, so the
    masked last block runs the same body: the tail is included.
  * Not counted: instructions outside the loop (per-row setup and epilogue, amortised over V),
    subroutines called from the loop (none in these kernels), and extra pipe occupancy of
    slow units: ``MUFU`` (ex2, lg2, rcp) is reported separately, its pipe retires 16 lanes
    per clock per SM, i.e. one warp ``MUFU`` per 8 clocks per scheduler.

Budget: issue ceiling = 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz = 33.45 T lane-instr/s
for both H100 SXM and H200 (same GH100 die and boost clock; NVIDIA H100 datasheet and Hopper
whitepaper: 132 SMs, 1980 MHz max boost). HBM peak: H100 SXM 3.35 TB/s, H200 4.8 TB/s (NVIDIA
datasheets). A pass moving ``b`` bytes per element is issue-bound unless
``slots_per_elem <= 33.45 / 4.8 x b = 6.97 b`` on H200 (``9.99 b`` on H100);
``issue/HBM`` = ``slots_per_elem / budget``, above 100% the SM cannot keep HBM busy.

Usage (no ``TRITON_INTERPRET`` in the environment: interpreter-decorated kernels do not compile):
  python benchmarks/sm90_static.py                  # table (fastrlhf + Liger, all jobs)
  python benchmarks/sm90_static.py --json           # one object per pass (impl, kernel, job, regs, ...)
  python benchmarks/sm90_static.py --json --detail  # + smem, mufu, opcode histogram, arch, ...
  python benchmarks/sm90_static.py --impl fastrlhf --job grpo-fused --sass /tmp/sass
  python benchmarks/sm90_static.py --check          # the slot targets; exit 1 if unmet
From Python (a process without TRITON_INTERPRET): ``analyze(impls, jobs, archs)`` returns a list
of ``PassResult``; ``KernelResult``s (compile facts per launch) are in ``analyze_kernels``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The production job size: 16 sequences x 1024 tokens, Qwen2.5's vocabulary, bf16.
B, T, V = 16, 1024, 151936
N = B * T

# Issue ceiling: 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz (GH100, H100 SXM and H200 alike).
SMS, SCHEDULERS, LANES, CLOCK_HZ = 132, 4, 32, 1.98e9
ISSUE_LANE_INSTR_PER_S = SMS * SCHEDULERS * LANES * CLOCK_HZ  # 33.45e12
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # NVIDIA datasheets (H100 SXM5, H200 SXM)


def slot_budget(bytes_per_elem: float, gpu: str = "H200") -> float:
    """Slots per element at which issue time equals HBM time."""
    return ISSUE_LANE_INSTR_PER_S / HBM_BYTES_PER_S[gpu] * bytes_per_elem


# Issue 13's targets: at most 70% of the H200 budget, per job (both passes of a fused job, entropy
# term included), as the issue rounds them (33.4 T / 4.8 TB/s = 6.96 slots per byte).
TARGET_FRACTION = 0.7
ISSUE13_TARGETS = {
    "logprobs-fwd": 9.7, "logprobs-entropy-fwd": 9.7,  # 2 B/elem
    "logprobs-bwd": 19.5, "logprobs-entropy-bwd": 19.5,  # 4 B/elem
    "grpo-fused": 29.2, "ppo-fused": 29.2,  # 6 B/elem, both passes
}
KERNEL_DIR = ROOT / "fastrlhf" / "kernels"


# --------------------------------------------------------------------------------------------
# The jobs: which launcher builds which launch. THE one place to adapt when launchers change.
# Each job function gets a `Fake` (meta tensors of the production shapes) and calls launchers;
# every kernel launch it makes is recorded, not run.
# --------------------------------------------------------------------------------------------

class Fake:
    """Production-shaped stand-ins: meta tensors (shape, dtype, strides; no memory)."""

    def __init__(self, dtype_name: str = "bfloat16"):
        import torch

        self.torch = torch
        self.dtype = getattr(torch, dtype_name)

    def t(self, *shape, dtype=None):
        return self.torch.empty(shape, dtype=dtype or self.torch.float32, device="meta")

    def logits3(self):
        return self.t(1, N, V, dtype=self.dtype)  # [1, N, V]: 2-D logits as the ops pass them

    def labels(self):
        return self.t(N, dtype=self.torch.int64)  # [N]

    def row(self):
        return self.t(N)  # [N] fp32


def _launcher(modules: Sequence[str], names: Sequence[str]):
    """The first ``fastrlhf.kernels.<module>.<name>`` that exists (modules and launchers get renamed)."""
    for module in modules:
        try:
            mod = importlib.import_module(f"fastrlhf.kernels.{module}")
        except ModuleNotFoundError:
            continue
        for name in names:
            if hasattr(mod, name):
                return getattr(mod, name)
    raise LookupError(f"no launcher {names} in fastrlhf.kernels.{{{', '.join(modules)}}}: update JOBS")


def _fr_logprobs_fwd(f: Fake, entropy: bool, sp2: bool = False):
    # Leaf launcher: fills the caller's [N] fp32 buffers (sum p^2: one more accumulator).
    extra = {"sp2": f.row()} if sp2 else {}
    _launcher(["logprobs"], ["logprobs_forward"])(
        f.logits3(), f.labels(), 1.0, -100, f.row(), f.row() if entropy else None, f.row(), **extra
    )


def _fr_logprobs_bwd(f: Fake, entropy: bool, sp2: bool = False):
    x3 = f.logits3()
    extra = {"sp2": f.row(), "dsp2": f.row()} if sp2 else {}
    _launcher(["logprobs"], ["logprobs_backward"])(
        x3, f.labels(), f.row(), f.row() if entropy else None, f.row(), f.row() if entropy else None,
        1.0, -100, f.torch.empty_like(x3), **extra
    )


def _fr_ppo_fused(f: Fake, grpo: bool):
    # PPO / GRPO on logits = the row forward (logp; + entropy for an entropy bonus), the [N]-sized
    # per-token math in torch, then one gradient pass in backward with (dlogp, dentropy) per token.
    _fr_logprobs_fwd(f, entropy=not grpo)
    _fr_logprobs_bwd(f, entropy=not grpo)


def _fr_gae(f: Fake):
    # GAE's own job: rows of 1024 tokens, fp32 rewards/values, bool mask (sent as uint8).
    _launcher(["gae", "advantages"], ["gae_forward", "gae_triton"])(
        f.t(N, T), f.t(N, T), f.t(N, T, dtype=f.torch.bool), gamma=1.0, lam=0.95
    )


def _liger_selective_logsoftmax(f: Fake):
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    # Liger takes [B, L + 1, V] logits and drops the last position.
    logits = f.t(B, T + 1, V, dtype=f.dtype)
    fused_selective_log_softmax(logits, f.t(B, T + 1, dtype=f.torch.int64), temperature=1.0)


def _liger_ce_nograd(f: Fake):
    from liger_kernel.ops.cross_entropy import cross_entropy_forward

    # cross_entropy_forward counts the non-ignored targets with .item(): real (small) CPU
    # labels, meta logits. reduction="none", no grad: the HAS_GRADIENTS=False kernel.
    target = f.torch.zeros(N, dtype=f.torch.int64)
    cross_entropy_forward(f.t(N, V, dtype=f.dtype), target, None, -100, 0.0, 0.0, "none", None, False)


def _liger_grpo(f: Fake, backward: bool):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    torch = f.torch
    logits = f.t(B, T + 1, V, dtype=f.dtype).requires_grad_()
    out = triton_grpo_loss(
        logits, f.t(B, T), f.t(B, T), f.t(B, T, dtype=torch.int64), f.t(B),
        completion_mask=f.t(B, T, dtype=torch.int32), temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.2,
        inplace=True, loss_type="dapo", reduce=True,
    )
    if backward:
        out[0].backward()


@dataclasses.dataclass(frozen=True)
class Job:
    impl: str  # "fastrlhf" | "liger"
    job: str  # job names
    run: Callable[[Fake], None]
    keep: Optional[Tuple[str, ...]] = None  # kernels to keep (None: every launch the job makes)
    nv: bool = True  # an [N, V] streaming job (slots/elem budget, 128-bit checks)
    bytes_per_elem: Optional[Dict[str, float]] = None  # per pass name, for non-[N, V] jobs
    pass_names: Optional[Tuple[str, ...]] = None  # override lse/grad naming
    ldg_per_step: Optional[int] = None  # non-[N, V] jobs: global loads per element step (unroll detection)


JOBS: Tuple[Job, ...] = (
    Job("fastrlhf", "logprobs-fwd", lambda f: _fr_logprobs_fwd(f, False)),
    Job("fastrlhf", "logprobs-entropy-fwd", lambda f: _fr_logprobs_fwd(f, True)),
    Job("fastrlhf", "logprobs-bwd", lambda f: _fr_logprobs_bwd(f, False)),
    Job("fastrlhf", "logprobs-entropy-bwd", lambda f: _fr_logprobs_bwd(f, True)),
    Job("fastrlhf", "grpo-fused", lambda f: _fr_ppo_fused(f, True)),  # k3 KL 0.04, no entropy
    Job("fastrlhf", "ppo-fused", lambda f: _fr_ppo_fused(f, False)),  # dual clip, entropy bonus
    # logp + entropy + sum p^2 (verl's calculate_sum_pi_squared) and all three gradients
    Job("fastrlhf", "logprobs-sum-p2-fwd", lambda f: _fr_logprobs_fwd(f, True, sp2=True)),
    Job("fastrlhf", "logprobs-sum-p2-bwd", lambda f: _fr_logprobs_bwd(f, True, sp2=True)),
    # GAE is not an [N, V] pass: compiled and reported, no slot budget. 4+4+1 B in, 4+4 B out.
    # ptxas unrolls its time loop 4x and keeps a remainder loop: two "passes" over the same data.
    Job("fastrlhf", "gae", _fr_gae, nv=False, bytes_per_elem={"scan": 17.0, "scan-rem": 17.0},
        pass_names=("scan", "scan-rem"), ldg_per_step=3),
    Job("liger", "logprobs-fwd", _liger_selective_logsoftmax),
    Job("liger", "logprobs-fwd", _liger_ce_nograd),
    Job("liger", "logprobs-bwd", lambda f: _liger_grpo(f, True), keep=("_grpo_loss_bwd_kernel",)),
    Job("liger", "grpo-fused", lambda f: _liger_grpo(f, True)),
)
IMPLS = ("fastrlhf", "liger")
JOB_NAMES = tuple(dict.fromkeys(j.job for j in JOBS))


# --------------------------------------------------------------------------------------------
# Capture and specialise launches
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    impl: str
    job: str
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict
    grid: object

    @property
    def name(self) -> str:
        return self.fn.fn.__name__


@contextlib.contextmanager
def recording_launches():
    """Replace ``JITFunction.run`` with a recorder: launches are captured, never executed."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: kernels decorated for the interpreter do not compile")
    from triton.runtime.jit import JITFunction

    calls = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, dict(kwargs), grid))
        return None

    JITFunction.run = record
    try:
        yield calls
    finally:
        JITFunction.run = original


def capture(job: Job) -> List[Launch]:
    with recording_launches() as calls:
        job.run(Fake())
    launches = [Launch(job.impl, job.job, fn, args, kw, grid) for fn, args, kw, grid in calls]
    if job.keep is not None:
        launches = [launch for launch in launches if launch.name in job.keep]
    if not launches:
        raise RuntimeError(f"{job.impl} {job.job}: the launcher made no kernel launch")
    return launches


def specialize(launch: Launch, arch: int = 90):
    """Triton's own binder on the captured args: ``(target, signature, constexprs, attrs, options)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)  # what JITFunction.run adds (knobs.runtime.debug off)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return target, signature, constexprs, attrs, options


_COMPILED: Dict[tuple, object] = {}


def compile_launch(launch: Launch, arch: int = 90):
    """The ``CompiledKernel`` of a launch (cached per process; Triton's disk cache as well)."""
    import triton
    from triton.compiler import ASTSource

    target, signature, constexprs, attrs, options = specialize(launch, arch)
    key = (id(launch.fn), arch, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    if key not in _COMPILED:
        src = ASTSource(launch.fn, signature, constexprs, attrs)
        _COMPILED[key] = triton.compile(src, target=target, options=options.__dict__)
    return _COMPILED[key], signature, constexprs


# --------------------------------------------------------------------------------------------
# SASS analysis
# --------------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA(?:\.\S+)?\s+`?\(?(\.L_x_\d+)\)?")


@dataclasses.dataclass
class Instr:
    addr: int
    text: str

    @property
    def opcode(self) -> str:
        parts = self.text.split()
        op = parts[1] if parts[0].startswith("@") else parts[0]
        return op

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([_tool("nvdisasm"), "-c", str(path)], check=True, capture_output=True,
                              text=True).stdout


def parse_sass(sass: str) -> Tuple[List[Instr], Dict[str, int]]:
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            ins = Instr(int(m.group(1), 16), m.group(2))
            for lab in pending:
                labels[lab] = ins.addr
            pending = []
            instrs.append(ins)
    return instrs, labels


def find_loops(instrs: List[Instr], labels: Dict[str, int]) -> List[Tuple[int, int]]:
    """Outermost loops as ``(first, last)`` instruction indices (backward branches)."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    spans = []
    for i, ins in enumerate(instrs):
        if ins.base != "BRA":
            continue
        m = _BRA.search(ins.text)
        if not m or m.group(1) not in labels:
            continue
        target = index[labels[m.group(1)]]
        if target < i:  # target == i is the trap loop after EXIT
            spans.append((target, i))
    outer = [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]
    return sorted(set(outer))


def _mem_bits(op: str) -> int:
    """Access width of an LDG/STG opcode: ``LDG.E.128`` -> 128, ``LDG.E.U16`` -> 16, ``LDG.E`` -> 32."""
    parts = op.split(".")
    for p in parts[1:]:
        if p in ("64", "128"):
            return int(p)
        if p in ("U8", "S8"):
            return 8
        if p in ("U16", "S16"):
            return 16
    return 32


def ptxas_resources(ptx: str, arch: int) -> Dict[str, int]:
    """``ptxas -v`` on the kernel's PTX, as Triton runs it: registers, spill bytes, stack."""
    arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", f"--gpu-name={arch_name}", str(src), "-o",
                              str(Path(d) / "k.o")], check=True, capture_output=True, text=True).stderr
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"regs": int(regs.group(1)), "spill_bytes": int(spill.group(1)) + int(spill.group(2)),
            "stack_bytes": int(stack.group(1))}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class KernelResult:
    impl: str
    job: str
    kernel: str
    arch: int
    num_warps: int
    regs: int
    spill_bytes: int
    stack_bytes: int
    smem: int
    block: int
    elem_bits: int
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    sass: str
    loops: List[Tuple[int, int]]


@dataclasses.dataclass
class PassResult:
    impl: str
    kernel: str  # "<kernel>:<pass>" (lse | grad | scan)
    job: str
    regs: int
    spill_bytes: int
    ldg_bits: Optional[int]  # narrowest global load in the steady loop
    stg_bits: Optional[int]  # narrowest global store in the steady loop (None: no store)
    slots_per_elem: float
    bytes_per_elem: float
    # --detail
    arch: int = 90
    nv: bool = True
    num_warps: int = 0
    smem: int = 0
    loop_instrs: int = 0
    elems_per_thread: float = 0.0
    unroll: int = 1
    mufu_per_elem: float = 0.0
    ops: Dict[str, int] = dataclasses.field(default_factory=dict)

    JSON_KEYS = ("impl", "kernel", "job", "regs", "spill_bytes", "ldg_bits", "stg_bits", "slots_per_elem",
                 "bytes_per_elem")

    def issue_vs_hbm(self, gpu: str) -> float:
        return self.slots_per_elem / slot_budget(self.bytes_per_elem, gpu)

    def as_json(self, detail: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not detail:
            return {k: d[k] for k in self.JSON_KEYS}
        d["issue_vs_hbm"] = {g: round(self.issue_vs_hbm(g), 4) for g in HBM_BYTES_PER_S}
        return d


def _block_constexpr(constexprs: Dict[str, object]) -> int:
    blocks = [v for k, v in constexprs.items() if k.startswith("BLOCK")]
    if len(blocks) != 1:
        raise RuntimeError(f"cannot tell the block size from constexprs {constexprs}")
    return int(blocks[0])


def analyze_kernel(launch: Launch, arch: int = 90, elem_bits: int = 16) -> KernelResult:
    """Compile one captured launch; ``elem_bits``: the logits' element size (bf16)."""
    kernel, signature, constexprs = compile_launch(launch, arch)
    names = launch.fn.arg_names
    named_constexprs = {names[k[0]]: v for k, v in constexprs.items()}
    res = ptxas_resources(kernel.asm["ptx"], arch)
    sass = disassemble(kernel.asm["cubin"])
    instrs, labels = parse_sass(sass)
    return KernelResult(
        impl=launch.impl, job=launch.job, kernel=launch.name, arch=arch, num_warps=kernel.metadata.num_warps,
        regs=res["regs"], spill_bytes=res["spill_bytes"], stack_bytes=res["stack_bytes"],
        smem=kernel.metadata.shared, block=_block_constexpr(named_constexprs), elem_bits=elem_bits,
        signature=signature, constexprs={k: (v if isinstance(v, (int, float, bool, str)) else repr(v))
                                         for k, v in named_constexprs.items()},
        sass=sass, loops=find_loops(instrs, labels),
    )


def passes_of(kr: KernelResult, job: Job) -> List[PassResult]:
    instrs, _ = parse_sass(kr.sass)
    loops = [(a, b) for a, b in kr.loops if any(ins.base == "LDG" for ins in instrs[a:b + 1])]
    out = []
    for i, (a, b) in enumerate(loops):
        body = instrs[a:b + 1]
        ldg = [_mem_bits(ins.opcode) for ins in body if ins.base == "LDG"]
        stg = [_mem_bits(ins.opcode) for ins in body if ins.base == "STG"]
        nominal = kr.block / (32 * kr.num_warps)
        unroll = 1
        if job.nv:
            unroll = max(1, round(sum(ldg) / (nominal * kr.elem_bits)))
        elif job.ldg_per_step:
            unroll = max(1, len(ldg) // job.ldg_per_step)
        elems = nominal * unroll
        role = job.pass_names[i] if job.pass_names else ("grad" if stg else "lse")
        if job.bytes_per_elem:
            nbytes = job.bytes_per_elem[role]
        else:
            nbytes = kr.elem_bits / 8 * (2 if stg else 1)  # read the row (and write its gradient)
        ops = collections.Counter(ins.base for ins in body)
        out.append(PassResult(
            impl=kr.impl, kernel=f"{kr.kernel}:{role}", job=kr.job, regs=kr.regs, spill_bytes=kr.spill_bytes,
            ldg_bits=min(ldg) if ldg else None, stg_bits=min(stg) if stg else None,
            slots_per_elem=round(len(body) / elems, 3), bytes_per_elem=nbytes, arch=kr.arch, nv=job.nv,
            num_warps=kr.num_warps, smem=kr.smem, loop_instrs=len(body), elems_per_thread=elems, unroll=unroll,
            mufu_per_elem=round(ops.get("MUFU", 0) / elems, 3), ops=dict(ops.most_common()),
        ))
    return out


def select_jobs(impls: Optional[Sequence[str]] = None, jobs: Optional[Sequence[str]] = None) -> List[Job]:
    return [j for j in JOBS if (impls is None or j.impl in impls) and (jobs is None or j.job in jobs)]


def analyze_kernels(impls=None, jobs=None, archs: Sequence[int] = (90,)) -> List[Tuple[Job, KernelResult]]:
    out = []
    for job in select_jobs(impls, jobs):
        for launch in capture(job):
            for arch in archs:
                out.append((job, analyze_kernel(launch, arch)))
    return out


def analyze(impls=None, jobs=None, archs: Sequence[int] = (90,)) -> List[PassResult]:
    return [p for job, kr in analyze_kernels(impls, jobs, archs) for p in passes_of(kr, job)]


def report(impls=("fastrlhf",), jobs=None, archs: Sequence[int] = (90,)) -> dict:
    """Everything a test needs, JSON-able: discovered and compiled kernels, and every pass (``--detail``)."""
    kernel_results = analyze_kernels(impls, jobs, archs)
    return {
        "discovered": discover_kernels(),
        "covered": covered_kernels(kernel_results),
        "kernels": [{"impl": kr.impl, "job": kr.job, "kernel": kr.kernel, "arch": kr.arch, "regs": kr.regs,
                     "spill_bytes": kr.spill_bytes, "stack_bytes": kr.stack_bytes, "smem": kr.smem,
                     "num_warps": kr.num_warps, "loops": len(kr.loops), "signature": kr.signature,
                     "constexprs": kr.constexprs} for _, kr in kernel_results],
        "passes": [p.as_json(detail=True) for job, kr in kernel_results for p in passes_of(kr, job)],
    }


def discover_kernels(kernel_dir: Path = KERNEL_DIR) -> List[str]:
    """``module.kernel`` for every ``triton.JITFunction`` named ``*_kernel`` in ``fastrlhf/kernels/*.py``."""
    from triton.runtime.jit import JITFunction

    found = []
    for path in sorted(kernel_dir.glob("*.py")):
        if path.stem == "__init__":
            continue
        mod = importlib.import_module(f"fastrlhf.kernels.{path.stem}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == mod.__name__:
                found.append(f"{path.stem}.{name}")
    return found


def covered_kernels(kernel_results: Sequence[Tuple[Job, KernelResult]]) -> List[str]:
    """The discovered fastrlhf kernels that some job compiled (compare with ``discover_kernels``)."""
    compiled = {kr.kernel for _, kr in kernel_results if kr.impl == "fastrlhf"}
    return [k for k in discover_kernels() if k.split(".")[1] in compiled]


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

def job_totals(passes: Sequence[PassResult]) -> List[dict]:
    """Per (impl, job): both passes summed (a fused job's lse + grad passes, Liger's fwd + bwd)."""
    groups: Dict[Tuple[str, str, str], List[PassResult]] = collections.defaultdict(list)
    for p in passes:
        if p.nv and p.arch == 90:
            # Liger's logprobs-fwd has two alternatives (selective log-softmax, CE): not summed.
            alt = p.kernel.split(":")[0] if (p.impl, p.job) == ("liger", "logprobs-fwd") else ""
            groups[(p.impl, p.job, alt)].append(p)
    rows = []
    for (impl, job, _alt), ps in groups.items():
        slots = sum(p.slots_per_elem for p in ps)
        nbytes = sum(p.bytes_per_elem for p in ps)
        rows.append({"impl": impl, "job": job, "kernels": " + ".join(p.kernel for p in ps),
                     "slots_per_elem": round(slots, 2), "bytes_per_elem": nbytes,
                     "budget_h200": round(slot_budget(nbytes), 2),
                     "target_h200": round(TARGET_FRACTION * slot_budget(nbytes), 2),
                     "issue_vs_hbm_h100": round(slots / slot_budget(nbytes, "H100"), 3),
                     "issue_vs_hbm_h200": round(slots / slot_budget(nbytes), 3)})
    return rows


def check_targets(passes: Sequence[PassResult]) -> List[str]:
    """Issue 13's done criteria for every fastrlhf [N, V] job; returns the failures."""
    totals = job_totals(passes)
    liger_best = {}
    for r in totals:
        if r["impl"] == "liger":
            liger_best[r["job"]] = min(liger_best.get(r["job"], 1e9), r["slots_per_elem"])
    fails = []
    for p in passes:
        if p.impl != "fastrlhf" or not p.nv:
            continue
        if p.spill_bytes:
            fails.append(f"{p.job} {p.kernel}: {p.spill_bytes} spill bytes")
        if p.ldg_bits != 128 or (p.stg_bits is not None and p.stg_bits != 128):
            fails.append(f"{p.job} {p.kernel}: ldg {p.ldg_bits} / stg {p.stg_bits} bits, not 128")
    for r in totals:
        if r["impl"] != "fastrlhf":
            continue
        target = ISSUE13_TARGETS.get(r["job"], r["target_h200"])
        if r["slots_per_elem"] > target:
            fails.append(f"{r['job']}: {r['slots_per_elem']} slots/elem > target {target}")
        if r["job"] in liger_best and r["slots_per_elem"] > liger_best[r["job"]]:
            fails.append(f"{r['job']}: {r['slots_per_elem']} slots/elem > Liger's {liger_best[r['job']]}")
    return fails


def _fmt_bits(b: Optional[int]) -> str:
    return "-" if b is None else str(b)


def table(passes: Sequence[PassResult]) -> str:
    head = ("| impl | job | kernel:pass | warps | regs | spill B | smem B | ldg/stg bits | instr/trip | "
            "elem/thread/trip | slots/elem | MUFU/elem | B/elem | issue/HBM H100 | issue/HBM H200 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in passes:
        lines.append(
            f"| {p.impl} | {p.job} | `{p.kernel}` | {p.num_warps} | {p.regs} | {p.spill_bytes} | {p.smem} | "
            f"{_fmt_bits(p.ldg_bits)}/{_fmt_bits(p.stg_bits)} | {p.loop_instrs} | {p.elems_per_thread:g} | "
            f"{p.slots_per_elem:.1f} | {p.mufu_per_elem:.2f} | {p.bytes_per_elem:g} | "
            f"{100 * p.issue_vs_hbm('H100'):.0f}% | {100 * p.issue_vs_hbm('H200'):.0f}% |"
        )
    return "\n".join(lines)


def totals_table(passes: Sequence[PassResult]) -> str:
    head = ("| impl | job | passes | slots/elem | B/elem | H200 budget | 70% target | "
            "issue/HBM H100 | issue/HBM H200 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in job_totals(passes):
        lines.append(f"| {r['impl']} | {r['job']} | `{r['kernels']}` | {r['slots_per_elem']:.1f} | "
                     f"{r['bytes_per_elem']:g} | {r['budget_h200']:.1f} | {r['target_h200']:.1f} | "
                     f"{100 * r['issue_vs_hbm_h100']:.0f}% | {100 * r['issue_vs_hbm_h200']:.0f}% |")
    return "\n".join(lines)


def hot_ops(passes: Sequence[PassResult], top: int = 8) -> str:
    lines = []
    for p in passes:
        ops = ", ".join(f"{op} {n / p.elems_per_thread:.2f}" for op, n in list(p.ops.items())[:top])
        lines.append(f"- {p.impl} {p.job} `{p.kernel}` (slots/elem by opcode): {ops}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print a JSON list, one object per pass")
    ap.add_argument("--detail", action="store_true", help="with --json: every field (smem, MUFU, opcodes, ...)")
    ap.add_argument("--impl", action="append", choices=IMPLS, help="implementations (default: all)")
    ap.add_argument("--job", action="append", choices=JOB_NAMES, help="jobs (default: all)")
    ap.add_argument("--arch", type=int, action="append", help="compute capability (default 90 = sm_90a)")
    ap.add_argument("--sass", type=Path, help="write each kernel's SASS into this folder")
    ap.add_argument("--check", action="store_true", help="exit 1 unless the slot targets hold")
    args = ap.parse_args(argv)
    impls = args.impl or list(IMPLS)
    if "liger" in impls and importlib.util.find_spec("liger_kernel") is None:
        print("liger-kernel not installed (pip install --no-deps liger-kernel==0.8.5): fastrlhf only",
              file=sys.stderr)
        impls = [i for i in impls if i != "liger"]
    kernel_results = analyze_kernels(impls, args.job, args.arch or [90])
    passes = [p for job, kr in kernel_results for p in passes_of(kr, job)]
    if args.sass:
        args.sass.mkdir(parents=True, exist_ok=True)
        for _, kr in kernel_results:
            (args.sass / f"{kr.impl}.{kr.job}.{kr.kernel}.sm{kr.arch}.sass").write_text(kr.sass)
    if args.json:
        print(json.dumps([p.as_json(args.detail) for p in passes], indent=1))
    else:
        print(f"Static SASS read, N={N} rows, V={V}, bf16, sm_{'/'.join(map(str, args.arch or [90]))}")
        print()
        print(table(passes))
        print()
        print(totals_table(passes))
        print()
        print(hot_ops(passes))
    if args.check:
        fails = check_targets(passes)
        for f in fails:
            print("FAIL", f, file=sys.stderr)
        return 1 if fails else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
