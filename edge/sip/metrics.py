"""Prometheus metrics of the SIP layer (SPEC §6). Label values are bounded sets:
methods are folded to the ones we know, statuses are numbers, reasons are class names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from . import SipMessage

KNOWN_METHODS = frozenset({
    "INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "INFO", "UPDATE", "PRACK",
    "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH",
})


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


class SipMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry
        self.messages = Counter(
            "edge_sip_messages", "SIP messages by direction, transport, method and status (0 for requests).",
            ["direction", "transport", "method", "status"], registry=r)
        self.parse_errors = Counter(
            "edge_sip_parse_errors", "Malformed SIP messages, by reason (answered 400 where possible, else dropped).",
            ["reason"], registry=r)
        self.auth_failures = Counter(
            "edge_sip_auth_failures", "Authentication failures by reason.", ["reason", "method"], registry=r)
        self.transport_errors = Counter(
            "edge_sip_transport_errors", "Send/connect failures and refused connections.", ["kind"], registry=r)
        self.internal_errors = Counter(
            "edge_sip_internal_errors", "Messages whose handling raised (logged; the edge keeps serving).", registry=r)
        self.retransmissions = Counter(
            "edge_sip_retransmissions", "Retransmissions sent (timers A, E, G) and absorbed (duplicates answered "
            "from the transaction).", ["kind"], registry=r)
        self.transactions = Gauge(
            "edge_sip_transactions", "Transactions alive now.", ["side"], registry=r)
        self.rate_limited = Counter(
            "edge_sip_rate_limited", "Requests refused by flood protection.", ["scope"], registry=r)
        self.blocked_sources = Gauge(
            "edge_sip_blocked_sources", "Source addresses blocked now after repeated authentication failures.",
            registry=r)
        self.worker_forwarded = Counter(
            "edge_sip_worker_forwarded", "Messages a SIP worker handed to the worker that owns them "
            "(message), CANCELs offered to the others (probe), bytes written on another worker's TCP "
            "connection (write); 0 with one worker.", ["kind"], registry=r)
        self.auth_blocks = Counter(
            "edge_sip_auth_blocks", "Sources blocked after repeated authentication failures (the address is logged).",
            registry=r)
        self.tls_handshake_failures = Counter(
            "edge_tls_handshake_failures", "TLS handshakes refused or failed, by side and reason "
            "(expired, wrong_host, untrusted, no_certificate, peer_refused, protocol, timeout, closed, other).",
            ["side", "reason"], registry=r)
        # Known label sets start at 0, so increase() sees the first event and panels show 0, not "No data".
        for scope in ("source", "profile", "auth_block"):
            self.rate_limited.labels(scope)
        for method in ("REGISTER", "INVITE"):
            for reason in ("stale", "bad_nonce", "unsupported", "nonce_count_replay", "unknown_user",
                           "username_mismatch", "bad_password"):
                self.auth_failures.labels(reason, method)

        self._children: dict[tuple[str, str, str, int], object] = {}

    def _message_counter(self, direction: str, transport: str, method: str, status: int):
        """The labelled child for one combination, looked up once (``labels()`` costs ~3 µs)."""
        key = (direction, transport, method_label(method), status)  # bounded: unknown methods fold to OTHER
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.messages.labels(direction, transport, key[2], str(status))
        return child

    def count_in(self, transport: str, msg: SipMessage) -> None:
        self._message_counter("in", transport, msg.method, msg.status).inc()

    def count_out(self, transport: str, method: str, status: int) -> None:
        self._message_counter("out", transport, method, status).inc()
