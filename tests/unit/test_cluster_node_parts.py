"""The parts of a cluster node that need no engine: the lease record the workers read
(edge/cluster/fence.py), the link to the agent (edge/cluster/link.py) and the settlement outbox
(edge/cluster/outbox.py)."""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.cluster import fence, foreign, link, outbox
from edge.control.models import LiveCall
from edge.control.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path, map_size=16 << 20, durable=False)
    yield s
    s.close()


def record(held_until: float, *, boot: str | None = None) -> fence.LeaseRecord:
    return fence.LeaseRecord(node="edge-a", epoch="e1", boot=fence.boot_id() if boot is None else boot,
                             held_until=held_until, written_at=0.0, agent=os.getpid())


# ------------------------------------------------------------------ the fence

def test_the_fence_admits_until_the_agents_instant_and_not_after(store: Store) -> None:
    now = [100.0]
    f = fence.Fence(store, clock=lambda: now[0])
    assert not f.admits()                       # no record: no agent has held a lease
    fence.write(store, record(103.0))
    now[0] = 100.0 + fence.REREAD_SECONDS      # the no-record answer is cached no longer than this
    assert f.admits()
    now[0] = 102.99
    assert f.admits()
    now[0] = 103.0
    assert not f.admits()


def test_a_cached_record_only_ever_errs_early(store: Store) -> None:
    now = [100.0]
    f = fence.Fence(store, clock=lambda: now[0])
    fence.write(store, record(101.0))
    assert f.admits()
    fence.write(store, record(100.05))          # fenced sooner (the agent lost the lease): read within the period
    now[0] = 100.0 + fence.REREAD_SECONDS
    assert not f.admits()
    fence.write(store, record(0.0))
    assert not f.admits()


def test_a_record_of_another_boot_or_a_fenced_one_never_admits(store: Store) -> None:
    assert fence.held_for(record(1e12, boot="0" * 36), now=1.0) == 0.0
    assert fence.held_for(record(0.0), now=1.0) == 0.0
    assert fence.held_for(None, now=1.0) == 0.0
    assert fence.held_for(record(5.0), now=1.0) == 4.0
    fence.write(store, record(1e12, boot="0" * 36))
    assert not fence.Fence(store).admits()
    fence.clear(store)
    assert fence.read(store) is None


# ------------------------------------------------------------------ the outbox

def test_the_outbox_keeps_a_settlement_and_its_cost_until_it_is_done(store: Store) -> None:
    call = LiveCall(call_id="c1", profile_id="prf_1", direction="outgoing", started_at=0.0, caller="", callee="",
                    funding="credit")
    other = LiveCall(call_id="c2", profile_id="prf_2", direction="outgoing", started_at=0.0)
    store.write(lambda txn: outbox.add(txn, call, 123_456))
    store.write(lambda txn: outbox.add(txn, other))
    first, second = outbox.Pending("prf_1", "c1", 123_456, None), outbox.Pending("prf_2", "c2", 0, None)
    assert outbox.pending(store) == [first, second]
    assert outbox.pending(store, limit=1) == [first]
    outbox.done(store, [first])
    assert outbox.pending(store) == [second]


def test_a_dead_nodes_calls_are_taken_once(store: Store) -> None:
    for i in range(3):
        foreign.add(store, LiveCall(call_id=f"c{i}", profile_id="prf_1", direction="outgoing", started_at=0.0,
                                    legs=[{"call_id": f"x{i}"}]))
    assert [c.call_id for c in foreign.take(store, limit=2)] == ["c0", "c1"]
    assert [c.legs for c in foreign.take(store)] == [[{"call_id": "x2"}]]
    assert foreign.take(store) == []


# ------------------------------------------------------------------ the link

