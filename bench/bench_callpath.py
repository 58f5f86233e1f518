"""CPU of one call through the real call path, in one process, without sockets or SIPp.

    .venv/bin/python -m bench.bench_callpath                  # 2,000 calls x 3 rounds
    .venv/bin/python -m bench.bench_callpath --profile        # and where the time goes (cProfile)
    .venv/bin/python -m bench.bench_callpath --profile-groups --calls 1000 --rounds 1   # by layer

A full :class:`edge.node.Node` is built (store, SIP service, transaction layer, dialogs,
call controller, admission, billing, the real RTP relay engine for anchoring) and fed
the messages of the SIPp call of ``bench/bench_calls.py`` at its transport boundary
(``Transports.received``): INVITE -> 407 -> ACK -> INVITE with a digest answer -> the
carrier's 100/180/200 with SDP -> ACK -> BYE -> the carrier's 200. What the edge sends
is captured instead of written to a socket; the peers' answers are built from it.

The figure is CPU seconds of the process per call, measured around the edge's work
only (the peers' message building is timed apart and subtracted), the minimum of the
rounds. ``--instructions`` counts instead, with valgrind's callgrind: the process runs
twice (N and 3N calls) and the difference of the instructions executed, divided by 2N,
is the instructions of one call (the peers' share included: the same in every build),
the same number on every run whatever the other core does. The CPU figure moves with
the machine, but not with SIPp or the network: both are the tools for "what did this
change buy" (``bench/README.md``), next to
``bench_calls.py``, which measures the rate the whole edge sustains against Kamailio.
Timers (retransmissions, Timer C, billing slices) are armed as in production; the loop
runs between calls so that what a call schedules is paid by that call.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import gc
import hashlib
import io
import pstats
import re
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import machine_info, write_result
from edge.config import CarrierConfig, Config, InboundConfig
from edge.control import accounts, ledger, profiles, rates
from edge.control.models import Rate
from edge.control.store import Store
from edge.node import Node
from edge.sip import SipMessage, build_response, frame_length, parse
from edge.sip.transport import Peer, SocketStream, TcpConnection, stream_socket

PBX = Peer("udp", "127.0.0.1", 5070)
CARRIER = Peer("udp", "127.0.0.2", 5080)
DOMAIN = "sip.edge.test"
CALLEE = "+442071234567"
SDP_PBX = (b"v=0\r\no=pbx 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=audio 6000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
           b"a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")
SDP_GW = SDP_PBX.replace(b"127.0.0.1", b"127.0.0.2").replace(b"6000", b"7000")


class Wire:
    """Stands in for the sockets: what the edge sends, by destination."""

    def __init__(self) -> None:
        self.to_pbx: list[SipMessage] = []
        self.to_carrier: list[SipMessage] = []

    def send(self, data: bytes, dest: Peer) -> None:
        (self.to_carrier if dest.host == CARRIER.host else self.to_pbx).append(parse(data))

    def take(self, side: list[SipMessage], want: str | int) -> SipMessage:
        for i, msg in enumerate(side):
            if (msg.is_request and msg.method == want) or (not msg.is_request and msg.status == want):
                return side.pop(i)
        raise LookupError(f"the edge did not send {want}: {[m.method if m.is_request else m.status for m in side]}")


def pbx_request(method: str, user: str, call_id: str, cseq: int, *, to_tag: str = "", branch: str = "",
                auth: str = "", body: bytes = b"") -> bytes:
    lines = [f"{method} sip:{CALLEE}@127.0.0.1:5060 SIP/2.0",
             f"Via: SIP/2.0/UDP {PBX.host}:{PBX.port};branch={branch or 'z9hG4bK' + secrets.token_hex(6)};rport",
             f"From: <sip:{user}@{DOMAIN}>;tag=pbx{call_id[:8]}",
             f"To: <sip:{CALLEE}@{DOMAIN}>" + (f";tag={to_tag}" if to_tag else ""),
             f"Call-ID: {call_id}", f"CSeq: {cseq} {method}", f"Contact: <sip:{user}@{PBX.host}:{PBX.port}>",
             "Max-Forwards: 70", "User-Agent: sipp-bench-pbx"]
    if auth:
        lines.append(f"Proxy-Authorization: {auth}")
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def register_request(user: str, call_id: str, cseq: int, *, auth: str = "", proto: str = "udp") -> bytes:
    lines = [f"REGISTER sip:{DOMAIN} SIP/2.0",
             f"Via: SIP/2.0/{proto.upper()} {PBX.host}:{PBX.port};branch=z9hG4bK{secrets.token_hex(6)};rport",
             f"From: <sip:{user}@{DOMAIN}>;tag=reg{call_id[:8]}", f"To: <sip:{user}@{DOMAIN}>",
             f"Call-ID: {call_id}", f"CSeq: {cseq} REGISTER", f"Contact: <sip:{user}@{PBX.host}:{PBX.port}>",
             "Expires: 3600", "Max-Forwards: 70", "User-Agent: sipp-bench-pbx"]
    if auth:
        lines.append(f"Authorization: {auth}")
    return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()


def digest(user: str, password: str, challenge: str, uri: str, method: str = "INVITE") -> str:
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', challenge))
    ha1 = hashlib.md5(f"{user}:{params['realm']}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    resp = hashlib.md5(f"{ha1}:{params['nonce']}:00000001:0a4f113b:auth:{ha2}".encode()).hexdigest()
    return (f'Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", uri="{uri}", '
            f'response="{resp}", algorithm=MD5, qop=auth, nc=00000001, cnonce="0a4f113b"')


class StreamStandIn:
    """Stands in for an asyncio transport under a :class:`TcpConnection`: what it writes is
    parsed and put on the :class:`Wire`, as ``Wire.send`` does for UDP."""

    def __init__(self, wire: Wire, peer: Peer) -> None:
        self.wire = wire
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer.host, self.peer.port) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.wire.send(data, self.peer)

    def close(self) -> None:
        pass


class SocketPbx:
    """The PBX of the register scenario on a real loopback TCP connection: the edge's end is
    a :class:`SocketStream` under a :class:`TcpConnection`, as in production, so the
    event loop's wake-up, ``recv`` and ``send`` of every message are paid too. The PBX end
    is a plain non-blocking socket read by a loop callback; its CPU is timed apart."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.left = 0
        self.call_id = ""
        self.done: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.sock = socket.create_connection(listener.getsockname())
            accepted, _ = listener.accept()
        self.sock.setblocking(False)
        transports = self.rig.node.sip.transports
        SocketStream(loop, stream_socket(accepted), TcpConnection(transports), transports.metrics).start()
        loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()

    async def run(self, registrations: int) -> None:
        """``registrations`` digest registrations, one after the other, as bench_tls_register's
        generator does them on each of its connections."""
        self.left = registrations
        self.done = asyncio.get_running_loop().create_future()
        t = time.perf_counter()
        self._begin()
        self.rig.peer_cpu += time.perf_counter() - t
        await asyncio.wait_for(self.done, timeout=60 + registrations * 0.01)

    def _begin(self) -> None:
        rig = self.rig
        self.call_id = secrets.token_hex(10)
        rig.reg_cseq += 1
        self._send(register_request(rig.user, self.call_id, rig.reg_cseq, proto="tcp"))

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)  # a few hundred octets into an empty loopback buffer

    def _readable(self) -> None:
        t = time.perf_counter()
        assert self.sock is not None and self.done is not None
        self.buf += self.sock.recv(65536)
        while (n := frame_length(self.buf)) > 0:
            response = parse(bytes(self.buf[:n]))
            del self.buf[:n]
            rig = self.rig
            if response.status == 401:
                rig.reg_cseq += 1
                auth = digest(rig.user, rig.password, response.header("WWW-Authenticate") or "", f"sip:{DOMAIN}",
                              method="REGISTER")
                self._send(register_request(rig.user, self.call_id, rig.reg_cseq, auth=auth, proto="tcp"))
            elif response.status == 200:
                self.left -= 1
                if self.left > 0:
                    self._begin()
                elif not self.done.done():
                    self.done.set_result(None)
            elif not self.done.done():
                self.done.set_exception(LookupError(f"the edge answered {response.status}"))
        self.rig.peer_cpu += time.perf_counter() - t


