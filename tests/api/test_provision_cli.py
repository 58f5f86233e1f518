"""``sipedge account|profile|number|rates|keys|cdrs`` (edge/provision.py) against a real ``sipedge serve``:
each command as a subprocess, its JSON (``--json``) or table, problems as one line with the code and
exit 1, usage errors exit 2; ``sipedge status`` asks the paged endpoints once per page."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from edgeproc import TOKEN, EdgeProcess
from prometheus_client.parser import text_string_to_metric_families

from edge.control import cdrs, ledger, profiles
from edge.control.models import Cdr
from edge.control.store import Store


def sipedge(edge: EdgeProcess, *args: str, key: str | None = TOKEN, env_key: str = "SIPEDGE_API_KEY",
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SIPEDGE_ADMIN_TOKEN", "SIPEDGE_API_KEY", "SIPEDGE_API")}
    env["SIPEDGE_API"] = edge.base
    if key is not None:
        env[env_key] = key
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60, input=stdin)


def ok_json(edge: EdgeProcess, *args: str, **kw: str) -> object:
    out = sipedge(edge, *args, "--json", **kw)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def refused(out: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a refusal: ``sipedge GROUP ACTION: STATUS CODE: detail (METHOD PATH)``."""
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and out.stdout == "", out.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tenant(edge: EdgeProcess) -> dict:
    acct = ok_json(edge, "account", "create", "CLI Test", "--admin", f"cli.{uuid.uuid4().hex[:8]}")
    credited = ok_json(edge, "account", "credit", acct["id"], "100.00", "--idempotency-key", "cli-topup-1")
    assert credited["balance"] == "100.00"
    prof = ok_json(edge, "profile", "create", acct["id"], "HQ", "--channels", "2")
    return {"account": acct, "profile": prof}


def test_account_and_profile_commands(edge: EdgeProcess, tenant: dict) -> None:
    acct, prof = tenant["account"], tenant["profile"]
    assert prof["sip_password"] and prof["channels"] == 2 and prof["account_id"] == acct["id"]
    again = ok_json(edge, "account", "credit", acct["id"], "100.00", "--idempotency-key", "cli-topup-1")
    assert again["balance"] == "100.00"                 # the same key moved no money twice
    moved = ok_json(edge, "profile", "credit", prof["id"], "5")
    assert (Decimal(moved["balance"]), Decimal(moved["account_balance"])) == (5, 95)
    changed = ok_json(edge, "profile", "update", prof["id"], "--channels", "4", "--name", "Head Office")
    assert (changed["channels"], changed["name"]) == (4, "Head Office") and "sip_password" not in changed
    creds = ok_json(edge, "profile", "credentials", prof["id"])
    rotated = ok_json(edge, "profile", "credentials", prof["id"], "--rotate")
    assert creds["sip_password"] == prof["sip_password"] != rotated["sip_password"]
    ar = ok_json(edge, "profile", "auto-recharge", prof["id"], "on", "--amount", "2", "--min-balance", "1")
    assert ar["auto_recharge"] == {"enabled": True, "amount": "2.00", "min_balance": "1.00"}
    ledger_page = ok_json(edge, "profile", "ledger", prof["id"])
    assert [e["kind"] for e in ledger_page["items"]] == ["allocate_in"]
    # tables: every id on one line, also when piped
    table = sipedge(edge, "profile", "list", "--account", acct["id"])
    assert table.returncode == 0, table.stderr
    (line,) = [ln for ln in table.stdout.splitlines() if prof["id"] in ln]
    assert "Head Office" in line and "5.00" in line and acct["id"] in line
    listed = sipedge(edge, "account", "list")
    assert listed.returncode == 0 and any(acct["id"] in ln and "95.00" in ln for ln in listed.stdout.splitlines())
    shown = sipedge(edge, "account", "show", acct["id"])
    assert shown.returncode == 0 and "CLI Test" in shown.stdout and "95.00" in shown.stdout
    every = ok_json(edge, "profile", "list")
    assert prof["id"] in {p["id"] for p in every}


