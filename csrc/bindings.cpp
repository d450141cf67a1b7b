// The only file with PYBIND11_MODULE: checks every argument, then dispatches the
// three primitives of the backend contract (shrink, base_expand, weight_grad) to
// the CPU kernels (csrc/cpu, namespace drlora::cpu) or, for CUDA tensors, to
// drlora::cuda (csrc/cuda/cuda_ops.h, built with DRLORA_WITH_CUDA). The fused
// backward and slot_importance are CPU only.
// The Python layer validates too; these checks make the extension safe to call
// directly (a bad argument is a ValueError/TypeError naming it, never a crash).
// ranks / offsets must be int32 and contiguous (the Python API converts them).
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

// ranks [E], offsets [E+1] (int32, contiguous), scale [E] (fp32, optional): dtype,
// shape, device, layout, and (host tensors only, see checks.h) values.
void check_groups(const at::Tensor& ranks, const at::Tensor& offsets, const at::Tensor* scale_ptr,
                  const at::Tensor& ref, const char* ref_name, int64_t E, int64_t R, int64_t T) {
  DRLORA_CHECK_INDEX(ranks);
  DRLORA_CHECK_INDEX(offsets);
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

void check_device_supported(const at::Tensor& t, const char* name) {
  const bool cpu = t.device().is_cpu();
#ifdef DRLORA_WITH_CUDA
  const bool ok = cpu || t.is_cuda();
  const char* built = "cpu and cuda";
#else
  const bool ok = cpu;
  const char* built = "cpu only (built without CUDA)";
#endif
  DRLORA_CHECK(ok, name, " is on ", t.device(), ", the native extension supports ", built);
  if (t.is_cuda() && t.scalar_type() == at::kDouble) {
    throw pybind11::type_error(c10::str(name, " has dtype float64: the native CUDA kernels "
                                        "support float32, bfloat16, float16"));
  }
}

// A 3-D float operand of the grouped problem ([E, *, *], any strides), in ref's dtype and device.
void check_operand(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape,
                   const char* layout, const at::Tensor& ref, const char* ref_name) {
  checks::check_shape(t, name, shape, layout);
  checks::check_same_dtype(t, name, ref, ref_name);
  checks::check_same_device(t, name, ref, ref_name);
}

// u / gb [T, R] in the accumulation dtype of `ref` (fp64 for fp64, else fp32), contiguous.
void check_acc(const at::Tensor& u, const char* name, const at::Tensor& ref, const char* ref_name,
               int64_t T, int64_t R) {
  checks::check_shape(u, name, {T, R}, "[T, R]");
  const auto acc = ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (u.scalar_type() != acc) {
    throw pybind11::type_error(c10::str(name, " has dtype ", u.scalar_type(), ", expected ", acc,
                                        " (the accumulation dtype of ", ref_name, "'s ",
                                        ref.scalar_type(), ")"));
  }
  checks::check_same_device(u, name, ref, ref_name);
  checks::check_contiguous(u, name);
}

// x [T, K]: a contiguous 2-D float tensor on a supported device.
void check_rows(const at::Tensor& x, const char* name) {
  checks::check_dim(x, name, 2);
  checks::check_dtype(x, name, {DRLORA_FLOAT_DTYPES});
  checks::check_contiguous(x, name);
  check_device_supported(x, name);
}

at::Tensor shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& ranks,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& scale) {
  check_rows(x, "x");
  DRLORA_CHECK_DIM(lora_a, 3);
  const int64_t T = x.size(0), K = x.size(1), E = lora_a.size(0), R = lora_a.size(1);
  check_operand(lora_a, "lora_a", {E, R, K}, "[E, R, K]", x, "x");
  check_groups(ranks, offsets, scale.has_value() ? &*scale : nullptr, x, "x", E, R, T);
  pybind11::gil_scoped_release nogil;
#ifdef DRLORA_WITH_CUDA
  if (x.is_cuda()) return cuda::shrink(x, lora_a, ranks, offsets, scale);
#endif
  return cpu::shrink(x, lora_a, ranks, offsets, scale);
}

