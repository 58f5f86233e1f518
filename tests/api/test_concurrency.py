"""Concurrent writers: threads and processes over HTTP, and a second process writing the
same LMDB directly while the API serves. Exactly the funded movements succeed."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
from edgeproc import TOKEN, EdgeProcess


def _setup(api: httpx.Client, balance: str, profiles: int) -> tuple[str, list[str]]:
    acct = api.post("/v1/accounts", json={"name": "Conc", "admin": f"c.{uuid.uuid4().hex[:8]}"}).json()
    api.post(f"/v1/accounts/{acct['id']}/credit", json={"amount": balance})
    ids = [api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": f"p{i}", "channels": 5}).json()["id"]
           for i in range(profiles)]
    return acct["id"], ids


def _audit_ok(edge: EdgeProcess, api: httpx.Client, account_id: str, profile_ids: list[str]) -> Decimal:
    """Balances equal their ledgers; returns the total still on the account and its profiles."""
    total = Decimal(0)
    owners = [("account", f"/v1/accounts/{account_id}")] + [("profile", f"/v1/profiles/{p}") for p in profile_ids]
    for owner, url in owners:
        balance = Decimal(api.get(url).json()["balance"])
        entries = api.get(url + "/ledger", params={"limit": 1000}).json()["items"]
        assert sum(Decimal(e["amount"]) for e in entries) == balance, owner
        total += balance
    return total


def test_threads_exceeding_the_balance(edge: EdgeProcess, api: httpx.Client) -> None:
    account_id, profiles = _setup(api, "10.00", 4)

    def allocate(i: int) -> int:
        with edge.client() as c:
            return c.post(f"/v1/profiles/{profiles[i % 4]}/credit", json={"amount": "1.00"}).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(allocate, range(24)))
    assert statuses.count(200) == 10
    assert statuses.count(409) == 14
    assert Decimal(api.get(f"/v1/accounts/{account_id}").json()["balance"]) == 0
    assert _audit_ok(edge, api, account_id, profiles) == Decimal("10.00")


def _http_allocations(base: str, profile_id: str, n: int, queue: mp.Queue) -> None:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as c:
        queue.put([c.post(f"/v1/profiles/{profile_id}/credit", json={"amount": "0.50"}).status_code for _ in range(n)])


def test_processes_exceeding_the_balance(edge: EdgeProcess, api: httpx.Client) -> None:
    account_id, profiles = _setup(api, "7.00", 4)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_http_allocations, args=(edge.base, profiles[i], 6, queue)) for i in range(4)]
    for p in procs:
        p.start()
    statuses = [s for _ in procs for s in queue.get(timeout=60)]
    for p in procs:
        p.join(10)
    assert statuses.count(200) == 14 and statuses.count(409) == 10
    assert _audit_ok(edge, api, account_id, profiles) == Decimal("7.00")


def test_concurrent_retries_with_one_key_move_money_once(edge: EdgeProcess, api: httpx.Client) -> None:
    account_id, profiles = _setup(api, "50.00", 1)
    key = uuid.uuid4().hex

    def allocate(_: int) -> tuple[int, str]:
        with edge.client() as c:
            r = c.post(f"/v1/profiles/{profiles[0]}/credit", json={"amount": "2.00"}, headers={"Idempotency-Key": key})
            return r.status_code, r.json()["balance"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(allocate, range(16)))
    assert {r for r in results} == {(200, "2.00")}
    assert Decimal(api.get(f"/v1/accounts/{account_id}").json()["balance"]) == Decimal("48")


def _direct_writer(data_dir: str, account_id: str, profile_id: str, n: int, queue: mp.Queue) -> None:
    """A second process on the same LMDB, writing while the API process writes too."""
    from edge.control import ledger
    from edge.control.errors import InsufficientFunds
    from edge.control.store import Store

    store = Store(data_dir, map_size=256 << 20)
    ok = 0
    for _ in range(n):
        ledger.top_up(store, account_id, 1_000_000, ref="direct")
        try:
            ledger.allocate(store, profile_id, 1_500_000, ref="direct")
            ok += 1
        except InsufficientFunds:
            pass
    store.close()
    queue.put(ok)


def test_api_and_a_second_process_write_at_once(edge: EdgeProcess, api: httpx.Client) -> None:
    account_id, profiles = _setup(api, "5.00", 2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    writer = ctx.Process(target=_direct_writer, args=(str(edge.data), account_id, profiles[0], 40, queue))
    writer.start()
    api_ok = 0
    for _ in range(40):
        r = api.post(f"/v1/profiles/{profiles[1]}/credit", json={"amount": "0.25"})
        assert r.status_code in (200, 409)
        api_ok += r.status_code == 200
    direct_ok = queue.get(timeout=60)
    writer.join(10)
    # 5.00 initial + 40 x 1.00 topped up by the other process: nothing created or lost
    assert _audit_ok(edge, api, account_id, profiles) == Decimal("45.00")
    prof0 = Decimal(api.get(f"/v1/profiles/{profiles[0]}").json()["balance"])
    prof1 = Decimal(api.get(f"/v1/profiles/{profiles[1]}").json()["balance"])
    assert prof0 == Decimal("1.5") * direct_ok and prof1 == Decimal("0.25") * api_ok


def _take_channels(data_dir: str, profile_id: str, attempts: int, queue: mp.Queue) -> None:
    import os
    import time

    from edge.control import channels
    from edge.control.models import LiveCall
    from edge.control.store import Store

    store = Store(data_dir, map_size=256 << 20)
    taken = 0
    for i in range(attempts):
        call = LiveCall(call_id=f"{os.getpid()}-{i}", profile_id=profile_id, direction="outgoing",
                        started_at=time.time())
        taken += store.write(lambda txn, call=call: channels.take(txn, profile_id, call))
    store.close()
    queue.put(taken)


def test_processes_never_take_more_channels_than_the_profile_has(edge: EdgeProcess, api: httpx.Client) -> None:
    _, profiles = _setup(api, "1.00", 1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_take_channels, args=(str(edge.data), profiles[0], 10, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    taken = sum(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    assert taken == 5
    assert api.get(f"/v1/profiles/{profiles[0]}").json()["channels_in_use"] == 5
    assert len(api.get(f"/v1/profiles/{profiles[0]}/calls").json()) == 5
