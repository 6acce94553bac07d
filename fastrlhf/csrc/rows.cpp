// Threading, labels and dispatch of the native row passes; the math and layout are
// documented in rows.h, the per-row kernels (AVX-512 / AVX2 / portable) in
// row_kernels.inl and simd.h.
//
// Forward, per row: one streaming pass with a blockwise online logsumexp (one exp per
// element, the next block prefetched while the current one's exps run). Backward, per row:
// one pass recomputing p = exp(x - lse) from the saved lse and writing the gradient in the
// logits' dtype. Rows are spread over OpenMP threads; a row is always processed by one call
// of one kernel, so its bits never depend on the thread count or on the other rows.
#include "rows.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define FASTRLHF_X86_DISPATCH 1
#endif

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fastrlhf {
namespace {

// Below this many logits a parallel region costs more than it saves.
[[maybe_unused]] constexpr int64_t kMinParallelElems = 1 << 15;

int resolve_threads(int num_threads, int64_t elems) {
#ifdef _OPENMP
  if (elems < kMinParallelElems) return 1;
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  (void)elems;
  return 1;
#endif
}

// Rows per OpenMP work item: about 16k logits, so that scheduling overhead stays small for
// tiny V while ignored (cheap) rows still balance across threads for large V.
int64_t rows_per_chunk(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 14) / V); }

// A fresh gradient buffer is first touched by the backward pass; with 4 KiB pages that is
// one page fault per 4 KiB (measured here: 0.15-0.4 s for the 524 MB gradient of N=4096,
// V=32000, longer than the pass itself). Asking for transparent huge pages on the range
// (Linux THP in "madvise" mode, the common default) makes that one fault per 2 MiB. It only
// changes how not-yet-touched pages are backed; a failure (THP off, range not mapped) is
// harmless and ignored. torch does the same for its own allocations under
// THP_MEM_ALLOC_ENABLE=1 (c10/core/alloc_cpu.cpp).
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kMinBytes = int64_t{8} << 20;
  if (bytes < kMinBytes) return;
  const long page = sysconf(_SC_PAGESIZE);
  if (page <= 0) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + page - 1) / page * page;
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) / page * page;
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Label of row n, or -1 with *ignored set; out-of-range labels are reported through *bad.
FASTRLHF_INLINE int64_t read_label(const Labels& lab, int64_t n, bool* ignored, bool* bad, int64_t V) {
  *ignored = false;
  *bad = false;
  if (lab.data == nullptr) return -1;
  const int64_t v = lab.bytes == 8 ? static_cast<const int64_t*>(lab.data)[n]
                                   : static_cast<int64_t>(static_cast<const int32_t*>(lab.data)[n]);
  if (v == lab.ignore_index) {
    *ignored = true;
  } else if (v < 0 || v >= V) {
    *bad = true;
  }
  return v;
}

void record_bad(std::atomic<int64_t>* first_bad, int64_t n) {
  int64_t cur = first_bad->load(std::memory_order_relaxed);
  while (n < cur && !first_bad->compare_exchange_weak(cur, n, std::memory_order_relaxed)) {
  }
}

[[noreturn]] void throw_bad_label(const Labels& lab, int64_t n, int64_t V) {
  const int64_t v = lab.bytes == 8 ? static_cast<const int64_t*>(lab.data)[n]
                                   : static_cast<int64_t>(static_cast<const int32_t*>(lab.data)[n]);
  throw std::invalid_argument("labels contains " + std::to_string(v) + " at flat position " + std::to_string(n) +
                              ", outside [0, " + std::to_string(V) + ") and not ignore_index=" +
                              std::to_string(lab.ignore_index));
}

// ---------------------------------------------------------------------------------------
// Dispatch: the widest kernel table this CPU and OS support, read once from cpuid/xgetbv
// (works for any compiler flags, so the wheel needs no -march). FASTRLHF_NATIVE_SIMD
// (avx512, avx2, portable) caps it, e.g. to compare against the portable kernels.
// ---------------------------------------------------------------------------------------

struct CpuFeatures {
  bool avx2_fma_f16c = false;
  bool avx512f = false;
};

CpuFeatures detect_cpu() {
  CpuFeatures f;
#ifdef FASTRLHF_X86_DISPATCH
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
  if (!(osxsave && avx)) return f;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6u) == 0x6u;     // SSE and AVX register state saved by the OS
  const bool zmm_state = (xcr0_lo & 0xE0u) == 0xE0u;   // opmask, ZMM0-15 upper halves, ZMM16-31
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1;
  f.avx2_fma_f16c = ymm_state && avx2 && fma && f16c;
  f.avx512f = f.avx2_fma_f16c && zmm_state && avx512f;
