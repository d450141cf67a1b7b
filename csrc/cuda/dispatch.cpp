// Tensor-level CUDA entry points: allocate outputs with torch, hand raw pointers
// to the kernels of drlora.h, launch on torch's current stream.
//
// Compiled only when nvcc is found. The kernels need no torch CUDA headers; this
// file uses c10::cuda (current stream, device guard) only when the torch it was
// built against is a CUDA build (DRLORA_TORCH_HAS_CUDA, set by CMake). With a
// CPU-only torch no tensor is ever on CUDA, so these functions are unreachable
// but still compiled and linked (CI catches breakage).
#include <ATen/ATen.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "drlora.h"
#include "grouped_lora.h"

#ifdef DRLORA_TORCH_HAS_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace drlora::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      throw std::invalid_argument(std::string("drlora CUDA kernels support float32, float16, "
                                              "bfloat16; got ") +
                                  c10::toString(t.scalar_type()));
  }
}

// Device guard + stream for the tensor's device.
struct Launch {
#ifdef DRLORA_TORCH_HAS_CUDA
  explicit Launch(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
#else
  explicit Launch(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }  // unreachable with a CPU-only torch
#endif
};

void check(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string("drlora CUDA ") + what + " failed: " +
                             kernels::error_string(code));
  }
}

// Group tensors as int32 on the device (a device-side cast, no host sync).
struct GroupTensors {
  at::Tensor ranks, offsets, scale;
};

GroupTensors groups(const at::Tensor& ranks, const at::Tensor& offsets,
                    const std::optional<at::Tensor>& scale, int64_t E) {
  GroupTensors g{ranks.to(at::kInt).contiguous(), offsets.to(at::kInt).contiguous(), {}};
  g.scale = scale.has_value() ? scale->to(at::kFloat).contiguous()
                              : at::ones({E}, ranks.options().dtype(at::kFloat));
  return g;
}

GroupedShape shape(int64_t T, int64_t K, int64_t N, int64_t E, int64_t R, const GroupTensors& g) {
  return GroupedShape{T,
                      K,
                      N,
                      E,
                      R,
                      g.ranks.data_ptr<int32_t>(),
                      g.offsets.data_ptr<int32_t>(),
                      g.scale.data_ptr<float>()};
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

}  // namespace

at::Tensor shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& ranks,
                  const at::Tensor& offsets) {
  Launch launch(x);
  const int64_t E = lora_a.size(0), R = lora_a.size(1);
  const auto g = groups(ranks, offsets, std::nullopt, E);
  auto u = at::empty({x.size(0), R}, x.options().dtype(at::kFloat));
  check(kernels::shrink(dtype_of(x), x.data_ptr(), lora_a.data_ptr(), u.data_ptr<float>(),
                        shape(x.size(0), x.size(1), 0, E, R, g), launch.stream()),
        "shrink");
  return u;
}

at::Tensor expand(const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& ranks,
                  const at::Tensor& offsets, const at::Tensor& scale) {
  Launch launch(u);
  const int64_t E = lora_b.size(0), N = lora_b.size(1), R = lora_b.size(2);
  const auto g = groups(ranks, offsets, scale, E);
  auto y = at::empty({u.size(0), N}, lora_b.options());
  check(kernels::expand(dtype_of(lora_b), u.data_ptr<float>(), lora_b.data_ptr(), nullptr,
                        nullptr, y.data_ptr(), shape(u.size(0), 0, N, E, R, g), launch.stream()),
        "expand");
  return y;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const std::optional<at::Tensor>& w,
                                           const at::Tensor& lora_a, const at::Tensor& lora_b,
                                           const at::Tensor& ranks, const at::Tensor& offsets,
                                           const at::Tensor& scale) {
  Launch launch(x);
  const int64_t T = x.size(0), K = x.size(1), E = lora_a.size(0), R = lora_a.size(1);
  const int64_t N = lora_b.size(1);
  const auto g = groups(ranks, offsets, scale, E);
  const auto s = shape(T, K, N, E, R, g);
  const DType dt = dtype_of(x);
  auto u = at::empty({T, R}, x.options().dtype(at::kFloat));
  auto y = at::empty({T, N}, x.options());
  check(kernels::shrink(dt, x.data_ptr(), lora_a.data_ptr(), u.data_ptr<float>(), s,
                        launch.stream()),
        "shrink");
  check(kernels::expand(dt, u.data_ptr<float>(), lora_b.data_ptr(), x.data_ptr(), ptr_or_null(w),
                        y.data_ptr(), s, launch.stream()),
        "fused expand");
  return {y, u};
}

BackwardOut backward(const at::Tensor& grad_y, const at::Tensor& x,
                     const std::optional<at::Tensor>& w, const at::Tensor& lora_a,
                     const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& ranks,
                     const at::Tensor& offsets, const at::Tensor& scale, bool need_x, bool need_w,
                     bool need_a, bool need_b, bool with_importance) {
  Launch launch(x);
  const int64_t T = x.size(0), K = x.size(1), E = lora_a.size(0), R = lora_a.size(1);
  const int64_t N = lora_b.size(1);
  need_w = need_w && w.has_value();
  const auto g = groups(ranks, offsets, scale, E);
  const auto s = shape(T, K, N, E, R, g);
  auto empty = [&] { return x.new_empty({0}); };
  auto dx = need_x ? at::empty_like(x) : empty();
  auto dw = need_w ? at::empty_like(*w) : empty();
  auto da = need_a ? at::empty_like(lora_a) : empty();
  auto db = need_b ? at::empty_like(lora_b) : empty();
  auto imp_opts = x.options().dtype(at::kFloat);
  auto imp_a = with_importance ? at::empty({E, R}, imp_opts) : empty();
  auto imp_b = with_importance ? at::empty({E, R}, imp_opts) : empty();
  auto workspace = at::empty({kernels::backward_workspace_floats(s)}, imp_opts);
  kernels::BackwardArgs args{grad_y.data_ptr(),
                             x.data_ptr(),
                             ptr_or_null(w),
                             lora_a.data_ptr(),
                             lora_b.data_ptr(),
                             u.data_ptr<float>(),
                             need_x ? dx.data_ptr() : nullptr,
                             need_w ? dw.data_ptr() : nullptr,
                             need_a ? da.data_ptr() : nullptr,
                             need_b ? db.data_ptr() : nullptr,
                             with_importance ? imp_a.data_ptr<float>() : nullptr,
                             with_importance ? imp_b.data_ptr<float>() : nullptr,
                             workspace.data_ptr<float>()};
  check(kernels::backward(dtype_of(x), args, s, launch.stream()), "backward");
  return {dx, dw, da, db, imp_a, imp_b};
}

}  // namespace drlora::cuda
