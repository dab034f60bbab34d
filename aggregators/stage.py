"""The batch's events, parsed and validated inside ClickHouse (pure: SQL text and parameters).

The Kafka message values go to the engine as they are: each value is a JSON array of
CloudEvents, its brackets stripped and the messages joined with commas, one ``JSONEachRow``
insert into a Memory *stage* table with a typed column per envelope field (``data`` kept as its
JSON text). Strict reading settings make the engine refuse any value of the wrong JSON type,
unknown or duplicate fields: such a message is found by bisecting (processor.py) and decided by
pydantic, like every event the SQL below does not accept.

``check_select`` then decides every staged row with SQL *generated from the pydantic models*
(schemas/events.py), as the msgspec fast path was: envelope lengths and patterns, the data of
every usage type checked against a canonical-form regular expression built from the model's
fields (order, types, bounds, optional fields), finite bounded numbers, the subject, the tenant
against the message key, the time window against the Kafka timestamp. The contract, held by a
property test (tests/unit/test_stage_sql.py): the SQL may be *stricter* than pydantic, never
more lenient, and what it accepts it stores exactly as the pydantic path stores it. A row it
does not accept is not rejected here: its position goes back to Python, where pydantic decides
and words the reject (aggregators/decode.py), or normalizes the event when it is valid after all.

Accepted rows land in a second Memory table (``rows``) with the raw table's columns plus the
message index and the position in it; ``new_insert`` keeps the first occurrence of every
(tenant, event id) that ``events_raw`` does not hold yet (looked up in ``event_keys``, ``key_of``) in a third
(``new``), which ``raw_insert_select`` moves into ``events_raw`` in one INSERT and
``keys_insert_select`` into ``event_keys`` right after.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import annotated_types as at

from aggregators.decode import SourceMessage
from schemas.clickhouse import Table
from schemas.events import DATA_MODELS, JSON_INTEGER, USAGE_TYPES, Data, EventType
from schemas.validation import MAX_AGE, MAX_FUTURE

#: Reading settings of the stage insert: a number, boolean or array where a string goes, an
#: unknown or a duplicate field fail the insert (they are pydantic's to decide and word).
STAGE_SETTINGS: dict[str, Any] = {
    "input_format_json_read_objects_as_strings": 1,
    "input_format_json_read_numbers_as_strings": 0,
    "input_format_json_read_bools_as_strings": 0,
    "input_format_json_read_arrays_as_strings": 0,
    "input_format_skip_unknown_fields": 0,
    "input_format_json_empty_as_default": 0,
    "input_format_null_as_default": 0,
}

STAGE_COLUMNS = (
    ("specversion", "Nullable(String)"),
    ("id", "Nullable(String)"),
    ("source", "Nullable(String)"),
    ("type", "Nullable(String)"),
    ("subject", "Nullable(String)"),
    ("time", "Nullable(String)"),
    ("tenant", "Nullable(String)"),
    ("datacontenttype", "Nullable(String)"),
    ("data", "Nullable(String)"),
)

ROW_COLUMNS = (
    "ok UInt8, msg UInt32, pos UInt32, tenant String, event_id String, type String, source String, "
    "subject String, time DateTime64(3, 'UTC'), data String, src_partition Int32, src_offset Int64"
)
RAW_COLUMNS = "tenant, event_id, type, source, subject, time, data, src_partition, src_offset"

# One INSERT must be one block, hence one part (the watermark's atomicity, docs/exactly-once.md).
ONE_BLOCK: dict[str, Any] = {
    "max_threads": 1,
    "max_insert_threads": 1,
    "min_insert_block_size_rows": 1 << 40,
    "min_insert_block_size_bytes": 1 << 50,
    "max_insert_block_size": 1 << 40,
    "max_block_size": 1 << 20,
}


def with_settings(sql: str, settings: dict[str, Any]) -> str:
    """``sql`` with ``settings`` as its trailing SETTINGS clause (they apply to the whole
    statement, an INSERT ... SELECT's insert too). Not ``client.command(settings=...)``: the
    embedded backend applies those with a SET per setting, a read of system.settings and a SET
    back per setting, about 5 ms of CPU per statement."""
    items = []
    for k, v in settings.items():
        if not k.replace("_", "").isalnum():
            raise ValueError(f"bad setting name {k!r}")
        value = str(v) if isinstance(v, int) else "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"
        items.append(f"{k} = {value}")
    return f"{sql}\nSETTINGS {', '.join(items)}" if items else sql


def stage_create(name: str) -> str:
    cols = ", ".join(f"{c} {t}" for c, t in STAGE_COLUMNS)
    return f"CREATE TABLE IF NOT EXISTS {name} ({cols}) ENGINE = Memory"


def rows_create(name: str) -> str:
    return f"CREATE TABLE IF NOT EXISTS {name} ({ROW_COLUMNS}) ENGINE = Memory"


# ---- generated from the models -----------------------------------------------------------------

_STR = r'("[^"\\\x00-\x1f]*")'  # a JSON string without escapes: its text is its value
# Python's repr of a float in [1e-4, 1e16): its fraction is 0 or ends in a non-zero digit, which
# the condition checks (``_FLOAT_FRACTION``): in the pattern, the rule made the regular expression
# ambiguous one character ahead, and extracting its groups ~1.6 times dearer (docs/performance.md)
_FLOAT = r"((?:0|[1-9][0-9]{0,15})\.[0-9]+)"
_FLOAT_FRACTION = "(NOT endsWith({g}, '0') OR endsWith({g}, '.0'))"
_INT = r"(0|[1-9][0-9]{0,18})"


@dataclass(frozen=True)
class DataCheck:
    """The SQL check of one usage type's ``data`` text: a regular expression with one group per
    field and a condition over the groups (``g[i]``) that holds when pydantic accepts the data
    and normalizes it to this very text."""

    regex: str
    condition: str
    subject_group: int
    groups: int
    #: SQL over the groups: the data's normalized text when the regex admitted an absent field
    #: (pydantic writes it out as ``null``), ``''`` when the data text is already that text.
    text: str = "''"


def _constraints(metadata: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for m in metadata:
        flat.extend(m.metadata if type(m).__name__ == "FieldInfo" else [m])
    return flat


def _field(name: str, annotation: Any, metadata: list[Any], optional: bool, g: str) -> tuple[str, str]:
    """(regex of the field's value, condition on its group ``g``)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        return _field(name, inner, [*extra, *metadata], optional, g)
    if origin in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation!r}")
        return _field(name, args[0], metadata, True, g)
    conds: list[str] = []
    flat = _constraints(metadata)
    if annotation is str:
        # the group is the string's text in its quotes (two one-byte characters); the fewer and
        # simpler the conditions, the cheaper the query is to analyse and to run
        regex = _STR
        for m in flat:
            if isinstance(m, at.MinLen) and m.min_length == 1:
                regex = _STR.replace("*", "+")
            elif isinstance(m, at.MinLen):
                conds.append(f"lengthUTF8({g}) >= {m.min_length + 2}")
            elif isinstance(m, at.MaxLen):
                conds.append(f"lengthUTF8({g}) <= {m.max_length + 2}")
            elif getattr(m, "pattern", None) == r"^[^\x00-\x1f]+$":
                pass  # no control character: the regex admits none
            else:
                raise TypeError(f"no SQL for constraint {m!r} of {name}")
    elif annotation is float:
        regex, value = _FLOAT, f"toFloat64OrNull({g})"
        conds.append(_FLOAT_FRACTION.format(g=g))
        # at most 15 significant digits: the text is then the shortest that reads back as this
        # float, i.e. its normalized form (fixed notation between 1e-4 and 1e16)
        conds.append(f"length(trimLeft(replaceOne({g}, '.', ''), '0')) <= 15")
        conds.append(f"({value} = 0 OR {value} >= 0.0001)")
        conds.extend(_bounds(flat, value, name))
    elif annotation is int:
        regex, value = _INT, f"toUInt64OrNull({g})"
        conds.append(f"isNotNull({value})")
        conds.extend(_bounds([m for m in flat if m is not JSON_INTEGER], value, name))
    else:
        raise TypeError(f"unsupported annotation {annotation!r} of {name}")
    cond = " AND ".join(conds) or "1"
    if optional:
        return f"(null|{regex[1:-1]})", f"({g} = 'null' OR ({cond}))"
    return regex, f"({cond})"


def _bounds(flat: list[Any], value: str, name: str) -> list[str]:
    out = []
    for m in flat:
        if isinstance(m, at.Ge):
            if not isinstance(m.ge, int | float) or m.ge > 0:  # the patterns admit no sign
                out.append(f"{value} >= {m.ge!r}")
        elif isinstance(m, at.Le):
            out.append(f"{value} <= {m.le!r}")
        elif isinstance(m, at.Gt):
            out.append(f"{value} > {m.gt!r}")
        elif isinstance(m, at.Lt):
            out.append(f"{value} < {m.lt!r}")
        elif type(m).__name__ == "Strict" or hasattr(m, "allow_inf_nan"):
            pass  # JSON numbers only, finite: the regex admits nothing else
        else:
            raise TypeError(f"no SQL for constraint {m!r} of {name}")
    return out


def data_check(model: type[Data]) -> DataCheck | None:
    """The generated check of ``model``, or None when the SQL cannot express it (a model
    validator, a list, a pattern of its own): pydantic then decides every event of the type.

    The fields in the model's order (pydantic's output order); an optional field (default None)
    after the first may be absent, as pydantic allows: its group is then empty, and the stored
    text is rebuilt from the groups with ``null`` in its place, as pydantic writes it. Other
    orders are left to pydantic (it accepts them; the SQL is only stricter)."""
    if model.__pydantic_decorators__.model_validators:
        return None
    parts: list[str] = []
    conds: list[str] = []
    pieces: list[str] = []  # the normalized text: literal pieces and group expressions
    omitted: list[int] = []  # the groups of the fields that may be absent
    subject = 0
    try:
        for i, (name, info) in enumerate(model.model_fields.items(), start=1):
            if not info.is_required() and info.default is not None:
                return None  # a default other than None is written out by pydantic
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
                return None  # the name goes into the regex and SQL literals as is
            g = f"g[{i}]"
            regex, cond = _field(name, info.annotation, list(info.metadata), False, g)
            sep = "," if i > 1 else ""
            literal = f"'{sep}\"{name}\":'"
            if name == model.SUBJECT_FIELD:
                subject = i
            if not info.is_required() and i > 1 and name != model.SUBJECT_FIELD:
                omitted.append(i)
                parts.append(f'(?:{sep}"{name}":{regex})?')
                conds.append(f"({g} = '' OR {cond})")
                pieces += [literal, f"if({g} = '', 'null', {g})"]
            else:
                parts.append(f'{sep}"{name}":{regex}')
                conds.append(cond)
                pieces += [literal, g]
    except TypeError:
        return None
    if not subject:
        return None
    # char(123), char(125): braces in the query text could be read as parameter placeholders
    # rebuilt only when a field is absent: a present one, null or not, is already pydantic's text
    absent = " OR ".join(f"g[{i}] = ''" for i in omitted)
    text = f"if({absent}, concat(char(123), {', '.join(pieces)}, char(125)), '')" if omitted else "''"
    return DataCheck("^\\{" + "".join(parts) + "\\}$", " AND ".join(conds), subject, len(parts), text)


CHECKS: dict[EventType, DataCheck] = {
    t: c for t in sorted(USAGE_TYPES) if (c := data_check(DATA_MODELS[t])) is not None
}

_TIME = r"^[0-9]{4}-(0[1-9]|1[0-2])-[0-3][0-9]T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|\+00:00)$"
_ID_OK = "isNotNull({c}) AND lengthUTF8({c}) BETWEEN 1 AND 128 AND NOT match({c}, '[\\\\x00-\\\\x1f]')"
_FUTURE_US = int(MAX_FUTURE.total_seconds()) * 1_000_000
_AGE_US = int(MAX_AGE.total_seconds()) * 1_000_000


@dataclass(frozen=True)
class Batch:
    """Per message of the stage, in stage order: what the SQL needs to judge its events."""

    counts: Sequence[int]  # events per message
    partitions: Sequence[int]
    offsets: Sequence[int]
    timestamps_ms: Sequence[int]
    keys: Sequence[str]  # the key's tenant, '' for none
    backfill: Sequence[int]

    @classmethod
    def of(cls, messages: Sequence[SourceMessage], counts: Sequence[int]) -> Batch:
        """The batch of ``messages`` (in stage order), ``counts[i]`` events staged of the i-th."""
        return cls(
            counts,
            [m.partition for m in messages],
            [m.offset for m in messages],
            [m.timestamp_ms for m in messages],
            [m.key.decode("utf-8", "replace") if m.key else "" for m in messages],
            [int(m.backfill) for m in messages],
        )

    def parameters(self) -> dict[str, Any]:
        ends, total = [], 0
        starts, owners = [], []  # the first row of each message with events, and the message
        for i, n in enumerate(self.counts):
            if n:
                starts.append(total)
                owners.append(i)
            total += n
            ends.append(total)
        return {
            "ends": ends,
            "starts": starts,
            "owners": owners,
            "parts": list(self.partitions),
            "offs": list(self.offsets),
            "ts": list(self.timestamps_ms),
            "keys": list(self.keys),
            "bf": list(self.backfill),
            "re_time": _TIME,
            **{f"re_{i}": c.regex for i, c in enumerate(CHECKS.values())},
        }


def check_select(stage: str) -> str:
    """Every staged row, judged: (ok, msg, pos) and the raw table's columns (meaningful when ok).
    Parameters: ``Batch.parameters``. Must run with max_threads=1 (stage order = row number)."""
    # One regular expression per row, of the row's type; its groups bound once (``g``, a lambda
    # argument) for the type's condition and its subject: (data ok, subject token).
    cases = []
    for i, (t, c) in enumerate(CHECKS.items()):
        judged = (
            f"arrayMap(g -> (toUInt8(ifNull(length(g) = {c.groups} AND {c.condition}, 0)), "
            f"g[{c.subject_group}], {c.text}), [extractGroups(data, {{re_{i}:String}})])[1]"
        )
        cases.append(f"type = '{t.value}', {judged}")
    # (data ok, subject token, normalized data text or '' when it is the data text itself)
    dcheck = f"multiIf({', '.join(cases)}, (toUInt8(0), '', ''))"
    # A row's message: the last message starting at or before it (a running max over the rows in
    # stage order; a search of ``ends`` per row cost O(messages) per event).
    # Three levels, each computing its columns once: an alias used several times in one level
    # may be evaluated again at each use (the regular expressions then ran ~20 times a row).
    return f"""
SELECT
    ok, msg, pos, rtenant AS tenant, ifNull(id, '') AS event_id, ifNull(type, '') AS type,
    ifNull(source, '') AS source, subj AS subject,
    ifNull(toDateTime64(t6, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS time,
    if(dc.3 = '', ifNull(data, ''), dc.3) AS data, src_partition, src_offset
FROM (
    SELECT *,
        toUInt8(ifNull((
            specversion = '1.0'
            AND {_ID_OK.format(c="id")}
            AND isValidUTF8(id)
            AND isNotNull(source) AND isValidUTF8(source) AND lengthUTF8(source) BETWEEN 1 AND 256
            AND isNotNull(type)
            AND (isNull(tenant) OR ({_ID_OK.format(c="tenant")} AND isValidUTF8(tenant)))
            AND (isNull(datacontenttype) OR datacontenttype = 'application/json')
            AND isNotNull(data) AND isValidUTF8(data) AND dc.1 = 1
            AND (isNull(subject) OR subject = subj)
            AND rtenant != '' AND (key = '' OR isNull(tenant) OR tenant = key)
            AND isNotNull(time) AND match(time, {{re_time:String}})
            AND toUInt16OrZero(substring(time, 1, 4)) BETWEEN 1970 AND 2200
            AND toString(toDate32OrNull(substring(time, 1, 10))) = substring(time, 1, 10)
            AND isNotNull(et_us)
            AND et_us <= recv_us + {_FUTURE_US}
            AND (backfill = 1 OR et_us >= recv_us - {_AGE_US})
        ), 0)) AS ok
    FROM (
        SELECT *,
            substring(dc.2, 2, greatest(length(dc.2), 2) - 2) AS subj,
            if(isNull(tenant), key, tenant) AS rtenant,
            {{parts:Array(Int32)}}[msg + 1] AS src_partition,
            {{offs:Array(Int64)}}[msg + 1] AS src_offset,
            {{ts:Array(Int64)}}[msg + 1] * 1000 AS recv_us,
            {{bf:Array(UInt8)}}[msg + 1] AS backfill,
            -- the time parsed once: its millisecond value (the stored one) is the microsecond
            -- value truncated, as parsing at scale 3 gives it for every time an accepted row can
            -- hold (1970 to 2200; they differ before 1970 only)
            parseDateTime64BestEffortOrNull(time, 6, 'UTC') AS t6,
            toUnixTimestamp64Micro(t6) AS et_us
        FROM (
            SELECT *, {dcheck} AS dc,
                toUInt32(rn - if(msg = 0, 0, {{ends:Array(UInt64)}}[msg])) AS pos,
                {{keys:Array(String)}}[msg + 1] AS key
            FROM (
                SELECT *, toUInt32(max(transform(rn, {{starts:Array(UInt64)}}, {{owners:Array(UInt32)}},
                    toUInt32(0))) OVER (ORDER BY rn ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) AS msg
                FROM (SELECT *, rowNumberInAllBlocks() AS rn FROM {stage})
            )
        )
    )
)
"""


def rows_insert(rows: str, stage: str) -> str:
    """Every staged row, judged, into the rows table (one statement: its analysis alone costs
    ~0.1 s of CPU, so the judging is not run twice)."""
    return f"INSERT INTO {rows} SELECT * FROM ({check_select(stage)})"


def flagged_select(rows: str) -> str:
    return f"SELECT msg, pos FROM {rows} WHERE NOT ok ORDER BY msg, pos"


NEW_COLUMNS = "msg UInt32, pos UInt32, " + ROW_COLUMNS.split(", ", 3)[3]


def new_create(name: str) -> str:
    """The batch's new rows (what the raw insert will write), with their message and position."""
    return f"CREATE TABLE IF NOT EXISTS {name} ({NEW_COLUMNS}) ENGINE = Memory"


def key_of(tenant: str = "tenant", event_id: str = "event_id") -> str:
    """SQL for event_keys' key of an event: the tenant's length in bytes, a colon, the tenant,
    the event id, in one string. One string because the engine reads a RocksDB table by a join
    (``join_algorithm = 'direct'``: a multi-get per block) only on a single scalar key column,
    not on the pair nor a tuple; the length makes it injective (``("t", "1x")`` and
    ``("t1", "x")`` are ``1:t1x`` and ``2:t1x``), so a key of one tenant never matches another
    tenant's event. Migration 0008 fills the table with the same expression."""
    return f"concat(toString(length({tenant})), ':', {tenant}, {event_id})"


#: the setting of the dedupe's look-up on a RocksDB event_keys (``new_insert(direct=True)``)
DIRECT_JOIN: dict[str, Any] = {"join_algorithm": "direct"}


def new_insert(database: str, rows: str, new: str, direct: bool = True) -> str:
    """The batch's new events into the ``new`` table (emptied first): the first occurrence (in
    the log's order) of each (tenant, event id) of the batch that ``events_raw`` does not hold
    yet, rows at ``excluded`` (message, position) left out. Looked up in ``event_keys`` (every
    key of events_raw, ``key_of``), which the writer brings up to events_raw for the partitions
    owned before this runs (``keys_catch_up``).

    ``direct`` (event_keys in RocksDB, the embedded engine): a left join that reads the table
    by key for each block of the batch, run with ``DIRECT_JOIN`` (2.3 µs per key where the
    ``IN`` form below cost 5.1, docs/performance.md); an event whose key is not stored gets the
    default, an empty key (a stored key never is: it starts with the tenant's length).
    Otherwise (a cluster's ReplacingMergeTree, which cannot be joined that way): the batch's
    keys looked up with ``key IN (...)`` on the table's primary key.

    Dedupe and raw insert are two statements now (the rollup stage is filled from ``new`` in
    between, the trial of the derived statements' conversions, processor.py); no other process
    writes the batch's partitions meanwhile (one owner per partition, and a tenant's events are
    in one partition), and ``new`` is a Memory table of this process, so a crash between them is
    a crash before the raw insert."""
    keys = f"{database}.{Table.EVENT_KEYS}"
    batch = f"""SELECT * FROM {rows} WHERE ok AND (msg, pos) NOT IN {{excluded:Array(Tuple(UInt32, UInt32))}}
    ORDER BY msg, pos LIMIT 1 BY tenant, event_id"""
    if direct:
        columns = ", ".join(f"r.{c.strip()}" for c in RAW_COLUMNS.split(","))
        return f"""
INSERT INTO {new} (msg, pos, {RAW_COLUMNS})
SELECT r.msg, r.pos, {columns}
FROM (SELECT *, {key_of()} AS batch_key FROM ({batch})) AS r
LEFT JOIN {keys} AS stored ON r.batch_key = stored.key
WHERE empty(stored.key)
"""
    return f"""
INSERT INTO {new} (msg, pos, {RAW_COLUMNS})
SELECT msg, pos, {RAW_COLUMNS}
FROM ({batch})
WHERE {key_of()} NOT IN (
    SELECT key FROM {keys} WHERE key IN (SELECT {key_of()} FROM {rows} WHERE ok)
)
"""


KEY_COLUMNS = "key, tenant, event_id, src_partition, src_offset, ingested_at"


def keys_insert_select(database: str, new: str) -> str:
    """The keys of the batch's new rows into event_keys, right after the raw insert, from the
    same ``new`` table and with the same ``ingested_at``. An upsert: run twice, the same keys."""
    return (
        f"INSERT INTO {database}.{Table.EVENT_KEYS} ({KEY_COLUMNS}) "
        f"SELECT {key_of()}, tenant, event_id, src_partition, src_offset, {{now:DateTime64(3, 'UTC')}} FROM {new}"
    )


def keys_watermarks_insert(database: str, source: str, where: str = "1") -> str:
    """event_key_watermarks moved to the last offset of each partition of ``source`` (the
    batch's ``new`` table, or events_raw in ``where``), after its keys are in: an upsert by
    partition. The offsets only grow here (a batch's rows are above its partitions' raw
    watermark, which the keys watermark never passes); a replay lowers them
    (``keys_watermarks_lower``)."""
    return (
        f"INSERT INTO {database}.{Table.EVENT_KEY_WATERMARKS} (src_partition, src_offset) "
        f"SELECT src_partition, max(src_offset) FROM {source} WHERE {where} GROUP BY src_partition"
    )


def keys_catch_up(database: str, where: str) -> str:
    """The keys of the raw rows in ``where`` (per partition, offsets above event_keys'
    watermark up to the raw one) into event_keys: the keys a crash between the raw insert and
    the keys watermark left out (some of them may be in already: an upsert overwrites them)."""
    return (
        f"INSERT INTO {database}.{Table.EVENT_KEYS} ({KEY_COLUMNS}) "
        f"SELECT {key_of()}, tenant, event_id, src_partition, src_offset, ingested_at "
        f"FROM {database}.{Table.EVENTS_RAW} WHERE {where}"
    )


def raw_insert_select(database: str, new: str) -> str:
    """The batch's new rows (``new_insert``) into events_raw: one INSERT, one part."""
    return (
        f"INSERT INTO {database}.{Table.EVENTS_RAW} ({RAW_COLUMNS}, ingested_at) "
        f"SELECT {RAW_COLUMNS}, {{now:DateTime64(3, 'UTC')}} FROM {new}"
    )


def _duplicates_select(database: str, rows: str, new: str) -> str:
    # a judged row that is not new is a copy: of an earlier one of the batch, or of a stored one;
    # one already recorded (a batch re-processed after a crash, cut differently: its token then
    # differs) is left out, looked up by the table's key
    return f"""
SELECT tenant, event_id, src_partition, src_offset, toUInt32(nth) AS nth,
    fromUnixTimestamp64Milli({{ts:Array(Int64)}}[msg + 1], 'UTC') AS received_at,
    {{now:DateTime64(3, 'UTC')}} AS dropped_at
FROM (
    SELECT *,
        row_number() OVER (PARTITION BY tenant, event_id, src_partition, src_offset ORDER BY pos) - 1 AS nth
    FROM {rows} WHERE ok AND (msg, pos) NOT IN {{excluded:Array(Tuple(UInt32, UInt32))}}
)
WHERE (msg, pos) NOT IN (SELECT msg, pos FROM {new})
    AND (tenant, event_id, src_partition, src_offset, toUInt32(nth)) NOT IN (
        SELECT tenant, event_id, src_partition, src_offset, nth
        FROM {database}.{Table.EVENT_DUPLICATES}
        WHERE (tenant, event_id) IN (SELECT tenant, event_id FROM {rows} WHERE ok)
    )
"""


DUPLICATE_COLUMNS = "tenant, event_id, src_partition, src_offset, nth, received_at, dropped_at"


def duplicates_create(name: str) -> str:
    """The batch's copies, staged once (``duplicates_stage``) and inserted from there."""
    return (
        f"CREATE TABLE IF NOT EXISTS {name} (tenant String, event_id String, src_partition Int32, "
        "src_offset Int64, nth UInt32, received_at DateTime64(3, 'UTC'), dropped_at DateTime64(3, 'UTC')) "
        "ENGINE = Memory"
    )


def copies_count_select(rows: str, new: str) -> str:
    """How many judged rows (``excluded`` left out) are not new: 0 when the batch holds no copy,
    and then the copies' query need not run."""
    return (
        f"SELECT (SELECT count() FROM {rows} WHERE ok AND (msg, pos) NOT IN "
        "{excluded:Array(Tuple(UInt32, UInt32))}) - " + f"(SELECT count() FROM {new})"
    )


def duplicates_stage(database: str, rows: str, new: str, copies: str) -> str:
    """The copies the raw insert will drop, none already recorded, into the ``copies`` table
    (emptied first)."""
    return f"INSERT INTO {copies} ({DUPLICATE_COLUMNS}) {_duplicates_select(database, rows, new)}"


def duplicates_insert(database: str, copies: str) -> str:
    """The copies the raw insert will drop, into ``event_duplicates`` (run *before* it): every
    judged row but the batch's first occurrence of a key ``events_raw`` does not hold; ``nth``
    ranks the copies of one id inside one message. Keyed on the position, none already recorded
    (aggregators/rejections.py); no insert token (``ClickHouseWriter.record_duplicates``)."""
    return (
        f"INSERT INTO {database}.{Table.EVENT_DUPLICATES} ({DUPLICATE_COLUMNS}) "
        f"SELECT {DUPLICATE_COLUMNS} FROM {copies}"
    )


def written_select(database: str, where: str) -> str:
    """What the batch wrote, per tenant and partition (``where``: the batch's offset ranges)."""
    return (
        f"SELECT tenant, src_partition, max(time), min(src_offset), max(src_offset), count() "
        f"FROM {database}.{Table.EVENTS_RAW} WHERE {where} GROUP BY tenant, src_partition"
    )
