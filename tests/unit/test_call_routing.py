"""Routing (edge/calls/routing.py): carrier order, failover policy, the PBX of an incoming call."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from edge.calls.carriers import CarrierTarget
from edge.calls.model import Call, CallState, Direction, Reject
from edge.calls.routing import Routing, static_targets
from edge.config import CarrierConfig
from edge.control.models import Profile, Registration
from edge.sip.transport import Peer

PROFILE = Profile(id="prf_1", account_id="acc_1", name="HQ", channels=2, auth="digest", sip_username="990500000001")


class Bindings:
    def __init__(self, *regs: Registration) -> None:
        self.regs = list(regs)

    def bindings(self, profile_id: str) -> list[Registration]:
        return [r for r in self.regs if r.profile_id == profile_id]


def routing(carriers: list[CarrierConfig], store: Any = None, seed: int = 1) -> Routing:
    return Routing(carriers, (store or Bindings()).bindings, "sip.edge.test", rng=random.Random(seed))


def call(direction: Direction = Direction.OUTGOING) -> Call:
    return Call("c1", direction, PROFILE, caller="990500000001", callee="+442071234567")


def test_priority_first_then_weighted_order_within_a_priority() -> None:
    carriers = [CarrierConfig(uri="sip:10.0.0.3:5060", priority=2),
                CarrierConfig(uri="sip:10.0.0.1:5060;transport=tcp", priority=1, weight=90),
                CarrierConfig(uri="sip:10.0.0.2", priority=1, weight=10)]
    firsts: Counter[str] = Counter()
    for seed in range(400):
        targets = routing(carriers, seed=seed).carrier_targets("+442071234567")
        assert targets[-1].label == "sip:10.0.0.3:5060"  # priority 2 only after every priority 1
        firsts[targets[0].peer.host] += 1
    assert 300 < firsts["10.0.0.1"] < 395  # weight 90 vs 10: first about 90 % of the time
    t = routing(carriers).carrier_targets("+442071234567")
    by_host = {x.peer.host: x for x in t}
    assert by_host["10.0.0.1"].peer == Peer("tcp", "10.0.0.1", 5060)
    assert by_host["10.0.0.2"].ruri == "sip:+442071234567@10.0.0.2:5060"


def test_failover_only_on_timeout_408_5xx_only_outgoing_only_before_anything_relayed() -> None:
    r = routing([CarrierConfig(uri="sip:10.0.0.1"), CarrierConfig(uri="sip:10.0.0.2")])
    c = call()
    c.targets = r.carrier_targets(c.callee)[1:]
    assert all(r.should_fail_over(c, s) for s in (408, 500, 502, 503, 504))
    assert not any(r.should_fail_over(c, s) for s in (404, 480, 486, 487, 501, 600, 603))
    c.state = CallState.EARLY
    assert not r.should_fail_over(c, 503)  # the caller heard a provisional: stay
    c.state = CallState.ROUTING
    c.targets = []
    assert not r.should_fail_over(c, 503)  # nothing left to try
    inc = call(Direction.INCOMING)
    inc.targets = c.targets = r.carrier_targets(c.callee)
    assert not r.should_fail_over(inc, 503)


def test_incoming_goes_to_the_newest_registration_at_its_source_address() -> None:
    old = Registration(profile_id="prf_1", contact="sip:990500000001@10.1.1.1:5060", expires_at=9e9,
                       source="udp:198.51.100.9:40000", registered_at=100.0)
    new = Registration(profile_id="prf_1", contact="sip:990500000001@10.1.1.2:5062;transport=tcp",
                       expires_at=9e9, source="tcp:198.51.100.9:40100", registered_at=200.0)
    target = routing([], Bindings(old, new)).pbx_target(PROFILE, "sales")
    assert not isinstance(target, Reject)
    assert target.peer == Peer("tcp", "198.51.100.9", 40100)  # NAT: where the REGISTER came from
    assert target.ruri == "sip:sales@10.1.1.2:5062;transport=tcp"  # the extension tag as R-URI user


def test_incoming_refusals_for_an_unregistered_or_contactless_profile() -> None:
    none = routing([]).pbx_target(PROFILE, "+14155550100")
    assert isinstance(none, Reject) and none.status == 480
    ip = Profile(id="prf_2", account_id="acc_1", name="DC", channels=1, auth="ip", sip_username="990500000002",
                 allowed_ips=["10.0.0.0/8"])
    assert isinstance(routing([]).pbx_target(ip, "x"), Reject)
    ip.static_contact = "sip:10.2.2.2:5070"
    target = routing([]).pbx_target(ip, "+14155550100")
    assert not isinstance(target, Reject)
    assert target.peer == Peer("udp", "10.2.2.2", 5070) and target.ruri == "sip:+14155550100@10.2.2.2:5070"


def test_outbound_from_and_to() -> None:
    r = routing([CarrierConfig(uri="sip:10.0.0.1")])
    out = call()
    target = r.carrier_targets(out.callee)[0]
    assert r.outbound_uris(out, target, "Front Desk") == (
        '"Front Desk" <sip:990500000001@sip.edge.test>', "<sip:+442071234567@10.0.0.1:5060>")
    inc = Call("c2", Direction.INCOMING, PROFILE, caller="+33123456789", callee="+14155550100")
    assert r.outbound_uris(inc, target, None) == (
        "<sip:+33123456789@sip.edge.test>", "<sip:990500000001@sip.edge.test>")


def test_a_carrier_that_is_down_is_left_out_of_the_targets() -> None:
    from edge.config import CarrierConfig

    carriers = [CarrierConfig(uri="sip:10.0.0.1:5060", priority=1), CarrierConfig(uri="sip:10.0.0.2:5060", priority=2)]
    down = {"sip:10.0.0.1:5060"}

    def up_targets(carrier: CarrierConfig) -> list[CarrierTarget]:
        return [] if carrier.uri in down else static_targets(carrier)

    routing = Routing(carriers, lambda _: [], "sip.edge.test", targets=up_targets)
    assert [t.peer.host for t in routing.carrier_targets("+442071234567")] == ["10.0.0.2"]
    down.clear()
    assert [t.peer.host for t in routing.carrier_targets("+442071234567")] == ["10.0.0.1", "10.0.0.2"]
    down.update(c.uri for c in carriers)
    assert routing.carrier_targets("+442071234567") == []  # nothing to try: 503 no_carrier at once


def test_resolved_targets_in_srv_priority_order_weighted_within_one_the_uri_keeps_the_name() -> None:
    """RFC 3263 §4.3 / RFC 2782: a carrier by name expands into its SRV targets, lowest priority
    first, weighted random within a priority; then the next carrier. The R-URI keeps the name."""
    named = CarrierConfig(uri="sip:carrier.test", priority=1)
    backup = CarrierConfig(uri="sip:10.0.0.9:5060", priority=2)
    srv = {named.uri: [CarrierTarget(Peer("udp", "10.0.0.3", 5062), 20, 0),
                       CarrierTarget(Peer("udp", "10.0.0.1", 5060), 10, 80),
                       CarrierTarget(Peer("tcp", "10.0.0.2", 5061), 10, 20)]}

    def targets(carrier: CarrierConfig) -> list[CarrierTarget]:
        return srv.get(carrier.uri) or static_targets(carrier)

    firsts: Counter[str] = Counter()
    for seed in range(400):
        r = Routing([backup, named], lambda _: [], "sip.edge.test", rng=random.Random(seed), targets=targets)
        out = r.carrier_targets("+442071234567")
        assert [t.peer.host for t in out][2:] == ["10.0.0.3", "10.0.0.9"]
        assert {t.peer.host for t in out[:2]} == {"10.0.0.1", "10.0.0.2"}
        assert [t.label for t in out] == [named.uri] * 3 + [backup.uri]
        assert out[0].ruri == "sip:+442071234567@carrier.test" and out[3].ruri == "sip:+442071234567@10.0.0.9:5060"
        firsts[out[0].peer.host] += 1
    assert 260 < firsts["10.0.0.1"] < 380  # weight 80 vs 20


def test_a_carrier_without_a_target_up_is_skipped() -> None:
    named = CarrierConfig(uri="sip:carrier.test:5070", priority=1)
    backup = CarrierConfig(uri="sip:10.0.0.9", priority=2)
    r = Routing([named, backup], lambda _: [], "sip.edge.test",
                targets=lambda c: [] if c is named else static_targets(c))
    assert [t.peer.host for t in r.carrier_targets("+442071234567")] == ["10.0.0.9"]


def test_the_weighted_order_is_that_of_one_draw_after_the_other() -> None:
    """60/30/10 within one priority: the first place goes by weight (0.6/0.3/0.1), and the second
    as a draw among those left (for B: 0.6*0.75 + 0.1*0.33 = 0.48). Weight 0 comes last."""
    carriers = [CarrierConfig(uri="sip:10.0.0.1", priority=1, weight=60),
                CarrierConfig(uri="sip:10.0.0.2", priority=1, weight=30),
                CarrierConfig(uri="sip:10.0.0.3", priority=1, weight=10),
                CarrierConfig(uri="sip:10.0.0.4", priority=1, weight=0)]
    r = routing(carriers, seed=7)
    firsts: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    n = 4000
    for _ in range(n):
        order = [t.peer.host for t in r.carrier_targets("+442071234567")]
        assert sorted(order) == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        firsts[order[0]] += 1
        seconds[order[1]] += 1
        assert order[-1] == "10.0.0.4"
    assert abs(firsts["10.0.0.1"] / n - 0.6) < 0.04 and abs(firsts["10.0.0.3"] / n - 0.1) < 0.03
    assert abs(seconds["10.0.0.2"] / n - (0.6 * 0.75 + 0.1 * 30 / 90)) < 0.04


class NoRandom(random.Random):
    def random(self) -> float:
        raise AssertionError("a priority of one carrier and one target needs no random number")


def test_one_carrier_per_priority_draws_no_random_number() -> None:
    carriers = [CarrierConfig(uri="sip:10.0.0.1", priority=1), CarrierConfig(uri="sip:10.0.0.2", priority=2)]
    r = Routing(carriers, Bindings().bindings, "sip.edge.test", rng=NoRandom())
    assert [t.peer.host for t in r.carrier_targets("+442071234567")] == ["10.0.0.1", "10.0.0.2"]
    named = Routing([CarrierConfig(uri="sips:gw.example.net", priority=1)], Bindings().bindings, "sip.edge.test",
                    rng=NoRandom(), targets=lambda c: [CarrierTarget(Peer("tls", "192.0.2.9", 5061), 0, 0)])
    (t,) = named.carrier_targets("+1555")
    assert t.ruri == "sips:+1555@gw.example.net" and t.peer == Peer("tls", "192.0.2.9", 5061)
    named.replace_carriers([CarrierConfig(uri="sip:10.0.0.7:5070")])  # a reload: the new carrier's Request-URI
    assert [t.ruri for t in named.carrier_targets("+1555")] == ["sip:+1555@10.0.0.7:5070"]
