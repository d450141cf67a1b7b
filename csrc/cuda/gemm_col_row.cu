// Grouped GEMM kind kColRow (A column-major, B row-major), both dtypes: the weight
// gradients, reduced over the expert's rows (K = n_e):
//   dW_e   = grad_y_e^T @ x_e              A = grad_y_e as column-major [N, n_e]
//   dA_e   = gb_e[:, :r_e]^T @ x_e         A = gb (zero-padded 16-bit [T, R8]) as [r_e, n_e]
//   dB_e^T = s_e u_e[:, :r_e]^T @ grad_y_e (written slot-major, then transposed)
// One translation unit per kind: the instantiations compile in parallel.
#include "cutlass_grouped.cuh"

namespace drlora::cuda::kernels::detail {

int run_col_row(Dtype dtype, const GroupedArgs& args, int num_experts, cudaStream_t stream) {
  return run_kind<GemmKind::kColRow>(dtype, args, num_experts, stream);
}

}  // namespace drlora::cuda::kernels::detail
