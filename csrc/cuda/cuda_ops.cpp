// Tensor-level CUDA primitives (cuda_ops.h) on CUTLASS grouped GEMMs (kernels.h).
//
// Each primitive allocates its outputs with torch, lays the operands out the way
// the compiled kernels read them, and enqueues everything on torch's current
// stream: nothing here reads ranks, offsets or any other device memory on the
// host. Inputs arrive validated by bindings.cpp (shapes, dtypes, devices).
//
// Layout decisions (bf16/fp16 operands are read 8 elements = 16 bytes at a time):
//   * x / grad_y [T, K] are used in place when contiguous and 16-byte aligned
//     (else one contiguous copy); K and N must be multiples of 8 (ValueError).
//   * A LoRA factor is read with its slot axis strided, so that CUTLASS masks r_e
//     row by row and never reads a slot >= r_e. lora_a [E, R, K] (shrink) and
//     lora_a^T as the backward's lora_b argument are used in place; a factor
//     whose slot axis is the contiguous one (lora_b [E, N, R] in the forward
//     expand, lora_b^T as the backward's shrink argument) is first copied into a
//     slot-major [E, R, P] buffer by pack_slots (E*R*P elements: small next to
//     the activations).
//   * u / gb [T, R] fp32 enter a GEMM as a 16-bit [T, R8] copy (R8 = R rounded
//     up to 8) whose slots >= r_e are zero (rank_operand), so an 8-wide access
//     that starts below r_e reads zeros past it: r_e needs no alignment.
//   * Outputs whose slot axis would be the contiguous GEMM axis are written one
//     element per store (u, kShrink) or computed transposed and then packed (dB).
//   * w [E, N, K] is read in place as column-major (forward) or, transposed by
//     the backward, as row-major; any other layout is copied once.
// The LoRA scale is the per-expert alpha of the CUTLASS epilogue (fp32, applied
// to the fp32 accumulator). fp32 inputs raise a TypeError (use the triton backend).
#include "cuda_ops.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "checks.h"
#include "kernels.h"

#ifdef DRLORA_TORCH_HAS_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace drlora::cuda {
namespace {

namespace k = kernels;

// Device guard + torch's current stream for the tensor's device.
struct Launch {
#ifdef DRLORA_TORCH_HAS_CUDA
  explicit Launch(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
#else
  explicit Launch(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }  // unreachable with a CPU-only torch
#endif
};

void check(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string("drlora CUDA ") + what + " failed: " +
                             k::error_string(code));
  }
}

k::Dtype dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return k::Dtype::kBFloat16;
    case at::kHalf:
      return k::Dtype::kFloat16;
    case at::kFloat:
      throw pybind11::type_error(c10::str(
          name, " has dtype float32: the native CUDA kernels (CUTLASS, tensor cores) take "
                "bfloat16 or float16; use backend='triton' for float32 (TF32 or IEEE per "
                "torch.get_float32_matmul_precision()) or cast the model to bfloat16"));
    default:
      throw pybind11::type_error(c10::str(name, " has dtype ", t.scalar_type(),
                                          ": the native CUDA kernels take bfloat16 or float16"));
  }
}

