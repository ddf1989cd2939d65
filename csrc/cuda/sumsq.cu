// Per-feature sum of squares (and sum) over masked tokens, with 16-byte vector loads.
//
// Grid: (feature strips of 32 vectors, chunks of kChunk tokens). 256 threads = 32 vector
// columns x 8 token lanes. Each thread sums its tokens in fp32; the 8 lanes are combined in
// shared memory and the chunk's partial is written in fp64. A second kernel adds the chunk
// partials in a fixed order, so the result is deterministic and does not drift with N.
#include "common.cuh"
#include "launchers.h"

namespace {

constexpr int kChunk = 1024;  // tokens per partial
constexpr int kCols = 32;     // vector columns per block
constexpr int kLanes = 8;     // token lanes per block

template <typename T, int VEC>
__global__ void __launch_bounds__(kCols * kLanes)
sumsq_partial_kernel(const T* __restrict__ x, int64_t n_tokens, int64_t d, int64_t ld_x,
                     const uint8_t* __restrict__ mask, double* __restrict__ part_sq,
                     double* __restrict__ part_sum) {
  __shared__ float s_sq[kLanes][kCols * VEC];
  __shared__ float s_sum[kLanes][kCols * VEC];
  const int col = threadIdx.x % kCols, lane = threadIdx.x / kCols;
  const int64_t f0 = (static_cast<int64_t>(blockIdx.x) * kCols + col) * VEC;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int64_t t_end = t_begin + kChunk < n_tokens ? t_begin + kChunk : n_tokens;
  float sq[VEC], sm[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) sq[v] = sm[v] = 0.0f;
  if (f0 < d) {
    for (int64_t t = t_begin + lane; t < t_end; t += kLanes) {
      if (mask != nullptr && mask[t] == 0) continue;
      const T* row = x + t * ld_x + f0;
      alignas(16) T vals[VEC];  // target of the 16-byte load
      if constexpr (VEC > 1) {
        // One 16-byte load: the launcher checked the alignment of x, ld_x and d.
        *reinterpret_cast<uint4*>(vals) = __ldg(reinterpret_cast<const uint4*>(row));
      } else {
        vals[0] = row[0];
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float f = sl::to_float(vals[v]);
        sq[v] += f * f;
        sm[v] += f;
      }
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    s_sq[lane][col * VEC + v] = sq[v];
    s_sum[lane][col * VEC + v] = sm[v];
  }
  __syncthreads();
  // Threads of lane 0 combine the lanes in a fixed order and write the fp64 partial.
  if (lane == 0 && f0 < d) {
    for (int v = 0; v < VEC && f0 + v < d; ++v) {
      double a = 0.0, b = 0.0;
      for (int l = 0; l < kLanes; ++l) {
        a += s_sq[l][col * VEC + v];
        b += s_sum[l][col * VEC + v];
      }
      const int64_t out = static_cast<int64_t>(blockIdx.y) * d + f0 + v;
      part_sq[out] = a;
      if (part_sum != nullptr) part_sum[out] = b;
    }
  }
}

__global__ void sumsq_finish_kernel(const double* __restrict__ part, int64_t n_chunks, int64_t d,
                                    double* __restrict__ acc) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) s += part[c * d + j];
    acc[j] += s;
  }
}

template <typename T>
cudaError_t launch_typed(const T* x, int64_t n, int64_t d, int64_t ld_x, const uint8_t* mask,
                         double* acc, double* acc_sum, double* ws, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  double* part_sq = ws;
  double* part_sum = acc_sum != nullptr ? ws + n_chunks * d : nullptr;
  const bool vec = sl::aligned16(x) && (ld_x * static_cast<int64_t>(sizeof(T))) % 16 == 0 && d % kVec == 0;
  const int per_block = kCols * (vec ? kVec : 1);
  const dim3 grid(static_cast<unsigned>((d + per_block - 1) / per_block), static_cast<unsigned>(n_chunks));
  if (n_chunks > 65535) return cudaErrorInvalidValue;  // > 67M tokens in one call: split the call
  if (vec) {
    sumsq_partial_kernel<T, kVec><<<grid, kCols * kLanes, 0, stream>>>(x, n, d, ld_x, mask, part_sq, part_sum);
  } else {
    sumsq_partial_kernel<T, 1><<<grid, kCols * kLanes, 0, stream>>>(x, n, d, ld_x, mask, part_sq, part_sum);
  }
  const unsigned fin_blocks = static_cast<unsigned>((d + 255) / 256);
  sumsq_finish_kernel<<<fin_blocks, 256, 0, stream>>>(part_sq, n_chunks, d, acc);
  if (part_sum != nullptr) sumsq_finish_kernel<<<fin_blocks, 256, 0, stream>>>(part_sum, n_chunks, d, acc_sum);
  return cudaGetLastError();
}

}  // namespace

extern "C" size_t sl_sumsq_workspace_bytes(int64_t n_tokens, int64_t d, int with_sum) {
  const int64_t n_chunks = (n_tokens + kChunk - 1) / kChunk;
  return static_cast<size_t>(n_chunks * d * (with_sum ? 2 : 1)) * sizeof(double);
}

extern "C" cudaError_t sl_sumsq_launch(const void* x, int dtype, int64_t n_tokens, int64_t d, int64_t ld_x,
                                       const uint8_t* mask, double* acc, double* acc_sum, void* workspace,
                                       cudaStream_t stream) {
  if (n_tokens <= 0 || d <= 0) return cudaSuccess;
  if (x == nullptr || acc == nullptr || workspace == nullptr || ld_x < d) return cudaErrorInvalidValue;
  double* ws = static_cast<double*>(workspace);
  switch (dtype) {
    case SL_FLOAT32:
      return launch_typed(static_cast<const float*>(x), n_tokens, d, ld_x, mask, acc, acc_sum, ws, stream);
    case SL_FLOAT16:
      return launch_typed(static_cast<const __half*>(x), n_tokens, d, ld_x, mask, acc, acc_sum, ws, stream);
    case SL_BFLOAT16:
      return launch_typed(static_cast<const __nv_bfloat16*>(x), n_tokens, d, ld_x, mask, acc, acc_sum, ws, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
