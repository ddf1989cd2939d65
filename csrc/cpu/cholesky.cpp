// Damped Cholesky: a blocked right-looking factorisation whose trailing
// updates are library GEMMs (at::addmm_ -> BLAS) and panel solves library
// TRSMs, driven by a damping ladder relative to mean(diag). Plus diag(H⁻¹)
// from the factor by blocked triangular solves.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu_ops.h"
#include "kernels.h"

namespace sensitivity_lora::cpu {
namespace {

constexpr int64_t kBlock = 256;  // panel width of the inverse-diagonal solves

// Panel width of the factorisation: about n/4, so a factorisation is a dozen
// library calls (few parallel regions, each of which synchronises the cores),
// while the diagonal blocks stay a small share of the work.
int64_t panel_width(int64_t n) { return std::clamp<int64_t>((n / 4 + 63) / 64 * 64, 256, 1024); }

// In-place lower Cholesky of the dense (n, n) matrix A (only its lower
// triangle is read). False as soon as a diagonal block is not positive
// definite, so an indefinite matrix costs little before the next damping.
bool factor_in_place(const at::Tensor& A) {
  const int64_t n = A.size(0), nb = panel_width(n);
  for (int64_t k = 0; k < n; k += nb) {
    const int64_t kb = std::min(nb, n - k);
    at::Tensor a11 = A.narrow(0, k, kb).narrow(1, k, kb);
    auto [l11, info] = at::linalg_cholesky_ex(a11, /*upper=*/false, /*check_errors=*/false);
    if (info.item<int>() != 0) return false;
    a11.copy_(l11);
    const int64_t rest = n - k - kb;
    if (rest == 0) break;
    // Panel: L21 = A21 · L11⁻ᵀ (TRSM).
    at::Tensor a21 = A.narrow(0, k + kb, rest).narrow(1, k, kb);
    a21.copy_(at::linalg_solve_triangular(l11.t(), a21, /*upper=*/true, /*left=*/false));
    // Trailing update A22 -= L21 L21ᵀ on the lower triangle only: one GEMM per
    // block row, covering the columns up to and including its diagonal block.
    for (int64_t j = k + kb; j < n; j += nb) {
      const int64_t jb = std::min(nb, n - j);
      const int64_t width = j + jb - (k + kb);
      at::Tensor c = A.narrow(0, j, jb).narrow(1, k + kb, width);
      c.addmm_(A.narrow(0, j, jb).narrow(1, k, kb), A.narrow(0, k + kb, width).narrow(1, k, kb).t(),
               /*beta=*/1, /*alpha=*/-1);
    }
  }
  return true;
}

// H (row-major, columns contiguous) into the dense `work`; false if not finite.
bool copy_finite(const at::Tensor& H, const at::Tensor& work, int threads) {
  const int64_t n = H.size(0);
  if (H.scalar_type() == at::kDouble)
    return copy_check_finite(H.data_ptr<double>(), H.stride(0), work.data_ptr<double>(), n, threads);
  return copy_check_finite(H.data_ptr<float>(), H.stride(0), work.data_ptr<float>(), n, threads);
}

std::string format_g3(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

template <typename T>
std::tuple<at::Tensor, double, int64_t> damped(const at::Tensor& H, double rel_damp, int64_t max_tries,
                                               double ladder) {
  const int64_t n = H.size(0);
  const int threads = at::get_num_threads();
  at::Tensor work = at::empty({n, n}, H.options().memory_format(at::MemoryFormat::Contiguous));
  if (!copy_finite(H, work, threads))
    TORCH_CHECK_VALUE(false, kNotPositiveDefinite, "Hessian has non-finite entries");

  // Dead features (diagonal <= 0) get the floor mean(diag⁺) (1 when that is 0).
  std::vector<T> diag(n);
  const T* h = H.data_ptr<T>();
  double clamped_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    diag[i] = h[i * H.stride(0) + i];
    clamped_sum += diag[i] > 0 ? static_cast<double>(diag[i]) : 0.0;
  }
  const double mean_diag = n > 0 ? clamped_sum / static_cast<double>(n) : 0.0;
  const double floor = mean_diag > 0.0 ? mean_diag : 1.0;
  for (auto& v : diag)
    if (v <= 0) v = static_cast<T>(floor);

  const double base = rel_damp * floor;
  std::string tried;
  for (int64_t attempt = 0; attempt < max_tries; ++attempt) {
    const double damp = base * std::pow(ladder, static_cast<double>(attempt));
    if (attempt > 0) copy_finite(H, work, threads);  // the failed try overwrote it
    T* w = work.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) w[i * n + i] = diag[i] + static_cast<T>(damp);
    if (factor_in_place(work)) {
      work.tril_();  // the strict upper triangle still holds H
      return {work, damp, attempt + 1};
    }
    tried += (attempt ? ", " : "") + format_g3(damp);
  }
  TORCH_CHECK_VALUE(false, kNotPositiveDefinite, "matrix of size ", n,
                    " is not positive definite after damping with ", tried, " (mean diagonal ",
                    format_g3(mean_diag), "); raise max_tries or rel_damp, or check the calibration data");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_damped(const at::Tensor& H_in, double rel_damp,
                                                                int64_t max_tries, double ladder) {
  check_square("cholesky_damped", "H", H_in);
  check_ladder_args(rel_damp, max_tries, ladder);
  const at::Tensor H = columns_contiguous(H_in);
  auto [L, damp, tries] = H.scalar_type() == at::kDouble ? damped<double>(H, rel_damp, max_tries, ladder)
                                                         : damped<float>(H, rel_damp, max_tries, ladder);
  at::Tensor damp_t = at::empty({}, H.options().dtype(at::kDouble));
  at::Tensor tries_t = at::empty({}, H.options().dtype(at::kLong));
  damp_t.fill_(damp);
  tries_t.fill_(tries);
  return {L, damp_t, tries_t};
}

at::Tensor cholesky_inverse_diag(const at::Tensor& L) {
  check_square("cholesky_inverse_diag", "L", L);
  const int64_t n = L.size(0);
  at::Tensor out = at::empty({n}, L.options());
  // Columns j0.. of L⁻¹ vanish above row j0, so each column block is one TRSM
  // with the trailing factor: ~n³/3 flops instead of n³ for a full inverse.
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t jb = std::min(kBlock, n - j0), rest = n - j0;
    at::Tensor e = at::zeros({rest, jb}, L.options());
    e.diagonal().fill_(1);
    const at::Tensor y =
        at::linalg_solve_triangular(L.narrow(0, j0, rest).narrow(1, j0, rest), e, /*upper=*/false, /*left=*/true);
    out.narrow(0, j0, jb).copy_(y.square().sum(0));
  }
  return out;
}

}  // namespace sensitivity_lora::cpu
