"""Prometheus metrics of the control plane.

Gauges that describe stored state (channels, balances, registrations) are read from
LMDB at scrape time by ``StoreCollector``: every process on the node agrees, and
nothing has to be kept in sync by hand. Counters of things that happen in this
process (API requests) are ordinary prometheus-client metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge import __version__
from edge.control import accounts, channels, ledger, registrations, webhooks
from edge.control.models import Account, Profile
from edge.control.money import MICROS
from edge.control.store import Store, Txn


class StoreCollector(Collector):
    """Per-profile gauges and the store's fill, read from the store in one read transaction per scrape."""

    def __init__(self, store: Store, *, per_profile: bool = True) -> None:
        self.store = store
        self.per_profile = per_profile

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        # Series are keyed by ids only: names change (a rename would start a new series) and are
        # joined from the *_info series (issue 14). Without per-profile series the same names
        # carry node totals, so dashboards that sum() them work either way.
        labels = ["profile", "account"] if self.per_profile else []
        capacity = GaugeMetricFamily("edge_channels_capacity", "Channels of the SIP profile (1..300).", labels=labels)
        in_use = GaugeMetricFamily("edge_channels_in_use", "Channels carrying a call now (incoming + outgoing).",
                                   labels=labels)
        balance = GaugeMetricFamily("edge_credit_balance", "Credit allocated to the profile, in currency units.",
                                    labels=labels)
        ar_min = GaugeMetricFamily("edge_auto_recharge_min_balance", "Auto-recharge threshold, in currency units.",
                                   labels=labels)
        ar_amount = GaugeMetricFamily("edge_auto_recharge_amount", "Auto-recharge amount, in currency units.",
                                      labels=labels)
        ar_on = GaugeMetricFamily("edge_auto_recharge_enabled", "1 if auto-recharge is on for the profile.",
                                  labels=labels)
        ar_count = CounterMetricFamily("edge_auto_recharges", "Auto-recharges performed for the profile.",
                                       labels=labels)
        bundles = GaugeMetricFamily("edge_us_bundles", "US minute bundles of the profile.", labels=labels)
        regs = GaugeMetricFamily("edge_registrations_active", "Unexpired registrar bindings of the profile.",
                                 labels=labels)
        info = GaugeMetricFamily("edge_profile_info", "1 per profile: its name, for joins (group_left).",
                                 labels=["profile", "account", "profile_name"])
        acct_info = GaugeMetricFamily("edge_account_info", "1 per account: its name, for joins (group_left).",
                                      labels=["account", "account_name"])
        acct_balance = GaugeMetricFamily("edge_account_balance", "Master balance of the account, in currency units.",
                                         labels=["account"] if self.per_profile else [])
        n_profiles = GaugeMetricFamily("edge_profiles", "SIP profiles in the store.")
        used_bytes = GaugeMetricFamily("edge_store_used_bytes", "Bytes in use in the LMDB store (pages of every "
                                       "database times the page size).")
        map_bytes = GaugeMetricFamily("edge_store_map_bytes", "Size of the LMDB map (storage.map_size_mb): the "
                                      "most the store can hold; new work is refused in its last "
                                      "max(2 MiB, 5%).")
        outbox = GaugeMetricFamily("edge_webhook_outbox_events", "Webhook events not yet delivered everywhere.")
        used_bytes.add_metric([], self.store.used_bytes())
        map_bytes.add_metric([], self.store.map_size)
        now = time.time()
        snap = self.store.read(lambda txn: self._snapshot(txn, now))
        reg_counts, profs, ar_counts, accts, pending = snap
        outbox.add_metric([], pending)
        n_profiles.add_metric([], len(profs))
        if self.per_profile:
            for (prof, used), recharges in zip(profs, ar_counts, strict=True):
                lv = [prof.id, prof.account_id]
                info.add_metric([prof.id, prof.account_id, prof.name], 1)
                capacity.add_metric(lv, prof.channels)
                in_use.add_metric(lv, used)
                balance.add_metric(lv, prof.balance / MICROS)
                ar_min.add_metric(lv, prof.auto_recharge.min_balance / MICROS)
                ar_amount.add_metric(lv, prof.auto_recharge.amount / MICROS)
                ar_on.add_metric(lv, 1.0 if prof.auto_recharge.enabled else 0.0)
                ar_count.add_metric(lv, recharges)
                bundles.add_metric(lv, prof.us_bundles)
                regs.add_metric(lv, reg_counts.get(prof.id, 0))
            for acct in accts:
                acct_info.add_metric([acct.id, acct.name], 1)
                acct_balance.add_metric([acct.id], acct.balance / MICROS)
            yield from (info, acct_info)
        else:
            capacity.add_metric([], sum(p.channels for p, _ in profs))
            in_use.add_metric([], sum(u for _, u in profs))
            balance.add_metric([], sum(p.balance for p, _ in profs) / MICROS)
            ar_min.add_metric([], sum(p.auto_recharge.min_balance for p, _ in profs) / MICROS)
            ar_amount.add_metric([], sum(p.auto_recharge.amount for p, _ in profs) / MICROS)
            ar_on.add_metric([], sum(1 for p, _ in profs if p.auto_recharge.enabled))
            ar_count.add_metric([], sum(ar_counts))
            bundles.add_metric([], sum(p.us_bundles for p, _ in profs))
            regs.add_metric([], sum(reg_counts.values()))
            acct_balance.add_metric([], sum(a.balance for a in accts) / MICROS)
        yield from (capacity, in_use, balance, ar_min, ar_amount, ar_on, ar_count, bundles, regs, acct_balance,
                    n_profiles, used_bytes, map_bytes, outbox)

    @staticmethod
    def _snapshot(txn: Txn, now: float) -> tuple[dict[str, int], list[tuple[Profile, int]], list[int],
                                                  list[Account], int]:
        profs = channels.snapshot(txn)
        return (registrations.counts(txn, now), profs, [ledger.auto_recharge_count(txn, p.id) for p, _ in profs],
                accounts.page(txn), webhooks.outbox_size(txn))


