"""A partition between one node and the engine (docs/cluster.md "A node that dies", the partition
paragraph): node B's links to the engine go through a relay the test cuts, its links to the PBX and
the carrier stay up. The profile has one channel and B carries its call when the cut comes.

What must hold: B ends its call before node A may reuse the channel (the carrier sees B's CANCEL
before A's INVITE: never two calls on one channel), B refuses new calls while cut off, A admits the
profile's call once B's lease has ended, and after the heal B is exact again (busy while A's call
holds the channel, admitted once it ended).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clusternodes import (
    CALLEE,
    RingingCarrier,
    admitted,
    cdr_rows,
    journal_channels,
    journal_of,
    node_pair,
    same_cdrs,
    verdict_after_healing,
)
from edgeproc import EdgeProcess
from engineproxy import EngineProxy
from natscluster import NatsCluster
from test_calls_raw import Pbx, api_get, wait_for

pytestmark = pytest.mark.timeout(240)

LEASE = 3.0


@pytest.fixture(scope="module")
def proxy(engine_cluster: NatsCluster) -> Iterator[EngineProxy]:
    p = EngineProxy(engine_cluster.urls)
    yield p
    p.close()


@pytest.fixture(scope="module")
def nodes(engine_cluster: NatsCluster, proxy: EngineProxy, carrier: RingingCarrier,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EdgeProcess, EdgeProcess, dict]]:
    yield from node_pair(engine_cluster.urls, proxy.urls, carrier, tmp_path_factory, channels=1, lease=LEASE,
                         ports=17000)


def final_status(pbx: Pbx, timeout: float) -> int | None:
    try:
        return pbx.recv_final(timeout=timeout).status
    except TimeoutError:
        return None


def admitted_through(node: EdgeProcess, prof: dict, carrier: RingingCarrier, timeout: float) -> Pbx | None:
    return admitted(lambda: Pbx(node), prof, carrier, timeout)


def test_a_partitioned_node_ends_its_call_before_another_reuses_the_channel(
        nodes: tuple[EdgeProcess, EdgeProcess, dict], proxy: EngineProxy, carrier: RingingCarrier,
        engine_cluster: NatsCluster) -> None:
    a, b, prof = nodes
    through_b = admitted_through(b, prof, carrier, timeout=10)
    assert through_b is not None
    b_call = next(iter(carrier.ringing))
    assert journal_channels(engine_cluster, prof["id"]) == 1
    pbxs = [through_b]
    try:
        with proxy.partitioned():
            # B's lease runs out: it ends its call (CANCEL to the carrier, 503 to the PBX)
            carrier.take(timeout=2 * LEASE)
            assert ("cancel", b_call) in [(kind, cid) for kind, cid, _ in carrier.events]
            assert final_status(through_b, 2.0) == 503
            refused = Pbx(b)
            pbxs.append(refused)
            refused.invite(prof, CALLEE)
            assert refused.recv_final(timeout=3).status == 503
            # A admits the profile's one channel once B's lease ended and B's reservation was settled
            through_a = admitted_through(a, prof, carrier, timeout=6 * LEASE)
            assert through_a is not None
            pbxs.append(through_a)
            order = [(kind, cid) for kind, cid, _ in carrier.events]
            a_call = next(cid for cid in carrier.ringing if cid != b_call)
            assert order.index(("cancel", b_call)) < order.index(("invite", a_call))
            assert len(carrier.ringing) == 1
        # healed: B takes a new lease and is exact again -- busy while A's call holds the channel
        assert wait_for(lambda: "new epoch" in b.log.read_text().split("lease ran out")[-1], timeout=30)
        assert verdict_after_healing(lambda: Pbx(b), prof, pbxs) == 486
        carrier.refuse_all()            # A's call ends
        assert final_status(through_a, 5.0) == 486
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=10)
        again = admitted_through(b, prof, carrier, timeout=10)
        assert again is not None
        pbxs.append(again)
        carrier.refuse_all()
        assert final_status(again, 5.0) == 486
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=10)
        for node in (a, b):
            assert wait_for(lambda n=node: api_get(n, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0)
        # B's fenced call was settled in the journal by A (recovery, at 0: it never answered): its one
        # CDR is A's, on both nodes; B's own (cluster_lease) is dropped once the journal refuses B's Settle
        fenced = [cid for cid, s in journal_of(engine_cluster, prof["id"]).state.settled.items() if s.recovery]
        assert len(fenced) == 1

        def cdrs_of_fenced() -> list[tuple[int, str, str, str]]:
            return [row for row in same_cdrs((a, b), prof) or [] if row[1] in fenced]

        assert wait_for(lambda: [r for _, _, r, _ in cdrs_of_fenced()] == ["recovery"], timeout=10), \
            (cdr_rows(a, prof), cdr_rows(b, prof))
    finally:
        carrier.ringing.clear()
        for pbx in pbxs:
            pbx.close()
