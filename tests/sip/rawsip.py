"""A tiny raw-socket SIP client for tests: exact bytes on the wire, digest answers by hand."""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import ssl
import time

from edge.sip import SipMessage, parse


class RawSip:
    """UDP, TCP or TLS socket from ``127.0.0.1`` (or ``bind``) to the edge.

    :param tls: the client context of a ``"tls"`` socket (its handshake runs in the constructor).
    """

    def __init__(self, edge_port: int, proto: str = "udp", bind: str = "127.0.0.1",
                 edge_host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.proto = proto
        self.edge = (edge_host, edge_port)
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind((bind, 0))
        self.sock.settimeout(5)
        if proto in ("tcp", "tls"):
            self.sock.connect(self.edge)
        if proto == "tls":
            assert tls is not None, "a tls RawSip needs its client context"
            self.sock = tls.wrap_socket(self.sock, server_hostname=edge_host)
        self.host, self.port = self.sock.getsockname()
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        if self.proto == "udp":
            self.sock.sendto(data, self.edge)
        else:
            self.sock.sendall(data)

    def recv(self, timeout: float = 5.0) -> SipMessage:
        self.sock.settimeout(timeout)
        if self.proto == "udp":
            data, _ = self.sock.recvfrom(65535)
            return parse(data)
        from edge.sip import frame_length
        while True:
            n = frame_length(self._buf) if self._buf else 0
            if n:
                frame, self._buf = self._buf[:n], self._buf[n:]
                return parse(frame)
            chunk = self.sock.recv(65535)
            if not chunk:
                raise ConnectionError("closed")
            self._buf += chunk

    def recv_final(self, timeout: float = 5.0) -> SipMessage:
        """Skip provisional answers."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.05, deadline - time.monotonic()))
            if msg.status >= 200:
                return msg

    def request(self, method: str, ruri: str, *, from_user: str, to_user: str, domain: str = "sip.edge.test",
                call_id: str | None = None, cseq: int = 1, branch: str | None = None,
                headers: list[tuple[str, str]] = (), body: bytes = b"", from_tag: str | None = None,
                to_tag: str | None = None,
                contact: str | None = None) -> bytes:
        branch = branch or "z9hG4bK" + secrets.token_hex(6)
        call_id = call_id or secrets.token_hex(8)
        from_tag = from_tag or secrets.token_hex(4)
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/{self.proto.upper()} {self.host}:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{from_user}@{domain}>;tag={from_tag}",
            f"To: <sip:{to_user}@{domain}>" + (f";tag={to_tag}" if to_tag else ""),
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: {contact or f'<sip:{from_user}@{self.host}:{self.port};transport={self.proto}>'}",
        ]
        lines += [f"{n}: {v}" for n, v in headers]
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def challenge_params(value: str) -> dict[str, str]:
    return {k.lower(): v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', value)}


def digest(method: str, uri: str, user: str, password: str, challenge: str, *, nc: int = 1,
           cnonce: str = "0a4f113b", algorithm: str | None = None) -> str:
    """An Authorization value answering ``challenge`` (a WWW-/Proxy-Authenticate value)."""
    p = challenge_params(challenge)
    alg = algorithm or p.get("algorithm", "MD5")
    h = hashlib.sha256 if alg.upper() == "SHA-256" else hashlib.md5
    ha1 = h(f"{user}:{p['realm']}:{password}".encode()).hexdigest()
    ha2 = h(f"{method}:{uri}".encode()).hexdigest()
    ncs = f"{nc:08x}"
    resp = h(f"{ha1}:{p['nonce']}:{ncs}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    return (f'Digest username="{user}", realm="{p["realm"]}", nonce="{p["nonce"]}", uri="{uri}", '
            f'response="{resp}", algorithm={alg}, qop=auth, nc={ncs}, cnonce="{cnonce}"')


def sdp(port: int, host: str = "127.0.0.1", session: int = 1) -> bytes:
    """A G.711 offer/answer with telephone-event, as PBXs send it."""
    return (f"v=0\r\no=- {session} 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
            f"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n").encode()


def rtp_packet(seq: int, payload: bytes = b"\xd5" * 160, ssrc: int = 0x1234, pt: int = 0) -> bytes:
    import struct

    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, seq * 160 & 0xFFFFFFFF, ssrc) + payload


def media_port(body: bytes) -> tuple[str, int]:
    """(c= host, m=audio port) of an SDP body."""
    text = body.decode()
    host = re.search(r"c=IN IP4 (\S+)", text).group(1)
    port = int(re.search(r"m=audio (\d+)", text).group(1))
    return host, port
