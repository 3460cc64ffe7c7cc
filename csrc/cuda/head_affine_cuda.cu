// forward_cuda / backward_cuda: input checks, allocation (PyTorch's caching allocator), the GEMMs through ATen
// (cuBLAS / cuBLASLt, bias folded into the GEMM), and the LoFiT-specific kernels of head_affine_kernels.cu, all
// on the current CUDA stream of x's device.
//
// Paths (N rows of x, K selected heads of d columns, C = H * d):
//   forward, N <= 16:          one fused GEMV (x' staged in shared memory, W streamed once)
//   forward, A on many heads:  x' materialized by one kernel, then one GEMM with the bias (prefer_materialized)
//   forward, otherwise:        GEMM with the bias + v W_S^T folded into it, plus the thin GEMM (x_S * A) W_S^T
//                              when A is given (v alone never touches x: bias tuning is one GEMM + one W_S pass)
//   backward:                  g = dy W (cuBLAS), then one pass over g's selected columns that scales dx's
//                              columns by (1 + A) and reduces dA, dv (or the thin g_S = dy W_S when dx is not
//                              needed, or (sum_n dy) W_S for dv alone)
//
// Everything here is host code: nvcc's device passes see an empty translation unit, which keeps the compile
// time of this ATen-heavy file to one host pass.
#ifndef __CUDA_ARCH__

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../lofit.h"
#include "head_affine_kernels.cuh"

