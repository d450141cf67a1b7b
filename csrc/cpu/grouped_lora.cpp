// Grouped variable-rank LoRA on the CPU: the three primitives of the backend
// contract (shrink, base_expand, weight_grad), the fused backward behind the same
// contract, and the per-slot importance sums.
//
// Algorithm: every product is a BLAS GEMM on views (narrow / transpose, no
// copies) of one expert's rows and of its ACTIVE slots only (a[e, :r_e],
// b[e, :, :r_e]); results are written straight into preallocated outputs with
// at::mm_out / addmm_out (beta = 0 where the output is fresh, so NaN garbage in
// uninitialised memory never leaks in). Work is cut into tasks handed out
// dynamically (an atomic counter inside one at::parallel_for region), so ragged
// and zipf group sizes still balance over the threads:
//   * shrink / base_expand: row tasks (expert, block of rows);
//   * weight_grad and the fused backward, balanced routing: one task per expert
//     walking its rows in blocks, doing every GEMM that reads the block while it is
//     hot in cache (the fused backward: gb = s g b_r, dx, and the da / db / dw partial
//     sums, accumulated in place, beta = 1 after the first block);
//   * a hot expert: row tasks for gb / dx (fused backward only), then column tasks
//     (expert, block of output columns) for da / db / dw: one task owns its output tile.
// Each GEMM runs single-threaded inside the parallel region (nested BLAS
// threading is off); one region per op keeps barriers to a minimum, which
// matters on a shared machine. Accumulation is fp32 (fp64 for fp64 inputs).
// fp16/bf16: the base GEMMs (x w^T, g w, g^T x) run in the input dtype (native
// bf16 GEMMs, fp32 accumulation inside); every LoRA product runs in fp32 on
// fp32 copies of x / g / a / b (ATen's CPU GEMMs cannot write a low-precision
// product into an fp32 output, and u / gb must stay fp32), and is added to the
// base result with a single rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "grouped_lora.h"

namespace drlora::cpu {
namespace {

// Rows per row task (and per block of the expert-local backward). Big enough that a
// typical expert (top-k routing: T * k / E rows, a few hundred) stays one block,
// so its weights stream through the cache once; small enough to balance skewed groups.
constexpr int64_t kRowBlock = 384;

// Rows per block when `n` rows are cut into blocks of at most `max_rows`, all of
// (nearly) equal size: 400 rows become 200 + 200, not 384 + a 16-row sliver
// that re-reads the expert's weights for almost no work.
int64_t even_block(int64_t n, int64_t max_rows) {
  const int64_t blocks = std::max<int64_t>(1, (n + max_rows - 1) / max_rows);
  return (n + blocks - 1) / blocks;
}

// Output columns per column task of the two-phase backward (one hot expert's
// da / db / dw reductions still split into many tasks).
constexpr int64_t kColBlock = 256;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor to_acc(const at::Tensor& t) {
  const auto acc = acc_type(t.scalar_type());
  return t.scalar_type() == acc ? t : t.to(acc);
}

// Host copy of the group description (ranks/offsets are tiny CPU tensors).
struct Groups {
  std::vector<int64_t> off;    // [E+1]
  std::vector<int64_t> rank;   // [E]
  std::vector<double> scale;   // [E] (empty if not needed)
  int64_t E = 0;

