"""The call controller (edge/calls/controller.py) with fake sessions, admission and media.

The controller's job is the policy between the legs: which leg hears what, failover,
who is told when a call ends. The sessions' SIP is tested in test_invite.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sipfakes import PBX, FakeLoop, invite_text

from edge.calls.admission import Attempt
from edge.calls.controller import CallController
from edge.calls.metrics import CallMetrics
from edge.calls.model import Call, CallState, Direction, EndReason, Funding, Reject, Target
from edge.calls.routing import Routing
from edge.config import CarrierConfig
from edge.control.models import LiveCall, Profile, Rate
from edge.sip import parse
from edge.sip.dialog import Local
from edge.sip.transaction import State
from edge.sip.transport import Peer

PROFILE = Profile(id="prf_1", account_id="acc_1", name="HQ", channels=2, auth="digest", sip_username="990500000001")
RATE = Rate(prefix="44", rate=20_000, min_seconds=60, increment_seconds=6)
GW1 = CarrierConfig(uri="sip:203.0.113.5:5060", priority=1)
GW2 = CarrierConfig(uri="sip:203.0.113.6:5060", priority=2)


class FakeTx:
    def __init__(self, text: str, peer: Peer = PBX) -> None:
        self.request = parse(text.replace("\n", "\r\n").encode())
        self.peer = peer
        self.responses: list[tuple[int, Any]] = []

    def respond(self, status: int, reason: str | None = None, **kw: Any) -> None:
        self.responses.append((status, kw.get("headers")))
        if status >= 200:
            self.state = State.COMPLETED

    state = State.PROCEEDING        # an INVITE server transaction after its 100 Trying


class FakeDialog:
    def __init__(self, call_id: str) -> None:
        self.call_id = call_id

    def as_record(self) -> dict[str, str]:
        return {"call_id": self.call_id}


class FakeSession:
    """Records what the controller asks a leg to do."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.did: list[tuple[Any, ...]] = []
        self.answered = False
        self.ended = False

    def bye(self, reason: str | None = None) -> None:
        self.did.append(("bye", reason))
        self.ended = True


class FakeUas(FakeSession):
    def __init__(self, tl: Any, dialogs: Any, tx: FakeTx, local: Local, cb: Any, owner: Any = None) -> None:
        super().__init__(owner)
        self.tx = tx
        self.dialog = FakeDialog(tx.request.call_id)

    def progress(self, status: int, reason: str | None = None, headers: Any = (), body: bytes = b"") -> None:
        self.did.append(("progress", status, body))

    def answer(self, headers: Any = (), body: bytes = b"") -> None:
        self.did.append(("answer", body))
        self.answered = True

    def reject(self, status: int, reason: str | None = None, headers: Any = ()) -> None:
        self.did.append(("reject", status, reason))
        self.ended = True


class FakeUac(FakeSession):
    placed: list[FakeUac] = []

    def __init__(self, tl: Any, dialogs: Any, cb: Any, *, peer: Peer, local: Local, ruri: str, from_uri: str,
                 to_uri: str, owner: Any = None) -> None:
        super().__init__(owner)
        self.peer, self.ruri, self.from_uri, self.to_uri = peer, ruri, from_uri, to_uri
        self.call_id = f"out-{len(FakeUac.placed)}"
        self.dialog = FakeDialog(self.call_id)
        FakeUac.placed.append(self)

    def invite(self, headers: Any = (), body: bytes = b"", *, setup_timeout: float | None = None,
               max_forwards: int = 70) -> None:
        self.did.append(("invite", body, setup_timeout, max_forwards))

    def cancel(self, reason: str | None = None) -> None:
        self.did.append(("cancel", reason))
        self.ended = True


class FakeAdmission:
    def __init__(self) -> None:
        self.refusal: Reject | None = None
        self.seize_refusal: Reject | None = None
        self.target: Target | None = None
        self.funding = Funding.CREDIT
        self.cluster = None         # a node alone: the channel seized is the call's (no journal to ask)

    def check(self, tx: FakeTx, direction: Direction) -> Attempt:
        return Attempt(tx, direction, profile=PROFILE, caller="990500000001", callee="+442071234567",  # type: ignore[arg-type]
                       funding=self.funding, rate=RATE, target=self.target, refusal=self.refusal)

    def seize(self, a: Attempt, call_id: str) -> LiveCall | Reject:
        if self.seize_refusal is not None:
            return self.seize_refusal
        return LiveCall(call_id=call_id, profile_id=PROFILE.id, direction=a.direction.value, started_at=0.0)


