"""``metering admin`` end to end: a real ``metering run`` (its own embedded ClickHouse, the
aggregator, the HTTP API, the admin API with a generated token) on the session's broker, and the
CLI invoked in this process (typer's CliRunner) with nothing but environment variables.

What a newcomer met (issue 7, item 8) and what they meet now: a key created with ``--wait`` is
usable the moment the command returns; ``list`` shows keys without their secret, and revoking
takes an id from the list; a command whose inputs disagree with what exists is refused before
anything is sent; an unreachable admin API or a stalled aggregator says so, with its own exit
code. The help texts are checked without any of this (unmarked tests at the end).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import typer
from typer.testing import CliRunner, Result

from deploy.cli import app as metering
from query_api.credentials import hash_secret

needs_the_system = [pytest.mark.kafka, pytest.mark.clickhouse]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class System:
    url: str
    port: int
    topic: str
    token_file: Path
    log: Path
    bootstrap: str

    def env(self) -> dict[str, str]:
        """What ``metering admin`` needs to reach this system (and nothing else of this process)."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "METERING_TOPIC_EVENTS": self.topic,
            "METERING_TOPIC_DEAD_LETTER": f"{self.topic}.dlq",
            "METERING_HTTP_PORT": str(self.port),
            "METERING_ADMIN_TOKEN_FILE": str(self.token_file),
        }


