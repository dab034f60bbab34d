"""Who may write which events (the usage and control planes), and the one time-window decision.

Findings 1 and 4 of issue 7, at the level of the pure code the HTTP ingest, the SDK and the
aggregator share: a lifecycle event is refused by every usage path and by the aggregator when it
arrives on the usage topic; and the instant an event is judged by travels as the Kafka message
timestamp, so the producer's decision and the aggregator's are the same at the exact edges.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest

from aggregators.decode import SourceMessage, decode_message
from deploy.settings import CommonSettings
from ingest.sdk import InvalidEvent, UsageProducer, format_time, prepare_event
from schemas.events import LIFECYCLE_TYPES, USAGE_TYPES, EventType, Plane, plane_of
from schemas.validation import MAX_AGE, MAX_FUTURE, RejectCode, kafka_time, now_ms
from schemas.wire import control_lane, is_control_lane, lane_partition
from tests.unit.test_sdk_batching import FakeKafka

JUDGED_MS = 1_795_000_000_123  # an arbitrary instant with a non-zero millisecond part


def cpu(t: str, eid: str = "e-1") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": eid,
        "source": "s",
        "type": "workstation.cpu",
        "time": t,
        "data": {"workstation_id": "ws-1", "cpu_seconds": 1.5},
    }


def key_created(eid: str = "k-1") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": eid,
        "source": "attacker",
        "type": "api_key.created",
        "time": format_time(kafka_time(JUDGED_MS)),
        "data": {
            "key_id": "k-evil",
            "key_hash": "0" * 64,
            "prefix": "fl_live_",
            "scope": "workspace",
            "workspace_id": "root",
        },
    }


def message(events: list[dict[str, Any]], lane: int = 0, ts_ms: int = JUDGED_MS) -> SourceMessage:
    return SourceMessage(lane, 7, ts_ms, b"acme", orjson.dumps([{**e, "tenant": "acme"} for e in events]))


# ---- planes -----------------------------------------------------------------------------------


def test_every_type_has_exactly_one_plane() -> None:
    assert {plane_of(t) for t in LIFECYCLE_TYPES} == {Plane.CONTROL}
    assert {plane_of(t) for t in USAGE_TYPES} == {Plane.USAGE}
    assert set(EventType) == LIFECYCLE_TYPES | USAGE_TYPES
    assert EventType.API_KEY_CREATED in LIFECYCLE_TYPES
    assert EventType.ACCESS_TOKEN_ISSUED in LIFECYCLE_TYPES


@pytest.mark.parametrize("event_type", sorted(LIFECYCLE_TYPES))
def test_usage_paths_refuse_every_lifecycle_type(event_type: EventType) -> None:
    # whatever its data, a lifecycle event is refused by type first
    event = {**key_created(), "type": event_type.value}
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(event, "acme", received_at=kafka_time(JUDGED_MS))
    assert exc.value.code == RejectCode.FORBIDDEN_EVENT_TYPE
    assert "administrators" in exc.value.message


def test_control_plane_accepts_lifecycle_and_refuses_usage() -> None:
    out = prepare_event(key_created(), "acme", received_at=kafka_time(JUDGED_MS), plane=Plane.CONTROL)
    assert out["type"] == "api_key.created"
    with pytest.raises(InvalidEvent) as exc:
        prepare_event(
            cpu(format_time(kafka_time(JUDGED_MS))),
            "acme",
            received_at=kafka_time(JUDGED_MS),
            plane=Plane.CONTROL,
        )
    assert exc.value.code == RejectCode.FORBIDDEN_EVENT_TYPE


def test_producers_write_their_plane_to_its_topic() -> None:
    settings = CommonSettings(topic_events="ev")
    assert settings.topic_control == "ev.control"
    usage, control = FakeKafka(), FakeKafka()
    with UsageProducer("unused:0", settings=settings, producer=usage) as p:
        p.send_batch([cpu(format_time(kafka_time(now_ms())))], "acme")
        with pytest.raises(InvalidEvent):
            p.emit(key_created(), "acme")
    with UsageProducer("unused:0", settings=settings, producer=control, plane=Plane.CONTROL) as p:
        p.send_batch([{**key_created(), "time": format_time(kafka_time(now_ms()))}], "acme")
    assert [m["topic"] for m in usage.messages] == ["ev"]
    assert [m["topic"] for m in control.messages] == ["ev.control"]


def test_lanes_keep_the_two_topics_apart() -> None:
    assert [control_lane(p) for p in range(3)] == [-1, -2, -3]
    assert all(is_control_lane(control_lane(p)) and lane_partition(control_lane(p)) == p for p in range(5))
    assert not is_control_lane(0) and lane_partition(3) == 3


def test_aggregator_refuses_lifecycle_from_the_usage_topic() -> None:
    ok = cpu(format_time(kafka_time(JUDGED_MS)), "u-1")
    decoded = decode_message(message([ok, key_created(), ok | {"id": "u-2"}], lane=0))
    assert [r.event_id for r in decoded.rows] == ["u-1", "u-2"]
    assert [(r.index, r.code) for r in decoded.rejects] == [(1, RejectCode.WRONG_TOPIC)]
    assert "control topic" in decoded.rejects[0].message


def test_aggregator_accepts_lifecycle_only_from_the_control_topic() -> None:
    decoded = decode_message(message([key_created()], lane=control_lane(0)))
    assert [r.event_id for r in decoded.rows] == ["k-1"] and not decoded.rejects
    assert decoded.rows[0].partition == -1  # stored under its lane
    usage = decode_message(message([cpu(format_time(kafka_time(JUDGED_MS)))], lane=control_lane(0)))
    assert not usage.rows and [r.code for r in usage.rejects] == [RejectCode.WRONG_TOPIC]


# ---- one decision for the time window ---------------------------------------------------------


def edge_times() -> list[tuple[str, str]]:
    """Event times at and around both edges of the window, judged at JUDGED_MS."""
    judged = kafka_time(JUDGED_MS)
    one = timedelta(milliseconds=1)
    return [
        ("oldest accepted", format_time(judged - MAX_AGE)),
        ("1 ms too old", format_time(judged - MAX_AGE - one)),
        ("newest accepted", format_time(judged + MAX_FUTURE)),
        ("1 ms too new", format_time(judged + MAX_FUTURE + one)),
        ("now", format_time(judged)),
    ]


@pytest.mark.parametrize(("label", "time"), edge_times())
def test_producer_and_aggregator_decide_the_window_alike(label: str, time: str) -> None:
    try:
        prepare_event(cpu(time), "acme", received_at=kafka_time(JUDGED_MS))
        producer_accepts = True
    except InvalidEvent as exc:
        producer_accepts = False
        assert exc.code in (RejectCode.TOO_OLD, RejectCode.IN_FUTURE)
    decoded = decode_message(message([cpu(time)], ts_ms=JUDGED_MS))
    assert bool(decoded.rows) is producer_accepts, label
    assert producer_accepts is ("accepted" in label or label == "now")


def test_the_judging_instant_is_the_message_timestamp() -> None:
    fake = FakeKafka()
    producer = UsageProducer("unused:0", settings=CommonSettings(), topic="t", producer=fake, linger_s=3600)
    before = now_ms()
    producer.send_batch([cpu(format_time(kafka_time(before)), f"e{i}") for i in range(3)], "acme")
    producer.emit(cpu(format_time(kafka_time(before)), "e9"), "acme")
    producer.emit(cpu(format_time(kafka_time(before)), "e10"), "acme")
    producer.close()
    after = now_ms()
    stamps = [m["timestamp"] for m in fake.messages]
    assert len(stamps) == 2 and all(before <= s <= after for s in stamps)
    # the two emits joined one batch: the second was judged by the open batch's instant
    assert [len(orjson.loads(m["value"])) for m in fake.messages] == [3, 2]


def test_validated_events_need_their_judging_instant() -> None:
    producer = UsageProducer("unused:0", settings=CommonSettings(), topic="t", producer=FakeKafka())
    with pytest.raises(ValueError, match="judged_at_ms"):
        producer.send_batch([cpu(format_time(kafka_time(now_ms())))], "acme", validated=True)
    producer.close()


def test_kafka_time_is_exact_to_the_millisecond() -> None:
    for ms in (0, 1, 999, JUDGED_MS, 4_102_444_800_001):
        t = kafka_time(ms)
        assert (t - kafka_time(0)) // timedelta(milliseconds=1) == ms
        assert round(t.timestamp() * 1000) == ms
