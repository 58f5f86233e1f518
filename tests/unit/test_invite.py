"""INVITE sessions and dialogs (edge/sip/invite.py, edge/sip/dialog.py) on a fake clock and wire.

The test plays the peers with raw SIP text; timers run only when the clock is advanced,
so every retransmission time is exact.
"""

from __future__ import annotations

from typing import Any

import pytest
from sipfakes import CARRIER, LOCAL, PBX, T1, Stack, invite_text, response_text

from edge.sip.dialog import LINGER
from edge.sip.invite import InviteState, UacInvite, UasInvite


class Events:
    """A callback table that records what the session reported."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.requests: list[Any] = []

    def on_progress(self, session: Any, response: Any) -> None:
        self.seen.append(("progress", response.status))

    def on_answer(self, session: Any, response: Any) -> None:
        self.seen.append(("answer", response.status))

    def on_failure(self, session: Any, status: int, response: Any) -> None:
        self.seen.append(("failure", status, response is not None))

    def on_cancel(self, session: Any) -> None:
        self.seen.append(("cancel",))

    def on_request(self, session: Any, tx: Any) -> None:
        self.seen.append(("request", tx.request.method))
        self.requests.append(tx)

    def on_bye(self, session: Any) -> None:
        self.seen.append(("bye",))

    def on_no_ack(self, session: Any) -> None:
        self.seen.append(("no_ack",))


def uas(stack: Stack, events: Events, **kw: Any) -> UasInvite:
    stack.receive(invite_text(**kw), PBX)
    tx = stack.invites.pop()
    return UasInvite(stack.tl, stack.dialogs, tx, LOCAL, events, owner="call-1")


def uac(stack: Stack, events: Events, setup_timeout: float | None = None) -> UacInvite:
    session = UacInvite(stack.tl, stack.dialogs, events, peer=CARRIER, local=LOCAL,
                        ruri="sip:+442071234567@203.0.113.5:5060", from_uri="<sip:990500000001@sip.edge.test>",
                        to_uri="<sip:+442071234567@203.0.113.5:5060>", owner="call-1")
    session.invite([("Content-Type", "application/sdp")], b"v=0\r\n", setup_timeout=setup_timeout, max_forwards=69)
    return session


def ack_text(session: UasInvite, cseq: int = 1, branch: str = "z9hG4bKack1") -> str:
    return invite_text(method="ACK", branch=branch, cseq=cseq, to_tag=session.dialog.local_tag)


# ------------------------------------------------------------------ UAS


def test_uas_provisional_and_answer_carry_one_to_tag_contact_and_record_route() -> None:
    stack, events = Stack(), Events()
    session = uas(stack, events)
    session.progress(180)
    session.answer([("Content-Type", "application/sdp")], b"v=0\r\n")
    ringing, ok = stack.wire.responses(180)[0], stack.wire.responses(200)[0]
    assert ringing.to_tag == ok.to_tag == session.dialog.local_tag
    for resp in (ringing, ok):
        assert resp.header("Contact") == LOCAL.contact
        assert resp.headers("Record-Route") == ["<sip:proxy.pbx.example;lr>"]  # RFC 3261 §12.1.1
    assert session.state is InviteState.CONNECTING


def test_uas_retransmits_its_2xx_t1_doubling_to_t2_until_the_ack() -> None:
    stack, events = Stack(), Events()
    session = uas(stack, events)
    session.answer()
    stack.loop.advance(12 * T1)
    times = [t - stack.wire.sent[0][0] for t, _, d in stack.wire.sent if d.startswith(b"SIP/2.0 200")]
    # sent at 0, then T1, 3T1, 7T1 (intervals 1, 2, 4 T1), then every T2 = 8 T1
    assert times[:5] == pytest.approx([0, T1, 3 * T1, 7 * T1, 15 * T1][:len(times[:5])])
    assert len(times) == 4
    stack.receive(ack_text(session), PBX)
    assert session.state is InviteState.CONFIRMED
    count = len(stack.wire.sent)
    stack.loop.advance(64 * T1)
    assert len(stack.wire.sent) == count and events.seen == []


def test_uas_reports_no_ack_after_64_t1() -> None:
    stack, events = Stack(), Events()
    session = uas(stack, events)
    session.answer()
    stack.loop.advance(63 * T1)
    assert events.seen == []
    stack.loop.advance(9 * T1)
    assert events.seen == [("no_ack",)]


def test_uas_cancel_answers_487_and_reports() -> None:
    stack, events = Stack(), Events()
    session = uas(stack, events)
    session.progress(180)
    stack.receive(invite_text(method="CANCEL"), PBX)
    assert stack.wire.first_lines()[-2:] == ["SIP/2.0 200 OK", "SIP/2.0 487 Request Terminated"]
    assert events.seen == [("cancel",)] and session.state is InviteState.TERMINATED


def test_uas_cancel_after_the_answer_changes_nothing() -> None:
    stack, events = Stack(), Events()
    session = uas(stack, events)
    session.answer()
    stack.receive(invite_text(method="CANCEL"), PBX)
    assert stack.wire.first_lines()[-1].startswith("SIP/2.0 481")  # the INVITE transaction is not pending
    assert events.seen == [] and session.state is InviteState.CONNECTING


def test_bye_gets_200_ends_the_session_and_a_lower_cseq_gets_500() -> None:
    stack, events = Stack(), Events()
    session = uas(stack, events)
    session.answer()
    stack.receive(ack_text(session), PBX)
    stack.receive(invite_text(method="INFO", branch="z9hG4bKinfo", cseq=5, to_tag=session.dialog.local_tag), PBX)
    assert events.seen == [("request", "INFO")]
    events.requests[0].respond(200)
    stack.receive(invite_text(method="BYE", branch="z9hG4bKbye0", cseq=4, to_tag=session.dialog.local_tag), PBX)
    assert stack.wire.first_lines()[-1] == "SIP/2.0 500 CSeq Out of Order"  # RFC 3261 §12.2.2
    stack.receive(invite_text(method="BYE", branch="z9hG4bKbye1", cseq=6, to_tag=session.dialog.local_tag), PBX)
    assert stack.wire.first_lines()[-1] == "SIP/2.0 200 OK"
    assert events.seen[-1] == ("bye",) and session.state is InviteState.TERMINATED


def test_an_ended_dialog_lingers_then_is_forgotten() -> None:
    stack, events = Stack(), Events()
    session = uas(stack, events)
    session.answer()
    stack.receive(ack_text(session), PBX)
    session.bye('SIP;cause=200;text="Bye"')
    bye = stack.wire.requests("BYE", PBX)[0]
    assert bye.header("Reason") and bye.header("Route") == "<sip:proxy.pbx.example;lr>"
    assert bye.ruri == f"sip:990500000001@{PBX.host}:{PBX.port}" and bye.cseq == 1
    stack.receive(invite_text(method="BYE", branch="z9hG4bKlate", cseq=2, to_tag=session.dialog.local_tag), PBX)
    assert stack.wire.first_lines()[-1] == "SIP/2.0 200 OK"  # a BYE crossing ours finds the dialog
    stack.loop.advance(LINGER + 2)
    assert len(stack.dialogs) == 0
    stack.receive(invite_text(method="INFO", branch="z9hG4bKgone", cseq=3, to_tag=session.dialog.local_tag), PBX)
    assert stack.wire.first_lines()[-1].startswith("SIP/2.0 481")


def test_reinvite_answer_is_retransmitted_until_its_ack() -> None:
    stack, events = Stack(), Events()
    session = uas(stack, events)
    session.answer()
    stack.receive(ack_text(session), PBX)
    stack.receive(invite_text(branch="z9hG4bKre1", cseq=2, to_tag=session.dialog.local_tag, body="v=0\r\n"), PBX)
    assert events.seen == [("request", "INVITE")]
    stack.wire.clear()
    session.answer_reinvite(events.requests[0], [("Content-Type", "application/sdp")], b"v=0\r\n")
    stack.loop.advance(2 * T1)
    assert len(stack.wire.responses(200)) == 2
    stack.receive(ack_text(session, cseq=2, branch="z9hG4bKack2"), PBX)
    stack.loop.advance(10 * T1)
    assert len(stack.wire.responses(200)) == 2


# ------------------------------------------------------------------ UAC


def test_uac_acks_the_2xx_confirms_and_acks_each_retransmission() -> None:
    stack, events = Stack(), Events()
    session = uac(stack, events)
    invite = stack.wire.requests("INVITE")[0]
    assert invite.max_forwards == 69 and invite.header("Allow")
    stack.receive(response_text(invite, 180), CARRIER)
    assert session.state is InviteState.EARLY and session.dialog.remote_tag == "callee1"
    rr = "Record-Route: <sip:a.carrier.example;lr>\nRecord-Route: <sip:b.carrier.example;lr>\n"
    stack.receive(response_text(invite, 200, contact="<sip:gw7@203.0.113.5:5062>", extra=rr), CARRIER)
    stack.receive(response_text(invite, 200, contact="<sip:gw7@203.0.113.5:5062>", extra=rr), CARRIER)
    assert events.seen == [("progress", 180), ("answer", 200)]
    acks = stack.wire.requests("ACK")
    assert len(acks) == 2
    ack = acks[0]
    assert ack.ruri == "sip:gw7@203.0.113.5:5062" and ack.cseq == invite.cseq and ack.to_tag == "callee1"
    assert ack.branch != invite.branch  # a 2xx ACK is its own transaction (§13.2.2.4)
    assert ack.headers("Route") == ["<sip:b.carrier.example;lr>", "<sip:a.carrier.example;lr>"]
    assert session.state is InviteState.CONFIRMED


def test_uac_acks_and_byes_a_second_fork() -> None:
    stack, events = Stack(), Events()
    uac(stack, events)
    invite = stack.wire.requests("INVITE")[0]
    stack.receive(response_text(invite, 200, to_tag="fork1"), CARRIER)
    stack.receive(response_text(invite, 200, to_tag="fork2"), CARRIER)
    assert events.seen == [("answer", 200)]
    assert [a.to_tag for a in stack.wire.requests("ACK")] == ["fork1", "fork2"]
    assert [b.to_tag for b in stack.wire.requests("BYE")] == ["fork2"]


def test_cancel_waits_for_a_provisional_then_crossing_200_is_acked_and_byed() -> None:
    stack, events = Stack(), Events()
    session = uac(stack, events)
    invite = stack.wire.requests("INVITE")[0]
    session.cancel('SIP;cause=487;text="Call cancelled"')
    assert stack.wire.requests("CANCEL") == []  # RFC 3261 §9.1: not before a provisional
    stack.receive(response_text(invite, 180), CARRIER)
    cancel = stack.wire.requests("CANCEL")[0]
    assert cancel.branch == invite.branch and cancel.header("Reason")
    stack.receive(response_text(invite, 200), CARRIER)  # the callee answered before our CANCEL arrived
    assert [m.method for m in stack.wire.messages() if m.is_request][-2:] == ["ACK", "BYE"]
    assert events.seen == [] and session.state is InviteState.TERMINATED


def test_cancelled_uac_reports_nothing_when_the_487_comes() -> None:
    stack, events = Stack(), Events()
    session = uac(stack, events)
    invite = stack.wire.requests("INVITE")[0]
    stack.receive(response_text(invite, 183), CARRIER)
    session.cancel()
    stack.receive(response_text(invite, 487), CARRIER)
    assert events.seen == [("progress", 183)]
    assert stack.wire.requests("ACK")[0].branch == invite.branch  # the non-2xx ACK, by the transaction


def test_timer_c_cancels_and_reports_408() -> None:
    stack, events = Stack(), Events()
    uac(stack, events, setup_timeout=90)
    invite = stack.wire.requests("INVITE")[0]
    stack.receive(response_text(invite, 180), CARRIER)
    stack.loop.advance(89)
    assert events.seen == [("progress", 180)]
    stack.loop.advance(2)
    assert events.seen[-1] == ("failure", 408, False)
    cancels = stack.wire.requests("CANCEL")  # one CANCEL transaction (retransmitted until answered)
    assert cancels and {c.branch for c in cancels} == {invite.branch}


def test_timer_b_reports_408_without_a_response() -> None:
    stack, events = Stack(), Events()
    uac(stack, events)
    stack.loop.advance(64 * T1 + 1)
    assert events.seen == [("failure", 408, False)]
    assert len(stack.wire.requests("INVITE")) == 7  # 0, T1, 3T1, ... 63T1 (Timer A)


def test_final_failure_is_reported_once() -> None:
    stack, events = Stack(), Events()
    session = uac(stack, events)
    invite = stack.wire.requests("INVITE")[0]
    stack.receive(response_text(invite, 486), CARRIER)
    stack.receive(response_text(invite, 486), CARRIER)
    assert events.seen == [("failure", 486, True)] and session.state is InviteState.TERMINATED


def test_a_stray_2xx_after_the_transaction_is_acked_again() -> None:
    stack, events = Stack(), Events()
    session = uac(stack, events)
    invite = stack.wire.requests("INVITE")[0]
    stack.receive(response_text(invite, 200), CARRIER)
    stack.loop.advance(64 * T1 + 1)  # Timer M: the client transaction is gone
    assert not stack.tl.client
    stack.receive(response_text(invite, 200), CARRIER)
    assert len(stack.wire.requests("ACK")) == 2 and stack.wire.requests("BYE") == []
    session.bye()
    stack.loop.advance(5)
    stack.receive(response_text(invite, 200), CARRIER)  # after our BYE (dialog lingering): ACK and BYE it again
    assert len(stack.wire.requests("ACK")) == 3 and len(stack.wire.requests("BYE")) >= 2


def test_in_dialog_request_from_the_callee_reaches_the_layer_above() -> None:
    stack, events = Stack(), Events()
    session = uac(stack, events)
    invite = stack.wire.requests("INVITE")[0]
    stack.receive(response_text(invite, 200), CARRIER)
    local_tag = session.dialog.local_tag
    reinvite = (f"INVITE sip:198.51.100.1:5060 SIP/2.0\nVia: SIP/2.0/UDP {CARRIER.host};branch=z9hG4bKcr1\n"
                f"From: <sip:+442071234567@203.0.113.5>;tag=callee1\nTo: {invite.header('From')}\n"
                f"Call-ID: {invite.call_id}\nCSeq: 7 INVITE\nContact: <sip:gw9@203.0.113.5:5064>\n"
                "Content-Length: 0\n\n")
    assert local_tag in (invite.header("From") or "")
    stack.receive(reinvite, CARRIER)
    assert events.seen[-1] == ("request", "INVITE")
    assert session.dialog.remote_target == "sip:gw9@203.0.113.5:5064"  # a target refresh (§12.2)
