"""The control API application: Litestar (msgspec-native, OpenAPI 3) served by uvicorn.

Why Litestar: request and response bodies are msgspec Structs validated and encoded
by msgspec itself, and the OpenAPI document is generated from the same types, so
the contract cannot drift from the code (docs/api.md).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from typing import Any

import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edge import __version__
from edge.control.errors import DomainError
from edge.control.store import Store

from .metrics import ApiMetrics, build_registry
from .routes import ROUTES

log = logging.getLogger("sipedge.api")

PUBLIC_PATHS = frozenset({"/healthz", "/metrics"})
_json = msgspec.json.Encoder()
_FIELD_IN_MESSAGE = re.compile(r"field `([^`]+)`")


def _error(status: int, detail: str, field: str | None = None,
           errors: list[dict[str, str]] | None = None) -> Response[bytes]:
    body: dict[str, Any] = {"status_code": status, "detail": detail}
    if field is not None:
        body["field"] = field
    if errors:
        body["errors"] = errors
    return Response(_json.encode(body), status_code=status, media_type=MediaType.JSON)


def _field_of(key: str | None, message: str) -> str:
    """Litestar reports unknown/missing fields under key "data"; the message names the field."""
    match = _FIELD_IN_MESSAGE.search(message)
    if match and key in (None, "data", "body"):
        return match.group(1)
    return key or "body"


def on_validation_error(request: Request, exc: ValidationException) -> Response[bytes]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    if not extra:  # body that is not JSON at all: a syntax error, not a field error
        detail = str(exc.detail)
        return _error(400, detail if "JSON" in detail else f"request body is not valid JSON: {detail}")
    errors = [{"field": _field_of(e.get("key"), str(e.get("message", ""))), "message": str(e.get("message", ""))}
              for e in extra if isinstance(e, dict)]
    first = errors[0]
    return _error(422, f"{first['field']}: {first['message']}", first["field"], errors)


def on_msgspec_error(request: Request, exc: msgspec.ValidationError) -> Response[bytes]:
    text, _, where = str(exc).rpartition(" - at `")
    field = where.rstrip("`").removeprefix("$").lstrip(".") if where else _field_of(None, str(exc))
    message = text or str(exc)
    return _error(422, f"{field}: {message}", field, [{"field": field, "message": message}])


def on_decode_error(request: Request, exc: msgspec.DecodeError) -> Response[bytes]:
    return _error(400, f"body is not valid JSON: {exc}")


def on_domain_error(request: Request, exc: DomainError) -> Response[bytes]:
    """Refusals with a status of their own; a full store is 507, a failing one 503 (the store
    logs the start of such an episode once, not per request)."""
    return _error(exc.status, exc.message, exc.field)


def on_unexpected(request: Request, exc: Exception) -> Response[bytes]:
    """A bug: never a 500 without a log line (with the traceback)."""
    log.error("control API request failed", exc_info=exc,
              extra={"event": "api_error", "method": request.method, "path": request.url.path})
    return _error(500, "internal error (logged)")


def on_http_error(request: Request, exc: HTTPException) -> Response[bytes]:
    if isinstance(exc.__cause__, SerializationException):  # Litestar could not decode the body
        return _error(400, f"request body is not valid JSON: {exc.detail}")
    return _error(exc.status_code, str(exc.detail))


class BearerAuth:
    """Every endpoint but /healthz and /metrics needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP and scope["path"] not in PUBLIC_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.token):
                body = _json.encode({"status_code": 401, "detail": "missing or wrong bearer token"})
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="sipedge"'),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """Counts and times every request by method and route template (not raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            handler = scope.get("route_handler")
            has_paths = handler is not None and getattr(handler, "paths", None)
            route = next(iter(handler.paths)) if has_paths else "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz(state: State) -> dict[str, str]:
    state.store.read(lambda txn: None)  # the store answers
    # a full store still serves reads and finishes calls in progress: the node is up (metrics alert on it)
    return {"status": "ok", "version": __version__, "store": "full" if state.store.is_full else "ok"}


@get("/metrics", include_in_schema=False, sync_to_thread=True)
def metrics(state: State) -> Response[bytes]:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@get("/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_json(request: Request) -> Response[bytes]:
    return Response(_json.encode(request.app.openapi_schema.to_schema()), media_type=MediaType.JSON)


def _operation_id(handler: Any, method: Any, components: list[str | Any]) -> str:
    """``PUT /v1/profiles/{id}/bundles`` -> ``putProfilesIdBundles``: unique per method and path."""
    parts = [str(getattr(c, "name", c)) for c in components if str(getattr(c, "name", c)) != "v1"]
    words = "_".join(parts).replace("-", "_").split("_")
    return str(getattr(method, "value", method)).lower() + "".join(p[:1].upper() + p[1:] for p in words)


def create_app(
    store: Store,
    token: str,
    *,
    registrar: str = "sip.edge.test",
    realm: str | None = None,
    registry: CollectorRegistry | None = None,
) -> tuple[ASGIApp, CollectorRegistry]:
    """Build the ASGI app.

    :param store: the node's store.
    :param token: the admin bearer token (must be non-empty).
    :param registrar: the SIP domain printed in profiles.
    :param realm: the digest realm of new credentials (default: ``registrar``).
    :param registry: metrics registry shared with the edge components (created if None).
    :returns: (ASGI app wrapped with auth and request metrics, the registry).
    """
    if not token:
        raise ValueError("the control API needs a non-empty admin token")
    registry = registry or build_registry(store)
    api_metrics = ApiMetrics(registry)
    app = Litestar(
        route_handlers=[healthz, metrics, openapi_json, *ROUTES],
        state=State({"store": store, "registrar": registrar, "realm": realm or registrar, "registry": registry}),
        exception_handlers={
            ValidationException: on_validation_error,
            msgspec.ValidationError: on_msgspec_error,
            msgspec.DecodeError: on_decode_error,
            DomainError: on_domain_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
        openapi_config=OpenAPIConfig(
            title="sipedge control API", version=__version__, path="/schema",
            components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
            security=[{"bearer": []}],
            operation_id_creator=_operation_id,
        ),
        logging_config=None,
        debug=False,
    )
    return RequestMetrics(BearerAuth(app, token), api_metrics), registry
