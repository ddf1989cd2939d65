// Thin torch binding of the CUDA kernels: registers CUDA implementations of the schemas
// defined in csrc/bindings.cpp. Checks arguments (shared checks from cpu/checks.h), picks the
// current stream, allocates workspaces, and calls the torch-free C launchers in launchers.h.
// Built only when torch has CUDA (setup.py adds this file to the CUDAExtension).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu/checks.h"
#include "cuda/launchers.h"

namespace sensitivity_lora {
namespace cuda {
namespace {

constexpr int64_t kTokenChunk = 4096;            // as reference.TOKEN_CHUNK (fp32 chunk sums)
constexpr int64_t kMaxSplitBytes = int64_t{1} << 30;  // cap on the xtx split workspace

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// x with unit feature stride in a dtype the kernels read (fp64 is reduced in fp32, as the reference does).
at::Tensor kernel_input(const at::Tensor& x) {
  at::Tensor y = x.scalar_type() == at::kDouble ? x.to(at::kFloat) : x;
  return y.stride(1) == 1 ? y : y.contiguous();
}

int dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return SL_FLOAT16;
    case at::kBFloat16: return SL_BFLOAT16;
    default: return SL_FLOAT32;
  }
}

const uint8_t* mask_ptr(const std::optional<at::Tensor>& mask, at::Tensor& holder) {
  if (!mask.has_value()) return nullptr;
  holder = mask->to(at::kBool).contiguous();
  return reinterpret_cast<const uint8_t*>(holder.data_ptr<bool>());
}

void check_device(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": the CUDA kernel got a ", x.device(), " tensor; move it to the GPU");
}

// acc += sums (and acc_sum += sums of x) through the sumsq launcher; contiguous accumulators only.
void sumsq_into(const char* op, const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                const std::optional<at::Tensor>& acc_sum) {
  const at::Tensor xin = kernel_input(x);
  at::Tensor mask_holder;
  const uint8_t* m = mask_ptr(mask, mask_holder);
  at::Tensor out = acc.is_contiguous() ? acc : at::zeros_like(acc, at::MemoryFormat::Contiguous);
  at::Tensor out_sum;
  if (acc_sum.has_value()) out_sum = acc_sum->is_contiguous() ? *acc_sum : at::zeros_like(*acc_sum, at::MemoryFormat::Contiguous);
  const int64_t n = xin.size(0), d = xin.size(1);
  const size_t bytes = sl_sumsq_workspace_bytes(n, d, acc_sum.has_value());
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes / sizeof(double)) + 1}, acc.options());
  check_cuda(sl_sumsq_launch(xin.data_ptr(), dtype_code(xin), n, d, xin.stride(0), m, out.data_ptr<double>(),
                             acc_sum.has_value() ? out_sum.data_ptr<double>() : nullptr, ws.data_ptr(),
                             at::cuda::getCurrentCUDAStream()),
             op);
  if (!out.is_same(acc)) acc.add_(out);
  if (acc_sum.has_value() && !out_sum.is_same(*acc_sum)) acc_sum->add_(out_sum);
}

void accumulate_sumsq(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                      const std::optional<at::Tensor>& acc_sum) {
  check_activation("accumulate_sumsq", x);
  check_device("accumulate_sumsq", x);
  check_mask("accumulate_sumsq", mask, x);
  check_accumulator("accumulate_sumsq", "acc", acc, {x.size(1)}, x);
  if (acc_sum.has_value()) check_accumulator("accumulate_sumsq", "acc_sum", *acc_sum, {x.size(1)}, x);
  if (x.size(0) == 0 || x.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  sumsq_into("accumulate_sumsq", acc, x, mask, acc_sum);
}

void accumulate_xtx(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                    const std::optional<at::Tensor>& diag) {
  check_activation("accumulate_xtx", x);
  check_device("accumulate_xtx", x);
  check_mask("accumulate_xtx", mask, x);
  check_accumulator("accumulate_xtx", "acc", acc, {x.size(1), x.size(1)}, x);
  if (diag.has_value()) check_accumulator("accumulate_xtx", "diag", *diag, {x.size(1)}, x);
  if (x.size(0) == 0 || x.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1);
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    const at::Tensor xin = kernel_input(x);
    at::Tensor mask_holder;
    const uint8_t* m = mask_ptr(mask, mask_holder);
    // Enough blocks to fill the GPU twice: split the tokens when there are few output tiles.
    const int64_t tiles = (d + 127) / 128, pairs = tiles * (tiles + 1) / 2;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t chunks = (n + kTokenChunk - 1) / kTokenChunk;
    int64_t splits = std::min<int64_t>({chunks, (2 * sms + pairs - 1) / pairs, kMaxSplitBytes / (8 * d * d), 1024});
    splits = std::max<int64_t>(splits, 1);
    at::Tensor out = acc.stride(1) == 1 ? acc : at::zeros({d, d}, acc.options());
    at::Tensor ws;
    if (splits > 1) ws = at::empty({static_cast<int64_t>(sl_xtx_workspace_bytes(d, static_cast<int>(splits)) / 8)}, acc.options());
    check_cuda(sl_xtx_launch(xin.data_ptr(), dtype_code(xin), n, d, xin.stride(0), m, out.data_ptr<double>(),
                             out.stride(0), static_cast<int>(splits), splits > 1 ? ws.data_ptr() : nullptr,
                             at::cuda::getCurrentCUDAStream()),
               "accumulate_xtx");
    if (!out.is_same(acc)) acc.add_(out);
  } else {
    // fp32/fp64 activations: no tensor-core kernel here; the reference's algorithm via cuBLAS
    // (fp32 products per chunk of tokens, fp64 sums).
    at::Tensor xs = mask.has_value() ? x.index({mask->to(at::kBool)}) : x;
    for (int64_t s = 0; s < xs.size(0); s += kTokenChunk) {
      const at::Tensor c = xs.slice(0, s, std::min(s + kTokenChunk, xs.size(0))).to(at::kFloat);
      acc.add_(at::mm(c.t(), c).to(at::kDouble));
    }
  }
  if (diag.has_value()) sumsq_into("accumulate_xtx", *diag, x, mask, std::nullopt);
}

at::Tensor diag_stats(const at::Tensor& diag, int64_t d_out, int64_t k, double alpha) {
  check_diag_stats_args(diag, d_out, k, alpha);
  check_device("diag_stats", diag);
  const c10::cuda::CUDAGuard guard(diag.device());
  const at::Tensor dd = diag.reshape({-1}).to(at::kDouble).contiguous();
  at::Tensor out = at::empty({3}, dd.options());
  check_cuda(sl_diag_stats_launch(dd.data_ptr<double>(), dd.numel(), d_out, k, alpha, out.data_ptr<double>(),
                                  at::cuda::getCurrentCUDAStream()),
             "diag_stats");
  return out;  // on the input's device, as the Meta kernel declares
}

}  // namespace
}  // namespace cuda
}  // namespace sensitivity_lora

TORCH_LIBRARY_IMPL(sensitivity_lora, CUDA, m) {
  namespace cu = sensitivity_lora::cuda;
  m.impl("accumulate_sumsq", &cu::accumulate_sumsq);
  m.impl("accumulate_xtx", &cu::accumulate_xtx);
  m.impl("diag_stats", &cu::diag_stats);
}
