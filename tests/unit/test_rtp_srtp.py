"""SRTP in the relay's packet thread: an SRTP leg bridged to an RTP leg, SRTP on both legs
re-keyed per leg, tampered and replayed packets dropped and counted (loopback sockets)."""
from __future__ import annotations

import os

import pytest

from edge._rtp import RelayEngine, SrtpContext
from tests.unit.test_rtp_engine import HOST, edge, free_window, nothing, recv_all, rtp, udp, wait_for

CM80 = "AES_CM_128_HMAC_SHA1_80"
GCM = "AEAD_AES_128_GCM"
KEYLEN = {CM80: 30, GCM: 28}


@pytest.fixture
def engine():
    e = RelayEngine(HOST, *free_window(), quiet_period=0.3, timeout=30.0)
    e.start()
    yield e
    e.stop()


def keyed(suite: str) -> tuple[str, bytes]:
    return (suite, os.urandom(KEYLEN[suite]))


@pytest.mark.parametrize("suite", [CM80, GCM])
def test_srtp_leg_bridged_to_rtp_leg(engine, suite):
    """Leg a speaks SRTP with its key, leg b plain RTP: unprotect one way, protect the other."""
    a, b = udp(), udp()
    r = engine.create("bridge")
    r.set_remote("a", *a.getsockname())
    r.set_remote("b", *b.getsockname())
    pbx_key, edge_key = keyed(suite), keyed(suite)
    r.set_srtp("a", rx=pbx_key, tx=edge_key)
    assert r.srtp("a") == (True, True) and r.srtp("b") == (False, False)
    pbx_tx = SrtpContext(*pbx_key, inbound=False)
    pbx_rx = SrtpContext(*edge_key, inbound=True)
    plain = [rtp(i, payload=os.urandom(160)) for i in range(50)]
    for p in plain:
        a.sendto(pbx_tx.protect(p), edge(r.leg_a))
    got = [d for d, _ in recv_all(b, len(plain))]
    assert got == plain                                 # the carrier gets clear RTP
    back = [rtp(i, ssrc=0x777, payload=os.urandom(160)) for i in range(50)]
    for p in back:
        b.sendto(p, edge(r.leg_b))
    sealed = [d for d, _ in recv_all(a, len(back))]
    assert len(sealed) == len(back)
    assert all(s[12:172] != p[12:] for s, p in zip(sealed, back, strict=True))   # payload encrypted
    assert [pbx_rx.unprotect(s) for s in sealed] == back
    st = r.stats()
    assert st.a.rtp.packets == 50 and st.a.rtp.relayed == 50 and st.b.rtp.relayed == 50
    assert st.a.rtp.dropped_total == 0 and st.b.rtp.dropped_total == 0


def test_srtcp_both_ways(engine):
    a, b, ac, bc = udp(), udp(), udp(), udp()
    r = engine.create("rtcp")
    r.set_remote("a", HOST, a.getsockname()[1], ac.getsockname()[1])
    r.set_remote("b", HOST, b.getsockname()[1], bc.getsockname()[1])
    pbx_key, edge_key = keyed(CM80), keyed(CM80)
    r.set_srtp("a", rx=pbx_key, tx=edge_key)
    report = bytes.fromhex("81c80006") + os.urandom(24)
    ac.sendto(SrtpContext(*pbx_key, inbound=False).protect_rtcp(report), (HOST, r.leg_a.rtcp_port))
    assert [d for d, _ in recv_all(bc, 1)] == [report]
    bc.sendto(report, (HOST, r.leg_b.rtcp_port))
    (sealed, _), = recv_all(ac, 1)
    assert sealed != report and SrtpContext(*edge_key, inbound=True).unprotect_rtcp(sealed) == report


def test_srtp_on_both_legs_is_rekeyed_per_leg(engine):
    a, b = udp(), udp()
    r = engine.create("both")
    r.set_remote("a", *a.getsockname())
    r.set_remote("b", *b.getsockname())
    a_key, edge_a, b_key, edge_b = keyed(CM80), keyed(CM80), keyed(GCM), keyed(GCM)
    r.set_srtp("a", rx=a_key, tx=edge_a)
    r.set_srtp("b", rx=b_key, tx=edge_b)
    p = rtp(1, payload=os.urandom(160))
    a.sendto(SrtpContext(*a_key, inbound=False).protect(p), edge(r.leg_a))
    (got, _), = recv_all(b, 1)
    assert SrtpContext(*edge_b, inbound=True).unprotect(got) == p     # b sees the edge's key for b
    b.sendto(SrtpContext(*b_key, inbound=False).protect(p), edge(r.leg_b))
    (got, _), = recv_all(a, 1)
    assert SrtpContext(*edge_a, inbound=True).unprotect(got) == p


