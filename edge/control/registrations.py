"""Registrar bindings (SPEC §4.1): one record per profile and contact, with its expiry.

Bindings are call-path soft state: they commit without an fsync (``sync=False``), a PBX
re-registers after an OS crash. Expired bindings are never returned, and purged at start.
"""

from __future__ import annotations

import time

from .models import Registration
from .store import SEP, Txn, key, reads, writes


def binding_key(profile_id: str, contact: str) -> bytes:
    return key(profile_id, contact)


@reads
def binding(txn: Txn, profile_id: str, contact: str) -> Registration | None:
    """The binding of ``contact`` (expired or not)."""
    return binding_at(txn, binding_key(profile_id, contact))


# The registrar's write, per contact of a REGISTER: one key for the read and the write, in the
# write transaction it holds (no decorator, no second key).

def binding_at(txn: Txn, k: bytes) -> Registration | None:
    """The binding at ``binding_key`` ``k`` (expired or not)."""
    return txn.get("registrations", k, Registration)


def save_at(txn: Txn, k: bytes, reg: Registration) -> None:
    """:func:`save` of ``reg`` whose ``binding_key`` is ``k``, in the write transaction ``txn``."""
    txn.put("registrations", k, reg)


def remove_at(txn: Txn, k: bytes) -> bool:
    """:func:`remove` at ``binding_key`` ``k``, in the write transaction ``txn``."""
    return txn.delete("registrations", k)


@writes(sync=False)
def save(txn: Txn, reg: Registration) -> None:
    txn.put("registrations", binding_key(reg.profile_id, reg.contact), reg)


@writes(sync=False, grows=False)
def remove(txn: Txn, profile_id: str, contact: str) -> bool:
    """:returns: True if there was such a binding."""
    return txn.delete("registrations", binding_key(profile_id, contact))


@writes(grows=False)
def remove_all(txn: Txn, profile_id: str) -> int:
    """Remove every binding of a profile; :returns: how many."""
    return txn.delete_where("registrations", profile_id.encode() + SEP)


@reads
def live(txn: Txn, profile_id: str | None, now: float | None = None) -> list[Registration]:
    """Unexpired bindings of a profile (of every profile if None), in (profile, contact) order."""
    now = time.time() if now is None else now
    prefix = profile_id.encode() + SEP if profile_id is not None else b""
    decode = txn.store.decoder(Registration).decode
    out = []
    for _, raw in txn.scan("registrations", prefix):  # (not through values(): one generator less per REGISTER)
        reg = decode(raw)
        if reg.expires_at > now:
            out.append(reg)
    return out


@writes(grows=False)
def purge_expired(txn: Txn, now: float | None = None) -> int:
    """Delete expired bindings; :returns: how many."""
    now = time.time() if now is None else now
    decode = txn.store.decoder(Registration).decode
    return txn.delete_where("registrations", b"", lambda v: decode(v).expires_at <= now)


@reads
def counts(txn: Txn, now: float | None = None) -> dict[str, int]:
    """Unexpired bindings per profile id (metrics)."""
    now = time.time() if now is None else now
    out: dict[str, int] = {}
    for r in txn.values("registrations", Registration):
        if r.expires_at > now:
            out[r.profile_id] = out.get(r.profile_id, 0) + 1
    return out
