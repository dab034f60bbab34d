"""What became of each event, the client's errors, and the metrics a service can read.

Every event handed to a client ends in exactly one ``EventResult``: delivered (``accepted``, or
``duplicate`` when an earlier attempt already got it through) or not (``rejected`` by the ingest,
with the ingest's code, or given up by the client, with one of ``ClientCode``). Nothing is dropped
without a result: the failures reach the ``on_failure`` callback as they happen and are raised by
``flush()``/``close()`` as ``DeliveryFailed``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from metering_client.prepare import IngestError


class Status(StrEnum):
    ACCEPTED = "accepted"  # in Kafka: it will be counted
    DUPLICATE = "duplicate"  # the id was delivered before (e.g. by the attempt a retry repeats)
    REJECTED = "rejected"  # not sent by the ingest: ``code`` says why
    FAILED = "failed"  # the client gave up on it: ``code`` is a ``ClientCode``


class ClientCode:
    """Codes of events the client could not deliver (the ingest's codes are in ``RejectCode``)."""

    #: Dropped from a full queue (``QueuePolicy.DROP_OLDEST``).
    QUEUE_FULL = "queue_full"
    #: Retried until ``max_retry_s`` without success (API down, 503s, 429s, connection errors).
    DELIVERY_FAILED = "delivery_failed"
    #: Still queued when ``close(timeout)`` ran out of time.
    CLIENT_CLOSED = "client_closed"
    # An error answer for the whole request carries its own code: ``unauthorized`` (401: unknown
    # or revoked key), ``payload_too_large``, ``too_many_events``, ``unsupported_media_type``…


@dataclass(frozen=True)
class EventResult:
    id: str
    status: Status
    code: str | None = None
    message: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status in (Status.ACCEPTED, Status.DUPLICATE)


class DeliveryFailed(IngestError):
    """Events that were not delivered since the last ``flush()``: rejected or given up."""

    def __init__(self, failures: list[EventResult], omitted: int = 0) -> None:
        self.failures = failures
        self.omitted = omitted  # failures beyond the ones kept (``max_kept_failures``)
        codes = Counter(f.code or f.status.value for f in failures)
        summary = ", ".join(f"{code}: {n}" for code, n in sorted(codes.items()))
        shown = ", ".join(f.id for f in failures[:10]) + (" …" if len(failures) > 10 else "")
        more = f" (+{omitted} not kept)" if omitted else ""
        super().__init__(f"{len(failures) + omitted} event(s) not delivered ({summary}){more}: {shown}")

    @property
    def failed_ids(self) -> list[str]:
        return [f.id for f in self.failures]


class QueueFull(IngestError):
    """``emit`` on a full queue with ``QueuePolicy.RAISE`` (or ``BLOCK`` past its timeout)."""


class ClientClosed(IngestError):
    """``emit`` after ``close()``."""


@dataclass(frozen=True)
class ClientMetrics:
    """A snapshot of a client's counters (``client.metrics``); all but the last two are totals."""

    #: Events delivered: accepted, or answered ``duplicate`` (delivered before).
    sent: int = 0
    #: Of ``sent``, the ones answered ``duplicate``.
    duplicates: int = 0
    #: Events not delivered, by code: the ingest's (``out_of_scope``, ``invalid_event``…, also
    #: those refused locally by ``emit``) and the client's (``queue_full``, ``delivery_failed``…).
    rejected: dict[str, int] = field(default_factory=dict)
    #: Requests sent again after a 429, a 5xx or a connection error.
    retried: int = 0
    #: Requests sent (first attempts and retries).
    requests: int = 0
    #: Events waiting in the queue now.
    queued: int = 0
    #: Events in the request being sent (or retried) now.
    in_flight: int = 0
