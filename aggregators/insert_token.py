"""Insert deduplication tokens, only where they hold: on Replicated tables.

A non-replicated MergeTree (the embedded engine, a single server) writes an insert's block id to
its deduplication log *before* it renames the part into place (ClickHouse
``MergeTreeSink::finishDelayedChunk``: ``deduplication_log->addPart``, then
``renameTempPartAndAdd``). A SIGKILL between the two keeps the block id and loses the part, and
the same insert run again after the restart (the same token, or without one the same content:
the log also dedupes by the block's checksum) is dropped as a copy of a part that does not
exist. Seen in the exactly-once SIGKILL test: ``event_duplicates``' log named a part absent from
disk, and the copies it held were never recorded; a period table loses a span the same way
(docs/exactly-once.md, "Known limits"). Every insert the aggregator makes is written once by a
lookup of its own (the table's watermark, or the rows' positions), so on such a table the
deduplication is switched off. A Replicated table commits the block id in Keeper together with
the part, so the hole is not there, and the token also covers a retry that reaches a replica not
yet holding the first insert: kept.
"""

from __future__ import annotations

from typing import Any

from clickhouse_connect.driver.client import Client

from schemas.clickhouse import Table

_engines: dict[tuple[str, str], str] = {}


def engine(client: Client, database: str, table: Table) -> str:
    """The engine of ``table`` (asked once per table and process): what decides an insert's
    deduplication here, and the form of dedupe's look-up in event_keys (writer.select_new)."""
    key = (database, str(table))
    if key not in _engines:
        _engines[key] = str(
            client.command(
                "SELECT engine FROM system.tables WHERE database = {d:String} AND name = {t:String}",
                parameters={"d": database, "t": str(table)},
            )
        )
    return _engines[key]


def replicated(client: Client, database: str, table: Table) -> bool:
    """Whether ``table`` is a Replicated table."""
    return engine(client, database, table).startswith("Replicated")


_knows_deduplicate_insert: dict[str, bool] = {}


def no_deduplication(client: Client) -> dict[str, Any]:
    """The settings that switch an insert's deduplication off. ClickHouse 26 decides with
    ``deduplicate_insert``, which supersedes ``insert_deduplicate`` (read only when the former is
    ``backward_compatible_choice``: ``insert_deduplicate = 0`` alone left a VALUES or a
    ``raw_insert`` block deduplicated by its contents); older servers know only
    ``insert_deduplicate`` and would refuse the new name. Both where the server has both (asked
    once per server version and process)."""
    version = str(getattr(client, "server_version", ""))
    if version not in _knows_deduplicate_insert:
        _knows_deduplicate_insert[version] = bool(
            int(str(client.command("SELECT count() FROM system.settings WHERE name = 'deduplicate_insert'")))
        )
    if _knows_deduplicate_insert[version]:
        return {"insert_deduplicate": 0, "deduplicate_insert": "disable"}
    return {"insert_deduplicate": 0}


def insert_settings(client: Client, database: str, table: Table, token: str | None) -> dict[str, Any]:
    """The settings of an insert into ``table`` that the aggregator writes once by a lookup of its
    own: ``token`` on a Replicated table (None: the engine's default there, for an insert whose
    rows differ from any earlier one's, events_raw's stamped with ``ingested_at``), no
    deduplication at all on any other (module doc)."""
    if replicated(client, database, table):
        return {"insert_deduplication_token": token} if token is not None else {}
    return no_deduplication(client)
