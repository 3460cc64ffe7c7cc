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
// Prepared operands. Three things derive from the parameters alone and are the same on every call until a
// parameter changes: the head -> slot table (from heads), W_S = W[:, S] (from weight, heads) and the folded bias
// b + v W_S^T (from weight, bias, heads, v). lofit_fast/ops/cuda_backend.py builds them once with head_slots_cuda,
// selected_weight_cuda and folded_bias_cuda, caches them per parameter version, and passes them as the op's
// optional trailing arguments; the op computes whatever is not passed on the spot (a direct call of the op, a
// torch.compile graph, a CUDA-graph capture), with the same kernels, so both give the same result up to the
// rounding noted below.
//
// Precision of the folded bias f = b + v W_S^T: it is accumulated in float32 (float64 for float64 inputs).
//   - decode GEMV: f stays float32 and is added to the float32 dot products before y's single rounding, so
//     y = round(x W^T + b + v W_S^T) (with A: x_S (1 + A) rounded to x's dtype once, in shared memory);
//   - GEMM paths: cuBLAS(Lt) adds a bias of x's dtype in its epilogue, so f is rounded to x's dtype once (when it
//     is prepared, not per call) and y = round(x W^T + round(f)): at most half an ulp of f (2^-9 |f| in bf16)
//     from the float32-bias result, the same as a model whose merged o_proj bias is stored in bf16.
//   The float32 alternative on the GEMM path, a GEMM without bias and then y = round(float(y) + f), costs one
//   more pass over y (N * D_out * 2 bytes read and written: ~20 us at N = D_out = 4096 on an H100, ~10 % of the
//   GEMM) and rounds twice anyway; a cuBLASLt call with a float32 bias epilogue is not exposed by ATen.
//
// Everything here is host code: nvcc's device passes see an empty translation unit, which keeps the compile
// time of this ATen-heavy file to one host pass.
#ifndef __CUDA_ARCH__

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <tuple>

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

