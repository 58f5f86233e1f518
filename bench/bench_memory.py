"""Memory per active call: the edge's memory with N calls held up at once, media anchored.

    .venv/bin/python -m bench.bench_memory                        # N = 250, 500, 1000; no RTP packets
    .venv/bin/python -m bench.bench_memory --calls 100,200 --rtp  # G.711 RTP both ways through the relay

Job: SIPp as the PBX (``bench/sipp/uac-call-auth.xml``: INVITE -> 407 -> INVITE with
credentials -> 200 -> ACK -> hold -> BYE) on 127.0.0.1 and SIPp as the carrier
(``bench/sipp/uas-answer.xml``) on 127.0.0.2, the edge between them with its relay anchoring
every call (4 relay ports per call; with ``--rtp`` 50 packets/s each way per call). The
calls of one step are placed at ``--rate`` calls/s and held until all N are up; then the
edge's memory is read from /proc three times, 1 s apart (median).

Each step runs on a fresh edge (the same store): 50 calls placed and ended first (lazy
imports, first-use caches), then the baseline, then the N held calls. Per step: VmRSS,
RssAnon (the heap: Python objects, the relay's C state), RssFile (LMDB pages touched) and
Pss, each as the delta over the baseline, divided by N; and the slope of a least-squares
line through the steps (bytes per extra call, fixed costs cancelled). After the step the
calls end (BYE) and the memory read again shows what is not given back at once: cyclic
garbage waits for the collector's next full run (edge/node.py freezes the start-up heap and
raises the thresholds) and pymalloc keeps its arenas; the next calls reuse both.
JSON: bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_calls import (
    RTP_RANGE,
    UAC_MEDIA_PORT,
    Carrier,
    provision_sipedge,
    strip_rtp,
    write_calls_csv,
    write_pcmu_wav,
)
from bench.bench_register import (
    CPU_DUT,
    CPU_GEN,
    SIPP_DIR,
    Sipedge,
    ensure_debs,
    free_port,
    log,
    pinned,
    stop_tree,
    tool_version,
)

KEYS = ("VmRSS", "RssAnon", "RssFile", "Pss")


def memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (status) and Pss (smaps_rollup) of ``pid``, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in KEYS:
            out[name] = int(value.split()[0]) * 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1]) * 1024
    return out


def settled_memory(pid: int, samples: int = 3) -> dict[str, int]:
    taken = []
    for i in range(samples):
        if i:
            time.sleep(1.0)
        taken.append(memory(pid))
    return {k: int(statistics.median(t[k] for t in taken)) for k in KEYS}


def active_calls(dev: Sipedge) -> int:
    import httpx

    text = httpx.get(dev.base + "/metrics", timeout=10).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("edge_calls_active{")))


def wait_active(dev: Sipedge, want: int, timeout: float, sipp: subprocess.Popen[Any] | None = None) -> int:
    """Poll until ``want`` calls are up (bounded); returns the last count seen."""
    deadline = time.monotonic() + timeout
    seen = active_calls(dev)
    while seen != want and time.monotonic() < deadline:
        if sipp is not None and sipp.poll() is not None and want:
            break
        time.sleep(0.5)
        seen = active_calls(dev)
    return seen


def place_calls(workdir: Path, dev: Sipedge, scenario: Path, csv_path: Path, n: int, rate: int,
                hold_s: float, rtp: bool) -> subprocess.Popen[Any]:
    lport = free_port()
    cmd = ["sipp", dev.target, "-sf", str(scenario), "-inf", str(csv_path), "-r", str(rate), "-rp", "1000",
           "-m", str(n), "-l", str(n), "-d", str(int(hold_s * 1000)), "-i", "127.0.0.1", "-p", str(lport),
           "-nostdin", "-nd", "-recv_timeout", "30000", "-timeout", f"{int(hold_s + n / rate + 60)}s",
           "-buff_size", str(4 * 1024 * 1024), "-max_socket", "8192", "-trace_err", "-error_file",
           str(workdir / f"err-{n}.log"), "-error_overwrite", "true", "-trace_stat", "-stf",
           str(workdir / f"stat-{n}.csv"), "-fd", "1"]
    cmd += ["-mi", "127.0.0.1", "-mp", str(UAC_MEDIA_PORT if rtp else free_port() & ~1)]
    return subprocess.Popen(pinned(CPU_GEN, cmd), cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"sipp-{n}.stderr", "wb"))


def step(workdir: Path, dev: Sipedge, scenario: Path, csv_path: Path, n: int, rate: int, rtp: bool,
         settle_s: float) -> dict[str, Any]:
    pid = dev.proc.pid if dev.proc is not None else 0
    before = settled_memory(pid)
    ramp = n / rate
    hold = ramp + settle_s + 3 * 1.0 + 10.0      # every call still up while the samples are taken
    sipp = place_calls(workdir, dev, scenario, csv_path, n, rate, hold, rtp)
    try:
        up = wait_active(dev, n, ramp + 60.0, sipp)
        if up != n:
            return {"calls": n, "error": f"only {up} of {n} calls came up", "rate": rate}
        time.sleep(settle_s)
        held = settled_memory(pid)
        up_after = active_calls(dev)
        sipp.wait(timeout=hold + 120)
    finally:
        stop_tree(sipp, timeout=3)
    wait_active(dev, 0, 60.0)
    time.sleep(1.0)
    after = settled_memory(pid)
    delta = {k: held[k] - before[k] for k in KEYS}
    return {"calls": n, "rate": rate, "calls_up_at_sample": up_after, "sipp_rc": sipp.returncode,
            "before": before, "held": held, "after_calls_ended": after, "delta": delta,
            "bytes_per_call": {k: delta[k] / n for k in KEYS},
            "kept_after_end_per_call": {k: (after[k] - before[k]) / n for k in KEYS}}


def slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of (calls, bytes)."""
    if len(points) < 2:
        return None
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


