// CUTLASS grouped GEMM (2.x API) as used by every grouped product of the CUDA path.
//
// Kernel: cutlass::gemm::kernel::DefaultGemmGroupedPerGroupScale, i.e. CUTLASS's
// GemmGrouped whose LinearCombination epilogue takes alpha and beta from a
// per-problem pointer array: the LoRA scale s_e is applied to the fp32
// accumulator (alpha_e = scale[e]) and the base GEMM accumulates onto the LoRA
// term only where one was written (beta_e). Tensor cores through the Ampere
// mma.sync 16x8x16 path (arch::Sm80; sm_90 runs the same SASS-compatible kernels,
// compiled for it), cp.async multistage mainloop, fp32 accumulation.
// GroupScheduleMode::kDeviceOnly: every threadblock of the persistent grid reads
// the problem sizes on the device, so no host ever sees ranks or group sizes.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <type_traits>

#include "cutlass/bfloat16.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm_grouped_per_group_scale.h"
#include "cutlass/gemm/kernel/gemm_grouped_per_group_scale.h"
#include "cutlass/half.h"
#include "grouped_args.h"

namespace drlora::cuda::kernels::detail {

static_assert(sizeof(cutlass::gemm::GemmCoord) == sizeof(ProblemSize),
              "ProblemSize must mirror cutlass::gemm::GemmCoord");

template <Dtype D>
using Element = std::conditional_t<D == Dtype::kBFloat16, cutlass::bfloat16_t, cutlass::half_t>;

// 16-bit operands are read 8 elements (128 bits) at a time.
constexpr int kOperandAlignment = 8;

template <typename ElementAB, typename LayoutA, typename LayoutB, typename ElementOut,
          int kOutAlignment, typename ThreadblockShape, typename WarpShape, int kStages>
using GroupedKernel = typename cutlass::gemm::kernel::DefaultGemmGroupedPerGroupScale<
    ElementAB, LayoutA, cutlass::ComplexTransform::kNone, kOperandAlignment,  //
    ElementAB, LayoutB, cutlass::ComplexTransform::kNone, kOperandAlignment,  //
    ElementOut, cutlass::layout::RowMajor, float,                            //
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,                     //
    ThreadblockShape, WarpShape, cutlass::gemm::GemmShape<16, 8, 16>,        //
    cutlass::epilogue::thread::LinearCombination<ElementOut, kOutAlignment, float, float>,
    // grouped kernels ignore the swizzle; the persistent problem visitor orders tiles
    cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, kStages,
    cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;

// The large GEMMs (base, dW, dA, dB^T, expand): 128x128x32 tiles, 4 warps of 64x64,
// 4 stages (64 KiB of shared memory: two blocks per SM on sm_80 and sm_90).
using LargeTile = cutlass::gemm::GemmShape<128, 128, 32>;
using LargeWarp = cutlass::gemm::GemmShape<64, 64, 32>;
constexpr int kLargeStages = 4;

// shrink (N = r_e, memory bound on x): 128x64x32 tiles, 4 warps of 64x32, 4 stages.
using ShrinkTile = cutlass::gemm::GemmShape<128, 64, 32>;
using ShrinkWarp = cutlass::gemm::GemmShape<64, 32, 32>;
constexpr int kShrinkStages = 4;

// Resident blocks per SM times SMs: the persistent grid of one kernel on this device
// (cached per device; CUTLASS's occupancy query also raises the shared-memory limit).
// Returns 0 when no block fits on an SM and -1 when a device query failed.
template <typename Gemm>
int persistent_blocks() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return -1;
  int cached = cache[device].load(std::memory_order_relaxed);
  if (cached > 0) return cached;
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return -1;
  }
  const int per_sm = Gemm::maximum_active_blocks();  // -1: the query failed (error cleared)
  if (per_sm <= 0) return per_sm;
  cache[device].store(per_sm * sms, std::memory_order_relaxed);
  return per_sm * sms;
}

