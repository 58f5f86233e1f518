"""RFC 3261 §17 transactions, with the RFC 6026 "Accepted" states for 2xx to INVITE.

Server side: a retransmitted request is matched by its key (top Via branch and
sent-by, method with ACK mapped to INVITE) and answered with the last response; it
never reaches the transaction user (TU) twice. INVITE gets 100 Trying at once; the
ACK to a non-2xx answer is absorbed here. Client side: timers A/B and E/F
retransmit and time out on UDP, the ACK to a non-2xx answer is generated here, and
CANCEL is sent only once a provisional answer has arrived (§9.1).

Timers (§17, Table 4): T1 = 500 ms, T2 = 4 s, T4 = 5 s; on TCP only the timeouts run.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from . import SipMessage, build_response
from .metrics import SipMetrics
from .request import OutRequest, new_tag
from .transport import Peer, Transports

T1, T2, T4 = 0.5, 4.0, 5.0


class State(enum.Enum):
    TRYING = "trying"
    CALLING = "calling"
    PROCEEDING = "proceeding"
    ACCEPTED = "accepted"      # RFC 6026: 2xx to INVITE sent/received, absorb retransmissions
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class FifoTimer:
    """A timer of one of the layer's fixed lengths, waiting in its FIFO (TransactionLayer.after)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn

    def cancel(self) -> None:
        self.fn = None


class Clock(Protocol):
    """The part of an event loop the SIP layers use; unit tests pass a fake one."""

    def time(self) -> float: ...
    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> TimerHandle: ...


class TransactionUser(Protocol):
    def on_request(self, tx: ServerTransaction) -> None: ...
    def on_ack(self, msg: SipMessage, peer: Peer) -> None: ...
    def on_cancel(self, invite: ServerTransaction, cancel: SipMessage) -> None: ...
    def on_stray_response(self, msg: SipMessage, peer: Peer) -> None: ...


class ServerTransaction:
    """A request received and the responses we give it."""

    __slots__ = ("layer", "request", "peer", "key", "is_invite", "state", "last_response", "last_status",
                 "_timers", "_received", "_rport", "_retransmit_interval", "to_tag", "cancelled")

    def __init__(self, layer: TransactionLayer, request: SipMessage, peer: Peer, key: tuple) -> None:
        self.layer = layer
        self.request = request
        self.peer = peer
        self.key = key
        self.is_invite = request.method == "INVITE"
        self.state = State.PROCEEDING if self.is_invite else State.TRYING
        self.last_response: bytes | None = None
        self.last_status = 0
        self._timers: list[TimerHandle] = []
        self.to_tag: str | None = None
        self.cancelled = False
        # RFC 3261 §18.2.1 received, RFC 3581 rport: where the request really came from
        via = request.top_via
        self._received = peer.host if via.host != peer.host or via.rport is not None else None
        self._rport = peer.port if via.rport == "" else None
        self._retransmit_interval = self.layer.t1

    @property
    def reliable(self) -> bool:
        return self.peer.proto != "udp"

    def respond(self, status: int, reason: str | None = None, *, headers: list[tuple[str, str]] | tuple = (),
                body: bytes = b"", to_tag: str | None = None) -> None:
        """Send a response; a final one moves the transaction on (§17.2.1, §17.2.2)."""
        if self.state in (State.COMPLETED, State.CONFIRMED, State.TERMINATED, State.ACCEPTED):
            return  # a final answer was sent already
        if to_tag is None and status > 100:
            # §8.2.6.2: a response to a request without a To tag gets one (ours carry the worker's mark)
            to_tag = self.to_tag or (new_tag() if self.request.to_tag is None else None)
        self.to_tag = to_tag or self.to_tag
        data = build_response(self.request, status, reason, to_tag=to_tag if status > 100 else None,
                              headers=headers, body=body, received=self._received, rport=self._rport)
        self.send_response_bytes(status, data)

    def send_response_bytes(self, status: int, data: bytes) -> None:
        self.last_response = data
        self.last_status = status
        self.layer.transports.send(data, self.peer)
        self.layer.metrics.count_out(self.peer.proto, self.request.method, status)
        if status < 200:
            if self.state is State.TRYING:
                self.state = State.PROCEEDING
            return
        if self.is_invite:
            if status < 300:
                self.state = State.ACCEPTED  # RFC 6026 §8.7: absorb retransmitted INVITEs for Timer L
                self.layer.linger(self)
            else:
                self.state = State.COMPLETED
                if not self.reliable:
                    self._after(self.layer.t1, self._timer_g)
                self._after(64 * self.layer.t1, self._timer_h)
        else:
            self.state = State.COMPLETED
            if self.reliable:
                self._terminate()      # Timer J = 0 on TCP
            else:
                self.layer.linger(self)  # Timer J

    def on_retransmission(self) -> None:
        """The same request again: answer with the last response, never a new transaction."""
        self.layer.metrics.retransmissions.labels("absorbed").inc()
        if self.last_response is not None and self.state is not State.ACCEPTED:
            self.layer.transports.send(self.last_response, self.peer)

    def on_ack(self) -> None:
        if self.state is State.COMPLETED:
            self.state = State.CONFIRMED
            self._after(0 if self.reliable else self.layer.t4, self._terminate)  # Timer I

    def _timer_g(self) -> None:
        if self.state is State.COMPLETED and self.last_response is not None:
            self.layer.transports.send(self.last_response, self.peer)
            self.layer.metrics.retransmissions.labels("G").inc()
            self._retransmit_interval = min(2 * self._retransmit_interval, self.layer.t2)
            self._after(self._retransmit_interval, self._timer_g)

    def _timer_h(self) -> None:
        if self.state is State.COMPLETED:  # no ACK ever came
            self._terminate()

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        self._timers.append(self.layer.after(delay, fn))

    def _terminate(self) -> None:
        if self.state is State.TERMINATED:
            return
        self.state = State.TERMINATED
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        self.layer.server_done(self)


