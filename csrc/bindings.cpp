// The only file with PYBIND11_MODULE: checks every argument, then dispatches to
// the CPU kernels (csrc/cpu) or, for CUDA tensors, the CUDA kernels (csrc/cuda).
// The Python layer validates too; these checks make the extension safe to call
// directly (a bad argument is a ValueError/TypeError naming it, never a crash).
#include <torch/extension.h>

#include <optional>
#include <string>

#include "checks.h"
#include "drlora_build_config.h"
#include "grouped_lora.h"
#ifdef DRLORA_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace drlora {
namespace {

#define DRLORA_FLOAT_DTYPES at::kFloat, at::kBFloat16, at::kHalf, at::kDouble
#define DRLORA_INDEX_DTYPES at::kInt, at::kLong

struct Sizes {
  int64_t T, K, N, E, R;
};

// ranks [E], offsets [E+1], scale [E] (optional): dtype, shape, device, values.
void check_groups(const at::Tensor& ranks, const at::Tensor& offsets, const at::Tensor* scale_ptr,
                  const at::Tensor& ref, const char* ref_name, int64_t E, int64_t R, int64_t T) {
  DRLORA_CHECK_DTYPE(ranks, DRLORA_INDEX_DTYPES);
  DRLORA_CHECK_DTYPE(offsets, DRLORA_INDEX_DTYPES);
  DRLORA_CHECK_SHAPE(ranks, "[E]", E);
  DRLORA_CHECK_SHAPE(offsets, "[E+1]", E + 1);
  checks::check_same_device(ranks, "ranks", ref, ref_name);
  checks::check_same_device(offsets, "offsets", ref, ref_name);
  if (scale_ptr != nullptr) {
    const at::Tensor& scale = *scale_ptr;  // named so that the messages say "scale"
    DRLORA_CHECK_DTYPE(scale, at::kFloat);
    DRLORA_CHECK_SHAPE(scale, "[E]", E);
    checks::check_same_device(scale, "scale", ref, ref_name);
    DRLORA_CHECK_CONTIGUOUS(scale);
  }
  DRLORA_CHECK_RANKS(ranks, R);
  DRLORA_CHECK_OFFSETS(offsets, T);
}

void check_device_supported(const at::Tensor& x, const char* name = "x") {
  const bool cpu = x.device().is_cpu();
#ifdef DRLORA_WITH_CUDA
  const bool ok = cpu || x.is_cuda();
  const char* built = "cpu and cuda";
#else
  const bool ok = cpu;
  const char* built = "cpu only (built without CUDA)";
#endif
  DRLORA_CHECK(ok, name, " is on ", x.device(), ", the native extension supports ", built);
#ifdef DRLORA_WITH_CUDA
  if (x.is_cuda()) {
    if (x.scalar_type() == at::kDouble) {
      throw pybind11::type_error(c10::str(name, " has dtype float64: the native CUDA kernels "
                                          "support float32, bfloat16, float16"));
    }
  }
#endif
}

// x [T, K], lora_a [E, R, K], lora_b [E, N, R], w [E, N, K] (optional): same dtype and device.
Sizes check_problem(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    const std::optional<at::Tensor>& w) {
  DRLORA_CHECK_DIM(x, 2);
  DRLORA_CHECK_DIM(lora_a, 3);
  DRLORA_CHECK_DIM(lora_b, 3);
  DRLORA_CHECK_DTYPE(x, DRLORA_FLOAT_DTYPES);
  const Sizes s{x.size(0), x.size(1), lora_b.size(1), lora_a.size(0), lora_a.size(1)};
  DRLORA_CHECK_SHAPE(lora_a, "[E, R, K]", s.E, s.R, s.K);
  DRLORA_CHECK_SHAPE(lora_b, "[E, N, R]", s.E, s.N, s.R);
  DRLORA_CHECK_SAME_DTYPE(lora_a, x);
  DRLORA_CHECK_SAME_DTYPE(lora_b, x);
  DRLORA_CHECK_DEVICE(lora_a, x);
  DRLORA_CHECK_DEVICE(lora_b, x);
  DRLORA_CHECK_CONTIGUOUS(x);
  DRLORA_CHECK_CONTIGUOUS(lora_a);
  DRLORA_CHECK_CONTIGUOUS(lora_b);
  if (w.has_value()) {
    checks::check_shape(*w, "w", {s.E, s.N, s.K}, "[E, N, K]");
    if (w->scalar_type() != x.scalar_type()) {
      throw pybind11::type_error(c10::str("w has dtype ", w->scalar_type(), " but x has ",
                                          x.scalar_type(), "; they must match"));
    }
    checks::check_same_device(*w, "w", x, "x");
    checks::check_contiguous(*w, "w");
  }
  check_device_supported(x);
  return s;
}

// u [T, R] in the accumulation dtype of `ref` (fp64 for fp64, else fp32).
void check_u(const at::Tensor& u, const at::Tensor& ref, const char* ref_name, int64_t T,
             int64_t R) {
  DRLORA_CHECK_SHAPE(u, "[T, R]", T, R);
  const auto acc = ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (u.scalar_type() != acc) {
    throw pybind11::type_error(c10::str("u has dtype ", u.scalar_type(), ", expected ", acc,
                                        " (the accumulation dtype of ", ref_name, "'s ",
                                        ref.scalar_type(), ")"));
  }
  checks::check_same_device(u, "u", ref, ref_name);
  DRLORA_CHECK_CONTIGUOUS(u);
}

// CUDA tensors only on this branch (the CUDA primitives of cuda_ops.h).
void check_cuda_primitive(const at::Tensor& t, const char* name) {
#ifdef DRLORA_WITH_CUDA
  DRLORA_CHECK(t.is_cuda(), name, " is on ", t.device(),
               ": this entry point runs the CUDA primitives (CPU: shrink/forward/backward)");
#else
  DRLORA_CHECK(false, name, " is on ", t.device(),
               ": the extension was built without CUDA, this entry point is CUDA only");
#endif
}

// shrink: lora_a may have any strides on CUDA (the backward passes lora_b^T); the
// CPU kernel wants it contiguous and takes no scale.
at::Tensor shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& ranks,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& scale) {
  DRLORA_CHECK_DIM(x, 2);
  DRLORA_CHECK_DIM(lora_a, 3);
  DRLORA_CHECK_DTYPE(x, DRLORA_FLOAT_DTYPES);
  const int64_t E = lora_a.size(0), R = lora_a.size(1), K = x.size(1), T = x.size(0);
  DRLORA_CHECK_SHAPE(lora_a, "[E, R, K]", E, R, K);
  DRLORA_CHECK_SAME_DTYPE(lora_a, x);
  DRLORA_CHECK_DEVICE(lora_a, x);
  DRLORA_CHECK_CONTIGUOUS(x);
  check_device_supported(x);
  check_groups(ranks, offsets, scale.has_value() ? &*scale : nullptr, x, "x", E, R, T);
#ifdef DRLORA_WITH_CUDA
  if (x.is_cuda()) {
    pybind11::gil_scoped_release nogil;
    return cuda::shrink(x, lora_a, ranks, offsets, scale);
  }
#endif
  DRLORA_CHECK_CONTIGUOUS(lora_a);
  DRLORA_CHECK(!scale.has_value(), "scale is not supported by the CPU shrink on this branch");
  pybind11::gil_scoped_release nogil;
  return cpu::shrink(x, lora_a, ranks, offsets);
}

