"""Run a real single-node Apache Kafka broker locally, without Docker.

The broker is the genuine Kafka server (KRaft mode, combined broker and
controller, one node) run straight from jars that Maven resolves from Maven
Central into a git-ignored cache. Only ``java`` and ``mvn`` are needed.

Python API::

    from deploy.kafka.local_broker import running_broker

    with running_broker(port=19092) as bootstrap:  # "127.0.0.1:19092"
        ...

CLI::

    python -m deploy.kafka.local_broker up|down|status [--port N] [--data-dir D] [--kafka-version V]

Kafka version: 4.4.x (the default) or 3.9.x, chosen with ``METERING_KAFKA_VERSION``
(``version=`` in Python, ``--kafka-version`` on the CLI). Each version's jars
are cached apart (``<cache>/<version>/lib``); a data dir records the version
that last ran it, and a data dir formatted by a newer Kafka is refused by an
older one with a clear error (4.x rewrites the metadata log in a form 3.9
cannot read).

The module is split in two: pure helpers (property rendering, pid-file
parsing, command building, port checks) that unit tests exercise without a
JVM, and the process-management code below them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "DEFAULT_PORT",
    "KAFKA_VERSION",
    "KAFKA_VERSIONS",
    "BrokerError",
    "BrokerStartError",
    "BrokerStatus",
    "DataDirInUseError",
    "DataDirVersionError",
    "PidRecord",
    "PortInUseError",
    "build_broker_command",
    "check_data_dir_version",
    "choose_controller_port",
    "default_cache_dir",
    "default_data_dir",
    "ensure_jars",
    "find_free_port",
    "format_pid_file",
    "generate_cluster_id",
    "is_kafka_cmdline",
    "is_port_free",
    "parse_pid_file",
    "render_server_properties",
    "resolve_kafka_version",
    "running_broker",
    "start",
    "status",
    "stop",
]

# The supported Kafka lines and the release of each that is fetched (pom.xml is
# driven with -Dkafka.version). ensure_jars() looks for that exact jar in the
# version's own lib dir, so bumping a release here makes the next run fetch it
# beside the old one instead of mixing versions on a classpath.
KAFKA_VERSIONS: dict[str, str] = {"4.4": "4.4.0", "3.9": "3.9.2"}
# 4.4: what new clusters run (3.9 is the last 3.x line, the bridge to 4.x), and
# the protocol the pinned aiokafka (>= 0.13) negotiates; 3.9 stays supported
# for existing clusters and runs in CI as the second version (make test-kafka-alt).
DEFAULT_KAFKA_VERSION = KAFKA_VERSIONS["4.4"]
KAFKA_VERSION = DEFAULT_KAFKA_VERSION  # the name older callers import
SCALA_VERSION = "2.13"

HOST = "127.0.0.1"
DEFAULT_PORT = 9092
DEFAULT_HEAP_MB = 512
# The -Xms floor: enough for an idle broker, so it does not grow on startup.
MIN_HEAP_MB = 128
MAX_HEAP_MB = 512
DEFAULT_START_TIMEOUT_S = 90.0
DEFAULT_STOP_TIMEOUT_S = 30.0
NODE_ID = 1

PORT_ENV_VAR = "METERING_KAFKA_PORT"
CACHE_ENV_VAR = "METERING_KAFKA_CACHE_DIR"
VERSION_ENV_VAR = "METERING_KAFKA_VERSION"

_HERE = Path(__file__).resolve().parent
_REPO_ROOT = _HERE.parent.parent
POM_PATH = _HERE / "pom.xml"
LOG4J_PATH = _HERE / "log4j.properties"  # 3.9.x: log4j 1.x API through reload4j
LOG4J2_PATH = _HERE / "log4j2.properties"  # 4.x: log4j2 (log4j-slf4j-impl + log4j-core)

# Files inside the data dir.
PID_FILE = "broker.pid"
CLUSTER_ID_FILE = "cluster.id"
SERVER_PROPERTIES_FILE = "server.properties"
LOCK_FILE = ".broker.lock"
LOG_DIR = "logs"  # log4j output (server.log) and the JVM's stdout/stderr
STDOUT_FILE = "kafka.out"
KRAFT_LOG_DIR = "kraft-logs"  # Kafka's log.dirs: topic data + metadata log
VERSION_FILE = "kafka.version"  # the Kafka version that last ran this data dir
# Data dirs formatted before VERSION_FILE existed were all formatted by this one.
LEGACY_DATA_DIR_VERSION = "3.9.2"


class BrokerError(RuntimeError):
    """The local broker could not be started, reused or stopped."""


class PortInUseError(BrokerError):
    """The requested port is held by something that is not our broker."""


class DataDirInUseError(BrokerError):
    """The data dir belongs to a running broker listening on another port."""


class BrokerStartError(BrokerError):
    """The broker process died or did not answer within the timeout."""


class DataDirVersionError(BrokerError):
    """The data dir was run by a newer Kafka than the one asked for (no way back)."""


@dataclass(frozen=True)
class PidRecord:
    """What the pid file records about a broker we launched.

    ``owner``: the process that stops the broker when it exits (``running_broker``, e.g.
    ``metering run``), with its start time (``owner_started``, clock ticks since boot from
    procfs; ``None`` without procfs) so that a reused pid is not mistaken for it. No owner: the
    broker was started to stay up (``up``, ``start()``) and only ``down``/``stop()`` ends it.
    """

    pid: int
    port: int
    controller_port: int
    owner: int | None = None
    owner_started: int | None = None

    @property
    def bootstrap(self) -> str:
        return bootstrap_for(self.port)


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str | None


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Jar cache shared by every checkout user: ``<repo>/.cache/kafka``.

    Anchored at the repo root (not the cwd) so tests, ``make`` and the CLI all
    share one download regardless of where they run from.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override) if override else _REPO_ROOT / ".cache" / "kafka"


def default_data_dir() -> Path:
    return default_cache_dir() / "data"


def bootstrap_for(port: int) -> str:
    return f"{HOST}:{port}"


def resolve_kafka_version(requested: str | None = None) -> str:
    """The release to run: ``requested``, else ``$METERING_KAFKA_VERSION``, else the default.

    A supported line is accepted as ``4.4``, ``4.4.x`` or its pinned release ``4.4.0``
    (same for 3.9); anything else is a ``ValueError`` naming the supported versions.
    """
    raw = requested if requested is not None else os.environ.get(VERSION_ENV_VAR, "")
    text = raw.strip().lower()
    if not text:
        return DEFAULT_KAFKA_VERSION
    line = text.removesuffix(".x")
    if line in KAFKA_VERSIONS:
        return KAFKA_VERSIONS[line]
    if text in KAFKA_VERSIONS.values():
        return text
    supported = ", ".join(f"{line}.x ({release})" for line, release in KAFKA_VERSIONS.items())
    raise ValueError(f"Kafka version {raw!r} is not supported; supported: {supported}")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def uses_log4j2(version: str) -> bool:
    """Kafka 4.x logs through log4j2; 3.9.x through the log4j 1.x API (reload4j)."""
    return _version_key(version)[0] >= 4


def kafka_jar_name(version: str = DEFAULT_KAFKA_VERSION) -> str:
    return f"kafka_{SCALA_VERSION}-{version}.jar"


def check_data_dir_version(data_dir: Path, version: str) -> str | None:
    """Refuse a data dir last run by a newer Kafka; return the version that ran it.

    ``None``: the data dir was never formatted (any version may take it). A formatted data dir
    without a version file was formatted by 3.9.2, the only version before the file existed.
    Going up (3.9 -> 4.4) is Kafka's supported upgrade; going down is not: 4.x rewrites the
    metadata log and its records, which 3.9 cannot read, so this raises
    ``DataDirVersionError`` before any JVM starts.
    """
    if not (data_dir / KRAFT_LOG_DIR / "meta.properties").is_file():
        return None
    try:
        recorded = (data_dir / VERSION_FILE).read_text().strip() or LEGACY_DATA_DIR_VERSION
    except FileNotFoundError:
        recorded = LEGACY_DATA_DIR_VERSION
    if _version_key(recorded)[:2] > _version_key(version)[:2]:
        raise DataDirVersionError(
            f"{data_dir} was last run by Kafka {recorded}, and Kafka {version} cannot open a data "
            f"dir that a newer Kafka has run (no downgrade); set {VERSION_ENV_VAR}={recorded}, "
            f"or use another data dir (--data-dir / METERING_KAFKA_DATA_DIR), or delete this one "
            f"(its topics are lost)"
        )
    return recorded


def generate_cluster_id() -> str:
    """A KRaft cluster id in Kafka's ``Uuid`` text form.

    Equivalent to ``kafka-storage random-uuid`` (URL-safe base64 of 16 random
    bytes, no padding) but without paying a JVM start. Kafka rejects ids that
    start with '-' (they look like CLI flags) and reserves the all-zero id.
    """
    while True:
        raw = uuid.uuid4().bytes
        text = base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
        if not text.startswith("-") and any(raw):
            return text


def _escape_property_value(value: str) -> str:
    # java.util.Properties treats backslash as an escape and strips leading
    # whitespace; nothing else matters for the values we write.
    escaped = value.replace("\\", "\\\\")
    if escaped[:1].isspace():
        escaped = "\\" + escaped
    return escaped


def render_server_properties(
    *, port: int, controller_port: int, data_dir: Path, node_id: int = NODE_ID
) -> str:
    """``server.properties`` for a single combined broker+controller node."""
    if port == controller_port:
        raise ValueError(f"broker and controller port must differ (both {port})")
    log_dirs = str(data_dir / KRAFT_LOG_DIR)
    if "," in log_dirs:
        # log.dirs is a comma-separated list; a comma would split the path.
        raise ValueError(f"data dir path must not contain a comma: {data_dir}")
    props: dict[str, str] = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": f"{node_id}@{HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": log_dirs,
        # One node: every internal topic must fit on a single replica or the
        # first consumer group / transaction would hang waiting for replicas.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "num.partitions": "4",
        "auto.create.topics.enable": "true",
        # No other members will ever join, so do not make the first consumer
        # group wait the default 3 s before its first assignment.
        "group.initial.rebalance.delay.ms": "0",
        # After an unclean exit (SIGKILL, crash tests) the restarted broker
        # cannot register until the old incarnation's session expires: 9 s by
        # default. 4 s halves that; heartbeats every 1 s still leave slack for
        # GC pauses on a busy 2-core dev box before the sole broker is fenced.
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "4000",
    }
    lines = ["# Generated by deploy/kafka/local_broker.py; rewritten on each start."]
    lines += [f"{key}={_escape_property_value(value)}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


def parse_properties(text: str) -> dict[str, str]:
    """Minimal reader for the ``key=value`` files we write (tests, status)."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "!")):
            continue
        key, sep, value = stripped.partition("=")
        if sep:
            result[key.strip()] = value.strip().replace("\\\\", "\\")
    return result


