"""Scoring: the three metrics of every target matrix, their fusion into θ, the rank rules, the result."""
from __future__ import annotations

from .allocate import allocate
from .metrics import ModuleMetrics, module_metrics
from .result import Allocation, ModuleAllocation, kendall_tau

__all__ = ["Allocation", "ModuleAllocation", "ModuleMetrics", "allocate", "kendall_tau", "module_metrics"]
