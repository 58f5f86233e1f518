"""SIP over TLS (RFC 3261 §26.2, RFC 5630): contexts, handshakes and their failures, reload.

A TLS connection is a TCP connection (``transport.TcpConnection``: Content-Length framing,
read deadlines, RFC 5626 CRLF keep-alive) whose transport is an asyncio SSL transport.
Listeners accept plain TCP and upgrade it with ``loop.start_tls`` so that a failed handshake
is seen here -- counted in ``edge_tls_handshake_failures_total{side,reason}`` and logged with
its reason, without a traceback -- instead of vanishing inside asyncio's SSL protocol.

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
import ssl
import time
from typing import TYPE_CHECKING, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge.config import ConfigError

from .transport import BOTH, TcpConnection

if TYPE_CHECKING:
    from edge.config import TlsConfig

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
    """A TCP connection with TLS under it: ``Peer.proto`` is ``"tls"``.

    On a listener the handshake finishes inside ``start_tls`` and the SSL protocol may hand
    over the first application data before :meth:`connection_made` is called (asyncio reads
    on right after waking the handshake's waiter): that data is kept until then.
    """

    proto = "tls"

    def __init__(self, layer: Transports, outbound_key: tuple[str, int] | None = None, side: str = BOTH) -> None:
        super().__init__(layer, outbound_key, side)
        self._early = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._early and not self.closed:
            early, self._early = bytes(self._early), bytearray()
            self.data_received(early)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            self._early += data
            return
        super().data_received(data)


class TlsAccept:
    """The protocol of a freshly accepted TCP connection on a ``tls:`` listener: upgrade it.

    The socket is paused until ``start_tls`` owns it, so not an octet is read in clear.
    """

    def __init__(self, layer: Transports, side: str) -> None:
        self.layer = layer
        self.side = side
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        transport.pause_reading()
        if self.layer.tcp_count + len(self.layer.handshaking) >= self.layer.max_tcp:
            self.layer.metrics.transport_errors.labels("tcp_limit").inc()
            transport.abort()
            return
        self._task = asyncio.get_running_loop().create_task(self._upgrade(transport))
        self.layer.handshaking.add(self._task)
        self._task.add_done_callback(self.layer.handshaking.discard)

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        assert self.layer.tls is not None
        peer = transport.get_extra_info("peername")
        conn = TlsConnection(self.layer, side=self.side)
        try:
            tls_transport = await loop.start_tls(transport, conn, self.layer.tls.for_listener(self.side),
                                                 server_side=True, ssl_handshake_timeout=HANDSHAKE_SECONDS)
        except (OSError, EOFError, TimeoutError) as exc:
            handshake_failed(self.layer, self.side, "in", peer, exc)
            transport.abort()
            return
        if tls_transport is None:  # the connection went away as the handshake ended
            return
        conn.connection_made(tls_transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # before start_tls took the socket: the handshake task sees the loss itself

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:  # never: reading is paused until start_tls
        pass

    def eof_received(self) -> bool | None:
        return None


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
        _, conn = await asyncio.wait_for(loop.create_connection(
            lambda: TlsConnection(layer, (host, port), side), host, port, local_addr=local_addr, ssl=ctx,
            server_hostname=host, ssl_handshake_timeout=HANDSHAKE_SECONDS),
            timeout=CONNECT_SECONDS + HANDSHAKE_SECONDS)
    except (ssl.SSLError, ssl.CertificateError) as exc:
        handshake_failed(layer, side, "out", (host, port), exc)
        return None
    except (TimeoutError, OSError):
        return None
    return conn if not conn.closed else None
