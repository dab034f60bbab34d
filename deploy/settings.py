"""Typed settings, one class per process (pydantic-settings, env prefix ``METERING_``, ``.env`` support).

Every process validates its settings at start and passes them down; nothing else reads the
environment. ``KAFKA_BOOTSTRAP_SERVERS`` (without prefix) is honoured too because it is the
conventional name users and CI already export.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deploy.allocator import MAX_MMAP_THRESHOLD
from schemas.clickhouse import EngineCaps

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache"


class CommonSettings(BaseSettings):
    """What every process needs: where Kafka and ClickHouse are."""

    model_config = SettingsConfigDict(env_prefix="METERING_", env_file=".env", extra="ignore")

    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("METERING_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"),
        description="An existing Kafka cluster. Unset: the project's local broker is started.",
    )
    kafka_port: int = Field(default=9092, ge=1, le=65535, description="Port of the local broker.")
    kafka_data_dir: Path = DEFAULT_CACHE / "kafka" / "data"
    kafka_version: str = Field(
        default="4.4",
        description="Kafka of the local broker: 4.4.x (default) or 3.9.x (deploy/kafka/README.md).",
    )
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None

    topic_events: str = Field(default="metering.events", description="Usage events (any usage producer).")
    topic_control: str = Field(
        default="",
        description="Lifecycle events, written by administrators only. Empty: <topic_events>.control.",
    )
    topic_dead_letter: str = "metering.events.dlq"
    topic_partitions: int = Field(default=4, ge=1)

    clickhouse_dsn: SecretStr = Field(
        default=SecretStr(f"chdb://{DEFAULT_CACHE / 'chdb'}"),
        description="chdb:///<dir> (embedded engine) or http(s)://user:pass@host:8123",
    )
    clickhouse_database: str = Field(default="metering", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    clickhouse_cluster: str | None = Field(
        default=None, description="Set to a cluster name: DDL runs ON CLUSTER with Replicated engines."
    )
    # The embedded engine's memory bounds (chdb:// only; schemas/clickhouse.py EngineCaps): server
    # settings given when the process's engine starts, for a 2-core, few-GiB process.
    chdb_max_server_memory_usage: int = Field(
        default=EngineCaps.max_server_memory_usage,
        ge=0,
        description="Memory of the whole embedded engine, all statements and caches (bytes; 0: 90 % of RAM).",
    )
    chdb_merges_memory_usage_soft_limit: int = Field(
        default=EngineCaps.merges_mutations_memory_usage_soft_limit,
        ge=0,
        description="Background merges start no new merge above this (bytes; 0: half the RAM).",
    )
    chdb_mark_cache_size: int = Field(
        default=EngineCaps.mark_cache_size, ge=0, description="Mark cache (bytes)."
    )
    chdb_index_mark_cache_size: int = Field(
        default=EngineCaps.index_mark_cache_size, ge=0, description="Skipping-index mark cache (bytes)."
    )
    chdb_primary_index_cache_size: int = Field(
        default=EngineCaps.primary_index_cache_size, ge=0, description="Primary-index cache (bytes)."
    )
    chdb_uncompressed_cache_size: int = Field(
        default=EngineCaps.uncompressed_cache_size,
        ge=0,
        description="Uncompressed-block cache (bytes; 0: off).",
    )
    chdb_query_condition_cache_size: int = Field(
        default=EngineCaps.query_condition_cache_size, ge=0, description="Query-condition cache (bytes)."
    )
    chdb_compiled_expression_cache_size: int = Field(
        default=EngineCaps.compiled_expression_cache_size,
        ge=0,
        description="JIT-compiled expressions (bytes).",
    )
    chdb_malloc_conf: str = Field(
        default=EngineCaps.malloc_conf,
        description="The engine's jemalloc options (JE_MALLOC_CONF, unless already set): freed pages "
        "go back to the system after dirty_decay_ms instead of ClickHouse's 5000.",
    )
    chdb_purge_after_batch: bool = Field(
        default=True,
        description="After each applied batch, the engine's jemalloc returns its freed pages to the "
        "system at once (SYSTEM JEMALLOC PURGE) instead of over dirty_decay_ms.",
    )
    chdb_rocksdb_bloom_bits_per_key: int = Field(
        default=EngineCaps.rocksdb_bloom_bits_per_key,
        ge=0,
        le=64,
        description="Bloom filter bits per key in the files of the engine's RocksDB tables (event_keys, "
        "dedupe's look-up). 0: none, ClickHouse's default.",
    )

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("clickhouse_dsn")
    @classmethod
    def _known_scheme(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if not raw.startswith(("chdb://", "http://", "https://")):
            raise ValueError("clickhouse_dsn must start with chdb://, http:// or https://")
        return v

    @field_validator("kafka_version")
    @classmethod
    def _supported_kafka(cls, v: str) -> str:
        from deploy.kafka.local_broker import resolve_kafka_version

        return resolve_kafka_version(v or "4.4")  # "4.4", "4.4.x" or "4.4.0" -> the pinned release

    @model_validator(mode="after")
    def _default_control_topic(self) -> CommonSettings:
        # Derived from the usage topic so that a deployment (or a test) that renames one gets a
        # control topic of its own, never another deployment's.
        if not self.topic_control:
            self.topic_control = f"{self.topic_events}.control"
        return self

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_dsn.get_secret_value().startswith("chdb://")

    def engine_caps(self) -> EngineCaps:
        """The embedded engine's bounds (``connect``/``connect_part``: the first chdb connection
        of the process starts the engine with them)."""
        return EngineCaps(
            max_server_memory_usage=self.chdb_max_server_memory_usage,
            merges_mutations_memory_usage_soft_limit=self.chdb_merges_memory_usage_soft_limit,
            mark_cache_size=self.chdb_mark_cache_size,
            index_mark_cache_size=self.chdb_index_mark_cache_size,
            primary_index_cache_size=self.chdb_primary_index_cache_size,
            uncompressed_cache_size=self.chdb_uncompressed_cache_size,
            query_condition_cache_size=self.chdb_query_condition_cache_size,
            compiled_expression_cache_size=self.chdb_compiled_expression_cache_size,
            malloc_conf=self.chdb_malloc_conf,
            rocksdb_bloom_bits_per_key=self.chdb_rocksdb_bloom_bits_per_key,
        )

    def kafka_client_config(self, bootstrap: str) -> dict[str, Any]:
        """librdkafka settings shared by producers, consumers and admin clients."""
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "security.protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username or ""
            conf["sasl.password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
            )
        return conf


class HttpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERING_", env_file=".env", extra="ignore")

    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="The process's event loop (HTTP, the aggregator's consumer): uvloop, cheaper per "
        "request, or Python's own asyncio.",
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    http_header_timeout_s: float = Field(
        default=10.0, gt=0, description="A connection whose request head is not complete by then is closed."
    )
    http_max_head_bytes: int = Field(
        default=16384,
        ge=1024,
        description="A request head (request line and headers) larger than this is answered 431.",
    )
    http_keepalive_timeout_s: int = Field(
        default=5, ge=1, description="An idle connection between two requests is closed after this."
    )
    http_limit_concurrency: int = Field(
        default=1000, ge=1, description="Open connections or running requests beyond which requests get 503."
    )
    rate_limit_storage: SecretStr = Field(
        default=SecretStr("memory://"),
        description="Where rate-limit counts live: memory:// (each process its own) or "
        "redis://[:password@]host:6379/0 (one limit shared by every process using it; deploy/README.md).",
    )

    @field_validator("rate_limit_storage")
    @classmethod
    def _rate_limit_scheme(cls, v: SecretStr) -> SecretStr:
        scheme = v.get_secret_value().partition("://")[0].lower()
        if scheme not in ("memory", "redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster"):
            raise ValueError("rate_limit_storage must be memory:// or a redis:// (rediss://...) URI")
        return v


class IngestSettings(CommonSettings, HttpSettings):
    """The HTTP ingest process."""

    ingest_max_events_per_request: int = Field(default=100, ge=1)
    ingest_max_body_bytes: int = 1024 * 1024
    ingest_max_event_bytes: int = 32 * 1024
    ingest_delivery_timeout_s: float = Field(default=10.0, gt=0)
    ingest_rate_limit_per_minute: int = Field(default=6000, ge=1, description="Per API key.")


class AggregatorSettings(CommonSettings):
    """The faust stream processor."""

    consumer_group: str = "metering-aggregator"
    consumer_session_timeout_s: float = Field(
        default=10.0, gt=1, description="How soon a dead aggregator's partitions move to another one."
    )
    batch_max_messages: int = Field(default=500, ge=1, description="Kafka messages per processing batch.")
    batch_within_s: float = Field(default=0.25, gt=0, description="Longest wait to fill a batch.")
    stream_buffer_messages: int = Field(
        default=0,
        ge=0,
        description="Kafka messages faust fetches ahead of the batch being taken (its "
        "stream_buffer_maxsize; memory: about this times the message size). 0: twice batch_max_messages.",
    )
    clickhouse_retry_max_s: float = Field(default=30.0, gt=0, description="Longest backoff between retries.")
    prepare_ahead: bool = Field(
        default=True,
        description="Parse and judge the next batch in another thread (with ClickHouse connections of "
        "its own) while one is applied: both cores busy. Off: one batch at a time, one connection.",
    )
    stall_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A partition owned with messages to consume and no progress this long is stalled: "
        "it is sought back and resumed, then the aggregator part restarted (aggregators/watchdog.py).",
    )
    faust_data_dir: Path = DEFAULT_CACHE / "faust"
    # The aggregator's share of the ClickHouse engine: its client sends these with every
    # statement, so that in `metering run` (one embedded engine for every part) the query API's
    # reads keep threads and memory of their own while the aggregator applies a batch.
    aggregator_max_threads: int = Field(
        default=0,
        ge=0,
        description="Threads of one aggregator statement. 0: the cores less one (at least 1).",
    )
    aggregator_max_memory_usage: int = Field(
        default=2 << 30, ge=0, description="max_memory_usage of one aggregator statement (bytes; 0: none)."
    )
    aggregator_nice: int = Field(
        default=19,
        ge=0,
        le=19,
        description="Linux nice value of the engine threads of the aggregator's statements "
        "(ClickHouse's os_thread_priority): the query API's reads go first on a busy CPU. Takes "
        "effect only where the process has CAP_SYS_NICE (the engine ignores it otherwise). 0: off.",
    )

    malloc_mmap_threshold: int = Field(
        default=64 << 10,
        ge=0,
        le=MAX_MMAP_THRESHOLD,
        description="glibc's mmap threshold for this process (bytes; deploy/allocator.py): blocks this "
        "large and larger (Kafka messages, a batch's buffers) are returned to the system when freed "
        "instead of left in the heap. 0: glibc's dynamic default.",
    )

    def stream_buffer_maxsize(self) -> int:
        """faust's buffer of fetched messages: twice the batch unless set. faust's own default,
        4,096, held ~400 MiB of 500-event messages whenever the aggregator was behind and was most
        of its RSS growth (docs/performance.md, "Bounded memory"). Twice the batch keeps the next
        batch fetched while one is applied (faust pauses a partition's fetch at 80 % of the buffer
        and resumes it once the buffer has drained), and bounds the read-ahead by what a batch is."""
        return self.stream_buffer_messages or 2 * self.batch_max_messages

    def aggregator_engine_settings(self) -> dict[str, int]:
        """The ClickHouse settings of the aggregator's client (deploy/runner.py, PartClients)."""
        threads = self.aggregator_max_threads or max(1, (os.cpu_count() or 2) - 1)
        out = {"max_threads": threads, "max_memory_usage": self.aggregator_max_memory_usage}
        if self.aggregator_nice:
            # the old name of os_threads_nice_value_query: every ClickHouse the project runs on has it
            out["os_thread_priority"] = self.aggregator_nice
        return out


