// Raw-pointer launch API of the CUDA kernels (csrc/cuda/*.cu).
//
// This header needs neither torch nor the CUDA headers, so that the .cu files
// compile with nvcc and the CUTLASS headers alone (the installed torch may be a
// CPU-only build) and the tensor-level layer (cuda_ops.cpp, host compiler)
// needs no CUDA include path. Every launcher returns a cudaError_t as int
// (0 == cudaSuccess, see error_string) and enqueues work on `stream` only:
// nothing here reads device memory on the host.
//
// Grouped GEMMs run on CUTLASS's grouped kernel (2.x API, tensor cores, fp32
// accumulation) with the schedule read on the device (GroupScheduleMode::
// kDeviceOnly): a small setup kernel writes each expert's problem size,
// pointers and leading dimensions from ranks/offsets (fill_grouped_args), so
// group sizes and ranks never travel to the host.
#pragma once

#include <cstdint>

// Same declaration as in cuda_runtime_api.h (redeclaring a typedef is legal).
typedef struct CUstream_st* cudaStream_t;

namespace drlora::cuda::kernels {

// Element type of the GEMM operands (fp32 accumulation throughout).
enum class Dtype : int32_t { kBFloat16 = 0, kFloat16 = 1 };

// The compiled grouped-GEMM kernels: operand layouts (A [M, K], B [K, N]) and the
// output. Every operand of a 16-bit type is read with 128-bit (8-element)
// accesses, so its contiguous extent, leading dimension and base pointers must be
// multiples of 8 elements; see cuda_ops.cpp for how each call meets that.
enum class GemmKind : int32_t {
  kShrink = 0,  // A row-major, B column-major -> fp32 row-major, 1-element stores (u [T, R])
  kRowRow = 1,  // A row-major, B row-major    -> 16-bit row-major
  kRowCol = 2,  // A row-major, B column-major -> 16-bit row-major
  kColRow = 3,  // A column-major, B row-major -> 16-bit row-major
};

// A GEMM extent that is the expert's row count n_e, its rank r_e, or fixed.
enum class Extent : int32_t { kRows = 0, kRank = 1, kFixed = 2 };

// Where expert e's operand starts: base + (offsets[e] * row_step + e * expert_step)
// elements, with leading dimension ld (elements).
struct OperandSpec {
  const void* base;
  int64_t row_step;
  int64_t expert_step;
  int64_t ld;
};

// D_e = alpha_e * A_e @ B_e + beta_e * C_e for every expert e (C_e = D_e).
// A problem with any extent 0 becomes an empty 0x0x0 problem: CUTLASS's
// multistage mainloop must not see k = 0 (NVIDIA/cutlass#1593), so callers zero
// such outputs themselves (zero_groups).
struct GroupedGemmSpec {
  Extent m, n, k;
  int64_t fixed_m, fixed_n, fixed_k;
  int64_t max_rank;  // r_e is read as min(ranks[e], max_rank) (R): never past the pool
  OperandSpec a, b, d;
  const float* alpha;  // [E] per-expert alpha (the LoRA scale) or null for alpha = 1
  enum class Beta : int32_t { kZero = 0, kOneIfRank = 1 } beta;  // kOneIfRank: 1 where r_e > 0
};

// Bytes of device workspace one grouped GEMM over E experts needs (its argument arrays).
int64_t grouped_workspace_bytes(int64_t num_experts);

// Fill the argument arrays on the device, then run the grouped GEMM. `workspace`
// holds grouped_workspace_bytes(E) bytes, 16-byte aligned.
int grouped_gemm(GemmKind kind, Dtype dtype, const GroupedGemmSpec& spec, int64_t num_experts,
                 const int32_t* ranks, const int32_t* offsets, void* workspace,
                 cudaStream_t stream);

// Zero, for every expert e whose rank (kRank) or row count (kRows) is <= 0, the
// `row_elems * n_e + fixed_elems` 16-bit elements at base + offsets[e] * row_elems +
// e * expert_elems: the outputs an empty (k = 0) problem would have written.
struct ZeroSpec {
  void* base;
  int64_t row_elems;
  int64_t expert_elems;
  int64_t fixed_elems;
  Extent when_zero;  // kRank or kRows
};
int zero_groups(const ZeroSpec& spec, int64_t num_experts, const int32_t* ranks,
                const int32_t* offsets, cudaStream_t stream);

// Copy the active slots of a 16-bit [E, R, P] view (any strides, in elements) to
// a [E, R, P] destination (any strides): dst[e, j, p] = src[e, j, p] for j < r_e,
// 0 for j >= r_e (src slots >= r_e are never read). Tiled through shared memory
// so that both a slot-contiguous and a P-contiguous side are read/written coalesced.
struct SlotView {
  int64_t stride_e, stride_r, stride_p;
};
int pack_slots(const void* src, SlotView src_view, void* dst, SlotView dst_view,
               int64_t num_experts, int64_t slots, int64_t cols, const int32_t* ranks,
               cudaStream_t stream);

// dst [T, ld_dst] (16-bit) from src [T, R] fp32 (row stride ld_src): dst[t, j] =
// src[t, j] for j < r_{g(t)}, 0 for r_{g(t)} <= j < ld_dst (g(t) is row t's group).
// ld_dst is a multiple of 8: the zero padding lets 8-wide GEMM accesses that start
// below r_e run past it without reading anything but zeros.
int rank_operand(Dtype dtype, const float* src, int64_t ld_src, int64_t rows, int64_t slots,
                 void* dst, int64_t ld_dst, int64_t num_experts, const int32_t* ranks,
                 const int32_t* offsets, cudaStream_t stream);

const char* error_string(int code);

}  // namespace drlora::cuda::kernels
