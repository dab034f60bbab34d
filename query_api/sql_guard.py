"""What an analyst's statement may be, judged before the engine sees it (the SQL endpoint).

The endpoint's engine handle runs with ``readonly=1`` (query_api/sql_engine.py), and the engine
then refuses writes, DDL, ``SYSTEM`` and every table function that reaches outside (``file``,
``url``, ``s3``, ``remote``, ``mysql``, ``python``…) with ClickHouse's read-only error. Measured
on chdb 4.4, the embedded engine still allows, even read-only, four things a server would not:

- the scalar function ``file('/any/path')`` reads any file of this process (the admin token,
  the analyst keys…): the embedded engine has no ``user_files_path`` fence;
- ``SELECT … INTO OUTFILE '/path'`` writes a file on this machine;
- ``KILL QUERY`` stops any query of the process, the aggregator's writes included;
- several statements separated by ``;`` in one request.

So a statement is tokenized here (comments, strings and quoted identifiers understood, so that
none of them can hide or fake a keyword) and must be ONE statement of a reading kind (``SELECT``,
``WITH``, ``SHOW``, ``DESCRIBE``, ``EXISTS``, ``EXPLAIN``, or a parenthesized ``SELECT``), with
no call to ``file``, ``catboostEvaluate``, and no ``INTO OUTFILE``. Anything else is answered with
the errors a ClickHouse server gives. This is a fence in front of the engine's own, not instead.

The trailing ``FORMAT <name>`` clause is found here too: it decides the response's format.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

#: ClickHouse error codes the endpoint answers with (src/Common/ErrorCodes.cpp).
SYNTAX_ERROR = 62
READONLY = 164

READING_KINDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})
#: Statements that are not reads: answered with the read-only error (any other word: a syntax error).
OTHER_KINDS = frozenset(
    {
        "INSERT", "ALTER", "DROP", "CREATE", "ATTACH", "DETACH", "RENAME", "TRUNCATE", "OPTIMIZE",
        "SYSTEM", "KILL", "SET", "USE", "GRANT", "REVOKE", "EXCHANGE", "UNDROP", "DELETE", "UPDATE",
        "BACKUP", "RESTORE", "CHECK", "WATCH", "MOVE", "BEGIN", "COMMIT", "ROLLBACK", "REPLACE",
        "EXECUTE",
    }
)  # fmt: skip
#: Functions that reach outside the engine's tables even in read-only mode (lower case).
FORBIDDEN_FUNCTIONS = frozenset({"file", "catboostevaluate"})


class Refused(Exception):
    """A statement the endpoint does not run: ``code`` is the ClickHouse error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Token:
    kind: str  # "word" (keyword or bare identifier), "ident" (quoted identifier), "string", "num", "punct"
    text: str  # a quoted identifier without its quotes
    pos: int


@dataclass(frozen=True)
class Statement:
    """A statement judged runnable: its kind and the format its FORMAT clause asks for, if any."""

    kind: str
    format: str | None


def tokenize(sql: str) -> list[Token]:
    """ClickHouse's lexical structure, as far as a judge needs it: ``--``/``#``/``/* */``
    comments dropped, ``'…'`` strings, ``"…"`` and backquoted identifiers (backslash escapes and
    doubled quotes), words, numbers, punctuation."""
    out: list[Token] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i) or c == "#":
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            # ClickHouse nests block comments
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise Refused(SYNTAX_ERROR, f"Syntax error: unterminated comment at position {i + 1}")
            i = j
        elif c in "'\"`":
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise Refused(SYNTAX_ERROR, f"Syntax error: unterminated quoted text at position {i + 1}")
                ch = sql[j]
                if ch == "\\" and j + 1 < n:
                    buf.append(sql[j + 1])
                    j += 2
                elif ch == c and j + 1 < n and sql[j + 1] == c:
                    buf.append(c)
                    j += 2
                elif ch == c:
                    j += 1
                    break
                else:
                    buf.append(ch)
                    j += 1
            out.append(Token("string" if c == "'" else "ident", "".join(buf), i))
            i = j
        elif c.isalpha() or c == "_" or ord(c) > 127:
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "_$" or ord(sql[j]) > 127):
                j += 1
            out.append(Token("word", sql[i:j], i))
            i = j
        elif c.isdigit():
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "._"):
                j += 1
            out.append(Token("num", sql[i:j], i))
            i = j
        else:
            out.append(Token("punct", c, i))
            i += 1
    return out


def judge(sql: str) -> Statement:
    """The statement if the endpoint runs it; ``Refused`` with ClickHouse's code and text if not."""
    tokens = tokenize(sql)
    # A trailing ";" (or several) is allowed; anything after a ";" is a second statement.
    while tokens and tokens[-1].text == ";" and tokens[-1].kind == "punct":
        tokens.pop()
    if not tokens:
        raise Refused(SYNTAX_ERROR, "Empty query. (SYNTAX_ERROR)")
    for t in tokens:
        if t.kind == "punct" and t.text == ";":
            raise Refused(
                SYNTAX_ERROR,
                f"Syntax error (Multi-statements are not allowed): failed at position {t.pos + 1}. (SYNTAX_ERROR)",
            )
    first = next((t for t in tokens if not (t.kind == "punct" and t.text == "(")), tokens[0])
    kind = first.text.upper() if first.kind == "word" else ""
    if kind not in READING_KINDS and kind not in OTHER_KINDS:
        raise Refused(
            SYNTAX_ERROR,
            f"Syntax error: failed at position {first.pos + 1} ({first.text!r}): expected a statement "
            "such as SELECT, WITH, SHOW, DESCRIBE, EXISTS or EXPLAIN. (SYNTAX_ERROR)",
        )
    if kind not in READING_KINDS or (first is not tokens[0] and kind not in ("SELECT", "WITH")):
        raise Refused(READONLY, "analyst: Cannot execute query in readonly mode. (READONLY)")
    for a, b in itertools.pairwise(tokens):
        if a.kind in ("word", "ident") and a.text.lower() in FORBIDDEN_FUNCTIONS and b.text == "(":
            raise Refused(
                READONLY,
                f"analyst: Cannot execute query in readonly mode: function {a.text} reads outside "
                "the database. (READONLY)",
            )
        if a.kind == "word" and b.kind == "word" and a.text.upper() == "INTO" and b.text.upper() == "OUTFILE":
            raise Refused(
                READONLY, "analyst: Cannot execute query in readonly mode: INTO OUTFILE. (READONLY)"
            )
    return Statement(kind=kind, format=format_clause(tokens))


def format_clause(tokens: list[Token]) -> str | None:
    """The name in the statement's own ``FORMAT <name>`` clause (outside parentheses), if any."""
    depth, found = 0, None
    for i, t in enumerate(tokens):
        if t.kind == "punct" and t.text == "(":
            depth += 1
        elif t.kind == "punct" and t.text == ")":
            depth -= 1
        elif (
            depth == 0
            and t.kind == "word"
            and t.text.upper() == "FORMAT"
            and i + 1 < len(tokens)
            and tokens[i + 1].kind in ("word", "ident")
            and (i == 0 or tokens[i - 1].text != ".")
        ):
            found = tokens[i + 1].text
    return found