def test_tampered_replayed_and_plain_packets_dropped_and_counted(engine):
    from prometheus_client import CollectorRegistry, generate_latest

    from edge.media.metrics import RtpCollector

    a, b, intruder = udp(), udp(), udp()
    r = engine.create("tamper")
    r.set_remote("a", *a.getsockname())
    r.set_remote("b", *b.getsockname())
    pbx_key = keyed(CM80)
    r.set_srtp("a", rx=pbx_key, tx=keyed(CM80))
    tx = SrtpContext(*pbx_key, inbound=False)
    # Before anything latched: a forged packet from elsewhere must not capture the stream.
    intruder.sendto(rtp(1), edge(r.leg_a))
    assert wait_for(lambda: r.stats().a.rtp.dropped["srtp_auth"] == 1)
    assert not r.stats().a.rtp.latched
    good = tx.protect(rtp(2))
    a.sendto(good, edge(r.leg_a))
    assert len(recv_all(b, 1)) == 1
    assert r.stats().a.rtp.source == a.getsockname()
    tampered = bytearray(tx.protect(rtp(3)))
    tampered[20] ^= 0x40
    a.sendto(bytes(tampered), edge(r.leg_a))            # one bit of payload flipped
    a.sendto(rtp(4), edge(r.leg_a))                     # plain RTP on an SRTP leg
    a.sendto(good, edge(r.leg_a))                       # a replay
    assert wait_for(lambda: r.stats().a.rtp.dropped["srtp_auth"] == 3)
    assert wait_for(lambda: r.stats().a.rtp.dropped["srtp_replay"] == 1)
    assert nothing(b)
    assert r.stats().a.rtp.relayed == 1
    reg = CollectorRegistry()
    reg.register(RtpCollector(engine))
    text = generate_latest(reg).decode()
    assert 'edge_rtp_packets_dropped_total{reason="srtp_auth"} 3.0' in text
    assert 'edge_rtp_packets_dropped_total{reason="srtp_replay"} 1.0' in text


def test_reoffer_with_the_same_key_keeps_the_context_a_new_key_replaces_it(engine):
    a, b = udp(), udp()
    r = engine.create("rekey")
    r.set_remote("a", *a.getsockname())
    r.set_remote("b", *b.getsockname())
    k1 = keyed(CM80)
    r.set_srtp("a", rx=k1)
    first = SrtpContext(*k1, inbound=False).protect(rtp(10))
    a.sendto(first, edge(r.leg_a))
    assert len(recv_all(b, 1)) == 1
    r.set_srtp("a", rx=k1)                              # same key: the replay window goes on
    a.sendto(first, edge(r.leg_a))
    assert wait_for(lambda: r.stats().a.rtp.dropped["srtp_replay"] == 1)
    k2 = keyed(CM80)
    r.set_srtp("a", rx=k2)
    a.sendto(SrtpContext(*k2, inbound=False).protect(rtp(11)), edge(r.leg_a))
    assert len(recv_all(b, 1)) == 1
    r.set_srtp("a")                                     # back to plain RTP
    a.sendto(rtp(12), edge(r.leg_a))
    assert [d for d, _ in recv_all(b, 1)] == [rtp(12)]


def test_delete_frees_srtp_sessions_and_slot_reuse_is_plain():
    engine = RelayEngine(HOST, *free_window(), quiet_period=0.0)
    engine.start()
    for i in range(200):
        r = engine.create(f"c{i}")
        r.set_srtp("a", rx=keyed(CM80), tx=keyed(CM80))
        r.set_srtp("b", rx=keyed(GCM), tx=keyed(GCM))
        r.delete()
    r = engine.create("plain")
    a, b = udp(), udp()
    r.set_remote("a", *a.getsockname())
    r.set_remote("b", *b.getsockname())
    a.sendto(rtp(1), edge(r.leg_a))
    assert [d for d, _ in recv_all(b, 1)] == [rtp(1)]
    engine.stop()


def test_bad_srtp_parameters_leave_the_leg_as_it_was(engine):
    from edge._rtp import SrtpError

    r = engine.create("bad")
    with pytest.raises(SrtpError):
        r.set_srtp("a", rx=(CM80, b"short"), tx=keyed(CM80))
    assert r.srtp("a") == (False, False)
    with pytest.raises(ValueError):
        r.set_srtp("c", rx=keyed(CM80))


def test_rtcp_muxed_on_the_rtp_port_is_srtcp_there(engine):
    """RFC 5761: with rtcp-mux, RTCP (packet types 192-223) shares the RTP port; on an SRTP leg it
    is SRTCP, unprotected and protected as such."""
    a, b = udp(), udp()
    r = engine.create("mux")
    r.set_remote("a", *a.getsockname())
    r.set_remote("b", *b.getsockname())
    pbx_key, edge_key = keyed(CM80), keyed(CM80)
    r.set_srtp("a", rx=pbx_key, tx=edge_key)
    report = bytes.fromhex("81c80006") + os.urandom(24)
    a.sendto(SrtpContext(*pbx_key, inbound=False).protect_rtcp(report), edge(r.leg_a))
    assert [d for d, _ in recv_all(b, 1)] == [report]
    b.sendto(report, edge(r.leg_b))
    (sealed, _), = recv_all(a, 1)
    assert SrtpContext(*edge_key, inbound=True).unprotect_rtcp(sealed) == report
