"""The audit log of control-API writes (SPEC §5.2): who (key id), what (method, path, status),
when, from where. The API batches entries and writes them here after each answer."""

from __future__ import annotations

from .models import AuditEntry
from .store import Txn, reads, u64, writes

SCAN_BUDGET = 10_000   # entries one filtered page may look at (bounded work per request)


@writes(sync=False, grows=False)   # bookkeeping of answered requests: small, and never ends a full-store episode
def record(txn: Txn, entries: list[AuditEntry]) -> None:
    """Number and store ``entries`` (a batch), in one transaction."""
    for entry in entries:
        entry.seq = txn.next_counter(b"audit_seq")
        txn.put("audit", u64(entry.seq), entry)


@reads
def page(txn: Txn, *, after: int = 0, limit: int = 100,
         account_id: str | None = None) -> tuple[list[AuditEntry], int | None]:
    """Entries with seq > ``after``, oldest first; only those of ``account_id`` if given.

    :returns: (entries, the cursor of the next page or None at the end). A filtered page looks
        at most at ``SCAN_BUDGET`` entries, so it may come back short with a cursor.
    """
    out: list[AuditEntry] = []
    decode = txn.store.decoder(AuditEntry).decode
    last, seen = after, 0
    cur = txn._cursor("audit", u64(after + 1))
    for k, raw in cur or ():
        seq = int.from_bytes(k, "big")
        if len(out) >= limit or seen >= SCAN_BUDGET:
            return out, last
        seen += 1
        last = seq
        entry = decode(raw)
        if account_id is None or entry.account_id == account_id:
            out.append(entry)
    return out, None
