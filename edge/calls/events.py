"""Operator actions for calls, as a :class:`~edge.calls.controller.CallListener`.

The control API cannot end a call itself: the call lives in the process whose SIP sessions
carry it, and the API may run in another one (SPEC §2.2, issue 10). The API writes a
:class:`~edge.control.models.HangupRequest` into LMDB (``edge/control/operator.py``); this
listener, in the process that owns calls, looks for requests every ``poll`` seconds (one
read transaction, ~µs, when there are none) and ends the ones of its calls with
``hangup(call, EndReason.OPERATOR, reason_header=...)``: BYE to both legs with a
``Reason``, settled by billing as any other end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge.control import operator
from edge.control.errors import StoreError
from edge.control.models import Profile
from edge.control.store import Store
from edge.sip.transaction import Clock

from .billing import Hangup
from .model import Call, Direction, EndReason, Reject

log = logging.getLogger("sipedge.calls")

POLL_SECONDS = 0.2


def operator_reason(cause: int) -> str:
    return f'SIP;cause={cause};text="Ended by the operator"'


class OperatorActions:
    """:param calls: the owner's live calls by id (the controller's ``calls``).
    :param hangup: ends a call from the edge (the controller's ``hangup``).
    """

    def __init__(self, store: Store, clock: Clock, *, calls: Callable[[str], Call | None], hangup: Hangup,
                 poll: float = POLL_SECONDS) -> None:
        self.store = store
        self.clock = clock
        self.calls = calls
        self.hangup = hangup
        self.poll = poll
        self.clock.call_later(self.poll, self._tick)

    def _tick(self) -> None:
        try:
            if operator.has_pending(self.store):
                self._serve()
        except StoreError as exc:
            log.warning("operator actions: the store failed (%s); retrying", exc)
        except Exception:   # a bug must not stop the poller
            log.exception("operator actions failed")
        self.clock.call_later(self.poll, self._tick)

    def _serve(self) -> None:
        for req in operator.pending(self.store):
            call = self.calls(req.call_id)
            if call is None:
                continue    # another process's call (or ended: see below)
            log.info("call ended by the operator", extra={"event": "operator_hangup", "call_id": call.id,
                                                          "request": req.id, "key_id": req.key_id})
            self.hangup(call, EndReason.OPERATOR, status=480, reason_header=operator_reason(req.cause))
            operator.finish(self.store, req.id, "done")
        # requests of calls that are no longer live anywhere are closed as "gone"
        from edge.control import channels

        for req in operator.pending(self.store):
            if channels.find_call(self.store, req.call_id) is None:
                operator.finish(self.store, req.id, "gone")

    # ------------------------------------------------------------ listener

    def call_answered(self, call: Call) -> None:
        pass

    def call_ended(self, call: Call, status: int, reason: EndReason, media: dict[str, int]) -> None:
        pass

    def call_refused(self, call_id: str, direction: Direction, profile: Profile, caller: str, callee: str,
                     refusal: Reject) -> None:
        pass
