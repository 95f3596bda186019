// masked_gather / masked_restore, CUDA. One warp per output row: the row's index is read once,
// the D elements are copied with 16-byte vectors (scalar fallback for unaligned rows or strided D),
// bit-exactly (copied as unsigned integers of the element size). Out-of-range indices trip a
// device-side assert (as PyTorch's index kernels do). Backward ops build an int32 inverse map and
// write every row once; the mask-token gradient is a deterministic two-pass column reduction.
#include <torch/library.h>
#include "../checks.h"
#include "common.cuh"

namespace rar {
namespace {

constexpr int kWarpsPerBlock = cuda::kThreads / 32;

struct RowSrc {  // a (N, rows, D) tensor viewed through element strides
  const char* base;
  int64_t sN, sR, sD;  // element strides
};

template <typename bits_t>
__device__ __forceinline__ void copy_row_scalar(char* dst, const char* src, int64_t D, int64_t sD, int lane) {
  bits_t* d = reinterpret_cast<bits_t*>(dst);
  const bits_t* s = reinterpret_cast<const bits_t*>(src);
  for (int64_t e = lane; e < D; e += 32) d[e] = s[e * sD];
}

__device__ __forceinline__ void copy_row_vec(char* dst, const char* src, int64_t bytes, int lane) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4* s = reinterpret_cast<const uint4*>(src);
  for (int64_t e = lane; e < bytes / 16; e += 32) d[e] = s[e];
}

template <typename bits_t>
__device__ __forceinline__ void copy_row(char* dst, const char* src, int64_t D, int64_t sD, bool vec, int lane) {
  if (vec) copy_row_vec(dst, src, D * (int64_t)sizeof(bits_t), lane);
  else copy_row_scalar<bits_t>(dst, src, D, sD, lane);
}

// out[n, j] = src[n, idx[n, j]] when idx < limit, else the mask row (restore) ; idx range [0, L)
template <typename bits_t>
__global__ void gather_rows_kernel(char* __restrict__ out, RowSrc src, const int64_t* __restrict__ ids, int64_t iN,
                                   int64_t iJ, int64_t N, int64_t J, int64_t D, int64_t L, int64_t limit,
                                   const char* __restrict__ mask, bool vec) {
  constexpr int64_t es = sizeof(bits_t);
  const int lane = threadIdx.x % 32;
  for (int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; row < N * J;
       row += (int64_t)gridDim.x * kWarpsPerBlock) {
    const int64_t n = row / J, j = row % J;
    const int64_t v = ids[n * iN + j * iJ];
    CUDA_KERNEL_ASSERT(v >= 0 && v < L && "rar::masked_*: index out of range");
    const char* s = (v < limit) ? src.base + (n * src.sN + v * src.sR) * es : mask;
    const int64_t sD = (v < limit) ? src.sD : 1;
    copy_row<bits_t>(out + row * D * es, s, D, sD, vec, lane);
  }
}

// inv[n, ids[n, j]] = j for ids < limit (inv pre-filled with -1)
__global__ void inverse_map_kernel(int32_t* __restrict__ inv, const int64_t* __restrict__ ids, int64_t iN, int64_t iJ,
                                   int64_t N, int64_t J, int64_t L, int64_t limit) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * J; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / J, j = i % J;
    const int64_t v = ids[n * iN + j * iJ];
    CUDA_KERNEL_ASSERT(v >= 0 && v < L && "rar::masked_*: index out of range");
    if (v < limit) inv[n * limit + v] = static_cast<int32_t>(j);
  }
}

// out[n, i] = g[n, inv[n, i]] or zeros
template <typename bits_t>
__global__ void rows_from_inverse_kernel(char* __restrict__ out, RowSrc g, const int32_t* __restrict__ inv, int64_t N,
                                         int64_t R, int64_t D, bool vec) {
  constexpr int64_t es = sizeof(bits_t);
  const int lane = threadIdx.x % 32;
  for (int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; row < N * R;
       row += (int64_t)gridDim.x * kWarpsPerBlock) {
    const int64_t n = row / R;
    const int32_t j = inv[row];
    char* d = out + row * D * es;
    if (j >= 0) {
      copy_row<bits_t>(d, g.base + (n * g.sN + j * g.sR) * es, D, g.sD, vec, lane);
    } else {
      bits_t* db = reinterpret_cast<bits_t*>(d);
      for (int64_t e = lane; e < D; e += 32) db[e] = 0;  // all-zero bits are +0.0
    }
  }
}

