"""A store that cannot write (docs/storage.md, "A store that cannot write"): typed errors,
never half a write, and a reserve so that calls in progress still settle when new work is
refused. On a tiny map: 4 MiB, of which the last 2 MiB are the reserve."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from edge.control import accounts, cdrs, channels, ledger, profiles, rates
from edge.control.credit import CreditEngine
from edge.control.errors import Invalid, StoreFull, StoreUnavailable
from edge.control.models import LiveCall, Rate
from edge.control.store import Store, Txn

UK = Rate(prefix="44", rate=20_000, min_seconds=60, increment_seconds=6)
MAP = 4 << 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path, map_size=MAP, durable=False)
    yield s
    s.close()


def _live_call(store: Store, engine: CreditEngine) -> LiveCall:
    """A funded, answered call of a profile with 1.00 of credit."""
    acct = accounts.create(store, "A", "a.admin")
    ledger.top_up(store, acct.id, 10_000_000)
    prof, _ = profiles.create(store, acct.id, "P", 5, realm="sip.edge.test")
    ledger.allocate(store, prof.id, 1_000_000)
    call = LiveCall(call_id="c1", profile_id=prof.id, direction="outgoing", started_at=0.0,
                    callee="+442071234567", funding="credit")
    assert channels.take(store, prof.id, call)
    call.answered_at = 0.0
    store.write(lambda txn: engine.extend(txn, call, UK, 0.0), sync=False, grows=False)
    return call


def _fill(store: Store, tag: str, *, grows: bool = True) -> int:
    """Create accounts, 50 per transaction, until the store refuses; :returns: how many."""
    made = 0
    for batch in range(10_000):  # bounded: a 4 MiB map holds far fewer
        def op(txn: Txn, batch: int = batch) -> None:
            for i in range(50):
                accounts.create(txn, "filler " * 8, f"{tag}.{batch}.{i}")
        try:
            store.write(op, grows=grows)
        except StoreFull:
            return made
        made += 50
    raise AssertionError("the store never filled up")


def test_reserve_is_documented_size(store: Store) -> None:
    assert store.map_size == MAP
    assert store.reserve == 2 << 20 and store.limit == MAP - (2 << 20)
    big = Store(store.path / "big", map_size=256 << 20, durable=False)
    assert big.reserve == (256 << 20) // 20   # 5 % of a large map
    big.close()


def test_new_work_is_refused_but_a_live_call_still_settles(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    rates.replace(store, [UK])
    engine = CreditEngine(store, slice_seconds=60)
    call = _live_call(store, engine)
    caplog.set_level(logging.INFO, logger="sipedge.store")

    made = _fill(store, "f")
    assert made > 0
    assert store.used_bytes(fresh=True) <= store.limit     # the reserve is untouched
    assert store.is_full
    # new work of every kind is refused, and nothing of it is written
    before = accounts.page(store)
    with pytest.raises(StoreFull) as err:
        store.write(lambda txn: [accounts.create(txn, "more " * 20, f"x{i}") for i in range(200)])
    assert "the store is full" in err.value.message and "storage.map_size_mb" in err.value.message
    assert err.value.status == 507
    assert accounts.page(store) == before
    for _ in range(3):   # the refusals are logged once, not each time
        with pytest.raises(StoreFull):
            rates.replace(store, [UK, *(Rate(prefix=f"9{i:05d}", rate=1) for i in range(5_000))])
    # finishing work may go on into the reserve (here: as if many calls settled) ...
    store.write(lambda txn: [accounts.create(txn, "settled " * 8, f"s{i}") for i in range(400)], grows=False)
    assert store.used_bytes(fresh=True) > store.limit
    # ... and then even the smallest new work, a channel for a new call, is refused
    late = LiveCall(call_id="c2", profile_id=call.profile_id, direction="outgoing", started_at=1.0)
    with pytest.raises(StoreFull):
        channels.take(store, call.profile_id, late)
    assert channels.in_use(store, call.profile_id) == 1 and channels.get(store, call.profile_id, "c2") is None

    # ... but the call in progress is extended and settled from the reserve
    store.write(lambda txn: engine.extend(txn, call, UK, 55.0), sync=False, grows=False)
    cdr = store.write(lambda txn: engine.settle(txn, call, UK, 90.0, status=200, end_reason="caller_bye"),
                      sync=False, grows=False)
    assert cdr.cost == 30_000
    assert channels.in_use(store, call.profile_id) == 0 and channels.live_calls(store) == []
    assert [c.call_id for c in cdrs.page(store, call.profile_id)] == ["c1"]
    assert profiles.get(store, call.profile_id).balance == 1_000_000 - 30_000
    assert all(balance == total for balance, total in ledger.audit(store).values())
    full = [r for r in caplog.records if getattr(r, "event", "") == "store_full"]
    assert len(full) == 1, [r.getMessage() for r in caplog.records]
    assert full[0].map_bytes == MAP and full[0].path == str(store.path)


def test_a_map_full_error_is_typed_and_writes_nothing(store: Store) -> None:
    """Writes allowed into the reserve still meet the end of the map: StoreFull, aborted whole."""
    _fill(store, "g", grows=False)           # no reserve check: LMDB's own MapFullError ends it
    used = store.used_bytes(fresh=True)
    assert used > store.limit
    n = len(accounts.page(store))
    with pytest.raises(StoreFull):
        store.write(lambda txn: [accounts.create(txn, "z" * 100, f"z{i}") for i in range(2_000)], grows=False)
    assert len(accounts.page(store)) == n    # reads still work, and nothing of the failed write is there


def test_room_again_after_deletions_then_full_again(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sipedge.store")
    _fill(store, "h")
    assert store.is_full
    store.write(lambda txn: (txn.clear("accounts"), txn.clear("admins")), grows=False)  # an operator purge
    accounts.create(store, "A", "after.purge")
    assert not store.is_full
    _fill(store, "i")
    events = [getattr(r, "event", "") for r in caplog.records]
    assert events.count("store_full") == 2 and events.count("store_room") == 1


def test_lmdb_errors_become_typed_and_are_logged_once(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    def broken(txn: Txn) -> None:
        accounts.create(txn, "A", "never.written")
        raise lmdb.Error("I/O error")

    for _ in range(3):
        with pytest.raises(StoreUnavailable) as err:
            store.write(broken)
    assert err.value.status == 503
    assert accounts.page(store) == []
    assert [getattr(r, "event", "") for r in caplog.records].count("store_unavailable") == 1

    def disk_full(txn: Txn) -> None:
        raise lmdb.DiskError("No space left on device")

    with pytest.raises(StoreFull) as full:
        store.write(disk_full)
    assert "disk" in full.value.message
    with pytest.raises(Invalid):   # a key LMDB cannot hold is bad input, not a broken store
        accounts.create(store, "A", "x" * 600)
