"""Carriers given by host name (issue 11 item 3), through a real ``sipedge serve``: a DNS
responder on loopback serves NAPTR/SRV/A records with 1 s TTLs, raw SIP carriers on
127.0.0.x answer. Calls go to the SRV targets in priority order; after a record changes and
its TTL runs out the next call goes to the new target; a failing DNS keeps the last answer
(within ``[dns] grace``) and past it the carrier is skipped; each resolved target is probed."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from dnsresponder import DnsResponder
from edgeproc import EdgeProcess
from prometheus_client.parser import text_string_to_metric_families
from test_calls_raw import Pbx, new_profile
from test_carrier_health import ProbedCarrier, wait_until

pytestmark = pytest.mark.timeout(120)

CALLEE = "+442071234567"
RATES = {"rates": [{"prefix": "44", "rate": "0.0200", "min_seconds": 60, "increment_seconds": 6}]}


class Carriers:
    """Three raw carriers a, b, c on 127.0.0.2-4 and a static backup on 127.0.0.5."""

    def __init__(self) -> None:
        self.a, self.b, self.c = ProbedCarrier("127.0.0.2"), ProbedCarrier("127.0.0.3"), ProbedCarrier("127.0.0.4")
        self.backup = ProbedCarrier("127.0.0.5")

    def all(self) -> list[ProbedCarrier]:
        return [self.a, self.b, self.c, self.backup]

    def close(self) -> None:
        for carrier in self.all():
            carrier.close()


def srv_to(zone: DnsResponder, *targets: tuple[int, str, ProbedCarrier]) -> None:
    """SRV records of ``_sip._udp.carrier.test``: (priority, name, carrier) each."""
    zone.set("_sip._udp.carrier.test", "SRV", 1, *(f"{prio} 100 {c.port} {name}." for prio, name, c in targets))


@pytest.fixture(scope="module")
def carriers() -> Iterator[Carriers]:
    c = Carriers()
    yield c
    c.close()


@pytest.fixture(scope="module")
def zone(carriers: Carriers) -> Iterator[DnsResponder]:
    dns = DnsResponder("127.0.0.1")
    dns.set("carrier.test", "NAPTR", 1, '10 10 "s" "SIP+D2U" "" _sip._udp.carrier.test.')
    srv_to(dns, (10, "a.carrier.test", carriers.a), (20, "b.carrier.test", carriers.b))
    for name, carrier in (("a", carriers.a), ("b", carriers.b), ("c", carriers.c)):
        dns.set(f"{name}.carrier.test", "A", 1, carrier.host)
    yield dns
    dns.close()


def start_edge(tmp: Any, zone: DnsResponder, carriers: Carriers, dns_extra: str) -> EdgeProcess:
    extra = ('[[carriers]]\nuri = "sip:carrier.test"\npriority = 1\n'
             f'[[carriers]]\nuri = "sip:127.0.0.5:{carriers.backup.port}"\npriority = 2\n'
             f'[dns]\nservers = ["{zone.server}"]\ntimeout = 0.5\nretry = 0.2\n{dns_extra}\n'
             '[health]\nenabled = true\ninterval = 0.2\ntimeout = 0.3\nthreshold = 2\nrecovery = 1\n')
    proc = EdgeProcess(tmp, extra_config=extra, sip_extra="rate_limit = 0", trusted=["127.0.0.9/32"])
    proc.start()
    with proc.client() as api:
        api.put("/v1/rates", json=RATES)
    return proc


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, zone: DnsResponder, carriers: Carriers) -> Iterator[EdgeProcess]:
    proc = start_edge(tmp_path_factory.mktemp("dns"), zone, carriers, "grace = 600")
    yield proc
    proc.stop()


def metric(edge: EdgeProcess, name: str, **labels: str) -> float | None:
    text = httpx.get(edge.base + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def target_up(edge: EdgeProcess, carrier: ProbedCarrier) -> float | None:
    return metric(edge, "edge_carrier_target_up", carrier="carrier.test", target=f"udp:{carrier.host}:{carrier.port}")


def invite_reaches(pbx: Pbx, prof: dict, carrier: ProbedCarrier, status: int) -> Any:
    """The next INVITE ``carrier`` gets (the edge's attempt), answered with ``status``."""
    msg, addr = carrier.requests.get(timeout=10)
    carrier.last_addr = addr
    carrier.answer(msg, status)
    return msg


def call(pbx: Pbx, prof: dict) -> dict:
    d = pbx.invite(prof, CALLEE)
    assert d["first"].status == 407, d["first"].status
    return d


def end(pbx: Pbx, d: dict, status: int) -> None:
    final = pbx.recv_final()
    assert final.status == status, final.raw
    pbx.send(pbx.request("ACK", d["ruri"], from_user=d["user"], to_user=CALLEE, call_id=d["call_id"],
                         cseq=2, from_tag=d["from_tag"], to_tag=final.to_tag, branch=d["branch"]))


def no_invites(*carriers: ProbedCarrier) -> bool:
    return all(c.requests.empty() for c in carriers)


def drain(*carriers: ProbedCarrier) -> None:
    for c in carriers:
        try:
            while True:
                c.requests.get_nowait()
        except queue.Empty:
            pass


def test_calls_go_to_the_srv_targets_in_priority_order(edge: EdgeProcess, zone: DnsResponder,
                                                       carriers: Carriers) -> None:
    wait_until("carrier.test resolved", lambda: target_up(edge, carriers.a) == 1 and target_up(edge, carriers.b) == 1)
    assert zone.asked("carrier.test", "NAPTR") and zone.asked("_sip._udp.carrier.test", "SRV")
    assert zone.asked("a.carrier.test", "A") and not zone.asked("a.carrier.test", "AAAA")  # no IPv6 carrier side
    wait_until("both targets probed", lambda: carriers.a.options >= 1 and carriers.b.options >= 1)
    prof = new_profile(edge)
    pbx = Pbx(edge)
    try:
        d = call(pbx, prof)
        first = invite_reaches(pbx, prof, carriers.a, 503)          # priority 10 first ...
        assert first.uri.host == "carrier.test" and first.uri.user == CALLEE  # the R-URI keeps the name
        invite_reaches(pbx, prof, carriers.b, 486)                  # ... then priority 20 on its 503
        end(pbx, d, 486)
        assert no_invites(carriers.c, carriers.backup)
        with edge.client() as api:
            cdr = api.get(f"/v1/profiles/{prof['id']}/cdrs").json()["items"][0]
        assert cdr["carrier"] == "sip:carrier.test"
    finally:
        pbx.close()


def test_a_down_target_is_skipped_its_carrier_stays_up(edge: EdgeProcess, zone: DnsResponder,
                                                       carriers: Carriers) -> None:
    wait_until("a up", lambda: target_up(edge, carriers.a) == 1)
    carriers.a.alive = False
    prof = new_profile(edge)
    pbx = Pbx(edge)
    try:
        wait_until("target a marked down", lambda: target_up(edge, carriers.a) == 0)
        assert metric(edge, "edge_carrier_up", carrier="carrier.test") == 1   # b still answers
        d = call(pbx, prof)
        invite_reaches(pbx, prof, carriers.b, 486)                  # straight to b: no INVITE to a
        end(pbx, d, 486)
        assert no_invites(carriers.a)
    finally:
        carriers.a.alive = True
        pbx.close()
    wait_until("target a up again", lambda: target_up(edge, carriers.a) == 1)


def test_after_a_record_changes_and_its_ttl_runs_out_the_next_call_goes_to_the_new_target(
        edge: EdgeProcess, zone: DnsResponder, carriers: Carriers) -> None:
    srv_to(zone, (10, "c.carrier.test", carriers.c), (20, "b.carrier.test", carriers.b))
    wait_until("the new SRV answer in use", lambda: target_up(edge, carriers.c) is not None, timeout=15)
    assert target_up(edge, carriers.a) is None                      # a is gone with the old answer
    prof = new_profile(edge)
    pbx = Pbx(edge)
    try:
        d = call(pbx, prof)
        invite_reaches(pbx, prof, carriers.c, 486)
        end(pbx, d, 486)
        assert no_invites(carriers.a, carriers.b)
    finally:
        pbx.close()
        srv_to(zone, (10, "a.carrier.test", carriers.a), (20, "b.carrier.test", carriers.b))
    wait_until("back to a", lambda: target_up(edge, carriers.a) is not None, timeout=15)


def test_a_failing_dns_keeps_the_last_answer(edge: EdgeProcess, zone: DnsResponder, carriers: Carriers) -> None:
    wait_until("a in the answer", lambda: target_up(edge, carriers.a) == 1)
    before = metric(edge, "edge_carrier_dns_failures_total", carrier="carrier.test") or 0
    zone.mode = "servfail"
    try:
        # the 1 s TTL has run out and refreshes failed: the answer is older than its TTL
        wait_until("failed refreshes", lambda: (metric(edge, "edge_carrier_dns_failures_total",
                                                       carrier="carrier.test") or 0) >= before + 3, timeout=15)
        zone.mode = "silent"                                        # a server that stops answering: the same
        wait_until("a timed out refresh", lambda: (metric(edge, "edge_carrier_dns_failures_total",
                                                          carrier="carrier.test") or 0) >= before + 4, timeout=15)
        prof = new_profile(edge)
        pbx = Pbx(edge)
        try:
            d = call(pbx, prof)
            invite_reaches(pbx, prof, carriers.a, 486)              # still the last good answer's first target
            end(pbx, d, 486)
            assert no_invites(carriers.backup)
        finally:
            pbx.close()
        assert metric(edge, "edge_carrier_up", carrier="carrier.test") == 1
    finally:
        zone.mode = "answer"
    assert "DNS resolution failed" in edge.log.read_text()


def test_past_ttl_and_grace_a_carrier_without_dns_is_skipped(tmp_path: Any, zone: DnsResponder,
                                                             carriers: Carriers) -> None:
    drain(*carriers.all())
    proc = start_edge(tmp_path, zone, carriers, "grace = 0")
    try:
        wait_until("carrier.test resolved", lambda: target_up(proc, carriers.a) == 1)
        prof = new_profile(proc)
        zone.mode = "servfail"
        wait_until("carrier.test without address", lambda: metric(proc, "edge_carrier_up", carrier="carrier.test") == 0)
        assert target_up(proc, carriers.a) is None
        pbx = Pbx(proc)
        try:
            d = call(pbx, prof)
            invite_reaches(pbx, prof, carriers.backup, 486)         # priority 2, at once
            end(pbx, d, 486)
            assert no_invites(carriers.a, carriers.b)
            zone.mode = "answer"
            wait_until("carrier.test back", lambda: metric(proc, "edge_carrier_up", carrier="carrier.test") == 1)
            d = call(pbx, prof)
            invite_reaches(pbx, prof, carriers.a, 486)
            end(pbx, d, 486)
        finally:
            pbx.close()
        assert "no DNS answer past its TTL" in proc.log.read_text()
    finally:
        zone.mode = "answer"
        proc.stop()
