"""Which ClickHouse failures are the data's fault, and which are outages (pure: no I/O).

Every statement the aggregator runs is fixed SQL over a batch's rows. When one fails, either

- **the data cannot be stored**: a value out of the range of its type, text that does not
  parse as the type it must become. Retrying changes nothing: the same rows fail the same way
  forever, and since a batch is applied in order, every tenant behind them waits (issue 7).
  Those rows are isolated and dead-lettered (preflight.py); or
- **ClickHouse is not available, or not as we expect it**: connection refused, timeouts, memory
  or part limits, a read-only or missing table, a disk full, our own SQL or schema not matching.
  Retrying is right: the batch waits (its offsets are not committed), and the stall is visible
  (the aggregator health check, ``metering_aggregator_stalled_seconds``).

The decision uses ClickHouse's numeric error code, which clickhouse-connect sets as ``code`` on
its exceptions on both paths (the HTTP header ``X-ClickHouse-Exception-Code``, or the
``Code: N.`` of the embedded engine's message). A data error is one of ``DataErrorCode``: the
codes ClickHouse raises while parsing or converting *values*. Everything else, and any exception
that is not the driver's, is an outage. Codes raised while *analysing* a query (unknown
columns, illegal argument types, ...) are not in the list: they do not depend on the rows.
The code alone is not trusted either: preflight.py treats a failure as the data's only if the
same statements succeed without the data and an event reproduces it on its own, twice.
"""

from __future__ import annotations

import re
from enum import IntEnum

from clickhouse_connect.driver.exceptions import Error as DriverError


class DataErrorCode(IntEnum):
    """ClickHouse error codes that mean "these values cannot become these types"."""

    # text that does not parse as the type it must become (raw insert, JSON values, times)
    CANNOT_PARSE_TEXT = 6
    CANNOT_PARSE_ESCAPE_SEQUENCE = 25
    CANNOT_PARSE_QUOTED_STRING = 26
    CANNOT_PARSE_INPUT_ASSERTION_FAILED = 27
    # a value too short for its type: toDecimal128('') of a JSON field that is absent
    ATTEMPT_TO_READ_AFTER_EOF = 32
    CANNOT_PARSE_DATE = 38
    CANNOT_PARSE_DATETIME = 41
    # a value of another type than its column, at run time (e.g. an array where a string goes)
    TYPE_MISMATCH = 53
    # a number out of the range of its type: toDecimal128('1e29', 9) (the issue-7 event)
    ARGUMENT_OUT_OF_BOUND = 69
    CANNOT_CONVERT_TYPE = 70
    CANNOT_PARSE_NUMBER = 72
    INCORRECT_DATA = 117
    TOO_LARGE_ARRAY_SIZE = 128
    CANNOT_READ_ARRAY_FROM_TEXT = 130
    # a string longer than a FixedString column
    TOO_LARGE_STRING_SIZE = 131
    VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE = 321
    CANNOT_CONVERT_CHARSET = 346
    CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN = 349
    CANNOT_PARSE_UUID = 376
    # a decimal that does not fit the column it is converted into
    DECIMAL_OVERFLOW = 407
    CANNOT_PARSE_BOOL = 467
    CANNOT_READ_MAP_FROM_TEXT = 563
    CANNOT_PARSE_IPV4 = 675
    CANNOT_PARSE_IPV6 = 676
    UNKNOWN_ELEMENT_OF_ENUM = 691


_DATA_CODES = frozenset(int(c) for c in DataErrorCode)


def error_code(exc: BaseException) -> int | None:
    """ClickHouse's numeric code of a driver exception, None for anything else."""
    if not isinstance(exc, DriverError):
        return None
    code = exc.code
    return code if isinstance(code, int) else None


def is_data_error(exc: BaseException) -> bool:
    """True when ``exc`` says ClickHouse refused the *values* of a statement (see the module
    docstring); False for outages and for every exception that is not ClickHouse's."""
    code = error_code(exc)
    return code is not None and code in _DATA_CODES


# Where ClickHouse's message stops describing the value and starts describing the query plan
# (the rollup statements' plans are kilobytes long).
_PLAN_TAIL = re.compile(r":\s*(?:while executing|In scope|while pushing to view)\b.*", re.DOTALL)
_EXCEPTION = "DB::Exception: "
_TAIL_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)(?:\s*\((?:version|for url) [^)]*\))*\s*$")


def reason(exc: BaseException, limit: int = 400) -> str:
    """The engine's own words for a failed statement, short enough for a dead-letter header or
    a health check: ``"DECIMAL_OVERFLOW (407): Decimal convert overflow: ..."``."""
    text = str(exc).strip()
    code = error_code(exc)
    name = getattr(exc, "name", None) if isinstance(exc, DriverError) else None
    if name is None:
        m = _TAIL_NAME.search(text)
        name = m.group(1) if m else None
    at = text.rfind(_EXCEPTION)  # "Code: 41. DB::Exception: Code: 41. DB::Exception: ..."
    if at >= 0:
        text = text[at + len(_EXCEPTION) :]
    text = _PLAN_TAIL.sub("", text).strip()
    text = _TAIL_NAME.sub("", text).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if code is None:
        return f"{type(exc).__name__}: {text}"
    return f"{name or 'ClickHouse error'} ({code}): {text}"


class NotTheData(Exception):
    """A statement failed with a data error code, but no event reproduces it on its own (or the
    statements fail without any data): it is not the data's fault, so it is an outage."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(f"{message}: {reason(cause)}")
        self.cause = cause
