"""Node leases, fencing and profile homes (edge/cluster/membership.py) against three real nats-server members.

Each test has a namespace of its own (its own two buckets), so leftovers of one never reach another.
Every wait is a bounded poll; instants are compared (fencing before takeover), durations never asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from natscluster import NatsCluster, free_port
from prometheus_client import CollectorRegistry

from edge.cluster.engine import Engine
from edge.cluster.membership import (
    ClusterMetrics,
    Holder,
    LeaseConfigMismatch,
    LeaseLost,
    Membership,
    NodeNameInUse,
    rendezvous,
)
from edge.config import ClusterConfig

LEASE = 2.0
ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """on_acquired of one membership: (profile, previous, monotonic instant, what ``probe`` said then)."""

    def __init__(self, probe: Callable[[str], object] | None = None) -> None:
        self.calls: list[tuple[str, Holder | None, float, object]] = []
        self.probe = probe

    def __call__(self, profile_id: str, previous: Holder | None) -> None:
        self.calls.append((profile_id, previous, time.monotonic(), self.probe(profile_id) if self.probe else None))

    def profiles(self) -> set[str]:
        return {c[0] for c in self.calls}


@asynccontextmanager
async def member(cluster: NatsCluster, node: str, ns: str, *, urls: list[str] | None = None,
                 lease: float = LEASE, recorder: Recorder | None = None, wait: float | None = None,
                 metrics: ClusterMetrics | None = None) -> AsyncIterator[Membership]:
    engine = await Engine.connect(ClusterConfig(node=node, engine=urls or cluster.urls, lease_seconds=lease))
    m = Membership(engine, sip=[f"udp:127.0.0.1:{5060 + len(node)}"], api="127.0.0.1:8080",
                   on_acquired=recorder, namespace=ns, metrics=metrics)
    try:
        await m.start(wait=wait)
        yield m
    finally:
        await m.stop()
        await engine.close()


async def until(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> float:
    """Poll ``cond`` (bounded); the monotonic instant it first held."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic()


def test_racing_memberships_get_exactly_one_home_each(engine_cluster: NatsCluster) -> None:
    profiles = [f"race{i}" for i in range(30)]

    async def scenario() -> None:
        recs = [Recorder(), Recorder(), Recorder()]
        async with member(engine_cluster, "a", "t_race", recorder=recs[0]) as a, \
                member(engine_cluster, "b", "t_race", recorder=recs[1]) as b, \
                member(engine_cluster, "c", "t_race", recorder=recs[2]) as c:
            ms = [a, b, c]
            # every node asks for every profile at once: each answer names the one winner
            results = await asyncio.gather(*(m.acquire(p) for p in profiles for m in ms))
            for i, p in enumerate(profiles):
                answers = {r.holder for r in results[3 * i:3 * i + 3]}
                assert len(answers) == 1, (p, answers)
            for p in profiles:
                assert sum(m.is_home(p) for m in ms) == 1, p
            won = [rec.profiles() for rec in recs]
            assert set.union(*won) == set(profiles) and sum(map(len, won)) == len(profiles)
            assert all(prev is None for rec in recs for _, prev, _, _ in rec.calls)  # never homed before
            # the watched views converge on the same homes
            def holders(p: str) -> set[Holder | None]:
                return {h.holder if (h := m.home_of(p)) is not None else None for m in ms}

            await until("every view agrees", lambda: all(len(holders(p)) == 1 and None not in holders(p)
                                                         for p in profiles))
            assert set(a.members()) == {"a", "b", "c"}
            assert a.homed_count() + b.homed_count() + c.homed_count() == len(profiles)

    asyncio.run(scenario())


