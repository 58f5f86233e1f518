"""RFC 3261 §17 state machines with shrunken timers (T1 = 10 ms) and a recording transport."""

from __future__ import annotations

import asyncio
import itertools

from sipfakes import FakeLoop

from edge.sip import parse
from edge.sip.metrics import SipMetrics
from edge.sip.request import OutRequest
from edge.sip.transaction import State, TransactionLayer
from edge.sip.transport import Peer

T1 = 0.01
PEER = Peer("udp", "127.0.0.9", 5060)


class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[float, bytes]] = []

    def send(self, data: bytes, dest: Peer, on_failure: object = None) -> None:
        self.sent.append((asyncio.get_running_loop().time(), data))

    def first_lines(self) -> list[str]:
        return [d.split(b"\r\n", 1)[0].decode() for _, d in self.sent]


class TU:
    def __init__(self) -> None:
        self.requests, self.acks, self.cancels, self.strays = [], [], [], []

    def on_request(self, tx) -> None:
        self.requests.append(tx)

    def on_ack(self, msg, peer) -> None:
        self.acks.append(msg)

    def on_cancel(self, invite, cancel) -> None:
        self.cancels.append(invite)

    def on_stray_response(self, msg, peer) -> None:
        self.strays.append(msg)


def layer() -> tuple[TransactionLayer, Wire, TU]:
    wire, tu = Wire(), TU()
    tl = TransactionLayer(wire, tu, SipMetrics(None), asyncio.get_running_loop(), t1=T1, t2=4 * T1, t4=5 * T1)
    return tl, wire, tu


def out_request(method: str = "INVITE") -> OutRequest:
    return OutRequest(method, "sip:+4420@127.0.0.9", proto="udp", via_host="127.0.0.1:5060",
                      from_="<sip:edge@127.0.0.1>;tag=abc", to="<sip:+4420@127.0.0.9>", call_id="cid-1", cseq=1)


def response_to(req: OutRequest, status: int, to_tag: str = "callee") -> bytes:
    return (f"SIP/2.0 {status} X\r\nVia: {req.via}\r\nFrom: {req.from_}\r\nTo: {req.to};tag={to_tag}\r\n"
            f"Call-ID: {req.call_id}\r\nCSeq: {req.cseq} {req.method}\r\nContent-Length: 0\r\n\r\n").encode()


def incoming(method: str, branch: str = "z9hG4bKin1", to_tag: str | None = None,
             cseq_method: str | None = None) -> bytes:
    to = "<sip:b@edge>" + (f";tag={to_tag}" if to_tag else "")
    return (f"{method} sip:b@edge SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.9:5060;branch={branch}\r\n"
            f"From: <sip:a@pbx>;tag=ft\r\nTo: {to}\r\nCall-ID: in-1\r\nCSeq: 1 {cseq_method or method}\r\n"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


def test_invite_client_retransmits_with_timer_a_then_times_out() -> None:
    async def run() -> None:
        tl, wire, _ = layer()
        timed_out = asyncio.Event()
        tl.send_request(out_request(), PEER, on_response=lambda m: None, on_timeout=timed_out.set)
        await asyncio.wait_for(timed_out.wait(), 2)
        times = [t - wire.sent[0][0] for t, _ in wire.sent]
        # sent at 0, T1, 3T1, 7T1, 15T1, 31T1 (and 63T1 unless Timer B at 64T1 wins the race
        # on a loaded machine): Timer A doubles until Timer B
        assert len(times) in (6, 7)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for i, gap in enumerate(gaps):
            assert gap >= (2 ** i) * T1 * 0.9, gaps  # doubling (timers never fire early)
        assert not tl.client

    asyncio.run(run())


def test_non_invite_client_caps_retransmissions_at_t2() -> None:
    async def run() -> None:
        tl, wire, _ = layer()
        done = asyncio.Event()
        tl.send_request(out_request("OPTIONS"), PEER, on_response=lambda m: None, on_timeout=done.set)
        await asyncio.wait_for(done.wait(), 2)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(wire.sent)]
        assert max(gaps) < 4 * T1 + 0.05  # never much more than T2 apart (timers may fire late under load)
        assert len(wire.sent) > 12

    asyncio.run(run())


