"""Channels and live calls (SPEC §3, §4.2 rule 4): each call holds one channel of its profile.

``channels[profile id]`` counts the channels in use; ``calls[profile id \\0 call id]`` holds
the :class:`LiveCall` (its reservation, funded time, rate and legs) until it is settled.
Both change in the same transaction, and LMDB has one writer at a time across processes,
so two calls can never both take the last channel. A crash leaves the live calls behind
for recovery (:meth:`edge.control.credit.CreditEngine.recover`).

Live-call bookkeeping is call-path soft state: ``sync=False``. Taking a channel is new
work (``grows=True``: refused when the store is full); updating and releasing finish it.
"""

from __future__ import annotations

from typing import TypeVar

from . import profiles, webhooks
from .models import LiveCall, Profile, RemoteCall
from .store import SEP, Txn, key, reads, writes
from .times import rfc3339

T = TypeVar("T")


def call_key(profile_id: str, call_id: str) -> bytes:
    return key(profile_id, call_id)


@writes(sync=False)
def take(txn: Txn, profile_id: str, call: LiveCall) -> bool:
    """Seize a channel of the profile for ``call`` and store the call.

    :returns: False if all the profile's channels are busy (nothing written).
    :raises NotFound: no such profile.
    """
    prof = profiles.get(txn, profile_id)
    k = prof.id.encode()
    in_use = txn.get_u64("channels", k)
    if in_use >= prof.channels:
        return False
    txn.put_u64("channels", k, in_use + 1)
    txn.put("calls", call_key(prof.id, call.call_id), call)
    # webhook events commit with the seizure (a transactional outbox: edge/control/webhooks.py)
    webhooks.emit(txn, prof.account_id, "call.started", call.call_id, lambda: {
        "call_id": call.call_id, "profile_id": prof.id, "account_id": prof.account_id,
        "direction": call.direction, "caller": call.caller, "callee": call.callee,
        "started_at": rfc3339(call.started_at)}, now=call.started_at)
    if in_use + 1 >= prof.channels:
        webhooks.emit(txn, prof.account_id, "channels.exhausted", prof.id, {
            "profile_id": prof.id, "account_id": prof.account_id, "channels": prof.channels,
            "channels_in_use": in_use + 1, "call_id": call.call_id}, now=call.started_at)
    return True


@writes(sync=False, grows=False)
def update(txn: Txn, call: LiveCall) -> None:
    """Store the call's new state (answer, reservation, legs)."""
    txn.put("calls", call_key(call.profile_id, call.call_id), call)


@writes(sync=False, grows=False)
def release(txn: Txn, profile_id: str, call_id: str) -> LiveCall | None:
    """Free the channel of ``call_id`` and forget the call (idempotent: a second release does nothing).

    :returns: the call as stored, or None if it was not live.
    """
    ck = call_key(profile_id, call_id)
    call = txn.get("calls", ck, LiveCall)
    if call is None:
        return None
    txn.delete("calls", ck)
    txn.add_u64("channels", profile_id.encode(), -1)
    return call


@reads
def find_call(txn: Txn, call_id: str) -> LiveCall | None:
    """The live call with this id, of any profile (operator actions: a scan of the live calls' keys)."""
    return _find(txn, "calls", LiveCall, call_id)


def _find(txn: Txn, table: str, cls: type[T], call_id: str) -> T | None:
    """The record of ``table`` (keyed profile id \0 call id) with this call id, of any profile."""
    suffix = SEP + call_id.encode()
    for k, raw in txn.scan(table):
        if k.endswith(suffix):
            return txn.store.decoder(cls).decode(raw)
    return None


@reads
def get(txn: Txn, profile_id: str, call_id: str) -> LiveCall | None:
    return txn.get("calls", call_key(profile_id, call_id), LiveCall)


@reads
def live_calls(txn: Txn, profile_id: str | None = None) -> list[LiveCall]:
    """Live calls of a profile (of every profile if None)."""
    return list(txn.values("calls", LiveCall, profile_id.encode() + SEP if profile_id else b""))


@reads
def in_use(txn: Txn, profile_id: str) -> int:
    return txn.get_u64("channels", profile_id.encode())


REMOTE = "cluster_calls"   # the other cluster nodes' live calls, written by the agent (edge/cluster/remote.py)


@reads
def elsewhere(txn: Txn, profile_id: str) -> int:
    """Live calls of the profile that other cluster nodes carry, as far as this node knows (0 alone)."""
    return sum(1 for _ in txn.scan(REMOTE, profile_id.encode() + SEP))


@reads
def remote_calls(txn: Txn, profile_id: str | None = None) -> list[RemoteCall]:
    """The other cluster nodes' live calls of a profile (of every profile if None), in (profile, call) order."""
    return list(txn.values(REMOTE, RemoteCall, profile_id.encode() + SEP if profile_id else b""))


@reads
def find_remote(txn: Txn, call_id: str) -> RemoteCall | None:
    """Another cluster node's live call with this id, of any profile."""
    return _find(txn, REMOTE, RemoteCall, call_id)


@reads
def snapshot(txn: Txn) -> list[tuple[Profile, int]]:
    """Every profile with its channels in use, read in one transaction (scrape time)."""
    return [(p, txn.get_u64("channels", p.id.encode())) for p in txn.values("profiles", Profile)]
