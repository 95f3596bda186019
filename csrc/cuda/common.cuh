// Helpers shared by the CUDA kernels of the `rar` ops.
#pragma once
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <algorithm>
#include <cstdint>

namespace rar {
namespace cuda {

// c10's stream (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that minimal
// CUDA toolkits lack); kernels launch on the current stream (CUDA graphs, side streams)
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

constexpr int kThreads = 256;

// number of blocks for a grid-stride loop over n items (never 0: callers return early on n == 0)
inline unsigned int blocks_for(int64_t n, int threads = kThreads, int64_t cap = 65535LL * 32) {
  int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, cap)));
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// unsigned integer type of a given element size: masked copies are bit-exact
template <int ES> struct Bits;
template <> struct Bits<2> { using type = uint16_t; };
template <> struct Bits<4> { using type = uint32_t; };
template <> struct Bits<8> { using type = uint64_t; };

}  // namespace cuda
}  // namespace rar
