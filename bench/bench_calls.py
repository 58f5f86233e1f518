"""Authenticated calls per second with media: sipedge side by side with Kamailio + rtpengine.

    .venv/bin/python -m bench.bench_calls            # BENCH.md ladder: 30 s steps, 3 repeats
    .venv/bin/python -m bench.bench_calls --quick    # 8 s steps, 1 repeat
    .venv/bin/python -m bench.bench_calls --only kamailio --rates 50,100,200 --no-rtp
    .venv/bin/python -m bench.bench_calls --only sipedge --baseline ../wt-base   # before/after a change

Job (the same for both devices): SIPp as the PBX (``bench/sipp/uac-call-auth.xml``:
INVITE -> 407 -> ACK -> INVITE with credentials -> 100/180/200 -> ACK -> RTP both ways
for ``--call-seconds`` -> BYE -> 200) on 127.0.0.1, the device in the middle, and SIPp as
the carrier (``bench/sipp/uas-answer.xml``: 100/180/200 with SDP, RTP, 200 to BYE) on
127.0.0.2 (SPEC §2). G.711 u-law RTP at 50 packets/s per direction from SIPp's
``rtp_stream`` on both sides, through the device's media relay.

- ``kamailio``: Debian ``kamailio`` with ``bench/kamailio/calls.cfg`` (auth + auth_db,
  dialog with a per-user concurrent-call profile, record-route, rtpengine module) and
  Debian ``rtpengine-daemon`` in userspace (``--table=-1``), one worker thread.
  CPU and memory are the sum of both daemons.
- ``sipedge``: ``python -m edge.cli serve`` with the carrier in ``[[carriers]]``; N digest
  profiles with ``--channels`` channels and credit, a rate for the dialled prefix, all
  provisioned through the control API. (It works once the B2BUA has landed; until
  then the script reports the failed calls instead of crashing.)

Method (BENCH.md): the offered call rate steps up a ladder, each step held ``--hold``
seconds; a step passes with zero failed calls, SIPp exit 0 on the PBX side and
retransmissions under 1 %; result per device = highest passing step, and the first
failing one. CPU seconds per call = device CPU (utime+stime of every process, from
/proc) during the step / successful calls. Memory per active call = (peak PSS during the
step - PSS before) / expected concurrent calls (rate x (call seconds + setup)). SIPp
on CPU 0, the device on CPU 1 (taskset). Devices alternate per repeat; medians with
[min..max]; ratios sipedge/kamailio. JSON: bench/results/calls.json.
"""

from __future__ import annotations

import argparse
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_register import (
    CPU_DUT,
    CPU_GEN,
    DOMAIN,
    KAM_DIR,
    SIPP_DIR,
    Device,
    Kamailio,
    Sipedge,
    StepResult,
    ensure_debs,
    free_port,
    ladder,
    log,
    pinned,
    run_sipp,
    spread,
    stop_tree,
    tool_version,
    tree_pids,
)

DEST = "+442071234567"       # UK London: rated by the "44" row the script loads into sipedge
CARRIER_IP = "127.0.0.2"
# Port plan (benches run one after the other; bench_rtp also uses 21000-21100 and 30000+):
# 12,000 relay ports hold ~3,000 calls of 4 ports. 8,000 (22000-29998) ran out at 750 calls/s
# (each call's ports wait out a 0.5 s quiet period), so that step measured the port plan, not a device.
RTP_RANGE = (20000, 31998)   # relay ports (rtpengine or sipedge), the same range for both
UAC_MEDIA_PORT = 2000        # SIPp PBX side: per-call RTP ports from here ([rtpstream_audio_port]), <9000
UAS_MEDIA_PORT = 9000        # SIPp carrier side, <15000
# SIP ports: bench_register.SIP_PORT_RANGE (15000-19999)


