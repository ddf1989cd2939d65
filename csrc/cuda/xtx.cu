// XᵀX accumulation on tensor cores: bf16/fp16 in, fp32 accumulate, fp64 sums, upper tiles only.
//
// Grid: (upper-triangle 128x128 tile pairs, token splits). A block owns one output tile of one
// split and walks its tokens 32 at a time: X rows are staged in shared memory (16-byte vector
// loads where aligned; masked and out-of-range tokens/features as zeros), and 8 warps (2 x 4)
// each multiply a 64x32 piece with WMMA 16x16x16 fragments. Every kChunk tokens the fp32
// fragments are added to the fp64 output tile, which the block owns alone: no atomics, the
// result is deterministic and its error does not grow with the token count.
#include <mma.h>

#include "common.cuh"
#include "launchers.h"

namespace {

using namespace nvcuda;

constexpr int kTile = 128;     // output tile (features x features)
constexpr int kStep = 32;      // tokens per shared-memory stage
constexpr int kPad = 8;        // row padding of the staged tiles (bank conflicts)
constexpr int kLd = kTile + kPad;
constexpr int kThreads = 256;  // 8 warps: 2 along rows x 4 along columns
constexpr int kChunk = 4096;   // tokens per fp32 partial

// (ti, tj) with ti <= tj of the p-th upper tile pair, row-major over the upper triangle.
__device__ void upper_pair(int64_t p, int64_t n_tiles, int64_t* ti, int64_t* tj) {
  int64_t row = 0;
  while (p >= n_tiles - row) {
    p -= n_tiles - row;
    ++row;
  }
  *ti = row;
  *tj = row + p;
}

// Stage rows [t0, t0 + kStep) x features [f0, f0 + kTile) of x into s (kStep x kLd).
template <typename T, bool VEC>
__device__ void stage(T* s, const T* __restrict__ x, int64_t ld_x, int64_t d, int64_t f0, int64_t t0,
                      int64_t t_end, const uint8_t* __restrict__ mask) {
  constexpr int kPer = VEC ? 8 : 1;  // elements per load (8 x 16-bit = 16 bytes)
  for (int e = threadIdx.x * kPer; e < kStep * kTile; e += kThreads * kPer) {
    const int r = e / kTile, c = e % kTile;
    const int64_t t = t0 + r, f = f0 + c;
    const bool keep = t < t_end && (mask == nullptr || mask[t] != 0);
    T* dst = s + r * kLd + c;
    if constexpr (VEC) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (keep && f < d) v = __ldg(reinterpret_cast<const uint4*>(x + t * ld_x + f));  // d % 8 == 0
      *reinterpret_cast<uint4*>(dst) = v;
    } else {
      *dst = (keep && f < d) ? x[t * ld_x + f] : sl::zero_value<T>();
    }
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
xtx_kernel(const T* __restrict__ x, int64_t n_tokens, int64_t d, int64_t ld_x, const uint8_t* __restrict__ mask,
           double* __restrict__ out, int64_t ld_out, int64_t split_stride, int64_t tokens_per_split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(32) T s_a[kStep * kLd];
  __shared__ __align__(32) T s_b[kStep * kLd];
  __shared__ __align__(32) float s_out[kThreads / 32][16 * 16];
  const int64_t n_tiles = (d + kTile - 1) / kTile;
  int64_t ti, tj;
  upper_pair(blockIdx.x, n_tiles, &ti, &tj);
  const bool diagonal = ti == tj;
  const int64_t m0 = ti * kTile, n0 = tj * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // warp piece: rows wm*64.., cols wn*32..
  double* tile_out = out + static_cast<int64_t>(blockIdx.y) * split_stride;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_split;
  const int64_t t_end = t_begin + tokens_per_split < n_tokens ? t_begin + tokens_per_split : n_tokens;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
  for (int64_t c0 = t_begin; c0 < t_end; c0 += kChunk) {
    const int64_t c_end = c0 + kChunk < t_end ? c0 + kChunk : t_end;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t t0 = c0; t0 < c_end; t0 += kStep) {
      stage<T, VEC>(s_a, x, ld_x, d, m0, t0, c_end, mask);
      if (!diagonal) stage<T, VEC>(s_b, x, ld_x, d, n0, t0, c_end, mask);
      __syncthreads();
      const T* b_src = diagonal ? s_a : s_b;
#pragma unroll
      for (int kk = 0; kk < kStep; kk += 16) {
        // A = X_mᵀ: staged row-major as (tokens x features), i.e. column-major (features x tokens).
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[4];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(a[i], s_a + kk * kLd + wm * 64 + i * 16, kLd);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], b_src + kk * kLd + wn * 32 + j * 16, kLd);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    // Flush the chunk: fragment -> per-warp staging -> fp64 read-modify-write of the owned tile.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(s_out[warp], acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t r = m0 + wm * 64 + i * 16 + e / 16, c = n0 + wn * 32 + j * 16 + e % 16;
          if (r < d && c < d) tile_out[r * ld_out + c] += static_cast<double>(s_out[warp][e]);
        }
        __syncwarp();
      }
    }
  }
