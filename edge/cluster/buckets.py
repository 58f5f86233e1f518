"""The membership's two buckets: their keys, their records, and the handles to them (docs/cluster.md).

- ``<namespace>_nodes`` (ttl = ``lease_seconds``): ``node.<name>.<epoch>`` -> :class:`NodeLease`.
- ``<namespace>_homes`` (no ttl): ``home.<profile_id>.<generation>`` -> :class:`Home`.

Every key is written once, by a create (see edge/cluster/membership.py for why).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from .engine import Engine, EngineUnavailable

T = TypeVar("T")

log = logging.getLogger("sipedge.cluster")

NAMESPACE = "sipedge"                     # buckets <namespace>_nodes and <namespace>_homes
KEY = re.compile(r"^[-_=a-zA-Z0-9]+$")    # one token of a NATS subject (no dots: one key, one profile)

Holder = tuple[str, str]                  # (node, epoch)


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


def lease_key(node: str, epoch: str) -> str:
    """One key per (node, epoch): a lease that ended never comes back, so "ended" is a stable fact."""
    return f"node.{node}.{epoch}"


def home_key(profile_id: str, generation: int) -> str:
    """One key per generation of a profile's home; the highest one is the current home."""
    return f"home.{profile_id}.{generation}"


async def last_entries(kv: KeyValue, pattern: str = ">", *, timeout: float = 5.0) -> list[KeyValue.Entry]:
    """The last entry of every key matching ``pattern`` that is not deleted (one ordered consumer).

    nats-py's watch may signal the end of the initial values (None) before it has handed over the
    first of them (it reads the consumer's pending count while the messages are still on their way:
    seen under load, `sipedge cluster status` listing no homes), so with ``pattern`` ">" a None before
    any entry ends the read only once the bucket is seen empty."""
    watcher = await kv.watch(pattern)
    out = []
    seen = 0
    try:
        while True:
            entry = await watcher.updates(timeout=timeout)
            if entry is None:
                if seen or pattern != ">" or (await kv.status()).values == 0:
                    break
                continue
            seen += 1
            if entry.operation not in (KV_DEL, KV_PURGE):
                out.append(entry)
            if entry.delta == 0:
                break
    finally:
        await watcher.stop()
    return out


def decoded(entry: KeyValue.Entry, kind: type[T], what: str) -> T | None:
    """A watched entry's value, or None (logged) if it is not one: a stray key fails nothing."""
    try:
        return msgspec.json.decode(entry.value or b"", type=kind)
    except msgspec.DecodeError:
        log.warning("cluster: unreadable %s entry %s", what, entry.key)
        return None


class Buckets:
    """The two buckets of one namespace on the engine, usable once :meth:`open` returned.

    :param engine: the node's connected :class:`~edge.cluster.engine.Engine`.
    :param namespace: the buckets' prefix (one engine can hold several clusters; tests use one each).
    :param lease_seconds: the lease bucket's ttl when this node creates it.
    """

    def __init__(self, engine: Engine, namespace: str, lease_seconds: float) -> None:
        self.engine = engine
        self.nodes_bucket, self.homes_bucket = f"{namespace}_nodes", f"{namespace}_homes"
        self.lease_seconds = lease_seconds
        self._nodes: KeyValue | None = None
        self._homes: KeyValue | None = None

    @property
    def opened(self) -> bool:
        return self._nodes is not None

    @property
    def nodes(self) -> KeyValue:
        assert self._nodes is not None
        return self._nodes

    @property
    def homes(self) -> KeyValue:
        assert self._homes is not None
        return self._homes

    async def open(self, wait: float, deadline: float, clock: Callable[[], float]) -> float:
        """Create or look up both buckets, retrying until ``deadline`` (on ``clock``): a bucket's
        creation (3 replicas placed) can outlast one request's timeout. :returns: the lease
        bucket's ttl, which may be another node's choice.

        :raises EngineUnavailable: not ready by ``deadline`` (``wait`` seconds, for the message).
        """
        while True:
            try:
                self._nodes = await self.engine.bucket(self.nodes_bucket, ttl=self.lease_seconds)
                self._homes = await self.engine.bucket(self.homes_bucket)
                return (await self._nodes.status()).ttl or 0.0
            except (TimeoutError, NatsError) as exc:
                if clock() > deadline:
                    raise EngineUnavailable(f"cluster: the membership buckets not ready in {wait:g} s "
                                            f"({exc!r})") from None
                await asyncio.sleep(0.5)

    async def read_lease(self, node: str, epoch: str) -> tuple[NodeLease, int] | None:
        """The lease of (node, epoch) and its revision as a read of the bucket finds it, or None."""
        try:
            entry = await self.nodes.get(lease_key(node, epoch))
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"", type=NodeLease), entry.revision or 0
