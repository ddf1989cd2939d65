"""sensitivity-lora: Hessian-sensitivity rank allocation for LoRA (Sensitivity-LoRA, arXiv 2509.09119).

    from sensitivity_lora import sensitivity_peft_model, calibration_batches
    peft_model, allocation = sensitivity_peft_model(model, calibration_batches(texts, tokenizer), avg_rank=8)

Names are imported lazily, so ``import sensitivity_lora`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # the entry points
    "compute_allocation": "api", "sensitivity_peft_model": "api",
    "get_peft_model": "api",  # deprecated: renamed sensitivity_peft_model (it shadowed peft.get_peft_model)
    "SensitivityConfig": "peft_entry", "initialize_lora_sensitivity": "peft_entry",
    "AllocationSettings": "settings",
    "Allocation": "scoring", "kendall_tau": "scoring",
    "lora_config": "peft", "lora_config_from_ranks": "peft", "verify_ranks": "peft",
    "calibrate": "calibration", "calibration_batches": "data",
    "export_hessians": "hessians", "load_hessians": "hessians",
    "init_from_env": "calibration.distributed",
    # the errors
    "CalibrationError": "errors", "CheckpointMismatchError": "errors", "DataError": "errors",
    "MissingPackageError": "errors", "NotPositiveDefiniteError": "errors", "RankMismatchError": "errors",
    "TargetError": "errors",
}
__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from .api import compute_allocation, get_peft_model, sensitivity_peft_model
    from .calibration import calibrate
    from .calibration.distributed import init_from_env
    from .data import calibration_batches
    from .errors import (CalibrationError, CheckpointMismatchError, DataError, MissingPackageError,
                         NotPositiveDefiniteError, RankMismatchError, TargetError)
    from .hessians import export_hessians, load_hessians
    from .peft import lora_config, lora_config_from_ranks, verify_ranks
    from .peft_entry import SensitivityConfig, initialize_lora_sensitivity
    from .scoring import Allocation, kendall_tau
    from .settings import AllocationSettings


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sensitivity_lora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
