"""The money journal (edge/cluster/journal.py) on a three-member nats-server engine on loopback.

Calls are reserve + settle, two conditional appends each, by 1 or 3 writer processes (each its
own engine connection), on one profile (the writers contend: refused appends, catch-ups) or on
a profile each. Per scenario: calls/s, appends/s, engine round trips per call, refused appends
per call, and the CPU seconds per call of the three nats-server processes (/proc/<pid>/stat)
and of the writers. Scenarios alternate, ``--rounds`` times; the median and the spread are
reported. Then the replay cost of a long journal: a profile with ``--events`` events replayed
from the start, and from a snapshot with 1,000 events after it, and the members' memory
before and after (one subject per event, docs/cluster.md "The journal").

    .venv/bin/python -m bench.bench_journal [--calls 300] [--rounds 3] [--events 100000]

The peer is the single-node path's own figure, not measured here: an LMDB write transaction
(bench_store / bench_calls). Every process started is stopped by PID; all traffic is loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from bench.common import machine_info, package_version, write_result

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "cluster"))

from natscluster import NatsCluster, nats_server

from edge.cluster.engine import Engine
from edge.cluster.journal import SNAPSHOT_BUCKET, STREAM, Credit, ProfileJournal, Reserve, Settle, ensure_stream
from edge.config import ClusterConfig

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK     # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cfg(urls: list[str], node: str) -> ClusterConfig:
    return ClusterConfig(node=node, engine=urls, lease_seconds=2.0)


def writer(urls: list[str], profile_id: str, node: str, calls: int, barrier: Any, results: Any) -> None:
    """``calls`` calls of reserve + settle; reports (seconds, cpu seconds, round trips, conflicts, refused)."""
    async def run() -> None:
        engine = await Engine.connect(cfg(urls, node))
        try:
            journal = await ProfileJournal.open(engine, profile_id)
            barrier.wait(timeout=60)
            cpu0, t0, rt0 = time.process_time(), time.perf_counter(), journal.round_trips
            refused = 0
            for n in range(calls):
                call_id = f"{node}-{n}"
                try:
                    await journal.reserve(call_id, node, 600_000, channels=300)
                except Exception:  # a refusal would skew the figure: counted and reported
                    refused += 1
                    continue
                await journal.settle(call_id, 300_000)
            results.put((time.perf_counter() - t0, time.process_time() - cpu0, journal.round_trips - rt0,
                         journal.conflicts, refused, journal.ambiguous))
        finally:
            await engine.close()

    asyncio.run(run())


async def fund(urls: list[str], profile_ids: list[str]) -> None:
    engine = await Engine.connect(cfg(urls, "bench"))
    try:
        await ensure_stream(engine)
        for pid in profile_ids:
            await ProfileJournal(engine, pid).credit("fund", 10**15)
    finally:
        await engine.close()


def scenario(cluster: NatsCluster, writers: int, shared: bool, calls: int) -> dict[str, float]:
    profiles = [f"b{uuid.uuid4().hex[:12]}"] * writers if shared else [f"b{uuid.uuid4().hex[:12]}"
                                                                       for _ in range(writers)]
    asyncio.run(fund(cluster.urls, sorted(set(profiles))))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(writers + 1)
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=writer, args=(cluster.urls, profiles[w], f"w{w}", calls, barrier, results))
             for w in range(writers)]
    for p in procs:
        p.start()
    pids = [p.pid for p in cluster.procs if p is not None]
    try:
        barrier.wait(timeout=60)
        server0, t0 = sum(cpu_seconds(pid) for pid in pids), time.perf_counter()
        out = [results.get(timeout=600) for _ in procs]
        wall = time.perf_counter() - t0
        server = sum(cpu_seconds(pid) for pid in pids) - server0
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    total = writers * calls - sum(o[4] for o in out)
    return {
        "calls": total, "refused": sum(o[4] for o in out),
        "calls_per_s": total / wall,
        "appends_per_s": 2 * total / wall,
        "round_trips_per_call": sum(o[2] for o in out) / total,
        "conflicts_per_call": sum(o[3] for o in out) / total,
        "unanswered_per_call": sum(o[5] for o in out) / total,
        "server_cpu_ms_per_call": 1000 * server / total,
        "writer_cpu_ms_per_call": 1000 * sum(o[1] for o in out) / total,
    }


async def replay_cost(cluster: NatsCluster, events: int) -> dict[str, float]:
    """A profile with ``events`` events: the time to replay it, from the start and from a snapshot."""
    pids = [p.pid for p in cluster.procs if p is not None]
    rss0 = sum(rss_mib(pid) for pid in pids)
    engine = await Engine.connect(cfg(cluster.urls, "bench"))
    try:
        await ensure_stream(engine)
        pid = f"r{uuid.uuid4().hex[:12]}"
        writer_journal = ProfileJournal(engine, pid)
        started = time.perf_counter()
        batch = 500
        encoder = msgspec.json.Encoder()
        # the shape of a real journal: a top-up, then calls of Reserve + Settle; written straight to
        # their (distinct, empty) slots in parallel, as the fold only cares about the order of slots
        def event(n: int) -> Credit | Reserve | Settle:
            if n == 1:
                return Credit("fund", 10**15)
            call = f"call-{n // 2:08d}-{uuid.uuid4().hex[:16]}" if n % 2 == 0 else ""
            return Reserve(call, "edge-a", 600_000, 300) if n % 2 == 0 else Settle(calls[n - 1], 300_000)

        calls: dict[int, str] = {}
        for first in range(1, events + 1, batch):
            chunk = []
            for n in range(first, min(first + batch, events + 1)):
                ev = event(n)
                if isinstance(ev, Reserve):
                    calls[n] = ev.call_id
                chunk.append((n, ev))
            await asyncio.gather(*(engine.js.publish(
                writer_journal.slot_subject(n), encoder.encode(ev),
                headers={"Nats-Expected-Last-Subject-Sequence": "0"}) for n, ev in chunk))
        write_s = time.perf_counter() - started
        rss1 = sum(rss_mib(p) for p in pids)

        started = time.perf_counter()
        full = await ProfileJournal.open(engine, pid)
        full_s = time.perf_counter() - started
        assert full.state.slot == events
        await full.save_snapshot()
        snapshot_bytes = len((await (await engine.bucket(SNAPSHOT_BUCKET)).get(f"p.{pid}")).value or b"")
        for n in range(1000):
            await full.credit(f"after{n}", 1)
        started = time.perf_counter()
        snap = await ProfileJournal.open(engine, pid, snapshot=True)
        snap_s = time.perf_counter() - started
        assert snap.balance == full.balance and snap.state.calls == full.state.calls
        info = await engine.js.stream_info(STREAM)
        return {"events": events, "write_s": write_s, "replay_s": full_s, "replay_events_per_s": events / full_s,
                "snapshot_plus_1000_s": snap_s, "members_rss_mib_before": rss0, "members_rss_mib_after": rss1,
                "rss_bytes_per_event_all_members": (rss1 - rss0) * 2**20 / events,
                "stream_bytes": info.state.bytes, "snapshot_bytes": snapshot_bytes}
    finally:
        await engine.close()


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="calls per writer per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=100_000, help="events of the replayed journal (0: skip)")
    args = parser.parse_args()
    if nats_server() is None:
        raise SystemExit("bench_journal: Debian nats-server is needed (make system-deps)")
    root = Path(tempfile.mkdtemp(prefix="bench-journal-"))
    scenarios = [("1 writer", 1, True), ("3 writers, one profile", 3, True), ("3 writers, 3 profiles", 3, False)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in scenarios}
    try:
        with NatsCluster(root) as cluster:
            cluster.wait_ready()
            asyncio.run(fund(cluster.urls, []))
            for r in range(args.rounds):
                for name, writers, shared in scenarios:     # alternate the scenarios within each round
                    runs[name].append(scenario(cluster, writers, shared, args.calls))
                    print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
            replay = asyncio.run(replay_cost(cluster, args.events)) if args.events else {}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = {name: {k: spread([run[k] for run in rs]) for k in rs[0]} for name, rs in runs.items()}
    result = {"machine": machine_info(), "nats_server": os.popen("nats-server --version").read().strip(),
              "nats_py": package_version("nats-py"), "calls_per_writer": args.calls, "rounds": args.rounds,
              "scenarios": figures, "replay": replay}
    path = write_result("journal.json", result)
    print(f"\n{'scenario':26} {'calls/s':>9} {'appends/s':>10} {'rt/call':>8} {'refused/call':>13} "
          f"{'server ms/call':>15} {'writer ms/call':>15}")
    for name, f in figures.items():
        print(f"{name:26} {f['calls_per_s']['median']:9.0f} {f['appends_per_s']['median']:10.0f} "
              f"{f['round_trips_per_call']['median']:8.2f} {f['conflicts_per_call']['median']:13.2f} "
              f"{f['server_cpu_ms_per_call']['median']:15.3f} {f['writer_cpu_ms_per_call']['median']:15.3f}")
    if replay:
        print(f"replay of {replay['events']} events: {replay['replay_s']:.2f} s "
              f"({replay['replay_events_per_s']:.0f}/s); "
              f"from a snapshot + 1000: {replay['snapshot_plus_1000_s']:.3f} s; "
              f"members' RSS +{replay['members_rss_mib_after'] - replay['members_rss_mib_before']:.0f} MiB")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
