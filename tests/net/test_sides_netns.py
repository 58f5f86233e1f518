"""Two sides on real interfaces (issue 11 "How it is checked"): network namespaces made here.

Topology of the IPv4 case -- a cloud VM behind a 1:1 NAT, with a carrier interface::

    pbx 198.51.100.20 ── 198.51.100.1 (+ .7) nat 172.16.0.1 ── 172.16.0.10 edge 10.0.0.10 ── 10.0.0.20 carrier
                          1:1 NAT 198.51.100.7 <-> 172.16.0.10

The edge's customer side listens on its private 172.16.0.10 and advertises the public
198.51.100.7 (``advertise``, ``media_advertise``); its carrier side is 10.0.0.10. The
IPv6 case gives the PBX and the customer side 2001:db8:1::/64 and keeps the carrier on
IPv4, so the relay bridges the families. In both, a pjsua2 PBX registers, calls out and
is called, with tones both ways; a capture in the PBX's and in the carrier's namespace
proves that no carrier-side address ever reached the PBX, no customer-side address
ever reached the carrier, and that the PBX only ever saw the advertised address.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pjsua2")

from e2e.pjua import PjUA, provision_profile
from e2e.test_calls_e2e import RATES, assert_hears, wait_for
from edgeproc import EdgeProcess

from net.netns import Capture, Lab, NetnsUnavailable, check_available

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DOMAIN = "sip.edge.test"
PBX_TONE, CARRIER_TONE = 440.0, 1000.0
TALK = 1.2
UK = "+442071234567"


@pytest.fixture(scope="module", autouse=True)
def _netns_possible() -> None:
    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (make system-deps installs nftables)")


class Site:
    """A built topology: its namespaces, the edge in one of them, the two peers."""

    def __init__(self, lab: Lab, stack: ExitStack, tmp: Path) -> None:
        self.lab = lab
        self.stack = stack
        self.tmp = tmp
        self.ns: dict[str, str] = {}
        self.edge: EdgeProcess | None = None

    def ua(self, ns: str, name: str, bind: str) -> PjUA:
        with self.lab.inside(self.ns[ns]):
            ua = PjUA(name, bind=bind, log_dir=self.tmp / "uas")
        self.stack.callback(ua.close)
        return ua

    def start_edge(self, sides: str, carrier_uri: str, trusted: str) -> EdgeProcess:
        (self.tmp / "edge").mkdir(parents=True, exist_ok=True)
        edge = EdgeProcess(self.tmp / "edge")
        edge.config.write_text(
            f'[sip]\ndomain = "{DOMAIN}"\nrate_limit = 0\n{sides}\n'
            f'[api]\nlisten = "127.0.0.1:{edge.api_port}"\ntoken = "test-admin-token-0123456789"\n'
            f'[storage]\npath = "{edge.data}"\nmap_size_mb = 128\n'
            f'[inbound]\ntrusted = ["{trusted}"]\n'
            f'[[carriers]]\nuri = "{carrier_uri}"\n')
        with self.lab.inside(self.ns["edge"]):
            edge.start()
        self.stack.callback(edge.stop)
        self.edge = edge
        return edge

    def api(self, method: str, path: str, **kw: Any) -> Any:
        assert self.edge is not None
        with self.lab.inside(self.ns["edge"]), self.edge.client() as api:
            return getattr(api, method)(path, **kw)

    def provision(self) -> tuple[dict[str, Any], str]:
        """Rates, a funded profile and an online number of it."""
        assert self.edge is not None
        number = f"+1415555{uuid.uuid4().int % 10000:04d}"
        with self.lab.inside(self.ns["edge"]), self.edge.client() as api:
            assert api.put("/v1/rates", json={"rates": RATES}).status_code == 200
            prof = provision_profile(api, name="hq", credit="5.00", channels=2)
            acct = prof["account"]["id"]
            assert api.post(f"/v1/accounts/{acct}/numbers", json={"number": number}).status_code == 201
            assert api.post(f"/v1/profiles/{prof['id']}/numbers", json={"number": number}).status_code == 201
        return prof, number


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with ExitStack() as stack:
        lab = stack.enter_context(Lab(uuid.uuid4().hex[:4]))
        yield Site(lab, stack, tmp_path)
        # ExitStack: UAs close, the edge stops, then the namespaces go -- even after a failure


def calls_both_ways(site: Site, pbx: PjUA, carrier: PjUA, registrar: str, edge_carrier_host: str) -> None:
    """Registration, an outgoing and an incoming call, each with audio both ways."""
    prof, number = site.provision()
    assert pbx.register(registrar, prof["sip_username"], prof["sip_password"], domain=DOMAIN) == 200

    carrier.on_incoming(200, tone_hz=CARRIER_TONE)
    call = pbx.call(f"sip:{UK}@{DOMAIN}", tone_hz=PBX_TONE)
    call.wait_state("CONFIRMED", 15)
    leg = carrier.wait_incoming(1, 5)
    leg.wait_state("CONFIRMED", 5)
    time.sleep(TALK)
    call.hangup(timeout=10)
    leg.wait_state("DISCONNECTED", 10)
    assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)

    pbx.on_incoming(200, tone_hz=PBX_TONE)
    host = f"[{edge_carrier_host}]" if ":" in edge_carrier_host else edge_carrier_host
    inc = carrier.call(f"sip:{number}@{host}:5060", tone_hz=CARRIER_TONE)
    inc.wait_state("CONFIRMED", 15)
    ring = pbx.wait_incoming(1, 5)
    ring.wait_state("CONFIRMED", 5)
    time.sleep(TALK)
    inc.hangup(timeout=10)
    ring.wait_state("DISCONNECTED", 10)
    assert_hears(inc.record_wav, PBX_TONE, CARRIER_TONE)
    assert_hears(ring.record_wav, CARRIER_TONE, PBX_TONE)

    def cdrs() -> list[dict[str, Any]]:
        items = site.api("get", f"/v1/profiles/{prof['id']}/cdrs").json()["items"]
        return items if len(items) >= 2 else []
    directions = sorted(c["direction"] for c in wait_for(cdrs, 5.0, "two CDRs"))
    assert directions == ["incoming", "outgoing"]


def assert_never_seen(capture: Capture, where: str, nets: tuple[str, ...], texts: tuple[bytes, ...]) -> None:
    import ipaddress

    networks = [ipaddress.ip_network(n) for n in nets]
    leaked = sorted(a for a in capture.addresses() if any(ipaddress.ip_address(a) in n for n in networks))
    assert not leaked, f"{where} exchanged packets with {leaked}"
    for text in texts:
        found = capture.containing(text)
        assert not found, f"{where} received {text!r}: {found[0].data[:600]!r}"


def routable(addresses: set[str]) -> set[str]:
    """Without the link's own IPv6 chatter (neighbour discovery, MLD: link-local, multicast, ::)."""
    import ipaddress

    return {a for a in addresses if not (ipaddress.ip_address(a).is_link_local or ipaddress.ip_address(a).is_multicast
                                         or ipaddress.ip_address(a).is_unspecified)}


