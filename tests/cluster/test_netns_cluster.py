"""The cluster on real interfaces (issue 13 "How it is checked"): 3 engine members, 3 sipedge
nodes, the PBX and the carrier each on a host (network namespace) of its own, on one bridge
(tests/cluster/netnslab.py). The channel race across all three nodes; a node killed -9 with its
link down, freed by the survivors and back without settling twice. (Not here yet: the partition
and audio through two nodes.)"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from clusternodes import CALLEE, journal_channels, metric_sum, recovery_cdrs
from edgeproc import EdgeProcess
from natscluster import NatsCluster, nats_server
from net.netns import NetnsUnavailable, check_available
from netnslab import CARRIER, NODES, PBX, ClusterLab, NsCarrier, NsPbx, engine, kill_node, node
from test_calls_raw import api_get, new_profile, wait_for

pytestmark = pytest.mark.timeout(180)

CHANNELS = 2
PER_NODE = 3
LEASE = 3.0


class Rig:
    def __init__(self, lab: ClusterLab, cluster: NatsCluster, carrier: NsCarrier, nodes: list[EdgeProcess],
                 prof: dict) -> None:
        self.lab, self.cluster, self.carrier, self.nodes, self.prof = lab, cluster, carrier, nodes, prof

    def pbx(self, i: int) -> NsPbx:
        return NsPbx(self.nodes[i], NODES[i])

    def in_use(self, i: int) -> int:
        return int(api_get(self.nodes[i], f"/v1/profiles/{self.prof['id']}")["channels_in_use"])

    def journal(self) -> int:
        return journal_channels(self.cluster, self.prof["id"])


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    if nats_server() is None:
        pytest.skip("Debian nats-server is needed (make system-deps)")
    tmp: Path = tmp_path_factory.mktemp("netns-cluster")
    with ExitStack() as stack:
        lab = stack.enter_context(ClusterLab(uuid.uuid4().hex[:4]))
        cluster = engine(lab, tmp / "nats")
        for i, addr in enumerate(NODES):
            lab.attach(f"n{i}", addr)
        pbx_ns = lab.attach("pbx", PBX)
        lab.attach("carrier", CARRIER)
        stack.callback(cluster.stop)
        cluster.start()
        carrier = NsCarrier(lab)
        stack.callback(carrier.close)
        # the test's thread lives on the PBX host: API calls, PBXs and engine probes cross the bridge
        stack.enter_context(lab.inside(pbx_ns))
        cluster.wait_ready()
        nodes: list[EdgeProcess] = []
        for i in range(len(NODES)):
            n = node(lab, i, tmp / f"edge-{'abc'[i]}", cluster.urls, carrier, lease=LEASE,
                     first=nodes[0] if nodes else None)
            stack.callback(n.stop)
            nodes.append(n)
            if i == 0:
                with n.client() as api:
                    api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200"}]})
                prof = new_profile(n, channels=CHANNELS)
        yield Rig(lab, cluster, carrier, nodes, prof)


def test_the_channel_race_across_three_nodes_on_their_own_hosts(rig: Rig) -> None:
    pbxs = [rig.pbx(i) for i in range(len(rig.nodes)) for _ in range(PER_NODE)]
    try:
        dialogs = [pbx.invite(rig.prof, CALLEE) for pbx in pbxs]    # 3 x 3 authenticated INVITEs, back to back
        assert all(d["first"].status == 407 for d in dialogs)
        rig.carrier.take(timeout=4.0)
        finals = []
        for pbx in pbxs:
            try:
                finals.append(pbx.recv_final(timeout=0.5).status)
            except TimeoutError:
                finals.append(None)        # ringing: the call holds a channel
        assert len(rig.carrier.ringing) == CHANNELS, finals
        assert sorted(s for s in finals if s is not None) == [486] * (len(pbxs) - CHANNELS)
        assert rig.journal() == CHANNELS
        assert sum(metric_sum(n, "edge_cluster_reservations_total", result="ok") for n in rig.nodes) == CHANNELS
        rig.carrier.refuse_all()
        for pbx, status in zip(pbxs, finals, strict=True):
            if status is None:
                assert pbx.recv_final(timeout=5).status == 486
        assert wait_for(lambda: rig.journal() == 0, timeout=10)
        for i in range(len(rig.nodes)):
            assert wait_for(lambda i=i: rig.in_use(i) == 0), i
    finally:
        for pbx in pbxs:
            pbx.close()


def test_a_node_killed_with_its_link_down_is_freed_by_the_survivors_and_rejoins(rig: Rig) -> None:
    victim = 2
    pbx = rig.pbx(victim)
    try:
        pbx.invite(rig.prof, CALLEE)
        deadline = time.monotonic() + 10
        while not rig.carrier.ringing and time.monotonic() < deadline:
            rig.carrier.take(timeout=0.5)
        assert len(rig.carrier.ringing) == 1
        assert rig.journal() == 1
        kill_node(rig.nodes[victim])
        rig.lab.links(f"n{victim}", up=False)
        # a survivor sees the lease age out, settles the dead node's reservation (docs/cluster.md)
        assert wait_for(lambda: rig.journal() == 0, timeout=20)
        rig.lab.links(f"n{victim}", up=True)
        with rig.lab.inside(rig.lab.ns[f"n{victim}"]):
            rig.nodes[victim].start(timeout=40)
        assert wait_for(lambda: rig.in_use(victim) == 0, timeout=10)
        assert recovery_cdrs(rig.nodes[victim], rig.prof) >= 1
        assert rig.journal() == 0      # its own recovery Settle is refused by the journal: nothing twice
    finally:
        rig.carrier.ringing.clear()
        pbx.close()