namespace {

enum class Path { kLinear, kDecode, kMaterialize, kGemm };

Path choose_path(const at::Tensor& x, const at::Tensor& weight, int64_t K, int64_t d, bool has_A, bool has_v) {
  const int64_t N = x.size(0), C = x.size(1), D_out = weight.size(0);
  if (N == 0 || K == 0 || (!has_A && !has_v)) return Path::kLinear;
  if (ck::decode_gemv_supported(kernel_dtype(x), N, matrix(weight), C, d)) return Path::kDecode;
  if (has_A && prefer_materialized(K * d, C, D_out, x.scalar_type())) return Path::kMaterialize;
  return Path::kGemm;
}

void check_index_math(int64_t C, int64_t D_out) {
  TORCH_CHECK(C <= ck::kMaxIndex && D_out <= ck::kMaxIndex - 16, "lofit_fast CUDA kernels use 32-bit index math "
              "along a row: H * head_dim (", C, ") and D_out (", D_out, ") must be below 2^31");
}

at::Tensor make_slots(const at::Tensor& heads, int64_t H, cudaStream_t stream) {
  auto slots = at::empty({H}, heads.options().dtype(at::kInt));
  const at::Tensor h = heads.contiguous();
  ck::head_slots(h.data_ptr<int64_t>(), h.size(0), H, slots.data_ptr<int32_t>(), stream);
  return slots;
}

at::Tensor selected_weight(const at::Tensor& weight, const at::Tensor& heads, int64_t d) {
  return weight.index_select(1, selected_columns(heads, d));  // [D_out, K*d] contiguous
}

// The prepared operands, when given, must be what head_slots_cuda / selected_weight_cuda / folded_bias_cuda
// return for these inputs (their values cannot be checked without recomputing them; shapes and types are).
void check_prepared(const at::Tensor& x, const at::Tensor& weight, int64_t K, int64_t d, const OptTensor& v,
                    const OptTensor& slots, const OptTensor& weight_sel, const OptTensor& bias_fold,
                    const OptTensor& bias_fold_acc) {
  const int64_t H = x.size(1) / d, D_out = weight.size(0);
  if (slots.has_value()) {
    TORCH_CHECK(slots->dim() == 1 && slots->size(0) == H && slots->scalar_type() == at::kInt &&
                    slots->is_contiguous() && slots->device() == x.device(),
                "slots must be a contiguous int32 [", H, "] tensor on ", x.device(),
                " (the head -> slot table of head_slots_cuda), got ", slots->scalar_type(), " ", slots->sizes(),
                " on ", slots->device());
  }
  if (weight_sel.has_value()) {
    TORCH_CHECK(weight_sel->dim() == 2 && weight_sel->size(0) == D_out && weight_sel->size(1) == K * d &&
                    weight_sel->scalar_type() == x.scalar_type() && weight_sel->device() == x.device(),
                "weight_sel must be weight's selected columns [D_out, K*head_dim] = [", D_out, ", ", K * d, "] of ",
                x.scalar_type(), " on ", x.device(), ", got ", weight_sel->scalar_type(), " ", weight_sel->sizes(),
                " on ", weight_sel->device());
  }
  TORCH_CHECK(bias_fold.has_value() == bias_fold_acc.has_value(),
              "bias_fold and bias_fold_acc are passed together (folded_bias_cuda returns both)");
  if (bias_fold.has_value()) {
    TORCH_CHECK(v.has_value(), "bias_fold is bias + v W_S^T: it is only passed together with v");
    TORCH_CHECK(bias_fold->dim() == 1 && bias_fold->size(0) == D_out &&
                    bias_fold->scalar_type() == x.scalar_type() && bias_fold->device() == x.device(),
                "bias_fold must be a [", D_out, "] tensor of ", x.scalar_type(), " on ", x.device(), ", got ",
                bias_fold->scalar_type(), " ", bias_fold->sizes(), " on ", bias_fold->device());
    const auto acc = acc_type(x.scalar_type());
    TORCH_CHECK(bias_fold_acc->dim() == 1 && bias_fold_acc->size(0) == D_out &&
                    bias_fold_acc->scalar_type() == acc && bias_fold_acc->is_contiguous() &&
                    bias_fold_acc->device() == x.device(),
                "bias_fold_acc must be a contiguous [", D_out, "] tensor of ", acc, " on ", x.device(), ", got ",
                bias_fold_acc->scalar_type(), " ", bias_fold_acc->sizes(), " on ", bias_fold_acc->device());
  }
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& heads,
                        const OptTensor& A, const OptTensor& v, int64_t head_dim, const OptTensor& slots,
                        const OptTensor& weight_sel, const OptTensor& bias_fold, const OptTensor& bias_fold_acc) {
  check_inputs(x, weight, bias, heads, A, v, head_dim);  // shapes, dtypes, every tensor on x's device
  check_on_cuda(x, "x", "forward_cuda");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const int64_t N = x.size(0), C = x.size(1), D_out = weight.size(0), K = heads.size(0), d = head_dim, H = C / d;
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  const Path path = choose_path(x, weight, K, d, A.has_value(), v.has_value());
  if (path == Path::kLinear) return at::linear(x, weight, b);
  check_index_math(C, D_out);
  check_prepared(x, weight, K, d, v, slots, weight_sel, bias_fold, bias_fold_acc);

  const ck::DType t = kernel_dtype(x);
  const at::Tensor h = heads.contiguous();
  const int64_t* hp = h.data_ptr<int64_t>();
  const at::Tensor A_acc = as_acc(A, x.scalar_type()), v_acc = as_acc(v, x.scalar_type());
  const int64_t b_stride = b.defined() ? b.stride(0) : 0;
  const bool folded = bias_fold.has_value();  // then v is in the bias, not applied to x
  auto slot_table = [&]() { return slots.has_value() ? *slots : make_slots(h, H, stream); };

  if (path == Path::kDecode) {
    auto y = at::empty({N, D_out}, x.options());
    const bool affine = A.has_value() || !folded;  // x' differs from x
    const at::Tensor st = affine ? slot_table() : at::Tensor();
    const int32_t* sp = affine ? st.data_ptr<int32_t>() : nullptr;
    if (folded) {
      ck::decode_gemv(t, matrix(x), matrix(weight), nullptr, 0, bias_fold_acc->data_ptr<float>(), y.data_ptr(), N, C,
                      D_out, sp, K, d, ptr_or_null(A_acc), nullptr, stream);
    } else {
      ck::decode_gemv(t, matrix(x), matrix(weight), ptr_or_null(b), b_stride, nullptr, y.data_ptr(), N, C, D_out, sp,
                      K, d, ptr_or_null(A_acc), ptr_or_null(v_acc), stream);
    }
    return y;
  }

  if (path == Path::kMaterialize) {
    const at::Tensor st = slot_table();
    auto xp = at::empty({N, C}, x.options());
    ck::materialize(t, matrix(x), xp.data_ptr(), N, C, st.data_ptr<int32_t>(), K, d, ptr_or_null(A_acc),
                    folded ? nullptr : ptr_or_null(v_acc), stream);
    return at::linear(xp, weight, folded ? *bias_fold : b);
  }

  // Path::kGemm
  at::Tensor b_eff = b;
  if (folded) {
    b_eff = *bias_fold;
  } else if (v.has_value()) {
    b_eff = at::empty({D_out}, x.options());  // b + v W_S^T (float accumulation, rounded once), computed now
    ck::bias_row(t, matrix(weight), ptr_or_null(b), b_stride, nullptr, b_eff.data_ptr(), D_out, C, hp, K, d,
                 v_acc.data_ptr(), stream);
  }
  at::Tensor y = at::linear(x, weight, b_eff);
  if (A.has_value()) {
    auto xa = at::empty({N, K * d}, x.options());  // x_S * A, the thin GEMM's operand
    ck::gather_scale(t, matrix(x), xa.data_ptr(), N, C, hp, K, d, A_acc.data_ptr(), stream);
    y.addmm_(xa, (weight_sel.has_value() ? *weight_sel : selected_weight(weight, h, d)).t());
  }
  return y;
}

at::Tensor head_slots_cuda(const at::Tensor& heads, int64_t num_heads) {
  TORCH_CHECK(heads.dim() == 1 && heads.scalar_type() == at::kLong, "heads must be a 1-D int64 tensor, got ",
              heads.dim(), "-D ", heads.scalar_type());
  check_on_cuda(heads, "heads", "head_slots_cuda");
  TORCH_CHECK(num_heads > 0 && num_heads <= ck::kMaxIndex, "num_heads must be in [1, 2^31), got ", num_heads);
  TORCH_CHECK(heads.size(0) <= num_heads, "heads has ", heads.size(0), " entries but there are only ", num_heads,
              " heads");
  const c10::cuda::CUDAGuard guard(heads.device());
  return make_slots(heads, num_heads, c10::cuda::getCurrentCUDAStream().stream());
}

at::Tensor selected_weight_cuda(const at::Tensor& weight, const at::Tensor& heads, int64_t head_dim) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [D_out, H*head_dim], got ", weight.dim(), "-D");
  TORCH_CHECK(heads.dim() == 1 && heads.scalar_type() == at::kLong, "heads must be a 1-D int64 tensor");
  TORCH_CHECK(head_dim > 0 && weight.size(1) % head_dim == 0, "weight has ", weight.size(1),
              " columns, not a multiple of head_dim ", head_dim);
  check_on_cuda(weight, "weight", "selected_weight_cuda");
  TORCH_CHECK(heads.device() == weight.device(), "heads is on ", heads.device(), " but weight is on ",
              weight.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  return selected_weight(weight, heads.contiguous(), head_dim);
}

std::tuple<at::Tensor, at::Tensor> folded_bias_cuda(const at::Tensor& weight, const OptTensor& bias,
                                                    const at::Tensor& heads, const at::Tensor& v, int64_t head_dim) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [D_out, H*head_dim], got ", weight.dim(), "-D");
  // check_inputs on a zero-row x of weight's width and dtype: every check of the forward, without data.
  const at::Tensor x0 = at::empty({0, weight.size(1)}, weight.options());
  check_inputs(x0, weight, bias, heads, std::nullopt, v, head_dim);
  check_on_cuda(weight, "weight", "folded_bias_cuda");
  const int64_t C = weight.size(1), D_out = weight.size(0), K = heads.size(0), d = head_dim;
  check_index_math(C, D_out);
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto acc = acc_type(weight.scalar_type());
  at::Tensor fold_acc = at::empty({D_out}, weight.options().dtype(acc));
  at::Tensor fold_x = acc == weight.scalar_type() ? fold_acc : at::empty({D_out}, weight.options());
  if (K == 0) {
    if (bias.has_value()) {
      fold_acc.copy_(*bias);
      if (fold_x.data_ptr() != fold_acc.data_ptr()) fold_x.copy_(*bias);
    } else {
      fold_acc.zero_();
      fold_x.zero_();
    }
    return {fold_x, fold_acc};
  }
  const at::Tensor h = heads.contiguous();
  const at::Tensor v_acc = v.to(acc).contiguous();
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  ck::bias_row(kernel_dtype(weight), matrix(weight), ptr_or_null(b), b.defined() ? b.stride(0) : 0,
               fold_acc.data_ptr(), fold_x.data_ptr() == fold_acc.data_ptr() ? nullptr : fold_x.data_ptr(), D_out, C,
               h.data_ptr<int64_t>(), K, d, v_acc.data_ptr(), stream);
  return {fold_x, fold_acc};
}

