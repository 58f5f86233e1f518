"""The cluster agent: the process of a node that holds its lease in the engine (docs/cluster.md).

One per node, beside the SIP workers and the control API (edge/processes.py), and the node's
one writer in the engine. It connects to the engine, takes and renews the node's lease
(edge/cluster/membership.py) and keeps the lease record of the node's LMDB
(edge/cluster/fence.py) equal to what the membership believes, so that the workers admit calls
only while the lease is held. It reserves the workers' channels in the profiles' journals
(edge/cluster/channels.py, over edge/cluster/link.py) with their calls' first slices, funds the
later slices and the control API's top-ups and allocations (edge/cluster/money.py), appends the
settlements they leave in the LMDB outbox, and writes the journal's movements into the node's
ledger. It appends the control API's provisioning changes and applies every node's to the store
(edge/cluster/provisioning.py). Its metrics (edge_cluster_*) join the node's /metrics like a worker's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.config import Config
from edge.control.errors import StoreError
from edge.control.store import Store

from . import fence, link, provisioning
from .channels import ClusterChannels
from .engine import Engine
from .hangups import Hangups
from .membership import ClusterMetrics, Membership
from .money import ClusterMoney
from .remote import RemoteCalls

log = logging.getLogger("sipedge.cluster")

FOLLOWER_WAIT = 10.0        # seconds the agent waits at start for its journal follower's consumer
MIRROR_PERIOD = 0.05        # seconds between two looks at the membership (a lost lease reaches LMDB this fast)


def agent_address(key: str) -> str:
    """Where the agent serves its metrics to the node's /metrics (edge/sip/workers.py metrics_address)."""
    return f"\0sipedge-{key}-cluster"


class ClusterAgent:
    """:param ready: called once the lease is held and mirrored (the supervisor's ``ready``)."""

    def __init__(self, cfg: Config, store: Store, *, key: str, ready: Callable[[], None]) -> None:
        self.cfg = cfg
        self.store = store
        self.key = key
        self.ready = ready
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = ClusterMetrics(self.registry)
        self._written: fence.LeaseRecord | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        cluster = self.cfg.cluster
        engine = await Engine.connect(cluster)
        membership = Membership(engine, sip=list(self.cfg.sip.listen), api=self.cfg.api.listen,
                                metrics=self.metrics)
        resume = self._resumable(fence.read(self.store))
        if resume is None:
            fence.clear(self.store)      # a record of an earlier run never admits for this one
        channels = ClusterChannels(engine, self.store, membership)
        money = ClusterMoney(channels)
        money.remote = remote = RemoteCalls(engine, channels.calls_bucket, cluster.node, money.moved_profile)
        hangups = Hangups(engine, self.store, cluster.node)
        applier = provisioning.Applier(engine, self.store, on_new=money.follow)
        self.registry.register(_ChannelCounters(channels, money, applier))
        Gauge("edge_cluster_channels_drift", "Calls the cluster's journal holds open for this node minus the calls "
              "its store accounts for (0 unless a reservation leaked; +-1 for a moment while a call starts or "
              "ends).", registry=self.registry).set_function(channels.drift)
        try:
            await membership.start(resume=resume)
            if resume is not None and membership.epoch != resume[0]:
                log.warning("cluster: the lease of the previous agent had ended: the node's calls end")
            # the lease goes to the workers' record now and while the journals are replayed (a restarted
            # agent must renew the record before the old one's belief ends, or the node's calls end)
            mirror = asyncio.create_task(self._keep_mirroring(membership), name="cluster-mirror")
            applying: asyncio.Task[None] | None = None
            follower: asyncio.Task[None] | None = None
            try:
                await channels.start()
                # the journals' follower before any journal is replayed: what lands meanwhile is folded after
                follower = asyncio.create_task(money.run_follower(self._stop), name="cluster-follower")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(money.following.wait(), FOLLOWER_WAIT)
                # the cluster's provisioning first: its profiles and accounts are the ones whose money follows
                await provisioning.ensure_stream(engine)
                applying = asyncio.create_task(applier.run(self._stop), name="cluster-provisioning")
                await applier.catch_up()
                await money.start()
            except BaseException:
                for task in (follower, applying):
                    if task is not None:
                        task.cancel()
                raise
            finally:
                mirror.cancel()
            self._mirror(membership)

            async def handle(request: link.Request) -> link.Reply:
                if isinstance(request, link.Reserve):
                    return await channels.reserve(request)
                if isinstance(request, link.Fund):
                    return await money.fund(request)
                if isinstance(request, link.TopUp):
                    return await money.top_up(request)
                if isinstance(request, link.Provision):
                    return await applier.provision(request)
                if isinstance(request, link.Hangup):
                    return await hangups.relay(request)
                return await money.allocate(request)

            await hangups.start()

            servers = [await asyncio.start_unix_server(self._serve_metrics, path=agent_address(self.key)),
                       await link.serve_requests(link.journal_address(self.key), handle)]
            tasks = [asyncio.create_task(channels.run_outbox(self._stop), name="cluster-outbox"),
                     asyncio.create_task(money.run(self._stop), name="cluster-ledger"),
                     follower,
                     asyncio.create_task(channels.run_sweeps(self._stop), name="cluster-sweeps"),
                     asyncio.create_task(channels.run_publisher(self._stop), name="cluster-publisher"),
                     asyncio.create_task(remote.run(self._stop), name="cluster-calls"),
                     applying]
            self.ready()
            try:
                while not self._stop.is_set():
                    self._mirror(membership)
                    try:
                        await asyncio.wait_for(self._stop.wait(), MIRROR_PERIOD)
                    except TimeoutError:
                        pass
            finally:
                await hangups.stop()
                for server in servers:
                    server.close()
                for task in tasks[2:]:   # sweeping and publishing: recovery work, the next agent does it
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            # fenced first, in the workers' record too, then the lease goes (the others take over at once)
            self._write(fence.LeaseRecord(node=cluster.node, epoch=membership.epoch, boot=fence.boot_id(),
                                          held_until=0.0, written_at=time.time(), agent=os.getpid()))
            await membership.stop(release=True)
            await engine.nc.close()

    async def _keep_mirroring(self, membership: Membership) -> None:
        while True:
            self._mirror(membership)
            await asyncio.sleep(MIRROR_PERIOD)

    def _resumable(self, record: fence.LeaseRecord | None) -> tuple[str, float] | None:
        """The lease of this node's previous agent, if it may go on: same node and boot, still
        believed held, and that agent gone (the supervisor starts a new agent only after the old
        one exited; a live pid, even a reused one, means no)."""
        if record is None or record.node != self.cfg.cluster.node or fence.held_for(record) <= 0:
            return None
        try:
            os.kill(record.agent, 0)
            return None
        except ProcessLookupError:
            return record.epoch, record.held_until
        except PermissionError:     # another user's process has that pid now: ours is gone
            return record.epoch, record.held_until

    def _mirror(self, membership: Membership) -> None:
        held = membership.lease_expires_at if membership.holds_lease() else 0.0
        record = fence.LeaseRecord(node=membership.node, epoch=membership.epoch, boot=fence.boot_id(),
                                   held_until=held, written_at=time.time(), agent=os.getpid(),
                                   members=sorted(membership.members()), homed=membership.homed_count())
        last = self._written
        if last is not None and (last.held_until, last.epoch, last.members, last.homed) == (
                record.held_until, record.epoch, record.members, record.homed):
            return
        self._write(record)

    def _write(self, record: fence.LeaseRecord) -> None:
        try:
            fence.write(self.store, record)
        except StoreError as exc:     # the workers' record keeps its older (earlier) instant: they fence early
            log.error("cluster: the lease record cannot be written to the store (%s)", exc)
            return
        self._written = record

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(generate_latest(self.registry))
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