namespace lofit {

namespace {

namespace ck = cuda_kernels;

// With A, the forward either materializes x' (one read and one write of x per element, then one GEMM) or adds a
// thin GEMM over the K*d selected columns to the base GEMM. Relative to the base GEMM's 2 * D_out flops per
// element of x, materializing costs m = esize * R / D_out, where R is the device's GEMM flops per byte of memory
// bandwidth, and the thin GEMM costs (K*d / C) * (1 + m) (its flops plus writing its operand). Materialize when
// K*d / C >= m / (1 + m). R is a cost-model constant for H100/H200-class GPUs (about 1000 bf16 tensor TFLOP/s
// over 3.3-4.8 TB/s; no tensor cores for float32 without TF32 and float64), not a measurement.
bool prefer_materialized(int64_t KD, int64_t C, int64_t D_out, at::ScalarType t) {
  const double flops_per_byte = (t == at::kHalf || t == at::kBFloat16) ? 250.0 : 20.0;
  const double m = static_cast<double>(c10::elementSize(t)) * flops_per_byte / static_cast<double>(D_out);
  return static_cast<double>(KD) >= static_cast<double>(C) * m / (1.0 + m);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

ck::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ck::DType::kFloat32;
    case at::kHalf:
      return ck::DType::kFloat16;
    case at::kBFloat16:
      return ck::DType::kBFloat16;
    case at::kDouble:
      return ck::DType::kFloat64;
    default:
      TORCH_CHECK(false, "lofit_fast CUDA kernels do not take ", t.scalar_type(),
                  " (float32, bfloat16, float16, float64)");
  }
}

ck::Matrix matrix(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A or v as a contiguous [K, d] tensor in the accumulation type (a no-op for float32 parameters).
at::Tensor as_acc(const OptTensor& t, at::ScalarType x_type) {
  return t.has_value() ? t->to(acc_type(x_type)).contiguous() : at::Tensor();
}

void check_on_cuda(const at::Tensor& t, const char* name, const char* fn) {
  TORCH_CHECK(t.is_cuda(), fn, " needs CUDA tensors, ", name, " is on ", t.device());
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& heads,
                        const OptTensor& A, const OptTensor& v, int64_t head_dim) {
  check_inputs(x, weight, bias, heads, A, v, head_dim);  // shapes, dtypes, every tensor on x's device
  check_on_cuda(x, "x", "forward_cuda");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const int64_t N = x.size(0), C = x.size(1), D_out = weight.size(0), K = heads.size(0), d = head_dim;
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (N == 0 || K == 0 || (!A.has_value() && !v.has_value())) return at::linear(x, weight, b);

  const ck::DType t = kernel_dtype(x);
  const at::Tensor h = heads.contiguous();
  const int64_t* hp = h.data_ptr<int64_t>();
  const at::Tensor A_acc = as_acc(A, x.scalar_type()), v_acc = as_acc(v, x.scalar_type());
  const int64_t b_stride = b.defined() ? b.stride(0) : 0;

  if (ck::decode_gemv_supported(t, N, matrix(weight), C, d)) {
    auto y = at::empty({N, D_out}, x.options());
    ck::decode_gemv(t, matrix(x), matrix(weight), ptr_or_null(b), b_stride, y.data_ptr(), N, C, D_out, hp, K, d,
                    ptr_or_null(A_acc), ptr_or_null(v_acc), stream);
    return y;
  }

  if (A.has_value() && prefer_materialized(K * d, C, D_out, x.scalar_type())) {
    auto xp = at::empty({N, C}, x.options());
    ck::materialize(t, matrix(x), xp.data_ptr(), N, C, hp, K, d, ptr_or_null(A_acc), ptr_or_null(v_acc), stream);
    return at::linear(xp, weight, b);
  }

  at::Tensor y;
  if (v.has_value()) {
    auto b_eff = at::empty({D_out}, x.options());  // b + v W_S^T, then the GEMM adds it in its epilogue
    ck::bias_row(t, matrix(weight), ptr_or_null(b), b_stride, b_eff.data_ptr(), D_out, C, hp, K, d, v_acc.data_ptr(),
                 stream);
    y = at::linear(x, weight, b_eff);
  } else {
    y = at::linear(x, weight, b);
  }
  if (A.has_value()) {
    auto xa = at::empty({N, K * d}, x.options());  // x_S * A, the thin GEMM's operand
    ck::gather_scale(t, matrix(x), xa.data_ptr(), N, C, hp, K, d, A_acc.data_ptr(), stream);
    y.addmm_(xa, weight.index_select(1, selected_columns(h, d)).t());
  }
  return y;
}

Grads backward_cuda(const at::Tensor& dy_in, const OptTensor& x_sel, const at::Tensor& weight, const at::Tensor& heads,
                    const OptTensor& A, int64_t head_dim, bool need_dx, bool need_dA, bool need_dv) {
  check_backward_inputs(dy_in, x_sel, weight, heads, A, head_dim, need_dA);
  check_on_cuda(dy_in, "dy", "backward_cuda");
  TORCH_CHECK(heads.device() == dy_in.device(), "heads is on ", heads.device(), " but dy is on ", dy_in.device());
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor dy = dy_in.contiguous();
  const int64_t N = dy.size(0), C = weight.size(1), D_out = weight.size(0), K = heads.size(0), d = head_dim;
  const int64_t KD = K * d;
  const ck::DType t = kernel_dtype(dy);
  const auto acc_opts = dy.options().dtype(acc_type(dy.scalar_type()));
  const bool reduce = N > 0 && K > 0 && D_out > 0;  // otherwise dA and dv are zero (and so is dx, if D_out = 0)

  at::Tensor dA, dv;
  if (need_dA) dA = reduce ? at::empty({K, d}, acc_opts) : at::zeros({K, d}, acc_opts);
  if (need_dv) dv = reduce ? at::empty({K, d}, acc_opts) : at::zeros({K, d}, acc_opts);
  const at::Tensor h = heads.contiguous();
  const int64_t* hp = h.data_ptr<int64_t>();
  const ck::Matrix xs = need_dA ? matrix(*x_sel) : ck::Matrix{nullptr, 0, 0};
  auto workspace = [&](int64_t rows) {
    const int parts = (need_dA ? 1 : 0) + (need_dv ? 1 : 0);
    return at::empty({parts > 0 ? ck::head_reduce_workspace_elems(rows, K, d, parts) : 0}, acc_opts);
  };

  OptTensor dx;
  if (need_dx) {
    at::Tensor g = at::mm(dy, weight);  // [N, C]: dx before the selected heads are scaled
    const at::Tensor A_acc = A.has_value() ? as_acc(A, dy.scalar_type()) : at::Tensor();
    if (reduce && (need_dA || need_dv || A_acc.defined())) {
      auto ws = workspace(N);
      ck::head_reduce(t, g.data_ptr(), g.stride(0), g.stride(1), N, C, hp, K, d, xs, nullptr, ptr_or_null(A_acc),
                      ptr_or_null(dA), ptr_or_null(dv), ws.data_ptr(), stream);
    }
    dx = g;
  } else if (reduce && need_dA) {
    at::Tensor g_sel = at::mm(dy, weight.index_select(1, selected_columns(h, d)));  // [N, K*d]
    auto ws = workspace(N);
    ck::head_reduce(t, g_sel.data_ptr(), g_sel.stride(0), g_sel.stride(1), N, KD, /*heads=*/nullptr, K, d, xs,
                    nullptr, nullptr, dA.data_ptr(), ptr_or_null(dv), ws.data_ptr(), stream);
  } else if (reduce && need_dv) {
    // dv = (sum_n dy[n]) W_S: the same one-pass reduction, over the rows of W weighted by the column sums of dy.
    const at::Tensor dy_sum = at::sum(dy, {0}, /*keepdim=*/false, acc_type(dy.scalar_type()));
    auto ws = workspace(D_out);
    ck::head_reduce(t, weight.data_ptr(), weight.stride(0), weight.stride(1), D_out, C, hp, K, d, xs,
                    dy_sum.data_ptr(), nullptr, nullptr, dv.data_ptr(), ws.data_ptr(), stream);
  }

  OptTensor dA_out, dv_out;
  if (need_dA) dA_out = dA;
  if (need_dv) dv_out = dv;
  return {dx, dA_out, dv_out};
}

}  // namespace lofit

#endif  // __CUDA_ARCH__
