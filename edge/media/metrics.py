"""Prometheus export of the relay engine, read at scrape time.

No per-packet Python: the engine counts in C, and :class:`RtpCollector`
sums the counters once per scrape (``RelayEngine.totals()``, one pass over
the relay table under the engine lock).
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge._rtp import DROP_REASONS, RelayEngine


class RtpCollector(Collector):
    """Custom collector: ``REGISTRY.register(RtpCollector(engine))``.

    :param engine: the relay engine to read
    """

    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine

    def describe(self) -> list[Metric]:
        # Names only, so registering does not call collect() (and touch the engine).
        return list(self._families({}, 0))

    def collect(self) -> Iterator[Metric]:
        t = self.engine.totals()
        yield from self._families(t, self.engine.active_streams)

    @staticmethod
    def _families(t: dict, streams: int) -> Iterator[Metric]:
        g = GaugeMetricFamily("edge_rtp_streams_active",
                              "RTP streams (one per leg and direction) that received media within their timeout")
        g.add_metric([], streams)
        yield g
        g = GaugeMetricFamily("edge_rtp_relays_active", "Relays (anchored calls) allocated")
        g.add_metric([], t.get("relays_active", 0))
        yield g
        c = CounterMetricFamily("edge_rtp_packets_received", "Valid RTP/RTCP packets accepted by the relay")
        c.add_metric([], t.get("packets_received", 0))
        yield c
        c = CounterMetricFamily("edge_rtp_packets_relayed", "RTP/RTCP packets relayed (or echoed)")
        c.add_metric([], t.get("packets_relayed", 0))
        yield c
        c = CounterMetricFamily("edge_rtp_bytes_relayed", "RTP/RTCP UDP payload bytes relayed")
        c.add_metric([], t.get("bytes_relayed", 0))
        yield c
        c = CounterMetricFamily("edge_rtp_packets_dropped", "Packets not relayed, by reason",
                                labels=["reason"])
        dropped = t.get("dropped", {})
        for reason in DROP_REASONS:
            c.add_metric([reason], dropped.get(reason, 0))
        yield c
        c = CounterMetricFamily("edge_rtp_packets_lost",
                                "RTP packets lost upstream of the edge (sequence gaps, RFC 3550 A.3)")
        c.add_metric([], t.get("lost", 0))
        yield c
        g = GaugeMetricFamily("edge_rtp_jitter_seconds",
                              "Interarrival jitter of live RTP streams (RFC 3550 A.8), seconds",
                              labels=["stat"])
        g.add_metric(["mean"], t.get("jitter_mean_ms", 0.0) / 1000)   # base units (issue 14)
        g.add_metric(["max"], t.get("jitter_max_ms", 0.0) / 1000)
        yield g