#else
  // Tensor-core bf16/fp16 WMMA needs sm_80 or newer; the launcher is only built for those.
  __trap();
#endif
}

// acc[i, j] += sum_s ws[s, i, j] over the upper tiles (fixed order: deterministic).
__global__ void xtx_reduce_kernel(const double* __restrict__ ws, int splits, int64_t d, double* __restrict__ acc,
                                  int64_t ld_acc) {
  const int64_t total = d * d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / d, j = e % d;
    if (i / kTile > j / kTile) continue;
    double s = 0.0;
    for (int k = 0; k < splits; ++k) s += ws[k * total + e];
    acc[i * ld_acc + j] += s;
  }
}

template <typename T>
cudaError_t launch_typed(const T* x, int64_t n, int64_t d, int64_t ld_x, const uint8_t* mask, double* acc,
                         int64_t ld_acc, int splits, double* ws, cudaStream_t stream) {
  const int64_t n_tiles = (d + kTile - 1) / kTile;
  const int64_t n_pairs = n_tiles * (n_tiles + 1) / 2;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  const int64_t per_split = ((n_chunks + splits - 1) / splits) * kChunk;
  const int64_t used = (n + per_split - 1) / per_split;  // splits that get tokens
  if (n_pairs > 0x7fffffff || used > 65535) return cudaErrorInvalidValue;
  double* out = acc;
  int64_t ld_out = ld_acc, split_stride = 0;
  if (splits > 1) {
    cudaError_t err = cudaMemsetAsync(ws, 0, sl_xtx_workspace_bytes(d, splits), stream);
    if (err != cudaSuccess) return err;
    out = ws;
    ld_out = d;
    split_stride = d * d;
  }
  const bool vec = sl::aligned16(x) && ld_x % 8 == 0 && d % 8 == 0;
  const dim3 grid(static_cast<unsigned>(n_pairs), static_cast<unsigned>(used));
  if (vec) {
    xtx_kernel<T, true><<<grid, kThreads, 0, stream>>>(x, n, d, ld_x, mask, out, ld_out, split_stride, per_split);
  } else {
    xtx_kernel<T, false><<<grid, kThreads, 0, stream>>>(x, n, d, ld_x, mask, out, ld_out, split_stride, per_split);
  }
  if (splits > 1) {
    const int64_t blocks = (d * d + 255) / 256;
    xtx_reduce_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(
        ws, static_cast<int>(used), d, acc, ld_acc);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" size_t sl_xtx_workspace_bytes(int64_t d, int splits) {
  return splits > 1 ? static_cast<size_t>(splits) * static_cast<size_t>(d * d) * sizeof(double) : 0;
}

extern "C" cudaError_t sl_xtx_launch(const void* x, int dtype, int64_t n_tokens, int64_t d, int64_t ld_x,
                                     const uint8_t* mask, double* acc, int64_t ld_acc, int splits,
                                     void* workspace, cudaStream_t stream) {
  if (n_tokens <= 0 || d <= 0) return cudaSuccess;
  if (x == nullptr || acc == nullptr || ld_x < d || ld_acc < d || splits < 1) return cudaErrorInvalidValue;
  if (splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  double* ws = static_cast<double*>(workspace);
  switch (dtype) {
    case SL_FLOAT16:
      return launch_typed(static_cast<const __half*>(x), n_tokens, d, ld_x, mask, acc, ld_acc, splits, ws, stream);
    case SL_BFLOAT16:
      return launch_typed(static_cast<const __nv_bfloat16*>(x), n_tokens, d, ld_x, mask, acc, ld_acc, splits, ws,
                          stream);
    default:  // fp32 has no tensor-core path here; the binding handles it
      return cudaErrorInvalidValue;
  }
}
