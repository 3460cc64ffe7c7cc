// CPU implementation of the per-row (many adapters in one batch) op: row n uses adapter a = row_ids[n]
// (-1 = none) of the tables A, v [n_adapters, K, d]:
//   y[n] = x[n] W^T + (x_S[n] * A[a]) W_S^T + off[a] + b,   off = v W_S^T  [n_adapters, D_out]
// The offset rows are computed once per call (or passed in, prepared once per parameter version) and gathered
// per row; the scale term is a gathered elementwise product feeding one thin GEMM over all rows.
// Backward: rows are grouped by adapter (a counting sort), and each (adapter, head) slice of dA / dv is reduced
// over its own rows in row order: deterministic, no atomics, no per-thread partial tables.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

#include "../lofit.h"

namespace lofit {

namespace {

constexpr double kDenseFraction = 0.5;  // as in head_affine_cpu.cpp

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> to_vector(const at::Tensor& t) {
  auto c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= t.size(1)) ? t : t.contiguous();
}

// out[n, k*d + j] = x[n, h_k*d + j] * A[rid[n], k, j]   (0 for rid[n] < 0)
template <typename scalar_t>
void gather_scale_rows(const at::Tensor& x, const std::vector<int64_t>& heads, const std::vector<int64_t>& rid,
                       const at::Tensor& A32, int64_t d, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), K = heads.size(), ldx = x.stride(0), KD = K * d;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* ap = A32.data_ptr<acc_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* dst = op + n * KD;
      if (rid[n] < 0) {
        std::fill(dst, dst + KD, scalar_t(0));
        continue;
      }
      const acc_t* a = ap + rid[n] * KD;
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* src = xp + n * ldx + heads[k] * d;
        for (int64_t j = 0; j < d; ++j)
          dst[k * d + j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) * a[k * d + j]);
      }
    }
  });
}

// out = x with row n's selected columns replaced by (1 + A[rid[n]]) * x + v[rid[n]] (x itself for rid[n] < 0).
template <typename scalar_t>
void materialize_rows(const at::Tensor& x, const std::vector<int64_t>& heads, const std::vector<int64_t>& rid,
                      const at::Tensor& A32, const at::Tensor& v32, int64_t d, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), K = heads.size(), ldx = x.stride(0), KD = K * d;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* ap = A32.defined() ? A32.data_ptr<acc_t>() : nullptr;
  const acc_t* vp = v32.defined() ? v32.data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      std::copy(xp + n * ldx, xp + n * ldx + C, op + n * C);
      if (rid[n] < 0) continue;
      const acc_t* a = ap ? ap + rid[n] * KD : nullptr;
      const acc_t* vv = vp ? vp + rid[n] * KD : nullptr;
      for (int64_t k = 0; k < K; ++k) {
        scalar_t* row = op + n * C + heads[k] * d;
        for (int64_t j = 0; j < d; ++j) {
          acc_t val = static_cast<acc_t>(row[j]);
          if (a) val = val * (acc_t(1) + a[k * d + j]);
          if (vv) val = val + vv[k * d + j];
          row[j] = static_cast<scalar_t>(val);
        }
      }
    }
  });
}

// y[n, :] += off[rid[n], :]  (accumulation dtype, rounded once to y's dtype).
template <typename scalar_t>
void add_offset_rows(at::Tensor& y, const std::vector<int64_t>& rid, const at::Tensor& off) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = y.size(0), D = y.size(1);
  scalar_t* yp = y.data_ptr<scalar_t>();
  const acc_t* op = off.data_ptr<acc_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (rid[n] < 0) continue;
      const acc_t* o = op + rid[n] * D;
      scalar_t* row = yp + n * D;
      for (int64_t j = 0; j < D; ++j) row[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) + o[j]);
    }
  });
}

// Rows grouped by adapter: order[start[a] .. start[a+1]) are adapter a's rows, ascending.
void group_rows(const std::vector<int64_t>& rid, int64_t n_adapters, std::vector<int64_t>& start,
                std::vector<int64_t>& order) {
  start.assign(n_adapters + 1, 0);
  for (int64_t r : rid)
    if (r >= 0) ++start[r + 1];
  for (int64_t a = 0; a < n_adapters; ++a) start[a + 1] += start[a];
  order.resize(start[n_adapters]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < static_cast<int64_t>(rid.size()); ++n)
    if (rid[n] >= 0) order[fill[rid[n]]++] = n;
}

