"""Provisioning on any node of a cluster, through the engine (docs/cluster.md "Provisioning on any
node").

What the control API provisions -- accounts, profiles and their credentials, numbers, business
accounts, the rate table and the bundle exclusions, API keys, webhooks, console passwords, sessions
and sign-in failures, and the Idempotency-Key results -- is the cluster's, not a node's. A cluster
node's API runs each write transaction as a node alone does, but records it (:class:`RecordingTxn`)
and aborts it: the rows it changed in those tables are one :class:`Change`, which the node's agent
appends to the next slot of the engine's ``SIPEDGE_CONFIG`` stream, ``sipedge.config.<n>``, on
condition that the slot is still empty (the journal's check, edge/cluster/journal.py). Every node's
agent applies the changes in slot order to its LMDB (:class:`Applier`), each in one write
transaction with the slot it reached, and the API answers once its own node has applied its change:
what it answers is what every node will have.

Exact without a lock: a change was computed on a node that had applied slots 1..n-1, so it is the
n-th only if nobody took slot n first; else the API waits for its node to apply the slot it lost and
runs the write again on the newer state (a second create of the same number now fails there, as on a
node alone). Two nodes never both land the n-th change.

Not in a change, by design: live calls, registrations, channel counts, webhook deliveries, the audit
log (node-local), CDRs and the ledger (the money journal's, edge/cluster/money.py). The balances
inside account and profile records stay the node's (the money journal writes them): an applied
record keeps the local balance.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NoStreamResponseError

from edge.control import console_auth, registrations
from edge.control.errors import ClusterUnavailable, ClusterUnsupported, Invalid, StoreError
from edge.control.models import Account, Profile
from edge.control.store import Store, Txn, u64

from . import link
from .engine import Engine
from .journal import DUPLICATE_WINDOW, WRONG_LAST_SEQUENCE

log = logging.getLogger("sipedge.cluster")
T = TypeVar("T")

STREAM = "SIPEDGE_CONFIG"
SUBJECT_PREFIX = "sipedge.config."
MARK = b"cluster_config"         # meta: the last slot applied to this store
MAX_CHANGE = 900_000             # bytes of one change (the engine's max_payload is 1 MB)
WRITE_DEADLINE = 10.0            # seconds an API write may keep losing its slot to other nodes' (then 503)
ATTEMPTS = 500                   # and at most this many runs
APPLY_TIMEOUT = 10.0             # seconds the API waits for its node to apply a change (an election: 2-5 s)
PUBLISH_ATTEMPTS = 5             # one slot's publish, again with the same Msg-Id after no answer

# the cluster's tables; "meta" only for the keys below
REPLICATED = frozenset({
    "accounts", "admins", "profiles", "credentials", "numbers", "business", "rates", "rates_b",
    "exclusions", "idempotency", "api_keys", "webhooks", "console_passwords",
    # console sessions and failed sign-ins: a session opened on one node signs in on every node (a
    # console behind a load balancer), and the lockout counts the failures of every node
    "console_sessions", "console_signins"})
REPLICATED_META = (b"rate_table", b"rate_loading", b"rate_lengths", b"exclusion_lengths",
                   b"sip_username_seq")

PUT, DELETE, CLEAR = "put", "del", "clear"


class Row(msgspec.Struct, array_like=True, frozen=True):
    op: str                      # PUT | DELETE | CLEAR
    db: str
    key: bytes = b""
    value: bytes = b""


class Change(msgspec.Struct, array_like=True, frozen=True):
    id: str                      # the Nats-Msg-Id: a publish retried after no answer lands once
    rows: list[Row]


def replicated(db: str, k: bytes) -> bool:
    return db in REPLICATED or (db == "meta" and k.startswith(REPLICATED_META))


class RecordingTxn(Txn):
    """A write transaction that also keeps what it changed: the cluster's rows and the node's."""

    __slots__ = ("local", "rows")

    def __init__(self, store: Store, raw: Any, writable: bool) -> None:
        super().__init__(store, raw, writable)
        self.rows: list[Row] = []
        self.local: list[Row] = []

    def _note(self, row: Row) -> None:
        (self.rows if replicated(row.db, row.key) or (row.op == CLEAR and row.db in REPLICATED)
         else self.local).append(row)

    def put(self, db: str, k: bytes, value: msgspec.Struct) -> None:
        self.put_raw(db, k, self.store.encode(value))

    def put_raw(self, db: str, k: bytes, value: bytes, *, overwrite: bool = True) -> bool:
        written = super().put_raw(db, k, value, overwrite=overwrite)
        if written:
            self._note(Row(PUT, db, k, value))
        return written

    def put_u64(self, db: str, k: bytes, n: int) -> None:
        self.put_raw(db, k, u64(n))

    def delete(self, db: str, k: bytes) -> bool:
        existed = super().delete(db, k)
        if existed:
            self._note(Row(DELETE, db, k))
        return existed

    def clear(self, db: str) -> None:
        super().clear(db)
        self._note(Row(CLEAR, db))


class _Ship(Exception):
    """Raised out of a recorded write: it aborts the LMDB transaction, the rows go to the engine."""

    def __init__(self, result: Any, rows: list[Row], local: list[Row], after: int) -> None:
        super().__init__("shipping a change")
        self.result, self.rows, self.local, self.after = result, rows, local, after


def apply_rows(txn: Txn, rows: Iterable[Row]) -> None:
    """Rows as recorded, raw."""
    for row in rows:
        if row.op == PUT:
            txn.put_raw(row.db, row.key, row.value)
        elif row.op == DELETE:
            txn.delete(row.db, row.key)
        elif row.op == CLEAR:
            txn.clear(row.db)


def applied(store: Store) -> int:
    """The last slot of the cluster's provisioning this store has applied."""
    return store.read(lambda txn: txn.get_u64("meta", MARK))


