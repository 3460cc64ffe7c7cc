// Shared declarations of the lofit_fast._C extension.
//
// The op (see ../shared DESIGN and lofit_fast/ops/registry.py for the contract):
//   y = x' W^T (+ b),  x'_S = (1 + A) * x_S + v  on the columns of the selected heads S.
// forward:  x [N, H*d], weight [D_out, H*d], bias [D_out]?, heads int64 [K] sorted unique,
//           A, v [K, d] (float32 or x's dtype)?  ->  y [N, D_out] in x's dtype.
// backward: dy [N, D_out], x_sel [N, K*d]? (selected columns of x), weight, heads, A?
//           -> (dx [N, H*d]?, dA [K, d] float32?, dv [K, d] float32?)
//
// The same functions are registered as the torch ops lofit_fast::head_affine_fwd / head_affine_bwd
// (bindings.cpp), with CPU and CUDA kernels, so torch.compile and CUDA graphs see them as single ops. The ops'
// trailing optional arguments (slots, weight_sel, bias_fold, bias_fold_acc; weight_sel for the backward) are
// operands the CUDA kernels can take precomputed; the CPU kernels do not use them.
#pragma once

// ATen only (not torch/extension.h): this header is also compiled by nvcc, where pybind11 and the
// torch C++ frontend would only cost compile time.
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace lofit {

using OptTensor = std::optional<at::Tensor>;
using Grads = std::tuple<OptTensor, OptTensor, OptTensor>;

// Input checks shared by every device: every message names the argument and the problem.
void check_inputs(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& heads,
                  const OptTensor& A, const OptTensor& v, int64_t head_dim);
void check_backward_inputs(const at::Tensor& dy, const OptTensor& x_sel, const at::Tensor& weight,
                           const at::Tensor& heads, const OptTensor& A, int64_t head_dim, bool need_dA);

// Column indices of the selected heads: heads[k] * d + j, as int64 [K * d] on heads' device.
at::Tensor selected_columns(const at::Tensor& heads, int64_t head_dim);

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& heads,
                       const OptTensor& A, const OptTensor& v, int64_t head_dim);
Grads backward_cpu(const at::Tensor& dy, const OptTensor& x_sel, const at::Tensor& weight, const at::Tensor& heads,
                   const OptTensor& A, int64_t head_dim, bool need_dx, bool need_dA, bool need_dv);

// Per-row tables (many adapters in one batch): row n uses adapter row_ids[n] (int64 [N], -1 = none) of
// A, v [n_adapters, K, d]:  y[n] = x[n] W^T + (x_S[n] * A[a]) W_S^T + (v[a] W_S^T) + b.
// Optional prepared operands: weight_sel [D_out, K*d] = W_S, offset_table [n_adapters, D_out] = v W_S^T in the
// accumulation type. The backward returns dA, dv [n_adapters, K, d]: each row's gradient in its adapter's slice.
// (csrc/cpu/head_affine_rows_cpu.cpp, csrc/cuda/head_affine_rows.cu; ops lofit_fast::head_affine_rows_fwd/bwd.)
void check_rows_inputs(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& heads,
                       const OptTensor& A, const OptTensor& v, const at::Tensor& row_ids, int64_t head_dim,
                       int64_t n_adapters);
at::Tensor rows_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                            const at::Tensor& heads, const OptTensor& A, const OptTensor& v, const at::Tensor& row_ids,
                            int64_t head_dim, const OptTensor& weight_sel, const OptTensor& offset_table);
Grads rows_backward_cpu(const at::Tensor& dy, const OptTensor& x_sel, const at::Tensor& weight,
                        const at::Tensor& heads, const OptTensor& A, const at::Tensor& row_ids, int64_t head_dim,
                        int64_t n_adapters, bool need_dx, bool need_dA, bool need_dv, const OptTensor& weight_sel);

#ifdef LOFIT_WITH_CUDA
// Same contract as the CPU functions. Head values on the device are checked by the kernels
// (a device-side assert, like torch's own index ops) so that no call synchronizes with the host.
// The trailing optional arguments are operands prepared from the parameters alone, which the op otherwise
// computes on every call (see csrc/cuda/head_affine_cuda.cu; lofit_fast/ops/cuda_backend.py caches them):
//   slots          int32 [H], head -> slot (-1 unselected)            head_slots_cuda(heads, H)
//   weight_sel     [D_out, K*d] = weight[:, selected columns]          selected_weight_cuda(weight, heads, d)
//   bias_fold,     bias + v W_S^T in x's dtype and in the accumulation folded_bias_cuda(weight, bias, heads, v, d)
//   bias_fold_acc  type (float32; float64 for float64), given together, only with v
at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& heads,
                        const OptTensor& A, const OptTensor& v, int64_t head_dim, const OptTensor& slots,
                        const OptTensor& weight_sel, const OptTensor& bias_fold, const OptTensor& bias_fold_acc);
Grads backward_cuda(const at::Tensor& dy, const OptTensor& x_sel, const at::Tensor& weight, const at::Tensor& heads,
                    const OptTensor& A, int64_t head_dim, bool need_dx, bool need_dA, bool need_dv,
                    const OptTensor& weight_sel);

at::Tensor head_slots_cuda(const at::Tensor& heads, int64_t num_heads);
at::Tensor selected_weight_cuda(const at::Tensor& weight, const at::Tensor& heads, int64_t head_dim);
std::tuple<at::Tensor, at::Tensor> folded_bias_cuda(const at::Tensor& weight, const OptTensor& bias,
                                                    const at::Tensor& heads, const at::Tensor& v, int64_t head_dim);
// The forward path the op takes for these operands: "linear", "decode", "materialize" or "gemm".
at::Tensor rows_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                             const at::Tensor& heads, const OptTensor& A, const OptTensor& v, const at::Tensor& row_ids,
                             int64_t head_dim, const OptTensor& weight_sel, const OptTensor& offset_table);
Grads rows_backward_cuda(const at::Tensor& dy, const OptTensor& x_sel, const at::Tensor& weight,
                         const at::Tensor& heads, const OptTensor& A, const at::Tensor& row_ids, int64_t head_dim,
                         int64_t n_adapters, bool need_dx, bool need_dA, bool need_dv, const OptTensor& weight_sel);
std::string forward_path_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t K, int64_t head_dim, bool has_A,
                              bool has_v);
#endif

}  // namespace lofit
