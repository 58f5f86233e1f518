"""Settlements on their way to the engine's journal: a transactional outbox in the node's LMDB.

A cluster node's worker settles a call in LMDB as a node alone does (CDR, channel, money) and, in
the same write transaction, leaves a row here; the cluster agent settles the call in the journal
and deletes the row. So a settlement is never lost between the two stores, whichever process
dies when: a worker killed after its write has left the row, an agent killed before its append
finds the row again when it starts, and a journal settle that is applied twice is refused by the
journal itself (settle-once), never counted twice. A row holds the call's cost, u64 big-endian
(empty: 0, a call that never started).
"""

from __future__ import annotations

from edge.control.models import LiveCall
from edge.control.store import SEP, Store, Txn, key, u64

TABLE = "journal_outbox"

Pending = tuple[str, str, int]      # profile id, call id, cost in micro-units


def add(txn: Txn, call: LiveCall, cost: int = 0) -> None:
    """In the transaction that settles ``call`` in LMDB, with what it costs."""
    txn.put_raw(TABLE, key(call.profile_id, call.call_id), u64(cost) if cost else b"")


def pending(store: Store, limit: int = 256) -> list[Pending]:
    """Settlements not yet in the journal, oldest key first."""
    def scan(txn: Txn) -> list[Pending]:
        out = []
        for k, v in txn.scan(TABLE):
            profile_id, _, call_id = k.partition(SEP)
            out.append((profile_id.decode(), call_id.decode(), int.from_bytes(v, "big") if v else 0))
            if len(out) >= limit:
                break
        return out

    return store.read(scan)


def done(store: Store, items: list[Pending]) -> None:
    def delete(txn: Txn) -> None:
        for profile_id, call_id, _cost in items:
            txn.delete(TABLE, key(profile_id, call_id))

    if items:
        store.write(delete, sync=False, grows=False)
