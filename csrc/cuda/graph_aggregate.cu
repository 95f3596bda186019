// graph_aggregate, CUDA. out[n,c,t,w] = sum_k sum_v x[n,k,c,t,v] A[k,v,w].
// Forward: a block keeps A (or A[n] per sample) in shared memory as fp32 (fp64 for fp64 inputs),
// loops over tiles of rows (c, t) of one sample: loads the tile as K coalesced T*V segments into
// shared memory (x is read once), does the small register GEMM, and writes contiguous T*W rows.
// grad_x is the same kernel shape with A^T. grad_A is a deterministic two-pass reduction: per-block
// fp32 partials over fixed row chunks, then a fixed-order sum (no float atomics).
// Graphs whose A does not fit in shared memory (K*V*W too large) use an internal GEMM (the named
// exception in specs/kernels.md §3).
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include "../checks.h"
#include "common.cuh"

namespace rar {
namespace {

constexpr int64_t kSmemBudget = 48 * 1024;
constexpr int kMaxRowTile = 64;

struct XStrides { int64_t n, k, c, t, v; };

template <typename acc_t>
int row_tile(int64_t fixed_elems, int64_t per_row_elems) {
  const int64_t left = kSmemBudget / (int64_t)sizeof(acc_t) - fixed_elems;
  if (per_row_elems <= 0) return kMaxRowTile;
  return (int)std::min<int64_t>(kMaxRowTile, left / per_row_elems);
}

// ---- forward ----
template <typename scalar_t, typename a_t, typename acc_t>
__global__ void ga_forward_kernel(const scalar_t* __restrict__ x, XStrides xs, const a_t* __restrict__ A,
                                  int64_t a_sn, bool per_sample, scalar_t* __restrict__ out, int64_t N, int K,
                                  int64_t C, int64_t T, int V, int W, int TR) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* As = reinterpret_cast<acc_t*>(smem_raw);  // [K*V][W]
  acc_t* Xs = As + (int64_t)K * V * W;              // [TR][K*V]
  const int KV = K * V;
  const int64_t R = (int64_t)C * T;
  const int64_t tiles = (R + TR - 1) / TR;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const a_t* An = A + (per_sample ? n * a_sn : 0);
    __syncthreads();
    for (int i = threadIdx.x; i < KV * W; i += blockDim.x) As[i] = static_cast<acc_t>(An[i]);  // A contiguous
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t r0 = tile * TR;
      const int rows = (int)std::min<int64_t>(TR, R - r0);
      __syncthreads();
      // K coalesced segments of rows*V elements (contiguous when x is)
      for (int i = threadIdx.x; i < K * rows * V; i += blockDim.x) {
        const int k = i / (rows * V), rem = i % (rows * V), r = rem / V, v = rem % V;
        const int64_t row = r0 + r, c = row / T, t = row % T;
        Xs[r * KV + k * V + v] = static_cast<acc_t>(x[n * xs.n + k * xs.k + c * xs.c + t * xs.t + v * xs.v]);
      }
      __syncthreads();
      scalar_t* o = out + (n * R + r0) * W;
      for (int i = threadIdx.x; i < rows * W; i += blockDim.x) {
        const int r = i / W, w = i % W;
        const acc_t* xr = Xs + r * KV;
        acc_t acc = 0;
        for (int kv = 0; kv < KV; ++kv) acc += xr[kv] * As[kv * W + w];
        o[i] = static_cast<scalar_t>(acc);
      }
    }
  }
}

// ---- grad_x: dX[n,k,c,t,v] = sum_w g[n,c,t,w] A[k,v,w] ----
template <typename scalar_t, typename a_t, typename acc_t>
__global__ void ga_grad_x_kernel(const scalar_t* __restrict__ g, XStrides gs, const a_t* __restrict__ A, int64_t a_sn,
                                 bool per_sample, scalar_t* __restrict__ dx, int64_t N, int K, int64_t C, int64_t T,
                                 int V, int W, int TR) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* At = reinterpret_cast<acc_t*>(smem_raw);  // [W][K*V]
  acc_t* Gs = At + (int64_t)K * V * W;              // [TR][W]
  const int KV = K * V;
  const int64_t R = (int64_t)C * T;
  const int64_t tiles = (R + TR - 1) / TR;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const a_t* An = A + (per_sample ? n * a_sn : 0);
    __syncthreads();
    for (int i = threadIdx.x; i < KV * W; i += blockDim.x) {
      const int kv = i / W, w = i % W;
      At[w * KV + kv] = static_cast<acc_t>(An[i]);
    }
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t r0 = tile * TR;
      const int rows = (int)std::min<int64_t>(TR, R - r0);
      __syncthreads();
      for (int i = threadIdx.x; i < rows * W; i += blockDim.x) {
        const int r = i / W, w = i % W;
        const int64_t row = r0 + r, c = row / T, t = row % T;
        Gs[i] = static_cast<acc_t>(g[n * gs.n + c * gs.c + t * gs.t + w * gs.v]);
      }
      __syncthreads();
      for (int i = threadIdx.x; i < K * rows * V; i += blockDim.x) {
        const int k = i / (rows * V), rem = i % (rows * V), r = rem / V, v = rem % V;
        const acc_t* gr = Gs + r * W;
        acc_t acc = 0;
        for (int w = 0; w < W; ++w) acc += gr[w] * At[w * KV + k * V + v];
        dx[((n * K + k) * R + r0 + r) * V + v] = static_cast<scalar_t>(acc);
      }
    }
  }
}

