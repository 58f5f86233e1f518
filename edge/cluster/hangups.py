"""Hang-ups of calls another node carries (docs/cluster.md "Live calls on every node").

Every node's API lists the calls of every node (edge/cluster/remote.py), so an operator may ask any
node to hang up any call. A call is ended by the process that carries it, on its node: the API of
another node hands the request to its own agent over the link (``link.Hangup``), and that agent
relays it to the carrying node's agent as a core NATS request on ``sipedge.hangup.<node>``
(request and reply; nothing is stored in the engine: a hang-up nobody answered is refused with
503 and asked again). The carrying agent records it in its store as its own API would
(edge/control/operator.py), its worker ends the call, and the request it recorded is the answer.
"""

from __future__ import annotations

import logging

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from edge.control import operator
from edge.control.errors import CallNotFound, StoreError
from edge.control.store import Store

from . import link
from .engine import Engine

log = logging.getLogger("sipedge.cluster")

SUBJECT = "sipedge.hangup."
RELAY_TIMEOUT = 3.0             # seconds the carrying node's agent may take to record a hang-up


class Hangups:
    """:param node: this node's name: the hang-ups of its calls arrive on ``sipedge.hangup.<node>``."""

    def __init__(self, engine: Engine, store: Store, node: str) -> None:
        self.engine = engine
        self.store = store
        self.node = node
        self._sub: Subscription | None = None
        self._decode = msgspec.msgpack.Decoder(link.Hangup).decode
        self._encode = msgspec.msgpack.Encoder().encode

    async def start(self) -> None:
        self._sub = await self.engine.nc.subscribe(SUBJECT + self.node, cb=self._record)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except NatsError:
                pass

    async def relay(self, request: link.Hangup) -> link.Reply:
        """This node's API asks for a hang-up of ``request.node``'s call."""
        try:
            msg = await self.engine.nc.request(SUBJECT + request.node, self._encode(request), timeout=RELAY_TIMEOUT)
            answer = msgspec.msgpack.decode(msg.data, type=link.Reply)
        except (NatsError, TimeoutError, msgspec.DecodeError) as exc:
            log.warning("cluster: hang-up of %s not relayed to %s (%s)", request.call_id, request.node,
                        exc.__class__.__name__)
            return link.Reply(request.id, link.UNAVAILABLE)
        return link.Reply(request.id, answer.result, body=answer.body)

    async def _record(self, msg: Msg) -> None:
        """Another node's API asks for a hang-up of one of this node's calls: recorded here."""
        try:
            request = self._decode(msg.data)
        except msgspec.DecodeError:
            log.warning("cluster: an unreadable hang-up request on %s: ignored", msg.subject)
            return
        try:
            recorded = operator.request_hangup(self.store, request.call_id, cause=request.cause,
                                               key_id=request.key_id)
            reply = link.Reply(request.id, link.OK, body=msgspec.msgpack.encode(recorded))
        except CallNotFound:
            reply = link.Reply(request.id, link.GONE)
        except StoreError as exc:
            log.error("cluster: hang-up of %s not recorded (%s)", request.call_id, exc)
            reply = link.Reply(request.id, link.UNAVAILABLE)
        try:
            await msg.respond(self._encode(reply))
        except NatsError:
            pass                # the asker gave up: it answered 503, and may ask again
