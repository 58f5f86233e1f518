"""edge_cluster_* of the membership (docs/cluster.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from .membership import Membership


class ClusterMetrics:
    """edge_cluster_* (docs/cluster.md). Gauges read the membership at scrape time."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.members = Gauge("edge_cluster_members", "Nodes whose lease lives, as this node sees them.", registry=r)
        self.lease_held = Gauge("edge_cluster_lease_held",
                                "1 while this node holds its lease (admits calls of its homes), else 0.", registry=r)
        self.homed = Gauge("edge_cluster_profiles_homed", "Profiles whose home is this node.", registry=r)
        self.handovers = Counter("edge_cluster_handovers",
                                 "Homes this node took over from a node whose lease had ended.", registry=r)
        self.rtt = Gauge("edge_cluster_engine_rtt_seconds",
                         "Round trip of the last successful lease renewal (a replicated write).", registry=r)
        self.renew_failures = Counter("edge_cluster_lease_renewal_failures",
                                      "Lease renewals that failed (timeout, engine unreachable, aged out).",
                                      registry=r)
        self.engine_connected = Gauge("edge_cluster_engine_connected",
                                      "1 while the client is connected to a member of the engine, else 0.",
                                      registry=r)
        self.leases_lost = Counter("edge_cluster_leases_lost",
                                   "Times this node's lease aged out and was created anew (a new epoch).",
                                   registry=r)

    def bind(self, membership: Membership) -> None:
        self.members.set_function(lambda: len(membership.members()))
        self.lease_held.set_function(lambda: 1.0 if membership.holds_lease() else 0.0)
        self.homed.set_function(lambda: membership.homed_count())
        self.engine_connected.set_function(lambda: 1.0 if membership.engine.connected else 0.0)