def format_pid_file(record: PidRecord) -> str:
    data: dict[str, int] = {"pid": record.pid, "port": record.port, "controller_port": record.controller_port}
    if record.owner is not None:
        data["owner"] = record.owner
        if record.owner_started is not None:
            data["owner_started"] = record.owner_started
    return json.dumps(data) + "\n"


def parse_pid_file(text: str) -> PidRecord | None:
    """Parse a pid file; ``None`` for anything malformed.

    A truncated or hand-edited pid file must not wedge start/stop: treating it
    as absent makes the caller clean it up and carry on.
    """
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    values: list[int] = []
    for key in ("pid", "port", "controller_port"):
        value = data.get(key)
        # bool is an int subclass; reject it explicitly.
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return None
        values.append(value)
    pid, port, controller_port = values
    if port > 65535 or controller_port > 65535:
        return None
    # The owner fields are optional (files written before they existed have none); a malformed
    # one counts as absent, like a malformed file.
    owner, owner_started = (_positive_int(data.get(key)) for key in ("owner", "owner_started"))
    return PidRecord(pid, port, controller_port, owner, owner_started if owner is not None else None)


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def is_kafka_cmdline(argv: list[str], server_properties: Path) -> bool:
    """Whether a process command line is *our* broker for this data dir.

    Checking the properties path, not just ``kafka.Kafka``, guards against pid
    reuse and against another data dir's broker.
    """
    return "kafka.Kafka" in argv and str(server_properties) in argv