at::Tensor base_expand(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& w,
                       const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& ranks,
                       const at::Tensor& offsets, const at::Tensor& scale) {
  DRLORA_CHECK_DIM(u, 2);
  DRLORA_CHECK_DIM(lora_b, 3);
  DRLORA_CHECK_DTYPE(lora_b, DRLORA_FLOAT_DTYPES);
  check_cuda_primitive(lora_b, "lora_b");
  check_device_supported(lora_b, "lora_b");
  const int64_t T = u.size(0), R = u.size(1), E = lora_b.size(0), N = lora_b.size(1);
  DRLORA_CHECK_SHAPE(lora_b, "[E, N, R]", E, N, R);
  check_u(u, lora_b, "lora_b", T, R);
  DRLORA_CHECK(x.has_value() || !w.has_value(), "w is given but x is None: the base GEMM needs x");
  if (x.has_value()) {
    const at::Tensor& xv = *x;
    checks::check_shape(xv, "x", {T, xv.dim() == 2 ? xv.size(1) : -1}, "[T, K]");
    DRLORA_CHECK_SAME_DTYPE(xv, lora_b);
    checks::check_same_device(xv, "x", lora_b, "lora_b");
    checks::check_contiguous(xv, "x");
  }
  if (w.has_value()) {
    const at::Tensor& wv = *w;
    checks::check_shape(wv, "w", {E, N, x->size(1)}, "[E, N, K]");
    DRLORA_CHECK_SAME_DTYPE(wv, lora_b);
    checks::check_same_device(wv, "w", lora_b, "lora_b");
  }
  check_groups(ranks, offsets, &scale, lora_b, "lora_b", E, R, T);
  pybind11::gil_scoped_release nogil;
#ifdef DRLORA_WITH_CUDA
  return cuda::base_expand(x, w, u, lora_b, ranks, offsets, scale);
#else
  return at::Tensor();  // unreachable: check_cuda_primitive threw
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
    const std::optional<at::Tensor>& gb, const at::Tensor& ranks, const at::Tensor& offsets,
    const at::Tensor& scale, bool need_a, bool need_b, bool need_w) {
  DRLORA_CHECK_DIM(x, 2);
  DRLORA_CHECK_DIM(grad_y, 2);
  DRLORA_CHECK_DIM(u, 2);
  DRLORA_CHECK_DTYPE(x, DRLORA_FLOAT_DTYPES);
  check_cuda_primitive(x, "x");
  check_device_supported(x);
  const int64_t T = x.size(0), R = u.size(1), E = ranks.dim() == 1 ? ranks.size(0) : -1;
  DRLORA_CHECK_SHAPE(grad_y, "[T, N]", T, grad_y.size(1));
  DRLORA_CHECK_SAME_DTYPE(grad_y, x);
  DRLORA_CHECK_DEVICE(grad_y, x);
  DRLORA_CHECK_CONTIGUOUS(x);
  DRLORA_CHECK_CONTIGUOUS(grad_y);
  check_u(u, x, "x", T, R);
  DRLORA_CHECK(!need_a || gb.has_value(), "need_a is true but gb is None");
  if (need_a) check_u(*gb, x, "x", T, R);
  check_groups(ranks, offsets, &scale, x, "x", E, R, T);
  const at::Tensor gb_t = need_a ? *gb : at::empty({0}, u.options());
  pybind11::gil_scoped_release nogil;
#ifdef DRLORA_WITH_CUDA
  return cuda::weight_grad(grad_y, x, u, gb_t, ranks, offsets, scale, need_a, need_b, need_w);
#else
  return {};  // unreachable: check_cuda_primitive threw
#endif
}

