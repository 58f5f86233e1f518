"""SIP over TLS (RFC 3261 §26.2, RFC 5630): contexts, handshakes and their failures, reload.

A TLS connection is a TCP connection (``transport.TcpConnection``: Content-Length framing,
read deadlines, RFC 5626 CRLF keep-alive) on a :class:`TlsStream`: the socket read and
written as for plain TCP (``transport.SocketStream``), with an ``ssl.SSLObject`` over two
``ssl.MemoryBIO``s in between -- OpenSSL does the TLS, Python only moves the bytes. The
handshake is driven here, so a failed one is counted in
``edge_tls_handshake_failures_total{side,reason}`` and logged with its reason, without a
traceback.

Contexts (docs/security.md):

- listeners: TLS 1.2 and 1.3 only, the ``[tls]`` cert/key. A listener of the carrier side
  asks for a client certificate (optional) and checks one that is presented against
  ``[tls] ca``: a carrier with an expired or unknown certificate is refused; a customer-side
  listener does not ask (PBXs authenticate with digest).
- toward carriers: the certificate chain against ``[tls] ca`` (the system's anchors when it
  is empty) and the host name of the carrier URI (``verify_carriers``); the edge's own
  cert/key when ``client_cert_carriers``.
- toward a PBX (a registered connection that was lost): encrypted but not verified -- the
  address comes from the PBX's authenticated REGISTER, and PBX certificates are rarely
  issued by a CA the edge knows.

A reload builds new contexts and swaps them in: new handshakes use the new certificate,
an established connection keeps the session it negotiated.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge.config import ConfigError

from .transport import BOTH, STREAM_READ, SocketStream, StreamListener, TcpConnection, connected_socket

if TYPE_CHECKING:
    from edge.config import TlsConfig

    from .metrics import SipMetrics
    from .transport import Transports

log = logging.getLogger("sipedge.tls")

TLS_PORT = 5061                    # RFC 3261 §19.1.2: the default port of sips: and transport=tls
HANDSHAKE_SECONDS = 10.0           # a handshake not done by then is cut (counted reason="timeout")
CONNECT_SECONDS = 5.0              # TCP connect toward a peer, before the handshake
REASONS = ("expired", "wrong_host", "untrusted", "no_certificate", "peer_refused", "protocol",
           "timeout", "closed", "other")


class TlsSetupError(ConfigError):
    """A ``[tls]`` file cannot be used; ``key`` names the config key at fault."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key


def transport_of(uri: object) -> str:
    """The transport a URI asks for: ``sips:`` means TLS (RFC 5630 §3.1.3), else its
    ``transport`` parameter, else UDP (RFC 3263 §4.1 without DNS)."""
    scheme = str(getattr(uri, "scheme", "sip")).lower()
    params = getattr(uri, "params", {}) or {}
    transport = (params.get("transport") or "").lower()
    if scheme == "sips":
        return "tls"
    return transport or "udp"


def default_port(proto: str) -> int:
    return TLS_PORT if proto == "tls" else 5060


# ------------------------------------------------------------ checking [tls]

def _read(key: str, path: str) -> bytes:
    if not path:
        raise TlsSetupError(key, "required by a tls: listener or a carrier with transport=tls")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsSetupError(key, f"cannot read {path}: {exc.strerror}") from None


def check_files(cert: str, key: str, ca: str, *, need_identity: bool) -> None:
    """Check the files of ``[tls]`` as a handshake would use them.

    :raises TlsSetupError: naming ``tls.cert``, ``tls.key`` or ``tls.ca``: unreadable, not PEM,
        an expired certificate, a key that is not the certificate's.
    """
    if need_identity:
        try:
            chain = x509.load_pem_x509_certificates(_read("tls.cert", cert))
        except ValueError:
            raise TlsSetupError("tls.cert", f"{cert} holds no PEM certificate") from None
        not_after = chain[0].not_valid_after_utc
        if not_after < datetime.datetime.now(datetime.UTC):
            raise TlsSetupError("tls.cert", f"{cert} expired on {not_after:%Y-%m-%d %H:%M} UTC")
        try:
            serialization.load_pem_private_key(_read("tls.key", key), password=None)
        except (ValueError, TypeError):
            raise TlsSetupError("tls.key", f"{key} holds no unencrypted PEM private key") from None
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            probe.load_cert_chain(cert, key)
        except ssl.SSLError:
            raise TlsSetupError("tls.key", f"{key} is not the private key of the certificate in {cert}") from None
    if ca:
        try:
            x509.load_pem_x509_certificates(_read("tls.ca", ca))
        except ValueError:
            raise TlsSetupError("tls.ca", f"{ca} holds no PEM certificate") from None


