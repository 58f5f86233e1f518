"""Call detail records: one per call, written in the transaction that settles it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import webhooks
from .models import Cdr
from .money import format_money
from .store import SEP, Txn, reads, u64, writes
from .times import rfc3339, window

LEG_SIDES = ("customer", "carrier")   # per-leg fields are keyed by the side the leg faces
MEDIA_FIELDS = ("a_packets", "a_bytes", "a_lost", "a_dropped", "a_jitter_us",
                "b_packets", "b_bytes", "b_lost", "b_dropped", "b_jitter_us")
#: the columns of a CSV export, in order: one per CDR field, media stats flattened (media_a_packets ...)
CSV_COLUMNS = ("seq", "call_id", "account_id", "profile_id", "direction", "caller", "callee", "carrier",
               "started_at", "answered_at", "ended_at", "setup_seconds", "talk_seconds", "duration", "status",
               "end_reason", "cost", "bundle_seconds", "rate_prefix", *(f"media_{f}" for f in MEDIA_FIELDS),
               *(f"transport_{side}" for side in LEG_SIDES))


def fields(cdr: Cdr) -> dict[str, Any]:
    """A CDR as it leaves the edge (API, export, ``call.ended`` webhook): RFC 3339 times, money as
    a decimal string, ``talk_seconds`` (answer to end) and ``setup_seconds`` (start to answer)."""
    answered = cdr.answered_at
    return {
        "seq": cdr.seq, "call_id": cdr.call_id, "account_id": cdr.account_id, "profile_id": cdr.profile_id,
        "direction": cdr.direction, "caller": cdr.caller, "callee": cdr.callee, "carrier": cdr.carrier,
        "started_at": rfc3339(cdr.started_at), "answered_at": rfc3339(answered), "ended_at": rfc3339(cdr.ended_at),
        "setup_seconds": round(answered - cdr.started_at, 3) if answered is not None else None,
        "talk_seconds": round(max(0.0, cdr.ended_at - answered), 3) if answered is not None else 0.0,
        "duration": cdr.duration, "status": cdr.status, "end_reason": cdr.end_reason,
        "cost": format_money(cdr.cost), "bundle_seconds": cdr.bundle_seconds, "rate_prefix": cdr.rate_prefix,
        "media": {f: cdr.media.get(f, 0) for f in MEDIA_FIELDS} if cdr.media else {},
        "transport": dict(cdr.transport),
        "srtp": dict(cdr.srtp),
    }


def csv_row(cdr: Cdr) -> list[Any]:
    """The CSV columns of ``CSV_COLUMNS`` (empty cells for nulls)."""
    f = fields(cdr)
    media = f.pop("media")
    row = ["" if f[c] is None else f[c] for c in CSV_COLUMNS[:19]]
    return (row + [media.get(m, "") if media else "" for m in MEDIA_FIELDS]
            + [cdr.transport.get(side, "") for side in LEG_SIDES])


def add(txn: Txn, cdr: Cdr, *, seq: int | None = None) -> Cdr:
    """Number ``cdr`` (a global, increasing ``seq``: the node's counter, or on a cluster node the
    journal's stream sequence of its settlement) and store it; :returns: it."""
    cdr.seq = txn.next_counter(b"cdr_seq") if seq is None else seq
    txn.put("cdrs", cdr.profile_id.encode() + SEP + u64(cdr.seq), cdr)
    return cdr


def record(txn: Txn, cdr: Cdr, *, seq: int | None = None) -> Cdr:
    """:func:`add`, and its ``call.ended`` webhook in the same transaction (a transactional outbox)."""
    add(txn, cdr, seq=seq)
    if cdr.account_id:
        webhooks.emit(txn, cdr.account_id, "call.ended", cdr.call_id, lambda: {"cdr": fields(cdr)}, now=cdr.ended_at)
    return cdr


@reads
def page(txn: Txn, profile_id: str, *, after: int = 0, limit: int = 100) -> list[Cdr]:
    """CDRs of a profile with seq > ``after``, oldest first."""
    return txn.page_after_seq("cdrs", profile_id.encode() + SEP, Cdr, after, limit)


def scan(txn: Txn, profile_id: str, *, after: int = 0, start: float | None = None,
         end: float | None = None) -> Iterator[Cdr]:
    """CDRs of a profile with seq > ``after`` whose call started in [``start``, ``end``), oldest first."""
    inside = window(start, end)
    for cdr in txn.scan_after_seq("cdrs", profile_id.encode() + SEP, Cdr, after):
        if inside(cdr.started_at):
            yield cdr


@writes(grows=False)
def purge(txn: Txn, ended_before: float) -> int:
    """Delete the CDRs of calls that ended before ``ended_before`` (Unix seconds): room for
    new work when the store fills up (export them first). :returns: how many."""
    decode = txn.store.decoder(Cdr).decode
    return txn.delete_where("cdrs", b"", lambda v: decode(v).ended_at < ended_before)
