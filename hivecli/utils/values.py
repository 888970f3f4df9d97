"""Numbers that arrive from elsewhere (a DHT record, an RPC reply, a metrics row): what they claim
to be, or None. Any peer may send anything: a bool, NaN, infinity, a string, an integer too large
for a float."""

from __future__ import annotations

import math
import numbers
from typing import Any


def finite(value: Any, low: float = -math.inf, high: float = math.inf) -> float | None:
    """`value` as a float if it is a finite real number (a bool is none) within [low, high], else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):  # an int too large for a float
        return None
    return number if math.isfinite(number) and low <= number <= high else None
