"""CDR export (SPEC §5.4): CSV or JSON Lines, streamed in bounded memory.

Rows are read in chunks of ``CHUNK`` CDRs, each chunk in a read transaction of its own
(so a long export holds no LMDB snapshot for minutes), rendered into one block of text
and sent; nothing holds more than one chunk. The columns are ``edge.control.cdrs.CSV_COLUMNS``:
one per CDR field, media stats flattened; JSON Lines carries the same fields as the
JSON pages (``edge.control.cdrs.fields``). Account exports go profile by profile, each
oldest first.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import msgspec
from litestar.response import Stream

from edge.control import cdrs
from edge.control.errors import Invalid
from edge.control.models import Cdr
from edge.control.store import Store, Txn
from edge.control.times import parse_rfc3339

CHUNK = 2000
MEDIA_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson"}


def time_range(start: str | None, end: str | None) -> tuple[float | None, float | None]:
    """``from``/``to`` query parameters (RFC 3339) as Unix seconds; 422 naming the parameter."""
    out: list[float | None] = []
    for name, text in (("from", start), ("to", end)):
        if text is None or text == "":
            out.append(None)
            continue
        try:
            out.append(parse_rfc3339(text))
        except (ValueError, OverflowError, OSError):
            raise Invalid(f"{name}: not an RFC 3339 timestamp (2026-01-31T00:00:00Z): {text!r}",
                          field=f"query:{name}") from None
    lo, hi = out
    if lo is not None and hi is not None and hi < lo:
        raise Invalid("to: earlier than from", field="query:to")
    return lo, hi


def _chunks(store: Store, profile_ids: list[str], lo: float | None, hi: float | None) -> Iterator[list[Cdr]]:
    for pid in profile_ids:
        after = 0
        while True:
            def read(txn: Txn, after: int = after, pid: str = pid) -> list[Cdr]:
                out: list[Cdr] = []
                for cdr in cdrs.scan(txn, pid, after=after, start=lo, end=hi):
                    out.append(cdr)
                    if len(out) >= CHUNK:
                        break
                return out

            chunk = store.read(read)
            if not chunk:
                break
            yield chunk
            if len(chunk) < CHUNK:
                break
            after = chunk[-1].seq


def csv_lines(store: Store, profile_ids: list[str], lo: float | None, hi: float | None) -> Iterator[bytes]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cdrs.CSV_COLUMNS)
    yield buf.getvalue().encode()
    for chunk in _chunks(store, profile_ids, lo, hi):
        buf.seek(0)
        buf.truncate()
        writer.writerows(cdrs.csv_row(c) for c in chunk)
        yield buf.getvalue().encode()


def jsonl_lines(store: Store, profile_ids: list[str], lo: float | None, hi: float | None) -> Iterator[bytes]:
    enc = msgspec.json.Encoder()
    for chunk in _chunks(store, profile_ids, lo, hi):
        yield b"".join(enc.encode(cdrs.fields(c)) + b"\n" for c in chunk)


def export_response(store: Store, profile_ids: list[str], fmt: str, lo: float | None, hi: float | None,
                    name: str) -> Stream:  # a Response: the route's default media type does not apply
    gen = csv_lines if fmt == "csv" else jsonl_lines
    ext = "csv" if fmt == "csv" else "jsonl"
    return Stream(gen(store, profile_ids, lo, hi), media_type=MEDIA_TYPES[fmt],
                  headers={"Content-Disposition": f'attachment; filename="{name}.{ext}"'})
