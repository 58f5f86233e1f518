"""Console sign-in state (SPEC §5.6): admin passwords, sessions and the lockout.

An account's administrator signs in to ``/console/`` with the account's ``admin`` login and a
password set through ``PUT /v1/accounts/{id}/admin-password``; anyone may also sign in with
an API key (an ``admin`` key is the operator). What this module keeps:

- **Passwords** as scrypt (``hashlib.scrypt``, N=2**14, r=8, p=1: 16 MiB and tens of ms per
  try, OWASP's minimum) with a per-password salt. Hashing runs outside the write transaction,
  so the writer lock is never held for it.
- **Sessions** keyed by the SHA-256 of their token: the token is 256 random bits that only the
  browser's cookie holds, so a copy of the store signs nobody in. A session ends after
  ``SESSION_IDLE`` seconds unused or ``SESSION_MAX`` after sign-in, at sign-out, and when the
  account's password changes. Each carries its own CSRF token.
- **Lockout**: ``MAX_FAILURES`` failed sign-ins of one login within ``FAILURE_WINDOW`` lock it
  for ``LOCKOUT_SECONDS`` (even the right password is refused meanwhile). Failures are kept
  only for logins that exist (and for key attempts per source address), so guessing random
  logins cannot grow the store.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable

import msgspec

from . import accounts
from .errors import ClusterUnavailable, SignInLocked, StoreError, Unauthorized, WeakPassword
from .models import Record
from .store import Store, Txn, reads, writes

log = logging.getLogger("sipedge.console")

PASSWORD_MIN = 12
PASSWORD_MAX = 256
MAX_FAILURES = 5
FAILURE_WINDOW = 15 * 60
LOCKOUT_SECONDS = 15 * 60
SESSION_IDLE = 60 * 60
SESSION_MAX = 12 * 60 * 60
TOUCH_EVERY = 60            # seconds between writes of a session's last use
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class AdminPassword(Record):
    salt: bytes
    digest: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P
    set_at: float = 0.0


class ConsoleSession(Record):
    login: str                      # the admin login, or the key id it signed in with
    csrf: str                       # the token every form of this session carries
    created_at: float
    last_seen: float
    account_id: str | None = None   # a password session: the account it administers
    key_id: str | None = None       # a key session: the key (checked live on every request)
    token_digest: bytes = b""       # the bootstrap admin token's SHA-256 (a changed token ends it)


class SignInFailures(Record):
    failures: list[float] = msgspec.field(default_factory=list)
    locked_until: float = 0.0


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 << 20, dklen=32)


_DUMMY = AdminPassword(salt=b"\0" * 16, digest=b"\0" * 32)   # unknown logins cost the same time


def check_password(password: str, login: str) -> None:
    """:raises WeakPassword: shorter than ``PASSWORD_MIN``, longer than ``PASSWORD_MAX``, or the login."""
    if len(password) < PASSWORD_MIN:
        raise WeakPassword(f"password must be at least {PASSWORD_MIN} characters", field="password")
    if len(password) > PASSWORD_MAX:
        raise WeakPassword(f"password must be at most {PASSWORD_MAX} characters", field="password")
    if password.strip().casefold() == login.casefold():
        raise WeakPassword("password must not be the login", field="password")


def set_admin_password(store: Store, account_id: str, password: str) -> None:
    """Set the console password of ``account_id``'s admin login; its sessions end, its lock lifts.

    :raises NotFound: no such account. :raises WeakPassword: see :func:`check_password`.
    """
    acct = accounts.get(store, account_id)
    check_password(password, acct.admin)
    salt = secrets.token_bytes(16)
    rec = AdminPassword(salt=salt, digest=_scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P), set_at=time.time())

    def op(txn: Txn) -> None:
        acct_now = accounts.get(txn, account_id)
        txn.put("console_passwords", account_id.encode(), rec)
        txn.delete("console_signins", acct_now.admin.encode())
        end_sessions_of(txn, account_id)

    store.write(op)


# ------------------------------------------------------------------ lockout

@reads
def locked_until(txn: Txn, subject: str, now: float) -> float:
    """When the lock of ``subject`` (a login, or ``key@<source>``) ends; 0 if it is not locked."""
    rec = txn.get("console_signins", subject.encode(), SignInFailures)
    return rec.locked_until if rec is not None and rec.locked_until > now else 0.0


def _refuse_if_locked(store: Store, subject: str, now: float) -> None:
    until = locked_until(store, subject, now)
    if until:
        minutes = max(1, round((until - now) / 60))
        raise SignInLocked(f"too many failed sign-ins: try again in {minutes} minute{'s' * (minutes != 1)}",
                           retry_after=max(1, int(until - now)))


@writes()
def note_failure(txn: Txn, subject: str, now: float) -> bool:
    """Count a failed sign-in of ``subject``. :returns: True if this failure locked it."""
    rec = txn.get("console_signins", subject.encode(), SignInFailures) or SignInFailures()
    rec.failures = [t for t in rec.failures if t > now - FAILURE_WINDOW][-(MAX_FAILURES - 1):] + [now]
    locked = len(rec.failures) >= MAX_FAILURES
    if locked:
        rec.locked_until, rec.failures = now + LOCKOUT_SECONDS, []
    txn.put("console_signins", subject.encode(), rec)
    return locked


# ----------------------------------------------------------------- sign-in

def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@writes()
def _open_session(txn: Txn, token: str, session: ConsoleSession, clear: str | None) -> None:
    if clear is not None:
        txn.delete("console_signins", clear.encode())
    now = session.created_at
    _end_where(txn, lambda s: _expired(s, now))       # bounded by the sessions that exist
    txn.put("console_sessions", _token_digest(token), session)


def sign_in_password(store: Store, login: str, password: str, now: float | None = None) -> tuple[str, ConsoleSession]:
    """Check an admin login and password. :returns: (the new session's token, the session).

    :raises SignInLocked: the login is locked (the password is not even checked).
    :raises Unauthorized: unknown login, no password set, or a wrong password (one message for all).
    """
    now = time.time() if now is None else now
    _refuse_if_locked(store, login, now)

    def lookup(txn: Txn) -> tuple[str | None, AdminPassword | None]:
        raw = txn.get_raw("admins", login.encode())
        account_id = bytes(raw).decode() if raw is not None else None
        rec = txn.get("console_passwords", account_id.encode(), AdminPassword) if account_id else None
        return account_id, rec

    account_id, rec = store.read(lookup)
    given = _scrypt(password, (rec or _DUMMY).salt, (rec or _DUMMY).n, (rec or _DUMMY).r, (rec or _DUMMY).p)
    if account_id is None or rec is None or not hmac.compare_digest(given, rec.digest):
        if account_id is not None and note_failure(store, login, now):
            _refuse_if_locked(store, login, now)
        raise Unauthorized("unknown login or wrong password")
    token = secrets.token_urlsafe(32)
    session = ConsoleSession(login=login, csrf=secrets.token_urlsafe(32), created_at=now, last_seen=now,
                             account_id=account_id)
    _open_session(store, token, session, login)
    return token, session


def refuse_if_locked(store: Store, subject: str, now: float | None = None) -> None:
    """:raises SignInLocked: ``subject`` is locked (key sign-ins check ``key@<source>`` first)."""
    _refuse_if_locked(store, subject, time.time() if now is None else now)


def open_key_session(store: Store, key_id: str, *, account_id: str | None = None, token_digest: bytes = b"",
                     now: float | None = None, clear: str | None = None) -> tuple[str, ConsoleSession]:
    """A session for a key the caller has verified (``Gate.authenticate``). :returns: (token, session)."""
    now = time.time() if now is None else now
    token = secrets.token_urlsafe(32)
    session = ConsoleSession(login=key_id, csrf=secrets.token_urlsafe(32), created_at=now, last_seen=now,
                             account_id=account_id, key_id=key_id, token_digest=token_digest)
    _open_session(store, token, session, clear)
    return token, session


# ----------------------------------------------------------------- sessions

def _expired(s: ConsoleSession, now: float) -> bool:
    return now - s.last_seen > SESSION_IDLE or now - s.created_at > SESSION_MAX


def end_sessions_of(txn: Txn, account_id: str) -> None:
    """End every console session of ``account_id`` in this store (its password changed)."""
    _end_where(txn, lambda s: s.account_id == account_id)


def _end_where(txn: Txn, pred: Callable[[ConsoleSession], bool]) -> None:
    decode = txn.store.decoder(ConsoleSession).decode
    for k in [k for k, v in txn.scan("console_sessions") if pred(decode(v))]:
        txn.delete("console_sessions", k)


def session_of(store: Store, token: str, now: float | None = None) -> ConsoleSession | None:
    """The live session of ``token`` (its last use refreshed at most every ``TOUCH_EVERY`` s), or None."""
    if not token or len(token) > 128:
        return None
    now = time.time() if now is None else now
    digest = _token_digest(token)
    session = store.read(lambda txn: txn.get("console_sessions", digest, ConsoleSession))
    if session is None or _expired(session, now):
        return None
    if now - session.last_seen >= TOUCH_EVERY:
        def touch(txn: Txn) -> None:
            if txn.get_raw("console_sessions", digest) is not None:
                session.last_seen = now
                txn.put("console_sessions", digest, session)

        try:
            store.write(touch, sync=False, grows=False)
        except (StoreError, ClusterUnavailable) as exc:    # the last use is written at a later request
            log.info("console: a session's last use not written (%s)", exc)
    return session


@writes(grows=False)
def end_session(txn: Txn, token: str) -> None:
    """Sign-out: the token signs in nothing from now on."""
    txn.delete("console_sessions", _token_digest(token))


@reads
def has_password(txn: Txn, account_id: str) -> bool:
    if txn.get_raw("console_passwords", account_id.encode()) is None:
        accounts.get(txn, account_id)
        return False
    return True


__all__ = ["AdminPassword", "ConsoleSession", "SignInFailures", "check_password", "end_session",
           "has_password", "locked_until", "note_failure", "open_key_session", "refuse_if_locked",
           "session_of", "set_admin_password", "sign_in_password"]
