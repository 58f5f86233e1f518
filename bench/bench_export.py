"""CDR export of a million CDRs (issue 14, SPEC §5.4): streamed, in bounded memory, totals equal to the ledger.

1. A real ``sipedge serve`` (bench/apiedge.py); an account and ``--profiles`` profiles over the API, each
   allocated credit.
2. ``--cdrs`` CDRs written straight into its LMDB through the store functions the call path uses
   (``cdrs.add`` and the ``ledger.move`` debit of each call, 10,000 per write transaction), spread over the
   profiles, with media stats and a carrier.
3. ``GET /v1/accounts/{id}/cdrs?format=csv`` (then ``jsonl``) read as a stream by the client and parsed row
   by row (``csv.reader``, ``json.loads``), while a thread samples the server's ``/proc/PID/status``
   every 20 ms.
4. Checks: every row arrived, the sum of ``cost`` equals the sum of the profiles' ``call`` ledger entries
   and what their balances lost, and the ledger audit is balanced.

Reported per format: rows/s, MiB/s, and the server's memory growth over its level just before the export:
``RssAnon`` (heap: what the streaming bounds) and ``VmRSS`` (also counts the pages of the memory-mapped
store the export read, which are the kernel's page cache, reclaimable, not the process's heap).

    .venv/bin/python -m bench.bench_export                 # 1,000,000 CDRs, ~5 min here
    .venv/bin/python -m bench.bench_export --cdrs 50000    # a quick run
Results: bench/results/export.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.apiedge import ApiEdge, memory_kib
from bench.common import machine_info, write_result
from edge.control import cdrs, ledger, profiles
from edge.control.models import Cdr, LedgerEntry
from edge.control.store import Store

BATCH = 10_000
T0 = 1_780_000_000.0      # 2026-05-28: the calls' start times, one per second


class Sampler(threading.Thread):
    """The server's memory every ``interval`` seconds until stopped; peaks kept."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for name, kib in memory_kib(self.pid).items():
                self.peak[name] = max(self.peak.get(name, 0), kib)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        return self.peak


def write_cdrs(data: Path, map_size_mb: int, profile_ids: list[str], n: int) -> tuple[int, float]:
    """``n`` CDRs round-robin over the profiles, each with its ledger debit; (total cost, seconds)."""
    store = Store(data, map_size=map_size_mb << 20)
    total, start = 0, time.perf_counter()
    try:
        for first in range(0, n, BATCH):
            def op(txn: Any, first: int = first) -> int:
                profs = [profiles.get(txn, pid) for pid in profile_ids]
                spent = 0
                for i in range(first, min(n, first + BATCH)):
                    prof = profs[i % len(profs)]
                    cost = 1_000 + i % 977                  # micro-units: 0.001000 .. 0.001976
                    cdr = Cdr(seq=0, call_id=f"bench{i:012d}", profile_id=prof.id, direction="outgoing",
                              caller=prof.sip_username, callee=f"+4420712{i % 100000:05d}", started_at=T0 + i,
                              answered_at=T0 + i + 2.5, ended_at=T0 + i + 62.5, duration=60, status=200,
                              end_reason="caller_bye", cost=cost, rate_prefix="44", account_id=prof.account_id,
                              carrier="sip:carrier-a.example.net:5060",
                              media={"a_packets": 3000, "a_bytes": 516000, "a_lost": i % 3, "a_jitter_us": 800,
                                     "b_packets": 2998, "b_bytes": 515656, "b_lost": i % 5, "b_jitter_us": 1200})
                    cdrs.add(txn, cdr)
                    ledger.move(txn, prof, -cost, "call", cdr.call_id)
                    spent += cost
                return spent

            total += store.write(op, sync=False)
        store.flush()
    finally:
        store.close()
    return total, time.perf_counter() - start


def ledger_totals(data: Path, map_size_mb: int, profile_ids: list[str]) -> tuple[int, bool]:
    """(sum of the profiles' ``call`` debits, every owner's balance equals its ledger)."""
    store = Store(data, map_size=map_size_mb << 20, readonly=True)
    owners = {f"profile:{pid}" for pid in profile_ids}
    try:
        def op(txn: Any) -> int:
            return -sum(e.amount for e in txn.values("ledger", LedgerEntry) if e.kind == "call" and e.owner in owners)

        calls = store.read(op)
        balanced = all(stored == total for stored, total in ledger.audit(store).values())
    finally:
        store.close()
    return calls, balanced


