"""Carriers given by host name, resolved as RFC 3263 §4 says, in the background.

:class:`Rfc3263` turns a carrier URI into the addresses to send to:

- a numeric host needs no DNS (the caller never asks);
- an explicit port means A/AAAA of the host only, with that port (§4.2);
- an explicit ``transport`` skips NAPTR: SRV ``_sip._<transport>.host``, else A/AAAA at the
  transport's default port (§4.1, §4.2);
- otherwise NAPTR first: records with flag ``S`` and a service the edge speaks, by order then
  preference, each replacement looked up as SRV until one gives targets; without a usable NAPTR,
  SRV for each transport the edge speaks (UDP, then TCP); without SRV, A/AAAA with UDP at 5060.

SRV answers keep their priority and weight: routing orders them per call (RFC 2782, lowest
priority first, weighted random within one). Only the address families the carrier side has
listeners for are asked for (A for IPv4, AAAA for IPv6). The answer lives for the smallest TTL
of the records it was built from, clamped into ``[dns] min_ttl``..``max_ttl``.

:class:`CarrierDns` keeps one answer per carrier and refreshes it when it expires, on the event
loop with dnspython's asyncio resolver: a call never waits for DNS, it uses the answer at hand.
A failed refresh (timeout, SERVFAIL, no address at all) is counted in
``edge_carrier_dns_failures_total{carrier}``, retried every ``[dns] retry`` seconds, and leaves the
last good answer in use until its TTL plus ``[dns] grace`` has passed; then the carrier has no
address and routing skips it until a refresh succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable, Collection, Iterable
from typing import Any, NamedTuple

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from prometheus_client import CollectorRegistry, Counter

from edge.config import DnsConfig, dns_server
from edge.sip import SipUri

log = logging.getLogger("sipedge.calls")

# NAPTR services (RFC 3263 §4.1) and SRV prefixes of the transports, and their default ports.
NAPTR_SERVICES = {"SIP+D2U": "udp", "SIP+D2T": "tcp", "SIPS+D2T": "tls"}
SRV_PREFIX = {"udp": "_sip._udp", "tcp": "_sip._tcp", "tls": "_sips._tcp"}
DEFAULT_PORT = {"udp": 5060, "tcp": 5060, "tls": 5061}
# A sip: carrier by name is reached over UDP or TCP: TLS is chosen by a sips: URI (SIPS+D2T,
# _sips._tcp) or transport=tls, never by a NAPTR record alone.
TRANSPORTS = ("udp", "tcp")


class Address(NamedTuple):
    """One place a carrier can be sent to; priority and weight from its SRV record (0 without)."""

    proto: str
    host: str                       # an IP address
    port: int
    priority: int = 0
    weight: int = 0

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.proto}:{host}:{self.port}"


class Resolution(NamedTuple):
    addresses: tuple[Address, ...]
    ttl: float                      # seconds: the smallest TTL of the records used (inf: none)


class DnsFailure(Exception):
    """A lookup did not give an answer (as opposed to an answer saying there is no such record)."""


class Rfc3263:
    """:param families: ``socket.AF_INET`` / ``AF_INET6``: which of A and AAAA to ask, in that order.
    :param transports: transports the edge can send on, in order of preference (:data:`TRANSPORTS`).
    """

    def __init__(self, resolver: dns.asyncresolver.Resolver, families: Collection[int],
                 transports: Iterable[str] = TRANSPORTS) -> None:
        self.resolver = resolver
        self.qtypes = [qtype for family, qtype in ((socket.AF_INET, "A"), (socket.AF_INET6, "AAAA"))
                       if family in families]
        self.transports = tuple(transports)

    async def resolve(self, uri: SipUri) -> Resolution:
        """The addresses of ``uri``'s host. :raises DnsFailure: a lookup had no answer."""
        host = uri.host.strip("[]")
        secure = uri.scheme == "sips"
        transport = (uri.params.get("transport") or "").lower()
        if secure and transport in ("tcp", "tls"):                   # SIPS over TCP is TLS (RFC 3261 §26.2)
            transport = "tls"
        if uri.port is not None:                                     # §4.2: the port says where
            return await self._addresses(host, transport or ("tls" if secure else "udp"), uri.port)
        if transport:                                                # §4.1: the transport says how
            found = await self._srv(f"{SRV_PREFIX.get(transport, '_sip._' + transport)}.{host}", transport)
            return found if found is not None else await self._addresses(host, transport, DEFAULT_PORT.get(
                transport, 5060))
        records, naptr_ttl = await self._query(host, "NAPTR")
        usable = sorted((r for r in records if r.flags.lower() == b"s"
                         and self._naptr_transport(r.service, secure) is not None),
                        key=lambda r: (r.order, r.preference))
        for record in usable:
            proto = self._naptr_transport(record.service, secure)
            assert proto is not None
            found = await self._srv(record.replacement.to_text(), proto)
            if found is not None and found.addresses:
                return Resolution(found.addresses, min(found.ttl, naptr_ttl))
        for proto in (("tls",) if secure else self.transports):      # §4.1: no NAPTR, SRV per transport
            found = await self._srv(f"{SRV_PREFIX[proto]}.{host}", proto)
            if found is not None:
                return found
        proto = "tls" if secure else "udp"
        return await self._addresses(host, proto, DEFAULT_PORT[proto])

    def _naptr_transport(self, service: bytes, secure: bool) -> str | None:
        proto = NAPTR_SERVICES.get(service.decode("ascii", "replace").upper())
        if secure:                     # a sips: carrier: TLS only (RFC 3263 §4.1)
            return proto if proto == "tls" else None
        if proto is None or proto not in self.transports:
            return None
        return proto

    async def _srv(self, name: str, proto: str) -> Resolution | None:
        """The SRV targets of ``name`` with their addresses; ``None`` when there is no SRV record."""
        records, ttl = await self._query(name, "SRV")
        if not records:
            return None
        # RFC 2782: a lone target of "." means the service is decidedly not available here
        if len(records) == 1 and records[0].target == dns.name.root:
            return Resolution((), ttl)
        # an rrset has no order: list by priority (heaviest first) so that logs and metrics are stable;
        # routing draws the weighted order per call
        records = sorted(records, key=lambda r: (r.priority, -r.weight, r.target, r.port))
        found = await asyncio.gather(*(self._addresses(r.target.to_text(), proto, r.port, r.priority, r.weight)
                                       for r in records))
        return Resolution(tuple(a for res in found for a in res.addresses), min([ttl, *(r.ttl for r in found)]))

    async def _addresses(self, host: str, proto: str, port: int, priority: int = 0, weight: int = 0) -> Resolution:
        found = await asyncio.gather(*(self._query(host, qtype) for qtype in self.qtypes))
        addresses = tuple(Address(proto, r.address, port, priority, weight) for records, _ in found for r in records)
        return Resolution(addresses, min((ttl for records, ttl in found if records), default=math.inf))

    async def _query(self, name: str, qtype: str) -> tuple[list[Any], float]:
        """Records of ``name`` (absolute) and their TTL; ``[]`` when the name or the type does not exist."""
        try:
            answer = await self.resolver.resolve(dns.name.from_text(name), qtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], math.inf
        except dns.resolver.NoNameservers as exc:
            raise DnsFailure(f"{qtype} {name}: no server answered ({exc})") from None
        except dns.exception.Timeout:
            raise DnsFailure(f"{qtype} {name}: timed out") from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"{qtype} {name}: {type(exc).__name__}: {exc}") from None
        assert answer.rrset is not None
        return list(answer.rrset), float(answer.rrset.ttl)