def test_the_link_answers_every_kind_of_request_and_survives_garbage() -> None:
    async def run() -> None:
        address = f"\0sipedge-test-{os.getpid()}-journal"
        seen: list[link.Request] = []

        async def handle(request: link.Request) -> link.Reply:
            seen.append(request)
            if isinstance(request, link.Reserve) and request.call_id == "slow":
                await asyncio.sleep(1.0)
            if isinstance(request, link.Reserve) and request.channels == 1:
                return link.Reply(request.id, link.BUSY)
            if isinstance(request, link.Fund) and request.amount > 1000:
                return link.Reply(request.id, link.BROKE, balance=1000)
            if isinstance(request, link.Allocate):
                return link.Reply(request.id, link.OK, balance=request.amount, account_balance=7)
            return link.Reply(request.id, "nonsense" if isinstance(request, link.TopUp) else link.OK)

        server = await link.serve_requests(address, handle)
        try:
            # a process that writes nonsense (a bad length, an undecodable body) costs its own connection only
            for junk in (struct.pack(">I", 1 << 30), struct.pack(">I", 3) + b"\xc1\xc1\xc1"):
                _, writer = await asyncio.open_unix_connection(address)
                writer.write(junk)
                await writer.drain()
                writer.close()
            client = link.JournalClient(address, timeout=0.3)
            assert (await client.reserve("prf_1", "c1", 2, 500)).result == link.OK
            assert (await client.reserve("prf_1", "c2", 1)).result == link.BUSY
            assert (await client.reserve("prf_1", "slow", 2)).result == link.UNAVAILABLE   # no answer in time
            answers = await asyncio.gather(*(client.reserve("prf_1", f"c{i}", 2) for i in range(3, 23)))
            assert [a.result for a in answers] == [link.OK] * 20
            broke = await client.fund("prf_1", "c1", 5000)
            assert (broke.result, broke.balance) == (link.BROKE, 1000)
            assert (await client.fund("prf_1", "c1", 10)).result == link.OK
            assert isinstance(seen[0], link.Reserve) and (seen[0].call_id, seen[0].amount) == ("c1", 500)
            client.close()
            # the control API's blocking requests (it runs in threads), each on a connection of its own
            allocated = await asyncio.to_thread(link.ask_blocking, address, link.Allocate(1, "acc_1", "prf_1", "t1",
                                                                                          250), 2.0)
            assert (allocated.result, allocated.balance, allocated.account_balance) == (link.OK, 250, 7)
            odd = await asyncio.to_thread(link.ask_blocking, address, link.TopUp(2, "acc_1", "e1", 5), 2.0)
            assert odd.result == link.UNAVAILABLE      # an answer the asker does not know is no answer
        finally:
            server.close()
            await server.wait_closed()
        # the agent gone: refused at once, never waiting for the timeout
        client = link.JournalClient(address, timeout=5.0)
        assert (await asyncio.wait_for(client.reserve("prf_1", "c99", 2), 2.0)).result == link.UNAVAILABLE
        gone = await asyncio.to_thread(link.ask_blocking, address, link.TopUp(3, "acc_1", "e2", 5), 2.0)
        assert gone.result == link.UNAVAILABLE

    asyncio.run(run())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_the_link_hears_only_the_nodes_own_user() -> None:
    async def run() -> None:
        address = f"\0sipedge-test-{os.getpid()}-journal-uid"
        asked: list[str] = []

        async def handle(request: link.Request) -> link.Reply:
            assert isinstance(request, link.Reserve)
            asked.append(request.call_id)
            return link.Reply(request.id, link.OK)

        server = await link.serve_requests(address, handle)
        try:
            # another local user (nobody) connects and asks for a channel: the agent closes on it
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", OTHER_USER_CLIENT, address[1:], stdout=asyncio.subprocess.PIPE)
            out, _ = await asyncio.wait_for(child.communicate(), 20)
            assert out.decode().strip() == "closed"
            assert asked == []
            assert (await link.JournalClient(address, timeout=2).reserve("prf_1", "c1", 2)).result == link.OK
            assert asked == ["c1"]
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(run())


OTHER_USER_CLIENT = """
import os, socket, struct, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\\0" + sys.argv[1])   # the abstract address (no NUL in argv)
# a well-formed reservation (["reserve", 1, "prf_1", "c9", 2]): refused for who sent it, not for what
body = bytes([0x95, 0xa7]) + b"reserve" + bytes([1, 0xa5]) + b"prf_1" + bytes([0xa2]) + b"c9" + bytes([2])
try:
    s.sendall(struct.pack(">I", len(body)) + body)
    s.settimeout(5)
    print("answered" if s.recv(64) else "closed")
except OSError:
    print("closed")
"""