class Rig:
    def __init__(self, tmp: Path, transport: str = "udp") -> None:
        cfg = Config(carriers=[CarrierConfig(uri=f"sip:{CARRIER.host}:{CARRIER.port}")],
                     inbound=InboundConfig(trusted=["127.0.0.3/32"]))
        cfg.sip.digest_algorithms = ["MD5"]
        cfg.sip.rate_limit = 0
        cfg.sip.profile_rate_limit = 0
        cfg.media.ports = (40000, 49999)
        cfg.media.quiet_period = 0.0
        self.store = Store(tmp / "db", map_size=1 << 30)
        self.node = Node(cfg, self.store, "bench-token")
        self.wire = Wire()
        transports = self.node.sip.transports
        transports.local = {"udp": ("127.0.0.1", 5060)}
        transports.send = self.wire.send  # type: ignore[method-assign]
        self.received = transports.received
        self.transport = transport
        self.stream: TcpConnection | None = None
        self.pbx = SocketPbx(self) if transport == "tcp" else None
        if transport != "udp":
            del transports.send  # answers go back over the PBX's connection (its transport or StreamStandIn)
        if transport == "tcp-framing":  # the PBX's messages arrive on one TCP connection, framed by it
            self.stream = TcpConnection(transports)
            self.stream.connection_made(StreamStandIn(self.wire, PBX))  # type: ignore[arg-type]
        self.node.media.start()
        acct = accounts.create(self.store, "Bench", "bench.admin")
        ledger.top_up(self.store, acct.id, 10_000 * 1_000_000)
        prof, cred = profiles.create(self.store, acct.id, "bench", 300, realm=cfg.sip.domain)
        ledger.allocate(self.store, prof.id, 5_000 * 1_000_000)
        rates.replace(self.store, [Rate(prefix="44", rate=20_000, min_seconds=1, increment_seconds=1)])
        self.user, self.password = prof.sip_username, cred.password
        self.reg_cseq = 0
        self.peer_cpu = 0.0  # time spent building the peers' messages (wall clock: one thread), subtracted

    def feed(self, data: bytes, peer: Peer) -> None:
        if self.stream is not None and peer is PBX:
            self.stream.data_received(data)
        else:
            self.received(data, peer, None)

    def answer(self, req: SipMessage, status: int, body: bytes = b"") -> bytes:
        t = time.perf_counter()
        headers = [("Contact", f"<sip:gw@{CARRIER.host}:{CARRIER.port}>")]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        data = build_response(req, status, to_tag="gw1" if status > 100 else None, headers=headers, body=body)
        self.peer_cpu += time.perf_counter() - t
        return data

    def register(self) -> None:
        """One digest registration as the SIPp PBX of bench_register does it: REGISTER -> 401 ->
        REGISTER with Authorization -> 200 (the binding refreshed in LMDB)."""
        t = time.perf_counter()
        call_id = secrets.token_hex(10)
        self.reg_cseq += 1
        first = register_request(self.user, call_id, self.reg_cseq, proto=self.transport)
        self.peer_cpu += time.perf_counter() - t
        self.feed(first, PBX)
        challenge = self.wire.take(self.wire.to_pbx, 401)
        t = time.perf_counter()
        self.reg_cseq += 1
        auth = digest(self.user, self.password, challenge.header("WWW-Authenticate") or "", f"sip:{DOMAIN}",
                      method="REGISTER")
        second = register_request(self.user, call_id, self.reg_cseq, auth=auth, proto=self.transport)
        self.peer_cpu += time.perf_counter() - t
        self.feed(second, PBX)
        self.wire.take(self.wire.to_pbx, 200)
        self.wire.to_pbx.clear()

    def call(self) -> None:
        """One call, message by message, as the SIPp PBX and carrier of bench_calls do it."""
        for _ in self.call_steps():
            pass

    def call_steps(self) -> Iterator[None]:
        """:meth:`call` as steps: it yields wherever the real call waits for a peer (the PBX's
        answer to the 407 and to the 200, the carrier's answers, the call's media time), so that
        ``--concurrent`` can interleave many calls the way SIPp's load does. Each step takes what
        its messages made the edge send before it yields: the wire holds no other call's messages."""
        t = time.perf_counter()
        call_id = secrets.token_hex(10)
        first = pbx_request("INVITE", self.user, call_id, 1, body=SDP_PBX)
        self.peer_cpu += time.perf_counter() - t
        self.feed(first, PBX)
        challenge = self.wire.take(self.wire.to_pbx, 407)
        self.wire.to_pbx.clear()
        yield
        t = time.perf_counter()
        ack = pbx_request("ACK", self.user, call_id, 1, to_tag=challenge.to_tag or "", branch=parse(first).branch or "")
        uri = f"sip:{CALLEE}@127.0.0.1:5060"
        auth = digest(self.user, self.password, challenge.header("Proxy-Authenticate") or "", uri)
        second = pbx_request("INVITE", self.user, call_id, 2, auth=auth, body=SDP_PBX)
        self.peer_cpu += time.perf_counter() - t
        self.feed(ack, PBX)
        self.feed(second, PBX)
        invite = self.wire.take(self.wire.to_carrier, "INVITE")
        self.wire.to_pbx.clear()  # 100 Trying
        yield
        for status, body in ((100, b""), (180, b""), (200, SDP_GW)):
            self.feed(self.answer(invite, status, body), CARRIER)
        self.wire.take(self.wire.to_carrier, "ACK")
        ok = self.wire.take(self.wire.to_pbx, 200)
        self.wire.to_pbx.clear()
        yield
        t = time.perf_counter()
        ack2 = pbx_request("ACK", self.user, call_id, 2, to_tag=ok.to_tag or "")
        self.peer_cpu += time.perf_counter() - t
        self.feed(ack2, PBX)
        yield  # the call's media time
        t = time.perf_counter()
        bye = pbx_request("BYE", self.user, call_id, 3, to_tag=ok.to_tag or "")
        self.peer_cpu += time.perf_counter() - t
        self.feed(bye, PBX)
        self.wire.take(self.wire.to_pbx, 200)
        bye_out = self.wire.take(self.wire.to_carrier, "BYE")
        yield
        self.feed(self.answer(bye_out, 200), CARRIER)
        self.wire.to_pbx.clear()
        self.wire.to_carrier.clear()


