// static_clip, CPU: parallel_for over (b, c, source frame, h) rows; each row is converted once and
// written to all T output frames. Arithmetic order: float(x)*scale, -mean, /std, cast (no FMA:
// setup.py compiles with -ffp-contract=off), which equals the reference bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cstring>
#include "checks.h"

namespace rar {
namespace {

template <typename in_t, typename out_t, typename acc_t>
void static_clip_kernel(const at::Tensor& x, const int64_t* idx, at::Tensor& out, int64_t T, bool tile,
                        const std::optional<at::ArrayRef<double>>& mean, const std::optional<at::ArrayRef<double>>& stdv,
                        double scale_d) {
  const int64_t B = x.size(0), C = x.size(1), T_in = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t sB = x.stride(0), sC = x.stride(1), sT = x.stride(2), sH = x.stride(3), sW = x.stride(4);
  const int64_t T_src = tile ? 1 : T_in;  // rows per (b, c): one picked frame, or every frame
  const acc_t scale = static_cast<acc_t>(scale_d);
  const bool do_scale = scale_d != 1.0, do_mean = mean.has_value(), do_std = stdv.has_value();
  acc_t mu[16] = {0}, sd[16] = {0};
  for (int64_t c = 0; c < C && c < 16; ++c) {
    if (do_mean) mu[c] = static_cast<acc_t>((*mean)[c]);
    if (do_std) sd[c] = static_cast<acc_t>((*stdv)[c]);
  }
  const in_t* xp = x.data_ptr<in_t>();
  out_t* op = out.data_ptr<out_t>();
  const int64_t rows = B * C * T_src * H;
  const int64_t plane = H * W;
  at::parallel_for(0, rows, std::max<int64_t>(1, 2048 / std::max<int64_t>(W, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % H;
      const int64_t ts = (r / H) % T_src;
      const int64_t c = (r / (H * T_src)) % C;
      const int64_t b = r / (H * T_src * C);
      const int64_t f = tile ? idx[b] : ts;
      const in_t* src = xp + b * sB + c * sC + f * sT + h * sH;
      out_t* dst0 = op + ((b * C + c) * T + (tile ? 0 : ts)) * plane + h * W;
      for (int64_t w = 0; w < W; ++w) {
        if constexpr (std::is_same<out_t, uint8_t>::value) {
          dst0[w] = static_cast<out_t>(src[w * sW]);
        } else {
          acc_t v = static_cast<acc_t>(src[w * sW]);
          if (do_scale) v = v * scale;
          if (do_mean) v = v - mu[c];
          if (do_std) v = v / sd[c];
          dst0[w] = static_cast<out_t>(v);
        }
      }
      if (tile)
        for (int64_t t = 1; t < T; ++t) std::memcpy(dst0 + t * plane, dst0, W * sizeof(out_t));
    }
  });
}

template <typename in_t, typename acc_t>
void dispatch_out(at::ScalarType o, const at::Tensor& x, const int64_t* idx, at::Tensor& out, int64_t T, bool tile,
                  const std::optional<at::ArrayRef<double>>& mean, const std::optional<at::ArrayRef<double>>& stdv,
                  double scale) {
  switch (o) {
    case at::kFloat: return static_clip_kernel<in_t, float, acc_t>(x, idx, out, T, tile, mean, stdv, scale);
    case at::kDouble: return static_clip_kernel<in_t, double, double>(x, idx, out, T, tile, mean, stdv, scale);
    case at::kHalf: return static_clip_kernel<in_t, at::Half, acc_t>(x, idx, out, T, tile, mean, stdv, scale);
    case at::kBFloat16: return static_clip_kernel<in_t, at::BFloat16, acc_t>(x, idx, out, T, tile, mean, stdv, scale);
    default: TORCH_CHECK(false, "rar::static_clip: out_dtype: got ", o, ", expected a floating dtype");
  }
}

at::Tensor static_clip_cpu(const at::Tensor& x, const std::optional<at::Tensor>& frame_idx, int64_t num_frames,
                           std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> stdv,
                           std::optional<double> scale, std::optional<at::ScalarType> out_dtype) {
  auto p = check_static_clip(x, frame_idx, num_frames, mean, stdv, scale, out_dtype);
  const int64_t B = x.size(0), C = x.size(1), T_in = x.size(2), H = x.size(3), W = x.size(4);
  auto out = at::empty({B, C, p.T, H, W}, x.options().dtype(p.out_dtype));
  if (out.numel() == 0) return out;
  at::Tensor idx;
  const bool tile = frame_idx.has_value();
  const int64_t* ip = nullptr;
  if (tile) {
    idx = frame_idx->contiguous();
    ip = idx.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(ip[b] >= 0 && ip[b] < T_in, "rar::static_clip: frame_idx out of range: got frame_idx[", b, "] = ",
                  ip[b], ", expected values in [0, ", T_in, ")");
  }
  if (p.pure_copy) {
    static_clip_kernel<uint8_t, uint8_t, float>(x, ip, out, p.T, tile, mean, stdv, p.scale);
    return out;
  }
  const bool f64 = x.scalar_type() == at::kDouble || p.out_dtype == at::kDouble;
  switch (x.scalar_type()) {
    case at::kByte:
      if (f64) dispatch_out<uint8_t, double>(p.out_dtype, x, ip, out, p.T, tile, mean, stdv, p.scale);
      else dispatch_out<uint8_t, float>(p.out_dtype, x, ip, out, p.T, tile, mean, stdv, p.scale);
      break;
    case at::kHalf:
      if (f64) dispatch_out<at::Half, double>(p.out_dtype, x, ip, out, p.T, tile, mean, stdv, p.scale);
      else dispatch_out<at::Half, float>(p.out_dtype, x, ip, out, p.T, tile, mean, stdv, p.scale);
      break;
    case at::kBFloat16:
      if (f64) dispatch_out<at::BFloat16, double>(p.out_dtype, x, ip, out, p.T, tile, mean, stdv, p.scale);
      else dispatch_out<at::BFloat16, float>(p.out_dtype, x, ip, out, p.T, tile, mean, stdv, p.scale);
      break;
    case at::kFloat:
      if (f64) dispatch_out<float, double>(p.out_dtype, x, ip, out, p.T, tile, mean, stdv, p.scale);
      else dispatch_out<float, float>(p.out_dtype, x, ip, out, p.T, tile, mean, stdv, p.scale);
      break;
    case at::kDouble: dispatch_out<double, double>(p.out_dtype, x, ip, out, p.T, tile, mean, stdv, p.scale); break;
    default: TORCH_CHECK(false, "rar::static_clip: x dtype: got ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rar, CPU, m) { m.impl("static_clip", &static_clip_cpu); }

}  // namespace rar