# ------------------------------------------------------------------ the API's side

class Replicator:
    """Takes the writes of a cluster node's control API (``Store.replicator``).

    :param address: the node's link to its agent (edge/cluster/link.py).
    """

    def __init__(self, store: Store, address: str) -> None:
        self.store = store
        self.address = address
        self.conflicts = 0

    def write(self, fn: Callable[[Txn], T], *, sync: bool, grows: bool) -> T:
        def recorded(txn: Txn) -> T:
            result = fn(txn)
            assert isinstance(txn, RecordingTxn)
            if txn.rows:
                raise _Ship(result, txn.rows, txn.local, txn.get_u64("meta", MARK))
            return result

        deadline = time.monotonic() + WRITE_DEADLINE
        for _ in range(ATTEMPTS):
            if time.monotonic() > deadline:
                break
            try:
                return self.store.write_here(recorded, sync=sync, grows=grows, txn=RecordingTxn)
            except _Ship as ship:
                landed = self._ship(ship)
                if landed is None:
                    self.conflicts += 1
                    self._wait_applied(ship.after + 1)
                    continue                 # the slot was taken: again, on the state that includes it
                self._wait_applied(landed)
                if ship.local:               # the node's own side of the write: sessions, sign-ins
                    self.store.write_here(functools.partial(apply_rows, rows=ship.local), sync=sync, grows=False)
                return ship.result
        raise ClusterUnavailable("the cluster's provisioning changed under this request too often; ask again")

    def _ship(self, ship: _Ship) -> int | None:
        """:returns: the slot the change landed at, None if the slot was taken first."""
        if any(row.db in ("ledger", "cdrs", "calls", "channels") for row in ship.local):
            log.error("cluster: a provisioning write also moved call or money state here: refused")
            raise ClusterUnsupported("this change moves money or calls outside the cluster's journal")
        change = Change(uuid.uuid4().hex, ship.rows)
        payload = msgspec.msgpack.encode(change)
        if len(payload) > MAX_CHANGE:
            raise Invalid(f"the change is {len(payload)} bytes, above the cluster's {MAX_CHANGE} per write")
        reply = link.ask_blocking(self.address, link.Provision(0, ship.after + 1, payload), APPLY_TIMEOUT)
        if reply.result == link.BUSY:
            return None
        if reply.result != link.OK:
            raise ClusterUnavailable("the cluster's engine did not confirm the change; nothing was changed "
                                     "unless a read shows it")
        return reply.slot

    def _wait_applied(self, slot: int) -> None:
        """Until this node's agent has applied ``slot`` (it does within milliseconds)."""
        deadline = time.monotonic() + APPLY_TIMEOUT
        pause = 0.001
        while applied(self.store) < slot:
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"change {slot} of the cluster is not applied on this node yet")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)


