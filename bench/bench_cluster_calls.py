"""Calls of one profile through cluster nodes on a three-member NATS JetStream engine (issue 13).

    .venv/bin/python -m bench.bench_cluster_calls                      # both parts, BENCH.md ladder
    .venv/bin/python -m bench.bench_cluster_calls --part rate --rates 100,200 --hold 10 --repeats 1
    .venv/bin/python -m bench.bench_cluster_calls --part failover --leases 3 --trials 3

All on loopback, three real ``nats-server`` members (tests/cluster/natscluster.py) with their
monitoring port open, real ``sipedge serve`` nodes (bench/bench_register.Sipedge).

**rate**: SIPp signalling-only calls (``bench/sipp/uac-call-auth.xml`` without its rtp_stream:
INVITE -> 407 -> INVITE with credentials -> 180/200 -> ACK -> ``--call-seconds`` -> BYE; media still
anchored: the node opens its relay ports and rewrites the SDP) of ONE profile, SIPp as the carrier
(``uas-answer.xml``), through

- ``alone``: a node without ``[cluster]`` (the engine runs but nobody uses it);
- ``cluster1``: one cluster node: every call reserves its channel in the profile's journal through
  the node's agent and settles it there (docs/cluster.md "Channels across nodes");
- ``cluster2``: two cluster nodes (B started on a hot backup of A's store, so both know the profile),
  two SIPp PBX instances, each offering half of the rate to its node: two writers of one journal.

Flood protection is off on the nodes (``rate_limit = 0``, ``profile_rate_limit = 0``: one source and
one profile send every call) and the profile's ``channels`` are above what the rate keeps open, so the
ladder measures the call path, not a limit. The same offered rates ladder for each (``--hold`` s per
step, ``--repeats``, configurations alternating); a step passes with no failed call, SIPp exit 0 and
retransmissions < 1 % (run_sipp).
Per step: CPU per call of each process kind from /proc (the nodes' workers, their cluster agents,
their API processes and supervisors, the three nats-server members together, the SIPp instances),
engine round trips per call (messages the nodes' connections published to the engine, from the
members' ``/connz``: appends, catch-up reads, lease renewals, index and snapshot writes; and the
journal stream's new messages, the appends that landed: reserve + settle = 2 per call), call setup
time (SIPp's rtd from the first INVITE to the 200, per call with ``-trace_rtt``: p50 and p99).

**failover**: a profile of ``channels = 1``; one call through node B rings at the carrier (held, never
answered); at a random instant within a lease, SIGKILL of B's supervisor (its children die with it,
PR_SET_PDEATHSIG); from then, an authenticated INVITE to node A every ~100 ms (each refused 486 while
B's reservation holds the channel) until one reaches the carrier: time from the kill to that INVITE
at the carrier. B is restarted between trials (a new epoch; its workers settle the old call as
recovery, which the journal refuses as already settled). ``--trials`` per ``--leases`` value, a fresh
engine per lease value; median and max.

Pinning (2 cores): SIPp (PBXs and carrier) and the nats-server members on CPU 0, the sipedge nodes on
CPU 1 (``--engine-cpu`` moves the members). Every loop is bounded; every process started is stopped
by PID. JSON: bench/results/cluster_calls.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import csv
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
sys.path.insert(0, str(ROOT / "tests" / "sip"))
sys.path.insert(0, str(ROOT / "tests"))

from natscluster import NatsCluster  # noqa: E402
from natscluster import free_port as tcp_port  # noqa: E402

from bench.bench_calls import (  # noqa: E402
    CARRIER_IP,
    DEST,
    Carrier,
    provision_sipedge,
    strip_rtp,
    write_calls_csv,
)
from bench.bench_register import (  # noqa: E402
    CPU_DUT,
    CPU_GEN,
    DOMAIN,
    SIPP_DIR,
    Sipedge,
    StepResult,
    _stat,
    ensure_debs,
    free_port,
    ladder,
    log,
    run_sipp,
    spread,
    tool_version,
    tree_pids,
)
from bench.common import machine_info, package_version, write_result  # noqa: E402

JOURNAL_STREAM = "SIPEDGE_JOURNAL"
CONFIGS = ("alone", "cluster1", "cluster2")
MEDIA_A, MEDIA_B = (22000, 25999), (26000, 29999)   # bench_calls' relay range, split between the nodes


class MonitoredNats(NatsCluster):
    """The test engine with each member's HTTP monitoring port open (``/connz``, ``/varz``)."""

    def __init__(self, root: Path, *, cpu: str | None) -> None:
        super().__init__(root, wrap=[["taskset", "-c", cpu] if cpu is not None and shutil.which("taskset") else []
                                     for _ in range(3)])
        self.http_ports = [tcp_port() for _ in range(3)]

    def _conf(self, i: int) -> Path:
        conf = super()._conf(i)
        with conf.open("a") as f:
            f.write(f'http: "127.0.0.1:{self.http_ports[i]}"\n')
        return conf

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def client_msgs_in(self, prefix: str = "sipedge-") -> int:
        """Messages the engine received from the connections whose name starts with ``prefix``
        (each client is connected to one member), summed over the members."""
        total = 0
        for port in self.http_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/connz?limit=4096", timeout=5) as r:
                doc = json.load(r)
            total += sum(int(c.get("in_msgs", 0)) for c in doc.get("connections") or []
                         if str(c.get("name", "")).startswith(prefix))
        return total

    def journal_messages(self) -> int:
        """The journal stream's last sequence (every append that landed, from any writer)."""
        async def read() -> int:
            import nats

            nc = await nats.connect(servers=self.urls, connect_timeout=2, allow_reconnect=False)
            try:
                try:
                    info = await nc.jetstream(timeout=5).stream_info(JOURNAL_STREAM)
                except Exception:    # no journal yet: nothing appended
                    return 0
                return int(info.state.last_seq)
            finally:
                await nc.close()

        return asyncio.run(read())