// dv[a, k, j] = sum over adapter a's rows of g[n, col(k) + j]; dA the same of g * x_sel[n, k*d + j].
// col(k) = head_col[k] * d. Then, when scale_A, g[n, col(k) + j] *= 1 + A[rid[n], k, j] (g becomes dx).
template <typename scalar_t>
void reduce_heads_rows(at::Tensor& g, const std::vector<int64_t>& head_col, const std::vector<int64_t>& rid,
                       int64_t n_adapters, const at::Tensor& x_sel, const at::Tensor& A32, int64_t d, bool want_dA,
                       bool want_dv, bool scale_A, at::Tensor& dA, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.size(0), K = head_col.size(), ldg = g.stride(0), KD = K * d;
  const auto acc_opts = g.options().dtype(acc_type(g.scalar_type()));
  scalar_t* gp = g.data_ptr<scalar_t>();
  if (want_dA || want_dv) {
    std::vector<int64_t> start, order;
    group_rows(rid, n_adapters, start, order);
    if (want_dA) dA = at::zeros({n_adapters, K, d}, acc_opts);
    if (want_dv) dv = at::zeros({n_adapters, K, d}, acc_opts);
    const scalar_t* xs = want_dA ? x_sel.data_ptr<scalar_t>() : nullptr;
    const int64_t ldxs = want_dA ? x_sel.stride(0) : 0;
    acc_t* pA = want_dA ? dA.data_ptr<acc_t>() : nullptr;
    acc_t* pv = want_dv ? dv.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n_adapters * K, 1, [&](int64_t tb, int64_t te) {
      for (int64_t task = tb; task < te; ++task) {
        const int64_t a = task / K, k = task % K;
        acc_t* accA = pA ? pA + a * KD + k * d : nullptr;
        acc_t* accv = pv ? pv + a * KD + k * d : nullptr;
        for (int64_t i = start[a]; i < start[a + 1]; ++i) {
          const int64_t n = order[i];
          const scalar_t* grow = gp + n * ldg + head_col[k] * d;
          const scalar_t* xrow = xs ? xs + n * ldxs + k * d : nullptr;
          for (int64_t j = 0; j < d; ++j) {
            const acc_t gv = static_cast<acc_t>(grow[j]);
            if (accv) accv[j] += gv;
            if (accA) accA[j] += gv * static_cast<acc_t>(xrow[j]);
          }
        }
      }
    });
  }
  if (scale_A) {
    const acc_t* ap = A32.data_ptr<acc_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (rid[n] < 0) continue;
        const acc_t* a = ap + rid[n] * KD;
        for (int64_t k = 0; k < K; ++k) {
          scalar_t* grow = gp + n * ldg + head_col[k] * d;
          for (int64_t j = 0; j < d; ++j)
            grow[j] = static_cast<scalar_t>(static_cast<acc_t>(grow[j]) * (acc_t(1) + a[k * d + j]));
        }
      }
    });
  }
}

}  // namespace

void check_rows_inputs(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& heads,
                       const OptTensor& A, const OptTensor& v, const at::Tensor& row_ids, int64_t head_dim,
                       int64_t n_adapters) {
  check_inputs(x, weight, bias, heads, std::nullopt, std::nullopt, head_dim);
  const int64_t K = heads.size(0);
  for (const auto& [p, name] : {std::pair<const OptTensor*, const char*>{&A, "A"}, {&v, "v"}}) {
    if (!p->has_value()) continue;
    const at::Tensor& t = **p;
    TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
    TORCH_CHECK(t.dim() == 3 && t.size(0) == n_adapters && t.size(1) == K && t.size(2) == head_dim, name,
                " must have shape [n_adapters, K, head_dim] = [", n_adapters, ", ", K, ", ", head_dim, "], got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), name,
                " must be float32 or x's dtype (", x.scalar_type(), "), got ", t.scalar_type());
  }
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.scalar_type() == at::kLong, "row_ids must be a 1-D int64 tensor, got ",
              row_ids.dim(), "-D ", row_ids.scalar_type());
  TORCH_CHECK(row_ids.size(0) == x.size(0), "row_ids has ", row_ids.size(0), " entries but x has ", x.size(0),
              " rows");
  TORCH_CHECK(row_ids.device() == x.device(), "row_ids is on ", row_ids.device(), " but x is on ", x.device());
  if (row_ids.device().is_cpu()) {
    auto r = row_ids.contiguous();
    const int64_t* p = r.data_ptr<int64_t>();
    for (int64_t n = 0; n < r.numel(); ++n)
      TORCH_CHECK(p[n] >= -1 && p[n] < n_adapters, "row_ids[", n, "] = ", p[n], " out of range: there are ",
                  n_adapters, " adapters (-1 = none)");
  }
}

