// static_clip, CUDA: one fused pass. Each thread loads a vector of frame f_b of one (b, c) plane
// once, converts it (uint8 -> float), normalises it ((v*scale - mean_c) / std_c, with explicit
// round-to-nearest intrinsics so nvcc cannot contract into an FMA), casts, and stores it to all T
// output frames at stride H*W with 16-byte stores. A scalar path handles planes that are not
// contiguous/aligned. frame_idx is range-checked with a device-side assert.
#include <torch/library.h>
#include "../checks.h"
#include "common.cuh"

namespace rar {
namespace {

using cuda::Vec;

template <typename acc_t> struct NormParams {
  acc_t scale;
  acc_t mu[16];
  acc_t sd[16];
  bool do_scale, do_mean, do_std;
};

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <typename in_t, typename out_t, typename acc_t>
__device__ __forceinline__ out_t convert(in_t x, int c, const NormParams<acc_t>& p) {
  if constexpr (std::is_same<out_t, uint8_t>::value) {
    return static_cast<out_t>(x);
  } else {
    acc_t v = static_cast<acc_t>(x);
    if (p.do_scale) v = mul_rn(v, p.scale);
    if (p.do_mean) v = sub_rn(v, p.mu[c]);
    if (p.do_std) v = div_rn(v, p.sd[c]);
    return static_cast<out_t>(v);
  }
}

struct Geometry {
  int64_t B, C, T_in, H, W, T, T_src;  // T_src: 1 (tile one picked frame) or T_in (normalise-only)
  int64_t sB, sC, sT, sH, sW;
  bool tile;
};

// plane p = (b, c, ts) with ts < T_src; returns the source plane pointer offset and the first output plane
__device__ __forceinline__ void plane_offsets(const Geometry& g, const int64_t* idx, int64_t p, int64_t& src,
                                              int64_t& dst, int& c_out) {
  const int64_t ts = p % g.T_src;
  const int64_t c = (p / g.T_src) % g.C;
  const int64_t b = p / (g.T_src * g.C);
  int64_t f = ts;
  if (g.tile) {
    f = idx[b];
    CUDA_KERNEL_ASSERT(f >= 0 && f < g.T_in && "rar::static_clip: frame_idx out of range");
  }
  src = b * g.sB + c * g.sC + f * g.sT;
  dst = ((b * g.C + c) * g.T + (g.tile ? 0 : ts)) * (g.H * g.W);
  c_out = static_cast<int>(c);
}

// vector path: plane is contiguous and H*W % VEC == 0; every thread handles VEC elements
template <typename in_t, typename out_t, typename acc_t, int VEC>
__global__ void static_clip_vec_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ idx,
                                       out_t* __restrict__ out, Geometry g, NormParams<acc_t> p) {
  const int64_t HW = g.H * g.W;
  const int64_t per_plane = HW / VEC;
  const int64_t total = g.B * g.C * g.T_src * per_plane;
  const int64_t writes = g.tile ? g.T : 1;  // T >= 2^31 frames is a valid (if odd) request
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t plane = i / per_plane, e = (i % per_plane) * VEC;
    int64_t src, dst;
    int c;
    plane_offsets(g, idx, plane, src, dst, c);
    const Vec<in_t, VEC> a = *reinterpret_cast<const Vec<in_t, VEC>*>(x + src + e);
    Vec<out_t, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = convert<in_t, out_t, acc_t>(a.v[k], c, p);
    out_t* d = out + dst + e;
    for (int64_t t = 0; t < writes; ++t) *reinterpret_cast<Vec<out_t, VEC>*>(d + t * HW) = o;
  }
}

// scalar path: any strides
template <typename in_t, typename out_t, typename acc_t>
__global__ void static_clip_scalar_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ idx,
                                          out_t* __restrict__ out, Geometry g, NormParams<acc_t> p) {
  const int64_t HW = g.H * g.W;
  const int64_t total = g.B * g.C * g.T_src * HW;
  const int64_t writes = g.tile ? g.T : 1;  // T >= 2^31 frames is a valid (if odd) request
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t plane = i / HW, e = i % HW;
    int64_t src, dst;
    int c;
    plane_offsets(g, idx, plane, src, dst, c);
    const int64_t h = e / g.W, w = e % g.W;
    const out_t o = convert<in_t, out_t, acc_t>(x[src + h * g.sH + w * g.sW], c, p);
    out_t* d = out + dst + e;
    for (int64_t t = 0; t < writes; ++t) d[t * HW] = o;
  }
}