def sip_from(capture: Capture, source: str) -> list[bytes]:
    return [p.data[8:] for p in capture.packets if p.src == source and p.proto == 17 and b"SIP/2.0" in p.data[:400]]


def test_cloud_vm_behind_a_1to1_nat_with_a_carrier_interface(site: Site) -> None:
    lab = site.lab
    for name in ("pbx", "nat", "edge", "carrier"):
        site.ns[name] = lab.host(name)
    ns = site.ns
    lab.link(ns["pbx"], "eth0", ["198.51.100.20/24"], ns["nat"], "wan0", ["198.51.100.1/24", "198.51.100.7/32"])
    lab.link(ns["nat"], "lan0", ["172.16.0.1/24"], ns["edge"], "cust0", ["172.16.0.10/24"])
    lab.link(ns["edge"], "carr0", ["10.0.0.10/24"], ns["carrier"], "eth0", ["10.0.0.20/24"])
    lab.route(ns["edge"], "default", "via", "172.16.0.1")
    lab.nat_1to1(ns["nat"], public="198.51.100.7", private="172.16.0.10")

    pbx_seen, carrier_seen = Capture(lab, ns["pbx"]), Capture(lab, ns["carrier"])
    site.stack.callback(pbx_seen.stop)
    site.stack.callback(carrier_seen.stop)
    carrier = site.ua("carrier", "carrier", "10.0.0.20")
    site.start_edge(
        '[sides.customer]\nlisten = ["udp:172.16.0.10:5060", "tcp:172.16.0.10:5060"]\n'
        'advertise = "198.51.100.7"\nmedia_advertise = "198.51.100.7"\n'
        '[sides.carrier]\nlisten = ["udp:10.0.0.10:5060"]\n',
        carrier_uri=f"sip:10.0.0.20:{carrier.port}", trusted="10.0.0.20/32")
    pbx = site.ua("pbx", "pbx", "198.51.100.20")

    calls_both_ways(site, pbx, carrier, "sip:198.51.100.7:5060", "10.0.0.10")
    pbx_seen.stop()
    carrier_seen.stop()

    # the PBX saw the advertised address and nothing else of the edge, nothing of the carrier
    assert routable(pbx_seen.addresses()) == {"198.51.100.20", "198.51.100.7"}
    assert_never_seen(pbx_seen, "the PBX", ("10.0.0.0/24", "172.16.0.0/24"), (b"10.0.0.", b"172.16.0."))
    from_edge = b"".join(sip_from(pbx_seen, "198.51.100.7"))
    assert b"Contact: <sip:198.51.100.7:5060" in from_edge           # 200 to the INVITE, the incoming INVITE
    assert b"Via: SIP/2.0/UDP 198.51.100.7:5060" in from_edge         # the incoming INVITE's Via
    assert b"c=IN IP4 198.51.100.7" in from_edge and b"o=" in from_edge
    rtp_sources = {p.src for p in pbx_seen.packets if p.proto == 17 and len(p.data) > 100 and p.data[8] == 0x80}
    assert rtp_sources == {"198.51.100.20", "198.51.100.7"}, rtp_sources

    # the carrier saw the carrier side only
    assert_never_seen(carrier_seen, "the carrier", ("198.51.100.0/24", "172.16.0.0/24"),
                      (b"198.51.100.", b"172.16.0."))
    to_carrier = b"".join(sip_from(carrier_seen, "10.0.0.10"))
    assert b"Via: SIP/2.0/UDP 10.0.0.10:5060" in to_carrier and b"c=IN IP4 10.0.0.10" in to_carrier


