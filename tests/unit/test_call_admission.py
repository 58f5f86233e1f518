"""Admission (edge/calls/admission.py): every SPEC §4.2/§4.3 rule, in order, on a real store.

Each test breaks one rule of an INVITE that would otherwise pass and checks that exactly
that rule refuses it, with its status; the channel is seized last, and only once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rawsip import digest

from edge.calls.admission import Admission
from edge.calls.model import Direction, Funding, Reject
from edge.calls.routing import Routing
from edge.control import accounts, channels, ledger, numbers, profiles, rates, registrations
from edge.control.credit import ECHO_NUMBER, CreditEngine
from edge.control.errors import StoreFull
from edge.control.models import LiveCall, Rate, Registration
from edge.control.store import Store
from edge.sip import parse
from edge.sip.auth import DigestAuth, FailureTracker
from edge.sip.transport import Peer

REALM = "sip.edge.test"
PBX = Peer("udp", "192.0.2.10", 5070)
UK = Rate(prefix="44", rate=20_000, min_seconds=60, increment_seconds=6)
US = Rate(prefix="1", rate=10_000, min_seconds=60, increment_seconds=6)


class Tx:
    def __init__(self, text: str, peer: Peer = PBX) -> None:
        self.request = parse(text.encode())
        self.peer = peer


class World:
    def __init__(self, tmp: Path, *, profile_rate: float = 100.0) -> None:
        self.store = Store(tmp / "db", map_size=32 << 20, durable=False)
        self.auth = DigestAuth(REALM, algorithms=("MD5",))
        self.failures: list[tuple[str, ...]] = []
        credit = CreditEngine(self.store, slice_seconds=60)
        routing = Routing([], lambda pid: registrations.live(self.store, pid), REALM)
        self.admission = Admission(
            self.store, credit, routing, self.auth, FailureTracker(),
            count_auth_failure=lambda reason, method: self.failures.append(("challenge", reason)),
            refuse_source=lambda host, method, reason: self.failures.append(("refused", reason)),
            profile_rate_limit=profile_rate)
        acct = accounts.create(self.store, "Acme", "acme.admin")
        ledger.top_up(self.store, acct.id, 10_000_000)
        self.account = acct
        rates.replace(self.store, [UK, US])
        rates.replace_exclusions(self.store, ["1218632"])

    def profile(self, credit: int = 1_000_000, channels: int = 2, **kw: Any) -> tuple[Any, str]:
        prof, cred = profiles.create(self.store, self.account.id, "HQ", channels, realm=REALM, **kw)
        if credit:
            ledger.allocate(self.store, prof.id, credit)
        return profiles.get(self.store, prof.id), cred.password

    def invite(self, user: str, callee: str = "+442071234567", *, password: str | None = None,
               from_user: str | None = None, peer: Peer = PBX) -> Tx:
        ruri = f"sip:{callee}@{REALM}"
        auth = ""
        if password is not None:
            challenge = self.auth.challenge(proxy=True)[0][1]
            auth = f"Proxy-Authorization: {digest('INVITE', ruri, user, password, challenge)}\r\n"
        text = (f"INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {peer.host}:{peer.port};branch=z9hG4bKa1\r\n"
                f"From: <sip:{from_user or user}@{REALM}>;tag=f1\r\nTo: <{ruri}>\r\nCall-ID: c1@pbx\r\n"
                f"CSeq: 2 INVITE\r\nContact: <sip:{user}@{peer.host}:{peer.port}>\r\n{auth}"
                "Content-Length: 0\r\n\r\n")
        return Tx(text, peer)

    def check(self, tx: Tx, direction: Direction = Direction.OUTGOING) -> Any:
        return self.admission.check(tx, direction)  # type: ignore[arg-type]


def refusal(attempt: Any) -> tuple[str, int] | None:
    r = attempt.refusal
    return None if r is None else (r.rule, r.status)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_good_attempt_passes_every_rule_and_seizes_a_channel_with_its_rate(world: World) -> None:
    prof, pw = world.profile()
    a = world.check(world.invite(prof.sip_username, password=pw))
    assert a.refusal is None and a.profile.id == prof.id and a.callee == "+442071234567"
    assert a.funding is Funding.CREDIT and a.rate == UK
    live = world.admission.seize(a, "c-1")
    assert isinstance(live, LiveCall) and live.rate == UK  # recovery bills at the admitted rate
    assert channels.in_use(world.store, prof.id) == 1


def test_rule_1_no_credentials_is_challenged_a_wrong_password_refused(world: World) -> None:
    prof, pw = world.profile()
    a = world.check(world.invite(prof.sip_username))
    assert refusal(a) == ("auth_challenge", 407)
    assert any(name == "Proxy-Authenticate" for name, _ in a.refusal.headers)
    assert refusal(world.check(world.invite(prof.sip_username, password="wrong" + pw))) == ("auth", 403)
    assert ("refused", "bad_password") in world.failures  # counted, towards blocking the source


def test_rule_1_an_ip_profile_from_its_allowed_source_is_not_challenged(world: World) -> None:
    prof, _ = world.profile(auth="ip", allowed_ips=["192.0.2.0/24"], static_contact="sip:192.0.2.10:5070")
    assert refusal(world.check(world.invite(prof.sip_username))) is None
    elsewhere = Peer("udp", "198.51.100.1", 5060)
    assert refusal(world.check(world.invite(prof.sip_username, peer=elsewhere))) == ("auth_challenge", 407)


def test_rule_2_the_from_user_must_be_the_sip_username(world: World) -> None:
    prof, pw = world.profile()
    other, _ = world.profile()
    a = world.check(world.invite(prof.sip_username, password=pw, from_user=other.sip_username))
    assert refusal(a) == ("from_user", 403)


@pytest.mark.parametrize("callee", ["02071234567", "0044207123", "+44", "abc"])
def test_rule_3_national_formats_are_refused(world: World, callee: str) -> None:
    prof, pw = world.profile()
    assert refusal(world.check(world.invite(prof.sip_username, callee, password=pw))) == ("e164", 484)


def test_rule_4_a_full_profile_is_486_before_the_money_check(world: World) -> None:
    prof, pw = world.profile(credit=0, channels=1)
    channels.take(world.store, prof.id, LiveCall(call_id="busy", profile_id=prof.id, direction="incoming",
                                                 started_at=0.0))
    assert refusal(world.check(world.invite(prof.sip_username, password=pw))) == ("channels", 486)


def test_rule_5_money_no_credit_402_no_rate_404_both_recorded(world: World) -> None:
    prof, pw = world.profile(credit=0)
    a = world.check(world.invite(prof.sip_username, password=pw))
    assert refusal(a) == ("credit", 402) and a.refusal.record
    rich, pw2 = world.profile()
    b = world.check(world.invite(rich.sip_username, "+33123456789", password=pw2))
    assert refusal(b) == ("no_rate", 404) and b.refusal.record
    assert channels.in_use(world.store, prof.id) == 0  # a refused attempt takes nothing


def test_rule_5_echo_is_free_and_a_us_bundle_covers_all_but_excluded_prefixes(world: World) -> None:
    prof, pw = world.profile(credit=0)
    echo = world.check(world.invite(prof.sip_username, ECHO_NUMBER, password=pw))
    assert refusal(echo) is None and echo.funding is Funding.FREE
    profiles.set_bundles(world.store, prof.id, 1)
    us = world.check(world.invite(prof.sip_username, "+14155550123", password=pw))
    assert refusal(us) is None and us.funding is Funding.BUNDLE
    excluded = world.check(world.invite(prof.sip_username, "+12186321234", password=pw))
    assert refusal(excluded) == ("credit", 402)  # excluded: charged, and there is no credit


def test_profile_rate_limit_comes_right_after_authentication(tmp_path: Path) -> None:
    world = World(tmp_path, profile_rate=1.0)
    prof, pw = world.profile()
    results = [refusal(world.check(world.invite(prof.sip_username, password=pw))) for _ in range(4)]
    assert results[:2] == [None, None] and ("rate_limit", 503) in results[2:]  # burst of 2, then 1/s


def test_seizing_the_last_channel_exactly_one_wins(world: World) -> None:
    prof, pw = world.profile(channels=1)
    first = world.check(world.invite(prof.sip_username, password=pw))
    second = world.check(world.invite(prof.sip_username, password=pw))
    assert first.refusal is None and second.refusal is None  # both saw a free channel
    assert isinstance(world.admission.seize(first, "c-1"), LiveCall)
    lost = world.admission.seize(second, "c-2")
    assert isinstance(lost, Reject) and (lost.rule, lost.status) == ("channels", 486)
    assert channels.in_use(world.store, prof.id) == 1


def test_a_store_that_cannot_record_the_call_refuses_it_with_503_and_takes_nothing(tmp_path: Path) -> None:
    world = World(tmp_path)
    prof, pw = world.profile()
    a = world.check(world.invite(prof.sip_username, password=pw))
    filler = b"x" * 4000
    with pytest.raises(StoreFull):
        for i in range(100_000):  # fill the map with provisioning until the store says no
            world.store.write(lambda txn, i=i: txn.put_raw("meta", b"fill%d" % i, filler))
    refused = world.admission.seize(a, "c-1")
    assert isinstance(refused, Reject) and (refused.rule, refused.status) == ("store", 503)
    assert channels.in_use(world.store, prof.id) == 0


def test_incoming_rules_number_then_registration(world: World) -> None:
    prof, _ = world.profile()
    carrier = Peer("udp", "203.0.113.5", 5060)

    def incoming(callee: str) -> Any:
        text = (f"INVITE sip:{callee}@198.51.100.1 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.5;branch=z9hG4bKc\r\n"
                f"From: <sip:+33123456789@203.0.113.5>;tag=c\r\nTo: <sip:{callee}@198.51.100.1>\r\n"
                "Call-ID: in@carrier\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
        return world.check(Tx(text, carrier), Direction.INCOMING)

    assert refusal(incoming("+14155550100")) == ("unknown_number", 404)
    numbers.buy(world.store, world.account.id, "+14155550100")
    numbers.attach(world.store, prof.id, "+14155550100", "sales")
    assert refusal(incoming("+14155550100")) == ("not_registered", 480)
    registrations.save(world.store, Registration(profile_id=prof.id, contact="sip:pbx@10.0.0.9:5060",
                                                 expires_at=9e9, source="udp:192.0.2.10:5070", registered_at=1.0))
    a = incoming("+14155550100")
    assert a.refusal is None and a.caller == "+33123456789" and a.callee == "+14155550100"
    assert a.target.peer == PBX and a.target.ruri == "sip:sales@10.0.0.9:5060"
