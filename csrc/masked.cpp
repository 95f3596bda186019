// masked_gather / masked_restore, CPU: row copies (memcpy when D has unit stride), parallel over
// output rows. Rows are copied bit-exactly by element size. Backward ops build an int32 inverse
// map and write every output row once (no scatter-add, deterministic). Indices are range-checked.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cstring>
#include "checks.h"

namespace rar {
namespace {

// copy one row of D elements of size ES bytes from src (element stride s_src) to contiguous dst
inline void copy_row(char* dst, const char* src, int64_t D, int64_t s_src, int64_t es) {
  if (s_src == 1) {
    std::memcpy(dst, src, D * es);
  } else {
    for (int64_t d = 0; d < D; ++d) std::memcpy(dst + d * es, src + d * s_src * es, es);
  }
}

void check_range(const char* op, const char* name, const at::Tensor& ids, int64_t hi) {
  auto a = ids.accessor<int64_t, 2>();
  for (int64_t n = 0; n < ids.size(0); ++n)
    for (int64_t j = 0; j < ids.size(1); ++j)
      TORCH_CHECK(a[n][j] >= 0 && a[n][j] < hi, "rar::", op, ": ", name, " out of range: got ", name, "[", n, ", ", j,
                  "] = ", a[n][j], ", expected values in [0, ", hi, ")");
}

at::Tensor masked_gather_cpu(const at::Tensor& x, const at::Tensor& ids) {
  check_masked_gather(x, ids);
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2), Lk = ids.size(1);
  check_range("masked_gather", "ids_keep", ids, L);
  auto out = at::empty({N, Lk, D}, x.options());
  if (out.numel() == 0) return out;
  const int64_t es = x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  auto a = ids.accessor<int64_t, 2>();
  const int64_t sN = x.stride(0), sL = x.stride(1), sD = x.stride(2);
  at::parallel_for(0, N * Lk, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / Lk, j = r % Lk;
      copy_row(op + r * D * es, xp + (n * sN + a[n][j] * sL) * es, D, sD, es);
    }
  });
  return out;
}

// inverse map inv[n, ids[n, j]] = j (-1 where absent)
at::Tensor inverse_map(const at::Tensor& ids, int64_t size, int64_t limit) {
  const int64_t N = ids.size(0), J = ids.size(1);
  auto inv = at::full({N, size}, -1, ids.options().dtype(at::kInt));
  auto a = ids.accessor<int64_t, 2>();
  auto b = inv.accessor<int32_t, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < J; ++j) {
      const int64_t v = a[n][j];
      if (v < limit) b[n][v] = static_cast<int32_t>(j);
    }
  return inv;
}

// rows of out (N, R, D): out[n, i] = g[n, inv[n, i]] or 0
void fill_from_inverse(at::Tensor& out, const at::Tensor& g, const at::Tensor& inv) {
  const int64_t N = out.size(0), R = out.size(1), D = out.size(2);
  if (out.numel() == 0) return;
  const int64_t es = g.element_size();
  const char* gp = static_cast<const char*>(g.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  auto b = inv.accessor<int32_t, 2>();
  const int64_t sN = g.stride(0), sL = g.stride(1), sD = g.stride(2);
  at::parallel_for(0, N * R, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / R, i = r % R;
      const int32_t j = b[n][i];
      if (j >= 0) copy_row(op + r * D * es, gp + (n * sN + j * sL) * es, D, sD, es);
      else std::memset(op + r * D * es, 0, D * es);  // all-zero bytes are +0.0 in every float dtype
    }
  });
}

at::Tensor masked_gather_backward_cpu(const at::Tensor& g, const at::Tensor& ids, c10::SymInt L_sym) {
  check_masked_grad("masked_gather_backward", g, ids);
  const int64_t L = L_sym.expect_int();
  TORCH_CHECK(g.size(1) == ids.size(1) && ids.size(1) <= L, "rar::masked_gather_backward: shapes: got grad_out ",
              g.sizes(), ", ids_keep ", ids.sizes(), ", L = ", L);
  check_range("masked_gather_backward", "ids_keep", ids, L);
  auto dx = at::empty({g.size(0), L, g.size(2)}, g.options());
  fill_from_inverse(dx, g, inverse_map(ids, L, L));
  return dx;
}

