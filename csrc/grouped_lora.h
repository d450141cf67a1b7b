// Tensor-level entry points of the native CPU backend (namespace drlora::cpu).
//
// The backend contract is three primitives (DESIGN.md, "Token layout for the grouped
// ops"); csrc/cuda/cuda_ops.h declares the same three for CUDA tensors and
// bindings.cpp dispatches by device. Inputs arrive validated (shapes, dtypes,
// devices, int32 contiguous ranks/offsets); see drlora_kernels/ops/reference.py for
// the semantics (the oracle). Group e is rows offsets[e]:offsets[e+1]; only slots
// j < ranks[e] are read; inactive slots of every output are exactly zero.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace drlora::cpu {

// u[rows_e, :r_e] = scale[e] * x[rows_e] @ lora_a[e, :r_e]^T, zero beyond r_e.
//   x [T, K] contiguous; lora_a [E, R, K] any strides (the backward passes lora_b^T);
//   scale [E] fp32 or none (= 1). Returns u [T, R] fp32 (fp64 for fp64 x).
at::Tensor shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& ranks,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& scale);

// y[rows_e] = x[rows_e] @ w[e]^T (if w) + scale[e] * u[rows_e, :r_e] @ lora_b[e, :, :r_e]^T.
//   x [T, K] (ignored without w); w [E, N, K] any strides; u [T, R] fp32/fp64;
//   lora_b [E, N, R] any strides (the backward passes lora_a^T). Returns y [T, N] in
//   lora_b's dtype.
at::Tensor base_expand(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& w,
                       const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& ranks,
                       const at::Tensor& offsets, const at::Tensor& scale);

// (da, db, dw): da[e, :r_e] = gb[rows_e, :r_e]^T @ x[rows_e];
// db[e, :, :r_e] = scale[e] * grad_y[rows_e]^T @ u[rows_e, :r_e]; dw[e] = grad_y[rows_e]^T @ x[rows_e].
// gb is read only when need_a. Gradients not asked for are empty [0] tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u, const at::Tensor& gb,
    const at::Tensor& ranks, const at::Tensor& offsets, const at::Tensor& scale, bool need_a,
    bool need_b, bool need_w);

// The fused backward behind the same contract (what the three primitives compute in
// the registry's backward, in one pass over each expert's rows while they are hot in
// cache): (dx, da, db, dw) of y = x w^T + s (x a^T) b^T, given u = x a^T.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& w,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u,
    const at::Tensor& ranks, const at::Tensor& offsets, const at::Tensor& scale, bool need_x,
    bool need_a, bool need_b, bool need_w);

// Per-slot L1 sums (imp_a [E, R] = sum_k |a * da|, imp_b = sum_n |b * db|, fp32) from
// accumulated gradients, reading the active slots only (SPEC Eq. 6).
std::tuple<at::Tensor, at::Tensor> slot_importance(const at::Tensor& lora_a,
                                                   const at::Tensor& grad_a,
                                                   const at::Tensor& lora_b,
                                                   const at::Tensor& grad_b,
                                                   const at::Tensor& ranks);

}  // namespace drlora::cpu
