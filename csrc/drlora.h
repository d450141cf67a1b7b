// Raw-pointer API of the CUDA kernels (csrc/cuda/*.cu).
//
// This header needs neither torch nor the CUDA headers: the kernels are written
// against plain pointers, sizes and a cudaStream_t so that they compile with
// nvcc alone (the installed torch may be a CPU-only build). The tensor-level
// layer (csrc/cuda/dispatch.cpp, namespace drlora::cuda) allocates outputs with torch and calls these.
//
// Layouts (all row-major, contiguous):
//   x [T, K], w [E, N, K], a [E, R, K], b [E, N, R], u/gb [T, R] fp32,
//   y/dx [T, *], ranks [E] int32, offsets [E+1] int32, scale [E] fp32.
// Group e is rows offsets[e]:offsets[e+1]; only slots < ranks[e] are read.
// The schedule (which block owns which tile) is derived on the device from
// offsets/ranks: launchers never synchronise with the host.
#pragma once

#include <cstdint>

// Same declaration as in cuda_runtime_api.h (redeclaring a typedef is legal).
typedef struct CUstream_st* cudaStream_t;

namespace drlora {

// Element type of x / w / a / b / y / dx / dw / da / db. Accumulation is fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Sizes and the device-side group description shared by every launcher.
struct GroupedShape {
  int64_t T;               // token rows
  int64_t K;               // input features
  int64_t N;               // output features
  int64_t E;               // experts (groups)
  int64_t R;               // r_max (pool size per expert)
  const int32_t* ranks;    // [E] device
  const int32_t* offsets;  // [E+1] device
  const float* scale;      // [E] device
};

namespace kernels {

// Every launcher returns a cudaError_t as int (0 == cudaSuccess) so that this
// header stays free of CUDA includes; error_string() turns it into a message.
const char* error_string(int code);

// u[rows_e, :r_e] = x[rows_e] @ a[e, :r_e]^T, u[rows_e, r_e:] = 0.
int shrink(DType dtype, const void* x, const void* a, float* u, const GroupedShape& s,
           cudaStream_t stream);

// y[rows_e] = scale[e] * u[rows_e, :r_e] @ b[e, :, :r_e]^T (+ x[rows_e] @ w[e]^T if w).
// Pass x = w = nullptr for the pure expand.
int expand(DType dtype, const float* u, const void* b, const void* x, const void* w, void* y,
           const GroupedShape& s, cudaStream_t stream);

// Gradients of y = x w^T + s (x a^T) b^T. Output pointers may be null (not
// requested). `workspace` holds backward_workspace_floats() floats (gb =
// s * grad_y @ b[:, :r] and the importance partial sums). imp_a / imp_b are
// fp32 [E, R] per-slot sums |a * da| (over K) and |b * db| (over N); they are
// computed from the fp32 accumulators, whether or not da / db are requested.
struct BackwardArgs {
  const void* grad_y;  // [T, N]
  const void* x;       // [T, K]
  const void* w;       // [E, N, K] or null
  const void* a;       // [E, R, K]
  const void* b;       // [E, N, R]
  const float* u;      // [T, R]
  void* dx;            // [T, K] or null
  void* dw;            // [E, N, K] or null
  void* da;            // [E, R, K] or null
  void* db;            // [E, N, R] or null
  float* imp_a;        // [E, R] or null
  float* imp_b;        // [E, R] or null
  float* workspace;    // backward_workspace_floats(s) floats
};
int64_t backward_workspace_floats(const GroupedShape& s);
int backward(DType dtype, const BackwardArgs& args, const GroupedShape& s, cudaStream_t stream);

}  // namespace kernels
}  // namespace drlora