def make_resolver(settings: DnsConfig) -> dns.asyncresolver.Resolver | str:
    """The asyncio resolver of ``[dns]``; a string says why there is none (no usable resolv.conf)."""
    try:
        resolver = dns.asyncresolver.Resolver(configure=not settings.servers)
    except dns.resolver.NoResolverConfiguration as exc:
        return f"no name server in /etc/resolv.conf ({exc}); set [dns] servers"
    if settings.servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*dns_server(s)) for s in settings.servers]
    resolver.lifetime = settings.timeout
    # each server gets its share of the lifetime before the next one is asked
    resolver.timeout = max(0.2, settings.timeout / max(1, len(resolver.nameservers)))
    resolver.cache = None           # TTLs are honoured here, by CarrierDns, not by a second cache
    return resolver


class Answer:
    """The last good answer for one carrier, and until when it may be used."""

    __slots__ = ("addresses", "expires", "usable_until", "failing")

    def __init__(self) -> None:
        self.addresses: tuple[Address, ...] = ()
        self.expires = 0.0          # loop time: refresh then
        self.usable_until = 0.0     # loop time: expires + grace; past it a failing carrier has no address
        self.failing = False        # the last refresh failed (logged once per outage)


OnChange = Callable[[str, tuple[Address, ...]], None]


