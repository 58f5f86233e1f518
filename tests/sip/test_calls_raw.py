"""Calls through a real ``sipedge serve`` with raw-socket PBX and carriers: exact SIP on
the wire, RTP through the relay (SPEC §4.2-§4.5). The pjsua2 end-to-end tests with
real audio are in ``tests/e2e``."""

from __future__ import annotations

import socket
import time
import uuid
from decimal import Decimal

import pytest
from edgeproc import EdgeProcess
from rawsip import RawSip, digest, media_port, rtp_packet, sdp

from edge.sip import build_response, parse

DOMAIN = "sip.edge.test"


class Carrier:
    """A carrier gateway on 127.0.0.x: answers what the edge sends it."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((host, 0))
        self.rtp_port = self.rtp.getsockname()[1]

    def recv(self, timeout: float = 5.0):
        self.sock.settimeout(timeout)
        while True:
            data, addr = self.sock.recvfrom(65535)
            msg = parse(data)
            self.last_addr = addr
            return msg

    def recv_request(self, method: str, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.05, deadline - time.monotonic()))
            if msg.is_request and msg.method == method:
                return msg

    def answer(self, req, status: int, *, to_tag: str = "carrier1", body: bytes = b"", headers=()) -> None:
        hdrs = [("Contact", f"<sip:gw@{self.host}:{self.port}>"), *headers]
        if body:
            hdrs.append(("Content-Type", "application/sdp"))
        self.sock.sendto(build_response(req, status, to_tag=to_tag if status > 100 else None, headers=hdrs, body=body),
                         self.last_addr)

    def drain(self) -> None:
        self.sock.settimeout(0.05)
        try:
            while True:
                self.sock.recvfrom(65535)
        except (TimeoutError, BlockingIOError):
            pass

    def close(self) -> None:
        self.sock.close()
        self.rtp.close()


@pytest.fixture(scope="module")
def carriers():
    primary, backup = Carrier("127.0.0.2"), Carrier("127.0.0.3")
    yield primary, backup
    primary.close()
    backup.close()


@pytest.fixture(scope="module")
def edge(tmp_path_factory, carriers):
    primary, backup = carriers
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{primary.port}"\npriority = 1\nweight = 100\n'
             f'[[carriers]]\nuri = "sip:127.0.0.3:{backup.port}"\npriority = 2\nweight = 100\n'
             '[credit]\nslice_seconds = 2\n')
    proc = EdgeProcess(tmp_path_factory.mktemp("calls"), extra_config=extra, trusted=["127.0.0.2/32"],
                       sip_extra="rate_limit = 0")
    with proc:
        with proc.client() as api:
            api.put("/v1/rates", json={"rates": [
                {"prefix": "44", "rate": "0.0200", "min_seconds": 60, "increment_seconds": 6},
                {"prefix": "1", "rate": "0.0230", "min_seconds": 60, "increment_seconds": 6},
                {"prefix": "3", "rate": "1.20", "min_seconds": 1, "increment_seconds": 1, "description": "1 s steps"},
            ]})
        yield proc


def new_profile(edge: EdgeProcess, *, credit: str = "5.00", channels: int = 2) -> dict:
    with edge.client() as api:
        acct = api.post("/v1/accounts", json={"name": "C", "admin": f"c.{uuid.uuid4().hex[:8]}"}).json()
        api.post(f"/v1/accounts/{acct['id']}/credit", json={"amount": "100.00"})
        prof = api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": "PBX", "channels": channels}).json()
        if Decimal(credit):
            api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": credit})
        return prof


class Pbx(RawSip):
    def __init__(self, edge: EdgeProcess) -> None:
        super().__init__(edge.sip_port)
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind(("127.0.0.1", 0))
        self.rtp_port = self.rtp.getsockname()[1]

    def close(self) -> None:
        super().close()
        self.rtp.close()

    def invite(self, prof: dict, callee: str, *, password: str | None = None, from_user: str | None = None,
               body: bytes | None = None) -> dict:
        """INVITE, answer the 407, send the authenticated INVITE; returns the dialog state."""
        user = prof["sip_username"]
        ruri = f"sip:{callee}@{DOMAIN}"
        d = {"call_id": uuid.uuid4().hex, "from_tag": uuid.uuid4().hex[:8], "ruri": ruri, "user": from_user or user}
        body = sdp(self.rtp_port) if body is None else body
        first = self.request("INVITE", ruri, from_user=d["user"], to_user=callee, call_id=d["call_id"], cseq=1,
                             from_tag=d["from_tag"], headers=[("Content-Type", "application/sdp")], body=body,
                             branch="z9hG4bK" + uuid.uuid4().hex[:10])
        self.send(first)
        challenge = self.recv_final()
        d["first"] = challenge
        if challenge.status != 407:
            return d
        branch1 = parse(first).branch
        self.send(self.request("ACK", ruri, from_user=d["user"], to_user=callee, call_id=d["call_id"], cseq=1,
                               from_tag=d["from_tag"], to_tag=challenge.to_tag, branch=branch1))
        auth = digest("INVITE", ruri, user, password or prof["sip_password"],
                      challenge.header("Proxy-Authenticate"))
        d["branch"] = "z9hG4bK" + uuid.uuid4().hex[:10]
        self.send(self.request("INVITE", ruri, from_user=d["user"], to_user=callee, call_id=d["call_id"], cseq=2,
                               from_tag=d["from_tag"], branch=d["branch"], body=body,
                               headers=[("Content-Type", "application/sdp"), ("Proxy-Authorization", auth)]))
        return d

    def ack(self, d: dict, to_tag: str) -> None:
        self.send(self.request("ACK", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=2,
                               from_tag=d["from_tag"], to_tag=to_tag))

    def bye(self, d: dict, to_tag: str, cseq: int = 3):
        # RFC 3261 §12.2.2: a BYE's CSeq must not be lower than the dialog's last request (else 500)
        self.send(self.request("BYE", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=cseq,
                               from_tag=d["from_tag"], to_tag=to_tag))
        return self.recv_final()

    def cancel(self, d: dict):
        self.send(self.request("CANCEL", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=2,
                               from_tag=d["from_tag"], branch=d["branch"]))


@pytest.fixture
def pbx(edge):
    p = Pbx(edge)
    yield p
    p.close()


def api_get(edge: EdgeProcess, path: str):
    with edge.client() as api:
        return api.get(path).json()


def wait_for(fn, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    return fn()


def answered_call(edge, pbx: Pbx, carrier: Carrier, prof: dict, callee: str = "+442071234567"):
    """Set up an answered outgoing call; returns (dialog, pbx to-tag, carrier's INVITE)."""
    carrier.drain()
    d = pbx.invite(prof, callee)
    inv = carrier.recv_request("INVITE")
    carrier.answer(inv, 180)
    carrier.answer(inv, 200, body=sdp(carrier.rtp_port, host=carrier.host))
    ok = pbx.recv_final()
    assert ok.status == 200, ok.raw
    pbx.ack(d, ok.to_tag)
    assert carrier.recv_request("ACK").call_id == inv.call_id
    d["ok"] = ok
    return d, ok.to_tag, inv


# --------------------------------------------------------------- outgoing

def test_outgoing_call_end_to_end(edge, pbx: Pbx, carriers) -> None:
    carrier = carriers[0]
    prof = new_profile(edge)
    carrier.drain()
    d = pbx.invite(prof, "+442071234567")
    assert d["first"].status == 407
    inv = carrier.recv_request("INVITE")
    # rewritten for the carrier: E.164 R-URI, the SIP username in From, nothing of the PBX's addresses
    assert inv.uri.user == "+442071234567" and inv.from_.uri.user == prof["sip_username"]
    assert f"{pbx.port}".encode() not in inv.raw and str(pbx.rtp_port).encode() not in inv.raw
    relay_host, relay_b = media_port(inv.body)
    assert relay_host == "127.0.0.1" and b"telephone-event/8000" in inv.body
    carrier.answer(inv, 180)
    assert pbx.recv().status in (100, 180)
    carrier.answer(inv, 200, body=sdp(carrier.rtp_port, host=carrier.host))
    ok = pbx.recv_final()
    assert ok.status == 200 and ok.header("Content-Type") == "application/sdp"
    assert carrier.host.encode() not in ok.raw and str(carrier.rtp_port).encode() not in ok.raw
    _, relay_a = media_port(ok.body)
    pbx.ack(d, ok.to_tag)
    assert carrier.recv_request("ACK").to_tag == "carrier1"
    calls = api_get(edge, f"/v1/profiles/{prof['id']}/calls")
    assert len(calls) == 1 and calls[0]["direction"] == "outgoing"
    assert api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 1
    # media both ways through the relay, payload intact
    pbx.rtp.settimeout(2)
    carrier.rtp.settimeout(2)
    for seq in range(20):
        pbx.rtp.sendto(rtp_packet(seq, bytes([seq]) * 160), ("127.0.0.1", relay_a))
        got, _ = carrier.rtp.recvfrom(2048)
        assert got[12:] == bytes([seq]) * 160
        carrier.rtp.sendto(rtp_packet(seq, b"\x55" * 160, ssrc=9), ("127.0.0.1", relay_b))
        back, _ = pbx.rtp.recvfrom(2048)
        assert back[12:] == b"\x55" * 160
    time.sleep(0.2)
    bye = pbx.bye(d, ok.to_tag)
    assert bye.status == 200
    carrier_bye = carrier.recv_request("BYE")
    carrier.answer(carrier_bye, 200)
    cdrs = wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])
    cdr = cdrs[0]
    assert cdr["status"] == 200 and cdr["end_reason"] == "caller_bye" and cdr["callee"] == "+442071234567"
    assert Decimal(cdr["cost"]) == Decimal("0.02") and cdr["duration"] == 60
    assert cdr["media"]["a_packets"] == 20 and cdr["media"]["b_packets"] == 20
    assert cdr["carrier"] == f"sip:{carrier.host}:{carrier.port}" and cdr["account_id"] == prof["account_id"]
    kinds = [e["kind"] for e in api_get(edge, f"/v1/profiles/{prof['id']}/ledger")["items"]]
    assert kinds[0] == "allocate_in" and "reserve" in kinds and kinds[-2:] == ["release", "call"]
    assert Decimal(api_get(edge, f"/v1/profiles/{prof['id']}")["balance"]) == Decimal("4.98")
    assert api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0


