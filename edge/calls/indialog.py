"""In-dialog requests of a call: relayed to the other leg, and their answers back.

A re-INVITE (hold, resume, a new codec) becomes a re-INVITE on the other leg, its SDP
anchored both ways (the relay re-latches); UPDATE, INFO, OPTIONS and the rest are
relayed with their body and the headers that give it meaning. On an echo call the
edge is the other side and answers itself.
"""

from __future__ import annotations

from edge.sip import SipMessage
from edge.sip.invite import InviteSession
from edge.sip.request import warning
from edge.sip.transaction import ServerTransaction, State

from .media import SDP, CallMedia, MediaRefused
from .model import Call

RELAYED_HEADERS = ("Event", "Subscription-State", "Info-Package", "Reason")


def relay_reinvite(media: CallMedia, call: Call, origin: InviteSession, other: InviteSession,
                   tx: ServerTransaction) -> None:
    req = tx.request
    if call.relay is None or not req.body:
        # a late offer mid-call needs the ACK to carry the answer: no PBX we serve sends one
        tx.respond(488, headers=[warning("re-INVITE without SDP is not supported")])
        return
    try:
        body = media.relay_sdp(call, call.side_of(origin), req.body, "offer")
    except MediaRefused as exc:
        tx.respond(exc.status, headers=[warning(exc.text)])
        return

    def on_response(resp: SipMessage) -> None:
        if resp.status < 200:
            return
        if resp.status >= 300:
            tx.respond(resp.status, resp.reason)
            return
        answer = b""
        if resp.body:
            try:
                answer = media.relay_sdp(call, call.side_of(other), resp.body, "answer")
            except MediaRefused:
                answer = b""
        if tx.state is State.PROCEEDING:
            origin.answer_reinvite(tx, [SDP] if answer else [], answer)

    other.request("INVITE", [SDP], body, on_response=on_response, on_timeout=lambda: tx.respond(408))


def relay_request(media: CallMedia, call: Call, origin: InviteSession, other: InviteSession,
                  tx: ServerTransaction) -> None:
    """OPTIONS, INFO, UPDATE, ...: to the other leg; the final answer comes back."""
    req = tx.request
    headers: list[tuple[str, str]] = []
    body = req.body
    ctype = req.header("Content-Type")
    if body and ctype:
        try:
            body = media.relay_body(call, call.side_of(origin), body, ctype)
        except MediaRefused as exc:
            tx.respond(exc.status, headers=[warning(exc.text)])
            return
        headers.append(("Content-Type", ctype))
    for name in RELAYED_HEADERS:
        value = req.header(name)
        if value:
            headers.append((name, value))

    def on_response(resp: SipMessage) -> None:
        if resp.status < 200:
            return
        rbody, rtype = resp.body, resp.header("Content-Type")
        rheaders: list[tuple[str, str]] = []
        if rbody and rtype:
            try:
                rbody = media.relay_body(call, call.side_of(other), rbody, rtype)
            except MediaRefused:
                rbody = b""
            rheaders.append(("Content-Type", rtype))
        tx.respond(resp.status, resp.reason, headers=rheaders, body=rbody if rheaders else b"")

    other.request(req.method, headers, body, on_response=on_response, on_timeout=lambda: tx.respond(408))


def answer_echo(media: CallMedia, call: Call, session: InviteSession, tx: ServerTransaction) -> None:
    """Hold/resume and keep-alives on an echo call: the edge is the callee."""
    req = tx.request
    if req.method != "INVITE" or not req.body:
        tx.respond(200)
        return
    try:
        body = media.echo(call, req.body)
    except MediaRefused as exc:
        tx.respond(exc.status, headers=[warning(exc.text)])
        return
    session.answer_reinvite(tx, [SDP], body)
