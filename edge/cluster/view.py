"""The local view of the cluster's members and homes, kept by a watch of both buckets (docs/cluster.md).

It answers the call path with no round trip (:meth:`View.home_of`, :meth:`View.members`). It is a
hint, never the ground of a handover: a lease's end is decided through the engine
(edge/cluster/liveness.py), and the view only learns of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from nats.errors import Error as NatsError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from .buckets import Buckets, Holder, Home, NodeLease, decoded
from .lease import OwnLease

log = logging.getLogger("sipedge.cluster")


class _Member:
    __slots__ = ("lease", "revision", "seen")

    def __init__(self, lease: NodeLease, revision: int, seen: float) -> None:
        self.lease = lease          # the last value read or watched
        self.revision = revision    # its stream sequence
        self.seen = seen            # monotonic instant a NEW revision was last seen (renewals advance it)


class View:
    """Other nodes' live leases and every profile's newest home, as this node has seen them.

    :param buckets: the membership's buckets (opened before :meth:`start`).
    :param lease: this node's own lease (itself is never a member of the view: its belief is).
    :param clock: the monotonic clock of ``lease``.
    :param on_stale_homes: called when a lease ended or a node came back with a new epoch: homes
        may have to move.
    """

    def __init__(self, buckets: Buckets, lease: OwnLease, *, clock: Callable[[], float],
                 on_stale_homes: Callable[[], None]) -> None:
        self.buckets = buckets
        self.lease = lease
        self._clock = clock
        self._on_stale_homes = on_stale_homes
        self._members: dict[str, _Member] = {}
        self._homes: dict[str, Home] = {}
        self._home_gen: dict[str, int] = {}     # profile -> generation of the home in _homes
        self._by_holder: dict[Holder, set[str]] = {}
        self._gone: dict[str, int] = {}     # node -> last revision of a lease seen ending (no resurrection)
        self.ended: set[Holder] = set()     # leases confirmed ended through the log: ended for good
        self._own_seen = 0.0                # monotonic: our own renewal last came back through the watch
        self.watch_task: asyncio.Task[None] | None = None
        self.watchers: list[Any] = []       # of the current watch (KeyWatcher objects)
        self._seen_reconnects = 0
        self.synced = asyncio.Event()       # the first watch replayed both buckets

    # ------------------------------------------------------------------ answers (no round trip)

    def is_live(self, node: str, epoch: str) -> bool:
        """Whether another node's lease (node, epoch) lives as far as the view knows."""
        member = self._members.get(node)
        return member is not None and member.lease.epoch == epoch

    def home_of(self, profile_id: str) -> Home | None:
        """The profile's valid home as this node sees it, or None (never homed, or its holder's lease
        ended: the next acquire decides)."""
        home = self._homes.get(profile_id)
        if home is None:
            return None
        if home.holder == (self.lease.node, self.lease.epoch):
            return home if self.lease.holds() else None
        return home if self.is_live(home.node, home.epoch) else None

    def members(self) -> dict[str, NodeLease]:
        """Nodes whose lease lives as this node sees them (itself only while it holds its lease)."""
        out = {name: m.lease for name, m in self._members.items() if name != self.lease.node}
        if self.lease.holds():
            out[self.lease.node] = self.lease.value()
        return out

    def homes(self) -> dict[str, Home]:
        return dict(self._homes)

    def home(self, profile_id: str) -> Home | None:
        """The newest home of the profile seen, valid or not."""
        return self._homes.get(profile_id)

    def generation(self, profile_id: str) -> int:
        """The generation of :meth:`home` (0: none seen)."""
        return self._home_gen.get(profile_id, 0)

    def profiles_of(self, holder: Holder) -> Iterable[str]:
        return self._by_holder.get(holder, ())

    def by_holder(self) -> list[tuple[Holder, set[str]]]:
        return list(self._by_holder.items())

    # ------------------------------------------------------------------ updates

    def apply_member(self, lease: NodeLease, revision: int) -> None:
        if lease.node == self.lease.node:
            if lease.epoch == self.lease.epoch:
                self._own_seen = self._clock()
            return          # ourselves: holds_lease() is the truth, not what the bucket echoes
        if (lease.node, lease.epoch) in self.ended or revision <= self._gone.get(lease.node, 0):
            return          # an epoch already seen ending, or older than one (a late watch delivery)
        member = self._members.get(lease.node)
        if member is None or revision > member.revision:
            old_epoch = member.lease.epoch if member is not None else None
            self._members[lease.node] = _Member(lease, revision, self._clock())
            if old_epoch is not None and old_epoch != lease.epoch:
                self._on_stale_homes()      # the node restarted: its old epoch's homes are stale

    def forget_member(self, node: str, epoch: str) -> None:
        member = self._members.get(node)
        if member is not None and member.lease.epoch == epoch:
            del self._members[node]
            self._gone[node] = max(self._gone.get(node, 0), member.revision)
            log.info("cluster: the lease of node %s (epoch %s) ended", node, member.lease.epoch)
            self._on_stale_homes()

    def mark_ended(self, node: str, epoch: str) -> None:
        """The engine's log proved the lease of (node, epoch) ended: for good."""
        self.ended.add((node, epoch))
        self.forget_member(node, epoch)

    def apply_home(self, profile_id: str, home: Home, gen: int) -> None:
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
            self.forget_member(parts[1], parts[2])  # released (its node fenced first) or confirmed ended
            return
        lease = decoded(entry, NodeLease, "lease")
        if lease is not None:
            self.apply_member(lease, entry.revision or 0)

    def _on_home_entry(self, entry: KeyValue.Entry) -> None:
        parts = entry.key.split(".")
        if entry.operation in (KV_DEL, KV_PURGE) or len(parts) != 3 or parts[0] != "home" or not parts[2].isdigit():
            return
        home = decoded(entry, Home, "home")
        if home is not None:
            self.apply_home(parts[1], home, int(parts[2]))

    # ------------------------------------------------------------------ the watch

    def note_reconnects(self) -> None:
        """Take the client's reconnect count as the one the current watch follows."""
        self._seen_reconnects = self._reconnects()

    async def start(self) -> None:
        """Start the watch; wait up to a lease for its first pass over both buckets."""
        self._own_seen = self._clock()
        self._start_watch()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.synced.wait(), timeout=self.lease.lease_seconds)

    def _start_watch(self) -> None:
        """(Re)start the watch of both buckets. A restart cancels the old one rather than asking its
        watchers to stop: a subscription that died silently may not even stop."""
        if self.watch_task is not None:
            self.watch_task.cancel()
        self.watch_task = asyncio.create_task(self._watch_loop(), name=f"cluster-watch-{self.lease.node}")

    async def _watch_loop(self) -> None:
        """Both buckets' changes into the local view (the first pass replays every key's last value)."""
        nodes, homes = self.buckets.nodes, self.buckets.homes
        while True:
            watchers: list[Any] = []
            self.watchers = watchers
            try:
                watchers.append(await nodes.watchall())
                watchers.append(await homes.watchall())
                async with asyncio.TaskGroup() as group:
                    done = [asyncio.Event(), asyncio.Event()]
                    group.create_task(self._drain(watchers[0], self._on_node_entry, done[0]))
                    group.create_task(self._drain(watchers[1], self._on_home_entry, done[1]))
                    await done[0].wait()
                    await done[1].wait()
                    self.synced.set()
            except* Exception:      # a broken watcher or engine: start both again from the engine's state
                log.warning("cluster: watch of %s broke; starting it again", self.lease.node)
            finally:
                for watcher in watchers:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            await asyncio.sleep(min(1.0, self.lease.lease_seconds / 3))

    @staticmethod
    async def _drain(watcher: Any, apply: Callable[[KeyValue.Entry], None], synced: asyncio.Event) -> None:
        async for entry in watcher:
            if entry is None:   # the end of the initial state
                synced.set()
                continue
            apply(entry)
        synced.set()

    def _reconnects(self) -> int:
        stats = getattr(self.buckets.engine.nc, "stats", None)
        return int(stats.get("reconnects", 0)) if isinstance(stats, dict) else 0

    async def check(self) -> None:
        """Members not seen renewing for half a lease are read from the engine (a watcher does not
        see an entry age out on nats-server 2.9); a watch that stopped delivering our own renewals,
        or that a reconnect may have left behind, is started again."""
        lease_seconds = self.lease.lease_seconds
        now = self._clock()
        for name, member in list(self._members.items()):
            if now - member.seen > lease_seconds / 2:
                try:
                    found = await self.buckets.read_lease(name, member.lease.epoch)
                except (TimeoutError, NatsError):
                    continue
                if found is None:   # a hint for the view; a handover confirms it (edge/cluster/liveness.py)
                    self.forget_member(name, member.lease.epoch)
                else:
                    self.apply_member(*found)
        reconnects = self._reconnects()
        if reconnects != self._seen_reconnects:
            # the client moved to another member: a push consumer may follow late or not at all
            # (nats-py resets an ordered one after two missed heartbeats, 10 s), so start afresh
            self._seen_reconnects = reconnects
            self._own_seen = now
            self._start_watch()
        elif self.lease.holds() and self.synced.is_set() and now - self._own_seen > lease_seconds:
            log.warning("cluster: the watch of %s stopped delivering; starting it again", self.lease.node)
            self._own_seen = now
            self._start_watch()     # it replays both buckets' state