  int64_t rows(int64_t e) const { return off[e + 1] - off[e]; }
};

// offsets may be undefined (per-slot work that does not look at token rows).
Groups read_groups(const at::Tensor& ranks, const at::Tensor& offsets,
                   const at::Tensor* scale = nullptr) {
  Groups g;
  auto r = ranks.to(at::kLong).contiguous();
  g.E = r.numel();
  g.rank.assign(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + g.E);
  if (offsets.defined()) {
    auto o = offsets.to(at::kLong).contiguous();
    g.off.assign(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + g.E + 1);
  }
  if (scale != nullptr) {
    auto s = scale->to(at::kDouble).contiguous();
    g.scale.assign(s.data_ptr<double>(), s.data_ptr<double>() + g.E);
  }
  return g;
}

const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

// Scale of expert e (1 when the primitive was called without a scale).
double scale_of(const Groups& g, int64_t e) { return g.scale.empty() ? 1.0 : g.scale[e]; }

struct RowTask {
  int64_t e, lo, n;
};
struct ColTask {
  int64_t e, kind, lo, n;  // kind: which reduction (see backward)
};

std::vector<RowTask> row_tasks(const Groups& g) {
  std::vector<RowTask> tasks;
  for (int64_t e = 0; e < g.E; ++e) {
    const int64_t block = even_block(g.rows(e), kRowBlock);
    for (int64_t lo = g.off[e]; lo < g.off[e + 1]; lo += block) {
      tasks.push_back({e, lo, std::min(block, g.off[e + 1] - lo)});
    }
  }
  // Largest first: the dynamic schedule then ends with the small tasks.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const RowTask& a, const RowTask& b) { return a.n > b.n; });
  return tasks;
}

// Run f(i) for i in [0, n) on torch's intra-op pool, handing tasks out one by
// one so that uneven task costs still balance.
template <class F>
void run_tasks(int64_t n, const F& f) {
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), n);
  if (nthreads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
    }
  });
}

// dst[:, :r] = src^T and dst[:, r:] = 0, for 2-D views with unit column stride
// (dst [n, R], src [r, n], r <= R), in 16 x 16 blocks, each destination row written
// once. ATen's copy_ of a transposed view walks element by element (~3x slower on
// these [rows, rank] tiles, measured), and zeroing the inactive columns apart is
// a second strided pass; the two transposes on the hot path (u in the shrink, db
// in the backward) use this instead.
void transpose_into(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_INTERNAL_ASSERT(dst.dim() == 2 && src.dim() == 2 && dst.size(0) == src.size(1) &&
                        dst.size(1) >= src.size(0) && dst.scalar_type() == src.scalar_type());
  const int64_t n = dst.size(0), r = src.size(0), R = dst.size(1);
  if (dst.stride(1) != 1 || src.stride(1) != 1) {
    dst.narrow(1, 0, r).copy_(src.t());
    if (r < R) dst.narrow(1, r, R - r).zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "drlora_transpose_into", [&] {
    constexpr int64_t kB = 16;
    const int64_t ld_d = dst.stride(0), ld_s = src.stride(0);
    scalar_t* d = dst.data_ptr<scalar_t>();
    const scalar_t* sp = src.data_ptr<scalar_t>();
    for (int64_t i0 = 0; i0 < n; i0 += kB) {
      const int64_t i1 = std::min(n, i0 + kB);
      for (int64_t j0 = 0; j0 < r; j0 += kB) {
        const int64_t j1 = std::min(r, j0 + kB);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) d[i * ld_d + j] = sp[j * ld_s + i];
        }
      }
      for (int64_t i = i0; i < i1; ++i) std::fill(d + i * ld_d + r, d + i * ld_d + R, scalar_t(0));
    }
  });
}

// Views of one expert's active slots.
at::Tensor a_active(const at::Tensor& a, int64_t e, int64_t r) { return a[e].narrow(0, 0, r); }
at::Tensor b_active(const at::Tensor& b, int64_t e, int64_t r) { return b[e].narrow(1, 0, r); }

// Zero the inactive columns [r, R) of rows [lo, lo+n) of a [T, R] tensor.
void zero_tail_cols(const at::Tensor& t, int64_t lo, int64_t n, int64_t r) {
  const int64_t R = t.size(1);
  if (r < R && n > 0) t.narrow(0, lo, n).narrow(1, r, R - r).zero_();
}

// u[rows, :r] = s * x[rows] @ a[e, :r]^T; u[rows, r:] = 0.
// The product is computed as u^T = s a x^T ([r, rows]) and transposed into place: a
// BLAS kernel vectorises the output's columns, and a ragged rank r (35, 62, ...)
// as that dimension leaves vector lanes idle; the rows are a multiple of the
// vector width almost everywhere. Measured on the benchmark's ragged ranks: the
// shrink ~15% faster, transposed copy included; equal at r = 48.
void shrink_rows(const at::Tensor& x, const at::Tensor& a, const at::Tensor& u, const RowTask& t,
                 int64_t r, double s) {
  if (r > 0) {
    auto ut = at::empty({r, t.n}, u.options());
    at::addmm_out(ut, ut, a_active(a, t.e, r), x.narrow(0, t.lo, t.n).t(), /*beta=*/0.0, s);
    transpose_into(u.narrow(0, t.lo, t.n), ut);  // zeroes the columns >= r too
  } else {
    zero_tail_cols(u, t.lo, t.n, r);
  }
}

