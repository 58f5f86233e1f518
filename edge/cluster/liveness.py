"""Whether a node's lease lives, decided by the engine, never by the local view (docs/cluster.md).

A handover rests on it. A delete marker on the lease's key proves its end: only a node that fenced
(releasing) or a confirmed end (below) writes one, and nobody renews a key after it. An absent key
does not prove it: reads are not linearizable (a deposed leader may still answer, from a state in
which a live lease had aged out). So absence is confirmed by a write only the replicated log can
accept -- a delete marker created on condition that the key has no message (expected last sequence
0, which 2.9 enforces under concurrency); if it is refused, something was written meanwhile and a
second read says which.
"""

from __future__ import annotations

import msgspec
from nats.js.api import Header
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from .buckets import Buckets, NodeLease, lease_key
from .view import View


class Liveness:
    """Leases' ends as the engine's log has them; what it learns goes into ``view``.

    :param buckets: the membership's buckets (their engine is asked).
    :param view: the local view, told of every lease found alive or ended.
    """

    def __init__(self, buckets: Buckets, view: View) -> None:
        self.buckets = buckets
        self.view = view

    async def lease_alive(self, node: str, epoch: str) -> bool:
        """Whether the lease of (node, epoch) lives (see the module docstring)."""
        if (node, epoch) in self.view.ended:
            return False
        for _ in range(2):
            state = await self._lease_state(node, epoch)
            if state is not None:
                return state
            if await self.confirm_ended(node, epoch):
                return False
        return True     # written since, twice: as good as alive; the next acquire looks again

    def _subject(self, node: str, epoch: str) -> str:
        return f"$KV.{self.buckets.nodes_bucket}.{lease_key(node, epoch)}"

    async def _lease_state(self, node: str, epoch: str) -> bool | None:
        """True: the lease's key holds a lease; False: a delete marker (ended); None: no message."""
        try:
            msg = await self.buckets.engine.js.get_msg(f"KV_{self.buckets.nodes_bucket}",
                                                       subject=self._subject(node, epoch))
        except NotFoundError:
            return None
        if msg.headers and msg.headers.get(KV_OP) in (KV_DEL, KV_PURGE):
            self.view.mark_ended(node, epoch)
            return False
        self.view.apply_member(msgspec.json.decode(msg.data or b"", type=NodeLease), msg.seq or 0)
        return True

    async def confirm_ended(self, node: str, epoch: str) -> bool:
        """Create a delete marker on (node, epoch)'s lease key if the key has no message. True: the
        lease had ended (for good). False: the key got a message meanwhile (a lease or a marker)."""
        try:
            await self.buckets.engine.js.publish(self._subject(node, epoch), b"", headers={
                KV_OP: KV_DEL, Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"})
        except APIError as exc:
            if exc.err_code in (10071, 10164):      # wrong last sequence
                return False
            raise
        self.view.mark_ended(node, epoch)
        return True