# -- CPU per process kind --------------------------------------------------------------------

def process_kind(pid: int) -> str:
    """``worker``, ``agent``, ``api`` or ``supervisor`` for a node's process (edge/processes.py)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if b"edge.processes" in argv:
        role = argv[argv.index(b"edge.processes") + 1] if argv.index(b"edge.processes") + 1 < len(argv) else b""
        return {b"worker": "worker", b"cluster": "agent", b"api": "api"}.get(role, "other")
    return "supervisor"


def cpu_of(pids: list[int]) -> dict[int, float]:
    clk = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            out[pid] = (int(st[11]) + int(st[12])) / clk
    return out


class CpuSnapshot:
    """utime+stime of every node process (by kind) and of the engine members, at one instant."""

    def __init__(self, nodes: list[Sipedge], engine: MonitoredNats) -> None:
        self.kinds: dict[int, str] = {}
        for node in nodes:
            pids = node.pids()
            for pid in pids:
                # a node of one worker without [cluster] is one process: SIP and the API inline
                self.kinds[pid] = process_kind(pid) if len(pids) > 1 else "single"
        self.engine_pids = engine.pids()
        self.node_cpu = cpu_of(list(self.kinds))
        self.engine_cpu = sum(cpu_of(self.engine_pids).values())
        self.at = time.monotonic()

    def since(self, before: CpuSnapshot) -> dict[str, float]:
        """CPU seconds per kind between ``before`` and this snapshot (processes present in both)."""
        out: dict[str, float] = {"single": 0.0, "worker": 0.0, "agent": 0.0, "api": 0.0, "supervisor": 0.0}
        for pid, cpu in self.node_cpu.items():
            if pid in before.node_cpu:
                kind = self.kinds[pid]
                out[kind] = out.get(kind, 0.0) + cpu - before.node_cpu[pid]
        out["nats"] = self.engine_cpu - before.engine_cpu
        out["wall"] = self.at - before.at
        return out


# -- setup times (SIPp -trace_rtt) -----------------------------------------------------------

def read_rtts(paths: list[Path]) -> list[float]:
    """Per-call response times (ms) of rtd 1 from SIPp's ``*_rtt.csv`` files."""
    out: list[float] = []
    for path in paths:
        with path.open(newline="") as f:
            rows = list(csv.reader(f, delimiter=";"))
        if not rows:
            continue
        head = [h.strip() for h in rows[0]]   # Date_ms;response_time_ms;rtd_no (SIPp 3.6: whole ms)
        if "response_time_ms" not in head or "rtd_no" not in head:
            raise ValueError(f"{path}: not a SIPp rtt file (header {head})")
        col, rtd = head.index("response_time_ms"), head.index("rtd_no")
        for row in rows[1:]:
            try:
                if row[rtd].strip() == "1":
                    out.append(float(row[col]))
            except (IndexError, ValueError):
                continue
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- part 1: calls/s of one profile ---------------------------------------------------------------

