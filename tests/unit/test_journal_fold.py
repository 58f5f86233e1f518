"""The journal's fold rules alone (edge/cluster/journal.py), without an engine: what each
event means for a profile's channels and money, and what is refused. The engine side is
tests/cluster/test_journal.py."""

from __future__ import annotations

import msgspec
import pytest

from edge.cluster.journal import (
    CALL_HORIZON,
    CDR_SPAN,
    AccountCredit,
    AccountState,
    AlreadyApplied,
    AlreadySettled,
    ChannelsBusy,
    Credit,
    Extend,
    InsufficientCredit,
    InvalidEvent,
    ProfileJournal,
    ProfileState,
    Refused,
    Reserve,
    Settle,
    Settled,
    Settlements,
    TransferIn,
    TransferOut,
    UnknownCall,
    apply_account,
    apply_profile,
    check_profile,
    prune,
    validate,
)
from edge.control.models import Cdr


def fold(*events: object) -> tuple[ProfileState, int]:
    state = ProfileState("p1")
    total = 0
    for seq, ev in enumerate(events, start=1):
        total += sum(e.amount for e in apply_profile(state, ev, seq))  # type: ignore[arg-type]
    return state, total


def test_a_call_reserves_extends_and_settles_like_the_single_node_ledger() -> None:
    state, total = fold(Credit("t", 1_000_000), Reserve("c", "edge-a", 0, 2), Extend("c", 1, 300_000),
                        Extend("c", 2, 300_000), Settle("c", 450_000))
    assert state.balance == total == 550_000
    assert state.calls == {} and state.settled["c"] == Settled(5, 450_000, False) and state.slot == 5
    assert state.last_seq == 5


def test_refusals_leave_the_state_unchanged() -> None:
    state, _ = fold(Credit("t", 1_000), Reserve("a", "n", 400, 2), Reserve("b", "n", 0, 2))
    before = (state.balance, dict(state.keys), set(state.calls), state.last_seq)
    cases: list[tuple[object, type[Exception]]] = [
        (Reserve("c", "n", 0, 2), ChannelsBusy),                 # 2 of 2 channels in use
        (Extend("a", 1, 601), InsufficientCredit),
        (Extend("a", 2, 1), InvalidEvent),                       # slices come in order
        (Extend("zz", 1, 1), UnknownCall),
        (Settle("a", 401), InvalidEvent),                        # never more than was reserved
        (Credit("t", 5), AlreadyApplied),                        # an entry id moves money once
        (Reserve("a", "n", 0, 9), AlreadyApplied),               # a call id is used once
        (Credit("u", -1_001), InsufficientCredit),
    ]
    for event, error in cases:
        with pytest.raises(error):
            apply_profile(state, event, 99)  # type: ignore[arg-type]
    assert (state.balance, dict(state.keys), set(state.calls), state.last_seq) == before
    apply_profile(state, Settle("a", 100), 4)
    with pytest.raises(AlreadySettled) as exc:
        apply_profile(state, Settle("a", 0, recovery=True), 5)
    assert exc.value.settle == Settle("a", 100)


@pytest.mark.parametrize("event", [Credit("x", 0), Credit("x", 1.5), Reserve("c", "n", True, 3),  # type: ignore[arg-type]
                                   Reserve("c", "n", -1, 3), Reserve("c", "n", 0, 0), Extend("c", 0, 5),
                                   Extend("c", 1, 0), Settle("c", -1), TransferIn("t", "a", 0),
                                   TransferOut("t", "p", -5), AccountCredit("e", 0)])
def test_invalid_events_are_refused_before_any_request(event: object) -> None:
    with pytest.raises(InvalidEvent):
        validate(event)  # type: ignore[arg-type]


def test_account_transfers_spend_the_master_balance_once() -> None:
    acct = AccountState("a1")
    apply_account(acct, AccountCredit("top", 100), 1)
    apply_account(acct, TransferOut("t1", "p1", 60), 2)
    with pytest.raises(InsufficientCredit):
        apply_account(acct, TransferOut("t2", "p1", 41), 3)
    with pytest.raises(AlreadyApplied):
        apply_account(acct, TransferOut("t1", "p1", 1), 3)
    assert acct.balance == 40 and list(acct.transfers) == ["t1"]
    prof, _ = fold(TransferIn("t1", "a1", 60))
    with pytest.raises(AlreadyApplied):
        apply_profile(prof, TransferIn("t1", "a1", 60), 2)
    assert prof.balance + acct.balance == 100


