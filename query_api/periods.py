"""Calendar logic of the query API, pure (no I/O, no clock: ``now`` and ``today`` are arguments).

Every period here is half-open, ``[start, end)``, in UTC unless a time zone is named. The period
tables hold UTC windows of 15 minutes, an hour, a day and a month, so a range can be answered
from the coarsest table whose windows tile it exactly; ``coarsest_table`` picks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.clickhouse import Table

#: ClickHouse ``DateTime`` covers [1970-01-01, 2106-02-07); SQL bounds are clamped into it so an
#: absurd but well-formed date gives an empty answer rather than an overflow.
MIN_SQL_TIME = datetime(1970, 1, 1, tzinfo=UTC)
MAX_SQL_TIME = datetime(2106, 1, 1, tzinfo=UTC)

_QUOTA_MONTH = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")
_ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_UTC_NAMES = frozenset(
    {"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/GMT", "GMT", "Etc/Zulu", "Zulu", "Universal"}
)


class PeriodError(ValueError):
    """A period parameter that cannot be understood (the API answers 400 with this message)."""


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("Period bounds must be timezone-aware")


class Window(StrEnum):
    """Window sizes of the generic meter query."""

    MINUTE = "MINUTE"
    FIFTEEN_MINUTES = "FIFTEEN_MINUTES"
    HOUR = "HOUR"
    DAY = "DAY"
    MONTH = "MONTH"


class Granularity(StrEnum):
    """Document 004's reporting granularity."""

    DAILY = "daily"
    MONTHLY = "monthly"


# ---- months and days -------------------------------------------------------------------------