def check_tls_config(tls: TlsConfig, *, listeners: bool, carriers: bool) -> None:
    """config.validate's check of ``[tls]``: raises a ConfigError naming the key at fault."""
    check_files(tls.cert, tls.key, tls.ca, need_identity=listeners or (carriers and tls.client_cert_carriers))


# ------------------------------------------------------------ contexts

def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == 0 else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2   # RFC 8996: no TLS 1.0/1.1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


class TlsContexts:
    """The SSL contexts of a node, built from ``[tls]``; :meth:`reload` swaps them whole.

    :param cert: path of the edge's certificate chain ("" when no identity is configured).
    """

    def __init__(self, cert: str = "", key: str = "", ca: str = "", *, verify_carriers: bool = True,
                 client_cert_carriers: bool = False) -> None:
        self.server: dict[str, ssl.SSLContext] = {}
        self.to_carrier = self.to_pbx = _base(1)
        self.loaded = ""                         # the cert in use, for the log
        self._build(cert, key, ca, verify_carriers, client_cert_carriers)

    @classmethod
    def from_config(cls, tls: TlsConfig) -> TlsContexts:
        return cls(tls.cert, tls.key, tls.ca, verify_carriers=tls.verify_carriers,
                   client_cert_carriers=tls.client_cert_carriers)

    def _build(self, cert: str, key: str, ca: str, verify: bool, client_cert: bool) -> None:
        server: dict[str, ssl.SSLContext] = {}
        if cert and key:
            for side in ("customer", "carrier", BOTH):
                ctx = _base(0)
                ctx.load_cert_chain(cert, key)
                if side != "customer":  # a carrier may present a certificate: it must be valid
                    ctx.verify_mode = ssl.CERT_OPTIONAL
                    if ca:
                        ctx.load_verify_locations(ca)
                    else:
                        ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
                server[side] = ctx
        to_carrier = _base(1)
        if verify:
            if ca:
                to_carrier.load_verify_locations(ca)
            else:
                to_carrier.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            to_carrier.check_hostname = False
            to_carrier.verify_mode = ssl.CERT_NONE
            log.warning("[tls] verify_carriers = false: carriers' certificates are not checked; anyone on "
                        "the path can pose as a carrier", extra={"event": "tls_verify_off"})
        if client_cert and cert and key:
            to_carrier.load_cert_chain(cert, key)
        to_pbx = _base(1)
        to_pbx.check_hostname = False
        to_pbx.verify_mode = ssl.CERT_NONE
        self.server, self.to_carrier, self.to_pbx, self.loaded = server, to_carrier, to_pbx, cert

    def reload(self, tls: TlsConfig) -> None:
        """New handshakes use ``tls`` from now on; established connections are untouched.

        :raises TlsSetupError: the files are not usable (the running contexts stay).
        """
        check_files(tls.cert, tls.key, tls.ca, need_identity=bool(self.server) or tls.client_cert_carriers)
        try:
            self._build(tls.cert, tls.key, tls.ca, tls.verify_carriers, tls.client_cert_carriers)
        except (ssl.SSLError, OSError) as exc:
            raise TlsSetupError("tls.cert", str(exc)) from None

    def for_listener(self, side: str) -> ssl.SSLContext:
        return self.server[side]

    def toward(self, side: str) -> ssl.SSLContext:
        return self.to_pbx if side == "customer" else self.to_carrier


