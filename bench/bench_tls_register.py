"""Authenticated REGISTER rate over TLS: sipedge side by side with Kamailio's ``tls`` module,
both driven by the same load generator.

    .venv/bin/python -m bench.bench_tls_register                  # 15 s runs, 3 repeats
    .venv/bin/python -m bench.bench_tls_register --quick          # 5 s, 1 repeat
    .venv/bin/python -m bench.bench_tls_register --handshake      # a new TLS connection per registration

Why a generator of our own: Debian's SIPp is built without TLS. This one is Python ``ssl`` on
uvloop in ``--procs`` processes, each holding ``--conns`` TLS connections (PBXs keep theirs
open, RFC 5626); on each connection, one registration after the other: REGISTER -> 401 ->
REGISTER with a digest answer (MD5, qop=auth, as bench_register.py) -> 200, for the users of
a CSV in turn. Closed loop: the rate is what the device sustains with that many
registrations in flight, with zero failures required.

How we know the generator is not the bottleneck (printed and in the JSON): the CPU it used
per second of wall time per process and in total -- a saturated generator process is near
1.0 -- and the rate it drives Kamailio to with the same settings: a device slower than the
generator's ceiling is the one measured.

- ``kamailio``: Debian ``kamailio`` + ``kamailio-tls-modules``, ``bench/kamailio/register.cfg``
  with ``WITH_TLS`` (auth_db on db_text, usrloc in memory), 4 children, the TLSF allocator.
- ``sipedge``: ``python -m edge.cli serve`` with a ``tls:`` listener.
Both get the same certificate (P-256, from a CA made here), TLS 1.3 negotiates; the device
is pinned to CPU 1, the generator to CPU 0 (taskset), as in bench_register.py.
JSON: bench/results/tls_register.json. Loopback only; processes stopped by PID; every wait bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import re
import resource
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.bench_register import (
    CPU_DUT,
    CPU_GEN,
    DOMAIN,
    KAM_DIR,
    Kamailio,
    Sipedge,
    ensure_debs,
    free_port,
    log,
    pinned,
    spread,
    tool_version,
    tree_cpu,
)

CHALLENGE = re.compile(rb'WWW-Authenticate:\s*Digest\s+([^\r\n]+)', re.I)
STATUS = re.compile(rb"^SIP/2\.0 (\d{3})")
PARAM = re.compile(r'(\w+)=("[^"]*"|[^,\s]+)')
KAM_TLS_MODULE = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/tls.so")


# -- certificates ----------------------------------------------------------------------------

def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1, P-256, in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench CA")).issuer_name(name("bench CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("bench edge")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "edge.crt", "key": directory / "edge.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


# -- the generator (one process) -------------------------------------------------------------

def _digest(user: str, password: str, challenge: str, uri: str, nc: int) -> str:
    p = {k.lower(): v.strip('"') for k, v in PARAM.findall(challenge)}
    ha1 = hashlib.md5(f"{user}:{p['realm']}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"REGISTER:{uri}".encode()).hexdigest()
    cnonce = secrets.token_hex(4)
    ncs = f"{nc:08x}"
    resp = hashlib.md5(f"{ha1}:{p['nonce']}:{ncs}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    opaque = f', opaque="{p["opaque"]}"' if "opaque" in p else ""
    return (f'Digest username="{user}", realm="{p["realm"]}", nonce="{p["nonce"]}", uri="{uri}", '
            f'response="{resp}", algorithm=MD5, qop=auth, nc={ncs}, cnonce="{cnonce}"{opaque}')


def _register(user: str, call_id: str, cseq: int, local: str, auth: str | None, proto: str = "tls") -> bytes:
    lines = [f"REGISTER sip:{DOMAIN} SIP/2.0",
             f"Via: SIP/2.0/{proto.upper()} {local};branch=z9hG4bK{secrets.token_hex(8)};rport",
             "Max-Forwards: 70", f"From: <sip:{user}@{DOMAIN}>;tag={call_id[:8]}", f"To: <sip:{user}@{DOMAIN}>",
             f"Call-ID: {call_id}", f"CSeq: {cseq} REGISTER", f"Contact: <sip:{user}@{local};transport={proto}>",
             "Expires: 3600"]
    if auth:
        lines.append(f"Authorization: {auth}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    m = re.search(rb"\r\nContent-Length:\s*(\d+)", head, re.I)
    if m and int(m.group(1)):
        await reader.readexactly(int(m.group(1)))
    return head


async def _connection(target: tuple[str, int], ctx: ssl.SSLContext | None, users: list[tuple[str, str]],
                      deadline: float, stats: dict[str, int], handshake: bool) -> None:
    """One connection's registrations, one after the other (``ctx`` None: plain TCP)."""
    loop = asyncio.get_running_loop()
    proto = "tls" if ctx is not None else "tcp"
    i = 0
    reader = writer = None
    while loop.time() < deadline:
        if writer is None:
            reader, writer = await asyncio.open_connection(*target, ssl=ctx,
                                                           server_hostname=target[0] if ctx else None)
            host, port = writer.get_extra_info("sockname")[:2]
            local = f"{host}:{port}"
        assert reader is not None
        user, password = users[i % len(users)]
        i += 1
        call_id = secrets.token_hex(10)
        try:
            writer.write(_register(user, call_id, 1, local, None, proto))
            first = await _read_response(reader)
            m = CHALLENGE.search(first)
            status = STATUS.match(first)
            if not m or not status or status.group(1) != b"401":
                stats["failed"] += 1
                continue
            auth = _digest(user, password, m.group(1).decode(), f"sip:{DOMAIN}", 1)
            writer.write(_register(user, call_id, 2, local, auth, proto))
            final = STATUS.match(await _read_response(reader))
            if final and final.group(1) == b"200":
                stats["ok"] += 1
            else:
                stats["failed"] += 1
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            stats["failed"] += 1
            writer = None
            continue
        if handshake:
            writer.close()
            writer = None


