"""RTP relay benchmark: sipedge's engine side by side with its peers, in one run.

    .venv/bin/python -m bench.bench_rtp            # full ladder (BENCH.md: hold 20 s, 3 repeats)
    .venv/bin/python -m bench.bench_rtp --quick    # a few minutes

Relays (each in its own process, pinned to CPU 1; the load generator on CPU 0):

- ``sipedge``: ``edge._rtp.RelayEngine`` (latching, counters, timeouts all on)
- ``rtpengine``: Debian ``rtpengine-daemon``, userspace only (``--table=-1``),
  driven over the ng protocol (offer/answer/delete), one worker thread
- ``asyncio``: a plain asyncio ``DatagramProtocol`` relay
- ``c``: minimal C epoll + recvmmsg/sendmmsg relay, fixed destinations: the
  physical limit of this machine
- ``direct``: no relay, the generator talks to itself: its own ceiling and the
  loopback latency floor

Load: N simulated G.711 calls, 50 pps each direction, 172-byte packets
(12 RTP + 160 payload) from a C generator (``bench/rtp/csrc.py``), send time in
the payload. A step passes at < 0.1 % loss; the ladder steps N up until a
relay fails (median of the repeats), alternating the relays' order per repeat.
Results: ``bench/results/rtp.json``. Every process is stopped by PID; loopback only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
GEN_A, GEN_B, GEN_K = 21000, 21100, 4       # generator sockets: 4 per side
RELAY_BASE = 30000                          # c / asyncio: call i on BASE+4i, BASE+4i+2
ENGINE_RANGE = (30000, 46999)               # sipedge: 4 ports per call
RTPENGINE_RANGE = (47000, 63999)
NG_ADDR = ("127.0.0.1", 22222)
PPS_PER_STREAM = 50
LOSS_MAX = 0.001                            # < 0.1 %
KINDS = ("sipedge", "rtpengine", "c", "asyncio", "direct")
CPU_DUT, CPU_GEN = "1", "0"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- setup (everything installs itself) ---------------------------------------------

def ensure_engine_built() -> None:
    try:
        import edge._rtp  # noqa: F401
    except ImportError:
        log("building Cython extensions (setup.py build_ext --inplace)")
        subprocess.run([PY, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, check=True)


def ensure_rtpengine() -> str | None:
    exe = shutil.which("rtpengine")
    if exe:
        return exe
    log("installing Debian rtpengine-daemon (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "rtpengine-daemon"], check=True, env=env,
                       timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        log(f"rtpengine unavailable: {exc}")
        return None
    return shutil.which("rtpengine")


def build_c(tmp: Path) -> dict[str, str]:
    from bench.rtp.csrc import CRELAY, LOADGEN

    out = {}
    for name, src in (("loadgen", LOADGEN), ("crelay", CRELAY)):
        c = tmp / (name + ".c")
        c.write_text(src)
        exe = tmp / name
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(c)], check=True)
        out[name] = str(exe)
    return out


NICE = 0                                    # --nice: same priority for every relay and the generator


PIN = True                                  # --no-pin: let the scheduler place relay and generator


def pin(cpu: str) -> list[str]:
    cmd = ["taskset", "-c", cpu] if PIN and shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    return (["nice", "-n", str(NICE)] if NICE else []) + cmd


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all threads), seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def udp_errors() -> dict[str, int]:
    """Kernel UDP counters (/proc/net/snmp): where loss happens (socket queues full)."""
    with open("/proc/net/snmp") as f:
        rows = [ln.split() for ln in f if ln.startswith("Udp:")]
    d = dict(zip(rows[0][1:], (int(x) for x in rows[1][1:]), strict=True))
    return {k: d.get(k, 0) for k in ("RcvbufErrors", "SndbufErrors", "InErrors")}


def stop_pid(p: subprocess.Popen, timeout: float = 5.0) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)


def read_line(p: subprocess.Popen, timeout: float) -> str:
    """One stdout line from a child, bounded in time."""
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], 0.2)
        if r:
            line = p.stdout.readline()
            if line:
                return line
            break
        if p.poll() is not None:
            break
    raise RuntimeError(f"child {p.pid} gave no output (rc={p.poll()})")


# -- relays under test: each yields (port pairs, pid or None) -----------------------

@contextlib.contextmanager
def relay_c(n: int, exe: dict[str, str]):
    p = subprocess.Popen(pin(CPU_DUT) + [exe["crelay"], str(RELAY_BASE), str(n), str(GEN_A), str(GEN_B),
                                        str(GEN_K)], stdout=subprocess.PIPE, text=True)
    try:
        read_line(p, 30)
        yield [(RELAY_BASE + 4 * i, RELAY_BASE + 4 * i + 2) for i in range(n)], p.pid
    finally:
        stop_pid(p)


@contextlib.contextmanager
def relay_asyncio(n: int, exe: dict[str, str]):
    p = subprocess.Popen(pin(CPU_DUT) + [PY, "-m", "bench.rtp.asyncio_relay", str(RELAY_BASE), str(n),
                                        str(GEN_A), str(GEN_B), str(GEN_K)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        read_line(p, 120)
        yield [(RELAY_BASE + 4 * i, RELAY_BASE + 4 * i + 2) for i in range(n)], p.pid
    finally:
        with contextlib.suppress(OSError):
            p.stdin.close()
        stop_pid(p)


@contextlib.contextmanager
def relay_sipedge(n: int, exe: dict[str, str]):
    p = subprocess.Popen(pin(CPU_DUT) + [PY, "-m", "bench.rtp.engine_relay", str(ENGINE_RANGE[0]),
                                        str(ENGINE_RANGE[1]), str(n), str(GEN_A), str(GEN_B), str(GEN_K)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ports = json.loads(read_line(p, 120))["ports"]
        yield [tuple(x) for x in ports], p.pid
    finally:
        with contextlib.suppress(OSError):
            p.stdin.close()
        with contextlib.suppress(Exception):
            p.wait(10)
        stop_pid(p)


@contextlib.contextmanager
def relay_direct(n: int, exe: dict[str, str]):
    # Side A sends straight to generator B's socket and back: no relay at all.
    yield [(GEN_B + i % GEN_K, GEN_A + i % GEN_K) for i in range(n)], None


class RtpEngine:
    """The rtpengine daemon for the whole run; calls are set up per step over ng."""

    def __init__(self, exe: str, tmp: Path) -> None:
        self.exe = exe
        self.log = open(tmp / "rtpengine.log", "w")
        self.proc = subprocess.Popen(
            pin(CPU_DUT) + [exe, "--config-file=none", "--foreground", "--log-stderr", "--log-level=3",
                            "--table=-1", "--interface=127.0.0.1",
                            f"--listen-ng={NG_ADDR[0]}:{NG_ADDR[1]}", f"--port-min={RTPENGINE_RANGE[0]}",
                            f"--port-max={RTPENGINE_RANGE[1]}", "--num-threads=1",
                            "--delete-delay=0", "--timeout=120", "--no-redis-required"],
            stdout=self.log, stderr=subprocess.STDOUT)
        from bench.rtp.ng import NgClient

        self.ng = NgClient(NG_ADDR)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.ng.call("ping")
                break
            except (TimeoutError, OSError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"rtpengine did not start, see {self.log.name}") from None
                time.sleep(0.3)

    def version(self) -> str:
        out = subprocess.run([self.exe, "--version"], capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0]

    @contextlib.contextmanager
    def relay(self, n: int, exe: dict[str, str]):
        from edge.media.sdp import parse_sdp_media

        sdp = ("v=0\r\no=- {i} 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               "m=audio {p} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")
        ports = []
        calls = []
        try:
            for i in range(n):
                cid = f"bench-{os.getpid()}-{i}"
                calls.append(cid)
                off = self.ng.call("offer", call_id=cid, from_tag=f"a{i}",
                                   sdp=sdp.format(i=i, p=GEN_A + i % GEN_K), ICE="remove")
                ans = self.ng.call("answer", call_id=cid, from_tag=f"a{i}", to_tag=f"b{i}",
                                   sdp=sdp.format(i=i, p=GEN_B + i % GEN_K), ICE="remove")
                # Answer SDP goes to A: the port A sends to; offer SDP goes to B.
                ports.append((parse_sdp_media(ans["sdp"]).port, parse_sdp_media(off["sdp"]).port))
            yield ports, self.proc.pid
        finally:
            for i, cid in enumerate(calls):
                with contextlib.suppress(Exception):
                    self.ng.call("delete", call_id=cid, from_tag=f"a{i}")

    def close(self) -> None:
        self.ng.close()
        stop_pid(self.proc)
        self.log.close()


# -- one measurement ----------------------------------------------------------------

def run_once(kind: str, n: int, hold: float, exe: dict[str, str], rtpe: RtpEngine | None) -> dict:
    makers = {"c": relay_c, "asyncio": relay_asyncio, "sipedge": relay_sipedge, "direct": relay_direct}
    maker = rtpe.relay if kind == "rtpengine" else makers[kind]
    load = os.getloadavg()[0]               # noisy shared machine: keep the context
    with maker(n, exe) as (ports, pid):
        time.sleep(0.3)
        gen = subprocess.Popen(pin(CPU_GEN) + [exe["loadgen"], str(n), str(PPS_PER_STREAM), str(hold),
                                              str(GEN_A), str(GEN_B), str(GEN_K)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        cpu0 = proc_cpu(pid) if pid else 0.0
        err0 = udp_errors()
        try:
            out, _ = gen.communicate("".join(f"{a} {b}\n" for a, b in ports), timeout=hold + 60)
        finally:
            stop_pid(gen)
        cpu1 = proc_cpu(pid) if pid else 0.0
        err1 = udp_errors()
    g = json.loads(out)
    offered = g["offered"]
    loss = 1.0 - g["received"] / offered if offered else 1.0
    pps = g["received"] / hold
    cpu = cpu1 - cpu0
    return {
        "kind": kind, "calls": n, "offered_pps": PPS_PER_STREAM * 2 * n, "pps": round(pps),
        "loss": max(loss, 0.0), "p50_us": g["p50_us"], "p99_us": g["p99_us"], "p999_us": g["p999_us"],
        "max_us": g["max_us"], "relay_cpu_s": round(cpu, 3) if pid else None,
        "cpu_s_per_kpps": round(cpu / hold / (pps / 1000.0), 5) if pid and pps else None,
        "gen_cpu_s": g["cpu_s"], "gen_send_fail": g["send_fail"], "pass": loss < LOSS_MAX,
        "loadavg_before": round(load, 2),
        "kernel_udp_errors": {k: err1[k] - err0[k] for k in err0},
    }


def median_row(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for k in ("pps", "loss", "p50_us", "p99_us", "p999_us", "max_us", "relay_cpu_s", "cpu_s_per_kpps"):
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = statistics.median(vals) if vals else None
    out["pass"] = out["loss"] < LOSS_MAX
    out["repeats"] = len(rows)
    spread = [r["pps"] for r in rows]
    out["pps_spread"] = [min(spread), max(spread)]
    cpus = [r["cpu_s_per_kpps"] for r in rows if r["cpu_s_per_kpps"] is not None]
    out["cpu_spread"] = [min(cpus), max(cpus)] if cpus else None
    return out


# -- report -------------------------------------------------------------------------

def summarise(steps: dict, kinds: list[str]) -> dict:
    best = {}
    for kind in kinds:
        rows = [steps[n][kind] for n in sorted(steps) if kind in steps[n]]
        ok = [r for r in rows if r["pass"]]
        fail = [r for r in rows if not r["pass"]]
        # CPU per packet from steps without loss (not in overload); all steps if none passed.
        cpus = [r["cpu_s_per_kpps"] for r in (ok or rows) if r.get("cpu_s_per_kpps")]
        at1000 = steps.get(1000, {}).get(kind)
        floor = steps.get(1000, {}).get("direct")
        best[kind] = {
            "max_calls": ok[-1]["calls"] if ok else 0,
            "max_pps": ok[-1]["pps"] if ok else 0,
            "first_fail_calls": fail[0]["calls"] if fail else None,
            "first_fail_loss": fail[0]["loss"] if fail else None,
            "p50_us_at_1000": at1000["p50_us"] if at1000 else None,
            "p99_us_at_1000": at1000["p99_us"] if at1000 else None,
            # Added by the relay: minus the generator's own loopback floor ("direct").
            "added_p50_us_at_1000": (at1000["p50_us"] - floor["p50_us"]) if at1000 and floor
            and at1000["p50_us"] is not None and kind != "direct" else None,
            "added_p99_us_at_1000": (at1000["p99_us"] - floor["p99_us"]) if at1000 and floor
            and at1000["p99_us"] is not None and kind != "direct" else None,
            "cpu_s_per_kpps": statistics.median(cpus) if cpus else None,
            # 1 / CPU per packet: what one core would relay if the relay had it to itself.
            # Robust to neighbours on a shared host (the ladder is not). Loopback softirq
            # time is not charged to any process, so all relays are flattered alike.
            "pps_per_core_est": round(1000.0 / statistics.median(cpus)) if cpus else None,
            "ceiling": not fail,
        }
    ratios = {}
    se = best.get("sipedge")
    for peer in ("rtpengine", "c", "asyncio"):
        if se and peer in best and best[peer]["max_pps"]:
            ratios[f"sipedge/{peer}_pps"] = round(se["max_pps"] / best[peer]["max_pps"], 3)
        if se and peer in best and best[peer]["cpu_s_per_kpps"] and se["cpu_s_per_kpps"]:
            # > 1 means sipedge needs less CPU per packet than the peer
            ratios[f"{peer}/sipedge_cpu_per_pkt"] = round(best[peer]["cpu_s_per_kpps"] / se["cpu_s_per_kpps"], 3)
    return {"best": best, "ratios": ratios}


def table(summary: dict) -> str:
    lines = ["| relay | max calls (<0.1% loss) | pps | first failing step | p50 / p99 us @1000 calls "
             "| CPU s per 1,000 pps | pps per core (est.) |", "|---|---|---|---|---|---|---|"]
    for kind, b in summary["best"].items():
        fail = ("none (ladder top)" if b["ceiling"]
                else f"{b['first_fail_calls']} calls ({100 * b['first_fail_loss']:.2f}% loss)")
        lat = f"{b['p50_us_at_1000']} / {b['p99_us_at_1000']}" if b["p50_us_at_1000"] is not None else "-"
        cpu = f"{b['cpu_s_per_kpps']:.4f}" if b["cpu_s_per_kpps"] else "-"
        est = "{:,}".format(b["pps_per_core_est"]) if b.get("pps_per_core_est") else "-"
        lines.append(f"| {kind} | {b['max_calls']} | {int(b['max_pps'])} | {fail} | {lat} | {cpu} | {est} |")
    lines.append("")
    lines += [f"{k} = {v}" for k, v in summary["ratios"].items()]
    return "\n".join(lines)


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(), "python": platform.python_version(),
            "gcc": gcc, "git": sha}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="hold 5 s, 1 repeat, short ladder")
    ap.add_argument("--hold", type=float, default=None, help="seconds per step (default 20, quick 5)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per relay per step (default 3, quick 1)")
    ap.add_argument("--steps", default=None, help="comma-separated call counts")
    ap.add_argument("--relays", default=",".join(KINDS))
    ap.add_argument("--max-minutes", type=float, default=45.0, help="stop the ladder after this long")
    ap.add_argument("--nice", type=int, default=0,
                    help="run every relay and the generator at this nice level (e.g. -10 on a shared "
                         "machine, as media relays are run in production); default 0")
    ap.add_argument("--no-pin", action="store_true", help="do not taskset the relay and generator")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rtp.json"))
    args = ap.parse_args(argv)
    global NICE, PIN
    NICE = args.nice
    PIN = not args.no_pin
    hold = args.hold or (5.0 if args.quick else 20.0)
    repeat = args.repeat or (1 if args.quick else 3)
    default_steps = "250,1000,2000,3000,4000" if args.quick else "250,500,1000,1500,2000,2500,3000,3500,4000"
    ladder = [int(x) for x in (args.steps or default_steps).split(",")]
    kinds = [k for k in args.relays.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            ap.error(f"unknown relay {k!r}")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if 4 * max(ladder) + 64 > hard:
        ladder = [n for n in ladder if 4 * n + 64 <= hard]
        log(f"fd limit {hard}: ladder cut to {ladder}")
    ensure_engine_built()
    sys.path.insert(0, str(ROOT))
    rtpe = None
    t_start = time.monotonic()
    steps: dict[int, dict[str, dict]] = {}
    raw = []
    versions = {}
    with tempfile.TemporaryDirectory(prefix="bench_rtp_") as td:
        tmp = Path(td)
        exe = build_c(tmp)
        try:
            if "rtpengine" in kinds:
                path = ensure_rtpengine()
                if path:
                    rtpe = RtpEngine(path, tmp)
                    versions["rtpengine"] = rtpe.version()
                else:
                    kinds.remove("rtpengine")
            alive = list(kinds)
            for n in ladder:
                if not alive:
                    break
                if time.monotonic() - t_start > args.max_minutes * 60:
                    log(f"time cap reached, ladder stops before {n} calls")
                    break
                per_kind: dict[str, list[dict]] = {k: [] for k in alive}
                for rep in range(repeat):
                    order = alive[rep % len(alive):] + alive[:rep % len(alive)]   # alternate
                    for kind in order:
                        try:
                            row = run_once(kind, n, hold, exe, rtpe)
                        except Exception as exc:           # a peer failing is a result, not a crash
                            log(f"{kind} @ {n} calls failed: {exc}")
                            row = {"kind": kind, "calls": n, "offered_pps": 100 * n, "pps": 0, "loss": 1.0,
                                   "p50_us": None, "p99_us": None, "p999_us": None, "max_us": None,
                                   "relay_cpu_s": None, "cpu_s_per_kpps": None, "pass": False,
                                   "error": str(exc)}
                        row["repeat"] = rep
                        raw.append(row)
                        per_kind[kind].append(row)
                        log(f"{kind:<9} {n:5d} calls  {int(row['pps']):7d} pps  loss {100 * row['loss']:.4f}%  "
                            f"p50 {row['p50_us']} us  p99 {row['p99_us']} us  cpu/kpps {row['cpu_s_per_kpps']}")
                steps[n] = {}
                for kind, rows in per_kind.items():
                    ok_rows = [r for r in rows if "error" not in r] or rows
                    steps[n][kind] = median_row(ok_rows) if "error" not in ok_rows[0] else ok_rows[0]
                alive = [k for k in alive if steps[n][k]["pass"]]
        finally:
            if rtpe:
                rtpe.close()
    summary = summarise(steps, kinds)
    result = {
        "benchmark": "rtp_relay", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "load": {"codec": "G.711 20 ms", "pps_per_stream": PPS_PER_STREAM, "packet_bytes": 172,
                 "streams_per_call": 2, "hold_s": hold, "repeats": repeat, "loss_max": LOSS_MAX,
                 "ladder": ladder, "pinning": {"relay": CPU_DUT, "generator": CPU_GEN} if PIN else None, "nice": NICE},
        "machine": machine(), "versions": versions,
        "summary": summary, "steps": {str(n): v for n, v in steps.items()}, "runs": raw,
        "elapsed_s": round(time.monotonic() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(summary))
    print(f"\nwritten: {args.out} ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