def test_numbers_rates_and_keys(edge: EdgeProcess, tenant: dict, tmp_path: Path) -> None:
    acct, prof = tenant["account"], tenant["profile"]
    number = f"+1415555{uuid.uuid4().int % 10000:04d}"
    assert ok_json(edge, "number", "buy", acct["id"], number)["number"] == number
    attached = ok_json(edge, "number", "attach", prof["id"], number, "--extension", "sales")
    assert (attached["profile_id"], attached["extension"]) == (prof["id"], "sales")
    table = sipedge(edge, "number", "list", acct["id"])
    assert table.returncode == 0 and any(number in ln and prof["id"] in ln for ln in table.stdout.splitlines())
    assert ok_json(edge, "number", "detach", prof["id"], number) == {"detached": number, "profile_id": prof["id"]}
    assert ok_json(edge, "number", "release", acct["id"], number)["released"] == number
    assert ok_json(edge, "number", "list", acct["id"]) == []

    rates_csv = tmp_path / "rates.csv"
    rates_csv.write_text("prefix,rate,connect_fee,min_seconds,increment_seconds,description\n"
                         "44,0.0200,0,60,6,UK\n4420,0.0150,0,60,6,London\n")
    assert ok_json(edge, "rates", "load", str(rates_csv)) == {"loaded": 2}
    assert ok_json(edge, "rates", "lookup", "+442071234567")["prefix"] == "4420"
    body = json.dumps({"rates": [{"prefix": "44", "rate": "0.0300"}]})
    assert ok_json(edge, "rates", "load", "-", "--format", "json", stdin=body) == {"loaded": 1}
    assert ok_json(edge, "rates", "lookup", "+442071234567")["rate"] == "0.03"

    ro = ok_json(edge, "keys", "create", "--scope", "account", "--account", acct["id"], "--read-only",
                 "--name", "portal")
    assert ro["key"] and ro["scope"] == "account" and ro["read_only"] is True
    keys_table = sipedge(edge, "keys", "list")
    assert keys_table.returncode == 0
    assert any(ro["id"] in ln and "portal" in ln for ln in keys_table.stdout.splitlines())
    # the account key reads its own profile and nothing else; writing is refused
    assert ok_json(edge, "profile", "show", prof["id"], key=ro["key"])["id"] == prof["id"]
    line = refused(sipedge(edge, "profile", "update", prof["id"], "--channels", "3", key=ro["key"]))
    assert " 403 forbidden: " in line and f"(PATCH /v1/profiles/{prof['id']})" in line
    assert [a["id"] for a in ok_json(edge, "account", "list", key=ro["key"])] == [acct["id"]]
    other = ok_json(edge, "account", "create", "Other", "--admin", f"cli.{uuid.uuid4().hex[:8]}")
    assert " 404 not_found: " in refused(sipedge(edge, "account", "show", other["id"], key=ro["key"]))
    assert ok_json(edge, "keys", "revoke", ro["id"]) == {"revoked": ro["id"]}
    assert " 401 unauthorized: " in refused(sipedge(edge, "profile", "show", prof["id"], key=ro["key"]))


def test_problems_are_one_line_with_the_code_and_exit_1(edge: EdgeProcess, tenant: dict) -> None:
    acct, prof = tenant["account"], tenant["profile"]
    assert " 409 insufficient_funds: " in refused(sipedge(edge, "profile", "credit", prof["id"], "100000"))
    line = refused(sipedge(edge, "profile", "create", acct["id"], "Big", "--channels", "500"))
    assert " 422 channels_out_of_range: " in line and "/channels" in line
    assert " 422 number_invalid: " in refused(sipedge(edge, "number", "buy", acct["id"], "+9991234567"))
    assert " 409 account_not_empty: " in refused(sipedge(edge, "account", "delete", acct["id"]))
    assert " 404 not_found: " in refused(sipedge(edge, "profile", "show", "prof_doesnotexist"))
    assert " 422 validation_failed: " in refused(sipedge(edge, "account", "credit", acct["id"], "-5"))
    assert " 401 unauthorized: " in refused(sipedge(edge, "account", "list", key="wrong"))
    gone = sipedge(edge, "account", "list", "--api", "http://127.0.0.1:9", "--timeout", "2")
    assert gone.returncode == 1 and "cannot reach" in gone.stderr


