"""``metering sql``'s output pieces (deploy/sql_cli.py): the progress line, an error framed in a
stream, the table."""

from __future__ import annotations

import time

import pytest

from deploy.sql_cli import Progress, SqlError, _checked_stream, print_table
from query_api.sql_endpoint import _stream_exception


def test_progress_line_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(enabled=True)
    progress.add(3 * 1024 * 1024)
    time.sleep(0.3)
    progress.add(1024 * 1024)
    progress.done("wrote out.csv")
    err = capsys.readouterr().err
    assert "received 3.0 MiB in" in err and "received 4.0 MiB in" in err
    assert "wrote out.csv (4.0 MiB in" in err


def test_an_error_framed_in_the_stream_is_raised_after_the_data_before_it() -> None:
    tag = "0123456789abcdef"
    frame = _stream_exception(
        tag, "Code: 396. DB::Exception: Limit for result exceeded. (TOO_MANY_ROWS_OR_BYTES)"
    )
    data = b"1\n2\n" * 20 + b"3\n"
    for split in (len(data) - 2, len(data) + 5, len(data) + 30):  # the frame whole, or cut in two
        stream = data + frame
        chunks = _checked_stream(iter([stream[:split], stream[split:]]), tag)
        got = b""
        with pytest.raises(SqlError, match=r"^Code: 396\. DB::Exception: Limit for result exceeded"):
            for chunk in chunks:
                got += chunk
        assert got == data
    assert b"".join(_checked_stream(iter([b"a\n", b"b\n"]), tag)) == b"a\nb\n"


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    body = b'["meter","value","unit"]\n["egress_bytes","1024.5",null]\n["ai_tasks",3,"tasks"]\n'
    print_table(iter([body]), Progress(enabled=False))
    captured = capsys.readouterr()
    assert "egress_bytes" in captured.out and "NULL" in captured.out and "tasks" in captured.out
    assert "2 rows" in captured.err
