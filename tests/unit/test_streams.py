"""The stream transports on real loopback sockets: ``SocketStream`` (TCP) and ``TlsStream``
(TLS through ``ssl.SSLObject`` and two ``MemoryBIO``s). The edge end runs on an asyncio loop;
the peer is a plain blocking socket in a thread, so what it sees is what a PBX would see.
Every wait is bounded; nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from tlscerts import TestCA

from edge.sip.metrics import SipMetrics
from edge.sip.tls import TlsContexts, TlsStream, failure_reason
from edge.sip.transport import STREAM_WRITE_LIMIT, SocketStream, stream_socket

pytestmark = pytest.mark.timeout(60)


class Recorder(asyncio.Protocol):
    """What a stream hands its protocol, in order."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.made = 0
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made += 1

    def data_received(self, data: bytes) -> None:
        self.reads.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


@pytest.fixture
def run() -> Iterator[Callable[..., object]]:
    loop = asyncio.new_event_loop()
    yield lambda coro: loop.run_until_complete(asyncio.wait_for(coro, 30))
    loop.close()


def pair() -> tuple[socket.socket, socket.socket]:
    """(the edge's end, non-blocking; the peer's end, blocking) of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname(), timeout=10)
        edge, _ = listener.accept()
    return stream_socket(edge), peer


def in_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """Run ``fn`` in a thread now; the returned callable joins it and gives its result (or raises)."""
    out: list[object] = []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()

    def join() -> object:
        thread.join(20)
        assert out, "the peer thread did not finish"
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]
    return join


def recv_all(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return bytes(got)


# ------------------------------------------------------------------ plain TCP

def test_what_the_kernel_does_not_take_is_sent_once_the_peer_reads(run) -> None:
    async def main() -> None:
        edge, peer = pair()
        edge.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        proto = Recorder()
        stream = SocketStream(asyncio.get_running_loop(), edge, proto, SipMetrics(CollectorRegistry()))
        stream.start()
        payload = bytes(range(256)) * 3072  # 768 KiB: more than the send and receive buffers hold
        for k in range(0, len(payload), 8192):
            stream.write(payload[k:k + 8192])
        assert stream._out, "the kernel took it all: the test does not test the queue"
        received = in_thread(lambda: recv_all(peer, len(payload)))
        while stream._out:
            await asyncio.sleep(0.01)
        assert received() == payload
        stream.close()
        assert await proto.lost is None
        assert peer.recv(1) == b""  # closed after the last byte
        peer.close()
    run(main())


def test_a_peer_that_does_not_read_is_cut_and_counted(run) -> None:
    async def main() -> None:
        edge, peer = pair()
        registry = CollectorRegistry()
        proto = Recorder()
        stream = SocketStream(asyncio.get_running_loop(), edge, proto, SipMetrics(registry))
        stream.start()
        chunk = b"x" * 65536
        for _ in range(2 * STREAM_WRITE_LIMIT // len(chunk) + 200):  # kernel buffers, then the limit
            stream.write(chunk)
            if stream.is_closing():
                break
        assert stream.is_closing()
        await proto.lost
        assert registry.get_sample_value("edge_sip_transport_errors_total", {"kind": "tcp_write_full"}) == 1
        peer.close()
    run(main())


def test_reads_and_the_peers_close_reach_the_protocol(run) -> None:
    async def main() -> None:
        edge, peer = pair()
        proto = Recorder()
        SocketStream(asyncio.get_running_loop(), edge, proto, SipMetrics(CollectorRegistry())).start()
        peer.sendall(b"OPTIONS sip:a SIP/2.0\r\n")
        peer.close()
        assert await proto.lost is None
        assert proto.made == 1 and b"".join(proto.reads) == b"OPTIONS sip:a SIP/2.0\r\n"
    run(main())


# ------------------------------------------------------------------ TLS

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestCA, TlsContexts]:
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    cert, key, _ = ca.issue("edge", ips=("127.0.0.1",))
    return ca, TlsContexts(str(cert), str(key), str(ca.path))


def bio_client(peer: socket.socket, ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A client handshake over ``peer`` with an SSLObject, so that the test decides what goes
    out in one ``send`` (several records at once)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            peer.sendall(outgoing.read())
            data = peer.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake") from None
            incoming.write(data)
        except ssl.SSLError:
            peer.sendall(outgoing.read())  # the alert that tells the edge why
            raise
    peer.sendall(outgoing.read())
    return obj, incoming, outgoing


def read_plain(peer: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO) -> bytes:
    """The next application data from the edge; b"" at its close_notify."""
    while True:
        try:
            return obj.read(65536)
        except ssl.SSLWantReadError:
            data = peer.recv(65536)
            if not data:
                raise ConnectionError("closed without a close_notify") from None
            incoming.write(data)


def test_records_sent_together_are_delivered_one_by_one_and_close_sends_close_notify(run, certs) -> None:
    ca, contexts = certs
    messages = [b"REGISTER sip:a SIP/2.0\r\n\r\n", b"\r\n\r\n", b"OPTIONS sip:a SIP/2.0\r\n\r\n"]

    async def main() -> None:
        edge, peer = pair()
        proto = Recorder()
        outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        stream = TlsStream(asyncio.get_running_loop(), edge, proto, SipMetrics(CollectorRegistry()),
                           contexts.for_listener("customer"), server_side=True, on_handshake=outcome.set_result)
        stream.start()

        def client() -> tuple[bytes, str]:
            obj, incoming, outgoing = bio_client(peer, ssl.create_default_context(cafile=str(ca.path)))
            for m in messages:
                obj.write(m)
            peer.sendall(outgoing.read())  # three records in one send
            answer = read_plain(peer, obj, incoming)
            return answer, "close_notify" if read_plain(peer, obj, incoming) == b"" else "more data"
        result = in_thread(client)
        assert await outcome is None
        while len(proto.reads) < len(messages):
            await asyncio.sleep(0.01)
        assert proto.made == 1 and proto.reads == messages
        stream.write(b"SIP/2.0 200 OK\r\n\r\n")
        stream.close()
        assert await proto.lost is None
        assert result() == (b"SIP/2.0 200 OK\r\n\r\n", "close_notify")
        peer.close()
    run(main())


def test_a_client_that_refuses_the_certificate_ends_the_handshake_with_its_reason(run, certs, tmp_path: Path) -> None:
    _, contexts = certs
    stranger = TestCA(tmp_path / "other", name="another CA")

    async def main() -> None:
        edge, peer = pair()
        proto = Recorder()
        outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        TlsStream(asyncio.get_running_loop(), edge, proto, SipMetrics(CollectorRegistry()),
                  contexts.for_listener("customer"), server_side=True, on_handshake=outcome.set_result).start()
        client = in_thread(lambda: bio_client(peer, ssl.create_default_context(cafile=str(stranger.path))))
        exc = await outcome
        with pytest.raises(ssl.SSLCertVerificationError):
            client()
        assert exc is not None and failure_reason(exc) == "peer_refused"
        assert proto.made == 0
        await proto.lost
        peer.close()
    run(main())


def test_clear_text_on_a_tls_stream_is_a_protocol_failure_and_the_peer_gets_an_alert(run, certs) -> None:
    _, contexts = certs

    async def main() -> None:
        edge, peer = pair()
        proto = Recorder()
        outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        TlsStream(asyncio.get_running_loop(), edge, proto, SipMetrics(CollectorRegistry()),
                  contexts.for_listener("customer"), server_side=True, on_handshake=outcome.set_result).start()
        peer.sendall(b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 0\r\n\r\n")
        exc = await outcome
        assert exc is not None and failure_reason(exc) == "protocol"
        reply = in_thread(lambda: recv_all(peer, 1 << 16))()
        assert isinstance(reply, bytes) and b"SIP" not in reply  # an alert record or nothing, never SIP
        await proto.lost
        peer.close()
    run(main())
