// CPU implementations of the sensitivity_lora ops (schemas in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "kernels.h"

namespace sensitivity_lora::cpu {

void accumulate_sumsq(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                      const std::optional<at::Tensor>& acc_sum);
void accumulate_xtx(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                    const std::optional<at::Tensor>& diag);
at::Tensor diag_stats(const at::Tensor& diag, int64_t d_out, int64_t k, double alpha);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_damped(const at::Tensor& H, double rel_damp, int64_t max_tries,
                                                        double ladder);
at::Tensor cholesky_inverse_diag(const at::Tensor& L);

// Helpers shared by the wrappers (defined in ops_cpu.cpp).
ElemType elem_type(at::ScalarType t);
at::Tensor columns_contiguous(const at::Tensor& x);  // copies only if columns are strided
Activation activation_of(const at::Tensor& x);        // x must have contiguous columns
at::Tensor mask_of(const std::optional<at::Tensor>& mask);  // contiguous bool, or undefined

}  // namespace sensitivity_lora::cpu