def test_usage_errors_exit_2(edge: EdgeProcess, tenant: dict) -> None:
    prof = tenant["profile"]
    no_key = sipedge(edge, "account", "list", key=None)
    assert no_key.returncode == 2 and "no key" in no_key.stderr
    assert sipedge(edge, "profile", "create", "acc_x", "HQ").returncode == 2           # --channels required
    assert sipedge(edge, "profile", "create", "acc_x", "HQ", "--channels", "ten").returncode == 2
    assert sipedge(edge, "cdrs", "list").returncode == 2                               # --profile or --account
    assert sipedge(edge, "account").returncode == 2                                     # no action
    nothing = sipedge(edge, "profile", "update", prof["id"])
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    missing = sipedge(edge, "rates", "load", "/nonexistent/rates.csv")
    assert missing.returncode == 2 and "No such file" in missing.stderr
    # the admin token from SIPEDGE_ADMIN_TOKEN works as well as SIPEDGE_API_KEY
    assert sipedge(edge, "account", "show", tenant["account"]["id"], env_key="SIPEDGE_ADMIN_TOKEN").returncode == 0


def test_cdrs_pages_and_export(edge: EdgeProcess, tenant: dict, tmp_path: Path) -> None:
    acct, prof = tenant["account"], tenant["profile"]
    store = Store(edge.data, map_size=256 << 20)
    try:
        def op(txn) -> int:  # type: ignore[no-untyped-def]
            p = profiles.get(txn, prof["id"])
            total = 0
            for i in range(250):
                cdr = Cdr(seq=0, call_id=f"cli{i:05d}", profile_id=p.id, direction="outgoing", caller="1",
                          callee="+442071234567", started_at=1_790_000_000.0 + i, answered_at=1_790_000_001.0 + i,
                          ended_at=1_790_000_031.0 + i, duration=30, status=200, end_reason="caller_bye",
                          cost=100 + i, account_id=p.account_id, carrier="sip:127.0.0.2:5080")
                cdrs.add(txn, cdr)
                ledger.move(txn, p, -cdr.cost, "call", cdr.call_id)
                total += cdr.cost
            return total

        total = store.write(op)
    finally:
        store.close()
    page = ok_json(edge, "cdrs", "list", "--profile", prof["id"], "--limit", "100")
    assert len(page["items"]) == 100 and page["items"][0]["carrier"] == "sip:127.0.0.2:5080"
    rest = ok_json(edge, "cdrs", "list", "--profile", prof["id"], "--after", str(page["next_after"]),
                   "--limit", "1000")
    assert len(rest["items"]) == 150 and rest["next_after"] is None
    table = sipedge(edge, "cdrs", "list", "--account", acct["id"], "--limit", "5")
    assert table.returncode == 0 and "cli00004" in table.stdout and "more: --after" in table.stdout
    out = tmp_path / "cdrs.csv"
    done = sipedge(edge, "cdrs", "export", "--account", acct["id"], "-o", str(out),
                   "--from", "2026-09-21T00:00:00Z")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 250 and sum(Decimal(r["cost"]) for r in rows) == Decimal(total) / 1_000_000
    jsonl = sipedge(edge, "cdrs", "export", "--profile", prof["id"], "--format", "jsonl",
                    "--to", "2026-09-21T14:13:30Z")
    assert jsonl.returncode == 0 and 0 < len(jsonl.stdout.splitlines()) < 250
    bad = refused(sipedge(edge, "cdrs", "export", "--profile", prof["id"], "--from", "yesterday"))
    assert " 422 validation_failed: " in bad and "from" in bad


def _requests_by_route(edge: EdgeProcess) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(edge.base + "/metrics").text):
        for s in family.samples:
            if s.name == "edge_api_requests_total" and s.labels["method"] == "GET":
                counts[s.labels["route"]] = counts.get(s.labels["route"], 0) + s.value
    return counts


def test_status_asks_once_per_page_not_per_profile(edge: EdgeProcess, tenant: dict) -> None:
    acct = tenant["account"]
    with edge.client() as api:
        for i in range(12):
            assert api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": f"S{i}", "channels": 1}).is_success
    before = _requests_by_route(edge)
    env = {k: v for k, v in os.environ.items() if k != "SIPEDGE_API"}
    out = subprocess.run([sys.executable, "-m", "edge.cli", "status", "--api", edge.base, "--token", TOKEN, "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["profiles"]) >= 13
    after = _requests_by_route(edge)
    asked = {route: after[route] - before.get(route, 0) for route in after if after[route] != before.get(route, 0)}
    # /metrics: status's scrape and the one of ``before`` (counted once it has answered)
    assert asked == {"/healthz": 1, "/metrics": 2, "/v1/profiles": 1, "/v1/calls": 1, "/v1/registrations": 1,
                     "/v1/accounts": 1}, asked