class FakeMedia:
    def __init__(self) -> None:
        self.closed: list[str] = []
        self.kinds: list[str | None] = []       # offer/answer, as the controller names each SDP

    def open(self, call: Call) -> object:
        call.relay = object()  # type: ignore[assignment]
        return call.relay

    def relay_sdp(self, call: Call, sender: Any, sdp: bytes, kind: str | None = None) -> bytes:
        self.kinds.append(kind)
        return b"anchored-from-" + sender.value.encode()

    def echo(self, call: Call, sdp: bytes) -> bytes:
        return b"echo"

    def close(self, call: Call) -> dict[str, int]:
        self.closed.append(call.id)
        return {"a_packets": 1}


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.on_answer: Any = None

    def call_answered(self, call: Call) -> None:
        self.events.append(("answered", call.id))
        if self.on_answer is not None:
            self.on_answer(call)

    def call_ended(self, call: Call, status: int, reason: EndReason, media: dict[str, int]) -> None:
        self.events.append(("ended", status, reason))

    def call_refused(self, call_id: str, direction: Direction, profile: Profile, caller: str, callee: str,
                     refusal: Reject) -> None:
        self.events.append(("refused", refusal.rule, refusal.status))


class Rig:
    def __init__(self, carriers: tuple[CarrierConfig, ...] = (GW1, GW2), trusted: bool = False) -> None:
        FakeUac.placed = []
        self.admission, self.media, self.listener = FakeAdmission(), FakeMedia(), Listener()
        self.loop = FakeLoop()
        self.ctl = CallController(
            tl=None, dialogs=None, local=lambda peer: Local("198.51.100.1:5060", "<sip:198.51.100.1:5060>"),  # type: ignore[arg-type]
            admission=self.admission, routing=Routing(list(carriers), lambda pid: [], "sip.edge.test"),  # type: ignore[arg-type]
            media=self.media, metrics=CallMetrics(None), listeners=[self.listener],  # type: ignore[arg-type]
            is_trusted=lambda host: trusted, setup_timeout=180.0,
            inbound_session=FakeUas, outbound_session=FakeUac)  # type: ignore[arg-type]

    def invite(self, body: str = "v=0\r\n", max_forwards: int = 70) -> tuple[Call, FakeUas]:
        tx = FakeTx(invite_text(body=body).replace("Max-Forwards: 70", f"Max-Forwards: {max_forwards}"))
        self.ctl.on_invite(tx)  # type: ignore[arg-type]
        self.tx = tx
        if not self.ctl.calls:
            raise LookupError("no call started")
        call = next(iter(self.ctl.calls.values()))
        return call, call.inbound  # type: ignore[return-value]


def resp(status: int, body: str = "") -> Any:
    text = (f"SIP/2.0 {status} X\nVia: SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKx\nFrom: <sip:a@b>;tag=1\n"
            f"To: <sip:c@d>;tag=2\nCall-ID: x\nCSeq: 1 INVITE\n" + ("Content-Type: application/sdp\n" if body else "")
            + f"Content-Length: {len(body)}\n\n{body}")
    return parse(text.replace("\n", "\r\n").encode())


def test_an_admitted_call_places_the_outbound_leg_with_anchored_sdp_and_one_hop_less() -> None:
    rig = Rig()
    call, inbound = rig.invite(max_forwards=20)
    (leg,) = FakeUac.placed
    assert leg.peer == Peer("udp", "203.0.113.5", 5060, side="carrier")  # the outbound leg faces the carrier side
    assert leg.ruri == "sip:+442071234567@203.0.113.5:5060"
    assert leg.from_uri == '"HQ" <sip:990500000001@sip.edge.test>'  # the edge speaks for the profile
    kind, body, ringing, hops = leg.did[0]
    assert (kind, body, hops) == ("invite", b"anchored-from-customer", 19) and ringing == pytest.approx(180, abs=1)
    assert call.state is CallState.ROUTING and call.attempt == GW1.uri


def test_provisional_then_answer_reach_the_caller_after_listeners_heard_answered() -> None:
    rig = Rig()
    call, inbound = rig.invite()
    leg = FakeUac.placed[0]
    rig.ctl.on_progress(leg, resp(183, "v=0\r\n"))  # type: ignore[arg-type]
    assert inbound.did == [("progress", 183, b"anchored-from-carrier")] and call.state is CallState.EARLY
    order: list[str] = []
    rig.listener.on_answer = lambda c: order.append("billing" if not inbound.answered else "late")
    rig.ctl.on_answer(leg, resp(200, "v=0\r\n"))  # type: ignore[arg-type]
    assert order == ["billing"] and inbound.did[-1] == ("answer", b"anchored-from-carrier")
    assert call.state is CallState.ANSWERED


