"""How events travel in Kafka.

One Kafka message carries a *batch* of events of one tenant: the value is a JSON array of
CloudEvents (the CloudEvents JSON batch format, content type
``application/cloudevents-batch+json``), each with its ``tenant`` attribute set; the key is the
tenant, so one tenant's events stay ordered in one partition. Batching is what makes the
per-message cost of Kafka and faust affordable (see ../docs/performance.md). A value holding a
single JSON object (one structured-mode CloudEvent) is accepted too.

Headers: ``content-type``; ``metering-backfill: 1`` marks events sent through the explicit
backfill path (older than 35 days allowed).
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
