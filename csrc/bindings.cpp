// The one registration point of sensitivity_lora._C: operator schemas, their
// CPU kernels and their Meta ("fake") kernels, so that the ops work with
// torch.library.opcheck, FakeTensor and torch.compile. CUDA kernels for the
// same schemas are registered in csrc/cuda/cuda_ops.cpp (TORCH_LIBRARY_IMPL).
//
// Importing the module (a plain CPython module, no pybind11) is what runs the
// registrations; the ops are then reached as torch.ops.sensitivity_lora.<op>.
#include <Python.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/checks.h"
#include "cpu/cpu_ops.h"

namespace sensitivity_lora {
namespace {

// Meta kernels: outputs of the right shape and dtype, no data. They use only
// SymInt-safe queries (dim, dtype, sym_sizes) so that tracing with dynamic
// shapes works; value checks happen in the real kernels.
void check_activation_meta(const char* op, const at::Tensor& acc, const at::Tensor& x, int64_t acc_dim) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": expected a (tokens, d) activation, got ", x.dim(), " dimensions");
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), op, ": activation dtype ", x.scalar_type(), " is not supported");
  TORCH_CHECK_VALUE(acc.scalar_type() == at::kDouble && acc.dim() == acc_dim, op, ": acc must be a float64 tensor with ",
                    acc_dim, " dimensions");
}

void accumulate_sumsq_meta(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&) {
  check_activation_meta("accumulate_sumsq", acc, x, 1);
}

void accumulate_xtx_meta(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&) {
  check_activation_meta("accumulate_xtx", acc, x, 2);
}

at::Tensor diag_stats_meta(const at::Tensor& diag, int64_t, int64_t, double) {
  return at::empty({3}, diag.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_damped_meta(const at::Tensor& H, double, int64_t, double) {
  TORCH_CHECK_VALUE(H.dim() == 2, "cholesky_damped needs a square matrix, got ", H.dim(), " dimensions");
  return {at::empty_symint(H.sym_sizes(), H.options()), at::empty({}, H.options().dtype(at::kDouble)),
          at::empty({}, H.options().dtype(at::kLong))};
}

at::Tensor cholesky_inverse_diag_meta(const at::Tensor& L) {
  TORCH_CHECK_VALUE(L.dim() == 2, "cholesky_inverse_diag needs a square matrix, got ", L.dim(), " dimensions");
  return at::empty_symint({L.sym_size(0)}, L.options());
}

}  // namespace
}  // namespace sensitivity_lora

TORCH_LIBRARY(sensitivity_lora, m) {
  m.def("accumulate_sumsq(Tensor(a!) acc, Tensor x, Tensor? mask, Tensor(b!)? acc_sum) -> ()");
  m.def("accumulate_xtx(Tensor(a!) acc, Tensor x, Tensor? mask, Tensor(b!)? diag) -> ()");
  m.def("diag_stats(Tensor diag, int d_out, int k, float alpha) -> Tensor");
  // (L, damping used, tries): the scalars are 0-dim tensors (fp64, int64) so that
  // torch.compile does not bake a traced value into the graph.
  m.def("cholesky_damped(Tensor H, float rel_damp, int max_tries, float ladder) -> (Tensor, Tensor, Tensor)");
  m.def("cholesky_inverse_diag(Tensor L) -> Tensor");
}

TORCH_LIBRARY_IMPL(sensitivity_lora, CPU, m) {
  namespace cpu = sensitivity_lora::cpu;
  m.impl("accumulate_sumsq", &cpu::accumulate_sumsq);
  m.impl("accumulate_xtx", &cpu::accumulate_xtx);
  m.impl("diag_stats", &cpu::diag_stats);
  m.impl("cholesky_damped", &cpu::cholesky_damped);
  m.impl("cholesky_inverse_diag", &cpu::cholesky_inverse_diag);
}

TORCH_LIBRARY_IMPL(sensitivity_lora, Meta, m) {
  namespace sl = sensitivity_lora;
  m.impl("accumulate_sumsq", &sl::accumulate_sumsq_meta);
  m.impl("accumulate_xtx", &sl::accumulate_xtx_meta);
  m.impl("diag_stats", &sl::diag_stats_meta);
  m.impl("cholesky_damped", &sl::cholesky_damped_meta);
  m.impl("cholesky_inverse_diag", &sl::cholesky_inverse_diag_meta);
}

namespace {

// _set_external_syrk(ssyrk, sgemm, set_threads): addresses (ints) of the Fortran
// ssyrk/sgemm and of an OpenBLAS-style thread setter; 0, 0, 0 disables it.
// Called by sensitivity_lora/_native.py, which finds them in scipy's BLAS.
PyObject* set_external_syrk_py(PyObject*, PyObject* args) {
  unsigned long long syrk = 0, gemm = 0, threads = 0;
  if (!PyArg_ParseTuple(args, "KKK", &syrk, &gemm, &threads)) return nullptr;
  sensitivity_lora::cpu::set_external_syrk(reinterpret_cast<void*>(syrk), reinterpret_cast<void*>(gemm),
                                           reinterpret_cast<void*>(threads));
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_set_external_syrk", set_external_syrk_py, METH_VARARGS,
     "Use an external BLAS SYRK for accumulate_xtx (addresses of ssyrk, sgemm, set_num_threads; 0s disable)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing the module loads this library, whose static initialisers above
// register the ops with the dispatcher; its one function configures the BLAS.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Compiled ops of sensitivity_lora (torch.ops.sensitivity_lora)",
                               -1, methods};
  return PyModule_Create(&module);
}
