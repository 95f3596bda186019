// Shared input checks for the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) kernels of the `rar` ops.
// Messages follow the project format, identical in spirit to common/ops_reference.py:
//   rar::<op>: <what>: got ..., expected ...
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <optional>
#include <vector>

namespace rar {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "rar::", op, ": ", name, " device: got ", t.device(), ", expected ",
              ref.device(), " (same device as the first input)");
}

// ---- static_clip ----
struct StaticClipPlan {
  int64_t T;                 // output frames
  at::ScalarType out_dtype;  // resolved output dtype
  double scale;              // resolved scale
  bool pure_copy;            // uint8 -> uint8 tiling
};

inline StaticClipPlan check_static_clip(const at::Tensor& x, const std::optional<at::Tensor>& frame_idx,
                                        int64_t num_frames, const std::optional<at::ArrayRef<double>>& mean,
                                        const std::optional<at::ArrayRef<double>>& stdv, std::optional<double> scale,
                                        std::optional<at::ScalarType> out_dtype) {
  const char* op = "static_clip";
  TORCH_CHECK(x.dim() == 5, "rar::static_clip: x rank: got ", x.dim(), "-D tensor of shape ", x.sizes(),
              ", expected a 5-D (B,C,T,H,W) tensor");
  auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kByte || is_float_dtype(xt), "rar::static_clip: x dtype: got ", xt,
              ", expected uint8, float16, bfloat16, float32 or float64");
  const int64_t B = x.size(0), C = x.size(1), T_in = x.size(2);
  StaticClipPlan p;
  if (frame_idx.has_value()) {
    const auto& fi = *frame_idx;
    TORCH_CHECK(fi.scalar_type() == at::kLong, "rar::static_clip: frame_idx dtype: got ", fi.scalar_type(),
                ", expected torch.int64");
    TORCH_CHECK(fi.dim() == 1 && fi.size(0) == B, "rar::static_clip: frame_idx shape: got ", fi.sizes(),
                ", expected (", B, ",) (one frame per sample)");
    check_same_device(op, "frame_idx", fi, x);
    TORCH_CHECK(num_frames == -1 || num_frames >= 1, "rar::static_clip: num_frames: got ", num_frames,
                ", expected -1 (= T_in) or >= 1");
    p.T = num_frames == -1 ? T_in : num_frames;
  } else {
    TORCH_CHECK(num_frames == -1 || num_frames == T_in, "rar::static_clip: num_frames without frame_idx: got ",
                num_frames, ", expected -1 or T_in = ", T_in, " (normalise-only mode keeps every frame)");
    p.T = T_in;
  }
  if (mean.has_value()) {
    TORCH_CHECK((int64_t)mean->size() == C, "rar::static_clip: mean length: got ", mean->size(), ", expected C = ", C);
    TORCH_CHECK(C <= 16, "rar::static_clip: mean with C channels: got ", C, ", expected C <= 16");
  }
  if (stdv.has_value()) {
    TORCH_CHECK((int64_t)stdv->size() == C, "rar::static_clip: std length: got ", stdv->size(), ", expected C = ", C);
    TORCH_CHECK(C <= 16, "rar::static_clip: std with C channels: got ", C, ", expected C <= 16");
    for (double s : *stdv) TORCH_CHECK(s > 0, "rar::static_clip: std: got ", s, ", expected all std > 0");
  }
  p.out_dtype = out_dtype.has_value() ? *out_dtype : (xt == at::kByte ? at::kFloat : xt);
  p.scale = scale.has_value() ? *scale : (xt == at::kByte ? 1.0 / 255.0 : 1.0);
  TORCH_CHECK(p.out_dtype == at::kByte || is_float_dtype(p.out_dtype), "rar::static_clip: out_dtype: got ",
              p.out_dtype, ", expected float16, bfloat16, float32, float64 or uint8");
  p.pure_copy = p.out_dtype == at::kByte;
  if (p.pure_copy) {
    TORCH_CHECK(xt == at::kByte && !mean.has_value() && !stdv.has_value() && p.scale == 1.0,
                "rar::static_clip: out_dtype uint8: got x ", xt, " with mean/std/scale, expected uint8 output only for "
                "pure tiling (uint8 x, no mean/std, scale=1)");
  }
  return p;
}