def test_racing_handovers_of_stale_homes_have_exactly_one_winner(engine_cluster: NatsCluster) -> None:
    """Three nodes take the same stale homes at once. On nats-server 2.9 racing updates on one revision
    can all land (tests/cluster/test_engine.py), so a handover creates the next generation instead."""
    profiles = [f"hand{i}" for i in range(30)]

    async def scenario() -> None:
        async with member(engine_cluster, "old", "t_hand") as old:
            for p in profiles:
                await old.acquire(p)
            gone = (old.node, old.epoch)
        recs = [Recorder(), Recorder(), Recorder()]
        async with member(engine_cluster, "a", "t_hand", recorder=recs[0]) as a, \
                member(engine_cluster, "b", "t_hand", recorder=recs[1]) as b, \
                member(engine_cluster, "c", "t_hand", recorder=recs[2]) as c:
            ms = [a, b, c]
            results = await asyncio.gather(*(m.acquire(p) for p in profiles for m in ms))
            for i, p in enumerate(profiles):
                assert len({r.holder for r in results[3 * i:3 * i + 3]}) == 1, p
                assert sum(m.is_home(p) for m in ms) == 1, p
            calls = [c for rec in recs for c in rec.calls]
            assert sorted(p for p, *_ in calls) == sorted(profiles)        # one recovery per profile
            assert all(prev == gone for _, prev, _, _ in calls)
            assert a.handovers + b.handovers + c.handovers == len(profiles)

    asyncio.run(scenario())


def test_a_member_that_stops_renewing_loses_its_homes_to_the_others(engine_cluster: NatsCluster) -> None:
    async def scenario() -> None:
        dead_rec, rec_b, rec_c = Recorder(), Recorder(), Recorder()
        async with member(engine_cluster, "a", "t_death", recorder=dead_rec) as a:
            lost = [f"death{i}" for i in range(20)]
            for p in lost:
                await a.acquire(p)
            victim = (a.node, a.epoch)
            rec_b.probe = rec_c.probe = a.is_home
            async with member(engine_cluster, "b", "t_death", recorder=rec_b) as b, \
                    member(engine_cluster, "c", "t_death", recorder=rec_c) as c:
                await until("b and c see a", lambda: "a" in b.members() and "a" in c.members())
                for p in lost:
                    assert (await b.acquire(p)).holder == victim     # alive: stays a's
                a.simulate_death()
                await until("the others took every home of a", lambda: all(b.is_home(p) or c.is_home(p)
                                                                            for p in lost), timeout=LEASE + 15)
                calls = rec_b.calls + rec_c.calls
                assert sorted(p for p, *_ in calls) == sorted(lost)              # each taken exactly once
                assert all(prev == victim for _, prev, _, _ in calls)
                assert all(was_home is False for *_, was_home in calls)        # a had fenced itself by then
                assert min(t for _, _, t, _ in calls) > a.lease_expires_at
                for p, *_ in rec_b.calls:
                    assert rendezvous(p, ["b", "c"]) == "b"
                assert b.handovers + c.handovers == len(lost)
                await until("a left the members", lambda: "a" not in b.members() and "a" not in c.members())

    asyncio.run(scenario())


def test_a_restarted_node_gets_a_new_epoch_and_its_old_homes_are_recovered(engine_cluster: NatsCluster) -> None:
    """Same name, new run: it waits for the old lease to age out (a live one means a duplicate name), and
    its old homes come back through the handover path with the old epoch as ``previous``."""
    async def scenario() -> None:
        async with member(engine_cluster, "a", "t_restart") as first:
            for p in ("r1", "r2", "r3"):
                await first.acquire(p)
            old = (first.node, first.epoch)
            with pytest.raises(NodeNameInUse):
                async with member(engine_cluster, "a", "t_restart", wait=LEASE + 1):
                    pass
            first.simulate_death()
            rec, registry = Recorder(), CollectorRegistry()
            async with member(engine_cluster, "a", "t_restart", recorder=rec,
                              metrics=ClusterMetrics(registry)) as second:
                assert second.epoch != old[1]
                assert not second.is_home("r1")
                await until("the old homes recovered", lambda: all(second.is_home(p) for p in ("r1", "r2", "r3")))
                assert sorted((p, prev) for p, prev, _, _ in rec.calls) == [(p, old) for p in ("r1", "r2", "r3")]
                value = registry.get_sample_value
                assert value("edge_cluster_handovers_total") == 3
                assert value("edge_cluster_profiles_homed") == 3
                assert value("edge_cluster_lease_held") == 1 and value("edge_cluster_members") == 1
                assert value("edge_cluster_engine_connected") == 1
                assert 0 < (value("edge_cluster_engine_rtt_seconds") or 0) < LEASE
            assert value("edge_cluster_lease_held") == 0 and value("edge_cluster_profiles_homed") == 0

    asyncio.run(scenario())


