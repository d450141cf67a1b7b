// The small device kernels around the CUTLASS grouped GEMMs: the argument setup
// (problem sizes, pointers, leading dimensions, per-expert alpha/beta from
// ranks/offsets, on the device), zeroing of outputs that empty problems leave
// untouched, the slot-major packing of LoRA factors, and the zero-padded 16-bit
// copy of u / gb. None of them reads device memory on the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "grouped_args.h"
#include "kernels.h"

namespace drlora::cuda::kernels {
namespace detail {
namespace {

constexpr int kThreads = 256;

int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

int last_error() { return static_cast<int>(cudaGetLastError()); }

// The argument arrays of one grouped GEMM, carved from one workspace (see
// grouped_workspace_bytes for the total).
GroupedArgs carve(void* workspace, int64_t E) {
  auto* p = static_cast<char*>(workspace);
  auto take = [&](int64_t bytes) {
    char* q = p;
    p += align16(bytes);
    return q;
  };
  GroupedArgs a{};
  a.ptr_a = reinterpret_cast<void**>(take(E * 8));
  a.ptr_b = reinterpret_cast<void**>(take(E * 8));
  a.ptr_c = reinterpret_cast<void**>(take(E * 8));
  a.ptr_d = reinterpret_cast<void**>(take(E * 8));
  a.lda = reinterpret_cast<int64_t*>(take(E * 8));
  a.ldb = reinterpret_cast<int64_t*>(take(E * 8));
  a.ldc = reinterpret_cast<int64_t*>(take(E * 8));
  a.ldd = reinterpret_cast<int64_t*>(take(E * 8));
  a.alpha = reinterpret_cast<const float**>(take(E * 8));
  a.beta = reinterpret_cast<const float**>(take(E * 8));
  a.beta_values = reinterpret_cast<float*>(take(E * 4));
  a.problems = reinterpret_cast<ProblemSize*>(take(E * static_cast<int64_t>(sizeof(ProblemSize))));
  return a;
}

__device__ __forceinline__ int64_t extent_of(Extent x, int64_t fixed, int64_t rows, int64_t rank) {
  return x == Extent::kRows ? rows : (x == Extent::kRank ? rank : fixed);
}

__device__ __forceinline__ void* address(const OperandSpec& s, int64_t row0, int64_t e,
                                         int elem_bytes) {
  const int64_t elems = row0 * s.row_step + e * s.expert_step;
  return const_cast<char*>(static_cast<const char*>(s.base)) + elems * elem_bytes;
}

// One thread per expert: its problem (0x0x0 if any extent is 0: empty problems never
// reach CUTLASS's mainloop, see NVIDIA/cutlass#1593), pointers, leading dimensions,
// alpha pointer and beta.
__global__ void fill_grouped_args_kernel(GroupedGemmSpec spec, int E, const int32_t* ranks,
                                         const int32_t* offsets, GroupedArgs args, int ab_bytes,
                                         int d_bytes) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int64_t row0 = offsets[e];
  const int64_t rows = static_cast<int64_t>(offsets[e + 1]) - row0;
  const int64_t rank = min(static_cast<int64_t>(ranks[e]), spec.max_rank);
  const int64_t m = extent_of(spec.m, spec.fixed_m, rows, rank);
  const int64_t n = extent_of(spec.n, spec.fixed_n, rows, rank);
  const int64_t k = extent_of(spec.k, spec.fixed_k, rows, rank);
  const bool empty = m <= 0 || n <= 0 || k <= 0;
  args.problems[e] = empty ? ProblemSize{0, 0, 0}
                           : ProblemSize{static_cast<int32_t>(m), static_cast<int32_t>(n),
                                         static_cast<int32_t>(k)};
  args.ptr_a[e] = address(spec.a, row0, e, ab_bytes);
  args.ptr_b[e] = address(spec.b, row0, e, ab_bytes);
  args.ptr_d[e] = address(spec.d, row0, e, d_bytes);
  args.ptr_c[e] = args.ptr_d[e];  // C is D (read only where beta_e != 0)
  args.lda[e] = spec.a.ld;
  args.ldb[e] = spec.b.ld;
  args.ldc[e] = spec.d.ld;
  args.ldd[e] = spec.d.ld;
  args.alpha[e] = spec.alpha != nullptr ? spec.alpha + e : nullptr;
  const bool accumulate = spec.beta == GroupedGemmSpec::Beta::kOneIfRank && rank > 0 && rows > 0;
  args.beta_values[e] = accumulate ? 1.0f : 0.0f;
  args.beta[e] = args.beta_values + e;
}

unsigned blocks_for(int64_t work, int64_t per_block, int64_t cap) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(cap, (work + per_block - 1) / per_block)));
}

