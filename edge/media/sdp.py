"""A small SDP rewriter for media anchoring (RFC 4566, RFC 3264, RFC 3605, RFC 4568).

Only what an anchoring B2BUA needs: read where a party wants its audio and with which
SDES keys (:func:`parse_sdp_media`) and point the other party at the edge instead
(:func:`rewrite_sdp`), with the edge's own transport profile and ``a=crypto`` lines. A
party's keys never cross the edge. Everything else (codecs, ``a=rtpmap``/``a=fmtp``,
RFC 4733 ``telephone-event``, ptime, direction) passes through byte for byte.
"""
from __future__ import annotations

import base64
import binascii
from typing import NamedTuple

DIRECTIONS = (b"sendrecv", b"sendonly", b"recvonly", b"inactive")  # RFC 3264 §5.1
# ICE would route media around the relay and leak addresses (topology hiding): drop it,
# as rtpengine does with ICE=remove.
_ICE_ATTRS = (b"a=candidate:", b"a=remote-candidates:", b"a=ice-ufrag:", b"a=ice-pwd:",
              b"a=ice-options:", b"a=ice-lite", b"a=ice-mismatch", b"a=end-of-candidates")
# DTLS-SRTP (RFC 5763) is not spoken by the relay: a fingerprint sent on would invite a handshake
# with the edge's ports that never completes. SDES keys are the edge's own (rewrite_sdp ``crypto``).
_KEYING_ATTRS = (b"a=crypto:", b"a=fingerprint:", b"a=setup:", b"a=tls-id:")


class SdpError(ValueError):
    """The SDP cannot be anchored (no audio stream, no connection address)."""


#: SDES suites the relay can use (RFC 4568 §6.2, RFC 6188, RFC 7714 §12): master key + salt bytes.
SDES_SUITES = {
    "AES_CM_128_HMAC_SHA1_80": 30,
    "AES_CM_128_HMAC_SHA1_32": 30,
    "AES_256_CM_HMAC_SHA1_80": 46,
    "AEAD_AES_128_GCM": 28,
    "AEAD_AES_256_GCM": 44,
}
SECURE_PROFILES = {b"RTP/SAVP": b"RTP/AVP", b"RTP/SAVPF": b"RTP/AVPF"}    # RFC 3711 §12, RFC 5124
PLAIN_PROFILES = {v: k for k, v in SECURE_PROFILES.items()}


class SdesCrypto:
    """One usable ``a=crypto`` line (RFC 4568 §9.1): tag, suite and the decoded master key + salt.

    Its ``repr`` never shows the key: SDP objects end up in log lines and tracebacks.
    """

    __slots__ = ("tag", "suite", "key")

    def __init__(self, tag: int, suite: str, key: bytes) -> None:
        self.tag = tag
        self.suite = suite
        self.key = key

    def __repr__(self) -> str:
        return f"SdesCrypto(tag={self.tag}, suite={self.suite!r}, key=<{len(self.key)} bytes>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SdesCrypto) and (self.tag, self.suite, self.key) == (other.tag, other.suite,
                                                                                      other.key)

    __hash__ = None  # type: ignore[assignment]


