"""Data errors vs outages (aggregators/errors.py), isolating refused events (preflight.isolate),
stall bookkeeping of process_with_retry and what /readyz makes of it. No ClickHouse here: the
engine's exceptions are built the way clickhouse-connect builds them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aggregators import metrics
from aggregators.errors import DataErrorCode, NotTheData, error_code, is_data_error, reason
from aggregators.preflight import _plain, isolate
from aggregators.processor import BatchProcessor, ListSink
from deploy.runner import aggregator_check
from query_api.health import Status, build_health_router

# What the embedded engine raised for the issue-7 event (trimmed: the real plan is ~3 kB).
CHDB_69 = (
    "Code: 69. DB::Exception: Decimal value is too big: 1 digits were read: '1'e29. Expected to "
    "read decimal with scale 9 and precision 38: while executing 'FUNCTION multiIf(equals(__table3.type, "
    "'ai.task.submitted'_String) :: 2, array(tuple('ai_tasks'_String, ...) : 41'. (ARGUMENT_OUT_OF_BOUND)"
)
HTTP_407 = (
    "Received ClickHouse exception, code: 407, server response: Code: 407. DB::Exception: Decimal "
    "convert overflow: 1234567890100 is not in range (-2147483648, 2147483647): while converting "
    "source column max(value_max) to destination column value_max. (DECIMAL_OVERFLOW) "
    "(version 26.9.1.1) (for url http://ch:8123)"
)


def db_error(code: int | None, message: str = "boom", name: str | None = None) -> DatabaseError:
    return DatabaseError(message, code=code, name=name)


@pytest.mark.parametrize(
    "code",
    [
        DataErrorCode.ARGUMENT_OUT_OF_BOUND,
        DataErrorCode.DECIMAL_OVERFLOW,
        DataErrorCode.CANNOT_PARSE_TEXT,
        DataErrorCode.CANNOT_PARSE_DATETIME,
        DataErrorCode.TYPE_MISMATCH,
        DataErrorCode.CANNOT_CONVERT_TYPE,
        DataErrorCode.INCORRECT_DATA,
        DataErrorCode.TOO_LARGE_STRING_SIZE,
    ],
)
def test_value_errors_are_data_errors(code: int) -> None:
    assert is_data_error(db_error(int(code)))


@pytest.mark.parametrize(
    "code",
    [
        60,  # UNKNOWN_TABLE (how the outage test makes an outage: a detached table)
        159,  # TIMEOUT_EXCEEDED
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        243,  # NOT_ENOUGH_SPACE
        252,  # TOO_MANY_PARTS
        47,  # UNKNOWN_IDENTIFIER: our SQL, not the data
        43,  # ILLEGAL_TYPE_OF_ARGUMENT: decided before any row is read
        33,  # CANNOT_READ_ALL_DATA: I/O
        None,  # a transport error has no code
    ],
)
def test_everything_else_is_an_outage(code: int | None) -> None:
    assert not is_data_error(db_error(code))


def test_only_the_drivers_exceptions_carry_a_code() -> None:
    assert error_code(OperationalError("retried", code=69)) == 69  # a subclass: still the engine's
    assert not is_data_error(RuntimeError("Code: 69. DB::Exception: looks like one"))
    assert not is_data_error(ConnectionRefusedError())
    assert not is_data_error(NotTheData("no event fails alone", db_error(69)))


def test_reason_keeps_the_engines_words_without_the_query_plan() -> None:
    r = reason(db_error(69, CHDB_69, "ARGUMENT_OUT_OF_BOUND"))
    assert r == (
        "ARGUMENT_OUT_OF_BOUND (69): Decimal value is too big: 1 digits were read: '1'e29. "
        "Expected to read decimal with scale 9 and precision 38"
    )
    r = reason(db_error(407, HTTP_407))  # no name attribute: taken from the message
    assert r.startswith("DECIMAL_OVERFLOW (407): Decimal convert overflow: 1234567890100 is not in range")
    assert "destination column value_max" in r and "version" not in r and "url" not in r
    assert len(reason(db_error(6, "Code: 6. DB::Exception: " + "x" * 5000), limit=100)) <= 130
    assert reason(ValueError("odd")) == "ValueError: odd"


def test_column_types_without_wrappers() -> None:
    assert _plain("SimpleAggregateFunction(sum, Decimal(38, 9))") == "Decimal(38, 9)"
    assert _plain("LowCardinality(String)") == "String"
    assert _plain("SimpleAggregateFunction(any, Map(String, String))") == "Map(String, String)"
    assert _plain("AggregateFunction(uniqExact, String)") == "AggregateFunction(uniqExact, String)"


# ---- isolate ------------------------------------------------------------------------------------


class Engine:
    """A stand-in for the trial statements: rows in ``poison`` fail (a data error), with
    optional twists."""

    def __init__(self, poison: set[int], flaky_after: int | None = None, together: bool = False) -> None:
        self.poison = poison
        self.calls: list[tuple[int, ...]] = []
        self.flaky_after = flaky_after
        self.together = together

    def trial(self, rows: Sequence[int]) -> BaseException | None:
        self.calls.append(tuple(rows))
        if self.flaky_after is not None and len(self.calls) > self.flaky_after:
            return None  # a "data error" that went away: it was not the data
        if self.together:
            return db_error(69) if len(rows) > 1 else None
        bad = self.poison.intersection(rows)
        return db_error(69, f"row {min(bad)}") if bad else None

    def dry(self) -> BaseException | None:
        return None


def test_nothing_to_isolate_costs_one_trial() -> None:
    eng = Engine(set())
    assert isolate(list(range(100)), eng.trial, eng.dry) == []
    assert len(eng.calls) == 1


@pytest.mark.parametrize("poison", [{0}, {57}, {99}, {3, 4}, {0, 50, 99}, set(range(100))])
def test_exactly_the_rows_that_fail_alone_are_refused(poison: set[int]) -> None:
    eng = Engine(poison)
    found = isolate(list(range(100)), eng.trial, eng.dry)
    assert sorted(r for r, _ in found) == sorted(poison)
    assert all(str(e) == f"row {r}" for r, e in found)  # each with its own error
    if len(poison) == 1:
        assert len(eng.calls) <= 2 * 7 + 3  # ~2·log2(n): a bisection, not one trial per row


def test_a_single_event_batch() -> None:
    eng = Engine({7})
    assert [r for r, _ in isolate([7], eng.trial, eng.dry)] == [7]


def test_statements_that_fail_without_data_are_an_outage() -> None:
    eng = Engine({1})
    with pytest.raises(NotTheData, match="without any data"):
        isolate([0, 1, 2], eng.trial, lambda: db_error(53, "analysis"))


def test_an_error_that_does_not_come_back_is_not_the_data() -> None:
    eng = Engine({5}, flaky_after=1)
    with pytest.raises(NotTheData):
        isolate(list(range(10)), eng.trial, eng.dry)


def test_rows_that_fail_only_together_are_not_refused() -> None:
    eng = Engine(set(), together=True)
    with pytest.raises(NotTheData, match="fails on its own"):
        isolate(list(range(8)), eng.trial, eng.dry)


def test_an_outage_during_the_bisect_propagates() -> None:
    calls = 0

    def trial(rows: Sequence[int]) -> BaseException | None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise db_error(210, "network")
        return db_error(69) if 4 in rows else None

    with pytest.raises(DatabaseError, match="network"):
        isolate(list(range(10)), trial, lambda: None)


# ---- stalls -------------------------------------------------------------------------------------


class FlakyProcessor(BatchProcessor):
    def __init__(self, failures: list[BaseException]) -> None:
        writer: Any = SimpleNamespace(forget=lambda *a: None, client=None, db="x", catalog=None)
        super().__init__(writer, ListSink())
        self.failures = failures
        self.preflight = SimpleNamespace(reset=lambda: None)  # type: ignore[assignment]

    def process(self, messages: Any, ahead: Any = None) -> Any:
        if self.failures:
            raise self.failures.pop(0)
        return "applied"


def test_a_stall_is_visible_while_it_lasts_and_counted() -> None:
    seen: list[tuple[Any, Any]] = []
    proc = FlakyProcessor([db_error(210, "Code: 210. DB::Exception: Connection refused (NETWORK_ERROR)")] * 3)
    before = metrics.STALLED_SECONDS._value.get()

    def should_stop() -> bool:
        seen.append((proc.stalled_since, proc.last_error))
        return False

    t0 = time.monotonic()
    assert proc.process_with_retry([], should_stop, max_backoff_s=0.3) == "applied"
    elapsed = time.monotonic() - t0
    assert seen and all(since is not None for since, _ in seen)
    assert "NETWORK_ERROR (210): Connection refused" in str(seen[-1][1])
    assert proc.stalled_since is None and proc.last_error is None and proc.stalled_seconds() == 0
    counted = metrics.STALLED_SECONDS._value.get() - before
    assert 0.5 < counted <= elapsed + 0.01


def test_a_stop_during_a_stall_returns_none() -> None:
    proc = FlakyProcessor([db_error(60, "no table")] * 100)
    assert proc.process_with_retry([], lambda: True) is None
    # given up: the processor waits on nothing any more, so it reports no stall
    assert proc.stalled_since is None and proc.last_error is None and proc.stalled_seconds() == 0


def test_readyz_shows_a_stalled_aggregator_as_degraded_and_stays_200() -> None:
    proc = FlakyProcessor([])
    app_state = SimpleNamespace(crashed=False, should_stop=False)
    check = aggregator_check(app_state, proc)
    app = FastAPI()
    app.include_router(build_health_router({"aggregator": check}, cache_s=0))
    client = TestClient(app)
    assert client.get("/readyz").json() == {
        "status": "ok",
        "checks": {"aggregator": {"status": "ok", "detail": "consuming"}},
    }
    proc._stalled(db_error(60, "Code: 60. DB::Exception: Table t.usage_1d does not exist. (UNKNOWN_TABLE)"))
    got = client.get("/readyz")
    assert got.status_code == 200
    body = got.json()
    assert body["status"] == "degraded" and body["checks"]["aggregator"]["status"] == Status.DEGRADED
    assert "UNKNOWN_TABLE (60): Table t.usage_1d does not exist" in body["checks"]["aggregator"]["detail"]
    proc._flowing()
    assert client.get("/readyz").json()["status"] == "ok"
    app_state.should_stop = True
    got = client.get("/readyz")
    assert got.status_code == 503 and got.json()["checks"]["aggregator"]["status"] == "down"
