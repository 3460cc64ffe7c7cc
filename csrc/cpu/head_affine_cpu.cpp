// CPU implementation: GEMMs through ATen (MKL/oneDNN), the LoFiT-specific work in hand-written loops
// that touch only the K selected heads, float32 accumulation, deterministic two-level reductions.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

#include "../lofit.h"

namespace lofit {

namespace {

// Selecting at least this fraction of the columns makes one materialized x' and a single GEMM cheaper
// than the base GEMM plus a thin GEMM over the selected columns.
constexpr double kDenseFraction = 0.5;

// Accumulation dtype: float32 for float32/bfloat16/float16 inputs, float64 for float64 inputs.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_acc(const OptTensor& t, at::ScalarType x_type) {
  return t.has_value() ? t->to(acc_type(x_type)).contiguous() : at::Tensor();
}

std::vector<int64_t> heads_vector(const at::Tensor& heads) {
  auto h = heads.contiguous();
  return std::vector<int64_t>(h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel());
}

// out[n, k*d + j] = x[n, h_k*d + j] * A[k, j]          (the thin-GEMM operand)
template <typename scalar_t>
void gather_scale(const at::Tensor& x, const std::vector<int64_t>& heads, const at::Tensor& A32, int64_t d,
                  at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), K = heads.size(), ldx = x.stride(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* ap = A32.data_ptr<acc_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* src = xp + n * ldx + heads[k] * d;
        const acc_t* a = ap + k * d;
        scalar_t* dst = op + (n * K + k) * d;
        for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) * a[j]);
      }
    }
  });
}

// out = x with the selected heads' columns replaced by (1 + A) * x + v.
template <typename scalar_t>
void materialize(const at::Tensor& x, const std::vector<int64_t>& heads, const at::Tensor& A32, const at::Tensor& v32,
                 int64_t d, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), K = heads.size(), ldx = x.stride(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* ap = A32.defined() ? A32.data_ptr<acc_t>() : nullptr;
  const acc_t* vp = v32.defined() ? v32.data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      std::copy(xp + n * ldx, xp + n * ldx + C, op + n * C);
      for (int64_t k = 0; k < K; ++k) {
        scalar_t* row = op + n * C + heads[k] * d;
        for (int64_t j = 0; j < d; ++j) {
          acc_t val = static_cast<acc_t>(row[j]);
          if (ap) val = val * (acc_t(1) + ap[k * d + j]);
          if (vp) val = val + vp[k * d + j];
          row[j] = static_cast<scalar_t>(val);
        }
      }
    }
  });
}

// One pass over the rows for the selected heads:
//   dv[k, j] = sum_n g[n, h_k*d + j],  dA[k, j] = sum_n g[n, h_k*d + j] * x_sel[n, k*d + j],
// and, when scale_A is set, g[n, h_k*d + j] *= 1 + A[k, j] in place (turning g into dx).
// g's selected columns sit at col(k) = head_col[k] * d (head_col = heads for the full g, 0..K-1 for g_S).
// Rows are split into a fixed number of chunks, each reducing into its own float32 row, then summed:
// deterministic for a given thread-independent chunk count, no atomics.
template <typename scalar_t>
void reduce_heads(at::Tensor& g, const std::vector<int64_t>& head_col, const at::Tensor& x_sel, const at::Tensor& A32,
                  int64_t d, bool want_dA, bool want_dv, bool scale_A, at::Tensor& dA, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.size(0), K = head_col.size(), ldg = g.stride(0), KD = K * d;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(N, 64));
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  const auto acc_opts = g.options().dtype(acc_type(g.scalar_type()));
  auto partial_dA = at::zeros({want_dA ? chunks : 0, KD}, acc_opts);
  auto partial_dv = at::zeros({want_dv ? chunks : 0, KD}, acc_opts);
  scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* xs = want_dA ? x_sel.data_ptr<scalar_t>() : nullptr;
  const int64_t ldxs = want_dA ? x_sel.stride(0) : 0;
  const acc_t* ap = scale_A ? A32.data_ptr<acc_t>() : nullptr;
  acc_t* pA = want_dA ? partial_dA.data_ptr<acc_t>() : nullptr;
  acc_t* pv = want_dv ? partial_dv.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      acc_t* accA = pA ? pA + c * KD : nullptr;
      acc_t* accv = pv ? pv + c * KD : nullptr;
      const int64_t n_end = std::min(N, (c + 1) * rows_per_chunk);
      for (int64_t n = c * rows_per_chunk; n < n_end; ++n) {
        for (int64_t k = 0; k < K; ++k) {
          scalar_t* grow = gp + n * ldg + head_col[k] * d;
          const scalar_t* xrow = xs ? xs + n * ldxs + k * d : nullptr;
          for (int64_t j = 0; j < d; ++j) {
            const acc_t gv = static_cast<acc_t>(grow[j]);
            if (accv) accv[k * d + j] += gv;
            if (accA) accA[k * d + j] += gv * static_cast<acc_t>(xrow[j]);
            if (ap) grow[j] = static_cast<scalar_t>(gv * (acc_t(1) + ap[k * d + j]));
          }
        }
      }
    }
  });
  if (want_dA) dA = partial_dA.sum(0).view({K, d});
  if (want_dv) dv = partial_dv.sum(0).view({K, d});
}