# ------------------------------------------------------------------ the agent's side

async def ensure_stream(engine: Engine) -> None:
    """The provisioning stream: replicated, on disk, a duplicate window for retried publishes."""
    await engine.stream(STREAM, [SUBJECT_PREFIX + ">"], duplicate_window=DUPLICATE_WINDOW)


class Applier:
    """Appends the API's changes to the engine and applies every node's, in slot order, to the store.

    :param on_new: called with the account and profile ids a change brought to this node (their
        money journals are to be followed: ClusterMoney.follow).
    """

    def __init__(self, engine: Engine, store: Store,
                 on_new: Callable[[list[str], list[str]], Coroutine[Any, Any, None]] | None = None) -> None:
        self.engine = engine
        self.store = store
        self.on_new = on_new
        self.slot = applied(store)
        self._moved = asyncio.Condition()
        self._decoder = msgspec.msgpack.Decoder(Change)
        self._following: set[asyncio.Task[None]] = set()   # held here: the loop keeps only weak references
        self.published = self.lost = 0

    async def provision(self, request: link.Provision) -> link.Reply:
        """Append one change to slot ``request.slot`` (still empty); answered once applied here."""
        try:
            change = self._decoder.decode(request.change)
        except msgspec.DecodeError:
            return link.Reply(request.id, link.UNAVAILABLE)
        subject = f"{SUBJECT_PREFIX}{request.slot}"
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self.engine.js.publish(subject, request.change, timeout=2.0, headers={
                    "Nats-Msg-Id": change.id, "Nats-Expected-Last-Subject-Sequence": "0"})
                break
            except BadRequestError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                if await self._landed(change.id, request.slot):
                    break                    # our earlier try took it
                self.lost += 1
                # answered once the winner's change is applied here: the API runs its write again at once
                await self.wait(request.slot, APPLY_TIMEOUT)
                return link.Reply(request.id, link.BUSY)
            except (NatsTimeoutError, TimeoutError, NoStreamResponseError) as exc:
                log.info("cluster: change %s to slot %d without an answer (%s), attempt %d", change.id,
                         request.slot, exc.__class__.__name__, attempt + 1)
        else:
            return link.Reply(request.id, link.UNAVAILABLE)
        self.published += 1
        if not await self.wait(request.slot, 10.0):
            return link.Reply(request.id, link.UNAVAILABLE)
        return link.Reply(request.id, link.OK, slot=request.slot)

    async def _landed(self, change_id: str, slot: int) -> bool:
        with contextlib.suppress(Exception):
            msg = await self.engine.js.get_last_msg(STREAM, f"{SUBJECT_PREFIX}{slot}")
            return msg.data is not None and self._decoder.decode(msg.data).id == change_id
        return False

    async def catch_up(self, timeout: float = 60.0) -> int:
        """Until every change the stream holds now is applied here (at the agent's start, before the
        node is ready). :returns: the slot reached."""
        info = await self.engine.js.stream_info(STREAM)
        if info.state.last_seq:
            last = await self.engine.js.get_msg(STREAM, info.state.last_seq)
            target = int((last.subject or "").rsplit(".", 1)[1])
            if not await self.wait(target, timeout):
                raise TimeoutError(f"the cluster's provisioning: slot {self.slot} of {target} after {timeout} s")
        return self.slot

    async def wait(self, slot: int, timeout: float) -> bool:
        async with self._moved:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait_for(lambda: self.slot >= slot), timeout)
        return self.slot >= slot

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the stream from the first slot not applied here, until ``stop``."""
        async def start() -> ConsumerConfig:
            return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                  opt_start_seq=await self._next_sequence())

        async def handle(msg: Msg) -> None:
            await self._apply(msg.subject, msg.data)

        await self.engine.follow(STREAM, SUBJECT_PREFIX + ">", handle, stop, start=start, what="the provisioning")

    async def _next_sequence(self) -> int:
        """The stream sequence of the first slot not applied here (slots land in stream order)."""
        if self.slot == 0:
            return 1
        msg = await self.engine.js.get_last_msg(STREAM, f"{SUBJECT_PREFIX}{self.slot}")
        assert msg.seq is not None
        return msg.seq + 1

    async def _apply(self, subject: str, data: bytes) -> None:
        try:
            slot = int(subject.rsplit(".", 1)[1])
            change = self._decoder.decode(data)
        except (ValueError, IndexError, msgspec.DecodeError):
            log.error("cluster: %s is not a provisioning change: skipped", subject)
            return
        if slot <= self.slot:
            return                           # applied before (a redelivery after a reconnect)
        if slot != self.slot + 1:
            raise RuntimeError(f"provisioning slot {slot} after {self.slot}: following again")
        new: tuple[list[str], list[str]] = ([], [])

        def op(txn: Txn) -> None:
            if txn.get_u64("meta", MARK) >= slot:
                return
            _apply_change(txn, change, new)
            txn.put_u64("meta", MARK, slot)

        try:
            self.store.write_here(op, sync=True, grows=False)
        except StoreError as exc:
            raise RuntimeError(f"provisioning slot {slot} not applied: {exc}") from exc
        async with self._moved:
            self.slot = slot
            self._moved.notify_all()
        if (new[0] or new[1]) and self.on_new is not None:
            # opening their journals takes round trips: the next change is not kept waiting for them
            task = asyncio.create_task(self.on_new(*new), name="cluster-provisioning-follow")
            self._following.add(task)
            task.add_done_callback(self._following.discard)


def _apply_change(txn: Txn, change: Change, new: tuple[list[str], list[str]]) -> None:
    """One change's rows, with the node's own balances kept in the records that carry one."""
    for row in change.rows:
        if row.op == PUT and row.db in ("accounts", "profiles"):
            value = _keep_balance(txn, row, new)
            txn.put_raw(row.db, row.key, value)
            continue
        apply_rows(txn, (row,))
        if row.op == DELETE and row.db == "profiles":
            registrations.remove_all(txn, row.key.decode())      # the writer's went in its local rows
        if row.op == PUT and row.db == "console_passwords":
            console_auth.end_sessions_of(txn, row.key.decode())   # a new password ends them on every node


def _keep_balance(txn: Txn, row: Row, new: tuple[list[str], list[str]]) -> bytes:
    cls: type[Account] | type[Profile] = Account if row.db == "accounts" else Profile
    incoming = txn.store.decoder(cls).decode(row.value)
    here = txn.get(row.db, row.key, cls)
    if here is None:
        (new[0] if cls is Account else new[1]).append(row.key.decode())
        kept = msgspec.structs.replace(incoming, balance=0)   # the journal's comes with its ledger
    elif isinstance(here, Profile):
        kept = msgspec.structs.replace(incoming, balance=here.balance, credit_low=here.credit_low)
    else:
        kept = msgspec.structs.replace(incoming, balance=here.balance)
    return txn.store.encode(kept)
