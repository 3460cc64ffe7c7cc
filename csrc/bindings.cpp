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

template <lofit::Grads (*Backward)(const at::Tensor&, const lofit::OptTensor&, const at::Tensor&, const at::Tensor&,
                                   const lofit::OptTensor&, int64_t, bool, bool, bool)>
FixedGrads backward_op(const at::Tensor& dy, const lofit::OptTensor& x_sel, const at::Tensor& weight,
                       const at::Tensor& heads, const lofit::OptTensor& A, int64_t head_dim, bool need_dx,
                       bool need_dA, bool need_dv) {
  return fill_missing(Backward(dy, x_sel, weight, heads, A, head_dim, need_dx, need_dA, need_dv), dy);
}

}  // namespace

TORCH_LIBRARY(lofit_fast, m) {
  m.def("head_affine_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor heads, Tensor? A, Tensor? v, "
        "int head_dim) -> Tensor");
  m.def("head_affine_bwd(Tensor dy, Tensor? x_sel, Tensor weight, Tensor heads, Tensor? A, int head_dim, "
        "bool need_dx, bool need_dA, bool need_dv) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lofit_fast, CPU, m) {
  m.impl("head_affine_fwd", &lofit::forward_cpu);
  m.impl("head_affine_bwd", &backward_op<&lofit::backward_cpu>);
}

#ifdef LOFIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lofit_fast, CUDA, m) {
  m.impl("head_affine_fwd", &lofit::forward_cuda);
  m.impl("head_affine_bwd", &backward_op<&lofit::backward_cuda>);
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
        py::arg("bias"), py::arg("heads"), py::arg("A"), py::arg("v"), py::arg("head_dim"));
  m.def("backward_cuda", &lofit::backward_cuda, "head-affine linear backward (CUDA)", py::arg("dy"),
        py::arg("x_sel"), py::arg("weight"), py::arg("heads"), py::arg("A"), py::arg("head_dim"),
        py::arg("need_dx"), py::arg("need_dA"), py::arg("need_dv"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
