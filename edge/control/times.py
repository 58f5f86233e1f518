"""Times: Unix seconds (float) in storage, RFC 3339 strings in every body the edge sends (SPEC §5.4)."""

from __future__ import annotations

from datetime import UTC, datetime


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