def test_wrong_password_is_403(edge, pbx: Pbx) -> None:
    prof = new_profile(edge)
    pbx.invite(prof, "+442071234567", password="wrong")
    assert pbx.recv_final().status == 403


def test_from_user_must_be_the_sip_username(edge, pbx: Pbx) -> None:
    prof = new_profile(edge)
    pbx.invite(prof, "+442071234567", from_user="alice")
    answer = pbx.recv_final()
    assert answer.status == 403 and "From user" in answer.header("Warning")


@pytest.mark.parametrize("callee", ["02071234567", "2071234", "alice"])
def test_national_numbers_are_484(edge, pbx: Pbx, callee: str) -> None:
    prof = new_profile(edge)
    pbx.invite(prof, callee)
    answer = pbx.recv_final()
    assert answer.status == 484 and "E.164" in answer.header("Warning")


def test_no_credit_is_402_and_frees_the_channel(edge, pbx: Pbx) -> None:
    prof = new_profile(edge, credit="0.01")
    pbx.invite(prof, "+442071234567")
    answer = pbx.recv_final()
    assert answer.status == 402 and "credit" in answer.header("Warning")
    assert api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0
    refused = api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"][0]
    assert (refused["status"], refused["account_id"], refused["carrier"]) == (402, prof["account_id"], "")


