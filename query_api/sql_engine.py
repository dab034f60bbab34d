"""The SQL endpoint's engine handles: read-only, bounded, and apart from the pipeline's client.

chdb runs one engine per process but any number of connection handles to it, each with its own
session state (``USE``, ``SET``) and each running concurrently with the others (a statement on
one does not wait for a statement on another). The endpoint opens ``sql_max_concurrent_queries``
handles of its own on the engine's data directory, so an analyst's query never waits for the
aggregator's writes (whose client is another handle), and a query waits only for another
analyst's query when all handles are busy.

Each handle is bounded once, when it is opened: ``SET`` of ``max_execution_time``,
``max_result_rows``/``max_result_bytes`` (overflow: throw), ``max_memory_usage`` and
``max_threads`` (a bounded share of the CPU: the aggregator keeps the rest), then ``SET
readonly=1`` last. chdb (measured on 4.4) then refuses, on that handle, writes, DDL, ``SYSTEM``,
outside-reaching table functions, and every change of a setting, whether by ``SET``, a
``SETTINGS`` clause or a setting sent with the request ("Cannot modify 'max_threads' setting in
readonly mode"); restating a setting's current value is accepted, as ClickHouse does. Setting the
limits first is what makes them stick: with ``readonly=1`` in the same call the engine refuses
them. What read-only chdb still allows is fenced in query_api/sql_guard.py.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import chdb

from deploy.settings import SqlSettings

_CODE = re.compile(r"Code: (\d+)\. DB::Exception: ")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

UNKNOWN_SETTING = 115
TOO_MANY_SIMULTANEOUS_QUERIES = 202
UNKNOWN_DATABASE = 81


class EngineError(Exception):
    """An error of the engine, as ClickHouse reports it: a code and ``DB::Exception``'s text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_chdb(cls, exc: BaseException) -> EngineError:
        text = str(exc).strip()
        matches = list(_CODE.finditer(text))
        if not matches:
            return cls(1001, text or type(exc).__name__)  # STD_EXCEPTION
        # chdb sometimes nests the same exception ("Code: 164. DB::Exception: Code: 164. …"):
        # the innermost text is the one a server would send.
        last = matches[-1]
        return cls(int(last.group(1)), text[last.end() :].strip())


def limit_settings(settings: SqlSettings) -> dict[str, str]:
    """The settings every handle gets before it is made read-only (in this order)."""
    return {
        "max_execution_time": str(settings.sql_max_execution_time_s),
        "max_result_rows": str(settings.sql_max_result_rows),
        "max_result_bytes": str(settings.sql_max_result_bytes),
        "result_overflow_mode": "throw",
        "max_memory_usage": str(settings.sql_max_memory_usage),
        "max_threads": str(settings.sql_max_threads),
    }


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Handle:
    conn: Any
    database: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Result:
    body: bytes
    rows_read: int  # read from storage
    bytes_read: int
    result_rows: int
    elapsed_s: float


