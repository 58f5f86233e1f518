"""The call controller: joins the two INVITE sessions of every call.

As sippy's ``CallController.recvEvent``: an INVITE that admission lets through
creates the outbound leg ("try"); whatever one leg reports afterwards is handed to the
other. The sessions (edge/sip/invite.py) do the SIP of each leg; admission decides,
routing picks the targets, media anchors the SDP, and listeners (billing) follow the
call events ``answered``, ``ended`` and ``refused``. Nothing here talks to the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from edge.control.models import LiveCall, Profile
from edge.sip import SipMessage
from edge.sip.dialog import Dialogs, Local, bye_from_record, peer_of
from edge.sip.invite import InviteSession, UacInvite, UasInvite
from edge.sip.request import new_tag, token_hex, warning
from edge.sip.transaction import ServerTransaction, State, TransactionLayer
from edge.sip.transport import Peer

from . import indialog
from .admission import Admission, Attempt
from .media import SDP, CallMedia, MediaRefused
from .metrics import CallMetrics
from .model import Call, CallState, Direction, EndReason, Funding, Reject
from .routing import FAILOVER_STATUSES, Routing

log = logging.getLogger("sipedge.calls")

MEDIA_TIMEOUT_REASON = 'SIP;cause=408;text="Media timeout"'
CANCEL_REASON = 'SIP;cause=487;text="Call cancelled"'


class CallListener(Protocol):
    """Call events; billing is one listener (Kamailio's dialog callbacks with cnxcc)."""

    def call_answered(self, call: Call) -> None:
        """The callee answered; the caller has not been told yet. May end the call (``hangup``)."""

    def call_ended(self, call: Call, status: int, reason: EndReason, media: dict[str, int]) -> None: ...

    def call_refused(self, call_id: str, direction: Direction, profile: Profile, caller: str, callee: str,
                     refusal: Reject) -> None:
        """An attempt refused by a rule whose refusal is recorded (``Reject.record``)."""


class CallController:
    """:param local: how the edge names itself toward a peer (Via, Contact): by its side and transport.
    :param is_trusted: is a source one of the carriers of ``[inbound] trusted``?
    :param setup_timeout: Timer C of a call: seconds its outbound leg may ring.
    :param inbound_session: / :param outbound_session: the session classes (tests pass fakes).
    """

    def __init__(self, *, tl: TransactionLayer, dialogs: Dialogs, local: Callable[[Peer], Local],
                 admission: Admission, routing: Routing, media: CallMedia, metrics: CallMetrics,
                 listeners: Sequence[CallListener], is_trusted: Callable[[str], bool],
                 setup_timeout: float, inbound_session: type[UasInvite] = UasInvite,
                 outbound_session: type[UacInvite] = UacInvite) -> None:
        self.tl = tl
        self.dialogs = dialogs
        self.local = local
        self.admission = admission
        self.routing = routing
        self.media = media
        self.metrics = metrics
        self.listeners = tuple(listeners)
        self.is_trusted = is_trusted
        self.setup_timeout = setup_timeout
        self.inbound_session = inbound_session
        self.outbound_session = outbound_session
        self.calls: dict[str, Call] = {}
        self._reserving: set[asyncio.Task[None]] = set()   # cluster: calls waiting for the journal

    @property
    def reserving(self) -> int:
        """Calls whose channel is seized here and waits for the cluster's journal."""
        return len(self._reserving)

    # ------------------------------------------------------------------- try

    def on_invite(self, tx: ServerTransaction) -> None:
        # a trusted source is a carrier only where carriers are heard: not on the customer side
        carrier = tx.peer.side != "customer" and self.is_trusted(tx.peer.host)
        direction = Direction.INCOMING if carrier else Direction.OUTGOING
        call_id = "c" + token_hex(8)
        attempt = self.admission.check(tx, direction)
        refusal = attempt.refusal
        if refusal is None:
            seized = self.admission.seize(attempt, call_id)  # last: nothing that can fail comes after it
            if isinstance(seized, Reject):
                refusal = seized
            elif self.admission.cluster is not None:
                task = asyncio.create_task(self._reserve_then_start(call_id, attempt, seized))
                self._reserving.add(task)
                task.add_done_callback(self._reserving.discard)
                return
            else:
                self._start(call_id, attempt, seized)
                return
        self._refuse(call_id, attempt, refusal)

    async def _reserve_then_start(self, call_id: str, a: Attempt, live: LiveCall) -> None:
        """A cluster node: the call starts once the journal confirms its channel (or is refused)."""
        refusal = await self.admission.reserve_in_cluster(a, live)
        if a.tx.state is not State.PROCEEDING:     # CANCELled (487) while the journal was asked
            self.admission.unseize(live, reserved=refusal is None or refusal.rule == "cluster")
            return
        if refusal is not None:
            self.admission.unseize(live, reserved=refusal.rule == "cluster")   # busy: nothing landed
            self._refuse(call_id, a, refusal)
            return
        self._start(call_id, a, live)

    def _refuse(self, call_id: str, a: Attempt, refusal: Reject) -> None:
        tx = a.tx
        m = self.metrics
        m.child(m.rejected, a.direction.value, refusal.rule, str(refusal.status)).inc()
        if refusal.rule == "auth_challenge":
            tx.respond(refusal.status, headers=refusal.headers, to_tag=new_tag())
            return
        if log.isEnabledFor(logging.INFO):  # per-call lines: no dict built when not logged
            log.info("call rejected", extra={"event": "call_rejected", "direction": a.direction.value,
                                             "rule": refusal.rule, "status": refusal.status, "source": str(tx.peer),
                                             "sip_call_id": tx.request.call_id, "detail": refusal.text})
        tx.respond(refusal.status, headers=[warning(refusal.text), *refusal.headers], to_tag=new_tag())
        if refusal.record and a.profile is not None:
            for listener in self.listeners:
                listener.call_refused(call_id, a.direction, a.profile, a.caller, a.callee, refusal)

    def _start(self, call_id: str, a: Attempt, live: LiveCall) -> None:
        assert a.profile is not None
        call = Call(call_id, a.direction, a.profile, caller=a.caller, callee=a.callee, funding=a.funding,
                    rate=a.rate)
        call.live = live
        call.inbound = self.inbound_session(self.tl, self.dialogs, a.tx, self.local(a.tx.peer), self, owner=call)
        self.calls[call.id] = call
        m = self.metrics
        m.child(m.started, call.direction.value).inc()
        m.child(m.started_by_transport, call.direction.value, a.tx.peer.proto).inc()  # udp | tcp | tls
        m.child(m.active, call.direction.value).inc()
        if log.isEnabledFor(logging.INFO):  # per-call lines: no dict built when not logged
            log.info("call started", extra={"event": "call_started", "call_id": call.id,
                                            "direction": call.direction.value, "profile": call.profile.id,
                                            "caller": call.caller, "callee": call.callee, "source": str(a.tx.peer),
                                            "inbound_call_id": a.tx.request.call_id})
        try:
            self.media.open(call)
            if call.funding is Funding.FREE:
                self._answer_echo(call)
                return
        except MediaRefused as exc:
            self._end(call, exc.status, exc.reason, text=exc.text)
            return
        call.targets = [a.target] if a.target is not None else self.routing.carrier_targets(call.callee)
        if not call.targets:
            self._end(call, 503, EndReason.NO_CARRIER, text="no carrier configured")
            return
        self._try_next(call)

    def _try_next(self, call: Call) -> None:
        assert call.inbound is not None
        target = call.targets.pop(0)
        req = call.inbound.tx.request
        try:
            body = self.media.relay_sdp(call, call.inbound_side, req.body, "offer") if req.body else b""
        except MediaRefused as exc:
            self._end(call, exc.status, exc.reason, text=exc.text)
            return
        from_uri, to_uri = self.routing.outbound_uris(call, target, req.from_.display)
        # the outbound leg faces the other side: its messages leave from, and name, that side
        peer = target.peer._replace(side=call.inbound_side.other.value)
        session = self.outbound_session(self.tl, self.dialogs, self, peer=peer,
                                        local=self.local(peer), ruri=target.ruri, from_uri=from_uri,
                                        to_uri=to_uri, owner=call)
        call.outbound = session
        call.attempt = target.label
        if log.isEnabledFor(logging.INFO):  # per-call lines: no dict built when not logged
            log.info("call attempt", extra={"event": "call_attempt", "call_id": call.id, "target": target.label,
                                            "outbound_call_id": session.call_id})
        # loop protection: the outbound INVITE carries one hop less than it came with
        hops = min(70, (req.max_forwards if req.max_forwards is not None else 70) - 1)
        ringing = self.setup_timeout - (time.monotonic() - call.started)
        session.invite([SDP] if body else [], body, setup_timeout=max(0.0, ringing), max_forwards=max(0, hops))

    def _answer_echo(self, call: Call) -> None:
        """The echo test number: answered by the edge, the caller hears itself (free)."""
        assert call.inbound is not None
        req = call.inbound.tx.request
        body = self.media.echo(call, req.body) if req.body else b""
        self._answered(call)
        if call.state is CallState.ANSWERED:
            call.inbound.answer([SDP] if body else [], body)

    def _answered(self, call: Call) -> None:
        call.state = CallState.ANSWERED
        call.answered = time.monotonic()
        m = self.metrics
        m.child(m.setup, call.direction.value, "answer").observe(call.answered - call.started)
        if log.isEnabledFor(logging.INFO):  # per-call lines: no dict built when not logged
            log.info("call answered", extra={"event": "call_answered", "call_id": call.id,
                                             "setup_ms": int((call.answered - call.started) * 1000)})
        for listener in self.listeners:  # billing funds the first slice here, or ends the call
            listener.call_answered(call)

    # ------------------------------------------------ what the sessions report

    def on_progress(self, session: UacInvite, response: SipMessage) -> None:
        call: Call = session.owner  # type: ignore[assignment]
        if session is not call.outbound or call.state not in (CallState.ROUTING, CallState.EARLY):
            return
        assert call.inbound is not None
        if call.state is CallState.ROUTING:
            m = self.metrics
            m.child(m.setup, call.direction.value, "provisional").observe(time.monotonic() - call.started)
        call.state = CallState.EARLY
        body = b""
        if response.body:
            try:  # early media (183/180 with SDP): anchored now
                body = self.media.relay_sdp(call, call.side_of(session), response.body, "answer")
            except MediaRefused:
                body = b""
        call.inbound.progress(response.status, response.reason, [SDP] if body else [], body)

    def on_answer(self, session: UacInvite, response: SipMessage) -> None:
        call: Call = session.owner  # type: ignore[assignment]
        if session is not call.outbound or call.state is CallState.ENDED:
            session.bye()  # an attempt the call gave up on answered after all
            return
        assert call.inbound is not None
        try:
            body = self.media.relay_sdp(call, call.side_of(session), response.body, "answer") if response.body else b""
        except MediaRefused as exc:
            log.warning("call %s: answer SDP cannot be anchored: %s", call.id, exc.text)
            self._end(call, exc.status, exc.reason, text=exc.text)
            return
        self._answered(call)
        if call.state is CallState.ANSWERED:
            call.inbound.answer([SDP] if body else [], body)

    def on_failure(self, session: UacInvite, status: int, response: SipMessage | None) -> None:
        call: Call = session.owner  # type: ignore[assignment]
        if session is not call.outbound or call.state is CallState.ENDED:
            return
        call.last_failure = status
        if self.routing.should_fail_over(call, status):
            m = self.metrics
            m.child(m.failovers, call.attempt).inc()  # the carrier that failed
            self._try_next(call)
            return
        if response is not None and not (call.direction is Direction.OUTGOING and status in FAILOVER_STATUSES):
            self._end(call, status, EndReason.REJECTED, sip_reason=response.reason)  # about the callee: as it is
            return
        if call.direction is Direction.INCOMING and status == 408:
            status = 480  # the PBX did not answer: temporarily unavailable, for the carrier
        self._end(call, status, EndReason.TIMEOUT if status in (408, 480) else EndReason.CARRIER_FAILURE)

    def on_cancel(self, session: UasInvite) -> None:
        self._end(session.owner, 487, EndReason.CANCEL, skip=session,  # type: ignore[arg-type]
                  reason_header=CANCEL_REASON)

    def on_bye(self, session: InviteSession) -> None:
        call: Call = session.owner  # type: ignore[assignment]
        self._end(call, 200, EndReason.CALLER_BYE if session is call.inbound else EndReason.CALLEE_BYE,
                  skip=session)

    def on_no_ack(self, session: InviteSession) -> None:
        call: Call = session.owner  # type: ignore[assignment]
        log.info("call %s: no ACK for our 2xx, ending the call", call.id)
        self._end(call, 408, EndReason.NO_ACK)

    def on_request(self, session: InviteSession, tx: ServerTransaction) -> None:
        call: Call = session.owner  # type: ignore[assignment]
        other = call.other_leg(session)
        if call.state is CallState.ENDED:
            tx.respond(481, "Call/Transaction Does Not Exist")
        elif other is None:
            indialog.answer_echo(self.media, call, session, tx)  # the edge is the other side
        elif other.ended:
            tx.respond(481, "Call/Transaction Does Not Exist")
        elif tx.request.method == "INVITE":
            indialog.relay_reinvite(self.media, call, session, other, tx)
        else:
            indialog.relay_request(self.media, call, session, other, tx)

    def on_media_event(self, relay_id: int, tag: str, kind: str) -> None:
        call = self.calls.get(tag)
        if call is not None and kind == "timeout":
            self.hangup(call, EndReason.RTP_TIMEOUT, reason_header=MEDIA_TIMEOUT_REASON)

    # ---------------------------------------------------------------- ending

    def hangup(self, call: Call, reason: EndReason, *, status: int = 480, reason_header: str | None = None) -> None:
        """End a call from the edge: BYE (with ``reason_header``) to every answered leg, the
        final ``status`` to an unanswered caller, CANCEL to an unanswered callee."""
        if call.state is CallState.ENDED:
            return
        if reason is EndReason.CREDIT_EXHAUSTED:
            self.metrics.cutoffs.inc()
        self._end(call, status, reason, reason_header=reason_header)

    def _end(self, call: Call, status: int, reason: EndReason, *, skip: InviteSession | None = None,
             reason_header: str | None = None, text: str | None = None, sip_reason: str | None = None) -> None:
        if call.state is CallState.ENDED:
            return
        call.state = CallState.ENDED
        inbound, outbound = call.inbound, call.outbound
        final = 200 if inbound is not None and inbound.answered else status
        if inbound is not None and inbound is not skip:
            if inbound.answered:
                inbound.bye(reason_header)
            else:
                inbound.reject(status, sip_reason, [warning(text)] if text else [])
        if outbound is not None and outbound is not skip:
            outbound.cancel(reason_header)  # CANCEL if unanswered, else BYE
        self._close(call, final, reason)

    def _close(self, call: Call, status: int, reason: EndReason) -> None:
        media = self.media.close(call)
        self.calls.pop(call.id, None)
        direction = call.direction.value
        m = self.metrics
        m.child(m.active, direction).dec()
        m.child(m.ended, direction, str(status), reason.value).inc()
        inbound, outbound = call.inbound, call.outbound
        if log.isEnabledFor(logging.INFO):  # per-call lines: no dict built when not logged
            log.info("call ended", extra={
                "event": "call_ended", "call_id": call.id, "direction": direction, "profile": call.profile.id,
                "status": status, "reason": reason.value, "talk_seconds": round(call.talk_seconds, 3),
                "inbound_call_id": inbound.dialog.call_id if inbound else None,
                "outbound_call_id": outbound.call_id if outbound else None})
        for listener in self.listeners:
            listener.call_ended(call, status, reason, media)

    def bye_recovered(self, live: LiveCall, reason: str = 'SIP;cause=500;text="Edge restarted"') -> None:
        """BYE the legs of a call a previous run (or a dead cluster node) left, each from its stored record."""
        for record in live.legs:
            peer = peer_of(record.get("peer", ""))
            if peer is None:
                continue
            built = bye_from_record(record, self.local(peer._replace(side=record.get("side", ""))), reason)
            if built is not None:
                bye, peer = built
                self.tl.send_request(bye, peer, on_response=lambda m: None, on_timeout=lambda: None)