void check_multiple_of_8(int64_t v, const char* what) {
  DRLORA_CHECK(v % 8 == 0, what, " is ", v,
               ": the native CUDA kernels read 16-bit operands 8 elements (16 bytes) at a time "
               "and need it to be a multiple of 8; use backend='triton' for this shape");
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// [T, K] rows with ld K at a 16-byte aligned address: in place, or one contiguous copy.
at::Tensor rows_operand(const at::Tensor& t) {
  if (t.is_contiguous() && aligned16(t)) return t;
  auto copy = at::empty(t.sizes(), t.options());
  copy.copy_(t);
  return copy;
}

at::Tensor int32(const at::Tensor& t) { return t.to(at::kInt).contiguous(); }

int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

// A factor viewed as [E, R, P] (slot axis 1), readable slot-strided with P contiguous:
// in place when its layout allows 16-byte accesses, else packed (slots >= r_e zero).
at::Tensor slot_major(const at::Tensor& v, const at::Tensor& ranks, cudaStream_t stream) {
  const int64_t E = v.size(0), R = v.size(1), P = v.size(2);
  const bool in_place = v.stride(2) == 1 && v.stride(1) % 8 == 0 && v.stride(1) >= P &&
                        (E == 1 || v.stride(0) % 8 == 0) && aligned16(v);
  if (in_place) return v;
  auto out = at::empty({E, R, P}, v.options());
  check(k::pack_slots(v.data_ptr(), {v.stride(0), v.stride(1), v.stride(2)}, out.data_ptr(),
                      {R * P, P, 1}, E, R, P, ranks.data_ptr<int32_t>(), stream),
        "pack_slots");
  return out;
}

// u / gb [T, R] fp32 as the zero-padded 16-bit GEMM operand [T, R8].
at::Tensor rank_operand(const at::Tensor& u, k::Dtype dtype, at::ScalarType scalar,
                        const at::Tensor& ranks, const at::Tensor& offsets, cudaStream_t stream) {
  const int64_t T = u.size(0), R = u.size(1), R8 = round_up8(R);
  auto u_c = u.to(at::kFloat).contiguous();
  auto out = at::empty({T, R8}, u.options().dtype(scalar));
  check(k::rank_operand(dtype, u_c.data_ptr<float>(), R, T, R, out.data_ptr(), R8,
                        ranks.size(0), ranks.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                        stream),
        "rank_operand");
  return out;
}

// Operand / output descriptions for the setup kernel.
k::OperandSpec per_row(const at::Tensor& t, int64_t ld) { return {t.data_ptr(), ld, 0, ld}; }
k::OperandSpec per_expert(const at::Tensor& t, int64_t expert_step, int64_t ld) {
  return {t.data_ptr(), 0, expert_step, ld};
}

k::GroupedGemmSpec spec(k::Extent m, k::Extent n, k::Extent kk, int64_t fixed_m, int64_t fixed_n,
                        int64_t fixed_k, int64_t max_rank, k::OperandSpec a, k::OperandSpec b,
                        k::OperandSpec d, const float* alpha, k::GroupedGemmSpec::Beta beta) {
  return {m, n, kk, fixed_m, fixed_n, fixed_k, max_rank, a, b, d, alpha, beta};
}

// Runs one grouped GEMM with its own argument workspace (torch's caching allocator).
struct Groups {
  at::Tensor ranks, offsets;
  int64_t E;
  cudaStream_t stream;

  void gemm(k::GemmKind kind, k::Dtype dtype, const k::GroupedGemmSpec& s,
            const at::Tensor& like, const char* what) const {
    auto workspace =
        at::empty({k::grouped_workspace_bytes(E)}, like.options().dtype(at::kByte));
    check(k::grouped_gemm(kind, dtype, s, E, ranks.data_ptr<int32_t>(),
                          offsets.data_ptr<int32_t>(), workspace.data_ptr(), stream),
          what);
  }

  void zero(const at::Tensor& out, int64_t row_elems, int64_t expert_elems, int64_t fixed_elems,
            k::Extent when_zero, const char* what) const {
    check(k::zero_groups({out.data_ptr(), row_elems, expert_elems, fixed_elems, when_zero}, E,
                         ranks.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), stream),
          what);
  }
};

const float* alpha_of(const std::optional<at::Tensor>& scale, at::Tensor& holder) {
  if (!scale.has_value()) return nullptr;
  holder = scale->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

}  // namespace

at::Tensor shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& ranks,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& scale) {
  Launch launch(x);
  const k::Dtype dtype = dtype_of(x, "x");
  const int64_t T = x.size(0), K = x.size(1), E = lora_a.size(0), R = lora_a.size(1);
  auto u = at::zeros({T, R}, x.options().dtype(at::kFloat));
  if (T == 0 || R == 0 || E == 0 || K == 0) return u;
  check_multiple_of_8(K, "x.shape[1] (K)");
  const Groups g{int32(ranks), int32(offsets), E, launch.stream()};
  const auto xr = rows_operand(x);
  const auto a = slot_major(lora_a, g.ranks, g.stream);
  at::Tensor scale_f32;
  // u[rows_e, :r_e] (M = n_e, N = r_e, K): B = lora_a[e] as column-major [K, r_e]
  g.gemm(k::GemmKind::kShrink, dtype,
         spec(k::Extent::kRows, k::Extent::kRank, k::Extent::kFixed, 0, 0, K, R, per_row(xr, K),
              per_expert(a, a.stride(0), a.stride(1)), per_row(u, R), alpha_of(scale, scale_f32),
              k::GroupedGemmSpec::Beta::kZero),
         x, "shrink");
  return u;
}

