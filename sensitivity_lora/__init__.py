"""sensitivity-lora: Hessian-sensitivity rank allocation for LoRA (Sensitivity-LoRA, arXiv 2509.09119).

    from sensitivity_lora import get_peft_model
    peft_model, allocation = get_peft_model(model, batches, avg_rank=8)

Names are imported lazily, so ``import sensitivity_lora`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Allocation": "result", "allocate": "allocation", "kendall_tau": "result",
    "CalibrationStatistics": "capture", "calibrate": "capture",
    "MetricSettings": "metrics", "ModuleMetrics": "metrics",
    "RankMismatchError": "peft_integration", "lora_config": "peft_integration", "verify_ranks": "peft_integration",
    "lora_config_from_ranks": "peft_integration",
    "compute_allocation": "pipeline", "get_peft_model": "pipeline", "score_modules": "pipeline",
    "NotPositiveDefiniteError": "reference",
    "CalibrationError": "statistics", "GroupStatistics": "statistics",
    "TargetError": "targets", "resolve_targets": "targets",
    "export_hessians": "hessian_io", "load_hessians": "hessian_io",
    "compute_allocation_streaming": "streaming",
    "compute_allocation_distributed": "distributed", "init_from_env": "distributed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sensitivity_lora' has no attribute {name!r}")
