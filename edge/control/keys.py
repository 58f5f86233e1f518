"""Control-API keys and their scopes (SPEC §5.2).

A key is ``key_<16 hex>.<secret>``: the id half names the record (one ``get``), the secret
half is checked against ``HMAC-SHA256(salt, secret)``. Only the salt and the digest are
stored, so the key is shown once, at creation. The secret is 256 random bits: a slow
password hash (scrypt) would protect nothing more and cost milliseconds on every request;
a keyed hash compared in constant time is what GitHub and Stripe tokens use.

Scopes: ``admin`` (everything), ``account`` (one account, read-write or ``read_only``),
``metrics`` (``/metrics`` only). Revoked keys stay listed with ``revoked_at``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import msgspec

from . import accounts
from .errors import Invalid, NotFound
from .models import ApiKey
from .store import Store, Txn, new_id, reads, writes

SCOPES = ("admin", "account", "metrics")
_key = msgspec.msgpack.Decoder(ApiKey)


def _digest(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


@writes()
def create(txn: Txn, *, name: str, scope: str, account_id: str | None = None, read_only: bool = False,
           rate_limit: float | None = None) -> tuple[ApiKey, str]:
    """A new key. :returns: (the record, the key to hand out once).

    :raises Invalid: unknown scope, an account key without an account (or another scope with one).
    :raises NotFound: no such account.
    """
    if scope not in SCOPES:
        raise Invalid(f"scope must be one of {', '.join(SCOPES)}", field="scope")
    if scope == "account":
        if not account_id:
            raise Invalid("an account key needs account_id", field="account_id")
        accounts.get(txn, account_id)
    elif account_id is not None:
        raise Invalid(f"a {scope} key has no account_id", field="account_id")
    if scope != "account" and read_only and scope == "admin":
        raise Invalid("an admin key cannot be read-only: use an account key or a metrics key", field="read_only")
    salt, secret = secrets.token_bytes(16), secrets.token_urlsafe(32)
    rec = ApiKey(id=new_id("key"), name=name, scope=scope, account_id=account_id,  # type: ignore[arg-type]
                 read_only=read_only or scope == "metrics", salt=salt, digest=_digest(salt, secret),
                 created_at=time.time(), rate_limit=rate_limit)
    txn.put("api_keys", rec.id.encode(), rec)
    return rec, f"{rec.id}.{secret}"


def verify(store: Store, token: str) -> ApiKey | None:
    """The live key ``token`` names, or None (unknown, wrong secret, revoked). One ``get``."""
    key_id, sep, secret = token.partition(".")
    if not sep or not key_id.startswith("key_") or len(key_id) > 40:
        return None
    with store.env.begin(db=store.dbs.api_keys) as txn:
        raw = txn.get(key_id.encode())
    if raw is None:
        return None
    rec = _key.decode(raw)
    if rec.revoked_at is not None or not hmac.compare_digest(_digest(rec.salt, secret), rec.digest):
        return None
    return rec


@reads
def get(txn: Txn, key_id: str) -> ApiKey:
    rec = txn.get("api_keys", key_id.encode(), ApiKey)
    if rec is None:
        raise NotFound(f"API key {key_id} not found")
    return rec


@reads
def page(txn: Txn, *, after: str = "", limit: int = 100) -> list[ApiKey]:
    return txn.page_after_key("api_keys", ApiKey, after, limit)


@writes(grows=False)
def revoke(txn: Txn, key_id: str) -> ApiKey:
    """Revoke a key (at once: the next request with it is a 401). Idempotent."""
    rec = get(txn, key_id)
    if rec.revoked_at is None:
        rec.revoked_at = time.time()
        txn.put("api_keys", rec.id.encode(), rec)
    return rec


@writes(sync=False, grows=False)
def touch(txn: Txn, used: dict[str, float]) -> None:
    """Record last-used times (batched by the API, at most every few seconds)."""
    for key_id, at in used.items():
        rec = txn.get("api_keys", key_id.encode(), ApiKey)
        if rec is not None and (rec.last_used_at or 0) < at:
            rec.last_used_at = at
            txn.put("api_keys", rec.id.encode(), rec)


@writes(grows=False)
def revoke_of_account(txn: Txn, account_id: str) -> int:
    """Revoke every key of an account (it is being deleted). :returns: how many."""
    now, n = time.time(), 0
    for rec in list(txn.values("api_keys", ApiKey)):
        if rec.account_id == account_id and rec.revoked_at is None:
            rec.revoked_at = now
            txn.put("api_keys", rec.id.encode(), rec)
            n += 1
    return n