at::Tensor rows_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight, const OptTensor& bias,
                            const at::Tensor& heads, const OptTensor& A, const OptTensor& v, const at::Tensor& row_ids,
                            int64_t head_dim, const OptTensor& weight_sel, const OptTensor& offset_table) {
  const int64_t n_adapters = A.has_value() ? A->size(0) : (v.has_value() ? v->size(0) : 0);
  check_rows_inputs(x_in, weight, bias, heads, A, v, row_ids, head_dim, n_adapters);
  TORCH_CHECK(x_in.device().is_cpu(), "rows_forward_cpu needs CPU tensors, x is on ", x_in.device());
  const at::Tensor x = rows_contiguous(x_in);
  const int64_t N = x.size(0), K = heads.size(0), C = x.size(1), d = head_dim, KD = K * d;
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (K == 0 || n_adapters == 0 || N == 0) return at::linear(x, weight, b);
  const auto acc = acc_type(x.scalar_type());
  const auto hv = to_vector(heads);
  const auto rid = to_vector(row_ids);
  const at::Tensor A32 = A.has_value() ? A->to(acc).contiguous() : at::Tensor();
  const at::Tensor v32 = v.has_value() ? v->to(acc).contiguous() : at::Tensor();
  if (static_cast<double>(KD) >= kDenseFraction * static_cast<double>(C)) {
    auto xp = at::empty({N, C}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lofit_materialize_rows",
                                    [&] { materialize_rows<scalar_t>(x, hv, rid, A32, v32, d, xp); });
    return at::linear(xp, weight, b);
  }
  auto y = at::linear(x, weight, b);
  at::Tensor w_sel;
  if (weight_sel.has_value()) {
    TORCH_CHECK(weight_sel->dim() == 2 && weight_sel->size(0) == weight.size(0) && weight_sel->size(1) == KD &&
                    weight_sel->scalar_type() == weight.scalar_type(),
                "weight_sel must be [", weight.size(0), ", ", KD, "] of weight's dtype, got ", weight_sel->sizes());
    w_sel = *weight_sel;
  } else {
    w_sel = weight.index_select(1, selected_columns(heads, d));
  }
  if (A.has_value()) {
    auto t = at::empty({N, KD}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lofit_gather_scale_rows",
                                    [&] { gather_scale_rows<scalar_t>(x, hv, rid, A32, d, t); });
    y.addmm_(t, w_sel.t());
  }
  if (v.has_value()) {
    at::Tensor off;
    if (offset_table.has_value()) {
      TORCH_CHECK(offset_table->dim() == 2 && offset_table->size(0) == n_adapters &&
                      offset_table->size(1) == weight.size(0) && offset_table->scalar_type() == acc,
                  "offset_table must be [", n_adapters, ", ", weight.size(0), "] ", acc, ", got ",
                  offset_table->sizes(), " ", offset_table->scalar_type());
      off = offset_table->contiguous();
    } else {
      off = at::mm(v32.view({n_adapters, KD}), w_sel.to(acc).t()).contiguous();  // [n_adapters, D_out], once
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lofit_offset_rows",
                                    [&] { add_offset_rows<scalar_t>(y, rid, off); });
  }
  return y;
}

