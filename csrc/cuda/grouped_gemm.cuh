// Tiled grouped GEMM kernels shared by the grouped LoRA launchers.
//
// Two kernels, both fp32 accumulation in registers, 64x64 output tiles, BK=16
// shared-memory k-slices, 256 threads x (4x4) outputs, operands converted to
// fp32 when staged into shared memory (bf16 / fp16 / fp32 inputs):
//   * row_gemm_kernel: per expert e, rows offsets[e]:offsets[e+1] of
//       C[rows, :cols_e] = sum_t alpha_t(e) * L_t[rows, :k_t(e)] @ R_t(e)[:k_t(e), :cols_e]
//     for up to two terms (fused base + LoRA). The (expert, row tile) of a block
//     is derived on the device from offsets (grid = cdiv(T, BM) + E row tiles),
//     so launches never wait for the host; surplus blocks and column tiles past
//     the expert's active extent exit at once.
//   * expert_reduce_kernel: per expert e, C_e[i, j] = alpha(e) * sum over the
//     expert's rows of P[row, i] * Q[row, j] (da, db, dw). One block owns one
//     output tile and loops over all of the expert's rows: no atomics. It can
//     also emit per-tile partial sums of |param * C| for the per-slot importance
//     (summed by importance_finish_kernel in grouped_lora_backward.cu).
// Extents that equal an expert's rank (k_t, cols, i or j) make every load past
// r_e a masked zero: inactive slots are never read and never cost FLOPs.
// TODO(native): tensor-core (mma.sync / WMMA) tiles once a GPU run can validate them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace drlora::cuda_detail {

constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 16;
constexpr int THREADS = 256;  // 16 x 16 threads, 4 x 4 outputs each

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// An extent that is either fixed or the expert's active rank.
struct Extent {
  int64_t fixed;
  bool is_rank;
  __device__ __forceinline__ int64_t of(const int32_t* ranks, int e) const {
    return is_rank ? static_cast<int64_t>(ranks[e]) : fixed;
  }
};

// One term alpha * L[rows, :k] @ R_e[:k, :cols]; R_e[k, n] = R[e * es + k * sk + n * sn].
template <typename LT, typename RT>
struct RowTerm {
  const LT* L;
  int64_t ldl;
  const RT* R;
  int64_t es, sk, sn;
  Extent k;
  bool scaled;  // alpha = scale[e] (else 1)
};

template <typename OT>
struct RowOut {
  OT* C;
  int64_t ldc;
  Extent cols;      // computed columns
  int64_t cols_full;  // columns cols..cols_full are written as zeros (inactive u slots)
};

// Find (expert, first row, end row) of row tile `b` from the device offsets.
__device__ __forceinline__ bool find_row_tile(const int32_t* offsets, int E, int64_t b, int& e,
                                              int64_t& row0, int64_t& row_end) {
  int64_t acc = 0;
  for (int i = 0; i < E; ++i) {
    const int64_t lo = offsets[i], hi = offsets[i + 1];
    const int64_t tiles = (hi - lo + BM - 1) / BM;
    if (b < acc + tiles) {
      e = i;
      row0 = lo + (b - acc) * BM;
      row_end = hi;
      return true;
    }
    acc += tiles;
  }
  return false;
}

