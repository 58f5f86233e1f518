"""The relay engine's socket pool (edge/_rtp.pyx): a relay's bound port pairs outlive it and
serve a later relay, emptied first; nothing of the last call reaches the next one."""
import os
import socket

import pytest
from test_rtp_engine import HOST, free_window, nothing, recv_all, rtp, udp

from edge._rtp import RelayEngine


def edge(leg):
    return (HOST, leg.rtp_port)


def ports(relay):
    return {p for leg in (relay.leg_a, relay.leg_b) for p in (leg.rtp_port, leg.rtcp_port)}


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def port_range():
    return free_window()


@pytest.fixture
def one_relay_engine():
    """A range of exactly two pairs: every relay gets the same four ports."""
    lo, _ = free_window(4)
    e = RelayEngine(HOST, lo, lo + 3, quiet_period=0.0)
    e.start()
    yield e
    e.stop()


def test_a_late_packet_of_the_last_call_never_reaches_the_next(one_relay_engine):
    e = one_relay_engine
    old_a, old_b, new_a, new_b = udp(), udp(), udp(), udp()
    try:
        r1 = e.create("call-1")
        r1.set_remote("a", *old_a.getsockname())
        r1.set_remote("b", *old_b.getsockname())
        old_a.sendto(rtp(1), edge(r1.leg_a))
        assert [d for d, _ in recv_all(old_b, 1)] == [rtp(1)]     # the relay works
        leg_a, leg_b = r1.leg_a, r1.leg_b
        r1.delete()
        assert e.pooled_pairs == 2
        # The old parties go on sending after the call ended (a BYE crossing their media).
        late = 0
        for seq in range(2, 7):
            old_a.sendto(rtp(seq), (HOST, leg_a.rtp_port))
            old_a.sendto(b"\x80\xc8late-rtcp", (HOST, leg_a.rtcp_port))
            old_b.sendto(rtp(seq), (HOST, leg_b.rtp_port))
            late += 3
        r2 = e.create("call-2")
        assert ports(r2) == ports(r1)                             # the same sockets, pooled
        assert e.stale_dropped == late                            # emptied before the new call
        r2.set_remote("a", *new_a.getsockname())
        r2.set_remote("b", *new_b.getsockname())
        new_a.sendto(rtp(100, ssrc=0x99), edge(r2.leg_a))
        got = recv_all(new_b, 2, timeout=0.5)
        assert [d for d, _ in got] == [rtp(100, ssrc=0x99)]       # only the new call's packet
        assert nothing(old_b) and nothing(new_a) and nothing(old_a)
        st = r2.stats()
        assert st.a.rtp.packets == 1 and st.a.rtp.source == new_a.getsockname()
        assert st.b.rtp.packets == 0 and st.a.rtcp.packets == 0
    finally:
        for s in (old_a, old_b, new_a, new_b):
            s.close()


def test_pooled_sockets_are_reused_not_reopened(port_range):
    e = RelayEngine(HOST, *port_range, quiet_period=0.0)
    try:
        e.delete(e.create("warm").id)
        before = open_fds()
        for i in range(50):
            e.delete(e.create(f"call-{i}").id)
            assert open_fds() == before                       # no socket opened or closed per call
        assert e.pooled_pairs == 2
    finally:
        e.stop()
    assert e.pooled_pairs == 0 and open_fds() == before - 4    # stop closes the pool


def test_a_pooled_pair_waits_its_quiet_period(port_range):
    lo = port_range[0]
    e = RelayEngine(HOST, lo, lo + 7, quiet_period=30.0)        # 4 pairs = 2 relays
    try:
        r1 = e.create("1")
        e.create("2")
        r1.delete()
        assert e.pooled_pairs == 2
        with pytest.raises(RuntimeError):
            e.create("3")                                       # pooled, but still quiet
        assert e.pooled_pairs == 2 and e.free_pairs == 2
    finally:
        e.stop()


def test_pool_zero_closes_every_socket(port_range):
    e = RelayEngine(HOST, *port_range, quiet_period=0.0, pool=0)
    try:
        r = e.create("x")
        taken = ports(r)
        r.delete()
        assert e.pooled_pairs == 0
        for p in taken:                                         # closed: anyone may bind it now
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((HOST, p))
    finally:
        e.stop()
    with pytest.raises(ValueError):
        RelayEngine(HOST, *port_range, pool=-1)


def test_the_pool_is_capped(port_range):
    e = RelayEngine(HOST, *port_range, quiet_period=0.0, pool=3)
    try:
        relays = [e.create(f"r{i}") for i in range(3)]
        for r in relays:
            r.delete()
        assert e.pooled_pairs == 3                              # the other 3 pairs were closed
        assert e.free_pairs == (port_range[1] - port_range[0] + 1) // 2
    finally:
        e.stop()


def test_legs_on_different_addresses_keep_their_own_pools(port_range):
    """A pair bound on the carrier side's address is never handed to the customer side's leg."""
    lo = port_range[0]
    e = RelayEngine(HOST, lo, lo + 7, quiet_period=0.0, address_b="127.0.0.2")  # 4 pairs
    e.start()
    a, b = udp(), udp()
    try:
        r1, r2 = e.create("1"), e.create("2")
        legs_a = {r1.leg_a.rtp_port, r2.leg_a.rtp_port}
        r1.delete()
        r2.delete()
        assert e.pooled_pairs == 4
        for i in range(4):
            r = e.create(f"again-{i}")
            assert r.leg_a.rtp_port in legs_a and r.leg_b.rtp_port not in legs_a
            r.set_remote("a", *a.getsockname())
            b.sendto(rtp(i), ("127.0.0.2", r.leg_b.rtp_port))   # the pooled leg-b socket still serves 127.0.0.2
            assert [d for d, _ in recv_all(a, 1)] == [rtp(i)]
            r.delete()
    finally:
        a.close()
        b.close()
        e.stop()


def test_a_create_that_fails_half_way_leaks_no_pair(port_range):
    lo = port_range[0]
    e = RelayEngine(HOST, lo, lo + 5, quiet_period=0.0)         # 3 pairs: one relay and one pair
    try:
        r1 = e.create("1")
        for i in range(20):
            with pytest.raises(RuntimeError):
                e.create(f"x{i}")                               # leg a gets the third pair, leg b none
            assert e.free_pairs == 1 and e.active_relays == 1
        r1.delete()
        assert e.free_pairs == 3
        r2 = e.create("2")
        assert e.free_pairs == 1
        r2.delete()
    finally:
        e.stop()
    assert e.free_pairs == 3
