// Argument checks for the Python-facing functions in bindings.cpp.
//
// Every macro names the offending argument and prints the values it got, and
// throws a pybind11 exception so Python sees a ValueError (shape, rank, device,
// offsets) or a TypeError (dtype) rather than a crash inside a kernel.
// Value checks on ranks/offsets read them on the host, so they run for CPU
// tensors only: on CUDA they would force a device sync on every call (the
// Python layer, drlora_kernels/ops/_validate.py, checks them with device-side
// asserts there). Integer tensors must arrive int32 and contiguous: the kernels
// index them as flat int32 arrays, and a strided or expanded view read that way
// is a wrong result or a heap corruption (the Python API converts them).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <initializer_list>
#include <string>

namespace drlora::checks {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

inline void check_dtype(const at::Tensor& t, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  std::string names;
  for (auto d : allowed) names += (names.empty() ? "" : ", ") + dtype_name(d);
  throw pybind11::type_error(c10::str(name, " has dtype ", t.scalar_type(),
                                      ", expected one of: ", names));
}

inline void check_shape(const at::Tensor& t, const char* name,
                        std::initializer_list<int64_t> expected, const char* layout) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  int64_t i = 0;
  for (auto s : expected) {
    ok = ok && t.size(i) == s;
    ++i;
  }
  if (!ok) {
    throw pybind11::value_error(c10::str(name, " must have shape ", layout, " = ",
                                         c10::IntArrayRef(expected), ", got ", shape_str(t)));
  }
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  if (t.scalar_type() != ref.scalar_type()) {
    throw pybind11::type_error(c10::str(name, " has dtype ", t.scalar_type(), " but ", ref_name,
                                        " has ", ref.scalar_type(), "; they must match"));
  }
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t ndim) {
  if (t.dim() != ndim) {
    throw pybind11::value_error(c10::str(name, " must be ", ndim, "-D, got shape ", shape_str(t)));
  }
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  if (t.device() != ref.device()) {
    throw pybind11::value_error(c10::str(name, " is on ", t.device(), " but ", ref_name, " is on ",
                                         ref.device(), "; all inputs must share a device"));
  }
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  if (!t.is_contiguous()) {
    throw pybind11::value_error(c10::str(name, " must be contiguous (shape ", shape_str(t),
                                         ", strides ", t.strides(), ")"));
  }
}

// ranks / offsets: 1-D, int32, contiguous (strides of a view would be ignored by the kernels).
inline void check_index_tensor(const at::Tensor& t, const char* name) {
  check_dim(t, name, 1);
  if (t.scalar_type() != at::kInt) {
    throw pybind11::type_error(c10::str(name, " has dtype ", t.scalar_type(),
                                        ", expected Int (int32); the Python API converts it"));
  }
  if (!t.is_contiguous()) {
    throw pybind11::value_error(c10::str(
        name, " must be contiguous (shape ", shape_str(t), ", strides ", t.strides(),
        "): a strided or expanded integer view; pass .contiguous() (the Python API does)"));
  }
}

// 0 <= ranks[e] <= r_max for every e (host tensors only).
inline void check_ranks_range(const at::Tensor& ranks, int64_t r_max) {
  if (!ranks.device().is_cpu() || ranks.numel() == 0) return;
  auto r = ranks.to(at::kLong).contiguous();
  const int64_t* p = r.data_ptr<int64_t>();
  for (int64_t e = 0; e < r.numel(); ++e) {
    if (p[e] < 0 || p[e] > r_max) {
      throw pybind11::value_error(c10::str("ranks out of range: ranks[", e, "] = ", p[e],
                                           ", expected 0 <= rank <= r_max = ", r_max));
    }
  }
}

// offsets[0] == 0, non-decreasing, offsets[E] == T (host tensors only).
inline void check_offsets_values(const at::Tensor& offsets, int64_t num_rows) {
  if (!offsets.device().is_cpu()) return;
  auto o = offsets.to(at::kLong).contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  const int64_t n = o.numel();
  if (p[0] != 0) throw pybind11::value_error(c10::str("offsets[0] must be 0, got ", p[0]));
  for (int64_t e = 0; e + 1 < n; ++e) {
    if (p[e + 1] < p[e]) {
      throw pybind11::value_error(c10::str("offsets must be non-decreasing: offsets[", e, "] = ",
                                           p[e], " > offsets[", e + 1, "] = ", p[e + 1]));
    }
  }
  if (p[n - 1] != num_rows) {
    throw pybind11::value_error(c10::str("offsets[-1] must equal the number of token rows (",
                                         num_rows, "), got ", p[n - 1]));
  }
}

}  // namespace drlora::checks

#define DRLORA_CHECK(cond, ...)                                                     \
  do {                                                                              \
    if (!(cond)) throw pybind11::value_error(c10::str(__VA_ARGS__));                \
  } while (0)
#define DRLORA_CHECK_DIM(t, ndim) ::drlora::checks::check_dim(t, #t, ndim)
#define DRLORA_CHECK_SHAPE(t, layout, ...) \
  ::drlora::checks::check_shape(t, #t, {__VA_ARGS__}, layout)
#define DRLORA_CHECK_DTYPE(t, ...) ::drlora::checks::check_dtype(t, #t, {__VA_ARGS__})
#define DRLORA_CHECK_SAME_DTYPE(t, ref) ::drlora::checks::check_same_dtype(t, #t, ref, #ref)
#define DRLORA_CHECK_INDEX(t) ::drlora::checks::check_index_tensor(t, #t)
#define DRLORA_CHECK_DEVICE(t, ref) ::drlora::checks::check_same_device(t, #t, ref, #ref)
#define DRLORA_CHECK_CONTIGUOUS(t) ::drlora::checks::check_contiguous(t, #t)
#define DRLORA_CHECK_RANKS(ranks, r_max) ::drlora::checks::check_ranks_range(ranks, r_max)
#define DRLORA_CHECK_OFFSETS(offsets, num_rows) \
  ::drlora::checks::check_offsets_values(offsets, num_rows)
