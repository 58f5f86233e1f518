"""The control API over HTTP against a real ``sipedge serve`` process (SPEC §3, §5)."""

from __future__ import annotations

import uuid
from decimal import Decimal

import httpx
import pytest
from edgeproc import EdgeProcess


def D(text: str) -> Decimal:
    return Decimal(text)


def where(r: httpx.Response) -> str:
    """The first invalid input of a 422 problem: its JSON pointer (or parameter name)."""
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    first = r.json()["errors"][0]
    return first.get("pointer") or first.get("parameter")


def code(r: httpx.Response) -> str:
    body = r.json()
    assert body["type"] == "urn:sipedge:error:" + body["code"] and body["status"] == r.status_code
    return body["code"]


@pytest.fixture
def account(api: httpx.Client) -> dict:
    r = api.post("/v1/accounts", json={"name": "Acme", "admin": f"admin.{uuid.uuid4().hex[:8]}"})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def funded(api: httpx.Client, account: dict) -> dict:
    r = api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": "100.00"})
    assert r.status_code == 200, r.text
    return r.json()


def new_profile(api: httpx.Client, account_id: str, **kw) -> dict:
    body = {"name": "HQ", "channels": 10, "auth": "digest", **kw}
    r = api.post(f"/v1/accounts/{account_id}/profiles", json=body)
    assert r.status_code == 201, r.text
    return r.json()


# ------------------------------------------------------------------ basics

def test_healthz_and_metrics_need_no_token(edge: EdgeProcess) -> None:
    with edge.client(token=None) as anon:
        assert anon.get("/healthz").json()["status"] == "ok"
        assert anon.get("/metrics").status_code == 200
        assert anon.get("/v1/rates/lookup", params={"number": "+44"}).status_code == 401


@pytest.mark.parametrize("header", ["Bearer wrong", "Basic dGVzdA==", "Bearer", ""])
def test_wrong_or_missing_token_is_401(edge: EdgeProcess, header: str) -> None:
    with httpx.Client(base_url=edge.base, headers={"Authorization": header} if header else {}) as c:
        r = c.post("/v1/accounts", json={"name": "x", "admin": "y"})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/openapi.json").status_code == 401


def test_openapi_document_lists_the_resources(api: httpx.Client) -> None:
    doc = api.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/accounts", "/v1/accounts/{account_id}/credit", "/v1/profiles/{profile_id}",
                 "/v1/profiles/{profile_id}/credit", "/v1/profiles/{profile_id}/auto-recharge",
                 "/v1/profiles/{profile_id}/bundles", "/v1/rates", "/v1/rates/lookup",
                 "/v1/bundle-exclusions", "/v1/profiles/{profile_id}/cdrs"):
        assert path in doc["paths"], path
    assert "ProfileCreate" in doc["components"]["schemas"]


def test_account_shape_and_top_up(api: httpx.Client, account: dict) -> None:
    assert set(account) >= {"id", "name", "admin", "balance"}
    assert D(account["balance"]) == 0
    r = api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": "100.00"})
    assert r.status_code == 200 and D(r.json()["balance"]) == D("100")
    r = api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": "0.000001"})
    assert D(r.json()["balance"]) == D("100.000001")
    assert D(api.get(f"/v1/accounts/{account['id']}").json()["balance"]) == D("100.000001")


def test_duplicate_admin_login_conflicts(api: httpx.Client, account: dict) -> None:
    r = api.post("/v1/accounts", json={"name": "Other", "admin": account["admin"]})
    assert r.status_code == 409 and code(r) == "admin_login_taken"


# ------------------------------------------------------------- bad input

