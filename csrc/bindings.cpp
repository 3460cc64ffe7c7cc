// lofit_fast._C: the torch ops lofit_fast::head_affine_fwd / head_affine_bwd (CPU kernels always, CUDA
// kernels when built with CUDA) and the same functions as plain pybind11 functions.
#include <torch/extension.h>
#include <torch/library.h>

#include "lofit.h"

namespace {

// The torch op returns three tensors always (fake tensors and compiled graphs cannot return None for a
// `Tensor` output): a gradient that was not asked for comes back as an empty tensor, which
// lofit_fast/ops/cpp_backend.py turns back into None.
using FixedGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

FixedGrads fill_missing(const lofit::Grads& g, const at::Tensor& dy) {
  const auto acc = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto or_empty = [](const lofit::OptTensor& t, const at::TensorOptions& opts) {
    return t.has_value() && t->defined() ? *t : at::empty({0}, opts);
  };
  return {or_empty(std::get<0>(g), dy.options()), or_empty(std::get<1>(g), dy.options().dtype(acc)),
          or_empty(std::get<2>(g), dy.options().dtype(acc))};
}

// The ops' trailing optional arguments are operands the CUDA kernels can take precomputed (lofit.h); the CPU
// kernels compute everything themselves and ignore them.
at::Tensor forward_cpu_op(const at::Tensor& x, const at::Tensor& weight, const lofit::OptTensor& bias,
                          const at::Tensor& heads, const lofit::OptTensor& A, const lofit::OptTensor& v,
                          int64_t head_dim, const lofit::OptTensor& /*slots*/, const lofit::OptTensor& /*weight_sel*/,
                          const lofit::OptTensor& /*bias_fold*/, const lofit::OptTensor& /*bias_fold_acc*/) {
  return lofit::forward_cpu(x, weight, bias, heads, A, v, head_dim);
}

FixedGrads backward_cpu_op(const at::Tensor& dy, const lofit::OptTensor& x_sel, const at::Tensor& weight,
                           const at::Tensor& heads, const lofit::OptTensor& A, int64_t head_dim, bool need_dx,
                           bool need_dA, bool need_dv, const lofit::OptTensor& /*weight_sel*/) {
  return fill_missing(lofit::backward_cpu(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv), dy);
}

FixedGrads rows_backward_cpu_op(const at::Tensor& dy, const lofit::OptTensor& x_sel, const at::Tensor& weight,
                                const at::Tensor& heads, const lofit::OptTensor& A, const at::Tensor& row_ids,
                                int64_t head_dim, int64_t n_adapters, bool need_dx, bool need_dA, bool need_dv,
                                const lofit::OptTensor& weight_sel) {
  return fill_missing(lofit::rows_backward_cpu(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx,
                                               need_dA, need_dv, weight_sel),
                      dy);
}

#ifdef LOFIT_WITH_CUDA
FixedGrads rows_backward_cuda_op(const at::Tensor& dy, const lofit::OptTensor& x_sel, const at::Tensor& weight,
                                 const at::Tensor& heads, const lofit::OptTensor& A, const at::Tensor& row_ids,
                                 int64_t head_dim, int64_t n_adapters, bool need_dx, bool need_dA, bool need_dv,
                                 const lofit::OptTensor& weight_sel) {
  return fill_missing(lofit::rows_backward_cuda(dy, x_sel, weight, heads, A, row_ids, head_dim, n_adapters, need_dx,
                                                need_dA, need_dv, weight_sel),
                      dy);
}

FixedGrads backward_cuda_op(const at::Tensor& dy, const lofit::OptTensor& x_sel, const at::Tensor& weight,
                            const at::Tensor& heads, const lofit::OptTensor& A, int64_t head_dim, bool need_dx,
                            bool need_dA, bool need_dv, const lofit::OptTensor& weight_sel) {
  return fill_missing(
      lofit::backward_cuda(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv, weight_sel), dy);
}
#endif

}  // namespace

