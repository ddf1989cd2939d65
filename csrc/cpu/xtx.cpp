// Σ x xᵀ into a symmetric fp64 accumulator, computing only the upper-triangle
// blocks with library GEMMs (at::mm -> MKL/OpenBLAS/oneDNN).
//
// Tokens are taken in chunks; per chunk the rows that pass the mask are
// gathered and widened to fp32 in one pass (no copy at all for dense fp32),
// each block product is formed in fp32 and added to the fp64 accumulator
// (so the error does not grow with the token count). The triangle is split
// recursively: two half triangles and one off-diagonal rectangle, down to
// small diagonal leaves that are computed as full squares. That costs about
// (1/2 + leaf/2d) of a full GEMM's flops; the diagonal comes from the leaves.
// Up to d = kScratchMaxD the block products land in one fp32 scratch matrix
// that is combined once per chunk (one parallel region instead of one per
// block: each region's barrier is costly when the cores are shared); above it
// each block is combined on its own, to bound the scratch memory.
// When an external BLAS SYRK was registered (scipy's OpenBLAS, see
// csrc/cpu/syrk.cpp) every fp32 chunk with a scratch uses it instead: half a
// GEMM's flops, one parallel region for all chunks of a dense fp32 input.
// Narrow inputs (d <= 1024) of any dtype and mask take the token-split SYRK
// (xtx_syrk_tokens) before any of this, when the SYRK and 2+ threads are there.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu_ops.h"
#include "kernels.h"

