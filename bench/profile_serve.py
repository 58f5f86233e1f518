"""Where a real `sipedge serve` spends its CPU under SIPp load (issue 10).

    .venv/bin/python -m bench.profile_serve --rate 400 --hold 20                 # CPU by process and thread
    .venv/bin/python -m bench.profile_serve --rate 400 --hold 20 --py-spy out.txt  # + the worker's profile
    .venv/bin/python -m bench.profile_serve --rate 400 --hold 20 --syscalls        # + system calls per call

The edge is started exactly as ``bench_calls.py --no-rtp`` starts it (the same config, the
same pinning: SIPp on CPU 0, the node on CPU 1) and offered one step of the same
signalling-only call. During the step it reads utime/stime of every thread of every
process of the node from /proc, so the CPU per call splits into the supervisor, the worker's
event loop, the worker's other threads (the group fsync, ...) and the API process.
``--py-spy`` records the worker with ``py-spy record --native`` (which stops it for each
sample: its CPU figures are then a little higher)
(``--format raw``: collapsed stacks, one line per stack with its sample count) and prints the
top own-time functions; ``--perf`` records it with ``perf record -g``, kernel included (read it with ``perf report``);
``--syscalls`` counts the worker's system calls with ``perf trace -s``
(or ``strace -c`` when perf cannot), which slows the worker: its CPU figures are then not
the step's. Every process is stopped by PID; traffic on loopback only.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_calls import (
    RTP_RANGE,
    SIPP_DIR,
    UAC_MEDIA_PORT,
    Carrier,
    provision_sipedge,
    strip_rtp,
    write_calls_csv,
)
from bench.bench_register import CLK_TCK, CPU_DUT, CPU_GEN, Sipedge, ensure_debs, run_sipp, stop_tree


def thread_cpu(pids: list[int]) -> dict[tuple[int, str, int, str], tuple[float, float, int]]:
    """(pid, process name, tid, thread name) -> (user s, system s, voluntary context switches:
    how often the thread blocked, e.g. the event loop in epoll_wait) for every thread."""
    out: dict[tuple[int, str, int, str], tuple[float, float, int]] = {}
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        pname = process_role(cmd)
        for tid in tids:
            try:
                raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            st = raw[raw.rindex(")") + 2:].split()
            switches = int(status.split("voluntary_ctxt_switches:", 1)[1].split()[0])
            out[(pid, pname, int(tid), comm)] = (int(st[11]) / CLK_TCK, int(st[12]) / CLK_TCK, switches)
    return out


def process_role(cmdline: str) -> str:
    if "edge.processes worker" in cmdline:
        return "worker"
    if "edge.processes api" in cmdline:
        return "api"
    return "node"  # the supervisor, or with one worker the whole node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=400)
    ap.add_argument("--hold", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the measured step")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--channels", type=int, default=300)
    ap.add_argument("--py-spy", type=Path, default=None, help="record the worker into this file (raw stacks)")
    ap.add_argument("--perf", type=Path, default=None,
                    help="record the worker with `perf record -g` (user and kernel) into this file")
    ap.add_argument("--syscalls", action="store_true", help="count the worker's system calls during the step")
    ap.add_argument("--media-ports", default=f"{RTP_RANGE[0]}-{RTP_RANGE[1] + 1}",
                    help="the edge's relay port range, LOW-HIGH (default: bench_calls' range)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (the edge's log, SIPp's files)")
    args = ap.parse_args(argv)

    ensure_debs({"sipp": "sip-tester"})
    workdir = Path(tempfile.mkdtemp(prefix="profile-serve-"))
    uac = strip_rtp(SIPP_DIR / "uac-call-auth.xml", workdir)
    carrier = Carrier(workdir, CPU_GEN, rtp=False)
    low, high = (int(x) for x in args.media_ports.split("-"))
    dev = Sipedge(workdir, CPU_DUT, media_ports=(low, high),
                  extra_config=f'[[carriers]]\nuri = "{carrier.uri}"\npriority = 1\nweight = 100\n')
    recorder: subprocess.Popen[Any] | None = None
    try:
        carrier.start()
        dev.start()
        csv_path = workdir / "calls.csv"
        write_calls_csv(csv_path, provision_sipedge(dev, args.users, args.channels))
        sipp_args = dict(scenario=uac, target=dev.target, workdir=workdir, inf=csv_path,
                         extra_args=["-d", "2000", "-mi", "127.0.0.1", "-mp", str(UAC_MEDIA_PORT)],
                         recv_timeout_ms=8000)
        if args.warmup:
            run_sipp(dut="warmup", rate=args.rate, seconds=args.warmup, dut_pids=dev.pids(),
                     limit=max(200, args.rate * 14), **sipp_args)  # type: ignore[arg-type]
        pids = dev.pids()
        before = thread_cpu(pids)
        # one worker: the node is one process (API inline), the one to record
        workers = sorted({k[0] for k in before if k[1] == "worker"}) or sorted(
            {k[0] for k in before if k[1] == "node"})
        if args.py_spy:
            if not (Path(sys.executable).parent / "py-spy").exists():
                raise SystemExit("--py-spy needs py-spy: pip install -e '.[bench]' (make bench installs it)")
            recorder = subprocess.Popen(
                ["taskset", "-c", CPU_GEN, str(Path(sys.executable).parent / "py-spy"), "record", "--native",
                 "--format", "raw", "--rate", "200", "--duration", str(int(args.hold)),
                 "--pid", str(workers[0]), "--output", str(args.py_spy)],
                stdout=subprocess.DEVNULL, stderr=open(workdir / "py-spy.log", "wb"))
        elif args.perf:
            recorder = subprocess.Popen(
                ["taskset", "-c", CPU_GEN, "perf", "record", "-F", "499", "-g", "-p", str(workers[0]),
                 "-o", str(args.perf), "--", "sleep", str(int(args.hold))],
                stdout=subprocess.DEVNULL, stderr=open(workdir / "perf.log", "wb"))
        elif args.syscalls:
            if shutil.which("perf"):
                cmd = ["perf", "trace", "-s", "-p", str(workers[0]), "-o", str(workdir / "syscalls.txt"),
                       "--", "sleep", str(int(args.hold))]
            else:
                cmd = ["strace", "-c", "-f", "-p", str(workers[0]), "-o", str(workdir / "syscalls.txt")]
            recorder = subprocess.Popen(["taskset", "-c", CPU_GEN, *cmd], stdout=subprocess.DEVNULL,
                                        stderr=open(workdir / "syscalls.log", "wb"))
        res = run_sipp(dut="sipedge", rate=args.rate, seconds=args.hold, dut_pids=pids,
                       limit=max(200, args.rate * 14), **sipp_args)  # type: ignore[arg-type]
        after = thread_cpu(pids)
        if recorder is not None:
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.send_signal(2)
                recorder.wait(timeout=10)
        calls = max(1, res.successful)
        print(f"step: {args.rate}/s x {args.hold:.0f} s, {res.successful} calls, failed {res.failed}, "
              f"retransmissions {res.retransmissions}, passed {res.passed}, "
              f"node CPU {res.dut_cpu_s * 1e6 / calls:.0f} us/call, SIPp {res.sipp_cpu_s:.1f} s")
        print(f"{'process':<12}{'pid':>8} {'thread':<18}{'user us/call':>14}{'sys us/call':>13}"
              f"{'blocked/call':>14}")
        for key in sorted(after, key=lambda k: -(sum(after[k][:2]) - sum(before.get(k, (0.0, 0.0, 0))[:2]))):
            u0, s0, v0 = before.get(key, (0.0, 0.0, 0))
            u1, s1, v1 = after[key]
            if (u1 - u0) + (s1 - s0) <= 0:
                continue
            print(f"{key[1]:<12}{key[0]:>8} {key[3][:16]:<18}{(u1 - u0) * 1e6 / calls:>14.0f}"
                  f"{(s1 - s0) * 1e6 / calls:>13.0f}{(v1 - v0) / calls:>14.2f}")
        if args.py_spy and args.py_spy.exists():
            summarize_raw(args.py_spy, args.top)
        if args.syscalls:
            text = (workdir / "syscalls.txt").read_text(errors="replace") if (workdir / "syscalls.txt").exists() \
                else ""
            print(f"system calls of the worker over {calls} calls (raw, {workdir / 'syscalls.txt'}):")
            print(text[-6000:])
    finally:
        if recorder is not None and recorder.poll() is None:
            stop_tree(recorder, timeout=3)
        dev.stop()
        carrier.stop()
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def summarize_raw(path: Path, top: int) -> None:
    """Own time (leaf frames) and inclusive time per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(f"py-spy: {total} samples; own time")
    for f, n in own.most_common(top):
        print(f"  {n * 100 / total:5.1f} %  {f[:150]}")
    print("inclusive")
    for f, n in incl.most_common(top):
        print(f"  {n * 100 / total:5.1f} %  {f[:150]}")


if __name__ == "__main__":
    sys.exit(main())
