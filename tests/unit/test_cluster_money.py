"""A cluster node's money without an engine (docs/cluster.md "Money across nodes"): the credit engine
in journaled mode prices slices and moves no balance, and the agent's ledger writer turns a journal's
movements into ledger entries so that balance = ledger on every node."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest

from edge.cluster import journal as j
from edge.cluster import outbox
from edge.cluster.channels import survivor_cdr
from edge.cluster.money import MARKS, SYNC_KIND, _write_cdrs, _write_ledger
from edge.cluster.remote import RemoteCalls
from edge.control import accounts, cdrs, channels, ledger, profiles, rates, webhooks
from edge.control.credit import CreditEngine
from edge.control.models import Cdr, LiveCall, Rate
from edge.control.store import Store, Txn

UK = Rate(prefix="44", rate=20_000, connect_fee=0, min_seconds=60, increment_seconds=6)    # 0.02/min


@pytest.fixture
def store(tmp_path) -> Iterator[Store]:
    s = Store(tmp_path, map_size=64 << 20, durable=False)
    rates.replace(s, [UK])
    yield s
    s.close()


def a_profile(store: Store, balance: int = 0) -> str:
    acct = accounts.create(store, "A", "a")
    ledger.top_up(store, acct.id, 10_000_000)
    prof, _ = profiles.create(store, acct.id, "P", 4, realm="sip.edge.test")
    if balance:
        ledger.allocate(store, prof.id, balance)
    return prof.id


def live_call(profile_id: str) -> LiveCall:
    return LiveCall(call_id="c1", profile_id=profile_id, direction="outgoing", started_at=0.0, caller="u",
                    callee="+442071234567", funding="credit", rate=UK)


def test_journaled_admission_leaves_the_verdict_to_the_journal(store: Store) -> None:
    engine = CreditEngine(store, journaled=True)
    prof = profiles.get(store, a_profile(store))        # 0 here: another node's credit may be in the journal
    assert engine.admit(prof, "+442071234567").ok
    assert engine.admit(prof, "+81312345678").reason == "no_rate"


def test_a_journaled_call_is_priced_from_what_the_journal_reserved_and_moves_no_balance(store: Store) -> None:
    settled: list[tuple[str, int]] = []
    engine = CreditEngine(store, slice_seconds=60, journaled=True,
                          on_settle=lambda txn, call, cost: settled.append((call.call_id, cost)))
    profile_id = a_profile(store, balance=500_000)
    call = live_call(profile_id)
    assert engine.next_slice(call, UK) == (60, 20_000)               # the first slice: 60 s for 0.02
    assert engine.next_slice(call, UK, balance=12_000) == (0, 0)     # less than the 60 s minimum
    store.write(lambda txn: txn.put("calls", b"x", call))
    call.reserved = 20_000                                           # what the journal reserved at INVITE
    call.answered_at = 100.0
    assert store.write(lambda txn: engine.extend(txn, call, UK, 100.0)) == 160.0
    # the next slice, as much as a balance of 0.01 covers beside the 0.02 held: 30 s more for 0.01
    seconds, amount = engine.next_slice(call, UK, balance=10_000)
    assert (seconds, amount) == (90, 10_000)
    assert store.write(lambda txn: engine.funded(txn, call, seconds, amount)) == 190.0
    assert call.reserved == 30_000
    cdr = store.write(lambda txn: engine.settle(txn, call, UK, 175.0, status=200, end_reason="caller_bye"))
    assert cdr.cost == 26_000 and settled == [("c1", 26_000)]
    assert profiles.get(store, profile_id).balance == 500_000        # the agent writes the journal's movements
    assert [e.kind for e in ledger.entries(store, f"profile:{profile_id}")] == ["allocate_in"]


def fold(journal: j.ProfileJournal, *events: j.ProfileEvent) -> None:
    for event in events:
        slot = journal.state.slot + 1
        journal._fold(journal.state.last_seq + 10, journal.slot_subject(slot), msgspec.json.encode(event), None)


def ledger_kinds(store: Store, profile_id: str) -> list[tuple[str, int]]:
    return [(e.kind, e.amount) for e in ledger.entries(store, f"profile:{profile_id}")]


def test_the_ledger_follows_the_journal_and_balance_equals_ledger(store: Store) -> None:
    profile_id = a_profile(store, balance=300_000)
    journal = j.ProfileJournal(None, profile_id)   # type: ignore[arg-type]   (folded here, no engine)
    fold(journal, j.Credit("enrol", 300_000, "enrol"), j.Reserve("c1", "edge-a.1", 20_000, 4))

    def write(txn: Txn) -> None:
        _write_ledger(txn, f"p:{profile_id}", journal)

    store.write(write)      # the first write: the node's balance was the enrolment's, plus the reservation
    assert profiles.get(store, profile_id).balance == 280_000
    assert ledger_kinds(store, profile_id)[-1] == (SYNC_KIND, -20_000)
    fold(journal, j.Extend("c1", 1, 20_000), j.Settle("c1", 26_000, False), j.TransferIn("t1", "acc", 50_000))
    store.write(write)
    assert ledger_kinds(store, profile_id)[-4:] == [
        ("reserve", -20_000), ("release", 40_000), ("call", -26_000), ("allocate_in", 50_000)]
    assert profiles.get(store, profile_id).balance == journal.balance == 324_000
    store.write(write)      # nothing new: nothing written twice
    assert len(ledger_kinds(store, profile_id)) == 6
    balance, total = ledger.audit(store)[f"profile:{profile_id}"]
    assert balance == total == 324_000
    assert store.read(lambda txn: int.from_bytes(txn.get_raw(MARKS, f"p:{profile_id}".encode()) or b"", "big")) \
        == journal.state.last_seq


def test_a_ledger_that_differs_from_the_journal_is_brought_to_it(store: Store) -> None:
    profile_id = a_profile(store, balance=100_000)
    journal = j.ProfileJournal(None, profile_id)   # type: ignore[arg-type]
    fold(journal, j.Credit("enrol", 100_000, "enrol"))
    store.write(lambda txn: _write_ledger(txn, f"p:{profile_id}", journal))
    # something spent here behind the journal's back (an older build): the journal's movements no longer fit
    store.write(lambda txn: ledger.move(txn, profiles.get(txn, profile_id), -90_000, "call", "x"))
    fold(journal, j.Reserve("c2", "edge-a.1", 60_000, 4))
    store.write(lambda txn: _write_ledger(txn, f"p:{profile_id}", journal))
    assert profiles.get(store, profile_id).balance == journal.balance == 40_000
    balance, total = ledger.audit(store)[f"profile:{profile_id}"]
    assert balance == total


def test_the_outbox_carries_the_cost_to_the_journal(store: Store) -> None:
    call = live_call(a_profile(store))
    store.write(lambda txn: outbox.add(txn, call, 26_000))
    assert outbox.pending(store) == [(call.profile_id, "c1", 26_000, None, False)]


def test_a_cluster_nodes_cdrs_wait_in_the_outbox_for_the_journal(store: Store) -> None:
    engine = CreditEngine(store, journaled=True, on_settle=outbox.add, hold_cdr=outbox.hold_cdr)
    profile_id = a_profile(store, balance=500_000)
    settled = live_call(profile_id)
    store.write(lambda txn: engine.settle(txn, settled, UK, 0.0, status=500, end_reason="recovery"))
    refused = Cdr(seq=0, call_id="c2", profile_id=profile_id, direction="outgoing", caller="1001",
                  callee="+442071234567", started_at=1.0, answered_at=None, ended_at=1.0, duration=0, status=402,
                  end_reason="credit")
    store.write(lambda txn: outbox.hold_cdr(txn, refused, refused=True))
    assert cdrs.page(store, profile_id) == []                         # none written here: the journal's
    items = outbox.pending(store)
    assert [(i.call_id, i.refused, i.cdr.end_reason if i.cdr else None) for i in items] == [
        ("c1", False, "recovery"), ("c2", True, "credit")]
    outbox.done(store, items)
    assert outbox.pending(store) == [] and store.read(lambda txn: txn.entries(outbox.CDRS)) == 0
    assert cdrs.page(store, profile_id) == []


def test_every_node_writes_the_journals_cdrs_numbered_by_the_stream(store: Store) -> None:
    profile_id = a_profile(store)
    account_id = profiles.get(store, profile_id).account_id
    webhooks.create(store, account_id, "https://hooks.example.com/x", ["call.ended"])
    journal = j.ProfileJournal(None, profile_id)     # type: ignore[arg-type]  # folded by hand: no engine
    cdr = survivor_cdr(j.OpenCall("c1", "edge-b.e1", 0, 0, 1), None, 0, now=10.0)
    cdr.profile_id, cdr.account_id = profile_id, account_id
    enc = msgspec.json.encode
    journal._fold(7, f"{journal.subject}.1", enc(j.Reserve("c1", "edge-b.e1", 0, 4)), None)
    journal._fold(9, f"{journal.subject}.2", enc(j.Settle("c1", 0, True, "edge-a.e2", cdr)), None)
    journal._fold(12, f"{journal.subject}.3", enc(j.Refused("c3", cdr, "edge-b.e1")), None)
    store.write(lambda txn: _write_cdrs(txn, f"p:{profile_id}", journal, "edge-a"))
    page = cdrs.page(store, profile_id)
    assert [(c.seq, c.call_id) for c in page] == [(9 * j.CDR_SPAN, "c1"), (12 * j.CDR_SPAN, "c1")]
    # the settling node (edge-a) sends call.ended of the settlement; a refused attempt's sends none
    assert [e.type for e in webhooks.pending(store)] == ["call.ended"]
    elsewhere = Store(store.path.parent / "other", map_size=64 << 20, durable=False)
    try:                             # another node only stores the CDR
        elsewhere.write(lambda txn: txn.put("profiles", profile_id.encode(), profiles.get(store, profile_id)))
        elsewhere.write(lambda txn: _write_cdrs(txn, f"p:{profile_id}", journal, "edge-c"))
        assert [c.seq // j.CDR_SPAN for c in cdrs.page(elsewhere, profile_id)] == [9, 12]
        assert webhooks.pending(elsewhere) == []
    finally:
        elsewhere.close()
    store.write(lambda txn: _write_ledger(txn, f"p:{profile_id}", journal))   # the mark moves to seq 12
    journal.take_cdrs(journal.state.last_seq)
    assert journal.cdrs() == []
    journal._fold(15, f"{journal.subject}.4", enc(j.Refused("c4", cdr)), None)
    store.write(lambda txn: _write_cdrs(txn, f"p:{profile_id}", journal, "edge-a"))
    assert [c.seq // j.CDR_SPAN for c in cdrs.page(store, profile_id)] == [9, 12, 15]   # only what is past the mark


def test_a_survivors_cdr_is_its_dead_nodes_call_billed_to_its_funded_time() -> None:
    opened = j.OpenCall("c1", "edge-b.e1", 40_000, 1, 7, "outgoing", "1001", "+442071234567", 90.0)
    record = live_call("prf_1")
    record.started_at, record.answered_at, record.funded_until = 90.0, 100.0, 220.0
    cdr = survivor_cdr(opened, record, 40_000, now=150.0)       # died at 150: billed as its node would
    assert (cdr.ended_at, cdr.duration, cdr.cost, cdr.status, cdr.end_reason) == (150.0, 60, 40_000, 200, "recovery")
    assert cdr.rate_prefix == "44" and cdr.callee == "+442071234567"
    ringing = survivor_cdr(opened, None, 0, now=150.0)            # never published: not answered
    assert (ringing.answered_at, ringing.duration, ringing.cost, ringing.status) == (None, 0, 0, 500)
    assert (ringing.caller, ringing.callee, ringing.started_at) == ("1001", "+442071234567", 90.0)


def test_the_other_nodes_calls_are_the_journals_open_ones_with_their_published_records(store: Store) -> None:
    profile_id = a_profile(store)
    moved: list[str] = []
    seen = RemoteCalls(None, "sipedge_calls", "edge-a", moved.append)   # type: ignore[arg-type]  # no engine
    journal = j.ProfileJournal(None, profile_id)     # type: ignore[arg-type]
    enc = msgspec.json.encode
    journal.state.balance = 1_000                              # (as if credited)
    journal._fold(3, f"{journal.subject}.1", enc(j.Reserve("c1", "edge-b.e1", 500, 4, "outgoing", "1001",
                                                           "+442071234567", 90.0)), None)
    journal._fold(4, f"{journal.subject}.2", enc(j.Reserve("c2", "edge-b.e1", 0, 4)), None)
    journal._fold(5, f"{journal.subject}.3", enc(j.Reserve("c3", "edge-a.e7", 0, 4)), None)   # this node's own
    answered = live_call(profile_id)
    answered.answered_at = 95.0
    seen.folded("$KV.sipedge_calls.edge-b.e1.c1", msgspec.msgpack.encode(answered), None)
    seen.folded("$KV.sipedge_calls.edge-a.e7.c3", msgspec.msgpack.encode(answered), None)     # own: ignored
    seen.folded("$KV.sipedge_calls.edge-b.e1.c9", b"\xc1garbage", None)                       # unreadable: ignored
    assert moved == [profile_id] and list(seen.records) == ["edge-b.e1.c1"]
    store.write(lambda txn: seen.write(txn, journal))
    rows = channels.remote_calls(store, profile_id)
    assert [(r.node, r.call.call_id, r.call.answered_at, r.call.reserved) for r in rows] == [
        ("edge-b", "c1", 95.0, 500), ("edge-b", "c2", None, 0)]
    assert channels.find_remote(store, "c2").node == "edge-b"
    # c1 ends: its Settle leaves the journal's open calls, its record's delete marker the bucket
    journal._fold(6, f"{journal.subject}.4", enc(j.Settle("c1", 0)), None)
    seen.folded("$KV.sipedge_calls.edge-b.e1.c1", b"", "DEL")
    store.write(lambda txn: seen.write(txn, journal))
    assert [r.call.call_id for r in channels.remote_calls(store)] == ["c2"]
    assert seen.records == {}