ResponseCallback = Callable[[SipMessage], None]
TimeoutCallback = Callable[[], None]


class ClientTransaction:
    """A request we send and the responses it gets."""

    __slots__ = ("layer", "request", "dest", "key", "is_invite", "state", "on_response", "on_timeout",
                 "_timers", "_interval", "_data", "_cancel_pending", "_ack")

    def __init__(self, layer: TransactionLayer, request: OutRequest, dest: Peer,
                 on_response: ResponseCallback, on_timeout: TimeoutCallback) -> None:
        self.layer = layer
        self.request = request
        self.dest = dest
        self.key = (request.branch, request.method)
        self.is_invite = request.method == "INVITE"
        self.state = State.CALLING if self.is_invite else State.TRYING
        self.on_response = on_response
        self.on_timeout = on_timeout
        self._timers: list[TimerHandle] = []
        self._interval = self.layer.t1
        self._data = request.encode()
        self._cancel_pending: str | None = None
        self._ack: bytes | None = None

    @property
    def reliable(self) -> bool:
        return self.dest.proto != "udp"

    def start(self) -> None:
        self._send(self._data)
        if not self.reliable:
            self._after(self.layer.t1, self._retransmit)       # Timer A / E
        self._after(64 * self.layer.t1, self._timeout)      # Timer B / F

    def _send(self, data: bytes) -> None:
        if self.reliable:
            self.layer.transports.send(data, self.dest, self._transport_failed)
        else:
            self.layer.transports.send(data, self.dest)

    def _transport_failed(self) -> None:
        """No connection for the request (RFC 3261 §17.1.4): a timeout now, not after Timer B."""
        if self.state in (State.CALLING, State.TRYING):
            self._terminate()
            self.on_timeout()

    def _retransmit(self) -> None:
        if self.state in (State.CALLING, State.TRYING) or (not self.is_invite and self.state is State.PROCEEDING):
            self._send(self._data)
            self.layer.metrics.retransmissions.labels("A" if self.is_invite else "E").inc()
            if self.is_invite:
                self._interval *= 2                          # Timer A doubles until Timer B
            elif self.state is State.PROCEEDING:
                self._interval = self.layer.t2                          # §17.1.2.2: self.layer.t2 once provisional
            else:
                self._interval = min(2 * self._interval, self.layer.t2)  # Timer E
            self._after(self._interval, self._retransmit)

    def _timeout(self) -> None:
        if self.state in (State.CALLING, State.TRYING, State.PROCEEDING) and not (
                self.is_invite and self.state is State.PROCEEDING):
            self._terminate()
            self.on_timeout()

    def receive(self, msg: SipMessage) -> None:
        status = msg.status
        if self.state is State.TERMINATED:
            return
        if status < 200:
            if self.state in (State.CALLING, State.TRYING):
                self.state = State.PROCEEDING
                if self.is_invite and self._cancel_pending is not None:
                    self._send_cancel(self._cancel_pending)
            if self.state is State.PROCEEDING:
                self.on_response(msg)
            return
        if self.is_invite:
            if status < 300:
                first = self.state is not State.ACCEPTED
                if first:
                    self.state = State.ACCEPTED  # RFC 6026: Timer M; each 2xx goes to the TU (it ACKs)
                    self._cancel_timers()
                    self._after(64 * self.layer.t1, self._terminate)
                self.on_response(msg)
                return
            if self.state is State.COMPLETED:  # retransmitted final: ACK again, TU already told
                if self._ack is not None:
                    self._send(self._ack)
                return
            self._ack = self.request.ack_for(msg).encode()
            self._send(self._ack)
            self.state = State.COMPLETED
            self._cancel_timers()
            self._after(0 if self.reliable else 32.0, self._terminate)  # Timer D
            self.on_response(msg)
            return
        if self.state in (State.TRYING, State.PROCEEDING):
            self.state = State.COMPLETED
            self._cancel_timers()
            self._after(0 if self.reliable else self.layer.t4, self._terminate)  # Timer K
            self.on_response(msg)

    def cancel(self, reason: str | None = None) -> None:
        """Cancel this INVITE: now if a provisional arrived, else as soon as one does."""
        if not self.is_invite or self.state not in (State.CALLING, State.PROCEEDING):
            return
        if self.state is State.CALLING:
            self._cancel_pending = reason or ""
            return
        self._send_cancel(reason or "")

    def _send_cancel(self, reason: str) -> None:
        cancel = self.request.cancel(reason or None)
        self.layer.send_request(cancel, self.dest, on_response=lambda m: None, on_timeout=lambda: None)

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        self._timers.append(self.layer.after(delay, fn))

    def _cancel_timers(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()

    def _terminate(self) -> None:
        if self.state is State.TERMINATED:
            return
        self.state = State.TERMINATED
        self._cancel_timers()
        self.layer.client_done(self)


class TransactionLayer:
    """Matches messages to transactions and hands new requests to the TU."""

    def __init__(self, transports: Transports, tu: TransactionUser, metrics: SipMetrics,
                 loop: Clock | None = None, *, t1: float = T1, t2: float = T2,
                 t4: float = T4) -> None:
        self.t1, self.t2, self.t4 = t1, t2, t4   # §17 timer bases (tests shrink them)
        self.transports = transports
        self.tu = tu
        self.metrics = metrics
        self.loop: Clock = loop or asyncio.get_running_loop()
        self.server: dict[tuple, ServerTransaction] = {}
        self.client: dict[tuple, ClientTransaction] = {}
        # The timers of fixed length -- B, F, H, J, L and M (64*T1), D (32 s), I and K (T4) --
        # wait in one FIFO per length (a FIFO of one length is in deadline order), all swept by
        # one loop timer, instead of a TimerHandle and a heap push each: five per call (issue 10).
        # A sweep runs at most every T1/4, so such a timer fires up to T1/4 late (RFC 3261 §17
        # timers are lower bounds). The retransmission timers (A, E, G) stay loop timers.
        self._fifos: dict[float, deque[tuple[float, FifoTimer]]] = {
            d: deque() for d in (64 * t1, 32.0, t4) if d > 0}
        self._sweep_at: float | None = None  # when the armed sweep runs
        self._sweep_timer: TimerHandle | None = None
        self._alive = metrics.transactions.values  # by side: plain ints, set into the gauge at a scrape

    def on_message(self, msg: SipMessage, peer: Peer) -> None:
        if msg.is_request:
            self._on_request(msg, peer)
        else:
            tx = self.client.get((msg.branch, msg.cseq_method))
            if tx is not None:
                tx.receive(msg)
            else:
                self.tu.on_stray_response(msg, peer)

    def _on_request(self, msg: SipMessage, peer: Peer) -> None:
        key = msg.transaction_key()
        tx = self.server.get(key)
        method = msg.method
        if method == "ACK":
            if tx is not None and tx.state in (State.COMPLETED, State.CONFIRMED):
                tx.on_ack()               # ACK to our non-2xx: absorbed here (§17.2.1)
            elif tx is None or tx.state is State.ACCEPTED:
                self.tu.on_ack(msg, peer)  # ACK to a 2xx: its own transaction, for the dialog
            return
        if tx is not None:
            tx.on_retransmission()
            return
        tx = ServerTransaction(self, msg, peer, key)
        self.server[key] = tx
        self._alive["server"] += 1
        if method == "INVITE":
            tx.respond(100)               # §17.2.1: at once, stops the UAC's Timer A
        elif method == "CANCEL":
            invite = self.server.get((key[0], key[1], "INVITE")) if key[0] else None
            if invite is None or invite.state is not State.PROCEEDING:
                tx.respond(481, "Call/Transaction Does Not Exist")
                return
            tx.respond(200)
            invite.cancelled = True
            self.tu.on_cancel(invite, msg)
            return
        self.tu.on_request(tx)

    def linger(self, tx: ServerTransaction) -> None:
        """Keep a finished server transaction for 64*T1 to answer retransmissions, then end it."""
        self.after(64 * self.t1, tx._terminate)

    def after(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        """Call ``fn`` in ``delay`` seconds: in the FIFO of that length if it has one, else as
        a loop timer."""
        queue = self._fifos.get(delay)
        if queue is None:
            return self.loop.call_later(delay, fn)
        timer = FifoTimer(fn)
        due = self.loop.time() + delay
        queue.append((due, timer))
        # re-armed only for a deadline well before the armed sweep (a shorter FIFO's)
        if self._sweep_at is None or due < self._sweep_at - self.t1 / 4:
            self._arm_sweep(due)
        return timer

    def _arm_sweep(self, at: float) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()  # replaced by an earlier one
        self._sweep_at = at
        self._sweep_timer = self.loop.call_later(max(0.0, at - self.loop.time()), self._sweep)

    def _sweep(self) -> None:
        self._sweep_at = self._sweep_timer = None
        now = self.loop.time()
        nxt: float | None = None
        for queue in self._fifos.values():
            while queue and queue[0][0] <= now:
                timer = queue.popleft()[1]
                fn = timer.fn
                if fn is not None:
                    timer.fn = None
                    fn()
            if queue and (nxt is None or queue[0][0] < nxt):
                nxt = queue[0][0]
        # (a timer's fn may have armed a sweep meanwhile, for its own new deadline)
        if nxt is not None and (self._sweep_at is None or nxt < self._sweep_at):
            self._arm_sweep(max(nxt, now + self.t1 / 4))

    def send_request(self, request: OutRequest, dest: Peer, *, on_response: ResponseCallback,
                     on_timeout: TimeoutCallback) -> ClientTransaction:
        tx = ClientTransaction(self, request, dest, on_response, on_timeout)
        self.client[tx.key] = tx
        self._alive["client"] += 1
        self.metrics.count_out(dest.proto, request.method, 0)
        tx.start()
        return tx

    def send_stateless(self, request: OutRequest, dest: Peer) -> None:
        """ACK to a 2xx (its own transaction-less request, §13.2.2.4)."""
        self.transports.send(request.encode(), dest)
        self.metrics.count_out(dest.proto, request.method, 0)

    def server_done(self, tx: ServerTransaction) -> None:
        if self.server.pop(tx.key, None) is not None:
            self._alive["server"] -= 1

    def client_done(self, tx: ClientTransaction) -> None:
        if self.client.pop(tx.key, None) is not None:
            self._alive["client"] -= 1