def test_a_released_lease_hands_homes_over_at_once_and_checks_its_input(engine_cluster: NatsCluster) -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with member(engine_cluster, "b", "t_release", recorder=rec) as b:
            async with member(engine_cluster, "a", "t_release") as a:
                await a.acquire("rel1")
                with pytest.raises(ValueError, match="profile id"):
                    await a.acquire("bad.id")
                old = (a.node, a.epoch)
            # a.stop() fenced and deleted its lease: b takes the home without waiting for an age-out
            assert (await b.acquire("rel1")).holder == (b.node, b.epoch)
            assert rec.calls[0][:2] == ("rel1", old)
        with pytest.raises(LeaseLost):
            await b.acquire("rel2")
        with pytest.raises(LeaseConfigMismatch, match="lease_seconds"):
            async with member(engine_cluster, "c", "t_release", lease=3.0):
                pass

    asyncio.run(scenario())


def test_a_failed_recovery_keeps_the_profile_unadmitted_until_it_succeeds(engine_cluster: NatsCluster) -> None:
    async def scenario() -> None:
        calls: list[str] = []

        async def settle(profile_id: str, previous: Holder | None) -> None:
            calls.append(profile_id)
            if len(calls) == 1:
                raise RuntimeError("journal unreachable")

        engine = await Engine.connect(ClusterConfig(node="a", engine=engine_cluster.urls, lease_seconds=LEASE))
        m = Membership(engine, on_acquired=settle, namespace="t_recover")
        try:
            await m.start()
            with pytest.raises(RuntimeError, match="journal unreachable"):
                await m.acquire("rec1")
            assert not m.is_home("rec1") and m.home_of("rec1") is not None   # ours in the engine, not admitted
            await until("the check ran the recovery again", lambda: m.is_home("rec1"))
            assert calls == ["rec1", "rec1"]
        finally:
            await m.stop()
            await engine.close()

    asyncio.run(scenario())


def test_a_node_back_from_a_partition_stays_fenced_when_its_name_was_taken(engine_cluster: NatsCluster) -> None:
    """Cut off for longer than the lease, a replacement with its name started meanwhile: one name,
    one live lease -- the old process does not take a new epoch beside the replacement."""
    async def scenario() -> None:
        async with member(engine_cluster, "dup", "t_dup") as old:
            epoch = old.epoch
            renew = next(t for t in old._tasks if t.get_name().startswith("cluster-renew"))
            renew.cancel()      # cut off: no renewal reaches the engine
            await until("old fenced", lambda: not old.holds_lease())
            async with member(engine_cluster, "dup", "t_dup", wait=LEASE + 5) as new:
                assert new.epoch != epoch
                await old._reconcile(time.monotonic())      # what its next renewal would do
                assert not old.holds_lease() and old.epoch == epoch
                assert new.holds_lease()

    asyncio.run(scenario())


def test_a_watch_that_stops_delivering_is_started_again(engine_cluster: NatsCluster) -> None:
    async def scenario() -> None:
        async with member(engine_cluster, "a", "t_watch") as a, member(engine_cluster, "b", "t_watch") as b:
            for watcher in list(a._watchers):
                await watcher._sub.unsubscribe()    # silently dead: nothing delivered, no error raised
            await b.acquire("w1")                   # a's view can only learn this from a new watch
            await until("a's view has b's home", lambda: a.home_of("w1") is not None, timeout=LEASE * 3 + 10)
            assert a.home_of("w1").holder == (b.node, b.epoch)  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_a_stale_view_of_a_lease_cannot_end_it(engine_cluster: NatsCluster) -> None:
    """JetStream reads are not linearizable (a deposed leader may still answer), so "a's lease is gone"
    is confirmed by a conditional delete marker: one made on a stale view is refused and a keeps its lease."""
    async def scenario() -> None:
        async with member(engine_cluster, "a", "t_stale") as a, member(engine_cluster, "b", "t_stale") as b:
            await a.acquire("stale1")
            seen = a._revision
            await until("a renewed", lambda: a._revision > seen)
            assert await b._confirm_ended("a", a.epoch) is False    # as if a stale read had found it absent
            assert (await b.acquire("stale1")).holder == (a.node, a.epoch)
            assert a.is_home("stale1")
            await until("a renews on", lambda: a._revision > seen + 1 and a.holds_lease())

    asyncio.run(scenario())