// ---- graph_aggregate ----
inline void check_graph_aggregate(const at::Tensor& x, const at::Tensor& A) {
  const char* op = "graph_aggregate";
  TORCH_CHECK(A.dim() == 3 || A.dim() == 4, "rar::graph_aggregate: A rank: got ", A.dim(), "-D tensor of shape ",
              A.sizes(), ", expected (K,V,W) or per-sample (N,K,V,W)");
  TORCH_CHECK(x.dim() == 5, "rar::graph_aggregate: x rank: got ", x.dim(), "-D tensor of shape ", x.sizes(),
              ", expected (N,K,C,T,V) or (N,K*C,T,V)");
  const int64_t N = x.size(0), K = x.size(1), V = x.size(4);
  TORCH_CHECK(A.size(-3) == K, "rar::graph_aggregate: A.shape[-3] (K): got A ", A.sizes(), " for x ", x.sizes(),
              ", expected K = ", K);
  TORCH_CHECK(A.size(-2) == V, "rar::graph_aggregate: A.shape[-2] (V, source joints): got A ", A.sizes(), " for x ",
              x.sizes(), ", expected V = ", V);
  if (A.dim() == 4)
    TORCH_CHECK(A.size(0) == N, "rar::graph_aggregate: per-sample A.shape[0]: got ", A.size(0), ", expected N = ", N);
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "rar::graph_aggregate: x dtype: got ", x.scalar_type(),
              ", expected float16, bfloat16, float32 or float64");
  TORCH_CHECK(A.scalar_type() == x.scalar_type() || A.scalar_type() == at::kFloat, "rar::graph_aggregate: A dtype: got ",
              A.scalar_type(), " with x ", x.scalar_type(), ", expected ", x.scalar_type(), " or torch.float32");
  check_same_device(op, "A", A, x);
}

inline void check_graph_aggregate_grad_x(const at::Tensor& g, const at::Tensor& A) {
  TORCH_CHECK(g.dim() == 4, "rar::graph_aggregate_grad_x: grad_out rank: got ", g.dim(), "-D, expected (N,C,T,W)");
  TORCH_CHECK(A.dim() == 3 || A.dim() == 4, "rar::graph_aggregate_grad_x: A rank: got ", A.dim(),
              "-D, expected (K,V,W) or (N,K,V,W)");
  TORCH_CHECK(A.size(-1) == g.size(3), "rar::graph_aggregate_grad_x: A.shape[-1] (W): got ", A.size(-1),
              ", expected W = ", g.size(3));
  if (A.dim() == 4)
    TORCH_CHECK(A.size(0) == g.size(0), "rar::graph_aggregate_grad_x: per-sample A.shape[0]: got ", A.size(0),
                ", expected N = ", g.size(0));
  TORCH_CHECK(is_float_dtype(g.scalar_type()), "rar::graph_aggregate_grad_x: grad_out dtype: got ", g.scalar_type(),
              ", expected a floating dtype");
  TORCH_CHECK(A.scalar_type() == g.scalar_type() || A.scalar_type() == at::kFloat,
              "rar::graph_aggregate_grad_x: A dtype: got ", A.scalar_type(), ", expected ", g.scalar_type(),
              " or torch.float32");
  check_same_device("graph_aggregate_grad_x", "A", A, g);
}

inline void check_graph_aggregate_grad_A(const at::Tensor& g, const at::Tensor& x) {
  TORCH_CHECK(g.dim() == 4 && x.dim() == 5, "rar::graph_aggregate_grad_A: ranks: got grad_out ", g.sizes(), " and x ",
              x.sizes(), ", expected (N,C,T,W) and (N,K,C,T,V)");
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(1) == x.size(2) && g.size(2) == x.size(3),
              "rar::graph_aggregate_grad_A: shapes: got grad_out ", g.sizes(), " and x ", x.sizes(),
              ", expected matching N, C, T");
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && is_float_dtype(x.scalar_type()),
              "rar::graph_aggregate_grad_A: dtypes: got grad_out ", g.scalar_type(), " and x ", x.scalar_type(),
              ", expected one floating dtype");
  check_same_device("graph_aggregate_grad_A", "x", x, g);
}

// ---- masked ops ----
inline void check_masked_gather(const at::Tensor& x, const at::Tensor& ids) {
  const char* op = "masked_gather";
  TORCH_CHECK(x.dim() == 3, "rar::masked_gather: x rank: got ", x.dim(), "-D tensor of shape ", x.sizes(),
              ", expected a 3-D (N,L,D) tensor");
  TORCH_CHECK(ids.dim() == 2, "rar::masked_gather: ids_keep rank: got ", ids.dim(), "-D tensor of shape ", ids.sizes(),
              ", expected (N,L_keep)");
  TORCH_CHECK(ids.size(0) == x.size(0), "rar::masked_gather: ids_keep.shape[0] (N): got ", ids.size(0),
              ", expected N = ", x.size(0));
  TORCH_CHECK(ids.size(1) <= x.size(1), "rar::masked_gather: L_keep: got ", ids.size(1), ", expected L_keep <= L = ",
              x.size(1));
  TORCH_CHECK(ids.scalar_type() == at::kLong, "rar::masked_gather: ids_keep dtype: got ", ids.scalar_type(),
              ", expected torch.int64");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "rar::masked_gather: x dtype: got ", x.scalar_type(),
              ", expected float16, bfloat16, float32 or float64");
  check_same_device(op, "ids_keep", ids, x);
}

