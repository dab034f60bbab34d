"""Tests for deploy/kafka/local_broker.py.

Unmarked tests cover the pure helpers and the fail-fast paths (no JVM).
``@pytest.mark.kafka`` tests start the real broker from the shared jar cache
(``<repo>/.cache/kafka/lib``, fetched by Maven on first use) with a temp data
dir on free ports, so they never collide with a developer's running broker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.kafka import local_broker as lb

# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------


def test_render_server_properties_single_node_kraft(tmp_path: Path) -> None:
    text = lb.render_server_properties(port=19092, controller_port=19093, data_dir=tmp_path)
    props = lb.parse_properties(text)

    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["log.dirs"] == str(tmp_path / "kraft-logs")
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
    ):
        assert props[key] == "1", key
    assert props["num.partitions"] == "4"
    assert props["auto.create.topics.enable"] == "true"
    assert props["group.initial.rebalance.delay.ms"] == "0"


def test_render_server_properties_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="differ"):
        lb.render_server_properties(port=1, controller_port=1, data_dir=tmp_path)
    with pytest.raises(ValueError, match="comma"):
        lb.render_server_properties(port=1, controller_port=2, data_dir=tmp_path / "a,b")


def test_render_server_properties_escapes_backslashes() -> None:
    text = lb.render_server_properties(port=1, controller_port=2, data_dir=Path("/tmp/we\\ird"))
    assert "log.dirs=/tmp/we\\\\ird/kraft-logs" in text
    assert lb.parse_properties(text)["log.dirs"] == "/tmp/we\\ird/kraft-logs"


def test_generate_cluster_id_is_kafka_uuid_text() -> None:
    ids = {lb.generate_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cluster_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id)
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_pid_file_round_trip() -> None:
    record = lb.PidRecord(pid=1234, port=19092, controller_port=19093)
    assert lb.parse_pid_file(lb.format_pid_file(record)) == record
    assert record.bootstrap == "127.0.0.1:19092"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "1234",  # bare pid without ports
        "[]",
        '{"pid": 1, "port": 2}',
        '{"pid": "1", "port": 2, "controller_port": 3}',
        '{"pid": true, "port": 2, "controller_port": 3}',
        '{"pid": 0, "port": 2, "controller_port": 3}',
        '{"pid": 1, "port": 70000, "controller_port": 3}',
    ],
)
def test_parse_pid_file_rejects_malformed(text: str) -> None:
    assert lb.parse_pid_file(text) is None


def test_pid_file_records_the_owner() -> None:
    owned = lb.PidRecord(pid=1234, port=19092, controller_port=19093, owner=77, owner_started=5)
    assert lb.parse_pid_file(lb.format_pid_file(owned)) == owned
    # written before owners existed, or hand-edited: no owner (the broker is then never adopted)
    base = '{"pid": 1, "port": 2, "controller_port": 3'
    for extra in ("", ', "owner": "x"', ', "owner": true', ', "owner": -1', ', "owner_started": 5'):
        record = lb.parse_pid_file(base + extra + "}")
        assert record is not None and (record.owner, record.owner_started) == (None, None), extra


def test_an_orphan_is_a_broker_whose_owner_is_gone() -> None:
    me = os.getpid()
    started = lb._process_started(me)
    assert started is not None  # procfs: the start time tells a reused pid apart
    assert not lb._is_orphan(lb.PidRecord(1, 2, 3))  # no owner: started to stay up
    assert not lb._is_orphan(lb.PidRecord(1, 2, 3, owner=me, owner_started=started))
    assert lb._is_orphan(lb.PidRecord(1, 2, 3, owner=_dead_pid()))
    assert lb._is_orphan(lb.PidRecord(1, 2, 3, owner=me, owner_started=started + 1))  # pid reused


def test_is_kafka_cmdline(tmp_path: Path) -> None:
    props = tmp_path / "server.properties"
    ours = ["/usr/bin/java", "-Xmx512m", "-cp", "lib/*", "kafka.Kafka", str(props)]
    assert lb.is_kafka_cmdline(ours, props)
    assert not lb.is_kafka_cmdline([*ours[:-1], "/elsewhere/server.properties"], props)
    assert not lb.is_kafka_cmdline(["/bin/sleep", "100"], props)


def test_build_broker_command_caps_heap(tmp_path: Path) -> None:
    cmd = lb.build_broker_command(java="java", lib_dir=tmp_path / "lib", data_dir=tmp_path)
    assert "-Xmx512m" in cmd and "-Xms128m" in cmd
    assert cmd[-2:] == ["kafka.Kafka", str(tmp_path / "server.properties")]
    assert f"-Dkafka.logs.dir={tmp_path / 'logs'}" in cmd
    with pytest.raises(ValueError, match="heap_mb"):
        lb.build_broker_command(java="java", lib_dir=tmp_path, data_dir=tmp_path, heap_mb=1024)


def test_each_kafka_version_gets_its_logging_config(tmp_path: Path) -> None:
    # 4.x logs through log4j2 (log4j-slf4j-impl + log4j-core), 3.9 through reload4j.
    new = lb.build_broker_command(java="java", lib_dir=tmp_path, data_dir=tmp_path, version="4.4.0")
    old = lb.build_broker_command(java="java", lib_dir=tmp_path, data_dir=tmp_path, version="3.9.2")
    assert f"-Dlog4j2.configurationFile={lb.LOG4J2_PATH.as_uri()}" in new
    assert not any(arg.startswith("-Dlog4j.configuration=") for arg in new)
    assert f"-Dlog4j.configuration={lb.LOG4J_PATH.as_uri()}" in old
    assert not any(arg.startswith("-Dlog4j2.") for arg in old)
    fmt = lb.build_format_command(
        java="j", lib_dir=tmp_path, data_dir=tmp_path, cluster_id="c", version="4.4.0"
    )
    assert f"-Dlog4j2.configurationFile={lb.LOG4J2_PATH.as_uri()}" in fmt
    # The cleaner's logger moved in 4.x; the old name would leave it chatty at INFO.
    props = lb.parse_properties(lb.LOG4J2_PATH.read_text())
    cleaner = [k for k, v in props.items() if v == "org.apache.kafka.storage.internals.log.LogCleaner"]
    assert cleaner and props[cleaner[0].replace(".name", ".level")] == "WARN"
    # Each version is fetched with its own binding into its own lib dir.
    fetch = {
        v: lb.build_fetch_command(mvn="mvn", out_dir=tmp_path, repo_dir=tmp_path, version=v)
        for v in ("4.4.0", "3.9.2")
    }
    assert {"-Dkafka.version=4.4.0", "-Dlog.binding=log4j2"} <= set(fetch["4.4.0"])
    assert {"-Dkafka.version=3.9.2", "-Dlog.binding=reload4j"} <= set(fetch["3.9.2"])
    assert lb.lib_dir_for(tmp_path, "4.4.0") != lb.lib_dir_for(tmp_path, "3.9.2")


def test_resolve_kafka_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERING_KAFKA_VERSION", raising=False)
    assert lb.resolve_kafka_version() == lb.DEFAULT_KAFKA_VERSION == "4.4.0"
    for text, release in (
        ("4.4", "4.4.0"),
        ("4.4.x", "4.4.0"),
        ("4.4.0", "4.4.0"),
        ("3.9", "3.9.2"),
        (" 3.9.X ", "3.9.2"),
    ):
        assert lb.resolve_kafka_version(text) == release, text
    monkeypatch.setenv("METERING_KAFKA_VERSION", "3.9")
    assert lb.resolve_kafka_version() == "3.9.2"
    assert lb.resolve_kafka_version("4.4") == "4.4.0"  # an explicit choice wins over the env
    for bad in ("3.8", "4.0.1", "4", "latest"):
        with pytest.raises(ValueError, match=r"supported: 4\.4\.x \(4\.4\.0\), 3\.9\.x \(3\.9\.2\)"):
            lb.resolve_kafka_version(bad)


def _formatted(data_dir: Path, version: str | None) -> Path:
    (data_dir / "kraft-logs").mkdir(parents=True)
    (data_dir / "kraft-logs" / "meta.properties").write_text("version=1\n")
    if version is not None:
        (data_dir / "kafka.version").write_text(version + "\n")
    return data_dir


def test_data_dir_version_check(tmp_path: Path) -> None:
    assert lb.check_data_dir_version(tmp_path / "fresh", "3.9.2") is None  # never formatted: any version
    legacy = _formatted(tmp_path / "legacy", None)  # formatted before the version file existed: 3.9.2
    assert lb.check_data_dir_version(legacy, "3.9.2") == "3.9.2"
    assert lb.check_data_dir_version(legacy, "4.4.0") == "3.9.2"  # the supported upgrade
    newer = _formatted(tmp_path / "newer", "4.4.0")
    assert lb.check_data_dir_version(newer, "4.4.0") == "4.4.0"
    with pytest.raises(lb.DataDirVersionError) as excinfo:
        lb.check_data_dir_version(newer, "3.9.2")
    message = str(excinfo.value)
    assert str(newer) in message and "4.4.0" in message and "METERING_KAFKA_VERSION=4.4.0" in message


def test_start_refuses_a_downgrade_before_any_download(tmp_path: Path) -> None:
    data_dir = _formatted(tmp_path / "data", "4.4.0")
    began = time.monotonic()
    with pytest.raises(lb.DataDirVersionError, match="no downgrade"):
        lb.start(port=lb.find_free_port(), data_dir=data_dir, cache_dir=tmp_path / "cache", version="3.9")
    assert time.monotonic() - began < 5
    assert not (tmp_path / "cache" / "3.9.2").exists()  # nothing fetched
    assert (data_dir / "kafka.version").read_text().strip() == "4.4.0"  # the record is untouched
    assert not (data_dir / "broker.pid").exists()


def test_build_format_command_uses_storage_tool(tmp_path: Path) -> None:
    cmd = lb.build_format_command(java="java", lib_dir=tmp_path, data_dir=tmp_path, cluster_id="abc")
    i = cmd.index("kafka.tools.StorageTool")
    assert cmd[i + 1 :] == [
        "format",
        "-t",
        "abc",
        "-c",
        str(tmp_path / "server.properties"),
        "--ignore-formatted",
    ]


@pytest.fixture
def listener() -> Iterator[int]:
    """A plain TCP listener on a free port: 'something that is not our broker'."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_port_checks(listener: int) -> None:
    assert not lb.is_port_free(listener)
    free = lb.find_free_port()
    assert lb.is_port_free(free)
    assert lb.find_free_port(exclude=frozenset({free})) != free


