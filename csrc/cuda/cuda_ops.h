// Tensor-level CUDA implementations of the three backend primitives (DESIGN.md,
// "Token layout for the grouped ops"). csrc/bindings.cpp dispatches here for CUDA
// tensors when the extension is built with nvcc (DRLORA_WITH_CUDA); the CPU path
// implements the same three signatures in namespace drlora::cpu.
//
// Group e is rows offsets[e]:offsets[e+1] of the expert-sorted token rows; only
// slots j < ranks[e] are read; inactive slots of every output are exactly zero.
// Per-group problem sizes are derived on the device from ranks/offsets: no
// launcher reads them on the host (no host sync).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace drlora::cuda {

// u[rows_e, :r_e] = scale[e] * x[rows_e] @ lora_a[e, :r_e]^T, zero beyond r_e.
//   x [T, K]; lora_a [E, R, K] any strides (the backward passes lora_b.transpose(1, 2));
//   scale [E] fp32 or none (= 1). Returns u [T, R] fp32.
at::Tensor shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& ranks,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& scale);

// y[rows_e] = x[rows_e] @ w[e]^T (if w) + scale[e] * u[rows_e, :r_e] @ lora_b[e, :, :r_e]^T.
//   x [T, K] (none only when w is none); w [E, N, K] any strides; u [T, R] fp32;
//   lora_b [E, N, R] any strides (the backward passes lora_a.transpose(1, 2)); scale [E] fp32.
//   Returns y [T, N] in lora_b's dtype.
at::Tensor base_expand(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& w,
                       const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& ranks,
                       const at::Tensor& offsets, const at::Tensor& scale);

// da[e, :r_e] = gb[rows_e, :r_e]^T @ x[rows_e]; db[e, :, :r_e] = scale[e] * grad_y[rows_e]^T @
// u[rows_e, :r_e]; dw[e] = grad_y[rows_e]^T @ x[rows_e]. gb = shrink(grad_y, lora_b^T, scale).
// Gradients not asked for are empty [0] tensors; inactive slots are exactly zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u, const at::Tensor& gb,
    const at::Tensor& ranks, const at::Tensor& offsets, const at::Tensor& scale, bool need_a,
    bool need_b, bool need_w);

}  // namespace drlora::cuda
