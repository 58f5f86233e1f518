"""Node leases, fencing and profile homes on the engine (SPEC §9, docs/cluster.md).

Two replicated buckets hold the cluster's membership:

- ``sipedge_nodes`` (ttl = ``lease_seconds``): ``node.<name>.<epoch>`` -> :class:`NodeLease`, one key
  per run (and per lease that lapsed and was taken anew). The engine ages an entry out when its node
  stops rewriting it; that is the node's death as the cluster sees it, and it is final.
- ``sipedge_homes`` (no ttl): ``home.<profile_id>.<generation>`` -> :class:`Home`, the (node, epoch)
  that is the only writer of that profile's channels and money; the highest generation is the
  current one. A home is valid only while that node's lease with that epoch lives; a stale one is
  taken over by *creating* the next generation. Every key is written once, by a create (expected
  last sequence 0), the one condition nats-server 2.9 enforces under concurrency: an update on a
  revision (expected sequence > 0) is checked before the leader proposes, so racing updates on one
  revision can all land (tests/cluster/test_engine.py, docs/cluster.md).

Fencing: a renewal sent at monotonic ``t`` lets the node believe it holds its lease until
``t + lease_seconds - margin``. The engine stores that renewal later than ``t`` and ages it out
``lease_seconds`` after storing it, so the holder always stops believing first, and another node can
take its homes only after the engine aged the lease out (or the holder released it): a node cut off
from the engine admits nothing for a profile before anybody else may. The margin covers the rate
drift of the two clocks.

Every decision that hands a home over goes through the engine: the buckets are not ``allow_direct``
(reads go to the stream leader, never to a lagging follower), and since even a leader's read may be
stale, a lease's end is confirmed by a conditional write (:meth:`Membership._confirm_ended`) before
its homes move. The watched local view only answers :meth:`Membership.home_of` /
:meth:`Membership.is_home` on the call path with no round trip.

The parts, wired by :class:`Membership` (this module's only class; every other name is re-exported):
``buckets.py`` (keys, records, the bucket handles), ``lease.py`` (this node's lease and its fencing),
``view.py`` (the watched local view), ``liveness.py`` (a lease's end, confirmed through the log) and
``homes.py`` (acquire, takeover, rendezvous).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from .buckets import KEY, NAMESPACE, Buckets, Holder, Home, NodeLease, last_entries, lease_key
from .engine import Engine
from .homes import ACQUIRE_ATTEMPTS, MAX_GENERATION_WALK, TAKEOVER_CONCURRENCY, Homes, OnAcquired, rendezvous
from .lease import LeaseConfigMismatch, LeaseLost, NodeNameInUse, OwnLease, fencing_margin
from .liveness import Liveness
from .metrics import ClusterMetrics
from .view import View

__all__ = [
    "ACQUIRE_ATTEMPTS", "MAX_GENERATION_WALK", "NAMESPACE", "TAKEOVER_CONCURRENCY", "ClusterMetrics", "Holder",
    "Home", "LeaseConfigMismatch", "LeaseLost", "Membership", "NodeLease", "NodeNameInUse", "OnAcquired",
    "fencing_margin", "last_entries", "lease_key", "rendezvous",
]

log = logging.getLogger("sipedge.cluster")


class Membership:
    """This node's lease, the cluster's members and the homes of profiles; see the module docstring.

    :param engine: the node's connected :class:`~edge.cluster.engine.Engine`.
    :param sip: addresses other nodes use to reach this node's SIP side (stored in the lease).
    :param api: this node's control API address (stored in the lease).
    :param namespace: the buckets' prefix (one engine can hold several clusters; tests use one each).
    :param on_acquired: called as ``on_acquired(profile_id, previous)`` once this node became a
        profile's home, before :meth:`is_home` says so; ``previous`` is the (node, epoch) whose lease
        had ended (its open reservations are to be settled) or None for a profile never homed.
    """

    def __init__(self, engine: Engine, *, sip: Iterable[str] = (), api: str = "",
                 on_acquired: OnAcquired | None = None, metrics: ClusterMetrics | None = None,
                 node: str | None = None, lease_seconds: float | None = None, namespace: str = NAMESPACE) -> None:
        self.engine = engine
        self.node = node or engine.cfg.node
        if not KEY.fullmatch(self.node):
            raise ValueError(f"cluster.node: {self.node!r} is not a valid node name")
        self.lease_seconds = float(lease_seconds or engine.cfg.lease_seconds)
        self.metrics = metrics
        self._clock = time.monotonic
        self._buckets = Buckets(engine, namespace, self.lease_seconds)
        self.nodes_bucket, self.homes_bucket = self._buckets.nodes_bucket, self._buckets.homes_bucket
        self._lease = OwnLease(self._buckets, node=self.node, lease_seconds=self.lease_seconds, sip=sip, api=api,
                               clock=self._clock, metrics=metrics, on_new_epoch=self._maybe_takeover)
        self.margin = self._lease.margin
        self._view = View(self._buckets, self._lease, clock=self._clock, on_stale_homes=self._maybe_takeover)
        self._liveness = Liveness(self._buckets, self._view)
        self._homes = Homes(self._buckets, self._lease, self._view, self._liveness,
                            on_acquired=on_acquired, metrics=metrics)
        self._tasks: list[asyncio.Task[None]] = []     # the renewal and the check
        self._spawned: set[asyncio.Task[None]] = set()  # takeovers
        self._stopping = False
        if metrics is not None:
            metrics.bind(self)

    # ------------------------------------------------------------------ what the parts hold

    @property
    def epoch(self) -> str:
        """This node's lease epoch ("" before :meth:`start`; a new one after a lease lapsed)."""
        return self._lease.epoch

    @property
    def started_at(self) -> float:
        return self._lease.started_at

    @property
    def sip(self) -> list[str]:
        return self._lease.sip

    @property
    def api(self) -> str:
        return self._lease.api

    @property
    def renew_rtt(self) -> float:
        """Seconds, the last successful renewal."""
        return self._lease.renew_rtt

    @property
    def handovers(self) -> int:
        """Homes this node took over from a node whose lease had ended."""
        return self._homes.handovers

    @property
    def on_acquired(self) -> OnAcquired | None:
        return self._homes.on_acquired

    @on_acquired.setter
    def on_acquired(self, callback: OnAcquired | None) -> None:
        self._homes.on_acquired = callback

    @property
    def _revision(self) -> int:
        """Of our lease entry (tests watch it advance)."""
        return self._lease.revision

    @property
    def _watchers(self) -> list[Any]:
        """Of the current watch (KeyWatcher objects)."""
        return self._view.watchers

    # ------------------------------------------------------------------ the call path (no round trip)

    def holds_lease(self) -> bool:
        return self._lease.holds()

    def home_of(self, profile_id: str) -> Home | None:
        """The profile's valid home as this node sees it, or None (never homed, or its holder's lease
        ended: the next :meth:`acquire` decides)."""
        return self._view.home_of(profile_id)

    def is_home(self, profile_id: str) -> bool:
        """True when this node may admit the profile's calls now: it is the home with this epoch, its
        recovery is done, and the lease is held."""
        return self._homes.is_home(profile_id)

    def members(self) -> dict[str, NodeLease]:
        """Nodes whose lease lives as this node sees them (itself only while it holds its lease)."""
        return self._view.members()

    def homes(self) -> dict[str, Home]:
        return self._view.homes()

    def homed_count(self) -> int:
        return self._homes.homed_count()

    @property
    def lease_expires_at(self) -> float:
        """The monotonic instant :meth:`holds_lease` turns False unless a renewal succeeds first."""
        return self._lease.expires_at

    # ------------------------------------------------------------------ life

    async def start(self, *, wait: float | None = None, resume: tuple[str, float] | None = None) -> None:
        """Take this node's lease (waiting up to ``wait`` seconds, default two leases, for a previous
        run's entry to age out), load the local view, start renewing and watching.

        :param resume: ``(epoch, held_until)`` of this node's previous agent, which is gone (it
            died and its supervisor started this one): go on with that lease if the engine still
            holds it, so that what the node admitted under it keeps its fence
            (see :meth:`OwnLease.resume <edge.cluster.lease.OwnLease.resume>`).
        :raises NodeNameInUse: the entry is still renewed by another process after ``wait``.
        :raises LeaseConfigMismatch: the cluster runs with another lease_seconds.
        :raises EngineUnavailable: the engine did not take the lease within ``wait``.
        """
        wait = wait if wait is not None else 2 * self.lease_seconds + 2
        deadline = self._clock() + wait
        ttl = await self._buckets.open(wait, deadline, self._clock)
        self._view.note_reconnects()
        self._lease.check_ttl(ttl)
        if resume is None or not await self._lease.resume(*resume):
            await self._lease.take(max(0.0, deadline - self._clock()))
        await self._view.start()
        self._tasks.append(asyncio.create_task(self._lease.renew_loop(), name=f"cluster-renew-{self.node}"))
        self._tasks.append(asyncio.create_task(self._check_loop(), name=f"cluster-check-{self.node}"))

    async def stop(self, *, release: bool = True) -> None:
        """Stop renewing; with ``release`` fence first, then delete the lease so that the others take
        this node's homes at once instead of after the lease time."""
        self._stopping = True
        tasks = [*self._tasks, *self._spawned, *self._homes.inflight.values(),
                 *filter(None, [self._view.watch_task])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self._lease.stop(release=release)

    def simulate_death(self) -> None:
        """Tests: stop renewing and watching without telling anyone (as a node that froze or died)."""
        self._stopping = True
        for task in [*self._tasks, *self._spawned, *filter(None, [self._view.watch_task])]:
            task.cancel()

    # ------------------------------------------------------------------ homes and leases' ends

    async def acquire(self, profile_id: str) -> Home:
        """Make this node the profile's home unless a live node holds it; return the home after the
        attempt (ours, or the live holder's). Two nodes racing: the engine's CAS lets exactly one win.

        :raises ValueError: ``profile_id`` is not a valid key.
        :raises LeaseLost: this node does not hold its lease.
        """
        return await self._homes.acquire(profile_id)

    async def lease_ended(self, node: str, epoch: str) -> bool:
        """Whether the lease of (node, epoch) has ended for good, confirmed through the engine's log
        (what a handover rests on): what it held may be recovered now."""
        return not await self._liveness.lease_alive(node, epoch)

    async def _confirm_ended(self, node: str, epoch: str) -> bool:
        """Create a delete marker on (node, epoch)'s lease key if the key has no message. True: the
        lease had ended (for good). False: the key got a message meanwhile (a lease or a marker)."""
        return await self._liveness.confirm_ended(node, epoch)

    async def _reconcile(self, sent: float) -> bool:
        """What a renewal that lost its compare-and-swap does (edge/cluster/lease.py)."""
        return await self._lease.reconcile(sent)

    # ------------------------------------------------------------------ the check and takeovers

    async def _check_loop(self) -> None:
        """Every lease/3: members not seen renewing for half a lease are read from the engine (a
        watcher does not see an entry age out on nats-server 2.9); stale homes are taken over; a
        watch that stopped delivering our own renewals is started again."""
        period = self.lease_seconds / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self._check_once()
            except Exception:   # never let the check end: log it, the next period tries again
                log.exception("cluster: the membership check of %s failed", self.node)

    async def _check_once(self) -> None:
        await self._view.check()
        await self._homes.takeover()

    def _maybe_takeover(self) -> None:
        """A lease ended or a node came back with a new epoch: take over what is ours, in the background."""
        if self._view.synced.is_set() and not self._stopping:
            task = asyncio.get_running_loop().create_task(self._homes.takeover())
            self._spawned.add(task)
            task.add_done_callback(self._spawned.discard)
