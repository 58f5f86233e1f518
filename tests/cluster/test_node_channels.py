"""Two real cluster nodes on a 3-member engine share a profile's channels through its journal
(docs/cluster.md "Channels across nodes"): INVITEs sent to both nodes at once never put more
calls on the carrier than the profile's ``channels``, and every channel comes back, also when
the worker that carried a call is killed.

Provisioning does not travel through the engine yet (docs/cluster.md "What is left"): node B
starts on a hot backup of node A's store (``sipedge backup``), so both know the same profile.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from edgeproc import EdgeProcess
from natscluster import NatsCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sip"))
from test_calls_raw import Pbx, api_get, new_profile, wait_for

from edge.cluster.engine import Engine
from edge.cluster.journal import ProfileJournal
from edge.config import ClusterConfig
from edge.sip import build_response, parse

pytestmark = pytest.mark.timeout(240)

CALLEE = "+442071234567"
CHANNELS = 2
PER_NODE = 3


class RingingCarrier:
    """A carrier that rings (180) every INVITE from any node and never answers it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.2", 0))
        self.port = self.sock.getsockname()[1]
        self.ringing: dict[str, tuple[object, tuple[str, int]]] = {}   # Call-ID -> (INVITE, node address)
        self.events: list[tuple[str, str, int]] = []                   # ("invite" | "cancel", Call-ID, node port)

    def take(self, timeout: float) -> None:
        """Ring every new INVITE arriving within ``timeout``; answer CANCELs (200 + 487)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                return
            msg = parse(data)
            if not msg.is_request:
                continue
            if msg.method == "INVITE" and msg.call_id not in self.ringing:
                self.ringing[msg.call_id] = (msg, addr)
                self.events.append(("invite", msg.call_id, addr[1]))
                self.sock.sendto(build_response(msg, 180, to_tag="ring"), addr)
            elif msg.method == "CANCEL":
                self.events.append(("cancel", msg.call_id, addr[1]))
                self.sock.sendto(build_response(msg, 200), addr)
                invite = self.ringing.pop(msg.call_id, None)
                if invite is not None:
                    self.sock.sendto(build_response(invite[0], 487, to_tag="ring"), invite[1])

    def refuse_all(self) -> None:
        """End every ringing call with 486 from the carrier (the edge ACKs it and frees the channel)."""
        for invite, addr in self.ringing.values():
            self.sock.sendto(build_response(invite, 486, to_tag="ring"), addr)
        self.ringing.clear()

    def close(self) -> None:
        self.sock.close()


def journal_channels(cluster: NatsCluster, profile_id: str) -> int:
    async def read() -> int:
        engine = await Engine.connect(ClusterConfig(node="probe", engine=cluster.urls, lease_seconds=3))
        try:
            journal = await ProfileJournal.open(engine, profile_id)
            return journal.state.channels_in_use
        finally:
            await engine.nc.close()

    return asyncio.run(read())


@pytest.fixture(scope="module")
def carrier() -> Iterator[RingingCarrier]:
    c = RingingCarrier()
    yield c
    c.close()


@pytest.fixture(scope="module")
def nodes(engine_cluster: NatsCluster, carrier: RingingCarrier,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EdgeProcess, EdgeProcess, dict]]:
    yield from node_pair(engine_cluster.urls, engine_cluster.urls, carrier, tmp_path_factory, channels=CHANNELS)


def cluster_nodes(engines: list[list[str]], carrier: RingingCarrier, tmp_path_factory: pytest.TempPathFactory, *,
                  channels: int, lease: float = 3.0, ports: int = 16000,
                  workers: int = 2) -> Iterator[tuple[list[EdgeProcess], dict]]:
    """Nodes edge-a, edge-b, ... reaching the engine at ``engines[i]``, and a profile of ``channels``
    all of them know (each node after the first starts on a hot backup of the first's store)."""

    def config(name: str, urls: list[str]) -> str:
        engine = ", ".join(f'"{url}"' for url in urls)
        return (f'[cluster]\nnode = "{name}"\nengine = [{engine}]\nlease_seconds = {lease}\n'
                f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n')

    nodes: list[EdgeProcess] = []
    try:
        for i, urls in enumerate(engines):
            name = "abcdefgh"[i]
            # media ports below the range EdgeProcess picks by default (other test processes may hold those)
            node = EdgeProcess(tmp_path_factory.mktemp(name), extra_config=config(f"edge-{name}", urls),
                               sip_extra="rate_limit = 0", workers=workers,
                               media_ports=(ports + 500 * i, ports + 500 * i + 499))
            if nodes:
                subprocess.run([sys.executable, "-m", "edge.cli", "backup", str(node.data), "--config",
                                str(nodes[0].config)], check=True, capture_output=True)
            nodes.append(node.start(timeout=40))
            if i == 0:
                with node.client() as api:
                    api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200"}]})
                prof = new_profile(node, channels=channels)
        yield nodes, prof
    finally:
        for node in nodes:
            node.stop()


def node_pair(engine_a: list[str], engine_b: list[str], carrier: RingingCarrier,
              tmp_path_factory: pytest.TempPathFactory, *, channels: int, lease: float = 3.0,
              ports: int = 16000) -> Iterator[tuple[EdgeProcess, EdgeProcess, dict]]:
    nodes = cluster_nodes([engine_a, engine_b], carrier, tmp_path_factory, channels=channels, lease=lease,
                          ports=ports)
    (a, b), prof = next(nodes)
    try:
        yield a, b, prof
    finally:
        nodes.close()


def test_two_nodes_never_put_more_calls_than_channels_on_the_carrier(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    pbxs = [Pbx(node) for node in (a, b) for _ in range(PER_NODE)]
    try:
        dialogs = [pbx.invite(prof, CALLEE) for pbx in pbxs]     # 2 x 3 authenticated INVITEs, back to back
        assert all(d["first"].status == 407 for d in dialogs)
        carrier.take(timeout=4.0)
        finals = []
        for pbx in pbxs:
            try:
                finals.append(pbx.recv_final(timeout=0.5).status)
            except TimeoutError:
                finals.append(None)        # ringing: the call holds a channel
        assert len(carrier.ringing) == CHANNELS, finals
        assert sorted(s for s in finals if s is not None) == [486] * (2 * PER_NODE - CHANNELS)
        assert journal_channels(engine_cluster, prof["id"]) == CHANNELS
        for node in (a, b):     # both ringing calls are counted alike by store, workers and journal
            assert wait_for(lambda n=node: drift(n) == (0.0, 0.0)), drift(node)
        status = subprocess.run([sys.executable, "-m", "edge.cli", "cluster", "status", "--profiles", "--json",
                                 "--config", str(a.config)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        (seen,) = [c for c in json.loads(status.stdout)["channels"] if c["profile"] == prof["id"]]
        assert seen["open"] == CHANNELS and sum(seen["holders"].values()) == CHANNELS
        carrier.refuse_all()
        for pbx, status in zip(pbxs, finals, strict=True):
            if status is None:
                assert pbx.recv_final(timeout=5).status == 486
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=10)
        for node in (a, b):
            assert wait_for(lambda n=node: api_get(n, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0)
            assert wait_for(lambda n=node: drift(n) == (0.0, 0.0)), drift(node)
    finally:
        for pbx in pbxs:
            pbx.close()


def drift(node: EdgeProcess) -> tuple[float | None, float | None]:
    """(edge_channels_drift, edge_cluster_channels_drift) of the node's /metrics."""
    values: dict[str, float] = {}
    for line in httpx.get(node.base + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("edge_channels_drift", "edge_cluster_channels_drift"):
            values[name] = float(value)
    return values.get("edge_channels_drift"), values.get("edge_cluster_channels_drift")


def recovery_cdrs(node: EdgeProcess, prof: dict) -> int:
    return sum(c["end_reason"] == "recovery" for c in api_get(node, f"/v1/profiles/{prof['id']}/cdrs")["items"])


def worker_pids(node: EdgeProcess) -> list[int]:
    assert node.proc is not None
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == node.proc.pid and b"worker" in cmdline:
            out.append(int(entry.name))
    return out


def test_a_killed_worker_gives_its_channels_back_to_the_cluster(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    pbx = Pbx(b)
    try:
        pbx.invite(prof, CALLEE)
        carrier.take(timeout=2.0)
        assert len(carrier.ringing) == 1
        assert journal_channels(engine_cluster, prof["id"]) == 1
        for pid in worker_pids(b):      # one of them carries the call: both go, and both come back
            os.kill(pid, signal.SIGKILL)
        # restarted, each worker settles what it left (CDR recovery); the agent appends it to the journal
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=20)
        assert wait_for(lambda: api_get(b, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0, timeout=10)
        assert recovery_cdrs(b, prof) == 1
    finally:
        carrier.ringing.clear()
        pbx.close()


def test_a_dead_nodes_channels_are_freed_by_the_survivor_and_its_return_settles_nothing_twice(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    pbx = Pbx(b)
    try:
        pbx.invite(prof, CALLEE)
        carrier.take(timeout=2.0)
        assert len(carrier.ringing) == 1
        assert journal_channels(engine_cluster, prof["id"]) == 1
        assert b.proc is not None
        b.proc.kill()           # the supervisor: its children die with it (PR_SET_PDEATHSIG)
        b.proc.wait()
        # node A sees B's lease age out (3 s), confirms its end and settles B's reservation
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=20)
        assert "open reservations of edge-b." in a.log.read_text()
        b.start(timeout=40)     # back: its workers settle the call in LMDB; the journal refuses a second Settle
        assert wait_for(lambda: api_get(b, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0, timeout=10)
        assert recovery_cdrs(b, prof) == 2
        assert journal_channels(engine_cluster, prof["id"]) == 0
    finally:
        carrier.ringing.clear()
        pbx.close()