def export(edge: ApiEdge, account_id: str, fmt: str) -> dict[str, Any]:
    """One streamed export, parsed as it arrives, with the server's memory sampled."""
    with edge.client() as api:
        # warm up with a page, not an export: a time-range export scans every CDR and would map the whole store
        api.get(f"/v1/accounts/{account_id}/cdrs", params={"limit": 10})
        time.sleep(0.5)
        before = memory_kib(edge.pid)
        sampler = Sampler(edge.pid)
        sampler.start()
        rows, cost, size = 0, Decimal(0), 0
        start = time.perf_counter()
        with api.stream("GET", f"/v1/accounts/{account_id}/cdrs", params={"format": fmt}, timeout=None) as r:
            r.raise_for_status()
            lines = r.iter_lines()
            if fmt == "csv":
                reader = csv.reader(lines)
                header = next(reader)
                at = header.index("cost")
                for row in reader:
                    rows += 1
                    cost += Decimal(row[at])
            else:
                for line in lines:
                    if line:
                        rows += 1
                        cost += Decimal(json.loads(line)["cost"])
            size = r.num_bytes_downloaded
        seconds = time.perf_counter() - start
        peak = sampler.stop()
    growth = {name: round((peak[name] - before[name]) / 1024, 1) for name in ("VmRSS", "RssAnon", "RssFile")}
    return {"format": fmt, "rows": rows, "cost": str(cost), "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds), "mib_per_s": round(size / seconds / 2**20, 1),
            "bytes": size, "server_before_mib": {k: round(v / 1024, 1) for k, v in before.items()},
            "server_peak_growth_mib": growth, "samples": sampler.samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cdrs", type=int, default=1_000_000)
    ap.add_argument("--profiles", type=int, default=4)
    ap.add_argument("--map-size-mb", type=int, default=8192)
    ap.add_argument("--out", default="export.json", help="file name under bench/results/")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp, \
            ApiEdge(Path(tmp), map_size_mb=args.map_size_mb) as edge:
        with edge.client() as api:
            acct = api.post("/v1/accounts", json={"name": "Export", "admin": "export.admin"}).json()
            credit = Decimal(args.cdrs) * Decimal("0.002") / args.profiles + 1
            api.post(f"/v1/accounts/{acct['id']}/credit", json={"amount": str(credit * args.profiles)})
            pids = []
            for i in range(args.profiles):
                prof = api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": f"P{i}", "channels": 300})
                pids.append(prof.json()["id"])
                api.post(f"/v1/profiles/{pids[-1]}/credit", json={"amount": str(credit)})
        total, write_s = write_cdrs(edge.data, args.map_size_mb, pids, args.cdrs)
        print(f"wrote {args.cdrs} CDRs in {write_s:.1f} s; store {(edge.data / 'data.mdb').stat().st_size >> 20} MiB",
              flush=True)
        results = []
        for fmt in ("csv", "jsonl"):
            res = export(edge, acct["id"], fmt)
            print(json.dumps(res), flush=True)
            results.append(res)
        with edge.client() as api:
            left = sum(Decimal(api.get(f"/v1/profiles/{pid}").json()["balance"]) for pid in pids)
        calls, balanced = ledger_totals(edge.data, args.map_size_mb, pids)
    want = Decimal(total) / 1_000_000
    checks = {
        "rows_complete": all(r["rows"] == args.cdrs for r in results),
        "cost_equals_ledger_calls": all(Decimal(r["cost"]) == Decimal(calls) / 1_000_000 == want for r in results),
        "cost_equals_balances_spent": credit * args.profiles - left == want,
        "ledger_balanced": balanced,
    }
    result = {"bench": "cdr_export", **machine_info(), "cdrs": args.cdrs, "profiles": args.profiles,
              "write_seconds": round(write_s, 1), "total_cost": str(want), "exports": results, "checks": checks}
    print(json.dumps(checks))
    print(f"results: {write_result(args.out, result)}")
    if not all(checks.values()):
        raise SystemExit("a check failed")


if __name__ == "__main__":
    main()
