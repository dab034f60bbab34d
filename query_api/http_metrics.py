"""HTTP request metrics of every HTTP process: how many requests each route answered with each
status, and how long they took.

The route is the *template* the request matched (``/v1/workstations/{workstation_id}/usage``),
never the path itself, so tenant and resource ids never become label values and the number of
series stays bounded; a request that matched no route is counted under ``<unmatched>``. The
status is the one sent to the client; a request whose handler raised before answering is
counted as 500 (the status the server then sends). A plain ASGI middleware, not Starlette's
``BaseHTTPMiddleware``: it adds no task per request and does not buffer bodies.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "<unmatched>"
# Any other method a client invents is counted as OTHER: label values stay a known, small set.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "metering_http_requests_total",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
DURATION = Histogram(
    "metering_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by method and route template",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def route_template(scope: Scope) -> str:
    """The matched route's path template (set in the scope by the router), or ``<unmatched>``."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class HttpMetrics:
    """ASGI middleware counting every HTTP request (``app.add_middleware(HttpMetrics)``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app starts an answer: an exception escaping it becomes a 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            # The router wrote the matched route into this same scope dict on the way in.
            method = scope.get("method", "")
            method = method if method in METHODS else "OTHER"
            route = route_template(scope)
            REQUESTS.labels(method, route, str(status)).inc()
            DURATION.labels(method, route).observe(time.perf_counter() - started)
