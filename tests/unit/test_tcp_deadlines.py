"""TCP read deadlines (Kamailio ``tcp_msg_read_timeout``), on a fake clock: nothing here
waits for real time."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from edge.sip.metrics import SipMetrics
from edge.sip.transport import TCP_IDLE_SECONDS, ReadPhase, TcpConnection, Transports

OPTIONS = (b"OPTIONS sip:sip.edge.test SIP/2.0\r\nVia: SIP/2.0/TCP 192.0.2.7:5070;branch=z9hG4bKt1\r\n"
           b"Max-Forwards: 70\r\nFrom: <sip:a@sip.edge.test>;tag=1\r\nTo: <sip:sip.edge.test>\r\n"
           b"Call-ID: tcp-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
WITH_BODY = OPTIONS.replace(b"Content-Length: 0", b"Content-Length: 10") + b"0123456789"


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: asyncio.Protocol | None = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.closing = False

    def get_extra_info(self, name, default=None):
        return ("192.0.2.7", 5070) if name == "peername" else default

    def write(self, data) -> None:
        self.written += data

    def close(self) -> None:  # as asyncio does: connection_lost on the next loop iteration
        if not self.closing and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
        self.closing = True


class Clock:
    """A loop whose time we move by hand; counts the timers connections schedule."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 1000.0
        self.timers = 0
        self._call_at = loop.call_at
        loop.time = lambda: self.now  # type: ignore[method-assign]
        loop.call_at = self.call_at  # type: ignore[method-assign]

    def call_at(self, when, callback, *args, **kw):
        self.timers += 1
        return self._call_at(when, callback, *args, **kw)


@pytest.fixture
def env():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    clock = Clock(loop)
    registry = CollectorRegistry()
    got: list = []
    layer = Transports(lambda msg, peer: got.append(msg), SipMetrics(registry), tcp_header_timeout=10.0,
                       tcp_body_timeout=5.0)

    def run(fn):  # connection callbacks run inside the loop, as asyncio calls them
        async def main():
            return fn()
        return loop.run_until_complete(main())

    def timeouts() -> float:
        return registry.get_sample_value("edge_sip_parse_errors_total", {"reason": "TcpReadTimeout"}) or 0.0

    conn = TcpConnection(layer)
    transport = FakeTransport(conn)
    run(lambda: conn.connection_made(transport))
    yield clock, conn, transport, run, got, timeouts
    loop.close()
    asyncio.set_event_loop(None)


def test_a_byte_every_100_ms_does_not_keep_the_connection(env) -> None:
    clock, conn, transport, run, got, timeouts = env
    first = clock.now + 0.1
    for i in range(60):  # 6 s of dribble: never a complete head
        clock.now += 0.1
        run(lambda i=i: conn.data_received(OPTIONS[i:i + 1]))
    assert conn.phase is ReadPhase.HEAD and conn._deadline == pytest.approx(first + 10.0)
    assert clock.timers == 2  # one for the idle timeout, one when the message began: none per byte
    clock.now = first + 5.0
    run(lambda: None)  # the loop runs the timers that are due by now: none
    assert not transport.closing
    clock.now = first + 10.0
    run(lambda: None)  # the deadline passed: the connection's one timer fires
    assert transport.closing and timeouts() == 1 and got == []


def test_half_a_head_then_silence(env) -> None:
    clock, conn, transport, run, got, timeouts = env
    run(lambda: conn.data_received(OPTIONS[:40]))
    assert conn.phase is ReadPhase.HEAD
    clock.now += 10.0
    run(lambda: None)  # the deadline passed: the connection's one timer fires
    assert transport.closing and timeouts() == 1


def test_a_body_shorter_than_content_length(env) -> None:
    clock, conn, transport, run, got, timeouts = env
    run(lambda: conn.data_received(WITH_BODY[:-4]))  # head complete, 4 body octets missing
    assert conn.phase is ReadPhase.BODY
    body_deadline = conn._deadline
    clock.now += 3.0
    run(lambda: conn.data_received(WITH_BODY[-4:-2]))  # body octets do not extend it either
    assert conn._deadline == body_deadline
    clock.now = body_deadline
    run(lambda: None)  # the deadline passed: the connection's one timer fires
    assert transport.closing and timeouts() == 1 and got == []


