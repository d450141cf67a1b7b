// Tensor-level entry points of the native backend, one set per device.
//
// bindings.cpp validates the arguments and calls cpu::* or cuda::* by device.
// Inputs arrive contiguous and validated; see drlora_kernels/ops/reference.py
// for the semantics (the oracle) and drlora.h for the layouts.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace drlora {

using BackwardOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

#define DRLORA_DECLARE_BACKEND(ns)                                                            \
  namespace ns {                                                                              \
  at::Tensor shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& ranks,   \
                    const at::Tensor& offsets);                                               \
  at::Tensor expand(const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& ranks,   \
                    const at::Tensor& offsets, const at::Tensor& scale);                      \
  std::tuple<at::Tensor, at::Tensor> forward(                                                 \
      const at::Tensor& x, const std::optional<at::Tensor>& w, const at::Tensor& lora_a,      \
      const at::Tensor& lora_b, const at::Tensor& ranks, const at::Tensor& offsets,           \
      const at::Tensor& scale);                                                               \
  BackwardOut backward(const at::Tensor& grad_y, const at::Tensor& x,                         \
                       const std::optional<at::Tensor>& w, const at::Tensor& lora_a,          \
                       const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& ranks, \
                       const at::Tensor& offsets, const at::Tensor& scale, bool need_x,       \
                       bool need_w, bool need_a, bool need_b, bool with_importance);          \
  }

DRLORA_DECLARE_BACKEND(cpu)

namespace cpu {
// Per-slot L1 sums (imp_a [E, R] = sum_k |a * da|, imp_b = sum_n |b * db|, fp32) from
// accumulated gradients, reading the active slots only (SPEC Eq. 6).
std::tuple<at::Tensor, at::Tensor> slot_importance(const at::Tensor& lora_a,
                                                   const at::Tensor& grad_a,
                                                   const at::Tensor& lora_b,
                                                   const at::Tensor& grad_b,
                                                   const at::Tensor& ranks);
}  // namespace cpu
// CUDA tensors: the three primitives of csrc/cuda/cuda_ops.h.

#undef DRLORA_DECLARE_BACKEND

}  // namespace drlora