@pytest.fixture(scope="module")
def system(kafka_bootstrap: str) -> Iterator[System]:
    """``metering run`` in a process of its own, until the module is done."""
    tmp = Path(tempfile.mkdtemp(prefix="metering-admin-cli-"))
    topic = f"test-admin-{uuid.uuid4().hex[:12]}"
    port = free_port()
    sys_ = System(
        f"http://127.0.0.1:{port}", port, topic, tmp / "admin-token", tmp / "run.log", kafka_bootstrap
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env |= sys_.env() | {
        "METERING_CLICKHOUSE_DSN": f"chdb://{tmp / 'chdb'}",
        "METERING_CONSUMER_GROUP": f"g-{topic}",
        "METERING_FAUST_DATA_DIR": str(tmp / "faust"),
        "METERING_BATCH_WITHIN_S": "0.05",
        "METERING_QUERY_CACHE_TTL_S": "0",  # a revocation is seen by the very next request
    }
    with sys_.log.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from deploy.cli import app; app()", "run"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not _ready(sys_):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"metering run did not become ready:\n{sys_.log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield sys_
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def _ready(s: System) -> bool:
    try:
        r = httpx.get(f"{s.url}/readyz", timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and s.token_file.exists() and "Admin API" in s.log.read_text()


@pytest.fixture
def cli(system: System, monkeypatch: pytest.MonkeyPatch) -> Iterator[System]:
    for name in list(os.environ):
        if name.startswith("METERING_"):
            monkeypatch.delenv(name)
    for name, value in system.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables unfolded
    yield system


def run(*args: str) -> Result:
    return CliRunner().invoke(metering, ["admin", *args])


def ok(*args: str) -> dict[str, Any]:
    """Run a command with --json; its JSON result."""
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return dict(orjson.loads(result.stdout.strip().splitlines()[-1]))


def control_end(s: System) -> int:
    """How many messages the control topic holds (it has one partition)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": s.bootstrap, "group.id": f"peek-{uuid.uuid4().hex}"})
    try:
        return int(c.get_watermark_offsets(TopicPartition(f"{s.topic}.control", 0), timeout=10)[1])
    finally:
        c.close()


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


# ---- the running system ----------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_the_system_writes_its_admin_token_for_its_user_only(system: System) -> None:
    assert stat.S_IMODE(system.token_file.stat().st_mode) == 0o600
    token = system.token_file.read_text().strip()
    assert token.startswith("mt_admin_")
    banner = system.log.read_text()
    assert f"Admin API     {system.url}/admin/v1" in banner and str(system.token_file) in banner
    assert token not in banner  # where it is, never what it is
    assert httpx.get(f"{system.url}/admin/v1/tenants/x/workspaces", headers=bearer(token)).status_code == 404
    assert httpx.get(f"{system.url}/admin/v1/tenants/x/workspaces").status_code == 401
    # the admin token is no usage key: the ingest refuses it like any unknown credential
    event = {
        "specversion": "1.0",
        "id": "e",
        "source": "s",
        "type": "egress.download",
        "time": "2026-01-01T00:00:00Z",
    }
    r = httpx.post(f"{system.url}/api/v1/events", json=event, headers=bearer(token))
    assert r.status_code == 401, r.text


# ---- --wait -------------------------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_a_key_created_with_wait_is_usable_at_once(cli: System) -> None:
    tenant = new_tenant()
    ws = ok("workspace", "create", "--tenant", tenant, "--name", "hq", "--wait")
    assert ws["status"] == "applied"
    key = ok("api-key", "create", "--tenant", tenant, "--workspace-id", ws["workspace_id"], "--wait")
    assert key["status"] == "applied"
    # no 401 window: the command returned once the aggregator had applied the key
    r = httpx.get(f"{cli.url}/v1/workspace/usage", headers=bearer(key["api_key"]))
    assert r.status_code == 200, r.text

    # the same, as a person sees it
    human = run("api-key", "create", "--tenant", tenant, "--workspace-id", ws["workspace_id"], "--wait")
    assert human.exit_code == 0, human.output
    assert "applied: the key is usable now" in human.stdout
    raw = next(line.split(": ", 1)[1] for line in human.stdout.splitlines() if line.startswith("api_key: "))
    assert httpx.get(f"{cli.url}/v1/workspace/usage", headers=bearer(raw)).status_code == 200
    assert "Store it now" in human.stderr


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_a_token_issued_with_wait_is_usable_at_once(cli: System) -> None:
    tenant = new_tenant()
    ws = ok("workspace", "create", "--tenant", tenant, "--name", "hq", "--wait")["workspace_id"]
    member = ok("member", "join", "--tenant", tenant, "--workspace-id", ws, "--email", "ann@x.io", "--wait")
    token = ok(
        "token", "issue", "--tenant", tenant, "--member-id", member["member_id"], "--email", "Ann@x.io", "--wait"
    )  # fmt: skip
    assert token["status"] == "applied"
    r = httpx.get(f"{cli.url}/api/v1/workspaces/{ws}/stats", headers=bearer(token["access_token"]))
    assert r.status_code == 200, r.text


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_without_wait_the_output_says_it_is_only_delivered(cli: System) -> None:
    tenant = new_tenant()
    result = run("workspace", "create", "--tenant", tenant, "--name", "hq")  # not a terminal: no wait
    assert result.exit_code == 0, result.output
    assert "delivered to Kafka; it takes effect once the aggregator applies it" in result.stdout
    assert ok("workspace", "create", "--tenant", tenant, "--name", "x")["status"] == "delivered"


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_wait_gives_up_when_no_aggregator_applies(cli: System, monkeypatch: pytest.MonkeyPatch) -> None:
    # events to a topic nobody consumes: delivered, never applied
    monkeypatch.setenv("METERING_TOPIC_EVENTS", f"{cli.topic}-nobody")
    result = run(
        "workspace", "create", "--tenant", new_tenant(), "--name", "hq", "--wait", "--wait-timeout", "1"
    )
    assert result.exit_code == 3, result.output
    assert (
        f"delivered to Kafka, not yet applied by the aggregator after 1 s: is the aggregator running? "
        f"check {cli.url}/readyz"
    ) in result.stderr
    as_json = run("workspace", "create", "--tenant", new_tenant(), "--name", "hq", "--json", "--wait",
                  "--wait-timeout", "0.5")  # fmt: skip
    assert as_json.exit_code == 3
    assert orjson.loads(as_json.stdout.strip().splitlines()[-1])["status"] == "delivered"


# ---- list, and revoking by a listed id -------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_list_shows_keys_without_secrets_and_revoke_takes_a_listed_id(cli: System) -> None:
    tenant = new_tenant()
    ws = ok("workspace", "create", "--tenant", tenant, "--name", "hq", "--wait")["workspace_id"]
    keys = [ok("api-key", "create", "--tenant", tenant, "--workspace-id", ws, "--wait") for _ in range(2)]
    raws = [k["api_key"] for k in keys]

    listed = run("api-key", "list", "--tenant", tenant, "--json")
    assert listed.exit_code == 0, listed.output
    body = orjson.loads(listed.stdout)
    assert (body["tenant"], body["kind"], body["total"]) == (tenant, "api-keys", 2)
    by_prefix = {i["prefix"]: i for i in body["items"]}
    assert set(by_prefix) == {k["prefix"] for k in keys}
    table = run("api-key", "list", "--tenant", tenant)
    assert table.exit_code == 0, table.output
    for text in (listed.stdout, table.stdout):
        for raw in raws:
            assert raw not in text and hash_secret(raw) not in text
    for item in body["items"]:
        assert item["id"] in table.stdout and item["prefix"] in table.stdout
    assert table.stdout.count("active") == 2

    # the newcomer knows the key by its prefix only: the list gives its id
    victim = by_prefix[keys[0]["prefix"]]["id"]
    revoked = run("api-key", "revoke", "--tenant", tenant, "--id", victim, "--wait")
    assert revoked.exit_code == 0, revoked.output
    assert "applied: the key is revoked" in revoked.stdout
    assert httpx.get(f"{cli.url}/v1/workspace/usage", headers=bearer(raws[0])).status_code == 401
    assert httpx.get(f"{cli.url}/v1/workspace/usage", headers=bearer(raws[1])).status_code == 200
    states = run("api-key", "list", "--tenant", tenant, "--status", "revoked", "--json")
    assert [i["id"] for i in orjson.loads(states.stdout)["items"]] == [victim]

    again = run("api-key", "revoke", "--tenant", tenant, "--id", victim)
    assert again.exit_code == 1 and "is already revoked" in again.stderr


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_every_kind_has_a_list(cli: System) -> None:
    tenant = new_tenant()
    ws = ok("workspace", "create", "--tenant", tenant, "--name", "hq", "--wait")["workspace_id"]

    def made(field: str, *args: str) -> str:
        return str(ok(*args[:2], "--tenant", tenant, *args[2:], "--wait")[field])

    rates = ("--usd-per-cpu-hour", "1", "--usd-per-gpu-hour", "2", "--usd-per-gb-hour", "3")
    ids = {
        "workspace": ws,
        "contract": made("contract_id", "contract", "create", "--name", "c", "--workspace-id", ws),
        "member": made("membership_id", "member", "join", "--workspace-id", ws, "--email", "a@b.c"),
        "vk": made("virtual_key_id", "vk", "create", "--workspace-id", ws),
        "agent": made("agent_id", "agent", "create", "--workspace-id", ws),
        "workstation": made(
            "workstation_id", "workstation", "create", "--name", "w", *rates, "--workspace-id", ws
        ),
        "datastream": made("datastream_id", "datastream", "create", "--workspace-id", ws, "--name", "d"),
    }
    for group, entity_id in ids.items():
        result = run(group, "list", "--tenant", tenant, "--json")
        assert result.exit_code == 0, (group, result.output)
        assert [i["id"] for i in orjson.loads(result.stdout)["items"]] == [entity_id], group
    for group in ("vk", "agent", "datastream", "member", "workstation"):
        other = run(group, "list", "--tenant", tenant, "--workspace-id", "elsewhere", "--json")
        assert orjson.loads(other.stdout)["items"] == [], group
    token = run("token", "list", "--tenant", tenant, "--json")
    assert orjson.loads(token.stdout)["items"] == []
    unknown = run("workspace", "list", "--tenant", new_tenant())
    assert unknown.exit_code == 1 and "no tenant" in unknown.stderr


# ---- checks before sending -------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_what_is_typed_twice_must_agree(cli: System) -> None:
    tenant = new_tenant()
    ws = ok("workspace", "create", "--tenant", tenant, "--name", "hq", "--wait")["workspace_id"]
    other = ok("workspace", "create", "--tenant", tenant, "--name", "other", "--wait")["workspace_id"]
    member = ok("member", "join", "--tenant", tenant, "--workspace-id", ws, "--email", "ann@x.io", "--wait")
    mid = member["member_id"]
    sent = control_end(cli)

    def refused(*args: str, says: str) -> None:
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert "refused:" in result.stderr and says in result.stderr, result.stderr
        assert "Nothing was sent" in result.stderr

    member_key = ("api-key", "create", "--tenant", tenant, "--scope", "member", "--member-id", mid)
    refused(
        *member_key,
        "--email",
        "bob@x.io",
        "--workspace-id",
        ws,
        says="has the email 'ann@x.io', not 'bob@x.io'",
    )
    refused(*member_key, "--email", "ann@x.io", "--workspace-id", other, says="is not a member of workspace")
    refused("api-key", "create", "--tenant", tenant, "--scope", "member", "--member-id", "nobody", "--email",
            "ann@x.io", says="no member 'nobody'")  # fmt: skip
    refused("api-key", "create", "--tenant", tenant, "--workspace-id", "nope", says="no workspace 'nope'")
    refused("api-key", "revoke", "--tenant", tenant, "--id", "key_unknown", says="no API key 'key_unknown'")
    refused(
        "token", "revoke", "--tenant", tenant, "--id", "tok_unknown", says="no access token 'tok_unknown'"
    )
    refused(
        "token", "issue", "--tenant", tenant, "--member-id", mid, "--email", "eve@x.io", says="not 'eve@x.io'"
    )
    refused("contract", "add-workspace", "--tenant", tenant, "--contract-id", "c-x", "--workspace-id", ws,
            says="no contract 'c-x'")  # fmt: skip
    refused("member", "join", "--tenant", tenant, "--workspace-id", ws, "--member-id", mid, "--email", "ann@x.io",
            says="already a member")  # fmt: skip
    refused("member", "join", "--tenant", tenant, "--workspace-id", other, "--member-id", mid, "--email",
            "zed@x.io", says="has the email 'ann@x.io'")  # fmt: skip
    refused("vk", "create", "--tenant", "no-such-tenant", "--workspace-id", ws,
            says="that tenant has no entities at all")  # fmt: skip
    refused("workspace", "create", "--tenant", tenant, "--name", "again", "--id", ws, says="already exists")
    assert control_end(cli) == sent  # nothing reached Kafka

    # what agrees passes, and the key opens document 001 for that member at once
    good = ok(*member_key, "--email", "ANN@x.io", "--workspace-id", ws, "--wait")
    assert good["status"] == "applied"
    r = httpx.get(
        f"{cli.url}/v2/quota-usages/workspaces/{ws}?period=week", auth=("ann@x.io", good["api_key"])
    )
    assert r.status_code == 200, r.text


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_an_unreachable_admin_api_is_said_and_force_sends_anyway(
    cli: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_ADMIN_API_URL", f"http://127.0.0.1:{free_port()}")
    tenant = new_tenant()
    sent = control_end(cli)
    args = ("member", "join", "--tenant", tenant, "--workspace-id", "w", "--email", "a@b.c")
    result = run(*args)
    assert result.exit_code == 4, result.output
    assert "does not answer" in result.stderr and "--force sends it without the checks" in result.stderr
    assert control_end(cli) == sent
    forced = run(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert "delivered to Kafka" in forced.stdout
    assert control_end(cli) == sent + 1
    listed = run("member", "list", "--tenant", tenant)
    assert listed.exit_code == 4 and "does not answer" in listed.stderr


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_a_missing_or_wrong_admin_token_is_said(cli: System, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_ADMIN_TOKEN_FILE", str(cli.token_file) + ".missing")
    result = run("workspace", "list", "--tenant", "t")
    assert result.exit_code == 4 and "no admin token: set METERING_ADMIN_TOKEN" in result.stderr
    monkeypatch.setenv("METERING_ADMIN_TOKEN", "mt_admin_" + "w" * 40)
    result = run("workspace", "list", "--tenant", "t")
    assert result.exit_code == 4 and "refused the admin token" in result.stderr


# ---- help texts (no system needed) ----------------------------------------------------------------


def _commands(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf command under ``group`` (typer's vendored click: groups have ``commands``)."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def _help(args: list[str]) -> str:
    result = CliRunner().invoke(metering, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_flags_are_shown_as_flags_and_ids_as_they_are() -> None:
    root = typer.main.get_command(metering)
    checked = 0
    for path, command in _commands(root):
        if not path.startswith(("admin ", "emit", "load", "demo")):
            continue
        text = _help(path.split())
        for line in text.splitlines():
            for flag in ("--json", "--wait", "--force", "--backfill", "--test", "--lifecycle"):
                if f"│ {flag} " in line or f"  {flag} " in line:
                    assert "<bool>" not in line, (path, line)
        for param in command.params:
            if "--id" in getattr(param, "opts", ()) and param.required:
                assert "default" not in (getattr(param, "help", "") or ""), (path, param.help)
        checked += 1
    assert checked >= 32  # 20 admin changes, 9 lists, emit, load, demo


def test_ids_say_what_they_default_to() -> None:
    assert "required" in _help(["admin", "agent", "activate"]).split("--id")[1].split("\n")[0]
    assert "key_ and 32 random hex" in _help(["admin", "api-key", "create"])
    assert "tok_ and 32 random hex" in _help(["admin", "token", "issue"])
    emit = _help(["emit"])
    assert "delivered" in emit and "accepted" not in emit and "counts each event id once per tenant" in emit
