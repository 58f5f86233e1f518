"""Console sessions in cookies, CSRF tokens, and who a session is (docs/console.md).

The session cookie holds only a random token (``edge/control/console_auth.py`` keeps its
SHA-256). It is ``HttpOnly`` and ``SameSite=Strict``, ``Path=/console``; over TLS (the
request's scheme is ``https``, also behind a proxy that uvicorn trusts for
``X-Forwarded-Proto``) it is ``Secure`` and named with the ``__Host-`` prefix, so no
plain-HTTP page or other host can set or read it. On plain HTTP (the default
``127.0.0.1:8080``) a ``Secure`` cookie would never come back, so it is sent without it:
that is only safe on loopback or a private network, as docs/console.md says.

CSRF: every form of a session carries the session's own CSRF token and every POST must send
it back (compared in constant time); a POST whose ``Origin`` is another host is refused too.
The sign-in form, before any session exists, uses a double-submit token (a cookie and a
hidden field that must match).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from edge.control import console_auth, keys
from edge.control.console_auth import ConsoleSession
from edge.control.errors import NotFound
from edge.control.store import Store

from ..auth import BOOTSTRAP, Principal

SESSION = "sipedge_console"
SIGN_IN = "sipedge_console_signin"


def is_tls(scope: Any) -> bool:
    return scope.get("scheme") == "https"


def cookie_name(scope: Any, base: str) -> str:
    return f"__Host-{base}" if is_tls(scope) else base


def cookie_header(scope: Any, base: str, value: str, *, max_age: int | None = None) -> str:
    """A ``Set-Cookie`` value (``max_age=0`` deletes). ``__Host-`` cookies must have ``Path=/``."""
    tls = is_tls(scope)
    parts = [f"{cookie_name(scope, base)}={value}", "Path=/" if tls else "Path=/console", "HttpOnly",
             "SameSite=Strict"]
    if tls:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def cookie_of(cookies: dict[str, str], scope: Any, base: str) -> str:
    return cookies.get(cookie_name(scope, base), "")


def new_sign_in_token() -> str:
    return secrets.token_urlsafe(24)


def same_token(given: str, expected: str) -> bool:
    return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def origin_ok(headers: Any) -> bool:
    """A browser's ``Origin`` (when it sends one) must name this host."""
    origin = headers.get("origin")
    if not origin or origin == "null":
        return origin != "null"
    host = headers.get("host", "")
    return origin.split("://", 1)[-1].rstrip("/") == host


def bootstrap_digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def principal_of_session(store: Store, session: ConsoleSession, admin_token: bytes) -> Principal | None:
    """Who the session acts as, checked on every request: a revoked key or a changed admin token
    ends its sessions at once; an account deleted since answers 404 through the API."""
    if session.key_id is None:
        if session.account_id is None:
            return None
        return Principal(f"console:{session.login}", "account", session.account_id, rate_limit=0.0)
    if session.key_id == BOOTSTRAP:
        if not hmac.compare_digest(session.token_digest, bootstrap_digest(admin_token)):
            return None
        return Principal(BOOTSTRAP, "admin", rate_limit=0.0)
    try:
        rec = keys.get(store, session.key_id)
    except NotFound:
        return None
    if rec.revoked_at is not None or rec.scope == "metrics":
        return None
    return Principal(rec.id, rec.scope, rec.account_id, rec.read_only, rec.rate_limit)


def session_from(store: Store, cookies: dict[str, str], scope: Any) -> tuple[str, ConsoleSession] | None:
    token = cookie_of(cookies, scope, SESSION)
    session = console_auth.session_of(store, token) if token else None
    return (token, session) if session is not None else None
