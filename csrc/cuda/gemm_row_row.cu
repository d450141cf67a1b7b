// Grouped GEMM kind kRowRow (A row-major, B row-major), both dtypes: the LoRA term
// of base_expand (A = u as a zero-padded 16-bit [T, R8] operand, B = the slot-major
// [E, R, N] factor) and the base term of the backward (B = w^T: w [E, N, K] read as
// row-major [N, K]). One translation unit per kind: the instantiations compile in
// parallel.
#include "cutlass_grouped.cuh"

namespace drlora::cuda::kernels::detail {

int run_row_row(Dtype dtype, const GroupedArgs& args, int num_experts, cudaStream_t stream) {
  return run_kind<GemmKind::kRowRow>(dtype, args, num_experts, stream);
}

}  // namespace drlora::cuda::kernels::detail