// ---- grad_A pass 1: partial[ps][chunk][e] over a fixed chunk of rows ----
constexpr int kEntriesPerThread = 8;

template <typename scalar_t, typename acc_t>
__global__ void ga_grad_A_partial_kernel(const scalar_t* __restrict__ g, XStrides gs, const scalar_t* __restrict__ x,
                                         XStrides xs, acc_t* __restrict__ partial, int64_t N, int K, int64_t C,
                                         int64_t T, int V, int W, int TR, bool per_sample, int64_t chunk_rows,
                                         int chunks) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* Xs = reinterpret_cast<acc_t*>(smem_raw);  // [TR][K*V]
  acc_t* Gs = Xs + (int64_t)TR * K * V;             // [TR][W]
  const int KV = K * V;
  const int64_t KVW = (int64_t)KV * W;
  const int64_t R = (int64_t)C * T;
  const int64_t ps = blockIdx.z;                       // sample (per_sample) or 0
  const int64_t rows_total = per_sample ? R : N * R;   // rows of this reduction
  const int chunk = blockIdx.x;
  const int64_t e0 = (int64_t)blockIdx.y * blockDim.x * kEntriesPerThread;
  acc_t acc[kEntriesPerThread];
#pragma unroll
  for (int j = 0; j < kEntriesPerThread; ++j) acc[j] = 0;
  const int64_t beg = chunk * chunk_rows, end = std::min<int64_t>(rows_total, beg + chunk_rows);
  for (int64_t r0 = beg; r0 < end; r0 += TR) {
    const int rows = (int)std::min<int64_t>(TR, end - r0);
    __syncthreads();
    for (int i = threadIdx.x; i < K * rows * V; i += blockDim.x) {
      const int k = i / (rows * V), rem = i % (rows * V), r = rem / V, v = rem % V;
      const int64_t row = r0 + r;
      const int64_t n = per_sample ? ps : row / R, rr = per_sample ? row : row % R, c = rr / T, t = rr % T;
      Xs[r * KV + k * V + v] = static_cast<acc_t>(x[n * xs.n + k * xs.k + c * xs.c + t * xs.t + v * xs.v]);
    }
    for (int i = threadIdx.x; i < rows * W; i += blockDim.x) {
      const int r = i / W, w = i % W;
      const int64_t row = r0 + r;
      const int64_t n = per_sample ? ps : row / R, rr = per_sample ? row : row % R, c = rr / T, t = rr % T;
      Gs[i] = static_cast<acc_t>(g[n * gs.n + c * gs.c + t * gs.t + w * gs.v]);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kEntriesPerThread; ++j) {
      const int64_t e = e0 + threadIdx.x + (int64_t)j * blockDim.x;
      if (e < KVW) {
        const int kv = (int)(e / W), w = (int)(e % W);
        acc_t s = 0;
        for (int r = 0; r < rows; ++r) s += Xs[r * KV + kv] * Gs[r * W + w];
        acc[j] += s;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kEntriesPerThread; ++j) {
    const int64_t e = e0 + threadIdx.x + (int64_t)j * blockDim.x;
    if (e < KVW) partial[(ps * chunks + chunk) * KVW + e] = acc[j];
  }
}

// ---- grad_A pass 2: fixed-order sum over chunks ----
template <typename acc_t, typename out_t>
__global__ void ga_grad_A_reduce_kernel(const acc_t* __restrict__ partial, out_t* __restrict__ dA, int64_t PS,
                                        int chunks, int64_t KVW) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < PS * KVW; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ps = i / KVW, e = i % KVW;
    acc_t s = 0;
    for (int ch = 0; ch < chunks; ++ch) s += partial[(ps * chunks + ch) * KVW + e];
    dA[i] = static_cast<out_t>(s);
  }
}

