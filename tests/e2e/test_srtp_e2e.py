"""SRTP end to end (issue 12, SPEC §4.6): pjsua2 PBXs with SDES-SRTP and a plain-RTP carrier
through a real ``sipedge serve``.

The PBX is a pjsua2 UA with ``srtpUse = PJMEDIA_SRTP_MANDATORY`` (``RTP/SAVP`` + ``a=crypto``;
``srtpSecureSignaling = 0`` so SDES runs over UDP signalling), the carrier plain RTP/AVP.
Each side plays its tone and must hear the other's through the relay, which unprotects on the
customer leg and protects toward it. An ``AF_PACKET`` capture of the loopback interface (root)
reads what crosses the customer-side relay port: none of it carries the G.711 bytes the
carrier leg carries in clear. The keys pjsua logged (its own and the edge's) must appear in
no edge log line, CDR, live-call record or metric.

Three edges: customer ``mandatory`` / carrier ``off`` (the bridge), customer ``off`` (488 to an
SRTP-only PBX), customer ``optional`` / carrier ``mandatory`` (SRTP on both legs, re-keyed).
"""

from __future__ import annotations

import base64
import math
import os
import re
import socket
import struct
import threading
import time
import uuid
import wave
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pjsua2")

from edgeproc import EdgeProcess

from e2e.pjua import CallHandle, PjUA, hears_tone, tone_powers
from e2e.test_calls_e2e import (
    CARRIER_TONE,
    DOMAIN,
    PBX_TONE,
    RATES,
    TALK,
    UK,
    ParallelPool,
    assert_hears,
    attach_number,
    cdrs,
    free_media_block,
    hang_up,
    profile,
    register,
    wait_for,
)
from edge._rtp import SRTP_SUITES
from edge.sip import parse

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CM80 = "AES_CM_128_HMAC_SHA1_80"
GCM = "AEAD_AES_128_GCM"
_M_AUDIO = re.compile(rb"^m=audio (\d+) (\S+)", re.M)
_CRYPTO = re.compile(rb"^a=crypto:(\d+) (\S+) inline:([A-Za-z0-9+/=]+)", re.M)


# ------------------------------------------------------------------------------ helpers

class LoopbackCapture:
    """UDP datagrams on ``lo`` that look like RTP (an ``AF_PACKET`` socket: needs CAP_NET_RAW).

    Each is kept once (the copy the receiver gets) as (src port, dst port, UDP payload). The
    reader stops at :meth:`stop` or after ``limit`` seconds, and keeps at most ``max_packets``.
    """

    def __init__(self, limit: float = 60.0, max_packets: int = 200_000) -> None:
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        except PermissionError:
            pytest.skip("an AF_PACKET capture needs CAP_NET_RAW (run as root)")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.packets: list[tuple[int, int, bytes]] = []
        self.max_packets = max_packets
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                frame, addr = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            if addr[2] == socket.PACKET_OUTGOING:        # loopback shows each datagram twice
                continue
            ip = frame[14:]
            if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != 17:
                continue
            udp = ip[(ip[0] & 0x0F) * 4:]
            sport, dport, length = struct.unpack("!HHH", udp[:6])
            payload = bytes(udp[8:length])
            if len(payload) >= 12 and payload[0] >> 6 == 2 and len(self.packets) < self.max_packets:
                self.packets.append((sport, dport, payload))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def sdp_of(raw: str) -> tuple[int, str, list[tuple[int, str, str]]]:
    """(audio port, profile, [(tag, suite, inline key)]) of the SDP in a raw SIP message."""
    body = raw.encode().split(b"\r\n\r\n", 1)[-1]
    m = _M_AUDIO.search(body)
    assert m is not None, raw
    return (int(m.group(1)), m.group(2).decode(),
            [(int(t), s.decode(), k.decode()) for t, s, k in _CRYPTO.findall(body)])


def answer_raw(call: CallHandle) -> str:
    final = next(r for r in call.responses if r["code"] == 200 and r.get("cseq_method") == "INVITE")
    return str(final["raw"])


