"""Times: Unix seconds (float) in storage, RFC 3339 strings in every body the edge sends (SPEC §5.4)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

EPOCH = datetime.fromtimestamp(0, UTC)
ONE_MICROSECOND = timedelta(microseconds=1)


def to_datetime(ts: float) -> datetime:
    """A stored Unix time as an aware UTC datetime (msgspec encodes it as RFC 3339 with "Z")."""
    return datetime.fromtimestamp(ts, UTC)


def maybe_datetime(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def rfc3339(ts: float | None) -> str | None:
    """``1795918253.71`` -> ``"2026-11-28T22:50:53.710000Z"`` (None stays None): what msgspec writes for a datetime."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """An RFC 3339 timestamp (``2026-01-31T00:00:00Z``, an offset, or a date) as Unix seconds.

    :raises ValueError: not a timestamp; a time without an offset is refused (ambiguous).
    """
    value = datetime.fromisoformat(text.replace("z", "Z"))
    if value.tzinfo is None:
        if len(text) == 10:        # a plain date: midnight UTC
            value = value.replace(tzinfo=UTC)
        else:
            raise ValueError("a timestamp needs an offset (Z or +hh:mm)")
    return value.timestamp()


def micros(ts: float) -> int:
    """Unix seconds as integer microseconds, rounded as :func:`rfc3339` rounds them."""
    return (datetime.fromtimestamp(ts, UTC) - EPOCH) // ONE_MICROSECOND


def window(start: float | None, end: float | None) -> Callable[[float], bool]:
    """``ts in [start, end)`` (None: unbounded) at the microseconds a body shows, so a client that
    sends a record's own timestamp as ``from`` gets that record back (a float compare may not)."""
    lo = None if start is None else micros(start)
    hi = None if end is None else micros(end)

    def inside(ts: float) -> bool:
        t = micros(ts)
        return (lo is None or t >= lo) and (hi is None or t < hi)

    return inside
