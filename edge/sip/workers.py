"""The SIP workers of one node, and how a message reaches the worker that owns it.

A node runs N worker processes (``[node] workers``, SPEC §2.2; docs/architecture.md
"Workers"). Every worker binds the node's SIP addresses with ``SO_REUSEPORT``: the kernel
spreads datagrams by their 4-tuple and TCP connections by accept, so a new request lands
on any worker and is served there. What follows it must reach the same worker, whatever
socket, source port or connection it comes on:

- every branch and tag a worker makes carries its mark (:func:`edge.sip.request.set_worker`):
  a response is owned by the worker in its top Via branch, an in-dialog request (and an
  ACK to our final answer) by the worker in its To tag, which is ours;
- a CANCEL has no To tag: a worker that has no INVITE for it asks the others
  (:meth:`WorkerLink.probe`), and only the one that has it answers;
- a TCP connection belongs to the worker that accepted (or opened) it: a worker that must
  write to another's connection sends the bytes there (:class:`RemoteConn`).

Workers talk in AF_UNIX datagrams, one socket per worker in the abstract namespace
(nothing on disk to clean up after kill -9), named after the node's data directory so
that several nodes share a machine. A forwarded message is handled where it arrives and
never forwarded again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from .metrics import SipMetrics

log = logging.getLogger("sipedge.sip")

_HEAD = struct.Struct("!BBBHB")   # kind, origin worker, proto, port, len(host); then host, then the bytes
MESSAGE, PROBE, WRITE = 1, 2, 3    # a message to handle / a CANCEL to handle if it is yours / bytes for a connection
_PROTOS = ("udp", "tcp")
LINK_BUFFER = 4 << 20


def node_key(data_dir: Path) -> str:
    """A short name for the node of ``data_dir``, unique per data directory on the machine."""
    return hashlib.blake2b(str(Path(data_dir).resolve()).encode(), digest_size=6).hexdigest()


def link_address(key: str, index: int) -> str:
    return f"\0sipedge-{key}-w{index}"


def metrics_address(key: str, index: int) -> str:
    """Where worker ``index`` serves its metrics to the node's /metrics (the API process)."""
    return f"\0sipedge-{key}-m{index}"


OnMessage = Callable[[int, bytes, str, str, int, int], None]   # kind, data, proto, host, port, origin


class WorkerLink:
    """This worker's datagram socket to the other workers of the node.

    :param on_message: called with (kind, data, proto, host, port, origin worker) of what
        another worker sent.
    """

    def __init__(self, key: str, index: int, count: int, metrics: SipMetrics) -> None:
        self.key = key
        self.index = index
        self.count = count
        self.metrics = metrics
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LINK_BUFFER)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LINK_BUFFER)
        except OSError:
            pass
        self.sock.bind(link_address(key, index))
        self._peers = [link_address(key, k) for k in range(count)]
        self.on_message: OnMessage | None = None
        self._forwarded = metrics.worker_forwarded

    def start(self, loop: asyncio.AbstractEventLoop, on_message: OnMessage) -> None:
        self.on_message = on_message
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
                kind, origin, proto, port, hlen = _HEAD.unpack_from(packet)
                host = packet[_HEAD.size:_HEAD.size + hlen].decode()
                data = packet[_HEAD.size + hlen:]
                proto_name = _PROTOS[proto]
            except (struct.error, UnicodeDecodeError, IndexError):
                continue  # only our own workers can reach this socket; a bad packet is a bug, not an attack
            assert self.on_message is not None
            self.on_message(kind, data, proto_name, host, port, origin)

    def _send(self, index: int, kind: int, data: bytes, proto: str, host: str, port: int) -> bool:
        raw_host = host.encode()
        packet = _HEAD.pack(kind, self.index, _PROTOS.index(proto), port, len(raw_host)) + raw_host + data
        try:
            self.sock.sendto(packet, self._peers[index])
        except (BlockingIOError, InterruptedError):
            self.metrics.transport_errors.labels("worker_link_full").inc()
            return False
        except OSError:   # that worker is gone (restarting): its calls are being recovered
            self.metrics.transport_errors.labels("worker_gone").inc()
            return False
        return True

    def forward(self, index: int, data: bytes, proto: str, host: str, port: int) -> None:
        """Hand a received message to the worker that owns it."""
        if self._send(index, MESSAGE, data, proto, host, port):
            self._forwarded.labels("message").inc()

    def probe(self, data: bytes, proto: str, host: str, port: int) -> None:
        """Offer a CANCEL this worker has no INVITE for to every other worker."""
        for k in range(self.count):
            if k != self.index:
                self._send(k, PROBE, data, proto, host, port)
        self._forwarded.labels("probe").inc()

    def write(self, index: int, host: str, port: int, data: bytes) -> bool:
        """Ask worker ``index`` to write ``data`` on its TCP connection to ``host:port``."""
        ok = self._send(index, WRITE, data, "tcp", host, port)
        if ok:
            self._forwarded.labels("write").inc()
        return ok

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        try:
            (loop or asyncio.get_event_loop()).remove_reader(self.sock.fileno())
        except (ValueError, RuntimeError):
            pass
        self.sock.close()


class RemoteConn:
    """A TCP connection owned by another worker, as the transport layer uses a
    :class:`~edge.sip.transport.TcpConnection`: ``write()`` sends the bytes to that worker."""

    __slots__ = ("link", "owner", "host", "port")

    closed = False

    def __init__(self, link: WorkerLink, owner: int, host: str, port: int) -> None:
        self.link = link
        self.owner = owner
        self.host = host
        self.port = port

    def write(self, data: bytes) -> bool:
        return self.link.write(self.owner, self.host, self.port, data)

    def close(self) -> None:
        pass  # not ours to close