class ReadOnlyEngine:
    """``handles`` read-only, bounded connections to the engine at ``path``."""

    def __init__(self, path: str, limits: Mapping[str, str], handles: int) -> None:
        # The same spelling of the path as clickhouse-connect's chdb client (realpath): chdb
        # compares engine paths literally and allows one per process.
        self.path = os.path.realpath(path)
        self._free: queue.Queue[Handle] = queue.Queue()
        self._all: list[Handle] = []
        for _ in range(handles):
            conn = chdb.connect(self.path)  # type: ignore[no-untyped-call]
            for name, value in limits.items():
                conn.query(f"SET {name} = {_quote(value)}", "TabSeparated")
            conn.query("SET readonly = 1", "TabSeparated")  # last: from here on nothing changes
            handle = Handle(conn)
            self._all.append(handle)
            self._free.put(handle)
        self.timezone, self.version = self._server_facts()

    def _server_facts(self) -> tuple[str, str]:
        handle = self._free.get()
        try:
            out = handle.conn.query("SELECT timezone(), version()", "TabSeparated").bytes().decode()
        finally:
            self._free.put(handle)
        tz, _, version = out.strip().partition("\t")
        return tz, version

    def acquire(self, timeout_s: float) -> Handle:
        try:
            return self._free.get(timeout=timeout_s)
        except queue.Empty:
            raise EngineError(
                TOO_MANY_SIMULTANEOUS_QUERIES,
                f"Too many simultaneous queries: all {len(self._all)} are running and none ended "
                f"within {timeout_s:g} s. (TOO_MANY_SIMULTANEOUS_QUERIES)",
            ) from None

    def try_acquire(self) -> Handle | None:
        """A free handle now, or None."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None

    @property
    def size(self) -> int:
        return len(self._all)

    def release(self, handle: Handle) -> None:
        self._free.put(handle)

    def close(self) -> None:
        for handle in self._all:
            with contextlib.suppress(Exception):
                handle.conn.close()
        self._all.clear()

    # ---- on a handle (the caller holds it: acquired, not yet released) -------------------------

    def prepare(self, handle: Handle, database: str | None, settings: Mapping[str, str]) -> None:
        """``USE`` the request's database and state its settings: the engine refuses any that
        would change a value (read-only), and accepts those that restate it."""
        try:
            if database and database != handle.database:
                if not _IDENT.match(database):
                    raise EngineError(
                        UNKNOWN_DATABASE, f"Database {database} does not exist. (UNKNOWN_DATABASE)"
                    )
                handle.conn.query(f"USE `{database}`", "TabSeparated")
                handle.database = database
            for name, value in settings.items():
                if not _SETTING_NAME.match(name):
                    raise EngineError(UNKNOWN_SETTING, f"Unknown setting '{name}'. (UNKNOWN_SETTING)")
                handle.conn.query(f"SET {name} = {_quote(value)}", "TabSeparated")
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError.from_chdb(exc) from None

    def run(self, handle: Handle, sql: str, fmt: str, params: Mapping[str, str]) -> Result:
        """The whole result, in ``fmt`` (a FORMAT clause in ``sql`` wins)."""
        try:
            res = handle.conn.query(sql, fmt, params=dict(params))
        except Exception as exc:
            raise EngineError.from_chdb(exc) from None
        return Result(
            res.bytes() or b"",
            int(res.storage_rows_read()),
            int(res.storage_bytes_read()),
            int(res.rows_read()),  # chdb's rows_read: the rows of the result
            float(res.elapsed()),
        )

    def stream(self, handle: Handle, sql: str, fmt: str, params: Mapping[str, str]) -> BlockStream:
        """The result block by block (formats without a header or footer only). Errors before
        the query starts raise here; later ones from the stream."""
        try:
            sr = handle.conn.send_query(sql, fmt, params=dict(params))
        except Exception as exc:
            raise EngineError.from_chdb(exc) from None
        return BlockStream(sr, STREAM_HEADER_LINES.get(fmt.lower(), 0))


#: Formats whose blocks concatenate into one result when streamed (lower case), with the number
#: of header lines chdb repeats at the top of every block: kept in the first block only.
STREAM_HEADER_LINES: dict[str, int] = {
    **dict.fromkeys(
        (
            "native", "tabseparated", "tsv", "tabseparatedraw", "tsvraw", "csv", "rowbinary",
            "jsoneachrow", "jsoncompacteachrow", "jsonstringseachrow", "jsonlines", "ndjson", "tskv",
            "lineasstring",
        ),
        0,
    ),
    **dict.fromkeys(("csvwithnames", "tsvwithnames", "tabseparatedwithnames", "jsoncompacteachrowwithnames"), 1),
    **dict.fromkeys(
        (
            "csvwithnamesandtypes", "tsvwithnamesandtypes", "tabseparatedwithnamesandtypes",
            "jsoncompacteachrowwithnamesandtypes",
        ),
        2,
    ),
}  # fmt: skip


class BlockStream:
    """A streaming result, safe to close from another thread than the one fetching: chdb's
    streaming result must not be fetched and cancelled at once, so both hold one lock (a close
    waits for the block being fetched, then stops the query). With ``header_lines``, the header
    chdb repeats at the top of every block is kept in the first one only."""

    def __init__(self, sr: Any, header_lines: int = 0) -> None:
        self._sr = sr
        self._lock = threading.Lock()
        self._done = False
        self._header_lines = header_lines
        self._header: bytes | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while True:
            with self._lock:
                if self._done:
                    raise StopIteration
                try:
                    chunk = self._sr.fetch()
                except Exception as exc:
                    self._done = True
                    raise EngineError.from_chdb(exc) from None
                if chunk is None:
                    self._done = True
                    raise StopIteration
                data: bytes = chunk.bytes()
            if data and self._header_lines:
                data = self._one_header(data)
            if data:
                return data

    def _one_header(self, data: bytes) -> bytes:
        if self._header is None:
            end = -1
            for _ in range(self._header_lines):
                end = data.find(b"\n", end + 1)
                if end < 0:
                    return data
            self._header = data[: end + 1]
            return data
        return data[len(self._header) :] if data.startswith(self._header) else data

    def close(self) -> None:
        with self._lock:
            if not self._done:
                self._done = True
                with contextlib.suppress(Exception):
                    self._sr.cancel()


def engine_path(dsn: str) -> str:
    """The data directory of a ``chdb://`` DSN (``chdb:///abs/dir``)."""
    if not dsn.startswith("chdb://"):
        raise ValueError("not an embedded-engine DSN")
    rest = dsn[len("chdb://") :]
    return rest.split("?", 1)[0]
