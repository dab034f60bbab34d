"""The SQL endpoint: ClickHouse's HTTP interface, read-only, for analysts, on the embedded engine.

The embedded engine locks its data directory to the process that runs the pipeline, so no
ClickHouse client can reach it from outside; this server, in that process, speaks the part of
ClickHouse's HTTP protocol that clickhouse-connect, curl, clickhouse-client's HTTP mode and
Grafana's data source use, on its own port (``METERING_SQL_PORT``, default 8123, 127.0.0.1):

- ``GET``/``POST /?query=…``: the query in the URL, the body, or both (URL text, a newline, the
  body); ``database`` (default: the pipeline's database), ``default_format`` (default
  ``TabSeparated``; a ``FORMAT`` clause in the query wins), ``query_id``, ``param_<name>`` values
  for ``{name:Type}`` placeholders, and settings as other parameters (the engine refuses any
  that would change a value: see query_api/sql_engine.py). Transport parameters (``session_id``,
  ``compress``, ``wait_end_of_query``, ``client_protocol_version``…) are accepted and ignored;
  the ``X-ClickHouse-Database``/``X-ClickHouse-Format`` headers work as the parameters.
- Auth: user ``analyst`` and an analyst key as password (``metering admin analyst-key create``),
  by ``X-ClickHouse-User``/``X-ClickHouse-Key``, Basic auth, or ``user``/``password``
  parameters. Anything else, tenants' API keys, access tokens and the admin token included, is
  ``Code: 516 … (AUTHENTICATION_FAILED)``.
- ``/ping`` and ``GET /`` without a query answer ``Ok.``.
- Answers carry ``X-ClickHouse-Query-Id``, ``-Format``, ``-Timezone``, ``-Server-Display-Name``
  and ``-Summary`` (read rows and bytes, elapsed); errors are ClickHouse's text (``Code: N.
  DB::Exception: … (NAME)``) with ``X-ClickHouse-Exception-Code`` and ClickHouse's HTTP status
  for the code. A result is streamed block by block in formats without a footer (Native, TSV,
  CSV and their WithNames forms, JSONEachRow…) unless ``wait_end_of_query=1``; an error after
  the first block is written in the stream between ``__exception__`` markers tagged by
  ``X-ClickHouse-Exception-Tag``, as ClickHouse does, so clients raise instead of returning a
  short result.

Statements are judged first (query_api/sql_guard.py) and run on read-only, bounded engine handles
of the endpoint's own (query_api/sql_engine.py), never on the pipeline's client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import math
import secrets
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from deploy.settings import CommonSettings, SqlSettings
from query_api.analyst_keys import AnalystKeyStore
from query_api.ratelimit import RateLimiter
from query_api.sql_engine import (
    STREAM_HEADER_LINES,
    TOO_MANY_SIMULTANEOUS_QUERIES,
    BlockStream,
    EngineError,
    Handle,
    ReadOnlyEngine,
    engine_path,
    limit_settings,
)
from query_api.sql_guard import READONLY, SYNTAX_ERROR, Refused, judge

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUESTS = Counter(
    "metering_sql_requests_total",
    "Requests to the SQL endpoint by the ClickHouse error code answered (0: a result)",
    ["code"],
)

AUTHENTICATION_FAILED = 516
NOT_IMPLEMENTED = 48
UNKNOWN_FORMAT = 73
MAX_QUERY_BYTES = 1024 * 1024
FAILED_LOGINS_PER_MINUTE = 30

#: URL parameters that are the protocol's, not settings: accepted, and not passed to the engine.
TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "quota_key",
        "role",
        "stacktrace",
        "enable_http_compression",
        "http_zlib_compression_level",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "cancel_http_readonly_queries_on_client_close",
        "http_wait_end_of_query",
        "http_response_buffer_size",
        # Grafana's ClickHouse data source sends it with every query (its query timeout), which a
        # server allows a read-only user through a profile constraint ("changeable_in_readonly",
        # with a maximum). Accepted here, and the endpoint's own limit applies: never raised.
        "max_execution_time",
    }
)

#: Formats that stream (the others are sent whole).
STREAMABLE = frozenset(STREAM_HEADER_LINES)

_CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "tabseparatedwithnames": "text/tab-separated-values; charset=UTF-8",
    "tsvwithnames": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
    "jsonlines": "application/x-ndjson; charset=UTF-8",
    "ndjson": "application/x-ndjson; charset=UTF-8",
}

# ClickHouse's HTTP status for an error code (src/Server/HTTPHandler.cpp, exceptionCodeToHTTPStatus).
_STATUS = {
    AUTHENTICATION_FAILED: 403,
    164: 403,  # READONLY
    497: 403,  # ACCESS_DENIED
    62: 400,  # SYNTAX_ERROR
    36: 400,  # BAD_ARGUMENTS
    27: 400,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    43: 400,  # ILLEGAL_TYPE_OF_ARGUMENT
    47: 400,  # UNKNOWN_IDENTIFIER
    115: 400,  # UNKNOWN_SETTING
    456: 400,  # UNKNOWN_QUERY_PARAMETER
    457: 400,  # BAD_QUERY_PARAMETER
    60: 404,  # UNKNOWN_TABLE
    46: 404,  # UNKNOWN_FUNCTION
    UNKNOWN_FORMAT: 404,
    81: 404,  # UNKNOWN_DATABASE
    16: 404,  # NO_SUCH_COLUMN_IN_TABLE
    NOT_IMPLEMENTED: 501,
    159: 408,  # TIMEOUT_EXCEEDED
    202: 503,  # TOO_MANY_SIMULTANEOUS_QUERIES: clients retry a 503
}


def http_status(code: int) -> int:
    return _STATUS.get(code, 500)


@dataclass(frozen=True)
class Call:
    """One request, read: what to run and how to answer."""

    sql: str
    database: str
    default_format: str
    query_id: str
    params: dict[str, str]
    settings: dict[str, str]
    wait_end: bool


class SqlEndpoint:
    """The endpoint's state: the engine handles, the analyst keys, the settings."""

    def __init__(self, settings: SqlSettings, database: str, engine: ReadOnlyEngine, keys: AnalystKeyStore):
        self.settings = settings
        self.database = database
        self.engine = engine
        self.keys = keys
        self.display_name = socket.gethostname()
        # Failed logins per client address, like every other authentication of the system.
        self.failures = RateLimiter(FAILED_LOGINS_PER_MINUTE, name="sql-auth-failures")
        # Threads of its own: the aggregator runs its batches in the event loop's default
        # executor, which analysts' queries must never fill. A request holds a thread only while
        # its query runs on a handle (waiting for a handle holds none), so this never runs short.
        self._pool = ThreadPoolExecutor(engine.size + 2, thread_name_prefix="sql-endpoint")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the endpoint's threads; run to its end even if the request is
        cancelled meanwhile (it releases what it holds itself)."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))
        return await asyncio.shield(future)

    async def _acquire(self) -> Handle:
        """A handle, waiting (without a thread) up to the queue timeout for one to be free."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.sql_queue_timeout_s
        while (handle := self.engine.try_acquire()) is None:
            if loop.time() >= deadline:
                raise EngineError(
                    TOO_MANY_SIMULTANEOUS_QUERIES,
                    f"Too many simultaneous queries: all {self.engine.size} are running and none ended "
                    f"within {self.settings.sql_queue_timeout_s:g} s. (TOO_MANY_SIMULTANEOUS_QUERIES)",
                )
            await asyncio.sleep(0.02)
        return handle

    # ---- responses ---------------------------------------------------------------------------

    def _headers(self, query_id: str, fmt: str | None = None) -> dict[str, str]:
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": self.engine.timezone,
            "X-ClickHouse-Server-Display-Name": self.display_name,
        }
        if fmt is not None:
            headers["X-ClickHouse-Format"] = fmt
        return headers

    def error(self, code: int, message: str, query_id: str = "", status: int | None = None) -> Response:
        headers = self._headers(query_id or str(uuid.uuid4()))
        headers["X-ClickHouse-Exception-Code"] = str(code)
        body = f"Code: {code}. DB::Exception: {message} (version {self.engine.version})\n"
        return PlainTextResponse(body, status_code=status or http_status(code), headers=headers)

    @staticmethod
    def _summary(
        read_rows: int, read_bytes: int, result_rows: int, result_bytes: int, elapsed_s: float
    ) -> str:
        return orjson.dumps(
            {
                "read_rows": str(read_rows),
                "read_bytes": str(read_bytes),
                "written_rows": "0",
                "written_bytes": "0",
                "total_rows_to_read": str(read_rows),
                "result_rows": str(result_rows),
                "result_bytes": str(result_bytes),
                "elapsed_ns": str(int(elapsed_s * 1e9)),
            }
        ).decode()

    # ---- the request -------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        response = await self._answer(request)
        code = response.headers.get("X-ClickHouse-Exception-Code", "0")
        REQUESTS.labels(code).inc()
        if code == str(READONLY):
            # Someone tried to write, or to reach outside: worth a line (the statement is not logged).
            log.info(
                "SQL endpoint: refused a statement in read-only mode (query id %s)",
                response.headers.get("X-ClickHouse-Query-Id"),
            )
        return response

    async def _answer(self, request: Request) -> Response:
        path = request.url.path
        if path in ("/ping", "/replicas_status") or (
            path == "/" and request.method in ("GET", "HEAD") and "query" not in request.query_params
        ):
            return PlainTextResponse("Ok.\n")
        if path != "/":
            return self.error(NOT_IMPLEMENTED, f"There is no handle {path}. (NOT_IMPLEMENTED)")
        user, key = _credentials(request)  # before anything else is read
        if not await self._in_pool(self.keys.verify, user, key):
            address = request.client.host if request.client else "unknown"
            wait = self.failures.acquire(f"fail:{address}")
            if wait is not None:
                return self.error(
                    AUTHENTICATION_FAILED,
                    f"{user}: Authentication failed: too many failed attempts from this address; "
                    f"retry after {math.ceil(wait)} s. (AUTHENTICATION_FAILED)",
                    status=429,
                )
            return self.error(
                AUTHENTICATION_FAILED,
                f"{user}: Authentication failed: password is incorrect, or there is no user "
                "with such name. (AUTHENTICATION_FAILED)",
                request.query_params.get("query_id", ""),
            )
        try:
            call = await self._read(request)
        except Refused as exc:
            return self.error(exc.code, exc.message)
        try:
            statement = judge(call.sql)
        except Refused as exc:
            return self.error(exc.code, exc.message, call.query_id)
        fmt = statement.format or call.default_format
        if not fmt.replace("_", "").isalnum():
            return self.error(UNKNOWN_FORMAT, f"Unknown format {fmt}. (UNKNOWN_FORMAT)", call.query_id)
        log.debug("analyst query %s (%s, %s)", call.query_id, statement.kind, fmt)
        try:
            # chdb streams SELECTs only ("Streaming query is not supported" for SHOW, DESCRIBE…)
            whole = call.wait_end or fmt.lower() not in STREAMABLE or statement.kind not in ("SELECT", "WITH")
            handle = await self._acquire()
            if whole:
                return await self._in_pool(self._whole, call, fmt, handle)
            return await self._streamed(call, fmt, handle)
        except EngineError as exc:
            return self.error(exc.code, exc.message, call.query_id)

    async def _read(self, request: Request) -> Call:
        q = request.query_params
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise Refused(
                NOT_IMPLEMENTED,
                "Multipart requests (external data) are not supported here. (NOT_IMPLEMENTED)",
            )
        if request.headers.get("content-encoding", "identity") not in ("", "identity"):
            # Clients compress the bodies of inserts (clickhouse-connect's insert() puts the INSERT
            # itself in the compressed body), never of queries: a read-only answer.
            if q.get("query"):
                judge(q["query"])
            raise Refused(
                READONLY,
                "analyst: Cannot execute query in readonly mode: a compressed request body is an "
                "insert's data. (READONLY)",
            )
        if "1" in (q.get("compress"), q.get("decompress")):
            raise Refused(
                NOT_IMPLEMENTED,
                "ClickHouse's block compression (compress=1, decompress=1) is not supported here: turn "
                "the client's compression off. (NOT_IMPLEMENTED)",
            )
        body = b""
        if request.method == "POST":
            chunks: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_QUERY_BYTES:
                    raise Refused(
                        SYNTAX_ERROR,
                        f"Max query size exceeded: more than {MAX_QUERY_BYTES} bytes. (SYNTAX_ERROR)",
                    )
                chunks.append(chunk)
            body = b"".join(chunks)
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise Refused(SYNTAX_ERROR, "The query is not UTF-8. (SYNTAX_ERROR)") from None
        sql = "\n".join(part for part in (q.get("query", ""), text) if part)
        return Call(
            sql=sql,
            database=q.get("database") or request.headers.get("x-clickhouse-database") or self.database,
            default_format=q.get("default_format")
            or request.headers.get("x-clickhouse-format")
            or "TabSeparated",
            query_id=q.get("query_id") or str(uuid.uuid4()),
            params={k[len("param_") :]: v for k, v in q.items() if k.startswith("param_")},
            settings={k: v for k, v in q.items() if k not in TRANSPORT_PARAMS and not k.startswith("param_")},
            wait_end=q.get("wait_end_of_query", "0") not in ("", "0", "false"),
        )

    def _whole(self, call: Call, fmt: str, handle: Handle) -> Response:
        try:
            self.engine.prepare(handle, call.database, call.settings)
            result = self.engine.run(handle, call.sql, fmt, call.params)
        finally:
            self.engine.release(handle)
        headers = self._headers(call.query_id, fmt)
        headers["X-ClickHouse-Summary"] = self._summary(
            result.rows_read, result.bytes_read, result.result_rows, len(result.body), result.elapsed_s
        )
        return Response(result.body, headers=headers, media_type=_content_type(fmt))

    async def _streamed(self, call: Call, fmt: str, handle: Handle) -> Response:
        def start() -> tuple[Handle, BlockStream, bytes | None]:
            try:
                self.engine.prepare(handle, call.database, call.settings)
                blocks = self.engine.stream(handle, call.sql, fmt, call.params)
            except BaseException:
                self.engine.release(handle)
                raise
            try:
                first = next(blocks, None)  # an error before the first block is a plain error answer
            except BaseException:
                self._finish(blocks, handle)
                raise
            return handle, blocks, first

        started = asyncio.get_running_loop().run_in_executor(self._pool, start)
        try:
            handle, blocks, first = await asyncio.shield(started)
        except asyncio.CancelledError:
            # The client left while the query was starting: give the handle back once it has.
            started.add_done_callback(self._abandon)
            raise
        tag = secrets.token_hex(8)
        headers = self._headers(call.query_id, fmt)
        headers["X-ClickHouse-Exception-Tag"] = tag
        headers["X-ClickHouse-Summary"] = self._summary(0, 0, 0, 0, 0.0)

        async def body() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield first
                while True:
                    try:
                        chunk = await self._in_pool(next, blocks, None)
                    except EngineError as exc:
                        yield _stream_exception(tag, f"Code: {exc.code}. DB::Exception: {exc.message}")
                        return
                    if chunk is None:
                        return
                    yield chunk
            finally:
                # Also when the client is gone mid-stream: stop the query, give the handle back
                # (in a thread: the close waits for a block being fetched).
                threading.Thread(target=self._finish, args=(blocks, handle), daemon=True).start()

        return StreamingResponse(body(), headers=headers, media_type=_content_type(fmt))

    def _finish(self, blocks: BlockStream, handle: Handle) -> None:
        try:
            blocks.close()
        finally:
            self.engine.release(handle)

    def _abandon(self, started: asyncio.Future[tuple[Handle, BlockStream, bytes | None]]) -> None:
        if started.cancelled() or started.exception() is not None:
            return  # start() released the handle itself
        handle, blocks, _ = started.result()
        threading.Thread(target=self._finish, args=(blocks, handle), daemon=True).start()


def _stream_exception(tag: str, message: str) -> bytes:
    """An error after the first block, framed as ClickHouse frames it for clients that read
    ``X-ClickHouse-Exception-Tag``; the text is readable as it stands for those that do not."""
    text = message.encode()
    return (
        b"\r\n__exception__\r\n"
        + tag.encode()
        + b"\r\n"
        + text
        + b"\n"
        + f"{len(text)} ".encode()
        + tag.encode()
        + b"\r\n__exception__\r\n"
    )


def _content_type(fmt: str) -> str:
    return _CONTENT_TYPES.get(fmt.lower(), "application/octet-stream")


def _credentials(request: Request) -> tuple[str, str]:
    """(user, key) from the ClickHouse headers, Basic auth, or the URL; ``default`` and no key
    when none is given, as ClickHouse reads it."""
    h = request.headers
    if "x-clickhouse-user" in h or "x-clickhouse-key" in h:
        return h.get("x-clickhouse-user", "default"), h.get("x-clickhouse-key", "")
    auth = h.get("authorization", "")
    if auth[:6].lower() == "basic ":
        try:
            user, _, key = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
            return user or "default", key
        except (binascii.Error, UnicodeDecodeError):
            return "default", ""
    q = request.query_params
    return q.get("user") or "default", q.get("password", "")


def build_sql_app(endpoint: SqlEndpoint) -> Starlette:
    return Starlette(routes=[Route("/{path:path}", endpoint.handle, methods=["GET", "POST", "HEAD"])])


def open_endpoint(settings: Any) -> SqlEndpoint | None:
    """The endpoint of a process holding the embedded engine, or None (with the reason logged)
    when it is off: by setting, or because the DSN is a ClickHouse server."""
    common: CommonSettings = settings
    if not settings.sql_enabled:
        log.info("SQL endpoint off (METERING_SQL_ENABLED=false)")
        return None
    if not common.embedded_clickhouse:
        log.info(
            "SQL endpoint off: METERING_CLICKHOUSE_DSN is a ClickHouse server; analysts query that "
            "server directly (its own HTTP interface, port 8123/8443)"
        )
        return None
    engine = ReadOnlyEngine(
        engine_path(common.clickhouse_dsn.get_secret_value()),
        limit_settings(settings),
        settings.sql_max_concurrent_queries,
    )
    return SqlEndpoint(settings, common.clickhouse_database, engine, AnalystKeyStore(settings.sql_keys_file))


class SqlPortTaken(Exception):
    """The endpoint's port is in use: the process stops at start with this reason."""


def bind_socket(settings: Any) -> socket.socket:
    """The endpoint's listening socket, bound now so that a taken port fails the start clearly."""
    sock = socket.socket(socket.AF_INET6 if ":" in settings.sql_host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.sql_host, settings.sql_port))
    except OSError as exc:
        sock.close()
        raise SqlPortTaken(
            f"the SQL endpoint cannot listen on {settings.sql_host}:{settings.sql_port} ({exc.strerror}); "
            "set METERING_SQL_PORT to a free port, or METERING_SQL_ENABLED=false"
        ) from None
    sock.set_inheritable(True)
    return sock


def sql_server_config(app: Starlette, settings: Any) -> Any:
    """uvicorn's configuration for the endpoint: the HTTP timeouts and limits of the API's (the
    request head's time and size bounds included, deploy/http_server.py)."""
    import uvicorn

    from deploy.http_server import bounded_head_protocol

    return uvicorn.Config(
        app,
        host=settings.sql_host,
        port=settings.sql_port,
        log_level="warning",
        lifespan="off",
        http=bounded_head_protocol(settings.http_header_timeout_s, settings.http_max_head_bytes),
        timeout_keep_alive=settings.http_keepalive_timeout_s,
        limit_concurrency=settings.http_limit_concurrency,
    )
