"""The cluster on real interfaces (issue 13 "How it is checked"): 3 engine members, 3 sipedge
nodes, the PBX and the carrier each on a host (network namespace) of its own, on one bridge
(tests/cluster/netnslab.py), one rig for the module:

- the channel race across all three nodes (the carrier never sees more than ``channels``);
- kill -9 of a node carrying 50 answered calls (SIGKILL to its process groups, its link down): the
  survivors free its channels in the journal, BYE the carrier's and the PBX's legs, and every
  node's balance equals its ledger and the journal's; back (link up, started again) it settles the
  same calls in its own store and nothing twice (journal, recovery CDRs, money);
- a partition (the node's packets to and from the engine's hosts dropped, its PBX and carrier
  reachable): it ends its call at the fencing instant and answers 503, another node takes the
  profile's one channel only after that (the carrier's count never exceeds it), and once healed
  the node admits again.
Real audio through two nodes: tests/cluster/test_netns_audio.py."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from clusternodes import (
    CALLEE,
    admitted,
    drift,
    everywhere,
    journal_of,
    metric_sum,
    recovery_cdrs,
    same_cdrs,
    verdict_after_healing,
)
from edgeproc import EdgeProcess
from natscluster import NatsCluster
from netnslab import (
    ENGINES,
    NODES,
    ClusterLab,
    NsCarrier,
    NsPbx,
    account_balance,
    balance_and_ledger,
    hosts,
    kill_node,
    nodes_at_once,
    published_calls,
    start_node,
)
from test_calls_raw import api_get, new_profile, wait_for

from edge.sip import build_response

pytestmark = pytest.mark.timeout(180)

CHANNELS = 2
PER_NODE = 3
CALLS = 50
LEASE = 3.0
# docs/cluster.md "A node that dies": a dead node's channels are free within the lease (it ages
# out) + one sweep period (a lease) + a few round trips; the waits below allow twice that (2 cores
# shared with other test runs) and print what was measured
FREED_BOUND = 2 * LEASE + 1.0


class Rig:
    def __init__(self, lab: ClusterLab, cluster: NatsCluster, carrier: NsCarrier, nodes: list[EdgeProcess],
                 profiles: dict[str, dict]) -> None:
        self.lab, self.cluster, self.carrier, self.nodes = lab, cluster, carrier, nodes
        self.prof, self.big, self.solo = profiles["race"], profiles["big"], profiles["solo"]

    def pbx(self, i: int) -> NsPbx:
        return NsPbx(self.nodes[i], NODES[i])

    def in_use(self, i: int, prof: dict | None = None) -> int:
        return int(api_get(self.nodes[i], f"/v1/profiles/{(prof or self.prof)['id']}")["channels_in_use"])

    def journal(self, prof: dict | None = None) -> int:
        return journal_of(self.cluster, (prof or self.prof)["id"]).state.channels_in_use


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with ExitStack() as stack:
        lab, cluster, tmp, pbx_ns, _ = hosts(tmp_path_factory, "netns-cluster", stack, len(NODES))
        carrier = NsCarrier(lab)
        stack.callback(carrier.close)
        # the test's thread lives on the PBX host: API calls, PBXs and engine probes cross the bridge
        stack.enter_context(lab.inside(pbx_ns))
        cluster.wait_ready()
        nodes = nodes_at_once(lab, stack, len(NODES), tmp, cluster.urls, carrier.port, lease=LEASE)
        with nodes[0].client() as api:     # provisioned on one node, every node has it
            api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200"}]})
        profiles = {"race": new_profile(nodes[0], channels=CHANNELS), "big": new_profile(nodes[0], channels=CALLS),
                    "solo": new_profile(nodes[0], channels=1)}
        everywhere(nodes, list(profiles.values()))
        yield Rig(lab, cluster, carrier, nodes, profiles)


def cdrs_of(node: EdgeProcess, prof: dict) -> list[dict]:
    return api_get(node, f"/v1/profiles/{prof['id']}/cdrs")["items"]


def final_status(pbx: NsPbx, timeout: float) -> int | None:
    try:
        return pbx.recv_final(timeout=timeout).status
    except TimeoutError:
        return None


def test_the_channel_race_across_three_nodes_on_their_own_hosts(rig: Rig) -> None:
    mark = len(rig.carrier.events)
    pbxs = [rig.pbx(i) for i in range(len(rig.nodes)) for _ in range(PER_NODE)]
    try:
        dialogs = [pbx.invite(rig.prof, CALLEE) for pbx in pbxs]    # 3 x 3 authenticated INVITEs, back to back
        assert all(d["first"].status == 407 for d in dialogs)
        rig.carrier.take(timeout=4.0)
        finals = [final_status(pbx, 0.5) for pbx in pbxs]      # None: ringing, the call holds a channel
        assert len(rig.carrier.ringing) == CHANNELS, finals
        assert sorted(s for s in finals if s is not None) == [486] * (len(pbxs) - CHANNELS)
        assert rig.journal() == CHANNELS
        assert sum(metric_sum(n, "edge_cluster_reservations_total", result="ok") for n in rig.nodes) == CHANNELS
        rig.carrier.refuse_all()
        for pbx, status in zip(pbxs, finals, strict=True):
            if status is None:
                assert pbx.recv_final(timeout=5).status == 486
        assert rig.carrier.peak(since=mark) == CHANNELS
        assert wait_for(lambda: rig.journal() == 0, timeout=10)
        for i in range(len(rig.nodes)):
            assert wait_for(lambda i=i: rig.in_use(i) == 0), i
    finally:
        for pbx in pbxs:
            pbx.close()


def money_agrees(rig: Rig, live: list[int], prof: dict) -> bool:
    """On every live node, the profile's and its account's balance equal their ledger there and the
    journal's (the account's is a journal of its own)."""
    profile, account = f"/v1/profiles/{prof['id']}", f"/v1/accounts/{prof['account_id']}"
    journal = journal_of(rig.cluster, prof["id"])
    p_balance = journal.balance
    assert p_balance == sum(e.amount for e in journal.entries())
    a_balance, a_entries = account_balance(rig.cluster, prof["account_id"], LEASE)
    assert a_balance == a_entries
    return all(balance_and_ledger(rig.nodes[i], profile) == (p_balance, p_balance)
               and balance_and_ledger(rig.nodes[i], account) == (a_balance, a_balance) for i in live)


def answered_through(rig: Rig, i: int, prof: dict, count: int, pbxs: list[NsPbx]) -> list[tuple[NsPbx, str]]:
    """``count`` calls through node ``i``, each rung and answered by the carrier and ACKed by its
    PBX. :returns: each call's PBX and the Call-ID the carrier saw."""
    calls = []
    for _ in range(count):
        pbx = rig.pbx(i)
        pbxs.append(pbx)
        calls.append((pbx, pbx.invite(prof, CALLEE)))
    deadline = time.monotonic() + 20
    while len(rig.carrier.ringing) < count and time.monotonic() < deadline:
        rig.carrier.take(timeout=0.5)
    assert len(rig.carrier.ringing) == count
    carrier_ids = list(rig.carrier.ringing)
    for call_id in carrier_ids:
        rig.carrier.answer(call_id)
    for pbx, d in calls:
        ok = pbx.recv_final(timeout=5)
        assert ok.status == 200
        pbx.ack(d, ok.to_tag)
    return list(zip([pbx for pbx, _ in calls], carrier_ids, strict=True))


