"""The dashboards and alert rules that ship in deploy/observability/ are valid and name only
metrics the code exports.

promtool (installed by `make tools`, deploy/tools/install-test-tools.sh) checks the rule files and
the Prometheus config, runs the rules' unit tests, and parses every dashboard query. The metric
names are those in prometheus_client's registry once every module of the packages is imported.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "deploy/observability"
RULES = sorted((OBS / "prometheus/rules").glob("*.yml"))
DASHBOARDS = sorted((OBS / "grafana/dashboards").glob("*.json"))
PROMETHEUS_BUILTIN = {"up"}  # series Prometheus itself writes per target
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def promtool() -> str:
    found = ROOT / ".cache/bin/promtool"
    path = str(found) if found.exists() else shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: `make tools` installs it (deploy/tools/install-test-tools.sh)")
        pytest.skip("promtool is missing: run `make tools` (deploy/tools/install-test-tools.sh)")
    return path


def run_promtool(*args: str | Path) -> str:
    done = subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def exported() -> dict[str, set[str] | None]:
    """Every sample name the code can export (``x_total``, ``x_bucket``...) -> its label names
    (None: a custom collector, whose labels are known only from its samples)."""
    for package in ("schemas", "ingest", "aggregators", "query_api", "deploy"):
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            importlib.import_module(info.name)
    names: dict[str, set[str] | None] = {}
    for name, collector in REGISTRY._names_to_collectors.items():
        labels = getattr(collector, "_labelnames", None)
        names[name] = None if labels is None else set(labels)
    return names


# ---- PromQL: the metric names and grouping labels an expression uses -----------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
_KEYWORDS |= {"bool", "offset", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def _strip(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    return re.sub(r"\[[^\]]*\]", "", expr)  # ranges


def metric_names(expr: str) -> set[str]:
    bare = _GROUPING.sub(" ", _strip(expr))
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", bare):
        if m.group(2) is None and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for m in _GROUPING.finditer(_strip(expr))
        for label in m.group(2).split(",")
        if label.strip()
    }


def test_the_promql_reader() -> None:
    expr = 'sum by (route, le) (rate(metering_x_bucket{status=~"5..", a="b(c)"}[$__rate_interval])) / up'
    assert metric_names(expr) == {"metering_x_bucket", "up"}
    assert grouping_labels(expr) == {"route", "le"}
    assert metric_names("histogram_quantile(0.95, sum(rate(a_b[5m]))) > 1e3 and on(x) c") == {"a_b", "c"}


def check_names(where: str, expr: str, names: dict[str, set[str] | None]) -> None:
    used = metric_names(expr)
    unknown = sorted(n for n in used if n not in names and n not in PROMETHEUS_BUILTIN)
    assert not unknown, f"{where} names metrics the code does not export: {unknown}\n{expr}"
    if any(n in names and names[n] is None for n in used):
        return  # a custom collector's labels: not known without samples
    known_labels = {"le", "job", "instance"}.union(*(names.get(n) or set() for n in used))
    extra = grouping_labels(expr) - known_labels
    assert not extra, f"{where} groups by labels its metrics do not have: {sorted(extra)}\n{expr}"


# ---- alert rules ------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for path in RULES for g in yaml.safe_load(path.read_text())["groups"] for rule in g["rules"]]


def test_rule_files_pass_promtool_check() -> None:
    assert RULES
    out = run_promtool("check", "rules", *RULES)
    assert "SUCCESS" in out


def test_rule_unit_tests_pass() -> None:
    tests = sorted((OBS / "prometheus/tests").glob("*.yml"))
    assert tests
    out = run_promtool("test", "rules", *tests)
    assert "SUCCESS" in out and "FAILED" not in out


def test_prometheus_config_passes_promtool_and_scrapes_every_process() -> None:
    config = OBS / "prometheus/prometheus.yml"
    run_promtool("check", "config", config)
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())["services"]
    scraped = set()
    for job in yaml.safe_load(config.read_text())["scrape_configs"]:
        for static in job.get("static_configs", []):
            scraped.update(t.split(":")[0] for t in static["targets"])
        for dns in job.get("dns_sd_configs", []):
            scraped.update(dns["names"])
    assert scraped == {"ingest-api", "aggregator", "query-api"}
    assert scraped <= set(compose)


def test_every_alert_has_a_runbook_and_names_real_metrics() -> None:
    names = exported()
    rules = alert_rules()
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert len(annotations["runbook"].split()) >= 30, f"{rule['alert']}: a runbook says what to do"
        check_names(f"alert {rule['alert']}", rule["expr"], names)
    # the list: lag growing, a partition without progress, freshness, dead letters,
    # ClickHouse errors / a stalled aggregator, 5xx
    assert {
        "MeteringConsumerLagGrowing",
        "MeteringPartitionNoProgress",
        "MeteringPartitionStalled",
        "MeteringFreshnessOver60s",
        "MeteringDeadLettersHigh",
        "MeteringClickHouseErrors",
        "MeteringAggregatorStalled",
        "MeteringHttp5xx",
    } <= {r["alert"] for r in rules}


# ---- dashboards ---------------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def test_dashboards_name_real_metrics_and_parse(tmp_path: Path) -> None:
    assert DASHBOARDS
    names = exported()
    datasource = yaml.safe_load((OBS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    records = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"]
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                where = f"{path.name}: panel {panel['title']!r}"
                check_names(where, target["expr"], names)
                expr = target["expr"]
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                records.append({"record": f"panel:{len(records)}", "expr": expr})
    # promtool parses every query: each one as a recording rule
    rules = tmp_path / "dashboard_queries.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": records}]}))
    run_promtool("check", "rules", rules)


def test_dashboard_shows_what_operators_need() -> None:
    used = set()
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            for target in panel.get("targets", []):
                used |= metric_names(target["expr"])
    assert {
        "metering_events_in_total",  # ingest rate
        "metering_consumer_lag",  # lag per partition
        "metering_tenant_freshness_seconds",  # freshness per tenant
        "metering_rejected_total",  # dead letters by reason
        "metering_flush_seconds_bucket",  # batch latency
        "metering_clickhouse_errors_total",
        "metering_aggregator_stall_seconds",
        "metering_http_requests_total",  # status by endpoint
        "metering_http_request_duration_seconds_bucket",  # latency by endpoint
    } <= used


def test_grafana_provisioning_matches_compose() -> None:
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())["services"]
    mounts = dict(v.split(":")[:2] for v in compose["grafana"]["volumes"])
    provider = yaml.safe_load((OBS / "grafana/provisioning/dashboards/metering.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert mounts["./observability/grafana/dashboards"] == dashboards_dir
    assert mounts["./observability/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/") and (OBS / "grafana/dashboards" / Path(home).name).exists()
    datasource = yaml.safe_load((OBS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["prometheus"]["ports"]
    prom_mounts = dict(v.split(":")[:2] for v in compose["prometheus"]["volumes"])
    assert prom_mounts["./observability/prometheus"] == "/etc/prometheus"
