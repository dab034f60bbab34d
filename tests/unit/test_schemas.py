"""Pure tests of the event models, JSON Schemas, meter catalog, migrations templating, plans."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.events import DATA_MODELS, EVENT_ADAPTER, Event, EventType
from schemas.generate import OUT_DIR, rendered
from schemas.meters import Catalog, Meter, default_catalog
from schemas.migrate import discover, render
from schemas.plans import plan_for
from schemas.validation import RejectCode, check_event_time


def ev(**over: object) -> dict:
    base = {
        "specversion": "1.0",
        "id": "e1",
        "source": "s",
        "type": "ci.step.cpu",
        "time": "2026-11-22T10:00:00Z",
        "data": {"contract_id": "c", "workspace_id": "w", "step_id": "st", "cpu_seconds": 1.5},
    }
    base.update(over)
    return base


def test_checked_in_json_schemas_are_current() -> None:
    files = {p.name: p.read_text() for p in Path(OUT_DIR).glob("*.json")}
    assert files == rendered(), "run `make schemas`"
    assert len(files) == len(EventType)


def test_every_event_type_has_a_data_model() -> None:
    assert set(DATA_MODELS) == set(EventType)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_numbers_must_be_finite_and_non_negative(bad: float) -> None:
    with pytest.raises(ValidationError):
        Event.model_validate(
            ev(data={"contract_id": "c", "workspace_id": "w", "step_id": "s", "cpu_seconds": bad})
        )


def test_1e400_is_rejected_from_json() -> None:
    raw = json.dumps(ev()).replace('"cpu_seconds": 1.5', '"cpu_seconds": 1e400').encode()
    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_json(raw)


@pytest.mark.parametrize("eid", ["", "x" * 129])
def test_ids_are_1_to_128_characters(eid: str) -> None:
    with pytest.raises(ValidationError):
        Event.model_validate(ev(id=eid))


def test_unknown_type_and_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        Event.model_validate(ev(type="cpu.mystery"))
    with pytest.raises(ValidationError):
        Event.model_validate(
            ev(data={"contract_id": "c", "workspace_id": "w", "step_id": "s", "cpu_seconds": 1, "x": 1})
        )


def test_subject_is_filled_from_data_and_must_match() -> None:
    assert Event.model_validate(ev()).subject == "st"
    with pytest.raises(ValidationError):
        Event.model_validate(ev(subject="other"))


def test_time_window() -> None:
    now = datetime(2026, 11, 22, tzinfo=UTC)
    assert check_event_time(now - timedelta(days=34), now) is None
    assert check_event_time(now - timedelta(days=36), now)[0] == RejectCode.TOO_OLD
    assert check_event_time(now - timedelta(days=36), now, backfill=True) is None
    assert check_event_time(now + timedelta(minutes=6), now)[0] == RejectCode.IN_FUTURE
    assert check_event_time(now + timedelta(minutes=4), now) is None


def test_catalog_loads_and_rejects_inconsistent_meters() -> None:
    cat = default_catalog()
    assert cat.get("datastream_unique_rows") is not None
    with pytest.raises(ValidationError):
        Meter(slug="m", event_type=EventType.CI_STEP_CPU, aggregation="SUM", value="no_such_field")
    with pytest.raises(ValidationError):
        Meter(slug="m", event_type=EventType.CI_STEP_MEMORY, aggregation="INTEGRAL", value="memory_mib")
    with pytest.raises(ValidationError):
        Catalog(meters=(cat.meters[0], cat.meters[0]))


def test_migrations_render_for_single_node_and_cluster() -> None:
    migs = discover()
    assert [m.version for m in migs] == sorted(m.version for m in migs)
    single = render(migs[0].up.read_text(), "metering", None)
    cluster = render(migs[0].up.read_text(), "metering", "prod")
    assert "ENGINE = MergeTree" in single[0] and "ON CLUSTER" not in single[0]
    assert "ReplicatedMergeTree(" in cluster[0] and "ON CLUSTER 'prod'" in cluster[0]


def test_plan_overage_rounds_up_to_a_cent() -> None:
    pro = plan_for("pro")
    assert pro.overage_cents(pro.log_limit) == 0
    assert pro.overage_cents(pro.log_limit + 1) == 1
    assert pro.overage_cents(pro.log_limit + 2000) == 100
    assert plan_for("no-such-tier").tier == "free"


def test_chdb_path_names_the_embedded_engine_only() -> None:
    """``chdb_path``: the one test of "is this client the embedded engine" (the aggregator's
    purge and stagers, the API's lookup handle): a chdb client's directory, None for a server's."""
    from types import SimpleNamespace

    from schemas.clickhouse import chdb_path

    assert chdb_path(SimpleNamespace(path="/data/chdb", uri="chdb:///data/chdb")) == "/data/chdb"
    assert chdb_path(SimpleNamespace(path=":memory:", uri="chdb://:memory:")) == ":memory:"
    assert chdb_path(SimpleNamespace(path="/v1", uri="http://clickhouse:8123/v1")) is None  # a server
    assert chdb_path(SimpleNamespace(uri="http://clickhouse:8123")) is None
    assert chdb_path(SimpleNamespace(path=None, uri="chdb://")) is None
