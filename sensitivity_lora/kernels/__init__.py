"""Triton kernels of the op table, one file per op.

sumsq.py (accumulate_sumsq), xtx.py (accumulate_xtx), diag_stats.py (diag_stats),
cholesky.py (blocked Cholesky with a Triton trailing update; cholesky_damped).
They are registered as the "triton" backend by ``sensitivity_lora.ops.triton_backend``. Each
runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests).
Launch configurations are fixed per dtype (no autotuning).
"""
