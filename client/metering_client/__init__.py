"""usage-metering-client: the event models and a client that sends usage over HTTP.

Quickstart::

    from metering_client import MeteringClient

    with MeteringClient("https://metering.example.com", api_key="fl_live_…", source="render-farm") as client:
        client.render_completed(workspace_id="w-1", render_id="r-1", output_duration_seconds=93.5)
    # leaving the block sends what is queued; events not delivered raise DeliveryFailed

See docs/sdk.md. Imports pydantic and httpx only, nothing of the server.
"""

from metering_client.client import AsyncMeteringClient, MeteringClient, QueuePolicy, build_usage_event
from metering_client.events import Event, EventType
from metering_client.kafka import KafkaTransport, connect
from metering_client.prepare import IngestError, InvalidEvent
from metering_client.results import (
    ClientClosed,
    ClientCode,
    ClientMetrics,
    DeliveryFailed,
    EventResult,
    QueueFull,
    Status,
)
from metering_client.retry import Backoff
from metering_client.transport import AsyncHttpTransport, HttpTransport, Outcome, Transport
from metering_client.validation import RejectCode

__version__ = "0.1.0"

__all__ = [
    "AsyncHttpTransport",
    "AsyncMeteringClient",
    "Backoff",
    "ClientClosed",
    "ClientCode",
    "ClientMetrics",
    "DeliveryFailed",
    "Event",
    "EventResult",
    "EventType",
    "HttpTransport",
    "IngestError",
    "InvalidEvent",
    "KafkaTransport",
    "MeteringClient",
    "Outcome",
    "QueueFull",
    "QueuePolicy",
    "RejectCode",
    "Status",
    "Transport",
    "build_usage_event",
    "connect",
]