class BenchNode(Sipedge):
    """bench_register's node with the per-profile flood protection off too: every call of this bench
    is of one profile, and its default (``[sip] profile_rate_limit``, 100 attempts/s a node) would be
    the ceiling measured, as ``rate_limit = 0`` already takes the per-source one away."""

    def write_config(self) -> None:
        super().write_config()
        text = self.config.read_text()
        assert "\nrate_limit = 0\n" in text, "bench_register's [sip] section changed"
        self.config.write_text(text.replace("\nrate_limit = 0\n", "\nrate_limit = 0\nprofile_rate_limit = 0\n", 1))


def node_config(carrier_uri: str, cluster: str = "") -> str:
    return f'[[carriers]]\nuri = "{carrier_uri}"\npriority = 1\nweight = 100\n' + cluster


def cluster_section(name: str, engine: MonitoredNats, lease: float) -> str:
    urls = ", ".join(f'"{u}"' for u in engine.urls)
    return f'[cluster]\nnode = "{name}"\nengine = [{urls}]\nlease_seconds = {lease:g}\n'


def backup_into(target: Sipedge, source: Sipedge) -> None:
    """``sipedge backup`` of the running ``source`` node into ``target``'s data directory."""
    subprocess.run([sys.executable, "-m", "edge.cli", "backup", str(target.data), "--config", str(source.config)],
                   check=True, capture_output=True, timeout=60, cwd=ROOT)


def start_nodes(config: str, workdir: Path, engine: MonitoredNats, carrier: Carrier, *, channels: int,
                lease: float, cpu: str | None) -> tuple[list[Sipedge], Path]:
    """The configuration's nodes, started, and the SIPp injection CSV of the one profile."""
    a_cluster = cluster_section("edge-a", engine, lease) if config != "alone" else ""
    a = BenchNode(workdir / config, cpu, media_ports=(MEDIA_A[0], MEDIA_A[1] + 1),
                extra_config=node_config(carrier.uri, a_cluster), name="edge-a")
    nodes = [a]
    try:
        a.start(timeout=60)
        csv_path = workdir / config / "calls.csv"
        write_calls_csv(csv_path, provision_sipedge(a, 1, channels))
        if config == "cluster2":
            b = BenchNode(workdir / config, cpu, media_ports=(MEDIA_B[0], MEDIA_B[1] + 1),
                        extra_config=node_config(carrier.uri, cluster_section("edge-b", engine, lease)),
                        name="edge-b")
            backup_into(b, a)
            nodes.append(b)
            b.start(timeout=60)
        return nodes, csv_path
    except BaseException:
        for n in nodes:
            n.stop()
        raise