def test_head_completed_byte_by_byte_across_reads(env) -> None:
    clock, conn, transport, run, got, timeouts = env
    split = WITH_BODY.index(b"\r\n\r\n") + 1  # the empty line arrives cut between two reads
    run(lambda: conn.data_received(WITH_BODY[:split]))
    assert conn.phase is ReadPhase.HEAD
    run(lambda: conn.data_received(WITH_BODY[split:split + 3]))
    assert conn.phase is ReadPhase.BODY


def test_complete_messages_and_pings_restart_the_idle_timeout_on_one_timer(env) -> None:
    clock, conn, transport, run, got, timeouts = env
    for _ in range(20):
        clock.now += 30.0
        run(lambda: conn.data_received(OPTIONS))
        assert conn.phase is ReadPhase.IDLE and conn._deadline == clock.now + TCP_IDLE_SECONDS
    clock.now += 30.0
    run(lambda: conn.data_received(b"\r\n\r\n"))  # RFC 5626 ping: a pong, and a fresh idle timeout
    assert transport.written == b"\r\n" and conn._deadline == clock.now + TCP_IDLE_SECONDS
    assert len(got) == 20 and clock.timers == 1  # the one idle timer, moved lazily
    clock.now = 1000.0 + TCP_IDLE_SECONDS  # the first idle deadline, long pushed back
    run(lambda: None)  # the timer fires early and sleeps again until the current deadline
    assert not transport.closing and clock.timers == 2 and conn.phase is ReadPhase.IDLE


def test_a_message_then_the_start_of_the_next(env) -> None:
    clock, conn, transport, run, got, timeouts = env
    run(lambda: conn.data_received(OPTIONS + OPTIONS[:30]))
    assert len(got) == 1 and conn.phase is ReadPhase.HEAD and conn._deadline == clock.now + 10.0
    clock.now += 4.0
    run(lambda: conn.data_received(OPTIONS[30:]))
    assert len(got) == 2 and conn.phase is ReadPhase.IDLE


def test_an_idle_connection_is_closed_without_counting_an_error(env) -> None:
    clock, conn, transport, run, got, timeouts = env
    run(lambda: conn.data_received(b"\r\n"))  # a lone CRLF is neither a message nor a ping
    clock.now += TCP_IDLE_SECONDS
    run(lambda: None)  # the deadline passed: the connection's one timer fires
    assert transport.closing and timeouts() == 0
    run(lambda: None)
    assert conn.closed and conn._timer is None


def test_every_way_a_message_can_arrive_delivers_the_same_message(env) -> None:
    """A read that is one whole message skips the buffer; every other read goes through it.
    Both paths must hand up the same messages and leave the connection in the same phase."""
    clock, conn, transport, run, got, timeouts = env
    run(lambda: conn.data_received(WITH_BODY))                    # one whole message: the short path
    run(lambda: conn.data_received(WITH_BODY + OPTIONS))          # two in one read
    run(lambda: conn.data_received(WITH_BODY[:50]))               # one split across reads
    run(lambda: conn.data_received(WITH_BODY[50:]))
    run(lambda: conn.data_received(b"\r\n" + OPTIONS))            # a stray CRLF before a message
    assert [m.raw.lstrip(b"\r\n") for m in got] == [WITH_BODY, WITH_BODY, OPTIONS, WITH_BODY, OPTIONS]
    assert [m.body for m in got if m.method == "OPTIONS" and m.raw.endswith(b"0123456789")] == [b"0123456789"] * 3
    assert conn.phase is ReadPhase.IDLE and not conn.buf and not transport.closing


def test_a_whole_read_without_content_length_is_answered_and_closes_the_stream(env) -> None:
    clock, conn, transport, run, got, timeouts = env
    run(lambda: conn.data_received(OPTIONS.replace(b"Content-Length: 0\r\n", b"")))
    assert got == [] and transport.written.startswith(b"SIP/2.0 400 ") and transport.closing
