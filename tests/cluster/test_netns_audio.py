"""Real calls with audio through two cluster nodes for one profile (issue 13 "How it is checked"),
on the namespace rig of tests/cluster/netnslab.py: 3 engine members, nodes A and B, a pjsua2 PBX
and a pjsua2 carrier, each on a host of its own.

A call does not cross nodes in this design (no forwarding yet, docs/cluster.md "What is left"), so
the PBX places two calls of the same profile at once, one through each node (an outbound proxy
each, the profile's credentials on both), each with a tone of its own: the profile's 2 channels
are both held in its journal, one by each node; each PBX call hears the carrier's tone, each of
the carrier's legs hears the tone of its own call (not the other's) and arrives from the node it
went through; afterwards every channel is back and each node's balance equals its ledger and the
journal's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

pytest.importorskip("pjsua2")

from clusternodes import CALLEE, everywhere, journal_of, same_cdrs
from e2e.pjua import PjUA
from e2e.test_calls_e2e import assert_hears
from edgeproc import EdgeProcess
from natscluster import NatsCluster
from netnslab import CARRIER, NODES, PBX, balance_and_ledger, hosts, nodes_at_once
from test_calls_raw import api_get, new_profile, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

DOMAIN = "sip.edge.test"
CARRIER_PORT = 5060          # the carrier's host is its own: the port is free
CARRIER_TONE = 1000.0
TONES = (440.0, 660.0)       # the PBX's tone in the call through node A, through node B
TALK = 1.5
LEASE = 3.0


class Rig:
    def __init__(self, cluster: NatsCluster, nodes: list[EdgeProcess], prof: dict, pbx: PjUA, carrier: PjUA) -> None:
        self.cluster, self.nodes, self.prof, self.pbx, self.carrier = cluster, nodes, prof, pbx, carrier


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with ExitStack() as stack:
        lab, cluster, tmp, pbx_ns, carrier_ns = hosts(tmp_path_factory, "netns-audio", stack, 2)
        with lab.inside(carrier_ns):
            carrier = PjUA("carrier", bind=CARRIER, port=CARRIER_PORT, log_dir=tmp / "uas")
        stack.callback(carrier.close)
        stack.enter_context(lab.inside(pbx_ns))     # the test's thread: API calls and probes cross the bridge
        pbx = PjUA("pbx", bind=PBX, log_dir=tmp / "uas")
        stack.callback(pbx.close)
        cluster.wait_ready()
        nodes = nodes_at_once(lab, stack, 2, tmp, cluster.urls, CARRIER_PORT, lease=LEASE)
        with nodes[0].client() as api:
            api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200"}]})
        prof = new_profile(nodes[0], channels=2)
        everywhere(nodes, [prof])
        yield Rig(cluster, nodes, prof, pbx, carrier)


def test_two_calls_of_one_profile_through_two_nodes_each_hear_their_own_audio(rig: Rig) -> None:
    user, password = rig.prof["sip_username"], rig.prof["sip_password"]
    rig.carrier.on_incoming(200, tone_hz=CARRIER_TONE)
    calls = [rig.pbx.call(f"sip:{CALLEE}@{DOMAIN}", from_user=user, domain=DOMAIN, auth=(user, password),
                          proxy=f"sip:{NODES[i]}:{n.sip_port};lr", tone_hz=TONES[i])
             for i, n in enumerate(rig.nodes)]
    for call in calls:
        call.wait_state("CONFIRMED", 15)
    rig.carrier.wait_incoming(2, 5)
    legs = {leg.info["src"].rsplit(":", 1)[0]: leg for leg in rig.carrier.incoming_calls}
    assert sorted(legs) == sorted(NODES[:2]), list(legs)       # one leg from each node's address
    for leg in legs.values():
        leg.wait_state("CONFIRMED", 5)
    # both of the profile's channels are held in its journal, one by each node
    holders = sorted(c.node.split(".")[0] for c in journal_of(rig.cluster, rig.prof["id"]).state.calls.values())
    assert holders == ["edge-a", "edge-b"]
    time.sleep(TALK)
    for call in calls:
        call.hangup(timeout=10)
    for leg in legs.values():
        leg.wait_state("DISCONNECTED", 10)
    for i, call in enumerate(calls):
        assert_hears(call.record_wav, CARRIER_TONE, TONES[i])
        assert_hears(legs[NODES[i]].record_wav, TONES[i], TONES[1 - i])     # its own call's tone, not the other's
    assert wait_for(lambda: journal_of(rig.cluster, rig.prof["id"]).state.channels_in_use == 0, timeout=10)
    journal = journal_of(rig.cluster, rig.prof["id"])
    assert len(journal.state.settled) == 2 and all(s.cost > 0 for s in journal.state.settled.values())
    owner = f"/v1/profiles/{rig.prof['id']}"
    for n in rig.nodes:
        assert wait_for(lambda n=n: api_get(n, owner)["channels_in_use"] == 0)
        # each node billed the call it carried, and both CDRs are on both nodes (from the journal's settlements)
        assert wait_for(lambda n=n: len([c for c in api_get(n, f"{owner}/cdrs")["items"] if c["answered_at"]]) == 2,
                        timeout=10), api_get(n, f"{owner}/cdrs")["items"]
        assert wait_for(lambda n=n: balance_and_ledger(n, owner) == (journal.balance, journal.balance), timeout=10)
    assert same_cdrs(rig.nodes, rig.prof) is not None          # the same CDRs, seq included, on both nodes
