"""Benchmark runner: fastrlhf side by side with the kernels users would pick instead.

``fastrlhf bench [op ...] [--mode cpu|gpu]`` (or ``python -m fastrlhf.bench``) sweeps token
counts ``N`` and vocabularies ``V`` for each op, times every implementation in the same run,
and writes a table to stdout, ``results.csv`` / ``results.json`` / ``ratios.csv`` and PNG plots
under ``benchmarks/results/<device-tag>/``. ``benchmarks/README.md`` explains the numbers.

Modules, in the order a run uses them:
    registry    the ops (CLI name -> public fastrlhf op), implementations, shapes of each mode
    baselines   what a user would write instead: plain PyTorch, torch.compile, TRL, Liger, flash-attn
    cases       seeded inputs and one callable per (op, implementation, shape)
    measure     timing and peak memory, each case in a fresh forked process
    report      GB/s, % of peak, TFLOP/s, checks, ratios; table, CSV, JSON, plots
    env         versions, CPU model, GPU bandwidth table, output folder
    cli         argparse and the sweep

Implementations (a missing one is a row with status ``skipped`` and the reason, never dropped):
    fastrlhf            the public op, ``backend="auto"`` (Triton on CUDA; native or torch on CPU)
    fastrlhf[<b>]       CPU only: each other available backend named explicitly
    fastrlhf[inplace]   ``inplace_backward=True`` (gradient written into the logits' storage)
    torch               the plain PyTorch composition (``baselines``)
    torch.compile       ``torch.compile`` of that composition (compiled during warm-up)
    trl                 TRL's ``selective_log_softmax`` / ``selective_log_softmax_and_entropy`` /
                        ``entropy_from_logits``, with its trainers' loss math on top for the losses
    liger               Liger-Kernel: its cross entropy, ``triton_grpo_loss``,
                        ``LigerFusedLinearGRPOLoss``, ``LigerFusedLinearDPOLoss``
    flash-attn          ``flash_attn.ops.triton.cross_entropy.cross_entropy_loss``
"""

from .cases import Case, build_case
from .cli import main
from .registry import DTYPES, OPS, OpSpec, Shape, Skip
from .report import derive

__all__ = ["Case", "DTYPES", "OPS", "OpSpec", "Shape", "Skip", "build_case", "derive", "main"]
