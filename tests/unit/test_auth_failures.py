"""``FailureTracker`` (SPEC §7): blocking after repeated authentication failures, in bounded memory."""

from __future__ import annotations

from edge.sip.auth import FailureTracker


def addr(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def test_a_scan_from_200000_addresses_stays_within_the_bound() -> None:
    tracker = FailureTracker(threshold=5, window=60.0, max_sources=1000)
    attacker_blocked = False
    for i in range(200_000):
        now = 1.0 + i * 1e-4  # 20 s of scanning, inside one window
        tracker.failure(addr(i), now=now)
        if i % 100 == 0:  # a source that keeps failing among them
            attacker_blocked |= tracker.failure("203.0.113.66", now=now)
        assert len(tracker._fails) <= 1000
    assert attacker_blocked and tracker.blocked("203.0.113.66", now=21.0)


def test_blocked_sources_are_bounded_too_and_the_oldest_block_goes_first() -> None:
    tracker = FailureTracker(threshold=1, block_seconds=120.0, max_sources=1000)
    for i in range(200_000):
        assert tracker.failure(addr(i), now=1.0 + i * 1e-4)
        assert len(tracker._blocked) <= 1000
    now = 1.0 + 200_000 * 1e-4
    assert tracker.blocked(addr(199_999), now=now) and not tracker.blocked(addr(0), now=now)


def test_block_and_expiry_unchanged() -> None:
    tracker = FailureTracker(threshold=3, window=60.0, block_seconds=120.0)
    assert not tracker.failure("192.0.2.1", now=10.0)
    assert not tracker.failure("192.0.2.1", now=20.0)
    assert tracker.failure("192.0.2.1", now=30.0)
    assert tracker.blocked("192.0.2.1", now=100.0) and not tracker.blocked("192.0.2.1", now=150.0)
    assert not tracker.failure("192.0.2.2", now=10.0)
    assert not tracker.failure("192.0.2.2", now=80.0)  # the first one left the window
    tracker.success("192.0.2.2")
    assert "192.0.2.2" not in tracker._fails