// Expert e's zero span (see ZeroSpec), grid-stride over its 16-bit elements.
__global__ void zero_groups_kernel(ZeroSpec spec, int E, const int32_t* ranks,
                                   const int32_t* offsets) {
  auto* base = static_cast<uint16_t*>(spec.base);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int e = 0; e < E; ++e) {
    const int64_t row0 = offsets[e];
    const int64_t rows = static_cast<int64_t>(offsets[e + 1]) - row0;
    const int64_t which = spec.when_zero == Extent::kRank ? ranks[e] : rows;
    if (which > 0) continue;
    uint16_t* span = base + row0 * spec.row_elems + e * spec.expert_elems;
    const int64_t len = rows * spec.row_elems + spec.fixed_elems;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
         i += stride) {
      span[i] = 0;
    }
  }
}

// 32x32 (slot, col) tiles through shared memory; threadIdx.x runs along the slot axis
// on the side (source or destination) whose slot stride is 1, else along the cols.
constexpr int kTile = 32;
constexpr int kTileRows = 8;

__global__ void pack_slots_kernel(const uint16_t* src, SlotView sv, uint16_t* dst, SlotView dv,
                                  int64_t slots, int64_t cols, const int32_t* ranks) {
  __shared__ uint16_t tile[kTile][kTile + 1];
  const int64_t e = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t rank = min(static_cast<int64_t>(ranks[e]), slots);
  const bool src_slot_fast = sv.stride_r == 1 && sv.stride_p != 1;
  const bool dst_slot_fast = dv.stride_r == 1 && dv.stride_p != 1;
  for (int i = threadIdx.y; i < kTile; i += kTileRows) {
    const int a = src_slot_fast ? threadIdx.x : i;  // slot within the tile
    const int b = src_slot_fast ? i : threadIdx.x;  // col within the tile
    const int64_t j = j0 + a, p = p0 + b;
    uint16_t v = 0;
    if (j < rank && p < cols) v = src[e * sv.stride_e + j * sv.stride_r + p * sv.stride_p];
    tile[a][b] = v;
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTile; i += kTileRows) {
    const int a = dst_slot_fast ? threadIdx.x : i;
    const int b = dst_slot_fast ? i : threadIdx.x;
    const int64_t j = j0 + a, p = p0 + b;
    if (j < slots && p < cols) dst[e * dv.stride_e + j * dv.stride_r + p * dv.stride_p] = tile[a][b];
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// Group of row t: the last e with offsets[e] <= t (empty groups are skipped because
// their successor starts at the same offset).
__device__ __forceinline__ int group_of_row(const int32_t* offsets, int E, int64_t t) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// One thread per 8-wide chunk of a destination row (one 16-byte store).
template <typename T>
__global__ void rank_operand_kernel(const float* src, int64_t ld_src, int64_t rows, int64_t slots,
                                    T* dst, int64_t ld_dst, int E, const int32_t* ranks,
                                    const int32_t* offsets) {
  const int64_t chunks = ld_dst / 8;
  const int64_t total = rows * chunks;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t t = i / chunks;
    const int64_t j0 = (i % chunks) * 8;
    const int64_t rank = min(static_cast<int64_t>(ranks[group_of_row(offsets, E, t)]), slots);
    alignas(16) T out[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int64_t j = j0 + c;
      out[c] = from_float<T>(j < rank ? src[t * ld_src + j] : 0.0f);
    }
    *reinterpret_cast<uint4*>(dst + t * ld_dst + j0) = *reinterpret_cast<const uint4*>(out);
  }
}

int device_blocks_cap() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 1024;
  }
  return 8 * sms;
}

}  // namespace
}  // namespace detail

int64_t grouped_workspace_bytes(int64_t num_experts) {
  const int64_t E = num_experts;
  return 10 * detail::align16(E * 8) + detail::align16(E * 4) +
         detail::align16(E * static_cast<int64_t>(sizeof(detail::ProblemSize)));
}