at::Tensor masked_restore_cpu(const at::Tensor& y, const at::Tensor& ids, const at::Tensor& mask_token) {
  check_masked_restore(y, ids, mask_token);
  const int64_t N = y.size(0), Lk = y.size(1), D = y.size(2), L = ids.size(1);
  check_range("masked_restore", "ids_restore", ids, L);
  auto out = at::empty({N, L, D}, y.options());
  if (out.numel() == 0) return out;
  auto mt = mask_token.reshape({D}).contiguous();
  const int64_t es = y.element_size();
  const char* yp = static_cast<const char*>(y.data_ptr());
  const char* mp = static_cast<const char*>(mt.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  auto a = ids.accessor<int64_t, 2>();
  const int64_t sN = y.stride(0), sL = y.stride(1), sD = y.stride(2);
  at::parallel_for(0, N * L, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / L, i = r % L, v = a[n][i];
      if (v < Lk) copy_row(op + r * D * es, yp + (n * sN + v * sL) * es, D, sD, es);
      else std::memcpy(op + r * D * es, mp, D * es);
    }
  });
  return out;
}

template <typename scalar_t, typename acc_t>
void mask_token_grad_kernel(const at::Tensor& g, const at::Tensor& ids, int64_t Lk, at::Tensor& dm) {
  const int64_t N = g.size(0), L = g.size(1), D = g.size(2);
  const scalar_t* gp = g.data_ptr<scalar_t>();
  scalar_t* dp = dm.data_ptr<scalar_t>();
  auto a = ids.accessor<int64_t, 2>();
  const int64_t sN = g.stride(0), sL = g.stride(1), sD = g.stride(2);
  // parallel over columns; each column sums its rows in a fixed order -> deterministic
  at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
    std::vector<acc_t> acc(d1 - d0, acc_t(0));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < L; ++i) {
        if (a[n][i] < Lk) continue;
        const scalar_t* row = gp + n * sN + i * sL;
        for (int64_t d = d0; d < d1; ++d) acc[d - d0] += static_cast<acc_t>(row[d * sD]);
      }
    for (int64_t d = d0; d < d1; ++d) dp[d] = static_cast<scalar_t>(acc[d - d0]);
  });
}

std::tuple<at::Tensor, at::Tensor> masked_restore_backward_cpu(const at::Tensor& g, const at::Tensor& ids,
                                                               c10::SymInt Lk_sym, bool mask_token_grad) {
  check_masked_grad("masked_restore_backward", g, ids);
  const int64_t Lk = Lk_sym.expect_int();
  const int64_t N = g.size(0), L = g.size(1), D = g.size(2);
  TORCH_CHECK(ids.size(1) == L && Lk >= 0 && Lk <= L, "rar::masked_restore_backward: shapes: got grad_out ", g.sizes(),
              ", ids_restore ", ids.sizes(), ", L_keep = ", Lk);
  check_range("masked_restore_backward", "ids_restore", ids, L);
  auto dy = at::empty({N, Lk, D}, g.options());
  fill_from_inverse(dy, g, inverse_map(ids, Lk, Lk));
  auto dm = at::empty({mask_token_grad ? D : 0}, g.options());
  if (mask_token_grad && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "masked_restore_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      mask_token_grad_kernel<scalar_t, acc_t>(g, ids, Lk, dm);
    });
  }
  return {dy, dm};
}

}  // namespace

TORCH_LIBRARY_IMPL(rar, CPU, m) {
  m.impl("masked_gather", &masked_gather_cpu);
  m.impl("masked_gather_backward", &masked_gather_backward_cpu);
  m.impl("masked_restore", &masked_restore_cpu);
  m.impl("masked_restore_backward", &masked_restore_backward_cpu);
}

}  // namespace rar
