"""Versioned, reversible ClickHouse migrations (``schemas/migrations/NNNN_name.{up,down}.sql``).

Applied migrations are recorded in ``schema_migrations``. The SQL is a template: ``{db}``,
``{on_cluster}`` and ``{{engine:Name(args)}}`` are filled from settings, so the same files create
single-node tables here and ``Replicated*`` tables ``ON CLUSTER`` on a cluster
(``EmbeddedRocksDB``, which has no replicated form, becomes ``ReplicatedReplacingMergeTree``). Nothing in a
template comes from user input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(up|down)\.sql$")
_ENGINE = re.compile(r"\{\{engine:(\w+)(?:\(([^)]*)\))?\}\}")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: Path
    down: Path


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: dict[int, dict[str, Path]] = {}
    names: dict[int, str] = {}
    for path in directory.iterdir():
        m = _FILE.match(path.name)
        if not m:
            continue
        version = int(m.group(1))
        found.setdefault(version, {})[m.group(3)] = path
        names[version] = m.group(2)
    out = []
    for version in sorted(found):
        pair = found[version]
        if set(pair) != {"up", "down"}:
            raise ValueError(f"migration {version:04d} needs both an up and a down file")
        out.append(Migration(version, names[version], pair["up"], pair["down"]))
    return out


def render(sql: str, database: str, cluster: str | None) -> list[str]:
    """Fill a migration template and split it into statements."""

    def engine(m: re.Match[str]) -> str:
        name, args = m.group(1), m.group(2)
        if cluster and name == "EmbeddedRocksDB":
            # RocksDB has no replicated form: each replica's keys would be its own. On a cluster
            # a key-value table is a ReplicatedReplacingMergeTree with the same PRIMARY KEY (the
            # same statements work on both: point lookups by key, an insert of a key overwrites)
            name, args = "ReplacingMergeTree", None
        if cluster:
            path = f"'/clickhouse/tables/{{shard}}/{database}/{{uuid}}', '{{replica}}'"
            inner = f"{path}, {args}" if args else path
            return f"Replicated{name}({inner})"
        return f"{name}({args})" if args else name

    text = _ENGINE.sub(engine, sql)
    text = text.replace("{db}", database).replace(
        "{on_cluster}", f"ON CLUSTER '{cluster}'" if cluster else ""
    )
    # Comments go first so a ';' inside one cannot split a statement.
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _ensure_table(client: Client, database: str, cluster: str | None) -> None:
    for stmt in render(
        "CREATE TABLE IF NOT EXISTS {db}.schema_migrations {on_cluster} "
        "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3), "
        "is_applied UInt8) ENGINE = {{engine:ReplacingMergeTree(applied_at)}} ORDER BY version",
        database,
        cluster,
    ):
        client.command(stmt)


def applied_versions(client: Client, database: str, cluster: str | None = None) -> list[int]:
    _ensure_table(client, database, cluster)
    rows = client.query(
        f"SELECT version FROM {database}.schema_migrations FINAL WHERE is_applied = 1 ORDER BY version"
    ).result_rows
    return [int(r[0]) for r in rows]


def migrate(
    client: Client, database: str, cluster: str | None = None, target: int | None = None
) -> list[str]:
    """Apply pending migrations up to ``target`` (all by default), or roll back to it when it is
    lower than the current version. Returns a line per step taken."""
    all_migrations = discover()
    done = set(applied_versions(client, database, cluster))
    top = max((m.version for m in all_migrations), default=0) if target is None else target
    log: list[str] = []
    for mig in all_migrations:
        if mig.version <= top and mig.version not in done:
            for stmt in render(mig.up.read_text(), database, cluster):
                client.command(stmt)
            client.insert(
                f"{database}.schema_migrations",
                [[mig.version, mig.name, 1]],
                column_names=["version", "name", "is_applied"],
            )
            log.append(f"applied {mig.version:04d}_{mig.name}")
    for mig in sorted(all_migrations, key=lambda m: -m.version):
        if mig.version > top and mig.version in done:
            for stmt in render(mig.down.read_text(), database, cluster):
                client.command(stmt)
            client.insert(
                f"{database}.schema_migrations",
                [[mig.version, mig.name, 0]],
                column_names=["version", "name", "is_applied"],
            )
            log.append(f"rolled back {mig.version:04d}_{mig.name}")
    return log