async def _member_leading_nothing(cluster: NatsCluster, ns: str, lease: float) -> int:
    """Create the test's buckets and name a member that leads neither of their streams: the partition
    test is about fencing, not about the majority electing a new stream leader (that is measured by
    bench/bench_cluster.py). With three members and two streams there always is one."""
    engine = await Engine.connect(ClusterConfig(node="setup", engine=cluster.urls, lease_seconds=lease))
    try:
        await engine.bucket(f"{ns}_nodes", ttl=lease)
        await engine.bucket(f"{ns}_homes")
        leaders = set()
        for name in (f"KV_{ns}_nodes", f"KV_{ns}_homes"):
            si = await engine.js.stream_info(name)
            assert si.cluster is not None
            leaders.add(si.cluster.leader)
        return next(i for i in range(len(cluster.urls)) if f"n{i}" not in leaders)
    finally:
        await engine.close()


def test_a_partitioned_node_fences_itself_before_another_takes_its_profiles(engine_cluster: NatsCluster) -> None:
    lease = 3.0     # the survivors' renewals must outlast the majority side noticing n0 is gone

    async def scenario() -> None:
        rec_b, rec_c = Recorder(), Recorder()
        k = await _member_leading_nothing(engine_cluster, "t_part", lease)
        majority = [u for i, u in enumerate(engine_cluster.urls) if i != k]
        async with member(engine_cluster, "iso", "t_part", urls=[engine_cluster.urls[k]], lease=lease) as iso:
            lost = [f"part{i}" for i in range(10)]
            for p in lost:
                await iso.acquire(p)
            victim = (iso.node, iso.epoch)
            rec_b.probe = rec_c.probe = iso.is_home
            async with member(engine_cluster, "b", "t_part", urls=majority, lease=lease, recorder=rec_b) as b, \
                    member(engine_cluster, "c", "t_part", urls=majority, lease=lease, recorder=rec_c) as c:
                await until("b and c see iso", lambda: "iso" in b.members() and "iso" in c.members())
                engine_cluster.freeze(k)
                try:
                    fenced = await until("iso fences itself", lambda: not iso.holds_lease(), timeout=lease + 5)
                    assert all(not iso.is_home(p) for p in lost)
                    await until("b and c took iso's homes", lambda: all(b.is_home(p) or c.is_home(p) for p in lost),
                                timeout=lease + 20)
                finally:
                    engine_cluster.thaw(k)
                calls = rec_b.calls + rec_c.calls
                assert sorted(p for p, *_ in calls) == sorted(lost)
                assert all(prev == victim for _, prev, _, _ in calls)
                assert all(was_home is False for *_, was_home in calls)
                first_taken = min(t for _, _, t, _ in calls)
                assert iso.lease_expires_at <= fenced < first_taken
                # healing: it comes back with a new epoch and holds none of what it lost
                await until("iso rejoined", lambda: iso.holds_lease() and iso.epoch != victim[1], timeout=30)
                assert not any(iso.is_home(p) for p in lost)
                for p in lost:
                    assert (await iso.acquire(p)).node in ("b", "c")
                await until("b sees iso again", lambda: b.members().get("iso") is not None
                            and b.members()["iso"].epoch == iso.epoch, timeout=10)

    asyncio.run(scenario())


