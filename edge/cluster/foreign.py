"""Calls of a dead node whose legs this node is to BYE (docs/cluster.md "A node that dies").

The survivor that settled a dead holder's reservations puts each answered call's record (its
``LiveCall`` with the dialog record of each leg, as the dead node published it) in the
``foreign_calls`` table of its own LMDB; worker 0 of the node sends each leg a BYE from its own
address (``CallController.bye_recovered``) and deletes the row. The BYE is a courtesy to the
parties: the call's money and channel were settled in the journal already.
"""

from __future__ import annotations

from edge.control.models import LiveCall
from edge.control.store import Store, Txn

TABLE = "foreign_calls"
POLL_SECONDS = 0.5


def add(store: Store, call: LiveCall) -> None:
    store.write(lambda txn: txn.put(TABLE, call.call_id.encode(), call), sync=False, grows=False)


def take(store: Store, limit: int = 256) -> list[LiveCall]:
    """Up to ``limit`` calls to BYE, removed from the table in the same transaction."""
    def op(txn: Txn) -> list[LiveCall]:
        calls = []
        for k, _ in list(txn.scan(TABLE)):
            call = txn.get(TABLE, k, LiveCall)
            txn.delete(TABLE, k)
            if call is not None:
                calls.append(call)
            if len(calls) >= limit:
                break
        return calls

    return store.write(op, sync=False, grows=False)