at::Tensor expand(const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& ranks,
                  const at::Tensor& offsets, const at::Tensor& scale) {
  DRLORA_CHECK_DIM(u, 2);
  DRLORA_CHECK_DIM(lora_b, 3);
  DRLORA_CHECK_DTYPE(lora_b, DRLORA_FLOAT_DTYPES);
  const int64_t T = u.size(0), R = u.size(1), E = lora_b.size(0), N = lora_b.size(1);
  DRLORA_CHECK_SHAPE(lora_b, "[E, N, R]", E, N, R);
  check_u(u, lora_b, "lora_b", T, R);
  DRLORA_CHECK_CONTIGUOUS(lora_b);
  check_device_supported(lora_b, "lora_b");
  check_groups(ranks, offsets, &scale, u, "u", E, R, T);
  pybind11::gil_scoped_release nogil;
  DRLORA_CHECK(u.device().is_cpu(), "u is on ", u.device(), ": expand is CPU only (CUDA: base_expand)");
  return cpu::expand(u, lora_b, ranks, offsets, scale);
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const std::optional<at::Tensor>& w,
                                           const at::Tensor& lora_a, const at::Tensor& lora_b,
                                           const at::Tensor& ranks, const at::Tensor& offsets,
                                           const at::Tensor& scale) {
  const Sizes s = check_problem(x, lora_a, lora_b, w);
  check_groups(ranks, offsets, &scale, x, "x", s.E, s.R, s.T);
  pybind11::gil_scoped_release nogil;
  DRLORA_CHECK(x.device().is_cpu(), "x is on ", x.device(),
               ": forward is CPU only (CUDA: shrink + base_expand)");
  return cpu::forward(x, w, lora_a, lora_b, ranks, offsets, scale);
}

