"""Prometheus metrics of calls (SPEC §6). Label values are bounded: directions, rule
names, end reasons and SIP statuses; carriers are the configured ones."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .model import Direction

SETUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class CallMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.started = Counter("edge_calls_started", "Calls admitted (a channel was taken).", ["direction"], registry=r)
        self.ended = Counter("edge_calls_ended", "Calls ended, by final SIP status and why they ended.",
                             ["direction", "status", "reason"], registry=r)
        self.rejected = Counter("edge_calls_rejected", "INVITEs refused before a channel was taken, by rule.",
                                ["direction", "rule", "status"], registry=r)
        self.active = Gauge("edge_calls_active", "Calls in progress on this node.", ["direction"], registry=r)
        # a family of its own: edge_calls_started keeps its labels (dashboards and alerts sum it by direction)
        self.started_by_transport = Counter(
            "edge_calls_started_by_transport", "Calls admitted, by the transport of the leg they came in on.",
            ["direction", "transport"], registry=r)
        for direction in Direction:  # known label sets start at 0 (increase() sees the first call)
            self.started.labels(direction.value)
            self.active.labels(direction.value)
        self.setup = Histogram("edge_call_setup_seconds", "INVITE to first provisional / to 200 OK.",
                               ["direction", "stage"], buckets=SETUP_BUCKETS, registry=r)
        self.cutoffs = Counter("edge_credit_cutoffs", "Calls ended because their credit ran out.", registry=r)
        self.failovers = Counter("edge_carrier_failovers", "Outgoing attempts moved to the next carrier.",
                                 ["carrier"], registry=r)
        # labels() costs microseconds: the children the call path uses are looked up once
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, family: Counter | Gauge | Histogram, *labels: str) -> Any:
        """The labelled child of ``family``, cached (label sets here are bounded)."""
        key = (id(family), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*labels)
        return found
