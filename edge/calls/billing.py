"""Billing: the credit of running calls (SPEC §4.4), driven by call events.

Shaped like Kamailio's cnxcc over the dialog module's callbacks: billing does not
run calls, it listens. :meth:`Billing.call_answered` funds the first slice before
the caller hears the answer and arms one timer per call (the next slice, the cut-off
at the end of the funded time, or the longest call); :meth:`Billing.call_ended`
settles. When billing must end a call (credit exhausted, longest call, the store
cannot record it) it calls the ``hangup`` it was given: a call never runs unfunded.

Settlement commits at once without waiting for the disk (a process crash loses
nothing); ``flush_soon`` asks the node's flusher for the fsync, so calls ending
together share one (group commit). A settlement the store refuses (I/O error) keeps
the call's channel and is retried every second, and by recovery at the next start.

On a cluster node (``journal``) the money is the cluster journal's: the first slice was
reserved there with the channel (admission.py), each later one is asked of the agent
before the funded time runs out, and settlement leaves the cost in the outbox.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Protocol

from edge.cluster import link
from edge.control import cdrs, channels, ledger, profiles
from edge.control.credit import CreditEngine, funded_seconds
from edge.control.errors import StoreError
from edge.control.models import Cdr, LiveCall, Profile, Rate
from edge.control.store import Store, Txn
from edge.sip.transaction import Clock, TimerHandle

from .model import Call, Direction, EndReason, Funding, Reject

log = logging.getLogger("sipedge.calls")

STORE_ERRORS = (StoreError,)
RETRY_SETTLE_SECONDS = 1.0
FUND_ATTEMPTS = 4           # a cluster slice: asked again for what the balance covers, or after an engine blip
FUND_RETRY_SECONDS = 1.0    # ... the pause after no answer, while the funded time lasts
CUT_OFF_REASON = 'SIP;cause=402;text="Credit exhausted"'
STORE_REASON = 'SIP;cause=503;text="Call cannot be recorded"'


class Hangup(Protocol):
    def __call__(self, call: Call, reason: EndReason, *, status: int = ..., reason_header: str | None = ...) -> None:
        ...


def _name_carrier(call: Call, live: LiveCall) -> None:
    """The CDR's carrier: the one that answered an outgoing call, or the last one tried;
    and the transport of each leg, by side."""
    if call.direction is Direction.OUTGOING and call.attempt:
        live.carrier = call.attempt
    for session in (call.inbound, call.outbound):
        if session is not None:
            live.transport[call.side_of(session).value] = session.peer.proto


class Billing:
    """:param hangup: ends a call from the edge (the controller's ``hangup``).
    :param wall: Unix time (LMDB records use it); ``clock`` times the timers.
    """

    def __init__(self, store: Store, credit: CreditEngine, clock: Clock, *, hangup: Hangup,
                 flush_soon: Callable[[], None], max_call_seconds: float,
                 wall: Callable[[], float] = time.time, journal: link.JournalClient | None = None) -> None:
        """:param journal: a cluster node's link to its agent: slices are reserved in the journal."""
        self.store = store
        self.credit = credit
        self.clock = clock
        self.hangup = hangup
        self.flush_soon = flush_soon
        self.max_call_seconds = max_call_seconds
        self.wall = wall
        self.lead = min(5.0, credit.slice_seconds / 4)   # fund the next slice this early
        self._timers: dict[str, TimerHandle] = {}
        self._exhausted: set[str] = set()                 # calls that cannot be funded further
        self._unsettled: list[tuple[LiveCall, Call, float, int, EndReason, dict[str, int]]] = []
        self.journal = journal
        self._funding: dict[str, asyncio.Task[None]] = {}  # cluster: slices being asked of the journal

    @staticmethod
    def paid(call: Call) -> bool:
        return call.funding in (Funding.CREDIT, Funding.BUNDLE) and call.rate is not None

    # ------------------------------------------------------------ answered

    def call_answered(self, call: Call) -> None:
        """Fund the first slice (before the caller gets the 200) and arm the call's timer."""
        live = call.live
        assert live is not None
        now = self.wall()
        live.answered_at = now
        _name_carrier(call, live)   # stored with the answer: a recovered call's CDR names it too
        live.legs = [s.dialog.as_record() for s in (call.inbound, call.outbound) if s is not None]
        live.srtp = call.srtp       # what GET .../calls shows per leg (never a key)
        rate = call.rate
        try:
            if self.paid(call):
                assert rate is not None
                funded = self.store.write(lambda txn: self.credit.extend(txn, live, rate, now), sync=False,
                                          grows=False)
            else:
                channels.update(self.store, live)
                funded = None
        except STORE_ERRORS as exc:
            log.error("call %s: the store cannot record its answer (%s): ending it", call.id, exc)
            self.hangup(call, EndReason.STORE_ERROR, status=503, reason_header=STORE_REASON)
            return
        if funded is not None and funded <= now:
            # the balance no longer covers one increment (it was spent since admission)
            self.hangup(call, EndReason.CREDIT, status=402, reason_header=CUT_OFF_REASON)
            return
        self._arm(call)

    def _arm(self, call: Call) -> None:
        """One timer per call: the next slice, the cut-off, or the longest call, whichever is first."""
        live = call.live
        assert live is not None and live.answered_at is not None
        now = self.wall()
        at, action = live.answered_at + self.max_call_seconds, self._longest
        if self.paid(call) and live.funded_until is not None:
            if call.id in self._exhausted:
                if live.funded_until < at:
                    at, action = live.funded_until, self._cut_off
            elif live.funded_until - self.lead < at:
                at, action = live.funded_until - self.lead, self._extend
        self._timers[call.id] = self.clock.call_later(max(0.0, at - now), action, call)

    def _extend(self, call: Call) -> None:
        live = call.live
        rate = call.rate
        assert live is not None and rate is not None
        if self.journal is not None:
            self._funding[call.id] = asyncio.ensure_future(self._extend_in_journal(call, live, rate, self.journal))
            return
        before = live.funded_until
        try:
            after = self.store.write(lambda txn: self.credit.extend(txn, live, rate, self.wall()), sync=False,
                                     grows=False)
        except STORE_ERRORS as exc:
            log.error("call %s: the store cannot fund its next slice (%s): ending it", call.id, exc)
            self.hangup(call, EndReason.STORE_ERROR, reason_header=STORE_REASON)
            return
        if before is None or after <= before:
            self._exhausted.add(call.id)       # nothing more: cut at the end of the funded time
        self._arm(call)

    async def _extend_in_journal(self, call: Call, live: LiveCall, rate: Rate, journal: link.JournalClient) -> None:
        """The next slice of a cluster node's call, reserved in the journal by the agent: as much of it
        as the balance covers there; none (or no answer before the funded time ends) cuts the call."""
        try:
            have = funded_seconds(live)
            seconds, amount = self.credit.next_slice(live, rate)
            for _ in range(FUND_ATTEMPTS):
                if seconds <= have:
                    break
                reply = await journal.fund(live.profile_id, live.call_id, amount) if amount > 0 else None
                if reply is None or reply.result == link.OK:     # (a slice that costs nothing is not asked for)
                    self.store.write(functools.partial(self.credit.funded, call=live, seconds=seconds,
                                                       amount=amount), sync=False, grows=False)
                    return
                if reply.result == link.BROKE:
                    seconds, amount = self.credit.next_slice(live, rate, reply.balance)
                    continue
                if live.funded_until is None or live.funded_until - self.wall() < 2 * FUND_RETRY_SECONDS:
                    break
                await asyncio.sleep(FUND_RETRY_SECONDS)
            self._exhausted.add(call.id)       # nothing more: cut at the end of the funded time
        except STORE_ERRORS as exc:
            log.error("call %s: the store cannot record its next slice (%s): ending it", call.id, exc)
            self._funding.pop(call.id, None)
            self.hangup(call, EndReason.STORE_ERROR, reason_header=STORE_REASON)
            return
        finally:
            if self._funding.get(call.id) is asyncio.current_task():
                del self._funding[call.id]
                self._arm(call)

    def _cut_off(self, call: Call) -> None:
        self.hangup(call, EndReason.CREDIT_EXHAUSTED, reason_header=CUT_OFF_REASON)

    def _longest(self, call: Call) -> None:
        self.hangup(call, EndReason.MAX_DURATION)

    # --------------------------------------------------------------- ended

    def call_ended(self, call: Call, status: int, reason: EndReason, media: dict[str, int]) -> None:
        """Settle: bill the talk time, return the rest of the reservation, free the channel, one CDR."""
        timer = self._timers.pop(call.id, None)
        if timer is not None:
            timer.cancel()
        funding = self._funding.pop(call.id, None)
        if funding is not None:     # a slice the agent may still land: the journal's settle returns it
            funding.cancel()
        self._exhausted.discard(call.id)
        live = call.live
        if live is None:
            return
        _name_carrier(call, live)
        live.srtp = call.srtp
        self._settle(live, call, self.wall(), status, reason, media)

    def _settle(self, live: LiveCall, call: Call, ended: float, status: int, reason: EndReason,
                media: dict[str, int]) -> None:
        rate = call.rate if self.paid(call) else None
        try:
            self.store.write(lambda txn: self.credit.settle(txn, live, rate, ended, status=status,
                                                            end_reason=reason.value, media=media),
                             sync=False, grows=False)  # finishing admitted work: may use the store's reserve
        except STORE_ERRORS as exc:
            if not self._unsettled:
                self.clock.call_later(RETRY_SETTLE_SECONDS, self._retry)
            log.error("call %s: settlement failed (%s); its channel stays taken until it is settled",
                      call.id, exc)
            self._unsettled.append((live, call, ended, status, reason, media))
            return
        self.flush_soon()

    def _retry(self) -> None:
        pending, self._unsettled = self._unsettled, []
        for args in pending:
            self._settle(*args)

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    def call_refused(self, call_id: str, direction: Direction, profile: Profile, caller: str, callee: str,
                     refusal: Reject) -> None:
        """A CDR for an attempt refused for money (SPEC §4.2 rule 5): the PBX sees it in its CDRs."""
        now = self.wall()
        cdr = Cdr(seq=0, call_id=call_id, profile_id=profile.id, direction=direction.value, caller=caller,
                  callee=callee, started_at=now, answered_at=None, ended_at=now, duration=0,
                  status=refusal.status, end_reason=refusal.rule, account_id=profile.account_id)

        hold = self.credit.hold_cdr

        def op(txn: Txn) -> None:
            if hold is not None:             # a cluster node: the CDR goes through the journal
                hold(txn, cdr, refused=True)
            else:
                cdrs.add(txn, cdr)
            if not self.credit.journaled:    # a cluster node's agent recharges (edge/cluster/money.py)
                ledger.auto_recharge(txn, profiles.get(txn, profile.id))

        try:
            self.store.write(op, sync=False)
        except STORE_ERRORS as exc:
            log.warning("refused call of profile %s not recorded: %s", profile.id, exc)

    def recover(self, owned: Callable[[LiveCall], bool] | None = None) -> list[LiveCall]:
        """Settle the calls a previous run left behind (CDR ``recovery``); the caller BYEs their legs.

        :param owned: the live calls that are this process's (a SIP worker's own); None: all.
        """
        return self.credit.recover(owned=owned)
