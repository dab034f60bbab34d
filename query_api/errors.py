"""Errors of the query API, rendered in the shape each document asks for.

Routers raise ``ApiError`` with a neutral ``ErrorCode``; the handlers installed by
``install_error_handlers`` pick the document from the request path and render:

- document 000 (``/api/v1/workspaces/...``): ``{"error": {"code": "NOT_FOUND", "message", "details"}}``,
  with the upper-case codes the document names (``BAD_REQUEST``, ``AUTH_TOKEN_EXPIRED``, ...);
- documents 001, 002, 003 and the generic meter query: ``{"error": {"code", "message", "details"}}``
  with stable snake_case codes (document 003 requires this shape; the others are silent, and one
  shape is what a client of several of them expects);
- document 004 (``/api/v1/usage/``, a Django REST framework API): ``{"detail": "..."}``, and for
  an invalid parameter ``{"<param>": ["..."]}``.

Validation errors never echo the input (a header could hold a credential), and nothing here
logs a request's headers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from query_api.models import DrfError, ErrorEnvelope

log = logging.getLogger(__name__)


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    TOKEN_EXPIRED = "token_expired"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal_error"
    UNAVAILABLE = "service_unavailable"


class ErrorStyle(StrEnum):
    SAAS = "saas"  # document 000
    ENVELOPE = "envelope"  # documents 001, 002, 003, generic meter query
    DRF = "drf"  # document 004
    DEFAULT = "default"  # routes that are not ours (ingest, health): FastAPI's own handlers


_SAAS_CODES = {
    ErrorCode.BAD_REQUEST: "BAD_REQUEST",
    ErrorCode.UNAUTHORIZED: "AUTH_TOKEN_INVALID",
    ErrorCode.TOKEN_EXPIRED: "AUTH_TOKEN_EXPIRED",
    ErrorCode.FORBIDDEN: "FORBIDDEN",
    ErrorCode.NOT_FOUND: "NOT_FOUND",
    ErrorCode.METHOD_NOT_ALLOWED: "METHOD_NOT_ALLOWED",
    ErrorCode.RATE_LIMITED: "RATE_LIMITED",
    ErrorCode.INTERNAL: "INTERNAL_ERROR",
    ErrorCode.UNAVAILABLE: "SERVICE_UNAVAILABLE",
}

#: Path prefix -> the document whose error shape applies.
_STYLES: tuple[tuple[str, ErrorStyle], ...] = (
    ("/api/v1/workspaces/", ErrorStyle.SAAS),
    ("/v2/quota-usages/", ErrorStyle.ENVELOPE),
    ("/v1/workstations/", ErrorStyle.ENVELOPE),
    ("/v1/workspace/", ErrorStyle.ENVELOPE),
    ("/api/v1/usage", ErrorStyle.DRF),
    ("/api/v1/meters/", ErrorStyle.ENVELOPE),
    ("/admin/v1/", ErrorStyle.ENVELOPE),  # the admin API (query_api/routers/admin.py)
)

#: Paths whose storage failure is the documented 500 (document 002); elsewhere it is a 503.
_STORAGE_500_PREFIXES = ("/v1/workstations/",)


def style_for(path: str) -> ErrorStyle:
    for prefix, style in _STYLES:
        if path.startswith(prefix) or path == prefix.rstrip("/"):
            return style
    return ErrorStyle.DEFAULT


class ApiError(Exception):
    """An error answer. ``field`` names the parameter at fault (document 004 keys errors by it)."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        field: str | None = None,
        field_message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details) if details else {}
        self.field = field
        #: The message under ``field`` where errors are keyed by parameter (document 004).
        self.field_message = field_message or message
        self.headers = dict(headers) if headers else {}


class StorageError(Exception):
    """ClickHouse failed to answer (not the caller's fault)."""


def bad_request(message: str, field: str | None = None) -> ApiError:
    details = {"parameter": field} if field else None
    return ApiError(400, ErrorCode.BAD_REQUEST, message, details=details, field=field)


def not_found(message: str = "Not found.") -> ApiError:
    return ApiError(404, ErrorCode.NOT_FOUND, message)


def forbidden(message: str = "You do not have access to this resource.") -> ApiError:
    return ApiError(403, ErrorCode.FORBIDDEN, message)


def render(style: ErrorStyle, err: ApiError) -> JSONResponse:
    if style is ErrorStyle.DRF:
        body: dict[str, Any] = {err.field: [err.field_message]} if err.field else {"detail": err.message}
    else:
        code = _SAAS_CODES[err.code] if style is ErrorStyle.SAAS else err.code.value
        body = {"error": {"code": code, "message": err.message, "details": err.details or {}}}
    return JSONResponse(body, status_code=err.status, headers=err.headers or None)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """A 400 naming the first bad parameter, without echoing what was sent."""
    errors: list[dict[str, Any]] = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ())]
        errors.append(
            {"location": loc[0] if loc else "", "parameter": ".".join(loc[1:]), "message": e.get("msg")}
        )
    first = errors[0] if errors else {"parameter": "", "message": "Invalid request."}
    field = first["parameter"] or None
    message = f"Invalid parameter {field}: {first['message']}" if field else str(first["message"])
    return ApiError(
        400,
        ErrorCode.BAD_REQUEST,
        message,
        details={"errors": errors},
        field=field,
        field_message=str(first["message"]),
    )


_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    429: ErrorCode.RATE_LIMITED,
}


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        style = style_for(request.url.path)
        if style is ErrorStyle.DEFAULT:
            return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers or None)
        return render(style, exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        style = style_for(request.url.path)
        if style is ErrorStyle.DEFAULT:
            return await request_validation_exception_handler(request, exc)
        return render(style, _validation_error(exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        style = style_for(request.url.path)
        if style is ErrorStyle.DEFAULT:
            return await http_exception_handler(request, exc)
        code = _HTTP_CODES.get(
            exc.status_code, ErrorCode.BAD_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL
        )
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        return render(style, ApiError(exc.status_code, code, message, headers=exc.headers))

    async def on_storage_error(request: Request, exc: Exception) -> Response:
        path = request.url.path
        # The cause goes to the log (it names a table or a host, never a credential), not to
        # the client.
        log.error("storage failure on %s: %s", path, type(exc.__cause__ or exc).__name__)
        if path.startswith(_STORAGE_500_PREFIXES):
            err = ApiError(500, ErrorCode.INTERNAL, "Failed to retrieve usage data due to a system error.")
        else:
            err = ApiError(
                503,
                ErrorCode.UNAVAILABLE,
                "Usage storage is unavailable; retry shortly.",
                headers={"Retry-After": "1"},
            )
        style = style_for(path)
        if style is ErrorStyle.DEFAULT:
            return JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers or None)
        return render(style, err)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        err = ApiError(500, ErrorCode.INTERNAL, "Internal server error.")
        style = style_for(request.url.path)
        if style is ErrorStyle.DEFAULT:
            return JSONResponse({"detail": err.message}, status_code=500)
        return render(style, err)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(StorageError, on_storage_error)
    app.add_exception_handler(Exception, on_unexpected)


def error_responses(
    style: ErrorStyle, statuses: Sequence[int], descriptions: Mapping[int, str]
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's error statuses, with the model of its document's shape."""
    model = DrfError if style is ErrorStyle.DRF else ErrorEnvelope
    return {s: {"model": model, "description": descriptions.get(s, "Error")} for s in statuses}