class _ChannelCounters(Collector):
    """What the agent did with the node's channels, read at scrape time."""

    def __init__(self, channels: ClusterChannels, money: ClusterMoney, applier: provisioning.Applier) -> None:
        self.channels = channels
        self.money = money
        self.applier = applier

    def collect(self) -> Iterator[Metric]:
        c, m = self.channels, self.money
        reservations = CounterMetricFamily("edge_cluster_reservations", "Channel reservations (with the first "
                                           "slice's money) the workers asked for, by the journal's answer.",
                                           labels=["result"])
        for result, n in (("ok", c.reserved), ("busy", c.refused), ("broke", c.broke),
                          ("unavailable", c.unavailable)):
            reservations.add_metric([result], n)
        yield reservations
        slices = CounterMetricFamily("edge_cluster_slices", "Later slices of calls the workers asked the journal "
                                     "to fund, by its answer.", labels=["result"])
        for result, n in (("ok", m.funded), ("broke", m.broke), ("unavailable", m.unavailable)):
            slices.add_metric([result], n)
        yield slices
        yield CounterMetricFamily("edge_cluster_auto_recharges", "Auto-recharges this node moved through the journal "
                                  "(for the profiles rendezvous hashing gives it).", value=m.recharged)
        yield CounterMetricFamily("edge_cluster_settlements", "Settlements appended to the journal from the "
                                  "outbox.", value=c.settled)
        changes = CounterMetricFamily("edge_cluster_provisioning_changes", "Provisioning changes of this node's "
                                      "control API appended to the engine (ok), or that lost their slot to "
                                      "another node's and ran again (lost).", labels=["result"])
        changes.add_metric(["ok"], self.applier.published)
        changes.add_metric(["lost"], self.applier.lost)
        yield changes
        yield GaugeMetricFamily("edge_cluster_provisioning_slot", "The last change of the cluster's provisioning "
                                "applied to this node's store (equal on every node once they caught up).",
                                value=self.applier.slot)
        yield CounterMetricFamily("edge_cluster_recovered", "Open reservations of ended holders (dead nodes) "
                                  "this node settled.", value=c.recovered)
