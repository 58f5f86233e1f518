"""A cluster on real interfaces: every engine member, sipedge node, PBX and the carrier on a host
(network namespace) of its own, all on one bridge (tests/cluster/test_netns_cluster.py).

The bridge lives in a namespace of its own (``sw``), so nothing is added to the machine's
namespace; each host has one veth ``eth0`` into it with an address of ``NET``. The test's thread
runs in the PBX host (:meth:`ClusterLab.inside`), so its sockets, its API clients and its engine
probes all cross the bridge. A node's processes (supervisor, agent, workers) are started in the
node's host and stay there: their abstract unix socket is per namespace. The node's supervisor
leads a session of its own (its children lead one each, edge/processes.py), so :func:`kill_node`
can SIGKILL every process group of the node at once without touching pytest's.

Two faults: :meth:`ClusterLab.links` takes a host's link down (its carrier lost, as a dead host's);
:meth:`ClusterLab.cut` drops, inside one host, every packet to or from the engine's hosts while the
rest of its traffic (PBX, carrier, API) flows: a partition between a node and the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import pytest
from clusternodes import RingingCarrier
from edgeproc import EdgeProcess, node_children
from nats.js.errors import NoKeysError
from natscluster import NatsCluster, nats_server
from net.netns import Lab, NetnsUnavailable, check_available, ip
from rawsip import RawSip, sdp
from test_calls_raw import Pbx, api_get

from edge.cluster.engine import Engine
from edge.cluster.journal import AccountJournal
from edge.config import ClusterConfig
from edge.sip import build_response

NET = "10.77.0"
ENGINES = [f"{NET}.{11 + i}" for i in range(3)]
NODES = [f"{NET}.{21 + i}" for i in range(3)]
PBX = f"{NET}.31"
CARRIER = f"{NET}.41"

T = TypeVar("T")


class ClusterLab(Lab):
    """A star: ``sw`` holds bridge ``br0``; every :meth:`attach`-ed host hangs off it."""

    def __init__(self, tag: str = "") -> None:
        super().__init__(tag)
        self.addr: dict[str, str] = {}     # short name -> address
        self.ns: dict[str, str] = {}       # short name -> namespace
        self.sw = self.host("sw")
        ip("-n", self.sw, "link", "add", "br0", "type", "bridge")
        ip("-n", self.sw, "link", "set", "br0", "up")

    def attach(self, name: str, addr: str) -> str:
        ns = self.host(name)
        port = f"p-{name}"
        ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.sw)
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", self.sw, "link", "set", port, "master", "br0")
        ip("-n", self.sw, "link", "set", port, "up")
        self.addr[name], self.ns[name] = addr, ns
        return ns

    def links(self, name: str, up: bool) -> None:
        """The host's link to the bridge down (its carrier lost) or back up."""
        ip("-n", self.ns[name], "link", "set", "eth0", "up" if up else "down")
        if up:   # a link set down loses its routes with the address kept: the /24 comes back with it
            ip("-n", self.ns[name], "route", "replace", f"{NET}.0/24", "dev", "eth0")

    @contextlib.contextmanager
    def cut(self, name: str, peers: list[str]) -> Iterator[None]:
        """Inside host ``name``, drop every packet to or from ``peers`` (both ways, silently: no
        RST, no ICMP, as across a partition) until the block ends; its other traffic flows."""
        addrs = ", ".join(peers)
        rules = (f"table inet cut {{\n set peers {{ type ipv4_addr; elements = {{ {addrs} }}; }}\n"
                 f" chain in {{ type filter hook input priority 0; ip saddr @peers drop; }}\n"
                 f" chain out {{ type filter hook output priority 0; ip daddr @peers drop; }}\n}}\n")
        nft(self.ns[name], rules)
        try:
            yield
        finally:
            nft(self.ns[name], "delete table inet cut\n")


