"""Settlements on their way to the engine's journal: a transactional outbox in the node's LMDB.

A cluster node's worker settles a call in LMDB as a node alone does (channel, price) and, in the
same write transaction, leaves a row here; the cluster agent settles the call in the journal and
deletes the row. So a settlement is never lost between the two stores, whichever process dies
when: a worker killed after its write has left the row, an agent killed before its append finds
the row again when it starts, and a journal settle that is applied twice is refused by the journal
itself (settle-once), never counted twice. A row holds the call's cost, u64 big-endian (empty: 0, a
call that never started; :data:`REFUSED`: an attempt refused before it held anything, whose CDR
alone goes to the journal).

The call's CDR waits in ``held_cdrs`` beside the row and travels in the journal's settlement: every
node writes the CDRs of the cluster from the journal (edge/cluster/money.py), none from here. A
call has one settlement in the journal, so one CDR in the cluster, the same on every node; when a
survivor settled the call first (this node died, or was cut off and fenced), the journal refuses
this node's settlement and its held CDR goes with the row: the survivor's is the call's.
"""

from __future__ import annotations

from typing import NamedTuple

from edge.control.models import Cdr, LiveCall
from edge.control.store import SEP, Store, Txn, key, u64

TABLE = "journal_outbox"
CDRS = "held_cdrs"
REFUSED = b"refused"        # a row's value: the CDR of a refused attempt, no settlement


class Pending(NamedTuple):
    profile_id: str
    call_id: str
    cost: int               # micro-units
    cdr: Cdr | None         # held beside the row (None: a call that never started, an older build's row)
    refused: bool = False   # a refused attempt: its CDR goes to the journal, nothing is settled


def add(txn: Txn, call: LiveCall, cost: int = 0) -> None:
    """In the transaction that settles ``call`` in LMDB, with what it costs."""
    txn.put_raw(TABLE, key(call.profile_id, call.call_id), u64(cost) if cost else b"")


def pending(store: Store, limit: int = 256) -> list[Pending]:
    """Settlements (and refused attempts) not yet in the journal, oldest key first, with their CDRs."""
    def scan(txn: Txn) -> list[Pending]:
        out = []
        for k, v in txn.scan(TABLE):
            profile_id, _, call_id = k.partition(SEP)
            refused = v == REFUSED
            cost = 0 if refused or not v else int.from_bytes(v, "big")
            out.append(Pending(profile_id.decode(), call_id.decode(), cost, txn.get(CDRS, k, Cdr), refused))
            if len(out) >= limit:
                break
        return out

    return store.read(scan)


def hold_cdr(txn: Txn, cdr: Cdr, *, refused: bool = False) -> None:
    """The CDR of a call settled here (or, ``refused``, of an attempt refused here), until the agent
    has put it in the journal."""
    k = key(cdr.profile_id, cdr.call_id)
    txn.put(CDRS, k, cdr)
    if refused:
        txn.put_raw(TABLE, k, REFUSED)


def done(store: Store, items: list[Pending]) -> None:
    """The rows of ``items`` are in the journal (or need not be): they go, with their held CDRs."""
    def delete(txn: Txn) -> None:
        for item in items:
            k = key(item.profile_id, item.call_id)
            txn.delete(TABLE, k)
            txn.delete(CDRS, k)

    if items:
        store.write(delete, sync=False, grows=False)
