"""CPU of one call's relay setup and teardown: pooled sockets against a socket per call.

    .venv/bin/python -m bench.bench_relay_setup            # 5 rounds x 5,000 relays each way

What a call costs the relay engine outside the packets: ``create`` (two RTP/RTCP port pairs),
``set_remote`` on both legs and ``delete``. ``pooled`` is the engine as the node builds it
(bound pairs kept open and emptied before reuse, edge/_rtp.pyx); ``socket-per-call`` is the
same engine with ``pool=0``: ``socket``/``bind``/``setsockopt`` at create and ``close`` at
delete, as before the pool. Both run in one process, alternating, on the same port range;
reported: user and system CPU µs per relay from ``getrusage``, the median of the rounds with
[min..max]. The packet thread is not started. The system calls are kernel time, which the
instruction counts of ``bench_callpath --instructions`` (callgrind: user space) do not see.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from typing import Any

from bench.common import machine_info, write_result
from edge._rtp import RelayEngine


def one_round(engine: RelayEngine, relays: int) -> tuple[float, float]:
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(relays):
        r = engine.create(f"call-{i}")
        r.set_remote("a", "127.0.0.1", 6000)
        r.set_remote("b", "127.0.0.1", 7000)
        r.delete()
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    return (t1.ru_utime - t0.ru_utime) / relays * 1e6, (t1.ru_stime - t0.ru_stime) / relays * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--relays", type=int, default=5000, help="relays per round and variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ports", default="46000-46999", help="the RTP port range both variants use in turn")
    ap.add_argument("--output", default="relay_setup.json")
    args = ap.parse_args(argv)
    lo, hi = (int(p) for p in args.ports.split("-"))
    variants = {"pooled": None, "socket-per-call": 0}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for rnd in range(args.rounds):
        order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
        for name in order:
            engine = RelayEngine("127.0.0.1", lo, hi, quiet_period=0.0, pool=variants[name])
            try:
                one_round(engine, 100)  # warm-up: the pool filled, code paths and caches warm
                samples[name].append(one_round(engine, args.relays))
            finally:
                engine.stop()
    out: dict[str, Any] = {}
    for name, rows in samples.items():
        user = [u for u, _ in rows]
        system = [s for _, s in rows]
        total = [u + s for u, s in rows]
        out[name] = {"user_us": round(statistics.median(user), 2), "system_us": round(statistics.median(system), 2),
                     "total_us": round(statistics.median(total), 2),
                     "total_us_range": [round(min(total), 2), round(max(total), 2)], "rounds": rows}
        print(f"{name:16s} user {out[name]['user_us']:7.2f} µs  system {out[name]['system_us']:7.2f} µs  "
              f"total {out[name]['total_us']:7.2f} µs [{min(total):.2f}..{max(total):.2f}] per relay")
    path = write_result(args.output, {"bench": "relay-setup", "machine": machine_info(),
                                      "method": {"relays": args.relays, "rounds": args.rounds, "ports": args.ports},
                                      **out})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
