"""Authenticated REGISTER rate: sipedge side by side with Kamailio, driven by SIPp.

    .venv/bin/python -m bench.bench_register            # BENCH.md ladder: 20 s steps, 3 repeats
    .venv/bin/python -m bench.bench_register --quick    # 5 s steps, 1 repeat (~2-4 min)
    .venv/bin/python -m bench.bench_register --only kamailio --rates 1000,2000

Job (the same for both): SIPp ``bench/sipp/uac-register-auth.xml`` -- REGISTER -> 401
digest challenge -> REGISTER with Authorization (MD5, qop=auth) -> 200 -- for N users
taken in turn from an injection CSV, over UDP on loopback.

- ``kamailio``: Debian ``kamailio`` with ``bench/kamailio/register.cfg`` (auth + auth_db
  on db_text tables the script writes, registrar + usrloc in memory), 2 UDP workers.
- ``sipedge``: ``python -m edge.cli serve`` with a temporary config and store; the N
  profiles are provisioned through the control API, and their generated SIP usernames
  and passwords make the CSV.

Method (BENCH.md, RFC 7501/7502 in spirit): the offered rate steps up a ladder, each
step held ``--hold`` seconds; a step passes with zero failed registrations, SIPp exit 0
and retransmissions under 1 % of the registrations (no retransmission storm). Result per
device: the highest passing step and the first failing one; CPU seconds per registration
of the device's whole process tree (utime+stime from /proc/<pid>/stat, all processes and
threads); SIPp on CPU 0 and the device on CPU 1 (taskset). Devices alternate order per
repeat; medians with [min..max]; ratios sipedge/kamailio. JSON: bench/results/register.json.

This file also holds the SIPp/process machinery ``bench/bench_calls.py`` reuses. Loopback
only; every process started is stopped by PID (``stop_tree``), every wait is bounded.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIPP_DIR = HERE / "sipp"
KAM_DIR = HERE / "kamailio"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
NPROC = os.cpu_count() or 1
CPU_GEN, CPU_DUT = ("0", "1") if NPROC >= 2 else ("0", "0")
DOMAIN = "sip.edge.test"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- installing the peers ---------------------------------------------------------------

def ensure_debs(binaries: dict[str, str]) -> None:
    """``{binary: debian package}``: apt-get install the packages of missing binaries."""
    missing = sorted({pkg for exe, pkg in binaries.items() if shutil.which(exe) is None})
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, timeout=1200,
                   stdout=subprocess.DEVNULL)
    still = [exe for exe in binaries if shutil.which(exe) is None]
    if still:
        raise SystemExit(f"still missing after install: {still}")


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in (out.stdout + out.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


# -- ports and readiness ----------------------------------------------------------------

SIP_PORT_RANGE = (15000, 19999)  # below the kernel's ephemeral range and the RTP benches' port ranges


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP, from ``SIP_PORT_RANGE``: ports from the ephemeral
    range can be a port another bench on this shared machine is blasting RTP at."""
    import random

    for _ in range(200):
        port = random.randint(*SIP_PORT_RANGE)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                s.bind((host, port))
                t.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def sip_options_ping(host: str, port: int, timeout: float = 1.0, src: str = "127.0.0.1") -> int | None:
    """Send one OPTIONS over UDP; the status code of the answer, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(timeout)
        lport = s.getsockname()[1]
        branch = "z9hG4bK" + uuid.uuid4().hex[:16]
        msg = (f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP {src}:{lport};branch={branch};rport\r\n"
               f"From: <sip:ping@{DOMAIN}>;tag={uuid.uuid4().hex[:8]}\r\n"
               f"To: <sip:{host}:{port}>\r\nCall-ID: {uuid.uuid4().hex}@bench\r\nCSeq: 1 OPTIONS\r\n"
               f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        s.sendto(msg.encode(), (host, port))
        try:
            data = s.recv(65535)
        except OSError:
            return None
    parts = data.split(b" ", 2)
    try:
        return int(parts[1]) if data.startswith(b"SIP/2.0") else None
    except (IndexError, ValueError):
        return None


def wait_sip(host: str, port: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = sip_options_ping(host, port, 0.5)
        if code is not None:
            return code
        time.sleep(0.2)
    return None


# -- process trees: CPU and memory from /proc -------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces: split after the closing parenthesis
    return raw[raw.rindex(")") + 2:].split()


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (one /proc scan)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is not None:
            children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(pids: list[int]) -> float:
    """utime + stime of the processes (and their threads), in seconds."""
    total = 0
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            total += int(st[11]) + int(st[12])  # fields 14, 15 of /proc/pid/stat
    return total / CLK_TCK


def tree_rss(pids: list[int]) -> int:
    """Resident set size of the processes, bytes (shared pages counted per process,
    as `ps` does: Kamailio's shm shows in every child, so use deltas, not absolutes)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def tree_pss(pids: list[int]) -> int:
    """Proportional set size (shared pages split between sharers), bytes; falls back to RSS."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            return tree_rss(pids)
    return total


def udp_rcvbuf_errors() -> int:
    """System-wide UDP receive-buffer drops (/proc/net/snmp). Shared by every process on
    the machine, so a step's delta is a hint (drops happened somewhere), not a verdict."""
    try:
        lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return -1


def stop_tree(proc: subprocess.Popen[Any] | None, known: list[int] | None = None, timeout: float = 10.0) -> None:
    """SIGTERM the root, wait, then SIGKILL the root and any known descendant still alive."""
    if proc is None:
        return
    pids = set(known or [])
    if proc.poll() is None:
        pids.update(tree_pids(proc.pid))
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    for pid in sorted(pids):
        if pid == proc.pid and proc.poll() is not None:
            continue
        st = _stat(pid)
        if st is None or st[0] == "Z":
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def pinned(cpu: str | None, cmd: list[str]) -> list[str]:
    return (["taskset", "-c", cpu] if cpu is not None and shutil.which("taskset") else []) + cmd


# -- SIPp steps -------------------------------------------------------------------------

@dataclass
class StepResult:
    """One SIPp run at one offered rate against one device under test."""
    dut: str
    rate: int
    seconds: float
    offered: int
    successful: int = 0
    failed: int = 0
    retransmissions: int = 0
    dead_msgs: int = 0
    out_of_call_msgs: int = 0
    timeouts: int = 0
    sipp_rc: int | None = None
    wall_s: float = 0.0
    dut_cpu_s: float = 0.0
    sipp_cpu_s: float = 0.0
    cpu_us_per_op: float | None = None
    response_ms: float | None = None
    achieved_rate: float = 0.0
    passed: bool = False
    generator_limited: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hms_to_ms(value: str) -> float | None:
    """SIPp's ``HH:MM:SS:uuuuuu`` (response times) -> milliseconds."""
    try:
        parts = value.split(":")
        h, m, s = int(parts[0]), int(parts[1]), int(parts[2])
        us = int(parts[3]) if len(parts) > 3 else 0
        return (h * 3600 + m * 60 + s) * 1000.0 + us / 1000.0
    except (ValueError, IndexError):
        return None


def read_sipp_stats(path: Path) -> dict[str, str]:
    """The last row of a SIPp ``-stf`` CSV as {column: value}."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=";") if r]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))  # a last row cut short yields the columns it has


def _int(stats: dict[str, str], key: str) -> int:
    try:
        return int(float(stats.get(key, "0") or 0))
    except ValueError:
        return 0


def run_sipp(*, dut: str, scenario: Path, target: str, rate: int, seconds: float, workdir: Path,
             dut_pids: list[int], inf: Path | None = None, extra_args: list[str] | None = None,
             limit: int | None = None, recv_timeout_ms: int = 5000, storm_ratio: float = 0.01,
             local_ip: str = "127.0.0.1", sipp_cpu: str | None = CPU_GEN,
             rtp_args: list[str] | None = None, background: list[subprocess.Popen[Any]] | None = None,
             sample_rss: bool = False) -> StepResult:
    """Run SIPp as UAC at ``rate`` calls/s for ``seconds`` and measure the DUT tree.

    Pass: every call successful, none failed, retransmissions below ``storm_ratio`` of the
    calls (RFC 7501's "no retransmission storm"), SIPp exit 0.
    """
    offered = max(1, int(round(rate * seconds)))
    tag = f"{dut}-{rate}-{int(time.time() * 1000)}"
    stf = workdir / f"stat-{tag}.csv"
    err = workdir / f"err-{tag}.log"
    lport = free_port(local_ip)
    cmd = ["sipp", target, "-sf", str(scenario), "-r", str(rate), "-rp", "1000", "-m", str(offered),
           "-l", str(limit or max(100, rate * 4)), "-i", local_ip, "-p", str(lport), "-nostdin", "-nd",
           "-recv_timeout", str(recv_timeout_ms), "-timeout", f"{int(seconds + 30)}s", "-timeout_error",
           "-trace_stat", "-stf", str(stf), "-fd", "1", "-buff_size", str(4 * 1024 * 1024),
           "-trace_err", "-error_file", str(err), "-error_overwrite", "true", "-max_socket", "4096"]
    if "-mp" not in (extra_args or []):
        # SIPp binds its media port (default 6000/6002) even without media: give each run
        # its own, or two SIPp instances on this shared machine collide
        mport = free_port(local_ip) & ~1
        cmd += ["-mp", str(mport)]
    if inf is not None:
        cmd += ["-inf", str(inf)]
    cmd += (rtp_args or []) + (extra_args or [])
    res = StepResult(dut=dut, rate=rate, seconds=seconds, offered=offered)
    cpu0 = tree_cpu(dut_pids)
    drops0 = udp_rcvbuf_errors()
    mem_peak = 0
    mem0 = tree_pss(dut_pids) if sample_rss else 0
    t0 = time.monotonic()
    proc = subprocess.Popen(pinned(sipp_cpu, cmd), cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"sipp-{tag}.stderr", "wb"))
    sipp_cpu_s = 0.0
    try:
        deadline = t0 + seconds + 45
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            sipp_cpu_s = max(sipp_cpu_s, tree_cpu([proc.pid]))
            if sample_rss:
                mem_peak = max(mem_peak, tree_pss(dut_pids))
        if proc.poll() is None:
            res.note = "sipp did not finish in time (killed)"
    finally:
        stop_tree(proc, timeout=3)
    res.wall_s = time.monotonic() - t0
    res.dut_cpu_s = tree_cpu(dut_pids) - cpu0
    res.extra["udp_rcvbuf_errors_system_wide"] = udp_rcvbuf_errors() - drops0
    res.sipp_cpu_s = sipp_cpu_s
    res.sipp_rc = proc.returncode
    stats = read_sipp_stats(stf)
    if not stats:
        res.note = (res.note + "; " if res.note else "") + "no SIPp statistics (see " + str(err) + ")"
        res.failed = offered
        return res
    res.successful = _int(stats, "SuccessfulCall(C)")
    res.failed = _int(stats, "FailedCall(C)")
    res.retransmissions = _int(stats, "Retransmissions(C)")
    res.dead_msgs = _int(stats, "DeadCallMsgs(C)")
    res.out_of_call_msgs = _int(stats, "OutOfCallMsgs(C)")
    res.timeouts = _int(stats, "FailedMaxUDPRetrans(C)")  # calls that gave up retransmitting
    res.response_ms = _hms_to_ms(stats.get("ResponseTime1(C)", ""))
    unfinished = offered - res.successful - res.failed
    if unfinished > 0:
        res.failed += unfinished
        res.note = (res.note + "; " if res.note else "") + f"{unfinished} calls never completed"
    if res.failed and err.exists():  # the first thing SIPp complained about, for the report
        text = err.read_text(errors="replace")
        lines = [ln.split(": ", 2)[-1] for ln in text.splitlines() if "\t" in ln and ": " in ln]
        if lines:
            res.extra["first_error"] = lines[0][:300]
    res.achieved_rate = res.successful / seconds if seconds else 0.0
    if res.successful:
        res.cpu_us_per_op = res.dut_cpu_s / res.successful * 1e6
    # SIPp at ~100 % of its core while the DUT still has headroom: the generator is the limit
    res.generator_limited = sipp_cpu_s / max(res.wall_s, 1e-6) > 0.9
    res.passed = (res.failed == 0 and res.successful == offered and res.sipp_rc == 0
                  and res.retransmissions <= storm_ratio * offered)
    if sample_rss:  # proportional set size: Kamailio's shm is shared by all its children
        res.extra["pss_before"] = mem0
        res.extra["pss_peak"] = mem_peak
    if not res.passed and res.failed == 0 and res.retransmissions > storm_ratio * offered:
        res.note = (res.note + "; " if res.note else "") + "retransmission storm"
    return res


def spread(values: list[float]) -> dict[str, float | int | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ladder(rates: list[int], step: Any, *, log_prefix: str) -> tuple[list[StepResult], int | None, int | None]:
    """Run ``step(rate)`` up the ladder; stop at the first failure.

    :returns: (steps, highest passing rate, first failing rate)
    """
    steps: list[StepResult] = []
    best = first_fail = None
    for rate in rates:
        r = step(rate)
        steps.append(r)
        cpu = f"{r.cpu_us_per_op:.0f} us CPU/op" if r.cpu_us_per_op else "-"
        log(f"{log_prefix} {rate:>6}/s: ok={r.successful} failed={r.failed} retrans={r.retransmissions} "
            f"{cpu} rtt={r.response_ms if r.response_ms is not None else '-'} ms "
            f"{'PASS' if r.passed else 'FAIL'}{' (generator-limited)' if r.generator_limited else ''}"
            f"{' ' + r.note if r.note else ''}"
            f"{' [sipp: ' + r.extra['first_error'] + ']' if r.extra.get('first_error') else ''}")
        if r.passed:
            best = rate
        else:
            first_fail = rate
            break
        time.sleep(1.0)
    return steps, best, first_fail


# -- devices under test -------------------------------------------------------------------

class Device:
    """A device under test: ``start()`` -> SIP port ready, ``pids()``, ``stop()``."""

    name = "device"

    def __init__(self, workdir: Path, cpu: str | None) -> None:
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cpu = cpu
        self.proc: subprocess.Popen[Any] | None = None
        self.port = free_port()
        self._known: list[int] = []
        self.log_path = self.workdir / "device.log"
        self.error = ""

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        self._known = tree_pids(self.proc.pid)
        return self._known

    def stop(self) -> None:
        stop_tree(self.proc, self._known)
        self.proc = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class Kamailio(Device):
    name = "kamailio"

    # Kamailio at its best: the TLSF allocator with room to spare (q_malloc, the default, is
    # 2.4-4.3x slower per call here), and 4 children per listener, its own default.
    ALLOC = ("-x", "tlsf", "-m", "4096", "-M", "64")

    def __init__(self, workdir: Path, cpu: str | None, *, cfg: Path, children: int = 4,
                 defines: dict[str, str] | None = None) -> None:
        super().__init__(workdir, cpu)
        self.cfg = cfg
        self.children = children
        self.defines = defines or {}
        self.db = self.workdir / "db"
        self.db.mkdir(exist_ok=True)

    def write_users(self, users: list[tuple[str, str]]) -> None:
        """db_text tables: ``subscriber`` (plain passwords, HA1 computed by auth_db) + ``version``."""
        with (self.db / "subscriber").open("w") as f:
            f.write("username(str) domain(str) password(str)\n")
            for user, pw in users:
                f.write(f"{user}:{DOMAIN}:{pw}\n")
        (self.db / "version").write_text("table_name(str) table_version(int)\nsubscriber:7\nlocation:9\n")

    def start(self, timeout: float = 20.0) -> None:
        run = self.workdir / "run"
        run.mkdir(exist_ok=True)
        pidfile = run / "kamailio.pid"
        defines = {"DBURL": f'"text://{self.db}"', "SIPDOMAIN": f'"{DOMAIN}"', "CHILDREN": str(self.children),
                   **self.defines}
        cmd = ["kamailio", "-f", str(self.cfg), "-DD", "-E", "-l", f"udp:127.0.0.1:{self.port}",
               "-P", str(pidfile), "-Y", str(run), *self.ALLOC]
        for k, v in defines.items():
            cmd += ["-A", f"{k}={v}"]
        self.proc = subprocess.Popen(pinned(self.cpu, cmd), stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "ab"))
        code = wait_sip("127.0.0.1", self.port, timeout)
        if code is None:
            self.stop()
            raise RuntimeError(f"kamailio did not answer OPTIONS; log: {self.log_path}\n"
                               + self.log_path.read_text()[-2000:])
        self.pids()


class Sipedge(Device):
    name = "sipedge"
    TOKEN = "bench-admin-token-0123456789abcdef"

    def __init__(self, workdir: Path, cpu: str | None, *, extra_config: str = "",
                 media_ports: tuple[int, int] = (22000, 29999), checkout: Path | None = None,
                 name: str = "sipedge") -> None:
        self.name = name
        # checkout: another build of sipedge (a worktree of an older commit with its own .venv)
        self.checkout = checkout
        super().__init__(workdir, cpu)
        self.media_ports = media_ports
        self.api_port = free_port()
        self.data = self.workdir / "data"
        self.config = self.workdir / "sipedge.toml"
        self.extra_config = extra_config
        self.base = f"http://127.0.0.1:{self.api_port}"

    def write_config(self) -> None:
        # Flood protection off: one SIPp source sends thousands of requests/s on purpose.
        # MD5 only: SIPp 3.6 computes MD5 digests only and answers the first challenge it
        # sees, while sipedge offers SHA-256 first by default (RFC 8760) -- and MD5 is what
        # Kamailio is measured with.
        self.config.write_text(
            f'[sip]\nlisten = ["udp:127.0.0.1:{self.port}"]\ndomain = "{DOMAIN}"\n'
            f'rate_limit = 0\nauth_block_threshold = 1000000\ndigest_algorithms = ["MD5"]\n'
            f'[media]\naddress = "127.0.0.1"\nports = [{self.media_ports[0]}, {self.media_ports[1]}]\n'
            # ports come back after 0.5 s, as rtpengine's run with --delete-delay=0 reuses them at once
            f'quiet_period = 0.5\n'
            f'[api]\nlisten = "127.0.0.1:{self.api_port}"\ntoken = "{self.TOKEN}"\n'
            f'[storage]\npath = "{self.data}"\nmap_size_mb = 1024\n'
            f'[inbound]\ntrusted = ["127.0.0.2/32"]\n' + self.extra_config)

    def start(self, timeout: float = 30.0) -> None:
        import httpx

        self.write_config()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("SIPEDGE_ADMIN_TOKEN", None)
        # SIPEDGE_BENCH_CMD: run another build or a wrapper instead of `python -m edge.cli`
        prefix = os.environ.get("SIPEDGE_BENCH_CMD", "").split() or [sys.executable, "-m", "edge.cli"]
        if self.checkout is not None:
            prefix = [str(self.checkout / ".venv" / "bin" / "python"), "-m", "edge.cli"]
        # warnings and errors only, as Kamailio runs here (debug=-1): a log line per call is
        # a cost of its own, measured by neither peer
        cmd = [*prefix, "serve", "--config", str(self.config), "--data", str(self.data),
               "--log-level", os.environ.get("SIPEDGE_BENCH_LOG_LEVEL", "warning")]
        self.proc = subprocess.Popen(pinned(self.cpu, cmd), cwd=self.checkout or ROOT, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "ab"), env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sipedge exited with {self.proc.returncode}; log: {self.log_path}\n"
                                   + self.log_path.read_text()[-2000:])
            try:
                if httpx.get(self.base + "/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"sipedge control API not healthy; log: {self.log_path}")
        if wait_sip("127.0.0.1", self.port, 5.0) is None:
            self.error = "sipedge does not answer SIP OPTIONS on UDP (SIP layer not serving yet?)"
            log(f"sipedge: {self.error}")
        self.pids()

    def client(self) -> Any:
        import httpx

        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.TOKEN}"}, timeout=30.0)

    def provision_profiles(self, n: int, *, channels: int = 1, credit: str | None = None) -> list[dict[str, Any]]:
        """One account, ``n`` digest profiles; returns the API's profile objects (with
        ``sip_username``/``sip_password``). Cached in the data dir across restarts."""
        cache = self.workdir / f"profiles-{n}-{channels}-{credit}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        profiles: list[dict[str, Any]] = []
        with self.client() as api:
            r = api.post("/v1/accounts", json={"name": "Bench", "admin": f"bench.admin.{uuid.uuid4().hex[:6]}"})
            r.raise_for_status()
            account = r.json()
            if credit:
                total = f"{float(credit) * n + 1:.2f}"
                api.post(f"/v1/accounts/{account['id']}/credit", json={"amount": total}).raise_for_status()
            t0 = time.monotonic()
            for i in range(n):
                r = api.post(f"/v1/accounts/{account['id']}/profiles",
                             json={"name": f"bench-{i}", "channels": channels, "auth": "digest"})
                r.raise_for_status()
                prof = r.json()
                if credit:
                    api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": credit}).raise_for_status()
                profiles.append(prof)
            log(f"sipedge: provisioned {n} profiles in {time.monotonic() - t0:.1f} s")
        cache.write_text(json.dumps(profiles))
        return profiles


# -- the registration bench ---------------------------------------------------------------

def write_users_csv(path: Path, users: list[tuple[str, str]]) -> None:
    with path.open("w") as f:
        f.write("SEQUENTIAL\n")
        for user, pw in users:
            if ";" in pw or "]" in pw or " " in pw:
                raise ValueError(f"password of {user} cannot go through a SIPp CSV: {pw!r}")
            f.write(f"{user};{DOMAIN};[authentication username={user} password={pw}]\n")


def bench_device(dev: Device, users_csv: Path, rates: list[int], hold: float, workdir: Path) -> dict[str, Any]:
    scenario = SIPP_DIR / "uac-register-auth.xml"

    def step(rate: int) -> StepResult:
        pids = dev.pids()
        if not pids:
            r = StepResult(dut=dev.name, rate=rate, seconds=hold, offered=int(rate * hold), failed=int(rate * hold))
            r.note = f"{dev.name} is not running"
            return r
        return run_sipp(dut=dev.name, scenario=scenario, target=dev.target, rate=rate, seconds=hold,
                        workdir=workdir, dut_pids=pids, inf=users_csv)

    steps, best, first_fail = ladder(rates, step, log_prefix=f"  {dev.name:>8}")
    failed_total = sum(s.failed for s in steps)
    return {"steps": [s.as_dict() for s in steps], "max_rate": best, "first_failing_rate": first_fail,
            "failed_registrations": failed_total, "error": dev.error or None}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over the repeats; CPU per registration compared at a rate both passed."""
    out: dict[str, Any] = {}
    for name, reps in runs.items():
        out[name] = {
            "max_rate": spread([r["max_rate"] or 0 for r in reps]),
            "first_failing_rate": spread([r["first_failing_rate"] for r in reps if r["first_failing_rate"]]),
        }
    names = list(runs)
    # the reference rate: the highest step every device passed in its median repeat or better
    passed = {n: sorted({s["rate"] for r in runs[n] for s in r["steps"] if s["passed"]}) for n in names}
    counts = {n: {rate: sum(1 for r in runs[n] for s in r["steps"] if s["rate"] == rate and s["passed"])
                  for rate in passed[n]} for n in names}
    common = [rate for rate in passed[names[0]] if all(counts[n].get(rate, 0) * 2 >= len(runs[n]) for n in names)]
    ref = max(common) if common else None
    out["reference_rate"] = ref
    for n in names:
        cpu = [s["cpu_us_per_op"] for r in runs[n] for s in r["steps"] if s["rate"] == ref and s["passed"]]
        rtt = [s["response_ms"] for r in runs[n] for s in r["steps"] if s["rate"] == ref and s["passed"]]
        out[n]["cpu_us_per_registration_at_reference"] = spread(cpu)
        out[n]["response_ms_at_reference"] = spread(rtt)
        # every step, median over repeats: CPU per registration as the load grows
        out[n]["cpu_us_per_registration_by_rate"] = {
            str(rate): spread([s["cpu_us_per_op"] for r in runs[n] for s in r["steps"]
                               if s["rate"] == rate and s["passed"]])["median"] for rate in passed[n]}
    if len(names) == 2:
        a, b = names
        ma, mb = out[a]["max_rate"]["median"], out[b]["max_rate"]["median"]
        out["ratio_max_rate_" + f"{b}_over_{a}"] = (mb / ma) if ma else None
        ca = out[a].get("cpu_us_per_registration_at_reference", {}).get("median")
        cb = out[b].get("cpu_us_per_registration_at_reference", {}).get("median")
        out["ratio_cpu_per_registration_" + f"{b}_over_{a}"] = (cb / ca) if ca and cb else None
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.common import machine_info, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 s steps, 1 repeat")
    ap.add_argument("--rates", default="250,500,1000,1500,2000,3000,4000,5000,6000,8000,10000,12000,15000",
                    help="comma-separated offered rates (registrations/s)")
    ap.add_argument("--hold", type=float, default=None, help="seconds per step (default 20, --quick 5)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (--quick 1)")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--only", choices=("kamailio", "sipedge"), default=None)
    ap.add_argument("--kam-children", type=int, default=4, help="Kamailio children per listener (its default)")
    ap.add_argument("--no-pin", action="store_true", help="do not taskset SIPp/device to CPU 0/1")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, SIPp stats)")
    ap.add_argument("--output", default="register.json")
    args = ap.parse_args(argv)
    hold = args.hold or (5.0 if args.quick else 20.0)
    repeats = args.repeats or (1 if args.quick else 3)
    rates = [int(x) for x in args.rates.split(",") if x.strip()]

    ensure_debs({"sipp": "sip-tester", "kamailio": "kamailio"})
    cpu_dut = None if args.no_pin else CPU_DUT
    workdir = Path(tempfile.mkdtemp(prefix="bench-register-"))
    log(f"work dir: {workdir}")
    names = [args.only] if args.only else ["kamailio", "sipedge"]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    kam_users = [(f"99050{i:07d}", f"pw{i:06d}x") for i in range(args.users)]
    kam_csv = workdir / "users-kamailio.csv"
    write_users_csv(kam_csv, kam_users)
    sip_csv = workdir / "users-sipedge.csv"
    sipedge_data: dict[str, Any] = {}
    try:
        for rep in range(repeats):
            order = names if rep % 2 == 0 else list(reversed(names))
            for name in order:
                log(f"repeat {rep + 1}/{repeats}: {name}")
                dev: Device
                if name == "kamailio":
                    dev = Kamailio(workdir, cpu_dut, cfg=KAM_DIR / "register.cfg", children=args.kam_children)
                    dev.write_users(kam_users)
                    csv_path = kam_csv
                else:
                    dev = Sipedge(workdir, cpu_dut)
                    csv_path = sip_csv
                try:
                    try:
                        dev.start()
                        if isinstance(dev, Sipedge) and not sip_csv.exists():
                            profiles = dev.provision_profiles(args.users)
                            write_users_csv(sip_csv, [(p["sip_username"], p["sip_password"]) for p in profiles])
                            sipedge_data["profiles"] = len(profiles)
                    except Exception as exc:  # a device that cannot start fails this repeat, not the run
                        log(f"{name}: could not start: {exc}")
                        runs[name].append({"steps": [], "max_rate": None, "first_failing_rate": rates[0],
                                           "failed_registrations": None, "error": str(exc)[:2000]})
                        continue
                    runs[name].append(bench_device(dev, csv_path, rates, hold, workdir))
                finally:
                    dev.stop()
                time.sleep(1.0)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = summarise(runs)
    result: dict[str, object] = {
        "bench": "register",
        "machine": machine_info(),
        "tools": {"sipp": tool_version(["sipp", "-v"]), "kamailio": tool_version(["kamailio", "-v"])},
        "method": {"hold_s": hold, "repeats": repeats, "rates": rates, "users": args.users,
                   "pinned": not args.no_pin, "cpu_sipp": CPU_GEN, "cpu_device": cpu_dut,
                   "kamailio_children": args.kam_children, "kamailio_alloc": " ".join(Kamailio.ALLOC),
                   "pass": "0 failed, SIPp rc 0, retrans < 1%",
                   "digest": "MD5, qop=auth on both (SIPp 3.6 is MD5-only: sipedge runs with "
                             "sip.digest_algorithms = [\"MD5\"])",
                   "scenario": "bench/sipp/uac-register-auth.xml", "kamailio_cfg": "bench/kamailio/register.cfg",
                   "command": "python -m bench.bench_register " + " ".join(argv if argv is not None else sys.argv[1:])},
        "runs": runs,
        "summary": summary,
    }
    path = write_result(args.output, result)
    log(f"wrote {path}")
    print_table(summary, runs)
    return 0


def print_table(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> None:
    def fmt(s: dict[str, Any] | None, unit: str = "") -> str:
        if not s or s.get("median") is None:
            return "-"
        return f"{s['median']:.0f}{unit} [{s['min']:.0f}..{s['max']:.0f}]"

    print(f"{'device':<10} {'max reg/s (median [min..max])':<32} {'first failing':<16} "
          f"{'CPU us/reg @ref':<22} {'failed regs (all steps)'}")
    for name in runs:
        s = summary[name]
        failed = sum(r.get("failed_registrations") or 0 for r in runs[name])
        errs = {str(r["error"]) for r in runs[name] if r.get("error")}
        print(f"{name:<10} {fmt(s['max_rate']):<32} {fmt(s['first_failing_rate']):<16} "
              f"{fmt(s.get('cpu_us_per_registration_at_reference')):<22} {failed}"
              + (f"  ({'; '.join(sorted(errs))[:200]})" if errs else ""))
    for key, val in summary.items():
        if key.startswith("ratio_") or key == "reference_rate":
            print(f"{key}: {val if val is None or isinstance(val, int) else f'{val:.2f}'}")


if __name__ == "__main__":
    sys.exit(main())