def test_bad_json_is_400(api: httpx.Client) -> None:
    r = api.post("/v1/accounts", content=b'{"name": "x", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and code(r) == "malformed_json"
    assert "JSON" in r.json()["detail"]


@pytest.mark.parametrize("body, field", [
    ({"name": "x", "admin": "y", "colour": "red"}, "/colour"),
    ({"name": "x"}, "/admin"),
    ({"name": "", "admin": "y"}, "/name"),
    ({"name": "x", "admin": 5}, "/admin"),
])
def test_invalid_account_bodies_name_the_field(api: httpx.Client, body: dict, field: str) -> None:
    r = api.post("/v1/accounts", json=body)
    assert r.status_code == 422, r.text
    assert where(r) == field and code(r) == "validation_failed"


@pytest.mark.parametrize("amount", ["-1", "1e3", "1.0000001", "abc", "", " 1", "1,00", 10, 1.5, None])
def test_money_must_be_a_decimal_string(api: httpx.Client, account: dict, amount: object) -> None:
    r = api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": amount})
    assert r.status_code == 422, r.text
    assert where(r) == "/amount"
    assert D(api.get(f"/v1/accounts/{account['id']}").json()["balance"]) == 0


def test_zero_amount_is_refused(api: httpx.Client, account: dict) -> None:
    r = api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": "0.00"})
    assert r.status_code == 422 and where(r) == "/amount"


def test_unknown_resources_are_404(api: httpx.Client) -> None:
    assert api.get("/v1/accounts/acc_nope").status_code == 404
    assert api.get("/v1/profiles/prf_nope").status_code == 404
    assert api.post("/v1/profiles/prf_nope/credit", json={"amount": "1"}).status_code == 404
    assert api.post("/v1/accounts/acc_nope/profiles", json={"name": "a", "channels": 1}).status_code == 404
    r = api.get("/v1/nothing-here")
    assert r.status_code == 404 and code(r) == "not_found"


# --------------------------------------------------------------- profiles

def test_profile_shape(api: httpx.Client, account: dict) -> None:
    p = new_profile(api, account["id"])
    for key in ("id", "name", "channels", "auth", "sip_username", "sip_password", "registrar", "balance"):
        assert key in p
    assert p["sip_username"].isdigit() and len(p["sip_username"]) == 12
    assert len(p["sip_password"]) >= 12
    assert p["registrar"] == "sip.edge.test"
    again = api.get(f"/v1/profiles/{p['id']}").json()
    assert "sip_password" not in again   # only at creation and from .../credentials (SPEC §5.5)
    cred = api.get(f"/v1/profiles/{p['id']}/credentials").json()
    assert cred["sip_password"] == p["sip_password"] and cred["sip_username"] == p["sip_username"]


def test_sip_usernames_are_unique(api: httpx.Client, account: dict) -> None:
    names = {new_profile(api, account["id"], name=f"P{i}")["sip_username"] for i in range(5)}
    assert len(names) == 5


@pytest.mark.parametrize("channels, status", [(0, 422), (1, 201), (300, 201), (301, 422), (-5, 422)])
def test_channels_between_1_and_300(api: httpx.Client, account: dict, channels: int, status: int) -> None:
    r = api.post(f"/v1/accounts/{account['id']}/profiles", json={"name": "x", "channels": channels})
    assert r.status_code == status, r.text
    if status == 422:
        assert where(r) == "/channels" and code(r) == "channels_out_of_range"


def test_patch_channels_limits(api: httpx.Client, account: dict) -> None:
    p = new_profile(api, account["id"])
    assert api.patch(f"/v1/profiles/{p['id']}", json={"channels": 301}).status_code == 422
    r = api.patch(f"/v1/profiles/{p['id']}", json={"channels": 300, "name": "Big"})
    assert r.status_code == 200 and r.json()["channels"] == 300 and r.json()["name"] == "Big"
    assert where(api.patch(f"/v1/profiles/{p['id']}", json={"unknown": 1})) == "/unknown"


def test_ip_profile_needs_addresses_and_contact(api: httpx.Client, account: dict) -> None:
    base = f"/v1/accounts/{account['id']}/profiles"
    r = api.post(base, json={"name": "DC", "channels": 4, "auth": "ip"})
    assert r.status_code == 422 and where(r) == "/allowed_ips"
    r = api.post(base, json={"name": "DC", "channels": 4, "auth": "ip", "allowed_ips": ["10.0.0.300/32"],
                             "static_contact": "sip:127.0.0.1:5070"})
    assert r.status_code == 422 and where(r) == "/allowed_ips/0"
    r = api.post(base, json={"name": "DC", "channels": 4, "auth": "ip", "allowed_ips": ["127.0.0.1/32"],
                             "static_contact": "sip:127.0.0.1:5070"})
    assert r.status_code == 201 and r.json()["auth"] == "ip"
    assert r.json()["allowed_ips"] == ["127.0.0.1/32"]


def test_bundles_never_exceed_channels(api: httpx.Client, account: dict) -> None:
    p = new_profile(api, account["id"], channels=3)
    url = f"/v1/profiles/{p['id']}"
    r = api.put(url + "/bundles", json={"us_bundles": 4})
    assert r.status_code == 409 and code(r) == "bundles_exceed_channels"
    assert api.put(url + "/bundles", json={"us_bundles": 3}).json()["us_bundles"] == 3
    r = api.patch(url, json={"channels": 2})  # lowering channels below the bundles
    assert r.status_code == 409 and code(r) == "bundles_exceed_channels"
    assert api.get(url).json()["channels"] == 3
    assert api.put(url + "/bundles", json={"us_bundles": 1}).status_code == 200
    assert api.patch(url, json={"channels": 1}).status_code == 200


def test_delete_profile_returns_credit(api: httpx.Client, account: dict, funded: dict) -> None:
    p = new_profile(api, account["id"])
    api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "7.50"})
    assert api.delete(f"/v1/profiles/{p['id']}").status_code == 204
    assert api.get(f"/v1/profiles/{p['id']}").status_code == 404
    assert D(api.get(f"/v1/accounts/{account['id']}").json()["balance"]) == D("100")


