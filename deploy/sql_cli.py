"""``metering sql`` and ``metering admin analyst-key``: the analysts' side of the SQL endpoint.

``metering sql "SELECT …"`` (or ``-f file.sql``, or ``-f -`` / a pipe for stdin) runs one reading
statement and prints it as a table, or writes CSV, TSV, JSON lines or Parquet (``--format``,
``--output``). Where it runs:

1. the SQL endpoint of the running system (``METERING_SQL_HOST``/``METERING_SQL_PORT``) when it
   answers ``/ping``, as user ``analyst`` with ``--key`` or ``METERING_SQL_KEY``;
2. otherwise, on the embedded engine directly, when no process holds it (read-only and judged
   exactly as by the endpoint: query_api/sql_guard.py, query_api/sql_engine.py);
3. with ``METERING_CLICKHOUSE_DSN`` pointing at a ClickHouse server, on that server.

The result is streamed to ``--output`` (or stdout) as it arrives, with a progress line on a
terminal; a table is printed once the result is complete. ``metering admin analyst-key
create|revoke|list`` manage the endpoint's keys (query_api/analyst_keys.py): created keys are
printed once, and only their hash is kept.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import httpx
import orjson
import typer
from rich.console import Console
from rich.table import Table

from deploy.settings import QuerySettings, SqlSettings
from query_api.analyst_keys import ANALYST_USER, UnknownKey, create_key, load_keys, revoke_key

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class OutFormat(StrEnum):
    TABLE = "table"
    CSV = "csv"
    TSV = "tsv"
    JSONL = "jsonl"
    PARQUET = "parquet"


#: The ClickHouse format each output is fetched in (CSV and TSV with a header line of names).
WIRE_FORMAT = {
    OutFormat.TABLE: "JSONCompactEachRowWithNames",
    OutFormat.CSV: "CSVWithNames",
    OutFormat.TSV: "TSVWithNames",
    OutFormat.JSONL: "JSONEachRow",
    OutFormat.PARQUET: "Parquet",
}
TABLE_MAX_ROWS = 10_000


class SqlError(Exception):
    """The statement failed: ClickHouse's error text."""


# ---- where the statement runs --------------------------------------------------------------------


def endpoint_url(settings: SqlSettings) -> str:
    host = settings.sql_host if ":" not in settings.sql_host else f"[{settings.sql_host}]"
    return f"http://{host}:{settings.sql_port}"


def endpoint_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ping", timeout=2.0).text == "Ok.\n"
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def via_endpoint(url: str, key: str, sql: str, fmt: str, database: str) -> Iterator[Iterator[bytes]]:
    with (
        httpx.Client(timeout=httpx.Timeout(10.0, read=None)) as http,
        http.stream(
            "POST",
            f"{url}/",
            params={"database": database, "default_format": fmt},
            content=sql.encode(),
            auth=(ANALYST_USER, key),
        ) as response,
    ):
        if response.status_code != 200 or "x-clickhouse-exception-code" in response.headers:
            raise SqlError(response.read().decode(errors="replace").strip())
        yield _checked_stream(response.iter_bytes(), response.headers.get("x-clickhouse-exception-tag"))


def _checked_stream(chunks: Iterator[bytes], tag: str | None) -> Iterator[bytes]:
    """The body, raising on an error the server framed into the stream after the first blocks
    (``__exception__``, the tag, the message, its length and the tag, ``__exception__``). The
    last few bytes of each chunk are held back until the next, so a frame split between two
    chunks is still found."""
    if not tag:
        yield from chunks
        return
    opening = b"__exception__\r\n" + tag.encode()
    closing = b" " + tag.encode() + b"\r\n__exception__"
    pending = b""
    for chunk in chunks:
        pending += chunk
        at = pending.find(opening)
        if at >= 0:
            frame = pending[at + len(opening) :]
            for more in chunks:
                if closing in frame:
                    break
                frame += more
            before = pending[:at].removesuffix(b"\r\n")  # the frame's own line break
            if before:
                yield before
            raise SqlError(_frame_message(frame, closing))
        keep = len(opening) + 2
        if len(pending) > keep:
            yield pending[:-keep]
            pending = pending[-keep:]
    if pending:
        yield pending


def _frame_message(frame: bytes, closing: bytes) -> str:
    body = frame.split(closing, 1)[0].removeprefix(b"\r\n")
    message = body.rsplit(b"\n", 1)[0]  # what follows the last newline is the message's length
    return message.decode(errors="replace").strip()