def build_broker_command(
    *,
    java: str,
    lib_dir: Path,
    data_dir: Path,
    heap_mb: int = DEFAULT_HEAP_MB,
    version: str = DEFAULT_KAFKA_VERSION,
) -> list[str]:
    if not MIN_HEAP_MB <= heap_mb <= MAX_HEAP_MB:
        raise ValueError(f"heap_mb must be in [{MIN_HEAP_MB}, {MAX_HEAP_MB}], got {heap_mb}")
    return [
        java,
        f"-Xms{MIN_HEAP_MB}m",
        f"-Xmx{heap_mb}m",
        # Same GC settings as upstream kafka-server-start.sh.
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-Djava.awt.headless=true",
        *_log_jvm_args(data_dir, version),
        "-cp",
        str(lib_dir / "*"),
        "kafka.Kafka",
        str(data_dir / SERVER_PROPERTIES_FILE),
    ]


def build_format_command(
    *, java: str, lib_dir: Path, data_dir: Path, cluster_id: str, version: str = DEFAULT_KAFKA_VERSION
) -> list[str]:
    # In 3.9 and 4.x the storage tool is still the Scala object kafka.tools.StorageTool
    # in kafka_2.13 (kafka-storage.sh calls it); --ignore-formatted makes a
    # re-run after a crash between format and first start harmless.
    return [
        java,
        f"-Xmx{MIN_HEAP_MB}m",
        *_log_jvm_args(data_dir, version),
        "-cp",
        str(lib_dir / "*"),
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(data_dir / SERVER_PROPERTIES_FILE),
        "--ignore-formatted",
    ]