def nft(ns: str, rules: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {done.stderr.strip()}")


def engine(lab: ClusterLab, root: Path) -> NatsCluster:
    names = [f"e{i}" for i in range(len(ENGINES))]
    for name, addr in zip(names, ENGINES, strict=True):
        lab.attach(name, addr)
    return NatsCluster(root, hosts=ENGINES, wrap=[["ip", "netns", "exec", lab.ns[n]] for n in names])


def hosts(tmp_path_factory: pytest.TempPathFactory, name: str, stack: ExitStack, nodes: int
          ) -> tuple[ClusterLab, NatsCluster, Path, str, str]:
    """The lab of a test module (skipped without namespaces or nats-server): the engine's hosts and
    ``nodes`` node hosts, a PBX and a carrier host on the bridge, the engine started (stopped with
    ``stack``). :returns: the lab, the engine, the module's directory, the PBX's and the carrier's
    namespaces."""
    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    if nats_server() is None:
        pytest.skip("Debian nats-server is needed (make system-deps)")
    tmp: Path = tmp_path_factory.mktemp(name)
    lab = stack.enter_context(ClusterLab(uuid.uuid4().hex[:4]))
    cluster = engine(lab, tmp / "nats")
    for i in range(nodes):
        lab.attach(f"n{i}", NODES[i])
    pbx_ns, carrier_ns = lab.attach("pbx", PBX), lab.attach("carrier", CARRIER)
    stack.callback(cluster.stop)
    cluster.start()
    return lab, cluster, tmp, pbx_ns, carrier_ns


class NsCarrier(RingingCarrier):
    """The ringing carrier, bound on the carrier host's address."""

    def __init__(self, lab: ClusterLab) -> None:
        with lab.inside(lab.ns["carrier"]):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((CARRIER, 0))
            self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.rtp.bind((CARRIER, 0))
        self.port = self.sock.getsockname()[1]
        self.rtp_port = self.rtp.getsockname()[1]
        self.ringing = {}
        self.events = []

    def answer(self, call_id: str) -> None:
        """Answer a ringing call (200 with SDP and a Contact on the carrier's host)."""
        invite, addr = self.ringing.pop(call_id)
        self.sock.sendto(build_response(invite, 200, to_tag="ring", body=sdp(self.rtp_port, host=CARRIER),  # type: ignore[arg-type]
                                        headers=[("Contact", f"<sip:gw@{CARRIER}:{self.port}>"),
                                                 ("Content-Type", "application/sdp")]), addr)
        self.events.append(("answer", call_id, addr[1]))

    def refuse_all(self) -> None:
        for call_id, (_, addr) in self.ringing.items():
            self.events.append(("refuse", call_id, addr[1]))
        super().refuse_all()

    def peak(self, since: int = 0) -> int:
        """The most calls in progress at once at the carrier (rung and not yet cancelled, refused or
        hung up), over :attr:`events` from index ``since``."""
        up: set[str] = set()
        most = 0
        for kind, call_id, _ in self.events[since:]:
            if kind == "invite":
                up.add(call_id)
                most = max(most, len(up))
            elif kind in ("cancel", "bye", "refuse"):
                up.discard(call_id)
        return most


class NsPbx(Pbx):
    """A raw SIP PBX on the PBX host, talking to ``node`` at its address (made in the PBX host)."""

    def __init__(self, node: EdgeProcess, host: str) -> None:
        RawSip.__init__(self, node.sip_port, bind=PBX, edge_host=host)
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((PBX, 0))
        self.rtp_port = self.rtp.getsockname()[1]


def node(lab: ClusterLab, i: int, tmp: Path, engines: list[str], carrier_port: int, *, lease: float) -> EdgeProcess:
    """Node ``edge-<a|b|c>`` on its host, listening on its address (SIP, media and API), its carrier
    ``CARRIER:carrier_port``, started on an empty store (it gets the cluster's provisioning from the
    engine: docs/cluster.md "Provisioning on any node")."""
    name = "abc"[i]
    urls = ", ".join(f'"{u}"' for u in engines)
    extra = (f'[cluster]\nnode = "edge-{name}"\nengine = [{urls}]\nlease_seconds = {lease}\n'
             f'[[carriers]]\nuri = "sip:{CARRIER}:{carrier_port}"\npriority = 1\nweight = 100\n')
    tmp.mkdir(parents=True, exist_ok=True)
    edge = EdgeProcess(tmp, extra_config=extra, sip_extra="rate_limit = 0", workers=2, trusted=[f"{CARRIER}/32"],
                       media_ports=(16000 + 500 * i, 16499 + 500 * i))
    edge.config.write_text(edge.config.read_text().replace("127.0.0.1", NODES[i]))
    edge.base = f"http://{NODES[i]}:{edge.api_port}"
    start_node(lab, i, edge)
    return edge


def nodes_at_once(lab: ClusterLab, stack: ExitStack, count: int, tmp: Path, engines: list[str], carrier_port: int,
                  *, lease: float) -> list[EdgeProcess]:
    """``count`` nodes started at once, each on its host (a thread each: a namespace is per thread),
    each stopped when ``stack`` closes."""
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(node, lab, i, tmp / f"edge-{'abc'[i]}", engines, carrier_port, lease=lease)
                   for i in range(count)]
        concurrent.futures.wait(futures)
    nodes = []
    for future in futures:
        if future.exception() is None:
            n = future.result()
            stack.callback(n.stop, drain_wait=1.0)   # a drain waits for INVITE transactions whose ACK never comes
            nodes.append(n)
    for future in futures:
        if (exc := future.exception()) is not None:
            raise exc
    return nodes