def logged_keys(ua: PjUA) -> set[str]:
    """Every SDES key in the UA's pjsip log (the messages it sent and received)."""
    return {k.decode() for _, _, k in _CRYPTO.findall(Path(ua.log_path).read_bytes())}


def assert_no_key(keys: set[str], *texts: str) -> None:
    """None of ``keys`` (base64, hex or bytes repr of the decoded key) is in any of ``texts``."""
    assert keys
    for key in keys:
        raw = base64.b64decode(key)
        for form in (key, raw.hex(), repr(raw)[2:-1]):
            for text in texts:
                assert form not in text, f"SRTP key material ({form[:6]}...) leaked"


def clear_g711(capture: LoopbackCapture, port: int) -> set[bytes]:
    """Payloads (after the 12-byte RTP header) of the plain RTP to or from ``port``."""
    return {p[12:] for s, d, p in capture.packets if port in (s, d) and len(p) >= 172 and p[1] & 0x7F == 0}


def srtp_edge(tmp: Path, carrier: PjUA, customer: str, carrier_mode: str = "off") -> EdgeProcess:
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n'
             f'[sides.customer]\nsrtp = "{customer}"\n[sides.carrier]\nsrtp = "{carrier_mode}"\n')
    proc = EdgeProcess(tmp, extra_config=extra, trusted=["127.0.0.2/32"], sip_extra="rate_limit = 0",
                       media_ports=free_media_block()).start()
    with proc.client() as api:
        assert api.put("/v1/rates", json={"rates": RATES}).status_code == 200
    return proc


def outgoing(pbx: PjUA, carrier: PjUA) -> tuple[CallHandle, CallHandle]:
    n = len(carrier.incoming_calls)
    call = pbx.call(f"sip:{UK}@{DOMAIN}", tone_hz=PBX_TONE)
    call.wait_state("CONFIRMED", 10)
    leg = carrier.wait_incoming(n + 1, 5)
    leg.wait_state("CONFIRMED", 5)
    return call, leg


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def uas(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pool = ParallelPool(tmp_path_factory.mktemp("uas"))
    try:
        yield pool
    finally:
        pool.close_all()


@pytest.fixture(scope="module")
def carrier(uas: ParallelPool) -> PjUA:
    ua = uas.new("carrier", bind="127.0.0.2")
    ua.on_incoming(200, tone_hz=CARRIER_TONE)
    return ua


@pytest.fixture(scope="module")
def pbx(uas: ParallelPool) -> PjUA:
    return uas.new("pbx-srtp", bind="127.0.0.1", srtp="mandatory")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, carrier: PjUA) -> Any:
    proc = srtp_edge(tmp_path_factory.mktemp("edge"), carrier, "mandatory")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def _clean_calls(request: pytest.FixtureRequest) -> Any:
    yield
    for name in ("pbx", "carrier"):
        if name in request.fixturenames:
            try:
                request.getfixturevalue(name).hangup_all(timeout=10)
            except Exception:
                pass


@pytest.fixture
def pool(tmp_path: Path) -> Any:
    p = ParallelPool(tmp_path)
    try:
        yield p
    finally:
        p.close_all()


# ------------------------------------------------------------------------------ the bridge

