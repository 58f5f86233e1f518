"""RFC 3263 resolution (edge/calls/dns.py) against a DNS responder on loopback: which steps
each kind of URI takes, SRV records with their priority and weight, TTLs, and the background
refresh of :class:`CarrierDns` (a new answer after the TTL, a failure keeps the last answer
until TTL + grace)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest
from dnsresponder import DnsResponder
from prometheus_client import CollectorRegistry

from edge.calls.dns import Address, CarrierDns, DnsFailure, Rfc3263, make_resolver
from edge.config import DnsConfig
from edge.sip import parse_uri

V4 = frozenset({socket.AF_INET})


@pytest.fixture
def zone() -> Iterator[DnsResponder]:
    dns = DnsResponder("127.0.0.1")
    dns.set("carrier.test", "NAPTR", 60, '20 10 "s" "SIP+D2T" "" _sip._tcp.carrier.test.',
            '10 10 "s" "SIP+D2U" "" _sip._udp.carrier.test.', '5 10 "u" "E2U+sip" "!^.*$!sip:x@y!" .')
    dns.set("_sip._udp.carrier.test", "SRV", 30, "10 60 5070 a.carrier.test.", "20 0 5071 b.carrier.test.")
    dns.set("_sip._tcp.carrier.test", "SRV", 30, "10 100 5080 b.carrier.test.")
    dns.set("a.carrier.test", "A", 40, "192.0.2.1")
    dns.set("b.carrier.test", "A", 20, "192.0.2.2")
    dns.set("b.carrier.test", "AAAA", 20, "2001:db8::2")
    dns.set("carrier.test", "A", 300, "192.0.2.9")
    yield dns
    dns.close()


def rfc3263(zone: DnsResponder, families: frozenset[int] = V4) -> Rfc3263:
    resolver = make_resolver(DnsConfig(servers=[zone.server], timeout=1.0))
    assert not isinstance(resolver, str)
    return Rfc3263(resolver, families)


def resolve(zone: DnsResponder, uri: str, families: frozenset[int] = V4) -> tuple[tuple[Address, ...], float]:
    found = asyncio.run(rfc3263(zone, families).resolve(parse_uri(uri)))
    return found.addresses, found.ttl


def test_naptr_then_srv_then_a_lowest_order_first_ttl_is_the_smallest(zone: DnsResponder) -> None:
    addresses, ttl = resolve(zone, "sip:carrier.test")
    # order 5 is not a SIP service (flag "u"), order 10 is UDP: its SRV, then each target's A
    assert addresses == (Address("udp", "192.0.2.1", 5070, 10, 60), Address("udp", "192.0.2.2", 5071, 20, 0))
    assert ttl == 20                                   # b.carrier.test's A record
    asked = [q for q in zone.queries]
    assert asked[0] == ("carrier.test.", "NAPTR") and asked[1] == ("_sip._udp.carrier.test.", "SRV")
    assert ("_sip._tcp.carrier.test.", "SRV") not in asked
    assert ("a.carrier.test.", "AAAA") not in asked    # no IPv6 on the carrier side: no AAAA question


def test_a_carrier_side_with_ipv6_asks_aaaa_too(zone: DnsResponder) -> None:
    addresses, _ = resolve(zone, "sip:carrier.test", frozenset({socket.AF_INET, socket.AF_INET6}))
    assert [a.host for a in addresses] == ["192.0.2.1", "192.0.2.2", "2001:db8::2"]


def test_an_explicit_port_skips_naptr_and_srv(zone: DnsResponder) -> None:
    addresses, ttl = resolve(zone, "sip:carrier.test:5099")
    assert addresses == (Address("udp", "192.0.2.9", 5099),) and ttl == 300
    assert zone.queries == [("carrier.test.", "A")]


def test_an_explicit_transport_skips_naptr(zone: DnsResponder) -> None:
    addresses, _ = resolve(zone, "sip:carrier.test;transport=tcp")
    assert addresses == (Address("tcp", "192.0.2.2", 5080, 10, 100),)
    assert ("carrier.test.", "NAPTR") not in zone.queries


def test_an_explicit_transport_without_srv_takes_a_at_the_default_port(zone: DnsResponder) -> None:
    zone.set("_sip._tcp.carrier.test", "SRV", 30)
    addresses, _ = resolve(zone, "sip:carrier.test;transport=tcp")
    assert addresses == (Address("tcp", "192.0.2.9", 5060),)


def test_without_naptr_srv_per_transport_udp_first(zone: DnsResponder) -> None:
    zone.set("carrier.test", "NAPTR", 60)
    zone.set("_sip._udp.carrier.test", "SRV", 30)
    addresses, _ = resolve(zone, "sip:carrier.test")
    assert addresses == (Address("tcp", "192.0.2.2", 5080, 10, 100),)
    assert zone.queries[:3] == [("carrier.test.", "NAPTR"), ("_sip._udp.carrier.test.", "SRV"),
                                ("_sip._tcp.carrier.test.", "SRV")]


def test_without_naptr_or_srv_the_a_record_at_5060_over_udp(zone: DnsResponder) -> None:
    for name in ("_sip._udp.carrier.test", "_sip._tcp.carrier.test"):
        zone.set(name, "SRV", 30)
    zone.set("carrier.test", "NAPTR", 60)
    assert resolve(zone, "sip:carrier.test")[0] == (Address("udp", "192.0.2.9", 5060),)


def test_a_naptr_whose_srv_is_empty_falls_to_the_next_naptr(zone: DnsResponder) -> None:
    zone.set("_sip._udp.carrier.test", "SRV", 30)
    assert resolve(zone, "sip:carrier.test")[0] == (Address("tcp", "192.0.2.2", 5080, 10, 100),)


def test_an_srv_target_of_dot_means_no_service(zone: DnsResponder) -> None:
    zone.set("_sip._udp.carrier.test", "SRV", 30, "0 0 0 .")
    zone.set("carrier.test", "NAPTR", 60, '10 10 "s" "SIP+D2U" "" _sip._udp.carrier.test.')
    assert resolve(zone, "sip:carrier.test")[0] == ()


def test_servfail_and_silence_are_failures_nxdomain_is_an_empty_answer(zone: DnsResponder) -> None:
    assert resolve(zone, "sip:nowhere.test:5060")[0] == ()
    zone.mode = "servfail"
    with pytest.raises(DnsFailure, match="no server answered"):
        resolve(zone, "sip:carrier.test")
    zone.mode = "silent"
    with pytest.raises(DnsFailure, match="timed out"):
        resolve(zone, "sip:carrier.test")


def test_make_resolver_with_servers_and_ports() -> None:
    resolver = make_resolver(DnsConfig(servers=["127.0.0.1:5353", "[::1]:5354", "192.0.2.53"], timeout=3.0))
    assert not isinstance(resolver, str)
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [  # type: ignore[attr-defined]
        ("127.0.0.1", 5353), ("::1", 5354), ("192.0.2.53", 53)]
    assert resolver.lifetime == 3.0 and resolver.timeout == 1.0


async def until(what: str, done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not done():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timeout waiting for {what}")
        await asyncio.sleep(0.02)


def run_refresher(zone: DnsResponder, settings: DnsConfig,
                  body: Callable[[CarrierDns, list[tuple[Address, ...]], CollectorRegistry], Awaitable[None]]) -> None:
    async def main() -> None:
        changes: list[tuple[Address, ...]] = []
        registry = CollectorRegistry()
        refresher = CarrierDns(settings, V4, lambda key, addresses: changes.append(addresses), registry)
        refresher.watch("c1", parse_uri("sip:a.carrier.test:5060"), "a.carrier.test:5060")
        refresher.start()
        try:
            await body(refresher, changes, registry)
        finally:
            refresher.stop()
    asyncio.run(main())


def failures(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("edge_carrier_dns_failures_total", {"carrier": "a.carrier.test:5060"}) or 0.0


def test_the_answer_is_refreshed_when_its_ttl_runs_out(zone: DnsResponder) -> None:
    zone.set("a.carrier.test", "A", 1, "192.0.2.1")

    async def body(refresher: CarrierDns, changes: list[tuple[Address, ...]], registry: CollectorRegistry) -> None:
        await until("the first answer", lambda: len(changes) == 1)
        assert changes[0] == (Address("udp", "192.0.2.1", 5060),)
        zone.set("a.carrier.test", "A", 1, "192.0.2.7")
        await until("the new answer", lambda: len(changes) == 2)
        assert changes[1] == (Address("udp", "192.0.2.7", 5060),)
        assert zone.asked("a.carrier.test", "A") >= 2 and failures(registry) == 0

    run_refresher(zone, DnsConfig(servers=[zone.server], timeout=0.5, min_ttl=0.2), body)


def test_a_failing_server_keeps_the_last_answer_within_the_grace(zone: DnsResponder) -> None:
    zone.set("a.carrier.test", "A", 1, "192.0.2.1")

    async def body(refresher: CarrierDns, changes: list[tuple[Address, ...]], registry: CollectorRegistry) -> None:
        await until("the first answer", lambda: len(changes) == 1)
        zone.mode = "servfail"
        await until("failed refreshes past the TTL", lambda: failures(registry) >= 3)
        assert refresher.answers["c1"].addresses == (Address("udp", "192.0.2.1", 5060),) and len(changes) == 1
        zone.mode = "silent"                            # a server that does not answer at all: the same
        before = failures(registry)
        await until("a timed out refresh", lambda: failures(registry) > before)
        assert refresher.answers["c1"].addresses == (Address("udp", "192.0.2.1", 5060),) and len(changes) == 1

    run_refresher(zone, DnsConfig(servers=[zone.server], timeout=0.3, retry=0.1, grace=600, min_ttl=0.5), body)


def test_past_ttl_plus_grace_the_carrier_has_no_address_until_dns_answers_again(zone: DnsResponder) -> None:
    zone.set("a.carrier.test", "A", 1, "192.0.2.1")

    async def body(refresher: CarrierDns, changes: list[tuple[Address, ...]], registry: CollectorRegistry) -> None:
        await until("the first answer", lambda: len(changes) == 1)
        answer = refresher.answers["c1"]
        zone.mode = "servfail"
        await until("the answer dropped after the grace", lambda: len(changes) == 2)
        assert changes[1] == () and asyncio.get_running_loop().time() >= answer.usable_until
        assert failures(registry) >= 1
        zone.mode = "answer"
        await until("an answer again", lambda: len(changes) == 3)
        assert changes[2] == (Address("udp", "192.0.2.1", 5060),)

    run_refresher(zone, DnsConfig(servers=[zone.server], timeout=0.3, retry=0.1, grace=0.5, min_ttl=0.5), body)
