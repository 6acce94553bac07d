// Portable row kernels, for CPUs and compilers without the x86 kernels (aarch64, ppc64le,
// x86-64 before AVX2): the 16 lanes are a GCC/Clang generic vector (a plain float array
// for other compilers), so the build target's own SIMD (SSE2, NEON) runs them. Where fmaf is a hardware instruction (FP_FAST_FMAF,
// e.g. aarch64) fmadd is fused and the bits match the AVX2 / AVX-512 kernels; elsewhere the
// multiply and the add round separately (a last-bit difference, well inside the tolerances).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "rows.h"
#include "simd.h"

#if defined(__GNUC__)
#define FASTRLHF_VEC __attribute__((always_inline)) inline
#define FASTRLHF_KERNEL __attribute__((noinline))
#else
#define FASTRLHF_VEC inline
#define FASTRLHF_KERNEL
#endif

namespace fastrlhf {
namespace simd_portable {

#if defined(__GNUC__) || defined(__clang__)
#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vectors are passed only between always-inlined helpers: no call ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
// GCC / Clang generic vectors: the compiler lowers them to the build target's registers
// (4 SSE2 ops per operation on baseline x86-64, NEON on aarch64) or to scalar code.
typedef float F16x __attribute__((vector_size(64)));
typedef int32_t I16x __attribute__((vector_size(64)));
typedef uint32_t U16x __attribute__((vector_size(64)));
typedef uint16_t H16x __attribute__((vector_size(32)));

struct Isa {
  static constexpr const char* kName = "portable";
  using V = F16x;
  using M = I16x;  // all-ones lanes