def test_outgoing_srtp_pbx_to_plain_carrier(edge: EdgeProcess, api: Any, pbx: PjUA, carrier: PjUA) -> None:
    prof = profile(api, credit="5.00", channels=2)
    register(pbx, edge, prof)
    capture = LoopbackCapture()
    try:
        call, leg = outgoing(pbx, carrier)
        a_port, a_profile, a_crypto = sdp_of(answer_raw(call))
        b_port, b_profile, b_crypto = sdp_of(leg.info["raw"])
        assert a_profile == "RTP/SAVP" and len(a_crypto) == 1 and a_crypto[0][1] in SRTP_SUITES, a_crypto
        assert b_profile == "RTP/AVP" and b_crypto == []                 # the carrier leg is plain RTP
        live = wait_for(lambda: api.get(f"/v1/profiles/{prof['id']}/calls").json(), 5, "the live call")
        assert live[0]["srtp"] == {"customer": a_crypto[0][1], "carrier": "rtp"}, live
        time.sleep(TALK)
        metrics = api.get("/metrics").text
        live_text = api.get(f"/v1/profiles/{prof['id']}/calls").text
        hang_up(call, leg)
    finally:
        capture.stop()
    assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)

    # what crosses the customer side is SRTP: no payload of the clear carrier leg is in it
    clear = clear_g711(capture, b_port)
    customer = [p for s, d, p in capture.packets if a_port in (s, d)]
    assert len(clear) >= 5 and len(customer) >= 2 * 40, (len(clear), len(customer))
    assert not any(c in p for p in customer for c in clear), "clear G.711 on the customer-side relay port"
    assert all(len(p) >= 172 + 10 for p in customer if p[1] & 0x7F == 0)   # the SRTP tag is on each

    cdr = cdrs(api, prof)[0]
    assert cdr["srtp"] == {"customer": a_crypto[0][1], "carrier": "rtp"}, cdr
    assert cdr["media"]["a_packets"] > 40 and cdr["media"]["b_packets"] > 40, cdr["media"]
    keys = logged_keys(pbx)
    assert len(keys) >= 2                                               # the PBX's and the edge's
    assert_no_key(keys, edge.log.read_text(), api.get(f"/v1/profiles/{prof['id']}/cdrs").text, metrics,
                  live_text)


