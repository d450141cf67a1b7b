// Grouped GEMM kind kShrink (u = scale * x @ lora_a^T per expert, fp32 out), both
// dtypes. See cutlass_grouped.cuh for the kernel; one translation unit per kind so
// that the CUTLASS instantiations compile in parallel.
#include "cutlass_grouped.cuh"

namespace drlora::cuda::kernels::detail {

int run_shrink(Dtype dtype, const GroupedArgs& args, int num_experts, cudaStream_t stream) {
  return run_kind<GemmKind::kShrink>(dtype, args, num_experts, stream);
}

}  // namespace drlora::cuda::kernels::detail
