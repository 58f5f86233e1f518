"""The live calls of the other cluster nodes, as this node's API answers them.

docs/cluster.md "Live calls on every node".

Each node carries its own calls (its LMDB ``calls`` table). What the others carry, every node
knows from two things it already follows: the journal, whose open reservations are every node's
calls of every profile (ringing or answered, with their holder, direction, parties, start and the
money reserved), and the ``<namespace>_calls`` bucket, where each node publishes its answered calls
for a survivor's recovery (edge/cluster/channels.py ``publish_answered``). The agent follows that
bucket (one ordered consumer, the last record of each key) and, with each write of the journal's
movements into the ledger (edge/cluster/money.py), rewrites the moved profiles' rows of the LMDB
table ``cluster_calls``: one :class:`RemoteCall` per call another node holds open in the journal,
from its published record once it is answered. The API reads that table beside ``calls``; no read
asks the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from edge.control.channels import REMOTE as TABLE
from edge.control.models import LiveCall, RemoteCall
from edge.control.store import SEP, Txn, key

from .engine import Engine
from .journal import ProfileJournal

log = logging.getLogger("sipedge.cluster")

DELETED = ("DEL", "PURGE")      # KV-Operation header of a key's delete marker


class RemoteCalls:
    """The other nodes' published call records, followed from the engine, and the rows made of them.

    :param node: this node's name (its own calls are its ``calls`` table's, not here).
    :param on_change: a profile whose rows are due again (a record came or went).
    """

    def __init__(self, engine: Engine, bucket: str, node: str, on_change: Callable[[str], object]) -> None:
        self.engine = engine
        self.bucket = bucket
        self.node = node
        self.on_change = on_change
        self.records: dict[str, LiveCall] = {}     # "<node>.<epoch>.<call id>" -> its published record
        self._prefix = f"$KV.{bucket}."
        self._decode = msgspec.msgpack.Decoder(LiveCall).decode

    def folded(self, subject: str, data: bytes, operation: str | None) -> None:
        """One message of the calls bucket: a record put, or its delete marker."""
        name = subject[len(self._prefix):]
        if operation in DELETED:
            gone = self.records.pop(name, None)
            if gone is not None:
                self.on_change(gone.profile_id)
            return
        if name.partition(".")[0] == self.node:
            return                              # this node's own: its calls table has them
        try:
            record = self._decode(data)
        except msgspec.DecodeError:
            log.warning("cluster: an unreadable call record %s in the engine: ignored", name)
            return
        self.records[name] = record
        self.on_change(record.profile_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the bucket until ``stop``: the last record of every key first, then each change
        (from scratch again after a reconnection: records deleted meanwhile must not linger)."""
        async def start() -> ConsumerConfig:
            for name in list(self.records):
                self.on_change(self.records.pop(name).profile_id)
            return ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)

        async def handle(msg: Msg) -> None:
            self.folded(msg.subject, msg.data, (msg.headers or {}).get("KV-Operation"))

        await self.engine.follow(f"KV_{self.bucket}", f"{self._prefix}>", handle, stop, start=start,
                                 what="the cluster's calls")

    def write(self, txn: Txn, journal: ProfileJournal) -> None:
        """The rows of ``journal``'s profile: every call the journal holds open for another node."""
        profile_id = journal.state.profile_id
        txn.delete_where(TABLE, profile_id.encode() + SEP)
        if txn.get_raw("profiles", profile_id.encode()) is None:
            return                  # deleted here
        for call in journal.state.calls.values():
            node = call.node.partition(".")[0]
            if node == self.node:
                continue
            # ringing, or answered and not published yet: what its reservation says
            record = self.records.get(f"{call.node}.{call.call_id}") or call.live_call(profile_id)
            record.reserved = call.reserved         # the money is the journal's
            txn.put(TABLE, key(profile_id, call.call_id), RemoteCall(node=node, call=record))