def start_node(lab: ClusterLab, i: int, edge: EdgeProcess) -> None:
    """Start (or start again) node ``i`` in its host, its supervisor leading a session of its own."""
    with lab.inside(lab.ns[f"n{i}"]):
        edge.start(timeout=40, new_session=True)


def kill_node(edge: EdgeProcess) -> list[int]:
    """SIGKILL to every process group of the node at once: the supervisor's (a session of its own,
    :func:`start_node`) and each child's (the supervisor starts each in a session of its own).
    :returns: the pids killed, all gone when this returns."""
    assert edge.proc is not None
    pids = [edge.proc.pid, *node_children(edge).values()]
    groups = {os.getpgid(pid) for pid in pids}
    assert os.getpgrp() not in groups
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    edge.proc.wait(10)
    deadline = time.monotonic() + 10       # the children are reaped by init once their parent is gone
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def probe(cluster: NatsCluster, lease: float, read: Callable[[Engine], Awaitable[T]]) -> T:
    """``await read(engine)`` on a connection of the test's own to the engine."""
    async def run() -> T:
        engine = await Engine.connect(ClusterConfig(node="probe", engine=cluster.urls, lease_seconds=lease))
        try:
            return await read(engine)
        finally:
            await engine.nc.close()

    return asyncio.run(run())


def published_calls(cluster: NatsCluster, node_name: str, lease: float) -> int:
    """How many answered calls of ``node_name`` its agent has published for the survivors (the
    engine's ``sipedge_calls`` bucket: what a survivor BYEs if the node dies)."""
    async def read(engine: Engine) -> int:
        kv = await engine.bucket("sipedge_calls")
        try:
            keys = await kv.keys()
        except NoKeysError:
            return 0
        return sum(key.startswith(f"{node_name}.") for key in keys)

    return probe(cluster, lease, read)


def account_balance(cluster: NatsCluster, account_id: str, lease: float) -> tuple[int, int]:
    """(balance, sum of its movements) of the account's journal, replayed by the test."""
    async def read(engine: Engine) -> tuple[int, int]:
        journal = await AccountJournal.open(engine, account_id)
        return journal.balance, sum(e.amount for e in journal.entries())

    return probe(cluster, lease, read)


def micro(text: str) -> int:
    return int(Decimal(text) * 1_000_000)


def balance_and_ledger(edge: EdgeProcess, owner: str) -> tuple[int, int]:
    """The node's balance of ``owner`` (``/v1/profiles/<id>`` or ``/v1/accounts/<id>``) and the sum of
    its ledger there, in micro-units."""
    total, after = 0, 0
    for _ in range(100):
        page = api_get(edge, f"{owner}/ledger?after={after}&limit=1000")
        total += sum(micro(e["amount"]) for e in page["items"])
        if not page.get("next_after"):
            return micro(api_get(edge, owner)["balance"]), total
        after = page["next_after"]
    raise AssertionError(f"{owner}: more than 100 000 ledger entries")
