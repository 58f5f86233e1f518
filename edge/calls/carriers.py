"""The carriers' targets: where each carrier can be reached now, and which of them answer.

A carrier given by IP address has one target, its URI. A carrier given by host name has the
targets its RFC 3263 resolution gives (edge/calls/dns.py), refreshed in the background as
their TTLs run out; routing asks :meth:`CarrierHealth.targets` on the call path and gets the
answer at hand, never a lookup.

Health, as Kamailio's dispatcher (``ds_ping_interval``, ``ds_probing_threshold``,
``ds_inactive_threshold``): every ``interval`` seconds each target gets an out-of-dialog
OPTIONS from the carrier side; ``threshold`` failures in a row (no final answer within
``timeout``, or 408/503) mark it down, ``recovery`` answers in a row mark it up again. Any
other final answer (200, 404, 405, ...) means a SIP stack is there and counts as alive.
Routing skips a down target, so a call meets no timeout for it. ``[health]`` sets this for
every carrier, a carrier's ``[carriers.health]`` overrides any of its keys. Probing is off
unless ``enabled`` (the dispatcher's default too): carriers that are not told expect no
OPTIONS traffic.

``edge_carrier_up{carrier}`` is 1 while a carrier has a target routing may use (always 1 for
an unprobed carrier with an address), ``edge_carrier_target_up{carrier,target}`` is 1 or 0 per
target.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Gauge

from edge.config import CarrierConfig, DnsConfig, HealthConfig, carrier_health
from edge.sip import SipMessage, SipUri, parse_uri
from edge.sip.dialog import Local
from edge.sip.request import OutRequest, new_call_id, new_tag
from edge.sip.tls import default_port, transport_of
from edge.sip.transaction import TransactionLayer
from edge.sip.transport import Peer

from .dns import Address, CarrierDns

log = logging.getLogger("sipedge.calls")

DOWN_STATUSES = frozenset({408, 503})


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def carrier_label(carrier: CarrierConfig) -> str:
    """The ``carrier`` label of a carrier: its URI's host:port (5060 when an IP address has none;
    a host name without a port stays bare: its SRV records give the ports), and its transport
    when the URI names one."""
    uri = parse_uri(carrier.uri)
    proto = transport_of(uri)
    label = f"{uri.host}:{uri.port or default_port(proto)}" if is_ip(uri.host) or uri.port else uri.host
    transport = uri.params.get("transport")
    return f"{label};transport={transport.lower()}" if transport else label


def scheme_of(uri: SipUri) -> str:
    """A ``sips:`` carrier stays ``sips:`` in what the edge sends it (RFC 5630)."""
    return "sips" if uri.scheme == "sips" else "sip"


def request_host(uri: SipUri) -> str:
    """The host part of Request-URIs sent to a carrier: its name as configured (RFC 3263 §4:
    the lookup finds where to send, the URI keeps the name), an IP address with its port."""
    if is_ip(uri.host):
        return f"{uri.host}:{uri.port or default_port(transport_of(uri))}"
    return f"{uri.host}:{uri.port}" if uri.port else uri.host


class CarrierTarget(NamedTuple):
    """A target routing may use: where to send, and its SRV priority and weight."""

    peer: Peer
    priority: int
    weight: int


class TargetState:
    """Probe results of one target of a carrier."""

    __slots__ = ("label", "address", "peer", "up", "failures", "successes", "task")

    def __init__(self, label: str, address: Address) -> None:
        self.label = label          # the carrier's label
        self.address = address
        self.peer = Peer(address.proto, address.host, address.port, side="carrier")
        self.up = True              # a target is trusted until probes say otherwise
        self.failures = 0           # in a row
        self.successes = 0          # in a row, while down
        self.task: asyncio.Task[None] | None = None

    def record(self, alive: bool, threshold: int, recovery: int) -> bool | None:
        """One probe result; returns the new state when it changed."""
        if alive:
            self.failures = 0
            if not self.up:
                self.successes += 1
                if self.successes >= recovery:
                    self.up, self.successes = True, 0
                    return True
            return None
        self.successes = 0
        self.failures += 1
        if self.up and self.failures >= threshold:
            self.up = False
            return False
        return None

    def reset(self) -> None:
        """Probing stopped: unprobed means up."""
        self.up, self.failures, self.successes = True, 0, 0


class CarrierEntry:
    """One ``[[carriers]]`` entry: its settings and its current targets, in DNS order."""

    __slots__ = ("config", "uri", "label", "settings", "targets", "by_name")

    def __init__(self, config: CarrierConfig, settings: HealthConfig) -> None:
        self.config = config
        self.uri = parse_uri(config.uri)
        self.label = carrier_label(config)
        self.settings = settings
        self.targets: dict[Address, TargetState] = {}
        self.by_name = not is_ip(self.uri.host)

    def static_address(self) -> Address:
        proto = transport_of(self.uri)      # sips: and transport=tls: over TLS (RFC 5630)
        return Address(proto, self.uri.host.strip("[]"), self.uri.port or default_port(proto))

    @property
    def ruri(self) -> str:
        """Request-URI of the OPTIONS probes."""
        return f"{scheme_of(self.uri)}:{request_host(self.uri)}"


class CarrierHealth:
    """:param local: how the edge names itself toward a peer (Via, Contact), as for calls.
    :param dns: how host names are resolved (``[dns]``).
    :param families: the carrier side's address families: which of A and AAAA to ask.
    """

    def __init__(self, carriers: Sequence[CarrierConfig], settings: HealthConfig, tl: TransactionLayer,
                 local: Callable[[Peer], Local], registry: CollectorRegistry | None, domain: str, *,
                 dns: DnsConfig | None = None, families: Collection[int] = (socket.AF_INET,)) -> None:
        self.settings = settings
        self.tl = tl
        self.local = local
        self.domain = domain
        self.entries: dict[str, CarrierEntry] = {}      # by URI
        self.gauge = Gauge("edge_carrier_up", "1 while the carrier has a target that is up (always 1 unprobed)",
                           ["carrier"], registry=registry)
        self.target_gauge = Gauge("edge_carrier_target_up",
                                  "1 while the carrier target (a resolved address) answers OPTIONS probes",
                                  ["carrier", "target"], registry=registry)
        self.dns = CarrierDns(dns or DnsConfig(), families, self._resolved, registry)
        self._started = False
        self.replace_carriers(carriers)

    # ------------------------------------------------ what routing asks

    def targets(self, carrier: CarrierConfig) -> list[CarrierTarget]:
        """The targets of ``carrier`` that are up, in DNS order (routing orders SRV priorities)."""
        entry = self.entries.get(carrier.uri)
        if entry is None:
            return []
        return [CarrierTarget(state.peer, state.address.priority, state.address.weight)
                for state in entry.targets.values() if state.up]

    def is_up(self, carrier: CarrierConfig) -> bool:
        return bool(self.targets(carrier))

    # ------------------------------------------------ configuration

    def replace_carriers(self, carriers: Sequence[CarrierConfig]) -> None:
        """Use ``carriers`` from now on (a reload): a carrier kept by the new config keeps its
        targets, their probe state and its DNS answer; its settings are the new ones."""
        entries: dict[str, CarrierEntry] = {}
        for carrier in carriers:
            if carrier.uri in entries:
                continue
            settings = carrier_health(self.settings, carrier)
            entry = self.entries.get(carrier.uri)
            if entry is None:
                entry = CarrierEntry(carrier, settings)
                if not entry.by_name:
                    address = entry.static_address()
                    entry.targets[address] = TargetState(entry.label, address)
            entry.config, entry.settings = carrier, settings
            entries[carrier.uri] = entry
        for uri, old in self.entries.items():
            if uri not in entries:
                for state in old.targets.values():
                    self._forget(old, state)
                if old.by_name:
                    self.dns.unwatch(uri)
                if old.label not in {e.label for e in entries.values()}:
                    self.gauge.remove(old.label)
        self.entries = entries
        for entry in entries.values():
            if entry.by_name:
                self.dns.watch(entry.config.uri, entry.uri, entry.label)
            self._sync(entry)

    def _resolved(self, uri: str, addresses: tuple[Address, ...]) -> None:
        """The DNS answer of a carrier changed: targets kept keep their probe state."""
        entry = self.entries.get(uri)
        if entry is None:
            return
        targets = {a: entry.targets.get(a) or TargetState(entry.label, a) for a in addresses}
        for address, state in entry.targets.items():
            if address not in targets:
                self._forget(entry, state)
        entry.targets = targets
        self._sync(entry)

    def _forget(self, entry: CarrierEntry, state: TargetState) -> None:
        if state.task is not None:
            state.task.cancel()
            state.task = None
        try:
            self.target_gauge.remove(entry.label, str(state.address))
        except KeyError:
            pass

    def _sync(self, entry: CarrierEntry) -> None:
        """Probe tasks as the entry's settings say, gauges as its targets are."""
        probing = self._started and entry.settings.enabled
        for state in entry.targets.values():
            if probing and state.task is None:
                state.task = asyncio.get_running_loop().create_task(
                    self._probe_loop(entry, state), name=f"carrier-health-{state.address}")
            elif not probing:
                if state.task is not None:
                    state.task.cancel()
                    state.task = None
                state.reset()
            self.target_gauge.labels(entry.label, str(state.address)).set(1 if state.up else 0)
        self._carrier_gauge(entry)

    def _carrier_gauge(self, entry: CarrierEntry) -> None:
        self.gauge.labels(entry.label).set(1 if any(s.up for s in entry.targets.values()) else 0)

    # ------------------------------------------------ running

    def start(self) -> None:
        self._started = True
        self.dns.start()
        for entry in self.entries.values():
            self._sync(entry)

    def stop(self) -> None:
        self._started = False
        self.dns.stop()
        for entry in self.entries.values():
            for state in entry.targets.values():
                if state.task is not None:
                    state.task.cancel()
                    state.task = None

    async def _probe_loop(self, entry: CarrierEntry, state: TargetState) -> None:
        while True:
            await self.probe(entry, state)
            await asyncio.sleep(entry.settings.interval)

    async def probe(self, entry: CarrierEntry, state: TargetState) -> bool:
        """Send one OPTIONS to ``state``'s target; record and return whether it is alive."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[int] = loop.create_future()
        settings = entry.settings

        def on_response(msg: SipMessage) -> None:
            if msg.status >= 200 and not answer.done():
                answer.set_result(msg.status)

        def on_timeout() -> None:
            if not answer.done():
                answer.set_result(408)

        local = self.local(state.peer)
        ruri = entry.ruri
        request = OutRequest("OPTIONS", ruri, proto=state.peer.proto, via_host=local.via_host,
                             from_=f"<sip:health@{self.domain}>;tag={new_tag()}", to=f"<{ruri}>",
                             call_id=new_call_id(local.via_host.rpartition(":")[0] or "edge"), cseq=1,
                             headers=[("Contact", local.contact)])
        self.tl.send_request(request, state.peer, on_response=on_response, on_timeout=on_timeout)
        try:
            status = await asyncio.wait_for(answer, settings.timeout)
        except TimeoutError:
            status = 408
        alive = status not in DOWN_STATUSES
        changed = state.record(alive, settings.threshold, settings.recovery)
        if changed is not None and entry.targets.get(state.address) is state:
            self.target_gauge.labels(entry.label, str(state.address)).set(1 if changed else 0)
            self._carrier_gauge(entry)
            where = f"{entry.label} ({state.address})" if entry.by_name else entry.label
            log.warning("carrier %s is %s", where, "up again" if changed else f"down (last probe: {status})",
                        extra={"event": "carrier_up" if changed else "carrier_down", "carrier": entry.label,
                               "target": str(state.address)})
        return alive