// out[rows] (+)= lora, where lora [n, cols] is an fp32 product and out may be
// bf16 / fp16: one rounding of (existing + lora), never a low-precision LoRA GEMM.
void add_product(const at::Tensor& out, bool accumulate, const at::Tensor& m1,
                 const at::Tensor& m2, double alpha) {
  if (out.scalar_type() == m1.scalar_type()) {
    // beta = 0 ignores out's old (uninitialised) contents, NaN included.
    out.addmm_(m1, m2, /*beta=*/accumulate ? 1.0 : 0.0, alpha);
    return;
  }
  auto lora = at::empty({m1.size(0), m2.size(1)}, m1.options());
  lora.addmm_(m1, m2, /*beta=*/0.0, alpha);
  if (accumulate) {
    out.add_(lora);
  } else {
    out.copy_(lora);
  }
}

// y[rows] = x[rows] @ w[e]^T (if w) + s * u[rows, :r] @ b[e, :, :r]^T.
// The base GEMM runs in x / w's dtype (bf16 GEMMs are native and ~2x faster on
// CPUs with bf16 units), the LoRA product in fp32 (u is fp32).
void expand_rows(const at::Tensor& u, const at::Tensor& b, const std::optional<at::Tensor>& x,
                 const std::optional<at::Tensor>& w, const at::Tensor& y, const RowTask& t,
                 int64_t r, double s) {
  auto ye = y.narrow(0, t.lo, t.n);
  const bool base = w.has_value();
  if (base) at::mm_out(ye, x->narrow(0, t.lo, t.n), (*w)[t.e].t());
  if (r > 0) {
    add_product(ye, base, u.narrow(0, t.lo, t.n).narrow(1, 0, r), b_active(b, t.e, r).t(), s);
  } else if (!base) {
    ye.zero_();
  }
}

// Per-slot L1 sums: imp[e, j] = sum_k |p[e, j, k] * dp[e, j, k]| for j < r_e (rows layout,
// p/dp [E, R, K]) or sum_n |p[e, n, j] * dp[e, n, j]| (columns layout, [E, N, R]).
template <typename scalar_t>
void importance_rows(const scalar_t* p, const scalar_t* dp, float* imp, int64_t R, int64_t K,
                     int64_t r) {
  constexpr int64_t kLanes = 8;  // independent partial sums: a vectorisable reduction
  for (int64_t j = 0; j < R; ++j) {
    double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (j < r) {
      const scalar_t* pj = p + j * K;
      const scalar_t* dj = dp + j * K;
      int64_t k = 0;
      for (; k + kLanes <= K; k += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          lanes[l] += std::abs(static_cast<double>(pj[k + l]) * static_cast<double>(dj[k + l]));
        }
      }
      for (; k < K; ++k) lanes[0] += std::abs(static_cast<double>(pj[k]) * dj[k]);
    }
    double acc = 0;
    for (double v : lanes) acc += v;
    imp[j] = static_cast<float>(acc);
  }
}

template <typename scalar_t>
void importance_cols(const scalar_t* p, const scalar_t* dp, float* imp, int64_t N, int64_t R,
                     int64_t r) {
  std::vector<double> acc(static_cast<size_t>(std::max<int64_t>(r, 1)), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < r; ++j) {
      acc[j] += std::abs(static_cast<double>(p[n * R + j]) * static_cast<double>(dp[n * R + j]));
    }
  }
  for (int64_t j = 0; j < R; ++j) imp[j] = j < r ? static_cast<float>(acc[j]) : 0.0f;
}

