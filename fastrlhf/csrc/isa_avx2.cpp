// AVX2 + FMA + F16C row kernels (Haswell, Zen and later): 16 lanes = two ymm registers.
// Compiled with function-level target attributes, so the file builds without -mavx2 and
// the extension still loads on older CPUs (rows.cpp only calls this table after cpuid).
#include "simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "rows.h"

#define FASTRLHF_VEC __attribute__((always_inline, target("avx2,fma,f16c"))) inline
#define FASTRLHF_KERNEL __attribute__((noinline, target("avx2,fma,f16c")))

namespace fastrlhf {
namespace simd_avx2 {

struct Isa {
  static constexpr const char* kName = "avx2";
  struct V {
    __m256 lo, hi;  // lanes 0-7, 8-15
  };
  using M = V;  // all-ones lanes

  FASTRLHF_VEC static V set1(float x) {
    const __m256 v = _mm256_set1_ps(x);
    return {v, v};
  }
  FASTRLHF_VEC static V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  FASTRLHF_VEC static V loadu(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  FASTRLHF_VEC static void storeu(float* p, V v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  }

  // bf16 is the top half of an fp32: widen to 32 bits and shift.
  FASTRLHF_VEC static __m256 bf16x8(const uint16_t* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  FASTRLHF_VEC static V load_bf16(const uint16_t* p) { return {bf16x8(p), bf16x8(p + 8)}; }
  FASTRLHF_VEC static V load_f16(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }

  // c10::BFloat16(float) in 32-bit lanes: round to nearest even, every NaN -> 0x7FC0.
  FASTRLHF_VEC static __m256i bf16_bits(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  }
  FASTRLHF_VEC static void store_bf16(uint16_t* p, V v) {
    // packus interleaves 128-bit halves ([lo0-3, hi0-3, lo4-7, hi4-7]); the permute restores
    // the order. Lanes hold 0..0xFFFF, so the unsigned saturation never clips.
    const __m256i packed = _mm256_packus_epi32(bf16_bits(v.lo), bf16_bits(v.hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
  }

  // vcvtps2ph rounds to nearest even like c10::Half but keeps a NaN's payload bits, where
  // c10 (fp16_ieee_from_fp32_value) writes sign | 0x7E00: NaN lanes are patched.
  FASTRLHF_VEC static __m128i f16x8(__m256 f) {
    __m128i h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const int nan = _mm256_movemask_ps(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    if (nan != 0) {
      alignas(16) uint16_t bits[8];
      alignas(32) float vals[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(bits), h);
      _mm256_store_ps(vals, f);
      for (int k = 0; k < 8; ++k) {
        if ((nan >> k) & 1) bits[k] = static_cast<uint16_t>(((f32_bits(vals[k]) >> 16) & 0x8000u) | 0x7E00u);
      }
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(bits));
    }
    return h;
  }
  FASTRLHF_VEC static void store_f16(uint16_t* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f16x8(v.lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), f16x8(v.hi));
  }

  FASTRLHF_VEC static V add(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  FASTRLHF_VEC static V sub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
  FASTRLHF_VEC static V mul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  FASTRLHF_VEC static V fmadd(V a, V b, V c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  FASTRLHF_VEC static V fnmadd(V a, V b, V c) {
    return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
  }
  FASTRLHF_VEC static V max(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
  FASTRLHF_VEC static V min(V a, V b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
  FASTRLHF_VEC static M gt(V a, V b) {
    return {_mm256_cmp_ps(a.lo, b.lo, _CMP_GT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GT_OQ)};
  }
  FASTRLHF_VEC static M lt(V a, V b) {
    return {_mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ)};
  }
  FASTRLHF_VEC static V select(M m, V a, V b) {
    return {_mm256_blendv_ps(b.lo, a.lo, m.lo), _mm256_blendv_ps(b.hi, a.hi, m.hi)};
  }
  FASTRLHF_VEC static V keep(M m, V a) { return {_mm256_and_ps(m.lo, a.lo), _mm256_and_ps(m.hi, a.hi)}; }

  // 2^n from t = n + 1.5 * 2^23 (n in t's low mantissa bits): (bits(t) - bits(1.5 * 2^23) + 127) << 23.
  FASTRLHF_VEC static __m256 pow2x8(__m256 t) {
    const __m256i e = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  FASTRLHF_VEC static V pow2_of_rounded(V t) { return {pow2x8(t.lo), pow2x8(t.hi)}; }

  FASTRLHF_VEC static float hsum(V v) {
    const __m256 t8 = _mm256_add_ps(v.lo, v.hi);
    const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    const __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    return _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
  }
  FASTRLHF_VEC static float hmax(V v) {
    const __m256 t8 = _mm256_max_ps(v.lo, v.hi);
    const __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    const __m128 t2 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
    return _mm_cvtss_f32(_mm_max_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
  }
  FASTRLHF_VEC static float first(V v) { return _mm256_cvtss_f32(v.lo); }
};

#include "row_kernels.inl"

}  // namespace simd_avx2

const RowKernels* avx2_kernels() { return simd_avx2::table(); }

}  // namespace fastrlhf

#else

namespace fastrlhf {
const RowKernels* avx2_kernels() { return nullptr; }
}  // namespace fastrlhf

#endif