def failure_reason(exc: BaseException) -> str:
    """A bounded label for why a handshake failed (``REASONS``)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", 0)
        if code == 10:                      # X509_V_ERR_CERT_HAS_EXPIRED
            return "expired"
        if code in (62, 64):                # hostname / IP address mismatch
            return "wrong_host"
        return "untrusted"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
            return "no_certificate"
        if "ALERT" in reason:               # the peer refused our certificate or parameters
            return "peer_refused"
        if "EOF" in reason:
            return "closed"
        return "protocol"
    if isinstance(exc, ConnectionError | EOFError):
        return "closed"
    return "other"


def _verify_detail(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return type(exc).__name__ if not str(exc) else str(exc)


# ------------------------------------------------------------ connections

class TlsConnection(TcpConnection):
    """A TCP connection with TLS under it (a :class:`TlsStream`): ``Peer.proto`` is ``"tls"``."""

    proto = "tls"


class TlsStream(SocketStream):
    """TLS on a :class:`SocketStream`: an ``ssl.SSLObject`` between two ``ssl.MemoryBIO``s.

    The socket is read and written as for plain TCP; what is read goes into the incoming BIO
    and comes out of the ``SSLObject`` decrypted, what is written goes out through the outgoing
    BIO. OpenSSL does the TLS (the contexts above: 1.2 and 1.3, no renegotiation); this class
    only moves bytes, in one Python call per direction where asyncio's ``SSLProtocol`` runs
    a layer of pure Python per record and ends every read in an ``SSLWantReadError``: a read
    is retried only while the incoming BIO still holds octets (``pending``).

    The handshake runs first, bounded by ``HANDSHAKE_SECONDS``; ``on_handshake`` is called
    once with ``None`` when it completed (the protocol's ``connection_made`` follows at once)
    or with the exception that ended it (the socket is closed then, after the alert OpenSSL
    wrote for the peer, if any). :meth:`close` sends a close_notify before the socket closes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.Protocol,
                 metrics: SipMetrics, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None,
                 on_handshake: Callable[[BaseException | None], None]) -> None:
        super().__init__(loop, sock, protocol, metrics)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                server_hostname=server_hostname)
        self._on_handshake: Callable[[BaseException | None], None] | None = on_handshake
        self._handshake_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start the handshake (a client's first flight goes out now); reading starts with it."""
        self._handshake_timer = self._loop.call_later(HANDSHAKE_SECONDS, self._handshake_timeout)
        self._loop.add_reader(self._fd, self._readable)
        self._reading = True
        self._handshake_step()

    def _handshake_step(self) -> None:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:  # ssl.CertificateError is an SSLError
            self._flush()  # the alert that tells the peer why
            self._handshake_done(exc)
            return
        self._flush()
        self._handshake_done(None)

    def _handshake_timeout(self) -> None:
        self._handshake_timer = None
        self._handshake_done(TimeoutError("the TLS handshake did not complete in time"))

    def _handshake_done(self, exc: BaseException | None) -> None:
        callback, self._on_handshake = self._on_handshake, None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if exc is not None:
            super().abort(None)
        if callback is not None:
            callback(exc)
        if exc is None and not self._closing:
            self.protocol.connection_made(self)  # type: ignore[arg-type]
            if self._incoming.pending and not self._closing:  # the peer's first message came with its last flight
                self._decrypt()

    def _received(self, data: memoryview) -> None:
        self._incoming.write(data)
        if self._on_handshake is not None:
            self._handshake_step()  # and, once it completes, what came after the handshake
        elif not self._closing:
            self._decrypt()

    def _decrypt(self) -> None:
        """Deliver what the incoming BIO holds, one ``data_received`` per TLS record."""
        read = self.ssl.read
        while True:
            try:
                data = read(STREAM_READ)
            except ssl.SSLWantReadError:  # the rest of a record is still on its way
                break
            except ssl.SSLError as exc:  # a bad record MAC and friends: the stream is lost
                self._flush()
                self.abort(exc)
                return
            if not data:  # the peer's close_notify (read() gives b"" for it)
                self.close()
                return
            self.protocol.data_received(data)
            # A read of STREAM_READ takes a whole record (16 KiB at most), so the SSLObject keeps
            # nothing decrypted back (``pending()`` is 0): only more records in the BIO mean more.
            if self._closing or not self._incoming.pending:
                break
        if self._outgoing.pending:  # a TLS 1.3 key update answered, and the like
            self._flush()

    def _eof(self) -> None:
        if self._on_handshake is not None:
            self._handshake_done(ConnectionResetError("the peer closed the connection during the handshake"))
            return
        super()._eof()

    def _flush(self) -> None:
        if self._outgoing.pending:
            super().write(self._outgoing.read())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._on_handshake is not None or not data:
            return
        try:
            self.ssl.write(data)
        except ssl.SSLError as exc:
            self.abort(exc)
            return
        super().write(self._outgoing.read())

    def close(self) -> None:
        if not self._closing and self._on_handshake is None:
            try:
                self.ssl.unwrap()  # writes our close_notify; the peer's is not awaited
            except ssl.SSLError:
                pass
            self._flush()
        super().close()

    def abort(self, exc: Exception | None) -> None:
        if self._on_handshake is not None:  # the handshake ends with it: its waiter learns why
            self._handshake_done(exc or ConnectionAbortedError("aborted during the TLS handshake"))
            return
        super().abort(exc)


class TlsListener(StreamListener):
    """A ``tls:`` listener: each accepted connection does its handshake before it is a
    :class:`TlsConnection`, with the side's context of the moment (a reload applies to the
    next handshake). A failed handshake is counted and logged with its reason, without a
    traceback; not an octet of the connection is read in clear."""

    def accepted(self, sock: socket.socket) -> None:
        layer = self.layer
        assert self._loop is not None and layer.tls is not None
        if layer.tcp_count + len(layer.handshaking) >= layer.max_tcp:
            layer.metrics.transport_errors.labels("tcp_limit").inc()
            sock.close()
            return
        peer = sock.getpeername()
        side = self.side

        def on_handshake(exc: BaseException | None) -> None:
            layer.handshaking.discard(stream)
            if exc is not None:
                handshake_failed(layer, side, "in", peer, exc)

        stream = TlsStream(self._loop, sock, TlsConnection(layer, side=side), layer.metrics,
                           layer.tls.for_listener(side), server_side=True, on_handshake=on_handshake)
        layer.handshaking.add(stream)
        stream.start()


_log_quiet_until: dict[tuple[str, str], list[float]] = {}  # (side, reason) -> [quiet until, suppressed]
INBOUND_LOG_INTERVAL = 10.0        # seconds between two log lines for inbound failures of one side and reason


def handshake_failed(layer: Transports, side: str, direction: str, peer: object, exc: BaseException) -> None:
    """Count and log one refused or failed handshake, with its reason and no traceback.

    Toward carriers every failure is logged (they are few and configured); inbound ones at most
    once per ``INBOUND_LOG_INTERVAL`` per side and reason, with the number left out, so that a
    scanner hammering the port cannot flood the log (the counter has them all)."""
    reason = failure_reason(exc)
    side_label = side or "both"
    layer.metrics.tls_handshake_failures.labels(side_label, reason).inc()
    suppressed = 0
    if direction == "in":
        now = time.monotonic()
        state = _log_quiet_until.setdefault((side_label, reason), [0.0, 0])
        if now < state[0]:
            state[1] += 1
            return
        suppressed, state[0], state[1] = int(state[1]), now + INBOUND_LOG_INTERVAL, 0
    where = peer if isinstance(peer, str) else (f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?")
    log.warning("TLS handshake %s %s failed: %s (%s)%s", "from" if direction == "in" else "to", where, reason,
                _verify_detail(exc), f"; {suppressed} more like it not logged" if suppressed else "",
                extra={"event": "tls_handshake_failed", "side": side_label, "direction": direction,
                       "peer": where, "reason": reason})


async def connect(layer: Transports, host: str, port: int, side: str,
                  local_addr: tuple[str, int] | None) -> TcpConnection | None:
    """A new TLS connection toward ``side``: verified toward carriers (``[tls]
    verify_carriers``), with the host of the URI as the name to check."""
    loop = asyncio.get_running_loop()
    assert layer.tls is not None
    ctx = layer.tls.toward(side)
    try:
        sock = await asyncio.wait_for(connected_socket(host, port, local_addr), timeout=CONNECT_SECONDS)
    except (TimeoutError, OSError):
        return None
    done: asyncio.Future[BaseException | None] = loop.create_future()

    def on_handshake(exc: BaseException | None) -> None:
        if not done.done():  # not when this coroutine was cancelled (the stream is aborted then)
            done.set_result(exc)

    conn = TlsConnection(layer, (host, port), side)
    try:
        stream = TlsStream(loop, sock, conn, layer.metrics, ctx, server_side=False, server_hostname=host,
                           on_handshake=on_handshake)
    except OSError:  # reset as it connected
        sock.close()
        return None
    stream.start()
    try:
        exc = await done  # bounded: the stream ends its handshake after HANDSHAKE_SECONDS
    except asyncio.CancelledError:
        stream.abort(None)
        raise
    if isinstance(exc, ssl.SSLError):
        handshake_failed(layer, side, "out", (host, port), exc)
        return None
    if exc is not None:  # closed by the carrier, timed out: a transport error, as a refused connect
        return None
    return conn if not conn.closed else None
