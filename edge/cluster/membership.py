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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import msgspec
from nats.errors import Error as NatsError
from nats.js.api import Header
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue
from prometheus_client import CollectorRegistry, Counter, Gauge

from .engine import Engine, EngineUnavailable

T = TypeVar("T")

log = logging.getLogger("sipedge.cluster")

NAMESPACE = "sipedge"                     # buckets <namespace>_nodes and <namespace>_homes
_KEY = re.compile(r"^[-_=a-zA-Z0-9]+$")   # one token of a NATS subject (no dots: one key, one profile)
ACQUIRE_ATTEMPTS = 5                      # CAS races lost in a row before acquire() gives up (bounded)
MAX_GENERATION_WALK = 64                  # newer home generations one acquire reads past its view (bounded)
TAKEOVER_CONCURRENCY = 32                 # acquires in flight while taking over a dead node's homes

Holder = tuple[str, str]                  # (node, epoch)
OnAcquired = Callable[[str, "Holder | None"], "Awaitable[None] | None"]


class NodeLease(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    node: str
    epoch: str                            # random per run and per re-created lease
    started_at: float                     # unix seconds of this run's start (for people)
    sip: list[str] = []                   # addresses the caller gave (where other nodes forward calls)
    api: str = ""


class Home(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    node: str
    epoch: str
    since: float                          # unix seconds it became this holder's

    @property
    def holder(self) -> Holder:
        return (self.node, self.epoch)


class LeaseLost(Exception):
    """This node does not hold its lease (cut off from the engine, or not started): it may not take homes."""


class NodeNameInUse(Exception):
    """Another running process renews the lease of this node name."""


class LeaseConfigMismatch(Exception):
    """The cluster's lease bucket ages entries out after another time than this node's lease_seconds."""


def lease_key(node: str, epoch: str) -> str:
    """One key per (node, epoch): a lease that ended never comes back, so "ended" is a stable fact."""
    return f"node.{node}.{epoch}"


async def last_entries(kv: KeyValue, pattern: str = ">", *, timeout: float = 5.0) -> list[KeyValue.Entry]:
    """The last entry of every key matching ``pattern`` that is not deleted (one ordered consumer)."""
    watcher = await kv.watch(pattern)
    out = []
    try:
        while True:
            entry = await watcher.updates(timeout=timeout)
            if entry is None:
                break
            if entry.operation not in (KV_DEL, KV_PURGE):
                out.append(entry)
            if entry.delta == 0:
                break
    finally:
        await watcher.stop()
    return out


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


def fencing_margin(lease_seconds: float) -> float:
    """How much earlier than the engine the holder gives its lease up: 10 % (clock-rate drift,
    far below 1 % on any NTP-disciplined or even free-running quartz clock) and at least 0.2 s."""
    return max(0.2, 0.1 * lease_seconds)


class ClusterMetrics:
    """edge_cluster_* (docs/cluster.md). Gauges read the membership at scrape time."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.members = Gauge("edge_cluster_members", "Nodes whose lease lives, as this node sees them.", registry=r)
        self.lease_held = Gauge("edge_cluster_lease_held",
                                "1 while this node holds its lease (admits calls of its homes), else 0.", registry=r)
        self.homed = Gauge("edge_cluster_profiles_homed", "Profiles whose home is this node.", registry=r)
        self.handovers = Counter("edge_cluster_handovers",
                                 "Homes this node took over from a node whose lease had ended.", registry=r)
        self.rtt = Gauge("edge_cluster_engine_rtt_seconds",
                         "Round trip of the last successful lease renewal (a replicated write).", registry=r)
        self.renew_failures = Counter("edge_cluster_lease_renewal_failures",
                                      "Lease renewals that failed (timeout, engine unreachable, aged out).",
                                      registry=r)
        self.engine_connected = Gauge("edge_cluster_engine_connected",
                                      "1 while the client is connected to a member of the engine, else 0.",
                                      registry=r)
        self.leases_lost = Counter("edge_cluster_leases_lost",
                                   "Times this node's lease aged out and was created anew (a new epoch).",
                                   registry=r)

    def bind(self, membership: Membership) -> None:
        self.members.set_function(lambda: len(membership.members()))
        self.lease_held.set_function(lambda: 1.0 if membership.holds_lease() else 0.0)
        self.homed.set_function(lambda: membership.homed_count())
        self.engine_connected.set_function(lambda: 1.0 if membership.engine.connected else 0.0)


class _Member:
    __slots__ = ("lease", "revision", "seen")

    def __init__(self, lease: NodeLease, revision: int, seen: float) -> None:
        self.lease = lease          # the last value read or watched
        self.revision = revision    # its stream sequence
        self.seen = seen            # monotonic instant a NEW revision was last seen (renewals advance it)


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
        if not _KEY.fullmatch(self.node):
            raise ValueError(f"cluster.node: {self.node!r} is not a valid node name")
        self.lease_seconds = float(lease_seconds or engine.cfg.lease_seconds)
        self.margin = fencing_margin(self.lease_seconds)
        self.sip = list(sip)
        self.api = api
        self.on_acquired = on_acquired
        self.nodes_bucket, self.homes_bucket = f"{namespace}_nodes", f"{namespace}_homes"
        self.metrics = metrics
        self.epoch = ""
        self.started_at = time.time()
        self._clock = time.monotonic
        self._held_until = 0.0          # monotonic; see fencing in the module docstring
        self._revision = 0              # of our lease entry
        self._nodes: KeyValue | None = None
        self._homes_kv: KeyValue | None = None
        self._members: dict[str, _Member] = {}
        self._homes: dict[str, Home] = {}
        self._home_gen: dict[str, int] = {}     # profile -> generation of the home in _homes
        self._by_holder: dict[Holder, set[str]] = {}
        self._recovering: dict[str, Holder | None] = {}   # ours in the engine, on_acquired not done yet
        self._inflight: dict[str, asyncio.Task[Home]] = {}
        self._gone: dict[str, int] = {}     # node -> last revision of a lease seen ending (no resurrection)
        self._ended: set[Holder] = set()    # leases confirmed ended through the log: ended for good
        self._own_seen = 0.0                # monotonic: our own renewal last came back through the watch
        self._name_taken_logged = False
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[None]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._watchers: list[Any] = []     # of the current watch (KeyWatcher objects)
        self._seen_reconnects = 0
        self._synced = asyncio.Event()
        self._stopping = False
        self.renew_rtt = 0.0            # seconds, last successful renewal
        self.handovers = 0
        if metrics is not None:
            metrics.bind(self)

    # ------------------------------------------------------------------ the call path (no round trip)

    def holds_lease(self) -> bool:
        return self._clock() < self._held_until

    def home_of(self, profile_id: str) -> Home | None:
        """The profile's valid home as this node sees it, or None (never homed, or its holder's lease
        ended: the next :meth:`acquire` decides)."""
        home = self._homes.get(profile_id)
        if home is None:
            return None
        if home.holder == (self.node, self.epoch):
            return home if self.holds_lease() else None
        member = self._members.get(home.node)
        return home if member is not None and member.lease.epoch == home.epoch else None

    def is_home(self, profile_id: str) -> bool:
        """True when this node may admit the profile's calls now: it is the home with this epoch, its
        recovery is done, and the lease is held."""
        home = self._homes.get(profile_id)
        return (home is not None and home.node == self.node and home.epoch == self.epoch
                and profile_id not in self._recovering and self.holds_lease())

    def members(self) -> dict[str, NodeLease]:
        """Nodes whose lease lives as this node sees them (itself only while it holds its lease)."""
        out = {name: m.lease for name, m in self._members.items() if name != self.node}
        if self.holds_lease():
            out[self.node] = self._lease_value()
        return out

    def homes(self) -> dict[str, Home]:
        return dict(self._homes)

    def homed_count(self) -> int:
        if not self.holds_lease():
            return 0
        return sum(1 for p in self._by_holder.get((self.node, self.epoch), ()) if p not in self._recovering)

    @property
    def lease_expires_at(self) -> float:
        """The monotonic instant :meth:`holds_lease` turns False unless a renewal succeeds first."""
        return self._held_until

    # ------------------------------------------------------------------ life

    async def start(self, *, wait: float | None = None, resume: tuple[str, float] | None = None) -> None:
        """Take this node's lease (waiting up to ``wait`` seconds, default two leases, for a previous
        run's entry to age out), load the local view, start renewing and watching.

        :param resume: ``(epoch, held_until)`` of this node's previous agent, which is gone (it
            died and its supervisor started this one): go on with that lease if the engine still
            holds it, so that what the node admitted under it keeps its fence (see :meth:`_resume`).
        :raises NodeNameInUse: the entry is still renewed by another process after ``wait``.
        :raises LeaseConfigMismatch: the cluster runs with another lease_seconds.
        :raises EngineUnavailable: the engine did not take the lease within ``wait``.
        """
        wait = wait if wait is not None else 2 * self.lease_seconds + 2
        deadline = self._clock() + wait
        while True:     # a bucket's creation (3 replicas placed) can outlast one request's timeout
            try:
                self._nodes = await self.engine.bucket(self.nodes_bucket, ttl=self.lease_seconds)
                self._homes_kv = await self.engine.bucket(self.homes_bucket)
                ttl = (await self._nodes.status()).ttl or 0.0
                break
            except (TimeoutError, NatsError) as exc:
                if self._clock() > deadline:
                    raise EngineUnavailable(f"cluster: the membership buckets not ready in {wait:g} s "
                                            f"({exc!r})") from None
                await asyncio.sleep(0.5)
        self._seen_reconnects = self._reconnects()
        if abs(ttl - self.lease_seconds) > 1e-3:
            # the engine ages leases out after the bucket's ttl: a longer local lease would fence too late
            raise LeaseConfigMismatch(f"cluster.lease_seconds: this node has {self.lease_seconds:g}, the cluster's "
                                      f"lease bucket {self.nodes_bucket} ages out after {ttl:g} s; use the same value")
        if resume is None or not await self._resume(*resume):
            await self._take_lease(max(0.0, deadline - self._clock()))
        self._own_seen = self._clock()
        self._start_watch()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), timeout=self.lease_seconds)
        self._tasks.append(asyncio.create_task(self._renew_loop(), name=f"cluster-renew-{self.node}"))
        self._tasks.append(asyncio.create_task(self._check_loop(), name=f"cluster-check-{self.node}"))

    async def stop(self, *, release: bool = True) -> None:
        """Stop renewing; with ``release`` fence first, then delete the lease so that the others take
        this node's homes at once instead of after the lease time."""
        self._stopping = True
        tasks = [*self._tasks, *self._spawned, *self._inflight.values(), *filter(None, [self._watch_task])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        held = self.holds_lease()
        self._held_until = 0.0      # fenced before the entry goes: nobody takes a home we still admit for
        if release and held and self._nodes is not None:
            with contextlib.suppress(NatsError, asyncio.TimeoutError):
                await self._nodes.delete(self._lease_key, last=self._revision)

    def simulate_death(self) -> None:
        """Tests: stop renewing and watching without telling anyone (as a node that froze or died)."""
        self._stopping = True
        for task in [*self._tasks, *self._spawned, *filter(None, [self._watch_task])]:
            task.cancel()

    # ------------------------------------------------------------------ the lease

    @property
    def _lease_key(self) -> str:
        return lease_key(self.node, self.epoch)

    def _lease_value(self) -> NodeLease:
        return NodeLease(node=self.node, epoch=self.epoch, started_at=self.started_at, sip=self.sip, api=self.api)

    def _held(self, sent: float, revision: int) -> None:
        self._revision = revision
        self._held_until = max(self._held_until, sent + self.lease_seconds - self.margin)
        self.renew_rtt = self._clock() - sent
        if self.metrics is not None:
            self.metrics.rtt.set(self.renew_rtt)

    async def _take_lease(self, wait: float) -> None:
        """Create our lease with a new epoch once no other lease of our name lives (bounded by ``wait``).

        Safety does not rest on this wait (a lease is per (node, epoch)); it makes a restarted node's
        old epoch end before the new one starts, and a second process with the same name an error.
        """
        assert self._nodes is not None
        deadline = self._clock() + wait
        while True:
            try:
                others = await self._leases_of_our_name()
                if not others:
                    break
            except (TimeoutError, NatsError) as exc:
                if self._clock() > deadline:
                    raise EngineUnavailable(f"cluster: the engine did not answer in {wait:g} s ({exc!r})") from None
            if self._clock() > deadline:
                raise NodeNameInUse(f"cluster.node: {self.node!r} is renewed by another running process "
                                    f"(its lease did not age out in {wait:g} s); node names must be unique")
            await asyncio.sleep(min(0.25, self.lease_seconds / 6))
        self.epoch = secrets.token_hex(6)
        while True:
            sent = self._clock()
            try:
                revision = await self._nodes.create(self._lease_key, msgspec.json.encode(self._lease_value()))
                self._held(sent, revision)
                log.info("cluster: node %s holds its lease (epoch %s)", self.node, self.epoch)
                return
            except KeyWrongLastSequenceError:      # only our own timed-out create can have made this key
                found = await self._read_lease(self.node, self.epoch)
                if found is not None:
                    self._held(sent, found[1])
                    return
            except (TimeoutError, NatsError) as exc:
                if self._clock() > deadline:
                    raise EngineUnavailable(f"cluster: no lease taken in {wait:g} s ({exc!r})") from None
            await asyncio.sleep(min(0.25, self.lease_seconds / 6))

    async def _resume(self, epoch: str, held_until: float) -> bool:
        """Renew the lease ``epoch`` of this node's previous process, believed held until
        ``held_until`` (monotonic, that process's own belief: the fence it admitted under). Only
        this node ever writes that key and its previous writer is gone, so the conditional update
        on the revision read is uncontended; a stale read or an aged-out key refuses it, and the
        node takes a new lease as at any start. :returns: whether the lease goes on."""
        assert self._nodes is not None
        if not _KEY.fullmatch(epoch) or held_until <= self._clock():
            return False
        try:
            found = await self._read_lease(self.node, epoch)
            if found is None or found[0].node != self.node:
                return False
            self.epoch, self._held_until = epoch, held_until
            self.started_at = found[0].started_at
            sent = self._clock()
            revision = await self._nodes.update(self._lease_key, msgspec.json.encode(self._lease_value()),
                                                last=found[1])
        except (KeyWrongLastSequenceError, TimeoutError, NatsError) as exc:
            log.info("cluster: lease %s of %s not resumed (%s): taking a new one", epoch, self.node,
                     exc.__class__.__name__)
            self.epoch, self._held_until = "", 0.0
            return False
        self._held(sent, revision)
        log.info("cluster: node %s goes on with its lease (epoch %s) after its agent restarted", self.node, epoch)
        return True

    async def _leases_of_our_name(self) -> list[KeyValue.Entry]:
        """Leases of this node's name (any epoch) seen within half a lease: a live one is renewed
        every third of a lease, so it shows even if the watch's initial replay missed it (a renewal
        can replace the message the consumer was about to start from)."""
        assert self._nodes is not None
        watcher = await self._nodes.watch(f"node.{self.node}.*")
        found: dict[str, KeyValue.Entry] = {}
        deadline = self._clock() + self.lease_seconds / 2
        try:
            while (left := deadline - self._clock()) > 0:
                try:
                    entry = await watcher.updates(timeout=left)
                except TimeoutError:
                    break
                if entry is None:
                    continue
                if entry.operation in (KV_DEL, KV_PURGE):
                    found.pop(entry.key, None)
                elif entry.key != self._lease_key:
                    found[entry.key] = entry
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return list(found.values())

    async def _read_lease(self, node: str, epoch: str) -> tuple[NodeLease, int] | None:
        assert self._nodes is not None
        try:
            entry = await self._nodes.get(lease_key(node, epoch))
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"", type=NodeLease), entry.revision or 0

    async def _renew_loop(self) -> None:
        assert self._nodes is not None
        period = self.lease_seconds / 3
        failures, held_before = 0, self.lease_seconds
        while True:
            sent = self._clock()
            ok = False
            try:
                revision = await self._nodes.update(self._lease_key, msgspec.json.encode(self._lease_value()),
                                                    last=self._revision)
                self._held(sent, revision)
                ok = True
            except KeyWrongLastSequenceError:
                ok = await self._reconcile(sent)
            except Exception as exc:    # timeouts, no responders, a closed connection: the lease runs down
                if not isinstance(exc, TimeoutError | NatsError):
                    log.exception("cluster: lease renewal of %s", self.node)
                left = self._held_until - self._clock()
                if failures == 0 or (left <= 0 < held_before):    # the first of a streak, and the lease's end
                    log.warning("cluster: lease renewal of %s failed (%s); %s", self.node, exc.__class__.__name__,
                                f"holds it for {left:.2f} s more" if left > 0 else "fenced: admits nothing")
            failures = 0 if ok else failures + 1
            held_before = self._held_until - self._clock()
            if not ok and self.metrics is not None:
                self.metrics.renew_failures.inc()
            # after a failure retry soon: the rest of the lease is what a retry can still save
            await asyncio.sleep(max(0.0, period - (self._clock() - sent)) if ok else min(0.2, period))

    async def _reconcile(self, sent: float) -> bool:
        """A renewal lost its compare-and-swap: re-read (a timed-out write of ours may have landed, as
        only we write this epoch's key while it lives); gone -> it aged out or was confirmed ended by
        another node: fence, take a new epoch (our old homes are stale like any dead node's) -- unless
        another process took our name meanwhile (started while we were cut off): then stay fenced."""
        assert self._nodes is not None
        try:
            found = await self._read_lease(self.node, self.epoch)
            if found is not None:
                self._revision = found[1]       # our own earlier write: renew again from it at once
                return False
            self._held_until = 0.0
            others = await self._leases_of_our_name()
            if others:      # our name was taken by another process while we were away: stay fenced
                if not self._name_taken_logged:
                    log.error("cluster: node name %s is in use by another process (%s); this one stays fenced",
                              self.node, others[0].key)
                    self._name_taken_logged = True
                return False
            old = self.epoch
            self.epoch = secrets.token_hex(6)
            revision = await self._nodes.create(self._lease_key, msgspec.json.encode(self._lease_value()))
            self._held(sent, revision)
            if self.metrics is not None:
                self.metrics.leases_lost.inc()
            log.warning("cluster: lease of %s had ended (epoch %s); new epoch %s", self.node, old, self.epoch)
            self._maybe_takeover()
            return True
        except (TimeoutError, KeyWrongLastSequenceError, NatsError):
            return False

    # ------------------------------------------------------------------ homes

    async def acquire(self, profile_id: str) -> Home:
        """Make this node the profile's home unless a live node holds it; return the home after the
        attempt (ours, or the live holder's). Two nodes racing: the engine's CAS lets exactly one win.

        :raises ValueError: ``profile_id`` is not a valid key.
        :raises LeaseLost: this node does not hold its lease.
        """
        if not _KEY.fullmatch(profile_id):
            raise ValueError(f"profile id {profile_id!r}: letters, digits, '-', '_', '=' only")
        task = self._inflight.get(profile_id)
        if task is None:   # one attempt per profile at a time: a timed-out write that landed is then ours
            task = self._inflight[profile_id] = asyncio.create_task(self._acquire(profile_id))
            task.add_done_callback(lambda _t: self._inflight.pop(profile_id, None))
        return await asyncio.shield(task)

    async def _newest(self, profile_id: str) -> tuple[int, Home | None]:
        """The newest generation of the profile's home and its value: from the local view's (a key is
        written once, so a value seen is exact), walking forward while a newer one exists (bounded)."""
        assert self._homes_kv is not None
        gen = self._home_gen.get(profile_id, 0)
        current = self._homes.get(profile_id) if gen else None
        for _ in range(MAX_GENERATION_WALK):
            try:
                entry = await self._homes_kv.get(f"home.{profile_id}.{gen + 1}")
            except KeyNotFoundError:
                return gen, current
            gen, current = gen + 1, msgspec.json.decode(entry.value or b"", type=Home)
            self._apply_home(profile_id, current, gen)
        raise EngineUnavailable(f"cluster: the home of {profile_id} is more than {MAX_GENERATION_WALK} "
                                "generations ahead of this node's view")

    async def _acquire(self, profile_id: str) -> Home:
        assert self._homes_kv is not None
        wrote = False                       # a write was sent: finding ourselves later means it landed
        previous: Holder | None = None      # the holder that write replaced
        for _ in range(ACQUIRE_ATTEMPTS):
            if not self.holds_lease():
                raise LeaseLost(f"cluster: node {self.node} does not hold its lease")
            me = (self.node, self.epoch)
            try:
                gen, current = await self._newest(profile_id)
                if current is None or current.holder != me:
                    self._recovering.pop(profile_id, None)     # a write of ours that did not land
                if current is not None and current.holder == me:
                    if wrote or profile_id in self._recovering:
                        await self._recover(profile_id, self._recovering.get(profile_id, previous))
                    return current
                if current is not None and await self._lease_alive(current.node, current.epoch):
                    return current
                mine = Home(node=self.node, epoch=self.epoch, since=time.time())
                previous = current.holder if current is not None else None
                wrote = True
                # not admitted until on_acquired returns, even if the watch shows our write first
                self._recovering[profile_id] = previous
                # a create: of all racers for generation gen + 1 exactly one lands
                await self._homes_kv.create(f"home.{profile_id}.{gen + 1}", msgspec.json.encode(mine))
                if previous is not None:
                    self.handovers += 1
                    if self.metrics is not None:
                        self.metrics.handovers.inc()
                self._recovering[profile_id] = previous
                self._apply_home(profile_id, mine, gen + 1)
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

    async def lease_ended(self, node: str, epoch: str) -> bool:
        """Whether the lease of (node, epoch) has ended for good, confirmed through the engine's log
        (what a handover rests on): what it held may be recovered now."""
        return not await self._lease_alive(node, epoch)

    async def _lease_alive(self, node: str, epoch: str) -> bool:
        """Whether the lease of (node, epoch) lives, decided by the engine, never by the local view: a
        handover rests on it.

        A delete marker on the lease's key proves its end: only a node that fenced (releasing) or a
        confirmed end (below) writes one, and nobody renews a key after it. An absent key does not
        prove it: reads are not linearizable (a deposed leader may still answer, from a state in
        which a live lease had aged out). So absence is confirmed by a write only the replicated log
        can accept -- a delete marker created on condition that the key has no message (expected
        last sequence 0, which 2.9 enforces under concurrency); if it is refused, something was
        written meanwhile and a second read says which.
        """
        if (node, epoch) in self._ended:
            return False
        for _ in range(2):
            state = await self._lease_state(node, epoch)
            if state is not None:
                return state
            if await self._confirm_ended(node, epoch):
                return False
        return True     # written since, twice: as good as alive; the next acquire looks again

    async def _lease_state(self, node: str, epoch: str) -> bool | None:
        """True: the lease's key holds a lease; False: a delete marker (ended); None: no message."""
        subject = f"$KV.{self.nodes_bucket}.{lease_key(node, epoch)}"
        try:
            msg = await self.engine.js.get_msg(f"KV_{self.nodes_bucket}", subject=subject)
        except NotFoundError:
            return None
        if msg.headers and msg.headers.get(KV_OP) in (KV_DEL, KV_PURGE):
            self._ended.add((node, epoch))
            self._forget_member(node, epoch)
            return False
        self._apply_member(msgspec.json.decode(msg.data or b"", type=NodeLease), msg.seq or 0)
        return True

    async def _confirm_ended(self, node: str, epoch: str) -> bool:
        """Create a delete marker on (node, epoch)'s lease key if the key has no message. True: the
        lease had ended (for good). False: the key got a message meanwhile (a lease or a marker)."""
        try:
            await self.engine.js.publish(f"$KV.{self.nodes_bucket}.{lease_key(node, epoch)}", b"", headers={
                KV_OP: KV_DEL, Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"})
        except APIError as exc:
            if exc.err_code in (10071, 10164):      # wrong last sequence
                return False
            raise
        self._ended.add((node, epoch))
        self._forget_member(node, epoch)
        return True

    # ------------------------------------------------------------------ the local view

    def _apply_member(self, lease: NodeLease, revision: int) -> None:
        if lease.node == self.node:
            if lease.epoch == self.epoch:
                self._own_seen = self._clock()
            return          # ourselves: holds_lease() is the truth, not what the bucket echoes
        if (lease.node, lease.epoch) in self._ended or revision <= self._gone.get(lease.node, 0):
            return          # an epoch already seen ending, or older than one (a late watch delivery)
        member = self._members.get(lease.node)
        if member is None or revision > member.revision:
            old_epoch = member.lease.epoch if member is not None else None
            self._members[lease.node] = _Member(lease, revision, self._clock())
            if old_epoch is not None and old_epoch != lease.epoch:
                self._maybe_takeover()      # the node restarted: its old epoch's homes are stale

    def _forget_member(self, node: str, epoch: str) -> None:
        member = self._members.get(node)
        if member is not None and member.lease.epoch == epoch:
            del self._members[node]
            self._gone[node] = max(self._gone.get(node, 0), member.revision)
            log.info("cluster: the lease of node %s (epoch %s) ended", node, member.lease.epoch)
            self._maybe_takeover()

    def _apply_home(self, profile_id: str, home: Home, gen: int) -> None:
        if gen <= self._home_gen.get(profile_id, 0):
            return          # an older generation (or the same one again: keys are written once)
        old = self._homes.get(profile_id)
        if old is not None:
            holders = self._by_holder.get(old.holder)
            if holders is not None:
                holders.discard(profile_id)
                if not holders:
                    del self._by_holder[old.holder]
        self._homes[profile_id] = home
        self._home_gen[profile_id] = gen
        self._by_holder.setdefault(home.holder, set()).add(profile_id)

    def _on_node_entry(self, entry: KeyValue.Entry) -> None:
        parts = entry.key.split(".")
        if len(parts) != 3 or parts[0] != "node":
            return          # not a lease (the bucket is ours, but an operator's probe key is no reason to fail)
        if entry.operation in (KV_DEL, KV_PURGE):
            self._forget_member(parts[1], parts[2])  # released (its node fenced first) or confirmed ended
            return
        lease = _decoded(entry, NodeLease, "lease")
        if lease is not None:
            self._apply_member(lease, entry.revision or 0)

    def _on_home_entry(self, entry: KeyValue.Entry) -> None:
        parts = entry.key.split(".")
        if entry.operation in (KV_DEL, KV_PURGE) or len(parts) != 3 or parts[0] != "home" or not parts[2].isdigit():
            return
        home = _decoded(entry, Home, "home")
        if home is not None:
            self._apply_home(parts[1], home, int(parts[2]))

    def _start_watch(self) -> None:
        """(Re)start the watch of both buckets. A restart cancels the old one rather than asking its
        watchers to stop: a subscription that died silently may not even stop."""
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = asyncio.create_task(self._watch_loop(), name=f"cluster-watch-{self.node}")

    async def _watch_loop(self) -> None:
        """Both buckets' changes into the local view (the first pass replays every key's last value)."""
        assert self._nodes is not None and self._homes_kv is not None
        while True:
            watchers: list[Any] = []
            self._watchers = watchers
            try:
                watchers.append(await self._nodes.watchall())
                watchers.append(await self._homes_kv.watchall())
                async with asyncio.TaskGroup() as group:
                    done = [asyncio.Event(), asyncio.Event()]
                    group.create_task(self._drain(watchers[0], self._on_node_entry, done[0]))
                    group.create_task(self._drain(watchers[1], self._on_home_entry, done[1]))
                    await done[0].wait()
                    await done[1].wait()
                    self._synced.set()
            except* Exception:      # a broken watcher or engine: start both again from the engine's state
                log.warning("cluster: watch of %s broke; starting it again", self.node)
            finally:
                for watcher in watchers:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            await asyncio.sleep(min(1.0, self.lease_seconds / 3))

    @staticmethod
    async def _drain(watcher: Any, apply: Callable[[KeyValue.Entry], None], synced: asyncio.Event) -> None:
        async for entry in watcher:
            if entry is None:   # the end of the initial state
                synced.set()
                continue
            apply(entry)
        synced.set()

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

    def _reconnects(self) -> int:
        stats = getattr(self.engine.nc, "stats", None)
        return int(stats.get("reconnects", 0)) if isinstance(stats, dict) else 0

    async def _check_once(self) -> None:
        now = self._clock()
        for name, member in list(self._members.items()):
            if now - member.seen > self.lease_seconds / 2:
                try:
                    found = await self._read_lease(name, member.lease.epoch)
                except (TimeoutError, NatsError):
                    continue
                if found is None:   # a hint for the view; a handover confirms it (_lease_alive)
                    self._forget_member(name, member.lease.epoch)
                else:
                    self._apply_member(*found)
        reconnects = self._reconnects()
        if reconnects != self._seen_reconnects:
            # the client moved to another member: a push consumer may follow late or not at all
            # (nats-py resets an ordered one after two missed heartbeats, 10 s), so start afresh
            self._seen_reconnects = reconnects
            self._own_seen = now
            self._start_watch()
        elif self.holds_lease() and self._synced.is_set() and now - self._own_seen > self.lease_seconds:
            log.warning("cluster: the watch of %s stopped delivering; starting it again", self.node)
            self._own_seen = now
            self._start_watch()     # it replays both buckets' state
        await self._takeover()

    def _maybe_takeover(self) -> None:
        if self._synced.is_set() and not self._stopping:
            task = asyncio.get_running_loop().create_task(self._takeover())
            self._spawned.add(task)
            task.add_done_callback(self._spawned.discard)

    async def _takeover(self) -> None:
        """Take the homes of ended leases that are ours to take: our own old epoch's, else those that
        rendezvous hashing over the live members gives to us (the others compute the same); a dead
        epoch of a node that is live again is left to that node. Leftovers go to whoever acquires next."""
        if not self.holds_lease() or not self._synced.is_set():
            return
        live = set(self.members())
        mine: list[str] = []
        for holder, profiles in list(self._by_holder.items()):
            node, epoch = holder
            alive = (node, epoch) == (self.node, self.epoch) or (
                node in self._members and self._members[node].lease.epoch == epoch)
            if alive:
                continue
            if node in live:    # that node is back with a new epoch (restart, lapsed lease): its store has
                if node == self.node:   # the profile's state, so the home goes back to it, not elsewhere
                    mine += profiles
                continue
            mine += [p for p in profiles if rendezvous(p, live) == self.node]
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


def _decoded(entry: KeyValue.Entry, kind: type[T], what: str) -> T | None:
    """A watched entry's value, or None (logged) if it is not one: a stray key fails nothing."""
    try:
        return msgspec.json.decode(entry.value or b"", type=kind)
    except msgspec.DecodeError:
        log.warning("cluster: unreadable %s entry %s", what, entry.key)
        return None
