"""Control-API latency of the hot provisioning calls with 50 concurrent clients (issue 14).

A real ``sipedge serve`` (bench/apiedge.py, the bootstrap admin token, no key rate limit, webhooks off)
and one asyncio process of ``--clients`` httpx clients, each on its own keep-alive connection, sending
back to back. One operation at a time, so each has its own figures:

- ``create_profile``  POST /v1/accounts/{id}/profiles (a write with fsync: the profile, its credentials)
- ``credit``          POST /v1/profiles/{id}/credit (an allocation: two ledger entries, fsync)
- ``get_profile``     GET /v1/profiles/{id}
- ``list_cdrs``       GET /v1/profiles/{id}/cdrs?limit=100 (a page of 100 CDRs of a profile holding 2,000)
- ``rates_upload``    PUT /v1/rates, a CSV of ``--rate-rows`` rows (replaces the table atomically)

Each operation runs until ``--requests`` answers (``--rates-requests`` for uploads) or ``--seconds`` have
passed, whichever is first, after a warm-up of one request per client. Reported per operation: answers,
errors, throughput, latency p50/p90/p99/max (ms, client side: queueing in the server included), and the
server's CPU seconds per 1,000 answers. The client shares the machine's 2 cores with the server: read the
figures as "this node under 50 eager clients", not as a capacity limit.

    .venv/bin/python -m bench.bench_api                  # ~2 min here
    .venv/bin/python -m bench.bench_api --requests 500   # a quick run
Results: bench/results/api.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.apiedge import TOKEN, ApiEdge
from bench.common import machine_info, write_result
from edge.control import cdrs, profiles
from edge.control.models import Cdr
from edge.control.store import Store

CLK_TCK = os.sysconf("SC_CLK_TCK")
MAP_MB = 2048


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK        # utime + stime


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def run_op(base: str, clients: int, request: Request, count: int, seconds: float) -> dict[str, Any]:
    """``clients`` workers send ``request`` back to back until ``count`` answers or ``seconds``."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = itertools.count()
    deadline = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient, first: int) -> None:
        await request(client, first)                        # warm-up: the connection, the route
        while time.monotonic() < deadline:
            n = next(counter)
            if n >= count:
                return
            start = time.perf_counter()
            try:
                r = await request(client, n + clients)
                ok = r.status_code < 400
                what = str(r.status_code)
            except httpx.HTTPError as exc:
                ok, what = False, type(exc).__name__
            if ok:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                errors[what] = errors.get(what, 0) + 1

    headers = {"Authorization": f"Bearer {TOKEN}"}
    pool = [httpx.AsyncClient(base_url=base, headers=headers, timeout=60.0,
                              limits=httpx.Limits(max_connections=1)) for _ in range(clients)]
    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(c, i) for i, c in enumerate(pool)))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))
    latencies.sort()
    if not latencies:
        return {"answers": 0, "errors": errors}
    return {"answers": len(latencies), "errors": errors, "seconds": round(wall, 2),
            "per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(statistics.median(latencies), 2), "p90_ms": round(percentile(latencies, 0.90), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2), "max_ms": round(latencies[-1], 2)}


def seed_cdrs(data: Path, profile_ids: list[str], per_profile: int) -> None:
    store = Store(data, map_size=MAP_MB << 20)
    try:
        def op(txn: Any) -> None:
            for pid in profile_ids:
                prof = profiles.get(txn, pid)
                for i in range(per_profile):
                    cdrs.add(txn, Cdr(seq=0, call_id=f"{pid}-{i}", profile_id=pid, direction="outgoing",
                                      caller=prof.sip_username, callee="+442071234567", started_at=1.78e9 + i,
                                      answered_at=1.78e9 + i + 2, ended_at=1.78e9 + i + 62, duration=60, status=200,
                                      end_reason="caller_bye", cost=20_000, rate_prefix="44",
                                      account_id=prof.account_id, carrier="sip:gw.carrier.example",
                                      media={"a_packets": 3000, "b_packets": 3000}))

        store.write(op)
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=5000, help="answers per operation (at most)")
    ap.add_argument("--rates-requests", type=int, default=500, help="rate uploads (at most)")
    ap.add_argument("--rate-rows", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0, help="time per operation (at most)")
    ap.add_argument("--out", default="api.json", help="file name under bench/results/")
    args = ap.parse_args()
    rates_csv = ("prefix,rate,connect_fee,min_seconds,increment_seconds,description\n" + "".join(
        f"{44000 + i},0.0{i % 90 + 10},0,60,6,row {i}\n" for i in range(args.rate_rows))).encode()
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, ApiEdge(Path(tmp), map_size_mb=MAP_MB) as edge:
        with edge.client() as api:
            acct = api.post("/v1/accounts", json={"name": "Bench", "admin": "bench.admin"}).json()["id"]
            api.post(f"/v1/accounts/{acct}/credit", json={"amount": "100000000"})
            pids = [api.post(f"/v1/accounts/{acct}/profiles", json={"name": f"B{i}", "channels": 10}).json()["id"]
                    for i in range(args.clients)]
        seed_cdrs(edge.data, pids, 2000)

        ops: dict[str, tuple[Request, int]] = {
            "create_profile": (lambda c, n: c.post(f"/v1/accounts/{acct}/profiles",
                                                   json={"name": f"N{n}", "channels": 10}), args.requests),
            "credit": (lambda c, n: c.post(f"/v1/profiles/{pids[n % len(pids)]}/credit", json={"amount": "0.01"}),
                       args.requests),
            "get_profile": (lambda c, n: c.get(f"/v1/profiles/{pids[n % len(pids)]}"), args.requests),
            "list_cdrs": (lambda c, n: c.get(f"/v1/profiles/{pids[n % len(pids)]}/cdrs",
                                             params={"limit": 100, "after": (n % 19) * 100}), args.requests),
            "rates_upload": (lambda c, n: c.put("/v1/rates", content=rates_csv,
                                                headers={"Content-Type": "text/csv"}), args.rates_requests),
        }
        results: dict[str, Any] = {}
        for name, (request, count) in ops.items():
            cpu0 = cpu_seconds(edge.pid)
            res = asyncio.run(run_op(edge.base, args.clients, request, count, args.seconds))
            if res["answers"]:
                res["server_cpu_s_per_1000"] = round((cpu_seconds(edge.pid) - cpu0) / res["answers"] * 1000, 3)
            results[name] = res
            print(name, json.dumps(res), flush=True)
    result = {"bench": "api_latency", **machine_info(), "clients": args.clients, "rate_rows": args.rate_rows,
              "loadavg_after": os.getloadavg()[0], "results": results}
    print(f"results: {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
