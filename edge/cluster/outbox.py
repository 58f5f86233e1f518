"""Settlements on their way to the engine's journal: a transactional outbox in the node's LMDB.

A cluster node's worker settles a call in LMDB as a node alone does (CDR, channel, money) and, in
the same write transaction, leaves a row here; the cluster agent settles the call in the journal
and deletes the row. So a settlement is never lost between the two stores, whichever process
dies when: a worker killed after its write has left the row, an agent killed before its append
finds the row again when it starts, and a journal settle that is applied twice is refused by the
journal itself (settle-once), never counted twice. A row holds the call's cost, u64 big-endian
(empty: 0, a call that never started).

The call's CDR waits in ``held_cdrs`` beside the row: while this node could not reach the engine
(it died, or was cut off and fenced), a survivor may have settled the call in the journal and
written its CDR on its own node. The journal's one settlement says whose the CDR is: the held CDR
is written when this node's settlement landed (or the call never reached the journal), dropped
when another holder's did (:func:`done`). So a call has one CDR in the cluster, and its cost is
what the journal billed.
"""

from __future__ import annotations

from edge.control import cdrs
from edge.control.models import Cdr, LiveCall
from edge.control.store import SEP, Store, Txn, key, u64

TABLE = "journal_outbox"
CDRS = "held_cdrs"

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


def hold_cdr(txn: Txn, cdr: Cdr) -> None:
    """The CDR of a call settled here, until the journal says whose it is."""
    txn.put(CDRS, key(cdr.profile_id, cdr.call_id), cdr)


def done(store: Store, items: list[Pending], theirs: frozenset[tuple[str, str]] = frozenset()) -> None:
    """The rows of ``items`` are in the journal: they go, and their held CDRs are written -- except
    those of ``theirs`` (profile id, call id), whose settlement another holder's was."""
    def delete(txn: Txn) -> None:
        for profile_id, call_id, _cost in items:
            k = key(profile_id, call_id)
            txn.delete(TABLE, k)
            held = txn.get(CDRS, k, Cdr)
            if held is not None:
                txn.delete(CDRS, k)
                if (profile_id, call_id) not in theirs:
                    cdrs.record(txn, held)

    if items:
        store.write(delete, sync=False, grows=False)