def add_months(year: int, month: int, n: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + n
    return index // 12, index % 12 + 1


def month_start(year: int, month: int) -> datetime:
    return datetime(year, month, 1, tzinfo=UTC)


def midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def calendar_month(now: datetime) -> Period:
    """The UTC calendar month holding ``now`` (document 000's "this month", document 003's
    billing period)."""
    now = now.astimezone(UTC)
    ny, nm = add_months(now.year, now.month, 1)
    return Period(month_start(now.year, now.month), month_start(ny, nm))


def billing_period(now: datetime, anchor_day: int) -> Period:
    """The billing period holding ``now`` for a workspace billed on ``anchor_day`` (1-28, so it
    exists in every month): from that day of a month, 00:00 UTC, to the same day of the next."""
    if not 1 <= anchor_day <= 28:
        raise ValueError(f"billing anchor day must be 1-28, got {anchor_day}")
    now = now.astimezone(UTC)
    year, month = (now.year, now.month) if now.day >= anchor_day else add_months(now.year, now.month, -1)
    ny, nm = add_months(year, month, 1)
    return Period(datetime(year, month, anchor_day, tzinfo=UTC), datetime(ny, nm, anchor_day, tzinfo=UTC))


def iso_week(now: datetime) -> Period:
    """The ISO week holding ``now``: Monday 00:00 UTC to the next Monday."""
    today = now.astimezone(UTC).date()
    monday = today - timedelta(days=today.weekday())
    return Period(midnight(monday), midnight(monday + timedelta(days=7)))


def quota_period(value: str, now: datetime) -> Period:
    """Document 001's ``period``: ``week`` (the current ISO week) or ``yyyy-mm`` (that UTC month)."""
    if value == "week":
        return iso_week(now)
    m = _QUOTA_MONTH.fullmatch(value)
    if not m:
        raise PeriodError("period must be 'week' or a month as yyyy-mm")
    year, month = int(m.group(1)), int(m.group(2))
    if year < 1:
        raise PeriodError("period must be 'week' or a month as yyyy-mm")
    ny, nm = add_months(year, month, 1)
    # datetime stops at year 9999; such a month has no usage but is well-formed.
    end = month_start(ny, nm) if ny <= 9999 else datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    return Period(month_start(year, month), end)


def clamp_to_sql(t: datetime) -> datetime:
    """``t`` moved into the range a ClickHouse ``DateTime`` can hold."""
    return min(max(t, MIN_SQL_TIME), MAX_SQL_TIME)


# ---- document 004: dates ----------------------------------------------------------------------


def parse_iso_date(value: str) -> date:
    """A ``YYYY-MM-DD`` date, nothing looser (``date.fromisoformat`` also takes ``20260501``)."""
    if not _ISO_DATE.fullmatch(value):
        raise PeriodError("Enter a valid date (YYYY-MM-DD).")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise PeriodError("Enter a valid date (YYYY-MM-DD).") from None


@dataclass(frozen=True)
class DateRange:
    """Inclusive dates, as document 004 speaks of them; empty when ``first > last``."""

    first: date
    last: date

    @property
    def empty(self) -> bool:
        return self.first > self.last

    def as_period(self) -> Period:
        return Period(midnight(self.first), midnight(self.last) + timedelta(days=1))


def row_usage_dates(date_from: date | None, date_to: date | None, today: date) -> DateRange:
    """Document 004's defaults and cap: ``date_from`` defaults to the first of the current month;
    ``date_to`` defaults to yesterday and is always capped to yesterday (today's data is not final).
    The result may be empty (e.g. on the first of a month with the defaults)."""
    yesterday = today - timedelta(days=1)
    first = date_from if date_from is not None else today.replace(day=1)
    last = min(date_to, yesterday) if date_to is not None else yesterday
    return DateRange(first, last)


@dataclass(frozen=True)
class MonthSplit:
    """A date range cut into whole calendar months (answered from ``usage_1mo``) and the partial
    months at its edges (answered by merging the days of ``usage_1d``). Unique counts are exact
    either way: a month's states are merged, never its daily counts added."""

    full: Period | None
    partial: tuple[Period, ...]


def split_months(r: DateRange) -> MonthSplit:
    if r.empty:
        return MonthSplit(None, ())
    start, end = r.as_period().start, r.as_period().end
    # First month boundary at or after start, last at or before end.
    fy, fm = (start.year, start.month) if start.day == 1 else add_months(start.year, start.month, 1)
    full_start = month_start(fy, fm)
    full_end = month_start(end.year, end.month)
    if full_start > full_end:
        # Inside one month, touching neither of its ends.
        return MonthSplit(None, (Period(start, end),))
    partial = []
    if start < full_start:
        partial.append(Period(start, full_start))
    if full_end < end:
        partial.append(Period(full_end, end))
    full = Period(full_start, full_end) if full_start < full_end else None
    return MonthSplit(full, tuple(partial))


# ---- tables and windows -----------------------------------------------------------------------


def _aligned_to(t: datetime, table: Table) -> bool:
    t = t.astimezone(UTC)
    if t.second or t.microsecond or t.minute % 15:
        return False
    if table is Table.USAGE_15M:
        return True
    if t.minute:
        return False
    if table is Table.USAGE_1H:
        return True
    if t.hour:
        return False
    if table is Table.USAGE_1D:
        return True
    return t.day == 1  # USAGE_1MO


#: Coarsest first.
_TABLES = (Table.USAGE_1MO, Table.USAGE_1D, Table.USAGE_1H, Table.USAGE_15M)
_WINDOW_FINEST_TABLE = {
    Window.MONTH: Table.USAGE_1MO,
    Window.DAY: Table.USAGE_1D,
    Window.HOUR: Table.USAGE_1H,
    Window.FIFTEEN_MINUTES: Table.USAGE_15M,
}


def coarsest_table(start: datetime, end: datetime, limit: Table = Table.USAGE_1MO) -> Table | None:
    """The coarsest period table (no coarser than ``limit``) whose UTC windows tile ``[start, end)``
    exactly; None when even 15-minute windows do not (the range must then come from raw events)."""
    allowed = _TABLES[_TABLES.index(limit) :]
    for table in allowed:
        if _aligned_to(start, table) and _aligned_to(end, table):
            return table
    return None


def is_utc(tz: tzinfo) -> bool:
    return (isinstance(tz, ZoneInfo) and tz.key in _UTC_NAMES) or tz is UTC


def table_for_window(window: Window | None, start: datetime, end: datetime, tz: tzinfo) -> Table | None:
    """Which period table answers windows of ``window`` in ``tz`` over ``[start, end)``.

    In UTC a window's boundaries are boundaries of the table of the same size. In any other zone
    local days, months and hours fall on 15-minute UTC boundaries (every current UTC offset is a
    multiple of 15 minutes), so the 15-minute table answers them exactly. MINUTE windows, and
    ranges not on 15-minute boundaries, are answered from raw events (None)."""
    if window is Window.MINUTE:
        return None
    if window is None:
        return coarsest_table(start, end)
    if not is_utc(tz):
        return coarsest_table(start, end, limit=Table.USAGE_15M)
    return coarsest_table(start, end, limit=_WINDOW_FINEST_TABLE[window])


def parse_tz(name: str) -> ZoneInfo:
    """An IANA zone name; anything else (including file-system tricks) is a PeriodError."""
    if not name or len(name) > 64 or not re.fullmatch(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+){0,2}", name):
        raise PeriodError("tz must be an IANA time zone name such as Europe/Berlin")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise PeriodError(f"unknown time zone {name!r}") from None


def window_floor(t: datetime, window: Window, tz: tzinfo) -> datetime:
    """The start of the ``window`` holding ``t``, in ``tz`` (returned aware in ``tz``)."""
    local = t.astimezone(tz)
    if window is Window.MINUTE:
        floored = local.replace(second=0, microsecond=0)
    elif window is Window.FIFTEEN_MINUTES:
        floored = local.replace(minute=local.minute - local.minute % 15, second=0, microsecond=0)
    elif window is Window.HOUR:
        floored = local.replace(minute=0, second=0, microsecond=0)
    elif window is Window.DAY:
        floored = _local_midnight(local.date(), tz)
    else:
        floored = _local_midnight(local.date().replace(day=1), tz)
    return floored


def window_next(start: datetime, window: Window, tz: tzinfo) -> datetime:
    """The start of the window after the one starting at ``start`` (DST-aware: a local day may
    last 23 or 25 hours)."""
    if window is Window.MINUTE:
        return (start.astimezone(UTC) + timedelta(minutes=1)).astimezone(tz)
    if window is Window.FIFTEEN_MINUTES:
        return (start.astimezone(UTC) + timedelta(minutes=15)).astimezone(tz)
    if window is Window.HOUR:
        return (start.astimezone(UTC) + timedelta(hours=1)).astimezone(tz)
    local = start.astimezone(tz).date()
    if window is Window.DAY:
        return _local_midnight(local + timedelta(days=1), tz)
    y, m = add_months(local.year, local.month, 1)
    return _local_midnight(date(y, m, 1), tz)


def _local_midnight(d: date, tz: tzinfo) -> datetime:
    """The first instant of local date ``d``; where midnight is skipped by a DST change the
    round trip through UTC lands on the first existing instant."""
    naive = datetime(d.year, d.month, d.day)
    return naive.replace(tzinfo=tz).astimezone(UTC).astimezone(tz)


def window_count(start: datetime, end: datetime, window: Window) -> int:
    """An upper bound of the number of windows in ``[start, end)`` (to refuse huge answers)."""
    seconds = max(0.0, (end - start).total_seconds())
    size = {
        Window.MINUTE: 60,
        Window.FIFTEEN_MINUTES: 900,
        Window.HOUR: 3600,
        Window.DAY: 82_800,  # a 23-hour DST day
        Window.MONTH: 28 * 86_400,
    }[window]
    return int(seconds // size) + 2
