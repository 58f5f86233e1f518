"""Rating, reservations in slices, bundles and settlement (SPEC §4.4) on a real store."""

from __future__ import annotations

import pytest

from edge.control import accounts, cdrs, channels, ledger, profiles, rates
from edge.control.credit import CreditEngine, billed_seconds, is_e164, is_us_number, minimum_charge, price
from edge.control.models import AutoRecharge, LiveCall, Rate
from edge.control.store import Store
from edge.control.tables import shipped_exclusions

UK = Rate(prefix="44", rate=20_000, connect_fee=0, min_seconds=60, increment_seconds=6)    # 0.02/min
US = Rate(prefix="1", rate=23_000, connect_fee=0, min_seconds=60, increment_seconds=6)
FEE = Rate(prefix="55", rate=60_000, connect_fee=39_000, min_seconds=60, increment_seconds=60)


@pytest.mark.parametrize("talk, billed", [(0, 0), (0.2, 60), (59, 60), (60, 60), (61, 66), (66, 66), (66.1, 72)])
def test_billed_seconds(talk: float, billed: int) -> None:
    assert billed_seconds(talk, UK) == billed


def test_price_rounds_up_to_the_micro_unit() -> None:
    assert price(60, UK) == 20_000
    assert price(66, UK) == 22_000
    odd = Rate(prefix="9", rate=10_001, min_seconds=1, increment_seconds=1)
    assert price(1, odd) == 167  # 10001/60 = 166.68 -> 167
    assert price(60, FEE) == 99_000 and minimum_charge(FEE) == 99_000


@pytest.mark.parametrize("user, ok", [
    ("+442071234567", "+442071234567"), ("442071234567", "+442071234567"), ("17606604690", "+17606604690"),
    ("02071234567", None), ("2071234", None), ("+44", None), ("abc", None), ("+4420712345678901", None),
])
def test_e164(user: str, ok: str | None) -> None:
    assert is_e164(user) == ok


def test_us_numbers() -> None:
    assert is_us_number("+14155550100") and not is_us_number("+14165550100")  # 416 is Toronto
    assert not is_us_number("+442071234567")


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path, map_size=64 << 20, durable=False)
    rates.replace(s, [UK, US, FEE])
    rates.replace_exclusions(s, shipped_exclusions())
    yield s
    s.close()


def profile_with(store: Store, balance: int, bundles: int = 0, channels: int = 5):
    acct = accounts.create(store, "A", f"a{balance}.{bundles}.{channels}")
    ledger.top_up(store, acct.id, 1_000_000_000)
    prof, _ = profiles.create(store, acct.id, "P", channels, realm="sip.edge.test")
    if balance:
        ledger.allocate(store, prof.id, balance)
    if bundles:
        profiles.set_bundles(store, prof.id, bundles)
    return profiles.get(store, prof.id)


def seize(store: Store, prof, callee: str, funding: str, started: float = 1000.0) -> LiveCall:
    call = LiveCall(call_id=f"call-{callee}-{started}", profile_id=prof.id, direction="outgoing", started_at=started,
                    caller=prof.sip_username, callee=callee, funding=funding)
    assert channels.take(store, prof.id, call)
    return call


def test_admission(store: Store) -> None:
    engine = CreditEngine(store)
    poor = profile_with(store, 19_999)
    assert engine.admit(poor, "+442071234567").reason == "no_credit"
    assert engine.admit(poor, "+17606604690").free  # the echo number needs no credit
    assert engine.admit(poor, "+81312345678").reason == "no_rate"
    assert engine.admit(profile_with(store, 20_000), "+442071234567").ok
    bundled = profile_with(store, 0, bundles=1)
    assert engine.admit(bundled, "+14155550100").bundle
    assert engine.admit(bundled, "+12186321234").reason == "no_credit"  # excluded prefix: standard rate


