"""Settlements on their way to the engine's journal: a transactional outbox in the node's LMDB.

A cluster node's worker settles a call in LMDB as a node alone does (CDR, channel, money) and, in
the same write transaction, leaves a row here; the cluster agent settles the call in the journal
and deletes the row. So a settlement is never lost between the two stores, whichever process
dies when: a worker killed after its write has left the row, an agent killed before its append
finds the row again when it starts, and a journal settle that is applied twice is refused by the
journal itself (settle-once), never counted twice.
"""

from __future__ import annotations

from edge.control.models import LiveCall
from edge.control.store import SEP, Store, Txn, key

TABLE = "journal_outbox"


def add(txn: Txn, call: LiveCall) -> None:
    """In the transaction that settles ``call`` in LMDB."""
    txn.put_raw(TABLE, key(call.profile_id, call.call_id), b"")


def add_released(store: Store, profile_id: str, call_id: str) -> None:
    """A reservation that may have landed for a call that never started (refused or cancelled)."""
    store.write(lambda txn: txn.put_raw(TABLE, key(profile_id, call_id), b""), sync=False, grows=False)


def pending(store: Store, limit: int = 256) -> list[tuple[str, str]]:
    """(profile id, call id) of settlements not yet in the journal, oldest key first."""
    def scan(txn: Txn) -> list[tuple[str, str]]:
        out = []
        for k, _ in txn.scan(TABLE):
            profile_id, _, call_id = k.partition(SEP)
            out.append((profile_id.decode(), call_id.decode()))
            if len(out) >= limit:
                break
        return out

    return store.read(scan)


def done(store: Store, items: list[tuple[str, str]]) -> None:
    def delete(txn: Txn) -> None:
        for profile_id, call_id in items:
            txn.delete(TABLE, key(profile_id, call_id))

    if items:
        store.write(delete, sync=False, grows=False)
