// lora_linear, CPU (and the shared implementation the CUDA file registers too): the "allowed
// first step" of specs/kernels.md §5. U = X A^T (M x r); Y = addmm(b, X, W^T); Y += s U B^T in
// place, so Y is one buffer and the low-rank term costs one extra read+write of Y instead of the
// 3-4 extra M x N passes of the unfused peft path. Backward (W, b frozen), U recomputed:
//   G = dY B; dX = dY W + s G A; dA = s G^T X; dB = s dY^T U.
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include "checks.h"

namespace rar {

at::Tensor lora_linear_impl(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& b,
                            const at::Tensor& A, const at::Tensor& B, double scale) {
  check_lora_linear(x, W, b, A, B);
  // the wrapper already applied autocast; nested ATen GEMMs must not re-cast (in-place addmm_ would mix dtypes)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t N = W.size(0), K = W.size(1);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  auto x2 = x.reshape({-1, K});
  auto U = at::mm(x2, A.t());
  auto Y = b.has_value() ? at::addmm(*b, x2, W.t()) : at::mm(x2, W.t());
  Y.addmm_(U, B.t(), /*beta=*/1.0, /*alpha=*/scale);
  return Y.view(out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_impl(const at::Tensor& g, const at::Tensor& x,
                                                                         const at::Tensor& W, const at::Tensor& A,
                                                                         const at::Tensor& B, double scale,
                                                                         bool need_dx) {
  check_lora_linear(x, W, std::nullopt, A, B);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && g.size(-1) == N && g.numel() / std::max<int64_t>(N, 1) ==
                                                                             x.numel() / std::max<int64_t>(K, 1),
              "rar::lora_linear_backward: grad_out: got ", g.sizes(), " ", g.scalar_type(), ", expected (..., ", N,
              ") matching x ", x.sizes(), " ", x.scalar_type());
  check_same_device("lora_linear_backward", "grad_out", g, x);
  auto g2 = g.reshape({-1, N});
  auto x2 = x.reshape({-1, K});
  auto G = at::mm(g2, B);                                                   // M x r
  auto dA = at::addmm(at::zeros_like(A), G.t(), x2, /*beta=*/0.0, /*alpha=*/scale);        // r x K
  auto U = at::mm(x2, A.t());                                               // M x r (recomputed)
  auto dB = at::addmm(at::zeros_like(B), g2.t(), U, /*beta=*/0.0, /*alpha=*/scale);        // N x r
  at::Tensor dx;
  if (need_dx) {
    dx = at::mm(g2, W);
    dx.addmm_(G, A, /*beta=*/1.0, /*alpha=*/scale);
    dx = dx.view(x.sizes());
  } else {
    dx = at::empty({0}, x.options());
  }
  return {dx, dA, dB};
}

namespace {

// CPU: half types run their GEMMs in fp32 (fp32 accumulation as the spec asks; CPUs without bf16/f16
// matrix units run ATen's half GEMMs many times slower than fp32 MKL), then cast back.
bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }
at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }

at::Tensor lora_linear_cpu(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& b,
                           const at::Tensor& A, const at::Tensor& B, double scale) {
  check_lora_linear(x, W, b, A, B);
  if (!is_half(x)) return lora_linear_impl(x, W, b, A, B, scale);
  std::optional<at::Tensor> bf = b.has_value() ? std::optional<at::Tensor>(f32(*b)) : std::nullopt;
  return lora_linear_impl(f32(x), f32(W), bf, f32(A), f32(B), scale).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(const at::Tensor& g, const at::Tensor& x,
                                                                        const at::Tensor& W, const at::Tensor& A,
                                                                        const at::Tensor& B, double scale,
                                                                        bool need_dx) {
  if (!is_half(x) || g.scalar_type() != x.scalar_type()) return lora_linear_backward_impl(g, x, W, A, B, scale, need_dx);
  check_lora_linear(x, W, std::nullopt, A, B);
  auto [dx, dA, dB] = lora_linear_backward_impl(f32(g), f32(x), f32(W), f32(A), f32(B), scale, need_dx);
  const auto dt = x.scalar_type();
  return {dx.to(dt), dA.to(dt), dB.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rar, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace rar
