"""A real ``sipedge serve`` node in a cluster: its agent holds the lease in a 3-member engine, and the
SIP workers admit calls only while it does (SPEC §9 "a node cut off from the engine admits no call").

The calls are to the echo number (answered by the edge itself: no carrier needed), from a raw-socket
PBX; the engine is frozen (SIGSTOP on every member) to cut the node off, and the agent process is
killed during a call to show that its successor goes on with the lease and the call survives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from edgeproc import EdgeProcess, node_children
from natscluster import NatsCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sip"))
from test_calls_raw import Pbx, api_get, new_profile, wait_for

from edge.cluster.link import RESERVE_TIMEOUT

pytestmark = pytest.mark.timeout(180)

ECHO = "+17606604690"
LEASE = 3.0


@pytest.fixture(scope="module")
def node(engine_cluster: NatsCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeProcess]:
    engine = ", ".join(f'"{url}"' for url in engine_cluster.urls)
    extra = f'[cluster]\nnode = "edge-a"\nengine = [{engine}]\nlease_seconds = {LEASE}\n'
    with EdgeProcess(tmp_path_factory.mktemp("node"), extra_config=extra, sip_extra="rate_limit = 0") as edge:
        yield edge


def echo_call(edge: EdgeProcess, prof: dict) -> tuple[int, str]:
    """Status and Warning of the final answer to an echo call (an answered one is hung up at once)."""
    pbx = Pbx(edge)
    try:
        d = pbx.invite(prof, ECHO)
        final = pbx.recv_final(timeout=RESERVE_TIMEOUT + 3)      # a frozen engine: 503 after the link's timeout
        if final.status == 200:
            pbx.ack(d, final.to_tag)
            assert pbx.bye(d, final.to_tag).status == 200
        return final.status, final.header("Warning") or ""
    finally:
        pbx.close()


def until_status(edge: EdgeProcess, prof: dict, status: int, timeout: float, warning: str = "") -> tuple[int, str]:
    """Place echo calls until one is answered with ``status`` (and a Warning holding ``warning``),
    bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = echo_call(edge, prof)
        if (got[0] == status and warning in got[1]) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def metric(edge: EdgeProcess, name: str) -> float | None:
    for line in httpx.get(edge.base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def agent_pid(edge: EdgeProcess) -> int:
    return node_children(edge)["cluster"]


def test_a_node_with_its_lease_admits_calls(node: EdgeProcess) -> None:
    prof = new_profile(node, credit="0")
    assert echo_call(node, prof)[0] == 200
    assert metric(node, "edge_cluster_lease_held") == 1.0
    assert metric(node, "edge_cluster_members") == 1.0
    assert api_get(node, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0
    status = subprocess.run([sys.executable, "-m", "edge.cli", "status", "--config", str(node.config)],
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "cluster   lease held, 1 members" in status.stdout


def test_cut_off_from_the_engine_it_admits_nothing_and_heals(node: EdgeProcess, engine_cluster: NatsCluster) -> None:
    prof = new_profile(node, credit="0")
    assert until_status(node, prof, 200, timeout=30)[0] == 200
    for i in range(3):
        engine_cluster.freeze(i)
    try:
        # the first calls may wait for the journal and hear "the cluster did not confirm a channel"
        # (503 as well); once the lease has run out the fence answers at once
        status, warning = until_status(node, prof, 503, timeout=3 * LEASE + RESERVE_TIMEOUT,
                                       warning="cut off from its cluster")
        assert status == 503 and "cut off from its cluster" in warning
        # still refused while cut off: the workers' record does not outlive the agent's belief
        time.sleep(LEASE)
        assert echo_call(node, prof)[0] == 503
    finally:
        for i in range(3):
            engine_cluster.thaw(i)
    assert until_status(node, prof, 200, timeout=30)[0] == 200
    # (a loaded engine can still be electing leaders right after the thaw: the lease may flap once more)
    assert wait_for(lambda: metric(node, "edge_cluster_lease_held") == 1.0, timeout=30)
    assert api_get(node, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0


def test_a_restarted_agent_goes_on_with_the_lease_and_the_calls_go_on(node: EdgeProcess) -> None:
    prof = new_profile(node, credit="0")
    assert until_status(node, prof, 200, timeout=30)[0] == 200    # (the engine may still settle after a thaw)
    pbx = Pbx(node)
    try:
        d = pbx.invite(prof, ECHO)      # a call that stays up through the agent's restart
        ok = pbx.recv_final()
        assert ok.status == 200
        pbx.ack(d, ok.to_tag)
        old = agent_pid(node)
        os.kill(old, signal.SIGKILL)
        # the supervisor starts it again and it renews the same lease before the node's belief ends
        assert wait_for(lambda: "goes on with its lease" in node.log.read_text(), timeout=20)
        assert agent_pid(node) != old
        assert until_status(node, prof, 200, timeout=20)[0] == 200
        assert pbx.bye(d, ok.to_tag).status == 200          # the call was never ended by the edge
        def ends() -> list[str]:
            return [c["end_reason"] for c in api_get(node, f"/v1/profiles/{prof['id']}/cdrs")["items"]]

        assert wait_for(lambda: "caller_bye" in ends(), timeout=10), ends()
        assert "cluster_lease" not in ends()
    finally:
        pbx.close()