class ApiMetrics:
    """Request counts and latency of the control API, by route template (bounded cardinality)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "edge_api_requests", "Control API requests.", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "edge_api_request_duration_seconds", "Control API request latency.", ["method", "route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )


class StoreLockCollector(Collector):
    """How long this process's write transactions waited for LMDB's writer lock (all processes
    of a node write the one store: the API's long writes would show here as the workers' waits)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        waits = self.store.lock_waits
        writes = CounterMetricFamily("edge_store_writes", "LMDB write transactions begun.")
        writes.add_metric([], waits.writes)
        waited = CounterMetricFamily("edge_store_write_lock_wait_seconds",
                                     "Time write transactions waited for the LMDB writer lock.")
        waited.add_metric([], waits.seconds)
        longest = GaugeMetricFamily("edge_store_write_lock_wait_seconds_max",
                                    "The longest wait for the LMDB writer lock since the process started.")
        longest.add_metric([], waits.max)
        yield from (writes, waited, longest)


def build_registry(store: Store, *, per_profile: bool = True) -> CollectorRegistry:
    """A registry with the process collectors and the store's gauges; edge components add theirs.

    :param per_profile: per-profile series (``api.metrics_per_profile``); False: node totals only.
    """
    # no *_created series (PROMETHEUS_DISABLE_CREATED_SERIES): one per counter, useless to PromQL
    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    registry.register(StoreCollector(store, per_profile=per_profile))
    registry.register(StoreLockCollector(store))
    Info("edge_build", "Version of this sipedge node.", registry=registry).info({"version": __version__})
    return registry


# ---------------------------------------------------------------- a node of several SIP workers

# How the figures of several processes add up to the node's; every other sample is summed
# (counters, histograms, and gauges of things each process holds a share of).
_MIN = frozenset({"process_start_time_seconds", "edge_carrier_up"})   # the oldest process; up only if up everywhere
_MAX = frozenset({"process_max_fds", "python_info", "edge_build_info"})
_MEAN_LABELS = frozenset({("stat", "mean")})                          # edge_rtp_jitter_seconds{stat="mean"}
WORKER_SCRAPE_TIMEOUT = 2.0     # seconds one worker may take to hand over its metrics


def fetch_worker_metrics(address: str, timeout: float = WORKER_SCRAPE_TIMEOUT) -> str | None:
    """The exposition text a SIP worker serves on its abstract unix socket, or None (restarting)."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            chunks = []
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode()


class NodeCollector(Collector):
    """The node's ``/metrics``: this process's registry and every SIP worker's, added up under
    the names one process uses (a counter of calls is the node's count, whichever worker
    carried the call). ``edge_workers_up`` says how many workers answered the scrape.

    :param local: this (the API) process's registry: store gauges, API metrics, build info.
    :param workers: the workers' metrics socket addresses (edge/sip/workers.py metrics_address).
    :param services: other processes of the node that serve metrics the same way (the cluster agent).
    """

    def __init__(self, local: CollectorRegistry, workers: list[str], services: Sequence[str] = ()) -> None:
        self.local = local
        self.workers = workers
        self.services = list(services)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}

        def add(family: Metric) -> None:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            for sample in family.samples:
                values[family.name].setdefault((sample.name, tuple(sorted(sample.labels.items()))),
                                               []).append(sample.value)

        for family in self.local.collect():
            add(family)
        up = 0
        for address in self.workers:
            text = fetch_worker_metrics(address)
            if text is None:
                continue
            up += 1
            for family in text_string_to_metric_families(text):
                add(family)
        for address in self.services:
            text = fetch_worker_metrics(address)
            for family in text_string_to_metric_families(text or ""):
                add(family)
        for name, family in families.items():
            for (sample_name, labels), seen in values[name].items():
                if name in _MIN:
                    value = min(seen)
                elif name in _MAX or sample_name.endswith("_max") or ("stat", "max") in labels:
                    value = max(seen)
                elif _MEAN_LABELS & set(labels):
                    value = sum(seen) / len(seen)
                else:
                    value = sum(seen)
                family.add_sample(sample_name, dict(labels), value)
            yield family
        workers_up = GaugeMetricFamily("edge_workers_up", "SIP worker processes that answered this scrape.")
        workers_up.add_metric([], up)
        yield workers_up


def node_exposition(local: CollectorRegistry, workers: list[str], services: Sequence[str] = ()) -> CollectorRegistry:
    """What ``/metrics`` serves for a node of several SIP workers (create_app ``exposition``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(local, workers, services))
    return registry
