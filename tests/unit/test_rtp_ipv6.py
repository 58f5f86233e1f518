"""The relay on IPv6 and across families (issue 11 item 2): a leg per side, each bound to its
side's address, packets bridged between an IPv6 leg and an IPv4 leg; SDP written with
``IN IP6`` toward an IPv6 side and with each side's ``media_advertise``."""

from __future__ import annotations

import select
import socket
import struct

import pytest
from test_rtp_engine import free_window

from edge._rtp import RelayEngine
from edge.media import MediaService
from edge.media.sdp import SdpError, parse_sdp_media, rewrite_sdp


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_ipv6_loopback(), reason="the kernel has no IPv6 loopback (::1)")


def rtp(seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x4242) + b"\x55" * 160


def endpoint(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def receive(s: socket.socket, timeout: float = 2.0) -> tuple[bytes, tuple[str, int]]:
    ready, _, _ = select.select([s], [], [], timeout)
    assert ready, "no packet relayed"
    data, addr = s.recvfrom(4096)
    return data, (addr[0], addr[1])


@pytest.fixture
def bridge():
    """Leg a (customer) on ::1, leg b (carrier) on 127.0.0.1."""
    lo, hi = free_window()
    engine = RelayEngine("::1", lo, hi, quiet_period=0.0, address_b="127.0.0.1")
    engine.start()
    yield engine
    engine.stop()


def test_each_leg_binds_its_own_address_and_family(bridge: RelayEngine) -> None:
    relay = bridge.create("c1")
    assert relay.leg_a.address == "::1" and relay.leg_b.address == "127.0.0.1"
    # the ports really are bound there: binding them again on that address fails
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s, pytest.raises(OSError):
        s.bind(("::1", relay.leg_a.rtp_port))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", relay.leg_b.rtp_port))


def test_packets_are_bridged_between_an_ipv6_leg_and_an_ipv4_leg(bridge: RelayEngine) -> None:
    pbx, carrier = endpoint("::1"), endpoint("127.0.0.1")
    try:
        relay = bridge.create("c2")
        relay.set_remote("a", "::1", pbx.getsockname()[1])
        relay.set_remote("b", "127.0.0.1", carrier.getsockname()[1])
        pbx.sendto(rtp(1), ("::1", relay.leg_a.rtp_port))
        data, src = receive(carrier)
        assert data == rtp(1) and src == ("127.0.0.1", relay.leg_b.rtp_port)  # v6 in, v4 out
        carrier.sendto(rtp(2), ("127.0.0.1", relay.leg_b.rtp_port))
        data, src = receive(pbx)
        assert data == rtp(2) and src == ("::1", relay.leg_a.rtp_port)        # v4 in, v6 out
        stats = relay.stats()
        assert stats.a.rtp.source == ("::1", pbx.getsockname()[1])              # latched on the v6 source
        assert stats.a.rtp.relayed == 1 and stats.b.rtp.relayed == 1
    finally:
        pbx.close()
        carrier.close()


def test_an_ipv6_leg_latches_strictly(bridge: RelayEngine) -> None:
    pbx, intruder, carrier = endpoint("::1"), endpoint("::1"), endpoint("127.0.0.1")
    try:
        relay = bridge.create("c3")
        relay.set_remote("b", "127.0.0.1", carrier.getsockname()[1])
        relay.set_remote("a", "::1", pbx.getsockname()[1])
        pbx.sendto(rtp(1), ("::1", relay.leg_a.rtp_port))
        receive(carrier)
        intruder.sendto(rtp(2), ("::1", relay.leg_a.rtp_port))
        pbx.sendto(rtp(3), ("::1", relay.leg_a.rtp_port))
        data, _ = receive(carrier)
        assert data == rtp(3)
        assert relay.stats().a.rtp.dropped["source"] == 1
    finally:
        for s in (pbx, intruder, carrier):
            s.close()


def test_a_remote_of_the_wrong_family_is_refused_and_ipv6_hold_is_hold(bridge: RelayEngine) -> None:
    relay = bridge.create("c4")
    with pytest.raises(ValueError, match="IPv6"):
        relay.set_remote("a", "127.0.0.1", 4000)
    with pytest.raises(ValueError, match="IPv4"):
        relay.set_remote("b", "::1", 4000)
    relay.set_remote("a", "::", 4000)
    assert relay.stats().a.rtp.remote is None  # "::" is hold: nothing is sent there


OFFER_V6 = (b"v=0\r\no=pbx 1 1 IN IP6 2001:db8::5\r\ns=-\r\nc=IN IP6 2001:db8::5\r\nt=0 0\r\n"
            b"m=audio 4000 RTP/AVP 0\r\na=rtcp:4001 IN IP6 2001:db8::5\r\n")


def test_sdp_toward_an_ipv4_side_from_an_ipv6_offer_and_back() -> None:
    v4 = rewrite_sdp(OFFER_V6, "198.51.100.7", 20000, 20001)
    assert b"c=IN IP4 198.51.100.7\r\n" in v4 and b"o=pbx 1 1 IN IP4 198.51.100.7\r\n" in v4
    assert b"a=rtcp:20001 IN IP4 198.51.100.7" in v4 and b"2001:db8" not in v4
    v6 = rewrite_sdp(v4, "2001:db8::10", 30000, 30001)
    assert b"c=IN IP6 2001:db8::10\r\n" in v6 and b"o=pbx 1 1 IN IP6 2001:db8::10\r\n" in v6
    assert parse_sdp_media(v6).addrtype == "IP6" and b"198.51.100.7" not in v6
    held = rewrite_sdp(OFFER_V6.replace(b"c=IN IP6 2001:db8::5", b"c=IN IP6 ::"), "192.0.2.1", 20000)
    assert b"c=IN IP4 0.0.0.0\r\n" in held  # hold stays hold, in the family of the side it goes to


def test_media_service_writes_each_sides_advertised_address(bridge: RelayEngine) -> None:
    service = MediaService(bridge, advertise={"a": "2001:db8::7", "b": "198.51.100.7"})
    relay = bridge.create("c5")
    toward_carrier = service.anchor(relay, "a", OFFER_V6.replace(b"2001:db8::5", b"::1"))
    assert b"c=IN IP4 198.51.100.7\r\n" in toward_carrier and b"::1" not in toward_carrier
    assert b"m=audio %d " % relay.leg_b.rtp_port in toward_carrier
    answer = (b"v=0\r\no=gw 2 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
              b"m=audio 5000 RTP/AVP 0\r\n")
    toward_pbx = service.anchor(relay, "b", answer)
    assert b"c=IN IP6 2001:db8::7\r\n" in toward_pbx and b"127.0.0.1" not in toward_pbx
    with pytest.raises(SdpError, match="IPv6"):  # an IPv4 offer on the IPv6 side cannot be relayed
        service.anchor(relay, "a", answer)