TORCH_LIBRARY(lofit_fast, m) {
  m.def("head_affine_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor heads, Tensor? A, Tensor? v, "
        "int head_dim, Tensor? slots=None, Tensor? weight_sel=None, Tensor? bias_fold=None, "
        "Tensor? bias_fold_acc=None) -> Tensor");
  m.def("head_affine_bwd(Tensor dy, Tensor? x_sel, Tensor weight, Tensor heads, Tensor? A, int head_dim, "
        "bool need_dx, bool need_dA, bool need_dv, Tensor? weight_sel=None) -> (Tensor, Tensor, Tensor)");
  // Per-row tables (lofit.h): A, v [n_adapters, K, d], row_ids int64 [N] (-1 = none).
  m.def("head_affine_rows_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor heads, Tensor? A, Tensor? v, "
        "Tensor row_ids, int head_dim, Tensor? weight_sel=None, Tensor? offset_table=None) -> Tensor");
  m.def("head_affine_rows_bwd(Tensor dy, Tensor? x_sel, Tensor weight, Tensor heads, Tensor? A, Tensor row_ids, "
        "int head_dim, int n_adapters, bool need_dx, bool need_dA, bool need_dv, Tensor? weight_sel=None) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lofit_fast, CPU, m) {
  m.impl("head_affine_fwd", &forward_cpu_op);
  m.impl("head_affine_bwd", &backward_cpu_op);
  m.impl("head_affine_rows_fwd", &lofit::rows_forward_cpu);
  m.impl("head_affine_rows_bwd", &rows_backward_cpu_op);
}

#ifdef LOFIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lofit_fast, CUDA, m) {
  m.impl("head_affine_fwd", &lofit::forward_cuda);
  m.impl("head_affine_bwd", &backward_cuda_op);
  m.impl("head_affine_rows_fwd", &lofit::rows_forward_cuda);
  m.impl("head_affine_rows_bwd", &rows_backward_cuda_op);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lofit_fast native kernels: per-head scale and offset inside the o_proj GEMM";
  m.def("forward_cpu", &lofit::forward_cpu, "head-affine linear forward (CPU)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("heads"), py::arg("A"), py::arg("v"), py::arg("head_dim"));
  m.def("backward_cpu", &lofit::backward_cpu, "head-affine linear backward (CPU)", py::arg("dy"), py::arg("x_sel"),
        py::arg("weight"), py::arg("heads"), py::arg("A"), py::arg("head_dim"), py::arg("need_dx"),
        py::arg("need_dA"), py::arg("need_dv"));
#ifdef LOFIT_WITH_CUDA
  m.def("forward_cuda", &lofit::forward_cuda, "head-affine linear forward (CUDA)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("heads"), py::arg("A"), py::arg("v"), py::arg("head_dim"),
        py::arg("slots") = py::none(), py::arg("weight_sel") = py::none(), py::arg("bias_fold") = py::none(),
        py::arg("bias_fold_acc") = py::none());
  m.def("backward_cuda", &lofit::backward_cuda, "head-affine linear backward (CUDA)", py::arg("dy"),
        py::arg("x_sel"), py::arg("weight"), py::arg("heads"), py::arg("A"), py::arg("head_dim"),
        py::arg("need_dx"), py::arg("need_dA"), py::arg("need_dv"), py::arg("weight_sel") = py::none());
  // The prepared operands (lofit.h), built once per parameter version by lofit_fast/ops/cuda_backend.py.
  m.def("head_slots_cuda", &lofit::head_slots_cuda, "int32 [num_heads]: k for heads[k], -1 for other heads",
        py::arg("heads"), py::arg("num_heads"));
  m.def("selected_weight_cuda", &lofit::selected_weight_cuda, "weight[:, selected columns] [D_out, K*head_dim]",
        py::arg("weight"), py::arg("heads"), py::arg("head_dim"));
  m.def("folded_bias_cuda", &lofit::folded_bias_cuda,
        "(bias + v W_S^T in weight's dtype, the same in float32 / float64)", py::arg("weight"), py::arg("bias"),
        py::arg("heads"), py::arg("v"), py::arg("head_dim"));
  m.def("forward_path_cuda", &lofit::forward_path_cuda,
        "the forward path for these operands: linear, decode, materialize or gemm", py::arg("x"), py::arg("weight"),
        py::arg("K"), py::arg("head_dim"), py::arg("has_A"), py::arg("has_v"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