#endif
  return f;
}

// Widest first; entries the CPU cannot run (or that were not compiled) are skipped.
int runnable_tables(const RowKernels** out) {
  static const CpuFeatures cpu = detect_cpu();
  int n = 0;
  if (cpu.avx512f && avx512_kernels() != nullptr) out[n++] = avx512_kernels();
  if (cpu.avx2_fma_f16c && avx2_kernels() != nullptr) out[n++] = avx2_kernels();
  out[n++] = portable_kernels();
  return n;
}

const RowKernels* find_table(const char* name) {
  const RowKernels* tables[3];
  const int n = runnable_tables(tables);
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(tables[i]->name, name) == 0) return tables[i];
  }
  return nullptr;
}

const RowKernels* default_table() {
  const RowKernels* tables[3];
  const int n = runnable_tables(tables);
  const char* cap = std::getenv("FASTRLHF_NATIVE_SIMD");
  if (cap != nullptr && *cap != '\0') {
    for (int i = 0; i < n; ++i) {
      if (std::strcmp(tables[i]->name, cap) == 0) return tables[i];
    }
    // an unknown or unsupported name: fall back to the widest, as without the variable
  }
  return tables[0];
}

std::atomic<const RowKernels*>& active_table() {
  static std::atomic<const RowKernels*> table{default_table()};
  return table;
}

int64_t element_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// One logit as fp32 (the label's, for logp).
float load_one(int dtype, const char* row, int64_t i) {
  if (dtype == kFloat32) return reinterpret_cast<const float*>(row)[i];
  const uint16_t h = reinterpret_cast<const uint16_t*>(row)[i];
  return dtype == kBFloat16 ? bf16_to_f32(h) : f16_to_f32(h);
}

void forward_impl(const RowsIn& x, const Labels& lab, float inv_temp, float* logp, float* ent, float* lse,
                  float* sp2, int num_threads) {
  const int64_t T_ = x.T, V = x.V, N = x.B * T_;
  const int64_t esize = element_bytes(x.dtype);
  const char* base = static_cast<const char*>(x.data);
  const RowKernels& k = active_kernels();
  const StatsFn stats_lse = k.stats[x.dtype][0];
  const StatsFn stats_all = k.stats[x.dtype][(ent != nullptr ? kStatsEntropy : 0) | (sp2 != nullptr ? kStatsSp2 : 0)];
  [[maybe_unused]] const int nt = resolve_threads(num_threads, N * V);
  [[maybe_unused]] const int64_t chunk = rows_per_chunk(V);
  std::atomic<int64_t> first_bad{N};

#pragma omp parallel num_threads(nt)
  {
    alignas(64) float buf[kBufFloats];
#pragma omp for schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; ++n) {
      bool ignored, bad;
      const int64_t label = read_label(lab, n, &ignored, &bad, V);
      if (bad) {
        record_bad(&first_bad, n);
        continue;
      }
      const char* row = base + ((n / T_) * x.stride_b + (n % T_) * x.stride_t) * esize;
      // lse is defined on every row (the _rows.py spec); entropy and sum p^2 are skipped where they
      // are 0 anyway.
      const RowStats rs = !ignored ? stats_all(row, V, inv_temp, buf) : stats_lse(row, V, inv_temp, buf);
      lse[n] = rs.lse;
      if (logp != nullptr) logp[n] = ignored ? 0.0f : load_one(x.dtype, row, label) * inv_temp - rs.lse;
      if (ent != nullptr) ent[n] = ignored ? 0.0f : rs.ent;
      if (sp2 != nullptr) sp2[n] = ignored ? 0.0f : rs.sp2;
    }
  }
  if (first_bad.load() < N) throw_bad_label(lab, first_bad.load(), V);
}

