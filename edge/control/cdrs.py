"""Call detail records: one per call, written in the transaction that settles it."""

from __future__ import annotations

from .models import Cdr
from .store import SEP, Txn, reads, u64, writes


def add(txn: Txn, cdr: Cdr) -> Cdr:
    """Number ``cdr`` (a global, increasing ``seq``) and store it; :returns: it."""
    cdr.seq = txn.next_counter(b"cdr_seq")
    txn.put("cdrs", cdr.profile_id.encode() + SEP + u64(cdr.seq), cdr)
    return cdr


@reads
def page(txn: Txn, profile_id: str, *, after: int = 0, limit: int = 100) -> list[Cdr]:
    """CDRs of a profile with seq > ``after``, oldest first."""
    return txn.page_after_seq("cdrs", profile_id.encode() + SEP, Cdr, after, limit)


@writes(grows=False)
def purge(txn: Txn, ended_before: float) -> int:
    """Delete the CDRs of calls that ended before ``ended_before`` (Unix seconds): room for
    new work when the store fills up (export them first). :returns: how many."""
    decode = txn.store.decoder(Cdr).decode
    return txn.delete_where("cdrs", b"", lambda v: decode(v).ended_at < ended_before)