def test_failover_on_5xx_before_any_provisional_then_never_after() -> None:
    rig = Rig()
    call, inbound = rig.invite()
    rig.ctl.on_failure(FakeUac.placed[0], 503, resp(503))  # type: ignore[arg-type]
    assert [leg.peer.host for leg in FakeUac.placed] == ["203.0.113.5", "203.0.113.6"]
    assert call.attempt == GW2.uri
    second = FakeUac.placed[1]
    rig.ctl.on_progress(second, resp(180))  # type: ignore[arg-type]
    rig.ctl.on_failure(second, 503, resp(503))  # type: ignore[arg-type]
    assert len(FakeUac.placed) == 2 and inbound.did[-1] == ("reject", 503, None)
    assert rig.listener.events[-1] == ("ended", 503, EndReason.CARRIER_FAILURE)


def test_a_4xx_about_the_callee_is_relayed_as_it_is_without_failover() -> None:
    rig = Rig()
    call, inbound = rig.invite()
    rig.ctl.on_failure(FakeUac.placed[0], 486, resp(486))  # type: ignore[arg-type]
    assert len(FakeUac.placed) == 1 and inbound.did[-1] == ("reject", 486, "X")
    assert rig.listener.events[-1] == ("ended", 486, EndReason.REJECTED)


def test_every_carrier_timing_out_answers_408_timeout() -> None:
    rig = Rig()
    call, inbound = rig.invite()
    rig.ctl.on_failure(FakeUac.placed[0], 408, None)  # type: ignore[arg-type]
    rig.ctl.on_failure(FakeUac.placed[1], 408, None)  # type: ignore[arg-type]
    assert inbound.did[-1] == ("reject", 408, None)
    assert rig.listener.events[-1] == ("ended", 408, EndReason.TIMEOUT)


def test_a_stale_attempt_is_ignored() -> None:
    rig = Rig()
    call, inbound = rig.invite()
    first = FakeUac.placed[0]
    rig.ctl.on_failure(first, 503, resp(503))  # type: ignore[arg-type]
    rig.ctl.on_progress(first, resp(180))  # type: ignore[arg-type]
    assert inbound.did == []


def test_cancel_before_answer_cancels_the_attempt_and_a_crossing_answer_is_hung_up() -> None:
    rig = Rig()
    call, inbound = rig.invite()
    leg = FakeUac.placed[0]
    rig.ctl.on_progress(leg, resp(180))  # type: ignore[arg-type]
    rig.ctl.on_cancel(inbound)  # type: ignore[arg-type]
    assert leg.did[-1] == ("cancel", 'SIP;cause=487;text="Call cancelled"')
    assert ("reject",) not in [d[:1] for d in inbound.did]  # the session itself answered 487
    assert rig.listener.events == [("ended", 487, EndReason.CANCEL)] and call.state is CallState.ENDED
    rig.ctl.on_answer(leg, resp(200))  # type: ignore[arg-type]  # the 200 crossed the CANCEL
    assert leg.did[-1] == ("bye", None) and rig.listener.events == [("ended", 487, EndReason.CANCEL)]


def test_billing_can_refuse_at_answer_the_caller_never_hears_a_200() -> None:
    rig = Rig()
    call, inbound = rig.invite()
    leg = FakeUac.placed[0]
    rig.listener.on_answer = lambda c: rig.ctl.hangup(c, EndReason.CREDIT, status=402,
                                                      reason_header='SIP;cause=402;text="Credit exhausted"')
    rig.ctl.on_answer(leg, resp(200))  # type: ignore[arg-type]
    assert inbound.did == [("reject", 402, None)]
    assert leg.did[-1] == ("cancel", 'SIP;cause=402;text="Credit exhausted"')  # an answered UAC: BYE
    assert rig.listener.events[-1] == ("ended", 402, EndReason.CREDIT)


def test_bye_from_either_side_ends_the_other_with_200_in_the_cdr() -> None:
    for side in ("caller", "callee"):
        rig = Rig()
        call, inbound = rig.invite()
        leg = FakeUac.placed[0]
        rig.ctl.on_answer(leg, resp(200))  # type: ignore[arg-type]
        rig.ctl.on_bye(inbound if side == "caller" else leg)  # type: ignore[arg-type]
        other = leg if side == "caller" else inbound
        assert other.did[-1][0] in ("bye", "cancel")
        reason = EndReason.CALLER_BYE if side == "caller" else EndReason.CALLEE_BYE
        assert rig.listener.events[-1] == ("ended", 200, reason) and rig.media.closed == [call.id]


