// Gathers the unmasked rows of one token chunk into a dense fp32 buffer,
// widening bf16/fp16 on the way (one pass), for the XᵀX GEMMs.
#include "kernels.h"

#include <vector>

#include "convert.h"

namespace sensitivity_lora::cpu {
namespace {

template <typename Conv>
SL_INLINE void convert_row(const typename Conv::In* src, float* dst, int64_t d) {
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<float>(Conv::convert(src[c]));
}

#define SL_ROW_ENTRY(NAME, CONV)                                     \
  SL_MULTIVERSION void NAME(const void* src, float* dst, int64_t d) { \
    convert_row<CONV>(static_cast<const CONV::In*>(src), dst, d);     \
  }

SL_ROW_ENTRY(row_f32, FloatToFloat)
SL_ROW_ENTRY(row_bf16, Bf16ToFloat)
SL_ROW_ENTRY(row_f16, F16ToFloat)
#undef SL_ROW_ENTRY

// fp64 rows are narrowed (the fp32 GEMM path is only used for non-fp64 input).
void row_f64(const void* src, float* dst, int64_t d) {
  const auto* p = static_cast<const double*>(src);
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<float>(p[c]);
}

}  // namespace

int64_t gather_rows_f32(const Activation& x, const bool* mask, int64_t row0, int64_t count, float* out,
                        int threads) {
  const int64_t d = x.cols;
  const size_t elem = x.type == ElemType::kFloat64 ? 8 : (x.type == ElemType::kFloat32 ? 4 : 2);
  void (*fn)(const void*, float*, int64_t) = x.type == ElemType::kFloat32    ? row_f32
                                             : x.type == ElemType::kBFloat16 ? row_bf16
                                             : x.type == ElemType::kFloat16  ? row_f16
                                                                             : row_f64;
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(count));
  for (int64_t r = row0; r < row0 + count; ++r)
    if (mask == nullptr || mask[r]) rows.push_back(r);
  const int64_t m = static_cast<int64_t>(rows.size());
  const auto* base = static_cast<const char*>(x.data);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && m * d >= (1 << 16))
  for (int64_t i = 0; i < m; ++i) fn(base + rows[i] * x.row_stride * elem, out + i * d, d);
  return m;
}

}  // namespace sensitivity_lora::cpu