def test_choose_controller_port(listener: int) -> None:
    # Explicit request wins; a taken explicit port is an error.
    free = lb.find_free_port()
    assert lb.choose_controller_port(1, free) == free
    with pytest.raises(lb.PortInUseError):
        lb.choose_controller_port(1, listener)
    # port + 1 taken -> falls back to some other free port.
    chosen = lb.choose_controller_port(listener - 1, None)
    assert chosen != listener and chosen != listener - 1
    assert lb.is_port_free(chosen)


def test_start_fails_fast_when_port_taken(listener: int, tmp_path: Path) -> None:
    # Empty cache dir: if the port check ever moved after ensure_jars(), this
    # test would start downloading and blow the time bound below.
    began = time.monotonic()
    with pytest.raises(lb.PortInUseError) as excinfo:
        lb.start(port=listener, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", timeout_s=60)
    assert time.monotonic() - began < 5
    message = str(excinfo.value)
    assert str(listener) in message
    assert "METERING_KAFKA_PORT" in message and "--port" in message
    assert not (tmp_path / "data" / "broker.pid").exists()


def test_stop_and_status_without_broker(tmp_path: Path) -> None:
    assert lb.stop(tmp_path / "nothing-here") is False
    assert lb.status(tmp_path) == lb.BrokerStatus(running=False, pid=None, bootstrap=None)
    # A pid file naming an unrelated live process (pid reuse) is never signalled.
    (tmp_path / "broker.pid").write_text(
        lb.format_pid_file(lb.PidRecord(pid=os.getpid(), port=1, controller_port=2))
    )
    assert lb.status(tmp_path).running is False
    assert lb.stop(tmp_path) is False
    assert not (tmp_path / "broker.pid").exists()


# ---------------------------------------------------------------------------
# Real broker
# ---------------------------------------------------------------------------


def _processes_mentioning(needle: str) -> list[int]:
    """Pids whose command line mentions ``needle`` (our data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "kafka-data"
    yield path
    # Whatever a test did, never leak a JVM.
    lb.stop(path, timeout_s=10)
    assert _processes_mentioning(str(path)) == []


def _produce_and_consume(bootstrap: str) -> None:
    from confluent_kafka import Consumer, Producer

    # NewTopic is documented under confluent_kafka.admin, but 2.16's stubs do
    # not re-export it there.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    futures[topic].result(timeout=30)
    # created is not yet listed: the broker's metadata may lag its controller a moment (CI once
    # listed no topic at all right after the creation)
    deadline = time.monotonic() + 10
    while topic not in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"{topic} not listed 10 s after its creation"
        time.sleep(0.1)

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce(topic, key=b"k", value=b"hello")
    assert producer.flush(30) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{topic}",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            assert (msg.key(), msg.value()) == (b"k", b"hello")
            return
        pytest.fail("no message consumed within 60 s")
    finally:
        consumer.close()


@pytest.mark.kafka
def test_start_produce_consume_reuse_stop(data_dir: Path) -> None:
    port = lb.find_free_port()
    bootstrap = lb.start(port=port, data_dir=data_dir)
    assert bootstrap == f"127.0.0.1:{port}"
    first = lb.status(data_dir)
    assert first.running and first.bootstrap == bootstrap and first.pid is not None
    # The version asked for (METERING_KAFKA_VERSION) runs, and its logging binding writes
    # server.log through the project's config (log4j2 on 4.x, reload4j on 3.9).
    version = lb.resolve_kafka_version()
    assert (data_dir / "kafka.version").read_text().strip() == version
    assert f"Kafka version: {version}" in (data_dir / "logs" / "server.log").read_text()

    _produce_and_consume(bootstrap)

    # Second start reuses the same process instead of launching another.
    assert lb.start(port=port, data_dir=data_dir) == bootstrap
    assert lb.status(data_dir).pid == first.pid

    # Same data dir, different port: refuse rather than fight over the dir.
    with pytest.raises(lb.DataDirInUseError, match=str(port)):
        lb.start(port=lb.find_free_port(), data_dir=data_dir)

    # The port is now ours, but a *different* data dir must still fail fast.
    with pytest.raises(lb.PortInUseError, match=str(port)):
        lb.start(port=port, data_dir=data_dir.parent / "other")

    assert lb.stop(data_dir) is True
    assert not lb.status(data_dir).running
    assert not (data_dir / "broker.pid").exists()
    assert _processes_mentioning(str(data_dir)) == []
    assert lb.is_port_free(port)
    assert lb.stop(data_dir) is False  # idempotent


@pytest.mark.kafka
def test_stale_pid_file_is_replaced_and_data_survives_restart(data_dir: Path) -> None:
    port = lb.find_free_port()
    data_dir.mkdir(parents=True)
    dead = _dead_pid()
    (data_dir / "broker.pid").write_text(json.dumps({"pid": dead, "port": port, "controller_port": port + 1}))

    bootstrap = lb.start(port=port, data_dir=data_dir)
    pid = lb.status(data_dir).pid
    assert pid is not None and pid != dead
    assert lb.parse_pid_file((data_dir / "broker.pid").read_text()) is not None

    # NewTopic is documented under confluent_kafka.admin, but 2.16's stubs do
    # not re-export it there.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic("kept", 1, 1)])["kept"].result(timeout=30)

    # A broker killed without cleanup leaves a stale pid file behind too.
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while lb.status(data_dir).running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lb.status(data_dir).running
    assert (data_dir / "broker.pid").exists()

    # Restart on the already-formatted dir keeps the cluster id and topics.
    assert lb.start(port=port, data_dir=data_dir) == bootstrap
    assert lb.status(data_dir).pid not in (None, pid)
    assert "kept" in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics


@pytest.mark.kafka
def test_running_broker_stops_only_what_it_started(data_dir: Path) -> None:
    port = lb.find_free_port()
    with lb.running_broker(port=port, data_dir=data_dir) as bootstrap:
        outer_pid = lb.status(data_dir).pid
        with lb.running_broker(port=port, data_dir=data_dir) as again:
            assert again == bootstrap
        # The inner context reused the broker, so leaving it must not stop it.
        assert lb.status(data_dir).pid == outer_pid
    assert not lb.status(data_dir).running
    assert _processes_mentioning(str(data_dir)) == []


@pytest.mark.kafka
def test_cli_up_status_down(data_dir: Path) -> None:
    port = str(lb.find_free_port())
    repo_root = Path(lb.__file__).resolve().parents[2]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deploy.kafka.local_broker", *args, "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            cwd=repo_root,
            timeout=120,
            check=False,
        )

    up = cli("up", "--port", port)
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"127.0.0.1:{port}"
    st = cli("status")
    assert st.returncode == 0 and f"bootstrap=127.0.0.1:{port}" in st.stdout
    down = cli("down")
    assert down.returncode == 0 and "stopped" in down.stderr
    assert cli("status").returncode == 3


@pytest.mark.kafka
def test_start_timeout_kills_broker_and_reports_log(data_dir: Path) -> None:
    # 0.5 s is far below a JVM boot, so this exercises the give-up path.
    with pytest.raises(lb.BrokerStartError) as excinfo:
        lb.start(port=lb.find_free_port(), data_dir=data_dir, timeout_s=0.5)
    message = str(excinfo.value)
    assert "did not answer a metadata request" in message
    assert "server.log" in message
    assert not (data_dir / "broker.pid").exists()
    assert _processes_mentioning(str(data_dir)) == []


# ---------------------------------------------------------------------------
# A broker whose owner was SIGKILLed (``make run``'s process group killed)
# ---------------------------------------------------------------------------

REPO_ROOT = Path(lb.__file__).resolve().parents[2]


def _spawn_owner(port: int, data_dir: Path) -> subprocess.Popen[str]:
    """A process that holds the broker with ``running_broker``, in a process group of its own;
    returns once the broker is up."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from deploy.kafka import local_broker as lb\n"
        f"with lb.running_broker(port={port}, data_dir=Path({str(data_dir)!r})):\n"
        "    print('up', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    return proc


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.kafka
def test_an_orphan_on_another_port_is_replaced_and_stopped_on_exit(data_dir: Path) -> None:
    port = lb.find_free_port()
    owner = _spawn_owner(port, data_dir)
    orphan = lb.status(data_dir).pid
    _kill_group(owner)
    assert lb.status(data_dir).pid == orphan  # the broker outlived its owner: an orphan

    other = lb.find_free_port(exclude=frozenset({port, port + 1}))
    with lb.running_broker(port=other, data_dir=data_dir) as bootstrap:
        assert bootstrap == f"127.0.0.1:{other}"
        st = lb.status(data_dir)
        assert st.running and st.pid != orphan
        assert orphan not in _processes_mentioning(str(data_dir))
    assert not lb.status(data_dir).running
    assert _processes_mentioning(str(data_dir)) == []


@pytest.mark.kafka
def test_up_takes_over_an_orphan_and_keeps_it_up(data_dir: Path) -> None:
    port = lb.find_free_port()
    owner = _spawn_owner(port, data_dir)
    orphan = lb.status(data_dir).pid
    _kill_group(owner)
    assert lb.start(port=port, data_dir=data_dir) == f"127.0.0.1:{port}"
    assert lb.status(data_dir).pid == orphan
    record = lb.parse_pid_file((data_dir / "broker.pid").read_text())
    assert record is not None and record.owner is None  # `up`'s now: no run will stop it
    with lb.running_broker(port=port, data_dir=data_dir):
        pass
    assert lb.status(data_dir).pid == orphan


def _wait_ready(url: str, proc: subprocess.Popen[Any], log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"metering run exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.kafka
@pytest.mark.slow
def test_metering_run_after_its_process_group_was_sigkilled(tmp_path: Path, data_dir: Path) -> None:
    """``make run``'s process group SIGKILLed leaves the broker running (a session of its own).
    The next run takes it over, comes up despite the dead run's leftovers (pid file, the Kafka
    data dir's locks, the embedded ClickHouse directory), and its Ctrl-C stops the broker too."""
    http_port = lb.find_free_port()
    kafka_port = lb.find_free_port(exclude=frozenset({http_port, http_port + 1}))
    env = {k: v for k, v in os.environ.items() if "BOOTSTRAP_SERVERS" not in k}
    env |= {
        "METERING_HTTP_PORT": str(http_port),
        "METERING_KAFKA_PORT": str(kafka_port),
        "METERING_KAFKA_DATA_DIR": str(data_dir),
        "METERING_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}",
        "METERING_FAUST_DATA_DIR": str(tmp_path / "faust"),
        "METERING_ADMIN_TOKEN_FILE": str(tmp_path / "admin-token"),  # not the checkout's .cache
    }
    metering = Path(sys.executable).with_name("metering")
    readyz = f"http://127.0.0.1:{http_port}/readyz"
    runs: list[subprocess.Popen[Any]] = []

    def start_run(name: str) -> tuple[subprocess.Popen[Any], Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(metering), "run"],
                cwd=tmp_path,  # no .env of the checkout
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, like `make run` in a terminal
            )
        runs.append(proc)
        return proc, log

    try:
        first, first_log = start_run("first")
        _wait_ready(readyz, first, first_log)
        broker = lb.status(data_dir).pid
        _kill_group(first)
        assert lb.status(data_dir).pid == broker  # before the fix, nothing would ever stop it

        second, second_log = start_run("second")
        _wait_ready(readyz, second, second_log)
        assert lb.status(data_dir).pid == broker  # taken over, not a second broker
        record = lb.parse_pid_file((data_dir / "broker.pid").read_text())
        assert record is not None and record.owner == second.pid
        assert "took over the broker" in second_log.read_text()

        os.killpg(second.pid, signal.SIGINT)  # Ctrl-C
        assert second.wait(timeout=90) == 0, second_log.read_text()[-3000:]
        assert not lb.status(data_dir).running
        assert _processes_mentioning(str(data_dir)) == []
    finally:
        for proc in runs:
            if proc.poll() is None:
                _kill_group(proc)
