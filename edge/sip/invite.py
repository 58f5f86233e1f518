"""INVITE sessions (RFC 3261 §13-§15): one leg of a call from its INVITE to its BYE.

Shaped after pjsip's ``pjsip_inv_session``: a session is an object with a state
(:class:`InviteState`) and a short callback table (:class:`InviteCallbacks`) for the
layer above; all SIP detail of one leg stays here. :class:`UasInvite` is the leg whose
INVITE the edge received, :class:`UacInvite` the one the edge sends. By default a
session does what every UA must:

- a UAC session ACKs every 2xx itself (§13.2.2.4), again for a retransmitted one, and
  ACKs-then-BYEs a 2xx that arrives after it gave up (CANCEL crossing the 200) or
  from a second fork (§13.2.2.4, §15);
- a UAS session retransmits its 2xx, T1 doubling to T2, until the ACK (§13.3.1.4),
  and tells the layer above when none came within 64*T1;
- CANCEL of an unanswered UAS session gets 487 (§9.2); BYE gets 200 and ends the
  session (§15.1.2); an in-dialog request with an older CSeq gets 500 (§12.2.2);
- Timer C: a UAC session still unanswered after ``setup_timeout`` is cancelled and
  reported as a 408 failure (RFC 3261 §16.6 step 11, used by a B2BUA for ringing).

The layer above (edge/calls/controller.py) decides everything else: it answers,
rejects, relays re-INVITEs and ends calls through the methods here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Protocol

from . import SipMessage
from .dialog import Dialog, Dialogs, Local
from .request import OutRequest, new_call_id, new_tag
from .transaction import ClientTransaction, ServerTransaction, TimerHandle, TransactionLayer
from .transport import Peer

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE"
Headers = Iterable[tuple[str, str]]


class InviteState(enum.Enum):
    NULL = "null"               # created, nothing sent
    CALLING = "calling"         # UAC: INVITE sent, no provisional answer yet
    INCOMING = "incoming"       # UAS: INVITE received, only 100 Trying sent
    EARLY = "early"             # a provisional answer sent (UAS) or received (UAC)
    CONNECTING = "connecting"   # UAS: 2xx sent, waiting for its ACK
    CONFIRMED = "confirmed"     # the 2xx was ACKed: the call is up
    TERMINATED = "terminated"   # ended (final failure, CANCEL, BYE either way)


class InviteCallbacks(Protocol):
    """What a session tells the layer above. Every callback gets the session; the
    session's ``owner`` is whatever that layer attached (its call)."""

    def on_progress(self, session: UacInvite, response: SipMessage) -> None:
        """A provisional answer (180, 183, ...; not 100) to our INVITE."""

    def on_answer(self, session: UacInvite, response: SipMessage) -> None:
        """A 2xx to our INVITE; the session has ACKed it and the dialog is confirmed."""

    def on_failure(self, session: UacInvite, status: int, response: SipMessage | None) -> None:
        """A final non-2xx, or 408 without a response (Timer B, Timer C). The session is over."""

    def on_cancel(self, session: UasInvite) -> None:
        """The peer cancelled its INVITE; the session answered 487 and is over."""

    def on_request(self, session: InviteSession, tx: ServerTransaction) -> None:
        """An in-dialog request other than ACK, BYE and CANCEL (re-INVITE, UPDATE, INFO, ...).
        The callee answers ``tx``; a 2xx to a re-INVITE goes through :meth:`InviteSession.answer_reinvite`."""

    def on_bye(self, session: InviteSession) -> None:
        """The peer hung up; the session answered 200 and is over."""

    def on_no_ack(self, session: InviteSession) -> None:
        """Our 2xx was never ACKed (64*T1): the peer is gone. The session is still up."""


