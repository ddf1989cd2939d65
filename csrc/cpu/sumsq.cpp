// Fused upcast + square + masked column sum of a (tokens, d) activation into
// fp64 accumulators, in one pass over the activation.
//
// Each thread takes a contiguous range of rows and keeps fp64 sums of its own
// (so the result does not depend on scheduling). Inside the range, rows are
// walked in short blocks and columns in L1-sized blocks; partial sums over one
// row block are kept in the accumulation type (fp32, fp64 for fp64 input) and
// then added to the thread's fp64 sums, so the error does not grow with N.
#include "kernels.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "convert.h"

namespace sensitivity_lora::cpu {
namespace {

constexpr int64_t kRowBlock = 128;   // rows summed in the accumulation type before an fp64 flush
constexpr int64_t kColBlock = 1024;  // columns whose partial sums stay in L1
constexpr int64_t kMinParallelElems = 1 << 16;

template <typename Conv, bool kWithSum>
SL_INLINE void sumsq_range(const typename Conv::In* x, int64_t row_stride, int64_t d, const bool* mask,
                           int64_t r0, int64_t r1, double* acc, double* acc_sum) {
  using Acc = typename Conv::Acc;
  Acc sq[kColBlock];
  Acc sm[kColBlock];
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(rb + kRowBlock, r1);
    for (int64_t c0 = 0; c0 < d; c0 += kColBlock) {
      const int64_t w = std::min(kColBlock, d - c0);
      for (int64_t c = 0; c < w; ++c) {
        sq[c] = 0;
        if (kWithSum) sm[c] = 0;
      }
      for (int64_t r = rb; r < re; ++r) {
        if (mask != nullptr && !mask[r]) continue;
        const typename Conv::In* row = x + r * row_stride + c0;
        for (int64_t c = 0; c < w; ++c) {
          const Acc v = Conv::convert(row[c]);
          sq[c] += v * v;
          if (kWithSum) sm[c] += v;
        }
      }
      for (int64_t c = 0; c < w; ++c) {
        acc[c0 + c] += static_cast<double>(sq[c]);
        if (kWithSum) acc_sum[c0 + c] += static_cast<double>(sm[c]);
      }
    }
  }
}

// One entry per input type, each compiled for several instruction sets.
#define SL_SUMSQ_ENTRY(NAME, CONV)                                                                       \
  SL_MULTIVERSION void NAME(const void* x, int64_t row_stride, int64_t d, const bool* mask, int64_t r0, \
                            int64_t r1, double* acc, double* acc_sum) {                                 \
    const auto* p = static_cast<const CONV::In*>(x);                                                    \
    if (acc_sum != nullptr)                                                                             \
      sumsq_range<CONV, true>(p, row_stride, d, mask, r0, r1, acc, acc_sum);                            \
    else                                                                                                \
      sumsq_range<CONV, false>(p, row_stride, d, mask, r0, r1, acc, nullptr);                           \
  }

SL_SUMSQ_ENTRY(sumsq_f32, FloatToFloat)
SL_SUMSQ_ENTRY(sumsq_f64, DoubleToDouble)
SL_SUMSQ_ENTRY(sumsq_bf16, Bf16ToFloat)
SL_SUMSQ_ENTRY(sumsq_f16, F16ToFloat)
#undef SL_SUMSQ_ENTRY

using RangeFn = void (*)(const void*, int64_t, int64_t, const bool*, int64_t, int64_t, double*, double*);

RangeFn range_fn(ElemType type) {
  switch (type) {
    case ElemType::kFloat32: return sumsq_f32;
    case ElemType::kFloat64: return sumsq_f64;
    case ElemType::kBFloat16: return sumsq_bf16;
    case ElemType::kFloat16: return sumsq_f16;
  }
  return nullptr;
}

}  // namespace

void sumsq_accumulate(const Activation& x, const bool* mask, double* acc, double* acc_sum, int threads) {
  const int64_t n = x.rows, d = x.cols;
  if (n == 0 || d == 0) return;
  const RangeFn fn = range_fn(x.type);
  if (n * d < kMinParallelElems) threads = 1;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));

  // Per-thread fp64 sums, reduced in thread order afterwards (deterministic).
  std::vector<double> local(static_cast<size_t>(threads) * d, 0.0);
  std::vector<double> local_sum(acc_sum != nullptr ? local.size() : 0, 0.0);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    const int64_t per = (n + nt - 1) / nt;
    const int64_t r0 = std::min(n, t * per), r1 = std::min(n, r0 + per);
    fn(x.data, x.row_stride, d, mask, r0, r1, local.data() + t * d,
       acc_sum != nullptr ? local_sum.data() + t * d : nullptr);
  }
  for (int t = 0; t < threads; ++t) {
    const double* l = local.data() + t * d;
    for (int64_t c = 0; c < d; ++c) acc[c] += l[c];
    if (acc_sum != nullptr) {
      const double* s = local_sum.data() + t * d;
      for (int64_t c = 0; c < d; ++c) acc_sum[c] += s[c];
    }
  }
}

}  // namespace sensitivity_lora::cpu