// Accumulate alpha * L[row0:row_end, :k] @ R_e[:k, col0:col0+BN] into acc.
template <typename LT, typename RT>
__device__ __forceinline__ void row_term_mainloop(const RowTerm<LT, RT>& t, int e, int64_t kext,
                                                  int64_t cols, float alpha, int64_t row0,
                                                  int64_t row_end, int64_t col0,
                                                  float (*As)[BM], float (*Bs)[BN],
                                                  float acc[4][4]) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const RT* Re = t.R + e * t.es;
  for (int64_t k0 = 0; k0 < kext; k0 += BK) {
    for (int l = tid; l < BM * BK; l += THREADS) {
      const int m = l / BK, k = l % BK;  // k fastest: contiguous along L's rows
      const int64_t row = row0 + m, kk = k0 + k;
      As[k][m] = (row < row_end && kk < kext) ? alpha * to_float(t.L[row * t.ldl + kk]) : 0.f;
    }
    for (int l = tid; l < BN * BK; l += THREADS) {
      const int n = l / BK, k = l % BK;
      const int64_t col = col0 + n, kk = k0 + k;
      Bs[k][n] = (col < cols && kk < kext) ? to_float(Re[kk * t.sk + col * t.sn]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[k][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

template <typename OT, typename L1, typename L2, typename RT>
__global__ void __launch_bounds__(THREADS)
    row_gemm_kernel(RowTerm<L1, RT> t1, RowTerm<L2, RT> t2, bool has_t2, RowOut<OT> out,
                    const int32_t* __restrict__ ranks, const int32_t* __restrict__ offsets,
                    const float* __restrict__ scale, int E) {
  __shared__ float As[BK][BM];
  __shared__ float Bs[BK][BN];
  int e;
  int64_t row0, row_end;
  if (!find_row_tile(offsets, E, blockIdx.x, e, row0, row_end)) return;
  const int64_t cols = out.cols.of(ranks, e);
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * BN;
  if (col0 >= out.cols_full) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4] = {};
  if (col0 < cols) {
    const float s = scale[e];
    row_term_mainloop(t1, e, t1.k.of(ranks, e), cols, t1.scaled ? s : 1.f, row0, row_end, col0,
                      As, Bs, acc);
    if (has_t2) {
      row_term_mainloop(t2, e, t2.k.of(ranks, e), cols, t2.scaled ? s : 1.f, row0, row_end,
                        col0, As, Bs, acc);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + ty * 4 + i;
    if (row >= row_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + tx * 4 + j;
      if (col < out.cols_full) out.C[row * out.ldc + col] = from_float<OT>(col < cols ? acc[i][j] : 0.f);
    }
  }
}

// C_e[i, j] = alpha(e) * sum_{rows of e} P[row, i] * Q[row, j], written at
// C[e * es + i * si + j * sj] for i < I_full, j < J_full (zeros outside the active extents).
// imp (optional): per-tile partial sums of |param_e[i, j] * C_e[i, j]| along the slot axis:
// slot_is_i: imp[(e * R + i) * gridDim.x + blockIdx.x] = sum_j ..., else
//            imp[(e * R + j) * gridDim.y + blockIdx.y] = sum_i ...
template <typename OT, typename PT, typename QT>
struct ReduceArgs {
  const PT* P;
  int64_t ldp;
  const QT* Q;
  int64_t ldq;
  OT* C;  // may be null (importance only)
  int64_t es, si, sj;
  Extent I, J;
  int64_t I_full, J_full;
  bool scaled;
  const OT* param;  // same layout as C; null: no importance
  float* imp;
  int64_t R;
  bool slot_is_i;
};

template <typename OT, typename PT, typename QT>
__global__ void __launch_bounds__(THREADS)
    expert_reduce_kernel(ReduceArgs<OT, PT, QT> a, const int32_t* __restrict__ ranks,
                         const int32_t* __restrict__ offsets, const float* __restrict__ scale) {
  __shared__ float As[BK][BM];
  __shared__ float Bs[BK][BN];
  __shared__ float red[BM][17];
  const int e = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t I = a.I.of(ranks, e), J = a.J.of(ranks, e);
  const int64_t lo = offsets[e], hi = offsets[e + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4] = {};
  const bool active = i0 < I && j0 < J;
  if (active) {
    for (int64_t r0 = lo; r0 < hi; r0 += BK) {
      for (int l = tid; l < BM * BK; l += THREADS) {
        const int k = l / BM, m = l % BM;  // m fastest: contiguous along P's row
        const int64_t row = r0 + k, i = i0 + m;
        As[k][m] = (row < hi && i < I) ? to_float(a.P[row * a.ldp + i]) : 0.f;
      }
      for (int l = tid; l < BN * BK; l += THREADS) {
        const int k = l / BN, n = l % BN;
        const int64_t row = r0 + k, j = j0 + n;
        Bs[k][n] = (row < hi && j < J) ? to_float(a.Q[row * a.ldq + j]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        float p[4], q[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) p[i] = As[k][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) q[j] = Bs[k][tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += p[i] * q[j];
      }
      __syncthreads();
    }
  }
  const float alpha = a.scaled ? scale[e] : 1.f;
  float part[4] = {0.f, 0.f, 0.f, 0.f};  // importance partials of this thread
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t ii = i0 + ty * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t jj = j0 + tx * 4 + j;
      if (ii >= a.I_full || jj >= a.J_full) continue;
      const bool in = ii < I && jj < J;
      const float v = in ? alpha * acc[i][j] : 0.f;
      const int64_t off = e * a.es + ii * a.si + jj * a.sj;
      if (a.C != nullptr) a.C[off] = from_float<OT>(v);
      if (a.param != nullptr && in) {
        const float c = fabsf(to_float(a.param[off]) * v);
        part[a.slot_is_i ? i : j] += c;
      }
    }
  }
  if (a.param == nullptr || !active) return;
  // Reduce the partials over the 16 threads that share a slot row (or column) of the tile.
#pragma unroll
  for (int t = 0; t < 4; ++t) red[a.slot_is_i ? ty * 4 + t : tx * 4 + t][a.slot_is_i ? tx : ty] = part[t];
  __syncthreads();
  if (tid < BM) {
    const int64_t slot = (a.slot_is_i ? i0 : j0) + tid;
    const int64_t slots = a.slot_is_i ? I : J;
    if (slot < slots) {
      float s = 0.f;
      for (int t = 0; t < 16; ++t) s += red[tid][t];
      const int64_t tile = a.slot_is_i ? blockIdx.x : blockIdx.y;
      const int64_t ntiles = a.slot_is_i ? gridDim.x : gridDim.y;
      a.imp[(e * a.R + slot) * ntiles + tile] = s;
    }
  }
}

inline unsigned cdiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace drlora::cuda_detail
