"""The one boundary, ``Transports.received``: parse + validate, answer or drop, count, and
never a traceback per datagram (docs/sip.md "The boundary")."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from edge.sip import parse
from edge.sip.metrics import SipMetrics
from edge.sip.transport import Peer, Transports

PEER = Peer("udp", "198.51.100.9", 40123)


def request(method: str = "INVITE", via_params: str = ";rport", extra: str = "",
            cseq_method: str | None = None) -> bytes:
    return (f"{method} sip:+442071234567@sip.edge.test SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 10.0.0.9:5062;branch=z9hG4bKb1{via_params}\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:pbx@sip.edge.test>;tag=f1\r\nTo: <sip:+442071234567@sip.edge.test>\r\n"
            f"Call-ID: cid-1\r\nCSeq: 1 {cseq_method or method}\r\nContact: <sip:pbx@10.0.0.9:5062>\r\n{extra}"
            "Content-Length: 0\r\n\r\n").encode()


class Layer:
    def __init__(self, may_answer=None, fail: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.metrics = SipMetrics(self.registry)
        self.delivered: list = []
        self.sent: list[tuple[bytes, Peer]] = []
        self.fail = fail
        self.t = Transports(self.on_message, self.metrics, may_answer=may_answer)
        self.t._send_raw = lambda data, dest: self.sent.append((data, dest))  # type: ignore[method-assign]

    def on_message(self, msg, peer) -> None:
        if self.fail:
            raise RuntimeError("bug in a handler")
        self.delivered.append(msg)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def test_a_valid_request_is_delivered_validated() -> None:
    layer = Layer()
    layer.t.received(request(), PEER, None)
    (msg,) = layer.delivered
    assert msg.top_via.rport == "" and msg.contacts[0].uri.port == 5062
    assert layer.sent == [] and layer.value("edge_sip_parse_errors_total", reason="BadHeader") == 0


def test_bad_rport_is_answered_to_the_source_address_and_port() -> None:
    layer = Layer()
    layer.t.received(request(via_params=";rport=abc"), PEER, None)
    assert layer.delivered == []
    ((data, dest),) = layer.sent
    assert dest == PEER  # not the Via's 10.0.0.9:5062: the rport cannot be honoured (RFC 3581)
    answer = parse(data)
    assert (answer.status, answer.reason) == (400, "Bad Via rport")
    assert answer.call_id == "cid-1" and answer.to_tag and answer.header("Via").endswith("rport=abc")
    assert layer.value("edge_sip_parse_errors_total", reason="BadHeader") == 1


@pytest.mark.parametrize("data,status,reason", [
    (request(extra="").replace(b"Max-Forwards: 70", b"Max-Forwards: 0"), 483, "Too Many Hops (Max-Forwards 0)"),
    (request().replace(b"INVITE sip:+442071234567@sip.edge.test", b"INVITE mailto:a@b"), 416,
     "Unsupported Request-URI scheme"),
    (request().replace(b"10.0.0.9:5062>", b"10.0.0.9:99999>"), 400, "Bad Contact port"),
])
def test_the_error_status_is_answered(data: bytes, status: int, reason: str) -> None:
    layer = Layer()
    layer.t.received(data, PEER, None)
    (sent,) = layer.sent
    assert (parse(sent[0]).status, parse(sent[0]).reason) == (status, reason)


def test_bad_acks_and_bad_responses_are_dropped_and_counted() -> None:
    layer = Layer()
    layer.t.received(request("ACK", via_params=";rport=abc"), PEER, None)
    # a response is checked for what the edge reads of it: here the Contact of a 2xx to INVITE
    response = (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\n"
                b"From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n"
                b"Contact: <sip:b@h:99999>\r\nContent-Length: 0\r\n\r\n")
    layer.t.received(response, PEER, None)
    assert layer.sent == [] and layer.delivered == []
    assert layer.value("edge_sip_parse_errors_total", reason="BadHeader") == 2


def test_a_source_that_may_not_be_answered_gets_nothing_but_is_counted() -> None:
    asked: list[str] = []

    def may_answer(host: str) -> bool:  # e.g. over its rate limit, or blocked
        asked.append(host)
        return False

    layer = Layer(may_answer=may_answer)
    layer.t.received(request(via_params=";rport=abc"), PEER, None)
    assert asked == [PEER.host] and layer.sent == []
    assert layer.value("edge_sip_parse_errors_total", reason="BadHeader") == 1


def test_unexpected_exceptions_are_counted_and_logged_once_per_interval(caplog) -> None:
    layer = Layer(fail=True)
    with caplog.at_level(logging.ERROR, logger="sipedge.sip"):
        for _ in range(500):
            layer.t.received(request(), PEER, None)
    assert layer.value("edge_sip_internal_errors_total") == 500
    lines = [r for r in caplog.records if r.name == "sipedge.sip"]
    assert len(lines) == 1 and lines[0].exc_info is not None  # one traceback, not 500
    assert layer.t.errors.suppressed(RuntimeError) == 499


def test_a_parser_crash_is_contained(monkeypatch, caplog) -> None:
    import edge.sip.transport as transport

    def boom(data):
        raise MemoryError("parser bug")

    monkeypatch.setattr(transport, "parse", boom)
    layer = Layer()
    with caplog.at_level(logging.ERROR, logger="sipedge.sip"):
        for _ in range(3):
            layer.t.received(request(), PEER, None)
    assert layer.value("edge_sip_parse_errors_total", reason="InternalError") == 3
    assert layer.value("edge_sip_internal_errors_total") == 3
    assert len([r for r in caplog.records if r.name == "sipedge.sip"]) == 1