template <typename in_t, typename out_t, typename acc_t>
void launch(const at::Tensor& x, const int64_t* idx, at::Tensor& out, const Geometry& g, const StaticClipPlan& plan,
            const std::optional<at::ArrayRef<double>>& mean, const std::optional<at::ArrayRef<double>>& stdv) {
  NormParams<acc_t> p;
  p.scale = static_cast<acc_t>(plan.scale);
  p.do_scale = plan.scale != 1.0;
  p.do_mean = mean.has_value();
  p.do_std = stdv.has_value();
  for (int c = 0; c < 16; ++c) {
    p.mu[c] = (p.do_mean && c < g.C) ? static_cast<acc_t>((*mean)[c]) : acc_t(0);
    p.sd[c] = (p.do_std && c < g.C) ? static_cast<acc_t>((*stdv)[c]) : acc_t(1);
  }
  constexpr int VEC = 16 / sizeof(out_t) < 16 ? 16 / sizeof(out_t) : 16;
  const int64_t HW = g.H * g.W;
  const in_t* xp = x.data_ptr<in_t>();
  out_t* op = out.data_ptr<out_t>();
  auto stream = cuda::current_stream();
  const bool plane_contig = (g.W == 1 || g.sW == 1) && (g.H == 1 || g.sH == g.W);
  const int64_t in_bytes = VEC * sizeof(in_t);
  const bool vec_ok = plane_contig && HW % VEC == 0 && cuda::aligned(xp, in_bytes) && cuda::aligned(op, 16) &&
                      (g.sB * (int64_t)sizeof(in_t)) % in_bytes == 0 && (g.sC * (int64_t)sizeof(in_t)) % in_bytes == 0 &&
                      (g.sT * (int64_t)sizeof(in_t)) % in_bytes == 0;
  if (vec_ok) {
    const int64_t total = g.B * g.C * g.T_src * (HW / VEC);
    static_clip_vec_kernel<in_t, out_t, acc_t, VEC>
        <<<cuda::blocks_for(total), cuda::kThreads, 0, stream>>>(xp, idx, op, g, p);
  } else {
    const int64_t total = g.B * g.C * g.T_src * HW;
    static_clip_scalar_kernel<in_t, out_t, acc_t><<<cuda::blocks_for(total), cuda::kThreads, 0, stream>>>(xp, idx, op, g, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename in_t, typename acc_t>
void dispatch_out(at::ScalarType o, const at::Tensor& x, const int64_t* idx, at::Tensor& out, const Geometry& g,
                  const StaticClipPlan& plan, const std::optional<at::ArrayRef<double>>& mean,
                  const std::optional<at::ArrayRef<double>>& stdv) {
  switch (o) {
    case at::kFloat: return launch<in_t, float, acc_t>(x, idx, out, g, plan, mean, stdv);
    case at::kDouble: return launch<in_t, double, double>(x, idx, out, g, plan, mean, stdv);
    case at::kHalf: return launch<in_t, at::Half, acc_t>(x, idx, out, g, plan, mean, stdv);
    case at::kBFloat16: return launch<in_t, at::BFloat16, acc_t>(x, idx, out, g, plan, mean, stdv);
    default: TORCH_CHECK(false, "rar::static_clip: out_dtype: got ", o, ", expected a floating dtype");
  }
}

at::Tensor static_clip_cuda(const at::Tensor& x, const std::optional<at::Tensor>& frame_idx, int64_t num_frames,
                            std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> stdv,
                            std::optional<double> scale, std::optional<at::ScalarType> out_dtype) {
  auto plan = check_static_clip(x, frame_idx, num_frames, mean, stdv, scale, out_dtype);
  c10::cuda::CUDAGuard guard(x.device());
  Geometry g;
  g.B = x.size(0); g.C = x.size(1); g.T_in = x.size(2); g.H = x.size(3); g.W = x.size(4);
  g.sB = x.stride(0); g.sC = x.stride(1); g.sT = x.stride(2); g.sH = x.stride(3); g.sW = x.stride(4);
  g.T = plan.T;
  g.tile = frame_idx.has_value();
  g.T_src = g.tile ? 1 : g.T_in;
  auto out = at::empty({g.B, g.C, g.T, g.H, g.W}, x.options().dtype(plan.out_dtype));
  if (out.numel() == 0) return out;
  at::Tensor idx;
  const int64_t* ip = nullptr;
  if (g.tile) {
    idx = frame_idx->contiguous();
    ip = idx.data_ptr<int64_t>();
  }
  if (plan.pure_copy) {
    launch<uint8_t, uint8_t, float>(x, ip, out, g, plan, mean, stdv);
    return out;
  }
  const bool f64 = x.scalar_type() == at::kDouble || plan.out_dtype == at::kDouble;
  switch (x.scalar_type()) {
    case at::kByte:
      if (f64) dispatch_out<uint8_t, double>(plan.out_dtype, x, ip, out, g, plan, mean, stdv);
      else dispatch_out<uint8_t, float>(plan.out_dtype, x, ip, out, g, plan, mean, stdv);
      break;
    case at::kHalf:
      if (f64) dispatch_out<at::Half, double>(plan.out_dtype, x, ip, out, g, plan, mean, stdv);
      else dispatch_out<at::Half, float>(plan.out_dtype, x, ip, out, g, plan, mean, stdv);
      break;
    case at::kBFloat16:
      if (f64) dispatch_out<at::BFloat16, double>(plan.out_dtype, x, ip, out, g, plan, mean, stdv);
      else dispatch_out<at::BFloat16, float>(plan.out_dtype, x, ip, out, g, plan, mean, stdv);
      break;
    case at::kFloat:
      if (f64) dispatch_out<float, double>(plan.out_dtype, x, ip, out, g, plan, mean, stdv);
      else dispatch_out<float, float>(plan.out_dtype, x, ip, out, g, plan, mean, stdv);
      break;
    case at::kDouble: dispatch_out<double, double>(plan.out_dtype, x, ip, out, g, plan, mean, stdv); break;
    default: TORCH_CHECK(false, "rar::static_clip: x dtype: got ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rar, CUDA, m) { m.impl("static_clip", &static_clip_cuda); }

}  // namespace rar
