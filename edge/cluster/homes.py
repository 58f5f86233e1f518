"""Profile homes: acquiring one, handing a dead node's over, and which survivor takes which (docs/cluster.md).

A profile's home is the highest generation of ``home.<profile_id>.<generation>``; it moves only by
*creating* the next generation, after the engine confirmed that the holder's lease ended
(edge/cluster/liveness.py), so of all racers for one generation exactly one wins.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from .buckets import KEY, Buckets, Holder, Home, home_key
from .engine import EngineUnavailable
from .lease import LeaseLost, OwnLease
from .liveness import Liveness
from .metrics import ClusterMetrics
from .view import View

log = logging.getLogger("sipedge.cluster")

ACQUIRE_ATTEMPTS = 5                      # CAS races lost in a row before acquire() gives up (bounded)
MAX_GENERATION_WALK = 64                  # newer home generations one acquire reads past its view (bounded)
TAKEOVER_CONCURRENCY = 32                 # acquires in flight while taking over a dead node's homes

OnAcquired = Callable[[str, "Holder | None"], "Awaitable[None] | None"]


def rendezvous(profile_id: str, nodes: Iterable[str]) -> str | None:
    """The node among ``nodes`` that takes ``profile_id`` over (highest random weight, RFC-free HRW):
    every survivor computes the same answer from the same set, and a node's death moves only its
    own profiles."""
    best, best_weight = None, b""
    for node in nodes:
        weight = hashlib.blake2b(f"{node}\0{profile_id}".encode(), digest_size=8).digest()
        if best is None or weight > best_weight:
            best, best_weight = node, weight
    return best


class Homes:
    """This node's side of the profiles' homes: which it may admit for, acquiring, taking over.

    :param buckets: the membership's buckets.
    :param lease: this node's own lease (no home is taken without it).
    :param view: the local view (the newest generation seen, the live members).
    :param liveness: what decides that a holder's lease ended.
    :param on_acquired: called as ``on_acquired(profile_id, previous)`` once this node became a
        profile's home, before :meth:`is_home` says so (see :class:`~edge.cluster.membership.Membership`).
    :param metrics: edge_cluster_* to update, or None.
    """

    def __init__(self, buckets: Buckets, lease: OwnLease, view: View, liveness: Liveness, *,
                 on_acquired: OnAcquired | None, metrics: ClusterMetrics | None) -> None:
        self.buckets = buckets
        self.lease = lease
        self.view = view
        self.liveness = liveness
        self.on_acquired = on_acquired
        self.metrics = metrics
        self.handovers = 0
        self._recovering: dict[str, Holder | None] = {}   # ours in the engine, on_acquired not done yet
        self.inflight: dict[str, asyncio.Task[Home]] = {}

    # ------------------------------------------------------------------ the call path (no round trip)

    def is_home(self, profile_id: str) -> bool:
        """True when this node may admit the profile's calls now: it is the home with this epoch, its
        recovery is done, and the lease is held."""
        home = self.view.home(profile_id)
        return (home is not None and home.node == self.lease.node and home.epoch == self.lease.epoch
                and profile_id not in self._recovering and self.lease.holds())

    def homed_count(self) -> int:
        if not self.lease.holds():
            return 0
        return sum(1 for p in self.view.profiles_of((self.lease.node, self.lease.epoch)) if p not in self._recovering)

    # ------------------------------------------------------------------ acquire

    async def acquire(self, profile_id: str) -> Home:
        """Make this node the profile's home unless a live node holds it; return the home after the
        attempt (ours, or the live holder's). Two nodes racing: the engine's CAS lets exactly one win.

        :raises ValueError: ``profile_id`` is not a valid key.
        :raises LeaseLost: this node does not hold its lease.
        """
        if not KEY.fullmatch(profile_id):
            raise ValueError(f"profile id {profile_id!r}: letters, digits, '-', '_', '=' only")
        task = self.inflight.get(profile_id)
        if task is None:   # one attempt per profile at a time: a timed-out write that landed is then ours
            task = self.inflight[profile_id] = asyncio.create_task(self._acquire(profile_id))
            task.add_done_callback(lambda _t: self.inflight.pop(profile_id, None))
        return await asyncio.shield(task)

    async def _newest(self, profile_id: str) -> tuple[int, Home | None]:
        """The newest generation of the profile's home and its value: from the local view's (a key is
        written once, so a value seen is exact), walking forward while a newer one exists (bounded)."""
        homes = self.buckets.homes
        gen = self.view.generation(profile_id)
        current = self.view.home(profile_id) if gen else None
        for _ in range(MAX_GENERATION_WALK):
            try:
                entry = await homes.get(home_key(profile_id, gen + 1))
            except KeyNotFoundError:
                return gen, current
            gen, current = gen + 1, msgspec.json.decode(entry.value or b"", type=Home)
            self.view.apply_home(profile_id, current, gen)
        raise EngineUnavailable(f"cluster: the home of {profile_id} is more than {MAX_GENERATION_WALK} "
                                "generations ahead of this node's view")

    async def _acquire(self, profile_id: str) -> Home:
        homes = self.buckets.homes
        wrote = False                       # a write was sent: finding ourselves later means it landed
        previous: Holder | None = None      # the holder that write replaced
        for _ in range(ACQUIRE_ATTEMPTS):
            if not self.lease.holds():
                raise LeaseLost(f"cluster: node {self.lease.node} does not hold its lease")
            me = (self.lease.node, self.lease.epoch)
            try:
                gen, current = await self._newest(profile_id)
                if current is None or current.holder != me:
                    self._recovering.pop(profile_id, None)     # a write of ours that did not land
                if current is not None and current.holder == me:
                    if wrote or profile_id in self._recovering:
                        await self._recover(profile_id, self._recovering.get(profile_id, previous))
                    return current
                if current is not None and await self.liveness.lease_alive(current.node, current.epoch):
                    return current
                mine = Home(node=self.lease.node, epoch=self.lease.epoch, since=time.time())
                previous = current.holder if current is not None else None
                wrote = True
                # not admitted until on_acquired returns, even if the watch shows our write first
                self._recovering[profile_id] = previous
                # a create: of all racers for generation gen + 1 exactly one lands
                await homes.create(home_key(profile_id, gen + 1), msgspec.json.encode(mine))
                if previous is not None:
                    self.handovers += 1
                    if self.metrics is not None:
                        self.metrics.handovers.inc()
                self._recovering[profile_id] = previous
                self.view.apply_home(profile_id, mine, gen + 1)
                await self._recover(profile_id, previous)
                return mine
            except KeyWrongLastSequenceError:
                continue            # somebody wrote first: read again
            except (TimeoutError, NatsError):
                await asyncio.sleep(0.1)   # the write may have landed: the next read tells
        raise EngineUnavailable(f"cluster: no decision on the home of {profile_id} after {ACQUIRE_ATTEMPTS} attempts")

    async def _recover(self, profile_id: str, previous: Holder | None) -> None:
        """Run on_acquired; until it returns the home is ours in the engine but is_home() says no."""
        self._recovering[profile_id] = previous
        if self.on_acquired is not None:
            result = self.on_acquired(profile_id, previous)
            if inspect.isawaitable(result):
                await result
        self._recovering.pop(profile_id, None)

    # ------------------------------------------------------------------ takeover

    async def takeover(self) -> None:
        """Take the homes of ended leases that are ours to take: our own old epoch's, else those that
        rendezvous hashing over the live members gives to us (the others compute the same); a dead
        epoch of a node that is live again is left to that node. Leftovers go to whoever acquires next."""
        if not self.lease.holds() or not self.view.synced.is_set():
            return
        live = set(self.view.members())
        mine: list[str] = []
        for holder, profiles in self.view.by_holder():
            node, epoch = holder
            alive = (node, epoch) == (self.lease.node, self.lease.epoch) or self.view.is_live(node, epoch)
            if alive:
                continue
            if node in live:    # that node is back with a new epoch (restart, lapsed lease): its store has
                if node == self.lease.node:     # the profile's state, so the home goes back to it, not elsewhere
                    mine += profiles
                continue
            mine += [p for p in profiles if rendezvous(p, live) == self.lease.node]
        mine += [p for p in self._recovering if p not in mine]   # an on_acquired that failed: again
        if not mine:
            return
        gate = asyncio.Semaphore(TAKEOVER_CONCURRENCY)

        async def one(profile_id: str) -> None:
            async with gate:
                try:
                    await self.acquire(profile_id)
                except (LeaseLost, EngineUnavailable) as exc:
                    log.info("cluster: takeover of %s postponed: %s", profile_id, exc)
                except Exception:
                    log.exception("cluster: takeover of %s failed", profile_id)

        await asyncio.gather(*(one(p) for p in mine))
