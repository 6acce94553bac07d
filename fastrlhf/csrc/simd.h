// Per-ISA row kernels of the native backend and their run-time dispatch.
//
// The row passes are written once (row_kernels.inl) against a 16-lane vector interface and
// compiled three times, each in its own namespace and translation unit:
//   simd_avx512  (isa_avx512.cpp): one zmm per 16 lanes, target("avx512f,...")
//   simd_avx2    (isa_avx2.cpp):   two ymm per 16 lanes, target("avx2,fma,f16c")
//   simd_portable(isa_portable.cpp): 16-float arrays, no target (any compiler / CPU)
// The ISA is chosen per function with __attribute__((target)), not per file with -m flags,
// so the build needs no -march and a wheel runs on any x86-64: rows.cpp reads cpuid once
// and picks the widest table the CPU and the OS (xgetbv) support.
//
// Every ISA uses the same lane layout (element i of a 16-element chunk in lane i) and the
// same fixed reduction tree, and the exp and the gradient use explicit fused multiply-adds,
// so the AVX2 and AVX-512 kernels give the same bits (the portable one too where the
// compiler has a hardware fmaf, FP_FAST_FMAF). Results never depend on threads or on the
// other rows of the batch: one row is one call, reduced in a fixed order.
#pragma once

#include <cstdint>

namespace fastrlhf {

// Entries per forward block: 2048 fp32 = 8 KiB, so the block stays in L1 between the max
// pass and the exp pass. A multiple of kLanes.
constexpr int64_t kBlock = 2048;
constexpr int64_t kLanes = 16;
// Floats of the per-thread buffer the forward kernels take (a block plus its -inf padding).
constexpr int64_t kBufFloats = kBlock + kLanes;

struct RowStats {
  float lse;
  float ent;
  float sp2;  // sum p^2
};

// One row of V logits (dtype of the table slot) -> lse, and the entropy / sum p^2 when asked.
using StatsFn = RowStats (*)(const void* row, int64_t V, float inv_temp, float* buf);
// One row's gradient into out (may alias row); label < 0 when there is no logp term.
using GradFn = void (*)(const void* row, void* out, int64_t V, int64_t label, float inv_temp, float lse, float E,
                        float dlogp, float dent, float sp2, float dsp2);
using ToF32Fn = void (*)(const void* src, float* dst, int64_t n);
using FromF32Fn = void (*)(const float* src, void* dst, int64_t n);
using ExpFn = void (*)(const float* src, float* dst, int64_t n);

// The terms of a gradient pass, as a bit mask (0 is unused: nothing to differentiate).
enum GradTerm : int { kGradLogp = 1, kGradEntropy = 2, kGradSp2 = 4, kGradKinds = 8 };
// The forward's optional accumulators, as a bit mask.
enum StatsTerm : int { kStatsEntropy = 1, kStatsSp2 = 2, kStatsKinds = 4 };

struct RowKernels {
  const char* name;
  StatsFn stats[3][kStatsKinds];  // [DType][StatsTerm mask]
  GradFn grad[3][kGradKinds];     // [DType][GradTerm mask]; [0] is nullptr
  // The loads, stores and exp of the row passes over flat arrays, for tests
  // (fastrlhf._C.simd_convert / simd_exp).
  ToF32Fn to_f32[3];
  FromF32Fn from_f32[3];
  ExpFn exp;
};

// nullptr where that ISA was not compiled in (not x86-64, or a compiler without the target
// attribute); compiled does not mean supported by this CPU: see rows.cpp.
const RowKernels* portable_kernels();
const RowKernels* avx2_kernels();
const RowKernels* avx512_kernels();

// The table the row passes use now, and the switch the tests use. set_simd returns false
// (and changes nothing) for a name that is unknown or that this CPU cannot run.
const RowKernels& active_kernels();
bool set_simd(const char* name);
// Names this CPU can run, widest first, e.g. {"avx2", "portable"}; count returned.
int supported_simd(const char** names, int capacity);

}  // namespace fastrlhf