namespace sensitivity_lora::cpu {
namespace {

constexpr int64_t kTokenChunk = 4096;  // same chunking as reference.TOKEN_CHUNK
constexpr int64_t kLeaf = 256;         // diagonal blocks up to this size are full GEMMs
constexpr int64_t kMaxTile = 2048;     // bounds the fp32 scratch of one block product
constexpr int64_t kScratchMaxD = 8192;  // a whole-matrix fp32 scratch up to 256 MiB

// A (rows, cols) fp32 work matrix. Fresh pages cost about as much as the products at these widths
// (one SmolLM2 batch asks for ~0.4 GB of scratch), so up to kPooledMax bytes it lives in a
// per-thread pool that only grows and is reused by every later call; above, a plain allocation.
constexpr int64_t kPooledMax = int64_t{64} << 20;

at::Tensor work_matrix(std::vector<float>& pool, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  const int64_t count = rows * cols;
  if (count * static_cast<int64_t>(sizeof(float)) > kPooledMax)
    return at::empty({rows, cols}, options.dtype(at::kFloat));
  if (pool.size() < static_cast<size_t>(count)) pool.resize(count);
  return at::from_blob(pool.data(), {rows, cols}, options.dtype(at::kFloat));  // used only inside this call
}

struct Target {
  at::Tensor acc;   // (d, d) fp64 with stride(1) == 1
  at::Tensor diag;  // (d,) contiguous fp64, or undefined
  int threads;
  at::Tensor scratch;  // (d, d) fp32 for one chunk's products, or undefined
};

// acc[I, J] += X[:, I]ᵀ X[:, J] for one rectangle (I, J given as offset/size).
void add_product(const at::Tensor& X, int64_t i0, int64_t ni, int64_t j0, int64_t nj, bool diagonal,
                 const Target& t) {
  if (t.scratch.defined()) {  // combined later, all blocks at once
    at::Tensor out = t.scratch.narrow(0, i0, ni).narrow(1, j0, nj);
    at::mm_out(out, X.narrow(1, i0, ni).t(), X.narrow(1, j0, nj));
    return;
  }
  const at::Tensor S = at::mm(X.narrow(1, i0, ni).t(), X.narrow(1, j0, nj));
  double* acc = t.acc.data_ptr<double>() + i0 * t.acc.stride(0) + j0;
  if (S.scalar_type() == at::kDouble) {  // fp64 input: plain fp64 GEMM
    t.acc.narrow(0, i0, ni).narrow(1, j0, nj).add_(S);
    if (diagonal && t.diag.defined()) t.diag.narrow(0, i0, ni).add_(S.diagonal());
    return;
  }
  double* diag = diagonal && t.diag.defined() ? t.diag.data_ptr<double>() + i0 : nullptr;
  add_block_f32_to_f64(S.data_ptr<float>(), S.stride(0), acc, t.acc.stride(0), ni, nj, diagonal, diag, t.threads);
}

void rectangle(const at::Tensor& X, int64_t i0, int64_t ni, int64_t j0, int64_t nj, const Target& t) {
  for (int64_t a = 0; a < ni; a += kMaxTile)
    for (int64_t b = 0; b < nj; b += kMaxTile)
      add_product(X, i0 + a, std::min(kMaxTile, ni - a), j0 + b, std::min(kMaxTile, nj - b), false, t);
}

void triangle(const at::Tensor& X, int64_t lo, int64_t n, const Target& t) {
  if (n <= kLeaf) {
    add_product(X, lo, n, lo, n, true, t);
    return;
  }
  const int64_t half = std::min(n - 1, (n / 2 + 15) / 16 * 16);  // split on a multiple of 16
  triangle(X, lo, half, t);
  rectangle(X, lo, half, lo + half, n - half, t);
  triangle(X, lo + half, n - half, t);
}

bool syrk_usable(const at::Tensor& X, const Target& t) {
  return t.scratch.defined() && X.scalar_type() == at::kFloat && X.stride(1) == 1 && X.stride(0) >= X.size(1) &&
         external_syrk_usable(X.size(0), X.size(1), X.stride(0));
}

// acc += XᵀX of X (fp32, rows contiguous) with the external SYRK, chunk rows at a time.
void syrk_chunks(const at::Tensor& X, int64_t chunk, const Target& t) {
  xtx_syrk(X.data_ptr<float>(), X.size(0), X.size(1), X.stride(0), chunk, t.scratch.data_ptr<float>(),
           t.acc.data_ptr<double>(), t.acc.stride(0), t.diag.defined() ? t.diag.data_ptr<double>() : nullptr,
           t.threads);
}

// All upper-triangle products of one chunk, then (with a scratch) one combine.
void chunk_products(const at::Tensor& X, const Target& t) {
  const int64_t d = X.size(1);
  if (syrk_usable(X, t)) {
    // BLAS SYRK: half a GEMM's flops, combined per thread (csrc/cpu/syrk.cpp).
    syrk_chunks(X, X.size(0), t);
    return;
  }
  triangle(X, 0, d, t);
  if (t.scratch.defined())
    add_block_f32_to_f64(t.scratch.data_ptr<float>(), d, t.acc.data_ptr<double>(), t.acc.stride(0), d, d,
                         /*upper_only=*/true, t.diag.defined() ? t.diag.data_ptr<double>() : nullptr, t.threads);
}

}  // namespace

void accumulate_xtx(const at::Tensor& acc, const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in,
                    const std::optional<at::Tensor>& diag_in) {
  constexpr const char* op = "accumulate_xtx";
  check_activation(op, x_in);
  check_mask(op, mask_in, x_in);
  const int64_t n = x_in.size(0), d = x_in.size(1);
  check_accumulator(op, "acc", acc, {d, d}, x_in);
  if (diag_in.has_value()) check_accumulator(op, "diag", *diag_in, {d}, x_in);
  if (n == 0 || d == 0) return;

  // The blocks are added in place; accumulators the loops cannot address get a temporary.
  const bool acc_ok = d == 1 || acc.stride(1) == 1;
  const bool diag_ok = !diag_in.has_value() || diag_in->is_contiguous();
  Target t{acc_ok ? acc : at::zeros({d, d}, acc.options()),
           diag_in.has_value() ? (diag_ok ? *diag_in : at::zeros({d}, acc.options())) : at::Tensor(),
           at::get_num_threads(), at::Tensor()};

  auto finish = [&] {  // results that went to temporaries
    if (!acc_ok) acc.add_(t.acc);
    if (diag_in.has_value() && !diag_ok) diag_in->add_(t.diag);
  };
  const at::Tensor x = columns_contiguous(x_in);
  const at::Tensor mask = mask_of(mask_in);
  const bool fp64 = x.scalar_type() == at::kDouble;
  if (fp64) {
    // Rare: fp64 activations are kept fp64 (no narrowing against the caller's wish).
    const at::Tensor rows = mask.defined() ? x.index_select(0, mask.nonzero().squeeze(1)) : x;
    for (int64_t s = 0; s < rows.size(0); s += kTokenChunk)
      chunk_products(rows.narrow(0, s, std::min(kTokenChunk, rows.size(0) - s)), t);
    return finish();
  }
  if (xtx_syrk_tokens_usable(n, d, t.threads)) {
    // Narrow input, any dtype and mask: each thread runs the SYRK on its own token slice
    // (gathering and widening it first when it is masked or 16-bit); no shared scratch.
    xtx_syrk_tokens(activation_of(x), mask.defined() ? mask.data_ptr<bool>() : nullptr, kTokenChunk,
                    t.acc.data_ptr<double>(), t.acc.stride(0), t.diag.defined() ? t.diag.data_ptr<double>() : nullptr,
                    t.threads);
    return finish();
  }
  thread_local std::vector<float> scratch_pool, buffer_pool;
  if (d <= kScratchMaxD) t.scratch = work_matrix(scratch_pool, d, d, x.options());
  if (x.scalar_type() == at::kFloat && !mask.defined() && syrk_usable(x, t)) {
    syrk_chunks(x, kTokenChunk, t);  // every chunk in one parallel region
  } else if (x.scalar_type() == at::kFloat && !mask.defined()) {
    for (int64_t s = 0; s < n; s += kTokenChunk) chunk_products(x.narrow(0, s, std::min(kTokenChunk, n - s)), t);
  } else {
    const Activation a = activation_of(x);
    const bool* m = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    at::Tensor buffer = work_matrix(buffer_pool, std::min(kTokenChunk, n), d, x.options());
    for (int64_t s = 0; s < n; s += kTokenChunk) {
      const int64_t rows = gather_rows_f32(a, m, s, std::min(kTokenChunk, n - s), buffer.data_ptr<float>(), t.threads);
      if (rows > 0) chunk_products(buffer.narrow(0, 0, rows), t);
    }
  }
  finish();
}

}  // namespace sensitivity_lora::cpu