class AdminTokenSettings(BaseSettings):
    """The admin credential of the admin API (``/admin/v1``, served with the query API; used by
    ``metering admin``). It is neither an API key nor an access token, and opens nothing else.
    Unset: the process serving the API generates one at each start and writes it to
    ``admin_token_file`` (mode 0600), where ``metering admin`` reads it."""

    model_config = SettingsConfigDict(env_prefix="METERING_", env_file=".env", extra="ignore")

    admin_token: SecretStr | None = Field(
        default=None, description="The admin token. Unset: generated at start, written to admin_token_file."
    )
    admin_token_file: Path = Field(
        default=DEFAULT_CACHE / "admin-token",
        description="Where a generated admin token is written (mode 0600) and the CLI looks for it.",
    )
    admin_api_url: str = Field(
        default="", description="The admin API the CLI reads. Empty: http://<http_host>:<http_port>."
    )

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().strip()) < 24:
            raise ValueError("admin_token must be at least 24 characters (it opens every tenant)")
        return v


class AdminCliSettings(CommonSettings, HttpSettings, AdminTokenSettings):
    """``metering admin``: Kafka (it sends lifecycle events) and the admin API (it reads)."""


class SqlSettings(BaseSettings):
    """The SQL endpoint: ClickHouse's HTTP interface for analysts, served on the embedded engine
    by the process that holds it (query_api/sql_endpoint.py). Off with a ClickHouse server:
    analysts query the server. Every limit is set on the endpoint's engine handles before they
    are made read-only, so no client can raise one."""

    model_config = SettingsConfigDict(env_prefix="METERING_", env_file=".env", extra="ignore")

    sql_enabled: bool = Field(default=True, description="Serve the SQL endpoint (embedded engine only).")
    sql_host: str = "127.0.0.1"
    sql_port: int = Field(default=8123, ge=0, le=65535, description="Port of the SQL endpoint.")
    sql_keys_file: Path = Field(
        default=DEFAULT_CACHE / "analyst-keys.json",
        description="Hashes of the analyst keys (`metering admin analyst-key`), mode 0600.",
    )
    sql_max_execution_time_s: int = Field(default=60, ge=1, description="max_execution_time of a query.")
    sql_max_result_rows: int = Field(default=10_000_000, ge=1, description="max_result_rows of a query.")
    sql_max_result_bytes: int = Field(default=1 << 30, ge=1, description="max_result_bytes of a query.")
    sql_max_memory_usage: int = Field(default=2 << 30, ge=1, description="max_memory_usage of a query.")
    sql_max_threads: int = Field(default=1, ge=1, description="Threads of one query: a bounded share.")
    sql_max_concurrent_queries: int = Field(
        default=2, ge=1, description="Queries run at once (one engine handle each); more wait their turn."
    )
    sql_queue_timeout_s: float = Field(
        default=10.0, gt=0, description="A query waiting this long for a handle gets code 202."
    )


class QuerySettings(CommonSettings, HttpSettings, AdminTokenSettings, SqlSettings):
    """The query API process (and the admin API, and the SQL endpoint on the embedded engine)."""

    query_rate_limit_per_minute: int = Field(default=600, ge=1, description="Per credential.")
    query_cache_ttl_s: float = Field(default=2.0, ge=0, description="Credential/entity cache lifetime.")


class RunSettings(AggregatorSettings, IngestSettings, QuerySettings):
    """The all-in-one process ``metering run``: ingest + aggregator + query API in one process,
    required with the embedded ClickHouse engine, which locks its data directory to one process."""


def masked(settings: BaseSettings) -> dict[str, Any]:
    """Effective settings for display; secrets are masked, and so is the password part of a DSN."""
    out: dict[str, Any] = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            raw = value.get_secret_value()
            out[name] = _mask_dsn(raw) if "://" in raw else "**********"
        elif isinstance(value, Path):
            out[name] = str(value)
        else:
            out[name] = value
    return out


def _mask_dsn(dsn: str) -> str:
    scheme, _, rest = dsn.partition("://")
    if "@" in rest:
        cred, _, host = rest.rpartition("@")
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user}:****@{host}"
    return dsn
