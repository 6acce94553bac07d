// Row passes of the native CPU backend: the `row_forward` / `row_backward` primitives of
// fastrlhf/_rows.py for CPU tensors (fp32, bf16, fp16 logits; fp32 accumulation).
//
// Math, per row n with x = logits[n] * inv_temp (V entries):
//   lse = logsumexp(x),  logp = x[label] - lse,  ent = lse - sum(p * x),  p = softmax(x)
//   d/dx_v of (dlogp * logp + dent * ent) =
//       inv_temp * (dlogp * (onehot(label)_v - p_v) - dent * p_v * (x_v - E)),  E = lse - ent
// Rows whose label is ignore_index: logp = ent = 0 and an exactly-zero gradient.
//
// Layout: logits and gradient are [B, T, V] with element strides (stride_b, stride_t) and a
// unit stride over V; int64 offsets throughout (16k x 152k elements > 2^31). Per-row outputs
// (logp, ent, lse) and upstream grads (dlogp, dent) are contiguous fp32 [N = B * T].
//
// Memory: forward reads the logits once and writes 3 x N floats; backward reads the logits
// once and writes the gradient once. No [N, V] temporary exists; each thread holds one
// kBlock-float stack buffer.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastrlhf {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct RowsIn {
  const void* data;  // [B, T, V] logits
  int dtype;         // DType
  int64_t B, T, V;
  int64_t stride_b, stride_t;  // element strides; stride over V is 1
};

struct Labels {
  const void* data;  // [N] int32 or int64, or nullptr (every row counts)
  int bytes;         // 4 or 8
  int64_t ignore_index;
};

// Fills lse[N] and, when non-null, logp[N] (requires labels), ent[N] and sp2[N] (sum p^2).
// Throws std::invalid_argument on an out-of-range label (after the pass; nothing is read out
// of bounds).
void row_forward(const RowsIn& x, const Labels& labels, float inv_temp, float* logp, float* ent, float* lse,
                 float* sp2, int num_threads);

// Writes d/dlogits into out ([B, T, V] of x's dtype, strides out_stride_b / out_stride_t; may
// alias x). dlogp (requires labels), dent (requires ent) and dsp2 (requires sp2) may be null: that
// term is 0. The sum p^2 term is inv_temp * 2 dsp2 * p * (p - sp2).
void row_backward(const RowsIn& x, const Labels& labels, const float* lse, const float* ent, const float* dlogp,
                  const float* dent, const float* sp2, const float* dsp2, float inv_temp, void* out,
                  int64_t out_stride_b, int64_t out_stride_t, int num_threads);

// ---------------------------------------------------------------------------------------
// Scalar dtype conversions: the portable kernels, row tails and single elements (the label
// logit) use them; the AVX2 / AVX-512 kernels produce the same bits with vector instructions
// (tests/test_native_simd.py checks every fp16 and bf16 value against torch).
// ---------------------------------------------------------------------------------------

#if defined(__GNUC__)
#define FASTRLHF_INLINE inline __attribute__((always_inline))
#else
#define FASTRLHF_INLINE inline
#endif

FASTRLHF_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

FASTRLHF_INLINE float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bf16 is the top half of an fp32.
FASTRLHF_INLINE float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16(float).
FASTRLHF_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

// IEEE half <-> float, branch-free (M. Dukhan's FP16 library, fp16_ieee_to_fp32_value /
// fp16_ieee_from_fp32_value, which c10::Half uses too), so results match torch's bits.
FASTRLHF_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
  return bits_f32(result);
}

FASTRLHF_INLINE uint16_t f32_to_f16(float f) {
  float base = (bits_f32(f32_bits(f) & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = f32_bits(base);
  const uint32_t exp_bits = (b >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = b & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace fastrlhf
