"""The engine properties the cluster rests on, against three real nats-server members.

sipedge never implements consensus, leases or replication itself (docs/cluster.md): these tests
pin down what it takes from JetStream instead -- a replicated bucket, key expiry by the engine's
clock, and all of it still writable with one member of three gone. The revision checks below are
*sequential*: on nats-server 2.9 an expected sequence > 0 is checked only before the leader
proposes, so concurrent writers on one view can all land; only "the subject is empty" (KV
``create``, expected sequence 0) holds under concurrency. tests/cluster/test_journal.py pins that,
and the journal and the homes are built on it (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from natscluster import NatsCluster

from edge.cluster.engine import Engine, EngineUnavailable
from edge.config import ClusterConfig


def config(cluster: NatsCluster, node: str = "edge-a") -> ClusterConfig:
    return ClusterConfig(node=node, engine=cluster.urls, lease_seconds=2.0)


def test_bucket_is_replicated_and_refuses_a_stale_revision_in_sequence(engine_cluster: NatsCluster) -> None:
    async def scenario() -> None:
        engine = await Engine.connect(config(engine_cluster))
        try:
            assert engine.replicas == 3
            kv = await engine.bucket("t_cas")
            first = await kv.create("profile.p1", b"edge-a")
            with pytest.raises(KeyWrongLastSequenceError):
                await kv.create("profile.p1", b"edge-b")          # held: a second create loses
            second = await kv.update("profile.p1", b"edge-a", last=first)
            with pytest.raises(KeyWrongLastSequenceError):
                await kv.update("profile.p1", b"edge-b", last=first)  # a stale revision loses
            entry = await kv.get("profile.p1")
            assert entry.value == b"edge-a" and entry.revision == second
            info = await engine.js.stream_info("KV_t_cas")
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2  # leader + 2 peers
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_an_entry_not_rewritten_ages_out_by_the_engine(engine_cluster: NatsCluster) -> None:
    async def scenario() -> None:
        engine = await Engine.connect(config(engine_cluster))
        try:
            kv = await engine.bucket("t_ttl", ttl=1.0)
            await kv.create("node.edge-a", b"1")
            deadline = time.monotonic() + 15
            while True:   # the engine purges on its own clock: poll, bounded
                try:
                    await kv.create("node.edge-a", b"2")
                    break
                except KeyWrongLastSequenceError:
                    assert time.monotonic() < deadline, "the entry never aged out"
                    await asyncio.sleep(0.2)
            assert (await kv.get("node.edge-a")).value == b"2"
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_a_stream_refuses_an_append_on_a_stale_view_in_sequence(engine_cluster: NatsCluster) -> None:
    async def scenario() -> None:
        engine = await Engine.connect(config(engine_cluster))
        try:
            await engine.stream("T_JOURNAL", ["t.journal.>"])
            first = await engine.js.publish("t.journal.p1", b"reserve 1",
                                            headers={"Nats-Expected-Last-Subject-Sequence": "0"})
            await engine.js.publish("t.journal.p1", b"reserve 2",
                                    headers={"Nats-Expected-Last-Subject-Sequence": str(first.seq)})
            with pytest.raises(Exception, match="wrong last sequence"):
                await engine.js.publish("t.journal.p1", b"reserve 2 again",
                                        headers={"Nats-Expected-Last-Subject-Sequence": str(first.seq)})
            info = await engine.js.stream_info("T_JOURNAL")
            assert info.state.messages == 2
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_writes_go_on_with_one_member_of_three_gone(engine_cluster: NatsCluster) -> None:
    """Two of three are a quorum. Right after a member dies, a group it led elects a new leader
    first: a write may time out meanwhile (and may still have landed), so a writer re-reads."""
    async def write_all(revision_of: dict[str, int]) -> None:
        engine = await Engine.connect(config(engine_cluster))
        try:
            for key in ("a", "b", "c"):
                deadline = time.monotonic() + 20
                while True:
                    last = revision_of.get(key)
                    try:
                        kv = await engine.bucket("t_quorum")   # its lookup waits for a leader too
                        revision_of[key] = await (kv.update(key, b"x", last=last) if last else kv.create(key, b"x"))
                        break
                    except (NatsTimeoutError, KeyWrongLastSequenceError):
                        assert time.monotonic() < deadline, f"no write of {key} for 20 s"
                        await asyncio.sleep(0.2)
                        try:   # the timed-out write may have landed: continue from what is there
                            kv = await engine.bucket("t_quorum")
                            revision_of[key] = (await kv.get(key)).revision or 0
                        except (NatsTimeoutError, KeyNotFoundError):
                            pass
        finally:
            await engine.close()

    revisions: dict[str, int] = {}
    asyncio.run(write_all(revisions))
    before = dict(revisions)
    engine_cluster.kill(0)
    try:
        asyncio.run(write_all(revisions))   # two of three: still a quorum
        assert all(revisions[k] > before[k] for k in before)
    finally:
        engine_cluster.start_member(0)
        engine_cluster.wait_ready()
    asyncio.run(write_all(revisions))


def test_no_member_answering_is_a_clear_error() -> None:
    from natscluster import free_port

    cfg = ClusterConfig(node="edge-a", engine=[f"nats://127.0.0.1:{free_port()}"], lease_seconds=2.0)
    with pytest.raises(EngineUnavailable, match="cluster.engine: no member answered"):
        asyncio.run(Engine.connect(cfg, connect_timeout=1, wait=2.0))