// imp [E, R] fp32 from acc-dtype parameters and gradients.
at::Tensor slot_importance(const at::Tensor& p, const at::Tensor& dp, const Groups& g,
                           bool rows_layout) {
  const int64_t E = p.size(0);
  const int64_t R = rows_layout ? p.size(1) : p.size(2);
  const int64_t inner = rows_layout ? p.size(2) : p.size(1);
  auto imp = at::empty({E, R}, p.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "drlora_slot_importance", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* dd = dp.data_ptr<scalar_t>();
    float* out = imp.data_ptr<float>();
    at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t off = e * R * inner;
        if (rows_layout) {
          importance_rows(pp + off, dd + off, out + e * R, R, inner, g.rank[e]);
        } else {
          importance_cols(pp + off, dd + off, out + e * R, inner, R, g.rank[e]);
        }
      }
    });
  });
  return imp;
}

at::Tensor cast_to(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}


// Everything the weight gradients (and the fused backward) read and write.
// Undefined tensors are outputs that were not requested (or an absent w / gb).
// g / x / a / b / u / gb are fp32 (fp64) for the LoRA products; g_in / x_in / w are
// the inputs' own dtype for the base GEMMs (dx = g w, dw = g^T x), whose outputs
// dx / dw are allocated in that dtype too. Two modes share the schedules below:
//   * weight_grad: gb [T, R] is given (computed by the shrink primitive), a / b / dx
//     are undefined;
//   * the fused backward: gb is undefined and computed block by block from b.
struct BackwardBufs {
  at::Tensor g, x;
  at::Tensor g_in, x_in;
  std::optional<at::Tensor> w;
  at::Tensor a, b, u, gb;
  at::Tensor dx, dw, da, db;
  int64_t R = 0;

  bool want_gb() const { return dx.defined() || da.defined(); }
  bool have_gb() const { return gb.defined(); }
  // [r, n] view of gb^T for rows [lo, lo + n) (only in weight_grad mode).
  at::Tensor gb_t(int64_t lo, int64_t n, int64_t r) const {
    return gb.narrow(0, lo, n).narrow(1, 0, r).t();
  }
};

// dx[rows] = g[rows] @ w[e] (base GEMM, input dtype) + gb[rows, :r] @ a[e, :r] (fp32).
void dx_rows(const BackwardBufs& t, int64_t e, int64_t lo, int64_t m, const at::Tensor& gbm,
             int64_t r) {
  auto dxm = t.dx.narrow(0, lo, m);
  const bool base = t.w.has_value();
  if (base) at::mm_out(dxm, t.g_in.narrow(0, lo, m), (*t.w)[e]);
  if (r > 0) {
    add_product(dxm, base, gbm, a_active(t.a, e, r), 1.0);
  } else if (!base) {
    dxm.zero_();
  }
}

// Expert-granular tasks balance when no expert holds much more than one
// thread's share of the rows (the usual top-k routing); a hot expert (zipf,
// one-hot routing) needs the finer two-phase split instead.
bool expert_tasks_balance(const Groups& g) {
  const int64_t nthreads = at::get_num_threads();
  if (nthreads <= 1) return true;
  int64_t busy = 0, max_rows = 0;
  for (int64_t e = 0; e < g.E; ++e) {
    busy += g.rows(e) > 0;
    max_rows = std::max(max_rows, g.rows(e));
  }
  const int64_t T = g.off[g.E];
  return busy >= 2 * nthreads && max_rows * nthreads <= T;
}

// Zero the inactive slots of da[e] ([R, K], rows >= r) and db[e] ([N, R], columns >= r).
// with_db = false leaves db to the caller (the transpose that writes db's active
// slots zeroes the rest in the same pass).
void zero_inactive_grads(const BackwardBufs& t, int64_t e, int64_t r, bool with_db = true) {
  const int64_t R = t.R;
  if (r == R) return;
  if (t.da.defined()) t.da[e].narrow(0, r, R - r).zero_();
  if (with_db && t.db.defined()) t.db[e].narrow(1, r, R - r).zero_();
}

