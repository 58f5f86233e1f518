"""Who is calling, what they may see, and the record of what they wrote (SPEC §5.2).

:class:`Gate` is the outermost ASGI middleware of the control API: it resolves the bearer
token to a :class:`Principal` (the configured admin token, or an API key of
``edge/control/keys.py``), refuses what the key's scope never allows (401, 403, 429 as
problem+json), and records every write in the audit log after its answer.

Per-resource scoping is :func:`guard` (a Litestar guard on every route): an account key
sees only its own account, and another account's ids answer 404 exactly like ids that
do not exist, so a key cannot probe for them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers import BaseRouteHandler
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from edge.control import audit, channels, keys, profiles
from edge.control.errors import Forbidden, NotFound
from edge.control.models import AuditEntry
from edge.control.store import Store

from . import problems

log = logging.getLogger("sipedge.api")

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BOOTSTRAP = "bootstrap"        # the key id of the configured admin token in the audit log


@dataclass(slots=True, frozen=True)
class Principal:
    key_id: str
    scope: str                  # admin | account | metrics
    account_id: str | None = None
    read_only: bool = False
    rate_limit: float | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def principal_of(conn: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    p = conn.scope.get("state", {}).get("principal")
    assert isinstance(p, Principal), "Gate runs before every route"
    return p


def note_account(conn: ASGIConnection[Any, Any, Any, Any], account_id: str | None) -> None:
    """The account a request touched (for the audit log)."""
    if account_id:
        conn.scope.setdefault("state", {})["audit_account"] = account_id


class _Buckets:
    """Token buckets per key (rate limiting, 429)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._b: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, rate: float | None) -> float:
        """:returns: 0 if allowed, else seconds until a token is back."""
        rate = self.rate if rate is None else rate
        if rate <= 0:
            return 0.0
        burst = max(self.burst if rate == self.rate else 2 * rate, 1.0)
        now = time.monotonic()
        tokens, last = self._b.get(key, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._b[key] = (tokens, now)
            return (1.0 - tokens) / rate
        if len(self._b) > 100_000:
            self._b.clear()
        self._b[key] = (tokens - 1.0, now)
        return 0.0


class AuditLog:
    """Buffers audit entries and key last-use times; a task writes them in batches
    (one write transaction for many requests, never on the event loop)."""

    def __init__(self, store: Store, interval: float = 0.2) -> None:
        self.store = store
        self.interval = interval
        self._entries: list[AuditEntry] = []
        self._used: dict[str, float] = {}
        self._last_touch = 0.0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def add(self, entry: AuditEntry) -> None:
        self._entries.append(entry)

    def used(self, key_id: str) -> None:
        self._used[key_id] = time.time()

    async def flush(self) -> None:
        async with self._lock:
            entries, self._entries = self._entries, []
            if entries:
                try:
                    await asyncio.to_thread(audit.record, self.store, entries)
                except Exception:
                    log.exception("audit entries could not be written; kept for the next try")
                    self._entries[:0] = entries
            if self._used and time.monotonic() - self._last_touch >= 5.0:
                used, self._used = self._used, {}
                self._last_touch = time.monotonic()
                try:
                    await asyncio.to_thread(keys.touch, self.store, used)
                except Exception:
                    log.exception("key last-use times could not be written")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="api-audit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._last_touch = 0.0
        await self.flush()


class Gate:
    """Authenticate, limit and audit every request (see the module docstring).

    :param token: the configured admin token (an ``admin`` key with id ``bootstrap``).
    :param public: paths that need no token (``/healthz``; ``/metrics`` unless metrics_auth).
    """

    def __init__(self, app: ASGIApp, store: Store, token: str, audit_log: AuditLog, *, public: frozenset[str],
                 rate: float, burst: float) -> None:
        self.app = app
        self.store = store
        self.token = token.encode()
        self.audit = audit_log
        self.public = public
        self.buckets = _Buckets(rate, burst)

    def authenticate(self, header: bytes) -> Principal | None:
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return None
        if hmac.compare_digest(token, self.token):
            return Principal(BOOTSTRAP, "admin", rate_limit=0.0)
        try:
            rec = keys.verify(self.store, token.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        if rec is None:
            return None
        self.audit.used(rec.id)
        return Principal(rec.id, rec.scope, rec.account_id, rec.read_only, rec.rate_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        headers = dict(scope["headers"])
        principal = self.authenticate(headers.get(b"authorization", b""))
        if principal is None:
            await _refuse(send, 401, "unauthorized", "missing, unknown or revoked bearer token", path,
                          [(b"www-authenticate", b'Bearer realm="sipedge"')])
            return
        if (principal.scope == "metrics") != (path == "/metrics") and not (principal.is_admin and path == "/metrics"):
            await _refuse(send, 403, "forbidden", f"a {principal.scope} key cannot use {path}", path)
            return
        if principal.read_only and method in WRITE_METHODS:
            await _refuse(send, 403, "forbidden", "this key is read-only", path)
            return
        wait = self.buckets.allow(principal.key_id, principal.rate_limit)
        if wait:
            await _refuse(send, 429, "rate_limited", "too many requests for this key; retry later", path,
                          [(b"retry-after", str(max(1, round(wait + 0.5))).encode())])
            return
        scope.setdefault("state", {})["principal"] = principal
        if method == "OPTIONS":     # every method of the path (Litestar lists one handler's)
            allowed = allowed_methods(self.app, path)
            if allowed:
                await send({"type": "http.response.start", "status": 204, "headers": [
                    (b"allow", ", ".join(allowed).encode()), (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
        if method not in WRITE_METHODS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            client = scope.get("client")
            self.audit.add(AuditEntry(
                seq=0, ts=time.time(), key_id=principal.key_id, method=method, path=path, status=status,
                source=f"{client[0]}:{client[1]}" if client else "",
                account_id=scope.get("state", {}).get("audit_account") or principal.account_id,
                request_id=uuid.uuid4().hex[:16]))


_TEMPLATES: list[tuple[re.Pattern[str], frozenset[str]]] = []


def allowed_methods(app: Any, path: str) -> list[str]:
    """The methods the routes of ``path`` answer (for ``Allow``), OPTIONS included."""
    if not _TEMPLATES:
        from .routes import ROUTES

        for handler in ROUTES:
            for template in handler.paths:
                rx = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")
                _TEMPLATES.append((rx, frozenset(handler.http_methods)))
    methods = {m for rx, ms in _TEMPLATES if rx.match(path) for m in ms}
    return sorted(methods | {"OPTIONS"}) if methods else []


async def _refuse(send: Send, status: int, code: str, detail: str, path: str,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = problems.body(status, code, detail, instance=path)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", problems.MEDIA_TYPE.encode()), (b"content-length", str(len(data)).encode()),
        *(extra or [])]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


# ------------------------------------------------------------------ scoping

def guard(conn: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Every route: ``opt["access"]`` ``"admin"`` (admin keys only, 403 otherwise) or ``"account"``
    (the default: an account key reaches only its account's ids; others are 404)."""
    p = principal_of(conn)
    if handler.opt.get("access") == "admin":
        if not p.is_admin:
            raise Forbidden("this operation needs an admin key")
        return
    params = conn.path_params
    account_id = params.get("account_id")
    profile_id = params.get("profile_id")
    call_id = params.get("call_id")
    owner: str | None = account_id
    if profile_id is not None:
        prof = profiles.find(conn.app.state.store, profile_id)
        owner = prof.account_id if prof is not None else None
        if prof is None or (not p.is_admin and owner != p.account_id):
            raise NotFound(f"profile {profile_id} not found")
    elif call_id is not None:
        live = channels.find_call(conn.app.state.store, call_id)
        if live is None and (elsewhere := channels.find_remote(conn.app.state.store, call_id)) is not None:
            live = elsewhere.call       # a cluster node: another node carries it
        prof = profiles.find(conn.app.state.store, live.profile_id) if live is not None else None
        owner = prof.account_id if prof is not None else None
        if not p.is_admin and owner != p.account_id:
            from edge.control.errors import CallNotFound

            raise CallNotFound(f"no live call {call_id}")
    elif account_id is not None and not p.is_admin and account_id != p.account_id:
        raise NotFound(f"account {account_id} not found")
    note_account(conn, owner)