def test_channel_limit(edge, pbx: Pbx, carriers) -> None:
    carrier = carriers[0]
    prof = new_profile(edge, channels=1)
    d, tag, inv = answered_call(edge, pbx, carrier, prof)
    other = Pbx(edge)
    try:
        other.invite(prof, "+442071234567")
        busy = other.recv_final()
        assert busy.status == 486 and "channels" in busy.header("Warning")
    finally:
        other.close()
    assert pbx.bye(d, tag).status == 200
    carrier.answer(carrier.recv_request("BYE"), 200)
    assert wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0)


def test_echo_number_with_zero_credit(edge, pbx: Pbx) -> None:
    prof = new_profile(edge, credit="0")
    d = pbx.invite(prof, "+17606604690")
    ok = pbx.recv_final()
    assert ok.status == 200
    _, port = media_port(ok.body)
    pbx.ack(d, ok.to_tag)
    pbx.rtp.settimeout(2)
    for seq in range(5):
        pbx.rtp.sendto(rtp_packet(seq, bytes([seq + 1]) * 160), ("127.0.0.1", port))
        echoed, _ = pbx.rtp.recvfrom(2048)
        assert echoed[12:] == bytes([seq + 1]) * 160
    # hold/resume on the echo call is answered by the edge itself
    pbx.send(pbx.request("INVITE", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=3,
                         from_tag=d["from_tag"], to_tag=ok.to_tag, body=sdp(pbx.rtp_port, session=2),
                         headers=[("Content-Type", "application/sdp")]))
    reok = pbx.recv_final()
    assert reok.status == 200 and media_port(reok.body)[1] == port
    pbx.send(pbx.request("ACK", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=3,
                         from_tag=d["from_tag"], to_tag=ok.to_tag))
    pbx.rtp.sendto(rtp_packet(99, b"\x07" * 160), ("127.0.0.1", port))
    assert pbx.rtp.recvfrom(2048)[0][12:] == b"\x07" * 160
    assert pbx.bye(d, ok.to_tag).status == 200
    cdr = wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
    assert cdr["callee"] == "+17606604690" and Decimal(cdr["cost"]) == 0 and cdr["status"] == 200


