"""Exact arithmetic of the read path: every step total, for any value the tables can hold.

Sums are read from ClickHouse as ``Decimal256(9)`` (up to 76 digits) and counts as ``UInt128``.
Python's default decimal context keeps 28 significant digits: under it a product silently
rounds, and a ``quantize`` whose result needs more digits raises ``InvalidOperation``. So nothing
here uses a decimal context: values become ``fractions.Fraction`` (exact, arbitrary precision),
are combined exactly (unit conversions, prices), and are rounded once, at the end, half away
from zero (docs/api.md, "Rounding"). Results are ``Decimal`` built from their digits, which is
exact whatever the context. Negative values (only a wrapped or hand-written stored value can be
negative) go through the same arithmetic and are reported as they are.

Inputs are finite by construction: ClickHouse decimals and integers always are, and entity
attributes pass ``finite_number`` first.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

Exact = Decimal | int | Fraction


def ratio(value: Exact, divisor: int) -> Fraction:
    """``value / divisor`` exactly (seconds to hours, seconds to minutes)."""
    return Fraction(value) / divisor


def _half_up_scaled(value: Exact, places: int) -> int:
    """``value`` x 10^places rounded to an integer, halves away from zero."""
    q = Fraction(value) * int(10**places)
    magnitude = (2 * abs(q.numerator) + q.denominator) // (2 * q.denominator)
    return magnitude if q >= 0 else -magnitude


def half_up(value: Exact, places: int) -> Decimal:
    """``value`` rounded to ``places`` decimal places (>= 0), halves away from zero."""
    if places < 0:
        raise ValueError(places)
    # From a string, a Decimal holds every digit given, whatever the context's precision.
    return Decimal(f"{_half_up_scaled(value, places)}E-{places}")


def half_up_int(value: Exact) -> int:
    """``value`` rounded to an integer, halves away from zero."""
    return _half_up_scaled(value, 0)


def finite_number(value: Any) -> Decimal | None:
    """A JSON number of an entity's attributes as the Decimal of its text (``0.07`` is 0.07, not
    the binary float nearest to it); None for anything else (a string, a boolean, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def json_number_text(value: Decimal) -> str:
    """The exact digits of a finite Decimal as a JSON number with a fraction part (``12.5``,
    ``3.0``, ``-0.25``; never an exponent, never NaN or Infinity)."""
    if not value.is_finite():
        raise ValueError(f"not a finite number: {value}")
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text + ".0" if "." not in text else text