Grads rows_backward_cpu(const at::Tensor& dy_in, const OptTensor& x_sel_in, const at::Tensor& weight,
                        const at::Tensor& heads, const OptTensor& A, const at::Tensor& row_ids, int64_t head_dim,
                        int64_t n_adapters, bool need_dx, bool need_dA, bool need_dv, const OptTensor& weight_sel) {
  TORCH_CHECK(dy_in.device().is_cpu(), "rows_backward_cpu needs CPU tensors, dy is on ", dy_in.device());
  TORCH_CHECK(dy_in.dim() == 2 && dy_in.size(1) == weight.size(0), "dy must be [N, ", weight.size(0), "], got ",
              dy_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == weight.scalar_type(), "dy dtype ", dy_in.scalar_type(), " != weight dtype ",
              weight.scalar_type());
  TORCH_CHECK(heads.dim() == 1 && heads.scalar_type() == at::kLong, "heads must be a 1-D int64 tensor");
  TORCH_CHECK(head_dim > 0 && weight.size(1) % head_dim == 0, "weight has ", weight.size(1),
              " columns, not a multiple of head_dim ", head_dim);
  TORCH_CHECK(n_adapters >= 0, "n_adapters must be >= 0, got ", n_adapters);
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.scalar_type() == at::kLong && row_ids.size(0) == dy_in.size(0),
              "row_ids must be int64 [", dy_in.size(0), "], got ", row_ids.sizes(), " ", row_ids.scalar_type());
  const at::Tensor dy = dy_in.contiguous();
  const int64_t K = heads.size(0), d = head_dim, KD = K * d;
  if (A.has_value())
    TORCH_CHECK(A->dim() == 3 && A->size(0) == n_adapters && A->size(1) == K && A->size(2) == d, "A must be [",
                n_adapters, ", ", K, ", ", d, "], got ", A->sizes());
  if (need_dA) {
    TORCH_CHECK(x_sel_in.has_value(), "x_sel is required for the gradient of A");
    TORCH_CHECK(x_sel_in->dim() == 2 && x_sel_in->size(0) == dy.size(0) && x_sel_in->size(1) == KD &&
                    x_sel_in->scalar_type() == dy.scalar_type(),
                "x_sel must be [", dy.size(0), ", ", KD, "] of dy's dtype, got ", x_sel_in->sizes());
  }
  const auto rid = to_vector(row_ids);
  for (int64_t n = 0; n < static_cast<int64_t>(rid.size()); ++n)
    TORCH_CHECK(rid[n] >= -1 && rid[n] < n_adapters, "row_ids[", n, "] = ", rid[n], " out of range: there are ",
                n_adapters, " adapters (-1 = none)");
  const auto acc = acc_type(dy.scalar_type());
  const bool scale_A = need_dx && A.has_value() && K > 0;
  const at::Tensor A32 = scale_A ? A->to(acc).contiguous() : at::Tensor();
  const at::Tensor x_sel = need_dA ? rows_contiguous(*x_sel_in) : at::Tensor();
  const auto hv = to_vector(heads);
  OptTensor dx, dA_out, dv_out;
  at::Tensor dA, dv;
  auto w_sel_of = [&]() {
    return weight_sel.has_value() ? *weight_sel : weight.index_select(1, selected_columns(heads, d));
  };
  if (need_dx) {
    auto g = at::mm(dy, weight);
    if (K > 0 && (need_dA || need_dv || scale_A)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "lofit_reduce_heads_rows", [&] {
        reduce_heads_rows<scalar_t>(g, hv, rid, n_adapters, x_sel, A32, d, need_dA, need_dv, scale_A, dA, dv);
      });
    }
    dx = g;
  } else if (K > 0 && need_dA) {
    auto g_sel = at::mm(dy, w_sel_of());
    std::vector<int64_t> local(K);
    for (int64_t k = 0; k < K; ++k) local[k] = k;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g_sel.scalar_type(), "lofit_reduce_heads_rows", [&] {
      reduce_heads_rows<scalar_t>(g_sel, local, rid, n_adapters, x_sel, A32, d, need_dA, need_dv, false, dA, dv);
    });
  } else if (K > 0 && need_dv) {
    // dv[a] = (sum of dy over adapter a's rows) W_S: a segmented column sum, then one small GEMM.
    auto dys = at::zeros({n_adapters + 1, dy.size(1)}, dy.options().dtype(acc));
    dys.index_add_(0, row_ids + 1, dy.to(acc));
    dv = at::mm(dys.narrow(0, 1, n_adapters), w_sel_of().to(acc)).view({n_adapters, K, d});
  }
  if (need_dA) dA_out = dA.defined() ? dA : at::zeros({n_adapters, K, d}, dy.options().dtype(acc));
  if (need_dv) dv_out = dv.defined() ? dv : at::zeros({n_adapters, K, d}, dy.options().dtype(acc));
  return {dx, dA_out, dv_out};
}

}  // namespace lofit
