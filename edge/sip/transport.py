"""SIP over UDP, TCP and TLS on asyncio (RFC 3261 §18, RFC 3581; TLS in ``tls.py``).

This is the one boundary where bytes from the network become ``SipMessage``s
(STYLE.md, docs/sip.md "The boundary"): ``parse()`` then ``SipMessage.validate()``, so
the layers above never meet a parse error. A bad request whose Via/From/To/Call-ID/CSeq
can be recovered gets a stateless ``400 <reason>`` (or the error's own status: 416,
483, 505 ...); anything else -- every bad response, every bad ACK -- is dropped; both
are counted in ``edge_sip_parse_errors_total{reason}``. Nothing raised here reaches the
loop, and an unexpected exception is logged with its traceback at most once per
``ThrottledLog`` interval.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from edge.logs import ThrottledLog

from . import SipMessage, SipParseError, build_stateless_error, frame_length, parse, skip_keepalive
from .metrics import SipMetrics

if TYPE_CHECKING:
    from .tls import TlsContexts

log = logging.getLogger("sipedge.sip")

UDP_MAX = 65535
UDP_SOCKET_BUFFER = 4 << 20        # bytes; the kernel caps it at net.core.rmem_max
UDP_BURST = 64                     # datagrams read per readiness event
TCP_READ_LIMIT = 256 * 1024       # bytes buffered per connection before it is cut
TCP_IDLE_SECONDS = 3600.0         # an idle connection (no message, no keep-alive) is closed
TCP_HEADER_SECONDS = 10.0         # defaults of [sip] tcp_header_timeout / tcp_body_timeout
TCP_BODY_SECONDS = 10.0
STREAM_READ = 65536                # bytes asked of the kernel per recv on a stream
STREAM_BURST = 4                   # recvs per readiness event, while each one fills the buffer
STREAM_WRITE_LIMIT = 1 << 20       # bytes queued for a peer that does not read before it is cut
ACCEPT_BURST = 64                  # connections accepted per readiness event of a listener


class Peer(NamedTuple):
    """Where a message came from, or where one goes: transport, address, connection, side.

    ``side`` is the network side (SPEC §2.1) of the listener a message arrived on, or the
    side a message goes toward: ``"customer"``, ``"carrier"``, or ``""`` when one listener
    serves both sides (the single-interface configuration).
    """

    proto: str                               # "udp" | "tcp" | "tls"
    host: str
    port: int
    conn: TcpConnection | None = None      # the TCP or TLS connection it arrived on
    side: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.proto}:{host}:{self.port}"


BOTH = ""                                    # a listener of both sides


OnMessage = Callable[[SipMessage, Peer], None]
MayAnswer = Callable[[str], bool]  # may the edge answer this source (flood protection)?


def _reason_label(err: SipParseError) -> str:
    return type(err).__name__.removeprefix("Sip")


class SipUdp:
    """A UDP listener read straight from its socket: one wake-up drains a burst.

    asyncio's DatagramProtocol costs an event-loop iteration per datagram; SIP load
    arrives in bursts, so the reader takes up to ``UDP_BURST`` datagrams per readiness
    event, and sends go to the non-blocking socket directly (docs/sip.md has the figures).
    """

    def __init__(self, layer: Transports, sock: socket.socket, side: str = BOTH) -> None:
        self.layer = layer
        self.sock = sock
        self.side = side
        self.closed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        recvfrom = self.sock.recvfrom
        received = self.layer.received
        side = self.side
        for _ in range(UDP_BURST):
            try:
                data, addr = recvfrom(UDP_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable from an earlier send, and friends
                self.layer.metrics.transport_errors.labels("udp").inc()
                continue
            received(data, Peer("udp", addr[0], addr[1], None, side), self)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.layer.metrics.transport_errors.labels("udp_send_full").inc()  # 4 MiB buffer full
        except OSError:
            self.layer.metrics.transport_errors.labels("udp_send").inc()

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not self.closed:
            self.closed = True
            try:
                (loop or asyncio.get_event_loop()).remove_reader(self.sock.fileno())
            except (ValueError, RuntimeError):
                pass
            self.sock.close()


_read_buffer = bytearray(STREAM_READ)  # every stream of the thread recvs into it, one at a time
_read_view = memoryview(_read_buffer)


class SocketStream:
    """The transport under a :class:`TcpConnection`: its non-blocking socket, read and written
    directly from the loop's readiness callbacks, as :class:`SipUdp` reads its datagrams.

    asyncio's socket transport costs a layer of Python per read and per write for flow control
    and buffering that SIP does not use; here a read is one ``recv_into`` of a buffer shared by
    every stream, and a write goes to ``socket.send`` at once. Only what the kernel does not
    take is kept, sent when the socket is writable again; a peer that stops reading is cut
    after ``STREAM_WRITE_LIMIT`` bytes (``edge_sip_transport_errors_total{kind="tcp_write_full"}``).
    The protocol sees what an asyncio transport shows it: ``connection_made``, ``data_received``
    (each read as one ``bytes``), ``connection_lost`` (soon after :meth:`close`, once what was
    written before has been sent).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.Protocol,
                 metrics: SipMetrics) -> None:
        self._loop = loop
        self.sock = sock
        self.protocol = protocol
        self.metrics = metrics
        self._fd = sock.fileno()
        self._extra = {"peername": sock.getpeername(), "sockname": sock.getsockname(), "socket": sock}
        self._out = bytearray()          # what the kernel did not take yet
        self._reading = False
        self._closing = False            # close() was called: nothing more is read, the rest is sent
        self._lost = False               # the socket is closed and connection_lost is scheduled

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._extra.get(name, default)

    def start(self) -> None:
        """Hand the connection to its protocol and read from now on."""
        self.protocol.connection_made(self)  # type: ignore[arg-type]
        if not self._closing:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True

    def _readable(self) -> None:
        for _ in range(STREAM_BURST):
            try:
                n = self.sock.recv_into(_read_buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # reset by the peer, and friends
                self.abort(exc)
                return
            if n == 0:
                self._eof()
                return
            self._received(_read_view[:n])
            if n < STREAM_READ or self._closing:  # the kernel had no more: no read that would fail
                return

    def _received(self, data: memoryview) -> None:
        self.protocol.data_received(bytes(data))

    def _eof(self) -> None:
        """The peer closed its end: what is still queued for it is sent, then the socket closes."""
        self.close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost or not data:
            return
        if self._out:  # earlier bytes are still waiting: these go after them
            self._queue(data)
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self.abort(exc)
            return
        if n < len(data):
            self._queue(memoryview(data)[n:])
            if not self._lost:
                self._loop.add_writer(self._fd, self._writable)

    def _queue(self, data: bytes | bytearray | memoryview) -> None:
        if len(self._out) + len(data) > STREAM_WRITE_LIMIT:
            self.metrics.transport_errors.labels("tcp_write_full").inc()
            self.abort(None)
            return
        self._out += data

    def _writable(self) -> None:
        try:
            n = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.abort(exc)
            return
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._finish(None)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Read no more; close once what was written has been sent."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._out:
            self._finish(None)

    def abort(self, exc: Exception | None) -> None:
        """Close now, dropping what was not sent."""
        self._closing = True
        self._stop_reading()
        self._finish(exc)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _finish(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._out:
            self._out.clear()
            self._loop.remove_writer(self._fd)
        self.sock.close()
        self._loop.call_soon(self.protocol.connection_lost, exc)


def stream_socket(sock: socket.socket) -> socket.socket:
    """An accepted or connected TCP socket as the streams use it: non-blocking, no Nagle delay
    (a SIP message is written whole and its answer is awaited)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class StreamListener:
    """A TCP (or, with ``tls.TlsListener``, TLS) listening socket: each readiness event accepts
    up to ``ACCEPT_BURST`` connections, each one a :class:`TcpConnection` on a :class:`SocketStream`."""

    def __init__(self, layer: Transports, sock: socket.socket, side: str) -> None:
        self.layer = layer
        self.sock = sock
        self.side = side
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._acceptable)

    def _acceptable(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors (EMFILE), a connection reset before accept, ...
                self.layer.metrics.transport_errors.labels("tcp_accept").inc()
                return
            try:
                self.accepted(stream_socket(sock))
            except OSError:  # gone between accept and getpeername
                sock.close()

    def accepted(self, sock: socket.socket) -> None:
        assert self._loop is not None
        SocketStream(self._loop, sock, TcpConnection(self.layer, side=self.side), self.layer.metrics).start()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        self.sock.close()


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (what ``loop.create_server`` would make)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"error while attempting to bind on address {(host, port)!r}: "
                                     f"{exc.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def connected_socket(host: str, port: int, local_addr: tuple[str, int] | None) -> socket.socket:
    """A TCP connection to ``host``:``port`` (its addresses tried in turn), ready for a stream.

    :raises OSError: no address could be reached.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if local_addr is not None:
                sock.bind(local_addr)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return stream_socket(sock)
    raise error


class ReadPhase(enum.Enum):
    """Where a TCP connection is in reading its next message; each phase has a deadline."""

    IDLE = "idle"  # between messages: closed after TCP_IDLE_SECONDS without a message or ping
    HEAD = "head"  # a message has begun: its empty line must come within tcp_header_timeout
    BODY = "body"  # the head is complete: Content-Length octets must come within tcp_body_timeout


class TcpConnection(asyncio.Protocol):
    """One TCP connection: frames messages by Content-Length (RFC 3261 §18.3).

    Read deadlines (Kamailio ``tcp_msg_read_timeout``): a message must complete in time
    from its first octet, its head within ``tcp_header_timeout`` and then its body within
    ``tcp_body_timeout``, else the connection is closed and counted
    (``edge_sip_parse_errors_total{reason="TcpReadTimeout"}``). Only a complete message
    or a CRLFCRLF ping restarts the idle timeout -- not the octets of an incomplete
    message, so a peer dribbling a byte at a time cannot hold a connection slot. One
    timer per connection: a later deadline only moves ``_deadline``, and the timer, when
    it fires early, sleeps again until it.
    """

    proto = "tcp"  # the Peer transport of its messages (tls.TlsConnection: "tls")

    def __init__(self, layer: Transports, outbound_key: tuple[str, int] | None = None, side: str = BOTH) -> None:
        self.layer = layer
        self.side = side
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.outbound_key = outbound_key
        self.closed = False
        self.phase = ReadPhase.IDLE
        self._deadline = 0.0                           # loop time when the current phase expires
        self._timer: asyncio.TimerHandle | None = None  # fires at or before _deadline
        self._scanned = 0                              # octets of buf searched for the end of the head
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it runs on, from connection_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = Peer(self.proto, host, port, self, self.side)
        if not self.layer.admit(self):
            self.layer.metrics.transport_errors.labels("tcp_limit").inc()
            transport.close()
            return
        self._enter(ReadPhase.IDLE)

    def _enter(self, phase: ReadPhase) -> None:
        """Start ``phase`` now: its deadline counts from this moment."""
        loop = self._loop or asyncio.get_running_loop()
        self.phase = phase
        self._deadline = loop.time() + self.layer.read_timeouts[phase]
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(self._deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline - 0.001:  # the phase moved on since the timer was set
            self._timer = loop.call_at(self._deadline, self._expire)
            return
        if self.phase is not ReadPhase.IDLE:
            self.layer.metrics.parse_errors.labels("TcpReadTimeout").inc()
            log.debug("closing a TCP connection: message incomplete", extra={
                "event": "tcp_read_timeout", "source": str(self.peer), "phase": self.phase.value,
                "buffered": len(self.buf)})
        self.close()

    def _read_done(self, progressed: bool) -> None:
        """After a read: move the phase (and its deadline) on, only when it really changed."""
        pos = skip_keepalive(self.buf)
        if pos >= len(self.buf):  # nothing of a message is waiting
            if progressed:  # a complete message or a ping: the idle timeout restarts
                self._enter(ReadPhase.IDLE)
            return
        if progressed or self.phase is ReadPhase.IDLE:  # the first octets of a new message
            self._scanned = pos
            self._enter(ReadPhase.HEAD)
        if self.phase is ReadPhase.HEAD:
            start = max(pos, self._scanned - 2)  # only new octets (and a line end cut in two)
            self._scanned = len(self.buf)
            if self.buf.find(b"\n\r\n", start) >= 0 or self.buf.find(b"\n\n", start) >= 0:
                self._enter(ReadPhase.BODY)

    def data_received(self, data: bytes) -> None:
        if not self.buf and len(data) <= TCP_READ_LIMIT:
            # The usual read: nothing buffered, and the read is one whole message. It goes up
            # as it came, without a copy through the buffer; anything else takes the general path.
            try:
                whole = frame_length(data) == len(data)
            except Exception:  # the general path below answers it (or counts a framing bug)
                whole = False
            if whole:
                self.layer.received(data, self.peer, self)  # type: ignore[arg-type]
                if self.closed:
                    return
                if self.phase is ReadPhase.IDLE and self._timer is not None and self._loop is not None:
                    # A complete message: the idle timeout restarts. From idle to idle the deadline
                    # only moves later, so the timer (never later than the deadline) stays as it is.
                    self._deadline = self._loop.time() + self.layer.idle_seconds
                else:
                    self._enter(ReadPhase.IDLE)
                return
        self.buf += data
        if len(self.buf) > TCP_READ_LIMIT:
            self.layer.metrics.parse_errors.labels("StreamOverflow").inc()
            self.close()
            return
        progressed = False
        while self.buf and not self.closed:
            try:
                n = frame_length(self.buf)
            except SipParseError as err:
                # The stream cannot be resynchronised after a bad head: answer if we can, then close.
                self.layer.received(bytes(self.buf), self.peer, self, framing_error=err)  # type: ignore[arg-type]
                self.close()
                return
            except Exception as exc:  # a framing bug: this stream is lost, the edge is not
                self.layer.metrics.parse_errors.labels("InternalError").inc()
                self.layer.metrics.internal_errors.inc()
                self.layer.errors.exception(exc, "framing failed on a stream from %s", self.peer)
                self.close()
                return
            if n == 0:
                # RFC 5626 §4.4.1: a CRLFCRLF "ping" gets a CRLF "pong".
                if self.buf.startswith(b"\r\n\r\n"):
                    del self.buf[:4]
                    self.write(b"\r\n")
                    progressed = True
                    continue
                break
            frame = bytes(self.buf[:n])
            del self.buf[:n]
            progressed = True  # n > 0: a whole head was found, so the frame is never only CR/LF
            self.layer.received(frame, self.peer, self)  # type: ignore[arg-type]
        if not self.closed:
            self._read_done(progressed)

    def write(self, data: bytes) -> bool:
        if self.closed or self.transport is None:
            return False
        self.transport.write(data)
        return True

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.layer.forget(self)


class Transports:
    """The node's SIP sockets: UDP and TCP listeners and outbound TCP connections.

    :param on_message: called with every message that passed ``parse()`` and
        ``validate()``, and where it came from.
    :param may_answer: asked before a stateless error answer goes to a source, so a
        flood of malformed requests meets the same per-source limits as well-formed ones
        (``None``: always answer).
    :param tcp_header_timeout: seconds a TCP message's head may take from its first octet.
    :param tcp_body_timeout: seconds its body may take once the head is complete.
    """

    def __init__(self, on_message: OnMessage, metrics: SipMetrics, *, max_tcp_connections: int = 4096,
                 may_answer: MayAnswer | None = None, tcp_header_timeout: float = TCP_HEADER_SECONDS,
                 tcp_body_timeout: float = TCP_BODY_SECONDS, reuse_port: bool = False) -> None:
        self.on_message = on_message
        self.reuse_port = reuse_port    # the node's SIP workers share every listener (edge/sip/workers.py)
        # with several workers: (host, port) -> another worker's connection there, and who to tell
        # about ours as they open and close
        self.remote_tcp: Callable[[str, int], TcpConnection | None] | None = None
        self.on_tcp_change: Callable[[TcpConnection, bool], None] | None = None
        self.metrics = metrics
        self.may_answer = may_answer
        self.idle_seconds = TCP_IDLE_SECONDS
        self.read_timeouts = {ReadPhase.IDLE: TCP_IDLE_SECONDS, ReadPhase.HEAD: tcp_header_timeout,
                              ReadPhase.BODY: tcp_body_timeout}
        self.errors = ThrottledLog(log)     # tracebacks of unexpected exceptions, rate-limited
        self.max_tcp = max_tcp_connections
        self.udp: dict[str, SipUdp] = {}                    # by local host
        self.udp_default: SipUdp | None = None
        self.udp_toward: dict[tuple[str, int], SipUdp] = {}  # (side, family) -> the socket sending there
        self.tcp_servers: list[StreamListener] = []
        self.tcp_by_peer: dict[tuple[str, int], TcpConnection] = {}
        self.tcp_count = 0
        self.local: dict[str, tuple[str, int]] = {}         # proto -> advertised (host, port)
        self.local_of: dict[tuple[str, str, int], tuple[str, int]] = {}  # (side, proto, family) -> (host, port)
        self._pending: dict[tuple[str, int], asyncio.Task[TcpConnection | None]] = {}
        self.tls: TlsContexts | None = None                  # [tls] contexts; set before a tls: listen
        self.handshaking: set[SocketStream] = set()          # accepted TLS connections in their handshake

    async def listen(self, proto: str, host: str, port: int, side: str = BOTH) -> None:
        """Bind one listener of ``side`` (``BOTH``: a listener the two sides share)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sides = (side,) if side else ("customer", "carrier", BOTH)
        if proto == "udp":
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # absorb bursts instead of dropping them
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, UDP_SOCKET_BUFFER)
                except OSError:
                    pass
            try:
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            listener = SipUdp(self, sock, side)
            listener.start(loop)
            self.udp[host] = listener
            self.udp_default = self.udp_default or listener
            for s in sides:
                self.udp_toward.setdefault((s, family), listener)
        else:
            server: StreamListener
            if proto == "tls":
                from .tls import TlsListener

                if self.tls is None or side not in self.tls.server:
                    raise OSError(0, "a tls: listener needs [tls] cert and key")
                server = TlsListener(self, listening_socket(host, port, self.reuse_port), side)
            else:
                server = StreamListener(self, listening_socket(host, port, self.reuse_port), side)
            server.start(loop)
            self.tcp_servers.append(server)
        self.local.setdefault(proto, (host, port))
        for s in sides:
            self.local_of.setdefault((s, proto, family), (host, port))

    # ------------------------------------------------------------ receiving

    def received(self, data: bytes, peer: Peer, via: object, framing_error: SipParseError | None = None) -> None:
        """The boundary: ``data`` from ``peer`` becomes a checked message, or an answer or a drop.

        :param framing_error: the stream could not be framed (TCP): answer it if possible.
        """
        try:
            if framing_error is not None:
                raise framing_error
            msg = parse(data)
            msg.validate()  # every view the layers above read, decoded and checked once
        except SipParseError as err:
            self.refuse(data, peer, err)
            return
        except Exception as exc:  # a parser bug must not take the edge down
            self.metrics.parse_errors.labels("InternalError").inc()
            self.metrics.internal_errors.inc()
            self.errors.exception(exc, "parser failed on a message from %s", peer)
            return
        self.metrics.count_in(peer.proto, msg)
        try:
            self.on_message(msg, peer)
        except Exception as exc:
            self.metrics.internal_errors.inc()
            self.errors.exception(exc, "handling %s %s from %s failed", msg.method, msg.status or "", peer)

    def refuse(self, data: bytes, peer: Peer, err: SipParseError) -> None:
        """Count a bad message; answer it statelessly if it is a request that can be answered.

        The answer goes to the address and port the bytes came from (or over their TCP
        connection), never to the Via: a broken ``rport`` cannot be honoured (RFC 3581).
        Responses and ACKs are never answered (``build_stateless_error`` returns None).
        """
        self.metrics.parse_errors.labels(_reason_label(err)).inc()
        reply = build_stateless_error(data, err)  # None for responses, ACKs and unrecoverable requests
        if reply is None:
            return
        if self.may_answer is not None and not self.may_answer(peer.host):
            return  # a flooding or blocked source gets nothing, as for well-formed requests
        self._send_raw(reply, peer)
        self.metrics.count_out(peer.proto, "", err.status)

    def admit(self, conn: TcpConnection) -> bool:
        if self.tcp_count >= self.max_tcp:
            return False
        self.tcp_count += 1
        assert conn.peer is not None
        self.tcp_by_peer[(conn.peer.host, conn.peer.port)] = conn
        if self.on_tcp_change is not None:
            self.on_tcp_change(conn, True)
        return True

    def forget(self, conn: TcpConnection) -> None:
        if conn.peer is not None and self.tcp_by_peer.get((conn.peer.host, conn.peer.port)) is conn:
            del self.tcp_by_peer[(conn.peer.host, conn.peer.port)]
            self.tcp_count -= 1
            if self.on_tcp_change is not None:
                self.on_tcp_change(conn, False)

    # -------------------------------------------------------------- sending

    def send(self, data: bytes, dest: Peer, on_failure: Callable[[], None] | None = None) -> None:
        """Send one message. TCP reuses the connection of ``dest`` (or any to that address),
        else opens one; UDP goes from the listener.

        :param on_failure: called when a connection for the message cannot be made (refused,
            timed out, a TLS handshake refused): RFC 3261 §17.1.4, the transaction learns of
            the transport error at once instead of waiting for Timer B/F.
        """
        self._send_raw(data, dest, on_failure)

    def _udp_toward(self, dest: Peer) -> SipUdp | None:
        """The socket of ``dest``'s side and address family: a message leaves from the side
        it goes toward (SPEC §2.1), an IPv6 peer is sent to from an IPv6 socket."""
        family = socket.AF_INET6 if ":" in dest.host else socket.AF_INET
        return self.udp_toward.get((dest.side, family)) or self.udp_toward.get((BOTH, family)) or self.udp_default

    def _send_raw(self, data: bytes, dest: Peer, on_failure: Callable[[], None] | None = None) -> None:
        if dest.proto == "udp":
            udp = self._udp_toward(dest)
            if udp is None or udp.closed:
                self.metrics.transport_errors.labels("udp_no_socket").inc()
                return
            udp.sendto(data, (dest.host, dest.port))
            return
        conn = (dest.conn if dest.conn is not None and not dest.conn.closed
                else self.tcp_by_peer.get((dest.host, dest.port)))
        if conn is None and self.remote_tcp is not None:   # held by another worker: written there
            conn = self.remote_tcp(dest.host, dest.port)
        if conn is not None and conn.proto == dest.proto and conn.write(data):
            return  # a message for TLS never leaves over a plain TCP connection to the same address
        asyncio.get_running_loop().create_task(
            self._connect_and_send(data, dest.host, dest.port, dest.side, dest.proto, on_failure))

    async def _connect_and_send(self, data: bytes, host: str, port: int, side: str = BOTH,
                                proto: str = "tcp", on_failure: Callable[[], None] | None = None) -> None:
        key = (host, port)
        task = self._pending.get(key)
        if task is None:
            task = self._pending[key] = asyncio.get_running_loop().create_task(self._connect(host, port, side, proto))
        conn = await task
        self._pending.pop(key, None)
        if conn is None or conn.proto != proto or not conn.write(data):
            self.metrics.transport_errors.labels(f"{proto}_connect").inc()
            if on_failure is not None:
                on_failure()

    async def _connect(self, host: str, port: int, side: str = BOTH, proto: str = "tcp") -> TcpConnection | None:
        """A new connection toward ``side``, from that side's TCP (or TLS) listener address."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        local = self.local_of.get((side, proto, family)) or self.local_of.get((side, "tcp", family))
        if proto == "tls":
            if self.tls is None:
                return None
            from .tls import connect

            return await connect(self, host, port, side, (local[0], 0) if local and side else None)
        try:
            sock = await asyncio.wait_for(
                connected_socket(host, port, (local[0], 0) if local and side else None), timeout=5.0)
        except (TimeoutError, OSError):
            return None
        conn = TcpConnection(self, (host, port), side)
        try:
            SocketStream(loop, sock, conn, self.metrics).start()
        except OSError:  # reset as it connected
            sock.close()
            return None
        return conn if not conn.closed else None

    def advertised(self, proto: str, side: str = BOTH, family: int = socket.AF_INET) -> tuple[str, int]:
        """The listener (host, port) of ``side`` for ``proto`` toward a peer of ``family``:
        what our Via and Contact name unless the side advertises another address. Only
        ``side``'s own listeners are candidates (best: same transport, then same family),
        so one side's address never stands in for the other's."""
        mine = [(key, where) for key, where in self.local_of.items() if key[0] == side]
        if not mine:
            return self.local.get(proto) or next(iter(self.local.values()))
        return max(mine, key=lambda item: (item[0][1] == proto, item[0][2] == family))[1]

    def close(self) -> None:
        for stream in list(self.handshaking):
            stream.abort(None)
        for udp in self.udp.values():
            udp.close()
        for server in self.tcp_servers:
            server.close()
        for conn in list(self.tcp_by_peer.values()):
            conn.close()
