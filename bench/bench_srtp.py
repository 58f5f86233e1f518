"""SRTP<->RTP bridging benchmark: sipedge's relay side by side with rtpengine, in one run.

    .venv/bin/python -m bench.bench_srtp            # ladder, hold 20 s, 3 repeats
    .venv/bin/python -m bench.bench_srtp --quick    # hold 5 s, 1 repeat

The SDES bridging an SBC does between an SRTP PBX and a plain-RTP carrier: side A sends
SRTP (AES_CM_128_HMAC_SHA1_80) that the relay unprotects toward side B, and side B's plain
RTP is protected toward A with the relay's own key. Each relay in its own process on CPU 1,
the load generator (``bench/rtp/csrc_srtp.py``, C + libsrtp2) on CPU 0:

- ``sipedge``: ``edge._rtp.RelayEngine`` with ``Relay.set_srtp`` on leg a, as the B2BUA sets it
  from the SDP (``bench/rtp/engine_relay.py --srtp``)
- ``rtpengine``: Debian ``rtpengine-daemon`` in userspace (``--table=-1``), one worker thread,
  each call set up over ng: ``offer`` with A's ``RTP/SAVP`` SDP and its ``a=crypto`` plus
  ``transport-protocol: RTP/AVP`` (what B gets), then ``answer`` with B's plain SDP; the
  ``a=crypto`` of rtpengine's answer is the key the generator unprotects with

N calls of G.711 (50 pps each way, 172-byte RTP, 182 bytes as SRTP). A step passes at < 0.1 %
loss (a packet that fails to unprotect at the generator is lost); the ladder steps N up until
a relay fails (median of the repeats, the relays' order alternating per repeat). CPU per
packet is the relay process's utime + stime over the hold. Results:
``bench/results/srtp.json``. Every process is stopped by PID; loopback only.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import bench_rtp as rtp
from bench.bench_rtp import (
    CPU_DUT,
    CPU_GEN,
    ENGINE_RANGE,
    GEN_A,
    GEN_B,
    GEN_K,
    LOSS_MAX,
    PPS_PER_STREAM,
    PY,
    ROOT,
    RtpEngine,
    ensure_engine_built,
    ensure_rtpengine,
    log,
    machine,
    median_row,
    pin,
    proc_cpu,
    read_line,
    stop_pid,
    udp_errors,
)
from bench.rtp.engine_relay import SUITE, offer_key

KINDS = ("sipedge", "rtpengine")
GCM = "AEAD_AES_128_GCM"
_CRYPTO = re.compile(r"a=crypto:\d+ (\S+) inline:([A-Za-z0-9+/=]+)")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_gen(tmp: Path) -> str:
    from bench.rtp.csrc_srtp import SRTPGEN

    c = tmp / "srtpgen.c"
    c.write_text(SRTPGEN)
    exe = tmp / "srtpgen"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(c), "-lsrtp2"], check=True)
    return str(exe)


@contextlib.contextmanager
def relay_sipedge(n: int, rtpe: RtpEngine | None, suite: str):
    p = subprocess.Popen(pin(CPU_DUT) + [PY, "-m", "bench.rtp.engine_relay", str(ENGINE_RANGE[0]),
                                        str(ENGINE_RANGE[1]), str(n), str(GEN_A), str(GEN_B), str(GEN_K),
                                        f"--srtp={suite}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready = json.loads(read_line(p, 120))
        yield [(a, b, offer_key(i, suite).hex(), key)
               for i, ((a, b), key) in enumerate(zip(ready["ports"], ready["keys"], strict=True))], p.pid
    finally:
        with contextlib.suppress(OSError):
            p.stdin.close()
        with contextlib.suppress(Exception):
            p.wait(10)
        stop_pid(p)


@contextlib.contextmanager
def relay_rtpengine(n: int, rtpe: RtpEngine | None, suite: str):
    from edge.media.sdp import parse_sdp_media

    assert rtpe is not None
    sdp = ("v=0\r\no=- {i} 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           "m=audio {p} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\n{crypto}a=sendrecv\r\n")
    calls, rows = [], []
    try:
        for i in range(n):
            cid = f"bench-srtp-{os.getpid()}-{i}"
            calls.append(cid)
            crypto = f"a=crypto:1 {suite} inline:{base64.b64encode(offer_key(i, suite)).decode()}\r\n"
            off = rtpe.ng.call("offer", call_id=cid, from_tag=f"a{i}", ICE="remove",
                               sdp=sdp.format(i=i, p=GEN_A + i % GEN_K, proto="RTP/SAVP", crypto=crypto),
                               **{"transport-protocol": "RTP/AVP"})
            ans = rtpe.ng.call("answer", call_id=cid, from_tag=f"a{i}", to_tag=f"b{i}", ICE="remove",
                               sdp=sdp.format(i=i, p=GEN_B + i % GEN_K, proto="RTP/AVP", crypto=""))
            to_b, to_a = off["sdp"].decode(), ans["sdp"].decode()
            if "RTP/SAVP" in to_b or "a=crypto" in to_b:
                raise RuntimeError(f"rtpengine offered SRTP to the plain side: {to_b!r}")
            keys = [k for s, k in _CRYPTO.findall(to_a) if s == suite]
            if "RTP/SAVP" not in to_a or not keys:
                raise RuntimeError(f"rtpengine's answer to the SRTP side has no {suite} key: {to_a!r}")
            rows.append((parse_sdp_media(ans["sdp"]).port, parse_sdp_media(off["sdp"]).port,
                         offer_key(i, suite).hex(), base64.b64decode(keys[0] + "=" * (-len(keys[0]) % 4)).hex()))
        yield rows, rtpe.proc.pid
    finally:
        for i, cid in enumerate(calls):
            with contextlib.suppress(Exception):
                rtpe.ng.call("delete", call_id=cid, from_tag=f"a{i}")


def run_once(kind: str, n: int, hold: float, gen: str, rtpe: RtpEngine | None, suite: str) -> dict:
    maker = relay_rtpengine if kind == "rtpengine" else relay_sipedge
    load = os.getloadavg()[0]
    with maker(n, rtpe, suite) as (rows, pid):
        time.sleep(0.3)
        g_proc = subprocess.Popen(pin(CPU_GEN) + [gen, str(n), str(PPS_PER_STREAM), str(hold), str(GEN_A),
                                                 str(GEN_B), str(GEN_K), "gcm" if suite == GCM else "cm"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        cpu0 = proc_cpu(pid)
        err0 = udp_errors()
        try:
            out, _ = g_proc.communicate("".join(f"{a} {b} {ka} {kr}\n" for a, b, ka, kr in rows), timeout=hold + 60)
        finally:
            stop_pid(g_proc)
        cpu1 = proc_cpu(pid)
        err1 = udp_errors()
    g = json.loads(out)
    offered = g["offered"]
    loss = 1.0 - g["received"] / offered if offered else 1.0
    pps = g["received"] / hold
    cpu = cpu1 - cpu0
    return {
        "kind": kind, "calls": n, "offered_pps": PPS_PER_STREAM * 2 * n, "pps": round(pps),
        "loss": max(loss, 0.0), "bad": g["bad"], "p50_us": g["p50_us"], "p99_us": g["p99_us"],
        "p999_us": g["p999_us"], "max_us": g["max_us"], "relay_cpu_s": round(cpu, 3),
        "cpu_s_per_kpps": round(cpu / hold / (pps / 1000.0), 5) if pps else None,
        "gen_cpu_s": g["cpu_s"], "gen_send_fail": g["send_fail"], "pass": loss < LOSS_MAX,
        "loadavg_before": round(load, 2), "kernel_udp_errors": {k: err1[k] - err0[k] for k in err0},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="hold 5 s, 1 repeat, short ladder")
    ap.add_argument("--hold", type=float, default=None, help="seconds per step (default 20, quick 5)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per relay per step (default 3, quick 1)")
    ap.add_argument("--steps", default=None, help="comma-separated call counts")
    ap.add_argument("--max-minutes", type=float, default=30.0, help="stop the ladder after this long")
    ap.add_argument("--no-pin", action="store_true", help="do not taskset the relay and generator")
    ap.add_argument("--suite", choices=(SUITE, GCM), default=SUITE, help="the SDES suite of side A")
    ap.add_argument("--nice", type=int, default=0,
                    help="run both relays and the generator at this nice level (as in bench_rtp); default 0")
    ap.add_argument("--out", default=None, help="default bench/results/srtp.json (srtp-gcm.json for GCM)")
    args = ap.parse_args(argv)
    rtp.PIN = not args.no_pin
    rtp.NICE = args.nice
    suite = args.suite
    out = Path(args.out or ROOT / "bench" / "results" / ("srtp-gcm.json" if suite == GCM else "srtp.json"))
    hold = args.hold or (5.0 if args.quick else 20.0)
    repeat = args.repeat or (1 if args.quick else 3)
    ladder = [int(x) for x in (args.steps or ("250,1000,2000,3000" if args.quick else
                                              "250,500,1000,1500,2000,2500,3000,3500,4000")).split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ladder = [n for n in ladder if 4 * n + 64 <= hard]
    ensure_engine_built()
    t_start = time.monotonic()
    steps: dict[int, dict[str, dict]] = {}
    raw: list[dict] = []
    versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_srtp_") as td:
        tmp = Path(td)
        gen = build_gen(tmp)
        path = ensure_rtpengine()
        if not path:
            log("rtpengine is not available: no side-by-side run")
            return 1
        rtp.NG_ADDR = ("127.0.0.1", free_udp_port())   # the fixed default may be taken on a shared host
        rtpe = RtpEngine(path, tmp)
        versions["rtpengine"] = rtpe.version()
        try:
            alive = list(KINDS)
            for n in ladder:
                if not alive or time.monotonic() - t_start > args.max_minutes * 60:
                    break
                per_kind: dict[str, list[dict]] = {k: [] for k in alive}
                for rep in range(repeat):
                    for kind in alive[rep % len(alive):] + alive[:rep % len(alive)]:
                        try:
                            row = run_once(kind, n, hold, gen, rtpe, suite)
                        except Exception as exc:          # a relay failing is a result, not a crash
                            log(f"{kind} @ {n} calls failed: {exc}")
                            row = {"kind": kind, "calls": n, "pps": 0, "loss": 1.0, "p50_us": None,
                                   "p99_us": None, "p999_us": None, "max_us": None, "relay_cpu_s": None,
                                   "cpu_s_per_kpps": None, "pass": False, "error": str(exc)}
                        row["repeat"] = rep
                        raw.append(row)
                        per_kind[kind].append(row)
                        log(f"{kind:<9} {n:5d} calls  {int(row['pps']):7d} pps  loss {100 * row['loss']:.4f}%  "
                            f"bad {row.get('bad')}  p50 {row['p50_us']} us  p99 {row['p99_us']} us  "
                            f"cpu/kpps {row['cpu_s_per_kpps']}")
                steps[n] = {}
                for kind, rows in per_kind.items():
                    ok_rows = [r for r in rows if "error" not in r]
                    steps[n][kind] = median_row(ok_rows) if ok_rows else rows[0]
                alive = [k for k in alive if steps[n][k]["pass"]]
        finally:
            rtpe.close()
    best: dict[str, dict] = {}
    for kind in KINDS:
        rows = [steps[n][kind] for n in sorted(steps) if kind in steps[n]]
        ok = [r for r in rows if r["pass"]]
        cpus = sorted(r["cpu_s_per_kpps"] for r in (ok or rows) if r.get("cpu_s_per_kpps"))
        best[kind] = {"max_calls": ok[-1]["calls"] if ok else 0, "max_pps": ok[-1]["pps"] if ok else 0,
                      "first_fail_calls": next((r["calls"] for r in rows if not r["pass"]), None),
                      "cpu_s_per_kpps": cpus[len(cpus) // 2] if cpus else None,
                      "us_per_packet": round(cpus[len(cpus) // 2] * 1000, 3) if cpus else None}
    se, re_ = best["sipedge"], best["rtpengine"]
    ratios = {
        "sipedge/rtpengine_pps": round(se["max_pps"] / re_["max_pps"], 3) if re_["max_pps"] else None,
        # > 1: sipedge spends less CPU per bridged packet than rtpengine
        "rtpengine/sipedge_cpu_per_pkt": round(re_["cpu_s_per_kpps"] / se["cpu_s_per_kpps"], 3)
        if se["cpu_s_per_kpps"] and re_["cpu_s_per_kpps"] else None,
    }
    result = {
        "benchmark": "srtp_bridge", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python -m bench.bench_srtp"] + (argv if argv is not None else sys.argv[1:])),
        "load": {"codec": "G.711 20 ms", "suite": suite, "nice": args.nice, "srtp_side": "A",
                 "pps_per_stream": PPS_PER_STREAM, "hold_s": hold, "repeats": repeat, "loss_max": LOSS_MAX,
                 "ladder": ladder,
                 "pinning": {"relay": CPU_DUT, "generator": CPU_GEN} if rtp.PIN else None},
        "machine": machine(), "versions": versions, "best": best, "ratios": ratios,
        "steps": {str(n): v for n, v in steps.items()}, "runs": raw, "elapsed_s": round(time.monotonic() - t_start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| relay | max calls (<0.1% loss) | pps | first failing step | us CPU per packet |")
    print("|---|---|---|---|---|")
    for kind, b in best.items():
        print(f"| {kind} | {b['max_calls']} | {b['max_pps']} | {b['first_fail_calls']} | {b['us_per_packet']} |")
    print("\n" + "\n".join(f"{k} = {v}" for k, v in ratios.items()))
    print(f"\nwritten: {out} ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