class InviteSession:
    """What a UAS and a UAC session share: the dialog, BYE, in-dialog requests, 2xx retransmission."""

    __slots__ = ("tl", "dialogs", "cb", "owner", "state", "dialog", "_pending_2xx", "_retransmit")

    def __init__(self, tl: TransactionLayer, dialogs: Dialogs, callbacks: InviteCallbacks,
                 dialog: Dialog, owner: object) -> None:
        self.tl = tl
        self.dialogs = dialogs
        self.cb = callbacks
        self.owner = owner
        self.state = InviteState.NULL
        self.dialog = dialog
        self._pending_2xx: tuple[int, bytes] | None = None   # (CSeq, bytes) of a 2xx awaiting its ACK
        self._retransmit: TimerHandle | None = None

    @property
    def peer(self) -> Peer:
        return self.dialog.peer

    @property
    def ended(self) -> bool:
        return self.state is InviteState.TERMINATED

    def _terminate(self) -> None:
        if self.state is InviteState.TERMINATED:
            return
        self.state = InviteState.TERMINATED
        self._stop_retransmitting()
        self.dialogs.ended(self.dialog, self)

    # ----------------------------------------------------- requests we send

    def request(self, method: str, headers: Headers = (), body: bytes = b"", *,
                on_response: Callable[[SipMessage], None] = lambda m: None,
                on_timeout: Callable[[], None] = lambda: None) -> ClientTransaction:
        """Send an in-dialog request (re-INVITE, INFO, UPDATE, ...); a 2xx to a re-INVITE is ACKed here."""
        out = self.dialog.request(method, headers, body)

        def response(resp: SipMessage) -> None:
            if method == "INVITE" and 200 <= resp.status < 300:
                self.dialog.refresh_target(resp)
                self._send_ack(resp)
            on_response(resp)

        return self.tl.send_request(out, self.dialog.peer, on_response=response, on_timeout=on_timeout)

    def bye(self, reason: str | None = None) -> None:
        """Hang up this leg: BYE if the peer's side of the dialog exists, and end the session."""
        if self.state is InviteState.TERMINATED:
            return
        if self.state in (InviteState.CONNECTING, InviteState.CONFIRMED) and self.dialog.established:
            headers = [("Reason", reason)] if reason else []
            out = self.dialog.request("BYE", headers)
            self.tl.send_request(out, self.dialog.peer, on_response=lambda m: None, on_timeout=lambda: None)
        self._terminate()

    def _send_ack(self, response: SipMessage) -> None:
        self.tl.send_stateless(self.dialog.ack(response), self.dialog.peer)

    # ------------------------------------------------- requests we receive

    def on_in_dialog(self, tx: ServerTransaction) -> None:
        req = tx.request
        if not self.dialog.accept_remote_cseq(req.cseq):
            tx.respond(500, "CSeq Out of Order", headers=[("Retry-After", "1")])
            return
        if req.method == "BYE":
            tx.respond(200)
            if self.state is not InviteState.TERMINATED:
                self._terminate()
                self.cb.on_bye(self)
            return
        if self.state is InviteState.TERMINATED:
            tx.respond(481, "Call/Transaction Does Not Exist")
            return
        if req.method in ("INVITE", "UPDATE"):
            self.dialog.refresh_target(req)
        self.cb.on_request(self, tx)

    def answer_reinvite(self, tx: ServerTransaction, headers: Headers = (), body: bytes = b"") -> None:
        """Answer an in-dialog INVITE with 200, retransmitted until its ACK."""
        self._send_2xx(tx, [("Contact", self.dialog.local.contact), *headers], body)

    def _send_2xx(self, tx: ServerTransaction, headers: Headers, body: bytes) -> None:
        """§13.3.1.4: pass the 2xx to the transport at T1, 2*T1, ... capped at T2 until the ACK."""
        tx.respond(200, headers=list(headers), body=body, to_tag=self.dialog.local_tag)
        data = tx.last_response
        if data is None:
            return
        self._stop_retransmitting()
        self._pending_2xx = (tx.request.cseq, data)
        deadline = self.tl.loop.time() + 64 * self.tl.t1
        self._retransmit = self.tl.loop.call_later(self.tl.t1, self._again, data, self.tl.t1, deadline)

    def _again(self, data: bytes, interval: float, deadline: float) -> None:
        if self._pending_2xx is None or self._pending_2xx[1] is not data:
            return
        if self.tl.loop.time() >= deadline:
            self._pending_2xx = None
            self._retransmit = None
            self.cb.on_no_ack(self)
            return
        self.tl.transports.send(data, self.dialog.peer)
        self.tl.metrics.retransmissions.labels("2xx").inc()
        interval = min(2 * interval, self.tl.t2)
        self._retransmit = self.tl.loop.call_later(interval, self._again, data, interval, deadline)

    def _stop_retransmitting(self) -> None:
        self._pending_2xx = None
        if self._retransmit is not None:
            self._retransmit.cancel()
            self._retransmit = None

    def on_ack(self, msg: SipMessage) -> None:
        pending = self._pending_2xx
        if pending is not None and msg.cseq == pending[0]:
            self._stop_retransmitting()
        if self.state is InviteState.CONNECTING:
            self.state = InviteState.CONFIRMED

    def on_stray_2xx(self, msg: SipMessage) -> None:
        """A retransmitted 2xx after its transaction ended: ACK it again; BYE it if we are done."""
        self._send_ack(msg)
        if self.state is InviteState.TERMINATED or msg.to_tag != self.dialog.remote_tag:
            self.tl.send_stateless(self.dialog.bye_for_fork(msg), self.dialog.peer)

    def on_cancel(self, cancel: SipMessage) -> None:
        """Only an unanswered UAS session can be cancelled (see :class:`UasInvite`)."""