void backward_impl(const RowsIn& x, const Labels& lab, const float* lse, const float* ent, const float* dlogp,
                   const float* dent, const float* sp2, const float* dsp2, float inv_temp, void* out_data, int64_t osb,
                   int64_t ost, int num_threads) {
  const int64_t B = x.B, T_ = x.T, V = x.V, N = B * T_;
  const int64_t esize = element_bytes(x.dtype);
  const char* base = static_cast<const char*>(x.data);
  char* obase = static_cast<char*>(out_data);
  const bool has_logp = dlogp != nullptr;
  const bool has_ent = dent != nullptr;
  const bool has_sp2 = dsp2 != nullptr;
  const GradFn grad = active_kernels().grad[x.dtype][(has_logp ? kGradLogp : 0) | (has_ent ? kGradEntropy : 0) |
                                                     (has_sp2 ? kGradSp2 : 0)];
  [[maybe_unused]] const int nt = resolve_threads(num_threads, N * V);
  [[maybe_unused]] const int64_t chunk = rows_per_chunk(V);
  std::atomic<int64_t> first_bad{N};
  if (N > 0 && out_data != x.data) {
    // Extent of the gradient's rows in memory (non-negative strides, as torch views have).
    const int64_t extent = (B - 1) * osb + (T_ - 1) * ost + V;
    advise_huge_pages(out_data, extent * esize);
  }

#pragma omp parallel for num_threads(nt) schedule(dynamic, chunk)
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = n / T_, t = n % T_;
    char* out = obase + (b * osb + t * ost) * esize;
    bool ignored, bad;
    const int64_t label = read_label(lab, n, &ignored, &bad, V);
    if (bad) record_bad(&first_bad, n);
    if (ignored || bad || !(has_logp || has_ent || has_sp2)) {
      std::memset(out, 0, static_cast<size_t>(V * esize));  // +0 in every dtype
      continue;
    }
    const char* row = base + (b * x.stride_b + t * x.stride_t) * esize;
    const float dl = has_logp ? dlogp[n] : 0.0f;
    const float de = has_ent ? dent[n] : 0.0f;
    const float E = has_ent ? lse[n] - ent[n] : 0.0f;  // E = sum(p * x)
    grad(row, out, V, has_logp ? label : -1, inv_temp, lse[n], E, dl, de, has_sp2 ? sp2[n] : 0.0f,
         has_sp2 ? dsp2[n] : 0.0f);
  }
  if (first_bad.load() < N) throw_bad_label(lab, first_bad.load(), V);
}

void check_common(const RowsIn& x, const Labels& lab) {
  if (x.B < 0 || x.T < 0) throw std::invalid_argument("B and T must be >= 0");
  if (x.V < 1) throw std::invalid_argument("V must be >= 1");
  if (x.data == nullptr && x.B * x.T > 0) throw std::invalid_argument("logits pointer is null");
  if (lab.data != nullptr && lab.bytes != 4 && lab.bytes != 8)
    throw std::invalid_argument("labels must be int32 or int64 (4 or 8 bytes per element)");
}

}  // namespace

void row_forward(const RowsIn& x, const Labels& labels, float inv_temp, float* logp, float* ent, float* lse,
                 float* sp2, int num_threads) {
  check_common(x, labels);
  if (lse == nullptr) throw std::invalid_argument("lse output pointer is null");
  if (logp != nullptr && labels.data == nullptr) throw std::invalid_argument("logp output requires labels");
  if (x.dtype != kFloat32 && x.dtype != kBFloat16 && x.dtype != kFloat16)
    throw std::invalid_argument("unsupported logits dtype code " + std::to_string(x.dtype));
  forward_impl(x, labels, inv_temp, logp, ent, lse, sp2, num_threads);
}

void row_backward(const RowsIn& x, const Labels& labels, const float* lse, const float* ent, const float* dlogp,
                  const float* dent, const float* sp2, const float* dsp2, float inv_temp, void* out,
                  int64_t out_stride_b, int64_t out_stride_t, int num_threads) {
  check_common(x, labels);
  if (out == nullptr && x.B * x.T > 0) throw std::invalid_argument("gradient output pointer is null");
  if (lse == nullptr) throw std::invalid_argument("lse pointer is null");
  if (dlogp != nullptr && labels.data == nullptr) throw std::invalid_argument("dlogp requires labels");
  if (dent != nullptr && ent == nullptr) throw std::invalid_argument("dent requires the saved entropy");
  if (dsp2 != nullptr && sp2 == nullptr) throw std::invalid_argument("dsp2 requires the saved sum p^2");
  if (x.dtype != kFloat32 && x.dtype != kBFloat16 && x.dtype != kFloat16)
    throw std::invalid_argument("unsupported logits dtype code " + std::to_string(x.dtype));
  backward_impl(x, labels, lse, ent, dlogp, dent, sp2, dsp2, inv_temp, out, out_stride_b, out_stride_t, num_threads);
}

const RowKernels& active_kernels() { return *active_table().load(std::memory_order_relaxed); }

bool set_simd(const char* name) {
  const RowKernels* t = find_table(name);
  if (t == nullptr) return false;
  active_table().store(t, std::memory_order_relaxed);
  return true;
}

int supported_simd(const char** names, int capacity) {
  const RowKernels* tables[3];
  const int n = runnable_tables(tables);
  int written = 0;
  for (int i = 0; i < n && written < capacity; ++i) names[written++] = tables[i]->name;
  return written;
}

}  // namespace fastrlhf
