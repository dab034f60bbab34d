"""Pure aggregator logic: decoding, rejects, dedupe structures, lifecycle folding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from aggregators.decode import SourceMessage, decode_message
from aggregators.projection import LifecycleEvent, fold
from schemas.events import EntityKind, EventType
from schemas.validation import RejectCode

NOW = datetime.now(UTC)


def msg(events: list, key: bytes | None = b"t1", ts: datetime = NOW, headers=()) -> SourceMessage:
    return SourceMessage(0, 5, int(ts.timestamp() * 1000), key, orjson.dumps(events), headers)


def good(i: int, tenant: str = "t1", t: datetime = NOW) -> dict:
    return {
        "specversion": "1.0",
        "id": f"e{i}",
        "source": "s",
        "type": "egress.download",
        "tenant": tenant,
        "time": t.isoformat(),
        "data": {"workspace_id": "w", "artifact_id": "a", "bytes": i},
    }


def test_one_bad_event_does_not_take_its_neighbours_down() -> None:
    d = decode_message(msg([good(1), {"nonsense": True}, good(2)]))
    assert [r.event_id for r in d.rows] == ["e1", "e2"]
    assert [(r.index, r.code) for r in d.rejects] == [(1, RejectCode.INVALID_EVENT)]
    assert orjson.loads(d.rejects[0].original) == {"nonsense": True}


def test_invalid_json_rejects_the_message_with_its_bytes() -> None:
    m = SourceMessage(0, 1, 0, b"t", b"{not json", ())
    d = decode_message(m)
    assert (
        d.rows == []
        and d.rejects[0].code == RejectCode.INVALID_JSON
        and d.rejects[0].original == b"{not json"
    )


def test_time_is_judged_against_the_message_timestamp_not_now() -> None:
    old = NOW - timedelta(days=40)
    # received 40 days ago, event from then: fine (a replay today takes the same decision)
    assert decode_message(msg([good(1, t=old)], ts=old)).rows
    assert decode_message(msg([good(1, t=old)])).rejects[0].code == RejectCode.TOO_OLD
    assert decode_message(msg([good(1, t=old)], headers=[("metering-backfill", b"1")])).rows


def test_tenant_must_match_the_key() -> None:
    d = decode_message(msg([good(1, tenant="t2")], key=b"t1"))
    assert d.rejects[0].code == RejectCode.TENANT_MISMATCH


def test_unknown_type_code() -> None:
    e = good(1)
    e["type"] = "mystery.event"
    assert decode_message(msg([e])).rejects[0].code == RejectCode.UNKNOWN_TYPE


def test_fold_orders_by_event_time_not_arrival() -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    evs = [
        LifecycleEvent(
            EventType.MEMBER_DEACTIVATED,
            t0 + timedelta(hours=2),
            {"workspace_id": "w", "member_id": "m"},
            0,
            9,
        ),
        LifecycleEvent(
            EventType.MEMBER_JOINED, t0, {"workspace_id": "w", "member_id": "m", "email": "a@b.c"}, 0, 10
        ),
    ]
    s = fold("t", EntityKind.MEMBER, "w/m", evs)
    assert s is not None and s.status == "inactive" and s.email == "a@b.c" and s.row()["version"] == 10
    ws = fold(
        "t",
        EntityKind.WORKSPACE,
        "w",
        [
            LifecycleEvent(
                EventType.WORKSPACE_CREATED,
                t0,
                {"workspace_id": "w", "name": "W", "tier": "pro", "billing_anchor_day": 3},
                0,
                1,
            ),
            LifecycleEvent(
                EventType.VIRTUAL_KEY_EXTRA_PURCHASED, t0, {"workspace_id": "w", "count": 2}, 0, 2
            ),
            LifecycleEvent(
                EventType.VIRTUAL_KEY_EXTRA_PURCHASED, t0, {"workspace_id": "w", "count": 5}, 0, 3
            ),
        ],
    )
    assert ws is not None and ws.attrs == {"billing_anchor_day": 3, "extra_vks": 7}
