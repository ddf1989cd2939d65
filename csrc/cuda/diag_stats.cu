// Trace, top-k mean and effective rank of a Hessian diagonal (docs/method.md section 3), one block.
//
// A selection scheme instead of a sort (no shared-memory limit on d): the j-th largest entry is
// found by bisection on the fp64 bit pattern (order-preserving for entries >= 0), and the
// cumulative sum C_i of the sorted entries is the sum of the entries >= the i-th largest one
// (ties in closed form). Same formulas and tolerances as reference.diag_stats.
#include <math.h>

#include "common.cuh"
#include "launchers.h"

namespace {

constexpr int kThreads = 512;
constexpr unsigned long long kInfKey = 0x7FF0000000000000ull;  // +inf: above every finite entry

struct CountSum {
  unsigned long long count;
  double sum;
};

__device__ __forceinline__ double clean(double v) { return v > 0.0 ? v : 0.0; }  // -0.0, NaN, < 0 -> 0

// Number and sum of the entries whose bit pattern is >= key (every thread gets them).
__device__ CountSum count_sum_ge(const double* __restrict__ diag, int64_t d, unsigned long long key,
                                 unsigned long long* s_count, double* s_sum) {
  unsigned long long c = 0;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const double v = clean(diag[i]);
    if (static_cast<unsigned long long>(__double_as_longlong(v)) >= key) {
      ++c;
      s += v;
    }
  }
  return CountSum{sl::block_sum(c, s_count), sl::block_sum(s, s_sum)};
}

// Bit pattern of the j-th largest entry (1-based): the largest key with count(>= key) >= j.
__device__ unsigned long long jth_largest_key(const double* diag, int64_t d, int64_t j, unsigned long long* s_count,
                                              double* s_sum) {
  unsigned long long lo = 0, hi = kInfKey;  // count(>= lo) >= j > count(>= hi)
  while (hi - lo > 1) {
    const unsigned long long mid = lo + (hi - lo) / 2;
    if (count_sum_ge(diag, d, mid, s_count, s_sum).count >= static_cast<unsigned long long>(j)) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads)
diag_stats_kernel(const double* __restrict__ diag, int64_t d, int64_t d_out, int64_t k, double alpha,
                  double* __restrict__ out) {
  __shared__ unsigned long long s_count[kThreads / 32];
  __shared__ double s_sum[kThreads / 32];
  const double total = count_sum_ge(diag, d, 0, s_count, s_sum).sum;
  const int64_t q = k / d_out, s = k % d_out;
  // Top-k mean of the repeated diagonal: (d_out * C_q + s * l_{q+1}) / k.
  double c_q = 0.0, tail = 0.0;
  if (q > 0) {
    const unsigned long long key = jth_largest_key(diag, d, q, s_count, s_sum);
    const double ell = __longlong_as_double(static_cast<long long>(key));
    const CountSum gt = count_sum_ge(diag, d, key + 1, s_count, s_sum);
    c_q = gt.sum + static_cast<double>(q - static_cast<int64_t>(gt.count)) * ell;
  }
  if (s > 0) tail = __longlong_as_double(static_cast<long long>(jth_largest_key(diag, d, q + 1, s_count, s_sum)));
  const double topk = (static_cast<double>(d_out) * c_q + static_cast<double>(s) * tail) / static_cast<double>(k);
  // Effective rank: i* = smallest i with C_i >= alpha * T.
  double eff = 0.0;
  if (total > 0.0) {
    const double target = alpha * total, goal = target * (1.0 - 1e-12);
    unsigned long long lo = 0, hi = kInfKey;  // largest key whose sum(>= key) reaches the goal: l_{i*}
    while (hi - lo > 1) {
      const unsigned long long mid = lo + (hi - lo) / 2;
      if (count_sum_ge(diag, d, mid, s_count, s_sum).sum >= goal) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const double ell = __longlong_as_double(static_cast<long long>(lo));
    const CountSum gt = count_sum_ge(diag, d, lo + 1, s_count, s_sum);
    // Within a run of entries equal to ell, C grows by ell per step.
    const double j = fmax(1.0, ceil((goal - gt.sum) / ell));
    const double i_star = static_cast<double>(gt.count) + j;
    const double c_prev = gt.sum + (j - 1.0) * ell;
    const double need = static_cast<double>(d_out) * (target - c_prev) / ell;
    // 1 <= entries taken from l_{i*} <= d_out: the clamp absorbs rounding between separately summed totals.
    const double taken = fmin(fmax(1.0, ceil(need - 1e-9 * fmax(1.0, fabs(need)))), static_cast<double>(d_out));
    eff = static_cast<double>(d_out) * (i_star - 1.0) + taken;
  }
  if (threadIdx.x == 0) {
    out[0] = static_cast<double>(d_out) * total;
    out[1] = topk;
    out[2] = eff;
  }
}

}  // namespace

extern "C" cudaError_t sl_diag_stats_launch(const double* diag, int64_t d, int64_t d_out, int64_t k, double alpha,
                                            double* out, cudaStream_t stream) {
  if (diag == nullptr || out == nullptr || d <= 0 || d_out < 1 || k < 1 || k > d * d_out || !(alpha > 0.0) ||
      alpha > 1.0) {
    return cudaErrorInvalidValue;
  }
  diag_stats_kernel<<<1, kThreads, 0, stream>>>(diag, d, d_out, k, alpha, out);
  return cudaGetLastError();
}