int grouped_gemm(GemmKind kind, Dtype dtype, const GroupedGemmSpec& spec, int64_t num_experts,
                 const int32_t* ranks, const int32_t* offsets, void* workspace,
                 cudaStream_t stream) {
  using namespace detail;
  if (num_experts <= 0) return 0;
  if (num_experts > INT32_MAX) return kErrorBadArgument;
  const int E = static_cast<int>(num_experts);
  const GroupedArgs args = carve(workspace, E);
  const int d_bytes = kind == GemmKind::kShrink ? 4 : 2;
  fill_grouped_args_kernel<<<(E + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      spec, E, ranks, offsets, args, /*ab_bytes=*/2, d_bytes);
  if (const int err = last_error()) return err;
  switch (kind) {
    case GemmKind::kShrink:
      return run_shrink(dtype, args, E, stream);
    case GemmKind::kRowRow:
      return run_row_row(dtype, args, E, stream);
    case GemmKind::kRowCol:
      return run_row_col(dtype, args, E, stream);
    case GemmKind::kColRow:
      return run_col_row(dtype, args, E, stream);
  }
  return kErrorBadArgument;
}

int zero_groups(const ZeroSpec& spec, int64_t num_experts, const int32_t* ranks,
                const int32_t* offsets, cudaStream_t stream) {
  using namespace detail;
  if (num_experts <= 0) return 0;
  // sized for one group's span; groups that need no zeroing cost one check per thread
  const int64_t per_group = std::max<int64_t>(spec.fixed_elems, spec.row_elems * 64);
  const unsigned blocks = blocks_for(per_group, kThreads, device_blocks_cap());
  zero_groups_kernel<<<blocks, kThreads, 0, stream>>>(spec, static_cast<int>(num_experts), ranks,
                                                      offsets);
  return last_error();
}

int pack_slots(const void* src, SlotView src_view, void* dst, SlotView dst_view,
               int64_t num_experts, int64_t slots, int64_t cols, const int32_t* ranks,
               cudaStream_t stream) {
  using namespace detail;
  if (num_experts <= 0 || slots <= 0 || cols <= 0) return 0;
  if (num_experts > 65535) return kErrorBadArgument;
  const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile),
                  static_cast<unsigned>((slots + kTile - 1) / kTile),
                  static_cast<unsigned>(num_experts));
  pack_slots_kernel<<<grid, dim3(kTile, kTileRows), 0, stream>>>(
      static_cast<const uint16_t*>(src), src_view, static_cast<uint16_t*>(dst), dst_view, slots,
      cols, ranks);
  return last_error();
}

int rank_operand(Dtype dtype, const float* src, int64_t ld_src, int64_t rows, int64_t slots,
                 void* dst, int64_t ld_dst, int64_t num_experts, const int32_t* ranks,
                 const int32_t* offsets, cudaStream_t stream) {
  using namespace detail;
  if (rows <= 0 || ld_dst <= 0) return 0;
  if (ld_dst % 8 != 0 || num_experts <= 0 || num_experts > INT32_MAX) return kErrorBadArgument;
  const unsigned blocks = blocks_for(rows * (ld_dst / 8), kThreads, device_blocks_cap());
  const int E = static_cast<int>(num_experts);
  if (dtype == Dtype::kBFloat16) {
    rank_operand_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
        src, ld_src, rows, slots, static_cast<__nv_bfloat16*>(dst), ld_dst, E, ranks, offsets);
  } else {
    rank_operand_kernel<__half><<<blocks, kThreads, 0, stream>>>(
        src, ld_src, rows, slots, static_cast<__half*>(dst), ld_dst, E, ranks, offsets);
  }
  return last_error();
}

const char* error_string(int code) {
  using namespace detail;
  if (code == kErrorNoResidentBlock) {
    return "the grouped GEMM kernel does not fit on one SM of this device (shared memory)";
  }
  if (code == kErrorBadArgument) return "invalid argument to a drlora CUDA launcher";
  if (code == kErrorOccupancyQuery) {
    return "querying the device (SM count, occupancy of the grouped GEMM kernel) failed";
  }
  if (code >= kErrorCutlassBase && code < kErrorCutlassBase + 100) {
    // initialize() or run() of the CUTLASS grouped GEMM (a launch error is reported by
    // CUTLASS as kErrorInternal after it consumed cudaGetLastError)
    return cutlass::cutlassGetStatusString(static_cast<cutlass::Status>(code - kErrorCutlassBase));
  }
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace drlora::cuda::kernels
