"""The SIP workers of one node, and how a message reaches the worker that owns it.

A node runs N worker processes (``[node] workers``, SPEC §2.2; docs/architecture.md
"Processes"). Every worker binds the node's SIP addresses with ``SO_REUSEPORT``: the kernel
spreads datagrams by their 4-tuple and TCP connections by accept, so a new request lands
on any worker and is served there. What follows it must reach the same worker, whatever
socket, source port or connection it comes on:

- every branch and tag a worker makes carries its mark (:func:`edge.sip.request.set_worker`):
  a response is owned by the worker in its top Via branch, an in-dialog request (and an
  ACK to any final answer of ours, which always has our To tag) by the worker in its To tag;
- a CANCEL has no To tag: a worker that has no INVITE for it offers it to the others
  (PROBE); the one that has the INVITE takes it and says so (CLAIM), the others say NOCLAIM,
  and when nobody claims it the worker that got it answers 481 itself;
- a TCP connection belongs to the worker that accepted (or opened) it. Each worker tells the
  others which connections it holds (CONN_UP / CONN_DOWN, and all of them again to a worker
  that starts: HELLO), so a worker that must write toward a peer reached over another
  worker's connection (a PBX registered over TCP, a dialog whose peer's connection lives
  elsewhere) sends the bytes there (WRITE, :class:`RemoteConn`).

Workers talk in AF_UNIX datagrams, one socket per worker in the abstract namespace
(nothing on disk to clean up after kill -9), named after the node's data directory so
that several nodes share a machine. Each worker sends over a socket connected to each
other worker: the kernel queues only ``net.unix.max_dgram_qlen`` (10) datagrams per
socket, and a connected sender can wait for room, so a burst queues here (bounded) and
arrives whole and in order instead of being dropped. A forwarded message is handled where it arrives and
never forwarded again. With one worker there is no link at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from . import SipMessage, SipParseError, parse
from .metrics import SipMetrics
from .request import branch_owner, token_owner
from .transport import Peer

if TYPE_CHECKING:
    from .transaction import TransactionLayer
    from .transport import TcpConnection, Transports

log = logging.getLogger("sipedge.sip")

_HEAD = struct.Struct("!BBBBHB")   # kind, origin worker, proto, side, port, len(host); then host, then the bytes
MESSAGE, PROBE, WRITE, CLAIM, NOCLAIM, CONN_UP, CONN_DOWN, HELLO = range(1, 9)
_PROTOS = ("udp", "tcp", "tls")
_SIDES = ("", "customer", "carrier")
LINK_BUFFER = 4 << 20
LINK_BACKLOG = 20_000  # datagrams queued here for one busy worker before they are dropped (and counted)
PROBE_WAIT = 1.0      # seconds a CANCEL offered to the other workers waits for them before 481


def node_key(data_dir: Path) -> str:
    """A short name for the node of ``data_dir``, unique per data directory on the machine."""
    return hashlib.blake2b(str(Path(data_dir).resolve()).encode(), digest_size=6).hexdigest()


def link_address(key: str, index: int) -> str:
    return f"\0sipedge-{key}-w{index}"


def metrics_address(key: str, index: int) -> str:
    """Where worker ``index`` serves its metrics to the node's /metrics (the API process)."""
    return f"\0sipedge-{key}-m{index}"


OnMessage = Callable[[int, bytes, str, str, int, str, int], None]   # kind, data, proto, host, port, side, origin


