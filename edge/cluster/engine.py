"""The node's connection to the NATS JetStream engine.

One :class:`Engine` per process. It owns the client connection (reconnecting on its own to
any member named in ``[cluster] engine``) and hands out the key-value buckets and streams
the cluster keeps its state in, created on first use with one replica per member (up to 3,
as JetStream's RAFT groups want an odd count): a bucket or stream survives the loss of a
minority of members.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from ..config import ClusterConfig

log = logging.getLogger("sipedge.cluster")


class EngineUnavailable(Exception):
    """No member of the engine answered (at start, or for longer than a request's timeout)."""


def replicas_for(members: int) -> int:
    return 3 if members >= 3 else 1


class Engine:
    """A connected client plus the JetStream context; see the module docstring."""

    def __init__(self, nc: Client, js: JetStreamContext, cfg: ClusterConfig) -> None:
        self.nc = nc
        self.js = js
        self.cfg = cfg
        self.replicas = replicas_for(len(cfg.engine))
        self._buckets: dict[str, KeyValue] = {}

    @classmethod
    async def connect(cls, cfg: ClusterConfig, *, name: str = "", connect_timeout: int = 2,
                      wait: float = 30.0) -> Engine:
        """Connect to any member within ``wait`` seconds; afterwards the client reconnects by
        itself, forever (a node keeps serving what it may while the engine is away)."""
        nc = Client()

        async def on_disconnect() -> None:
            log.warning("cluster engine: disconnected (node %s)", cfg.node)

        async def on_reconnect() -> None:
            log.info("cluster engine: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")

        async def on_error(exc: Exception) -> None:
            log.debug("cluster engine: %s", exc)

        try:
            await asyncio.wait_for(nc.connect(
                servers=list(cfg.engine), name=name or f"sipedge-{cfg.node}",
                connect_timeout=connect_timeout, reconnect_time_wait=1, max_reconnect_attempts=-1,
                ping_interval=max(1, int(cfg.lease_seconds // 2)), max_outstanding_pings=2,
                disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, error_cb=on_error,
            ), timeout=wait)
        except Exception as exc:  # a timeout here; nats raises OSError or its own errors by case
            await nc.close()
            reason = f"for {wait:g} s" if isinstance(exc, TimeoutError) else f"({exc.__class__.__name__}: {exc})"
            raise EngineUnavailable(f"cluster.engine: no member answered {reason}: {', '.join(cfg.engine)}") from None
        return cls(nc, nc.jetstream(timeout=max(1.0, cfg.lease_seconds / 2)), cfg)

    async def bucket(self, name: str, *, ttl: float | None = None, history: int = 1) -> KeyValue:
        """The key-value bucket ``name``, created (replicated) if it does not exist yet.

        ``ttl`` ages out every entry that is not rewritten within it: that is how a lease ends
        when its holder stops renewing (the engine's clock, not ours).
        """
        kv = self._buckets.get(name)
        if kv is not None:
            return kv
        try:
            kv = await self.js.key_value(name)
        except BucketNotFoundError:
            kv = await self.js.create_key_value(KeyValueConfig(
                bucket=name, history=history, ttl=ttl, replicas=self.replicas, storage=StorageType.FILE))
        self._buckets[name] = kv
        return kv

    async def stream(self, name: str, subjects: list[str], **config: Any) -> None:
        """Make sure stream ``name`` exists (replicated, on disk) with ``subjects``."""
        try:
            await self.js.stream_info(name)
        except NotFoundError:
            await self.js.add_stream(StreamConfig(
                name=name, subjects=subjects, num_replicas=self.replicas, storage=StorageType.FILE, **config))

    async def follow(self, stream: str, subject: str, handle: Callable[[Msg], Awaitable[None]], stop: asyncio.Event,
                     *, start: Callable[[], Awaitable[ConsumerConfig]], what: str,
                     subscribed: asyncio.Event | None = None) -> None:
        """Hand every message of ``subject`` to ``handle``, in stream order, until ``stop``: an ordered
        consumer from where ``start`` says (asked again each time the consumer is made anew, after
        the engine was unreachable or ``handle`` raised); ``subscribed`` is set once it is in place."""
        while not stop.is_set():
            try:
                sub = await self.js.subscribe(subject, stream=stream, ordered_consumer=True, config=await start())
            except Exception as exc:     # no engine yet: the agent's other tasks say so too
                log.info("cluster: following %s postponed (%s)", what, exc.__class__.__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                continue
            if subscribed is not None:
                subscribed.set()
            try:
                while not stop.is_set():
                    try:
                        msg = await sub.next_msg(timeout=1.0)
                    except (NatsTimeoutError, TimeoutError):
                        continue
                    await handle(msg)
            except Exception as exc:
                log.warning("cluster: following %s again (%s)", what, exc.__class__.__name__)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def round_trip(self) -> float:
        """Seconds one PING/PONG with the connected member takes."""
        started = time.monotonic()
        await self.nc.flush(timeout=max(1, int(self.cfg.lease_seconds)))
        return time.monotonic() - started

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()
