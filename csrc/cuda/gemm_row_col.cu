// Grouped GEMM kind kRowCol (A row-major, B column-major), both dtypes: the base
// term of the forward, y_e = x_e @ w[e]^T with w [E, N, K] (K contiguous) read as
// column-major [K, N]. One translation unit per kind: the instantiations compile in
// parallel.
#include "cutlass_grouped.cuh"

namespace drlora::cuda::kernels::detail {

int run_row_col(Dtype dtype, const GroupedArgs& args, int num_experts, cudaStream_t stream) {
  return run_kind<GemmKind::kRowCol>(dtype, args, num_experts, stream);
}

}  // namespace drlora::cuda::kernels::detail
