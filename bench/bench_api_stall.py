"""SIP response times while the control API works hard (issue 10 item 2).

A real ``sipedge serve`` (bench/apiedge.py) is probed with SIP at a steady rate: OPTIONS, and
REGISTER with digest (the 401 and the authenticated 200 are both timed), each from its own UDP
socket, ``--sip-rate`` probes per second each. Two phases of ``--seconds`` each:

- ``idle``: the probes alone;
- ``api_load``: the probes while ``--clients`` API clients work at once: one uploads a rate table
  of ``--rate-rows`` rows again and again (PUT /v1/rates, CSV), one exports a CDR page of
  ``--cdr-rows`` rows (GET .../cdrs?format=csv) again and again, the others read JSON CDR pages
  of 1,000 rows.

Run for each ``--workers`` value: 1 is the single process of earlier builds (SIP and the API on
one event loop), N > 1 the supervisor with N SIP workers and the API in a process of its own.
Reported per run and phase: p50/p99/max response time of each probe kind (ms, client side), the
probes lost (no answer within 2 s), the API operations done, and the node's CPU seconds (the
whole process tree). The load generator shares the machine's cores with the node: the idle
phase is the reference each loaded phase is read against.

    .venv/bin/python -m bench.bench_api_stall                       # --workers 1,2, 20 s phases
    .venv/bin/python -m bench.bench_api_stall --seconds 10 --rate-rows 20000
Results: bench/results/api_stall.json (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.apiedge import TOKEN, ApiEdge
from bench.bench_api import seed_cdrs
from bench.bench_register import tree_cpu, tree_pids
from bench.common import machine_info, write_result
from edge.sip import parse

DOMAIN = "sip.edge.test"
PROBE_TIMEOUT = 2.0


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def summary(latencies: list[float], lost: int) -> dict[str, Any]:
    if not latencies:
        return {"answers": 0, "lost": lost}
    ordered = sorted(latencies)
    return {"answers": len(ordered), "lost": lost, "p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(percentile(ordered, 0.99), 2), "max_ms": round(ordered[-1], 2)}


class Prober(threading.Thread):
    """``rate`` probes/s of one kind from one UDP socket, each timed from send to final answer."""

    def __init__(self, port: int, kind: str, rate: float, stop: threading.Event, user: str = "",
                 password: str = "") -> None:
        super().__init__(daemon=True)
        self.edge = ("127.0.0.1", port)
        self.kind, self.rate, self.stop, self.user, self.password = kind, rate, stop, user, password
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.local = self.sock.getsockname()
        self.latencies: list[float] = []
        self.lost = 0
        self.cseq = 0

    def _request(self, method: str, call_id: str, headers: str = "") -> bytes:
        self.cseq += 1
        host, port = self.local
        user = self.user or "probe"
        return (f"{method} sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{uuid.uuid4().hex[:12]}"
                f";rport\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@{DOMAIN}>;tag={call_id[:8]}\r\n"
                f"To: <sip:{user}@{DOMAIN}>\r\nCall-ID: {call_id}\r\nCSeq: {self.cseq} {method}\r\n"
                f"Contact: <sip:{user}@{host}:{port}>\r\n{headers}Content-Length: 0\r\n\r\n").encode()

    def _exchange(self, data: bytes) -> Any:
        """Send, wait for the final answer; the time goes into ``latencies`` (None: lost)."""
        start = time.perf_counter()
        self.sock.sendto(data, self.edge)
        deadline = start + PROBE_TIMEOUT
        while True:
            self.sock.settimeout(max(0.001, deadline - time.perf_counter()))
            try:
                raw = self.sock.recv(65535)
            except TimeoutError:
                self.lost += 1
                return None
            msg = parse(raw)
            if msg.is_request or msg.status < 200 or msg.cseq != self.cseq:
                continue
            self.latencies.append((time.perf_counter() - start) * 1000)
            return msg

    def _register(self) -> None:
        call_id = uuid.uuid4().hex
        challenge = self._exchange(self._request("REGISTER", call_id))
        if challenge is None or challenge.status != 401:
            return
        auth = digest("REGISTER", f"sip:{DOMAIN}", self.user, self.password, challenge.header("WWW-Authenticate"))
        self._exchange(self._request("REGISTER", call_id, f"Authorization: {auth}\r\nExpires: 3600\r\n"))

    def run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.perf_counter()
        while not self.stop.is_set():
            if self.kind == "options":
                self._exchange(self._request("OPTIONS", uuid.uuid4().hex))
            else:
                self._register()
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            else:
                next_at = time.perf_counter()   # behind (a stall): no burst to catch up
        self.sock.close()


def digest(method: str, uri: str, user: str, password: str, challenge: str) -> str:
    params = {k.lower(): v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', challenge)}
    alg = params.get("algorithm", "MD5")
    h = hashlib.sha256 if alg.upper() == "SHA-256" else hashlib.md5
    ha1 = h(f"{user}:{params['realm']}:{password}".encode()).hexdigest()
    ha2 = h(f"{method}:{uri}".encode()).hexdigest()
    resp = h(f"{ha1}:{params['nonce']}:00000001:0a4f113b:auth:{ha2}".encode()).hexdigest()
    return (f'Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", uri="{uri}", '
            f'response="{resp}", algorithm={alg}, qop=auth, nc=00000001, cnonce="0a4f113b"')


async def api_load(base: str, clients: int, seconds: float, rates_csv: bytes, profile_id: str) -> dict[str, Any]:
    """One rate uploader, one CDR exporter, ``clients - 2`` readers of JSON pages, for ``seconds``."""
    counts: dict[str, list[float]] = {"rates_upload": [], "cdr_export": [], "cdr_page": []}
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def loop(name: str, client: httpx.AsyncClient, send: Any) -> None:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                r = await send(client)
                if r.status_code >= 400:
                    errors[f"{name} {r.status_code}"] = errors.get(f"{name} {r.status_code}", 0) + 1
                    continue
            except httpx.HTTPError as exc:
                errors[f"{name} {type(exc).__name__}"] = errors.get(f"{name} {type(exc).__name__}", 0) + 1
                continue
            counts[name].append((time.perf_counter() - start) * 1000)

    pool = [httpx.AsyncClient(base_url=base, headers=headers, timeout=120.0) for _ in range(clients)]
    cdrs = f"/v1/profiles/{profile_id}/cdrs"
    jobs = [loop("rates_upload", pool[0], lambda c: c.put("/v1/rates", content=rates_csv,
                                                          headers={"Content-Type": "text/csv"})),
            loop("cdr_export", pool[1], lambda c: c.get(cdrs, params={"format": "csv"}))]
    jobs += [loop("cdr_page", c, lambda c, n=n: c.get(cdrs, params={"limit": 1000, "after": (n % 9) * 1000}))
             for n, c in enumerate(pool[2:])]
    try:
        await asyncio.gather(*jobs)
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))
    return {name: {"done": len(v), "mean_ms": round(statistics.mean(v), 1) if v else None}
            for name, v in counts.items()} | ({"errors": errors} if errors else {})


def probe(port: int, rate: float, seconds: float, user: str, password: str, out: Any) -> None:
    """The probers, in a process of their own: the load generator's GIL must not delay them."""
    stop = threading.Event()
    probers = [Prober(port, "options", rate, stop), Prober(port, "register", rate / 2, stop, user, password)]
    for p in probers:
        p.start()
    time.sleep(seconds)
    stop.set()
    for p in probers:
        p.join(PROBE_TIMEOUT + 5)
    out.put([(p.latencies, p.lost) for p in probers])


