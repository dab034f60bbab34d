"""The read path's exact arithmetic and rendering (query_api/exact.py, ``exact_json``), held to
Python's Decimal in a context wide enough never to round (the default one keeps 28 digits)."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import Any

import pytest
from fastapi import Response
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from query_api.exact import finite_number, half_up, half_up_int, json_number_text, ratio
from query_api.models import ExactNumber, exact_json

#: Every value a Decimal256(9) sum can hold, and a little beyond.
stored = st.decimals(
    min_value=Decimal("-1e68"), max_value=Decimal("1e68"), places=9, allow_nan=False, allow_infinity=False
)


def reference(value: Decimal, divisor: int, places: int) -> Decimal:
    with localcontext(prec=500):
        return (value / divisor).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


@given(stored, st.sampled_from([1, 60, 3600, 7]), st.integers(min_value=0, max_value=9))
def test_half_up_matches_a_wide_decimal_context(value: Decimal, divisor: int, places: int) -> None:
    got = half_up(ratio(value, divisor), places)
    assert got == reference(value, divisor, places)
    assert got.as_tuple().exponent == -places
    assert half_up_int(ratio(value, divisor)) == int(reference(value, divisor, 0))


def test_half_up_halves_go_away_from_zero() -> None:
    assert [half_up_int(Fraction(n, 2)) for n in (-3, -1, 1, 3)] == [-2, -1, 1, 2]
    assert half_up(Decimal("0.005"), 2) == Decimal("0.01")
    assert half_up(Decimal("-0.005"), 2) == Decimal("-0.01")
    assert str(half_up(0, 6)) == "0.000000"


def test_no_context_limits_apply() -> None:
    """The steps that raised InvalidOperation under the default 28-digit context."""
    wrapped = Decimal("-160282366920938463463374607431.768211456")
    with pytest.raises(ArithmeticError):
        (wrapped / 3600).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
    assert half_up(ratio(wrapped, 3600), 6) == Decimal("-44522879700260684295381835.397713")
    assert half_up_int(Fraction(Decimal("99999999999999999999999999999.999999999")) * 1000) == 10**32


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.07, Decimal("0.07")),
        (3, Decimal(3)),
        (1e30, Decimal("1E+30")),
        (2**64 - 1, Decimal(2**64 - 1)),
        ("0.07", None),
        (True, None),
        (None, None),
        ([1], None),
        (float("nan"), None),
        (float("inf"), None),
    ],
)
def test_finite_number(value: Any, expected: Decimal | None) -> None:
    assert finite_number(value) == expected


@given(stored)
def test_json_number_text_is_the_exact_value(value: Decimal) -> None:
    text = json_number_text(value)
    assert "e" not in text.lower() and "." in text
    parsed = json.loads(text, parse_float=Decimal)
    assert parsed == value


def test_json_number_text_refuses_what_json_cannot_say() -> None:
    for bad in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError):
            json_number_text(Decimal(bad))
    assert json_number_text(Decimal("-0.000")) == "0.0"
    assert json_number_text(Decimal("1E+3")) == "1000.0"


class _Row(BaseModel):
    value: ExactNumber | None
    count: int
    name: str


class _Answer(BaseModel):
    rows: list[_Row]


def test_exact_json_writes_numbers_with_every_digit() -> None:
    headers_from = Response()
    headers_from.headers["X-Data-Refreshed-At"] = "2026-11-22T03:08:31.335Z"
    answer = _Answer(
        rows=[
            _Row(
                value=Decimal("-160282366920938463463374607431.768211456"), count=2 * (2**64 - 1), name="1.5"
            ),
            _Row(value=None, count=0, name="n"),
        ]
    )
    out = exact_json(answer, headers_from)
    assert out.status_code == 200 and out.media_type == "application/json"
    assert out.headers["X-Data-Refreshed-At"] == "2026-11-22T03:08:31.335Z"
    body = json.loads(bytes(out.body), parse_float=Decimal)
    assert body == {
        "rows": [
            {
                "value": Decimal("-160282366920938463463374607431.768211456"),
                "count": 2 * (2**64 - 1),
                "name": "1.5",
            },
            {"value": None, "count": 0, "name": "n"},
        ]
    }