@contextlib.contextmanager
def via_engine(settings: QuerySettings, sql: str, fmt: str) -> Iterator[Iterator[bytes]]:
    """On the embedded engine of this machine, read-only and bounded as the endpoint is."""
    from query_api.sql_endpoint import STREAMABLE
    from query_api.sql_engine import EngineError, ReadOnlyEngine, engine_path, limit_settings
    from query_api.sql_guard import Refused, judge

    try:
        statement = judge(sql)
    except Refused as exc:
        raise SqlError(f"Code: {exc.code}. DB::Exception: {exc.message}") from None
    path = engine_path(settings.clickhouse_dsn.get_secret_value())
    try:
        engine = ReadOnlyEngine(path, limit_settings(settings), 1)
    except Exception as exc:
        raise SqlError(
            f"cannot open the embedded engine at {path} ({exc}); if the system is running, its SQL "
            f"endpoint ({endpoint_url(settings)}) did not answer: is METERING_SQL_ENABLED off?"
        ) from None
    try:
        handle = engine.acquire(1.0)
        fmt = statement.format or fmt
        try:
            engine.prepare(handle, settings.clickhouse_database, {})
            if fmt.lower() in STREAMABLE and statement.kind in ("SELECT", "WITH"):
                blocks = engine.stream(handle, sql, fmt, {})
                try:
                    yield blocks
                finally:
                    blocks.close()
            else:
                yield iter([engine.run(handle, sql, fmt, {}).body])
        except EngineError as exc:
            raise SqlError(f"Code: {exc.code}. DB::Exception: {exc.message}") from None
    finally:
        engine.close()


@contextlib.contextmanager
def via_server(settings: QuerySettings, sql: str, fmt: str) -> Iterator[Iterator[bytes]]:
    import clickhouse_connect

    client = clickhouse_connect.get_client(
        dsn=settings.clickhouse_dsn.get_secret_value(), database=settings.clickhouse_database
    )
    try:
        yield iter([client.raw_query(sql, fmt=fmt)])
    except Exception as exc:
        raise SqlError(str(exc)) from None
    finally:
        client.close()


# ---- output -------------------------------------------------------------------------------------