def ulaw(sample: int) -> int:
    """One 16-bit linear sample to G.711 u-law (ITU-T G.711, the classic Sun algorithm)."""
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    mag = min(-sample if sample < 0 else sample, clip) + bias
    exponent = 7
    for exp_mask in (0x4000, 0x2000, 0x1000, 0x800, 0x400, 0x200, 0x100):
        if mag & exp_mask:
            break
        exponent -= 1
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def write_pcmu_wav(path: Path, freq: float = 440.0, seconds: float = 1.0) -> None:
    """An 8 kHz G.711 u-law WAV (format 7) of a sine: what SIPp's rtp_stream sends as PT 0."""
    rate = 8000
    n = int(rate * seconds)
    data = bytes(ulaw(int(8000 * math.sin(2 * math.pi * freq * i / rate))) for i in range(n))
    fmt = struct.pack("<HHIIHH", 7, 1, rate, rate, 1, 8) + struct.pack("<H", 0)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<I", 4)
            + struct.pack("<I", len(data)) + b"data" + struct.pack("<I", len(data)) + data)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


class Rtpengine:
    """Debian rtpengine-daemon in userspace, one worker, ng protocol on loopback."""

    def __init__(self, workdir: Path, cpu: str | None) -> None:
        self.workdir = workdir
        self.cpu = cpu
        self.ng_port = free_port()
        self.proc: subprocess.Popen[Any] | None = None
        self.log_path = workdir / "rtpengine.log"

    def start(self) -> None:
        cmd = ["rtpengine", "--config-file=none", "--foreground", "--log-stderr", "--log-level=3", "--table=-1",
               "--interface=127.0.0.1", f"--listen-ng=127.0.0.1:{self.ng_port}", f"--port-min={RTP_RANGE[0]}",
               f"--port-max={RTP_RANGE[1]}", "--num-threads=1", "--delete-delay=0", "--timeout=60",
               "--no-redis-required"]
        self.proc = subprocess.Popen(pinned(self.cpu, cmd), stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "ab"))
        time.sleep(1.0)
        if self.proc.poll() is not None:
            raise RuntimeError("rtpengine exited: " + self.log_path.read_text()[-2000:])

    def stop(self) -> None:
        stop_tree(self.proc)
        self.proc = None


class KamailioRtpengine(Kamailio):
    """Kamailio (calls.cfg) + rtpengine, measured together."""

    name = "kamailio"

    def __init__(self, workdir: Path, cpu: str | None, *, carrier: str, channels: int, children: int) -> None:
        super().__init__(workdir, cpu, cfg=KAM_DIR / "calls.cfg", children=children)
        self.rtpengine = Rtpengine(self.workdir, cpu)
        self.defines.update({"CARRIER": f'"{carrier}"', "RTPENGINE": f'"udp:127.0.0.1:{self.rtpengine.ng_port}"',
                             "CHANNELS": str(channels)})

    def start(self, timeout: float = 20.0) -> None:
        self.rtpengine.start()
        try:
            super().start(timeout)
        except BaseException:
            self.rtpengine.stop()
            raise

    def pids(self) -> list[int]:
        own = super().pids()
        rtp = tree_pids(self.rtpengine.proc.pid) if self.rtpengine.proc and self.rtpengine.proc.poll() is None else []
        return own + rtp

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.rtpengine.stop()


class Carrier:
    """SIPp UAS on 127.0.0.2 answering every call (stopped by PID)."""

    def __init__(self, workdir: Path, cpu: str | None, rtp: bool) -> None:
        self.workdir = workdir
        self.cpu = cpu
        self.rtp = rtp
        self.port = free_port(CARRIER_IP)
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def uri(self) -> str:
        return f"sip:{CARRIER_IP}:{self.port}"

    def start(self) -> None:
        scenario = SIPP_DIR / "uas-answer.xml"
        if not self.rtp:
            scenario = strip_rtp(scenario, self.workdir)
        cmd = ["sipp", "-sf", str(scenario), "-i", CARRIER_IP, "-mi", CARRIER_IP, "-p", str(self.port),
               "-mp", str(UAS_MEDIA_PORT), "-nostdin", "-buff_size", str(4 * 1024 * 1024), "-max_socket", "8192",
               "-trace_stat", "-stf", str(self.workdir / f"uas-{self.port}.csv"), "-fd", "1"]
        self.proc = subprocess.Popen(pinned(self.cpu, cmd), cwd=self.workdir, stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "uas.stderr", "ab"))
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError("SIPp UAS exited: " + (self.workdir / "uas.stderr").read_text()[-2000:])

    def stop(self) -> None:
        stop_tree(self.proc, timeout=3)
        self.proc = None


