"""Issue 11 item 3: the embedded engine's memory is bounded by settings, and they are in effect.

The engine is started by the first chdb connection of a process, so the check runs in a fresh
process: ``metering run``'s own client set-up (``open_part_clients``) with ``METERING_CHDB_*``
values unlike the defaults, then the engine itself is asked what it runs with
(``system.server_settings``, jemalloc's options). And faust's buffer of fetched messages is
bounded by the aggregator's settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.settings import AggregatorSettings, RunSettings
from schemas.clickhouse import EngineCaps

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, re
from deploy.runner import open_part_clients
from deploy.settings import RunSettings

clients = open_part_clients(RunSettings())
rows = clients.aggregator.query("SELECT name, value FROM system.server_settings").result_rows
stats = clients.api.command("SELECT stats FROM system.jemalloc_stats")
decay = re.search(r"opt.dirty_decay_ms: (\\d+)", str(stats).replace("\\\\n", "\\n"))
# a RocksDB table's files carry the Bloom filter configured (RocksDB writes its options beside them)
clients.aggregator.command("CREATE TABLE rk (k String, v Int64) ENGINE = EmbeddedRocksDB PRIMARY KEY k")
clients.aggregator.command("INSERT INTO rk VALUES ('a', 1)")
path = clients.aggregator.command("SELECT data_paths[1] FROM system.tables WHERE name = 'rk' AND database = currentDatabase()")
import glob, os
found = sorted(glob.glob(os.path.join(str(path), "**", "OPTIONS-*"), recursive=True))
policy = re.findall(r"^\\s*filter_policy=(.*)$", open(found[-1]).read(), re.M) if found else []
print(json.dumps({"server": dict(rows), "dirty_decay_ms": int(decay[1]) if decay else None, "filter": policy}))
"""


@pytest.mark.clickhouse
def test_the_engine_runs_with_the_configured_caps(tmp_path: Path) -> None:
    configured = {
        "METERING_CHDB_MAX_SERVER_MEMORY_USAGE": str(1536 << 20),
        "METERING_CHDB_MERGES_MEMORY_USAGE_SOFT_LIMIT": str(384 << 20),
        "METERING_CHDB_MARK_CACHE_SIZE": str(48 << 20),
        "METERING_CHDB_INDEX_MARK_CACHE_SIZE": str(12 << 20),
        "METERING_CHDB_PRIMARY_INDEX_CACHE_SIZE": str(40 << 20),
        "METERING_CHDB_UNCOMPRESSED_CACHE_SIZE": str(8 << 20),
        "METERING_CHDB_QUERY_CONDITION_CACHE_SIZE": str(6 << 20),
        "METERING_CHDB_COMPILED_EXPRESSION_CACHE_SIZE": str(24 << 20),
        "METERING_CHDB_MALLOC_CONF": "dirty_decay_ms:700,muzzy_decay_ms:0",
        "METERING_CHDB_ROCKSDB_BLOOM_BITS_PER_KEY": "12",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_") and k != "JE_MALLOC_CONF"}
    env.update(configured)
    env.update(
        PYTHONPATH=str(ROOT),
        METERING_CLICKHOUSE_DSN=f"chdb://{tmp_path / 'chdb'}",
        METERING_CLICKHOUSE_DATABASE="caps",
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    server = seen["server"]
    assert int(server["max_server_memory_usage"]) == 1536 << 20
    assert int(server["merges_mutations_memory_usage_soft_limit"]) == 384 << 20
    assert int(server["mark_cache_size"]) == 48 << 20
    assert int(server["index_mark_cache_size"]) == 12 << 20
    assert int(server["primary_index_cache_size"]) == 40 << 20
    assert int(server["uncompressed_cache_size"]) == 8 << 20
    assert int(server["query_condition_cache_size"]) == 6 << 20
    assert int(server["compiled_expression_cache_size"]) == 24 << 20
    assert seen["dirty_decay_ms"] == 700
    assert seen["filter"] and seen["filter"][0].startswith("bloomfilter:12"), seen["filter"]


def test_the_defaults_are_bounded() -> None:
    caps = RunSettings().engine_caps()
    assert caps == EngineCaps()
    # far below ClickHouse's server defaults (5 GiB caches, 90 % of RAM)
    assert 0 < caps.max_server_memory_usage <= 4 << 30
    assert max(caps.mark_cache_size, caps.index_mark_cache_size, caps.primary_index_cache_size) <= 128 << 20


def test_faust_fetches_as_many_messages_ahead_as_set() -> None:
    from aggregators.app import build_app

    settings = AggregatorSettings(batch_max_messages=200)
    app = build_app(settings, "127.0.0.1:9", processor=None)  # type: ignore[arg-type]
    assert app.conf.stream_buffer_maxsize == 400  # twice the batch unless set (faust's own: 4,096)
    app = build_app(settings.model_copy(update={"stream_buffer_messages": 300}), "127.0.0.1:9", None)  # type: ignore[arg-type]
    assert app.conf.stream_buffer_maxsize == 300
