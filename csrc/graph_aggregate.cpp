// graph_aggregate, CPU. The contraction out[n] = sum_k x[n,k] (C*T x V) @ A[k] (V x W) is done as
// K accumulating GEMMs (at::mm_out / addmm_) per sample into one output buffer, parallel over n.
// Unlike einsum this needs no permute copy of x. (CPU GEMMs are the allowed exception; the CUDA
// kernels in csrc/cuda/graph_aggregate.cu are hand-written.) Half types compute in fp32.
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include "checks.h"

namespace rar {
namespace {

at::ScalarType compute_dtype(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

// (N,K,C,T,V) sample n, subset k as a (C*T, V) matrix (a view when possible)
at::Tensor rows_of(const at::Tensor& x, int64_t n, int64_t k) {
  auto s = x.select(0, n).select(0, k);
  return s.reshape({s.size(0) * s.size(1), s.size(2)});
}

at::Tensor graph_aggregate_cpu(const at::Tensor& x_in, const at::Tensor& A_in) {
  check_graph_aggregate(x_in, A_in);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // fp32 GEMMs stay fp32
  const int64_t N = x_in.size(0), K = x_in.size(1), C = x_in.size(2), T = x_in.size(3);
  const int64_t W = A_in.size(-1);
  const bool per_sample = A_in.dim() == 4;
  auto cd = compute_dtype(x_in.scalar_type(), A_in.scalar_type());
  auto x = x_in.to(cd);
  auto A = A_in.to(cd).contiguous();
  auto out = at::empty({N, C * T, W}, x.options());
  if (out.numel() == 0) return out.view({N, C, T, W}).to(x_in.scalar_type());
  if (K == 0 || x.size(4) == 0) return out.zero_().view({N, C, T, W}).to(x_in.scalar_type());
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      auto o = out.select(0, n);
      for (int64_t k = 0; k < K; ++k) {
        auto Ak = per_sample ? A.select(0, n).select(0, k) : A.select(0, k);
        if (k == 0) at::mm_out(o, rows_of(x, n, k), Ak);
        else o.addmm_(rows_of(x, n, k), Ak);
      }
    }
  });
  return out.view({N, C, T, W}).to(x_in.scalar_type());
}

at::Tensor graph_aggregate_grad_x_cpu(const at::Tensor& g_in, const at::Tensor& A_in) {
  check_graph_aggregate_grad_x(g_in, A_in);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // fp32 GEMMs stay fp32
  const int64_t N = g_in.size(0), C = g_in.size(1), T = g_in.size(2), W = g_in.size(3);
  const int64_t K = A_in.size(-3), V = A_in.size(-2);
  const bool per_sample = A_in.dim() == 4;
  auto cd = compute_dtype(g_in.scalar_type(), A_in.scalar_type());
  auto g = g_in.to(cd).reshape({N, C * T, W});
  auto A = A_in.to(cd);
  auto dx = at::empty({N, K, C * T, V}, g.options());
  if (dx.numel() == 0) return dx.view({N, K, C, T, V}).to(g_in.scalar_type());
  if (W == 0) return dx.zero_().view({N, K, C, T, V}).to(g_in.scalar_type());
  at::parallel_for(0, N * K, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / K, k = i % K;
      auto Ak = per_sample ? A.select(0, n).select(0, k) : A.select(0, k);  // (V, W)
      auto o = dx.select(0, n).select(0, k);
      at::mm_out(o, g.select(0, n), Ak.t());
    }
  });
  return dx.view({N, K, C, T, V}).to(g_in.scalar_type());
}

// dA[k] = sum_n x[n,k]^T (V x C*T) @ dY[n] (C*T x W): a batched GEMM per k, then a sum over n in
// a fixed order (deterministic). Per sample, no sum. Returns fp32 for half inputs.
at::Tensor graph_aggregate_grad_A_cpu(const at::Tensor& g_in, const at::Tensor& x_in, bool per_sample) {
  check_graph_aggregate_grad_A(g_in, x_in);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // fp32 GEMMs stay fp32
  const int64_t N = x_in.size(0), K = x_in.size(1), C = x_in.size(2), T = x_in.size(3), V = x_in.size(4);
  const int64_t W = g_in.size(3);
  auto cd = compute_dtype(x_in.scalar_type(), x_in.scalar_type());
  auto g = g_in.to(cd).reshape({N, C * T, W});
  auto x = x_in.to(cd);
  auto dA = per_sample ? at::empty({N, K, V, W}, g.options()) : at::empty({K, V, W}, g.options());
  if (dA.numel() == 0) return dA;
  if (N == 0 || C * T == 0) return dA.zero_();
  for (int64_t k = 0; k < K; ++k) {
    auto xk = x.select(1, k).reshape({N, C * T, V});
    auto pk = at::bmm(xk.transpose(1, 2), g);  // (N, V, W)
    if (per_sample) dA.select(1, k).copy_(pk);
    else {
      auto dk = dA.select(0, k);
      at::sum_out(dk, pk, {0});
    }
  }
  return dA;
}

}  // namespace

TORCH_LIBRARY_IMPL(rar, CPU, m) {
  m.impl("graph_aggregate", &graph_aggregate_cpu);
  m.impl("graph_aggregate_grad_x", &graph_aggregate_grad_x_cpu);
  m.impl("graph_aggregate_grad_A", &graph_aggregate_grad_A_cpu);
}

}  // namespace rar
