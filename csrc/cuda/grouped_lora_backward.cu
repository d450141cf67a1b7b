// Grouped LoRA backward on CUDA.
//
// Row kernels:    gb = s * g @ b_r                      (fp32 workspace [T, R])
//                 dx = g @ w_e + gb @ a_r               (two terms, one pass)
// Reduce kernels: da_e = gb^T x_e, db_e = s * g^T u_e, dw_e = g^T x_e, one block per
//                 output tile looping over the expert's rows (no atomics), with the
//                 per-slot importance |a * da| / |b * db| partials emitted per tile and
//                 summed by importance_finish_kernel (deterministic, no atomics).
// Untested on hardware: no GPU in CI; GPU tests (marked gpu) compare with the reference.
#include "drlora.h"
#include "grouped_gemm.cuh"

namespace drlora::kernels {
namespace {

using namespace cuda_detail;

// imp[e, s] = sum over tiles of the partials for s < ranks[e], 0 for inactive slots.
__global__ void importance_finish_kernel(const float* __restrict__ part, int64_t ntiles,
                                         float* __restrict__ imp, const int32_t* __restrict__ ranks,
                                         int64_t E, int64_t R) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= E * R) return;
  const int64_t e = idx / R, s = idx % R;
  float v = 0.f;
  if (s < ranks[e]) {
    for (int64_t t = 0; t < ntiles; ++t) v += part[idx * ntiles + t];
  }
  imp[idx] = v;
}

struct Workspace {
  float* gb;     // [T, R]
  float* imp_a;  // [E, R, cdiv(K, BN)] partials
  float* imp_b;  // [E, R, cdiv(N, BM)] partials
};

Workspace carve(float* base, const GroupedShape& s) {
  Workspace w;
  w.gb = base;
  w.imp_a = w.gb + s.T * s.R;
  w.imp_b = w.imp_a + s.E * s.R * static_cast<int64_t>(cdiv(s.K, BN));
  return w;
}

template <typename T>
int backward_impl(const BackwardArgs& p, const GroupedShape& s, cudaStream_t stream) {
  const T* g = static_cast<const T*>(p.grad_y);
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const Workspace ws = carve(p.workspace, s);
  const int E = static_cast<int>(s.E);
  const bool want_a = p.da != nullptr || p.imp_a != nullptr;
  const bool want_b = p.db != nullptr || p.imp_b != nullptr;
  const dim3 row_tiles_for = dim3(cdiv(s.T, BM) + static_cast<unsigned>(s.E));

  // gb[rows, :r] = s_e * g[rows] @ b[e, :, :r]  (b_e[k = n, j] = b[e, n, j])
  if ((p.dx != nullptr || want_a) && s.T > 0 && s.R > 0) {
    RowTerm<T, T> t{g, s.N, b, s.N * s.R, /*sk=*/s.R, /*sn=*/1, Extent{s.N, false}, true};
    RowOut<float> out{ws.gb, s.R, Extent{0, true}, /*cols_full=*/s.R};
    dim3 grid(row_tiles_for.x, cdiv(s.R, BN));
    row_gemm_kernel<float, T, T, T><<<grid, THREADS, 0, stream>>>(t, t, false, out, s.ranks,
                                                                  s.offsets, s.scale, E);
  }
  // dx[rows] = g[rows] @ w[e] (+) gb[rows, :r] @ a[e, :r]
  if (p.dx != nullptr && s.T > 0 && s.K > 0) {
    RowTerm<float, T> lora{ws.gb, s.R, a, s.R * s.K, /*sk=*/s.K, /*sn=*/1, Extent{0, true}, false};
    RowOut<T> out{static_cast<T*>(p.dx), s.K, Extent{s.K, false}, s.K};
    dim3 grid(row_tiles_for.x, cdiv(s.K, BN));
    if (w != nullptr) {
      RowTerm<T, T> base{g, s.N, w, s.N * s.K, /*sk=*/s.K, /*sn=*/1, Extent{s.N, false}, false};
      row_gemm_kernel<T, T, float, T><<<grid, THREADS, 0, stream>>>(base, lora, true, out,
                                                                    s.ranks, s.offsets, s.scale, E);
    } else {
      row_gemm_kernel<T, float, float, T><<<grid, THREADS, 0, stream>>>(
          lora, lora, false, out, s.ranks, s.offsets, s.scale, E);
    }
  }
  // da_e[i < r, k] = sum_rows gb[row, i] * x[row, k]
  if (want_a && s.E > 0 && s.R > 0 && s.K > 0) {
    ReduceArgs<T, float, T> r{ws.gb, s.R, x, s.K, static_cast<T*>(p.da), s.R * s.K, s.K, 1,
                              Extent{0, true}, Extent{s.K, false}, s.R, s.K, false,
                              p.imp_a != nullptr ? a : nullptr, ws.imp_a, s.R, /*slot_is_i=*/true};
    dim3 grid(cdiv(s.K, BN), cdiv(s.R, BM), static_cast<unsigned>(s.E));
    expert_reduce_kernel<<<grid, THREADS, 0, stream>>>(r, s.ranks, s.offsets, s.scale);
    if (p.imp_a != nullptr) {
      importance_finish_kernel<<<cdiv(s.E * s.R, 256), 256, 0, stream>>>(
          ws.imp_a, cdiv(s.K, BN), p.imp_a, s.ranks, s.E, s.R);
    }
  }
  // db_e[n, j < r] = s_e * sum_rows g[row, n] * u[row, j]
  if (want_b && s.E > 0 && s.R > 0 && s.N > 0) {
    ReduceArgs<T, T, float> r{g, s.N, p.u, s.R, static_cast<T*>(p.db), s.N * s.R, s.R, 1,
                              Extent{s.N, false}, Extent{0, true}, s.N, s.R, true,
                              p.imp_b != nullptr ? b : nullptr, ws.imp_b, s.R, /*slot_is_i=*/false};
    dim3 grid(cdiv(s.R, BN), cdiv(s.N, BM), static_cast<unsigned>(s.E));
    expert_reduce_kernel<<<grid, THREADS, 0, stream>>>(r, s.ranks, s.offsets, s.scale);
    if (p.imp_b != nullptr) {
      importance_finish_kernel<<<cdiv(s.E * s.R, 256), 256, 0, stream>>>(
          ws.imp_b, cdiv(s.N, BM), p.imp_b, s.ranks, s.E, s.R);
    }
  }
  // dw_e[n, k] = sum_rows g[row, n] * x[row, k]
  if (p.dw != nullptr && s.E > 0 && s.N > 0 && s.K > 0) {
    ReduceArgs<T, T, T> r{g, s.N, x, s.K, static_cast<T*>(p.dw), s.N * s.K, s.K, 1,
                          Extent{s.N, false}, Extent{s.K, false}, s.N, s.K, false,
                          nullptr, nullptr, s.R, true};
    dim3 grid(cdiv(s.K, BN), cdiv(s.N, BM), static_cast<unsigned>(s.E));
    expert_reduce_kernel<<<grid, THREADS, 0, stream>>>(r, s.ranks, s.offsets, s.scale);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t backward_workspace_floats(const GroupedShape& s) {
  return s.T * s.R + s.E * s.R * (static_cast<int64_t>(cdiv(s.K, BN)) + cdiv(s.N, BM));
}

int backward(DType dtype, const BackwardArgs& args, const GroupedShape& s, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_impl<float>(args, s, stream);
    case DType::kFloat16:
      return backward_impl<__half>(args, s, stream);
    case DType::kBFloat16:
      return backward_impl<__nv_bfloat16>(args, s, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace drlora::kernels
