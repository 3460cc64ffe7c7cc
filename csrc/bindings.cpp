// pybind11 module lofit_fast._C: the CPU kernels always, the CUDA kernels when built with CUDA.
#include "lofit.h"

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
