// Copy of a square matrix that also reports, in the same pass, whether every
// entry is finite (the Cholesky driver needs both; two passes cost ~2x memory).
#include <omp.h>

#include <cmath>
#include <limits>

#include "convert.h"
#include "kernels.h"

namespace sensitivity_lora::cpu {
namespace {

template <typename T>
SL_INLINE bool copy_row(const T* src, T* dst, int64_t n) {
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) {
    const T v = src[j];
    dst[j] = v;
    // NaN fails every comparison, ±inf exceeds max: both flag the row.
    bad |= !(std::fabs(v) <= std::numeric_limits<T>::max());
  }
  return bad;
}

SL_MULTIVERSION bool copy_row_f64(const double* s, double* d, int64_t n) { return copy_row(s, d, n); }
SL_MULTIVERSION bool copy_row_f32(const float* s, float* d, int64_t n) { return copy_row(s, d, n); }

template <typename T, bool (*Row)(const T*, T*, int64_t)>
bool copy_all(const T* src, int64_t src_ld, T* dst, int64_t n, int threads) {
  bool bad = false;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(|| : bad) if (threads > 1 && n * n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) bad = Row(src + i * src_ld, dst + i * n, n) || bad;
  return !bad;
}

}  // namespace

bool copy_check_finite(const double* src, int64_t src_ld, double* dst, int64_t n, int threads) {
  return copy_all<double, copy_row_f64>(src, src_ld, dst, n, threads);
}

bool copy_check_finite(const float* src, int64_t src_ld, float* dst, int64_t n, int threads) {
  return copy_all<float, copy_row_f32>(src, src_ld, dst, n, threads);
}

}  // namespace sensitivity_lora::cpu