at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= t.size(1)) ? t : t.contiguous();
}

}  // namespace

at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& heads,
                       const OptTensor& A, const OptTensor& v, int64_t head_dim) {
  check_inputs(x_in, weight, bias, heads, A, v, head_dim);
  TORCH_CHECK(x_in.device().is_cpu(), "forward_cpu needs CPU tensors, x is on ", x_in.device());
  const at::Tensor x = rows_contiguous(x_in);
  const int64_t N = x.size(0), K = heads.size(0), C = x.size(1), d = head_dim;
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (K == 0 || (!A.has_value() && !v.has_value())) return at::linear(x, weight, b);

  const auto hv = heads_vector(heads);
  const at::Tensor A32 = as_acc(A, x.scalar_type()), v32 = as_acc(v, x.scalar_type());
  if (static_cast<double>(K * d) >= kDenseFraction * static_cast<double>(C)) {
    auto xp = at::empty({N, C}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lofit_materialize",
                                    [&] { materialize<scalar_t>(x, hv, A32, v32, d, xp); });
    return at::linear(xp, weight, b);
  }

  auto y = at::linear(x, weight, b);
  const auto w_sel = weight.index_select(1, selected_columns(heads, d));  // [D_out, K*d]
  if (A.has_value()) {
    auto t = at::empty({N, K * d}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lofit_gather_scale",
                                    [&] { gather_scale<scalar_t>(x, hv, A32, d, t); });
    y.addmm_(t, w_sel.t());
  }
  if (v.has_value()) y.add_(at::mv(w_sel.to(v32.scalar_type()), v32.view({-1})).to(y.scalar_type()));
  return y;
}

Grads backward_cpu(const at::Tensor& dy_in, const OptTensor& x_sel_in, const at::Tensor& weight,
                   const at::Tensor& heads, const OptTensor& A, int64_t head_dim, bool need_dx, bool need_dA,
                   bool need_dv) {
  check_backward_inputs(dy_in, x_sel_in, weight, heads, A, head_dim, need_dA);
  TORCH_CHECK(dy_in.device().is_cpu(), "backward_cpu needs CPU tensors, dy is on ", dy_in.device());
  const at::Tensor dy = dy_in.contiguous();
  const int64_t K = heads.size(0), d = head_dim;
  const bool scale_A = need_dx && A.has_value() && K > 0;
  OptTensor dx, dA_out, dv_out;
  at::Tensor dA, dv;
  const auto acc = acc_type(dy.scalar_type());
  const at::Tensor A32 = scale_A ? as_acc(A, dy.scalar_type()) : at::Tensor();
  const at::Tensor x_sel = need_dA ? rows_contiguous(*x_sel_in) : at::Tensor();
  const auto hv = heads_vector(heads);

  if (need_dx) {
    auto g = at::mm(dy, weight);  // [N, H*d]: dx before the selected heads are scaled
    if (K > 0 && (need_dA || need_dv || scale_A)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "lofit_reduce_heads", [&] {
        reduce_heads<scalar_t>(g, hv, x_sel, A32, d, need_dA, need_dv, scale_A, dA, dv);
      });
    }
    dx = g;
  } else if (K > 0 && need_dA) {
    const auto w_sel = weight.index_select(1, selected_columns(heads, d));
    auto g_sel = at::mm(dy, w_sel);  // [N, K*d]
    std::vector<int64_t> local(K);
    for (int64_t k = 0; k < K; ++k) local[k] = k;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g_sel.scalar_type(), "lofit_reduce_heads", [&] {
      reduce_heads<scalar_t>(g_sel, local, x_sel, A32, d, need_dA, need_dv, false, dA, dv);
    });
  } else if (K > 0 && need_dv) {
    // dv = (sum_n dy[n]) W_S: a column sum, then a GEMV.
    const auto w_sel = weight.index_select(1, selected_columns(heads, d)).to(acc);
    dv = at::mv(w_sel.t(), dy.sum(0, /*keepdim=*/false, acc)).view({K, d});
  }
  if (need_dA) dA_out = dA.defined() ? dA : at::zeros({K, d}, dy.options().dtype(acc));
  if (need_dv) dv_out = dv.defined() ? dv : at::zeros({K, d}, dy.options().dtype(acc));
  return {dx, dA_out, dv_out};
}

}  // namespace lofit
