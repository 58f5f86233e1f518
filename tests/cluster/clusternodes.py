"""What the cluster node tests share: a carrier that rings every call, a cluster of real nodes
that know the same profile, and what the journal and a node's metrics say about its channels.

Provisioning does not travel through the engine yet (docs/cluster.md "What is left"): every node
after the first starts on a hot backup of the first's store (``sipedge backup``), so all of them
know the same profile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from edgeproc import EdgeProcess
from natscluster import NatsCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sip"))
from rawsip import sdp
from test_calls_raw import Pbx, api_get, new_profile, wait_for

from edge.cluster.engine import Engine
from edge.cluster.journal import ProfileJournal
from edge.config import ClusterConfig
from edge.sip import build_response, parse

CALLEE = "+442071234567"


class RingingCarrier:
    """A carrier that rings (180) every INVITE from any node, answers one when told (:meth:`answer`)
    and answers BYE and CANCEL; ``events`` is what it heard, in order."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.2", 0))
        self.port = self.sock.getsockname()[1]
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind(("127.0.0.2", 0))
        self.rtp_port = self.rtp.getsockname()[1]
        self.ringing: dict[str, tuple[object, tuple[str, int]]] = {}   # Call-ID -> (INVITE, node address)
        self.events: list[tuple[str, str, int]] = []      # ("invite" | "cancel" | "bye", Call-ID, node port)

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
            elif msg.method == "BYE":
                self.events.append(("bye", msg.call_id, addr[1]))
                self.sock.sendto(build_response(msg, 200), addr)
            elif msg.method == "CANCEL":
                self.events.append(("cancel", msg.call_id, addr[1]))
                self.sock.sendto(build_response(msg, 200), addr)
                invite = self.ringing.pop(msg.call_id, None)
                if invite is not None:
                    self.sock.sendto(build_response(invite[0], 487, to_tag="ring"), invite[1])

    def answer(self, call_id: str) -> None:
        """Answer a ringing call (200 with SDP); it stays up until a BYE."""
        invite, addr = self.ringing.pop(call_id)
        body = sdp(self.rtp_port, host="127.0.0.2")
        self.sock.sendto(build_response(invite, 200, to_tag="ring", body=body,  # type: ignore[arg-type]
                                        headers=[("Contact", f"<sip:gw@127.0.0.2:{self.port}>"),
                                                 ("Content-Type", "application/sdp")]), addr)

    def refuse_all(self) -> None:
        """End every ringing call with 486 from the carrier (the edge ACKs it and frees the channel)."""
        for invite, addr in self.ringing.values():
            self.sock.sendto(build_response(invite, 486, to_tag="ring"), addr)
        self.ringing.clear()

    def close(self) -> None:
        self.sock.close()
        self.rtp.close()


def journal_of(cluster: NatsCluster, profile_id: str) -> ProfileJournal:
    """The profile's journal, replayed from the engine by a process of its own (the test's)."""
    async def read() -> ProfileJournal:
        engine = await Engine.connect(ClusterConfig(node="probe", engine=cluster.urls, lease_seconds=3))
        try:
            return await ProfileJournal.open(engine, profile_id)
        finally:
            await engine.nc.close()

    return asyncio.run(read())


def journal_channels(cluster: NatsCluster, profile_id: str) -> int:
    return journal_of(cluster, profile_id).state.channels_in_use