def interleaved(rig: Rig, calls: int, concurrent: int) -> Iterator[None]:
    """``calls`` calls with ``concurrent`` of them in progress at once, one step of each in turn
    (a new call starts when one ends); yields after every step."""
    started = 0
    active: collections.deque[Iterator[None]] = collections.deque()
    while started < calls or active:
        while len(active) < concurrent and started < calls:
            active.append(rig.call_steps())
            started += 1
        steps = active.popleft()
        if next(steps, StopIteration) is not StopIteration:
            active.append(steps)
        yield


# Where a function's own time goes in --profile-groups: the first pattern its file (or, for a
# C function, its name) contains. A function no pattern names (the standard library, C methods
# such as bytes.startswith or LMDB's put) counts for the group of the function that called it.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bench peers (not the edge)", ("bench/bench_callpath.py",)),
    ("metrics", ("prometheus_client/", "edge/sip/metrics.py", "edge/calls/metrics.py", "edge/media/metrics.py")),
    ("parse + validate (the boundary)", ("edge/sip/transport.py", "edge._sipparse", "edge/sip/hdrs.py")),
    ("transaction (+ response building)", ("edge/sip/transaction.py", "edge/sip/core.py", "edge/sip/workers.py")),
    ("digest auth + registrar", ("edge/sip/auth.py", "edge/sip/registrar.py")),
    ("dialog / B2BUA / admission / routing", ("edge/sip/invite.py", "edge/sip/dialog.py", "edge/sip/request.py",
                                             "edge/calls/controller.py", "edge/calls/admission.py",
                                             "edge/calls/routing.py", "edge/calls/carriers.py",
                                             "edge/calls/indialog.py", "edge/calls/model.py", "edge/node.py")),
    ("relay setup + SDP", ("edge/calls/media.py", "edge/media/", "edge._rtp")),
    ("store (LMDB, credit, ledger, CDRs, billing)", ("edge/control/", "edge/calls/billing.py", "lmdb", "msgspec")),
    ("asyncio (loop, timers)", ("asyncio/", "selectors.py", "heapq", "select.epoll")),
    ("logging", ("logging/",)),
)


