"""A small SDP rewriter for media anchoring (RFC 4566, RFC 3264, RFC 3605).

Only what an anchoring B2BUA needs: read where a party wants its audio
(:func:`parse_sdp_media`) and point the other party at the edge instead
(:func:`rewrite_sdp`). Everything else (codecs, ``a=rtpmap``/``a=fmtp``,
RFC 4733 ``telephone-event``, ptime, direction) passes through byte for byte.
"""
from __future__ import annotations

from typing import NamedTuple

DIRECTIONS = (b"sendrecv", b"sendonly", b"recvonly", b"inactive")  # RFC 3264 §5.1
# ICE would route media around the relay and leak addresses (topology hiding): drop it,
# as rtpengine does with ICE=remove.
_ICE_ATTRS = (b"a=candidate:", b"a=remote-candidates:", b"a=ice-ufrag:", b"a=ice-pwd:",
              b"a=ice-options:", b"a=ice-lite", b"a=ice-mismatch", b"a=end-of-candidates")


class SdpError(ValueError):
    """The SDP cannot be anchored (no audio stream, no connection address)."""


class SdpMedia(NamedTuple):
    """Where a party wants to receive its audio.

    :param host: connection address (media-level ``c=`` over session-level), ``0.0.0.0`` = hold
    :param port: ``m=audio`` port, 0 = stream rejected/disabled
    :param rtcp_port: from ``a=rtcp`` (RFC 3605) or None (then RTP + 1)
    :param direction: ``sendrecv``/``sendonly``/``recvonly``/``inactive`` (RFC 3264 §5.1)
    :param addrtype: ``IP4`` or ``IP6``
    """

    host: str
    port: int
    rtcp_port: int | None
    direction: str
    addrtype: str


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


def parse_sdp_media(sdp: bytes) -> SdpMedia:
    """Read the first audio stream of an SDP body.

    :raises SdpError: no ``m=audio`` line or no connection address for it
    """
    lines, _ = _split(sdp)
    sess_conn: tuple[str, str] | None = None
    sess_dir = "sendrecv"
    in_audio = False
    found = False
    media_conn: tuple[str, str] | None = None
    port = 0
    rtcp: int | None = None
    direction: str | None = None
    for ln in lines:
        if ln.startswith(b"m="):
            if found:
                break                       # the anchored stream's section is over
            in_audio = ln.startswith(b"m=audio ")
            if in_audio:
                found = True
                port = _media_port(ln)
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
    if not found:
        raise SdpError("no m=audio stream")
    conn = media_conn or sess_conn
    if conn is None:
        raise SdpError("no c= line for the audio stream")
    return SdpMedia(conn[1], port, rtcp, direction or sess_dir, conn[0])


def rewrite_sdp(sdp: bytes, address: str, rtp_port: int, rtcp_port: int | None = None) -> bytes:
    """Point the first audio stream at the edge: ``address:rtp_port`` (RTCP ``rtcp_port``).

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
    - ICE attributes are removed; everything else passes through unchanged.

    Line endings (CRLF or LF) are preserved.
    """
    parse_sdp_media(sdp)                    # same validation as the reader: SdpError
    lines, eol = _split(sdp)
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
        elif ln.startswith(_ICE_ATTRS):
            continue
        else:
            out.append(ln)
    close_audio()
    if not anchored:
        raise SdpError("no m=audio stream")
    return eol.join(out) + eol
