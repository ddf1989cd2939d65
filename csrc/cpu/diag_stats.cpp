// Trace, top-k mean and effective rank of a diagonal repeated d_out times
// (docs/method.md §3, closed form), by selection instead of a full sort.
//
// Top-k needs only the sum of the q largest values and the (q+1)-th; the
// effective rank needs the index i* where the descending prefix sum first
// reaches α·T, found by repeated halving with nth_element (expected O(d)).
#include <algorithm>
#include <cmath>
#include <functional>

#include "kernels.h"

namespace sensitivity_lora::cpu {
namespace {

constexpr int64_t kSortBelow = 64;  // small ranges are sorted outright

double range_sum(const double* v, int64_t lo, int64_t hi) {
  double s = 0.0;
  for (int64_t i = lo; i < hi; ++i) s += v[i];
  return s;
}

// Position (0-based) of the first entry, in descending order, where the
// prefix sum reaches `threshold`, with the prefix sum before it and the entry.
struct Crossing {
  int64_t index;
  double prefix_before;
  double value;
};

Crossing find_crossing(double* v, int64_t d, double threshold) {
  const auto desc = std::greater<double>();
  int64_t lo = 0, hi = d;  // the crossing lies in [lo, hi); v[0, lo) are the lo largest values
  double prefix = 0.0;     // their sum
  while (hi - lo > kSortBelow) {
    const int64_t mid = lo + (hi - lo) / 2;
    std::nth_element(v + lo, v + mid, v + hi, desc);
    const double upper = range_sum(v, lo, mid);
    if (prefix + upper >= threshold) {
      hi = mid;  // reached within the top `mid`
    } else {
      prefix += upper;
      lo = mid;
    }
  }
  std::sort(v + lo, v + hi, desc);
  for (int64_t i = lo; i < hi; ++i) {
    if (prefix + v[i] >= threshold) return {i, prefix, v[i]};
    prefix += v[i];
  }
  // Rounding kept the total just below the threshold: the crossing is the last
  // entry considered (the reference's cumulative sum ends at the total too).
  return {hi - 1, prefix - v[hi - 1], v[hi - 1]};
}

}  // namespace

DiagStats diag_stats_kernel(double* v, int64_t d, int64_t d_out, int64_t k, double alpha) {
  const double total = range_sum(v, 0, d);
  const auto desc = std::greater<double>();

  // Top-k mean: k = q·d_out + s entries of the repeated diagonal.
  const int64_t q = k / d_out, s = k % d_out;
  double c_q = 0.0, next = 0.0;
  if (q < d) {
    std::nth_element(v, v + q, v + d, desc);  // v[q] is the (q+1)-th largest
    next = v[q];
    c_q = range_sum(v, 0, q);
  } else {
    c_q = total;  // q == d implies s == 0
  }
  const double topk = (static_cast<double>(d_out) * c_q + static_cast<double>(s) * (s > 0 ? next : 0.0)) /
                      static_cast<double>(k);

  double eff = 0.0;  // no curvature at all: no direction carries any
  if (total > 0.0) {
    const double target = alpha * total;
    // Same relative tolerance as the reference, so exact fractions land exactly.
    const Crossing c = find_crossing(v, d, target * (1.0 - 1e-12));
    const double need = static_cast<double>(d_out) * (target - c.prefix_before) / c.value;
    const double rounded = std::ceil(need - 1e-9 * std::max(1.0, std::fabs(need)));
    // need <= d_out in exact arithmetic (C_{i*} >= α·T); rounding at α = 1 can
    // push it just above, which would count more entries than there are.
    eff = static_cast<double>(d_out) * static_cast<double>(c.index) +
          std::clamp(rounded, 1.0, static_cast<double>(d_out));
  }
  return {static_cast<double>(d_out) * total, topk, eff};
}

}  // namespace sensitivity_lora::cpu
