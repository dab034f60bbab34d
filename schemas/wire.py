"""How events travel in Kafka.

One Kafka message carries a *batch* of events of one tenant: the value is a JSON array of
CloudEvents (the CloudEvents JSON batch format, content type
``application/cloudevents-batch+json``), each with its ``tenant`` attribute set; the key is the
tenant, so one tenant's events stay ordered in one partition. Batching is what makes the
per-message cost of Kafka and faust affordable (see ../docs/performance.md). A value holding a
single JSON object (one structured-mode CloudEvent) is accepted too.

Headers: ``content-type``; ``metering-backfill: 1`` marks events sent through the explicit
backfill path (older than 35 days allowed). The message timestamp (CreateTime) is the instant the
producer judged the events' time window by; the aggregator judges by the same instant.

Two topics: usage events on the usage topic (``metering.events``), lifecycle events on the control
topic (``metering.events.control``), which only administrators write. The aggregator reads both
and tells them apart by *lane*: a usage partition ``p`` is lane ``p``; control partition ``p`` is
lane ``-1 - p`` (so -1, -2, …). The lane is what ``events_raw.src_partition`` and every
watermark are keyed by, so the two topics' offsets never mix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

CONTENT_TYPE_BATCH = "application/cloudevents-batch+json"
HEADER_CONTENT_TYPE = "content-type"
HEADER_BACKFILL = "metering-backfill"
# Dead-letter headers: why, and where the original message was.
HEADER_DLQ_REASON = "metering-dlq-reason"
HEADER_DLQ_CODE = "metering-dlq-code"
HEADER_DLQ_SOURCE = "metering-dlq-source"  # "topic/partition/offset[/index]"
#: Kafka's default max message size is 1 MiB; stay under it with room for headers.
MAX_MESSAGE_BYTES = 900 * 1024


def control_lane(partition: int) -> int:
    """The lane of a control-topic partition: negative, so never a usage partition."""
    return -1 - partition


def is_control_lane(lane: int) -> bool:
    return lane < 0


def lane_partition(lane: int) -> int:
    """The Kafka partition of ``lane`` (in its own topic)."""
    return -1 - lane if lane < 0 else lane


def encode_batch(events: Iterable[Mapping[str, Any]]) -> bytes:
    return orjson.dumps(list(events))


def decode_value(value: bytes) -> list[Any]:
    """The events of one message, still unvalidated. Raises ``orjson.JSONDecodeError``."""
    parsed = orjson.loads(value)
    return parsed if isinstance(parsed, list) else [parsed]


def batch_headers(backfill: bool = False) -> list[tuple[str, bytes]]:
    headers = [(HEADER_CONTENT_TYPE, CONTENT_TYPE_BATCH.encode())]
    if backfill:
        headers.append((HEADER_BACKFILL, b"1"))
    return headers