class UasInvite(InviteSession):
    """The leg whose INVITE the edge received.

    The dialog (and its local tag) exists from the start, so every provisional answer
    carries the same To tag and an early dialog forms as soon as one is sent.
    """

    __slots__ = ("tx",)

    def __init__(self, tl: TransactionLayer, dialogs: Dialogs, tx: ServerTransaction, local: Local,
                 callbacks: InviteCallbacks, owner: object = None) -> None:
        dialog = Dialog.for_uas(tx.request, tx.peer, local, new_tag())
        super().__init__(tl, dialogs, callbacks, dialog, owner)
        self.tx = tx
        self.state = InviteState.INCOMING
        tx.to_tag = dialog.local_tag
        dialogs.add(dialog, self)
        dialogs.add_invite(tx.key, self)

    @property
    def answered(self) -> bool:
        return self.state in (InviteState.CONNECTING, InviteState.CONFIRMED)

    def _dialog_headers(self) -> list[tuple[str, str]]:
        """§12.1.1: a response that establishes a dialog copies Record-Route and carries our Contact."""
        return [("Contact", self.dialog.local.contact),
                *(("Record-Route", rr) for rr in self.tx.request.headers("Record-Route"))]

    def progress(self, status: int, reason: str | None = None, headers: Headers = (), body: bytes = b"") -> None:
        """Send a provisional answer (180, 183 with early media)."""
        if self.state not in (InviteState.INCOMING, InviteState.EARLY):
            return
        self.tx.respond(status, reason, headers=[*self._dialog_headers(), *headers], body=body)
        self.state = InviteState.EARLY

    def answer(self, headers: Headers = (), body: bytes = b"") -> None:
        """Answer 200, retransmitted until the ACK (then CONFIRMED)."""
        if self.state not in (InviteState.INCOMING, InviteState.EARLY):
            return
        self.dialogs.invite_done(self.tx.key)
        self.state = InviteState.CONNECTING
        self._send_2xx(self.tx, [*self._dialog_headers(), ("Allow", ALLOW), *headers], body)

    def reject(self, status: int, reason: str | None = None, headers: Headers = ()) -> None:
        """A final failure (>= 300) to the INVITE; the session is over."""
        if self.state not in (InviteState.INCOMING, InviteState.EARLY):
            return
        self.tx.respond(status, reason, headers=list(headers))
        self.dialogs.invite_done(self.tx.key)
        self._terminate()

    def on_cancel(self, cancel: SipMessage) -> None:
        if self.state not in (InviteState.INCOMING, InviteState.EARLY):
            return
        self.tx.respond(487)
        self.dialogs.invite_done(self.tx.key)
        self._terminate()
        self.cb.on_cancel(self)