def cluster_nodes(engines: list[list[str]], carrier: RingingCarrier, tmp_path_factory: pytest.TempPathFactory, *,
                  channels: int, lease: float = 3.0, ports: int = 16000, workers: int = 2,
                  credit: str = "5.00") -> Iterator[tuple[list[EdgeProcess], dict]]:
    """Nodes edge-a, edge-b, ... reaching the engine at ``engines[i]``, started at once on empty
    stores, and a profile of ``channels`` created on the first: every node has it through the
    cluster's provisioning (docs/cluster.md "Provisioning on any node") before this yields."""

    def config(name: str, urls: list[str]) -> str:
        engine = ", ".join(f'"{url}"' for url in urls)
        return (f'[cluster]\nnode = "{name}"\nengine = [{engine}]\nlease_seconds = {lease}\n'
                f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n')

    # media ports below the range EdgeProcess picks by default (other test processes may hold those)
    nodes = [EdgeProcess(tmp_path_factory.mktemp(name), extra_config=config(f"edge-{name}", urls),
                         sip_extra="rate_limit = 0", workers=workers,
                         media_ports=(ports + 500 * i, ports + 500 * i + 499))
             for i, (name, urls) in enumerate(zip("abcdefgh", engines, strict=False))]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
            for started in [pool.submit(node.start, timeout=40) for node in nodes]:
                started.result()
        with nodes[0].client() as api:
            api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200"}]})
        prof = new_profile(nodes[0], channels=channels, credit=credit)
        everywhere(nodes, [prof])
        yield nodes, prof
    finally:
        for node in nodes:
            node.stop()


def everywhere(nodes: list[EdgeProcess], profiles: list[dict], timeout: float = 10.0) -> None:
    """Until every node has each of ``profiles`` with the balance the first node shows (the cluster's
    provisioning and the journal bring them)."""
    for prof in profiles:
        path = f"/v1/profiles/{prof['id']}"
        balance = api_get(nodes[0], path)["balance"]
        for node in nodes[1:]:
            assert wait_for(lambda node=node, path=path, balance=balance: api_get(node, path).get("balance") == balance,
                            timeout=timeout), f"{node.data}: {path} did not arrive"


def node_pair(engine_a: list[str], engine_b: list[str], carrier: RingingCarrier,
              tmp_path_factory: pytest.TempPathFactory, *, channels: int, lease: float = 3.0,
              ports: int = 16000, credit: str = "5.00") -> Iterator[tuple[EdgeProcess, EdgeProcess, dict]]:
    nodes = cluster_nodes([engine_a, engine_b], carrier, tmp_path_factory, channels=channels, lease=lease,
                          ports=ports, credit=credit)
    (a, b), prof = next(nodes)
    try:
        yield a, b, prof
    finally:
        nodes.close()


def metric_sum(node: EdgeProcess, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (the node's /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(httpx.get(node.base + "/metrics",
                                                                                   timeout=10).text)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


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


def cdr_rows(node: EdgeProcess, prof: dict) -> list[tuple[int, str, str, str]]:
    """The profile's CDRs as ``node`` answers: (seq, call id, end reason, cost), in seq order."""
    return [(c["seq"], c["call_id"], c["end_reason"], c["cost"])
            for c in api_get(node, f"/v1/profiles/{prof['id']}/cdrs?limit=1000")["items"]]


def same_cdrs(nodes: tuple[EdgeProcess, ...] | list[EdgeProcess], prof: dict) -> list[tuple[int, str, str, str]] | None:
    """The profile's CDRs if every node of ``nodes`` answers the same ones, ``seq`` included (the
    journal's stream sequence of each: docs/cluster.md "CDRs on every node"), and no call has two;
    else None."""
    first, *rest = [cdr_rows(node, prof) for node in nodes]
    if any(rows != first for rows in rest) or len({call_id for _, call_id, _, _ in first}) != len(first):
        return None
    return first


def invite_at_once(nodes: tuple[EdgeProcess, ...], prof: dict, carrier: RingingCarrier,
                   per_node: int) -> tuple[list[Pbx], list[dict], list[int | None]]:
    """``per_node`` authenticated INVITEs through each node, back to back; the carrier rings what
    reaches it. :returns: the PBXs, their dialogs and each one's final status (None: ringing)."""
    pbxs = [Pbx(node) for node in nodes for _ in range(per_node)]
    dialogs = [pbx.invite(prof, CALLEE) for pbx in pbxs]
    assert all(d["first"].status == 407 for d in dialogs)
    carrier.take(timeout=4.0)
    finals: list[int | None] = []
    for pbx in pbxs:
        try:
            finals.append(pbx.recv_final(timeout=0.5).status)
        except TimeoutError:
            finals.append(None)
    return pbxs, dialogs, finals


def ring(node: EdgeProcess, prof: dict, carrier: RingingCarrier, count: int) -> list[Pbx]:
    """``count`` calls through ``node``, each ringing at the carrier (every INVITE must get through)."""
    pbxs = []
    before = len(carrier.ringing)
    for _ in range(count):
        pbx = Pbx(node)
        pbxs.append(pbx)
        pbx.invite(prof, CALLEE)
    deadline = time.monotonic() + 15
    while len(carrier.ringing) < before + count and time.monotonic() < deadline:
        carrier.take(timeout=0.5)
    assert len(carrier.ringing) == before + count
    return pbxs


def admitted(new_pbx: Callable[[], Pbx], prof: dict, carrier: RingingCarrier, timeout: float,
             made: list[Pbx] | None = None) -> Pbx | None:
    """INVITEs from a new PBX each (``new_pbx``) until one reaches the carrier (bounded); that call's
    PBX, left ringing. An INVITE with no final answer yet is on its way to the carrier: it is waited
    for, so a later attempt's PBX is never taken for the one that got through."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pbx = new_pbx()
        if made is not None:
            made.append(pbx)
        before = len(carrier.ringing)
        pbx.invite(prof, CALLEE)
        carrier.take(timeout=0.5)
        if len(carrier.ringing) == before:
            try:
                pbx.recv_final(timeout=1.0)       # refused (486 busy, 503 fenced): try again
            except TimeoutError:
                carrier.take(timeout=2.0)         # no answer: admitted, still on its way
        if len(carrier.ringing) > before:
            return pbx
        if made is None:
            pbx.close()
        time.sleep(0.2)
    return None


def verdict_after_healing(new_pbx: Callable[[], Pbx], prof: dict, made: list[Pbx], timeout: float = 20.0) -> int:
    """A healed node answers 503 until its agent holds its new lease, then the journal's verdict:
    INVITEs from a new PBX each until the answer is not 503 (bounded). :returns: that answer."""
    deadline = time.monotonic() + timeout
    while True:
        pbx = new_pbx()
        made.append(pbx)
        pbx.invite(prof, CALLEE)
        status = pbx.recv_final(timeout=8).status
        if status != 503 or time.monotonic() > deadline:
            return status
        time.sleep(0.5)
