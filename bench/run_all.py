"""Run every benchmark in turn (``make bench``), each side by side with its peer.

    .venv/bin/python -m bench.run_all            # the full runs (about an hour on 2 cores)
    .venv/bin/python -m bench.run_all --quick    # short steps, one repeat

One at a time on purpose: on a 2-core machine two benchmarks running together measure
each other. Results land in bench/results/*.json; bench/README.md explains each one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

BENCHES = ("bench_store", "bench_parse", "bench_rtp", "bench_srtp", "bench_register", "bench_calls")
QUICK = {"bench_store": ["--lookups", "50000"], "bench_parse": ["--quick"], "bench_rtp": ["--quick"],
         "bench_srtp": ["--quick"],
         "bench_register": ["--quick"], "bench_calls": ["--quick"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=BENCHES, default=list(BENCHES))
    args = ap.parse_args()
    failed = []
    for name in args.only:
        cmd = [sys.executable, "-m", f"bench.{name}", *(QUICK[name] if args.quick else [])]
        print(f"=== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