XStrides strides5(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)}; }
XStrides strides4(const at::Tensor& g) { return {g.stride(0), 0, g.stride(1), g.stride(2), g.stride(3)}; }

unsigned int grid_y(int64_t N) { return (unsigned int)std::max<int64_t>(1, std::min<int64_t>(N, 65535)); }
unsigned int grid_x_tiles(int64_t tiles, int64_t N) {
  // enough blocks to fill an H100/H200 a few times over; each block loads A once
  const int64_t want = std::max<int64_t>(1, 1056 / std::max<int64_t>(N, 1));
  return (unsigned int)std::max<int64_t>(1, std::min<int64_t>(tiles, want));
}

// The forward and grad_x passes share one launch: every (c, t) row of a sample goes through the
// K*V x W matrix A (forward: a row of K*V inputs -> W outputs) or A^T (grad_x: W -> K*V). A and a
// tile of TR input rows sit in shared memory. Returns false when A plus one row do not fit; the
// callers then use the internal GEMM.
template <typename scalar_t>
bool launch_rows(bool grad_x, const at::Tensor& in, XStrides s, const at::Tensor& A, at::Tensor& out, int64_t N,
                 int64_t K, int64_t C, int64_t T, int64_t V, int64_t W) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t per_row = grad_x ? W : K * V;  // input values of one row held in shared memory
  const int TR = row_tile<acc_t>(K * V * W, per_row);
  if (TR < 1) return false;
  const int64_t tiles = (C * T + TR - 1) / TR;
  const size_t smem = ((size_t)K * V * W + (size_t)TR * per_row) * sizeof(acc_t);
  const dim3 grid(grid_x_tiles(tiles, N), grid_y(N));
  const bool per_sample = A.dim() == 4;
  const int64_t a_sn = per_sample ? A.stride(0) : 0;
  auto stream = cuda::current_stream();
  auto go = [&](auto a_zero) {  // a_t = the dtype of A: x's, or fp32 (AMP)
    using a_t = decltype(a_zero);
    auto* kernel = grad_x ? &ga_grad_x_kernel<scalar_t, a_t, acc_t> : &ga_forward_kernel<scalar_t, a_t, acc_t>;
    kernel<<<grid, cuda::kThreads, smem, stream>>>(in.data_ptr<scalar_t>(), s, A.data_ptr<a_t>(), a_sn, per_sample,
                                                   out.data_ptr<scalar_t>(), N, (int)K, C, T, (int)V, (int)W, TR);
  };
  if (A.scalar_type() == in.scalar_type()) go(scalar_t(0));
  else go(0.0f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// internal-GEMM exception for graphs too large for shared memory
at::Tensor ga_forward_gemm(const at::Tensor& x, const at::Tensor& A) {
  // run in fp32/fp64 even when the caller is under autocast (the fused path never downcasts either)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto cd = (x.scalar_type() == at::kDouble || A.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const int64_t N = x.size(0), K = x.size(1), C = x.size(2), T = x.size(3), V = x.size(4), W = A.size(-1);
  auto xc = x.to(cd).permute({0, 2, 3, 1, 4}).reshape({N, C * T, K * V});
  auto Ac = A.to(cd);
  auto out = A.dim() == 3 ? at::matmul(xc, Ac.reshape({K * V, W})) : at::bmm(xc, Ac.reshape({N, K * V, W}));
  return out.view({N, C, T, W}).to(x.scalar_type());
}

// dX[n,k] = g[n] (CT x W) @ A[k]^T, in fp32/fp64 even under autocast
at::Tensor ga_grad_x_gemm(const at::Tensor& g, const at::Tensor& A) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t N = g.size(0), C = g.size(1), T = g.size(2), W = g.size(3), K = A.size(-3), V = A.size(-2);
  auto cd = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto g3 = g.to(cd).reshape({N, 1, C * T, W});
  auto At = A.to(cd).transpose(-1, -2);  // (K,W,V) or (N,K,W,V)
  auto r = at::matmul(g3, A.dim() == 4 ? At : At.unsqueeze(0));
  return r.view({N, K, C, T, V}).to(g.scalar_type());
}

at::Tensor graph_aggregate_cuda(const at::Tensor& x, const at::Tensor& A_in) {
  check_graph_aggregate(x, A_in);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), K = x.size(1), C = x.size(2), T = x.size(3), V = x.size(4), W = A_in.size(-1);
  auto out = at::empty({N, C, T, W}, x.options());
  if (out.numel() == 0) return out;
  if (K * V == 0) return out.zero_();
  auto A = A_in.contiguous();
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "graph_aggregate", [&] {
    launched = launch_rows<scalar_t>(/*grad_x=*/false, x, strides5(x), A, out, N, K, C, T, V, W);
  });
  return launched ? out : ga_forward_gemm(x, A);
}

