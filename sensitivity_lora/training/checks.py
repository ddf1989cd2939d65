"""The argument checks of the training components: one clear ValueError per bad value."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Union

Temperature = Union[float, str]  # a positive number, math.inf, or "auto"
AUTO = "auto"


def check_positive_number(name: str, value: Any, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value) or value <= 0 \
            or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


def check_seed(name: str, value: Any) -> None:
    """A seed is an integer (torch.Generator.manual_seed would refuse anything else only at its first use)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def check_temperature(temperature: Any, ess_fraction: Any) -> None:
    """τ of the quality sampler: a positive number, math.inf or "auto"; ess_fraction in (0, 1]."""
    if temperature != AUTO:
        check_positive_number("temperature (a number or 'auto')", temperature, allow_inf=True)
    if isinstance(ess_fraction, bool) or not isinstance(ess_fraction, Real) or not 0 < ess_fraction <= 1:
        raise ValueError(f"ess_fraction must be in (0, 1], got {ess_fraction!r}")
