#include "lofit.h"

namespace lofit {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_param(const OptTensor& p, const char* name, const at::Tensor& x, int64_t K, int64_t d) {
  if (!p.has_value()) return;
  const at::Tensor& t = *p;
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.size(1) == d, name, " must have shape [K, head_dim] = [", K, ", ",
              d, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), name,
              " must be float32 or x's dtype (", x.scalar_type(), "), got ", t.scalar_type());
}

}  // namespace

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& heads,
                  const OptTensor& A, const OptTensor& v, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [N, H*head_dim], got ", x.dim(), "-D");
  TORCH_CHECK(supported_dtype(x.scalar_type()), "x dtype ", x.scalar_type(),
              " is not supported (float32, bfloat16, float16, float64)");
  TORCH_CHECK(head_dim > 0, "head_dim must be positive, got ", head_dim);
  TORCH_CHECK(x.size(1) % head_dim == 0, "x has ", x.size(1), " columns, not a multiple of head_dim ", head_dim);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must be [D_out, ", x.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(), " != x dtype ",
              x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [", weight.size(0), "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype ", bias->scalar_type(), " != x dtype ",
                x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "bias is on ", bias->device(), " but x is on ", x.device());
  }
  TORCH_CHECK(heads.dim() == 1 && heads.scalar_type() == at::kLong, "heads must be a 1-D int64 tensor, got ",
              heads.dim(), "-D ", heads.scalar_type());
  TORCH_CHECK(heads.device() == x.device(), "heads is on ", heads.device(), " but x is on ", x.device());
  const int64_t H = x.size(1) / head_dim;
  const int64_t K = heads.size(0);
  TORCH_CHECK(K <= H, "heads has ", K, " entries but there are only ", H, " heads");
  if (heads.device().is_cpu() && K > 0) {
    auto h = heads.contiguous();
    const int64_t* p = h.data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k) {
      TORCH_CHECK(p[k] >= 0 && p[k] < H, "head ", p[k], " out of range: there are ", H, " heads");
      TORCH_CHECK(k == 0 || p[k] > p[k - 1], "heads must be sorted and unique, got ", p[k - 1], " before ", p[k]);
    }
  }
  check_param(A, "A", x, K, head_dim);
  check_param(v, "v", x, K, head_dim);
}

void check_backward_inputs(const at::Tensor& dy, const OptTensor& x_sel, const at::Tensor& weight,
                           const at::Tensor& heads, const OptTensor& A, int64_t head_dim, bool need_dA) {
  TORCH_CHECK(dy.dim() == 2 && dy.size(1) == weight.size(0), "dy must be [N, ", weight.size(0), "], got ",
              dy.sizes());
  TORCH_CHECK(dy.scalar_type() == weight.scalar_type(), "dy dtype ", dy.scalar_type(), " != weight dtype ",
              weight.scalar_type());
  TORCH_CHECK(dy.device() == weight.device(), "dy is on ", dy.device(), " but weight is on ", weight.device());
  TORCH_CHECK(heads.dim() == 1 && heads.scalar_type() == at::kLong, "heads must be a 1-D int64 tensor");
  TORCH_CHECK(head_dim > 0 && weight.size(1) % head_dim == 0, "weight has ", weight.size(1),
              " columns, not a multiple of head_dim ", head_dim);
  const int64_t K = heads.size(0);
  if (need_dA) {
    TORCH_CHECK(x_sel.has_value(), "x_sel is required for the gradient of A");
    TORCH_CHECK(x_sel->dim() == 2 && x_sel->size(0) == dy.size(0) && x_sel->size(1) == K * head_dim,
                "x_sel must be [", dy.size(0), ", ", K * head_dim, "], got ", x_sel->sizes());
    TORCH_CHECK(x_sel->scalar_type() == dy.scalar_type(), "x_sel dtype ", x_sel->scalar_type(), " != dy dtype ",
                dy.scalar_type());
    TORCH_CHECK(x_sel->device() == dy.device(), "x_sel is on ", x_sel->device(), " but dy is on ", dy.device());
  }
  if (A.has_value()) {
    TORCH_CHECK(A->dim() == 2 && A->size(0) == K && A->size(1) == head_dim, "A must be [", K, ", ", head_dim,
                "], got ", A->sizes());
    TORCH_CHECK(A->device() == dy.device(), "A is on ", A->device(), " but dy is on ", dy.device());
    // As in the forward: float32, or x's dtype (which is dy's and weight's).
    TORCH_CHECK(A->scalar_type() == at::kFloat || A->scalar_type() == dy.scalar_type(),
                "A must be float32 or x's dtype (", dy.scalar_type(), "), got ", A->scalar_type());
  }
}

at::Tensor selected_columns(const at::Tensor& heads, int64_t head_dim) {
  auto offs = at::arange(head_dim, heads.options());
  return (heads.unsqueeze(1) * head_dim + offs.unsqueeze(0)).reshape({-1});
}

}  // namespace lofit
