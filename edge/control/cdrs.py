"""Call detail records: one per call, written in the transaction that settles it."""

from __future__ import annotations

from .models import Cdr
from .store import SEP, Txn, u64, reads


def add(txn: Txn, cdr: Cdr) -> Cdr:
    """Number ``cdr`` (a global, increasing ``seq``) and store it; :returns: it."""
    cdr.seq = txn.next_counter(b"cdr_seq")
    txn.put("cdrs", cdr.profile_id.encode() + SEP + u64(cdr.seq), cdr)
    return cdr


@reads
def page(txn: Txn, profile_id: str, *, after: int = 0, limit: int = 100) -> list[Cdr]:
    """CDRs of a profile with seq > ``after``, oldest first."""
    return txn.page_after_seq("cdrs", profile_id.encode() + SEP, Cdr, after, limit)