def profile_groups(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Own (exclusive) time of every profiled function summed by :data:`GROUPS`, largest first;
    the groups add up to the whole profiled time."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]

    def named(func: tuple[str, int, str]) -> str | None:
        where = func[0] if func[0] != "~" else func[2]
        return next((g for g, pats in GROUPS if any(p in where for p in pats)), None)

    shares: dict[Any, dict[str, float]] = {}

    def share(func: Any, depth: int = 0) -> dict[str, float]:
        """How ``func``'s own time splits over the groups (by the callers' share of it)."""
        if func in shares:
            return shares[func]
        group = named(func)
        if group is not None or depth > 50:
            out = {group or "other": 1.0}
        else:
            callers = table[func][4]
            total = sum(c[2] for c in callers.values())
            out = {}
            for caller, c in callers.items():
                if caller == func or total <= 0 or caller not in table:
                    continue
                for g, w in share(caller, depth + 1).items():
                    out[g] = out.get(g, 0.0) + w * c[2] / total
            out = out or {"other": 1.0}
        shares[func] = out
        return out

    sums: dict[str, float] = {}
    for func, row in table.items():
        for g, w in share(func).items():
            sums[g] = sums.get(g, 0.0) + row[2] * w
    return sorted(sums.items(), key=lambda kv: -kv[1])


async def measure(calls: int, rounds: int, profile: bool, scenario: str = "call",
                  transport: str = "udp", concurrent: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-callpath-") as tmp:
        rig = Rig(Path(tmp), transport)
        one = rig.register if scenario == "register" else rig.call
        if rig.pbx is not None:
            await rig.pbx.connect()
            await rig.pbx.run(200)  # warm-up, as below
        for _ in range(200 if rig.pbx is None else 0):  # warm-up: code paths, caches, the store's pages
            one()
            await asyncio.sleep(0)
        gc.collect()  # as Node.run does after start-up
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)
        per_call: list[float] = []
        # cProfile's default clock (wall time): a CPU clock (time.thread_time) is a system call per
        # event and inflates the functions called most; time taken by other processes is spread
        # over the functions in proportion to their own, which leaves the shares as they are
        prof = cProfile.Profile() if profile else None
        for _ in range(rounds):
            rig.peer_cpu = 0.0
            start = time.process_time()
            if prof is not None:
                prof.enable()
            if rig.pbx is not None:
                await rig.pbx.run(calls)  # the loop runs between messages, as in production
            if concurrent > 1:
                for i, _ in enumerate(interleaved(rig, calls, concurrent)):
                    if i % 100 == 99:  # ~20 calls' worth of steps, as below
                        await asyncio.sleep(0)
            for i in range(calls if rig.pbx is None and concurrent <= 1 else 0):
                one()
                if i % 20 == 19:
                    await asyncio.sleep(0)  # due timers and the flusher run, as between datagrams
            await asyncio.sleep(0.05)
            if prof is not None:
                prof.disable()
            per_call.append((time.process_time() - start - rig.peer_cpu) / calls)
        live = len(rig.node.calls.calls)
        if rig.pbx is not None:
            rig.pbx.close()
        rig.node.media.close()
        rig.store.close()
    out: dict[str, Any] = {"cpu_us_per_call_rounds": [round(x * 1e6, 1) for x in per_call],
                           "cpu_us_per_call": round(min(per_call) * 1e6, 1), "calls_left_live": live}
    if prof is not None:
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(30)
        out["profile"] = buf.getvalue()
        groups = profile_groups(stats)
        edge_total = sum(t for g, t in groups if not g.startswith("bench peers"))
        out["profile_groups_us_per_call"] = {g: round(t / (calls * rounds) * 1e6, 1) for g, t in groups}
        out["profile_groups_share_of_edge"] = {g: round(t / edge_total, 3) for g, t in groups
                                               if not g.startswith("bench peers")}
    return out


def count_instructions(calls: int, output: str, scenario: str = "call", transport: str = "udp") -> int:
    """Instructions of one call: callgrind totals of a run with ``calls`` and one with ``3*calls``."""
    import subprocess

    from bench.bench_register import ensure_debs

    ensure_debs({"valgrind": "valgrind"})  # Debian's valgrind, as the other benches install their peers

    totals = []
    for n in (calls, 3 * calls):
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
                                  sys.executable, "-m", "bench.bench_callpath", "--calls", str(n), "--rounds", "1",
                                  "--scenario", scenario, "--transport", transport,
                                  "--output", f"{tmp}/inner.json"], capture_output=True, text=True, timeout=3600,
                                 cwd=Path(__file__).resolve().parents[1])
        found = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or found is None:
            print(run.stdout[-2000:], run.stderr[-2000:], file=sys.stderr)
            return 1
        totals.append(int(found.group(1)))
    per_call = (totals[1] - totals[0]) / (2 * calls)
    path = write_result(output, {"bench": "callpath-instructions", "machine": machine_info(),
                                 "method": {"calls": [calls, 3 * calls], "scenario": scenario, "transport": transport,
                                            "tool": "valgrind --tool=callgrind"},
                                 "instructions_total": totals, "instructions_per_call": round(per_call)})
    print(f"instructions per {scenario} ({transport}): {per_call / 1e6:.3f} M (totals {totals}) -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also print where the time goes (cProfile)")
    ap.add_argument("--profile-groups", action="store_true",
                    help="cProfile, the own time of every function summed by layer (GROUPS)")
    ap.add_argument("--scenario", choices=("call", "register"), default="call",
                    help="a full call, or a digest registration (REGISTER, 401, REGISTER, 200)")
    ap.add_argument("--transport", choices=("udp", "tcp-framing", "tcp"), default="udp",
                    help="register scenario: how the PBX's messages arrive: datagrams handed to the boundary; "
                         "a TcpConnection fed directly (its framing only); or a real loopback TCP connection")
    ap.add_argument("--concurrent", type=int, default=1, metavar="K",
                    help="call scenario: K calls in progress at once, their steps interleaved as under SIPp's "
                         "load (at most the profile's 300 channels); 1: one call after the other")
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per call with callgrind (two runs: --calls and 3x --calls)")
    ap.add_argument("--output", default="callpath.json")
    args = ap.parse_args(argv)
    if args.instructions:
        return count_instructions(args.calls, args.output, args.scenario, args.transport)
    if args.concurrent > 1 and (args.scenario != "call" or args.instructions or not 1 < args.concurrent <= 300):
        ap.error("--concurrent: the call scenario only, 2..300 (the profile's channels), without --instructions")
    result = asyncio.run(measure(args.calls, args.rounds, args.profile or args.profile_groups, args.scenario,
                                 args.transport, args.concurrent))
    profile_text = result.pop("profile", None) if not args.profile_groups else None
    result.pop("profile", None)
    path = write_result(args.output, {"bench": "callpath", "machine": machine_info(),
                                      "method": {"calls": args.calls, "rounds": args.rounds,
                                                 "concurrent": args.concurrent,
                                                 "command": "python -m bench.bench_callpath " + " ".join(
                                                     argv if argv is not None else sys.argv[1:])},
                                      **result})
    print(f"CPU per {args.scenario}: {result['cpu_us_per_call']} us (rounds {result['cpu_us_per_call_rounds']}), "
          f"calls left live: {result['calls_left_live']}  -> {path}")
    if profile_text:
        print(profile_text)
    if args.profile_groups:
        print(f"own time by group, per {args.scenario} (cProfile: read the shares; its overhead and other "
              "processes inflate the times)")
        shares = result["profile_groups_share_of_edge"]
        for group, us in result["profile_groups_us_per_call"].items():
            share = f"{shares[group] * 100:5.1f} % of the edge" if group in shares else "   (not counted)"
            print(f"  {us:8.1f} us  {share}  {group}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