def main(argv: list[str] | None = None) -> int:
    from bench.common import machine_info, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", default="250,500,1000", help="comma-separated numbers of calls held at once")
    ap.add_argument("--rate", type=int, default=100, help="calls/s while a step's calls are placed")
    ap.add_argument("--rtp", action="store_true", help="RTP both ways (50 packets/s each) on every held call")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between the last call up and the samples")
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--channels", type=int, default=300)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (SIPp logs, the edge's store)")
    ap.add_argument("--output", default="memory.json")
    args = ap.parse_args(argv)
    ladder = [int(x) for x in args.calls.split(",") if x.strip()]
    if max(ladder) > args.users * args.channels or 4 * max(ladder) > RTP_RANGE[1] - RTP_RANGE[0]:
        ap.error("more calls than channels or relay ports: raise --users/--channels")

    ensure_debs({"sipp": "sip-tester"})
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    log(f"work dir: {workdir}")
    write_pcmu_wav(workdir / "tone-pcmu.wav")
    scenario = SIPP_DIR / "uac-call-auth.xml"
    if not args.rtp:
        scenario = strip_rtp(scenario, workdir)
    carrier = Carrier(workdir, CPU_GEN, rtp=args.rtp)
    dev = Sipedge(workdir, CPU_DUT, media_ports=(RTP_RANGE[0], RTP_RANGE[1] + 1),
                  extra_config=f'[[carriers]]\nuri = "{carrier.uri}"\npriority = 1\nweight = 100\n')
    steps: list[dict[str, Any]] = []
    csv_path = workdir / "calls.csv"
    try:
        carrier.start()
        for n in ladder:
            # a fresh edge per step (same store): what one step's calls leave behind (garbage
            # awaiting a full collection, allocator arenas) is not in the next step's baseline
            dev.start()
            try:
                if not csv_path.exists():
                    write_calls_csv(csv_path, provision_sipedge(dev, args.users, args.channels))
                warm = step(workdir, dev, scenario, csv_path, 50, args.rate, args.rtp, 1.0)
                if "error" in warm:
                    raise RuntimeError(f"warm-up failed: {warm['error']} (logs in {workdir})")
                log(f"{n} calls held")
                result = step(workdir, dev, scenario, csv_path, n, args.rate, args.rtp, args.settle)
            finally:
                dev.stop()
            steps.append(result)
            if "error" in result:
                log(f"  {result['error']}")
                continue
            per = result["bytes_per_call"]
            log("  per call: " + ", ".join(f"{k} {per[k] / 1024:.1f} KiB" for k in KEYS))
    finally:
        carrier.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    good = [s for s in steps if "error" not in s]
    summary = {k: {"slope_bytes_per_call": slope([(s["calls"], s["delta"][k]) for s in good]),
                   "per_step_bytes_per_call": {str(s["calls"]): round(s["bytes_per_call"][k]) for s in good}}
               for k in KEYS}
    result: dict[str, object] = {
        "bench": "memory",
        "machine": machine_info(),
        "tools": {"sipp": tool_version(["sipp", "-v"])},
        "method": {"calls": ladder, "rate": args.rate, "rtp": args.rtp, "settle_s": args.settle,
                   "users": args.users, "channels": args.channels, "samples": "median of 3, 1 s apart",
                   "uac": "bench/sipp/uac-call-auth.xml", "uas": "bench/sipp/uas-answer.xml",
                   "command": "python -m bench.bench_memory " + " ".join(argv if argv is not None else sys.argv[1:])},
        "steps": steps,
        "summary": summary,
    }
    path = write_result(args.output, result)
    log(f"wrote {path}")
    for k in KEYS:
        s = summary[k]["slope_bytes_per_call"]
        print(f"{k:<8} slope {s / 1024:.1f} KiB/call" if s is not None else f"{k:<8} slope n/a",
              " per step:", {n: f"{v / 1024:.1f} KiB" for n, v in summary[k]["per_step_bytes_per_call"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
