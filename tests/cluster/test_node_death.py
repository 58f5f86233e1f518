"""Three cluster nodes; node B dies (SIGKILL to its supervisor, its children die with it) while it
carries 50 calls of a profile of 50 channels (docs/cluster.md "A node that dies"):
the survivors free all 50 channels in the journal within the lease plus the sweep, nodes A and C
then carry the profile's 50 calls between them, and B, started again, settles its 50 calls in its
own store without settling anything twice in the journal: the survivor's CDRs (``recovery``) are
the calls' only ones, and every node has them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from clusternodes import (
    CALLEE,
    RingingCarrier,
    cluster_nodes,
    drift,
    journal_channels,
    recovery_cdrs,
    ring,
    same_cdrs,
)
from edgeproc import EdgeProcess
from natscluster import NatsCluster
from test_calls_raw import Pbx, api_get, wait_for

pytestmark = pytest.mark.timeout(300)

CALLS = 50
LEASE = 3.0


@pytest.fixture(scope="module")
def nodes(engine_cluster: NatsCluster, carrier: RingingCarrier,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[EdgeProcess], dict]]:
    # one worker each: three nodes of two workers on two cores would test the machine, not the cluster
    yield from cluster_nodes([engine_cluster.urls] * 3, carrier, tmp_path_factory, channels=CALLS, lease=LEASE,
                             ports=18000, workers=1)


def test_a_dead_nodes_fifty_calls_are_freed_and_not_settled_twice(
        nodes: tuple[list[EdgeProcess], dict], carrier: RingingCarrier, engine_cluster: NatsCluster) -> None:
    (a, b, c), prof = nodes
    pbxs: list[Pbx] = []
    try:
        pbxs += ring(b, prof, carrier, CALLS)
        assert journal_channels(engine_cluster, prof["id"]) == CALLS
        busy = Pbx(a)
        pbxs.append(busy)
        busy.invite(prof, CALLEE)
        assert busy.recv_final(timeout=5).status == 486      # the 51st, on another node
        assert b.proc is not None
        killed = time.monotonic()
        b.proc.kill()
        b.proc.wait()
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=6 * LEASE)
        freed = time.monotonic() - killed
        def swept() -> list[int]:   # the survivor logs once it has settled and dropped the index key
            return [int(m) for m in re.findall(r"settled (\d+) open reservations of edge-b\.",
                                               a.log.read_text() + c.log.read_text())]

        assert wait_for(lambda: sum(swept()) == CALLS, timeout=5), swept()   # one survivor (rendezvous), all 50
        # ... whose 50 Settles carry their CDRs (recovery; ringing, never answered, billed 0): on both survivors
        assert wait_for(lambda: recovery_cdrs(a, prof) == recovery_cdrs(c, prof) == CALLS, timeout=5)
        carrier.ringing.clear()                      # B's calls: the carrier would time them out
        pbxs += ring(a, prof, carrier, CALLS // 2)
        pbxs += ring(c, prof, carrier, CALLS - CALLS // 2)
        assert journal_channels(engine_cluster, prof["id"]) == CALLS
        b.start(timeout=40)
        assert wait_for(lambda: api_get(b, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0, timeout=15)
        # B's agent drains its outbox: 50 Settles, each refused as the survivor's, so B's own CDRs go;
        # B writes the survivor's from the journal: one CDR per call, the same on every node
        assert wait_for(lambda: drift(b) == (0.0, 0.0), timeout=15), drift(b)
        assert wait_for(lambda: same_cdrs((a, b, c), prof) is not None, timeout=10)
        assert recovery_cdrs(a, prof) == recovery_cdrs(b, prof) == recovery_cdrs(c, prof) == CALLS
        assert journal_channels(engine_cluster, prof["id"]) == CALLS
        print(f"50 channels of a dead node freed {freed:.1f} s after the kill (lease {LEASE:g} s)")
        carrier.refuse_all()
        assert wait_for(lambda: journal_channels(engine_cluster, prof["id"]) == 0, timeout=15)
    finally:
        carrier.ringing.clear()
        for pbx in pbxs:
            pbx.close()
