"""The pure parts of the worker process model: marks, port slices, who recovers which call,
the shared nonce key, and how the node's /metrics adds up its processes."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from admin_api.metrics import NodeCollector, node_exposition
from edge.config import ConfigError, load
from edge.control.models import LiveCall
from edge.node import WorkerRole, worker_ports
from edge.processes import nonce_key
from edge.sip import request
from edge.sip.auth import DigestAuth


@pytest.fixture
def marked():
    yield request.set_worker
    request.set_worker(None)


def test_tokens_carry_the_worker_mark(marked) -> None:
    marked(11)
    tag, branch = request.new_tag(), request.new_branch()
    assert tag.startswith("wb") and request.token_owner(tag) == 11 and request.branch_owner(branch) == 11
    marked(None)
    assert request.token_owner(request.new_tag()) == -1          # hex never starts with "w"
    assert request.branch_owner(request.new_branch()) == -1
    assert request.token_owner("w") == -1 and request.token_owner(None) == -1
    assert request.branch_owner("z9hG4bKw3abcdef") == 3 and request.branch_owner("z9hG4bK-w3") == -1


@pytest.mark.parametrize("count", [1, 2, 3, 7, 32])
def test_port_slices_are_disjoint_even_and_inside_the_range(count: int) -> None:
    lo, hi = 20000, 29999
    slices = [worker_ports((lo, hi), k, count) for k in range(count)]
    for k, (a, b) in enumerate(slices):
        assert a % 2 == 0 and (b - a + 1) % 2 == 0 and b - a + 1 >= 4 and lo <= a < b <= hi
        if k:
            assert a > slices[k - 1][1]


def test_too_few_ports_for_the_workers_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[node]\nworkers = 3\n[media]\nports = [20000, 20009]\n")
    with pytest.raises(ConfigError, match="media.ports.*3 node.workers"):
        load(path)


def test_each_worker_recovers_its_own_calls_and_worker_0_the_orphans() -> None:
    def call(worker: int) -> LiveCall:
        return LiveCall(call_id=f"c{worker}", profile_id="p", direction="outgoing", started_at=0.0, worker=worker)

    roles = [WorkerRole(index=k, count=2, key="k", nonce_key=b"", ready=lambda: None) for k in range(2)]
    owners = {w: [r.index for r in roles if r.owns(call(w))] for w in (0, 1, 2, 5)}
    assert owners == {0: [0], 1: [1], 2: [0], 5: [0]}   # 2 and 5: workers a smaller config no longer runs


def test_a_nonce_of_one_worker_verifies_on_another(tmp_path: Path) -> None:
    key = nonce_key(tmp_path)
    assert nonce_key(tmp_path) == key and oct((tmp_path / "nonce.key").stat().st_mode & 0o777) == "0o600"
    first, second = DigestAuth("sip.edge.test", key=key), DigestAuth("sip.edge.test", key=nonce_key(tmp_path))
    nonce = first.new_nonce()
    assert second._nonce_time(nonce) is not None and DigestAuth("sip.edge.test")._nonce_time(nonce) is None


def serve_text(address: str, text: bytes, stop: threading.Event) -> threading.Thread:
    """A worker's metrics socket, answering every connection with ``text``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen()
    sock.settimeout(0.1)

    def run() -> None:
        with sock:
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.sendall(text)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def worker_text(calls: int, setup: float, carrier_up: int, started: float) -> bytes:
    registry = CollectorRegistry()
    Counter("edge_calls_started", "c", ["direction"], registry=registry).labels("outgoing").inc(calls)
    Histogram("edge_call_setup_seconds", "h", buckets=(0.1, 1.0), registry=registry).observe(setup)
    Gauge("edge_carrier_up", "g", ["carrier"], registry=registry).labels("sip:gw").set(carrier_up)
    Gauge("process_start_time_seconds", "g", registry=registry).set(started)
    Gauge("edge_store_write_lock_wait_seconds_max", "g", registry=registry).set(calls / 1000)
    return generate_latest(registry)


def test_node_metrics_add_up_the_workers_under_one_process_names() -> None:
    prefix = f"\0sipedge-unit-{os.getpid()}-m"
    stop = threading.Event()
    threads = [serve_text(prefix + "0", worker_text(3, 0.05, 1, 100.0), stop),
               serve_text(prefix + "1", worker_text(4, 0.5, 0, 90.0), stop)]
    local = CollectorRegistry()
    Counter("edge_api_requests", "a", registry=local).inc(2)
    try:
        text = generate_latest(node_exposition(local, [prefix + "0", prefix + "1", prefix + "9"])).decode()
    finally:
        stop.set()
        for thread in threads:
            thread.join(2)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("edge_calls_started_total", (("direction", "outgoing"),))] == 7
    assert samples[("edge_call_setup_seconds_count", ())] == 2
    assert samples[("edge_call_setup_seconds_bucket", (("le", "0.1"),))] == 1
    assert samples[("edge_carrier_up", (("carrier", "sip:gw"),))] == 0      # up only where every worker says so
    assert samples[("process_start_time_seconds", ())] == 90.0             # the oldest process
    assert samples[("edge_store_write_lock_wait_seconds_max", ())] == 0.004
    assert samples[("edge_api_requests_total", ())] == 2
    assert samples[("edge_workers_up", ())] == 2                           # worker 9 did not answer
    assert text.count("# TYPE edge_calls_started_total counter") == 1
    assert isinstance(NodeCollector(local, []), NodeCollector)


def test_a_burst_on_the_worker_link_waits_for_room_instead_of_being_dropped() -> None:
    """The kernel queues 10 datagrams per AF_UNIX socket by default (net.unix.max_dgram_qlen):
    a burst beyond that waits in the sender's backlog and arrives whole, in order."""
    import asyncio

    from edge.sip.metrics import SipMetrics
    from edge.sip.workers import MESSAGE, WorkerLink

    key = f"unit{os.getpid()}"

    async def run() -> list[bytes]:
        loop = asyncio.get_running_loop()
        metrics = SipMetrics(CollectorRegistry())
        sender, receiver = WorkerLink(key, 0, 2, metrics), WorkerLink(key, 1, 2, metrics)
        got: list[bytes] = []
        done = asyncio.Event()

        def on_message(kind, data, proto, host, port, side, origin) -> None:
            assert (kind, proto, host, port, side, origin) == (MESSAGE, "tcp", "127.0.0.1", 5060, "carrier", 0)
            got.append(data)
            if len(got) == 500:
                done.set()

        sender.start(loop, lambda *a: None)
        try:
            assert all(sender.send(1, MESSAGE, b"%d" % i + b"x" * 1000, "tcp", "127.0.0.1", 5060, "carrier")
                       for i in range(500))                      # before the receiver reads anything
            assert sender._backlog[1]                             # more than the kernel queue holds
            receiver.start(loop, on_message)
            await asyncio.wait_for(done.wait(), 10)
        finally:
            sender.close()
            receiver.close()
        assert metrics.transport_errors.labels("worker_link_full")._value.get() == 0
        return got

    got = asyncio.run(run())
    assert [int(d.rstrip(b"x")) for d in got] == list(range(500))
