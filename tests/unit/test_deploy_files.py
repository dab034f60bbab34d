"""The docker-compose file parses and names what deploy/README.md promises (no Docker here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_names_every_documented_service_and_port() -> None:
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    services = compose["services"]
    readme = (ROOT / "deploy/README.md").read_text()
    documented = dict(re.findall(r"^\| (\S+) \| .* \| (\d+|–) \|$", readme, flags=re.M))
    assert set(documented) == set(services), "README table and compose services differ"
    for name, port in documented.items():
        published = [str(p).split(":")[0] for p in services[name].get("ports", [])]
        assert (port == "–" and not published) or published == [port], name
    for name in ("ingest-api", "aggregator", "query-api", "migrate"):
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["METERING_CLICKHOUSE_DSN"].startswith("http://")
        assert services[name]["command"][0] == "metering"


def test_dockerfile_installs_the_console_script() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    for pkg in ("schemas", "ingest", "aggregators", "query_api", "deploy"):
        assert f"COPY {pkg} {pkg}" in text
