// The row kernels, written once against a 16-lane vector interface `Isa` (see simd.h).
//
// Included by isa_avx512.cpp, isa_avx2.cpp and isa_portable.cpp inside their own namespace
// (fastrlhf::simd_<isa>), after they define:
//   struct Isa        V (16 floats), M (16 lane flags) and the operations used below;
//   FASTRLHF_VEC      attributes of the always-inlined helpers (the ISA's target);
//   FASTRLHF_KERNEL   attributes of the per-row kernels the table points to (the ISA's target,
//                     noinline so that each keeps its symbol: tests/test_native_simd.py finds
//                     simd_avx2::row_stats / grad_row in the disassembly and checks their FMAs).
// Standard headers come from the including file: this one only holds code.
//
// Operation semantics every Isa follows (those of the x86 instructions):
//   max(a, b) = a > b ? a : b,  min(a, b) = a < b ? a : b   (a NaN `a` yields b)
//   fmadd(a, b, c) = a * b + c, fnmadd(a, b, c) = c - a * b, each rounded once
//   gt / lt: ordered compares (false on NaN); select(m, a, b) = m ? a : b; keep(m, a) = m ? a : 0
//   hsum / hmax: the fixed tree t8[k] = x[k] + x[k+8], t4[k] = t8[k] + t8[k+4],
//                t2[k] = t4[k] + t4[k+2], t1 = t2[0] + t2[1]

using V = Isa::V;

// The forward's exp pass runs in sub-blocks of kSub entries, each issuing the prefetches
// for the same share of the next block. A multiple of kLanes.
constexpr int64_t kSub = 256;

template <int kDtype>
using Elem = typename std::conditional<kDtype == kFloat32, float, uint16_t>::type;

template <int kDtype>
FASTRLHF_VEC V load16(const Elem<kDtype>* p) {
  if constexpr (kDtype == kFloat32) {
    return Isa::loadu(p);
  } else if constexpr (kDtype == kBFloat16) {
    return Isa::load_bf16(p);
  } else {
    return Isa::load_f16(p);
  }
}

template <int kDtype>
FASTRLHF_VEC void store16(Elem<kDtype>* p, V v) {
  if constexpr (kDtype == kFloat32) {
    Isa::storeu(p, v);
  } else if constexpr (kDtype == kBFloat16) {
    Isa::store_bf16(p, v);
  } else {
    Isa::store_f16(p, v);
  }
}

// Single elements (row tails, the label's logit) through the scalar conversions of rows.h,
// which give the same bits as the vector ones.
template <int kDtype>
FASTRLHF_VEC float load1(Elem<kDtype> v) {
  if constexpr (kDtype == kFloat32) {
    return v;
  } else if constexpr (kDtype == kBFloat16) {
    return bf16_to_f32(v);
  } else {
    return f16_to_f32(v);
  }
}

template <int kDtype>
FASTRLHF_VEC Elem<kDtype> store1(float f) {
  if constexpr (kDtype == kFloat32) {
    return f;
  } else if constexpr (kDtype == kBFloat16) {
    return f32_to_bf16(f);
  } else {
    return f32_to_f16(f);
  }
}

