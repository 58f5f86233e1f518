"""The link between a node's processes and its cluster agent (docs/cluster.md "Channels across nodes",
"Money across nodes").

A SIP worker asks the agent to reserve a channel of a profile, with the money of the call's first
slice, in the engine's journal before a call starts, and to fund each later slice; the control
API asks it to top up an account or to allocate credit to a profile. The agent (the node's one
writer in the engine) answers when the event is replicated, or refuses. One abstract unix stream
socket per node, ``\\0sipedge-<key>-journal``; each message is a 4-byte big-endian length and a
msgpack body. The settlements go the other way round, through LMDB (edge/cluster/outbox.py): they
must outlive the worker that wrote them.
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

MAX_FRAME = 1 << 20             # bytes: a provisioning change (edge/cluster/provisioning.py) is at most 900 KB
RESERVE_TIMEOUT = 5.0           # seconds a call waits for its channel in the journal, then 503 (an election: 2-5 s)
_LENGTH = struct.Struct(">I")

# what the agent answers
OK = "ok"
BUSY = "busy"                   # every channel of the profile carries a call, across the cluster
BROKE = "broke"                 # the balance (in the reply, as the journal has it) does not cover the amount
UNAVAILABLE = "unavailable"     # no answer from the engine (or not holding the lease): refused
GONE = "gone"                   # a hang-up's call is not (any more) on the node asked
RESULTS = (OK, BUSY, BROKE, UNAVAILABLE, GONE)


class Reserve(msgspec.Struct, tag="reserve", array_like=True):
    """A channel of the profile for the call, and ``amount`` micro-units of its first slice."""

    id: int
    profile_id: str
    call_id: str
    channels: int
    amount: int = 0
    direction: str = ""         # what a survivor's recovery CDR says if this node dies (journal.Reserve)
    caller: str = ""
    callee: str = ""
    started_at: float = 0.0


class Fund(msgspec.Struct, tag="fund", array_like=True):
    """The next slice of an open call: ``amount`` more micro-units."""

    id: int
    profile_id: str
    call_id: str
    amount: int


class TopUp(msgspec.Struct, tag="topup", array_like=True):
    """Credit to an account's master balance; ``entry_id`` moves it once, whichever node is asked again."""

    id: int
    account_id: str
    entry_id: str
    amount: int


class Allocate(msgspec.Struct, tag="allocate", array_like=True):
    """Master balance to a profile; ``transfer_id`` moves it once, whichever node is asked again."""

    id: int
    account_id: str
    profile_id: str
    transfer_id: str
    amount: int


class Provision(msgspec.Struct, tag="provision", array_like=True):
    """A change of the cluster's provisioning (edge/cluster/provisioning.py) for ``slot``, if still empty:
    answered ``ok`` once applied on this node, ``busy`` if another change took the slot."""

    id: int
    slot: int
    change: bytes


class Hangup(msgspec.Struct, tag="hangup", array_like=True):
    """The control API's hang-up of a call another node carries: relayed to that node's agent through the
    engine (edge/cluster/hangups.py); answered ``ok`` with the request that node recorded (``body``)."""

    id: int
    node: str
    call_id: str
    cause: int
    key_id: str = ""


Request = Reserve | Fund | TopUp | Allocate | Provision | Hangup


class Reply(msgspec.Struct, array_like=True):
    id: int
    result: str
    balance: int = 0            # the profile's (or, for a top-up, the account's) balance in the journal
    account_balance: int = 0    # an allocation's account balance in the journal
    slot: int = 0               # a provisioning change's slot
    body: bytes = b""           # a hang-up's request as the carrying node recorded it (msgpack HangupRequest)


def journal_address(key: str) -> str:
    return f"\0sipedge-{key}-journal"


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    return await reader.readexactly(n)


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


class JournalClient:
    """A worker's side: every request is answered with a :class:`Reply` whose ``result`` is one of
    :data:`RESULTS`; it never raises.

    :param timeout: seconds a request may take before it counts as unavailable (the agent may still
        land it: a reservation is then settled through the outbox, a slice is reserved but unused).
    """

    def __init__(self, address: str, *, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._connecting: asyncio.Task[asyncio.StreamWriter | None] | None = None
        self._reading: asyncio.Task[None] | None = None
        self._decoder = msgspec.msgpack.Decoder(Reply)
        self._encoder = msgspec.msgpack.Encoder()

    async def reserve(self, profile_id: str, call_id: str, channels: int, amount: int = 0, *, direction: str = "",
                      caller: str = "", callee: str = "", started_at: float = 0.0) -> Reply:
        return await self._ask(Reserve(next(self._ids), profile_id, call_id, channels, amount, direction, caller,
                                       callee, started_at))

    async def fund(self, profile_id: str, call_id: str, amount: int) -> Reply:
        return await self._ask(Fund(next(self._ids), profile_id, call_id, amount))

    async def _ask(self, request: Reserve | Fund) -> Reply:
        writer = await self._connected()
        if writer is None:
            return Reply(request.id, UNAVAILABLE)
        waiter = self._waiting[request.id] = asyncio.get_running_loop().create_future()
        try:
            writer.write(_frame(self._encoder.encode(request)))
            return await asyncio.wait_for(waiter, self.timeout)
        except (TimeoutError, OSError):
            return Reply(request.id, UNAVAILABLE)
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
                    waiter.set_result(reply if reply.result in RESULTS else Reply(reply.id, UNAVAILABLE))
        except (asyncio.IncompleteReadError, OSError, ValueError, msgspec.DecodeError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            for request_id, waiter in self._waiting.items():   # the agent went away: these get no answer
                if not waiter.done():
                    waiter.set_result(Reply(request_id, UNAVAILABLE))

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


def ask_blocking(address: str, request: TopUp | Allocate | Provision | Hangup, timeout: float) -> Reply:
    """The control API's side (its handlers run in threads): one request on a connection of its own.
    No answer within ``timeout`` is :data:`UNAVAILABLE` -- the event may still land, and asking again
    with the same entry or transfer id moves the money once."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(_frame(msgspec.msgpack.encode(request)))
            (n,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes")
            reply = msgspec.msgpack.decode(_recv_exactly(sock, n), type=Reply)
    except (OSError, ValueError, msgspec.DecodeError):
        return Reply(request.id, UNAVAILABLE)
    return reply if reply.result in RESULTS else Reply(request.id, UNAVAILABLE)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("the agent closed the link")
        data += chunk
    return data


async def serve_requests(address: str, handle: Callable[[Request], Awaitable[Reply]]) -> asyncio.Server:
    """The agent's side: each request is handled in its own task, answered when ``handle`` returns."""
    decoder = msgspec.msgpack.Decoder(Request)
    encoder = msgspec.msgpack.Encoder()

    async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await handle(request)
        except Exception:       # a bug must not leave the asker waiting: it is refused
            log.exception("cluster: request %r", request)
            reply = Reply(request.id, UNAVAILABLE)
        with contextlib.suppress(OSError):
            writer.write(_frame(encoder.encode(reply)))

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
