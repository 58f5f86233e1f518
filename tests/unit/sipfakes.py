"""Test doubles for the SIP layers: an injected clock and a recording wire (no sockets)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

from edge.sip import SipMessage, parse
from edge.sip.dialog import Dialogs, Local
from edge.sip.metrics import SipMetrics
from edge.sip.transaction import TransactionLayer
from edge.sip.transport import Peer

T1 = 0.5
LOCAL = Local("198.51.100.1:5060", "<sip:198.51.100.1:5060;transport=udp>")
PBX = Peer("udp", "192.0.2.10", 5070)
CARRIER = Peer("udp", "203.0.113.5", 5060)


class FakeHandle:
    __slots__ = ("when", "seq", "fn", "args", "cancelled")

    def __init__(self, when: float, seq: int, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.when, self.seq, self.fn, self.args, self.cancelled = when, seq, fn, args, False

    def __lt__(self, other: FakeHandle) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """``time``/``call_later`` with a clock that moves only when the test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self._heap: list[FakeHandle] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> FakeHandle:
        handle = FakeHandle(self.now + max(0.0, delay), next(self._seq), fn, args)
        heapq.heappush(self._heap, handle)
        return handle

    def advance(self, seconds: float) -> None:
        """Run every timer due within ``seconds``, in order, with the clock at its time."""
        end = self.now + seconds
        while self._heap and self._heap[0].when <= end:
            handle = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            self.now = max(self.now, handle.when)
            handle.fn(*handle.args)
        self.now = end

    @property
    def pending(self) -> int:
        return sum(1 for h in self._heap if not h.cancelled)


class Wire:
    """Records every message the transaction layer sends, with where it went and when."""

    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.sent: list[tuple[float, Peer, bytes]] = []

    def send(self, data: bytes, dest: Peer, on_failure: object = None) -> None:
        self.sent.append((self.loop.time(), dest, data))

    def messages(self, dest: Peer | None = None) -> list[SipMessage]:
        return [parse(d) for _, p, d in self.sent if dest is None or (p.host, p.port) == (dest.host, dest.port)]

    def first_lines(self, dest: Peer | None = None) -> list[str]:
        return [d.split(b"\r\n", 1)[0].decode() for _, p, d in self.sent
                if dest is None or (p.host, p.port) == (dest.host, dest.port)]

    def requests(self, method: str, dest: Peer | None = None) -> list[SipMessage]:
        return [m for m in self.messages(dest) if m.is_request and m.method == method]

    def responses(self, status: int, dest: Peer | None = None) -> list[SipMessage]:
        return [m for m in self.messages(dest) if not m.is_request and m.status == status]

    def clear(self) -> None:
        self.sent.clear()


class Stack:
    """A transaction layer and a dialog table on a fake loop and wire; the test is the TU's peer."""

    def __init__(self, tu: Any = None) -> None:
        self.loop = FakeLoop()
        self.wire = Wire(self.loop)
        self.dialogs = Dialogs(self.loop)
        self.tl = TransactionLayer(self.wire, tu or _DialogTU(self), SipMetrics(None), self.loop)  # type: ignore[arg-type]
        self.invites: list[Any] = []      # new INVITE server transactions

    def receive(self, text: str | bytes, peer: Peer) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.tl.on_message(parse(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")), peer)


class _DialogTU:
    """The dispatch of edge/sip/core.py, reduced to what sessions need."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def on_request(self, tx: Any) -> None:
        if tx.request.to_tag is not None:
            if not self.stack.dialogs.on_request(tx):
                tx.respond(481)
            return
        self.stack.invites.append(tx)

    def on_ack(self, msg: SipMessage, peer: Peer) -> None:
        self.stack.dialogs.on_ack(msg)

    def on_cancel(self, invite: Any, cancel: SipMessage) -> None:
        self.stack.dialogs.on_cancel(invite.key, cancel)

    def on_stray_response(self, msg: SipMessage, peer: Peer) -> None:
        self.stack.dialogs.on_stray_response(msg)


def invite_text(branch: str = "z9hG4bKpbx1", cseq: int = 1, call_id: str = "pbx-call-1", to_tag: str = "",
                body: str = "", method: str = "INVITE", extra: str = "") -> str:
    to = "<sip:+442071234567@sip.edge.test>" + (f";tag={to_tag}" if to_tag else "")
    ctype = "Content-Type: application/sdp\n" if body else ""
    return (f"{method} sip:+442071234567@sip.edge.test SIP/2.0\n"
            f"Via: SIP/2.0/UDP {PBX.host}:{PBX.port};branch={branch};rport\n"
            f"Max-Forwards: 70\nFrom: \"HQ\" <sip:990500000001@sip.edge.test>;tag=pbxtag\nTo: {to}\n"
            f"Call-ID: {call_id}\nCSeq: {cseq} {method}\nContact: <sip:990500000001@{PBX.host}:{PBX.port}>\n"
            f"Record-Route: <sip:proxy.pbx.example;lr>\n{extra}{ctype}Content-Length: {len(body)}\n\n{body}")


def response_text(req: SipMessage, status: int, to_tag: str = "callee1", body: str = "",
                  contact: str = "<sip:gw@203.0.113.5:5060>", extra: str = "") -> str:
    """An answer to ``req`` (a request the edge sent), as the callee would write it."""
    to = req.header("To") or ""
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    ctype = "Content-Type: application/sdp\n" if body else ""
    vias = "".join(f"Via: {v}\n" for v in req.headers("Via"))
    return (f"SIP/2.0 {status} Whatever\n{vias}From: {req.header('From')}\nTo: {to}\nCall-ID: {req.call_id}\n"
            f"CSeq: {req.cseq} {req.method}\nContact: {contact}\n{extra}{ctype}Content-Length: {len(body)}\n\n{body}")
