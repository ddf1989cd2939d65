// C launchers of the CUDA kernels: plain pointers, sizes and a stream, no torch.
// Every launcher returns a cudaError_t (cudaSuccess, or the launch/argument error).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of the activation x.
enum sl_dtype { SL_FLOAT32 = 0, SL_FLOAT16 = 1, SL_BFLOAT16 = 2 };

// Bytes of scratch memory sl_sumsq_launch needs (fp64 partial sums per token chunk).
size_t sl_sumsq_workspace_bytes(int64_t n_tokens, int64_t d, int with_sum);

// acc[j] += sum_t x[t, j]^2 and, if acc_sum != NULL, acc_sum[j] += sum_t x[t, j] over the
// tokens t with mask[t] != 0 (mask may be NULL: all tokens). x is (n_tokens, d) with unit
// feature stride and row stride ld_x (elements). acc/acc_sum are float64, length d.
// Partials per chunk of tokens are fp32, combined in fp64 in a fixed order (deterministic).
// Uses 16-byte vector loads when x, ld_x and d allow it.
cudaError_t sl_sumsq_launch(const void* x, int dtype, int64_t n_tokens, int64_t d, int64_t ld_x,
                            const uint8_t* mask, double* acc, double* acc_sum, void* workspace,
                            cudaStream_t stream);

// Bytes of scratch memory sl_xtx_launch needs for `splits` token splits (0 when splits == 1).
size_t sl_xtx_workspace_bytes(int64_t d, int splits);

// acc[i, j] += sum_t x[t, i] * x[t, j] for i <= j (upper triangle, 128x128 tiles; entries
// below the diagonal inside diagonal tiles are written too) over tokens with mask[t] != 0.
// x is bf16 or fp16 (tensor cores, fp32 accumulation per chunk of tokens, fp64 sums),
// (n_tokens, d) with unit feature stride and row stride ld_x; acc is float64 (d, d) with
// row stride ld_acc. splits > 1 spreads the tokens over more thread blocks and needs
// sl_xtx_workspace_bytes(d, splits) of workspace.
cudaError_t sl_xtx_launch(const void* x, int dtype, int64_t n_tokens, int64_t d, int64_t ld_x,
                          const uint8_t* mask, double* acc, int64_t ld_acc, int splits,
                          void* workspace, cudaStream_t stream);

// out[0..2] = trace, top-k mean, effective rank of diag (length d, float64, entries >= 0)
// repeated d_out times; k = q * d_out + s (docs/method.md section 3). out is float64 device memory.
cudaError_t sl_diag_stats_launch(const double* diag, int64_t d, int64_t d_out, int64_t k,
                                 double alpha, double* out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