def parse_crypto(line: bytes) -> SdesCrypto | None:
    """``a=crypto:<tag> <suite> inline:<key||salt>[|lifetime][|MKI:len] [session-params]``.

    Returns None for a line the relay cannot use: an unknown suite, several keys or an MKI
    (RFC 4568 §6.1: the relay keeps one key per direction), a key of the wrong length, session
    parameters (UNENCRYPTED_SRTP and friends weaken what SRTP means: refused, not honoured).
    """
    parts = line[len(b"a=crypto:"):].split()
    if len(parts) != 3 or not parts[0].isdigit() or len(parts[0]) > 9:
        return None
    suite = parts[1].decode("ascii", "replace")
    want = SDES_SUITES.get(suite)
    params = parts[2]
    if want is None or not params.startswith(b"inline:") or b";" in params:
        return None
    fields = params[len(b"inline:"):].split(b"|")
    # key|lifetime is fine (2^31 or decimal); an MKI (|value:length) is not supported
    if len(fields) > 2 or (len(fields) == 2 and b":" in fields[1]):
        return None
    try:
        # some peers (rtpengine among them) leave out the base64 padding of a 28- or 44-byte key
        key = base64.b64decode(fields[0] + b"=" * (-len(fields[0]) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(key) != want:
        return None
    return SdesCrypto(int(parts[0]), suite, key)


def crypto_line(tag: int, suite: str, key: bytes) -> bytes:
    """The ``a=crypto`` line that offers or answers ``suite`` with ``key`` (RFC 4568 §9.1)."""
    return b"a=crypto:%d %s inline:%s" % (tag, suite.encode("ascii"), base64.b64encode(key))


class SdpMedia(NamedTuple):
    """Where a party wants to receive its audio.

    :param host: connection address (media-level ``c=`` over session-level), ``0.0.0.0`` = hold
    :param port: ``m=audio`` port, 0 = stream rejected/disabled
    :param rtcp_port: from ``a=rtcp`` (RFC 3605) or None (then RTP + 1)
    :param direction: ``sendrecv``/``sendonly``/``recvonly``/``inactive`` (RFC 3264 §5.1)
    :param addrtype: ``IP4`` or ``IP6``
    :param profile: transport profile of ``m=audio`` (``RTP/AVP``, ``RTP/SAVP``, ...)
    :param crypto: the usable ``a=crypto`` lines of the stream, in the sender's order
    :param crypto_lines: how many ``a=crypto`` lines it had, usable or not
    """

    host: str
    port: int
    rtcp_port: int | None
    direction: str
    addrtype: str
    profile: str = "RTP/AVP"
    crypto: tuple[SdesCrypto, ...] = ()
    crypto_lines: int = 0

    @property
    def secure(self) -> bool:
        """The stream asks for SRTP only (``RTP/SAVP``/``RTP/SAVPF``)."""
        return self.profile.encode() in SECURE_PROFILES


class ParsedSdp(NamedTuple):
    """An SDP body read once: its first audio stream and its lines, which
    :func:`rewrite_sdp` takes instead of the body so that an offer or an answer is split and
    read once on its way through the edge."""

    media: SdpMedia
    lines: list[bytes]
    eol: bytes


def _split(sdp: bytes) -> tuple[list[bytes], bytes]:
    eol = b"\r\n" if b"\r\n" in sdp else b"\n"
    lines = sdp.split(eol)
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln.rstrip(b"\r") for ln in lines], eol


def _conn(line: bytes) -> tuple[str, str]:
    # c=<nettype> <addrtype> <connection-address>[/ttl][/n]  (RFC 4566 §5.7)
    parts = line[2:].split()
    if len(parts) != 3 or parts[0] != b"IN":
        raise SdpError(f"bad c= line: {line!r}")
    return parts[1].decode("ascii"), parts[2].split(b"/")[0].decode("ascii")


def _rtcp_port(line: bytes) -> int:
    # a=rtcp:<port> [nettype addrtype connection-address]  (RFC 3605 §2.1)
    try:
        return int(line[7:].split()[0])
    except (ValueError, IndexError):
        raise SdpError(f"bad a=rtcp line: {line!r}") from None


def _media_profile(line: bytes) -> bytes:
    parts = line[2:].split()
    return parts[2] if len(parts) >= 3 else b""


def _media_port(line: bytes) -> int:
    # m=<media> <port>[/<number of ports>] <proto> <fmt> ...  (RFC 4566 §5.14)
    parts = line[2:].split()
    if len(parts) < 3:
        raise SdpError(f"bad m= line: {line!r}")
    try:
        port = int(parts[1].split(b"/")[0])
    except ValueError:
        raise SdpError(f"bad m= port: {line!r}") from None
    if not 0 <= port <= 65535:
        raise SdpError(f"bad m= port: {line!r}")
    return port


def parse_sdp(sdp: bytes) -> ParsedSdp:
    """Read an SDP body once: its first audio stream (:func:`parse_sdp_media`) and its lines.

    :raises SdpError: no ``m=audio`` line or no connection address for it
    """
    lines, eol = _split(sdp)
    return ParsedSdp(_read_media(lines), lines, eol)


def parse_sdp_media(sdp: bytes) -> SdpMedia:
    """Read the first audio stream of an SDP body.

    :raises SdpError: no ``m=audio`` line or no connection address for it
    """
    return _read_media(_split(sdp)[0])


def _read_media(lines: list[bytes]) -> SdpMedia:
    sess_conn: tuple[str, str] | None = None
    sess_dir = "sendrecv"
    in_audio = False
    found = False
    media_conn: tuple[str, str] | None = None
    port = 0
    rtcp: int | None = None
    direction: str | None = None
    profile = b"RTP/AVP"
    crypto: list[SdesCrypto] = []
    crypto_lines = 0
    for ln in lines:
        if ln.startswith(b"m="):
            if found:
                break                       # the anchored stream's section is over
            in_audio = ln.startswith(b"m=audio ")
            if in_audio:
                found = True
                port = _media_port(ln)
                profile = _media_profile(ln)
            continue
        if not found:
            if ln.startswith(b"c="):
                sess_conn = _conn(ln)
            elif ln.startswith(b"a=") and ln[2:] in DIRECTIONS:
                sess_dir = ln[2:].decode()
            continue
        if ln.startswith(b"c="):
            media_conn = _conn(ln)
        elif ln.startswith(b"a=rtcp:"):
            rtcp = _rtcp_port(ln)
        elif ln.startswith(b"a=") and ln[2:] in DIRECTIONS:
            direction = ln[2:].decode()
        elif ln.startswith(b"a=crypto:"):
            crypto_lines += 1
            parsed = parse_crypto(ln)
            if parsed is not None:
                crypto.append(parsed)
    if not found:
        raise SdpError("no m=audio stream")
    conn = media_conn or sess_conn
    if conn is None:
        raise SdpError("no c= line for the audio stream")
    return SdpMedia(conn[1], port, rtcp, direction or sess_dir, conn[0],
                    profile.decode("ascii", "replace"), tuple(crypto), crypto_lines)


def rewrite_sdp(sdp: bytes | ParsedSdp, address: str, rtp_port: int, rtcp_port: int | None = None, *,
                secure: bool | None = None, crypto: tuple[bytes, ...] = ()) -> bytes:
    """Point the first audio stream at the edge: ``address:rtp_port`` (RTCP ``rtcp_port``).

    ``sdp`` is the body, or what :func:`parse_sdp` read of it (not read again).

    - ``c=`` lines (session and media level) get ``IN IP4 address`` (``IN IP6`` for an
      IPv6 ``address``); a hold address ``0.0.0.0`` or ``::`` stays a hold address, of
      ``address``'s family, so hold reaches the other party (RFC 3264 §8.4).
    - The first ``m=audio`` port becomes ``rtp_port`` (a port 0 stays 0: rejected).
      Other media streams are not anchored, so their port is set to 0 (disabled,
      RFC 3264 §8.2) rather than leaking the party's address.
    - ``a=rtcp`` (RFC 3605) gets ``rtcp_port`` (dropped if None); one is added
      if ``rtcp_port`` is not ``rtp_port + 1``.
    - ``o=`` keeps username, sess-id and sess-version (they change exactly when the
      party's SDP changes, and the edge ports of a relay never change) but its
      address becomes ``address`` (topology hiding).
    - ICE attributes are removed; so is every ``a=crypto`` line (the sender's keys are for
      the edge only) and DTLS-SRTP's ``a=fingerprint``/``a=setup``/``a=tls-id``; ``crypto``
      (the edge's own lines) is written into the audio stream.
    - ``secure`` True/False sets the audio profile to ``RTP/SAVP``/``RTP/AVP`` (the F variants
      stay F); None leaves it as it is.
    - everything else passes through unchanged.

    Line endings (CRLF or LF) are preserved.
    """
    # the same validation as the reader (SdpError); not again when the caller parsed it already
    parsed = sdp if isinstance(sdp, ParsedSdp) else parse_sdp(sdp)
    lines, eol = parsed.lines, parsed.eol
    addr = address.encode("ascii")
    ip6 = b":" in addr
    addrtype = b"IP6" if ip6 else b"IP4"
    hold = b"c=IN IP6 ::" if ip6 else b"c=IN IP4 0.0.0.0"
    out: list[bytes] = []
    section = "session"                     # "session" | "audio" | "other"
    anchored = False
    rtcp_seen = False
    rtp_zero = False

    def close_audio() -> None:
        if section == "audio" and not rtcp_seen and not rtp_zero and rtcp_port is not None \
                and rtcp_port != rtp_port + 1:
            out.append(b"a=rtcp:%d" % rtcp_port)
        if section == "audio" and not rtp_zero:
            out.extend(crypto)

    for ln in lines:
        if ln.startswith(b"m="):
            close_audio()
            rtcp_seen = False
            if ln.startswith(b"m=audio ") and not anchored:
                anchored = True
                section = "audio"
                parts = ln.split(b" ")
                rtp_zero = _media_port(ln) == 0
                if not rtp_zero:
                    parts[1] = b"%d" % rtp_port
                if secure is not None and len(parts) >= 3:
                    parts[2] = (PLAIN_PROFILES.get(parts[2], parts[2]) if secure
                                else SECURE_PROFILES.get(parts[2], parts[2]))
                out.append(b" ".join(parts))
            else:
                section = "other"
                parts = ln.split(b" ")
                _media_port(ln)
                parts[1] = b"0"
                out.append(b" ".join(parts))
            continue
        if ln.startswith(b"o="):
            parts = ln.split(b" ")
            if len(parts) == 6:
                parts[4] = addrtype
                parts[5] = addr
                ln = b" ".join(parts)
            out.append(ln)
        elif ln.startswith(b"c="):
            _, host = _conn(ln)
            out.append(hold if host in ("0.0.0.0", "::") else b"c=IN " + addrtype + b" " + addr)
        elif ln.startswith(b"a=rtcp:"):
            _rtcp_port(ln)
            rtcp_seen = True
            if section == "audio" and rtcp_port is not None and not rtp_zero:
                has_addr = len(ln[7:].split()) > 1
                out.append(b"a=rtcp:%d" % rtcp_port + (b" IN " + addrtype + b" " + addr if has_addr else b""))
            # else: dropped (no RTCP port to give, or stream not anchored)
        elif ln.startswith(_ICE_ATTRS) or ln.startswith(_KEYING_ATTRS):
            continue
        else:
            out.append(ln)
    close_audio()
    if not anchored:
        raise SdpError("no m=audio stream")
    return eol.join(out) + eol