class RawPbx6:
    """A PBX on IPv6 from raw sockets: the pjsua2 build here has no IPv6 media (PJ_HAS_IPV6 is
    off for pjsua), so SIP and RTP are written by hand -- digest from tests/sip/rawsip.py."""

    def __init__(self, host: str, edge: str) -> None:
        import socket

        self.host, self.edge = host, (edge, 5060)
        self.sip = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sip.bind((host, 0))
        self.sip.settimeout(5)
        self.rtp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.rtp.bind((host, 0))
        self.rtp.settimeout(0.02)
        self.port, self.rtp_port = self.sip.getsockname()[1], self.rtp.getsockname()[1]

    def close(self) -> None:
        self.sip.close()
        self.rtp.close()

    def msg(self, method: str, ruri: str, user: str, call_id: str, cseq: int, *, to: str, tag: str = "",
            to_tag: str = "", extra: tuple[str, ...] = (), body: bytes = b"") -> bytes:
        import secrets

        head = [f"{method} {ruri} SIP/2.0",
                f"Via: SIP/2.0/UDP [{self.host}]:{self.port};branch=z9hG4bK{secrets.token_hex(6)};rport",
                "Max-Forwards: 70", f"From: <sip:{user}@{DOMAIN}>;tag={tag or 'pbx6'}",
                f"To: <sip:{to}@{DOMAIN}>" + (f";tag={to_tag}" if to_tag else ""), f"Call-ID: {call_id}",
                f"CSeq: {cseq} {method}", f"Contact: <sip:{user}@[{self.host}]:{self.port}>", *extra,
                *(["Content-Type: application/sdp"] if body else []), f"Content-Length: {len(body)}"]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    def ask(self, data: bytes) -> Any:
        from edge.sip import parse

        sent = parse(data)
        self.sip.sendto(data, self.edge)
        while True:  # a retransmitted answer to an earlier request (the 407 we did not ACK) is not ours
            reply = parse(self.sip.recvfrom(65535)[0])
            if reply.status >= 200 and (reply.cseq, reply.cseq_method) == (sent.cseq, sent.method):
                return reply

    def authed(self, method: str, ruri: str, user: str, password: str, call_id: str, *, to: str,
               body: bytes = b"") -> Any:
        from rawsip import digest

        first = self.ask(self.msg(method, ruri, user, call_id, 1, to=to, body=body))
        if first.status not in (401, 407):
            return first
        name = "WWW-Authenticate" if first.status == 401 else "Proxy-Authenticate"
        challenge = next(v for v in first.headers(name) if "MD5" in v)
        auth = digest(method, ruri, user, password, challenge, algorithm="MD5")
        header = "Authorization" if first.status == 401 else "Proxy-Authorization"
        return self.ask(self.msg(method, ruri, user, call_id, 2, to=to, extra=(f"{header}: {auth}",), body=body))

    def talk(self, dest: tuple[str, int], seconds: float) -> list[tuple[str, bytes]]:
        """Send 20 ms PCMU frames of a PBX_TONE sine to ``dest``; what came back (source, packet)."""
        import math
        import struct

        got: list[tuple[str, bytes]] = []
        for seq in range(int(seconds * 50)):
            pcm = [int(8000 * math.sin(2 * math.pi * PBX_TONE * (seq * 160 + i) / 8000)) for i in range(160)]
            self.rtp.sendto(struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x6666) + bytes(map(ulaw, pcm)), dest)
            try:
                while True:
                    data, src = self.rtp.recvfrom(2048)
                    got.append((src[0], data))
            except TimeoutError:
                pass
        return got


