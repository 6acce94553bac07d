// pybind11 binding of the native row passes (module fastrlhf._C).
//
// Tensors cross as raw addresses (uintptr_t from torch's data_ptr()) plus sizes, element
// strides and a dtype code, so this module needs no torch headers: it builds in pip's
// isolated build environment and works with any torch ABI. fastrlhf/_native.py validates
// every tensor (device, dtype, shape, strides, contiguity) and allocates the outputs before
// calling in; the checks here only guard against a misuse of this low-level interface.
// The GIL is released while the rows are processed.
//
// simd_level / simd_levels / set_simd_level expose the run-time ISA dispatch (simd.h);
// simd_to_f32 / simd_from_f32 / simd_exp run the active kernels' conversions and exp on flat
// arrays, so that tests can check them bit for bit against torch and fp64.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "rows.h"
#include "simd.h"

namespace py = pybind11;

namespace {

template <class P>
P* ptr(uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

void forward(uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t stride_b, int64_t stride_t,
             uintptr_t labels, int label_bytes, int64_t ignore_index, double inv_temp, uintptr_t logp, uintptr_t ent,
             uintptr_t lse, uintptr_t sp2, int num_threads) {
  const fastrlhf::RowsIn in{ptr<const void>(x), dtype, B, T, V, stride_b, stride_t};
  const fastrlhf::Labels lab{ptr<const void>(labels), label_bytes, ignore_index};
  py::gil_scoped_release no_gil;
  fastrlhf::row_forward(in, lab, static_cast<float>(inv_temp), ptr<float>(logp), ptr<float>(ent), ptr<float>(lse),
                        ptr<float>(sp2), num_threads);
}

void backward(uintptr_t x, int dtype, int64_t B, int64_t T, int64_t V, int64_t stride_b, int64_t stride_t,
              uintptr_t labels, int label_bytes, int64_t ignore_index, uintptr_t lse, uintptr_t ent, uintptr_t dlogp,
              uintptr_t dent, uintptr_t sp2, uintptr_t dsp2, double inv_temp, uintptr_t out, int64_t out_stride_b,
              int64_t out_stride_t, int num_threads) {
  const fastrlhf::RowsIn in{ptr<const void>(x), dtype, B, T, V, stride_b, stride_t};
  const fastrlhf::Labels lab{ptr<const void>(labels), label_bytes, ignore_index};
  py::gil_scoped_release no_gil;
  fastrlhf::row_backward(in, lab, ptr<const float>(lse), ptr<const float>(ent), ptr<const float>(dlogp),
                         ptr<const float>(dent), ptr<const float>(sp2), ptr<const float>(dsp2),
                         static_cast<float>(inv_temp), ptr<void>(out), out_stride_b, out_stride_t, num_threads);
}

int checked_dtype(int dtype) {
  if (dtype != fastrlhf::kFloat32 && dtype != fastrlhf::kBFloat16 && dtype != fastrlhf::kFloat16)
    throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype));
  return dtype;
}

std::vector<std::string> simd_levels() {
  const char* names[4];
  const int n = fastrlhf::supported_simd(names, 4);
  return std::vector<std::string>(names, names + n);
}

void set_simd_level(const std::string& name) {
  if (!fastrlhf::set_simd(name.c_str()))
    throw std::invalid_argument("SIMD level '" + name + "' is unknown or not supported by this CPU");
}

void simd_to_f32(uintptr_t src, int dtype, uintptr_t dst, int64_t n) {
  const auto fn = fastrlhf::active_kernels().to_f32[checked_dtype(dtype)];
  py::gil_scoped_release no_gil;
  fn(ptr<const void>(src), ptr<float>(dst), n);
}

void simd_from_f32(uintptr_t src, uintptr_t dst, int dtype, int64_t n) {
  const auto fn = fastrlhf::active_kernels().from_f32[checked_dtype(dtype)];
  py::gil_scoped_release no_gil;
  fn(ptr<const float>(src), ptr<void>(dst), n);
}

void simd_exp(uintptr_t src, uintptr_t dst, int64_t n) {
  const auto fn = fastrlhf::active_kernels().exp;
  py::gil_scoped_release no_gil;
  fn(ptr<const float>(src), ptr<float>(dst), n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrlhf native CPU row passes (raw-buffer interface; use fastrlhf._native)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(fastrlhf::kFloat32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(fastrlhf::kBFloat16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(fastrlhf::kFloat16);
#ifdef _OPENMP
  m.attr("OPENMP") = true;
#else
  m.attr("OPENMP") = false;
#endif
  m.def("row_forward", &forward, "lse[N] (+ logp[N], ent[N], sp2[N]) of [B, T, V] logits; addresses are 0 for None",
        py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("stride_b"),
        py::arg("stride_t"), py::arg("labels"), py::arg("label_bytes"), py::arg("ignore_index"), py::arg("inv_temp"),
        py::arg("logp"), py::arg("ent"), py::arg("lse"), py::arg("sp2"), py::arg("num_threads"));
  m.def("row_backward", &backward, "d/dlogits of sum(dlogp * logp + dent * ent + dsp2 * sp2) into out (may alias x)",
        py::arg("x"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"), py::arg("stride_b"),
        py::arg("stride_t"), py::arg("labels"), py::arg("label_bytes"), py::arg("ignore_index"), py::arg("lse"),
        py::arg("ent"), py::arg("dlogp"), py::arg("dent"), py::arg("sp2"), py::arg("dsp2"), py::arg("inv_temp"),
        py::arg("out"),
        py::arg("out_stride_b"), py::arg("out_stride_t"), py::arg("num_threads"));
  m.def("simd_level", []() { return std::string(fastrlhf::active_kernels().name); },
        "the kernel table the row passes use now: 'avx512', 'avx2' or 'portable'");
  m.def("simd_levels", &simd_levels, "the kernel tables this CPU can run, widest first");
  m.def("set_simd_level", &set_simd_level, "switch the kernel table (tests, benchmarks); not thread-safe "
        "against row passes running at the same time", py::arg("name"));
  m.def("simd_to_f32", &simd_to_f32, "dst[n] fp32 = the row passes' load of src[n] (dtype code)", py::arg("src"),
        py::arg("dtype"), py::arg("dst"), py::arg("n"));
  m.def("simd_from_f32", &simd_from_f32, "dst[n] (dtype code) = the gradient store of fp32 src[n]", py::arg("src"),
        py::arg("dst"), py::arg("dtype"), py::arg("n"));
  m.def("simd_exp", &simd_exp, "dst[n] = the row passes' exp of fp32 src[n]", py::arg("src"), py::arg("dst"),
        py::arg("n"));
}
