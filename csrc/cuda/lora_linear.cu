// lora_linear, CUDA: the "allowed first step" of specs/kernels.md §5 -- U = X A^T (cuBLAS),
// Y = addmm(b, X, W^T), then Y += s U B^T accumulated into the same output buffer, so Y is
// written once by the base GEMM and read+written once more by the low-rank update. This is a
// named exception to "no ATen chains": a CUTLASS/Triton epilogue fusion is future work.
// The implementation is shared with the CPU (csrc/lora_linear.cpp); ATen GEMMs run on the
// current stream of the input's device.
#include <torch/library.h>
#include "../checks.h"
#include "common.cuh"

namespace rar {
namespace {

at::Tensor lora_linear_cuda(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& b,
                            const at::Tensor& A, const at::Tensor& B, double scale) {
  c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_impl(x, W, b, A, B, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(const at::Tensor& g, const at::Tensor& x,
                                                                         const at::Tensor& W, const at::Tensor& A,
                                                                         const at::Tensor& B, double scale,
                                                                         bool need_dx) {
  c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_backward_impl(g, x, W, A, B, scale, need_dx);
}

}  // namespace

TORCH_LIBRARY_IMPL(rar, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace rar
