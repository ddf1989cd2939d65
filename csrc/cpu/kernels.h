// Raw-pointer CPU kernels of sensitivity_lora._C.
//
// These translation units include no torch headers (each one that does costs
// ~25 s to compile); the torch-facing wrappers in bindings.cpp, xtx.cpp and
// cholesky.cpp validate tensors and call these.
#pragma once

#include <cstdint>

namespace sensitivity_lora::cpu {

// Element type of a (tokens, d) activation handed to the raw kernels.
enum class ElemType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Strided view of a (rows, d) activation whose columns are contiguous.
struct Activation {
  const void* data;
  ElemType type;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;  // in elements
};

// acc[c] += Σ_r x[r,c]² over rows with mask[r] (mask may be null = all rows);
// acc_sum[c] += Σ_r x[r,c] when acc_sum is not null. Partial sums over short
// row blocks are formed in fp32 (fp64 for fp64 input) and combined in fp64.
// Deterministic for a fixed thread count.
void sumsq_accumulate(const Activation& x, const bool* mask, double* acc, double* acc_sum, int threads);

// Gathers the rows [row0, row0+count) of x that pass mask (mask may be null)
// into out (dense, row-major, cols wide) as fp32; returns the rows written.
int64_t gather_rows_f32(const Activation& x, const bool* mask, int64_t row0, int64_t count, float* out,
                        int threads);

// acc[i, j] += S[i, j] (fp32 block into fp64, row-major with leading dims);
// with upper_only, only j >= i is touched (diagonal blocks of XᵀX). When diag
// is not null, diag[i] += S[i, i] (square blocks only).
void add_block_f32_to_f64(const float* S, int64_t ld_s, double* acc, int64_t ld_acc, int64_t rows, int64_t cols,
                          bool upper_only, double* diag, int threads);
// a[j] += s[j] for j < n, in the calling thread (no parallel region).
void add_row_f32_to_f64(const float* s, double* a, int64_t n);

// XᵀX with an external BLAS SYRK (csrc/cpu/syrk.cpp). set_external_syrk takes
// the Fortran ssyrk and sgemm and an OpenBLAS-style thread-count setter
// (int (*)(int), returning the previous count); null pointers disable it.
void set_external_syrk(void* syrk, void* gemm, void* set_threads);
bool external_syrk_usable(int64_t rows, int64_t d, int64_t ldx);
// acc (row-major, upper triangle) += XᵀX and diag += its diagonal (diag may be
// null) for x (rows × d fp32, row stride ldx), in fp32 products over token
// chunks of `chunk` rows, each combined in fp64; scratch is d × d fp32, dense.
void xtx_syrk(const float* x, int64_t rows, int64_t d, int64_t ldx, int64_t chunk, float* scratch, double* acc,
              int64_t ld_acc, double* diag, int threads);
// The same for narrow inputs with the tokens split between threads, reading any
// activation with a mask (rows gathered and widened per thread); usable when
// xtx_syrk_tokens_usable(rows, d, threads). accumulate_xtx tries it first;
// xtx_syrk itself always splits the columns.
bool xtx_syrk_tokens_usable(int64_t rows, int64_t d, int threads);
void xtx_syrk_tokens(const Activation& x, const bool* mask, int64_t chunk, double* acc, int64_t ld_acc, double* diag,
                     int threads);

// Result of diag_stats: trace, top-k mean and effective rank (docs/method.md §3).
struct DiagStats {
  double trace;
  double topk_mean;
  double eff_rank;
};

// Closed-form metrics of `values` (length d, reordered in place) repeated
// d_out times. Uses selection (nth_element), not a full sort. Arguments are
// validated by the caller: d >= 1, d_out >= 1, 1 <= k <= d*d_out, 0 < alpha <= 1.
DiagStats diag_stats_kernel(double* values, int64_t d, int64_t d_out, int64_t k, double alpha);

// Copies n*n doubles/floats from src (row stride src_ld) to dst (dense) and
// reports whether every element is finite, in the same pass.
bool copy_check_finite(const double* src, int64_t src_ld, double* dst, int64_t n, int threads);
bool copy_check_finite(const float* src, int64_t src_ld, float* dst, int64_t n, int threads);

}  // namespace sensitivity_lora::cpu