def ulaw(sample: int) -> int:
    """G.711 mu-law of one 16-bit sample (ITU-T G.711, the classic bias-and-segment form)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = max(0, magnitude.bit_length() - 8)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def test_ipv6_pbx_and_ipv4_carrier_bridged_by_the_relay(site: Site) -> None:
    lab = site.lab
    for name in ("pbx", "edge", "carrier"):
        site.ns[name] = lab.host(name)
    ns = site.ns
    lab.link(ns["pbx"], "eth0", ["2001:db8:1::20/64"], ns["edge"], "cust0", ["2001:db8:1::10/64"])
    lab.link(ns["edge"], "carr0", ["10.0.0.10/24"], ns["carrier"], "eth0", ["10.0.0.20/24"])

    pbx_seen, carrier_seen = Capture(lab, ns["pbx"]), Capture(lab, ns["carrier"])
    site.stack.callback(pbx_seen.stop)
    site.stack.callback(carrier_seen.stop)
    carrier = site.ua("carrier", "carrier", "10.0.0.20")
    site.start_edge(
        '[sides.customer]\nlisten = ["udp:[2001:db8:1::10]:5060", "tcp:[2001:db8:1::10]:5060"]\n'
        '[sides.carrier]\nlisten = ["udp:10.0.0.10:5060"]\n',
        carrier_uri=f"sip:10.0.0.20:{carrier.port}", trusted="10.0.0.20/32")
    prof, number = site.provision()
    user, password = prof["sip_username"], prof["sip_password"]
    with lab.inside(ns["pbx"]):
        pbx = RawPbx6("2001:db8:1::20", "2001:db8:1::10")  # its sockets belong to the PBX's namespace
        site.stack.callback(pbx.close)
        ok = pbx.authed("REGISTER", f"sip:{DOMAIN}", user, password, "reg6", to=user)
        assert ok.status == 200, ok.status
        carrier.on_incoming(200, tone_hz=CARRIER_TONE)
        offer = (f"v=0\r\no=- 1 1 IN IP6 2001:db8:1::20\r\ns=-\r\nc=IN IP6 2001:db8:1::20\r\nt=0 0\r\n"
                 f"m=audio {pbx.rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n").encode()
        answer = pbx.authed("INVITE", f"sip:{UK}@{DOMAIN}", user, password, "call6", to=UK, body=offer)
        assert answer.status == 200, answer.status
        text = answer.body.decode()
        assert "c=IN IP6 2001:db8:1::10" in text
        relay_port = int(text.split("m=audio ", 1)[1].split()[0])
        to_tag = answer.to_tag
        pbx.sip.sendto(pbx.msg("ACK", f"sip:{UK}@{DOMAIN}", user, "call6", 2, to=UK, to_tag=to_tag), pbx.edge)
        leg = carrier.wait_incoming(1, 5)
        leg.wait_state("CONFIRMED", 5)
        heard = pbx.talk(("2001:db8:1::10", relay_port), 2.0)
        bye = pbx.ask(pbx.msg("BYE", f"sip:{UK}@{DOMAIN}", user, "call6", 3, to=UK, to_tag=to_tag))
        assert bye.status == 200
    leg.wait_state("DISCONNECTED", 10)
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)              # IPv6 PBX -> IPv4 carrier
    assert len(heard) > 40 and {src for src, _ in heard} == {"2001:db8:1::10"}  # IPv4 carrier -> IPv6 PBX
    pbx_seen.stop()
    carrier_seen.stop()

    assert routable(pbx_seen.addresses()) == {"2001:db8:1::20", "2001:db8:1::10"}  # IPv6 only, toward the PBX
    assert_never_seen(pbx_seen, "the PBX", ("10.0.0.0/24",), (b"10.0.0.", b"IN IP4"))
    assert routable(carrier_seen.addresses()) == {"10.0.0.20", "10.0.0.10"}
    assert_never_seen(carrier_seen, "the carrier", ("2001:db8:1::/64",), (b"2001:db8:1", b"IN IP6"))
    to_carrier = b"".join(sip_from(carrier_seen, "10.0.0.10"))
    assert b"c=IN IP4 10.0.0.10" in to_carrier
