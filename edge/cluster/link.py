"""The link between a node's SIP workers and its cluster agent (docs/cluster.md "Channels across nodes").

A worker asks the agent to reserve a channel of a profile in the engine's journal before a call
starts; the agent (the node's one writer in the engine) answers when the reservation is
replicated, or refuses. One abstract unix stream socket per node, ``\\0sipedge-<key>-journal``;
each message is a 4-byte big-endian length and a msgpack body. The settlements go the other way
round, through LMDB (edge/cluster/outbox.py): they must outlive the worker that wrote them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import msgspec

log = logging.getLogger("sipedge.cluster")

MAX_FRAME = 4096
RESERVE_TIMEOUT = 5.0           # seconds a call waits for its channel in the journal, then 503 (an election: 2-5 s)
_LENGTH = struct.Struct(">I")

# what the agent answers
OK = "ok"
BUSY = "busy"                   # every channel of the profile carries a call, across the cluster
UNAVAILABLE = "unavailable"     # no answer from the engine (or not holding the lease): the call is refused
RESULTS = (OK, BUSY, UNAVAILABLE)


class ReserveRequest(msgspec.Struct, array_like=True):
    id: int
    profile_id: str
    call_id: str
    channels: int


class ReserveReply(msgspec.Struct, array_like=True):
    id: int
    result: str


def journal_address(key: str) -> str:
    return f"\0sipedge-{key}-journal"


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    return await reader.readexactly(n)


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


class ReserveClient:
    """A worker's side: :meth:`reserve` returns one of :data:`RESULTS`, never raises.

    :param timeout: seconds a reservation may take before the call is refused as unavailable
        (the agent may still land it: the caller then settles it through the outbox).
    """

    def __init__(self, address: str, *, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[str]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._connecting: asyncio.Task[asyncio.StreamWriter | None] | None = None
        self._reading: asyncio.Task[None] | None = None
        self._decoder = msgspec.msgpack.Decoder(ReserveReply)
        self._encoder = msgspec.msgpack.Encoder()

    async def reserve(self, profile_id: str, call_id: str, channels: int) -> str:
        writer = await self._connected()
        if writer is None:
            return UNAVAILABLE
        request = ReserveRequest(next(self._ids), profile_id, call_id, channels)
        waiter = self._waiting[request.id] = asyncio.get_running_loop().create_future()
        try:
            writer.write(_frame(self._encoder.encode(request)))
            return await asyncio.wait_for(waiter, self.timeout)
        except (TimeoutError, OSError):
            return UNAVAILABLE
        finally:
            self._waiting.pop(request.id, None)

    async def _connected(self) -> asyncio.StreamWriter | None:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> asyncio.StreamWriter | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.address), 1.0)
        except (OSError, TimeoutError):
            return None         # the agent is (re)starting: this call is refused, the next one tries again
        self._writer = writer
        self._reading = asyncio.create_task(self._read_replies(reader, writer))
        return writer

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                reply = self._decoder.decode(await _read_frame(reader))
                waiter = self._waiting.get(reply.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply.result if reply.result in RESULTS else UNAVAILABLE)
        except (asyncio.IncompleteReadError, OSError, ValueError, msgspec.DecodeError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            for waiter in self._waiting.values():   # the agent went away: these get no answer
                if not waiter.done():
                    waiter.set_result(UNAVAILABLE)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """An abstract unix socket has no file permissions: any local user could connect and seize a
    profile's channels, so only processes of the node's own user are heard (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    except (OSError, AttributeError):
        return False
    if uid != os.getuid():
        log.warning("cluster: a process of uid %d connected to the agent's link: refused", uid)
        return False
    return True


async def serve_reservations(address: str, handle: Callable[[ReserveRequest], Awaitable[str]]) -> asyncio.Server:
    """The agent's side: each request is handled in its own task, answered when ``handle`` returns."""
    decoder = msgspec.msgpack.Decoder(ReserveRequest)
    encoder = msgspec.msgpack.Encoder()

    async def answer(request: ReserveRequest, writer: asyncio.StreamWriter) -> None:
        try:
            result = await handle(request)
        except Exception:       # a bug must not leave the worker waiting: it refuses the call
            log.exception("cluster: reservation of %s for %s", request.call_id, request.profile_id)
            result = UNAVAILABLE
        with contextlib.suppress(OSError):
            writer.write(_frame(encoder.encode(ReserveReply(request.id, result))))

    tasks: set[asyncio.Task[None]] = set()     # held here: the loop keeps only weak references

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not _same_user(writer):
            writer.close()
            return
        try:
            while True:
                request = decoder.decode(await _read_frame(reader))
                task = asyncio.create_task(answer(request, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, OSError, ValueError, msgspec.DecodeError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(connection, path=address)
