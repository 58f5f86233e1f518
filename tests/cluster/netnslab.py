"""A cluster on real interfaces: every engine member, sipedge node, PBX and the carrier on a host
(network namespace) of its own, all on one bridge (tests/cluster/test_netns_cluster.py).

The bridge lives in a namespace of its own (``sw``), so nothing is added to the machine's
namespace; each host has one veth ``eth0`` into it with an address of ``NET``. The test's thread
runs in the PBX host (:meth:`ClusterLab.inside`), so its sockets, its API clients and its engine
probes all cross the bridge. A node's processes (supervisor, agent, workers) are started in the
node's host and stay there: their abstract unix socket is per namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from clusternodes import RingingCarrier
from edgeproc import EdgeProcess, node_children
from natscluster import NatsCluster
from net.netns import Lab, ip
from rawsip import RawSip
from test_calls_raw import Pbx

NET = "10.77.0"
ENGINES = [f"{NET}.{11 + i}" for i in range(3)]
NODES = [f"{NET}.{21 + i}" for i in range(3)]
PBX = f"{NET}.31"
CARRIER = f"{NET}.41"


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


def engine(lab: ClusterLab, root: Path) -> NatsCluster:
    names = [f"e{i}" for i in range(len(ENGINES))]
    for name, addr in zip(names, ENGINES, strict=True):
        lab.attach(name, addr)
    return NatsCluster(root, hosts=ENGINES, wrap=[["ip", "netns", "exec", lab.ns[n]] for n in names])


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


class NsPbx(Pbx):
    """A raw SIP PBX on the PBX host, talking to ``node`` at its address (made in the PBX host)."""

    def __init__(self, node: EdgeProcess, host: str) -> None:
        RawSip.__init__(self, node.sip_port, bind=PBX, edge_host=host)
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((PBX, 0))
        self.rtp_port = self.rtp.getsockname()[1]


def node(lab: ClusterLab, i: int, tmp: Path, engines: list[str], carrier: NsCarrier, *, lease: float,
         first: EdgeProcess | None) -> EdgeProcess:
    """Node ``edge-<a|b|c>`` on its host, listening on its address (SIP, media and API); every node
    after the first starts on a hot backup of the first's store (clusternodes.cluster_nodes)."""
    name = "abc"[i]
    urls = ", ".join(f'"{u}"' for u in engines)
    extra = (f'[cluster]\nnode = "edge-{name}"\nengine = [{urls}]\nlease_seconds = {lease}\n'
             f'[[carriers]]\nuri = "sip:{CARRIER}:{carrier.port}"\npriority = 1\nweight = 100\n')
    tmp.mkdir(parents=True, exist_ok=True)
    edge = EdgeProcess(tmp, extra_config=extra, sip_extra="rate_limit = 0", workers=2, trusted=[f"{CARRIER}/32"],
                       media_ports=(16000 + 500 * i, 16499 + 500 * i))
    edge.config.write_text(edge.config.read_text().replace("127.0.0.1", NODES[i]))
    edge.base = f"http://{NODES[i]}:{edge.api_port}"
    with lab.inside(lab.ns[f"n{i}"]):
        if first is not None:
            subprocess.run([sys.executable, "-m", "edge.cli", "backup", str(edge.data), "--config",
                            str(first.config)], check=True, capture_output=True, timeout=60)
        edge.start(timeout=40)
    return edge


def kill_node(edge: EdgeProcess) -> None:
    """SIGKILL to the node's supervisor and each of its children at once. EdgeProcess starts the
    supervisor in the test's own process group, so a killpg here would take pytest with it."""
    assert edge.proc is not None
    pids = [edge.proc.pid, *node_children(edge).values()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    edge.proc.wait(10)
