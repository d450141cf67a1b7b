// Grouped LoRA forward on CUDA: shrink, expand and the fused base + LoRA GEMM.
//
// shrink: u = x a_r^T per row tile (columns r_e..R of u written as zeros);
// expand: y = s u b_r^T (+ x w^T as a second term of the same tile loop, so the
// fused op writes y once). The schedule comes from offsets on the device.
// Untested on hardware: no GPU in CI; tests/ops/test_native.py has GPU tests
// (marked gpu) that compare against the reference.
#include "drlora.h"
#include "grouped_gemm.cuh"

namespace drlora::kernels {
namespace {

using namespace cuda_detail;

template <typename T>
int shrink_impl(const T* x, const T* a, float* u, const GroupedShape& s, cudaStream_t stream) {
  if (s.T == 0 || s.R == 0) return 0;
  RowTerm<T, T> t{x, s.K, a, s.R * s.K, /*sk=*/1, /*sn=*/s.K, Extent{s.K, false}, false};
  RowOut<float> out{u, s.R, Extent{0, true}, s.R};
  dim3 grid(cdiv(s.T, BM) + static_cast<unsigned>(s.E), cdiv(s.R, BN));
  row_gemm_kernel<float, T, T, T><<<grid, THREADS, 0, stream>>>(
      t, t, false, out, s.ranks, s.offsets, s.scale, static_cast<int>(s.E));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int expand_impl(const float* u, const T* b, const T* x, const T* w, T* y, const GroupedShape& s,
                cudaStream_t stream) {
  if (s.T == 0 || s.N == 0) return 0;
  // LoRA term: s_e * u[:, :r] @ b_r^T with b_r^T[k, n] = b[e, n, k].
  RowTerm<float, T> lora{u, s.R, b, s.N * s.R, /*sk=*/1, /*sn=*/s.R, Extent{0, true}, true};
  RowOut<T> out{y, s.N, Extent{s.N, false}, s.N};
  dim3 grid(cdiv(s.T, BM) + static_cast<unsigned>(s.E), cdiv(s.N, BN));
  if (w != nullptr) {
    // Base term first: x @ w_e^T with w_e^T[k, n] = w[e, n, k].
    RowTerm<T, T> base{x, s.K, w, s.N * s.K, /*sk=*/1, /*sn=*/s.K, Extent{s.K, false}, false};
    row_gemm_kernel<T, T, float, T><<<grid, THREADS, 0, stream>>>(
        base, lora, true, out, s.ranks, s.offsets, s.scale, static_cast<int>(s.E));
  } else {
    row_gemm_kernel<T, float, float, T><<<grid, THREADS, 0, stream>>>(
        lora, lora, false, out, s.ranks, s.offsets, s.scale, static_cast<int>(s.E));
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int shrink(DType dtype, const void* x, const void* a, float* u, const GroupedShape& s,
           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return shrink_impl(static_cast<const float*>(x), static_cast<const float*>(a), u, s, stream);
    case DType::kFloat16:
      return shrink_impl(static_cast<const __half*>(x), static_cast<const __half*>(a), u, s,
                         stream);
    case DType::kBFloat16:
      return shrink_impl(static_cast<const __nv_bfloat16*>(x),
                         static_cast<const __nv_bfloat16*>(a), u, s, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int expand(DType dtype, const float* u, const void* b, const void* x, const void* w, void* y,
           const GroupedShape& s, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return expand_impl(u, static_cast<const float*>(b), static_cast<const float*>(x),
                         static_cast<const float*>(w), static_cast<float*>(y), s, stream);
    case DType::kFloat16:
      return expand_impl(u, static_cast<const __half*>(b), static_cast<const __half*>(x),
                         static_cast<const __half*>(w), static_cast<__half*>(y), s, stream);
    case DType::kBFloat16:
      return expand_impl(u, static_cast<const __nv_bfloat16*>(b),
                         static_cast<const __nv_bfloat16*>(x),
                         static_cast<const __nv_bfloat16*>(w), static_cast<__nv_bfloat16*>(y), s,
                         stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace drlora::kernels