def _log_jvm_args(data_dir: Path, version: str) -> list[str]:
    config = (
        f"-Dlog4j2.configurationFile={LOG4J2_PATH.as_uri()}"
        if uses_log4j2(version)
        else f"-Dlog4j.configuration={LOG4J_PATH.as_uri()}"
    )
    return [config, f"-Dkafka.logs.dir={data_dir / LOG_DIR}"]


def is_port_free(port: int, host: str = HOST) -> bool:
    """Whether ``host:port`` can be bound for listening right now.

    SO_REUSEADDR mirrors what the JVM sets on server sockets, so sockets in
    TIME_WAIT from a previous broker do not count as "taken" while an actual
    listener (on this address or on 0.0.0.0) still does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def find_free_port(host: str = HOST, exclude: frozenset[int] = frozenset()) -> int:
    """An OS-assigned free port (racy by nature; fine for a dev broker)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port
    raise BrokerError("could not find a free TCP port")


def choose_controller_port(port: int, requested: int | None) -> int:
    """The controller port: as requested, else ``port + 1``, else any free one.

    ``port + 1`` keeps the pair predictable for humans; the fallback keeps an
    unlucky neighbour on ``port + 1`` from blocking startup.
    """
    if requested is not None:
        if requested == port:
            raise ValueError(f"controller port must differ from the broker port ({port})")
        if not is_port_free(requested):
            raise PortInUseError(
                f"controller port {requested} on {HOST} is already in use; "
                "pass a different controller_port or leave it unset to pick a free one"
            )
        return requested
    if port < 65535 and is_port_free(port + 1):
        return port + 1
    return find_free_port(exclude=frozenset({port}))