template <typename Kernel>
int run_grouped(const GroupedArgs& a, int num_experts, cudaStream_t stream) {
  // GemmGroupedPerGroupScale reads alpha_e/beta_e only for this exact epilogue type (any
  // other silently gets params.alpha/beta for every expert): pin it.
  using Op = typename Kernel::EpilogueOutputOp;
  static_assert(std::is_same_v<Op, cutlass::epilogue::thread::LinearCombination<
                                       typename Op::ElementOutput, Op::kCount,
                                       typename Op::ElementAccumulator,
                                       typename Op::ElementCompute, Op::kScale, Op::kRound>>,
                "per-expert alpha/beta need the plain LinearCombination epilogue");
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
  using ElementA = typename Gemm::ElementA;
  using ElementB = typename Gemm::ElementB;
  using ElementC = typename Gemm::ElementC;
  const int blocks = persistent_blocks<Gemm>();
  if (blocks < 0) return kErrorOccupancyQuery;  // never 0 (= success) without a launch
  if (blocks == 0) return kErrorNoResidentBlock;

  typename Gemm::EpilogueOutputOp::Params epilogue(a.alpha, a.beta);
  epilogue.alpha = 1.0f;  // used where an expert's alpha pointer is null
  epilogue.beta = 0.0f;
  typename Gemm::Arguments args(
      reinterpret_cast<cutlass::gemm::GemmCoord*>(a.problems), num_experts, blocks, epilogue,
      reinterpret_cast<ElementA**>(a.ptr_a), reinterpret_cast<ElementB**>(a.ptr_b),
      reinterpret_cast<ElementC**>(a.ptr_c), reinterpret_cast<ElementC**>(a.ptr_d), a.lda, a.ldb,
      a.ldc, a.ldd, /*host_problem_sizes=*/nullptr);
  Gemm gemm;
  cutlass::Status status = gemm.initialize(args, /*workspace=*/nullptr, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) {
    const int cuda_error = static_cast<int>(cudaGetLastError());
    return cuda_error != 0 ? cuda_error : kErrorCutlassBase + static_cast<int>(status);
  }
  return 0;
}

// The kernel of each GemmKind (one .cu file per kind instantiates it for both dtypes;
// tools/gate_cuda.py reads the shared-memory size of each from these types).
template <GemmKind K, Dtype D>
struct KernelFor;

// u[rows_e, :r_e] = alpha_e * x[rows_e] @ lora_a[e, :r_e]^T: B = lora_a[e] as column-major
// [K, r_e] (slot-strided: the r_e extent is masked row by row, slots >= r_e are never
// read); D = u fp32 [n_e, r_e] with ld R, one element per store so that no store
// crosses r_e (r_e and R need not be multiples of anything).
template <Dtype D>
struct KernelFor<GemmKind::kShrink, D> {
  using type = GroupedKernel<Element<D>, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor,
                             float, 1, ShrinkTile, ShrinkWarp, kShrinkStages>;
};

template <Dtype D>
struct KernelFor<GemmKind::kRowRow, D> {
  using type = GroupedKernel<Element<D>, cutlass::layout::RowMajor, cutlass::layout::RowMajor,
                             Element<D>, kOperandAlignment, LargeTile, LargeWarp, kLargeStages>;
};

template <Dtype D>
struct KernelFor<GemmKind::kRowCol, D> {
  using type = GroupedKernel<Element<D>, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor,
                             Element<D>, kOperandAlignment, LargeTile, LargeWarp, kLargeStages>;
};

template <Dtype D>
struct KernelFor<GemmKind::kColRow, D> {
  using type = GroupedKernel<Element<D>, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor,
                             Element<D>, kOperandAlignment, LargeTile, LargeWarp, kLargeStages>;
};

// Largest dynamic shared memory a block may opt into on sm_80 (A100: 163 KiB); sm_90
// allows 227 KiB. A kernel over the smaller limit does not compile.
constexpr int kSharedMemoryLimitSm80 = 163 * 1024;

template <GemmKind K, Dtype D>
constexpr int shared_memory_bytes() {
  return static_cast<int>(sizeof(typename KernelFor<K, D>::type::SharedStorage));
}

// The runner of one GemmKind: both dtypes, dispatched at run time.
template <GemmKind K>
int run_kind(Dtype dtype, const GroupedArgs& args, int num_experts, cudaStream_t stream) {
  static_assert(shared_memory_bytes<K, Dtype::kBFloat16>() <= kSharedMemoryLimitSm80 &&
                    shared_memory_bytes<K, Dtype::kFloat16>() <= kSharedMemoryLimitSm80,
                "grouped GEMM tile needs more shared memory than sm_80 offers");
  switch (dtype) {
    case Dtype::kBFloat16:
      return run_grouped<typename KernelFor<K, Dtype::kBFloat16>::type>(args, num_experts, stream);
    case Dtype::kFloat16:
      return run_grouped<typename KernelFor<K, Dtype::kFloat16>::type>(args, num_experts, stream);
  }
  return kErrorBadArgument;
}

}  // namespace drlora::cuda::kernels::detail