def test_refusals_answer_with_a_warning_and_money_refusals_are_recorded() -> None:
    rig = Rig()
    rig.admission.refusal = Reject("credit", 402, "insufficient credit", record=True)
    with pytest.raises(LookupError):
        rig.invite()
    status, headers = rig.tx.responses[0]
    assert status == 402 and headers[0] == ("Warning", '399 sipedge "insufficient credit"')
    assert rig.listener.events == [("refused", "credit", 402)] and not FakeUac.placed
    rig = Rig()
    rig.admission.seize_refusal = Reject("channels", 486, "all 2 channels of the profile are in use")
    with pytest.raises(LookupError):
        rig.invite()
    assert rig.tx.responses[0][0] == 486 and rig.listener.events == []


def test_an_echo_call_is_answered_by_the_edge() -> None:
    rig = Rig()
    rig.admission.funding = Funding.FREE
    call, inbound = rig.invite()
    assert FakeUac.placed == [] and inbound.did == [("answer", b"echo")]
    assert rig.listener.events == [("answered", call.id)]


def test_no_carrier_configured_is_503() -> None:
    rig = Rig(carriers=())
    call_ids = list(rig.ctl.calls)
    with pytest.raises(LookupError):
        rig.invite()
    assert call_ids == [] and rig.listener.events == [("ended", 503, EndReason.NO_CARRIER)]


def test_an_incoming_call_rings_the_pbx_and_a_pbx_timeout_is_480_for_the_carrier() -> None:
    rig = Rig(trusted=True)
    rig.admission.target = Target("pbx", Peer("udp", "192.0.2.10", 5070), "sip:+14155550100@192.0.2.10:5070")
    rig.admission.funding = Funding.NONE
    call, inbound = rig.invite()
    (leg,) = FakeUac.placed
    assert call.direction is Direction.INCOMING and leg.ruri == "sip:+14155550100@192.0.2.10:5070"
    assert leg.to_uri == "<sip:990500000001@sip.edge.test>"  # the SIP username in To (SPEC §4.3)
    rig.ctl.on_failure(leg, 408, None)  # type: ignore[arg-type]
    assert inbound.did[-1] == ("reject", 480, None)


def test_media_timeout_hangs_up_with_a_reason() -> None:
    rig = Rig()
    call, inbound = rig.invite()
    leg = FakeUac.placed[0]
    rig.ctl.on_answer(leg, resp(200))  # type: ignore[arg-type]
    rig.ctl.on_media_event(1, call.id, "timeout")
    assert inbound.did[-1] == ("bye", 'SIP;cause=408;text="Media timeout"')
    assert rig.listener.events[-1] == ("ended", 200, EndReason.RTP_TIMEOUT)


OFFER = ("v=0\r\no=pbx 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
         "m=audio 6000 RTP/AVP 0\r\na=sendrecv\r\n")
ANSWER = OFFER.replace("192.0.2.10", "203.0.113.5").replace("6000", "7000")


