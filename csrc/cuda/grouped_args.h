// Internal to csrc/cuda: the device argument arrays of one CUTLASS grouped GEMM
// and the per-kind runners (one translation unit per GemmKind, so that the heavy
// CUTLASS instantiations compile in parallel). No CUTLASS or CUDA includes here.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace drlora::cuda::kernels::detail {

// Same layout as cutlass::gemm::GemmCoord (Coord<3, int>): m, n, k.
struct ProblemSize {
  int32_t m, n, k;
};

// Argument arrays of one grouped GEMM over E experts, all in device memory (carved
// from one workspace). The setup kernel writes them; the GEMM kernel reads them.
struct GroupedArgs {
  void** ptr_a;
  void** ptr_b;
  void** ptr_c;
  void** ptr_d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldc;
  int64_t* ldd;
  const float** alpha;  // per-expert alpha pointers (null entry: alpha = 1)
  const float** beta;   // per-expert beta pointers (into beta_values)
  float* beta_values;
  ProblemSize* problems;
};

// Run the grouped GEMM of one kind (the arrays of `args` already filled on `stream`).
int run_shrink(Dtype dtype, const GroupedArgs& args, int num_experts, cudaStream_t stream);
int run_row_row(Dtype dtype, const GroupedArgs& args, int num_experts, cudaStream_t stream);
int run_row_col(Dtype dtype, const GroupedArgs& args, int num_experts, cudaStream_t stream);
int run_col_row(Dtype dtype, const GroupedArgs& args, int num_experts, cudaStream_t stream);

// Error codes beyond cudaError_t (which stays below 10000).
constexpr int kErrorCutlassBase = 20000;  // + cutlass::Status
constexpr int kErrorNoResidentBlock = 30000;  // the kernel does not fit on an SM
constexpr int kErrorBadArgument = 30001;
constexpr int kErrorOccupancyQuery = 30002;  // a device / occupancy query failed

}  // namespace drlora::cuda::kernels::detail
