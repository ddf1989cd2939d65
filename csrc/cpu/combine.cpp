// Adds an fp32 GEMM result block into the fp64 accumulator (the "combine in
// fp64" step of the XᵀX accumulation), vectorised and parallel over rows.
#include <omp.h>

#include "convert.h"
#include "kernels.h"

namespace sensitivity_lora::cpu {
namespace {

SL_MULTIVERSION void add_row(const float* s, double* a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) a[j] += static_cast<double>(s[j]);
}

}  // namespace

void add_row_f32_to_f64(const float* s, double* a, int64_t n) { add_row(s, a, n); }

void add_block_f32_to_f64(const float* S, int64_t ld_s, double* acc, int64_t ld_acc, int64_t rows, int64_t cols,
                          bool upper_only, double* diag, int threads) {
  const bool parallel = threads > 1 && rows * cols >= (1 << 16);
// Interleaved rows: triangular blocks would leave the first thread most of the work.
#pragma omp parallel for num_threads(threads) schedule(static, 16) if (parallel)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t j0 = upper_only ? i : 0;
    if (j0 < cols) add_row(S + i * ld_s + j0, acc + i * ld_acc + j0, cols - j0);
    if (diag != nullptr && i < cols) diag[i] += static_cast<double>(S[i * ld_s + i]);
  }
}

}  // namespace sensitivity_lora::cpu
