"""The argument checks of the training components: one clear ValueError per bad value."""
from __future__ import annotations

import math
from numbers import Real
from typing import Any


def check_positive_number(name: str, value: Any, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value) or value <= 0 \
            or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
