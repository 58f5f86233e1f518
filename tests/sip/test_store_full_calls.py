"""Calls while the store fills up to its map size (issue 9): against a real ``sipedge serve``
on the smallest map (16 MiB), with a raw-socket PBX and carrier.

A call answered before the fill keeps being funded from the store's reserve and settles
with its CDR; once the API has filled the store, a new call is refused with 503 and a
Warning saying why, a REGISTER too; nothing is left taken, balances equal their ledgers,
and the log has no traceback.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import httpx
import pytest
from edgeproc import EdgeProcess
from test_calls_raw import Carrier, Pbx, answered_call, hang_up, new_profile

MAP_MB = 16


@pytest.fixture(scope="module")
def carriers():
    carrier = Carrier("127.0.0.2")
    yield carrier, carrier
    carrier.close()


@pytest.fixture(scope="module")
def edge(tmp_path_factory, carriers):
    carrier, _ = carriers
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n'
             '[credit]\nslice_seconds = 2\n')
    proc = EdgeProcess(tmp_path_factory.mktemp("full-calls"), extra_config=extra, trusted=["127.0.0.2/32"],
                       sip_extra="rate_limit = 0", map_size_mb=MAP_MB)
    with proc:
        with proc.client() as api:
            api.put("/v1/rates", json={"rates": [  # billed by the second: every 2 s slice is a reservation
                {"prefix": "33", "rate": "1.20", "min_seconds": 1, "increment_seconds": 1}]}).raise_for_status()
        yield proc


@pytest.fixture
def pbx(edge):
    p = Pbx(edge)
    yield p
    p.close()


def fill(api: httpx.Client) -> httpx.Response:
    """Fill the store through the API until even a small write is refused: profiles with long
    allow-lists (~100 KB each, then ~10 KB, ~1 KB), then plain accounts."""
    acct = api.post("/v1/accounts", json={"name": "Filler", "admin": f"fill.{uuid.uuid4().hex[:12]}"}).json()
    refused = None
    for size in (4000, 400, 40):
        allowed = [f"10.{i // 250}.{i % 250}.1/32" for i in range(size)]
        for _ in range(400):
            r = api.post(f"/v1/accounts/{acct['id']}/profiles", timeout=30,
                         json={"name": "filler", "channels": 1, "auth": "digest", "allowed_ips": allowed})
            if r.status_code != 201:
                refused = r
                break
    for _ in range(2000):
        r = api.post("/v1/accounts", json={"name": "filler", "admin": f"fill.{uuid.uuid4().hex[:12]}"})
        if r.status_code != 201:
            return r
    assert refused is not None, "the store never filled up"
    raise AssertionError("small writes never filled the rest of the store")


def ack_final(pbx: Pbx, attempt: dict, final) -> None:
    """ACK a final failure, as a UA does (else the edge retransmits it, RFC 3261 Timer G)."""
    pbx.send(pbx.request("ACK", attempt["ruri"], from_user=attempt["user"], to_user="x", cseq=2,
                         call_id=attempt["call_id"], from_tag=attempt["from_tag"], to_tag=final.to_tag,
                         branch=attempt["branch"]))


def registration(edge: EdgeProcess, prof: dict):
    """A REGISTER of a new contact, with the digest answer."""
    from rawsip import RawSip, digest

    ua = RawSip(edge.sip_port)
    try:
        user, ruri = prof["sip_username"], "sip:sip.edge.test"
        ua.send(ua.request("REGISTER", ruri, from_user=user, to_user=user, call_id="reg-full", cseq=1,
                           headers=[("Expires", "300")]))
        challenge = ua.recv_final()
        auth = digest("REGISTER", ruri, user, prof["sip_password"], challenge.header("WWW-Authenticate"))
        ua.send(ua.request("REGISTER", ruri, from_user=user, to_user=user, call_id="reg-full", cseq=2,
                           headers=[("Expires", "300"), ("Authorization", auth)]))
        return ua.recv_final()
    finally:
        ua.close()


def drain(pbx: Pbx) -> None:
    while True:
        try:
            pbx.recv(0.7)
        except TimeoutError:
            return


def balances_equal_ledgers(api: httpx.Client, prof: dict) -> None:
    for url in (f"/v1/profiles/{prof['id']}", f"/v1/accounts/{prof['account_id']}"):
        balance = Decimal(api.get(url).json()["balance"])
        entries = api.get(url + "/ledger", params={"limit": 1000}).json()["items"]
        assert sum(Decimal(e["amount"]) for e in entries) == balance, url


def test_calls_on_a_store_that_fills_up(edge: EdgeProcess, pbx: Pbx, carriers) -> None:
    carrier, _ = carriers
    prof = new_profile(edge, credit="5.00")
    d, tag, _ = answered_call(edge, pbx, carrier, prof, callee="+33123456789")   # up before the store fills
    with edge.client() as api:
        refused = fill(api)
        assert refused.status_code == 507 and "store is full" in refused.json()["detail"]
        # the running call is funded on from the reserve: its slices (2 s) keep being reserved
        before = len(api.get(f"/v1/profiles/{prof['id']}/ledger", params={"limit": 1000}).json()["items"])
        time.sleep(4.5)
        after = api.get(f"/v1/profiles/{prof['id']}/ledger", params={"limit": 1000}).json()["items"]
        assert len(after) > before and after[-1]["kind"] == "reserve"
        assert len(api.get(f"/v1/profiles/{prof['id']}/calls").json()) == 1

        # new calls: admitted while a seize still fits in a page LMDB has (the carrier says 486,
        # and each refused call's CDR goes to the reserve), then refused before anything is taken
        final = None
        for i in range(400):
            attempt = pbx.invite(prof, f"+3312345{i:04d}")
            try:
                inv = carrier.recv_request("INVITE", timeout=1.0)
            except TimeoutError:
                final = pbx.recv_final()
                ack_final(pbx, attempt, final)
                break
            carrier.answer(inv, 486)
            busy = pbx.recv_final()
            assert busy.status == 486
            ack_final(pbx, attempt, busy)
        assert final is not None, "calls were admitted on a full store"
        assert final.status == 503 and "cannot record" in (final.header("Warning") or ""), final
        assert final.header("Retry-After")

        # a new registration is refused the same way (a refresh of one held would use the reserve)
        reg = registration(edge, prof)
        assert reg.status == 503 and reg.header("Retry-After"), reg

        # the running call ends normally: settled, its CDR written, its channel freed
        drain(pbx)  # retransmissions of the refusals sent before our ACKs arrived
        cdr = hang_up(edge, pbx, carrier, d, tag, prof)
        assert cdr["status"] == 200 and cdr["end_reason"] == "caller_bye" and Decimal(cdr["cost"]) > 0
        assert api.get(f"/v1/profiles/{prof['id']}/calls").json() == []
        balances_equal_ledgers(api, prof)
        metrics = httpx.get(edge.base + "/metrics").text
        in_use = [line for line in metrics.splitlines()
                  if line.startswith("edge_channels_in_use{") and f'profile="{prof["id"]}"' in line]
        assert in_use and in_use[0].endswith(" 0.0"), in_use
    assert "Traceback" not in edge.log.read_text()