def tail(path: Path, max_lines: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(lines[-max_lines:])


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

# Brokers started by this Python process. Keeping the Popen objects lets us
# reap them (a dead but unreaped child is a zombie that still "exists" for
# os.kill(pid, 0)) and silences Popen's "still running" ResourceWarning.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _read_cmdline(pid: int) -> list[str] | None:
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            raw = proc.read_bytes()
        except OSError:
            return None
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    # No procfs (macOS): ps prints the command joined by spaces, so split it;
    # our paths normally have no spaces, and a miss only means "not ours".
    result = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return result.stdout.split() if result.returncode == 0 else None


def _is_zombie(pid: int) -> bool:
    """Whether every thread of ``pid`` has exited (only reaping is left).

    Checked per thread: when a JVM dies, its main thread can show as a zombie
    while other threads are still tearing down and holding its sockets, so a
    zombie *leader* alone does not mean the port is free yet.
    """
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False  # no procfs or already gone; os.kill decides
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # thread vanished while we looked
        # Format: "tid (comm) S ..."; comm may contain spaces, so split after ')'.
        if stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"]):
            return False
    return True


def _pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        # Our own child: waitpid is authoritative and reaps it when it is done.
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return not _is_zombie(pid)


def _process_started(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or ``None`` without procfs or process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # comm may contain spaces and parentheses
    # starttime is field 22 of proc(5); the fields after "(comm)" start at field 3.
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _owner_of_this_process() -> tuple[int, int | None]:
    return os.getpid(), _process_started(os.getpid())


def _is_orphan(record: PidRecord) -> bool:
    """Whether the broker's owner exited without stopping it (e.g. ``make run``'s process group
    was SIGKILLed: the broker runs in a session of its own and outlives it). No one else would
    ever stop such a broker. A broker without owner (``up``) is never an orphan."""
    if record.owner is None:
        return False
    if not _pid_alive(record.owner):
        return True
    started = _process_started(record.owner)
    # The pid is alive but may be another process by now: compare start times when known.
    return record.owner_started is not None and started is not None and started != record.owner_started


def _is_our_broker(pid: int, data_dir: Path) -> bool:
    if not _pid_alive(pid):
        return False
    argv = _read_cmdline(pid)
    return argv is not None and is_kafka_cmdline(argv, data_dir / SERVER_PROPERTIES_FILE)


def _read_pid_record(data_dir: Path) -> PidRecord | None:
    try:
        return parse_pid_file((data_dir / PID_FILE).read_text())
    except FileNotFoundError:
        return None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise start/stop/fetch across processes (e.g. parallel test workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _require_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BrokerError(f"`{name}` not found on PATH; the local Kafka broker needs Java and Maven")
    return found


def lib_dir_for(cache_dir: Path, version: str) -> Path:
    """Where one version's classpath is cached: ``<cache_dir>/<version>/lib``."""
    return cache_dir / version / "lib"


def build_fetch_command(*, mvn: str, out_dir: Path, repo_dir: Path, version: str) -> list[str]:
    binding = "log4j2" if uses_log4j2(version) else "reload4j"
    return [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(POM_PATH),
        "dependency:copy-dependencies",
        f"-Dkafka.version={version}",
        f"-Dlog.binding={binding}",
        f"-DoutputDirectory={out_dir}",
        f"-Dmaven.repo.local={repo_dir}",
    ]


def ensure_jars(cache_dir: Path | None = None, version: str | None = None) -> Path:
    """Resolve the version's broker classpath into ``<cache_dir>/<version>/lib``; return that dir.

    Runs Maven only when the pinned kafka jar is missing. Jars are fetched into
    a scratch dir and renamed into place, so an interrupted download never
    leaves a lib dir that looks complete. Maven's own repository goes to
    ``<cache_dir>/m2`` (shared by the versions) so nothing is written to ``~/.m2``.
    """
    version = resolve_kafka_version(version)
    cache_dir = (cache_dir or default_cache_dir()).resolve()
    lib_dir = lib_dir_for(cache_dir, version)
    jar = kafka_jar_name(version)
    if (lib_dir / jar).is_file():
        return lib_dir
    with _file_lock(cache_dir / ".fetch.lock"):
        if (lib_dir / jar).is_file():
            return lib_dir  # another process fetched while we waited
        mvn = _require_tool("mvn")
        lib_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = lib_dir.parent / f"lib.partial.{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        print(
            f"Fetching Kafka {version} jars from Maven Central (first run only)…",
            file=sys.stderr,
            flush=True,
        )
        cmd = build_fetch_command(mvn=mvn, out_dir=scratch, repo_dir=cache_dir / "m2", version=version)
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not (scratch / jar).is_file():
            shutil.rmtree(scratch, ignore_errors=True)
            output = (result.stdout + result.stderr).strip().splitlines()[-30:]
            raise BrokerError(
                f"Maven failed to fetch Kafka {version} jars (exit {result.returncode}):\n"
                + "\n".join(output)
            )
        # A lib dir without the pinned jar is an older version or a broken
        # fetch; replace it wholesale so versions never mix on the classpath.
        shutil.rmtree(lib_dir, ignore_errors=True)
        os.replace(scratch, lib_dir)
    return lib_dir


def _ensure_cluster_id(data_dir: Path) -> str:
    # Generated once per data dir: the formatted metadata log is bound to it,
    # and a different id on a later start would make the broker refuse to boot.
    path = data_dir / CLUSTER_ID_FILE
    if path.is_file():
        existing = path.read_text().strip()
        if existing:
            return existing
    cluster_id = generate_cluster_id()
    _write_atomically(path, cluster_id + "\n")
    return cluster_id


def _format_storage(java: str, lib_dir: Path, data_dir: Path, cluster_id: str, version: str) -> None:
    if (data_dir / KRAFT_LOG_DIR / "meta.properties").is_file():
        return  # already formatted; skip the extra JVM start (~1-2 s)
    cmd = build_format_command(
        java=java, lib_dir=lib_dir, data_dir=data_dir, cluster_id=cluster_id, version=version
    )
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120, cwd=data_dir)
    if result.returncode != 0:
        raise BrokerStartError(
            f"formatting Kafka storage in {data_dir / KRAFT_LOG_DIR} failed "
            f"(exit {result.returncode}):\n{(result.stdout + result.stderr).strip()}"
        )


def _probe_metadata(bootstrap: str, timeout_s: float) -> bool:
    """One metadata round-trip; the readiness signal clients actually need."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(
        {
            "bootstrap.servers": bootstrap,
            # librdkafka logs every refused connection to stderr; while we are
            # polling a booting broker those are expected, not news.
            "log_level": 0,
            "socket.connection.setup.timeout.ms": 1000,
        }
    )
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return bool(metadata.brokers)


def _tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_ready(port: int, deadline: float, pid: int) -> bool:
    """Poll until a metadata request succeeds, the process dies, or the deadline."""
    bootstrap = bootstrap_for(port)
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return False
        # Cheap TCP check first: building an AdminClient per attempt against
        # a closed port is slower and noisier than a refused connect().
        if _tcp_accepts(port):
            remaining = deadline - time.monotonic()
            if remaining > 0 and _probe_metadata(bootstrap, min(5.0, remaining)):
                return True
        time.sleep(0.25)
    return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Brokers run in their own session, so pgid == pid and killpg also takes
    # any helper the JVM might have forked. Fall back to the pid alone if the
    # process is not a group leader (e.g. started by something else).
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _terminate(pid: int, timeout_s: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            break
        time.sleep(0.1)
    else:
        _signal_group(pid, signal.SIGKILL)
        kill_deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < kill_deadline:
            time.sleep(0.05)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


def _port_in_use_message(port: int) -> str:
    return (
        f"port {port} on {HOST} is already in use by another process (not a broker from this "
        f"data dir); choose another port with {PORT_ENV_VAR}=<port> or `--port <port>`"
    )


def _start(
    *,
    port: int,
    controller_port: int | None,
    data_dir: Path,
    heap_mb: int,
    cache_dir: Path | None,
    timeout_s: float,
    own: bool = False,
    version: str | None = None,
) -> tuple[str, bool]:
    """Start (or reuse) the broker; return its bootstrap and whether the caller must stop it.

    ``own``: the caller stops the broker when it exits (``running_broker``); it is recorded as
    the owner. An orphan (its owner died without stopping it, see ``_is_orphan``) is taken
    over: reused when it answers on ``port``, otherwise stopped and replaced. With ``own`` the
    caller is then its owner (and must stop it); without, it stays up like one from ``up``.
    """
    version = resolve_kafka_version(version)
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    owner, owner_started = _owner_of_this_process() if own else (None, None)
    with _file_lock(data_dir / LOCK_FILE):
        deadline = time.monotonic() + timeout_s
        record = _read_pid_record(data_dir)
        replaced_on_port = False
        if record is not None and _is_our_broker(record.pid, data_dir) and _is_orphan(record):
            if record.port == port and _wait_ready(port, deadline, pid=record.pid):
                adopted = dataclasses.replace(record, owner=owner, owner_started=owner_started)
                _write_atomically(data_dir / PID_FILE, format_pid_file(adopted))
                print(
                    f"Kafka: took over the broker on {record.bootstrap} (pid {record.pid}) left running "
                    f"by process {record.owner}, which exited without stopping it",
                    file=sys.stderr,
                    flush=True,
                )
                return record.bootstrap, own
            why = f"listens on port {record.port}" if record.port != port else "does not answer"
            print(
                f"Kafka: replacing the broker (pid {record.pid}) left running by process "
                f"{record.owner}, which exited without stopping it; it {why}",
                file=sys.stderr,
                flush=True,
            )
            _terminate(record.pid, DEFAULT_STOP_TIMEOUT_S)
            (data_dir / PID_FILE).unlink(missing_ok=True)
            replaced_on_port, record = record.port == port, None
            deadline = time.monotonic() + timeout_s
        if record is not None and _is_our_broker(record.pid, data_dir):
            if record.port != port:
                raise DataDirInUseError(
                    f"{data_dir} is used by a running broker on {record.bootstrap} "
                    f"(pid {record.pid}); use port {record.port}, another --data-dir, or "
                    f"stop it: python -m deploy.kafka.local_broker down --data-dir {data_dir}"
                )
            if _wait_ready(port, deadline, pid=record.pid):
                return record.bootstrap, False
            raise BrokerStartError(
                f"broker pid {record.pid} from {data_dir} is running but did not answer on "
                f"{record.bootstrap} within {timeout_s:.0f}s; stop it and retry.\n"
                f"--- {data_dir / LOG_DIR / 'server.log'} (tail) ---\n"
                + tail(data_dir / LOG_DIR / "server.log")
            )
        stale_on_port = replaced_on_port or (record is not None and record.port == port)
        if record is not None or (data_dir / PID_FILE).exists():
            # Stale: the process is gone (or the pid was reused by something
            # else). Never signal it; just forget it.
            (data_dir / PID_FILE).unlink(missing_ok=True)

        # Fail fast before any download or JVM start: a taken port would
        # otherwise surface only as a bind error deep in the broker log.
        # Exception: our own broker just died on this port; the kernel can take
        # a few seconds to release its sockets, so give it that long.
        grace = time.monotonic() + (15.0 if stale_on_port else 0.0)
        while not is_port_free(port):
            if time.monotonic() >= grace:
                raise PortInUseError(_port_in_use_message(port))
            time.sleep(0.2)
        cport = choose_controller_port(port, controller_port)
        # Before any download or JVM: a data dir a newer Kafka ran cannot be opened by this one.
        check_data_dir_version(data_dir, version)

        java = _require_tool("java")
        lib_dir = ensure_jars(cache_dir, version)
        cluster_id = _ensure_cluster_id(data_dir)
        _write_atomically(
            data_dir / SERVER_PROPERTIES_FILE,
            render_server_properties(port=port, controller_port=cport, data_dir=data_dir),
        )
        _format_storage(java, lib_dir, data_dir, cluster_id, version)
        # Recorded before the broker runs: once it has, an older Kafka must not open the dir.
        _write_atomically(data_dir / VERSION_FILE, version + "\n")

        log_dir = data_dir / LOG_DIR
        log_dir.mkdir(exist_ok=True)
        cmd = build_broker_command(
            java=java, lib_dir=lib_dir, data_dir=data_dir, heap_mb=heap_mb, version=version
        )
        # The clock starts here so a slow first-run Maven download does not
        # eat into the time the broker itself gets to boot.
        deadline = time.monotonic() + timeout_s
        with open(log_dir / STDOUT_FILE, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=data_dir,
                # Own session: Ctrl-C in the launching terminal must not kill
                # a broker that `up` is meant to leave running, and stop() can
                # signal the whole group.
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        # Written before waiting: if this Python process dies mid-wait, the
        # next start/stop still finds (and can reuse or stop) the JVM.
        _write_atomically(
            data_dir / PID_FILE,
            format_pid_file(PidRecord(proc.pid, port, cport, owner, owner_started)),
        )
        if _wait_ready(port, deadline, pid=proc.pid):
            return bootstrap_for(port), True

        died = proc.poll() is not None
        _terminate(proc.pid, timeout_s=5)
        (data_dir / PID_FILE).unlink(missing_ok=True)
        reason = (
            f"exited with code {proc.returncode}"
            if died
            else f"did not answer a metadata request within {timeout_s:.0f}s"
        )
        raise BrokerStartError(
            f"Kafka broker on {bootstrap_for(port)} {reason}.\n"
            f"--- {log_dir / 'server.log'} (tail) ---\n{tail(log_dir / 'server.log')}\n"
            f"--- {log_dir / STDOUT_FILE} (tail) ---\n{tail(log_dir / STDOUT_FILE, 15)}"
        )


def start(
    port: int = DEFAULT_PORT,
    controller_port: int | None = None,
    data_dir: Path | None = None,
    heap_mb: int = DEFAULT_HEAP_MB,
    *,
    cache_dir: Path | None = None,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    version: str | None = None,
) -> str:
    """Start a single-node KRaft broker (or reuse ours); return ``"127.0.0.1:PORT"``.

    The broker stays up until ``stop()``: one left behind by a ``running_broker`` owner that
    died is taken over (or replaced, if on another port) and stays up too.

    Returns only once a metadata request succeeds; ``timeout_s`` bounds that
    wait (a first-run jar download is not counted). Raises ``PortInUseError``
    at once if ``port`` is held by anything else, ``DataDirInUseError`` if
    this data dir's broker runs on another port, and ``BrokerStartError``
    (with the broker log tail) if it dies or is not ready within ``timeout_s``;
    in that case the process it launched is killed. ``version``: see
    ``resolve_kafka_version`` (``DataDirVersionError`` for a downgrade).
    """
    bootstrap, _ = _start(
        port=port,
        controller_port=controller_port,
        data_dir=data_dir or default_data_dir(),
        heap_mb=heap_mb,
        cache_dir=cache_dir,
        timeout_s=timeout_s,
        version=version,
    )
    return bootstrap


def stop(data_dir: Path | None = None, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
    """Stop the data dir's broker: SIGTERM, then SIGKILL after ``timeout_s``.

    Returns whether a running broker was stopped. Removes the pid file either
    way; a no-op when nothing runs.
    """
    data_dir = (data_dir or default_data_dir()).resolve()
    if not data_dir.is_dir():
        return False
    with _file_lock(data_dir / LOCK_FILE):
        record = _read_pid_record(data_dir)
        stopped = False
        if record is not None and _is_our_broker(record.pid, data_dir):
            _terminate(record.pid, timeout_s)
            stopped = True
        (data_dir / PID_FILE).unlink(missing_ok=True)
        return stopped


def status(data_dir: Path | None = None) -> BrokerStatus:
    """Whether this data dir's broker process is alive (not whether it answers)."""
    data_dir = (data_dir or default_data_dir()).resolve()
    record = _read_pid_record(data_dir)
    if record is None or not _is_our_broker(record.pid, data_dir):
        return BrokerStatus(running=False, pid=None, bootstrap=None)
    return BrokerStatus(running=True, pid=record.pid, bootstrap=record.bootstrap)


@contextlib.contextmanager
def running_broker(
    port: int = DEFAULT_PORT,
    controller_port: int | None = None,
    data_dir: Path | None = None,
    heap_mb: int = DEFAULT_HEAP_MB,
    *,
    cache_dir: Path | None = None,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    version: str | None = None,
) -> Iterator[str]:
    """Yield a bootstrap string; stop the broker on exit only if we started it
    (or took it over from an owner that died without stopping it).

    Reusing a broker someone else started (e.g. ``make up``) must not tear it
    down under them when a test session ends.
    """
    resolved = data_dir or default_data_dir()
    bootstrap, started = _start(
        port=port,
        controller_port=controller_port,
        data_dir=resolved,
        heap_mb=heap_mb,
        cache_dir=cache_dir,
        timeout_s=timeout_s,
        own=True,
        version=version,
    )
    try:
        yield bootstrap
    finally:
        if started:
            stop(resolved)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _default_port() -> int:
    raw = os.environ.get(PORT_ENV_VAR)
    if not raw:
        return DEFAULT_PORT
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{PORT_ENV_VAR}={raw!r} is not a port number") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.kafka.local_broker",
        description="Run a local single-node Kafka broker (KRaft, no Docker).",
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"broker port (default: ${PORT_ENV_VAR} or {DEFAULT_PORT})",
    )
    parser.add_argument("--controller-port", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: <repo>/.cache/kafka/data")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="jar cache (default: <repo>/.cache/kafka)"
    )
    parser.add_argument("--heap-mb", type=int, default=DEFAULT_HEAP_MB)
    parser.add_argument(
        "--kafka-version",
        default=None,
        help=f"{' or '.join(f'{line}.x' for line in KAFKA_VERSIONS)} "
        f"(default: ${VERSION_ENV_VAR} or {DEFAULT_KAFKA_VERSION})",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT_S)
    args = parser.parse_args(argv)
    data_dir: Path = args.data_dir or default_data_dir()

    try:
        if args.command == "up":
            bootstrap = start(
                port=args.port if args.port is not None else _default_port(),
                controller_port=args.controller_port,
                data_dir=data_dir,
                heap_mb=args.heap_mb,
                cache_dir=args.cache_dir,
                timeout_s=args.timeout,
                version=args.kafka_version,
            )
            st = status(data_dir)
            print(
                f"Kafka running at {bootstrap} (pid {st.pid}, logs in {data_dir / LOG_DIR})", file=sys.stderr
            )
            # Bootstrap alone on stdout: `export KAFKA_BOOTSTRAP_SERVERS=$(... up)`.
            print(bootstrap)
            return 0
        if args.command == "down":
            stopped = stop(data_dir)
            print("Kafka stopped" if stopped else "Kafka was not running", file=sys.stderr)
            return 0
        st = status(data_dir)
        if st.running:
            print(f"running pid={st.pid} bootstrap={st.bootstrap}")
            return 0
        print("stopped")
        return 3  # LSB "program is not running", handy in shell conditionals
    except (BrokerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