# ------------------------------------------------------------------ credit

def test_allocation_moves_money_and_writes_ledger(api: httpx.Client, account: dict, funded: dict) -> None:
    p = new_profile(api, account["id"])
    r = api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "5.00"})
    assert r.status_code == 200
    assert D(r.json()["balance"]) == D("5") and D(r.json()["account_balance"]) == D("95")
    ledger = api.get(f"/v1/profiles/{p['id']}/ledger").json()["items"]
    assert [(e["kind"], D(e["amount"])) for e in ledger] == [("allocate_in", D("5"))]
    acct_ledger = api.get(f"/v1/accounts/{account['id']}/ledger").json()["items"]
    assert [(e["kind"], D(e["amount"])) for e in acct_ledger] == [("topup", D("100")), ("allocate_out", D("-5"))]


def test_allocation_never_exceeds_master_balance(api: httpx.Client, account: dict, funded: dict) -> None:
    p = new_profile(api, account["id"])
    r = api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "100.01"})
    assert r.status_code == 409 and code(r) == "insufficient_funds"
    assert D(api.get(f"/v1/accounts/{account['id']}").json()["balance"]) == D("100")
    assert D(api.get(f"/v1/profiles/{p['id']}").json()["balance"]) == 0
    assert api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "100"}).status_code == 200


def test_auto_recharge_settings_recharge_at_once_when_below(api: httpx.Client, account: dict, funded: dict) -> None:
    p = new_profile(api, account["id"])
    url = f"/v1/profiles/{p['id']}/auto-recharge"
    r = api.put(url, json={"enabled": True, "amount": "10.00", "min_balance": "2.00"})
    assert r.status_code == 200
    body = r.json()
    assert body["auto_recharge"]["enabled"] is True and D(body["auto_recharge"]["amount"]) == 10
    assert D(body["balance"]) == 10  # it was 0 < 2: recharged as a ledger entry
    kinds = [e["kind"] for e in api.get(f"/v1/profiles/{p['id']}/ledger").json()["items"]]
    assert kinds == ["auto_recharge_in"]
    assert api.put(url, json={"enabled": True, "amount": "0", "min_balance": "2"}).status_code == 422
    assert api.put(url, json={"enabled": False}).json()["auto_recharge"]["enabled"] is False


def test_idempotent_retry_moves_money_once(api: httpx.Client, account: dict, funded: dict) -> None:
    p = new_profile(api, account["id"])
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "3.00"}, headers=key)
    second = api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "3.00"}, headers=key)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.headers.get("idempotent-replayed") == "true"
    assert D(api.get(f"/v1/profiles/{p['id']}").json()["balance"]) == 3
    # the same key with another body is a conflict, not a second movement
    third = api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "4.00"}, headers=key)
    assert third.status_code == 409 and code(third) == "idempotency_key_reused"
    top = {"Idempotency-Key": uuid.uuid4().hex}
    a = api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": "1.00"}, headers=top).json()
    b = api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": "1.00"}, headers=top).json()
    assert a == b and D(a["balance"]) == D("98")


def test_failed_movement_is_not_remembered(api: httpx.Client, account: dict) -> None:
    p = new_profile(api, account["id"])
    key = {"Idempotency-Key": uuid.uuid4().hex}
    assert api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "1"}, headers=key).status_code == 409
    api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": "1"})
    assert api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "1"}, headers=key).status_code == 200


# ------------------------------------------------------ numbers & business