// One task per expert: walk its rows in cache-sized blocks and do every GEMM
// that reads the block while it is hot (gb and dx in the fused backward, and the
// da / db / dw partial sums, accumulated in place with beta = 1 after the first block).
void backward_by_expert(const BackwardBufs& t, const Groups& g) {
  std::vector<int64_t> order(static_cast<size_t>(g.E));
  for (int64_t e = 0; e < g.E; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return g.rows(a) > g.rows(b); });
  const int64_t N = t.g.size(1);
  run_tasks(g.E, [&](int64_t i) {
    const int64_t e = order[i];
    const int64_t r = g.rank[e], n = g.rows(e);
    const double s = scale_of(g, e);
    zero_inactive_grads(t, e, r, /*with_db=*/!(r > 0 && n > 0));
    at::Tensor da_e = t.da.defined() && r > 0 ? t.da[e].narrow(0, 0, r) : at::Tensor();
    at::Tensor db_e = t.db.defined() && r > 0 ? t.db[e].narrow(1, 0, r) : at::Tensor();
    at::Tensor dw_e = t.dw.defined() ? t.dw[e] : at::Tensor();
    if (n == 0) {
      if (da_e.defined()) da_e.zero_();
      if (db_e.defined()) db_e.zero_();
      if (dw_e.defined()) dw_e.zero_();
      return;
    }
    const bool compute_gb = r > 0 && t.want_gb() && !t.have_gb();
    const auto b_r = compute_gb ? b_active(t.b, e, r) : at::Tensor();
    const int64_t block = even_block(n, kRowBlock);
    // gb^T = s b^T g^T ([r, rows]): the rank is not the vectorised output dimension
    // (see shrink_rows); dx and da read it through a transposed view.
    at::Tensor gbt = compute_gb ? at::empty({r, block}, t.g.options()) : at::Tensor();
    // db_e^T = s * u^T g is computed as an [r, N] row-major product and transposed
    // into db at the end: BLAS runs this orientation ~20% faster than g^T u
    // with its strided [N, r] output (measured on the benchmark shapes).
    at::Tensor dbt = db_e.defined() ? at::empty({r, N}, t.g.options()) : at::Tensor();
    for (int64_t lo = g.off[e]; lo < g.off[e + 1]; lo += block) {
      const int64_t m = std::min(block, g.off[e + 1] - lo);
      const double beta = lo == g.off[e] ? 0.0 : 1.0;  // first block overwrites
      auto gm = t.g.narrow(0, lo, m);
      auto xm = t.x.narrow(0, lo, m);
      at::Tensor gbtm;  // gb^T [r, m]
      if (compute_gb) {
        gbtm = gbt.narrow(1, 0, m);
        at::addmm_out(gbtm, gbtm, b_r.t(), gm.t(), /*beta=*/0.0, /*alpha=*/s);
      } else if (r > 0 && t.have_gb() && da_e.defined()) {
        gbtm = t.gb_t(lo, m, r);
      }
      if (t.dx.defined()) dx_rows(t, e, lo, m, gbtm.defined() ? gbtm.t() : gbtm, r);
      if (da_e.defined()) da_e.addmm_(gbtm, xm, beta);
      if (dbt.defined()) dbt.addmm_(t.u.narrow(0, lo, m).narrow(1, 0, r).t(), gm, beta, s);
      if (dw_e.defined()) dw_e.addmm_(t.g_in.narrow(0, lo, m).t(), t.x_in.narrow(0, lo, m), beta);
    }
    if (dbt.defined()) transpose_into(t.db[e], dbt);  // zeroes the slots >= r too
  });
}