def test_incoming_plain_carrier_to_srtp_pbx(edge: EdgeProcess, api: Any, pbx: PjUA, carrier: PjUA) -> None:
    prof = profile(api, credit="1.00", channels=1)
    dialled = f"+1415557{uuid.uuid4().int % 10000:04d}"
    attach_number(api, prof, dialled)
    register(pbx, edge, prof)
    pbx.on_incoming(200, tone_hz=PBX_TONE)
    n = len(pbx.incoming_calls)
    call = carrier.call(f"sip:{dialled}@127.0.0.1:{edge.sip_port}", tone_hz=CARRIER_TONE)
    call.wait_state("CONFIRMED", 10)
    inc = pbx.wait_incoming(n + 1, 5)
    inc.wait_state("CONFIRMED", 5)
    _, offered_profile, offered = sdp_of(pbx.received_requests[n]["raw"])
    assert offered_profile == "RTP/SAVP" and [(t, s) for t, s, _ in offered] == [(1, CM80), (2, GCM)]
    time.sleep(TALK)
    hang_up(call, inc)
    assert_hears(inc.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(call.record_wav, PBX_TONE, CARRIER_TONE)
    cdr = cdrs(api, prof)[0]
    assert cdr["direction"] == "incoming" and cdr["srtp"]["carrier"] == "rtp"
    assert cdr["srtp"]["customer"] in SRTP_SUITES, cdr


def ulaw(sample: int) -> int:
    """G.711 mu-law encoding of a 16-bit sample (ITU-T G.711 §3.2)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = max(0, magnitude.bit_length() - 8)
    return ~(sign | (exponent << 4) | ((magnitude >> (exponent + 3)) & 0x0F)) & 0xFF


def unulaw(code: int) -> int:
    code = ~code & 0xFF
    magnitude = ((((code & 0x0F) << 3) + 0x84) << ((code >> 4) & 0x07)) - 0x84
    return -magnitude if code & 0x80 else magnitude


def test_gcm_pbx_is_a_libsrtp_peer_of_the_test(edge: EdgeProcess, api: Any, carrier: PjUA, tmp_path: Path) -> None:
    """pjsua2's SRTP has no AES-GCM here, so the PBX is the test's own SIP+SRTP peer: RawSip for
    the signalling and pylibsrtp (libsrtp of its own) for AEAD_AES_128_GCM both ways."""
    pylibsrtp = pytest.importorskip("pylibsrtp")
    from sip.rawsip import RawSip, digest

    prof = profile(api, credit="5.00", channels=2)
    user, ruri = prof["sip_username"], f"sip:{UK}@{DOMAIN}"
    sig = RawSip(edge.sip_port)
    media = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    media.bind(("127.0.0.1", 0))
    media.settimeout(0.02)
    key = os.urandom(28)
    body = (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {media.getsockname()[1]} RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=crypto:1 {GCM} inline:{base64.b64encode(key).decode()}\r\na=sendrecv\r\n").encode()
    call_id, tag = uuid.uuid4().hex, uuid.uuid4().hex[:8]
    n = len(carrier.incoming_calls)
    try:
        invite = sig.request("INVITE", ruri, from_user=user, to_user=UK, call_id=call_id, from_tag=tag,
                             headers=[("Content-Type", "application/sdp")], body=body)
        sig.send(invite)
        challenge = sig.recv_final()
        assert challenge.status == 407
        sig.send(sig.request("ACK", ruri, from_user=user, to_user=UK, call_id=call_id, from_tag=tag,
                             to_tag=challenge.to_tag, branch=parse(invite).branch))
        auth = digest("INVITE", ruri, user, prof["sip_password"], challenge.header("Proxy-Authenticate"))
        sig.send(sig.request("INVITE", ruri, from_user=user, to_user=UK, call_id=call_id, cseq=2, from_tag=tag,
                             body=body, headers=[("Content-Type", "application/sdp"), ("Proxy-Authorization", auth)]))
        ok = sig.recv_final(10)
        assert ok.status == 200, ok.raw
        sig.send(sig.request("ACK", ruri, from_user=user, to_user=UK, call_id=call_id, cseq=2, from_tag=tag,
                             to_tag=ok.to_tag))
        edge_port, answer_profile, answer_crypto = sdp_of(ok.raw.decode())
        assert answer_profile == "RTP/SAVP" and [(t, s) for t, s, _ in answer_crypto] == [(1, GCM)]
        edge_key = base64.b64decode(answer_crypto[0][2])
        assert edge_key != key
        leg = carrier.wait_incoming(n + 1, 5)
        leg.wait_state("CONFIRMED", 5)
        assert "a=crypto" not in leg.info["raw"]

        tx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                                                srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM))
        rx = pylibsrtp.Session(pylibsrtp.Policy(key=edge_key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                                                srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM))
        tone = bytes(ulaw(int(9000 * math.sin(2 * math.pi * PBX_TONE * i / 8000))) for i in range(8000))
        heard: list[int] = []
        start = time.monotonic()
        for seq in range(int(TALK * 50)):                       # 20 ms packets, paced
            frame = tone[(seq * 160) % 8000:][:160].ljust(160, tone[:1])
            rtp = struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x5EC0DE) + frame
            media.sendto(tx.protect(rtp), ("127.0.0.1", edge_port))
            while time.monotonic() < start + (seq + 1) * 0.02:
                try:
                    packet = media.recv(2048)
                except TimeoutError:
                    continue
                heard += [unulaw(b) for b in rx.unprotect(packet)[12:]]
        sig.send(sig.request("BYE", ruri, from_user=user, to_user=UK, call_id=call_id, cseq=3, from_tag=tag,
                             to_tag=ok.to_tag))
        leg.wait_state("DISCONNECTED", 10)
    finally:
        sig.close()
        media.close()
    wav = tmp_path / "gcm-pbx-heard.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(struct.pack(f"<{len(heard)}h", *heard))
    assert len(heard) > 8000 // 2, len(heard)
    assert hears_tone(str(wav), CARRIER_TONE, PBX_TONE), tone_powers(str(wav), [CARRIER_TONE, PBX_TONE])
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)
    assert cdrs(api, prof)[0]["srtp"] == {"customer": GCM, "carrier": "rtp"}


def test_tampered_and_replayed_srtp_dropped_and_counted(edge: EdgeProcess, api: Any, pbx: PjUA,
                                                        carrier: PjUA) -> None:
    """Packets forged from the PBX's own address (a raw socket spoofs the latched source): a
    renumbered packet and a flipped bit fail authentication, a copy fails replay protection."""
    def dropped(reason: str) -> float:
        m = re.search(rf'^edge_rtp_packets_dropped_total{{reason="{reason}"}} (\S+)$', api.get("/metrics").text,
                      re.M)
        return float(m.group(1)) if m else 0.0

    prof = profile(api, credit="5.00", channels=2)
    register(pbx, edge, prof)
    before = dropped("srtp_auth"), dropped("srtp_replay")
    capture = LoopbackCapture()
    try:
        call, leg = outgoing(pbx, carrier)
        a_port = sdp_of(answer_raw(call))[0]
        sent = wait_for(lambda: [(s, p) for s, d, p in capture.packets if d == a_port], 5, "SRTP from the PBX")
    finally:
        capture.stop()
    pbx_port, sample = sent[-1]
    seq = struct.unpack("!H", sample[2:4])[0]

    def ahead(packet: bytes, by: int) -> bytearray:
        # a fresh index: replay protection lets it through to authentication (it checks first)
        return bytearray(packet[:2] + struct.pack("!H", (seq + by) & 0xFFFF) + packet[4:])

    renumbered = ahead(sample, 500)                     # the header is authenticated too
    flipped = ahead(sample, 600)
    flipped[20] ^= 0x01
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for payload in (bytes(renumbered), bytes(flipped), sample):
            udp = struct.pack("!HHHH", pbx_port, a_port, 8 + len(payload), 0) + payload   # no checksum (IPv4)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                             socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
            raw.sendto(ip + udp, ("127.0.0.1", 0))
    finally:
        raw.close()
    wait_for(lambda: dropped("srtp_auth") >= before[0] + 2 and dropped("srtp_replay") >= before[1] + 1, 5,
             "srtp_auth and srtp_replay drops counted: " + repr(re.findall(r"^edge_rtp_packets_dropped_total.*$",
                                                                          api.get("/metrics").text, re.M)))
    time.sleep(TALK)                                    # the real stream goes on after the forgeries
    hang_up(call, leg)
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)


# ------------------------------------------------------------------------------ other modes

def test_srtp_pbx_against_a_side_with_srtp_off_gets_488(tmp_path: Path, carrier: PjUA, pbx: PjUA) -> None:
    with srtp_edge(tmp_path, carrier, "off") as off:
        with off.client() as api:
            prof = profile(api, credit="5.00", channels=2)
            register(pbx, off, prof)
            n = len(carrier.incoming_calls)
            call = pbx.call(f"sip:{UK}@{DOMAIN}", tone_hz=PBX_TONE)
            call.wait_state("DISCONNECTED", 10)
            assert call.last_status == 488, call.responses
            final = call.final_response
            assert final is not None and 'srtp = "off"' in " ".join(final["headers"].get("warning", []))
            assert len(carrier.incoming_calls) == n                     # refused before any carrier


def test_optional_customer_and_mandatory_carrier_rekey_both_legs(tmp_path: Path, pool: ParallelPool,
                                                                 pbx: PjUA) -> None:
    srtp_carrier = pool.new("carrier-srtp", bind="127.0.0.2", srtp="optional")
    srtp_carrier.on_incoming(200, tone_hz=CARRIER_TONE)
    plain_pbx = pool.new("pbx-plain", bind="127.0.0.1")
    with srtp_edge(tmp_path, srtp_carrier, "optional", "mandatory") as both:
        with both.client() as api:
            for ua, want_customer in ((pbx, "srtp"), (plain_pbx, "rtp")):
                prof = profile(api, credit="5.00", channels=2)
                register(ua, both, prof)
                call, leg = outgoing(ua, srtp_carrier)
                b_port, b_profile, b_crypto = sdp_of(leg.info["raw"])
                assert b_profile == "RTP/SAVP" and len(b_crypto) == 2
                pbx_keys = {k for _, _, k in sdp_of(answer_raw(call))[2]}
                assert not pbx_keys & {k for _, _, k in b_crypto}       # re-keyed: the legs share no key
                time.sleep(TALK)
                hang_up(call, leg)
                assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
                assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)
                cdr = cdrs(api, prof)[0]
                assert cdr["srtp"]["carrier"] in (CM80, GCM), cdr
                assert (cdr["srtp"]["customer"] != "rtp") == (want_customer == "srtp"), cdr
