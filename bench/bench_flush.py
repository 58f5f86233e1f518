"""CPU of the call path's group fsync: the flusher with and without its minimum gap.

    .venv/bin/python -m bench.bench_flush                  # 250 settlements/s, 5 s, 3 rounds each way

Each "settlement" is what a call's end does to the store: one LMDB write transaction without
fsync (``sync=False``, a few keys as a settlement writes) and ``SipService.flush_soon()``. The
node's own flusher (``SipService._flush_periodically``: fsync in a thread, at least once a
second) does the rest. ``gap`` is the flusher as built (``FLUSH_GAP``: two fsyncs at least
20 ms apart), ``no-gap`` the same with ``flush_gap=0`` (as before: one fsync as soon as the last
ended). Both run in one process, alternating, on one LMDB file on this machine's disk;
reported: the process's CPU seconds (every thread: the loop, the flusher's fsync thread) per
settlement from ``getrusage``, and fsyncs per second. Bounded: ``--seconds`` per round.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bench.common import machine_info, write_result
from edge.config import Config
from edge.control.store import Store
from edge.sip.core import FLUSH_GAP, SipService
from edge.sip.dialog import Dialogs


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def one_round(store: Store, gap: float, rate: float, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    sip = SipService(Config(), store, CollectorRegistry(), loop, Dialogs(loop), flush_gap=gap)
    flushes = 0
    real_flush = store.flush

    def counting_flush() -> None:
        nonlocal flushes
        flushes += 1
        real_flush()

    store.flush = counting_flush  # type: ignore[method-assign]
    flusher = loop.create_task(sip._flush_periodically())
    try:
        n = int(rate * seconds)
        start, t0 = cpu(), loop.time()
        for i in range(n):
            store.write(lambda txn, i=i: txn.raw.put(b"settle-%d" % (i % 512), b"x" * 200), sync=False, grows=False)
            sip.flush_soon()
            await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - loop.time()))
        await asyncio.sleep(0.1)  # the last flush
        used, wall = cpu() - start, loop.time() - t0
    finally:
        flusher.cancel()
        store.flush = real_flush  # type: ignore[method-assign]
    return {"cpu_us_per_settlement": used / n * 1e6, "fsyncs_per_s": flushes / wall, "settlements": n}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    variants = {"gap": FLUSH_GAP, "no-gap": 0.0}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="bench-flush-", dir=args.dir) as tmp:
        store = Store(Path(tmp) / "db", map_size=1 << 28)
        try:
            for rnd in range(args.rounds):
                for name in (list(variants) if rnd % 2 == 0 else list(reversed(variants))):
                    rows[name].append(await one_round(store, variants[name], args.rate, args.seconds))
        finally:
            store.close()
    out: dict[str, Any] = {}
    for name, rs in rows.items():
        cpus = [r["cpu_us_per_settlement"] for r in rs]
        out[name] = {"cpu_us_per_settlement": round(statistics.median(cpus), 1),
                     "cpu_us_range": [round(min(cpus), 1), round(max(cpus), 1)],
                     "fsyncs_per_s": round(statistics.median(r["fsyncs_per_s"] for r in rs), 1), "rounds": rs}
        print(f"{name:7s} {out[name]['cpu_us_per_settlement']:7.1f} µs CPU per settlement "
              f"[{min(cpus):.1f}..{max(cpus):.1f}], {out[name]['fsyncs_per_s']:6.1f} fsyncs/s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=250.0, help="settlements per second")
    ap.add_argument("--seconds", type=float, default=5.0, help="per round and variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the LMDB file goes (default: the temp dir)")
    ap.add_argument("--output", default="flush.json")
    args = ap.parse_args(argv)
    out = asyncio.run(run(args))
    path = write_result(args.output, {"bench": "flush", "machine": machine_info(),
                                      "method": {"rate": args.rate, "seconds": args.seconds, "rounds": args.rounds,
                                                 "flush_gap": FLUSH_GAP}, **out})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
