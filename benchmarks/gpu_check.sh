#!/usr/bin/env bash
# The one script for a GPU machine (H100/H200) that has only the GPU image (torch, triton,
# transformers, pytest) and a short window: at most 8 minutes, no network.
#
#   1. installs the peers' pure-Python wheels from benchmarks/wheels/ with --no-deps
#      (download them beforehand, on a machine with network:
#       pip download liger-kernel==0.8.5 trl==1.16.0 --no-deps -d benchmarks/wheels)
#   2. the GPU test suite: pytest on CUDA (kernels vs the reference), bounded by TEST_TIMEOUT_S
#   3. benchmarks/gpu_bench.py: fastrlhf vs Liger vs TRL's Triton kernel vs torch vs torch.compile at
#      N=16384, V=151936 bf16 (forward logp, forward+entropy, forward+backward, fused GRPO with
#      upstream gradient 1 and 0.25, 50% ignored tokens, fused-linear GRPO at H=4096 vs the bare
#      lm_head matmul); GB/s = passes x N x V x 2 B / time, % of HBM peak (H100 SXM 3.35 TB/s,
#      H200 4.8 TB/s), peak memory; writes benchmarks/results/<gpu>/gpu_check.{json,md}
#
# Without a GPU it prints what it would run and exits 0 (dry run). Usage:
#   bash benchmarks/gpu_check.sh            # run (or dry-run without CUDA)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh  # print the plan only
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-180}
BENCH_DEADLINE_S=${BENCH_DEADLINE_S:-200}   # no new case after this; a case takes <= ~40 s
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-270}
unset TRITON_INTERPRET
export FASTRLHF_REQUIRE_TRITON=1

# The whole tests/ folder on CUDA (conftest picks the device), minus the training runs.
TEST_CMD=("$PY" -m pytest -q --maxfail=20 -p no:cacheprovider --continue-on-collection-errors -m "not slow" tests)
BENCH_CMD=("$PY" benchmarks/gpu_bench.py --deadline-s "$BENCH_DEADLINE_S")

has_gpu=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "$has_gpu" != "1" || "${DRY_RUN:-0}" == "1" ]]; then
  echo "gpu_check: no CUDA device (or DRY_RUN=1): dry run, nothing executed. On a GPU it would run:"
  echo "  0. $PY -m pip install --no-deps --no-index benchmarks/wheels/*.whl"
  if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
    for w in benchmarks/wheels/*.whl; do echo "       $(basename "$w")"; done
  else
    echo "     (benchmarks/wheels/ is empty: pip download liger-kernel==0.8.5 trl==1.16.0 --no-deps -d benchmarks/wheels)"
  fi
  echo "  1. timeout ${TEST_TIMEOUT_S} ${TEST_CMD[*]}"
  echo "  2. timeout ${BENCH_TIMEOUT_S} ${BENCH_CMD[*]}"
  echo "     cases (eager first, torch.compile last):"
  "$PY" benchmarks/gpu_bench.py --list | sed 's/^/       /'
  echo "  results: benchmarks/results/<gpu>/gpu_check.json and gpu_check.md (commit them with the versions inside)"
  exit 0
fi

t0=$SECONDS
echo "== 0. peer wheels"
if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-deps --no-index benchmarks/wheels/*.whl || echo "wheel install failed: those rows will be skipped"
else
  echo "benchmarks/wheels/ is empty: Liger/TRL rows will be skipped"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

echo "== 1. GPU test suite (timeout ${TEST_TIMEOUT_S}s)"
timeout "$TEST_TIMEOUT_S" "${TEST_CMD[@]}"
test_rc=$?
echo "tests: rc=$test_rc ($((SECONDS - t0)) s so far)"

echo "== 2. benchmark (timeout ${BENCH_TIMEOUT_S}s)"
timeout "$BENCH_TIMEOUT_S" "${BENCH_CMD[@]}"
bench_rc=$?
echo "bench: rc=$bench_rc; total $((SECONDS - t0)) s"
exit $(( test_rc != 0 || bench_rc != 0 ))