def test_number_attached_to_one_profile_only(api: httpx.Client, account: dict) -> None:
    number = f"+1415555{uuid.uuid4().int % 10000:04d}"
    assert api.post(f"/v1/accounts/{account['id']}/numbers", json={"number": number}).status_code == 201
    r = api.post(f"/v1/accounts/{account['id']}/numbers", json={"number": number})
    assert r.status_code == 409 and code(r) == "number_taken"
    p1, p2 = new_profile(api, account["id"]), new_profile(api, account["id"], name="B")
    r = api.post(f"/v1/profiles/{p1['id']}/numbers", json={"number": number, "extension": "sales"})
    assert r.status_code == 201 and r.json()["extension"] == "sales"
    r = api.post(f"/v1/profiles/{p2['id']}/numbers", json={"number": number})
    assert r.status_code == 409 and code(r) == "number_attached_elsewhere"
    assert api.delete(f"/v1/profiles/{p1['id']}/numbers/{number}").status_code == 204
    assert api.post(f"/v1/profiles/{p2['id']}/numbers", json={"number": number}).status_code == 201
    assert api.get(f"/v1/profiles/{p2['id']}").json()["numbers"] == [number]
    assert api.get(f"/v1/profiles/{p1['id']}").json()["numbers"] == []


@pytest.mark.parametrize("number", ["14155550100", "+0123456789", "+1", "+1415555010012345", "+1415abc0100",
                                    "+9991234567", "+1555", "+4420712345"])
def test_numbers_must_be_e164(api: httpx.Client, account: dict, number: str) -> None:
    """The rule of the SIP path (phonenumbers: valid, not only possible): +999 has no country."""
    r = api.post(f"/v1/accounts/{account['id']}/numbers", json={"number": number})
    assert r.status_code == 422 and where(r) == "/number" and code(r) == "number_invalid"


def test_number_of_another_account_cannot_be_attached(api: httpx.Client, account: dict) -> None:
    other = api.post("/v1/accounts", json={"name": "Other", "admin": f"o.{uuid.uuid4().hex[:6]}"}).json()
    number = f"+44207{uuid.uuid4().int % 10**7:07d}"
    api.post(f"/v1/accounts/{other['id']}/numbers", json={"number": number})
    p = new_profile(api, account["id"])
    assert api.post(f"/v1/profiles/{p['id']}/numbers", json={"number": number}).status_code == 404


def test_business_accounts(api: httpx.Client, account: dict) -> None:
    name = f"acme.sales.{uuid.uuid4().hex[:6]}"
    r = api.post(f"/v1/accounts/{account['id']}/business-accounts", json={"name": name})
    assert r.status_code == 201 and r.json()["can_sign_in"] is True
    p1, p2 = new_profile(api, account["id"]), new_profile(api, account["id"], name="B")
    r = api.post(f"/v1/profiles/{p1['id']}/business-accounts", json={"name": name})
    assert r.status_code == 201 and r.json()["can_sign_in"] is False
    r = api.post(f"/v1/profiles/{p2['id']}/business-accounts", json={"name": name})
    assert r.status_code == 409 and code(r) == "business_account_attached_elsewhere"
    assert api.delete(f"/v1/profiles/{p1['id']}/business-accounts/{name}").status_code == 204
    assert api.post(f"/v1/profiles/{p2['id']}/business-accounts", json={"name": name}).status_code == 201


def test_admin_login_can_never_be_attached(api: httpx.Client, account: dict) -> None:
    p = new_profile(api, account["id"])
    r = api.post(f"/v1/profiles/{p['id']}/business-accounts", json={"name": account["admin"]})
    assert r.status_code == 409 and code(r) == "admin_not_attachable"
    assert "administrator" in r.json()["detail"]
    r = api.post(f"/v1/accounts/{account['id']}/business-accounts", json={"name": account["admin"]})
    assert r.status_code == 409


# ------------------------------------------------------------------- rates

def test_rates_json_and_longest_prefix(api: httpx.Client) -> None:
    rates = [
        {"prefix": "44", "rate": "0.0200", "connect_fee": "0", "min_seconds": 60, "increment_seconds": 6,
         "description": "UK"},
        {"prefix": "4420", "rate": "0.0150", "description": "London"},
        {"prefix": "447", "rate": "0.1000", "description": "UK mobile"},
    ]
    r = api.put("/v1/rates", json={"rates": rates})
    assert r.status_code == 200 and r.json() == {"loaded": 3}
    hit = api.get("/v1/rates/lookup", params={"number": "+442071234567"}).json()
    assert hit["prefix"] == "4420" and D(hit["rate"]) == D("0.015")
    assert api.get("/v1/rates/lookup", params={"number": "+441611234567"}).json()["prefix"] == "44"
    assert api.get("/v1/rates/lookup", params={"number": "447700900123"}).json()["prefix"] == "447"
    assert api.get("/v1/rates/lookup", params={"number": "+81312345678"}).status_code == 404
    assert api.get("/v1/rates/lookup", params={"number": "not-a-number"}).status_code in (400, 422)