def test_invite_client_acks_a_failure_once_and_again_on_retransmission() -> None:
    async def run() -> None:
        tl, wire, _ = layer()
        seen = []
        req = out_request()
        tx = tl.send_request(req, PEER, on_response=seen.append, on_timeout=lambda: None)
        tl.on_message(parse(response_to(req, 180)), PEER)
        tl.on_message(parse(response_to(req, 486)), PEER)
        tl.on_message(parse(response_to(req, 486)), PEER)  # retransmitted by the callee
        acks = [d for _, d in wire.sent if d.startswith(b"ACK ")]
        assert len(acks) == 2
        ack = parse(acks[0])
        assert ack.branch == req.branch and ack.to_tag == "callee" and ack.cseq == 1
        assert [m.status for m in seen] == [180, 486]  # the TU hears the final once
        assert tx.state is State.COMPLETED

    asyncio.run(run())


def test_cancel_waits_for_a_provisional() -> None:
    async def run() -> None:
        tl, wire, _ = layer()
        req = out_request()
        tx = tl.send_request(req, PEER, on_response=lambda m: None, on_timeout=lambda: None)
        tx.cancel("SIP;cause=487")
        assert not any(d.startswith(b"CANCEL") for _, d in wire.sent)
        tl.on_message(parse(response_to(req, 100)), PEER)
        cancels = [parse(d) for _, d in wire.sent if d.startswith(b"CANCEL")]
        assert len(cancels) == 1 and cancels[0].branch == req.branch and cancels[0].header("Reason")

    asyncio.run(run())


def test_2xx_goes_to_the_tu_each_time() -> None:
    async def run() -> None:
        tl, wire, _ = layer()
        seen = []
        req = out_request()
        tl.send_request(req, PEER, on_response=seen.append, on_timeout=lambda: None)
        tl.on_message(parse(response_to(req, 200)), PEER)
        tl.on_message(parse(response_to(req, 200)), PEER)
        assert [m.status for m in seen] == [200, 200]  # the TU ACKs each 2xx (§13.2.2.4)
        assert not any(d.startswith(b"ACK") for _, d in wire.sent)

    asyncio.run(run())


def test_invite_server_sends_100_retransmits_final_until_ack() -> None:
    async def run() -> None:
        tl, wire, tu = layer()
        tl.on_message(parse(incoming("INVITE")), PEER)
        assert wire.first_lines() == ["SIP/2.0 100 Trying"]
        tx = tu.requests[0]
        tl.on_message(parse(incoming("INVITE")), PEER)  # retransmission: absorbed, answered
        assert len(tu.requests) == 1 and wire.first_lines()[-1] == "SIP/2.0 100 Trying"
        tx.respond(486, to_tag="t1")
        await asyncio.sleep(8 * T1)
        finals = [ln for ln in wire.first_lines() if ln.startswith("SIP/2.0 486")]
        assert len(finals) >= 3  # Timer G
        tl.on_message(parse(incoming("ACK", to_tag="t1", cseq_method="ACK")), PEER)
        assert tx.state is State.CONFIRMED and tu.acks == []  # ACK to non-2xx stays in the transaction
        count = len(wire.sent)
        await asyncio.sleep(8 * T1)
        assert len(wire.sent) == count  # no more retransmissions after the ACK
        assert tx.state is State.TERMINATED

    asyncio.run(run())


def test_non_invite_server_answers_retransmissions_from_the_transaction() -> None:
    async def run() -> None:
        tl, wire, tu = layer()
        tl.on_message(parse(incoming("OPTIONS")), PEER)
        tu.requests[0].respond(200)
        tl.on_message(parse(incoming("OPTIONS")), PEER)
        assert len(tu.requests) == 1
        assert wire.first_lines() == ["SIP/2.0 200 OK", "SIP/2.0 200 OK"]
        assert wire.sent[0][1] == wire.sent[1][1]

    asyncio.run(run())


def test_cancel_matches_its_invite_or_gets_481() -> None:
    async def run() -> None:
        tl, wire, tu = layer()
        tl.on_message(parse(incoming("INVITE", branch="z9hG4bKc1")), PEER)
        tl.on_message(parse(incoming("CANCEL", branch="z9hG4bKc1")), PEER)
        assert tu.cancels == [tu.requests[0]] and wire.first_lines()[-1] == "SIP/2.0 200 OK"
        tl.on_message(parse(incoming("CANCEL", branch="z9hG4bKnone")), PEER)
        assert wire.first_lines()[-1].startswith("SIP/2.0 481")

    asyncio.run(run())