def bye_of(pbx: NsPbx, timeout: float) -> str | None:
    """The Reason of the BYE the PBX gets within ``timeout`` (answered 200), or None."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = pbx.recv(timeout=left)
        except TimeoutError:
            return None
        if msg.is_request and msg.method == "BYE":
            pbx.send(build_response(msg, 200))
            return msg.header("Reason") or ""
    return None


def test_a_node_killed_with_fifty_calls_and_its_link_down_is_settled_once(rig: Rig) -> None:
    victim, survivors = 2, [0, 1]
    prof, carrier = rig.big, rig.carrier

    def recovery_cdrs_everywhere() -> int:
        return sum(recovery_cdrs(n, prof) for n in rig.nodes)

    carrier.ringing.clear()
    pbxs: list[NsPbx] = []
    try:
        before = journal_of(rig.cluster, prof["id"]).balance
        calls = answered_through(rig, victim, prof, CALLS, pbxs)
        assert rig.journal(prof) == CALLS
        journal = journal_of(rig.cluster, prof["id"])
        reserved = sum(c.reserved for c in journal.state.calls.values())
        assert reserved > 0 and journal.balance == before - reserved     # each call's first slice
        # a survivor BYEs only the calls the victim's agent published (every 0.5 s)
        assert wait_for(lambda: published_calls(rig.cluster, "edge-c", LEASE) == CALLS, timeout=10)

        pids = kill_node(rig.nodes[victim])
        killed = time.monotonic()
        rig.lab.links(f"n{victim}", up=False)
        assert pids and rig.nodes[victim].proc is not None and rig.nodes[victim].proc.returncode == -9
        assert wait_for(lambda: rig.journal(prof) == 0, timeout=2 * FREED_BOUND)
        freed = time.monotonic() - killed
        for i in survivors:
            assert rig.in_use(i, prof) == 0
        # the survivor that settled the calls BYEs both legs of each from its own address
        byes: set[str] = set()
        ports = {rig.nodes[i].sip_port for i in survivors}
        deadline = time.monotonic() + 15
        while len(byes) < CALLS and time.monotonic() < deadline:
            carrier.take(timeout=0.5)
            byes = {cid for kind, cid, port in carrier.events if kind == "bye" and port in ports}
        assert byes >= {cid for _, cid in calls}
        reasons = [bye_of(pbx, timeout=5) for pbx, _ in calls]
        assert all(r is not None and "Edge node lost" in r for r in reasons), reasons
        # the money: each call billed its reservation once, by a survivor (settle_open, recovery)
        journal = journal_of(rig.cluster, prof["id"])
        recovered = [s for s in journal.state.settled.values() if s.recovery]
        assert len(recovered) == CALLS and sum(s.cost for s in recovered) == reserved
        assert journal.balance == before - reserved
        assert wait_for(lambda: money_agrees(rig, survivors, prof), timeout=10)
        # ... whose Settles carry their CDRs (recovery, from what the victim published): on both survivors
        assert wait_for(lambda: all(recovery_cdrs(rig.nodes[i], prof) == CALLS for i in survivors), timeout=10)
        # the survivors carry the profile's calls (one each), then end them
        for i in survivors:
            pbxs.append(p := rig.pbx(i))
            p.invite(prof, CALLEE)
        deadline = time.monotonic() + 10
        while len(carrier.ringing) < len(survivors) and time.monotonic() < deadline:
            carrier.take(timeout=0.5)
        assert len(carrier.ringing) == len(survivors) == rig.journal(prof)
        carrier.refuse_all()
        assert wait_for(lambda: rig.journal(prof) == 0, timeout=10)

        # back: link up, started again; its workers settle the same 50 calls in its store, its agent's
        # Settles are refused by the journal as the survivor's, so their CDRs are dropped (the
        # survivor's are the calls'), and its ledger and CDRs follow the journal
        rig.lab.links(f"n{victim}", up=True)
        start_node(rig.lab, victim, rig.nodes[victim])
        assert wait_for(lambda: rig.in_use(victim, prof) == 0, timeout=10)
        # its outbox drained (the cluster drift counts its rows) and nothing it counts is open
        assert wait_for(lambda: drift(rig.nodes[victim]) == (0.0, 0.0), timeout=10), drift(rig.nodes[victim])
        assert wait_for(lambda: same_cdrs(rig.nodes, prof) is not None, timeout=10)   # one per call, everywhere
        assert recovery_cdrs_everywhere() == CALLS * len(rig.nodes)
        journal = journal_of(rig.cluster, prof["id"])
        assert journal.state.channels_in_use == 0
        releases = [e.ref for e in journal.entries() if e.kind == "release"]
        assert len(releases) == len(set(releases)) == CALLS + len(survivors)
        assert journal.balance == before - reserved      # the two refused calls cost nothing
        assert wait_for(lambda: money_agrees(rig, [*survivors, victim], prof), timeout=10)
        print(f"{CALLS} channels of a dead node freed {freed:.1f} s after the kill (lease {LEASE:g} s, "
              f"documented bound {FREED_BOUND:g} s)")
    finally:
        rig.lab.links(f"n{victim}", up=True)
        carrier.ringing.clear()
        for pbx in pbxs:
            pbx.close()


def admitted_through(rig: Rig, i: int, prof: dict, timeout: float, pbxs: list[NsPbx]) -> NsPbx | None:
    """An INVITE through node ``i`` that reaches the carrier (clusternodes.admitted); its PBX, ringing."""
    pbx = admitted(lambda: rig.pbx(i), prof, rig.carrier, timeout, pbxs)  # type: ignore[arg-type]  (NsPbx list)
    return pbx if isinstance(pbx, NsPbx) else None


def test_a_node_cut_from_the_engine_fences_its_call_and_serves_again_once_healed(rig: Rig) -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (make system-deps installs nftables)")
    cut, other = 1, 0
    prof, carrier = rig.solo, rig.carrier
    carrier.ringing.clear()
    mark = len(carrier.events)
    pbxs: list[NsPbx] = []
    try:
        through_b = admitted_through(rig, cut, prof, 10, pbxs)
        assert through_b is not None
        (b_call,) = carrier.ringing
        assert rig.journal(prof) == 1
        b_log = rig.nodes[cut].log.read_text()
        with rig.lab.cut(f"n{cut}", ENGINES):
            cut_at = time.monotonic()
            # its renewals get no answer: at the fencing instant it ends its call (CANCEL, 503)
            deadline = time.monotonic() + 3 * LEASE
            while ("cancel", b_call) not in [(k, c) for k, c, _ in carrier.events] and time.monotonic() < deadline:
                carrier.take(timeout=0.1)
            cancelled = time.monotonic() - cut_at
            assert ("cancel", b_call) in [(k, c) for k, c, _ in carrier.events], carrier.events[mark:]
            assert (status := final_status(through_b, 2.0)) == 503, status
            # once its store has freed the channel (the local count would answer 486), the lease answers 503
            assert wait_for(lambda: rig.in_use(cut, prof) == 0)
            refused = rig.pbx(cut)
            pbxs.append(refused)
            refused.invite(prof, CALLEE)
            assert (status := final_status(refused, 3.0)) == 503, status
            # another node takes the channel once the cut node's lease ended and its reservation was settled
            through_a = admitted_through(rig, other, prof, 6 * LEASE, pbxs)
            assert through_a is not None
            taken = time.monotonic() - cut_at
            a_call = next(cid for cid in carrier.ringing if cid != b_call)
            order = [(k, c) for k, c, _ in carrier.events]
            assert order.index(("cancel", b_call)) < order.index(("invite", a_call)), carrier.events[mark:]
            journal = journal_of(rig.cluster, prof["id"])      # the cut node's call settled by a survivor
            assert [c.node.split(".")[0] for c in journal.state.calls.values()] == ["edge-a"], journal.state
            assert [s.recovery for s in journal.state.settled.values()] == [True], journal.state
        # healed: a new epoch; busy (486) while the other node's call holds the channel
        assert wait_for(lambda: "new epoch" in rig.nodes[cut].log.read_text()[len(b_log):], timeout=30)
        assert verdict_after_healing(lambda: rig.pbx(cut), prof, pbxs) == 486  # type: ignore[arg-type]
        carrier.refuse_all()
        assert final_status(through_a, 5.0) == 486
        assert wait_for(lambda: rig.journal(prof) == 0, timeout=10)
        again = admitted_through(rig, cut, prof, 10, pbxs)
        assert again is not None
        carrier.refuse_all()
        assert final_status(again, 5.0) == 486
        assert carrier.peak(since=mark) == 1          # never two calls on the profile's one channel
        assert wait_for(lambda: rig.journal(prof) == 0, timeout=10)
        journal = journal_of(rig.cluster, prof["id"])    # 3 calls, each settled once (the cut node's by the survivor)
        assert sorted(s.recovery for s in journal.state.settled.values()) == [False, False, True]
        for i in (cut, other):
            assert wait_for(lambda i=i: rig.in_use(i, prof) == 0), i
        # the cut call's one CDR is the survivor's (it settled the call in the journal), on every node: the
        # cut node's own (cluster_lease) is dropped once its Settle is refused as the survivor's
        fenced = [cid for cid, s in journal.state.settled.items() if s.recovery]
        assert wait_for(lambda: [row[2] for row in same_cdrs(rig.nodes, prof) or [] if row[1] in fenced]
                        == ["recovery"], timeout=10), [cdrs_of(n, prof) for n in rig.nodes]
        print(f"cut from the engine: its call cancelled {cancelled:.1f} s after the cut, the profile admitted "
              f"by another node {taken:.1f} s after it (lease {LEASE:g} s)")
    finally:
        carrier.ringing.clear()
        for pbx in pbxs:
            pbx.close()
