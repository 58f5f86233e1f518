"""The pure parts of cluster membership (edge/cluster/membership.py): rendezvous hashing and the fencing margin."""

from __future__ import annotations

from collections import Counter

from edge.cluster.membership import fencing_margin, lease_key, rendezvous


def test_rendezvous_is_the_same_everywhere_and_ignores_order() -> None:
    nodes = ["edge-a", "edge-b", "edge-c"]
    for i in range(200):
        p = f"prof{i}"
        assert rendezvous(p, nodes) == rendezvous(p, list(reversed(nodes))) == rendezvous(p, set(nodes))
    assert rendezvous("p", []) is None
    assert rendezvous("p", ["only"]) == "only"


def test_a_death_moves_only_the_dead_nodes_profiles_and_spreads_them() -> None:
    nodes = ["edge-a", "edge-b", "edge-c", "edge-d"]
    profiles = [f"prof{i}" for i in range(4000)]
    before = {p: rendezvous(p, nodes) for p in profiles}
    shares = Counter(before.values())
    assert all(800 < n < 1200 for n in shares.values()), shares       # about a quarter each
    after = {p: rendezvous(p, nodes[1:]) for p in profiles}
    moved = [p for p in profiles if before[p] != after[p]]
    assert all(before[p] == "edge-a" for p in moved) and len(moved) == shares["edge-a"]
    spread = Counter(after[p] for p in moved)
    assert set(spread) == {"edge-b", "edge-c", "edge-d"} and min(spread.values()) > shares["edge-a"] / 5


def test_fencing_margin_and_lease_keys() -> None:
    assert fencing_margin(1) == 0.2 and fencing_margin(5) == 0.5 and fencing_margin(60) == 6.0
    assert lease_key("edge-a", "0123abcd") == "node.edge-a.0123abcd"
