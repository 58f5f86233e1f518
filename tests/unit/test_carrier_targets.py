"""CarrierHealth's targets (edge/calls/carriers.py) without a network: static carriers, the
targets a DNS answer gives, probe state kept across answers and reloads, labels and gauges."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from edge.calls.carriers import CarrierHealth, carrier_label, request_host
from edge.calls.dns import Address
from edge.config import CarrierConfig, CarrierHealthOverride, HealthConfig
from edge.sip import parse_uri
from edge.sip.transport import Peer


def health(carriers: list[CarrierConfig], settings: HealthConfig | None = None) -> tuple[CarrierHealth,
                                                                                       CollectorRegistry]:
    registry = CollectorRegistry()
    h = CarrierHealth(carriers, settings or HealthConfig(enabled=True), tl=None,  # type: ignore[arg-type]
                      local=lambda peer: None, registry=registry, domain="sip.edge.test")  # type: ignore[arg-type,return-value]
    return h, registry


def test_labels_and_request_hosts() -> None:
    assert carrier_label(CarrierConfig(uri="sip:192.0.2.1")) == "192.0.2.1:5060"
    v6 = "[2001:db8::1]:5070;transport=tcp"
    assert carrier_label(CarrierConfig(uri=f"sip:{v6}")) == v6
    assert carrier_label(CarrierConfig(uri="sip:carrier.test")) == "carrier.test"
    assert carrier_label(CarrierConfig(uri="sip:carrier.test:5080")) == "carrier.test:5080"
    assert request_host(parse_uri("sip:carrier.test")) == "carrier.test"
    assert request_host(parse_uri("sip:192.0.2.1")) == "192.0.2.1:5060"


def test_a_static_carrier_has_its_uri_as_its_one_target_ipv6_unbracketed() -> None:
    v6 = CarrierConfig(uri="sip:[2001:db8::1]:5070;transport=tcp")
    h, registry = health([v6])
    assert [t.peer for t in h.targets(v6)] == [Peer("tcp", "2001:db8::1", 5070, side="carrier")]
    assert registry.get_sample_value("edge_carrier_up", {"carrier": "[2001:db8::1]:5070;transport=tcp"}) == 1


def test_a_carrier_by_name_has_the_targets_of_its_answer_and_keeps_probe_state_across_answers() -> None:
    asyncio.run(_by_name())


async def _by_name() -> None:
    # started, as in a serving node: probe tasks are made (they never run: this never awaits)
    named = CarrierConfig(uri="sip:carrier.test")
    h, registry = health([named])
    h._started = True
    assert h.targets(named) == [] and not h.is_up(named)          # nothing resolved yet: skipped
    assert registry.get_sample_value("edge_carrier_up", {"carrier": "carrier.test"}) == 0
    a, b = Address("udp", "192.0.2.1", 5070, 10, 60), Address("udp", "192.0.2.2", 5071, 20, 0)
    h._resolved(named.uri, (a, b))
    assert [(t.peer.host, t.priority, t.weight) for t in h.targets(named)] == [("192.0.2.1", 10, 60),
                                                                                ("192.0.2.2", 20, 0)]
    h.entries[named.uri].targets[a].up = False                     # as probes would mark it
    c = Address("udp", "192.0.2.3", 5072, 10, 40)
    h._resolved(named.uri, (a, c))                                 # b gone, c new, a kept: still down
    assert [t.peer.host for t in h.targets(named)] == ["192.0.2.3"]
    target = {"carrier": "carrier.test"}
    assert registry.get_sample_value("edge_carrier_target_up", {**target, "target": "udp:192.0.2.2:5071"}) is None
    assert registry.get_sample_value("edge_carrier_target_up", {**target, "target": "udp:192.0.2.3:5072"}) == 1
    h._resolved(named.uri, ())                                     # the answer dropped past its grace
    assert h.targets(named) == [] and registry.get_sample_value("edge_carrier_up", target) == 0
    h.stop()


def test_a_reload_keeps_a_carriers_state_and_applies_its_new_settings() -> None:
    static = CarrierConfig(uri="sip:192.0.2.1")
    h, registry = health([static, CarrierConfig(uri="sip:192.0.2.2")])
    entry = h.entries[static.uri]
    next(iter(entry.targets.values())).up = False
    again = CarrierConfig(uri="sip:192.0.2.1", health=CarrierHealthOverride(threshold=9, enabled=False))
    h.replace_carriers([again])
    assert h.entries[static.uri] is entry and entry.settings.threshold == 9
    assert registry.get_sample_value("edge_carrier_up", {"carrier": "192.0.2.2:5060"}) is None
    # not started, so no probe task ran; an unprobed target is up again (enabled = false resets it)
    h._started = True
    h._sync(entry)
    assert h.is_up(again)
