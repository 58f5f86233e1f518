"""The control API application: Litestar (msgspec-native, OpenAPI 3.1) served by uvicorn.

Why Litestar: request and response bodies are msgspec Structs validated and encoded
by msgspec itself, and the OpenAPI document is generated from the same types, so
the contract cannot drift from the code (docs/api.md).

Layers, outermost first: request metrics, :class:`~admin_api.auth.Gate` (keys, scopes,
rate limits, audit), Litestar (routing, the scope guard, handlers). Every error is an
RFC 9457 problem (``problems.py``). The app's lifespan runs the webhook deliverer
(``webhooks.py``) and the audit writer in this process, and, with ``api.metrics_listen``,
a listener of its own for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edge import __version__
from edge.cluster.provisioning import Replicator
from edge.config import ApiConfig
from edge.control.errors import DomainError
from edge.control.store import Store

from . import console, openapi, problems
from .auth import AuditLog, Gate, guard
from .metrics import ApiMetrics, build_registry
from .routes import ROUTES
from .schemas import HealthOut
from .webhooks import Deliverer, Settings

log = logging.getLogger("sipedge.api")

_json = msgspec.json.Encoder()
PUBLIC = {"access": "public"}
TAGS = [Tag(name="accounts", description="Accounts and their master balance"),
        Tag(name="profiles", description="SIP profiles, their credentials and registrations"),
        Tag(name="credit", description="Credit, ledgers, auto-recharge, US bundles"),
        Tag(name="numbers", description="Online numbers and business accounts"),
        Tag(name="calls", description="Live calls and operator actions"),
        Tag(name="cdrs", description="Call detail records and their export"),
        Tag(name="rates", description="The rate table and the US bundle exclusions"),
        Tag(name="keys", description="API keys, scopes and the audit log"),
        Tag(name="webhooks", description="Event subscriptions and their delivery log"),
        Tag(name="node", description="Health of the node")]


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

        async def send_wrapper(message: Message) -> None:
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


@get("/healthz", operation_id="health", tags=["node"], summary="Health of the node", opt=PUBLIC,
     description="No key needed. `store` is `full` while the store refuses new work.", sync_to_thread=False)
def healthz(state: State) -> HealthOut:
    state.store.read(lambda txn: None)  # the store answers
    # a full store still serves reads and finishes calls in progress: the node is up (metrics alert on it)
    return HealthOut(status="ok", version=__version__, store="full" if state.store.is_full else "ok")


@get("/metrics", include_in_schema=False, sync_to_thread=True, opt=PUBLIC)
def metrics(state: State) -> Response[bytes]:
    if state.metrics_elsewhere:
        from edge.control.errors import NotFound

        raise NotFound("/metrics is served on api.metrics_listen")
    return Response(generate_latest(state.exposition), media_type=CONTENT_TYPE_LATEST)


@get("/openapi.json", include_in_schema=False, sync_to_thread=False, opt=PUBLIC)
def openapi_json(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    if state.openapi is None:
        state.openapi = _json.encode(openapi.finish(request.app.openapi_schema.to_schema()))
    return Response(state.openapi, media_type=MediaType.JSON)


def _metrics_app(registry: CollectorRegistry, gate: Gate | None) -> ASGIApp:
    """The ``/metrics`` listener of ``api.metrics_listen`` (with ``api.metrics_auth``: a metrics or admin key)."""

    async def refuse(send: Any, status: int, code: str, detail: str) -> None:
        data = problems.body(status, code, detail)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", problems.MEDIA_TYPE.encode())]})
        await send({"type": "http.response.body", "body": data})

    async def app(scope: Scope, receive: Receive, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            await refuse(send, 404, "not_found", f"no such resource: {scope['path']}")
            return
        if gate is not None:
            who = gate.authenticate(dict(scope["headers"]).get(b"authorization", b""))
            if who is None:
                await refuse(send, 401, "unauthorized", "missing, unknown or revoked bearer token")
                return
            if who.scope not in ("metrics", "admin"):
                await refuse(send, 403, "forbidden", f"a {who.scope} key cannot read /metrics")
                return
        data = await asyncio.to_thread(generate_latest, registry)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]})
        await send({"type": "http.response.body", "body": data})

    return app


def create_app(
    store: Store,
    token: str,
    *,
    registrar: str = "sip.edge.test",
    realm: str | None = None,
    registry: CollectorRegistry | None = None,
    settings: ApiConfig | None = None,
    exposition: CollectorRegistry | None = None,
    journal: str | None = None,
    node: str = "",
) -> tuple[ASGIApp, CollectorRegistry]:
    """Build the ASGI app.

    :param store: the node's store.
    :param token: the admin bearer token (must be non-empty).
    :param registrar: the SIP domain printed in profiles.
    :param realm: the digest realm of new credentials (default: ``registrar``).
    :param registry: metrics registry shared with the edge components (created if None).
    :param settings: the ``[api]`` section (rate limits, metrics, webhooks); defaults if None.
    :param exposition: what ``/metrics`` serves (default: ``registry``); a node of several SIP
        workers serves ``registry`` and the workers' metrics added up (metrics.node_exposition).
    :param journal: a cluster node's link to its agent (edge/cluster/link.py): top-ups and
        allocations are appended to the cluster's journal through it, and every provisioning
        write goes through the engine (edge/cluster/provisioning.py).
    :param node: a cluster node's name: its live calls say it, beside the other nodes' (edge/cluster/remote.py).
    :returns: (ASGI app wrapped with the gate and request metrics, the registry).
    """
    if not token:
        raise ValueError("the control API needs a non-empty admin token")
    cfg = settings or ApiConfig()
    if journal is not None:      # a cluster node: what it provisions is the cluster's
        store.replicator = Replicator(store, journal)
    registry = registry or build_registry(store, per_profile=cfg.metrics_per_profile)
    exposition = exposition or registry
    api_metrics = ApiMetrics(registry)
    audit_log = AuditLog(store)
    deliverer = Deliverer(store, Settings(backoff=cfg.webhook_backoff_seconds,
                                          backoff_max=cfg.webhook_backoff_max_seconds,
                                          retry_for=cfg.webhook_retry_hours * 3600, timeout=cfg.webhook_timeout))
    metrics_server: list[Any] = []
    gates: list[Gate] = []

    async def startup() -> None:
        audit_log.start()
        if cfg.webhook_deliver:
            deliverer.start()
        if cfg.metrics_listen:
            import uvicorn

            host, _, port = cfg.metrics_listen.rpartition(":")
            listener = _metrics_app(exposition, gates[0] if cfg.metrics_auth else None)
            server = uvicorn.Server(uvicorn.Config(listener, host=host.strip("[]"), port=int(port),
                                                   log_level="warning", access_log=False, lifespan="off"))
            # the node owns SIGINT/SIGTERM: this second server must not capture them
            server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
            task = asyncio.get_running_loop().create_task(server.serve(), name="metrics-listener")
            metrics_server.extend((server, task))

    async def shutdown() -> None:
        if metrics_server:
            server, task = metrics_server
            server.should_exit = True
            await asyncio.wait_for(task, 5)
        await deliverer.stop()
        await audit_log.stop()

    app = Litestar(
        route_handlers=[healthz, metrics, openapi_json, *ROUTES, console.router()],
        state=State({"store": store, "registrar": registrar, "realm": realm or registrar, "registry": registry,
                     "journal": journal, "node": node, "exposition": exposition, "audit": audit_log,
                     "deliverer": deliverer, "openapi": None, "metrics_elsewhere": bool(cfg.metrics_listen)}),
        guards=[_guard],
        exception_handlers={
            ValidationException: problems.on_validation_error,
            msgspec.ValidationError: problems.on_msgspec_error,
            msgspec.DecodeError: problems.on_decode_error,
            DomainError: problems.on_domain_error,
            HTTPException: problems.on_http_error,
            Exception: problems.on_unexpected,
        },
        on_startup=[startup],
        on_shutdown=[shutdown],
        openapi_config=OpenAPIConfig(
            title="sipedge control API", version=__version__, path="/schema",
            components=Components(security_schemes={"bearer": SecurityScheme(
                type="http", scheme="bearer", description="the admin token or an API key (POST /v1/api-keys)")}),
            security=[{"bearer": []}], tags=TAGS, use_handler_docstrings=False,
        ),
        logging_config=None,
        debug=False,
    )
    public = frozenset({"/healthz"} | (set() if cfg.metrics_auth else {"/metrics"}))
    gate = Gate(app, store, token, audit_log, public=public, rate=cfg.key_rate_limit, burst=cfg.key_rate_burst)
    gates.append(gate)
    return RequestMetrics(console.mount(app, gate), api_metrics), registry   # /console: sessions, not keys


def _guard(conn: Any, handler: Any) -> None:
    if handler.opt.get("access") == "public" or "principal" not in conn.scope.get("state", {}):
        return      # /healthz, /metrics (the Gate let them through without a key), OPTIONS of them
    guard(conn, handler)