def rate_step(rate: int, *, nodes: list[Sipedge], engine: MonitoredNats, carrier: Carrier, uac: Path,
              csv_path: Path, hold: float, call_seconds: float, workdir: Path) -> StepResult:
    """One step: SIPp PBX per node (the rate split evenly), all at once; the measures of the step."""
    share = [rate // len(nodes) + (1 if i < rate % len(nodes) else 0) for i in range(len(nodes))]
    rtt_before = set(workdir.glob("*_rtt.csv"))
    msgs0, journal0 = engine.client_msgs_in(), engine.journal_messages()
    cpu0 = CpuSnapshot(nodes, engine)
    carrier_cpu0 = sum(cpu_of(tree_pids(carrier.proc.pid)).values()) if carrier.proc else 0.0

    def one(i: int) -> StepResult:
        node = nodes[i]
        return run_sipp(dut=node.name, scenario=uac, target=node.target, rate=share[i], seconds=hold,
                        workdir=workdir, dut_pids=node.pids(), inf=csv_path,
                        limit=max(200, int(share[i] * (call_seconds + 5) * 2)),
                        extra_args=["-d", str(int(call_seconds * 1000)), "-trace_rtt", "-rtt_freq", "1"],
                        recv_timeout_ms=8000)

    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        parts = list(pool.map(one, range(len(nodes))))
    cpu1 = CpuSnapshot(nodes, engine)
    carrier_cpu1 = sum(cpu_of(tree_pids(carrier.proc.pid)).values()) if carrier.proc else 0.0
    msgs1, journal1 = engine.client_msgs_in(), engine.journal_messages()
    rtts = read_rtts(sorted(set(workdir.glob("*_rtt.csv")) - rtt_before))

    r = StepResult(dut="+".join(n.name for n in nodes), rate=rate, seconds=hold, offered=sum(p.offered for p in parts))
    r.successful = sum(p.successful for p in parts)
    r.failed = sum(p.failed for p in parts)
    r.retransmissions = sum(p.retransmissions for p in parts)
    r.timeouts = sum(p.timeouts for p in parts)
    r.sipp_rc = max((p.sipp_rc if p.sipp_rc is not None else 99) for p in parts)
    r.wall_s = max(p.wall_s for p in parts)
    r.sipp_cpu_s = sum(p.sipp_cpu_s for p in parts)
    r.passed = all(p.passed for p in parts)
    r.generator_limited = any(p.generator_limited for p in parts)
    r.note = "; ".join(f"{p.dut}: {p.note}" for p in parts if p.note)
    errors = [p.extra["first_error"] for p in parts if p.extra.get("first_error")]
    if errors:
        r.extra["first_error"] = errors[0]
    r.achieved_rate = r.successful / hold
    cpu = cpu1.since(cpu0)
    calls = max(1, r.successful)
    r.dut_cpu_s = sum(v for k, v in cpu.items() if k not in ("nats", "wall"))
    r.cpu_us_per_op = r.dut_cpu_s / calls * 1e6 if r.successful else None
    r.response_ms = statistics.fmean(rtts) if rtts else None
    r.extra.update({
        "cpu_us_per_call": {k: round(v / calls * 1e6, 1) for k, v in cpu.items() if k != "wall"},
        "cpu_us_per_call_sipp": round((r.sipp_cpu_s + carrier_cpu1 - carrier_cpu0) / calls * 1e6, 1),
        # CPU 0 holds SIPp and the engine: how busy it was says whether the generator's core was a ceiling
        "cpu0_busy": round((r.sipp_cpu_s + carrier_cpu1 - carrier_cpu0 + cpu["nats"]) / max(cpu["wall"], 1e-6), 3),
        "cpu1_busy": round(r.dut_cpu_s / max(cpu["wall"], 1e-6), 3),
        "engine_msgs_per_call": round((msgs1 - msgs0) / calls, 3),
        "journal_appends_per_call": round((journal1 - journal0) / calls, 3),
        "setup_ms_p50": pct(rtts, 0.50), "setup_ms_p99": pct(rtts, 0.99), "setup_samples": len(rtts),
        "rates_per_node": share,
    })
    return r


def bench_rates(args: argparse.Namespace, workdir: Path, engine: MonitoredNats) -> dict[str, Any]:
    uac = strip_rtp(SIPP_DIR / "uac-call-auth.xml", workdir)
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for config in (configs if rep % 2 == 0 else list(reversed(configs))):
            log(f"rate: repeat {rep + 1}/{args.repeats}: {config}")
            carrier = Carrier(workdir, CPU_GEN if not args.no_pin else None, rtp=False)
            carrier.start()
            nodes: list[Sipedge] = []
            try:
                nodes, csv_path = start_nodes(config, workdir / f"r{rep}", engine, carrier,
                                              channels=args.channels, lease=args.rate_lease,
                                              cpu=None if args.no_pin else CPU_DUT)
                time.sleep(args.settle)   # the agents' leases taken, their startup CPU spent

                def step(rate: int, nodes: list[Sipedge] = nodes, csv_path: Path = csv_path,
                         carrier: Carrier = carrier) -> StepResult:
                    return rate_step(rate, nodes=nodes, engine=engine, carrier=carrier, uac=uac,
                                     csv_path=csv_path, hold=args.hold, call_seconds=args.call_seconds,
                                     workdir=workdir)

                steps, best, first_fail = ladder(args.rate_list, step, log_prefix=f"  {config:>8}")
                for s in steps:
                    log(f"  {config:>8} {s.rate:>5}/s: CPU us/call {s.extra['cpu_us_per_call']} "
                        f"engine msgs/call {s.extra['engine_msgs_per_call']} journal appends/call "
                        f"{s.extra['journal_appends_per_call']} setup p50/p99 {s.extra['setup_ms_p50']}/"
                        f"{s.extra['setup_ms_p99']} ms cpu0 {s.extra['cpu0_busy']} cpu1 {s.extra['cpu1_busy']}")
                runs[config].append({"steps": [s.as_dict() for s in steps], "max_rate": best,
                                     "first_failing_rate": first_fail})
            except Exception as exc:
                log(f"{config}: {exc}")
                runs[config].append({"steps": [], "max_rate": None, "first_failing_rate": None,
                                     "error": str(exc)[:2000]})
            finally:
                for n in nodes:
                    n.stop()
                carrier.stop()
            time.sleep(1.0)
    summary: dict[str, Any] = {}
    for config, reps in runs.items():
        by_rate: dict[int, list[dict[str, Any]]] = {}
        for rep_run in reps:
            for s in rep_run["steps"]:
                if s["passed"]:
                    by_rate.setdefault(s["rate"], []).append(s)

        def med(key: str, sub: str | None = None, v: dict[int, list[dict[str, Any]]] = by_rate) -> dict[str, Any]:
            return {str(rate): spread([(s["extra"][key][sub] if sub else s["extra"][key]) for s in steps])["median"]
                    for rate, steps in sorted(v.items())}

        summary[config] = {
            "max_rate": spread([r["max_rate"] or 0 for r in reps]),
            "first_failing_rate": spread([r["first_failing_rate"] for r in reps if r["first_failing_rate"]]),
            "cpu_us_per_call": {kind: med("cpu_us_per_call", kind)
                                for kind in ("single", "worker", "agent", "api", "supervisor", "nats")},
            "cpu_us_per_call_sipp": med("cpu_us_per_call_sipp"),
            "engine_msgs_per_call": med("engine_msgs_per_call"),
            "journal_appends_per_call": med("journal_appends_per_call"),
            "setup_ms_p50": med("setup_ms_p50"), "setup_ms_p99": med("setup_ms_p99"),
            "cpu0_busy": med("cpu0_busy"), "cpu1_busy": med("cpu1_busy"),
        }
    return {"runs": runs, "summary": summary}


# -- part 2: failover time -------------------------------------------------------------------------

class HoldingCarrier:
    """The carrier for the failover trials: rings (180) every INVITE, answers none; ``release`` ends
    a ringing call with 486 (the edge ACKs it and gives the channel back)."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((CARRIER_IP, free_port(CARRIER_IP)))
        self.port = self.sock.getsockname()[1]
        self.ringing: dict[str, tuple[Any, tuple[str, int]]] = {}

    @property
    def uri(self) -> str:
        return f"sip:{CARRIER_IP}:{self.port}"

    def wait_invite(self, timeout: float) -> tuple[float, Any, tuple[str, int]] | None:
        """The next new INVITE within ``timeout`` (rung at once): (arrival instant, message, source)."""
        from edge.sip import build_response, parse

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                return None
            at = time.monotonic()
            msg = parse(data)
            if not msg.is_request:
                continue
            if msg.method == "INVITE" and msg.call_id not in self.ringing:
                self.ringing[msg.call_id] = (msg, addr)
                self.sock.sendto(build_response(msg, 180, to_tag="ring"), addr)
                return at, msg, addr
            if msg.method == "CANCEL":
                self.sock.sendto(build_response(msg, 200), addr)
        return None

    def release(self, call_id: str) -> None:
        from edge.sip import build_response

        found = self.ringing.pop(call_id, None)
        if found is not None:
            self.sock.sendto(build_response(found[0], 486, to_tag="ring"), found[1])

    def close(self) -> None:
        self.sock.close()


class Caller:
    """A PBX socket to one node (tests/sip/test_calls_raw.Pbx) that also ACKs the refusals it gets."""

    def __init__(self, node: Sipedge) -> None:
        from test_calls_raw import Pbx

        self.pbx = Pbx(SimpleNamespace(sip_port=node.port))   # Pbx reads only the node's SIP port

    def invite(self, prof: dict[str, Any]) -> dict[str, Any] | None:
        """INVITE, 407, INVITE with credentials sent; None when the node did not challenge."""
        try:
            d = self.pbx.invite(prof, DEST)
        except (TimeoutError, OSError):
            return None
        return d if d["first"].status == 407 else None

    def drain(self, dialogs: dict[str, dict[str, Any]]) -> list[int]:
        """Read what came back, ACK each final refusal (else the node retransmits it for 32 s)."""
        statuses = []
        self.pbx.sock.settimeout(0)
        while True:
            try:
                msg = self.pbx.recv(0)
            except (BlockingIOError, TimeoutError, OSError):
                break
            if msg.is_request or msg.status < 300:
                continue
            d = dialogs.get(msg.call_id)
            if d is not None:
                self.pbx.send(self.pbx.request("ACK", d["ruri"], from_user=d["user"], to_user=DEST,
                                               call_id=d["call_id"], cseq=2, from_tag=d["from_tag"],
                                               to_tag=msg.to_tag, branch=d["branch"]))
                statuses.append(msg.status)
        return statuses

    def close(self) -> None:
        self.pbx.close()


def journal_channels(engine: MonitoredNats, profile_id: str) -> int:
    from edge.cluster.engine import Engine
    from edge.cluster.journal import ProfileJournal
    from edge.config import ClusterConfig

    async def read() -> int:
        eng = await Engine.connect(ClusterConfig(node="probe", engine=engine.urls, lease_seconds=3), name="probe")
        try:
            return (await ProfileJournal.open(eng, profile_id)).state.channels_in_use
        finally:
            await eng.nc.close()

    return asyncio.run(read())


def until(cond: Any, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


def forget_dead(node: Sipedge) -> None:
    """After the SIGKILL of ``node``'s supervisor: wait for its children to go (PR_SET_PDEATHSIG), then
    forget their pids, so that no later stop can signal a pid the system gave to another process."""
    def gone(pid: int) -> bool:
        st = _stat(pid)
        return st is None or st[0] in ("Z", "X")

    if not until(lambda: all(gone(p) for p in node._known), 10, 0.05):
        raise RuntimeError(f"{node.name}: children still alive 10 s after the supervisor's SIGKILL")
    node._known = []
    node.proc = None


def failover_trial(n: int, *, a: Sipedge, b: Sipedge, prof: dict[str, Any], carrier: HoldingCarrier,
                   engine: MonitoredNats, lease: float, rng: random.Random, interval: float) -> dict[str, Any]:
    if not until(lambda: journal_channels(engine, prof["id"]) == 0, 30, 0.5):
        raise RuntimeError(f"trial {n}: the profile's channel is not free before the trial")
    via_b, via_a = Caller(b), Caller(a)
    try:
        # one call through B ringing at the carrier (B may refuse 503 until its agent holds its lease)
        held = None
        deadline = time.monotonic() + 40
        while held is None and time.monotonic() < deadline:
            d = via_b.invite(prof)
            got = carrier.wait_invite(1.0) if d is not None else None
            if got is not None and got[2][1] != a.port:
                held = got[1].call_id
            else:
                via_b.drain({d["call_id"]: d} if d else {})
                time.sleep(0.5)
        if held is None:
            raise RuntimeError(f"trial {n}: no call through node B reached the carrier in 40 s")
        phase = rng.uniform(0, lease)
        time.sleep(phase)   # the death at a random point of B's renewal and the sweep periods
        assert b.proc is not None
        killed = time.monotonic()
        os.kill(b.proc.pid, signal.SIGKILL)
        b.proc.wait(10)
        attempts, refusals, dialogs = 0, [], {}
        admitted = None
        while admitted is None and time.monotonic() - killed < 60:
            sent = time.monotonic()
            d = via_a.invite(prof)
            attempts += 1
            if d is not None:
                dialogs[d["call_id"]] = d
            got = carrier.wait_invite(max(0.0, interval - (time.monotonic() - sent)))
            refusals += via_a.drain(dialogs)
            if got is not None:
                admitted = got
        if admitted is None:
            raise RuntimeError(f"trial {n}: node A admitted nothing within 60 s of the kill")
        carrier.release(admitted[1].call_id)
        carrier.ringing.pop(held, None)
        time.sleep(0.3)
        via_a.drain(dialogs)
        return {"admitted_after": admitted[0] - killed, "attempts": attempts, "death_phase_s": phase,
                "refusals": {str(s): refusals.count(s) for s in sorted(set(refusals))}}
    finally:
        via_a.close()
        via_b.close()


def bench_failover(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    out: dict[str, Any] = {}
    cpu = None if args.no_pin else CPU_DUT
    for lease in [float(x) for x in args.leases.split(",") if x.strip()]:
        log(f"failover: lease {lease:g} s, {args.trials} trials")
        root = workdir / f"failover-{lease:g}"
        engine = MonitoredNats(root / "nats", cpu=None if args.no_pin else args.engine_cpu)
        carrier = HoldingCarrier()
        a = b = None
        trials: list[dict[str, Any]] = []
        try:
            engine.start()
            engine.wait_ready()
            a = BenchNode(root, cpu, media_ports=(MEDIA_A[0], MEDIA_A[1] + 1), name="edge-a",
                        extra_config=node_config(carrier.uri, cluster_section("edge-a", engine, lease)))
            a.start(timeout=60)
            with a.client() as api:
                api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200"}]}).raise_for_status()
            prof = a.provision_profiles(1, channels=1, credit="100.00")[0]
            b = BenchNode(root, cpu, media_ports=(MEDIA_B[0], MEDIA_B[1] + 1), name="edge-b",
                        extra_config=node_config(carrier.uri, cluster_section("edge-b", engine, lease)))
            backup_into(b, a)
            for n in range(args.trials):
                if b.proc is not None and b.proc.poll() is not None:
                    forget_dead(b)      # killed by the trial before
                if b.proc is None:
                    b.start(timeout=60)
                t = failover_trial(n, a=a, b=b, prof=prof, carrier=carrier, engine=engine, lease=lease,
                                   rng=rng, interval=args.interval)
                trials.append(t)
                log(f"  lease {lease:g} s trial {n + 1}: admitted by A {t['admitted_after']:.2f} s after the kill "
                    f"({t['attempts']} INVITEs, refusals {t['refusals']})")
        except Exception as exc:
            log(f"failover lease {lease:g}: {exc}")
            out[f"{lease:g}"] = {"trials": trials, "error": str(exc)[:2000]}
        finally:
            for node in (b, a):
                if node is not None:
                    node.stop()
            carrier.close()
            engine.stop()
        times = [t["admitted_after"] for t in trials]
        out.setdefault(f"{lease:g}", {"trials": trials})
        out[f"{lease:g}"].update({
            "lease_seconds": lease, "n": len(times),
            "median_s": statistics.median(times) if times else None, "max_s": max(times) if times else None,
            "min_s": min(times) if times else None,
            "median_over_lease": statistics.median(times) / lease if times else None})
    return out


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("sipedge.cluster").setLevel(logging.ERROR)   # the probes' connect/close lines
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("rate", "failover", "both"), default="both")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="of alone,cluster1,cluster2")
    ap.add_argument("--rates", default="100,200,300,400", help="offered calls/s (in total, over the nodes)")
    ap.add_argument("--hold", type=float, default=15.0, help="seconds per step")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--call-seconds", type=float, default=0.5, help="time between ACK and BYE (SIPp -d)")
    ap.add_argument("--channels", type=int, default=300,
                    help="the profile's channels: above rate x (call + setup) seconds, so the limit is never hit")
    ap.add_argument("--rate-lease", type=float, default=5.0, help="lease_seconds of the rate part's cluster nodes")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between the nodes' start and the ladder")
    ap.add_argument("--leases", default="3,5", help="lease_seconds values of the failover part")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between INVITEs to node A")
    ap.add_argument("--engine-cpu", default=CPU_GEN, help="CPU of the nats-server members (default: SIPp's)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--output", default="cluster_calls.json")
    args = ap.parse_args(argv)
    args.rate_list = [int(x) for x in args.rates.split(",") if x.strip()]
    if shutil.which("nats-server") is None:
        print("Debian nats-server is needed (make system-deps)", file=sys.stderr)
        return 2
    ensure_debs({"sipp": "sip-tester"})

    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-calls-"))
    log(f"work dir: {workdir}")
    result: dict[str, Any] = {
        "bench": "cluster_calls", "machine": machine_info(),
        "tools": {"sipp": tool_version(["sipp", "-v"]), "nats-server": tool_version(["nats-server", "--version"]),
                  "nats-py": package_version("nats-py")},
        "method": {"configs": args.configs, "rates": args.rate_list, "hold_s": args.hold, "repeats": args.repeats,
                   "call_seconds": args.call_seconds, "channels": args.channels, "rate_lease_s": args.rate_lease,
                   "profiles": 1, "rtp": False, "domain": DOMAIN,
                   "pass": "0 failed, SIPp rc 0, retrans < 1%", "uac": "bench/sipp/uac-call-auth.xml (no rtp_stream)",
                   "uas": "bench/sipp/uas-answer.xml (no rtp_stream)", "pinned": not args.no_pin,
                   "cpu_sipp": CPU_GEN, "cpu_nodes": CPU_DUT, "cpu_engine": args.engine_cpu,
                   "failover": {"leases": args.leases, "trials": args.trials, "interval_s": args.interval,
                                "channels": 1, "seed": args.seed},
                   "command": "python -m bench.bench_cluster_calls " + " ".join(
                       argv if argv is not None else sys.argv[1:])},
    }
    try:
        if args.part in ("rate", "both"):
            engine = MonitoredNats(workdir / "nats", cpu=None if args.no_pin else args.engine_cpu)
            try:
                engine.start()
                engine.wait_ready()
                result["rate"] = bench_rates(args, workdir, engine)
            finally:
                engine.stop()
        if args.part in ("failover", "both"):
            result["failover"] = bench_failover(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    path = write_result(args.output, result)
    log(f"wrote {path}")
    if "rate" in result:
        for config, s in result["rate"]["summary"].items():
            print(f"{config:<9} max calls/s {s['max_rate']}  CPU us/call {s['cpu_us_per_call']}  "
                  f"engine msgs/call {s['engine_msgs_per_call']}  "
                  f"journal appends/call {s['journal_appends_per_call']}  "
                  f"setup p50 {s['setup_ms_p50']} p99 {s['setup_ms_p99']} ms")
    for lease, f in (result.get("failover") or {}).items():
        print(f"failover lease {lease} s: median {f['median_s']} max {f['max_s']} over {f['n']} trials"
              + (f"  error: {f['error']}" if f.get("error") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