def worker_main(spec: dict[str, Any]) -> None:
    """One generator process: ``spec`` has target, ca, users, conns, seconds, handshake."""
    import uvloop

    ctx = ssl.create_default_context(cafile=spec["ca"]) if spec.get("transport", "tls") == "tls" else None
    users = [tuple(u) for u in spec["users"]]
    stats = {"ok": 0, "failed": 0}

    async def run() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec["seconds"]
        per = max(1, len(users) // spec["conns"])
        tasks = [_connection(tuple(spec["target"]), ctx, users[k * per:(k + 1) * per] or users, deadline, stats,
                             spec["handshake"]) for k in range(spec["conns"])]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        stats["failed"] += sum(1 for r in results if isinstance(r, BaseException))

    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    uvloop.run(run())
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    stats_out = {**stats, "wall": time.monotonic() - t0,
                 "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)}
    print(json.dumps(stats_out), flush=True)


def run_generator(target: tuple[str, int], ca: Path, users: list[tuple[str, str]], *, procs: int, conns: int,
                  seconds: float, handshake: bool, dut_pids: list[int], transport: str = "tls") -> dict[str, Any]:
    """``procs`` generator processes against ``target``; the device's CPU over the run."""
    share = [users[k::procs] for k in range(procs)]
    children = []
    cpu0 = tree_cpu(dut_pids)
    t0 = time.monotonic()
    for k in range(procs):
        spec = {"target": list(target), "ca": str(ca), "users": share[k], "conns": conns, "seconds": seconds,
                "handshake": handshake, "transport": transport}
        children.append(subprocess.Popen(pinned(CPU_GEN, [sys.executable, "-m", "bench.bench_tls_register",
                                                          "--worker", json.dumps(spec)]),
                                         stdout=subprocess.PIPE, text=True))
    outs = []
    for child in children:
        try:
            out, _ = child.communicate(timeout=seconds + 60)
            outs.append(json.loads(out.strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            child.kill()
            child.wait(5)
            outs.append({"ok": 0, "failed": 1, "wall": seconds, "cpu": 0.0})
    wall = time.monotonic() - t0
    dut_cpu = tree_cpu(dut_pids) - cpu0
    ok = sum(o["ok"] for o in outs)
    failed = sum(o["failed"] for o in outs)
    gen_wall = max(o["wall"] for o in outs)
    return {"registrations": ok, "failed": failed, "rate": ok / gen_wall if gen_wall else 0.0,
            "device_cpu_per_second": dut_cpu / wall,
            "device_cpu_us_per_registration": dut_cpu / ok * 1e6 if ok else None,
            "generator_cpu_per_second_per_process": [round(o["cpu"] / o["wall"], 3) for o in outs],
            "generator_cpu_per_second_total": round(sum(o["cpu"] for o in outs) / gen_wall, 3)}


# -- the devices -------------------------------------------------------------------------------

@contextlib.contextmanager
def appended_args(extra: list[str]) -> Iterator[None]:
    """``extra`` appended to the command line the device classes of bench_register.py build."""
    original = subprocess.Popen

    def popen(cmd: list[str], *a: Any, **kw: Any) -> subprocess.Popen[Any]:
        return original([*cmd, *extra], *a, **kw)

    subprocess.Popen = popen  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        subprocess.Popen = original  # type: ignore[misc]


class SipedgeTls(Sipedge):
    name = "sipedge"

    def __init__(self, workdir: Path, cpu: str | None, certs: dict[str, Path], loop: str = "asyncio") -> None:
        super().__init__(workdir, cpu)
        self.certs = certs
        self.loop = loop
        self.tls_port = free_port()
        self.tcp_port = free_port()

    def start(self, timeout: float = 30.0) -> None:
        with appended_args(["--loop", self.loop]):
            super().start(timeout)

    def write_config(self) -> None:
        super().write_config()
        text = self.config.read_text().replace(
            f'listen = ["udp:127.0.0.1:{self.port}"]', f'listen = ["udp:127.0.0.1:{self.port}", '
                                                       f'"tls:127.0.0.1:{self.tls_port}", '
                                                       f'"tcp:127.0.0.1:{self.tcp_port}"]')
        text += (f'[tls]\ncert = "{self.certs["cert"]}"\nkey = "{self.certs["key"]}"\n'
                 f'ca = "{self.certs["ca"]}"\n')
        self.config.write_text(text)


class KamailioTls(Kamailio):
    name = "kamailio"

    def __init__(self, workdir: Path, cpu: str | None, certs: dict[str, Path], children: int) -> None:
        self.tls_port = free_port()
        self.tcp_port = free_port()
        tls_cfg = workdir / "kamailio-tls.cfg"
        tls_cfg.write_text(f"[server:default]\nmethod = TLSv1.2+\nverify_certificate = no\nrequire_certificate = no\n"
                           f"private_key = {certs['key']}\ncertificate = {certs['cert']}\n"
                           f"[client:default]\nverify_certificate = no\nrequire_certificate = no\n")
        super().__init__(workdir, cpu, cfg=KAM_DIR / "register.cfg", children=children,
                         defines={"WITH_TLS": "1", "TLSCFG": f'"{tls_cfg}"'})

    def start(self, timeout: float = 20.0) -> None:
        # beside bench_register's -l udp:...
        with appended_args(["-l", f"tls:127.0.0.1:{self.tls_port}", "-l", f"tcp:127.0.0.1:{self.tcp_port}"]):
            super().start(timeout)


# -- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.common import machine_info, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="5 s runs, 1 repeat")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per run (default 15, --quick 5)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (--quick 1)")
    ap.add_argument("--procs", type=int, default=3, help="generator processes")
    ap.add_argument("--conns", type=int, default=128, help="TLS connections per generator process")
    ap.add_argument("--users", type=int, default=600)
    ap.add_argument("--handshake", action="store_true", help="a new TLS connection for every registration")
    ap.add_argument("--transport", choices=("tls", "tcp"), default="tls",
                    help="tcp: the same job in clear, to see what TLS itself costs")
    ap.add_argument("--kam-children", type=int, default=4)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="sipedge's event loop")
    ap.add_argument("--only", choices=("kamailio", "sipedge"), default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    seconds = args.seconds or (5.0 if args.quick else 15.0)
    repeats = args.repeats or (1 if args.quick else 3)
    ensure_debs({"kamailio": "kamailio", "taskset": "util-linux"})
    if not KAM_TLS_MODULE.exists():  # a module, not a binary: ensure_debs cannot see it
        log("installing Debian package: kamailio-tls-modules")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "kamailio-tls-modules"], check=True, env=env,
                       timeout=1200, stdout=subprocess.DEVNULL)
        if not KAM_TLS_MODULE.exists():
            raise SystemExit(f"{KAM_TLS_MODULE} still missing after installing kamailio-tls-modules")

    workdir = Path(tempfile.mkdtemp(prefix="bench-tls-register-"))
    certs = make_certificates(workdir)
    edge = SipedgeTls(workdir, CPU_DUT, certs)
    edge.start()
    try:
        profiles = edge.provision_profiles(args.users)
    finally:
        edge.stop()
    users = [(p["sip_username"], p["sip_password"]) for p in profiles]
    names = [args.only] if args.only else ["kamailio", "sipedge"]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else list(reversed(names))):
            dev: Any
            if name == "kamailio":
                dev = KamailioTls(workdir, CPU_DUT, certs, args.kam_children)
                dev.write_users(users)
            else:
                dev = SipedgeTls(workdir, CPU_DUT, certs, args.loop)
            dev.start()
            try:
                port = dev.tls_port if args.transport == "tls" else dev.tcp_port
                result = run_generator(("127.0.0.1", port), certs["ca"], users, procs=args.procs,
                                       conns=args.conns, seconds=seconds, handshake=args.handshake,
                                       dut_pids=dev.pids(), transport=args.transport)
            finally:
                dev.stop()
            log(f"  {name:>8} rep {rep + 1}: {result['rate']:8.0f} reg/s, failed {result['failed']}, device "
                f"{result['device_cpu_per_second']:.2f} CPU, generator {result['generator_cpu_per_second_per_process']}"
                f" (total {result['generator_cpu_per_second_total']})")
            runs[name].append(result)
    summary: dict[str, Any] = {}
    for name, reps in runs.items():
        summary[name] = {
            "rate": spread([r["rate"] for r in reps if not r["failed"]]),
            "device_cpu_us_per_registration": spread([r["device_cpu_us_per_registration"] for r in reps
                                                      if r["device_cpu_us_per_registration"]]),
            "generator_cpu_per_second_total": spread([r["generator_cpu_per_second_total"] for r in reps]),
            "failed": sum(r["failed"] for r in reps),
        }
    if len(names) == 2:
        k, s = summary["kamailio"]["rate"]["median"], summary["sipedge"]["rate"]["median"]
        summary["ratio_rate_sipedge_over_kamailio"] = (s / k) if k and s else None
    result = {"machine": machine_info(), "summary": summary, "runs": runs,
              "settings": {"seconds": seconds, "repeats": repeats, "procs": args.procs, "conns": args.conns,
                           "users": args.users, "handshake": args.handshake, "sipedge_loop": args.loop,
                           "transport": args.transport,
                           "kamailio_children": args.kam_children,
                           "cpu_device": CPU_DUT, "cpu_generator": CPU_GEN, "kamailio_alloc": " ".join(Kamailio.ALLOC),
                           "openssl": ssl.OPENSSL_VERSION},
              "tools": {"kamailio": tool_version(["kamailio", "-v"])}}
    out = args.output or ("tcp_register.json" if args.transport == "tcp" else
                          "tls_register_handshake.json" if args.handshake else "tls_register.json")
    path = write_result(out, result)
    log(json.dumps(summary, indent=1))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