// Two phases for skewed routing. Phase 1 (fused backward only), row tasks:
// gb = s * g @ b[e, :, :r] and dx. Phase 2, column tasks: the reductions over an
// expert's rows (da, db, dw), one task per (expert, block of output columns): many
// tasks even for one hot expert.
void backward_two_phase(const BackwardBufs& t, const Groups& g) {
  const int64_t T = t.x.size(0), R = t.R, K = t.x.size(1), N = t.g.size(1);
  const bool compute_gb = t.want_gb() && !t.have_gb();
  auto gbt = compute_gb ? at::empty({R, T}, t.g.options()) : at::Tensor();  // gb^T, see above
  if (compute_gb) {
    const auto tasks = row_tasks(g);
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
      const auto& k = tasks[i];
      const int64_t r = g.rank[k.e];
      auto gm = t.g.narrow(0, k.lo, k.n);
      at::Tensor gbm;
      if (r > 0) {
        auto gbtm = gbt.narrow(0, 0, r).narrow(1, k.lo, k.n);
        at::addmm_out(gbtm, gbtm, b_active(t.b, k.e, r).t(), gm.t(), /*beta=*/0.0,
                      scale_of(g, k.e));
        gbm = gbtm.t();
      }
      if (t.dx.defined()) dx_rows(t, k.e, k.lo, k.n, gbm, r);
    });
  }

  enum Kind : int64_t { kDa = 0, kDb = 1, kDw = 2 };
  std::vector<ColTask> tasks;
  auto add_tasks = [&](int64_t e, int64_t kind, int64_t cols) {
    for (int64_t lo = 0; lo < cols; lo += kColBlock) {
      tasks.push_back({e, kind, lo, std::min(kColBlock, cols - lo)});
    }
  };
  for (int64_t e = 0; e < g.E; ++e) {
    zero_inactive_grads(t, e, g.rank[e]);
    if (t.da.defined() && g.rank[e] > 0) add_tasks(e, kDa, K);
    if (t.db.defined() && g.rank[e] > 0) add_tasks(e, kDb, N);
    if (t.dw.defined()) add_tasks(e, kDw, N);
  }
  // Most rows first (cost ~ rows x cols); stable so equal tasks keep expert order.
  std::stable_sort(tasks.begin(), tasks.end(), [&](const ColTask& a, const ColTask& b) {
    return g.rows(a.e) * a.n > g.rows(b.e) * b.n;
  });
  run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const auto& k = tasks[i];
    const int64_t r = g.rank[k.e], lo = g.off[k.e], n = g.rows(k.e);
    at::Tensor out;
    if (k.kind == kDw) {
      out = t.dw[k.e].narrow(0, k.lo, k.n);  // [cols of N, K]
    } else if (k.kind == kDa) {
      out = t.da[k.e].narrow(0, 0, r).narrow(1, k.lo, k.n);  // [r, cols of K]
    } else {
      out = t.db[k.e].narrow(0, k.lo, k.n).narrow(1, 0, r);  // [cols of N, r]
    }
    if (n == 0) {
      out.zero_();
      return;
    }
    auto gm = t.g.narrow(0, lo, n);
    auto xm = t.x.narrow(0, lo, n);
    if (k.kind == kDw) {
      at::mm_out(out, t.g_in.narrow(0, lo, n).narrow(1, k.lo, k.n).t(), t.x_in.narrow(0, lo, n));
    } else if (k.kind == kDa) {
      auto gbt_rows = t.have_gb() ? t.gb_t(lo, n, r) : gbt.narrow(0, 0, r).narrow(1, lo, n);
      at::mm_out(out, gbt_rows, xm.narrow(1, k.lo, k.n));
    } else {
      at::addmm_out(out, out, gm.narrow(1, k.lo, k.n).t(), t.u.narrow(0, lo, n).narrow(1, 0, r),
                    /*beta=*/0.0, /*alpha=*/scale_of(g, k.e));
    }
  });
}

void run_backward(const BackwardBufs& bufs, const Groups& g) {
  if (expert_tasks_balance(g)) {
    backward_by_expert(bufs, g);
  } else {
    backward_two_phase(bufs, g);
  }
}

// da / db are accumulated in the accumulation dtype and cast at the end; dw is written
// in the inputs' dtype by its base GEMMs. Undefined (not requested) -> an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_weight_grads(const BackwardBufs& b,
                                                                    at::ScalarType dtype,
                                                                    const at::Tensor& like) {
  auto out = [&](const at::Tensor& t) { return t.defined() ? cast_to(t, dtype) : like.new_empty({0}); };
  return {out(b.da), out(b.db), out(b.dw)};
}
}  // namespace