def test_cancel_before_answer(edge, pbx: Pbx, carriers) -> None:
    carrier = carriers[0]
    prof = new_profile(edge)
    carrier.drain()
    d = pbx.invite(prof, "+442071234567")
    inv = carrier.recv_request("INVITE")
    carrier.answer(inv, 180)
    time.sleep(0.1)
    pbx.cancel(d)
    statuses = set()
    deadline = time.monotonic() + 5
    while 487 not in statuses and time.monotonic() < deadline:
        statuses.add(pbx.recv().status)
    assert 487 in statuses
    cancel = carrier.recv_request("CANCEL")
    assert cancel.branch == inv.branch
    carrier.answer(cancel, 200)
    carrier.answer(inv, 487)
    assert carrier.recv_request("ACK").branch == inv.branch  # the edge ACKs the carrier's 487
    cdr = wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
    assert cdr["end_reason"] == "cancel" and cdr["status"] == 487 and Decimal(cdr["cost"]) == 0


def test_bye_from_the_carrier(edge, pbx: Pbx, carriers) -> None:
    carrier = carriers[0]
    prof = new_profile(edge)
    d, tag, inv = answered_call(edge, pbx, carrier, prof)
    bye = (f"BYE sip:edge@127.0.0.1:{edge.sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP {carrier.host}:{carrier.port};"
           f"branch=z9hG4bKcbye1\r\nFrom: {inv.header('To')};tag=carrier1\r\nTo: {inv.header('From')}\r\n"
           f"Call-ID: {inv.call_id}\r\nCSeq: 10 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
    carrier.sock.sendto(bye, ("127.0.0.1", edge.sip_port))
    pbx_bye = pbx.recv()
    while not (pbx_bye.is_request and pbx_bye.method == "BYE"):
        pbx_bye = pbx.recv()
    assert pbx_bye.call_id == d["call_id"]
    cdr = wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
    assert cdr["end_reason"] == "callee_bye"


def test_carrier_failover_on_503(edge, pbx: Pbx, carriers) -> None:
    primary, backup = carriers
    prof = new_profile(edge)
    primary.drain()
    backup.drain()
    pbx.invite(prof, "+442071234567")
    inv = primary.recv_request("INVITE")
    primary.answer(inv, 503)
    assert primary.recv_request("ACK").branch == inv.branch
    inv2 = backup.recv_request("INVITE")
    assert inv2.uri.user == "+442071234567"
    backup.answer(inv2, 404)  # a 4xx about the callee: no further failover, relayed to the PBX
    assert pbx.recv_final().status == 404
    # the CDR names the last carrier tried
    cdr = wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
    assert (cdr["status"], cdr["carrier"]) == (404, f"sip:127.0.0.3:{backup.port}")


def test_credit_runs_out_mid_call(edge, pbx: Pbx, carriers) -> None:
    carrier = carriers[0]
    prof = new_profile(edge, credit="0.06")  # 1.20/min in 1 s steps: 0.02/s, 3 s of talk
    d, tag, inv = answered_call(edge, pbx, carrier, prof, callee="+33123456789")
    t0 = time.monotonic()
    pbx.sock.settimeout(6)
    bye = pbx.recv()
    while not (bye.is_request and bye.method == "BYE"):
        bye = pbx.recv()
    elapsed = time.monotonic() - t0
    assert 2.0 <= elapsed <= 4.5, elapsed  # funded 3 s from answer, cut within a second
    assert "Credit exhausted" in bye.header("Reason")
    assert "Credit exhausted" in carrier.recv_request("BYE").header("Reason")
    cdr = wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
    assert cdr["end_reason"] == "credit_exhausted" and cdr["duration"] == 3
    assert Decimal(cdr["cost"]) == Decimal("0.06")
    assert Decimal(api_get(edge, f"/v1/profiles/{prof['id']}")["balance"]) == 0


# --------------------------------------------------------------- incoming

def register_pbx(pbx: Pbx, prof: dict) -> None:
    user = prof["sip_username"]
    pbx.send(pbx.request("REGISTER", f"sip:{DOMAIN}", from_user=user, to_user=user))
    www = pbx.recv_final().header("WWW-Authenticate")
    auth = digest("REGISTER", f"sip:{DOMAIN}", user, prof["sip_password"], www)
    pbx.send(pbx.request("REGISTER", f"sip:{DOMAIN}", from_user=user, to_user=user, headers=[("Authorization", auth)]))
    assert pbx.recv_final().status == 200


def carrier_invite(carrier: Carrier, edge, number: str, call_id: str | None = None) -> bytes:
    call_id = call_id or uuid.uuid4().hex
    body = sdp(carrier.rtp_port, host=carrier.host)
    return (f"INVITE sip:{number}@127.0.0.1:{edge.sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP {carrier.host}:{carrier.port};"
            f"branch=z9hG4bK{call_id[:10]}\r\nFrom: <sip:+442079460000@carrier.example>;tag=cf1\r\n"
            f"To: <sip:{number}@edge>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:gw@{carrier.host}:{carrier.port}>\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def carrier_final(carrier: Carrier, call_id: str | None = None) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = carrier.recv()
        if not msg.is_request and msg.status >= 200 and (call_id is None or msg.call_id == call_id):
            return msg.status
    raise AssertionError("no final answer")


def attach_number(edge, prof: dict, number: str, extension: str | None = None) -> None:
    with edge.client() as api:
        acct = prof["account_id"]
        assert api.post(f"/v1/accounts/{acct}/numbers", json={"number": number}).status_code == 201
        body = {"number": number, **({"extension": extension} if extension else {})}
        assert api.post(f"/v1/profiles/{prof['id']}/numbers", json=body).status_code == 201


@pytest.mark.parametrize("extension", [None, "sales"])
def test_incoming_call_to_a_number(edge, pbx: Pbx, carriers, extension) -> None:
    carrier = carriers[0]
    prof = new_profile(edge)
    number = f"+1415555{uuid.uuid4().int % 10000:04d}"
    attach_number(edge, prof, number, extension)
    register_pbx(pbx, prof)
    carrier.drain()
    carrier.sock.sendto(carrier_invite(carrier, edge, number), ("127.0.0.1", edge.sip_port))
    inv = pbx.recv()
    while not (inv.is_request and inv.method == "INVITE"):
        inv = pbx.recv()
    assert inv.uri.user == (extension or number)       # the number or its extension tag in the R-URI
    assert inv.to.uri.user == prof["sip_username"]     # the SIP username in To
    assert b"carrier.example" not in inv.raw and str(carrier.port).encode() not in inv.raw
    assert not inv.header("Proxy-Authenticate")
    pbx.send(build_response(inv, 200, to_tag="pbx1",
                            headers=[("Contact", f"<sip:{prof['sip_username']}@127.0.0.1:{pbx.port}>"),
                                     ("Content-Type", "application/sdp")],
                            body=sdp(pbx.rtp_port)))
    assert carrier_final(carrier) == 200
    assert api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 1
    assert api_get(edge, f"/v1/profiles/{prof['id']}/calls")[0]["direction"] == "incoming"


def test_incoming_call_to_a_business_account(edge, pbx: Pbx, carriers) -> None:
    carrier = carriers[0]
    prof = new_profile(edge)
    name = f"acme.sales{uuid.uuid4().hex[:4]}"
    with edge.client() as api:
        api.post(f"/v1/accounts/{prof['account_id']}/business-accounts", json={"name": name})
        api.post(f"/v1/profiles/{prof['id']}/business-accounts", json={"name": name})
    register_pbx(pbx, prof)
    carrier.drain()
    carrier.sock.sendto(carrier_invite(carrier, edge, name), ("127.0.0.1", edge.sip_port))
    inv = pbx.recv()
    while not (inv.is_request and inv.method == "INVITE"):
        inv = pbx.recv()
    assert inv.uri.user == name and inv.to.uri.user == prof["sip_username"]
    pbx.send(build_response(inv, 486, to_tag="pbx2"))
    assert carrier_final(carrier) == 486


def test_incoming_unknown_number_and_unregistered_pbx(edge, carriers) -> None:
    carrier = carriers[0]
    carrier.drain()
    carrier.sock.sendto(carrier_invite(carrier, edge, "+14155559999", call_id="unknown-1"),
                        ("127.0.0.1", edge.sip_port))
    assert carrier_final(carrier, "unknown-1") == 404
    prof = new_profile(edge)
    number = f"+1415556{uuid.uuid4().int % 10000:04d}"
    attach_number(edge, prof, number)
    carrier.sock.sendto(carrier_invite(carrier, edge, number, call_id="unreg-1"), ("127.0.0.1", edge.sip_port))
    assert carrier_final(carrier, "unreg-1") == 480


def test_untrusted_source_never_takes_the_incoming_path(edge, carriers) -> None:
    backup = carriers[1]  # 127.0.0.3 is a carrier target but not in [inbound] trusted
    prof = new_profile(edge)
    number = f"+1415557{uuid.uuid4().int % 10000:04d}"
    attach_number(edge, prof, number)
    backup.drain()
    backup.sock.sendto(carrier_invite(backup, edge, number, call_id="untrusted-1"), ("127.0.0.1", edge.sip_port))
    assert carrier_final(backup, "untrusted-1") == 407  # treated as an outgoing attempt: challenged


def hang_up(edge, pbx: Pbx, carrier: Carrier, d: dict, tag: str, prof: dict, cseq: int = 3) -> dict:
    assert pbx.bye(d, tag, cseq).status == 200
    carrier.answer(carrier.recv_request("BYE"), 200)
    return wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[-1]


def test_bundle_minutes_for_us_calls_not_for_excluded_prefixes(edge, pbx: Pbx, carriers) -> None:
    carrier = carriers[0]
    prof = new_profile(edge, credit="1.00", channels=2)
    with edge.client() as api:
        assert api.put(f"/v1/profiles/{prof['id']}/bundles", json={"us_bundles": 1}).status_code == 200
    d, tag, _ = answered_call(edge, pbx, carrier, prof, callee="+14155550123")
    cdr = hang_up(edge, pbx, carrier, d, tag, prof)
    assert cdr["bundle_seconds"] == 60 and Decimal(cdr["cost"]) == 0
    d, tag, _ = answered_call(edge, pbx, carrier, prof, callee="+12186321234")  # excluded: 218632xxxx
    cdr = hang_up(edge, pbx, carrier, d, tag, prof)
    assert cdr["bundle_seconds"] == 0 and Decimal(cdr["cost"]) == Decimal("0.023")
    assert Decimal(api_get(edge, f"/v1/profiles/{prof['id']}")["balance"]) == Decimal("0.977")


def test_auto_recharge_mid_call(edge, pbx: Pbx, carriers) -> None:
    carrier = carriers[0]
    prof = new_profile(edge, credit="1.01")
    with edge.client() as api:
        api.put(f"/v1/profiles/{prof['id']}/auto-recharge",
                json={"enabled": True, "amount": "2.00", "min_balance": "1.00"})
    d, tag, _ = answered_call(edge, pbx, carrier, prof, callee="+33123456789")  # 0.02/s slices of 2 s
    kinds = wait_for(lambda: [e["kind"] for e in api_get(edge, f"/v1/profiles/{prof['id']}/ledger")["items"]
                              if e["kind"] == "auto_recharge_in"])
    assert kinds == ["auto_recharge_in"]  # while the call is up
    assert len(api_get(edge, f"/v1/profiles/{prof['id']}/calls")) == 1
    cdr = hang_up(edge, pbx, carrier, d, tag, prof)
    balance = Decimal(api_get(edge, f"/v1/profiles/{prof['id']}")["balance"])
    assert balance == Decimal("3.01") - Decimal(cdr["cost"])
    text = __import__("httpx").get(edge.base + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("edge_auto_recharges_total") and prof["id"] in ln)
    assert line.endswith(" 1.0")


def test_hold_resume_and_in_dialog_requests(edge, pbx: Pbx, carriers) -> None:
    carrier = carriers[0]
    prof = new_profile(edge)
    d, tag, inv = answered_call(edge, pbx, carrier, prof)
    hold = sdp(pbx.rtp_port, session=2).replace(b"a=sendrecv", b"a=sendonly")
    for cseq, body, direction in ((3, hold, b"a=sendonly"), (4, sdp(pbx.rtp_port, session=3), b"a=sendrecv")):
        pbx.send(pbx.request("INVITE", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=cseq,
                             from_tag=d["from_tag"], to_tag=tag, body=body,
                             headers=[("Content-Type", "application/sdp")]))
        reinv = carrier.recv_request("INVITE")
        assert reinv.call_id == inv.call_id and reinv.to_tag == "carrier1" and direction in reinv.body
        assert str(pbx.rtp_port).encode() not in reinv.body
        answer = sdp(carrier.rtp_port, host=carrier.host, session=cseq)
        if direction == b"a=sendonly":
            answer = answer.replace(b"a=sendrecv", b"a=recvonly")
        carrier.answer(reinv, 200, body=answer)
        ok = pbx.recv_final()
        assert ok.status == 200 and ok.cseq == cseq and ok.body
        assert carrier.recv_request("ACK").cseq == reinv.cseq
        pbx.send(pbx.request("ACK", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=cseq,
                             from_tag=d["from_tag"], to_tag=tag))
    # INFO (e.g. SIP INFO DTMF) is relayed to the other leg and its answer comes back
    pbx.send(pbx.request("INFO", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=5,
                         from_tag=d["from_tag"], to_tag=tag, body=b"Signal=5\r\nDuration=160\r\n",
                         headers=[("Content-Type", "application/dtmf-relay")]))
    info = carrier.recv_request("INFO")
    assert info.body == b"Signal=5\r\nDuration=160\r\n"
    carrier.answer(info, 200)
    assert pbx.recv_final().status == 200
    hang_up(edge, pbx, carrier, d, tag, prof, cseq=6)


def test_in_dialog_request_for_an_unknown_dialog_is_481(edge, pbx: Pbx) -> None:
    pbx.send(pbx.request("BYE", f"sip:x@{DOMAIN}", from_user="a", to_user="b", to_tag="nope", from_tag="t"))
    assert pbx.recv_final().status == 481


def test_call_metrics(edge) -> None:
    text = __import__("httpx").get(edge.base + "/metrics").text
    assert 'edge_calls_started_total{direction="outgoing"}' in text
    assert 'edge_calls_ended_total{direction="outgoing",reason="caller_bye",status="200"}' in text
    assert 'edge_calls_rejected_total{direction="outgoing",rule="e164",status="484"}' in text
    assert 'edge_call_setup_seconds_bucket{direction="outgoing",le="0.1",stage="answer"}' in text
    assert "edge_credit_cutoffs_total 1.0" in text
    assert "edge_rtp_" in text


def test_setup_timeout_cancels_a_call_that_rings_forever(tmp_path, carriers) -> None:
    carrier = carriers[0]
    extra = f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n'
    with EdgeProcess(tmp_path, extra_config=extra, sip_extra="setup_timeout = 1.5\nrate_limit = 0") as edge:
        with edge.client() as api:
            api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.02"}]})
        prof = new_profile(edge)
        pbx = Pbx(edge)
        try:
            carrier.drain()
            pbx.invite(prof, "+442071234567")
            inv = carrier.recv_request("INVITE")
            carrier.answer(inv, 180)
            t0 = time.monotonic()
            assert pbx.recv_final(timeout=5).status == 408
            assert 1.0 <= time.monotonic() - t0 <= 3.0
            assert carrier.recv_request("CANCEL").branch == inv.branch
            cdr = wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
            assert cdr["end_reason"] == "timeout" and cdr["status"] == 408
        finally:
            pbx.close()


def test_route_to_the_edge_and_record_route_of_the_pbx_side(edge, pbx: Pbx, carriers) -> None:
    """A PBX using the edge as outbound proxy sends a Route to it; a proxy on the PBX side
    Record-Routes. The edge terminates the leg and uses that route set in-dialog."""
    carrier = carriers[0]
    prof = new_profile(edge)
    carrier.drain()
    ruri = f"sip:+442071234567@{DOMAIN}"
    route = [("Route", f"<sip:127.0.0.1:{edge.sip_port};lr>"),
             ("Record-Route", f"<sip:127.0.0.1:{pbx.port};lr;ftag=pbxproxy>")]
    body = sdp(pbx.rtp_port)
    call_id, ftag = uuid.uuid4().hex, "rr1"
    pbx.send(pbx.request("INVITE", ruri, from_user=prof["sip_username"], to_user="+442071234567", call_id=call_id,
                         cseq=1, from_tag=ftag, body=body, headers=[("Content-Type", "application/sdp"), *route]))
    challenge = pbx.recv_final()
    auth = digest("INVITE", ruri, prof["sip_username"], prof["sip_password"], challenge.header("Proxy-Authenticate"))
    pbx.send(pbx.request("INVITE", ruri, from_user=prof["sip_username"], to_user="+442071234567", call_id=call_id,
                         cseq=2, from_tag=ftag, body=body,
                         headers=[("Content-Type", "application/sdp"), ("Proxy-Authorization", auth), *route]))
    inv = carrier.recv_request("INVITE")
    assert not inv.header("Route") and not inv.header("Record-Route")  # nothing of the PBX side leaks
    carrier.answer(inv, 200, body=sdp(carrier.rtp_port, host=carrier.host))
    ok = pbx.recv_final()
    assert ok.status == 200 and ok.headers("Record-Route") == [f"<sip:127.0.0.1:{pbx.port};lr;ftag=pbxproxy>"]
    bye = (f"BYE sip:edge@127.0.0.1:{edge.sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP {carrier.host}:{carrier.port};"
           f"branch=z9hG4bKrrbye\r\nFrom: {inv.header('To')};tag=carrier1\r\nTo: {inv.header('From')}\r\n"
           f"Call-ID: {inv.call_id}\r\nCSeq: 10 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
    carrier.sock.sendto(bye, ("127.0.0.1", edge.sip_port))
    pbx_bye = pbx.recv()
    while not (pbx_bye.is_request and pbx_bye.method == "BYE"):
        pbx_bye = pbx.recv()
    assert pbx_bye.headers("Route") == [f"<sip:127.0.0.1:{pbx.port};lr;ftag=pbxproxy>"]
    assert pbx_bye.uri.port == pbx.port and pbx_bye.to_tag == ftag


def test_incoming_call_reaches_a_pbx_registered_over_tcp(edge, carriers) -> None:
    """The INVITE goes back over the TCP connection the PBX registered on (NAT-friendly)."""
    carrier = carriers[0]
    prof = new_profile(edge)
    number = f"+1415558{uuid.uuid4().int % 10000:04d}"
    attach_number(edge, prof, number)
    tcp = RawSip(edge.sip_port, proto="tcp")
    try:
        register_pbx(tcp, prof)
        carrier.drain()
        carrier.sock.sendto(carrier_invite(carrier, edge, number, call_id="tcp-in-1"), ("127.0.0.1", edge.sip_port))
        inv = tcp.recv()
        while not (inv.is_request and inv.method == "INVITE"):
            inv = tcp.recv()
        assert inv.top_via.transport == "TCP" and inv.uri.user == number
        tcp.send(build_response(inv, 486, to_tag="busy"))
        assert carrier_final(carrier, "tcp-in-1") == 486
    finally:
        tcp.close()