def strip_rtp(scenario: Path, workdir: Path) -> Path:
    """The scenario without its rtp_stream actions (``--no-rtp``: signalling only)."""
    text = scenario.read_text()
    import re

    text = re.sub(r"\s*<nop>\s*<action>\s*<exec rtp_stream=\"[^\"]*\"\s*/>\s*</action>\s*</nop>", "", text)
    out = workdir / (scenario.stem + "-nortp.xml")
    out.write_text(text)
    return out


def write_calls_csv(path: Path, users: list[tuple[str, str]]) -> None:
    with path.open("w") as f:
        f.write("SEQUENTIAL\n")
        for user, pw in users:
            f.write(f"{user};{DOMAIN};[authentication username={user} password={pw}];{DEST}\n")


def provision_sipedge(dev: Sipedge, users: int, channels: int) -> list[tuple[str, str]]:
    with dev.client() as api:
        api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200", "connect_fee": "0",
                                              "min_seconds": 1, "increment_seconds": 1,
                                              "description": "UK"}]}).raise_for_status()
    profiles = dev.provision_profiles(users, channels=channels, credit="1000.00")
    return [(p["sip_username"], p["sip_password"]) for p in profiles]


def lock_waits(dev: Sipedge) -> tuple[float, float, float] | None:
    """(write transactions, seconds waited for LMDB's writer lock, the longest wait) of the whole
    node so far, from its /metrics (edge_store_* added up over its processes)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(dev.base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    found = {"edge_store_writes_total": 0.0, "edge_store_write_lock_wait_seconds_total": 0.0,
             "edge_store_write_lock_wait_seconds_max": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] = sample.value
    return (found["edge_store_writes_total"], found["edge_store_write_lock_wait_seconds_total"],
            found["edge_store_write_lock_wait_seconds_max"])


def main(argv: list[str] | None = None) -> int:
    from bench.common import machine_info, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 s steps, 1 repeat")
    ap.add_argument("--rates", default="25,50,100,150,200,300,400,500,600,800,1000",
                    help="comma-separated offered call rates (calls/s)")
    ap.add_argument("--hold", type=float, default=None, help="seconds per step (default 30, --quick 8)")
    ap.add_argument("--call-seconds", type=float, default=2.0, help="media time per call (SIPp -d)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (--quick 1)")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--channels", type=int, default=300, help="channel limit per user/profile (1..300)")
    ap.add_argument("--no-rtp", action="store_true", help="signalling only (no rtp_stream)")
    ap.add_argument("--only", choices=("kamailio", "sipedge"), default=None)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="also run another sipedge build: a checkout (e.g. a git worktree of the commit "
                         "before a change) with its .venv built; reported as 'baseline' beside 'sipedge'")
    ap.add_argument("--kam-children", type=int, default=4, help="Kamailio children per listener (its default)")
    ap.add_argument("--workers", default=None,
                    help="comma-separated [node] workers values: sipedge runs once per value, reported as "
                         "sipedge-wN (default: the config default, one per core of the CPU set it is pinned to)")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--output", default="calls.json")
    args = ap.parse_args(argv)
    hold = args.hold or (8.0 if args.quick else 30.0)
    repeats = args.repeats or (1 if args.quick else 3)
    rates = [int(x) for x in args.rates.split(",") if x.strip()]

    ensure_debs({"sipp": "sip-tester", "kamailio": "kamailio", "rtpengine": "rtpengine-daemon"})
    cpu_dut = None if args.no_pin else CPU_DUT
    workdir = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    log(f"work dir: {workdir}")
    write_pcmu_wav(workdir / "tone-pcmu.wav")
    uac = SIPP_DIR / "uac-call-auth.xml"
    if args.no_rtp:
        uac = strip_rtp(uac, workdir)
    names = [args.only] if args.only else ["kamailio", "sipedge"]
    if args.workers and "sipedge" in names:
        at = names.index("sipedge")
        names[at:at + 1] = [f"sipedge-w{int(w)}" for w in args.workers.split(",")]
    if args.baseline is not None:
        names.insert(names.index("sipedge") if "sipedge" in names else len(names), "baseline")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    kam_users = [(f"99060{i:07d}", f"pw{i:06d}y") for i in range(args.users)]
    kam_csv = workdir / "calls-kamailio.csv"
    write_calls_csv(kam_csv, kam_users)
    setup_s = 0.05
    try:
        for rep in range(repeats):
            order = names if rep % 2 == 0 else list(reversed(names))
            for name in order:
                log(f"repeat {rep + 1}/{repeats}: {name}")
                carrier = Carrier(workdir, CPU_GEN if not args.no_pin else None, rtp=not args.no_rtp)
                dev: Device
                if name == "kamailio":
                    dev = KamailioRtpengine(workdir, cpu_dut, carrier=f"{CARRIER_IP}:{carrier.port}",
                                            channels=args.channels, children=args.kam_children)
                    dev.write_users(kam_users)
                    csv_path = kam_csv
                else:
                    workers = f"[node]\nworkers = {name.split('-w')[1]}\n" if "-w" in name else ""
                    dev = Sipedge(workdir, cpu_dut, media_ports=(RTP_RANGE[0], RTP_RANGE[1] + 1), extra_config=(
                        f'[[carriers]]\nuri = "{carrier.uri}"\npriority = 1\nweight = 100\n' + workers), name=name,
                        checkout=args.baseline if name == "baseline" else None)
                    csv_path = workdir / f"calls-{name}.csv"
                try:
                    try:
                        carrier.start()
                        dev.start()
                        if isinstance(dev, Sipedge) and not csv_path.exists():
                            write_calls_csv(csv_path, provision_sipedge(dev, args.users, args.channels))
                    except Exception as exc:
                        log(f"{name}: could not start: {exc}")
                        runs[name].append({"steps": [], "max_rate": None, "first_failing_rate": rates[0],
                                           "failed_calls": None, "error": str(exc)[:2000]})
                        continue

                    def step(rate: int, dev: Device = dev, csv_path: Path = csv_path) -> StepResult:
                        pids = dev.pids()
                        if not pids:
                            r = StepResult(dut=dev.name, rate=rate, seconds=hold, offered=int(rate * hold),
                                           failed=int(rate * hold), note=f"{dev.name} is not running")
                            return r
                        locks = lock_waits(dev) if isinstance(dev, Sipedge) else None
                        r = run_sipp(dut=dev.name, scenario=uac, target=dev.target, rate=rate, seconds=hold,
                                     workdir=workdir, dut_pids=pids, inf=csv_path,
                                     limit=max(200, int(rate * (args.call_seconds + 5) * 2)),
                                     extra_args=["-d", str(int(args.call_seconds * 1000)), "-mi", "127.0.0.1",
                                                 "-mp", str(UAC_MEDIA_PORT)],
                                     sample_rss=True, recv_timeout_ms=8000)
                        r.extra["expected_concurrent_calls"] = rate * (args.call_seconds + setup_s)
                        if locks is not None:
                            after = lock_waits(dev)
                            if after is not None:
                                writes = after[0] - locks[0]
                                r.extra["lmdb_writes"] = writes
                                r.extra["lmdb_lock_wait_us_per_write"] = round(
                                    (after[1] - locks[1]) / max(1, writes) * 1e6, 2)
                                r.extra["lmdb_lock_wait_max_ms"] = round(after[2] * 1000, 3)
                        return r

                    res_steps, best, first_fail = ladder(rates, step, log_prefix=f"  {name:>8}")
                    runs[name].append({"steps": [s.as_dict() for s in res_steps], "max_rate": best,
                                       "first_failing_rate": first_fail,
                                       "failed_calls": sum(s.failed for s in res_steps),
                                       "error": getattr(dev, "error", "") or None})
                finally:
                    dev.stop()
                    carrier.stop()
                time.sleep(1.0)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    summary: dict[str, Any] = {}
    for n, reps in runs.items():
        summary[n] = {"max_rate": spread([r["max_rate"] or 0 for r in reps]),
                      "first_failing_rate": spread([r["first_failing_rate"] for r in reps if r["first_failing_rate"]])}
        by_rate: dict[int, list[dict[str, Any]]] = {}
        for r in reps:
            for s in r["steps"]:
                if s["passed"]:
                    by_rate.setdefault(s["rate"], []).append(s)
        summary[n]["cpu_us_per_call_by_rate"] = {
            str(k): spread([s["cpu_us_per_op"] for s in v])["median"] for k, v in sorted(by_rate.items())}
        summary[n]["setup_ms_by_rate"] = {
            str(k): spread([s["response_ms"] for s in v])["median"] for k, v in sorted(by_rate.items())}
        summary[n]["lmdb_lock_wait_us_per_write_by_rate"] = {
            str(k): spread([s["extra"]["lmdb_lock_wait_us_per_write"] for s in v
                            if "lmdb_lock_wait_us_per_write" in s["extra"]])["median"]
            for k, v in sorted(by_rate.items())}
        summary[n]["memory_bytes_per_active_call_by_rate"] = {
            str(k): spread([(s["extra"].get("pss_peak", 0) - s["extra"].get("pss_before", 0))
                            / max(1.0, s["extra"].get("expected_concurrent_calls", 1.0)) for s in v
                            if "pss_peak" in s["extra"]])["median"] for k, v in sorted(by_rate.items())}
    if len(names) == 2:
        a, b = names
        ma, mb = summary[a]["max_rate"]["median"], summary[b]["max_rate"]["median"]
        summary[f"ratio_max_rate_{b}_over_{a}"] = (mb / ma) if ma else None
        common = set(summary[a]["cpu_us_per_call_by_rate"]) & set(summary[b]["cpu_us_per_call_by_rate"])
        if common:
            ref = max(common, key=int)
            ca, cb = summary[a]["cpu_us_per_call_by_rate"][ref], summary[b]["cpu_us_per_call_by_rate"][ref]
            summary["reference_rate"] = int(ref)
            summary[f"ratio_cpu_per_call_{b}_over_{a}"] = (cb / ca) if ca and cb else None
    result: dict[str, object] = {
        "bench": "calls",
        "machine": machine_info(),
        "baseline": str(args.baseline) if args.baseline else None,
        "tools": {"sipp": tool_version(["sipp", "-v"]), "kamailio": tool_version(["kamailio", "-v"]),
                  "rtpengine": tool_version(["rtpengine", "--version"])},
        "method": {"hold_s": hold, "repeats": repeats, "rates": rates, "users": args.users,
                   "channels": args.channels, "call_seconds": args.call_seconds, "rtp": not args.no_rtp,
                   "pinned": not args.no_pin, "cpu_sipp": CPU_GEN, "cpu_device": cpu_dut,
                   "pass": "0 failed, SIPp rc 0, retrans < 1%", "uac": "bench/sipp/uac-call-auth.xml",
                   "uas": "bench/sipp/uas-answer.xml", "kamailio_cfg": "bench/kamailio/calls.cfg",
                   "kamailio_children": args.kam_children, "kamailio_alloc": " ".join(Kamailio.ALLOC),
                   "command": "python -m bench.bench_calls " + " ".join(argv if argv is not None else sys.argv[1:])},
        "runs": runs,
        "summary": summary,
    }
    path = write_result(args.output, result)
    log(f"wrote {path}")
    for n in names:
        s = summary[n]
        failed = sum(r.get("failed_calls") or 0 for r in runs[n])
        print(f"{n:<10} max calls/s {s['max_rate']}  first failing {s['first_failing_rate']}  "
              f"CPU us/call {s['cpu_us_per_call_by_rate']}  "
              f"bytes/active call {s['memory_bytes_per_active_call_by_rate']}  failed calls {failed}")
    for k, v in summary.items():
        if k.startswith("ratio_") or k == "reference_rate":
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