def test_slices_are_reserved_and_settled(store: Store) -> None:
    engine = CreditEngine(store, slice_seconds=60)
    prof = profile_with(store, 1_000_000)  # 1.00
    call = seize(store, prof, "+442071234567", "credit")
    call.answered_at = 1000.0
    until = store.write(lambda txn: engine.extend(txn, call, UK, 1000.0))
    assert until == 1060.0 and call.reserved == 20_000
    assert profiles.get(store, prof.id).balance == 980_000
    until = store.write(lambda txn: engine.extend(txn, call, UK, 1055.0))
    assert until == 1120.0 and call.reserved == 40_000
    cdr = store.write(lambda txn: engine.settle(txn, call, UK, 1000.0 + 75, status=200, end_reason="caller_bye"))
    assert cdr.duration == 78 and cdr.cost == 26_000
    assert profiles.get(store, prof.id).balance == 1_000_000 - 26_000
    assert channels.in_use(store, prof.id) == 0
    kinds = [e.kind for e in ledger.entries(store, f"profile:{prof.id}")]
    assert kinds == ["allocate_in", "reserve", "reserve", "release", "call"]
    balance, ledger_sum = ledger.audit(store)[f"profile:{prof.id}"]
    assert balance == ledger_sum


def test_last_slice_is_partial_and_the_call_is_cut_there(store: Store) -> None:
    engine = CreditEngine(store, slice_seconds=60)
    prof = profile_with(store, 30_000)  # 0.03: 60 s minimum = 0.02, then 0.0020 per 6 s
    call = seize(store, prof, "+442071234567", "credit")
    call.answered_at = 0.0
    assert store.write(lambda txn: engine.extend(txn, call, UK, 0.0)) == 60.0
    assert store.write(lambda txn: engine.extend(txn, call, UK, 55.0)) == 90.0  # 0.01 buys 30 s
    assert store.write(lambda txn: engine.extend(txn, call, UK, 85.0)) == 90.0  # nothing more
    cdr = store.write(lambda txn: engine.settle(txn, call, UK, 95.0, status=200, end_reason="credit_exhausted"))
    assert cdr.duration == 90 and cdr.cost == 30_000  # never billed past the funded time
    assert profiles.get(store, prof.id).balance == 0


def test_auto_recharge_mid_call(store: Store) -> None:
    engine = CreditEngine(store, slice_seconds=60)
    prof = profile_with(store, 25_000)
    ledger.set_auto_recharge(store, prof.id, AutoRecharge(enabled=True, amount=100_000, min_balance=10_000))
    call = seize(store, prof, "+442071234567", "credit")
    call.answered_at = 0.0
    store.write(lambda txn: engine.extend(txn, call, UK, 0.0))  # 25_000 - 20_000 = 5_000 < min: recharge
    assert profiles.get(store, prof.id).balance == 105_000
    assert ledger.auto_recharge_count(store, prof.id) == 1
    kinds = [e.kind for e in ledger.entries(store, f"profile:{prof.id}")]
    assert kinds[-2:] == ["reserve", "auto_recharge_in"]


def test_bundle_minutes_first_then_credit(store: Store) -> None:
    engine = CreditEngine(store, slice_seconds=60, bundle_minutes=2)  # 120 bundle seconds a month
    prof = profile_with(store, 1_000_000, bundles=1)
    call = seize(store, prof, "+14155550100", "bundle")
    call.answered_at = 0.0
    for t in (0.0, 55.0, 115.0):
        store.write(lambda txn, t=t: engine.extend(txn, call, US, t))
    assert call.bundle_seconds_reserved == 120 and call.funded_until == 180.0
    assert call.reserved == price(60, US, connect_fee=False)
    cdr = store.write(lambda txn: engine.settle(txn, call, US, 150.0, status=200, end_reason="caller_bye"))
    assert cdr.bundle_seconds == 120 and cdr.cost == price(30, US, connect_fee=False)
    # the bundle is used up this month: a second call pays from credit
    assert store.read(lambda txn: engine.bundle_left(txn, profiles.get(store, prof.id), 10.0)) == 0
    assert not engine.admit(profiles.get(store, prof.id), "+14155550100", now=10.0).bundle