BackwardOut backward(const at::Tensor& grad_y, const at::Tensor& x,
                     const std::optional<at::Tensor>& w, const at::Tensor& lora_a,
                     const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& ranks,
                     const at::Tensor& offsets, const at::Tensor& scale, bool need_x, bool need_w,
                     bool need_a, bool need_b, bool with_importance) {
  const Sizes s = check_problem(x, lora_a, lora_b, w);
  DRLORA_CHECK_SHAPE(grad_y, "[T, N]", s.T, s.N);
  DRLORA_CHECK_SAME_DTYPE(grad_y, x);
  DRLORA_CHECK_DEVICE(grad_y, x);
  DRLORA_CHECK_CONTIGUOUS(grad_y);
  check_u(u, x, "x", s.T, s.R);
  check_groups(ranks, offsets, &scale, x, "x", s.E, s.R, s.T);
  DRLORA_CHECK(!need_w || w.has_value(), "need_w is true but w is None");
  pybind11::gil_scoped_release nogil;
  DRLORA_CHECK(x.device().is_cpu(), "x is on ", x.device(),
               ": backward is CPU only (CUDA: shrink + base_expand + weight_grad)");
  return cpu::backward(grad_y, x, w, lora_a, lora_b, u, ranks, offsets, scale, need_x, need_w,
                       need_a, need_b, with_importance);
}

std::tuple<at::Tensor, at::Tensor> slot_importance(const at::Tensor& lora_a,
                                                   const at::Tensor& grad_a,
                                                   const at::Tensor& lora_b,
                                                   const at::Tensor& grad_b,
                                                   const at::Tensor& ranks) {
  DRLORA_CHECK_DIM(lora_a, 3);
  DRLORA_CHECK_DIM(lora_b, 3);
  DRLORA_CHECK_DTYPE(lora_a, DRLORA_FLOAT_DTYPES);
  const int64_t E = lora_a.size(0), R = lora_a.size(1), K = lora_a.size(2), N = lora_b.size(1);
  DRLORA_CHECK_SHAPE(grad_a, "[E, R, K]", E, R, K);
  DRLORA_CHECK_SHAPE(lora_b, "[E, N, R]", E, N, R);
  DRLORA_CHECK_SHAPE(grad_b, "[E, N, R]", E, N, R);
  DRLORA_CHECK_SAME_DTYPE(grad_a, lora_a);
  DRLORA_CHECK_SAME_DTYPE(lora_b, lora_a);
  DRLORA_CHECK_SAME_DTYPE(grad_b, lora_a);
  DRLORA_CHECK_DEVICE(grad_a, lora_a);
  DRLORA_CHECK_DEVICE(lora_b, lora_a);
  DRLORA_CHECK_DEVICE(grad_b, lora_a);
  DRLORA_CHECK_DEVICE(ranks, lora_a);
  DRLORA_CHECK_CONTIGUOUS(lora_a);
  DRLORA_CHECK_CONTIGUOUS(grad_a);
  DRLORA_CHECK_CONTIGUOUS(lora_b);
  DRLORA_CHECK_CONTIGUOUS(grad_b);
  DRLORA_CHECK(lora_a.device().is_cpu(), "lora_a is on ", lora_a.device(),
               ": the native slot_importance runs on the CPU only");
  DRLORA_CHECK_DTYPE(ranks, DRLORA_INDEX_DTYPES);
  DRLORA_CHECK_SHAPE(ranks, "[E]", E);
  DRLORA_CHECK_RANKS(ranks, R);
  pybind11::gil_scoped_release nogil;
  return cpu::slot_importance(lora_a, grad_a, lora_b, grad_b, ranks);
}

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef DRLORA_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
  d["cuda_archs"] = DRLORA_CUDA_ARCHS;
  d["cxx_compiler"] = DRLORA_CXX_COMPILER;
  d["cuda_compiler"] = DRLORA_CUDA_COMPILER;
  d["cpu_kernels"] = true;
  d["cpu_dtypes"] = "float32, bfloat16, float16 (fp32 accumulation), float64";
