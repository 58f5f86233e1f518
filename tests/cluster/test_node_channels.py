"""Two real cluster nodes on a 3-member engine share a profile's channels through its journal
(docs/cluster.md "Channels across nodes"): INVITEs sent to both nodes at once never put more
calls on the carrier than the profile's ``channels``, and every channel comes back, also when
the worker that carried a call is killed or the whole node dies (tests/cluster/clusternodes.py
has the rig)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from clusternodes import (
    CALLEE,
    RingingCarrier,
    cdr_rows,
    drift,
    invite_at_once,
    journal_channels,
    metric_sum,
    node_pair,
    recovery_cdrs,
    ring,
    same_cdrs,
)
from edgeproc import EdgeProcess, node_children
from natscluster import NatsCluster
from test_calls_raw import Pbx, api_get, wait_for

pytestmark = pytest.mark.timeout(240)

CHANNELS = 2
PER_NODE = 3


@pytest.fixture(scope="module")
def nodes(engine_cluster: NatsCluster, carrier: RingingCarrier,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EdgeProcess, EdgeProcess, dict]]:
    yield from node_pair(engine_cluster.urls, engine_cluster.urls, carrier, tmp_path_factory, channels=CHANNELS)


def test_two_nodes_never_put_more_calls_than_channels_on_the_carrier(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    pbxs, _dialogs, finals = invite_at_once((a, b), prof, carrier, PER_NODE)    # None: ringing, holds a channel
    try:
        assert len(carrier.ringing) == CHANNELS, finals
        assert sorted(s for s in finals if s is not None) == [486] * (2 * PER_NODE - CHANNELS)
        assert journal_channels(engine_cluster, prof["id"]) == CHANNELS
        # each node refuses with its own count first (a third INVITE while it holds or waits for two)
        # or with the journal's: either way 486, and the journal confirmed exactly `channels`
        assert sum(metric_sum(n, "edge_cluster_reservations_total", result="ok") for n in (a, b)) == CHANNELS
        assert sum(metric_sum(n, "edge_calls_rejected_total", rule="channels", status="486")
                   for n in (a, b)) == 2 * PER_NODE - CHANNELS
        for node in (a, b):     # both ringing calls are counted alike by store, workers and journal
            assert wait_for(lambda n=node: drift(n) == (0.0, 0.0)), drift(node)
        status = subprocess.run([sys.executable, "-m", "edge.cli", "cluster", "status", "--profiles", "--json",
                                 "--config", str(a.config)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        (seen,) = [c for c in json.loads(status.stdout)["channels"] if c["profile"] == prof["id"]]
        assert seen["open"] == CHANNELS and sum(seen["holders"].values()) == CHANNELS
        carrier.refuse_all()
        for pbx, final in zip(pbxs, finals, strict=True):
            if final is None:
                assert pbx.recv_final(timeout=5).status == 486
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=10)
        for node in (a, b):
            assert wait_for(lambda n=node: api_get(n, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0)
            assert wait_for(lambda n=node: drift(n) == (0.0, 0.0)), drift(node)
    finally:
        for pbx in pbxs:
            pbx.close()


def test_a_killed_worker_gives_its_channels_back_to_the_cluster(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    (pbx,) = ring(b, prof, carrier, 1)
    try:
        assert journal_channels(engine_cluster, prof["id"]) == 1
        for role, pid in node_children(b).items():      # one of them carries the call: both go, and both come back
            if role.startswith("worker"):
                os.kill(pid, signal.SIGKILL)
        # restarted, each worker settles what it left (CDR recovery); the agent appends it to the journal
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=20)
        assert wait_for(lambda: api_get(b, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0, timeout=10)
        # its one CDR came back through the journal: the same on both nodes, seq included
        assert wait_for(lambda: recovery_cdrs(b, prof) == 1 and same_cdrs((a, b), prof), timeout=5), \
            (cdr_rows(a, prof), cdr_rows(b, prof))
    finally:
        carrier.ringing.clear()
        pbx.close()


def test_a_dead_nodes_channels_are_freed_by_the_survivor_and_its_return_settles_nothing_twice(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    (pbx,) = ring(b, prof, carrier, 1)
    try:
        assert journal_channels(engine_cluster, prof["id"]) == 1
        assert b.proc is not None
        recovered_on_a = recovery_cdrs(a, prof)
        b.proc.kill()           # the supervisor: its children die with it (PR_SET_PDEATHSIG)
        b.proc.wait()
        # node A sees B's lease age out (3 s), confirms its end and settles B's reservation
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=20)
        assert wait_for(lambda: "open reservations of edge-b." in a.log.read_text(), timeout=5)
        assert wait_for(lambda: recovery_cdrs(a, prof) == recovered_on_a + 1, timeout=5)   # A's CDR of it
        b.start(timeout=40)     # back: its workers settle the call in LMDB; the journal refuses a second Settle
        assert wait_for(lambda: api_get(b, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0, timeout=10)
        assert wait_for(lambda: drift(b) == (0.0, 0.0), timeout=10), drift(b)
        # one CDR of the call, A's, on both nodes: B's own (its workers' recovery) went with its refused Settle
        assert wait_for(lambda: same_cdrs((a, b), prof) is not None, timeout=10), (cdr_rows(a, prof), cdr_rows(b, prof))
        assert recovery_cdrs(b, prof) == recovery_cdrs(a, prof) == recovered_on_a + 1
        assert journal_channels(engine_cluster, prof["id"]) == 0
    finally:
        carrier.ringing.clear()
        pbx.close()


def test_a_survivor_sends_bye_to_the_legs_of_a_dead_nodes_answered_call(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    (pbx,) = ring(b, prof, carrier, 1)
    try:
        (call_id,) = carrier.ringing
        carrier.answer(call_id)
        ok = pbx.recv_final(timeout=5)
        assert ok.status == 200
        pbx.send(pbx.request("ACK", f"sip:{CALLEE}@sip.edge.test", from_user=prof["sip_username"], to_user="x",
                             call_id=ok.call_id, cseq=2, from_tag=ok.from_tag, to_tag=ok.to_tag))
        time.sleep(1.5)         # B's agent publishes its answered calls every 0.5 s
        assert b.proc is not None
        b.proc.kill()
        b.proc.wait()
        # a survivor settles B's reservation and one of its workers BYEs both legs from its own address
        deadline = time.monotonic() + 20
        while ("bye", call_id, a.sip_port) not in carrier.events and time.monotonic() < deadline:
            carrier.take(timeout=0.5)
        assert ("bye", call_id, a.sip_port) in carrier.events
        bye = pbx.recv(timeout=5)
        assert bye.is_request and bye.method == "BYE" and bye.call_id == ok.call_id
        assert "Edge node lost" in (bye.header("Reason") or "")
        assert journal_channels(engine_cluster, prof["id"]) == 0
        b.start(timeout=40)
    finally:
        carrier.ringing.clear()
        pbx.close()


def test_every_node_lists_the_profiles_live_calls_of_every_node(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], carrier: RingingCarrier) -> None:
    a, b, prof = nodes
    path = f"/v1/profiles/{prof['id']}/calls"

    def listed(node: EdgeProcess) -> list[tuple[str, str, bool]]:
        return [(c["call_id"], c["node"], c["answered_at"] is not None) for c in api_get(node, path)]

    def same_everywhere() -> list[tuple[str, str, bool]] | None:
        seen = listed(a)
        return seen if seen == listed(b) else None

    ringing, answered = Pbx(a), Pbx(b)
    try:
        ringing.invite(prof, CALLEE)
        d = answered.invite(prof, CALLEE)
        deadline = time.monotonic() + 10
        while len(carrier.ringing) < 2 and time.monotonic() < deadline:
            carrier.take(timeout=0.3)
        # both ringing: each node lists both, its own from its store and the other's from the journal
        assert wait_for(lambda: (s := same_everywhere()) and sorted(n for _, n, _ in s) == ["edge-a", "edge-b"],
                        timeout=5), (listed(a), listed(b))
        (b_leg,) = [cid for cid, (_, addr) in carrier.ringing.items() if addr[1] == b.sip_port]
        carrier.answer(b_leg)
        ok = answered.recv_final(timeout=5)
        assert ok.status == 200
        answered.ack(d, ok.to_tag)
        # answered through B: A shows it answered once B's agent published the record (every 0.5 s)
        assert wait_for(lambda: (s := same_everywhere()) and sorted((n, up) for _, n, up in s)
                        == [("edge-a", False), ("edge-b", True)], timeout=5), (listed(a), listed(b))
        (b_call,) = [cid for cid, n, _ in listed(a) if n == "edge-b"]
        carrier.refuse_all()            # A's ringing call ends: B's is the profile's only call
        assert wait_for(lambda: listed(a) == listed(b) == [(b_call, "edge-b", True)], timeout=10), listed(a)
        with a.client() as api:
            # a profile with a call on another node is not deleted (nothing changes)
            kept = api.delete(f"/v1/profiles/{prof['id']}")
            assert kept.status_code == 409 and kept.json()["code"] == "profile_has_live_calls", kept.text
            # hung up through A: A's agent relays it to B's, which records it; B's worker ends the call
            asked = api.post(f"/v1/calls/{b_call}/hangup", json={"cause": 487})
            assert asked.status_code == 202, asked.text
            assert (asked.json()["call_id"], asked.json()["state"]) == (b_call, "pending")
            gone = api.post("/v1/calls/no-such-call/hangup", json={})
            assert gone.status_code == 404, gone.text
        deadline = time.monotonic() + 10
        while not any(kind == "bye" and port == b.sip_port for kind, _, port in carrier.events) \
                and time.monotonic() < deadline:
            carrier.take(timeout=0.3)   # the edge's BYE to the carrier, from B
        assert any(kind == "bye" and port == b.sip_port for kind, _, port in carrier.events)
        assert wait_for(lambda: listed(a) == listed(b) == [], timeout=10), (listed(a), listed(b))
        with b.client() as api:         # the request is B's, done
            assert wait_for(lambda: api.get(f"/v1/profiles/{prof['id']}/cdrs").json()["items"][-1]["call_id"]
                            == b_call, timeout=5)
    finally:
        carrier.ringing.clear()
        ringing.close()
        answered.close()