class Progress:
    """A progress line on stderr (a terminal only) while a result arrives, and a closing summary."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bytes = 0
        self.started = time.monotonic()
        self._shown = 0.0

    def add(self, n: int) -> None:
        self.bytes += n
        now = time.monotonic()
        if self.enabled and now - self._shown > 0.25:
            self._shown = now
            err.print(f"\rreceived {_size(self.bytes)} in {now - self.started:.1f} s", end="", markup=False)

    def done(self, what: str) -> None:
        if self.enabled:
            err.print("\r", end="")
        err.print(f"{what} ({_size(self.bytes)} in {time.monotonic() - self.started:.1f} s)", markup=False)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def print_table(chunks: Iterator[bytes], progress: Progress) -> None:
    body = bytearray()
    for chunk in chunks:
        body += chunk
        progress.add(len(chunk))
    lines = bytes(body).splitlines()
    if not lines:
        return
    names = orjson.loads(lines[0])
    table = Table(*[str(n) for n in names], show_lines=False)
    for line in lines[1 : TABLE_MAX_ROWS + 1]:
        table.add_row(*[_cell(v) for v in orjson.loads(line)])
    if progress.enabled:
        err.print("\r", end="")
    out.print(table)
    rows = len(lines) - 1
    if rows > TABLE_MAX_ROWS:
        err.print(f"{rows} rows; the first {TABLE_MAX_ROWS} shown (--format csv --output FILE for all)")
    else:
        err.print(f"{rows} row{'s' if rows != 1 else ''}")


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def write_stream(chunks: Iterator[bytes], sink: BinaryIO, progress: Progress) -> None:
    for chunk in chunks:
        sink.write(chunk)
        progress.add(len(chunk))
    sink.flush()


# ---- the commands -------------------------------------------------------------------------------


def sql(
    query: Annotated[
        str | None, typer.Argument(help="The statement (or -f, or stdin).", show_default=False)
    ] = None,
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="Read the statement from a file (- for stdin).")
    ] = None,
    fmt: Annotated[
        OutFormat,
        typer.Option("--format", help="table, csv, tsv, jsonl or parquet."),
    ] = OutFormat.TABLE,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the result here instead of stdout.")
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            envvar="METERING_SQL_KEY",
            help="Analyst key for the SQL endpoint (or METERING_SQL_KEY).",
            show_default=False,
        ),
    ] = None,
    database: Annotated[str | None, typer.Option(help="Database (default: the system's).")] = None,
) -> None:
    """Run one reading SQL statement on the metering tables (docs/tables.md): through the running
    system's SQL endpoint, or on the embedded engine when nothing holds it. Exit codes: 0 done;
    1 the statement failed (ClickHouse's error on stderr); 2 nothing to run or no key."""
    text = _statement(query, file)
    settings = QuerySettings()
    db = database or settings.clickhouse_database
    if fmt is OutFormat.PARQUET and output is None and sys.stdout.isatty():
        err.print("[red]error:[/red] Parquet is binary: give --output FILE (or redirect stdout)")
        raise typer.Exit(2)
    wire = WIRE_FORMAT[fmt]
    url = endpoint_url(settings)
    if settings.embedded_clickhouse and endpoint_answers(url):
        if not key:
            err.print(
                f"[red]error:[/red] the SQL endpoint at {url} needs an analyst key: --key or "
                "METERING_SQL_KEY (`metering admin analyst-key create` makes one)"
            )
            raise typer.Exit(2)
        source = via_endpoint(url, key, text, wire, db)
    elif settings.embedded_clickhouse:
        source = via_engine(settings.model_copy(update={"clickhouse_database": db}), text, wire)
    else:
        source = via_server(settings.model_copy(update={"clickhouse_database": db}), text, wire)
    progress = Progress(enabled=err.is_terminal)
    try:
        with source as chunks:
            if fmt is OutFormat.TABLE and output is None:
                print_table(chunks, progress)
                return
            if output is not None:
                with output.open("wb") as sink:
                    write_stream(chunks, sink, progress)
                progress.done(f"wrote {output}")
            else:
                write_stream(chunks, sys.stdout.buffer, progress)
    except SqlError as exc:
        if progress.enabled:
            err.print("")
        err.print(str(exc), style="red", markup=False)
        raise typer.Exit(1) from None


def _statement(query: str | None, file: str | None) -> str:
    if query and file:
        raise typer.BadParameter("give the statement or --file, not both")
    if file == "-" or (query is None and file is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif file is not None:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {file}: {exc.strerror}") from None
    else:
        text = query or ""
    if not text.strip():
        err.print("[red]error:[/red] no statement: give one, or -f FILE, or pipe it to stdin")
        raise typer.Exit(2)
    return text


analyst_key_app = typer.Typer(
    help="Analyst keys of the SQL endpoint (user analyst): stored as a hash in METERING_SQL_KEYS_FILE "
    "(.cache/analyst-keys.json, mode 0600) on this machine; a key is printed once.",
    no_args_is_help=True,
)


@analyst_key_app.command("create")
def analyst_key_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")] = "",
    json_output: Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON object.")] = False,
) -> None:
    """Create an analyst key; the running SQL endpoint accepts it from the next request on."""
    settings = SqlSettings()
    created, raw = create_key(settings.sql_keys_file, name)
    if json_output:
        result = {
            "key_id": created.id,
            "name": name,
            "prefix": created.prefix,
            "user": ANALYST_USER,
            "key": raw,
        }
        out.print(orjson.dumps(result).decode(), markup=False)
        return
    out.print(f"key_id={created.id} prefix={created.prefix} user={ANALYST_USER}", markup=False)
    out.print(f"analyst_key: {raw}", markup=False)
    err.print("Store it now: it is not shown again and cannot be recovered (only its hash is kept).")
    err.print(
        f"Use it as the password of user {ANALYST_USER} on {endpoint_url(settings)} (or METERING_SQL_KEY)."
    )


@analyst_key_app.command("revoke")
def analyst_key_revoke(
    id_: Annotated[str, typer.Option("--id", help="The key's id (`analyst-key list` shows them).")],
    json_output: Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON object.")] = False,
) -> None:
    """Revoke an analyst key: refused by the SQL endpoint from the next request on."""
    try:
        key = revoke_key(SqlSettings().sql_keys_file, id_)
    except UnknownKey:
        err.print(f"[red]refused:[/red] no analyst key {id_!r} (`metering admin analyst-key list`)")
        raise typer.Exit(1) from None
    if json_output:
        out.print(orjson.dumps({"key_id": key.id, "revoked_at": key.revoked_at}).decode(), markup=False)
    else:
        out.print(f"key_id={key.id} revoked_at={key.revoked_at}", markup=False)


@analyst_key_app.command("list")
def analyst_key_list(
    json_output: Annotated[
        bool, typer.Option("--json", metavar="", help="One JSON object per line.")
    ] = False,
) -> None:
    """The analyst keys: id, name, prefix, created, revoked (never the key, never its hash)."""
    keys = load_keys(SqlSettings().sql_keys_file)
    if json_output:
        for k in keys:
            row = {"key_id": k.id, "name": k.name, "prefix": k.prefix, "created_at": k.created_at}
            out.print(orjson.dumps(row | {"revoked_at": k.revoked_at}).decode(), markup=False)
        return
    table = Table("id", "name", "prefix", "created", "revoked")
    for k in keys:
        table.add_row(k.id, k.name, k.prefix, k.created_at, k.revoked_at or "")
    out.print(table)