std::string forward_path_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t K, int64_t head_dim, bool has_A,
                              bool has_v) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) && head_dim > 0,
              "forward_path_cuda takes x [N, C], weight [D_out, C] and a positive head_dim");
  switch (choose_path(x, weight, K, head_dim, has_A, has_v)) {
    case Path::kLinear:
      return "linear";
    case Path::kDecode:
      return "decode";
    case Path::kMaterialize:
      return "materialize";
    case Path::kGemm:
      return "gemm";
  }
  return "gemm";
}

Grads backward_cuda(const at::Tensor& dy_in, const OptTensor& x_sel, const at::Tensor& weight, const at::Tensor& heads,
                    const OptTensor& A, int64_t head_dim, bool need_dx, bool need_dA, bool need_dv,
                    const OptTensor& weight_sel) {
  check_backward_inputs(dy_in, x_sel, weight, heads, A, head_dim, need_dA);
  check_on_cuda(dy_in, "dy", "backward_cuda");
  TORCH_CHECK(heads.device() == dy_in.device(), "heads is on ", heads.device(), " but dy is on ", dy_in.device());
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor dy = dy_in.contiguous();
  const int64_t N = dy.size(0), C = weight.size(1), D_out = weight.size(0), K = heads.size(0), d = head_dim;
  const int64_t KD = K * d;
  check_index_math(C, D_out);
  if (weight_sel.has_value()) {
    TORCH_CHECK(weight_sel->dim() == 2 && weight_sel->size(0) == D_out && weight_sel->size(1) == KD &&
                    weight_sel->scalar_type() == weight.scalar_type() && weight_sel->device() == weight.device(),
                "weight_sel must be weight's selected columns [D_out, K*head_dim] = [", D_out, ", ", KD, "] of ",
                weight.scalar_type(), " on ", weight.device(), ", got ", weight_sel->scalar_type(), " ",
                weight_sel->sizes(), " on ", weight_sel->device());
  }
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
    at::Tensor g_sel = at::mm(dy, weight_sel.has_value() ? *weight_sel : selected_weight(weight, h, d));  // [N, K*d]
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
