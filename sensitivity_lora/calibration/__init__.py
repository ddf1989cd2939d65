"""Calibration: hooks on the target modules turn layer inputs into per-input-group statistics.

Only this subpackage touches the model during scoring. ``run.block_statistics`` is
the one way it runs (one pass or block by block, one process or data-parallel).
"""
from __future__ import annotations

from .one_pass import calibrate
from .run import block_statistics
from .statistics import CalibrationStatistics, GroupStatistics, normalisation_factor
from .streaming import BlockStatistics, released
from .targets import resolve_targets

__all__ = ["BlockStatistics", "CalibrationStatistics", "GroupStatistics", "block_statistics", "calibrate",
           "normalisation_factor", "released", "resolve_targets"]
