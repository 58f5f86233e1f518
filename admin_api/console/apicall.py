"""The console's one way to read and change anything: a request to the JSON API, in process.

Every console action is an ASGI request to the control API's own Litestar app (below the
:class:`~admin_api.auth.Gate`, with the session's :class:`~admin_api.auth.Principal` already
resolved), so it runs the same route, guard, msgspec validation, domain function and
problem mapping as ``curl`` would: a refusal comes back as the same RFC 9457 problem with
the same ``code`` and ``detail``, which the page shows. There is no second rule set.

What the Gate does for a bearer key and the console must do itself, it does here with the
Gate's own rules: a read-only key may not write (403, the Gate's message), and every write is
recorded in the audit log with the key id of the session (``console:<login>`` for a
password session).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import msgspec

from edge.control.models import AuditEntry

from ..auth import WRITE_METHODS, Principal

_json = msgspec.json.Encoder()


@dataclass(slots=True)
class Answer:
    """The API's answer: ``data`` is the decoded JSON body (a problem on errors)."""

    status: int
    data: Any
    headers: dict[str, str]
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def code(self) -> str:
        return str(self.data.get("code", "")) if isinstance(self.data, dict) and not self.ok else ""

    @property
    def detail(self) -> str:
        """The problem's ``detail`` (the API's message), or ``""`` on success."""
        return str(self.data.get("detail", "")) if isinstance(self.data, dict) and not self.ok else ""


def _request(conn_scope: Any, principal: Principal, method: str, path: str, payload: bytes,
             query: dict[str, str] | None, has_body: bool) -> tuple[dict[str, Any], Any]:
    """The ASGI scope and ``receive`` of one in-process API request."""
    qs = urlencode({k: v for k, v in (query or {}).items() if v not in (None, "")}).encode()
    headers = [(b"host", b"console.internal"), (b"accept", b"application/json")]
    if has_body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": conn_scope.get("scheme", "http"), "server": conn_scope.get("server"),
        "client": conn_scope.get("client"), "root_path": "", "path": path, "raw_path": path.encode(),
        "query_string": qs, "headers": headers, "state": {"principal": principal},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:    # the client never leaves early: a streamed answer waits here until it is done
            await asyncio.Event().wait()
        sent = True
        return {"type": "http.request", "body": payload, "more_body": False}

    return scope, receive


async def stream(app: Any, conn_scope: Any, principal: Principal, path: str,
                 query: dict[str, str]) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
    """A GET whose body is streamed (the CDR export): :returns: (status, headers, the body's chunks).
    At most a few chunks wait in memory: the API's generator is paced by the reader."""
    scope, receive = _request(conn_scope, principal, "GET", path, b"", query, False)
    started: asyncio.Future[tuple[int, dict[str, str]]] = asyncio.get_running_loop().create_future()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.set_result((message["status"], {k.decode().lower(): v.decode()
                                                    for k, v in message.get("headers", [])}))
        elif message["type"] == "http.response.body":
            if message.get("body"):
                await chunks.put(message["body"])
            if not message.get("more_body", False):
                await chunks.put(None)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            if not started.done():
                started.set_result((500, {}))
                await chunks.put(None)

    task = asyncio.get_running_loop().create_task(run(), name="console-export")
    status, headers = await started

    async def body() -> AsyncIterator[bytes]:
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
        finally:
            if not task.done():
                task.cancel()

    return status, headers, body()


def _refusal(status: int, code: str, detail: str, path: str) -> Answer:
    return Answer(status, {"type": f"urn:sipedge:error:{code}", "status": status, "code": code, "detail": detail,
                           "instance": path}, {})


async def call(app: Any, conn_scope: Any, principal: Principal, method: str, path: str, *,
               body: Any = None, query: dict[str, str] | None = None, audit: Any = None) -> Answer:
    """Send ``method path`` to the API app as ``principal`` and collect the answer.

    :param app: the control API's Litestar app. :param conn_scope: the console request's ASGI
        scope (its client address and server are reused). :param audit: the app's ``AuditLog``.
    """
    if principal.read_only and method in WRITE_METHODS:
        return _refusal(403, "forbidden", "this key is read-only", path)
    payload = b"" if body is None else _json.encode(body)
    scope, receive = _request(conn_scope, principal, method, path, payload, query, body is not None)

    status, out_headers, chunks = 500, {}, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers.update({k.decode().lower(): v.decode() for k, v in message.get("headers", [])})
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    raw = b"".join(chunks)
    if method in WRITE_METHODS and audit is not None:
        client = conn_scope.get("client")
        audit.add(AuditEntry(seq=0, ts=time.time(), key_id=principal.key_id, method=method, path=path,
                             status=status, source=f"{client[0]}:{client[1]}" if client else "",
                             account_id=scope["state"].get("audit_account") or principal.account_id,
                             request_id=uuid.uuid4().hex[:16]))
    ctype = out_headers.get("content-type", "")
    data: Any = None
    if raw and "json" in ctype:
        data = msgspec.json.decode(raw)
    return Answer(status, data, out_headers, raw)