def test_rates_csv_and_atomic_replace(api: httpx.Client) -> None:
    csv = ("prefix,rate,connect_fee,min_seconds,increment_seconds,description\n"
           "1,0.0230,0,60,6,US\n49,0.0210,0.01,60,6,Germany\n")
    r = api.put("/v1/rates", content=csv, headers={"content-type": "text/csv"})
    assert r.status_code == 200 and r.json()["loaded"] == 2
    assert api.get("/v1/rates/lookup", params={"number": "+4930123456"}).json()["connect_fee"] == "0.01"
    bad = csv + "33,zero,0,60,6,France\n"
    r = api.put("/v1/rates", content=bad, headers={"content-type": "text/csv"})
    assert r.status_code == 422 and where(r) == "/rates/2/rate"
    # the failed load changed nothing
    assert api.get("/v1/rates/lookup", params={"number": "+4930123456"}).json()["prefix"] == "49"
    dup = "prefix,rate\n49,0.1\n49,0.2\n"
    assert api.put("/v1/rates", content=dup, headers={"content-type": "text/csv"}).status_code == 422
    r = api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "-1"}]})
    assert r.status_code == 422 and where(r).endswith("/rate")


def test_bundle_exclusions_replace(api: httpx.Client) -> None:
    r = api.put("/v1/bundle-exclusions", json={"prefixes": ["1218632", "17127256"]})
    assert r.status_code == 200 and r.json()["loaded"] == 2
    assert api.get("/v1/bundle-exclusions").json()["prefixes"] == ["1218632", "17127256"]
    assert api.put("/v1/bundle-exclusions", json={"prefixes": ["44"]}).status_code == 422


# ----------------------------------------------------------------- metrics

def test_metrics_reflect_the_store(edge: EdgeProcess, api: httpx.Client, account: dict, funded: dict) -> None:
    p = new_profile(api, account["id"], channels=7)
    api.post(f"/v1/profiles/{p['id']}/credit", json={"amount": "12.50"})
    text = httpx.get(edge.base + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("edge_channels_capacity") and p["id"] in ln)
    assert line.endswith(" 7.0")
    line = next(ln for ln in text.splitlines() if ln.startswith("edge_credit_balance") and p["id"] in ln)
    assert line.endswith(" 12.5")
    assert any(ln.startswith("edge_channels_in_use") and p["id"] in ln for ln in text.splitlines())
    assert 'edge_api_requests_total{method="POST",route="/v1/profiles/{profile_id:str}/credit",status="200"}' in text
    info = f'edge_profile_info{{account="{account["id"]}",profile="{p["id"]}",profile_name="HQ"}} 1.0'
    assert "profile_name" not in line and info in text
    assert "edge_api_request_duration_seconds_bucket" in text


def test_live_calls_cdrs_and_registrations_of_a_fresh_profile(api: httpx.Client, account: dict) -> None:
    p = new_profile(api, account["id"])
    assert api.get(f"/v1/profiles/{p['id']}/calls").json() == []
    assert api.get(f"/v1/profiles/{p['id']}/cdrs").json() == {"items": [], "next_after": None}
    assert api.get(f"/v1/profiles/{p['id']}/registrations").json() == []
    assert api.get(f"/v1/profiles/{p['id']}/cdrs", params={"limit": 0}).status_code in (400, 422)


def test_list_accounts_and_profiles_in_pages(api: httpx.Client, account: dict) -> None:
    for i in range(3):
        new_profile(api, account["id"], name=f"L{i}")
    seen, after = [], ""
    while True:
        page = api.get("/v1/profiles", params={"limit": 2, "after": after}).json()
        seen += [p["id"] for p in page["items"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert len(seen) == len(set(seen)) >= 3 and seen == sorted(seen)
    accounts = api.get("/v1/accounts", params={"limit": 1000}).json()["items"]
    assert account["id"] in {a["id"] for a in accounts}
