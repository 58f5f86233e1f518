"""Provisioning through the engine without an engine (docs/cluster.md "Provisioning on any node"): a
cluster node's API write is recorded and aborted, its rows of the cluster's tables go out as one change
for the next slot, and every node applies the changes in slot order, keeping its own balances. Here a
stand-in for the agents and the stream (:class:`Stream`) takes the place of link + engine; the real
ones are tested in tests/cluster/test_node_provisioning.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec
import pytest

from edge.cluster import link, provisioning
from edge.cluster.provisioning import MARK, Change, RecordingTxn, Replicator, _apply_change
from edge.control import accounts, console_auth, numbers, profiles, registrations
from edge.control.errors import ClusterUnavailable, NumberTaken
from edge.control.models import Profile, Registration
from edge.control.store import Store, Txn


class Stream:
    """The stream of changes and every node's agent: a change lands in the next slot only."""

    def __init__(self, *stores: Store) -> None:
        self.stores = list(stores)
        self.changes: list[Change] = []
        self.before_next: Callable[[], None] | None = None   # runs before the next change is judged

    def ask(self, _address: str, request: link.Provision, _timeout: float) -> link.Reply:
        if self.before_next is not None:
            hook, self.before_next = self.before_next, None
            hook()
        if request.slot != len(self.changes) + 1:
            return link.Reply(request.id, link.BUSY)
        self.changes.append(msgspec.msgpack.decode(request.change, type=Change))
        for store in self.stores:
            self.apply(store)
        return link.Reply(request.id, link.OK, slot=request.slot)

    def apply(self, store: Store) -> None:
        def op(txn: Txn) -> None:
            for slot in range(txn.get_u64("meta", MARK) + 1, len(self.changes) + 1):
                _apply_change(txn, self.changes[slot - 1], ([], []))
                txn.put_u64("meta", MARK, slot)

        store.write_here(op, grows=False)


@pytest.fixture
def two(tmp_path, monkeypatch) -> Iterator[tuple[Store, Store, Stream]]:
    a = Store(tmp_path / "a", map_size=64 << 20, durable=False)
    b = Store(tmp_path / "b", map_size=64 << 20, durable=False)
    stream = Stream(a, b)
    monkeypatch.setattr(link, "ask_blocking", stream.ask)
    a.replicator = Replicator(a, "\0unused-a")
    b.replicator = Replicator(b, "\0unused-b")
    yield a, b, stream
    a.close()
    b.close()


def test_a_write_of_the_clusters_tables_lands_on_every_node_as_one_change(two) -> None:
    a, b, stream = two
    acct = accounts.create(a, "Acme", "acme.admin")
    prof, password = profiles.create(a, acct.id, "PBX", 4, realm="sip.edge.test")
    assert len(stream.changes) == 2 and provisioning.applied(a) == provisioning.applied(b) == 2
    for store in (a, b):
        assert accounts.get(store, acct.id) == acct
        assert profiles.get(store, prof.id).sip_username == prof.sip_username
        cred = store.read(lambda txn: txn.get_raw("credentials", prof.sip_username.encode()))
        assert cred is not None
    # the SIP username counter is the cluster's: the next profile on the other node gets the next one
    second, _ = profiles.create(b, acct.id, "PBX 2", 2, realm="sip.edge.test")
    assert int(second.sip_username) == int(prof.sip_username) + 1


def test_a_write_that_lost_its_slot_runs_again_on_the_state_that_won(two) -> None:
    a, b, stream = two
    acct = accounts.create(a, "Acme", "acme.admin")
    other = accounts.create(b, "Other", "other.admin")
    # while A's purchase is on its way, B sells the number first: A's change finds the slot taken,
    # waits for B's change here and runs again -- now the number is taken
    stream.before_next = lambda: numbers.buy(b, other.id, "+442070000001")
    with pytest.raises(NumberTaken):
        numbers.buy(a, acct.id, "+442070000001")
    for store in (a, b):
        assert [n.account_id for n in numbers.of_account(store, other.id)] == [other.id]
        assert numbers.of_account(store, acct.id) == []
    assert a.replicator.conflicts == 1          # type: ignore[union-attr]


