"""The calendar logic of the query API (pure: no clock, no storage)."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from query_api.periods import (
    DateRange,
    Period,
    PeriodError,
    Window,
    add_months,
    billing_period,
    calendar_month,
    clamp_to_sql,
    coarsest_table,
    is_utc,
    iso_week,
    parse_iso_date,
    parse_tz,
    quota_period,
    row_usage_dates,
    split_months,
    table_for_window,
    window_count,
    window_floor,
    window_next,
)
from schemas.clickhouse import Table


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


moments = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2100, 12, 1), timezones=st.just(UTC)
)


# ---- months, billing periods, weeks ---------------------------------------------------------------


def test_add_months() -> None:
    assert add_months(2026, 11, 1) == (2026, 12)
    assert add_months(2026, 12, 1) == (2027, 1)
    assert add_months(2026, 1, -1) == (2025, 12)
    assert add_months(2026, 3, -14) == (2025, 1)


def test_calendar_month() -> None:
    assert calendar_month(utc(2026, 12, 31, 23, 59, 59)) == Period(utc(2026, 12, 1), utc(2027, 1, 1))
    assert calendar_month(utc(2026, 2, 1)) == Period(utc(2026, 2, 1), utc(2026, 3, 1))
    # Another zone's wall clock is converted to UTC first.
    assert calendar_month(datetime(2026, 3, 1, 0, 30, tzinfo=ZoneInfo("Europe/Berlin"))).start == utc(
        2026, 2, 1
    )


@pytest.mark.parametrize(
    ("now", "anchor", "start", "end"),
    [
        (utc(2026, 11, 22, 3), 15, utc(2026, 11, 15), utc(2026, 12, 15)),
        (utc(2026, 11, 15, 0), 15, utc(2026, 11, 15), utc(2026, 12, 15)),
        (utc(2026, 11, 14, 23, 59), 15, utc(2026, 10, 15), utc(2026, 11, 15)),
        (utc(2026, 1, 3), 10, utc(2025, 12, 10), utc(2026, 1, 10)),
        (utc(2026, 12, 31), 28, utc(2026, 12, 28), utc(2027, 1, 28)),
        (utc(2026, 3, 1), 28, utc(2026, 2, 28), utc(2026, 3, 28)),
        (utc(2026, 11, 22), 1, utc(2026, 11, 1), utc(2026, 12, 1)),
    ],
)
def test_billing_period(now: datetime, anchor: int, start: datetime, end: datetime) -> None:
    assert billing_period(now, anchor) == Period(start, end)


@pytest.mark.parametrize("anchor", [0, 29, 31, -1])
def test_billing_anchor_out_of_range(anchor: int) -> None:
    with pytest.raises(ValueError):
        billing_period(utc(2026, 1, 1), anchor)


@given(now=moments, anchor=st.integers(1, 28))
def test_billing_period_holds_now(now: datetime, anchor: int) -> None:
    p = billing_period(now, anchor)
    assert p.start <= now < p.end
    assert p.start.day == p.end.day == anchor
    assert timedelta(days=28) <= p.end - p.start <= timedelta(days=31)
    assert (p.start.hour, p.start.minute, p.start.second) == (0, 0, 0)


def test_iso_week() -> None:
    # 2026-11-22 is a Sunday: the week began on Monday the 16th.
    assert iso_week(utc(2026, 11, 22, 23, 59)) == Period(utc(2026, 11, 16), utc(2026, 11, 23))
    assert iso_week(utc(2026, 11, 23)) == Period(utc(2026, 11, 23), utc(2026, 11, 30))
    # Across a year boundary (2026-01-01 is a Thursday).
    assert iso_week(utc(2026, 1, 1, 12)) == Period(utc(2025, 12, 29), utc(2026, 1, 5))


@given(now=moments)
def test_iso_week_holds_now(now: datetime) -> None:
    p = iso_week(now)
    assert p.start <= now < p.end and p.end - p.start == timedelta(days=7)
    assert p.start.weekday() == 0 and p.start == p.start.replace(hour=0, minute=0, second=0, microsecond=0)


def test_quota_period() -> None:
    now = utc(2026, 11, 22, 3)
    assert quota_period("week", now) == iso_week(now)
    assert quota_period("2019-03", now) == Period(utc(2019, 3, 1), utc(2019, 4, 1))
    assert quota_period("2026-12", now) == Period(utc(2026, 12, 1), utc(2027, 1, 1))
    assert quota_period("9999-12", now).start == utc(9999, 12, 1)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Week",
        "month",
        "2019-3",
        "2019-13",
        "2019-00",
        "19-03",
        "2019-03-01",
        "2019/03",
        "2019-03\n",
        "0000-01",
        "٢٠١٩-03",
        " week",
        "week ",
    ],
)
def test_quota_period_rejects(bad: str) -> None:
    with pytest.raises(PeriodError):
        quota_period(bad, utc(2026, 1, 1))


def test_clamp_to_sql() -> None:
    assert clamp_to_sql(utc(1900, 1, 1)) == utc(1970, 1, 1)
    assert clamp_to_sql(utc(3000, 1, 1)) == utc(2106, 1, 1)
    assert clamp_to_sql(utc(2026, 5, 5)) == utc(2026, 5, 5)


# ---- document 004 dates ------------------------------------------------------------------------------


def test_parse_iso_date() -> None:
    assert parse_iso_date("2026-05-01") == date(2026, 5, 1)
    for bad in (
        "20260501",
        "2026-5-1",
        "2026-02-30",
        "2026-05-01T00:00",
        "",
        "yesterday",
        "２０２６-05-01",
        "2026-05-01\n",
    ):
        with pytest.raises(PeriodError):
            parse_iso_date(bad)


def test_row_usage_dates_defaults_and_cap() -> None:
    today = date(2026, 11, 22)
    assert row_usage_dates(None, None, today) == DateRange(date(2026, 11, 1), date(2026, 11, 21))
    assert row_usage_dates(date(2026, 5, 1), date(2026, 12, 31), today) == DateRange(
        date(2026, 5, 1), date(2026, 11, 21)
    )
    assert row_usage_dates(date(2026, 5, 1), date(2026, 6, 18), today) == DateRange(
        date(2026, 5, 1), date(2026, 6, 18)
    )
    # The current day is always excluded: on the first of a month the defaults select nothing.
    first = row_usage_dates(None, None, date(2026, 12, 1))
    assert first.empty and first == DateRange(date(2026, 12, 1), date(2026, 11, 30))
    assert row_usage_dates(date(2026, 11, 22), None, today).empty


def test_split_months() -> None:
    s = split_months(DateRange(date(2026, 5, 1), date(2026, 6, 18)))
    assert s.full == Period(utc(2026, 5, 1), utc(2026, 6, 1))
    assert s.partial == (Period(utc(2026, 6, 1), utc(2026, 6, 19)),)
    s = split_months(DateRange(date(2026, 4, 10), date(2026, 7, 31)))
    assert s.full == Period(utc(2026, 5, 1), utc(2026, 8, 1))
    assert s.partial == (Period(utc(2026, 4, 10), utc(2026, 5, 1)),)
    s = split_months(DateRange(date(2026, 6, 2), date(2026, 6, 18)))
    assert s.full is None and s.partial == (Period(utc(2026, 6, 2), utc(2026, 6, 19)),)
    s = split_months(DateRange(date(2026, 12, 5), date(2027, 1, 3)))
    assert s.full is None and s.partial == (
        Period(utc(2026, 12, 5), utc(2027, 1, 1)),
        Period(utc(2027, 1, 1), utc(2027, 1, 4)),
    )
    assert split_months(DateRange(date(2026, 6, 2), date(2026, 6, 1))).full is None


@given(
    first=st.dates(min_value=date(1971, 1, 1), max_value=date(2100, 1, 1)),
    days=st.integers(0, 800),
)
def test_split_months_tiles_the_range(first: date, days: int) -> None:
    r = DateRange(first, first + timedelta(days=days))
    s = split_months(r)
    pieces = sorted([*([s.full] if s.full else []), *s.partial], key=lambda p: p.start)
    assert pieces[0].start == r.as_period().start and pieces[-1].end == r.as_period().end
    for a, b in itertools.pairwise(pieces):
        assert a.end == b.start
    if s.full:
        assert s.full.start.day == 1 and s.full.end.day == 1 and s.full.start < s.full.end
    # A partial piece never spans a whole month (it would belong to usage_1mo).
    assert len(s.partial) <= 2
    for p in s.partial:
        assert p.end - p.start < timedelta(days=31)
        assert (p.end - timedelta(microseconds=1)).month == p.start.month


# ---- tables and windows ---------------------------------------------------------------------------


def test_coarsest_table() -> None:
    assert coarsest_table(utc(2026, 10, 1), utc(2026, 12, 1)) is Table.USAGE_1MO
    assert coarsest_table(utc(2026, 11, 16), utc(2026, 11, 23)) is Table.USAGE_1D
    assert coarsest_table(utc(2026, 10, 1), utc(2026, 11, 23)) is Table.USAGE_1D
    assert coarsest_table(utc(2026, 11, 1, 5), utc(2026, 11, 2)) is Table.USAGE_1H
    assert coarsest_table(utc(2026, 11, 1, 5, 45), utc(2026, 11, 2)) is Table.USAGE_15M
    assert coarsest_table(utc(2026, 11, 1, 5, 40), utc(2026, 11, 2)) is None
    assert coarsest_table(utc(2026, 11, 1, 0, 0, 1), utc(2026, 11, 2)) is None
    assert coarsest_table(utc(2026, 10, 1), utc(2026, 12, 1), limit=Table.USAGE_1H) is Table.USAGE_1H
    # A wall clock in another zone is judged in UTC.
    berlin = ZoneInfo("Europe/Berlin")
    assert (
        coarsest_table(datetime(2026, 11, 1, tzinfo=berlin), datetime(2026, 11, 2, tzinfo=berlin))
        is Table.USAGE_1H
    )


def test_table_for_window() -> None:
    u = ZoneInfo("UTC")
    k = ZoneInfo("Asia/Kolkata")
    start, end = utc(2026, 10, 1), utc(2026, 12, 1)
    assert table_for_window(Window.MONTH, start, end, u) is Table.USAGE_1MO
    assert table_for_window(Window.DAY, start, end, u) is Table.USAGE_1D
    assert table_for_window(Window.HOUR, start, end, UTC) is Table.USAGE_1H
    assert table_for_window(Window.FIFTEEN_MINUTES, start, end, u) is Table.USAGE_15M
    assert table_for_window(None, start, end, u) is Table.USAGE_1MO
    assert table_for_window(Window.DAY, utc(2026, 10, 1, 6), end, u) is Table.USAGE_1H
    # Local windows: 15-minute rows, whatever the window.
    assert table_for_window(Window.MONTH, start, end, k) is Table.USAGE_15M
    assert table_for_window(Window.DAY, start, end, ZoneInfo("America/New_York")) is Table.USAGE_15M
    # Raw events: MINUTE windows and ranges off 15-minute boundaries.
    assert table_for_window(Window.MINUTE, start, end, u) is None
    assert table_for_window(Window.DAY, utc(2026, 10, 1, 0, 7), end, u) is None
    assert is_utc(ZoneInfo("Etc/UTC")) and is_utc(UTC) and not is_utc(k)


def test_parse_tz() -> None:
    assert parse_tz("Europe/Berlin") == ZoneInfo("Europe/Berlin")
    assert parse_tz("America/Argentina/Buenos_Aires").key == "America/Argentina/Buenos_Aires"
    for bad in (
        "",
        "Mars/Olympus",
        "../../etc/passwd",
        "/etc/localtime",
        "Europe/../UTC",
        "x" * 80,
        "UTC\n",
        "Europe\\Berlin",
    ):
        with pytest.raises(PeriodError):
            parse_tz(bad)


def test_windows_across_dst() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    # 2026-03-29: clocks go forward, the local day lasts 23 hours; 2026-10-25: 25 hours.
    spring = window_floor(utc(2026, 3, 29, 12), Window.DAY, berlin)
    assert spring == datetime(2026, 3, 29, tzinfo=berlin)
    # (Aware datetimes sharing a tzinfo subtract as wall clocks: compare in UTC.)
    assert window_next(spring, Window.DAY, berlin).astimezone(UTC) - spring.astimezone(UTC) == timedelta(
        hours=23
    )
    autumn = window_floor(utc(2026, 10, 25, 12), Window.DAY, berlin)
    assert window_next(autumn, Window.DAY, berlin).astimezone(UTC) - autumn.astimezone(UTC) == timedelta(
        hours=25
    )
    month = window_floor(utc(2026, 3, 31, 23, 30), Window.MONTH, berlin)  # already April in Berlin
    assert month == datetime(2026, 4, 1, tzinfo=berlin)
    assert window_next(month, Window.MONTH, berlin) == datetime(2026, 5, 1, tzinfo=berlin)
    kolkata = ZoneInfo("Asia/Kolkata")
    day = window_floor(utc(2026, 11, 21, 20), Window.DAY, kolkata)
    assert day.astimezone(UTC) == utc(2026, 11, 21, 18, 30)
    hour = window_floor(utc(2026, 11, 21, 20, 10), Window.HOUR, kolkata)
    assert hour.astimezone(UTC) == utc(2026, 11, 21, 19, 30)
    assert window_next(hour, Window.HOUR, kolkata).astimezone(UTC) - hour.astimezone(UTC) == timedelta(
        hours=1
    )
    q = window_floor(utc(2026, 11, 21, 20, 14, 59), Window.FIFTEEN_MINUTES, UTC)
    assert q == utc(2026, 11, 21, 20) and window_next(q, Window.FIFTEEN_MINUTES, UTC) == utc(
        2026, 11, 21, 20, 15
    )
    m = window_floor(utc(2026, 11, 21, 20, 14, 59, 999), Window.MINUTE, UTC)
    assert m == utc(2026, 11, 21, 20, 14) and window_next(m, Window.MINUTE, UTC) == utc(2026, 11, 21, 20, 15)


@given(
    t=moments,
    window=st.sampled_from(list(Window)),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "Asia/Kolkata", "America/St_Johns", "Australia/Lord_Howe"]),
)
def test_window_holds_its_moment(t: datetime, window: Window, zone: str) -> None:
    tz = ZoneInfo(zone)
    start = window_floor(t, window, tz)
    end = window_next(start, window, tz)
    assert start <= t < end


def test_window_count() -> None:
    assert window_count(utc(2026, 1, 1), utc(2026, 1, 2), Window.MINUTE) >= 1440
    assert window_count(utc(2026, 1, 1), utc(2027, 1, 1), Window.DAY) >= 365
    assert window_count(utc(2026, 1, 2), utc(2026, 1, 1), Window.HOUR) == 2