at::Tensor base_expand(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& w,
                       const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& ranks,
                       const at::Tensor& offsets, const at::Tensor& scale) {
  Launch launch(lora_b);
  const k::Dtype dtype = dtype_of(lora_b, "lora_b");
  const int64_t T = u.size(0), R = u.size(1), E = lora_b.size(0), N = lora_b.size(1);
  const bool with_base = w.has_value() && x.has_value() && x->size(1) > 0;
  const bool with_lora = R > 0;
  if (T == 0 || N == 0 || E == 0 || (!with_base && !with_lora)) {
    return at::zeros({T, N}, lora_b.options());
  }
  check_multiple_of_8(N, "lora_b.shape[1] (N)");
  const Groups g{int32(ranks), int32(offsets), E, launch.stream()};
  auto y = at::empty({T, N}, lora_b.options());
  at::Tensor scale_f32;
  const float* alpha = alpha_of(scale, scale_f32);
  if (with_lora) {
    // y_e = s_e * u_e[:, :r_e] @ lora_b[e, :, :r_e]^T  (M = n_e, N, K = r_e)
    const auto u16 = rank_operand(u, dtype, lora_b.scalar_type(), g.ranks, g.offsets, g.stream);
    const auto b = slot_major(lora_b.transpose(1, 2), g.ranks, g.stream);  // [E, R, N]
    g.gemm(k::GemmKind::kRowRow, dtype,
           spec(k::Extent::kRows, k::Extent::kFixed, k::Extent::kRank, 0, N, 0, R,
                per_row(u16, u16.size(1)), per_expert(b, b.stride(0), b.stride(1)),
                per_row(y, N), alpha, k::GroupedGemmSpec::Beta::kZero),
           lora_b, "base_expand (LoRA term)");
  }
  if (!with_base) {
    // rows of rank-0 experts: no LoRA problem wrote them
    g.zero(y, N, 0, 0, k::Extent::kRank, "base_expand (zero rank-0 rows)");
    return y;
  }
  // y_e = x_e @ w[e]^T (+ y_e where the LoRA term wrote it: beta_e = 1 iff r_e > 0)
  const int64_t K = x->size(1);
  check_multiple_of_8(K, "x.shape[1] (K)");
  const auto xr = rows_operand(*x);
  at::Tensor wt = *w;
  auto ok_layout = [&](int64_t ld, int64_t contiguous_extent) {
    return ld % 8 == 0 && ld >= contiguous_extent && (E == 1 || wt.stride(0) % 8 == 0) &&
           aligned16(wt);
  };
  k::GemmKind kind = k::GemmKind::kRowCol;  // w[e] [N, K] K-contiguous = column-major [K, N]
  int64_t ldw = wt.stride(1);
  if (!(wt.stride(2) == 1 && ok_layout(wt.stride(1), K))) {
    if (wt.stride(1) == 1 && ok_layout(wt.stride(2), N)) {
      kind = k::GemmKind::kRowRow;  // N-contiguous (the backward's w^T) = row-major [K, N]
      ldw = wt.stride(2);
    } else {
      wt = wt.contiguous();
      ldw = K;
    }
  }
  const auto beta = with_lora ? k::GroupedGemmSpec::Beta::kOneIfRank : k::GroupedGemmSpec::Beta::kZero;
  g.gemm(kind, dtype,
         spec(k::Extent::kRows, k::Extent::kFixed, k::Extent::kFixed, 0, N, K, R, per_row(xr, K),
              per_expert(wt, wt.stride(0), ldw), per_row(y, N), nullptr, beta),
         lora_b, "base_expand (base term)");
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u, const at::Tensor& gb,
    const at::Tensor& ranks, const at::Tensor& offsets, const at::Tensor& scale, bool need_a,
    bool need_b, bool need_w) {
  Launch launch(x);
  const k::Dtype dtype = dtype_of(x, "x");
  const int64_t T = x.size(0), K = x.size(1), N = grad_y.size(1), R = u.size(1);
  const int64_t E = ranks.size(0);
  const auto opts = x.options();
  at::Tensor da = need_a ? at::zeros({E, R, K}, opts) : x.new_empty({0});
  at::Tensor db = need_b ? at::zeros({E, N, R}, opts) : x.new_empty({0});
  at::Tensor dw = need_w ? at::empty({E, N, K}, opts) : x.new_empty({0});
  if (E == 0) return {da, db, dw};
  const bool lora_work = T > 0 && R > 0;
  if (!(need_w || (lora_work && (need_a || need_b)))) return {da, db, dw};
  const Groups g{int32(ranks), int32(offsets), E, launch.stream()};
  at::Tensor scale_f32;
  const float* alpha = alpha_of(scale, scale_f32);
  if (K > 0 && (need_w || (lora_work && need_a))) check_multiple_of_8(K, "x.shape[1] (K)");
  if (N > 0 && (need_w || (lora_work && need_b))) check_multiple_of_8(N, "grad_y.shape[1] (N)");
  const auto xr = rows_operand(x);
  const auto gy = rows_operand(grad_y);
  if (need_a && lora_work && K > 0) {
    // da[e, :r_e] = gb_e[:, :r_e]^T @ x_e  (M = r_e, N = K, K = n_e); A = gb^T column-major
    const auto gb16 = rank_operand(gb, dtype, x.scalar_type(), g.ranks, g.offsets, g.stream);
    g.gemm(k::GemmKind::kColRow, dtype,
           spec(k::Extent::kRank, k::Extent::kFixed, k::Extent::kRows, 0, K, 0, R,
                per_row(gb16, gb16.size(1)), per_row(xr, K), per_expert(da, R * K, K), nullptr,
                k::GroupedGemmSpec::Beta::kZero),
           x, "weight_grad (dA)");
  }
  if (need_b && lora_work && N > 0) {
    // db[e, :, :r_e]^T = s_e * u_e[:, :r_e]^T @ grad_y_e  (M = r_e, N, K = n_e), computed
    // slot-major into dbt [E, R, N] (rows >= r_e stay 0), then transposed into db.
    const auto u16 = rank_operand(u, dtype, x.scalar_type(), g.ranks, g.offsets, g.stream);
    auto dbt = at::zeros({E, R, N}, opts);
    g.gemm(k::GemmKind::kColRow, dtype,
           spec(k::Extent::kRank, k::Extent::kFixed, k::Extent::kRows, 0, N, 0, R,
                per_row(u16, u16.size(1)), per_row(gy, N), per_expert(dbt, R * N, N), alpha,
                k::GroupedGemmSpec::Beta::kZero),
           x, "weight_grad (dB)");
    db = at::empty({E, N, R}, opts);  // every slot written: active ones from dbt, the rest 0
    check(k::pack_slots(dbt.data_ptr(), {R * N, N, 1}, db.data_ptr(), {N * R, 1, R}, E, R, N,
                        g.ranks.data_ptr<int32_t>(), g.stream),
          "weight_grad (dB transpose)");
  }
  if (need_w) {
    if (T == 0 || N == 0 || K == 0) return {da, db, dw.zero_()};
    // dw[e] = grad_y_e^T @ x_e  (M = N, N = K, K = n_e); A = grad_y_e^T column-major
    g.gemm(k::GemmKind::kColRow, dtype,
           spec(k::Extent::kFixed, k::Extent::kFixed, k::Extent::kRows, N, K, 0, R,
                per_row(gy, N), per_row(xr, K), per_expert(dw, N * K, K), nullptr,
                k::GroupedGemmSpec::Beta::kZero),
           x, "weight_grad (dW)");
    // experts without rows: their problem is empty (k = 0), dw[e] must be 0
    g.zero(dw, 0, N * K, N * K, k::Extent::kRows, "weight_grad (zero dW of empty experts)");
  }
  return {da, db, dw};
}

}  // namespace drlora::cuda