class CarrierDns:
    """One refresh task per carrier name; ``on_change(key, addresses)`` when its addresses change.

    :param families: the carrier side's address families (A and/or AAAA).
    """

    def __init__(self, settings: DnsConfig, families: Collection[int], on_change: OnChange,
                 registry: CollectorRegistry | None, transports: Iterable[str] = TRANSPORTS) -> None:
        self.settings = settings
        resolver = make_resolver(settings)
        self.rfc3263 = Rfc3263(resolver, families, transports) if not isinstance(resolver, str) else None
        self.no_resolver = resolver if isinstance(resolver, str) else ""
        self.on_change = on_change
        self.failures = Counter("edge_carrier_dns_failures_total",
                                "Failed resolutions of a carrier host name (timeout, SERVFAIL, no address)",
                                ["carrier"], registry=registry)
        self.watched: dict[str, tuple[SipUri, str]] = {}     # key -> (uri, carrier label)
        self.answers: dict[str, Answer] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False

    def watch(self, key: str, uri: SipUri, label: str) -> None:
        """Resolve ``uri`` from now on (kept if already watched: the answer stays)."""
        if key not in self.watched:
            self.failures.labels(label)
        self.watched[key] = (uri, label)
        self.answers.setdefault(key, Answer())
        if self._started and key not in self._tasks:
            self._tasks[key] = asyncio.get_running_loop().create_task(self._refresh(key), name=f"dns-{label}")

    def unwatch(self, key: str) -> None:
        entry = self.watched.pop(key, None)
        self.answers.pop(key, None)
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
        if entry is not None and entry[1] not in {label for _, label in self.watched.values()}:
            self.failures.remove(entry[1])

    def start(self) -> None:
        self._started = True
        loop = asyncio.get_running_loop()
        for key, (_, label) in self.watched.items():
            if key not in self._tasks:
                self._tasks[key] = loop.create_task(self._refresh(key), name=f"dns-{label}")

    def stop(self) -> None:
        self._started = False
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    async def _refresh(self, key: str) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        while key in self.watched:
            uri, label = self.watched[key]
            answer = self.answers[key]
            try:
                if self.rfc3263 is None:
                    raise DnsFailure(self.no_resolver)
                found = await self.rfc3263.resolve(uri)
                if not found.addresses:
                    raise DnsFailure(f"{uri.host}: no address (no NAPTR/SRV target or A/AAAA record)")
            except DnsFailure as exc:
                self.failures.labels(label).inc()
                now = loop.time()
                if not answer.failing:
                    log.warning("carrier %s: DNS resolution failed: %s; %s", label, exc,
                                f"keeping the last answer for up to {answer.usable_until - now:.0f} s"
                                if answer.addresses and answer.usable_until > now else "it has no address",
                                extra={"event": "carrier_dns_failed", "carrier": label})
                answer.failing = True
                if answer.addresses and now >= answer.usable_until:
                    log.error("carrier %s: no DNS answer past its TTL and the grace of %g s: it has no address now",
                              label, s.grace, extra={"event": "carrier_dns_expired", "carrier": label})
                    answer.addresses = ()
                    self.on_change(key, ())
                # retry soon, and again when the kept answer runs out
                wait = s.retry
                if answer.addresses:
                    wait = min(wait, max(0.05, answer.usable_until - now))
                await asyncio.sleep(wait)
                continue
            ttl = min(max(found.ttl, s.min_ttl), s.max_ttl)
            now = loop.time()
            answer.expires, answer.usable_until = now + ttl, now + ttl + s.grace
            if answer.failing:
                log.info("carrier %s: DNS answers again", label, extra={"event": "carrier_dns_ok", "carrier": label})
                answer.failing = False
            if found.addresses != answer.addresses:
                log.info("carrier %s resolves to %s (ttl %g s)", label, ", ".join(map(str, found.addresses)), ttl,
                         extra={"event": "carrier_resolved", "carrier": label})
                answer.addresses = found.addresses
                self.on_change(key, found.addresses)
            await asyncio.sleep(max(0.0, answer.expires - loop.time()))
