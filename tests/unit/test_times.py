"""Times in bodies and in range filters: a record's own printed timestamp, sent back as
``from``, selects that record, and as ``to`` excludes it (the float the store holds may sit
just below the microsecond the body shows)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge.control.times import parse_rfc3339, rfc3339, window

STORED = st.floats(min_value=1_600_000_000, max_value=2_100_000_000, allow_nan=False)


@given(STORED)
def test_a_printed_timestamp_bounds_its_own_record(ts: float) -> None:
    shown = rfc3339(ts)
    assert shown is not None
    back = parse_rfc3339(shown)
    assert window(back, None)(ts)
    assert not window(None, back)(ts)
    assert window(back, back + 1e-6)(ts)


def test_unbounded_and_half_open() -> None:
    assert window(None, None)(0.0)
    assert window(10.0, 20.0)(10.0) and not window(10.0, 20.0)(20.0)
