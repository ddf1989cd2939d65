// Argument checks shared by every device's implementation of the ops (the CUDA
// sources include this too), so that bad input gets the same clear ValueError
// everywhere. TORCH_CHECK_VALUE raises ValueError in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace sensitivity_lora {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// x: (tokens, d) activation of a supported floating dtype.
inline void check_activation(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": expected a (tokens, d) activation, got shape ", x.sizes(),
                    "; flatten the batch and sequence dimensions first (x.reshape(-1, d))");
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), op, ": activation dtype ", x.scalar_type(),
                    " is not supported; use float32, float64, bfloat16 or float16");
}

// mask: optional (tokens,) tensor on x's device, True for tokens that count.
inline void check_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& x) {
  if (!mask.has_value()) return;
  TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == x.size(0), op, ": mask shape ", mask->sizes(),
                    " does not match tokens ", x.size(0), "; pass a (tokens,) bool mask or None");
  TORCH_CHECK_VALUE(mask->device() == x.device(), op, ": mask is on ", mask->device(), " but x is on ",
                    x.device(), "; move them to the same device");
}

// An fp64 accumulator of the given shape on x's device.
inline void check_accumulator(const char* op, const char* name, const at::Tensor& acc, at::IntArrayRef shape,
                              const at::Tensor& x) {
  TORCH_CHECK_VALUE(acc.scalar_type() == at::kDouble, op, ": ", name, " must be float64 (accumulators are fp64 ",
                    "so that sums over many tokens do not drift), got ", acc.scalar_type(),
                    "; create it with dtype=torch.float64");
  TORCH_CHECK_VALUE(acc.sizes() == shape, op, ": ", name, " has shape ", acc.sizes(), " but x has d = ", x.size(1),
                    "; expected ", shape);
  TORCH_CHECK_VALUE(acc.device() == x.device(), op, ": ", name, " is on ", acc.device(), " but x is on ", x.device(),
                    "; move them to the same device");
}

inline void check_square(const char* op, const char* name, const at::Tensor& m) {
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == m.size(1), op, " needs a square matrix ", name, ", got shape ",
                    m.sizes());
  TORCH_CHECK_VALUE(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble, op, ": ", name,
                    " must be float32 or float64, got ", m.scalar_type());
}

// Validation of diag_stats' scalars, identical to reference.diag_stats.
inline void check_diag_stats_args(const at::Tensor& diag, int64_t d_out, int64_t k, double alpha) {
  const int64_t d = diag.numel();
  TORCH_CHECK_VALUE(d > 0 && d_out >= 1, "diag_stats needs a non-empty diagonal and d_out >= 1");
  TORCH_CHECK_VALUE(is_supported_float(diag.scalar_type()), "diag_stats: diagonal dtype ", diag.scalar_type(),
                    " is not supported; use a floating dtype");
  const int64_t m = d * d_out;
  TORCH_CHECK_VALUE(k >= 1 && k <= m, "k=", k, " out of range [1, ", m, "]");
  TORCH_CHECK_VALUE(alpha > 0.0 && alpha <= 1.0, "alpha=", alpha, " out of range (0, 1]");
}

// Ladder arguments of cholesky_damped.
inline void check_ladder_args(double rel_damp, int64_t max_tries, double ladder) {
  TORCH_CHECK_VALUE(max_tries >= 1, "cholesky_damped: max_tries=", max_tries, " must be >= 1");
  TORCH_CHECK_VALUE(rel_damp >= 0.0 && ladder >= 1.0, "cholesky_damped: rel_damp=", rel_damp, " and ladder=",
                    ladder, " must be >= 0 and >= 1 (the damping only grows)");
}

// Prefix of the message raised when the damping ladder is exhausted or H has
// non-finite entries; the Python wrapper turns it into NotPositiveDefiniteError.
constexpr const char* kNotPositiveDefinite = "NotPositiveDefiniteError: ";

}  // namespace sensitivity_lora
