"""RTP relay engine (edge/_rtp.pyx) with real UDP sockets on loopback."""
import asyncio
import os
import random
import select
import socket
import struct
import threading
import time

import pytest

from edge._rtp import DROP_REASONS, RelayEngine
from edge.media import MediaService

HOST = "127.0.0.1"


def rtp(seq, ts=None, ssrc=0x1234, pt=0, payload=None):
    body = payload if payload is not None else struct.pack("!H", seq & 0xFFFF) * 80
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, (seq * 160 if ts is None else ts) & 0xFFFFFFFF,
                       ssrc) + body


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    s.settimeout(2.0)
    return s


def recv_all(s, n, timeout=2.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if r:
            out.append(s.recvfrom(4096))
    return out


def nothing(s, wait=0.15):
    r, _, _ = select.select([s], [], [], wait)
    return not r


def wait_for(cond, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def free_window(size=100):
    """A random window of ports that are all free right now (other suites share this host)."""
    for _ in range(100):
        base = random.randrange(10000, 19800, 2)
        socks = []
        try:
            for p in range(base, base + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((HOST, p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base, base + size - 1
    pytest.skip("no free port window")


@pytest.fixture
def port_range():
    # The engine also skips ports someone grabs later, but tiny ranges need them all.
    return free_window()


@pytest.fixture
def engine(port_range):
    e = RelayEngine(HOST, *port_range, quiet_period=0.3, timeout=30.0)
    e.start()
    yield e
    e.stop()


@pytest.fixture
def call(engine):
    """A relay with endpoint sockets A and B whose remotes are set from 'SDP'."""
    a, b = udp(), udp()
    r = engine.create("call-1")
    r.set_remote("a", *a.getsockname())
    r.set_remote("b", *b.getsockname())
    yield r, a, b
    a.close()
    b.close()


def edge(leg):
    return (leg.address, leg.rtp_port)


def test_ports_even_rtcp_plus_one(engine, port_range):
    r = engine.create("x")
    for leg in (r.leg_a, r.leg_b):
        assert leg.rtp_port % 2 == 0 and leg.rtcp_port == leg.rtp_port + 1
        assert port_range[0] <= leg.rtp_port < leg.rtcp_port <= port_range[1]
        assert leg.address == HOST
    assert r.leg_a.rtp_port != r.leg_b.rtp_port
    assert engine.get(r.id) is r and engine.get(12345678) is None


def test_relay_both_ways_payload_intact(call):
    r, a, b = call
    sent_ab = [rtp(i, payload=os.urandom(160)) for i in range(100)]
    sent_ba = [rtp(i, ssrc=0x9999, payload=os.urandom(160)) for i in range(100)]
    for p in sent_ab:
        a.sendto(p, edge(r.leg_a))
    got = recv_all(b, len(sent_ab))
    assert [d for d, _ in got] == sent_ab
    assert {src for _, src in got} == {edge(r.leg_b)}      # B sees only the edge
    for p in sent_ba:
        b.sendto(p, edge(r.leg_b))
    got = recv_all(a, len(sent_ba))
    assert [d for d, _ in got] == sent_ba
    assert {src for _, src in got} == {edge(r.leg_a)}


def test_rtcp_relayed_on_rtp_plus_one(engine):
    a, b = udp(), udp()
    ac, bc = udp(), udp()
    r = engine.create("rtcp")
    r.set_remote("a", HOST, a.getsockname()[1], ac.getsockname()[1])
    r.set_remote("b", HOST, b.getsockname()[1], bc.getsockname()[1])
    sr = bytes([0x80, 200, 0, 6]) + os.urandom(24)            # RFC 3550 §6.4.1 SR
    ac.sendto(sr, (HOST, r.leg_a.rtcp_port))
    assert bc.recvfrom(2048) == (sr, (HOST, r.leg_b.rtcp_port))
    bc.sendto(sr[::-1][:0] + sr, (HOST, r.leg_b.rtcp_port))
    assert ac.recvfrom(2048)[0] == sr
    st = r.stats()
    assert st.a.rtcp.packets == 1 and st.b.rtcp.packets == 1 and st.a.rtcp.lost == 0
    for s in (a, b, ac, bc):
        s.close()


def test_counters_match_and_loss_from_seq_gaps(call):
    r, a, b = call
    skipped = {10, 20, 21, 77}
    seqs = [s for s in range(65530, 65536 + 100) if (s - 65530) not in skipped]   # wraps at 65535
    for s in seqs:
        a.sendto(rtp(s), edge(r.leg_a))
    assert len(recv_all(b, len(seqs))) == len(seqs)
    st = r.stats().a.rtp
    assert st.packets == len(seqs) and st.bytes == 172 * len(seqs)
    assert st.relayed == len(seqs) and st.relayed_bytes == 172 * len(seqs)
    assert st.lost == len(skipped)
    assert st.dropped_total == 0 and st.latched and st.source == a.getsockname()
    assert r.stats().b.rtp.packets == 0
    t = r.engine.totals()
    assert t["packets_relayed"] == len(seqs) and t["lost"] == len(skipped)


def test_jitter_rfc3550(call):
    r, a, b = call
    # Sent back to back while the RTP clock advances 160 per packet: every D is ~160,
    # so J approaches 160 as J += (|D| - J) / 16 (RFC 3550 A.8).
    n = 40
    for i in range(n):
        a.sendto(rtp(i), edge(r.leg_a))
    recv_all(b, n)
    j = r.stats().a.rtp.jitter
    expected = 160 * (1 - (15 / 16) ** (n - 1))
    assert expected - 25 < j < expected + 25
    assert r.stats().a.rtp.jitter_ms == pytest.approx(j / 8.0)


def test_jitter_small_when_paced(call):
    r, a, b = call
    t0 = time.monotonic()
    for i in range(25):
        while time.monotonic() < t0 + i * 0.02:
            time.sleep(0.001)
        a.sendto(rtp(i), edge(r.leg_a))
    recv_all(b, 25)
    assert r.stats().a.rtp.jitter_ms < 10.0


def test_dtmf_packets_do_not_disturb_jitter(call):
    r, a, b = call
    for i in range(20):
        a.sendto(rtp(i), edge(r.leg_a))
    # RFC 4733 events keep one timestamp for the whole event.
    for i in range(20, 30):
        a.sendto(rtp(i, ts=20 * 160, pt=101, payload=b"\x01\x0a\x00\xa0"), edge(r.leg_a))
    got = recv_all(b, 30)
    assert got[-1][0][12:] == b"\x01\x0a\x00\xa0"
    st = r.stats().a.rtp
    assert st.packets == 30 and st.lost == 0


def test_latching_follows_nat_source(call):
    r, a, b = call
    # The SDP said one port; packets really come from another (NAT): replies follow them.
    nat = udp()
    r.set_remote("a", HOST, 9)                   # discard port: nobody there
    nat.sendto(rtp(1), edge(r.leg_a))
    assert b.recvfrom(2048)[0] == rtp(1)
    b.sendto(rtp(1, ssrc=7), edge(r.leg_b))
    assert nat.recvfrom(2048)[0] == rtp(1, ssrc=7)
    assert r.stats().a.rtp.source == nat.getsockname()
    nat.close()


def test_hijack_dropped_and_counted_until_reinvite(call):
    r, a, b = call
    a.sendto(rtp(1), edge(r.leg_a))
    assert b.recvfrom(2048)[0] == rtp(1)
    evil = udp()
    for i in range(5):
        evil.sendto(rtp(100 + i, ssrc=666), edge(r.leg_a))
    assert nothing(b)
    b.sendto(rtp(2, ssrc=7), edge(r.leg_b))
    assert a.recvfrom(2048)[0] == rtp(2, ssrc=7)
    assert nothing(evil, 0.05)
    st = r.stats().a.rtp
    assert st.dropped["source"] == 5 and st.packets == 1 and st.source == a.getsockname()
    # A re-INVITE (new SDP for leg A) re-arms latching: the next source wins.
    a2 = udp()
    r.set_remote("a", *a2.getsockname())
    a2.sendto(rtp(1, ssrc=55), edge(r.leg_a))
    assert b.recvfrom(2048)[0] == rtp(1, ssrc=55)
    a.sendto(rtp(3), edge(r.leg_a))              # the old source is now the stranger
    assert nothing(b)
    b.sendto(rtp(3, ssrc=7), edge(r.leg_b))
    assert a2.recvfrom(2048)[0] == rtp(3, ssrc=7)
    assert r.stats().a.rtp.dropped["source"] == 6
    evil.close()
    a2.close()


def test_hold_drops_towards_held_leg(call):
    r, a, b = call
    r.set_remote("b", "0.0.0.0", 0)              # RFC 2543 hold
    for i in range(3):
        a.sendto(rtp(i), edge(r.leg_a))
    assert wait_for(lambda: r.stats().a.rtp.dropped["no_dest"] == 3)
    assert nothing(b, 0.05)
    r.set_remote("b", *b.getsockname())          # resume
    a.sendto(rtp(5), edge(r.leg_a))
    assert b.recvfrom(2048)[0] == rtp(5)


def test_no_remote_yet_is_no_dest(engine):
    a = udp()
    r = engine.create("early")
    a.sendto(rtp(1), edge(r.leg_a))
    assert wait_for(lambda: r.stats().a.rtp.dropped["no_dest"] == 1)
    a.close()


def test_bad_packets_dropped_counted_loop_survives(call):
    r, a, b = call
    bad = [b"", b"\x80\x00\x00", b"\x80" * 11,                 # short
           b"\x40" + b"\x00" * 171, b"\x00" * 172, b"\xc0" * 172,  # version 1, 0, 3
           b"\x80" + b"\x00" * 1599, b"\x80" * 4000]             # oversize
    for p in bad:
        a.sendto(p, edge(r.leg_a))
    a.sendto(rtp(1), edge(r.leg_a))
    assert b.recvfrom(2048)[0] == rtp(1)
    st = r.stats().a.rtp
    assert st.dropped["short"] == 3 and st.dropped["version"] == 3 and st.dropped["oversize"] == 2
    assert st.packets == 1
    assert set(st.dropped) == set(DROP_REASONS)


def test_echo_returns_packets_to_source(engine):
    a, b = udp(), udp()
    r = engine.create("echo")
    r.set_echo("a")
    pkts = [rtp(i, payload=os.urandom(160)) for i in range(20)]
    for p in pkts:
        a.sendto(p, edge(r.leg_a))
    got = recv_all(a, 20)
    assert [d for d, _ in got] == pkts and {s for _, s in got} == {edge(r.leg_a)}
    assert nothing(b, 0.05)
    st = r.stats()
    assert st.a.echo and st.a.rtp.relayed == 20
    a.close()
    b.close()


def test_timeout_event_via_event_fd(engine):
    r = engine.create("quiet-call", timeout=0.3)
    keep = engine.create("busy-call", timeout=0.3)
    a = udp()
    keep.set_remote("b", *udp().getsockname())
    t0 = time.monotonic()
    events = []
    while time.monotonic() - t0 < 3 and not events:
        a.sendto(rtp(int((time.monotonic() - t0) * 50)), edge(keep.leg_a))
        rd, _, _ = select.select([engine.event_fd], [], [], 0.05)
        if rd:
            events = engine.drain_events()
    assert [(e.relay_id, e.tag, e.kind) for e in events] == [(r.id, "quiet-call", "timeout")]
    assert 0.25 < time.monotonic() - t0 < 2.0
    # Reported once.
    rd, _, _ = select.select([engine.event_fd], [], [], 0.4)
    assert engine.drain_events() == [] or all(e.relay_id != r.id for e in engine.drain_events())
    a.close()


def test_timeout_zero_never_fires(engine):
    engine.create("forever", timeout=0)
    rd, _, _ = select.select([engine.event_fd], [], [], 0.3)
    assert not rd and engine.drain_events() == []


def test_media_service_calls_back_on_loop(engine):
    async def main():
        seen = []
        done = asyncio.Event()

        def on_event(relay_id, tag, kind):
            seen.append((relay_id, tag, kind))
            done.set()

        svc = MediaService(engine, on_event=on_event)
        svc.start()
        r = engine.create("async-call", timeout=0.2)
        await asyncio.wait_for(done.wait(), 3)
        svc.close()
        return r, seen

    r, seen = asyncio.run(main())
    assert seen == [(r.id, "async-call", "timeout")]
    assert not engine.running


def test_media_service_anchor_sdp(engine):
    a = udp()
    svc = MediaService(engine, loop=asyncio.new_event_loop())
    r = engine.create("sdp-call")
    port = a.getsockname()[1]
    offer = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
             b"m=audio %d RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n" % port)
    out = svc.anchor(r, "a", offer)
    assert b"m=audio %d RTP/AVP 0 101" % r.leg_b.rtp_port in out
    assert r.stats().a.rtp.remote == (HOST, port)
    a.close()


def test_delete_returns_final_stats_and_quiet_period(port_range):
    lo = port_range[0]
    e = RelayEngine(HOST, lo, lo + 7, quiet_period=0.4)    # 4 pairs = 2 relays
    e.start()
    try:
        r1 = e.create("1")
        e.create("2")                                          # the other two pairs: the range is full
        a = udp()
        r1.set_remote("b", *udp().getsockname())
        a.sendto(rtp(1), edge(r1.leg_a))
        assert wait_for(lambda: r1.stats().a.rtp.packets == 1)
        ports = {r1.leg_a.rtp_port, r1.leg_b.rtp_port}
        st = e.delete(r1.id)
        assert st.a.rtp.packets == 1 and st.tag == "1" and r1.deleted
        assert e.delete(r1.id) is None and r1.delete() is None
        with pytest.raises(RuntimeError):
            r1.stats()
        with pytest.raises(RuntimeError):
            e.create("3")                                      # freed ports are still quiet
        time.sleep(0.45)
        r3 = e.create("3")
        assert {r3.leg_a.rtp_port, r3.leg_b.rtp_port} == ports
        assert e.totals()["packets_received"] == 1             # deleted relays still counted
        a.close()
    finally:
        e.stop()


def test_stop_frees_every_port_and_is_idempotent(port_range):
    e = RelayEngine(HOST, *port_range, quiet_period=5.0)
    e.start()
    relays = [e.create(f"r{i}") for i in range(10)]
    e.delete(relays[0].id)                     # in its quiet period when stop() runs
    ports = [p for r in relays for leg in (r.leg_a, r.leg_b) for p in (leg.rtp_port, leg.rtcp_port)]
    e.stop()
    e.stop()
    assert not e.running and e.active_relays == 0
    socks = []
    for p in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST, p))                      # would raise EADDRINUSE if leaked
        socks.append(s)
    for s in socks:
        s.close()
    # A stopped engine can be started again and hands out ports immediately.
    e.start()
    assert e.create("again").leg_a.rtp_port in ports
    e.stop()


def test_busy_port_is_skipped(port_range):
    lo = port_range[0]
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind((HOST, lo + 1))              # the first pair's RTCP port
    e = RelayEngine(HOST, lo, lo + 15)
    try:
        r = e.create("x")
        assert lo not in (r.leg_a.rtp_port, r.leg_b.rtp_port)
    finally:
        e.stop()
        squatter.close()


def test_bad_arguments(engine):
    r = engine.create("x")
    with pytest.raises(ValueError):
        r.set_remote("c", HOST, 4000)
    with pytest.raises(ValueError):
        r.set_remote("a", "not-an-ip", 4000)
    with pytest.raises(ValueError):
        r.set_remote("a", HOST, 70000)
    with pytest.raises(ValueError):
        RelayEngine(HOST, 5000, 4000)
    with pytest.raises(ValueError):
        RelayEngine("not-an-ip", 5000, 6000)
    with pytest.raises(ValueError):
        engine.create("v4").set_remote("a", "::1", 4000)  # an IPv4 leg cannot send to IPv6


def test_control_ops_race_with_traffic(port_range):
    """create/set_remote/stats/delete from Python while the loop relays packets."""
    engine = RelayEngine(HOST, *port_range, quiet_period=0.0)
    engine.start()
    a, b = udp(), udp()
    stop = threading.Event()
    r0 = engine.create("steady")
    r0.set_remote("b", *b.getsockname())

    def pump():
        i = 0
        while not stop.is_set() and i < 20000:
            a.sendto(rtp(i), edge(r0.leg_a))
            i += 1
            if i % 50 == 0:
                time.sleep(0.001)

    t = threading.Thread(target=pump)
    t.start()
    try:
        for i in range(200):
            r = engine.create(f"churn-{i}")
            r.set_remote("a", *a.getsockname())
            r.set_remote("b", HOST, 9)
            a.sendto(rtp(i), edge(r.leg_a))
            r.stats()
            engine.totals()
            engine.delete(r.id)
    finally:
        stop.set()
        t.join()
    assert r0.stats().a.rtp.packets > 0
    assert engine.active_relays == 1
    engine.stop()
    a.close()
    b.close()


def test_metrics_collector_reads_engine(call):
    from prometheus_client import CollectorRegistry, generate_latest

    from edge.media.metrics import RtpCollector

    r, a, b = call
    for i in (0, 1, 2, 5):                      # 2 lost
        a.sendto(rtp(i), edge(r.leg_a))
    a.sendto(b"\x80", edge(r.leg_a))            # 1 short
    recv_all(b, 4)
    assert wait_for(lambda: r.stats().a.rtp.dropped["short"] == 1)
    reg = CollectorRegistry()
    reg.register(RtpCollector(r.engine))
    text = generate_latest(reg).decode()
    assert "edge_rtp_packets_relayed_total 4.0" in text
    assert "edge_rtp_bytes_relayed_total 688.0" in text
    assert 'edge_rtp_packets_dropped_total{reason="short"} 1.0' in text
    assert "edge_rtp_packets_lost_total 2.0" in text
    assert "edge_rtp_streams_active 1.0" in text
    assert 'edge_rtp_jitter_seconds{stat="max"}' in text


def test_relayed_media_marked_dscp_ef(call):
    r, a, b = call
    b.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
    a.sendto(rtp(1), edge(r.leg_a))
    data, anc, _, _ = b.recvmsg(2048, socket.CMSG_SPACE(4))
    tos = [c[2][0] for c in anc if c[0] == socket.IPPROTO_IP and c[1] == socket.IP_TOS]
    assert data == rtp(1) and tos == [0xB8]
    assert r.engine.tos == 0xB8


def test_random_garbage_never_breaks_the_loop(call):
    """Every datagram is either relayed or dropped with a reason; the loop keeps going."""
    r, a, b = call
    rnd = random.Random(4)
    sent = 0
    a.sendto(rtp(0), edge(r.leg_a))             # latch A first
    assert b.recvfrom(2048)[0] == rtp(0)
    for _ in range(400):
        n = rnd.choice([0, 1, 7, 11, 12, 13, 100, 172, 1500, 1501, 3000])
        head = rnd.choice([b"", b"\x80", bytes([rnd.randrange(256)])])
        data = (head + os.urandom(n))[:n]
        a.sendto(data, edge(r.leg_a))
        sent += 1
    a.sendto(rtp(1), edge(r.leg_a))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        st = r.stats().a.rtp
        if st.packets + st.dropped_total == sent + 2:
            break
        time.sleep(0.02)
    st = r.stats().a.rtp
    assert st.packets + st.dropped_total == sent + 2
    assert st.relayed == st.packets
    got = [d for d, _ in recv_all(b, st.packets - 1, timeout=2)]
    assert got[-1] == rtp(1) and len(got) == st.packets - 1


def test_delete_counts_are_the_rtp_counters_delete_would_give(call):
    r, a, b = call
    for seq in (1, 2, 3, 5, 6, 9):                          # 2, later 2 more, lost on the way
        a.sendto(rtp(seq), edge(r.leg_a))
    b.sendto(rtp(40), edge(r.leg_b))
    a.sendto(b"\x00" * 4, edge(r.leg_a))                     # dropped: too short
    assert wait_for(lambda: r.stats().a.rtp.packets == 6 and r.stats().b.rtp.packets == 1
                    and r.stats().a.rtp.dropped_total == 1)
    st = r.stats()
    counts = r.delete_counts()
    assert r.deleted and r.delete_counts() is None and r.delete() is None
    for leg, got in zip((st.a.rtp, st.b.rtp), counts, strict=True):
        assert got == (leg.packets, leg.bytes, leg.lost, leg.dropped_total, leg.jitter_ms)
    assert counts[0][:4] == (6, 6 * 172, 3, 1)