at::Tensor shrink(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& ranks,
                  const at::Tensor& offsets, const std::optional<at::Tensor>& scale) {
  const Groups g = read_groups(ranks, offsets, opt_ptr(scale));
  const auto xa = to_acc(x);
  const auto aa = to_acc(lora_a);
  auto u = at::empty({x.size(0), lora_a.size(1)}, xa.options());
  const auto tasks = row_tasks(g);
  run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const auto& t = tasks[i];
    shrink_rows(xa, aa, u, t, g.rank[t.e], scale_of(g, t.e));
  });
  return u;
}

at::Tensor base_expand(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& w,
                       const at::Tensor& u, const at::Tensor& lora_b, const at::Tensor& ranks,
                       const at::Tensor& offsets, const at::Tensor& scale) {
  const Groups g = read_groups(ranks, offsets, &scale);
  const auto ba = to_acc(lora_b);
  const auto ua = cast_to(u, ba.scalar_type());
  auto y = at::empty({u.size(0), lora_b.size(1)}, lora_b.options());
  const std::optional<at::Tensor> xb = w.has_value() ? x : std::nullopt;
  const auto tasks = row_tasks(g);
  run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const auto& t = tasks[i];
    expand_rows(ua, ba, xb, w, y, t, g.rank[t.e], g.scale[t.e]);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u, const at::Tensor& gb,
    const at::Tensor& ranks, const at::Tensor& offsets, const at::Tensor& scale, bool need_a,
    bool need_b, bool need_w) {
  const Groups g = read_groups(ranks, offsets, &scale);
  const int64_t E = ranks.size(0), R = u.size(1), K = x.size(1), N = grad_y.size(1);
  BackwardBufs b;
  b.g = to_acc(grad_y);
  b.x = to_acc(x);
  b.g_in = grad_y;
  b.x_in = x;
  b.u = cast_to(u, b.x.scalar_type());
  b.R = R;
  const auto opts = b.x.options();
  if (need_a) {
    b.gb = cast_to(gb, b.x.scalar_type());
    b.da = at::empty({E, R, K}, opts);
  }
  if (need_b) b.db = at::empty({E, N, R}, opts);
  if (need_w) b.dw = at::empty({E, N, K}, x.options());
  run_backward(b, g);
  return finish_weight_grads(b, x.scalar_type(), x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& w,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u,
    const at::Tensor& ranks, const at::Tensor& offsets, const at::Tensor& scale, bool need_x,
    bool need_a, bool need_b, bool need_w) {
  const Groups g = read_groups(ranks, offsets, &scale);
  const int64_t E = lora_a.size(0), R = lora_a.size(1), K = lora_a.size(2);
  const int64_t N = lora_b.size(1), T = x.size(0);
  need_w = need_w && w.has_value();
  BackwardBufs b;
  b.g = to_acc(grad_y);
  b.x = to_acc(x);
  b.g_in = grad_y;
  b.x_in = x;
  b.w = w;
  b.a = to_acc(lora_a);
  b.b = to_acc(lora_b);
  b.u = cast_to(u, b.x.scalar_type());
  b.R = R;
  const auto opts = b.x.options();
  if (need_a) b.da = at::empty({E, R, K}, opts);
  if (need_b) b.db = at::empty({E, N, R}, opts);
  if (need_w) b.dw = at::empty({E, N, K}, w->options());
  if (need_x) b.dx = at::empty({T, K}, x.options());
  run_backward(b, g);
  auto [da, db, dw] = finish_weight_grads(b, x.scalar_type(), x);
  return {need_x ? b.dx : x.new_empty({0}), da, db, dw};
}

std::tuple<at::Tensor, at::Tensor> slot_importance(const at::Tensor& lora_a,
                                                   const at::Tensor& grad_a,
                                                   const at::Tensor& lora_b,
                                                   const at::Tensor& grad_b,
                                                   const at::Tensor& ranks) {
  const Groups g = read_groups(ranks, at::Tensor());
  const auto ga = to_acc(grad_a);
  const auto gb = cast_to(grad_b, ga.scalar_type());
  return {slot_importance(cast_to(lora_a, ga.scalar_type()), ga, g, /*rows_layout=*/true),
          slot_importance(cast_to(lora_b, ga.scalar_type()), gb, g, /*rows_layout=*/false)};
}

}  // namespace drlora::cpu