#ifdef DRLORA_WITH_CUDA
  d["cuda_dtypes"] = "bfloat16, float16 (CUTLASS grouped GEMM on tensor cores, fp32 accumulation)";
#endif
  return d;
}

}  // namespace
}  // namespace drlora

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "drlora_kernels native extension: grouped variable-rank LoRA kernels (CPU, CUDA)";
  m.def("build_info", &drlora::build_info, "what this extension was compiled with");
  m.def("shrink", &drlora::shrink,
        "u [T, R] fp32: u[rows_e, :r_e] = scale[e] * x[rows_e] @ lora_a[e, :r_e].T, 0 beyond",
        py::arg("x"), py::arg("lora_a"), py::arg("ranks"), py::arg("offsets"),
        py::arg("scale") = py::none());
  m.def("base_expand", &drlora::base_expand,
        "y [T, N]: x[rows_e] @ w[e].T (if w) + scale[e] * u[rows_e, :r_e] @ lora_b[e, :, :r_e].T "
        "(CUDA)",
        py::arg("x"), py::arg("w"), py::arg("u"), py::arg("lora_b"), py::arg("ranks"),
        py::arg("offsets"), py::arg("scale"));
  m.def("weight_grad", &drlora::weight_grad,
        "(da, db, dw); gradients not asked for are empty [0] tensors (CUDA)", py::arg("grad_y"),
        py::arg("x"), py::arg("u"), py::arg("gb"), py::arg("ranks"), py::arg("offsets"),
        py::arg("scale"), py::arg("need_a"), py::arg("need_b"), py::arg("need_w"));
  m.def("expand", &drlora::expand,
        "y[rows_e] = scale[e] * u[rows_e, :r_e] @ lora_b[e, :, :r_e].T -> [T, N]", py::arg("u"),
        py::arg("lora_b"), py::arg("ranks"), py::arg("offsets"), py::arg("scale"));
  m.def("forward", &drlora::forward,
        "(y, u): y = x @ w[e].T (if w) + scale[e] * (x @ lora_a[e,:r].T) @ lora_b[e,:,:r].T",
        py::arg("x"), py::arg("w"), py::arg("lora_a"), py::arg("lora_b"), py::arg("ranks"),
        py::arg("offsets"), py::arg("scale"));
  m.def("slot_importance", &drlora::slot_importance,
        "(imp_a, imp_b) fp32 [E, R]: sum_k |a*da| and sum_n |b*db| of the active slots, 0 "
        "elsewhere (CPU)",
        py::arg("lora_a"), py::arg("grad_a"), py::arg("lora_b"), py::arg("grad_b"),
        py::arg("ranks"));
  m.def("backward", &drlora::backward,
        "(dx, dw, da, db, imp_a, imp_b); unrequested outputs are empty [0] tensors",
        py::arg("grad_y"), py::arg("x"), py::arg("w"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("u"), py::arg("ranks"), py::arg("offsets"), py::arg("scale"), py::arg("need_x"),
        py::arg("need_w"), py::arg("need_a"), py::arg("need_b"), py::arg("with_importance"));
}
