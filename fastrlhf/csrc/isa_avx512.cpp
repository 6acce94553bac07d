// AVX-512F row kernels (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and later): 16 lanes =
// one zmm register. Only AVX512F instructions (no BW/DQ/VL), with function-level target
// attributes; rows.cpp calls this table only where cpuid and xgetbv report AVX-512 state.
// Same lane layout, reduction tree and FMA sequence as the AVX2 kernels: the same bits.
#include "simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

// GCC 12's avx512fintrin.h trips -W(maybe-)uninitialized on its own _mm512_undefined_*()
// placeholders (GCC bug 105593, fixed in GCC 13): silence it for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "rows.h"

#define FASTRLHF_VEC __attribute__((always_inline, target("avx512f,avx2,fma,f16c"))) inline
#define FASTRLHF_KERNEL __attribute__((noinline, target("avx512f,avx2,fma,f16c")))

namespace fastrlhf {
namespace simd_avx512 {

struct Isa {
  static constexpr const char* kName = "avx512";
  using V = __m512;
  using M = __mmask16;

  FASTRLHF_VEC static V set1(float x) { return _mm512_set1_ps(x); }
  FASTRLHF_VEC static V zero() { return _mm512_setzero_ps(); }
  FASTRLHF_VEC static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  FASTRLHF_VEC static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }

  FASTRLHF_VEC static V load_bf16(const uint16_t* p) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  FASTRLHF_VEC static V load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // c10::BFloat16(float): round to nearest even, every NaN -> 0x7FC0; vpmovdw narrows.
  FASTRLHF_VEC static void store_bf16(uint16_t* p, V v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  // vcvtps2ph keeps a NaN's payload bits where c10::Half writes sign | 0x7E00: NaN lanes are
  // patched in 32-bit lanes (no AVX512BW needed).
  FASTRLHF_VEC static void store_f16(uint16_t* p, V v) {
    __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if (nan != 0) {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i fix = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)),
                                          _mm512_set1_epi32(0x7E00));
      h = _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(_mm512_cvtepu16_epi32(h), nan, fix));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }

  FASTRLHF_VEC static V add(V a, V b) { return _mm512_add_ps(a, b); }
  FASTRLHF_VEC static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  FASTRLHF_VEC static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  FASTRLHF_VEC static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  FASTRLHF_VEC static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  FASTRLHF_VEC static V max(V a, V b) { return _mm512_max_ps(a, b); }
  FASTRLHF_VEC static V min(V a, V b) { return _mm512_min_ps(a, b); }
  FASTRLHF_VEC static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  FASTRLHF_VEC static M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  FASTRLHF_VEC static V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  FASTRLHF_VEC static V keep(M m, V a) { return _mm512_maskz_mov_ps(m, a); }

  // 2^n from t = n + 1.5 * 2^23 (n in t's low mantissa bits): (bits(t) - bits(1.5 * 2^23) + 127) << 23.
  FASTRLHF_VEC static V pow2_of_rounded(V t) {
    const __m512i e = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127 - 0x4B400000));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }

  FASTRLHF_VEC static __m256 high8(V v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
  FASTRLHF_VEC static float hsum(V v) {
    const __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(v), high8(v));
    const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    const __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    return _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
  }
  FASTRLHF_VEC static float hmax(V v) {
    const __m256 t8 = _mm256_max_ps(_mm512_castps512_ps256(v), high8(v));
    const __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    const __m128 t2 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
    return _mm_cvtss_f32(_mm_max_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
  }
  FASTRLHF_VEC static float first(V v) { return _mm_cvtss_f32(_mm512_castps512_ps128(v)); }
};

#include "row_kernels.inl"

}  // namespace simd_avx512

const RowKernels* avx512_kernels() { return simd_avx512::table(); }

}  // namespace fastrlhf

#else

namespace fastrlhf {
const RowKernels* avx512_kernels() { return nullptr; }
}  // namespace fastrlhf

#endif