def test_calls_that_fail_half_way_give_back_every_relay_port() -> None:
    """The controller with the real relay engine, four port pairs (two calls): each way a call
    can end before or after its relay exists, five times over, leaves no relay and no pair held."""
    from test_rtp_engine import free_window

    from edge._rtp import RelayEngine
    from edge.calls.media import CallMedia
    from edge.media import MediaService

    lo, _ = free_window(8)
    engine = RelayEngine("127.0.0.1", lo, lo + 7, quiet_period=0.0)

    def rig() -> Rig:
        r = Rig()
        r.ctl.media = CallMedia(MediaService(engine), 30.0)
        return r

    def bad_answer(r: Rig) -> None:  # the carrier's answer SDP cannot be anchored: 488
        r.invite(body=OFFER)
        r.ctl.on_answer(FakeUac.placed[0], resp(200, "v=0\r\n"))  # type: ignore[arg-type]

    def all_carriers_fail(r: Rig) -> None:
        r.invite(body=OFFER)
        r.ctl.on_failure(FakeUac.placed[0], 503, resp(503))  # type: ignore[arg-type]
        r.ctl.on_failure(FakeUac.placed[1], 503, resp(503))  # type: ignore[arg-type]

    def bad_offer(r: Rig) -> None:  # the relay is open when the offer turns out unusable
        with pytest.raises(LookupError):
            r.invite(body="v=0\r\n")

    def cancelled_while_ringing(r: Rig) -> None:
        call, inbound = r.invite(body=OFFER)
        r.ctl.on_progress(FakeUac.placed[0], resp(180))  # type: ignore[arg-type]
        r.ctl.on_cancel(inbound)  # type: ignore[arg-type]

    def answered_then_bye(r: Rig) -> None:
        call, inbound = r.invite(body=OFFER)
        r.ctl.on_answer(FakeUac.placed[0], resp(200, ANSWER))  # type: ignore[arg-type]
        r.ctl.on_bye(inbound)  # type: ignore[arg-type]

    try:
        for end in (bad_answer, all_carriers_fail, bad_offer, cancelled_while_ringing, answered_then_bye):
            for _ in range(5):
                r = rig()
                end(r)
                assert not r.ctl.calls and r.listener.events[-1][0] == "ended", end.__name__
                assert engine.active_relays == 0 and engine.free_pairs == 4, end.__name__
        # no pair left for a third call: 503, and the two calls' pairs come back when they end
        held = [rig() for _ in range(2)]
        legs = []
        for r in held:
            r.invite(body=OFFER)
            legs.append(FakeUac.placed[-1])
        third = rig()
        with pytest.raises(LookupError):
            third.invite(body=OFFER)
        assert third.listener.events == [("ended", 503, EndReason.NO_MEDIA_PORTS)] and engine.free_pairs == 0
        for r, leg in zip(held, legs, strict=True):
            r.ctl.on_failure(leg, 486, resp(486))  # type: ignore[arg-type]
        assert engine.active_relays == 0 and engine.free_pairs == 4
    finally:
        engine.stop()


# ------------------------------------------------------------------ a cluster node (docs/cluster.md)

class ClusterAdmission(FakeAdmission):
    """Admission of a cluster node: the journal's verdict comes when ``answer`` is set."""

    def __init__(self, verdict: Reject | None) -> None:
        super().__init__()
        self.cluster = object()     # type: ignore[assignment]
        self.verdict = verdict
        self.answer = asyncio.Event()
        self.unseized: list[tuple[str, bool]] = []

    async def reserve_in_cluster(self, a: Attempt, live: LiveCall) -> Reject | None:
        await self.answer.wait()
        return self.verdict

    def unseize(self, live: LiveCall, *, reserved: bool) -> None:
        self.unseized.append((live.call_id, reserved))


def cluster_invite(verdict: Reject | None, *, cancel_first: bool = False) -> tuple[Rig, ClusterAdmission, FakeTx]:
    async def run() -> tuple[Rig, ClusterAdmission, FakeTx]:
        rig = Rig()
        admission = rig.ctl.admission = rig.admission = ClusterAdmission(verdict)  # type: ignore[assignment]
        tx = FakeTx(invite_text())
        rig.ctl.on_invite(tx)  # type: ignore[arg-type]
        assert not rig.ctl.calls and rig.ctl.reserving == 1      # no call before the journal said yes
        if cancel_first:
            tx.respond(487)     # what the core does with a CANCEL of an INVITE nobody owns yet
        admission.answer.set()
        while rig.ctl.reserving:
            await asyncio.sleep(0)
        return rig, admission, tx

    return asyncio.run(run())


def test_a_cluster_node_starts_the_call_once_the_journal_reserved_its_channel() -> None:
    rig, admission, tx = cluster_invite(None)
    assert len(rig.ctl.calls) == 1 and len(FakeUac.placed) == 1
    assert admission.unseized == [] and tx.responses == []


def test_a_channel_the_journal_refuses_is_given_back_and_answered() -> None:
    busy = Reject("channels", 486, "all 2 channels of the profile are in use")
    rig, admission, tx = cluster_invite(busy)
    assert not rig.ctl.calls and not FakeUac.placed
    assert tx.responses[0][0] == 486 and admission.unseized[0][1] is False     # nothing landed to settle
    down = Reject("cluster", 503, "the cluster did not confirm a channel", (("Retry-After", "5"),))
    rig, admission, tx = cluster_invite(down)
    assert tx.responses[0][0] == 503 and ("Retry-After", "5") in tx.responses[0][1]
    assert admission.unseized[0][1] is True        # it may have landed: the outbox settles it


def test_a_cancel_while_the_journal_is_asked_starts_no_call_and_settles_the_reservation() -> None:
    rig, admission, tx = cluster_invite(None, cancel_first=True)
    assert not rig.ctl.calls and not FakeUac.placed
    assert [status for status, _ in tx.responses] == [487]
    assert admission.unseized[0][1] is True