class UacInvite(InviteSession):
    """The leg the edge places: an INVITE to ``ruri`` at ``peer``.

    :param setup_timeout: Timer C, seconds the INVITE may stay unanswered (None: no limit).
    """

    __slots__ = ("_tx", "_out", "_cancelling", "_timer_c")

    def __init__(self, tl: TransactionLayer, dialogs: Dialogs, callbacks: InviteCallbacks, *, peer: Peer,
                 local: Local, ruri: str, from_uri: str, to_uri: str, owner: object = None,
                 call_id: str | None = None) -> None:
        dialog = Dialog(call_id=call_id or new_call_id(local.via_host.rpartition(":")[0] or "edge"),
                        local_tag=new_tag(), local_uri=from_uri, remote_uri=to_uri, remote_target=ruri,
                        peer=peer, local=local)
        super().__init__(tl, dialogs, callbacks, dialog, owner)
        self._tx: ClientTransaction | None = None
        self._out: OutRequest | None = None
        self._cancelling = False
        self._timer_c: TimerHandle | None = None

    @property
    def answered(self) -> bool:
        return self.state is InviteState.CONFIRMED

    @property
    def call_id(self) -> str:
        return self.dialog.call_id

    def invite(self, headers: Headers = (), body: bytes = b"", *, setup_timeout: float | None = None,
               max_forwards: int = 70) -> None:
        """Send the INVITE (with ``headers`` after Contact and Allow)."""
        self.dialogs.add(self.dialog, self)
        out = self.dialog.request("INVITE", [("Allow", ALLOW), *headers], body)
        out.max_forwards = max_forwards
        self._out = out
        self.state = InviteState.CALLING
        self._tx = self.tl.send_request(out, self.dialog.peer, on_response=self._on_response,
                                        on_timeout=self._on_timeout)
        if setup_timeout is not None:
            self._timer_c = self.tl.loop.call_later(setup_timeout, self._on_timer_c)

    def cancel(self, reason: str | None = None) -> None:
        """Give up an unanswered INVITE (CANCEL, sent once a provisional answer came, §9.1).
        No callback follows; a 2xx that crosses the CANCEL is ACKed and BYEd here."""
        if self.state in (InviteState.CALLING, InviteState.EARLY):
            self._cancelling = True
            if self._tx is not None:
                self._tx.cancel(reason)
            self._terminate()
        elif self.state is not InviteState.TERMINATED:
            self.bye(reason)

    def _terminate(self) -> None:
        if self._timer_c is not None:
            self._timer_c.cancel()
            self._timer_c = None
        super()._terminate()

    def _on_timer_c(self) -> None:
        self._timer_c = None
        if self.state in (InviteState.CALLING, InviteState.EARLY):
            self.cancel('SIP;cause=408;text="No answer"')
            self.cb.on_failure(self, 408, None)

    def _on_timeout(self) -> None:
        if self.state in (InviteState.CALLING, InviteState.EARLY):
            self._terminate()
            self.cb.on_failure(self, 408, None)

    def _on_response(self, resp: SipMessage) -> None:
        status = resp.status
        if status < 200:
            if status == 100 or self.state not in (InviteState.CALLING, InviteState.EARLY):
                return
            if resp.to_tag:
                self.dialog.remote_tag = resp.to_tag    # an early dialog
            self.state = InviteState.EARLY
            self.cb.on_progress(self, resp)
            return
        if status < 300:
            self._on_2xx(resp)
            return
        if self.state in (InviteState.CALLING, InviteState.EARLY):
            self._terminate()
            self.cb.on_failure(self, status, resp)

    def _on_2xx(self, resp: SipMessage) -> None:
        if self.state is InviteState.CONFIRMED:
            self._send_ack(resp)    # a retransmission, or a second fork: ACK, and BYE the fork
            if resp.to_tag != self.dialog.remote_tag:
                self.tl.send_stateless(self.dialog.bye_for_fork(resp), self.dialog.peer)
            return
        if self._cancelling or self.state is InviteState.TERMINATED:
            # the 2xx crossed our CANCEL (or came after Timer C): the dialog exists now, end it
            self._send_ack(resp)
            self.tl.send_stateless(self.dialog.bye_for_fork(resp), self.dialog.peer)
            return
        self.dialog.establish(resp)
        self._send_ack(resp)
        if self._timer_c is not None:
            self._timer_c.cancel()
            self._timer_c = None
        self.state = InviteState.CONFIRMED
        self.cb.on_answer(self, resp)