def test_losing_the_engine_member_it_is_connected_to_costs_a_node_nothing(engine_cluster: NatsCluster) -> None:
    """The client moves to another member; the lease (5 s: slack for a reconnect) never lapses and the
    view keeps following the cluster."""
    lease = 5.0

    async def scenario() -> None:
        k = await _member_leading_nothing(engine_cluster, "t_move", lease)
        for _ in range(30):     # the client picks a member at random: until it is member k
            engine = await Engine.connect(ClusterConfig(node="a", engine=engine_cluster.urls, lease_seconds=lease))
            url = engine.nc.connected_url
            if url is not None and url.port == engine_cluster.client_ports[k]:
                break
            await engine.close()
        else:
            pytest.fail(f"never connected to member {k}")
        a = Membership(engine, namespace="t_move")
        try:
            await a.start()
            await a.acquire("mv1")
            epoch = a.epoch
            async with member(engine_cluster, "b", "t_move", lease=lease) as b:
                engine_cluster.kill(k)
                try:
                    await until("a reconnected elsewhere", lambda: a.engine.connected and a.engine.nc.connected_url
                                is not None and a.engine.nc.connected_url.port != engine_cluster.client_ports[k])
                    await b.acquire("mv2")
                    await until("a's view follows", lambda: a.home_of("mv2") is not None, timeout=3 * lease + 10)
                    renewed = a._revision
                    await until("a renews through the new member", lambda: a._revision > renewed, timeout=lease)
                    assert a.epoch == epoch and a.is_home("mv1")     # the lease never lapsed
                finally:
                    engine_cluster.start_member(k)
                    await asyncio.to_thread(engine_cluster.wait_ready)
        finally:
            await a.stop()
            await engine.close()

    asyncio.run(scenario())


def test_cluster_status_json_against_the_live_engine(engine_cluster: NatsCluster, tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text('[cluster]\nnode = "cli-x"\nengine = [' + ", ".join(f'"{u}"' for u in engine_cluster.urls)
                   + f"]\nlease_seconds = {LEASE}\n")

    async def scenario() -> None:
        async with member(engine_cluster, "cli-a", "sipedge") as a, member(engine_cluster, "cli-b", "sipedge") as b:
            for p in ("cli1", "cli2", "cli3"):
                await a.acquire(p)
            await b.acquire("cli4")
            out = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "edge.cli", "cluster", "status", "--config", str(cfg), "--json"],
                capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert out.returncode == 0, out.stderr
            snap = json.loads(out.stdout)
            members = {m["node"]: m for m in snap["members"]}
            assert {"cli-a", "cli-b"} <= members.keys()
            assert members["cli-a"]["epoch"] == a.epoch and members["cli-a"]["sip"] == a.sip
            assert 0 <= members["cli-a"]["lease_left"] <= LEASE
            homes = {h["profile"]: h for h in snap["homes"]}
            assert all(h["generation"] >= 1 for h in homes.values())
            assert {p: homes[p]["node"] for p in ("cli1", "cli2", "cli3", "cli4")} == {
                "cli1": "cli-a", "cli2": "cli-a", "cli3": "cli-a", "cli4": "cli-b"}
            assert all(homes[p]["valid"] for p in ("cli1", "cli4"))
            assert members["cli-a"]["profiles"] >= 3
            assert snap["engine"]["rtt_seconds"] > 0 and snap["engine"]["connected"]
            streams = {st["name"]: st for st in snap["streams"]}
            assert streams.keys() == {"KV_sipedge_nodes", "KV_sipedge_homes"}
            for st in streams.values():   # three replicas: a leader and two followers, one of each member
                assert {st["leader"], *(r["server"] for r in st["replicas"])} == {"n0", "n1", "n2"}
            text = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "edge.cli", "cluster", "status", "--config", str(cfg)],
                capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert text.returncode == 0 and "cli-a" in text.stdout and a.epoch in text.stdout, text.stderr

    asyncio.run(scenario())


def test_cluster_status_without_an_engine_is_a_clear_error(tmp_path: Path) -> None:
    lone = tmp_path / "lone.toml"
    lone.write_text('[sip]\ndomain = "sip.edge.test"\n')
    away = tmp_path / "away.toml"
    away.write_text(f'[cluster]\nnode = "x"\nengine = ["nats://127.0.0.1:{free_port()}"]\n')
    for cfg, code, text in ((lone, 2, "[cluster] engine is not set"), (away, 1, "no member answered")):
        out = subprocess.run([sys.executable, "-m", "edge.cli", "cluster", "status", "--config", str(cfg),
                              "--timeout", "1"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == code and text in out.stderr and "Traceback" not in out.stderr, out.stderr