class WorkerLink:
    """This worker's datagram socket to the other workers of the node.

    ``on_message`` is called with (kind, data, proto, host, port, side, origin worker) of
    what another worker sent.
    """

    def __init__(self, key: str, index: int, count: int, metrics: SipMetrics) -> None:
        self.key = key
        self.index = index
        self.count = count
        self.metrics = metrics
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, LINK_BUFFER)
            except OSError:
                pass
        self.sock.bind(link_address(key, index))
        self._peers = [link_address(key, k) for k in range(count)]
        # one connected socket per other worker: a connected AF_UNIX datagram socket polls
        # writable only while the peer's queue (net.unix.max_dgram_qlen, 10 by default) has
        # room, so a burst waits in ``_backlog`` instead of being dropped
        self._out: list[socket.socket | None] = [None] * count
        self._backlog: list[deque[bytes]] = [deque() for _ in range(count)]
        self.on_message: OnMessage | None = None
        self._forwarded = metrics.worker_forwarded
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_message: OnMessage) -> None:
        self.on_message = on_message
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):
            try:
                packet = self.sock.recv(1 << 17)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                kind, origin, proto, side, port, hlen = _HEAD.unpack_from(packet)
                host = packet[_HEAD.size:_HEAD.size + hlen].decode()
                data = packet[_HEAD.size + hlen:]
                proto_name, side_name = _PROTOS[proto], _SIDES[side]
            except (struct.error, UnicodeDecodeError, IndexError):
                continue  # only our own workers can reach this socket; a bad packet is a bug, not an attack
            assert self.on_message is not None
            self.on_message(kind, data, proto_name, host, port, side_name, origin)

    def send(self, index: int, kind: int, data: bytes = b"", proto: str = "udp", host: str = "", port: int = 0,
             side: str = "") -> bool:
        """Send to worker ``index``: at once, or queued behind what waits for room in its queue.
        :returns: False if that worker is gone (restarting), or its backlog is full."""
        raw_host = host.encode()
        packet = _HEAD.pack(kind, self.index, _PROTOS.index(proto), _SIDES.index(side), port,
                            len(raw_host)) + raw_host + data
        backlog = self._backlog[index]
        if backlog:
            if len(backlog) >= LINK_BACKLOG:
                self.metrics.transport_errors.labels("worker_link_full").inc()
                return False
            backlog.append(packet)
            return True
        for _ in range(2):
            out = self._out[index] or self._connect(index)
            if out is None:
                break
            try:
                out.send(packet)
                return True
            except (BlockingIOError, InterruptedError):
                backlog.append(packet)
                if self._loop is not None:
                    self._loop.add_writer(out.fileno(), self._drain, index)
                return True
            except OSError:   # the worker behind it restarted (or is gone): connect again, once
                self._disconnect(index)
        self.metrics.transport_errors.labels("worker_gone").inc()   # its calls are being recovered
        return False

    def _connect(self, index: int) -> socket.socket | None:
        out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        out.setblocking(False)
        try:
            out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LINK_BUFFER)
        except OSError:
            pass
        try:
            out.connect(self._peers[index])
        except OSError:
            out.close()
            return None
        self._out[index] = out
        return out

    def _disconnect(self, index: int) -> None:
        out = self._out[index]
        self._out[index] = None
        if out is not None:
            if self._loop is not None:
                self._loop.remove_writer(out.fileno())
            out.close()

    def _drain(self, index: int) -> None:
        """Room in worker ``index``'s queue: send what waited, in order."""
        out, backlog = self._out[index], self._backlog[index]
        while backlog and out is not None:
            try:
                out.send(backlog[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.metrics.transport_errors.labels("worker_gone").inc(len(backlog))
                backlog.clear()
                self._disconnect(index)
                return
            backlog.popleft()
        if out is not None and self._loop is not None:
            self._loop.remove_writer(out.fileno())

    def others(self) -> range:
        return range(self.count)

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.sock.fileno())
            except (ValueError, RuntimeError):
                pass
        for k in range(self.count):
            try:
                self._disconnect(k)
            except (ValueError, RuntimeError):
                pass
        self.sock.close()


class RemoteConn:
    """A TCP or TLS connection owned by another worker, as the transport layer uses a
    :class:`~edge.sip.transport.TcpConnection`: ``write()`` sends the bytes to that worker
    (a TLS session lives in the process that made it: the bytes are encrypted there)."""

    __slots__ = ("link", "owner", "host", "port", "side", "proto")

    closed = False

    def __init__(self, link: WorkerLink, owner: int, host: str, port: int, side: str = "",
                 proto: str = "tcp") -> None:
        self.link = link
        self.owner = owner
        self.host = host
        self.port = port
        self.side = side
        self.proto = proto

    def write(self, data: bytes) -> bool:
        if self.link.send(self.owner, WRITE, data, self.proto, self.host, self.port, self.side):
            self.link._forwarded.labels("write").inc()
            return True
        return False

    def close(self) -> None:
        pass  # not ours to close


class WorkerRouter:
    """Sends what another worker owns to it, and handles what the other workers send here.

    :param handle: delivers a message to this worker's SIP stack (flood checks, then the
        transaction layer): for what is ours and for what the others forward.
    """

    def __init__(self, link: WorkerLink, transports: Transports, transactions: TransactionLayer,
                 handle: Callable[[SipMessage, Peer], None], loop: asyncio.AbstractEventLoop) -> None:
        self.link = link
        self.index = link.index
        self.count = link.count
        self.transports = transports
        self.tl = transactions
        self.handle = handle
        self.loop = loop
        self.remote: dict[tuple[str, int], tuple[int, str, str]] = {}   # (host, port) -> (worker, side, proto)
        self._probes: dict[tuple, tuple[SipMessage, Peer, int, asyncio.TimerHandle]] = {}
        self._forwarded = link._forwarded.labels("message")
        transports.remote_tcp = self.remote_conn
        transports.on_tcp_change = self._tcp_changed

    def start(self) -> None:
        self.link.start(self.loop, self._on_link)
        for k in self.link.others():
            if k != self.index:
                self.link.send(k, HELLO)

    def close(self) -> None:
        for *_, timer in self._probes.values():
            timer.cancel()
        self._probes.clear()
        self.link.close()

    # ------------------------------------------------------------ what arrives from the network

    def on_message(self, msg: SipMessage, peer: Peer) -> None:
        """A message from the network: forwarded to its owner, offered around (a CANCEL), or handled here."""
        owner = self._owner(msg)
        if owner >= 0:
            if self.link.send(owner, MESSAGE, msg.raw, peer.proto, peer.host, peer.port, peer.side):
                self._forwarded.inc()
            return
        if msg.is_request and msg.method == "CANCEL" and msg.to_tag is None:
            key = msg.transaction_key()
            if key[0] is not None and (key[0], key[1], "INVITE") not in self.tl.server \
                    and key not in self.tl.server:
                self._probe(msg, peer, key)
                return
        self.handle(msg, peer)

    def _owner(self, msg: SipMessage) -> int:
        """The other worker that owns ``msg``, or -1 (ours, or nobody's in particular)."""
        if msg.is_request:
            tag = msg.to_tag
            if tag is None:
                return -1
            owner = token_owner(tag)
        else:
            owner = branch_owner(msg.branch)
        return owner if 0 <= owner < self.count and owner != self.index else -1

    def _probe(self, msg: SipMessage, peer: Peer, key: tuple) -> None:
        if key in self._probes:
            return  # a retransmission while the others are asked
        sent = sum(self.link.send(k, PROBE, msg.raw, peer.proto, peer.host, peer.port, peer.side)
                   for k in self.link.others() if k != self.index)
        self.link._forwarded.labels("probe").inc()
        if not sent:
            self.handle(msg, peer)
            return
        timer = self.loop.call_later(PROBE_WAIT, self._unclaimed, key)
        self._probes[key] = (msg, peer, sent, timer)

    def _unclaimed(self, key: tuple) -> None:
        entry = self._probes.pop(key, None)
        if entry is not None:
            entry[3].cancel()
            self.handle(entry[0], entry[1])   # no INVITE anywhere: answered 481 here

    # ------------------------------------------------------------ what the other workers send

    def _on_link(self, kind: int, data: bytes, proto: str, host: str, port: int, side: str, origin: int) -> None:
        if kind in (MESSAGE, PROBE):
            msg = self._parse(data)
            if msg is None:
                return
            conn = RemoteConn(self.link, origin, host, port, side, proto) if proto in ("tcp", "tls") else None
            peer = Peer(proto, host, port, conn, side)  # type: ignore[arg-type]
            if kind == PROBE:
                key = msg.transaction_key()
                mine = (key[0], key[1], "INVITE") in self.tl.server or key in self.tl.server
                self.link.send(origin, CLAIM if mine else NOCLAIM, repr(key[:2]).encode())
                if not mine:
                    return
            self.handle(msg, peer)
        elif kind == WRITE:
            local = self.transports.tcp_by_peer.get((host, port))
            if local is not None and local.proto == proto and local.write(data):
                return
            # the connection closed meanwhile: a new one, as a send of our own would
            self.loop.create_task(self.transports._connect_and_send(data, host, port, side, proto))
        elif kind in (CLAIM, NOCLAIM):
            self._answered(data, kind == CLAIM)
        elif kind == CONN_UP:
            self.remote[(host, port)] = (origin, side, proto)
        elif kind == CONN_DOWN:
            if self.remote.get((host, port), (-1, "", ""))[0] == origin:
                del self.remote[(host, port)]
        elif kind == HELLO:
            # that worker (re)started: the connections it held died with it; tell it ours
            for where in [k for k, (owner, _, _) in self.remote.items() if owner == origin]:
                del self.remote[where]
            for (h, p), held in list(self.transports.tcp_by_peer.items()):
                self.link.send(origin, CONN_UP, b"", held.proto, h, p, held.side)

    def _answered(self, data: bytes, claimed: bool) -> None:
        wanted = data.decode(errors="replace")
        for key, (msg, peer, waiting, timer) in list(self._probes.items()):
            if repr(key[:2]) != wanted:
                continue
            if claimed:
                timer.cancel()
                del self._probes[key]
            elif waiting <= 1:
                self._unclaimed(key)
            else:
                self._probes[key] = (msg, peer, waiting - 1, timer)
            return

    @staticmethod
    def _parse(data: bytes) -> SipMessage | None:
        try:
            msg = parse(data)
            msg.validate()
        except SipParseError:
            return None   # it parsed at the worker that forwarded it: cannot happen
        return msg

    # ------------------------------------------------------------ TCP connections across workers

    def remote_conn(self, host: str, port: int) -> TcpConnection | None:
        """Another worker's connection to ``host:port``, as the transport writes to one (duck-typed)."""
        owner = self.remote.get((host, port))
        if owner is None:
            return None
        return cast("TcpConnection", RemoteConn(self.link, owner[0], host, port, owner[1], owner[2]))

    def _tcp_changed(self, conn: TcpConnection, up: bool) -> None:
        if conn.peer is None:
            return
        kind = CONN_UP if up else CONN_DOWN
        for k in self.link.others():
            if k != self.index:
                self.link.send(k, kind, b"", conn.proto, conn.peer.host, conn.peer.port, conn.side)