at::Tensor base_expand(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& w,
                       const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& ranks,
                       const at::Tensor& offsets, const at::Tensor& scale) {
  DRLORA_CHECK_DIM(lora_b, 3);
  DRLORA_CHECK_DTYPE(lora_b, DRLORA_FLOAT_DTYPES);
  check_device_supported(lora_b, "lora_b");
  DRLORA_CHECK_DIM(u, 2);
  const int64_t T = u.size(0), R = u.size(1), E = lora_b.size(0), N = lora_b.size(1);
  DRLORA_CHECK_SHAPE(lora_b, "[E, N, R]", E, N, R);
  check_acc(u, "u", lora_b, "lora_b", T, R);
  DRLORA_CHECK(x.has_value() || !w.has_value(), "w is given but x is None: the base GEMM needs x");
  if (x.has_value()) {
    check_rows(*x, "x");
    checks::check_shape(*x, "x", {T, x->size(1)}, "[T, K]");
    checks::check_same_dtype(*x, "x", lora_b, "lora_b");
    checks::check_same_device(*x, "x", lora_b, "lora_b");
  }
  if (w.has_value()) {
    check_operand(*w, "w", {E, N, x->size(1)}, "[E, N, K]", lora_b, "lora_b");
  }
  check_groups(ranks, offsets, &scale, lora_b, "lora_b", E, R, T);
  pybind11::gil_scoped_release nogil;
#ifdef DRLORA_WITH_CUDA
  if (lora_b.is_cuda()) return cuda::base_expand(x, w, u, lora_b, ranks, offsets, scale);
#endif
  return cpu::base_expand(x, w, u, lora_b, ranks, offsets, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
    const std::optional<at::Tensor>& gb, const at::Tensor& ranks, const at::Tensor& offsets,
    const at::Tensor& scale, bool need_a, bool need_b, bool need_w) {
  check_rows(grad_y, "grad_y");
  check_rows(x, "x");
  const int64_t T = x.size(0), R = u.dim() == 2 ? u.size(1) : -1, E = ranks.numel();
  DRLORA_CHECK_DIM(u, 2);
  checks::check_shape(grad_y, "grad_y", {T, grad_y.size(1)}, "[T, N]");
  checks::check_same_dtype(grad_y, "grad_y", x, "x");
  checks::check_same_device(grad_y, "grad_y", x, "x");
  check_acc(u, "u", x, "x", T, R);
  // gb is read only for da: None (or anything) otherwise; CUDA gets an empty [0] tensor then.
  DRLORA_CHECK(!need_a || gb.has_value(), "need_a is true but gb is None");
  if (need_a) check_acc(*gb, "gb", x, "x", T, R);
  const at::Tensor gb_t = need_a ? *gb : at::empty({0}, u.options());
  DRLORA_CHECK_DIM(ranks, 1);
  check_groups(ranks, offsets, &scale, x, "x", E, R, T);
  pybind11::gil_scoped_release nogil;
#ifdef DRLORA_WITH_CUDA
  if (x.is_cuda()) {
    return cuda::weight_grad(grad_y, x, u, gb_t, ranks, offsets, scale, need_a, need_b, need_w);
  }
#endif
  return cpu::weight_grad(grad_y, x, u, gb_t, ranks, offsets, scale, need_a, need_b, need_w);
}

// The fused backward (CPU only): (dx, da, db, dw), unrequested outputs empty [0] tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& w,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u,
    const at::Tensor& ranks, const at::Tensor& offsets, const at::Tensor& scale, bool need_x,
    bool need_a, bool need_b, bool need_w) {
  check_rows(x, "x");
  DRLORA_CHECK(x.device().is_cpu(), "x is on ", x.device(),
               ": the fused native backward runs on the CPU only (CUDA composes the three "
               "primitives)");
  DRLORA_CHECK_DIM(lora_a, 3);
  DRLORA_CHECK_DIM(lora_b, 3);
  const int64_t T = x.size(0), K = x.size(1), E = lora_a.size(0), R = lora_a.size(1);
  const int64_t N = lora_b.size(1);
  check_operand(lora_a, "lora_a", {E, R, K}, "[E, R, K]", x, "x");
  check_operand(lora_b, "lora_b", {E, N, R}, "[E, N, R]", x, "x");
  if (w.has_value()) check_operand(*w, "w", {E, N, K}, "[E, N, K]", x, "x");
  DRLORA_CHECK(!need_w || w.has_value(), "need_w is true but w is None");
  check_rows(grad_y, "grad_y");
  DRLORA_CHECK_SHAPE(grad_y, "[T, N]", T, N);
  DRLORA_CHECK_SAME_DTYPE(grad_y, x);
  check_acc(u, "u", x, "x", T, R);
  check_groups(ranks, offsets, &scale, x, "x", E, R, T);
  pybind11::gil_scoped_release nogil;
  return cpu::lora_backward(grad_y, x, w, lora_a, lora_b, u, ranks, offsets, scale, need_x,
                            need_a, need_b, need_w);
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
  DRLORA_CHECK_INDEX(ranks);
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
  d["primitives"] = "shrink, base_expand, weight_grad (cpu and cuda); lora_backward (fused), "
                    "slot_importance (cpu)";
  d["cpu_dtypes"] = "float32, bfloat16, float16 (fp32 accumulation), float64";
#ifdef DRLORA_WITH_CUDA
  d["cuda_dtypes"] = "float32, bfloat16, float16 (fp32 accumulation)";
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
        "y [T, N]: x[rows_e] @ w[e].T (if w) + scale[e] * u[rows_e, :r_e] @ lora_b[e, :, :r_e].T",
        py::arg("x"), py::arg("w"), py::arg("u"), py::arg("lora_b"), py::arg("ranks"),
        py::arg("offsets"), py::arg("scale"));
  m.def("weight_grad", &drlora::weight_grad,
        "(da, db, dw); gradients not asked for are empty [0] tensors", py::arg("grad_y"),
        py::arg("x"), py::arg("u"), py::arg("gb"), py::arg("ranks"), py::arg("offsets"),
        py::arg("scale"), py::arg("need_a"), py::arg("need_b"), py::arg("need_w"));
  m.def("lora_backward", &drlora::lora_backward,
        "(dx, da, db, dw) in one fused pass (CPU); outputs not asked for are empty [0] tensors",
        py::arg("grad_y"), py::arg("x"), py::arg("w"), py::arg("lora_a"), py::arg("lora_b"),
        py::arg("u"), py::arg("ranks"), py::arg("offsets"), py::arg("scale"), py::kw_only(),
        py::arg("need_x"), py::arg("need_a"), py::arg("need_b"), py::arg("need_w"));
  m.def("slot_importance", &drlora::slot_importance,
        "(imp_a, imp_b) fp32 [E, R]: sum_k |a*da| and sum_n |b*db| of the active slots, 0 "
        "elsewhere (CPU)",
        py::arg("lora_a"), py::arg("grad_a"), py::arg("lora_b"), py::arg("grad_b"),
        py::arg("ranks"));
}
