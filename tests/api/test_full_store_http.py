"""A full store over HTTP, against a real ``sipedge serve`` on the smallest map the config
allows (16 MiB): new writes get 507 with a body that names the cause, the edge logs it once
(no traceback), reads and /healthz go on, and every balance still equals its ledger."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from edgeproc import EdgeProcess

MAP_MB = 16


@pytest.fixture(scope="module")
def small_edge(tmp_path_factory: pytest.TempPathFactory):
    with EdgeProcess(tmp_path_factory.mktemp("full-edge"), map_size_mb=MAP_MB) as proc:
        yield proc


def rates_csv(rows: int) -> bytes:
    lines = ["prefix,rate,connect_fee,min_seconds,increment_seconds,description", "44,0.0200,0,60,6,UK"]
    lines += [f"9{i:08d},0.0100,0,1,1,filler rate row number {i}" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def put_rates(api: httpx.Client, rows: int) -> httpx.Response:
    return api.put("/v1/rates", content=rates_csv(rows), headers={"content-type": "text/csv"}, timeout=60)


def balance_equals_ledger(api: httpx.Client, url: str) -> Decimal:
    balance = Decimal(api.get(url).json()["balance"])
    entries = api.get(url + "/ledger", params={"limit": 1000}).json()["items"]
    assert sum(Decimal(e["amount"]) for e in entries) == balance, url
    return balance


def store_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "store is full" in line]


def test_a_full_store_answers_507_and_keeps_serving(small_edge: EdgeProcess) -> None:
    with small_edge.client() as api:
        acct = api.post("/v1/accounts", json={"name": "Full", "admin": f"f.{uuid.uuid4().hex[:8]}"}).json()
        assert api.post(f"/v1/accounts/{acct['id']}/credit", json={"amount": "100.00"}).status_code == 200
        prof = api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": "HQ", "channels": 2}).json()
        assert api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": "10.00"}).status_code == 200

        # bigger and bigger rate tables (each load replaces the last) until the store refuses one
        rows, loaded, refused = 20_000, 0, None
        while rows < 2_000_000:
            r = put_rates(api, rows)
            if r.status_code != 200:
                refused = r
                break
            loaded = r.json()["loaded"]
            rows = rows * 3 // 2
        assert refused is not None, "the store never filled up"
        assert refused.status_code == 507, refused.text
        body = refused.json()
        assert body["status"] == 507 and body["code"] == "store_full"
        assert "store is full" in body["detail"] and "storage.map_size_mb" in body["detail"], body
        assert loaded > 0

        # again: still 507, and the refused loads wrote nothing (the last table that fitted stays)
        for _ in range(2):
            assert put_rates(api, rows).status_code == 507
        lookup = api.get("/v1/rates/lookup", params={"number": "+900000001"})
        assert lookup.status_code == 200 and lookup.json()["prefix"] == "900000001"
        assert api.get("/v1/rates/lookup", params={"number": f"+9{rows - 1:08d}"}).status_code == 404

        # reads still work, and money is where the ledger says
        assert balance_equals_ledger(api, f"/v1/accounts/{acct['id']}") == Decimal("90")
        assert balance_equals_ledger(api, f"/v1/profiles/{prof['id']}") == Decimal("10")
        assert api.get(f"/v1/profiles/{prof['id']}").status_code == 200

        health = api.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["store"] == "full"
        gauges = {line.split()[0]: float(line.split()[1]) for line in api.get("/metrics").text.splitlines()
                  if line.startswith("edge_store_")}
        assert gauges["edge_store_map_bytes"] == MAP_MB << 20
        assert 0 < gauges["edge_store_used_bytes"] <= MAP_MB << 20

    log = small_edge.log.read_text()
    lines = store_lines(small_edge.log)
    # One line per episode, never one per refused request: a refused rate upload clears its half
    # of the double buffer, which can make room (logged) before the next write fills it again.
    episodes = [line for line in log.splitlines() if "store is full" in line or "store has room again" in line]
    assert all(("store is full" in line) == (i % 2 == 0) for i, line in enumerate(episodes)), episodes
    assert "store is full" in episodes[-1] and len(lines) <= 3, episodes
    assert str(small_edge.data) in lines[0] and str(MAP_MB << 20) in lines[0]   # path and map size
    assert "Traceback" not in log, log