at::Tensor graph_aggregate_grad_x_cuda(const at::Tensor& g, const at::Tensor& A_in) {
  check_graph_aggregate_grad_x(g, A_in);
  c10::cuda::CUDAGuard guard(g.device());
  const int64_t N = g.size(0), C = g.size(1), T = g.size(2), W = g.size(3);
  const int64_t K = A_in.size(-3), V = A_in.size(-2);
  auto dx = at::empty({N, K, C, T, V}, g.options());
  if (dx.numel() == 0) return dx;
  if (W == 0) return dx.zero_();
  auto A = A_in.contiguous();
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "graph_aggregate_grad_x", [&] {
    launched = launch_rows<scalar_t>(/*grad_x=*/true, g, strides4(g), A, dx, N, K, C, T, V, W);
  });
  return launched ? dx : ga_grad_x_gemm(g, A);
}

at::Tensor graph_aggregate_grad_A_cuda(const at::Tensor& g, const at::Tensor& x, bool per_sample) {
  check_graph_aggregate_grad_A(g, x);
  c10::cuda::CUDAGuard guard(g.device());
  const int64_t N = x.size(0), K = x.size(1), C = x.size(2), T = x.size(3), V = x.size(4), W = g.size(3);
  const auto cd = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dA = per_sample ? at::empty({N, K, V, W}, g.options().dtype(cd)) : at::empty({K, V, W}, g.options().dtype(cd));
  if (dA.numel() == 0) return dA;
  if (N == 0 || C * T == 0) return dA.zero_();
  const int64_t KVW = K * V * W, R = C * T;
  const int64_t PS = per_sample ? N : 1;
  const int64_t rows_total = per_sample ? R : N * R;
  auto stream = cuda::current_stream();
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "graph_aggregate_grad_A", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const int TR = std::min(32, row_tile<acc_t>(0, K * V + W));
    if (TR < 1 || PS > 65535) return;
    // a fixed number of row chunks (depends on shapes only -> bitwise reproducible)
    const int64_t want = per_sample ? std::max<int64_t>(1, 512 / N) : 512;
    const int chunks = (int)std::max<int64_t>(1, std::min<int64_t>(want, (rows_total + TR - 1) / TR));
    const int64_t chunk_rows = (rows_total + chunks - 1) / chunks;
    const int64_t per_block = (int64_t)cuda::kThreads * kEntriesPerThread;
    const int64_t ey = (KVW + per_block - 1) / per_block;
    if (ey > 65535) return;
    auto partial = at::empty({PS * chunks * KVW}, g.options().dtype(cd));
    const size_t smem = (size_t)TR * (K * V + W) * sizeof(acc_t);
    dim3 grid1(chunks, (unsigned int)ey, (unsigned int)PS);
    ga_grad_A_partial_kernel<scalar_t, acc_t><<<grid1, cuda::kThreads, smem, stream>>>(
        g.data_ptr<scalar_t>(), strides4(g), x.data_ptr<scalar_t>(), strides5(x), partial.data_ptr<acc_t>(), N, (int)K,
        C, T, (int)V, (int)W, TR, per_sample, chunk_rows, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ga_grad_A_reduce_kernel<acc_t, acc_t><<<cuda::blocks_for(PS * KVW), cuda::kThreads, 0, stream>>>(
        partial.data_ptr<acc_t>(), dA.data_ptr<acc_t>(), PS, chunks, KVW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  if (launched) return dA;
  // internal-GEMM exception (deterministic: bmm per k, then a sum over n)
  auto g3 = g.to(cd).reshape({N, R, W});
  for (int64_t k = 0; k < K; ++k) {
    auto pk = at::bmm(x.select(1, k).to(cd).reshape({N, R, V}).transpose(1, 2), g3);
    if (per_sample) dA.select(1, k).copy_(pk);
    else dA.select(0, k).copy_(pk.sum(0));
  }
  return dA;
}

}  // namespace

TORCH_LIBRARY_IMPL(rar, CUDA, m) {
  m.impl("graph_aggregate", &graph_aggregate_cuda);
  m.impl("graph_aggregate_grad_x", &graph_aggregate_grad_x_cuda);
  m.impl("graph_aggregate_grad_A", &graph_aggregate_grad_A_cuda);
}

}  // namespace rar
