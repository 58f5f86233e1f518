"""This node's own lease: taken, resumed, renewed, reconciled and released, and fenced (docs/cluster.md).

Fencing: a renewal sent at monotonic ``t`` lets the node believe it holds its lease until
``t + lease_seconds - margin`` (:func:`fencing_margin`); the engine ages the entry out
``lease_seconds`` after it stored it, later than ``t``, so the holder always stops believing first
(the argument in full: edge/cluster/membership.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable

import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from .buckets import KEY, Buckets, NodeLease, lease_key
from .engine import EngineUnavailable
from .metrics import ClusterMetrics

log = logging.getLogger("sipedge.cluster")


class LeaseLost(Exception):
    """This node does not hold its lease (cut off from the engine, or not started): it may not take homes."""


class NodeNameInUse(Exception):
    """Another running process renews the lease of this node name."""


class LeaseConfigMismatch(Exception):
    """The cluster's lease bucket ages entries out after another time than this node's lease_seconds."""


def fencing_margin(lease_seconds: float) -> float:
    """How much earlier than the engine the holder gives its lease up: 10 % (clock-rate drift,
    far below 1 % on any NTP-disciplined or even free-running quartz clock) and at least 0.2 s."""
    return max(0.2, 0.1 * lease_seconds)


class OwnLease:
    """The lease ``node.<node>.<epoch>`` this node writes, and its belief of holding it.

    :param buckets: the membership's buckets (opened before :meth:`take` or :meth:`resume`).
    :param node: this node's name.
    :param lease_seconds: the lease time (the lease bucket's ttl).
    :param sip: addresses other nodes use to reach this node's SIP side (stored in the lease).
    :param api: this node's control API address (stored in the lease).
    :param clock: the monotonic clock every instant here is on.
    :param metrics: edge_cluster_* to update, or None.
    :param on_new_epoch: called once a lease that had ended was taken anew: the old epoch's homes
        are stale like any dead node's.
    """

    def __init__(self, buckets: Buckets, *, node: str, lease_seconds: float, sip: Iterable[str], api: str,
                 clock: Callable[[], float], metrics: ClusterMetrics | None,
                 on_new_epoch: Callable[[], None]) -> None:
        self.buckets = buckets
        self.node = node
        self.lease_seconds = lease_seconds
        self.margin = fencing_margin(lease_seconds)
        self.sip = list(sip)
        self.api = api
        self.metrics = metrics
        self.epoch = ""
        self.started_at = time.time()
        self.revision = 0               # of our lease entry
        self.renew_rtt = 0.0            # seconds, last successful renewal
        self._clock = clock
        self._on_new_epoch = on_new_epoch
        self._held_until = 0.0          # monotonic; see fencing in the module docstring
        self._name_taken_logged = False

    # ------------------------------------------------------------------ the belief

    def holds(self) -> bool:
        return self._clock() < self._held_until

    @property
    def expires_at(self) -> float:
        """The monotonic instant :meth:`holds` turns False unless a renewal succeeds first."""
        return self._held_until

    @property
    def key(self) -> str:
        return lease_key(self.node, self.epoch)

    def value(self) -> NodeLease:
        return NodeLease(node=self.node, epoch=self.epoch, started_at=self.started_at, sip=self.sip, api=self.api)

    def _held(self, sent: float, revision: int) -> None:
        self.revision = revision
        self._held_until = max(self._held_until, sent + self.lease_seconds - self.margin)
        self.renew_rtt = self._clock() - sent
        if self.metrics is not None:
            self.metrics.rtt.set(self.renew_rtt)

    def check_ttl(self, ttl: float) -> None:
        """:raises LeaseConfigMismatch: the lease bucket ages entries out after ``ttl`` seconds,
        not after this node's lease_seconds."""
        if abs(ttl - self.lease_seconds) > 1e-3:
            # the engine ages leases out after the bucket's ttl: a longer local lease would fence too late
            raise LeaseConfigMismatch(f"cluster.lease_seconds: this node has {self.lease_seconds:g}, the cluster's "
                                      f"lease bucket {self.buckets.nodes_bucket} ages out after {ttl:g} s; "
                                      "use the same value")

    # ------------------------------------------------------------------ start and stop

    async def take(self, wait: float) -> None:
        """Create our lease with a new epoch once no other lease of our name lives (bounded by ``wait``).

        Safety does not rest on this wait (a lease is per (node, epoch)); it makes a restarted node's
        old epoch end before the new one starts, and a second process with the same name an error.
        """
        nodes = self.buckets.nodes
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
                revision = await nodes.create(self.key, msgspec.json.encode(self.value()))
                self._held(sent, revision)
                log.info("cluster: node %s holds its lease (epoch %s)", self.node, self.epoch)
                return
            except KeyWrongLastSequenceError:      # only our own timed-out create can have made this key
                found = await self.buckets.read_lease(self.node, self.epoch)
                if found is not None:
                    self._held(sent, found[1])
                    return
            except (TimeoutError, NatsError) as exc:
                if self._clock() > deadline:
                    raise EngineUnavailable(f"cluster: no lease taken in {wait:g} s ({exc!r})") from None
            await asyncio.sleep(min(0.25, self.lease_seconds / 6))

    async def resume(self, epoch: str, held_until: float) -> bool:
        """Renew the lease ``epoch`` of this node's previous process, believed held until
        ``held_until`` (monotonic, that process's own belief: the fence it admitted under). Only
        this node ever writes that key and its previous writer is gone, so the conditional update
        on the revision read is uncontended; a stale read or an aged-out key refuses it, and the
        node takes a new lease as at any start. :returns: whether the lease goes on."""
        nodes = self.buckets.nodes
        if not KEY.fullmatch(epoch) or held_until <= self._clock():
            return False
        try:
            found = await self.buckets.read_lease(self.node, epoch)
            if found is None or found[0].node != self.node:
                return False
            self.epoch, self._held_until = epoch, held_until
            self.started_at = found[0].started_at
            sent = self._clock()
            revision = await nodes.update(self.key, msgspec.json.encode(self.value()), last=found[1])
        except (KeyWrongLastSequenceError, TimeoutError, NatsError) as exc:
            log.info("cluster: lease %s of %s not resumed (%s): taking a new one", epoch, self.node,
                     exc.__class__.__name__)
            self.epoch, self._held_until = "", 0.0
            return False
        self._held(sent, revision)
        log.info("cluster: node %s goes on with its lease (epoch %s) after its agent restarted", self.node, epoch)
        return True

    def fence(self) -> None:
        """Stop believing at once (renewals must have stopped first)."""
        self._held_until = 0.0

    async def stop(self, *, release: bool) -> None:
        """Fence; with ``release`` then delete the lease (if it was held) so that the others take
        this node's homes at once instead of after the lease time."""
        held = self.holds()
        self.fence()        # fenced before the entry goes: nobody takes a home we still admit for
        if release and held and self.buckets.opened:
            with contextlib.suppress(NatsError, asyncio.TimeoutError):
                await self.buckets.nodes.delete(self.key, last=self.revision)

    # ------------------------------------------------------------------ renewal

    async def _leases_of_our_name(self) -> list[KeyValue.Entry]:
        """Leases of this node's name (any epoch) seen within half a lease: a live one is renewed
        every third of a lease, so it shows even if the watch's initial replay missed it (a renewal
        can replace the message the consumer was about to start from)."""
        watcher = await self.buckets.nodes.watch(f"node.{self.node}.*")
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
                elif entry.key != self.key:
                    found[entry.key] = entry
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return list(found.values())

    async def renew_loop(self) -> None:
        """Renew every lease/3 with a compare-and-swap on our revision; after a failure retry soon."""
        nodes = self.buckets.nodes
        period = self.lease_seconds / 3
        failures, held_before = 0, self.lease_seconds
        while True:
            sent = self._clock()
            ok = False
            try:
                revision = await nodes.update(self.key, msgspec.json.encode(self.value()), last=self.revision)
                self._held(sent, revision)
                ok = True
            except KeyWrongLastSequenceError:
                ok = await self.reconcile(sent)
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

    async def reconcile(self, sent: float) -> bool:
        """A renewal lost its compare-and-swap: re-read (a timed-out write of ours may have landed, as
        only we write this epoch's key while it lives); gone -> it aged out or was confirmed ended by
        another node: fence, take a new epoch (our old homes are stale like any dead node's) -- unless
        another process took our name meanwhile (started while we were cut off): then stay fenced."""
        nodes = self.buckets.nodes
        try:
            found = await self.buckets.read_lease(self.node, self.epoch)
            if found is not None:
                self.revision = found[1]        # our own earlier write: renew again from it at once
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
            revision = await nodes.create(self.key, msgspec.json.encode(self.value()))
            self._held(sent, revision)
            if self.metrics is not None:
                self.metrics.leases_lost.inc()
            log.warning("cluster: lease of %s had ended (epoch %s); new epoch %s", self.node, old, self.epoch)
            self._on_new_epoch()
            return True
        except (TimeoutError, KeyWrongLastSequenceError, NatsError):
            return False