// exp(x) for the x <= 0 the row passes feed it (x - running max, x - lse); Cephes expf
// (S. Moshier, cephes/single/expf.c): x = n ln2 + r with |r| <= ln2 / 2, degree-5 minimax
// polynomial for exp(r), 2^n built in the exponent bits; about 1 ulp (measured by
// tests/test_native_simd.py against fp64). Results below FLT_MIN (x < ln FLT_MIN) are 0,
// which also maps x = -inf to exactly 0: no clamp at the low end, whatever the polynomial
// makes of such x (even NaN) the final select replaces. A NaN x stays NaN (min(hi, NaN) =
// NaN, and the final compare is false for NaN).
FASTRLHF_VEC V vexp(V x) {
  const V lo = Isa::set1(-87.33654475f);  // ln(2^-126)
  const V hi = Isa::set1(88.0f);          // keeps 2^n finite for the (unused) x > 0 side
  const V round = Isa::set1(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const V xc = Isa::min(hi, x);
  const V t = Isa::fmadd(xc, Isa::set1(1.44269504088896341f), round);  // n = round(x / ln2) sits in t's mantissa
  const V n = Isa::sub(t, round);
  V r = Isa::fnmadd(n, Isa::set1(0.693359375f), xc);  // ln2 split in two (Cody-Waite): n * C1 is exact
  r = Isa::fnmadd(n, Isa::set1(-2.12194440e-4f), r);
  V p = Isa::set1(1.9875691500e-4f);
  p = Isa::fmadd(p, r, Isa::set1(1.3981999507e-3f));
  p = Isa::fmadd(p, r, Isa::set1(8.3334519073e-3f));
  p = Isa::fmadd(p, r, Isa::set1(4.1665795894e-2f));
  p = Isa::fmadd(p, r, Isa::set1(1.6666665459e-1f));
  p = Isa::fmadd(p, r, Isa::set1(5.0000001201e-1f));
  const V y = Isa::add(Isa::fmadd(p, Isa::mul(r, r), r), Isa::set1(1.0f));
  const V e = Isa::mul(y, Isa::pow2_of_rounded(t));  // 2^n, n in [-126, 127]
  return Isa::select(Isa::lt(x, lo), Isa::zero(), e);
}

FASTRLHF_VEC void prefetch(const char* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// Online logsumexp (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"),
// blockwise. Invariant after each block, with m the max so far:
//   s = sum exp(x_i - m),  w = sum exp(x_i - m) * (x_i - m)
// A new max m' rescales by a = exp(m - m'):  s' = a * s,  w' = a * (w + (m - m') * s).
// Then lse = m + log(s) and ent = -sum p log p = log(s) - w / s. Keeping w relative to m
// avoids the cancellation of lse - sum(p * x) when the logits are large.
// Each block is loaded once (converted to fp32 and scaled by inv_temp into buf, padded with
// -inf to whole vectors), its max found, and the running sums rescaled once per block, so
// every element costs exactly one exp; while a block's exps are computed from L1, the next
// block is prefetched. Per block, the sums are 16 lane accumulators reduced by the fixed
// tree: the bits depend on V and the row's values only.
// sum p^2 (kSp2) is one more accumulator q = sum exp(x_i - m)^2, rescaled by a^2 on a new max:
// sum_p2 = q / s^2.
template <int kDtype, int kTerms>
FASTRLHF_KERNEL RowStats row_stats(const void* row_v, int64_t Vn, float inv_temp, float* buf) {
  constexpr bool kEntropy = (kTerms & kStatsEntropy) != 0;
  constexpr bool kSp2 = (kTerms & kStatsSp2) != 0;
  using T = Elem<kDtype>;
  const T* row = static_cast<const T*>(row_v);
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const V vinv = Isa::set1(inv_temp);
  float m = kNegInf, s = 0.0f, w = 0.0f, q = 0.0f;
  bool saw_nan = false;  // elsewhere a NaN reaches exp() and poisons s, as in torch
  for (int64_t v0 = 0; v0 < Vn; v0 += kBlock) {
    const int64_t L = std::min(kBlock, Vn - v0);
    const int64_t L16 = L / kLanes * kLanes;
    const int64_t Lp = (L + kLanes - 1) / kLanes * kLanes;
    const T* src = row + v0;
    V vmax = Isa::set1(kNegInf);
    for (int64_t i = 0; i < L16; i += kLanes) {
      const V x = Isa::mul(load16<kDtype>(src + i), vinv);
      Isa::storeu(buf + i, x);
      vmax = Isa::max(x, vmax);  // a NaN x leaves vmax: the max skips NaN
    }
    if (L16 < L) {
      for (int64_t i = L16; i < L; ++i) buf[i] = load1<kDtype>(src[i]) * inv_temp;
      for (int64_t i = L; i < Lp; ++i) buf[i] = kNegInf;  // exp(-inf) = 0: the padding adds nothing
      vmax = Isa::max(Isa::loadu(buf + L16), vmax);
    }
    const float bm = Isa::hmax(vmax);
    if (!(bm > kNegInf)) {  // every entry -inf (exp() is 0) or NaN, which the max skips
      for (int64_t i = 0; i < L; ++i) saw_nan |= buf[i] != buf[i];
      continue;
    }
    const float mn = m > bm ? m : bm;
    const V vmn = Isa::set1(mn);
    const V zero = Isa::zero();
    const char* next = reinterpret_cast<const char*>(src + L);
    const int64_t next_bytes = std::min(kBlock, Vn - v0 - L) * static_cast<int64_t>(sizeof(T));
    const int64_t bytes_per_sub = kSub * static_cast<int64_t>(sizeof(T));
    V acc_s = zero, acc_w = zero, acc_q = zero;
    for (int64_t j0 = 0; j0 < Lp; j0 += kSub) {
      const int64_t j1 = std::min(j0 + kSub, Lp);
      const int64_t p0 = (j0 / kSub) * bytes_per_sub;
      const int64_t p1 = std::min(p0 + bytes_per_sub, next_bytes);
      for (int64_t off = p0; off < p1; off += 64) prefetch(next + off);
      for (int64_t i = j0; i < j1; i += kLanes) {
        const V d = Isa::sub(Isa::loadu(buf + i), vmn);
        const V e = vexp(d);
        acc_s = Isa::add(acc_s, e);
        // e = 0 at d = -inf: keep() zeroes d there, since 0 * -inf would be NaN
        if constexpr (kEntropy) acc_w = Isa::fmadd(e, Isa::keep(Isa::gt(e, zero), d), acc_w);
        if constexpr (kSp2) acc_q = Isa::fmadd(e, e, acc_q);
      }
    }
    const float bs = Isa::hsum(acc_s);
    const float bw = kEntropy ? Isa::hsum(acc_w) : 0.0f;
    const float bq = kSp2 ? Isa::hsum(acc_q) : 0.0f;
    if (s > 0.0f) {
      const float dm = m - mn;  // <= 0
      const float a = std::exp(dm);
      w = a * (w + dm * s);
      q = (a * a) * q;
      s = a * s;
    }
    s += bs;
    w += bw;
    q += bq;
    m = mn;
  }
  if (saw_nan) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    return {nan, nan, nan};
  }
  const float log_s = std::log(s);  // s >= 1 unless every logit is -inf (then lse = -inf)
  return {m + log_s, kEntropy ? log_s - w / s : 0.0f, kSp2 ? q / (s * s) : 0.0f};
}

struct GradScalars {
  V inv_temp, lse, E, dlogp, dent, sp2, dsp2x2;  // dsp2x2 = 2 dsp2
};

// d/dx of dlogp * logp + dent * ent + dsp2 * sum_p2 without the one-hot term, for 16 raw logits:
//   inv_temp * (-dlogp * p - dent * p * (x - E) + 2 dsp2 * p * (p - sum_p2)),  p = exp(x - lse)
template <bool kLogp, bool kEntropy, bool kSp2>
FASTRLHF_VEC V grad16(V raw, const GradScalars& c) {
  const V x = Isa::mul(raw, c.inv_temp);
  const V p = vexp(Isa::sub(x, c.lse));
  V g = Isa::zero();
  if constexpr (kLogp) g = Isa::fnmadd(c.dlogp, p, g);
  if constexpr (kEntropy) {
    // p = 0 at x = -inf: keep() avoids 0 * -inf
    const V q = Isa::keep(Isa::gt(p, Isa::zero()), Isa::mul(p, Isa::sub(x, c.E)));
    g = Isa::fnmadd(c.dent, q, g);
  }
  if constexpr (kSp2) g = Isa::fmadd(c.dsp2x2, Isa::mul(p, Isa::sub(p, c.sp2)), g);
  return Isa::mul(g, c.inv_temp);
}

// The label's entry, one-hot term included: inv_temp * (dlogp * (1 - p) - dent * p * (x - E)).
// A function of its own (not inlined) so that the row kernels hold only the row loop: a
// compiler may do this single lane with scalar instructions (Clang does).
template <int kDtype, bool kEntropy, bool kSp2>
FASTRLHF_KERNEL Elem<kDtype> label_grad(float x_label, const GradScalars& c) {
  const V x = Isa::set1(x_label);
  const V p = vexp(Isa::sub(x, c.lse));
  V g = Isa::fnmadd(c.dlogp, p, c.dlogp);
  if constexpr (kEntropy) {
    const V q = Isa::keep(Isa::gt(p, Isa::zero()), Isa::mul(p, Isa::sub(x, c.E)));
    g = Isa::fnmadd(c.dent, q, g);
  }
  if constexpr (kSp2) g = Isa::fmadd(c.dsp2x2, Isa::mul(p, Isa::sub(p, c.sp2)), g);
  return store1<kDtype>(Isa::first(Isa::mul(g, c.inv_temp)));
}

template <int kDtype, int kKind>
FASTRLHF_KERNEL void grad_row(const void* row_v, void* out_v, int64_t Vn, int64_t label, float inv_temp, float lse,
                              float E, float dl, float de, float sp2, float dq) {
  using T = Elem<kDtype>;
  constexpr bool kLogp = (kKind & kGradLogp) != 0;
  constexpr bool kEntropy = (kKind & kGradEntropy) != 0;
  constexpr bool kSp2 = (kKind & kGradSp2) != 0;
  const T* row = static_cast<const T*>(row_v);
  T* out = static_cast<T*>(out_v);
  // Read the label's logit before the row is overwritten (out may alias row).
  const float x_label = kLogp ? load1<kDtype>(row[label]) * inv_temp : 0.0f;
  const GradScalars c{Isa::set1(inv_temp), Isa::set1(lse), Isa::set1(E), Isa::set1(dl), Isa::set1(de),
                      Isa::set1(sp2), Isa::set1(2.0f * dq)};
  const int64_t V16 = Vn / kLanes * kLanes;
  for (int64_t i = 0; i < V16; i += kLanes)
    store16<kDtype>(out + i, grad16<kLogp, kEntropy, kSp2>(load16<kDtype>(row + i), c));
  if (V16 < Vn) {  // the tail through zero-padded vectors, stored with the same conversion
    const size_t bytes = static_cast<size_t>(Vn - V16) * sizeof(T);
    T in[kLanes] = {};
    T res[kLanes];
    std::memcpy(in, row + V16, bytes);
    store16<kDtype>(res, grad16<kLogp, kEntropy, kSp2>(load16<kDtype>(in), c));
    std::memcpy(out + V16, res, bytes);
  }
  if constexpr (kLogp) out[label] = label_grad<kDtype, kEntropy, kSp2>(x_label, c);
}

// Flat-array versions of the loads, stores and exp above, for tests.
template <int kDtype>
FASTRLHF_KERNEL void to_f32(const void* src_v, float* dst, int64_t n) {
  const Elem<kDtype>* src = static_cast<const Elem<kDtype>*>(src_v);
  const int64_t n16 = n / kLanes * kLanes;
  for (int64_t i = 0; i < n16; i += kLanes) Isa::storeu(dst + i, load16<kDtype>(src + i));
  for (int64_t i = n16; i < n; ++i) dst[i] = load1<kDtype>(src[i]);
}

template <int kDtype>
FASTRLHF_KERNEL void from_f32(const float* src, void* dst_v, int64_t n) {
  using T = Elem<kDtype>;
  T* dst = static_cast<T*>(dst_v);
  const int64_t n16 = n / kLanes * kLanes;
  for (int64_t i = 0; i < n16; i += kLanes) store16<kDtype>(dst + i, Isa::loadu(src + i));
  if (n16 < n) {
    float in[kLanes] = {};
    T res[kLanes];
    std::memcpy(in, src + n16, static_cast<size_t>(n - n16) * sizeof(float));
    store16<kDtype>(res, Isa::loadu(in));
    std::memcpy(dst + n16, res, static_cast<size_t>(n - n16) * sizeof(T));
  }
}

FASTRLHF_KERNEL void exp_n(const float* src, float* dst, int64_t n) {
  const int64_t n16 = n / kLanes * kLanes;
  for (int64_t i = 0; i < n16; i += kLanes) Isa::storeu(dst + i, vexp(Isa::loadu(src + i)));
  if (n16 < n) {
    float in[kLanes] = {};
    float res[kLanes];
    std::memcpy(in, src + n16, static_cast<size_t>(n - n16) * sizeof(float));
    Isa::storeu(res, vexp(Isa::loadu(in)));
    std::memcpy(dst + n16, res, static_cast<size_t>(n - n16) * sizeof(float));
  }
}

const RowKernels* table() {
  static const RowKernels kernels = {
      Isa::kName,
      {{row_stats<kFloat32, 0>, row_stats<kFloat32, 1>, row_stats<kFloat32, 2>, row_stats<kFloat32, 3>},
       {row_stats<kBFloat16, 0>, row_stats<kBFloat16, 1>, row_stats<kBFloat16, 2>, row_stats<kBFloat16, 3>},
       {row_stats<kFloat16, 0>, row_stats<kFloat16, 1>, row_stats<kFloat16, 2>, row_stats<kFloat16, 3>}},
      {{nullptr, grad_row<kFloat32, 1>, grad_row<kFloat32, 2>, grad_row<kFloat32, 3>, grad_row<kFloat32, 4>,
        grad_row<kFloat32, 5>, grad_row<kFloat32, 6>, grad_row<kFloat32, 7>},
       {nullptr, grad_row<kBFloat16, 1>, grad_row<kBFloat16, 2>, grad_row<kBFloat16, 3>, grad_row<kBFloat16, 4>,
        grad_row<kBFloat16, 5>, grad_row<kBFloat16, 6>, grad_row<kBFloat16, 7>},
       {nullptr, grad_row<kFloat16, 1>, grad_row<kFloat16, 2>, grad_row<kFloat16, 3>, grad_row<kFloat16, 4>,
        grad_row<kFloat16, 5>, grad_row<kFloat16, 6>, grad_row<kFloat16, 7>}},
      {to_f32<kFloat32>, to_f32<kBFloat16>, to_f32<kFloat16>},
      {from_f32<kFloat32>, from_f32<kBFloat16>, from_f32<kFloat16>},
      exp_n,
  };
  return &kernels;
}
