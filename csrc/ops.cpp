// Schemas of the `rar` ops and the module init of `common._C` (pattern: pytorch/extension-cpp).
// Importing common._C runs the static TORCH_LIBRARY initialisers below and in the kernel files,
// which register the CPU (csrc/*.cpp) and, when built with nvcc, CUDA (csrc/cuda/*.cu) kernels.
// Fake (meta) implementations and autograd formulas are registered in Python (common/ops.py).
#include <Python.h>
#include <torch/library.h>

#ifndef RAR_BUILD_INFO
#define RAR_BUILD_INFO "unknown"
#endif

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Fused ops of the project (torch.ops.rar.*); importing registers the kernels.",
      -1,    // size
      NULL,  // methods
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == NULL) return NULL;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  PyModule_AddStringConstant(m, "BUILD_INFO", RAR_BUILD_INFO);
  return m;
}
}

TORCH_LIBRARY(rar, m) {
  m.def("static_clip(Tensor x, Tensor? frame_idx, int num_frames=-1, float[]? mean=None, float[]? std=None, "
        "float? scale=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("graph_aggregate(Tensor x, Tensor A) -> Tensor");
  m.def("graph_aggregate_grad_x(Tensor grad_out, Tensor A) -> Tensor");
  m.def("graph_aggregate_grad_A(Tensor grad_out, Tensor x, bool per_sample) -> Tensor");
  m.def("masked_gather(Tensor x, Tensor ids_keep) -> Tensor");
  m.def("masked_gather_backward(Tensor grad_out, Tensor ids_keep, SymInt L) -> Tensor");
  m.def("masked_restore(Tensor y, Tensor ids_restore, Tensor mask_token) -> Tensor");
  m.def("masked_restore_backward(Tensor grad_out, Tensor ids_restore, SymInt L_keep, bool mask_token_grad) "
        "-> (Tensor, Tensor)");
  m.def("lora_linear(Tensor x, Tensor W, Tensor? b, Tensor A, Tensor B, float scale) -> Tensor");
  m.def("lora_linear_backward(Tensor grad_out, Tensor x, Tensor W, Tensor A, Tensor B, float scale, bool need_dx) "
        "-> (Tensor, Tensor, Tensor)");
}