inline void check_masked_restore(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& mask_token) {
  const char* op = "masked_restore";
  TORCH_CHECK(y.dim() == 3, "rar::masked_restore: y rank: got ", y.dim(), "-D tensor of shape ", y.sizes(),
              ", expected a 3-D (N,L_keep,D) tensor");
  TORCH_CHECK(ids.dim() == 2, "rar::masked_restore: ids_restore rank: got ", ids.dim(), "-D tensor of shape ",
              ids.sizes(), ", expected (N,L)");
  TORCH_CHECK(ids.size(0) == y.size(0), "rar::masked_restore: ids_restore.shape[0] (N): got ", ids.size(0),
              ", expected N = ", y.size(0));
  TORCH_CHECK(y.size(1) <= ids.size(1), "rar::masked_restore: L_keep: got ", y.size(1), ", expected L_keep <= L = ",
              ids.size(1));
  TORCH_CHECK(ids.scalar_type() == at::kLong, "rar::masked_restore: ids_restore dtype: got ", ids.scalar_type(),
              ", expected torch.int64");
  TORCH_CHECK(is_float_dtype(y.scalar_type()), "rar::masked_restore: y dtype: got ", y.scalar_type(),
              ", expected float16, bfloat16, float32 or float64");
  TORCH_CHECK(mask_token.numel() == y.size(2), "rar::masked_restore: mask_token numel: got ", mask_token.numel(),
              ", expected D = ", y.size(2));
  TORCH_CHECK(mask_token.scalar_type() == y.scalar_type(), "rar::masked_restore: mask_token dtype: got ",
              mask_token.scalar_type(), ", expected ", y.scalar_type(), " (the token dtype)");
  check_same_device(op, "ids_restore", ids, y);
  check_same_device(op, "mask_token", mask_token, y);
}

inline void check_masked_grad(const char* op, const at::Tensor& g, const at::Tensor& ids) {
  TORCH_CHECK(g.dim() == 3 && ids.dim() == 2 && ids.size(0) == g.size(0), "rar::", op, ": shapes: got grad_out ",
              g.sizes(), " and ids ", ids.sizes(), ", expected (N,*,D) and (N,*)");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "rar::", op, ": ids dtype: got ", ids.scalar_type(),
              ", expected torch.int64");
  TORCH_CHECK(is_float_dtype(g.scalar_type()), "rar::", op, ": grad_out dtype: got ", g.scalar_type(),
              ", expected a floating dtype");
  check_same_device(op, "ids", ids, g);
}

// ---- lora_linear ----
inline void check_lora_linear(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& b,
                              const at::Tensor& A, const at::Tensor& B) {
  const char* op = "lora_linear";
  TORCH_CHECK(W.dim() == 2, "rar::lora_linear: W rank: got ", W.dim(), "-D tensor of shape ", W.sizes(),
              ", expected (N,K)");
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "rar::lora_linear: x shape: got ", x.sizes(),
              ", expected (..., K) with K = ", K);
  if (b.has_value())
    TORCH_CHECK(b->dim() == 1 && b->size(0) == N, "rar::lora_linear: b shape: got ", b->sizes(), ", expected (", N, ",)");
  TORCH_CHECK(A.dim() == 2 && A.size(1) == K, "rar::lora_linear: A shape: got ", A.sizes(), ", expected (r, K) with K = ", K);
  const int64_t r = A.size(0);
  TORCH_CHECK(r >= 1, "rar::lora_linear: rank r (A.shape[0]): got ", r, ", expected r >= 1");
  TORCH_CHECK(B.dim() == 2 && B.size(0) == N && B.size(1) == r, "rar::lora_linear: B shape: got ", B.sizes(),
              ", expected (", N, ", ", r, ") = (N, r)");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "rar::lora_linear: x dtype: got ", x.scalar_type(),
              ", expected float16, bfloat16, float32 or float64");
  auto same = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "rar::lora_linear: ", name, " dtype: got ", t.scalar_type(),
                " with x ", x.scalar_type(), ", expected ", x.scalar_type(),
                " (all inputs share one dtype outside autocast)");
    check_same_device(op, name, t, x);
  };
  same("W", W);
  if (b.has_value()) same("b", *b);
  same("A", A);
  same("B", B);
}

// lora_linear is GEMM-bound: both the CPU and the CUDA implementation use the "allowed first step"
// of specs/kernels.md §5 (U = X A^T; Y = addmm(b, X, W^T); Y += s U B^T into the same buffer).
at::Tensor lora_linear_impl(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& b,
                            const at::Tensor& A, const at::Tensor& B, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_impl(const at::Tensor& g, const at::Tensor& x,
                                                                         const at::Tensor& W, const at::Tensor& A,
                                                                         const at::Tensor& B, double scale,
                                                                         bool need_dx);

}  // namespace rar
