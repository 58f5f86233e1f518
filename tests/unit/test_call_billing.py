"""Billing (edge/calls/billing.py) on a real store and an injected clock.

Slices are funded before they run out, a call is cut exactly at the end of its funded
time, settlement returns the unused reservation and writes one CDR, auto-recharge runs
mid-call, bundles pay before credit (never for excluded prefixes), and a store that
cannot write ends the call instead of letting it run unfunded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sipfakes import FakeLoop

from edge.calls.billing import Billing
from edge.calls.model import Call, Direction, EndReason, Funding, Reject
from edge.control import accounts, cdrs, channels, ledger, profiles
from edge.control.credit import CreditEngine
from edge.control.errors import StoreUnavailable
from edge.control.models import AutoRecharge, LiveCall, Rate
from edge.control.store import Store

UK = Rate(prefix="44", rate=20_000, min_seconds=60, increment_seconds=6)       # 0.02 per minute
US = Rate(prefix="1", rate=10_000, min_seconds=60, increment_seconds=6)


class Rig:
    def __init__(self, tmp: Path, *, max_call_seconds: float = 3600) -> None:
        self.store = Store(tmp / "db", map_size=32 << 20, durable=False)
        self.loop = FakeLoop()
        self.hangups: list[tuple[float, str, EndReason, int]] = []
        self.flushes = 0
        self.billing = Billing(self.store, CreditEngine(self.store, slice_seconds=60), self.loop,
                               hangup=self.hangup, flush_soon=self.flush, max_call_seconds=max_call_seconds,
                               wall=self.loop.time)
        acct = accounts.create(self.store, "Acme", "acme.admin")
        ledger.top_up(self.store, acct.id, 100_000_000)
        self.account = acct

    def hangup(self, call: Call, reason: EndReason, *, status: int = 480, reason_header: str | None = None) -> None:
        self.hangups.append((self.loop.time(), call.id, reason, status))
        self.end(call, 200 if status == 480 else status, reason)

    def flush(self) -> None:
        self.flushes += 1

    def profile(self, credit: int, **auto: Any) -> str:
        prof, _ = profiles.create(self.store, self.account.id, "HQ", 4, realm="sip.edge.test")
        ledger.allocate(self.store, prof.id, credit)
        if auto:
            ledger.set_auto_recharge(self.store, prof.id, AutoRecharge(enabled=True, **auto))
        return prof.id

    def answered(self, profile_id: str, funding: Funding = Funding.CREDIT, rate: Rate | None = UK,
                 callee: str = "+442071234567") -> Call:
        prof = profiles.get(self.store, profile_id)
        call = Call(f"c{len(self.hangups)}-{self.loop.time()}", Direction.OUTGOING, prof, caller=prof.sip_username,
                    callee=callee, funding=funding, rate=rate)
        live = LiveCall(call_id=call.id, profile_id=prof.id, direction="outgoing", started_at=self.loop.time(),
                        caller=prof.sip_username, callee=callee, funding=funding.value, rate=rate)
        assert channels.take(self.store, prof.id, live)
        call.live = live
        self.billing.call_answered(call)
        return call

    def end(self, call: Call, status: int = 200, reason: EndReason = EndReason.CALLER_BYE) -> None:
        self.billing.call_ended(call, status, reason, {"a_packets": 50})

    def balance(self, profile_id: str) -> int:
        return profiles.get(self.store, profile_id).balance

    def kinds(self, profile_id: str) -> list[str]:
        return [e.kind for e in ledger.entries(self.store, f"profile:{profile_id}")]

    def balanced(self) -> bool:
        return all(stored == total for stored, total in ledger.audit(self.store).values())


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_a_slice_is_funded_at_answer_and_the_next_one_before_it_runs_out(rig: Rig) -> None:
    pid = rig.profile(1_000_000)
    rig.answered(pid)
    assert rig.kinds(pid)[-1] == "reserve" and rig.balance(pid) == 1_000_000 - 20_000  # 60 s at 0.02/min
    rig.loop.advance(54)
    assert rig.kinds(pid).count("reserve") == 1
    rig.loop.advance(2)   # 5 s before the funded time: the next slice
    assert rig.kinds(pid).count("reserve") == 2 and rig.balance(pid) == 1_000_000 - 40_000
    assert rig.hangups == []


def test_the_call_is_cut_exactly_when_the_funded_time_runs_out(rig: Rig) -> None:
    pid = rig.profile(30_000)           # pays 90 s: 60 s, then 30 s more in 6 s increments
    call = rig.answered(pid)
    start = rig.loop.time()
    rig.loop.advance(200)
    assert [(t - start, r) for t, _, r, _ in rig.hangups] == [(90.0, EndReason.CREDIT_EXHAUSTED)]
    cdr = cdrs.page(rig.store, pid)[-1]
    assert cdr.call_id == call.id and cdr.duration == 90 and cdr.cost == 30_000
    assert rig.balance(pid) == 0 and rig.balanced()


def test_settlement_returns_the_rest_frees_the_channel_one_cdr(rig: Rig) -> None:
    pid = rig.profile(1_000_000)
    call = rig.answered(pid)
    rig.loop.advance(30.2)
    rig.end(call)
    assert channels.in_use(rig.store, pid) == 0
    (cdr,) = cdrs.page(rig.store, pid)
    assert (cdr.duration, cdr.cost, cdr.end_reason, cdr.media) == (60, 20_000, "caller_bye", {"a_packets": 50})
    assert rig.kinds(pid)[-3:] == ["reserve", "release", "call"]
    assert rig.balance(pid) == 1_000_000 - 20_000 and rig.balanced() and rig.flushes == 1
    rig.loop.advance(3600)
    assert rig.hangups == []  # no timer of an ended call fires


def test_auto_recharge_runs_in_the_middle_of_a_call(rig: Rig) -> None:
    pid = rig.profile(25_000, amount=1_000_000, min_balance=20_000)
    call = rig.answered(pid)  # the first slice leaves 5,000 < 20,000: recharged at once
    assert "auto_recharge_in" in rig.kinds(pid) and rig.balance(pid) == 1_005_000
    rig.loop.advance(300)
    assert rig.hangups == []  # funded on from the recharged balance
    rig.end(call)
    assert rig.balanced()


def test_bundle_minutes_pay_first_no_money_moves(rig: Rig) -> None:
    pid = rig.profile(1_000_000)
    profiles.set_bundles(rig.store, pid, 1)
    call = rig.answered(pid, Funding.BUNDLE, US, "+14155550123")
    assert rig.balance(pid) == 1_000_000 and "reserve" not in rig.kinds(pid)
    rig.loop.advance(100)
    rig.end(call)
    cdr = cdrs.page(rig.store, pid)[-1]
    assert cdr.cost == 0 and cdr.bundle_seconds == cdr.duration == 102  # 100 s up to the 6 s increment
    assert rig.balance(pid) == 1_000_000 and rig.balanced()


def test_an_excluded_prefix_is_paid_from_credit(rig: Rig) -> None:
    pid = rig.profile(1_000_000)
    profiles.set_bundles(rig.store, pid, 1)
    call = rig.answered(pid, Funding.CREDIT, US, "+12186321234")  # admission decided: excluded
    rig.loop.advance(30)
    rig.end(call)
    cdr = cdrs.page(rig.store, pid)[-1]
    assert cdr.bundle_seconds == 0 and cdr.cost == 10_000


def test_free_calls_end_at_the_longest_call(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_call_seconds=100)
    pid = rig.profile(0 + 1)
    call = rig.answered(pid, Funding.FREE, None, "+17606604690")
    rig.loop.advance(99)
    assert rig.hangups == []
    rig.loop.advance(2)
    assert rig.hangups[0][1:3] == (call.id, EndReason.MAX_DURATION)
    assert cdrs.page(rig.store, pid)[-1].cost == 0


def test_balance_spent_since_admission_refuses_the_answer(rig: Rig) -> None:
    pid = rig.profile(1)  # less than one increment
    call = rig.answered(pid)
    assert rig.hangups and rig.hangups[0][1:] == (call.id, EndReason.CREDIT, 402)
    assert cdrs.page(rig.store, pid)[-1].cost == 0 and rig.balanced()


def test_a_store_that_cannot_write_at_answer_ends_the_call(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    pid = rig.profile(1_000_000)
    real = rig.store.write
    broken = {"on": True}

    def write(fn: Any, **kw: Any) -> Any:
        if broken["on"] and not kw.get("sync", True) and kw.get("grows") is False:
            broken["on"] = False
            raise StoreUnavailable("disk I/O error")
        return real(fn, **kw)

    monkeypatch.setattr(rig.store, "write", write)
    call = rig.answered(pid)
    assert rig.hangups[0][1:] == (call.id, EndReason.STORE_ERROR, 503)
    assert channels.in_use(rig.store, pid) == 0 and rig.balance(pid) == 1_000_000  # nothing spent, nothing held


def test_a_failed_settlement_keeps_the_channel_and_is_retried(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    pid = rig.profile(1_000_000)
    call = rig.answered(pid)
    real = rig.store.write
    fails = {"n": 2}

    def write(fn: Any, **kw: Any) -> Any:
        if fails["n"]:
            fails["n"] -= 1
            raise StoreUnavailable("disk I/O error")
        return real(fn, **kw)

    monkeypatch.setattr(rig.store, "write", write)
    rig.loop.advance(10)
    rig.end(call)
    assert rig.billing.unsettled == 1 and channels.in_use(rig.store, pid) == 1  # not silently lost
    rig.loop.advance(1.1)
    assert rig.billing.unsettled == 1  # the second attempt failed too
    rig.loop.advance(1.1)
    assert rig.billing.unsettled == 0 and channels.in_use(rig.store, pid) == 0
    assert len(cdrs.page(rig.store, pid)) == 1 and rig.balanced()


def test_a_refused_attempt_is_recorded(rig: Rig) -> None:
    pid = rig.profile(1)
    prof = profiles.get(rig.store, pid)
    rig.billing.call_refused("c-r", Direction.OUTGOING, prof, prof.sip_username, "+442071234567",
                             Reject("credit", 402, "insufficient credit", record=True))
    (cdr,) = cdrs.page(rig.store, pid)
    assert (cdr.call_id, cdr.status, cdr.end_reason, cdr.duration, cdr.cost) == ("c-r", 402, "credit", 0, 0)
    assert (cdr.account_id, cdr.carrier) == (rig.account.id, "")       # refused before any carrier was tried


GW_A, GW_B = "sip:gw-a.carrier.example", "sip:gw-b.carrier.example"


def seized(rig: Rig, pid: str, call_id: str, carrier: str) -> Call:
    """An outgoing call holding a channel whose current outbound attempt is ``carrier``."""
    prof = profiles.get(rig.store, pid)
    call = Call(call_id, Direction.OUTGOING, prof, caller=prof.sip_username, callee="+442071234567",
                funding=Funding.CREDIT, rate=UK)
    call.live = LiveCall(call_id=call.id, profile_id=pid, direction="outgoing", started_at=rig.loop.time(),
                         caller=prof.sip_username, callee="+442071234567", funding="credit", rate=UK)
    assert channels.take(rig.store, pid, call.live)
    call.attempt = carrier
    return call


def test_the_cdr_names_the_carrier_that_answered(rig: Rig) -> None:
    pid = rig.profile(1_000_000)
    call = seized(rig, pid, "c-gw", GW_B)        # GW_A failed over to GW_B, which answered
    rig.billing.call_answered(call)
    assert channels.find_call(rig.store, call.id).carrier == GW_B   # stored with the answer (recovery)
    rig.loop.advance(10)
    rig.end(call)
    (cdr,) = cdrs.page(rig.store, pid)
    assert (cdr.carrier, cdr.account_id) == (GW_B, rig.account.id)


def test_an_unanswered_call_names_the_last_carrier_tried(rig: Rig) -> None:
    pid = rig.profile(1_000_000)
    call = seized(rig, pid, "c-busy", GW_A)
    rig.billing.call_ended(call, 486, EndReason.CARRIER_FAILURE, {})
    (cdr,) = cdrs.page(rig.store, pid)
    assert (cdr.carrier, cdr.status, cdr.answered_at, cdr.cost) == (GW_A, 486, None, 0)


def test_a_recovered_call_names_its_carrier(rig: Rig) -> None:
    pid = rig.profile(1_000_000)
    call = seized(rig, pid, "c-crash", GW_A)
    rig.billing.call_answered(call)
    # the process dies here: the next start settles the call from its stored record
    (recovered,) = rig.billing.recover()
    (cdr,) = cdrs.page(rig.store, pid)
    assert recovered.call_id == call.id and (cdr.end_reason, cdr.carrier) == ("recovery", GW_A)
    assert rig.balanced()
