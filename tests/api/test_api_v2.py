"""Control API v2 over HTTP against a real ``sipedge serve`` (issue 14, SPEC §5.1-§5.5): problem
codes, keys and scopes, the audit log, credentials, operator actions, CDR export."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from edgeproc import EdgeProcess

from edge.control import cdrs, ledger
from edge.control.models import Cdr
from edge.control.store import Store

SEEN_BODIES: list[tuple[str, bytes]] = []   # (request, body) of every response of this module (the password grep)


def code(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/problem+json"), (r.status_code, r.text)
    body = r.json()
    assert body["type"] == "urn:sipedge:error:" + body["code"] and body["status"] == r.status_code
    assert body["title"] and body["detail"]
    return body["code"]


def client(edge: EdgeProcess, token: str | None) -> httpx.Client:
    c = edge.client(token)
    c.event_hooks["response"] = [lambda r: (r.read(), SEEN_BODIES.append(
        (f"{r.request.method} {r.request.url.path}", r.content)))]
    return c


@pytest.fixture(scope="module")
def admin(edge: EdgeProcess):
    with client(edge, "test-admin-token-0123456789") as c:
        yield c


def account(admin: httpx.Client, credit: str = "0") -> dict:
    acct = admin.post("/v1/accounts", json={"name": "V2", "admin": f"v2.{uuid.uuid4().hex[:8]}"}).json()
    if Decimal(credit):
        admin.post(f"/v1/accounts/{acct['id']}/credit", json={"amount": credit})
    return acct


def profile(admin: httpx.Client, account_id: str, **kw: object) -> dict:
    r = admin.post(f"/v1/accounts/{account_id}/profiles", json={"name": "P", "channels": 2, **kw})
    assert r.status_code == 201, r.text
    return r.json()


def key(admin: httpx.Client, **body: object) -> dict:
    r = admin.post("/v1/api-keys", json={"name": "t", **body})
    assert r.status_code == 201, r.text
    return r.json()


# ----------------------------------------------------------------- codes

def test_every_documented_code_for_its_failure(edge: EdgeProcess, admin: httpx.Client) -> None:
    a = account(admin, "10")
    p = profile(admin, a["id"], channels=2)
    other = account(admin)
    number = f"+1415555{uuid.uuid4().int % 10000:04d}"
    admin.post(f"/v1/accounts/{a['id']}/numbers", json={"number": number})
    admin.post(f"/v1/profiles/{p['id']}/numbers", json={"number": number})
    p2 = profile(admin, a["id"])
    biz = f"biz.{uuid.uuid4().hex[:6]}"
    admin.post(f"/v1/accounts/{a['id']}/business-accounts", json={"name": biz})
    admin.post(f"/v1/profiles/{p['id']}/business-accounts", json={"name": biz})
    idem = {"Idempotency-Key": uuid.uuid4().hex}
    admin.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "1"}, headers=idem)
    ro = key(admin, scope="account", account_id=a["id"], read_only=True)
    slow = key(admin, scope="account", account_id=a["id"], rate_limit=1)
    with httpx.Client(base_url=edge.base) as anon, client(edge, ro["key"]) as ro_c, \
            client(edge, slow["key"]) as slow_c:
        cases = {
            "unauthorized": anon.get(f"/v1/accounts/{a['id']}"),
            "forbidden": ro_c.post(f"/v1/accounts/{a['id']}/credit", json={"amount": "1"}),
            "not_found": admin.get("/v1/profiles/prf_0000000000000000"),
            "validation_failed": admin.post("/v1/accounts", json={"name": "x"}),
            "channels_out_of_range": admin.post(f"/v1/accounts/{a['id']}/profiles",
                                                json={"name": "x", "channels": 301}),
            "bundles_exceed_channels": admin.put(f"/v1/profiles/{p['id']}/bundles", json={"us_bundles": 3}),
            "number_attached_elsewhere": admin.post(f"/v1/profiles/{p2['id']}/numbers", json={"number": number}),
            "number_invalid": admin.post(f"/v1/accounts/{a['id']}/numbers", json={"number": "+9991234567"}),
            "business_account_attached_elsewhere": admin.post(f"/v1/profiles/{p2['id']}/business-accounts",
                                                              json={"name": biz}),
            "admin_not_attachable": admin.post(f"/v1/profiles/{p['id']}/business-accounts",
                                               json={"name": a["admin"]}),
            "insufficient_funds": admin.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "1000"}),
            "idempotency_key_reused": admin.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "2"},
                                                 headers=idem),
            "account_not_empty": admin.delete(f"/v1/accounts/{a['id']}"),
            "call_not_found": admin.post("/v1/calls/cnope/hangup"),
            "malformed_json": admin.post("/v1/accounts", content=b"{", headers={"content-type": "application/json"}),
            "method_not_allowed": admin.put("/v1/accounts"),
            "unsupported_media_type": admin.put("/v1/rates", content=b"x", headers={"content-type": "text/plain"}),
        }
        statuses = [slow_c.get(f"/v1/accounts/{a['id']}") for _ in range(4)]
        cases["rate_limited"] = next(r for r in statuses if r.status_code == 429)
        assert int(cases["rate_limited"].headers["retry-after"]) >= 1
    assert admin.get(f"/v1/accounts/{other['id']}").status_code == 200
    for expected, r in cases.items():
        assert code(r) == expected, (expected, r.status_code, r.text)
    assert cases["unauthorized"].status_code == 401 and cases["forbidden"].status_code == 403
    assert cases["validation_failed"].json()["errors"][0]["pointer"] == "/admin"
    assert cases["channels_out_of_range"].status_code == 422


def test_the_openapi_document_describes_the_problems(admin: httpx.Client) -> None:
    doc = admin.get("/openapi.json").json()
    assert doc["openapi"] == "3.1.0" and "Problem" in doc["components"]["schemas"]
    ops = [op for item in doc["paths"].values() for m, op in item.items() if m in ("get", "post", "put", "delete",
                                                                                  "patch")]
    ids = [op["operationId"] for op in ops]
    assert len(ids) == len(set(ids)) and "createProfile" in ids and "hangupCall" in ids
    for op in ops:
        assert op.get("tags") and op.get("summary") and op.get("description"), op["operationId"]
        if op["operationId"] != "health":      # /healthz needs no key
            assert "401" in op["responses"] and "application/problem+json" in op["responses"]["401"]["content"]
    created = doc["paths"]["/v1/accounts"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert "$ref" in created
    page = doc["components"]["schemas"]["ProfilePage"]["properties"]["items"]
    assert page["items"]["$ref"].endswith("/ProfileOut")
    account_out = doc["components"]["schemas"]["AccountOut"]["properties"]["created_at"]
    assert account_out["format"] == "date-time"


# ------------------------------------------------------------------ keys

def test_account_keys_see_only_their_account(edge: EdgeProcess, admin: httpx.Client) -> None:
    mine, theirs = account(admin, "5"), account(admin, "5")
    p_mine, p_theirs = profile(admin, mine["id"]), profile(admin, theirs["id"])
    k = key(admin, scope="account", account_id=mine["id"])
    assert k["key"].startswith(k["id"] + ".") and "key" not in admin.get("/v1/api-keys").json()["items"][0]
    with client(edge, k["key"]) as c:
        assert c.get(f"/v1/accounts/{mine['id']}").status_code == 200
        assert c.get(f"/v1/profiles/{p_mine['id']}").status_code == 200
        for url in (f"/v1/accounts/{theirs['id']}", f"/v1/profiles/{p_theirs['id']}",
                    f"/v1/profiles/{p_theirs['id']}/credentials", f"/v1/accounts/{theirs['id']}/cdrs"):
            r = c.get(url)
            assert r.status_code == 404 and code(r) == "not_found", url     # as if it did not exist
        r = c.post(f"/v1/profiles/{p_theirs['id']}/credit", json={"amount": "1"})
        assert r.status_code == 404
        assert c.post(f"/v1/profiles/{p_mine['id']}/credit", json={"amount": "1"}).status_code == 200
        assert [a["id"] for a in c.get("/v1/accounts").json()["items"]] == [mine["id"]]
        assert {p["id"] for p in c.get("/v1/profiles").json()["items"]} == {p_mine["id"]}
        assert code(c.post("/v1/accounts", json={"name": "x", "admin": "y.z"})) == "forbidden"
        assert code(c.get("/v1/api-keys")) == "forbidden"
        assert code(c.put("/v1/rates", json={"rates": []})) == "forbidden"
    assert Decimal(admin.get(f"/v1/profiles/{p_theirs['id']}").json()["balance"]) == 0


def test_read_only_metrics_and_revoked_keys(edge: EdgeProcess, admin: httpx.Client) -> None:
    a = account(admin, "5")
    ro = key(admin, scope="account", account_id=a["id"], read_only=True)
    metrics = key(admin, scope="metrics")
    with client(edge, ro["key"]) as c:
        assert c.get(f"/v1/accounts/{a['id']}").status_code == 200
        for r in (c.post(f"/v1/accounts/{a['id']}/credit", json={"amount": "1"}),
                  c.post(f"/v1/accounts/{a['id']}/profiles", json={"name": "x", "channels": 1}),
                  c.delete(f"/v1/accounts/{a['id']}")):
            assert r.status_code == 403 and code(r) == "forbidden"
    with client(edge, metrics["key"]) as c:
        assert code(c.get(f"/v1/accounts/{a['id']}")) == "forbidden"
    assert Decimal(admin.get(f"/v1/accounts/{a['id']}").json()["balance"]) == 5
    assert admin.delete(f"/v1/api-keys/{ro['id']}").status_code == 204
    with client(edge, ro["key"]) as c:
        r = c.get(f"/v1/accounts/{a['id']}")
        assert r.status_code == 401 and code(r) == "unauthorized"
    listed = {k["id"]: k for k in admin.get("/v1/api-keys", params={"limit": 1000}).json()["items"]}
    assert listed[ro["id"]]["revoked_at"] is not None and listed[metrics["id"]]["revoked_at"] is None
    with client(edge, ro["key"][:-2] + "xx") as c:
        assert c.get("/v1/accounts").status_code == 401


def test_the_audit_log_records_each_write(edge: EdgeProcess, admin: httpx.Client) -> None:
    a = account(admin)
    k = key(admin, scope="account", account_id=a["id"])
    with client(edge, k["key"]) as c:
        assert c.post(f"/v1/accounts/{a['id']}/profiles", json={"name": "A", "channels": 1}).status_code == 201
        assert c.post(f"/v1/accounts/{a['id']}/profiles", json={"name": "B", "channels": 999}).status_code == 422
        c.get(f"/v1/accounts/{a['id']}")                                   # a read: not audited
        mine = c.get("/v1/audit", params={"limit": 1000}).json()["items"]
    assert [(e["method"], e["path"], e["status"]) for e in mine] == [
        ("POST", f"/v1/accounts/{a['id']}/profiles", 201), ("POST", f"/v1/accounts/{a['id']}/profiles", 422)]
    assert all(e["key_id"] == k["id"] and e["source"].startswith("127.0.0.1:") for e in mine)
    assert all(e["ts"].endswith("Z") for e in mine)
    everything = admin.get("/v1/audit", params={"limit": 1000}).json()["items"]
    assert any(e["key_id"] == "bootstrap" and e["path"] == "/v1/api-keys" and e["status"] == 201 for e in everything)


# ----------------------------------------------------------- credentials

def test_credentials_only_where_allowed(edge: EdgeProcess, admin: httpx.Client) -> None:
    a = account(admin)
    created = profile(admin, a["id"])
    password = created["sip_password"]
    url = f"/v1/profiles/{created['id']}"
    for r in (admin.get(url), admin.get("/v1/profiles", params={"limit": 1000}),
              admin.get(f"/v1/accounts/{a['id']}/profiles"), admin.patch(url, json={"name": "Q"})):
        assert r.status_code == 200 and password not in r.text and "sip_password" not in r.text
    assert admin.get(url + "/credentials").json()["sip_password"] == password
    rotated = admin.post(url + "/credentials/rotate").json()
    assert rotated["sip_password"] != password and admin.get(url + "/credentials").json() == rotated
    # no body but those of creation, .../credentials and the rotation ever carried a password
    secrets = (password.encode(), rotated["sip_password"].encode())
    shown = {req for req, b in SEEN_BODIES if any(pw in b for pw in secrets)}
    assert shown == {f"POST /v1/accounts/{a['id']}/profiles", f"GET {url}/credentials",
                     f"POST {url}/credentials/rotate"}, shown
    log = edge.log.read_text()
    assert password not in log and rotated["sip_password"] not in log


# ------------------------------------------------------ operator actions

def test_release_a_number_and_delete_an_account(admin: httpx.Client) -> None:
    a = account(admin, "3")
    number = f"+44207{uuid.uuid4().int % 10**7:07d}"
    assert admin.post(f"/v1/accounts/{a['id']}/numbers", json={"number": number}).status_code == 201
    p = profile(admin, a["id"])
    admin.post(f"/v1/profiles/{p['id']}/numbers", json={"number": number})
    assert admin.delete(f"/v1/accounts/{a['id']}/numbers/{number}").status_code == 204
    assert admin.get(f"/v1/profiles/{p['id']}").json()["numbers"] == []
    assert code(admin.delete(f"/v1/accounts/{a['id']}/numbers/{number}")) == "not_found"
    r = admin.delete(f"/v1/accounts/{a['id']}")
    assert r.status_code == 409 and code(r) == "account_not_empty"
    admin.delete(f"/v1/profiles/{p['id']}")
    assert code(admin.delete(f"/v1/accounts/{a['id']}")) == "account_not_empty"   # 3.00 of credit left
    b = account(admin)
    admin.post(f"/v1/accounts/{b['id']}/numbers", json={"number": number})      # released: free again
    assert admin.delete(f"/v1/accounts/{b['id']}").status_code == 204
    assert code(admin.get(f"/v1/accounts/{b['id']}")) == "not_found"
    again = admin.post("/v1/accounts", json={"name": "again", "admin": b["admin"]})   # the login is free again
    assert again.status_code == 201


def test_hangup_of_a_call_that_is_not_live(admin: httpx.Client) -> None:
    r = admin.post("/v1/calls/c0000000000000000/hangup", json={"cause": 487})
    assert r.status_code == 404 and code(r) == "call_not_found"


# ------------------------------------------------------------ CDR export

def _write_cdrs(data: Path, profile_id: str, account_id: str, n: int, t0: float) -> int:
    """n CDRs of one profile written through the store modules, each with its ledger debit; the total cost."""
    store = Store(data, map_size=256 << 20)
    total = 0
    try:
        for start in range(0, n, 5000):
            def op(txn, start=start) -> int:  # type: ignore[no-untyped-def]
                from edge.control import profiles

                prof = profiles.get(txn, profile_id)
                spent = 0
                for i in range(start, min(n, start + 5000)):
                    cost = 1000 + i % 7
                    cdr = Cdr(seq=0, call_id=f"c{i:016x}", profile_id=profile_id, direction="outgoing",
                              caller="990500000001", callee="+442071234567", started_at=t0 + i,
                              answered_at=t0 + i + 1, ended_at=t0 + i + 61, duration=60, status=200,
                              end_reason="caller_bye", cost=cost, rate_prefix="44", account_id=account_id,
                              carrier="sip:127.0.0.2:5080",
                              media={"a_packets": 3000, "b_packets": 2990, "b_lost": i % 3, "a_jitter_us": 900})
                    cdrs.add(txn, cdr)
                    ledger.move(txn, prof, -cost, "call", cdr.call_id)
                    spent += cost
                return spent

            total += store.write(op, sync=False)
        store.flush()
    finally:
        store.close()
    return total


def test_cdr_export_csv_jsonl_and_time_range(edge: EdgeProcess, admin: httpx.Client) -> None:
    a = account(admin, "1000")
    p = profile(admin, a["id"])
    admin.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "1000"})
    t0 = 1_790_000_000.0
    total = _write_cdrs(edge.data, p["id"], a["id"], 3000, t0)
    with admin.stream("GET", f"/v1/accounts/{a['id']}/cdrs", params={"format": "csv"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        text = r.read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3000 and rows[0]["carrier"] == "sip:127.0.0.2:5080"
    assert {"talk_seconds", "duration", "cost", "end_reason", "media_b_lost", "started_at"} <= set(rows[0])
    assert rows[0]["started_at"].endswith("Z") and float(rows[0]["talk_seconds"]) == 60.0
    assert sum(Decimal(r["cost"]) for r in rows) == Decimal(total) / 1_000_000
    debits = [e for e in admin.get(f"/v1/profiles/{p['id']}/ledger", params={"limit": 1000}).json()["items"]]
    assert all(e["kind"] in ("allocate_in", "call") for e in debits)
    # a time range: RFC 3339, [from, to)
    lo = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + 1000))
    hi = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + 1010))
    r = admin.get(f"/v1/profiles/{p['id']}/cdrs", params={"format": "jsonl", "from": lo, "to": hi})
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert r.headers["content-type"].startswith("application/x-ndjson") and len(lines) == 10
    page = admin.get(f"/v1/accounts/{a['id']}/cdrs", params={"from": lo, "to": hi, "limit": 4}).json()
    assert len(page["items"]) == 4 and page["next_after"] == page["items"][-1]["seq"]
    bad = admin.get(f"/v1/accounts/{a['id']}/cdrs", params={"from": "yesterday"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["parameter"] == "from"


def test_ledger_time_range(admin: httpx.Client) -> None:
    a = account(admin, "100")
    p = profile(admin, a["id"])
    for amount in ("1", "2", "3", "4", "5", "6"):
        assert admin.post(f"/v1/profiles/{p['id']}/credit", json={"amount": amount}).status_code == 200
    url = f"/v1/profiles/{p['id']}/ledger"
    full = admin.get(url, params={"limit": 100}).json()["items"]
    assert [e["kind"] for e in full] == ["allocate_in"] * 6

    def when(e: dict) -> datetime:
        return datetime.fromisoformat(e["ts"].replace("Z", "+00:00"))

    cut = full[3]["ts"]
    since = admin.get(url, params={"from": cut}).json()["items"]
    before = admin.get(url, params={"to": cut}).json()["items"]
    assert since == [e for e in full if when(e) >= when(full[3])] and full[3] in since
    assert before == [e for e in full if when(e) < when(full[3])] and since[0] not in before
    assert before + since == full                       # [from, to): every entry on exactly one side
    page = admin.get(url, params={"from": full[0]["ts"], "limit": 2}).json()
    assert page["items"] == full[:2] and page["next_after"] == full[1]["seq"]
    assert admin.get(f"/v1/accounts/{a['id']}/ledger", params={"from": "2099-01-01T00:00:00Z"}).json()["items"] == []
    bad = admin.get(url, params={"to": "tomorrow"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["parameter"] == "to"