// d mask_token, pass 1: partial[chunk][d] = sum over the chunk's rows with ids >= L_keep
template <typename scalar_t, typename acc_t>
__global__ void mask_grad_partial_kernel(acc_t* __restrict__ partial, const scalar_t* __restrict__ g, int64_t gN,
                                         int64_t gL, int64_t gD, const int64_t* __restrict__ ids, int64_t iN,
                                         int64_t iJ, int64_t N, int64_t L, int64_t D, int64_t Lk, int64_t chunk_rows) {
  const int64_t d = blockIdx.y * (int64_t)blockDim.x + threadIdx.x;
  const int64_t beg = blockIdx.x * chunk_rows, end = std::min<int64_t>(N * L, beg + chunk_rows);
  if (d >= D) return;
  acc_t s = 0;
  for (int64_t row = beg; row < end; ++row) {
    const int64_t n = row / L, i = row % L;
    if (ids[n * iN + i * iJ] >= Lk) s += static_cast<acc_t>(g[n * gN + i * gL + d * gD]);
  }
  partial[blockIdx.x * D + d] = s;
}

template <typename scalar_t, typename acc_t>
__global__ void mask_grad_reduce_kernel(scalar_t* __restrict__ dm, const acc_t* __restrict__ partial, int chunks,
                                        int64_t D) {
  for (int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; d < D; d += (int64_t)gridDim.x * blockDim.x) {
    acc_t s = 0;
    for (int c = 0; c < chunks; ++c) s += partial[c * D + d];
    dm[d] = static_cast<scalar_t>(s);
  }
}

bool vec_ok(const void* out, const RowSrc& s, int64_t D, int64_t es, const void* extra = nullptr) {
  return s.sD == 1 && (D * es) % 16 == 0 && cuda::aligned(out, 16) && cuda::aligned(s.base, 16) &&
         (s.sN * es) % 16 == 0 && (s.sR * es) % 16 == 0 && (extra == nullptr || cuda::aligned(extra, 16));
}

unsigned int row_blocks(int64_t rows) {
  return (unsigned int)std::max<int64_t>(1, std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 65535LL * 32));
}

#define RAR_DISPATCH_BITS(es, ...)                                   \
  switch (es) {                                                      \
    case 2: { using bits_t = uint16_t; __VA_ARGS__; break; }         \
    case 4: { using bits_t = uint32_t; __VA_ARGS__; break; }         \
    case 8: { using bits_t = uint64_t; __VA_ARGS__; break; }         \
    default: TORCH_CHECK(false, "rar: unsupported element size ", es); \
  }

