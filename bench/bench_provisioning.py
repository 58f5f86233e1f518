"""What provisioning through the engine costs (docs/cluster.md "Provisioning on any node").

    .venv/bin/python -m bench.bench_provisioning                        # 300 writes, 100,000 rates, 3 rounds
    .venv/bin/python -m bench.bench_provisioning --writes 100 --rates 20000 --rounds 1

All on loopback: three real ``nats-server`` members (tests/cluster/natscluster.py), a node alone and
two cluster nodes A and B (real ``sipedge serve``, bench/bench_register.Sipedge). Per round, for the
node alone and for cluster node A, alternating:

- **writes**: ``--writes`` control-API writes one after another (each an account, then a profile of
  it: two changes in the cluster), the latency of each (p50/p99), and the CPU of the node's processes
  and (cluster) of the three members per write. On the cluster, every 10th profile is then polled on
  node B until it answers 200: the lag from A's answer to B having it.
- **two writers**: the same number of writes split between two threads, on A and on B at once for the
  cluster (on the node alone, both on it): writes/s, and the slots lost to the other node's change and
  run again (``edge_cluster_provisioning_changes_total{result="lost"}``).
- **rates**: ``PUT /v1/rates`` of ``--rates`` rows (50 changes of 2,000 rows for 100,000): the time to
  the answer, and (cluster) until node B rates a number of the new table.

Pinning (2 cores): the members on CPU 0, the nodes on CPU 1 (``--no-pin``: none). Every loop is
bounded; every process is stopped by PID. JSON: bench/results/provisioning.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.bench_cluster_calls import CpuSnapshot, MonitoredNats, cluster_section, pct
from bench.bench_register import Sipedge, log
from bench.common import machine_info, write_result

CPU_ENGINE, CPU_NODES = "0", "1"
LAG_EVERY = 10            # profiles of a round whose arrival on node B is timed
LAG_TIMEOUT = 10.0        # seconds a change may take to reach node B before the round fails


def metric(node: Sipedge, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with node.client() as api:
        text = api.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def write_once(api: Any, tag: str) -> tuple[float, dict[str, Any]]:
    """An account and a profile of it. :returns: (seconds, the profile)."""
    t0 = time.perf_counter()
    r = api.post("/v1/accounts", json={"name": "Bench", "admin": f"b.{tag}"})
    r.raise_for_status()
    p = api.post(f"/v1/accounts/{r.json()['id']}/profiles", json={"name": "PBX", "channels": 2})
    p.raise_for_status()
    return time.perf_counter() - t0, p.json()


def arrives(node: Sipedge, profile_id: str, since: float) -> float:
    with node.client() as api:
        while time.perf_counter() - since < LAG_TIMEOUT:
            if api.get(f"/v1/profiles/{profile_id}").status_code == 200:
                return time.perf_counter() - since
            time.sleep(0.0005)
    raise RuntimeError(f"profile {profile_id} did not reach {node.name} within {LAG_TIMEOUT} s")


def writes(node: Sipedge, other: Sipedge | None, n: int, nodes: list[Sipedge], engine: MonitoredNats) -> dict[str, Any]:
    latencies, lags = [], []
    before = CpuSnapshot(nodes, engine)
    with node.client() as api:
        for i in range(n):
            took, prof = write_once(api, uuid.uuid4().hex[:12])
            latencies.append(took * 1000)
            if other is not None and i % LAG_EVERY == 0:
                lags.append(arrives(other, prof["id"], time.perf_counter()) * 1000)
    cpu = CpuSnapshot(nodes, engine).since(before)
    node_cpu = sum(v for k, v in cpu.items() if k not in ("nats", "wall"))
    return {"writes": n, "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
            "node_cpu_ms_per_write": node_cpu / n * 1000, "engine_cpu_ms_per_write": cpu["nats"] / n * 1000,
            "lag_to_other_p50_ms": pct(lags, 0.5), "lag_to_other_max_ms": max(lags) if lags else None}


def two_writers(first: Sipedge, second: Sipedge, n: int) -> dict[str, Any]:
    lost0 = metric(first, "edge_cluster_provisioning_changes_total", result="lost") + (
        metric(second, "edge_cluster_provisioning_changes_total", result="lost") if second is not first else 0)
    errors: list[BaseException] = []

    def run(node: Sipedge) -> None:
        try:
            with node.client() as api:
                for _ in range(n // 2):
                    write_once(api, uuid.uuid4().hex[:12])
        except BaseException as exc:     # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(node,)) for node in (first, second)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    took = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"two writers: {errors[0]!r}")
    lost = metric(first, "edge_cluster_provisioning_changes_total", result="lost") + (
        metric(second, "edge_cluster_provisioning_changes_total", result="lost") if second is not first else 0)
    return {"writes": 2 * (n // 2), "writes_per_s": 2 * (n // 2) / took, "slots_lost": lost - lost0}


def rates(node: Sipedge, other: Sipedge | None, rows: int, round_no: int) -> dict[str, Any]:
    rate = f"0.{round_no + 1:04d}"
    table = [{"prefix": f"49{i:07d}", "rate": rate} for i in range(rows)]
    with node.client() as api:
        t0 = time.perf_counter()
        api.put("/v1/rates", json={"rates": table}, timeout=600).raise_for_status()
        took = time.perf_counter() - t0
    out: dict[str, Any] = {"rows": rows, "answer_s": took, "on_other_s": None}
    if other is not None:
        with other.client() as api:
            while time.perf_counter() - t0 < took + 60:
                got = api.get("/v1/rates/lookup", params={"number": f"+49{rows - 1:07d}5"})
                if got.status_code == 200 and float(got.json()["rate"]) == float(rate):
                    out["on_other_s"] = time.perf_counter() - t0
                    break
                time.sleep(0.005)
            else:
                raise RuntimeError(f"the rate table did not reach {other.name}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--rates", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args(argv)
    if shutil.which("nats-server") is None:
        print("nats-server is needed (make system-deps)", file=sys.stderr)
        return 2
    engine_cpu, node_cpu = (None, None) if args.no_pin else (CPU_ENGINE, CPU_NODES)
    root = Path(tempfile.mkdtemp(prefix="bench-provisioning-"))
    results: dict[str, list[dict[str, Any]]] = {"alone": [], "cluster": []}
    nodes: list[Sipedge] = []
    try:
        with MonitoredNats(root / "nats", cpu=engine_cpu) as engine:
            engine.wait_ready()
            alone = Sipedge(root / "alone", node_cpu, name="alone", media_ports=(30000, 30999))
            a = Sipedge(root / "a", node_cpu, name="edge-a", media_ports=(31000, 31999),
                        extra_config=cluster_section("edge-a", engine, 5))
            b = Sipedge(root / "b", node_cpu, name="edge-b", media_ports=(32000, 32999),
                        extra_config=cluster_section("edge-b", engine, 5))
            for node in (alone, a, b):
                node.start(timeout=60)
                nodes.append(node)
            for round_no in range(args.rounds):
                for config in ("alone", "cluster") if round_no % 2 == 0 else ("cluster", "alone"):
                    node, other = (alone, None) if config == "alone" else (a, b)
                    log(f"round {round_no + 1}: {config}")
                    entry = {"writes": writes(node, other, args.writes, nodes, engine),
                             "two_writers": two_writers(node, other or node, args.writes),
                             "rates": rates(node, other, args.rates, round_no)}
                    results[config].append(entry)
                    log(f"  {entry}")
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)
    summary = summarise(results)
    write_result("provisioning.json", {"machine": machine_info(), "args": vars(args), "rounds": results,
                                       "summary": summary})
    print_table(summary)
    return 0


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    def med(config: str, part: str, key: str) -> Any:
        values = [r[part][key] for r in results[config] if r[part][key] is not None]
        return statistics.median(values) if values else None

    keys = {"writes": ("p50_ms", "p99_ms", "node_cpu_ms_per_write", "engine_cpu_ms_per_write",
                       "lag_to_other_p50_ms", "lag_to_other_max_ms"),
            "two_writers": ("writes_per_s", "slots_lost"), "rates": ("answer_s", "on_other_s")}
    return {config: {f"{part}.{key}": med(config, part, key) for part, ks in keys.items() for key in ks}
            for config in results}


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    keys = list(summary["alone"])
    print(f"{'median of rounds':44} {'alone':>10} {'cluster':>10} {'ratio':>8}")
    for key in keys:
        x, y = summary["alone"][key], summary["cluster"][key]
        ratio = f"{y / x:.2f}x" if x and y is not None else "-"
        print(f"{key:44} {fmt(x):>10} {fmt(y):>10} {ratio:>8}")


if __name__ == "__main__":
    sys.exit(main())