def run_phase(edge: ApiEdge, args: argparse.Namespace, prof: dict, load: bool, rates_csv: bytes) -> dict[str, Any]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    prober = ctx.Process(target=probe, args=(edge.sip_port, args.sip_rate, args.seconds, prof["sip_username"],
                                             prof["sip_password"], results))
    cpu0 = tree_cpu(tree_pids(edge.pid))
    locks0 = lock_waits(edge.base)
    prober.start()
    out: dict[str, Any] = {}
    if load:
        out["api"] = asyncio.run(api_load(edge.base, args.clients, args.seconds, rates_csv, prof["id"]))
    else:
        time.sleep(args.seconds)
    (options, options_lost), (register, register_lost) = results.get(timeout=args.seconds + 30)
    prober.join(10)
    out["node_cpu_s"] = round(tree_cpu(tree_pids(edge.pid)) - cpu0, 2)
    locks = lock_waits(edge.base)
    out["lmdb_writes"] = int(locks[0] - locks0[0])
    out["lmdb_lock_wait_s"] = round(locks[1] - locks0[1], 3)
    out["lmdb_lock_wait_max_ms"] = round(locks[2] * 1000, 1)
    out["options"] = summary(options, options_lost)
    out["register"] = summary(register, register_lost)
    return out


def lock_waits(base: str) -> tuple[float, float, float]:
    """(write transactions, seconds waited for the LMDB writer lock, the longest wait) of the node."""
    from prometheus_client.parser import text_string_to_metric_families

    found = dict.fromkeys(("edge_store_writes_total", "edge_store_write_lock_wait_seconds_total",
                           "edge_store_write_lock_wait_seconds_max"), 0.0)
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] = sample.value
    return (found["edge_store_writes_total"], found["edge_store_write_lock_wait_seconds_total"],
            found["edge_store_write_lock_wait_seconds_max"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="node.workers values to run (1: the single process)")
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase")
    ap.add_argument("--sip-rate", type=float, default=50.0, help="OPTIONS/s (REGISTER: half of it, two requests each)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rate-rows", type=int, default=100_000)
    ap.add_argument("--cdr-rows", type=int, default=10_000)
    ap.add_argument("--out", default="api_stall.json", help="file name under bench/results/")
    args = ap.parse_args(argv)
    rates_csv = ("prefix,rate,connect_fee,min_seconds,increment_seconds,description\n" + "".join(
        f"{4400000 + i},0.0{i % 90 + 10},0,60,6,row {i}\n" for i in range(args.rate_rows))).encode()
    runs: dict[str, Any] = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-stall-") as tmp, \
                ApiEdge(Path(tmp), map_size_mb=2048, workers=workers,
                        sip_extra="rate_limit = 0\nauth_block_threshold = 1000000") as edge:
            with edge.client() as api:
                acct = api.post("/v1/accounts", json={"name": "Bench", "admin": "stall.admin"}).json()["id"]
                prof = api.post(f"/v1/accounts/{acct}/profiles", json={"name": "P", "channels": 10}).json()
            seed_cdrs(edge.data, [prof["id"]], args.cdr_rows)
            run: dict[str, Any] = {}
            for phase, load in (("idle", False), ("api_load", True)):
                run[phase] = run_phase(edge, args, prof, load, rates_csv)
                print(f"workers={workers} {phase}: OPTIONS {run[phase]['options']}  "
                      f"REGISTER {run[phase]['register']}  cpu {run[phase]['node_cpu_s']} s  "
                      f"lmdb waits {run[phase]['lmdb_lock_wait_s']} s (max {run[phase]['lmdb_lock_wait_max_ms']} ms)"
                      + (f"  api {run[phase]['api']}" if load else ""), flush=True)
            runs[f"workers={workers}"] = run
    result = {"machine": machine_info(), "args": vars(args), "runs": runs}
    print(f"wrote {write_result(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
