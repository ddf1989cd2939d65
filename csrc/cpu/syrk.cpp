// XᵀX with a BLAS SYRK (half the flops of a GEMM), for the fp32 products of
// accumulate_xtx.
//
// torch's MKL exports no SYRK, so the routine comes from the OpenBLAS that
// scipy ships: sensitivity_lora/_native.py hands over the Fortran ssyrk/sgemm
// of scipy.linalg.cython_blas and OpenBLAS's thread-count setter. OpenBLAS's
// own thread pool fights torch's OpenMP threads on a small machine, so it is
// set to one thread for the call and the work is split here instead, in ONE
// OpenMP region for all token chunks. Narrow inputs split the tokens (below);
// wider ones the columns: thread p owns the output columns
// [c_p, c_{p+1}) of the upper triangle (a rectangle by sgemm plus a diagonal
// triangle by ssyrk; c_p = d·sqrt(p/T), so the areas are equal) and, per
// token chunk, adds its fp32 block into the fp64 accumulator while it is
// still in cache. (A finer, dynamically scheduled grid of tiles measured no
// better on 2 cores, loaded or not.)
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace sensitivity_lora::cpu {
namespace {

// Fortran BLAS signatures (all arguments by pointer).
using SyrkFn = void (*)(const char* uplo, const char* trans, const int* n, const int* k, const float* alpha,
                        const float* a, const int* lda, const float* beta, float* c, const int* ldc);
using GemmFn = void (*)(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                        const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                        const int* ldc);
using SetThreadsFn = int (*)(int);

struct ExternalBlas {
  SyrkFn syrk = nullptr;
  GemmFn gemm = nullptr;
  SetThreadsFn set_threads = nullptr;  // returns the previous count
};

// Set from Python (sensitivity_lora._native.use_external_syrk); not to be
// changed while an accumulate_xtx is running.
ExternalBlas g_blas;

constexpr int64_t kMinPartWidth = 128;  // narrower column parts (or token slices) are not worth a thread
// Up to this width the threads split the tokens, not the columns (measured at d = 576, 2 threads:
// 0.58 vs 0.70 of an fp32 addmm at 8192 tokens, about even at 2048; mixed at 1536).
constexpr int64_t kTokenSplitMaxD = 1024;

}  // namespace

void set_external_syrk(void* syrk, void* gemm, void* set_threads) {
  if (syrk == nullptr || gemm == nullptr || set_threads == nullptr) {
    g_blas = ExternalBlas{};
    return;
  }
  g_blas = ExternalBlas{reinterpret_cast<SyrkFn>(syrk), reinterpret_cast<GemmFn>(gemm),
                        reinterpret_cast<SetThreadsFn>(set_threads)};
}

bool external_syrk_usable(int64_t rows, int64_t d, int64_t ldx) {
  return g_blas.syrk != nullptr && rows <= INT_MAX && d <= INT_MAX && ldx <= INT_MAX;
}

bool xtx_syrk_tokens_usable(int64_t rows, int64_t d, int threads) {
  return threads > 1 && d <= kTokenSplitMaxD && rows >= threads * kMinPartWidth && external_syrk_usable(rows, d, d);
}

// Narrow inputs: the column split would give each thread a few milliseconds of
// unequal work (a SYRK triangle against a GEMM rectangle), so every thread
// instead runs the full-width SYRK on its own slice of the tokens into its own
// fp32 scratch; per round of `chunk`-token slices the scratches are summed in
// fp64 into the accumulator, all threads sharing the rows. Same shape of work
// on every thread, two barriers per round. Dense fp32 rows are read in place;
// masked or 16-bit rows are gathered and widened by the thread that owns the
// slice (one pass, still in its cache for the SYRK).
void xtx_syrk_tokens(const Activation& x, const bool* mask, int64_t chunk, double* acc, int64_t ld_acc, double* diag,
                     int threads) {
  const int64_t rows = x.rows, d = x.cols;
  const bool in_place = x.type == ElemType::kFloat32 && mask == nullptr && x.row_stride >= d && x.row_stride <= INT_MAX;
  // Gathered slices stay at 2048 rows (4.7 MB at d = 576) so they are still in cache for the SYRK:
  // 15.6 vs 16.3 ms at 8192 bf16 tokens, d = 576.
  const int64_t max_piece = in_place ? chunk : std::min<int64_t>(chunk, 2048);
  const int64_t piece = std::min(max_piece, ((rows + threads - 1) / threads + 15) / 16 * 16);
  const int64_t buffer = in_place ? 0 : piece * d;
  // Kept between calls (at most threads × 20 MiB at d = 1024): fresh pages cost as much as the
  // products at this width.
  thread_local std::vector<float> pool;
  const size_t per_thread = static_cast<size_t>(d * d + buffer);
  if (pool.size() < threads * per_thread) pool.resize(threads * per_thread);
  float* const base = pool.data();  // the calling thread's pool: name it before the region
  std::vector<char> used(threads, 0);
  const int n = static_cast<int>(d);
  const float one = 1.0f, zero = 0.0f;
  const ExternalBlas blas = g_blas;
  const int previous = blas.set_threads(1);  // OpenBLAS runs in the calling thread
#pragma omp parallel num_threads(threads)
  {
    // The team may be smaller than asked (nested call, OMP_THREAD_LIMIT): slice by what we got.
    const int team = omp_get_num_threads(), p = omp_get_thread_num();
    float* scratch = base + p * per_thread;
    for (int64_t round = 0; round < rows; round += piece * team) {
      const int64_t s = round + p * piece, count = std::clamp<int64_t>(rows - s, 0, piece);
      const float* slice = scratch + d * d;  // the gathered rows
      int lda = n;
      int64_t k = count;
      if (in_place) {
        slice = static_cast<const float*>(x.data) + s * x.row_stride;
        lda = static_cast<int>(x.row_stride);
      } else if (count > 0) {
        k = gather_rows_f32(x, mask, s, count, scratch + d * d, 1);
      }
      used[p] = k > 0;
      const int kk = static_cast<int>(k);
      if (k > 0) blas.syrk("L", "N", &n, &kk, &one, slice, &lda, &zero, scratch, &n);
#pragma omp barrier
#pragma omp for schedule(static, 16)
      for (int64_t i = 0; i < d; ++i) {
        for (int q = 0; q < team; ++q) {
          if (!used[q]) continue;
          const float* row = base + q * per_thread + i * d;
          add_row_f32_to_f64(row + i, acc + i * ld_acc + i, d - i);
          if (diag != nullptr) diag[i] += static_cast<double>(row[i]);
        }
      }
    }  // the implicit barrier of the loop above keeps the next round's SYRKs off the scratches
  }
  blas.set_threads(previous);
}

void xtx_syrk(const float* x, int64_t rows, int64_t d, int64_t ldx, int64_t chunk, float* scratch, double* acc,
              int64_t ld_acc, double* diag, int threads) {
  const int parts = static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(threads, d / kMinPartWidth), 1, 256));
  std::vector<int64_t> bound(parts + 1);
  for (int p = 0; p <= parts; ++p) {  // equal areas of the triangle, on multiples of 16
    const int64_t c = std::llround(static_cast<double>(d) * std::sqrt(static_cast<double>(p) / parts));
    bound[p] = p == parts ? d : std::min(d, (c + 8) / 16 * 16);
  }
  // x (rows × d, row-major) is the column-major d × rows matrix A, so A·Aᵀ = XᵀX;
  // column-major "lower" of the scratch is its row-major upper triangle.
  const int lda = static_cast<int>(ldx), ldc = static_cast<int>(d);
  const float one = 1.0f, zero = 0.0f;
  const ExternalBlas blas = g_blas;
  const int previous = blas.set_threads(1);  // OpenBLAS runs in the calling thread
  // The parts write disjoint columns, so every chunk runs in this one region without barriers.
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
  for (int p = 0; p < parts; ++p) {
    const int64_t j0 = bound[p], nj = bound[p + 1] - bound[p];
    if (nj == 0) continue;
    const int n = static_cast<int>(nj), m0 = static_cast<int>(j0);
    for (int64_t s = 0; s < rows; s += chunk) {
      const int k = static_cast<int>(std::min(chunk, rows - s));
      const float* xs = x + s * ldx;
      blas.syrk("L", "N", &n, &k, &one, xs + j0, &lda, &zero, scratch + j0 * d + j0, &ldc);
      if (j0 > 0)  // rows [0, j0) of these columns: the column-major block (J, [0, j0))
        blas.gemm("N", "T", &n, &m0, &k, &one, xs + j0, &lda, xs, &lda, &zero, scratch + j0, &ldc);
      add_block_f32_to_f64(scratch + j0, d, acc + j0, ld_acc, j0, nj, false, nullptr, 1);
      add_block_f32_to_f64(scratch + j0 * d + j0, d, acc + j0 * ld_acc + j0, ld_acc, nj, nj, true,
                           diag != nullptr ? diag + j0 : nullptr, 1);
    }
  }
  blas.set_threads(previous);
}

}  // namespace sensitivity_lora::cpu