def test_a_settled_call_is_remembered_for_a_horizon_of_slots_then_still_refused() -> None:
    state, _ = fold(Credit("t", 10), Reserve("old", "n", 0, 1), Settle("old", 0))
    for n in range(CALL_HORIZON):
        apply_profile(state, Credit(f"e{n}", 1), 4 + n)
    prune(state)
    assert "old" not in state.settled
    with pytest.raises(UnknownCall):            # forgotten, but a late settle still moves nothing
        apply_profile(state, Settle("old", 0), 10**6)


def test_a_refused_attempt_moves_nothing_and_the_written_entries_are_forgotten() -> None:
    journal = ProfileJournal(None, "p1")    # type: ignore[arg-type]   (folded here, no engine)
    cdr = Cdr(seq=0, call_id="c9", profile_id="p1", direction="outgoing", caller="", callee="+1", started_at=1.0,
              answered_at=None, ended_at=1.0, duration=0, status=402, end_reason="credit")
    events = [Credit("t1", 1_000), Reserve("c1", "n", 300, 2), Refused("c9", cdr), Settle("c1", 120)]
    for slot, ev in enumerate(events, start=1):
        journal._fold(10 + slot, f"{journal.subject}.{slot}", msgspec.json.encode(ev), None)
    assert journal.balance == 880 and journal.state.slot == 4 and journal.state.channels_in_use == 0
    assert [n // CDR_SPAN for n, _ in journal.cdrs()] == [13]    # the refused attempt's CDR, nothing else moved
    assert sum(e.amount for e in journal.entries()) == journal.balance
    journal.forget_entries(12)              # the ledger has the credit and the reservation
    assert [e.kind for e in journal.entries()] == ["opening", "release", "call"]
    assert sum(e.amount for e in journal.entries()) == journal.balance == 880
    assert [e.kind for e in journal.entries_after(12)] == ["release", "call"]
    journal.forget_entries(14)
    assert [(e.kind, e.amount) for e in journal.entries()] == [("opening", 880)] and journal.entries_after(14) == []


def test_settlements_settle_several_calls_in_one_slot_each_as_alone() -> None:
    state, _ = fold(Credit("t", 1_000), Reserve("c1", "n", 100, 9), Reserve("c2", "n", 200, 9),
                    Reserve("c3", "n", 0, 9))
    batch = Settlements([Settle("c1", 60), Settle("c2", 0, by="n.e")])
    entries = apply_profile(state, batch, 5)
    assert (state.slot, state.balance, sorted(state.calls)) == (5, 940, ["c3"])
    assert [(e.kind, e.amount) for e in entries] == [("release", 100), ("call", -60), ("release", 200)]
    assert state.settled["c1"].slot == state.settled["c2"].slot == 5
    with pytest.raises(AlreadySettled):         # one of them settled before: the whole event is refused
        check_profile(state, Settlements([Settle("c3", 0), Settle("c2", 0)]))
    with pytest.raises(InvalidEvent):
        validate(Settlements([Settle("c3", 0), Settle("c3", 0)]))
    with pytest.raises(InvalidEvent):
        validate(Settlements([]))
    assert (state.slot, sorted(state.calls)) == (5, ["c3"])


def test_a_settlements_events_cdrs_are_numbered_apart() -> None:
    journal = ProfileJournal(None, "p1")    # type: ignore[arg-type]   (folded here, no engine)
    cdr = Cdr(seq=0, call_id="c1", profile_id="p1", direction="outgoing", caller="", callee="+1", started_at=1.0,
              answered_at=None, ended_at=1.0, duration=0, status=500, end_reason="recovery")
    events = [Reserve("c1", "n", 0, 2), Reserve("c2", "n", 0, 2), Settlements([Settle("c1", 0, cdr=cdr),
                                                                             Settle("c2", 0, cdr=cdr)])]
    for slot, ev in enumerate(events, start=1):
        journal._fold(20 + slot, f"{journal.subject}.{slot}", msgspec.json.encode(ev), None)
    assert [n for n, _ in journal.cdrs()] == [23 * CDR_SPAN, 23 * CDR_SPAN + 1]
    journal.take_cdrs(23)
    assert journal.cdrs() == []