def test_ack_for_2xx_reaches_the_tu() -> None:
    async def run() -> None:
        tl, _, tu = layer()
        tl.on_message(parse(incoming("INVITE", branch="z9hG4bKa1")), PEER)
        tu.requests[0].respond(200, to_tag="t2")
        tl.on_message(parse(incoming("ACK", branch="z9hG4bKa2", to_tag="t2", cseq_method="ACK")), PEER)
        assert len(tu.acks) == 1

    asyncio.run(run())


def test_a_connection_that_cannot_be_made_times_the_request_out_at_once() -> None:
    """RFC 3261 §17.1.4: a refused TLS handshake (or TCP connect) is a transport error the
    transaction hears now, so the call fails over without waiting 64*T1 for Timer B."""
    class Refusing(Wire):
        def send(self, data: bytes, dest: Peer, on_failure=None) -> None:
            super().send(data, dest)
            assert on_failure is not None  # a reliable transport reports failures
            asyncio.get_running_loop().call_soon(on_failure)

    async def run() -> None:
        wire, tu = Refusing(), TU()
        tl = TransactionLayer(wire, tu, SipMetrics(None), asyncio.get_running_loop(), t1=10.0)  # Timer B: 640 s
        timed_out = asyncio.Event()
        tx = tl.send_request(out_request(), Peer("tls", "127.0.0.9", 5061), on_response=lambda m: None,
                             on_timeout=timed_out.set)
        await asyncio.wait_for(timed_out.wait(), 2)
        assert tx.state is State.TERMINATED and not tl.client
        assert len(wire.sent) == 1  # reliable: no retransmission
    asyncio.run(run())


# ---------------------------------------------------- timers of a fixed length (issue 10)

def fifo_layer() -> tuple[TransactionLayer, FakeLoop]:
    loop = FakeLoop()
    return TransactionLayer(Wire(), TU(), SipMetrics(None), loop, t1=0.5, t2=4.0, t4=5.0), loop


def test_fixed_length_timers_share_one_loop_timer_and_fire_in_order_at_most_t1_4_late() -> None:
    tl, loop = fifo_layer()
    start = loop.time()
    fired: list[tuple[str, float]] = []
    timers = {}
    for i in range(100):  # 100 Timer Bs (64*T1) and 100 Timer Ks (T4), 10 ms apart
        timers[f"b{i}"] = tl.after(32.0, lambda i=i: fired.append((f"b{i}", loop.time())))
        timers[f"k{i}"] = tl.after(5.0, lambda i=i: fired.append((f"k{i}", loop.time())))
        loop.advance(0.01)
    assert loop.pending == 1  # one sweep, not 200 loop timers
    timers["b7"].cancel()
    timers["k3"].cancel()
    loop.advance(40.0)
    names = [n for n, _ in fired]
    assert names == [f"k{i}" for i in range(100) if i != 3] + [f"b{i}" for i in range(100) if i != 7]
    for name, at in fired:
        due = start + int(name[1:]) * 0.01 + (32.0 if name[0] == "b" else 5.0)
        assert due <= at <= due + 0.5 / 4 + 1e-9, name
    assert loop.pending == 0  # nothing left: the sweep stops when its FIFOs are empty


def test_a_shorter_timer_added_under_an_armed_sweep_and_one_armed_by_a_timer_are_not_late() -> None:
    tl, loop = fifo_layer()
    start = loop.time()
    fired: dict[str, float] = {}
    tl.after(32.0, lambda: fired.setdefault("long", loop.time()))
    tl.after(5.0, lambda: fired.setdefault("short", loop.time()))  # the sweep was armed for +32 s

    def chain() -> None:  # a timer that arms a shorter one while the sweep runs
        fired["chain"] = loop.time()
        tl.after(5.0, lambda: fired.setdefault("chained", loop.time()))

    tl.after(32.0, chain)
    loop.advance(60.0)
    assert start + 5.0 <= fired["short"] <= start + 5.0 + 0.125
    assert start + 32.0 <= fired["long"] <= start + 32.0 + 0.125
    assert fired["chain"] + 5.0 <= fired["chained"] <= fired["chain"] + 5.0 + 0.125
    assert tl.after(1.5, lambda: None) is not None and loop.pending == 1  # other lengths: a loop timer