def test_unused_bundle_seconds_return(store: Store) -> None:
    engine = CreditEngine(store, slice_seconds=60, bundle_minutes=10)
    prof = profile_with(store, 0, bundles=1)
    call = seize(store, prof, "+14155550100", "bundle")
    call.answered_at = 0.0
    store.write(lambda txn: engine.extend(txn, call, US, 0.0))
    cdr = store.write(lambda txn: engine.settle(txn, call, US, 10.0, status=200, end_reason="caller_bye"))
    assert cdr.bundle_seconds == 60 and cdr.cost == 0  # the 60 s minimum, from the bundle
    assert store.read(lambda txn: engine.bundle_left(txn, profiles.get(store, prof.id), 10.0)) == 540


def test_recovery_settles_from_the_last_reservation(store: Store) -> None:
    engine = CreditEngine(store, slice_seconds=60)
    prof = profile_with(store, 1_000_000)
    call = seize(store, prof, "+442071234567", "credit")
    call.answered_at = 0.0
    store.write(lambda txn: engine.extend(txn, call, UK, 0.0))
    recovered = engine.recover(now=10_000.0)
    assert [c.call_id for c in recovered] == [call.call_id]
    assert channels.in_use(store, prof.id) == 0 and channels.live_calls(store) == []
    cdr = cdrs.page(store, prof.id)[-1]
    assert cdr.end_reason == "recovery" and cdr.cost == 20_000  # the reserved slice
    balance, ledger_sum = ledger.audit(store)[f"profile:{prof.id}"]
    assert balance == ledger_sum == 980_000


def test_recovery_bills_at_the_rate_the_call_was_funded_at(store: Store) -> None:
    """The rate table changes between answer and a crash: recovery bills the admitted rate."""
    engine = CreditEngine(store, slice_seconds=60)
    prof = profile_with(store, 1_000_000)
    call = seize(store, prof, "+442071234567", "credit")
    call.answered_at = 0.0
    store.write(lambda txn: engine.extend(txn, call, UK, 0.0), grows=False)   # 60 s at 0.02/min reserved
    assert channels.get(store, prof.id, call.call_id).rate == UK                 # stored with the call
    dearer = Rate(prefix="44", rate=200_000, min_seconds=1, increment_seconds=1)  # 0.20/min from now on
    rates.replace(store, [dearer, US, FEE])
    engine.recover(now=30.0)                                                       # 30 s of talk at the crash
    cdr = cdrs.page(store, prof.id)[-1]
    assert cdr.end_reason == "recovery" and cdr.rate_prefix == "44"
    assert cdr.duration == 60 and cdr.cost == 20_000   # UK: 60 s minimum at 0.02/min (not 30 s at 0.20 = 0.10)
    assert profiles.get(store, prof.id).balance == 1_000_000 - 20_000
    balance, ledger_sum = ledger.audit(store)[f"profile:{prof.id}"]
    assert balance == ledger_sum


def test_live_calls_of_an_older_build_still_decode(store: Store) -> None:
    """Records written before LiveCall.rate (with owner_pid and rate_prefix) decode; recovery
    then bills at today's table."""
    import msgspec

    engine = CreditEngine(store, slice_seconds=60)
    prof = profile_with(store, 1_000_000)
    old = {"call_id": "old-1", "profile_id": prof.id, "direction": "outgoing", "started_at": 0.0,
           "callee": "+442071234567", "answered_at": 0.0, "reserved": 20_000, "funded_until": 60.0,
           "funding": "credit", "rate_prefix": "44", "owner_pid": 4242}

    def op(txn) -> None:
        ledger.move(txn, profiles.get(txn, prof.id), -20_000, "reserve", "old-1")
        txn.put_u64("channels", prof.id.encode(), 1)
        txn.put_raw("calls", channels.call_key(prof.id, "old-1"), msgspec.msgpack.encode(old))

    store.write(op)
    [call] = channels.live_calls(store)
    assert call.call_id == "old-1" and call.rate is None and call.reserved == 20_000
    engine.recover(now=30.0)
    assert cdrs.page(store, prof.id)[-1].cost == 20_000 and channels.in_use(store, prof.id) == 0
