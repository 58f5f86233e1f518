"""Cluster membership on a three-member NATS JetStream engine: failover time, renewal and acquire round trips.

    .venv/bin/python -m bench.bench_cluster                      # lease 5 s (the default), 10 trials
    .venv/bin/python -m bench.bench_cluster --lease 2 --trials 5

Job (all on loopback, three real ``nats-server`` members from tests/cluster/natscluster.py):

- **failover**: per trial a fresh namespace, three memberships (separate connections); node a takes
  ``--profiles`` homes, then, at a random instant, stops renewing without telling anyone
  (``simulate_death``). Measured from
  that instant: when a fenced itself (its lease's end by its own clock), when b or c took the first and
  the last of its homes, each over the lease time.
- **renewal**: ``--samples`` compare-and-swap updates of one key of a replicated bucket with a ttl, one
  after the other (what a renewal is), p50/p99/max.
- **acquire**: first acquisition of a never-homed profile (get + create) and a handover (get + lease read +
  update), p50/p99.
- **minority loss**: the member leading the lease bucket's stream is SIGKILLed while three memberships
  renew; how long the first write after it takes to succeed (the election pause) and whether any lease lapsed.

Every loop is bounded in count and time. JSON: bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

from natscluster import NatsCluster  # noqa: E402

from bench.common import machine_info, package_version, write_result  # noqa: E402
from edge.cluster.engine import Engine  # noqa: E402
from edge.cluster.membership import Membership  # noqa: E402
from edge.config import ClusterConfig  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def joined(cluster: NatsCluster, node: str, ns: str, lease: float, on_acquired: Any = None) -> Membership:
    engine = await Engine.connect(ClusterConfig(node=node, engine=cluster.urls, lease_seconds=lease))
    m = Membership(engine, on_acquired=on_acquired, namespace=ns)
    await m.start()
    return m


async def leave(*ms: Membership) -> None:
    for m in ms:
        await m.stop()
        await m.engine.close()


async def until(cond: Any, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.01)
    return time.monotonic()


async def failover_trial(cluster: NatsCluster, n: int, lease: float, profiles: int,
                         rng: random.Random) -> dict[str, float]:
    ns = f"bf{n}"
    taken: list[float] = []
    a = await joined(cluster, "a", ns, lease)
    b = await joined(cluster, "b", ns, lease, lambda p, prev: taken.append(time.monotonic()))
    c = await joined(cluster, "c", ns, lease, lambda p, prev: taken.append(time.monotonic()))
    try:
        ids = [f"f{n}x{i}" for i in range(profiles)]
        for p in ids:
            await a.acquire(p)
        await until(lambda: "a" in b.members() and "a" in c.members(), 10)
        await asyncio.sleep(rng.uniform(0, lease))   # death at a random point of the renewal and check periods
        died = time.monotonic()
        a.simulate_death()
        done = await until(lambda: all(b.is_home(p) or c.is_home(p) for p in ids), lease + 30)
        if done is None:
            raise RuntimeError(f"trial {n}: homes not taken over in {lease + 30:g} s")
        return {"fenced_after": a.lease_expires_at - died, "first_taken_after": min(taken) - died,
                "all_taken_after": max(taken) - died, "fenced_before_first_take": min(taken) - a.lease_expires_at}
    finally:
        await leave(a, b, c)


async def renewals(cluster: NatsCluster, lease: float, samples: int) -> list[float]:
    engine = await Engine.connect(ClusterConfig(node="r", engine=cluster.urls, lease_seconds=lease))
    try:
        kv = await engine.bucket("bench_renew", ttl=lease)
        revision = await kv.create("node.r", b"x")
        out = []
        for _ in range(samples):
            sent = time.monotonic()
            revision = await kv.update("node.r", b"x", last=revision)
            out.append(time.monotonic() - sent)
        return out
    finally:
        await engine.close()


async def acquires(cluster: NatsCluster, lease: float, count: int) -> dict[str, list[float]]:
    a = await joined(cluster, "a", "bacq", lease)
    try:
        fresh, handover = [], []
        for i in range(count):
            sent = time.monotonic()
            await a.acquire(f"q{i}")
            fresh.append(time.monotonic() - sent)
        await a.stop()          # fenced and released: every home is stale at once
        b = await joined(cluster, "b", "bacq", lease)
        try:
            b.simulate_death()  # no takeover task racing the measured acquires; the lease still holds
            for i in range(count):
                sent = time.monotonic()
                await b.acquire(f"q{i}")
                handover.append(time.monotonic() - sent)
        finally:
            await leave(b)
        return {"fresh": fresh, "handover": handover}
    finally:
        await a.engine.close()


async def minority_loss(cluster: NatsCluster, lease: float) -> dict[str, Any]:
    ms = [await joined(cluster, n, "bminor", lease) for n in ("a", "b", "c")]
    try:
        si = await ms[0].engine.js.stream_info("KV_bminor_nodes")
        leader = (si.cluster.leader if si.cluster else None) or "n0"
        index = int(leader.removeprefix("n"))
        epochs = [m.epoch for m in ms]
        killed = time.monotonic()
        cluster.kill(index)
        probe = await Engine.connect(ClusterConfig(node="p", engine=[u for i, u in enumerate(cluster.urls)
                                                                      if i != index], lease_seconds=lease))
        first_ok = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:   # a plain publish to the bucket's subject: it waits for the stream's (new) leader only
                await probe.js.publish("$KV.bminor_nodes.probe", b"x", timeout=1)
                first_ok = time.monotonic()
                break
            except Exception:
                await asyncio.sleep(0.05)
        await asyncio.sleep(lease)
        lapsed = sum(1 for m, e in zip(ms, epochs, strict=True) if m.epoch != e or not m.holds_lease())
        await probe.close()
        return {"killed": leader, "write_pause_s": (first_ok - killed) if first_ok else None,
                "leases_lapsed": lapsed}
    finally:
        await leave(*ms)
        cluster.start_member(index)
        await asyncio.to_thread(cluster.wait_ready)


async def run(cluster: NatsCluster, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    trials = [await failover_trial(cluster, n, args.lease, args.profiles, rng) for n in range(args.trials)]
    rtt = await renewals(cluster, args.lease, args.samples)
    acq = await acquires(cluster, args.lease, min(args.samples, 200))
    minority = [await minority_loss(cluster, args.lease) for _ in range(args.minority)]

    def summary(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "max": max(values), "min": min(values)}

    return {
        "lease_seconds": args.lease, "trials": args.trials, "profiles_per_trial": args.profiles,
        "failover": {k: summary([t[k] for t in trials]) for k in trials[0]},
        "failover_trials": trials,
        "renewal_ms": {"p50": 1000 * pct(rtt, 0.5), "p99": 1000 * pct(rtt, 0.99), "max": 1000 * max(rtt),
                       "samples": len(rtt)},
        "acquire_ms": {k: {"p50": 1000 * pct(v, 0.5), "p99": 1000 * pct(v, 0.99)} for k, v in acq.items()},
        "minority_loss": minority,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--profiles", type=int, default=50)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--minority", type=int, default=3, help="minority-loss trials (0: none)")
    parser.add_argument("--seed", type=int, default=13, help="of the instants of death")
    args = parser.parse_args()
    # SIGTERM ends the run like Ctrl-C: the engine members are stopped on the way out, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, NatsCluster(Path(tmp)) as cluster:
        cluster.wait_ready()
        result = asyncio.run(run(cluster, args))
    result["machine"] = machine_info()
    result["nats"] = {"nats-py": package_version("nats-py")}
    f = result["failover"]
    print(f"lease {args.lease:g} s, {args.trials} trials of {args.profiles} homes: "
          f"death -> fenced median {f['fenced_after']['median']:.2f} s; "
          f"-> all homes taken median {f['all_taken_after']['median']:.2f} s, max {f['all_taken_after']['max']:.2f} s; "
          f"fenced before the first take by >= {f['fenced_before_first_take']['min']:.2f} s")
    r = result["renewal_ms"]
    print(f"renewal (R3 CAS update) p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms; acquire "
          + ", ".join(f"{k} p50 {v['p50']:.2f} ms" for k, v in result["acquire_ms"].items()))
    for m in result["minority_loss"]:
        print(f"minority loss ({m['killed']} killed, it led the lease stream): writes paused "
              f"{m['write_pause_s'] if m['write_pause_s'] is None else round(m['write_pause_s'], 2)} s, "
              f"{m['leases_lapsed']} leases lapsed")
    print(write_result(f"cluster-lease{args.lease:g}.json", result))


if __name__ == "__main__":
    main()
