"""The registrar against a real ``sipedge serve``, over raw UDP and TCP sockets (SPEC §4.1)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from edgeproc import EdgeProcess
from rawsip import RawSip, challenge_params, digest


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    with EdgeProcess(tmp_path_factory.mktemp("reg"), sip_extra="nonce_ttl = 5\nmin_expires = 2") as proc:
        yield proc


@pytest.fixture(scope="module")
def profile(edge: EdgeProcess) -> dict:
    with edge.client() as api:
        acct = api.post("/v1/accounts", json={"name": "R", "admin": f"r.{uuid.uuid4().hex[:6]}"}).json()
        return api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": "HQ", "channels": 2}).json()


@pytest.fixture
def ua(edge: EdgeProcess):
    client = RawSip(edge.sip_port)
    yield client
    client.close()


def register(ua: RawSip, user: str, password: str | None, *, expires: int = 120, contact: str | None = None,
             algorithm: str | None = None, call_id: str | None = None, cseq: int = 1, extra=()) -> tuple:
    """REGISTER, answer the challenge; returns (challenge response, final response, raw second request)."""
    call_id = call_id or uuid.uuid4().hex
    first = ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user, call_id=call_id, cseq=cseq,
                       headers=[("Expires", str(expires)), *extra], contact=contact)
    ua.send(first)
    challenge = ua.recv_final()
    if challenge.status != 401 or password is None:
        return challenge, challenge, first
    www = [v for v in challenge.headers("WWW-Authenticate") if algorithm is None or f"algorithm={algorithm}" in v][0]
    auth = digest("REGISTER", "sip:sip.edge.test", user, password, www)
    second = ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user, call_id=call_id,
                        cseq=cseq + 1, headers=[("Expires", str(expires)), ("Authorization", auth), *extra],
                        contact=contact)
    ua.send(second)
    return challenge, ua.recv_final(), second


def bindings(edge: EdgeProcess, profile_id: str) -> list[dict]:
    with edge.client() as api:
        return api.get(f"/v1/profiles/{profile_id}/registrations").json()


def test_challenge_offers_sha256_and_md5_with_qop(ua: RawSip, profile: dict) -> None:
    challenge, _, _ = register(ua, profile["sip_username"], None)
    assert challenge.status == 401
    offers = [challenge_params(v) for v in challenge.headers("WWW-Authenticate")]
    assert [o["algorithm"] for o in offers] == ["SHA-256", "MD5"]
    assert all(o["qop"] == "auth" and o["realm"] == "sip.edge.test" for o in offers)
    assert challenge.top_via.params.get("rport") == str(ua.port)  # RFC 3581


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_register_with_the_right_password(edge: EdgeProcess, ua: RawSip, profile: dict, algorithm: str) -> None:
    _, ok, _ = register(ua, profile["sip_username"], profile["sip_password"], algorithm=algorithm)
    assert ok.status == 200, ok.raw
    contacts = ok.contacts
    assert any(str(c.uri).endswith(f"{ua.port};transport=udp") for c in contacts)
    assert int(contacts[0].params["expires"]) <= 120
    regs = bindings(edge, profile["id"])
    assert any(r["source"] == f"udp:127.0.0.1:{ua.port}" for r in regs)


def test_wrong_password_is_refused(ua: RawSip, profile: dict) -> None:
    _, answer, _ = register(ua, profile["sip_username"], "not-the-password")
    assert answer.status == 403
    assert "Bad credentials" in answer.header("Warning")


def test_digest_username_must_be_the_sip_username(ua: RawSip, profile: dict) -> None:
    user = profile["sip_username"]
    ua.send(ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user))
    www = ua.recv_final().header("WWW-Authenticate")
    auth = digest("REGISTER", "sip:sip.edge.test", "990599999999", profile["sip_password"], www)
    ua.send(ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user,
                       headers=[("Authorization", auth)]))
    assert ua.recv_final().status == 403


def test_unknown_user_is_challenged_then_refused(ua: RawSip) -> None:
    challenge, answer, _ = register(ua, "990500099999", "whatever")
    assert challenge.status == 401 and answer.status == 403


def test_replayed_nonce_count_is_refused(ua: RawSip, profile: dict) -> None:
    user, pw = profile["sip_username"], profile["sip_password"]
    ua.send(ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user))
    www = ua.recv_final().header("WWW-Authenticate")
    auth = digest("REGISTER", "sip:sip.edge.test", user, pw, www, nc=1)
    call_id = uuid.uuid4().hex
    ua.send(ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user, call_id=call_id, cseq=2,
                       headers=[("Authorization", auth)]))
    assert ua.recv_final().status == 200
    # the same answer again in a new transaction (new branch): a replay
    ua.send(ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user, call_id=call_id, cseq=3,
                       headers=[("Authorization", auth)]))
    replay = ua.recv_final()
    assert replay.status == 403 and "Nonce count" in replay.reason
    # the next nonce count on the same nonce is fine
    auth2 = digest("REGISTER", "sip:sip.edge.test", user, pw, www, nc=2)
    ua.send(ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user, call_id=call_id, cseq=4,
                       headers=[("Authorization", auth2)]))
    assert ua.recv_final().status == 200


def test_stale_nonce_gets_stale_true(ua: RawSip, profile: dict) -> None:
    user, pw = profile["sip_username"], profile["sip_password"]
    ua.send(ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user))
    www = ua.recv_final().header("WWW-Authenticate")
    time.sleep(5.5)  # nonce_ttl = 5 in this edge's config
    auth = digest("REGISTER", "sip:sip.edge.test", user, pw, www)
    ua.send(ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user,
                       headers=[("Authorization", auth)]))
    answer = ua.recv_final()
    assert answer.status == 401
    assert all(challenge_params(v).get("stale") == "true" for v in answer.headers("WWW-Authenticate"))


def test_forged_nonce_is_challenged_again(ua: RawSip, profile: dict) -> None:
    user = profile["sip_username"]
    fake = 'Digest realm="sip.edge.test", nonce="' + "0" * 52 + '", algorithm=MD5, qop="auth"'
    auth = digest("REGISTER", "sip:sip.edge.test", user, profile["sip_password"], fake)
    ua.send(ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user=user,
                       headers=[("Authorization", auth)]))
    answer = ua.recv_final()
    assert answer.status == 401 and "stale" not in answer.header("WWW-Authenticate")


def test_retransmitted_register_is_answered_from_the_transaction(ua: RawSip, profile: dict) -> None:
    _, ok, second = register(ua, profile["sip_username"], profile["sip_password"])
    assert ok.status == 200
    ua.send(second)  # identical bytes, same branch: a retransmission, not a replay
    again = ua.recv_final()
    assert again.raw == ok.raw


def test_expires_zero_star_and_several_contacts(edge: EdgeProcess, ua: RawSip, profile: dict) -> None:
    user, pw = profile["sip_username"], profile["sip_password"]
    c1 = f"<sip:{user}@127.0.0.1:7001>"
    c2 = f"<sip:{user}@127.0.0.1:7002>"
    assert register(ua, user, pw, contact=f"{c1}, {c2};expires=90")[1].status == 200
    contacts = {b["contact"]: b for b in bindings(edge, profile["id"])}
    assert f"sip:{user}@127.0.0.1:7001" in contacts and 80 <= contacts[f"sip:{user}@127.0.0.1:7002"]["expires_in"] <= 90
    _, ok, _ = register(ua, user, pw, contact=c1, expires=0)
    assert ok.status == 200
    assert f"sip:{user}@127.0.0.1:7001" not in {b["contact"] for b in bindings(edge, profile["id"])}
    _, ok, _ = register(ua, user, pw, contact="*", expires=0)
    assert ok.status == 200 and ok.count("Contact") == 0
    assert bindings(edge, profile["id"]) == []
    _, bad, _ = register(ua, user, pw, contact="*", expires=60)
    assert bad.status == 400


def test_interval_too_brief_and_expired_bindings_are_gone(edge: EdgeProcess, ua: RawSip, profile: dict) -> None:
    user, pw = profile["sip_username"], profile["sip_password"]
    _, brief, _ = register(ua, user, pw, expires=1)
    assert brief.status == 423 and brief.header("Min-Expires") == "2"
    contact = f"<sip:{user}@127.0.0.1:7010>"
    assert register(ua, user, pw, contact=contact, expires=2)[1].status == 200
    assert any(b["contact"].endswith(":7010") for b in bindings(edge, profile["id"]))
    time.sleep(2.5)
    assert not any(b["contact"].endswith(":7010") for b in bindings(edge, profile["id"]))


def test_register_over_tcp(edge: EdgeProcess, profile: dict) -> None:
    tcp = RawSip(edge.sip_port, proto="tcp")
    try:
        _, ok, _ = register(tcp, profile["sip_username"], profile["sip_password"])
        assert ok.status == 200
        assert any(b["source"].startswith("tcp:127.0.0.1:") for b in bindings(edge, profile["id"]))
    finally:
        tcp.close()


def test_tcp_framing_split_and_pipelined(edge: EdgeProcess) -> None:
    tcp = RawSip(edge.sip_port, proto="tcp")
    try:
        one = tcp.request("OPTIONS", "sip:sip.edge.test", from_user="x", to_user="y")
        two = tcp.request("OPTIONS", "sip:sip.edge.test", from_user="x", to_user="y")
        for i in range(0, len(one), 7):  # dribbled a few bytes at a time
            tcp.send(one[i:i + 7])
            time.sleep(0.001)
        assert tcp.recv().status == 200
        tcp.send(b"\r\n\r\n" + two + one)  # keep-alive ping, then two pipelined messages
        statuses = []
        deadline = time.monotonic() + 5
        while len(statuses) < 2 and time.monotonic() < deadline:
            try:
                statuses.append(tcp.recv().status)
            except Exception:  # the CRLF pong is not a message
                tcp._buf = tcp._buf.lstrip(b"\r\n")
        assert statuses == [200, 200]
    finally:
        tcp.close()


def test_options_keepalive(ua: RawSip) -> None:
    ua.send(ua.request("OPTIONS", "sip:sip.edge.test", from_user="pbx", to_user="edge"))
    answer = ua.recv_final()
    assert answer.status == 200 and "REGISTER" in answer.headers("Allow")


MALFORMED = [
    b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKbad1\r\n"
    b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: bad1\r\nCSeq: 1 INVITE\r\n"
    b"Content-Length: 500\r\n\r\nshort",                            # body shorter than Content-Length
    b"REGISTER sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKbad2\r\n"
    b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: bad2\r\nCSeq: 1 REGISTER\r\n"
    b"Max-Forwards: 999\r\n\r\n",                                # Max-Forwards out of range
    b"REGISTER sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKbad3\r\n"
    b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: bad3\r\nCSeq: one REGISTER\r\n\r\n",  # bad CSeq: 400 (issue 9)
    b"\x00\xff garbage that is not SIP at all",
    b"SIP/2.0 200 OK\r\nVia: broken\r\n\r\n",                     # a broken response: never answered
    b"",
]


def test_malformed_datagrams_get_400_or_are_dropped_and_counted(edge: EdgeProcess, ua: RawSip) -> None:
    before = httpx.get(edge.base + "/metrics").text
    answered = 0
    for data in MALFORMED:
        ua.send(data)
        ua.sock.settimeout(0.5)
        try:
            # read raw: the answer to a bad CSeq repeats it, which a strict parser refuses
            status_line = ua.sock.recvfrom(65535)[0].split(b"\r\n", 1)[0]
            assert status_line.startswith(b"SIP/2.0 400 ") and len(status_line) > 12
            answered += 1
        except TimeoutError:
            pass
    assert answered == 3  # issue 9: a non-numeric CSeq is answered too (copied as it came)
    ua.send(ua.request("OPTIONS", "sip:sip.edge.test", from_user="pbx", to_user="edge"))
    assert ua.recv_final().status == 200  # still serving
    after = httpx.get(edge.base + "/metrics").text

    def total(text: str) -> float:
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("edge_sip_parse_errors_total"))

    assert total(after) - total(before) >= 4


def test_sip_metrics_are_exported(edge: EdgeProcess) -> None:
    text = httpx.get(edge.base + "/metrics").text
    assert 'edge_sip_messages_total{direction="in",method="REGISTER",status="0",transport="udp"}' in text
    assert 'edge_sip_messages_total{direction="out",method="REGISTER",status="401",transport="udp"}' in text
    assert 'edge_sip_auth_failures_total{method="REGISTER",reason="bad_password"}' in text
    assert "edge_registrations_active" in text


def test_out_of_order_register_cannot_undo_a_newer_one(edge: EdgeProcess, ua: RawSip, profile: dict) -> None:
    user, pw = profile["sip_username"], profile["sip_password"]
    call_id = uuid.uuid4().hex
    contact = f"<sip:{user}@127.0.0.1:7020>"
    assert register(ua, user, pw, contact=contact, call_id=call_id, cseq=10)[1].status == 200
    _, stale, _ = register(ua, user, pw, contact=contact, call_id=call_id, cseq=3, expires=0)
    assert stale.status == 500 and stale.header("Retry-After") == "1"
    assert any(b["contact"].endswith(":7020") for b in bindings(edge, profile["id"]))  # not removed


# RFC 3261 §10.3: authenticate (step 3) before looking at the address of record (steps 5, 6)

def register_to(ua: RawSip, to_value: bytes, user: str, password: str) -> tuple:
    """REGISTER with ``To: <to_value>`` as the digest ``user``; returns (challenge, final answer)."""
    call_id = uuid.uuid4().hex

    def req(cseq: int, extra=()) -> bytes:
        raw = ua.request("REGISTER", "sip:sip.edge.test", from_user=user, to_user="placeholder", call_id=call_id,
                         cseq=cseq, headers=[("Expires", "60"), *extra])
        return raw.replace(b"To: <sip:placeholder@sip.edge.test>", b"To: " + to_value)

    ua.send(req(1))
    challenge = ua.recv_final()
    if challenge.status != 401:
        return challenge, challenge
    auth = digest("REGISTER", "sip:sip.edge.test", user, password, challenge.header("WWW-Authenticate"))
    ua.send(req(2, [("Authorization", auth)]))
    return challenge, ua.recv_final()


@pytest.fixture(scope="module")
def other(edge: EdgeProcess) -> dict:
    with edge.client() as api:
        acct = api.post("/v1/accounts", json={"name": "O", "admin": f"o.{uuid.uuid4().hex[:6]}"}).json()
        return api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": "Other", "channels": 1}).json()


def test_a_to_without_user_is_challenged_first_then_not_found(ua: RawSip, profile: dict) -> None:
    challenge, answer = register_to(ua, b"<sip:sip.edge.test>", profile["sip_username"], profile["sip_password"])
    assert challenge.status == 401  # step 3 before step 5: no 400 before the challenge
    assert answer.status == 404 and "SIP username" in answer.header("Warning")


def test_an_unknown_address_of_record_is_not_found_once_authenticated(ua: RawSip, profile: dict) -> None:
    challenge, answer = register_to(ua, b"<sip:990500088888@sip.edge.test>", profile["sip_username"],
                                    profile["sip_password"])
    assert (challenge.status, answer.status) == (401, 404)


def test_registering_another_profiles_address_of_record_is_forbidden(edge: EdgeProcess, ua: RawSip, profile: dict,
                                                                      other: dict) -> None:
    to = f"<sip:{other['sip_username']}@sip.edge.test>".encode()
    challenge, answer = register_to(ua, to, profile["sip_username"], profile["sip_password"])
    assert (challenge.status, answer.status) == (401, 403)  # step 6
    assert "Digest username must be the SIP username in To" in answer.header("Warning")
    assert bindings(edge, other["id"]) == []