  FASTRLHF_VEC static V set1(float x) { return V{} + x; }
  FASTRLHF_VEC static V zero() { return V{}; }
  FASTRLHF_VEC static V loadu(const float* p) {
    V r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  FASTRLHF_VEC static void storeu(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  FASTRLHF_VEC static V load_bf16(const uint16_t* p) {
    H16x h;
    std::memcpy(&h, p, sizeof(h));
    return reinterpret_cast<V>(__builtin_convertvector(h, U16x) << 16);
  }
  FASTRLHF_VEC static V load_f16(const uint16_t* p) {
    V r;
    for (int k = 0; k < kLanes; ++k) r[k] = f16_to_f32(p[k]);
    return r;
  }
  FASTRLHF_VEC static void store_bf16(uint16_t* p, V v) {
    for (int k = 0; k < kLanes; ++k) p[k] = f32_to_bf16(v[k]);
  }
  FASTRLHF_VEC static void store_f16(uint16_t* p, V v) {
    for (int k = 0; k < kLanes; ++k) p[k] = f32_to_f16(v[k]);
  }

  FASTRLHF_VEC static V add(V a, V b) { return a + b; }
  FASTRLHF_VEC static V sub(V a, V b) { return a - b; }
  FASTRLHF_VEC static V mul(V a, V b) { return a * b; }
  FASTRLHF_VEC static V fmadd(V a, V b, V c) {
#ifdef FP_FAST_FMAF
    V r;
    for (int k = 0; k < kLanes; ++k) r[k] = std::fmaf(a[k], b[k], c[k]);
    return r;
#else
    return a * b + c;  // -ffp-contract=off (setup.py): two roundings, deterministic
#endif
  }
  FASTRLHF_VEC static V fnmadd(V a, V b, V c) { return fmadd(-a, b, c); }
  FASTRLHF_VEC static V select(M m, V a, V b) {
    return reinterpret_cast<V>((reinterpret_cast<I16x>(a) & m) | (reinterpret_cast<I16x>(b) & ~m));
  }
  FASTRLHF_VEC static V keep(M m, V a) { return reinterpret_cast<V>(reinterpret_cast<I16x>(a) & m); }
  FASTRLHF_VEC static M gt(V a, V b) { return a > b; }
  FASTRLHF_VEC static M lt(V a, V b) { return a < b; }
  FASTRLHF_VEC static V max(V a, V b) { return select(a > b, a, b); }
  FASTRLHF_VEC static V min(V a, V b) { return select(a < b, a, b); }
  FASTRLHF_VEC static V pow2_of_rounded(V t) {
    return reinterpret_cast<V>((reinterpret_cast<I16x>(t) + (127 - 0x4B400000)) << 23);
  }

  FASTRLHF_VEC static float hsum(V v) {
    float t[8];
    for (int k = 0; k < 8; ++k) t[k] = v[k] + v[k + 8];
    for (int k = 0; k < 4; ++k) t[k] = t[k] + t[k + 4];
    for (int k = 0; k < 2; ++k) t[k] = t[k] + t[k + 2];
    return t[0] + t[1];
  }
  FASTRLHF_VEC static float hmax(V v) {
    float t[8];
    for (int k = 0; k < 8; ++k) t[k] = std::max(v[k], v[k + 8]);
    for (int k = 0; k < 4; ++k) t[k] = std::max(t[k], t[k + 4]);
    for (int k = 0; k < 2; ++k) t[k] = std::max(t[k], t[k + 2]);
    return std::max(t[0], t[1]);
  }
  FASTRLHF_VEC static float first(V v) { return v[0]; }
};

#else
struct Isa {
  static constexpr const char* kName = "portable";
  struct V {
    float v[kLanes];
  };
  struct M {
    bool m[kLanes];
  };

  FASTRLHF_VEC static V set1(float x) {
    V r;
    for (int k = 0; k < kLanes; ++k) r.v[k] = x;
    return r;
  }
  FASTRLHF_VEC static V zero() { return set1(0.0f); }
  FASTRLHF_VEC static V loadu(const float* p) {
    V r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  FASTRLHF_VEC static void storeu(float* p, V v) { std::memcpy(p, v.v, sizeof(v.v)); }
  FASTRLHF_VEC static V load_bf16(const uint16_t* p) {
    V r;
    for (int k = 0; k < kLanes; ++k) r.v[k] = bf16_to_f32(p[k]);
    return r;
  }
  FASTRLHF_VEC static V load_f16(const uint16_t* p) {
    V r;
    for (int k = 0; k < kLanes; ++k) r.v[k] = f16_to_f32(p[k]);
    return r;
  }
  FASTRLHF_VEC static void store_bf16(uint16_t* p, V v) {
    for (int k = 0; k < kLanes; ++k) p[k] = f32_to_bf16(v.v[k]);
  }
  FASTRLHF_VEC static void store_f16(uint16_t* p, V v) {
    for (int k = 0; k < kLanes; ++k) p[k] = f32_to_f16(v.v[k]);
  }

  FASTRLHF_VEC static float fma1(float a, float b, float c) {
#ifdef FP_FAST_FMAF
    return std::fmaf(a, b, c);
#else
    return a * b + c;  // -ffp-contract=off (setup.py): two roundings, deterministic
#endif
  }

#define FASTRLHF_LANEWISE(expr) \
  V r;                          \
  for (int k = 0; k < kLanes; ++k) r.v[k] = (expr);  \
  return r
  FASTRLHF_VEC static V add(V a, V b) { FASTRLHF_LANEWISE(a.v[k] + b.v[k]); }
  FASTRLHF_VEC static V sub(V a, V b) { FASTRLHF_LANEWISE(a.v[k] - b.v[k]); }
  FASTRLHF_VEC static V mul(V a, V b) { FASTRLHF_LANEWISE(a.v[k] * b.v[k]); }
  FASTRLHF_VEC static V fmadd(V a, V b, V c) { FASTRLHF_LANEWISE(fma1(a.v[k], b.v[k], c.v[k])); }
  FASTRLHF_VEC static V fnmadd(V a, V b, V c) { FASTRLHF_LANEWISE(fma1(-a.v[k], b.v[k], c.v[k])); }
  FASTRLHF_VEC static V max(V a, V b) { FASTRLHF_LANEWISE(a.v[k] > b.v[k] ? a.v[k] : b.v[k]); }
  FASTRLHF_VEC static V min(V a, V b) { FASTRLHF_LANEWISE(a.v[k] < b.v[k] ? a.v[k] : b.v[k]); }
  FASTRLHF_VEC static V keep(M m, V a) { FASTRLHF_LANEWISE(m.m[k] ? a.v[k] : 0.0f); }
  FASTRLHF_VEC static V select(M m, V a, V b) { FASTRLHF_LANEWISE(m.m[k] ? a.v[k] : b.v[k]); }
  FASTRLHF_VEC static V pow2_of_rounded(V t) {
    FASTRLHF_LANEWISE(bits_f32((f32_bits(t.v[k]) + static_cast<uint32_t>(127 - 0x4B400000)) << 23));
  }
#undef FASTRLHF_LANEWISE
  FASTRLHF_VEC static M gt(V a, V b) {
    M r;
    for (int k = 0; k < kLanes; ++k) r.m[k] = a.v[k] > b.v[k];
    return r;
  }
  FASTRLHF_VEC static M lt(V a, V b) {
    M r;
    for (int k = 0; k < kLanes; ++k) r.m[k] = a.v[k] < b.v[k];
    return r;
  }

  FASTRLHF_VEC static float hsum(V v) {
    float t[8];
    for (int k = 0; k < 8; ++k) t[k] = v.v[k] + v.v[k + 8];
    for (int k = 0; k < 4; ++k) t[k] = t[k] + t[k + 4];
    for (int k = 0; k < 2; ++k) t[k] = t[k] + t[k + 2];
    return t[0] + t[1];
  }
  FASTRLHF_VEC static float hmax(V v) {
    float t[8];
    for (int k = 0; k < 8; ++k) t[k] = std::max(v.v[k], v.v[k + 8]);
    for (int k = 0; k < 4; ++k) t[k] = std::max(t[k], t[k + 4]);
    for (int k = 0; k < 2; ++k) t[k] = std::max(t[k], t[k + 2]);
    return std::max(t[0], t[1]);
  }
  FASTRLHF_VEC static float first(V v) { return v.v[0]; }
};

#endif

#include "row_kernels.inl"

}  // namespace simd_portable

const RowKernels* portable_kernels() { return simd_portable::table(); }

}  // namespace fastrlhf
