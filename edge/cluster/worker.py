"""The cluster's part of a SIP worker (docs/cluster.md "The node in a cluster").

A worker of a cluster node reads the node's lease record before it seizes a channel
(:attr:`ClusterWorker.fence`), asks the agent to reserve each channel in the journal
(:attr:`ClusterWorker.reservations`), ends its calls once the lease is gone, and -- worker 0 --
BYEs the legs of dead nodes' calls the agent recovered here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from edge.calls.model import EndReason
from edge.control.errors import StoreError
from edge.control.store import Store

from . import foreign
from .fence import Fence
from .link import RESERVE_TIMEOUT, JournalClient, journal_address

if TYPE_CHECKING:
    from edge.calls.controller import CallController

log = logging.getLogger("sipedge")

LEASE_LOST_REASON = 'SIP;cause=503;text="Cluster lease lost"'
NODE_LOST_REASON = 'SIP;cause=503;text="Edge node lost"'
FENCE_CHECK_SECONDS = 0.1   # a cluster worker ends its calls this soon after its node's lease ran out


class ClusterWorker:
    """:param key: the node's name on the machine (the agent's link is named after it)."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.fence = Fence(store)
        self.reservations = JournalClient(journal_address(key), timeout=RESERVE_TIMEOUT)

    def start(self, calls: CallController, *, bye_foreign: bool) -> list[asyncio.Task[None]]:
        """The worker's cluster loops, to be cancelled when it stops; ``bye_foreign``: worker 0's."""
        tasks = [asyncio.create_task(self._end_calls_when_fenced(calls))]
        if bye_foreign:
            tasks.append(asyncio.create_task(self._bye_foreign_calls(calls)))
        return tasks

    async def _end_calls_when_fenced(self, calls: CallController) -> None:
        """A cluster node that lost its lease ends its calls before the engine ages the lease out:
        the survivors then free those calls' channels (docs/cluster.md), and no channel is used twice."""
        fence = self.fence
        admitted_under: str | None = fence.epoch if fence.admits() else None
        while True:
            await asyncio.sleep(FENCE_CHECK_SECONDS)
            held = fence.admits()
            # a new epoch means the old one ended (the lease lapsed, or a restarted agent could not go
            # on with it): the calls admitted under it are the survivors' to free, so they end too
            changed = held and admitted_under is not None and fence.epoch != admitted_under
            if calls.calls and (not held or changed):
                left = list(calls.calls.values())
                for call in left:
                    calls.hangup(call, EndReason.CLUSTER_LEASE, status=503, reason_header=LEASE_LOST_REASON)
                log.warning("cluster: the node's lease ran out: ended %d calls", len(left),
                            extra={"event": "calls_ended_lease_lost", "ended_calls": len(left)})
            admitted_under = fence.epoch if held else None   # calls seen while held are this epoch's

    async def _bye_foreign_calls(self, calls: CallController) -> None:
        """BYE the legs of the dead nodes' calls the agent recovered here (edge/cluster/foreign.py)."""
        while True:
            await asyncio.sleep(foreign.POLL_SECONDS)
            try:
                recovered = foreign.take(self.store)
            except StoreError as exc:
                log.warning("cluster: the calls of a dead node cannot be read (%s); retrying", exc)
                continue
            for live in recovered:
                calls.bye_recovered(live, NODE_LOST_REASON)
            if recovered:
                log.warning("cluster: sent BYE to the legs of %d calls of a dead node", len(recovered),
                            extra={"event": "foreign_calls_ended", "calls": len(recovered)})
