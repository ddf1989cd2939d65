// Tensor-level wrappers of the raw sum-of-squares and diagonal-statistics
// kernels: validation, layout and dtype handling, then one kernel call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "checks.h"
#include "cpu_ops.h"
#include "kernels.h"

namespace sensitivity_lora::cpu {

ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kDouble: return ElemType::kFloat64;
    case at::kBFloat16: return ElemType::kBFloat16;
    case at::kHalf: return ElemType::kFloat16;
    default: TORCH_CHECK_VALUE(false, "unsupported activation dtype ", t);
  }
}

// A view the raw kernels can walk: columns contiguous (copy only if they are not).
at::Tensor columns_contiguous(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

Activation activation_of(const at::Tensor& x) {
  return {x.data_ptr(), elem_type(x.scalar_type()), x.size(0), x.size(1), x.size(0) <= 1 ? x.size(1) : x.stride(0)};
}

// A bool mask the kernels can index, or an undefined tensor for "all rows".
at::Tensor mask_of(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return {};
  return mask->to(at::kBool).contiguous();
}

void accumulate_sumsq(const at::Tensor& acc, const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in,
                      const std::optional<at::Tensor>& acc_sum) {
  constexpr const char* op = "accumulate_sumsq";
  check_activation(op, x_in);
  check_mask(op, mask_in, x_in);
  const int64_t d = x_in.size(1);
  check_accumulator(op, "acc", acc, {d}, x_in);
  if (acc_sum.has_value()) check_accumulator(op, "acc_sum", *acc_sum, {d}, x_in);
  if (x_in.size(0) == 0 || d == 0) return;

  const at::Tensor x = columns_contiguous(x_in);
  const at::Tensor mask = mask_of(mask_in);
  // The kernel adds into dense fp64 buffers; strided accumulators get a temporary.
  const bool direct = acc.is_contiguous() && (!acc_sum.has_value() || acc_sum->is_contiguous());
  at::Tensor a = direct ? acc : at::zeros({d}, acc.options());
  at::Tensor s = acc_sum.has_value() ? (direct ? *acc_sum : at::zeros({d}, acc.options())) : at::Tensor();
  sumsq_accumulate(activation_of(x), mask.defined() ? mask.data_ptr<bool>() : nullptr, a.data_ptr<double>(),
                   s.defined() ? s.data_ptr<double>() : nullptr, at::get_num_threads());
  if (!direct) {
    acc.add_(a);
    if (acc_sum.has_value()) acc_sum->add_(s);
  }
}

at::Tensor diag_stats(const at::Tensor& diag, int64_t d_out, int64_t k, double alpha) {
  check_diag_stats_args(diag, d_out, k, alpha);
  // A private fp64 copy: selection reorders it.
  at::Tensor values = diag.reshape({-1}).to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const DiagStats r = diag_stats_kernel(values.data_ptr<double>(), values.numel(), d_out, k, alpha);
  at::Tensor out = at::empty({3}, diag.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = r.trace;
  o[1] = r.topk_mean;
  o[2] = r.eff_rank;
  return out;
}

}  // namespace sensitivity_lora::cpu