at::Tensor masked_gather_cuda(const at::Tensor& x, const at::Tensor& ids) {
  check_masked_gather(x, ids);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2), Lk = ids.size(1);
  auto out = at::empty({N, Lk, D}, x.options());
  if (out.numel() == 0) return out;
  const int64_t es = x.element_size();
  RowSrc s{static_cast<const char*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2)};
  const bool vec = vec_ok(out.data_ptr(), s, D, es);
  auto stream = cuda::current_stream();
  RAR_DISPATCH_BITS(es, gather_rows_kernel<bits_t><<<row_blocks(N * Lk), cuda::kThreads, 0, stream>>>(
                            static_cast<char*>(out.data_ptr()), s, ids.data_ptr<int64_t>(), ids.stride(0),
                            ids.stride(1), N, Lk, D, L, /*limit=*/L, nullptr, vec));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor inverse_map(const at::Tensor& ids, int64_t N, int64_t J, int64_t L, int64_t limit) {
  auto inv = at::full({N, limit}, -1, ids.options().dtype(at::kInt));
  if (N * J > 0 && limit > 0) {
    inverse_map_kernel<<<cuda::blocks_for(N * J), cuda::kThreads, 0, cuda::current_stream()>>>(
        inv.data_ptr<int32_t>(), ids.data_ptr<int64_t>(), ids.stride(0), ids.stride(1), N, J, L, limit);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return inv;
}

void rows_from_inverse(at::Tensor& out, const at::Tensor& g, const at::Tensor& inv) {
  const int64_t N = out.size(0), R = out.size(1), D = out.size(2);
  if (out.numel() == 0) return;
  const int64_t es = g.element_size();
  RowSrc s{static_cast<const char*>(g.data_ptr()), g.stride(0), g.stride(1), g.stride(2)};
  const bool vec = vec_ok(out.data_ptr(), s, D, es);
  auto stream = cuda::current_stream();
  RAR_DISPATCH_BITS(es, rows_from_inverse_kernel<bits_t><<<row_blocks(N * R), cuda::kThreads, 0, stream>>>(
                            static_cast<char*>(out.data_ptr()), s, inv.data_ptr<int32_t>(), N, R, D, vec));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor masked_gather_backward_cuda(const at::Tensor& g, const at::Tensor& ids, c10::SymInt L_sym) {
  check_masked_grad("masked_gather_backward", g, ids);
  c10::cuda::CUDAGuard guard(g.device());
  const int64_t L = L_sym.expect_int();
  const int64_t N = g.size(0), Lk = g.size(1), D = g.size(2);
  TORCH_CHECK(ids.size(1) == Lk && Lk <= L, "rar::masked_gather_backward: shapes: got grad_out ", g.sizes(),
              ", ids_keep ", ids.sizes(), ", L = ", L);
  auto dx = at::empty({N, L, D}, g.options());
  if (dx.numel() == 0) return dx;
  auto inv = inverse_map(ids, N, Lk, L, L);
  rows_from_inverse(dx, g, inv);
  return dx;
}

at::Tensor masked_restore_cuda(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& mask_token) {
  check_masked_restore(y, ids, mask_token);
  c10::cuda::CUDAGuard guard(y.device());
  const int64_t N = y.size(0), Lk = y.size(1), D = y.size(2), L = ids.size(1);
  auto out = at::empty({N, L, D}, y.options());
  if (out.numel() == 0) return out;
  auto mt = mask_token.reshape({D}).contiguous();
  const int64_t es = y.element_size();
  RowSrc s{static_cast<const char*>(y.data_ptr()), y.stride(0), y.stride(1), y.stride(2)};
  const bool vec = vec_ok(out.data_ptr(), s, D, es, mt.data_ptr()) || (Lk == 0 && (D * es) % 16 == 0 &&
                                                                       cuda::aligned(out.data_ptr(), 16) &&
                                                                       cuda::aligned(mt.data_ptr(), 16));
  auto stream = cuda::current_stream();
  RAR_DISPATCH_BITS(es, gather_rows_kernel<bits_t><<<row_blocks(N * L), cuda::kThreads, 0, stream>>>(
                            static_cast<char*>(out.data_ptr()), s, ids.data_ptr<int64_t>(), ids.stride(0),
                            ids.stride(1), N, L, D, L, /*limit=*/Lk, static_cast<const char*>(mt.data_ptr()), vec));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_restore_backward_cuda(const at::Tensor& g, const at::Tensor& ids,
                                                                c10::SymInt Lk_sym, bool mask_token_grad) {
  check_masked_grad("masked_restore_backward", g, ids);
  c10::cuda::CUDAGuard guard(g.device());
  const int64_t Lk = Lk_sym.expect_int();
  const int64_t N = g.size(0), L = g.size(1), D = g.size(2);
  TORCH_CHECK(ids.size(1) == L && Lk >= 0 && Lk <= L, "rar::masked_restore_backward: shapes: got grad_out ", g.sizes(),
              ", ids_restore ", ids.sizes(), ", L_keep = ", Lk);
  auto dy = at::empty({N, Lk, D}, g.options());
  if (dy.numel() > 0) {
    auto inv = inverse_map(ids, N, L, L, Lk);
    rows_from_inverse(dy, g, inv);
  }
  auto dm = at::empty({mask_token_grad ? D : 0}, g.options());
  if (mask_token_grad && D > 0) {
    if (N * L == 0) return {dy, dm.zero_()};
    auto stream = cuda::current_stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "masked_restore_backward", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      const int chunks = (int)std::min<int64_t>(N * L, 256);  // fixed by the shape -> deterministic
      const int64_t chunk_rows = (N * L + chunks - 1) / chunks;
      auto partial = at::empty({chunks, D}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      const int64_t dblocks = (D + cuda::kThreads - 1) / cuda::kThreads;
      TORCH_CHECK(dblocks <= 65535, "rar::masked_restore_backward: D too large: got ", D);
      dim3 grid(chunks, (unsigned int)dblocks);
      mask_grad_partial_kernel<scalar_t, acc_t><<<grid, cuda::kThreads, 0, stream>>>(
          partial.data_ptr<acc_t>(), g.data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.stride(2),
          ids.data_ptr<int64_t>(), ids.stride(0), ids.stride(1), N, L, D, Lk, chunk_rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mask_grad_reduce_kernel<scalar_t, acc_t><<<cuda::blocks_for(D), cuda::kThreads, 0, stream>>>(
          dm.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), chunks, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dy, dm};
}

}  // namespace

TORCH_LIBRARY_IMPL(rar, CUDA, m) {
  m.impl("masked_gather", &masked_gather_cuda);
  m.impl("masked_gather_backward", &masked_gather_backward_cuda);
  m.impl("masked_restore", &masked_restore_cuda);
  m.impl("masked_restore_backward", &masked_restore_backward_cuda);
}

}  // namespace rar