def test_an_applied_record_keeps_the_balance_of_the_node(two) -> None:
    a, b, _ = two
    acct = accounts.create(a, "Acme", "acme.admin")
    prof, _ = profiles.create(a, acct.id, "PBX", 4, realm="sip.edge.test")

    def fund(txn: Txn) -> None:         # what the money journal's ledger writer does on B
        p = profiles.get(txn, prof.id)
        p.balance = 5_000_000
        txn.put("profiles", p.id.encode(), p)

    b.write_here(fund)
    profiles.update(a, prof.id, {"name": "Renamed", "channels": 2})
    here = profiles.get(b, prof.id)
    assert (here.name, here.channels, here.balance) == ("Renamed", 2, 5_000_000)
    assert profiles.get(a, prof.id).balance == 0


def test_console_sessions_are_the_clusters_and_a_new_password_ends_them_everywhere(two) -> None:
    a, b, stream = two
    acct = accounts.create(a, "Acme", "acme.admin")
    token_a, _ = console_auth.open_key_session(a, "key_1", account_id=acct.id)
    token_b, _ = console_auth.open_key_session(b, "key_2", account_id=acct.id)
    assert len(stream.changes) == 3             # each session is a change: it signs in on every node
    assert console_auth.session_of(a, token_b) is not None and console_auth.session_of(b, token_a) is not None
    console_auth.set_admin_password(a, acct.id, "a long enough password")
    assert len(stream.changes) == 4
    for store in (a, b):
        assert console_auth.session_of(store, token_a) is None and console_auth.session_of(store, token_b) is None


def test_a_deleted_profile_takes_its_registrations_on_every_node(two) -> None:
    a, b, stream = two
    acct = accounts.create(a, "Acme", "acme.admin")
    prof, _ = profiles.create(a, acct.id, "PBX", 4, realm="sip.edge.test")
    changes = len(stream.changes)
    for store in (a, b):     # a registration is the node's: written here, no change for the cluster
        registrations.save(store, Registration(profile_id=prof.id, contact="sip:pbx@10.0.0.1", expires_at=2e9))
        assert len(registrations.live(store, prof.id)) == 1
    assert len(stream.changes) == changes
    profiles.delete(a, prof.id)
    for store in (a, b):
        assert profiles.find(store, prof.id) is None
        assert registrations.live(store, prof.id) == []


def test_no_agent_is_refused_and_nothing_is_written(tmp_path) -> None:
    store = Store(tmp_path, map_size=64 << 20, durable=False)
    try:
        store.replicator = Replicator(store, "\0sipedge-no-such-agent")
        with pytest.raises(ClusterUnavailable):
            accounts.create(store, "Acme", "acme.admin")
        assert store.read(lambda txn: txn.entries("accounts")) == 0
        assert store.read(lambda txn: list(txn.values("profiles", Profile))) == []
    finally:
        store.close()


def test_the_recording_sorts_the_clusters_rows_from_the_nodes(tmp_path) -> None:
    store = Store(tmp_path, map_size=64 << 20, durable=False)
    seen: list[RecordingTxn] = []

    def op(txn: Txn) -> None:
        assert isinstance(txn, RecordingTxn)
        txn.put_raw("numbers", b"+1", b"x")
        txn.put_raw("numbers", b"+1", b"y", overwrite=False)     # not written: not recorded
        txn.delete("numbers", b"+2")                              # absent: not recorded
        txn.next_counter(b"sip_username_seq")
        txn.next_counter(b"cdr_seq")
        txn.put_raw("registrations", b"s", b"z")
        txn.clear("rates_b")
        seen.append(txn)

    try:
        store.write_here(op, txn=RecordingTxn)
        rec = seen[0]
        assert [(r.op, r.db, r.key) for r in rec.rows] == [
            ("put", "numbers", b"+1"), ("put", "meta", b"sip_username_seq"), ("clear", "rates_b", b"")]
        assert [(r.op, r.db, r.key) for r in rec.local] == [("put", "meta", b"cdr_seq"),
                                                          ("put", "registrations", b"s")]
    finally:
        store.close()
