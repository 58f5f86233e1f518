"""The per-profile and per-account money journal in the engine (SPEC §9, issue 13).

Every money and channel event of a profile is one message of the replicated stream
``SIPEDGE_JOURNAL``, the n-th on the subject ``sipedge.journal.p.<profile id>.<n>`` (an
account's: ``sipedge.journal.a.<account id>.<n>``). A profile's state -- balance, open
reservations, channels in use -- is the fold of its events in slot order, and nothing else: a
node's disk lost with the node loses no money, and any node can rebuild any profile by replay.

Exactness: **every append is conditional**. A writer that has folded n events appends the next
to slot n + 1 with ``Nats-Expected-Last-Subject-Sequence: 0`` ("this slot is still empty"); the
engine refuses it ("wrong last sequence") when anyone took that slot first, so each event is
checked (a free channel, funds, a call still open) against a state that includes every earlier
event of the profile, whoever wrote it. A refused writer catches up, checks again and retries
(bounded). Leases only keep writers from contending; they are not what keeps the books right.

Why a slot per event and not one subject per profile with the expected sequence of its last
message: nats-server before 2.11 checks an expected subject sequence > 0 of a replicated stream
only at the leader before proposing the entry, against what it has applied so far, so
concurrent appends made on one view all pass (tests/cluster/test_journal.py pins it: 20 of 20
land on 2.9.10; fixed in 2.11 by nats-server#6194). An expected sequence of 0 it checks when it
applies the entry, in log order, on every replica: exactly one of concurrent appends lands.

Ambiguity: a publish that times out (a leader election) may have landed. The writer re-publishes
the same bytes with the same ``Nats-Msg-Id`` to the same slot: within the stream's duplicate
window the engine answers "duplicate" with the first landing's sequence (the dedup check runs
before the expected-sequence check); outside it the slot is taken and the writer finds its own
Msg-Id there on catching up. Either way an event lands at most once, and a writer that cannot
tell before its deadline raises :class:`JournalAmbiguous` (replay tells).

Money is integer micro-units (edge/control/money.py). ``balance`` means what it means in the
single-node ledger (edge/control/ledger.py): reservations are already taken out of it, so a
reservation needs ``balance >= amount`` and settling returns the reservation (``release``) and
charges the cost (``call``). docs/cluster.md "The journal" has the whole argument and the figures.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import (
    APIError,
    BadRequestError,
    KeyNotFoundError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from edge.control.models import Cdr, LiveCall

from .engine import Engine

log = logging.getLogger("sipedge.cluster.journal")

STREAM = "SIPEDGE_JOURNAL"
SUBJECTS = ["sipedge.journal.>"]
PROFILE_PREFIX = "sipedge.journal.p."
ACCOUNT_PREFIX = "sipedge.journal.a."
SNAPSHOT_BUCKET = "sipedge_journal_snap"
DUPLICATE_WINDOW = 120.0         # seconds a Nats-Msg-Id is remembered (longer than any retry of ours)
WRONG_LAST_SEQUENCE = 10071      # JetStream's error code for a failed expected-sequence check
APPEND_DEADLINE = 30.0           # covers a leader election (a few seconds) with margin
MAX_ATTEMPTS = 500               # conflicts and timeouts together, per append
CATCH_UP_LIMIT = 100_000         # messages read one by one before a catch-up gives up (use replay)
CALL_HORIZON = 5_000             # slots a settled call id is remembered (see ProfileState.settled)
MAX_SETTLEMENTS = 256            # settles in one Settlements event
CDR_SPAN = 1024                  # a CDR's seq: its event's stream sequence * CDR_SPAN + its place in the event

# Any transient failure of one publish: the append may or may not have landed.
_AMBIGUOUS = (NatsTimeoutError, asyncio.TimeoutError, NoStreamResponseError, NoRespondersError,
              ServiceUnavailableError, ConnectionClosedError)

_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")   # one subject token: no '.', '*', '>' or blanks


# ------------------------------------------------------------------ events

class Credit(msgspec.Struct, tag="credit", frozen=True):
    """Money added to (or, negative, taken from) a profile outside calls: top-up, adjustment."""

    entry_id: str      # unique per movement: a retry with the same id moves nothing twice
    amount: int        # micro-units, signed, not 0
    reason: str = "credit"


class Reserve(msgspec.Struct, tag="reserve", frozen=True):
    """A call seizes a channel and reserves ``amount`` (0 before answer, as channels.take)."""

    call_id: str
    node: str          # the node carrying the call: settle_open() of a dead node finds it
    amount: int        # micro-units, >= 0
    channels: int      # the profile's channel limit the writer saw (checked and recorded)
    # what a survivor's recovery CDR says of a call its dead node never reported (docs/cluster.md)
    direction: str = ""
    caller: str = ""
    callee: str = ""
    started_at: float = 0.0


class Extend(msgspec.Struct, tag="extend", frozen=True):
    """The next credit slice of an open call (CreditEngine.extend)."""

    call_id: str
    slice: int         # 1, 2, ...: the n-th extension of this call (so a retry is recognised)
    amount: int        # micro-units, > 0


class Settle(msgspec.Struct, tag="settle", frozen=True):
    """The call ended: its reservation returns, ``cost`` (<= the reservation) is charged."""

    call_id: str
    cost: int
    recovery: bool = False   # settled by another node for a dead one (CDR end_reason "recovery")
    by: str = ""             # the holder (<node>.<epoch>) whose settlement this is: its node sends call.ended
    cdr: Cdr | None = None   # the call's one CDR: every node writes it from here (docs/cluster.md "CDRs")


class Refused(msgspec.Struct, tag="refused", frozen=True):
    """The CDR of an attempt refused before it held a channel or money (402, 404): it moves nothing
    and is here so that every node has every CDR of the profile."""

    call_id: str
    cdr: Cdr
    by: str = ""


class Settlements(msgspec.Struct, tag="settlements", frozen=True):
    """Several calls' settlements in one slot, each as a :class:`Settle` would be (one append for
    all the calls a node ended meanwhile: its outbox, a survivor's recovery)."""

    settles: list[Settle]


class TransferIn(msgspec.Struct, tag="transfer_in", frozen=True):
    """Credit arriving from the account's master balance (the second half of a transfer)."""

    transfer_id: str
    account_id: str
    amount: int


class AccountCredit(msgspec.Struct, tag="account_credit", frozen=True):
    """A top-up (or, negative, an adjustment) of an account's master balance."""

    entry_id: str
    amount: int
    reason: str = "topup"


class TransferOut(msgspec.Struct, tag="transfer_out", frozen=True):
    """Money leaving the master balance for a profile (the first half of a transfer)."""

    transfer_id: str
    profile_id: str
    amount: int


ProfileEvent = Credit | Reserve | Extend | Settle | Settlements | Refused | TransferIn
AccountEvent = AccountCredit | TransferOut
Event = ProfileEvent | AccountEvent


def event_key(event: Event) -> str:
    """The identity of an event in its subject: a second event with the same key is refused."""
    if isinstance(event, Credit | AccountCredit):
        return f"c:{event.entry_id}"
    if isinstance(event, Reserve):
        return f"r:{event.call_id}"
    if isinstance(event, Extend):
        return f"x:{event.call_id}:{event.slice}"
    if isinstance(event, Settle):
        return f"s:{event.call_id}"
    if isinstance(event, TransferIn):
        return f"i:{event.transfer_id}"
    if isinstance(event, Refused):
        return f"n:{event.call_id}"
    if isinstance(event, Settlements):
        return f"b:{event.settles[0].call_id if event.settles else ''}:{len(event.settles)}"
    return f"o:{event.transfer_id}"


# ------------------------------------------------------------------ state

class Entry(msgspec.Struct, frozen=True):
    """One ledger-like movement derived from an event (kinds as in edge/control/ledger.py)."""

    seq: int           # stream sequence of the event
    kind: str          # "reserve", "release", "call", "transfer_in", "transfer_out", a credit reason, "opening"
    amount: int        # signed micro-units
    ref: str


class Settled(msgspec.Struct, array_like=True):
    slot: int          # the slot of its Settle
    cost: int
    recovery: bool
    by: str = ""


class OpenCall(msgspec.Struct):
    call_id: str
    node: str
    reserved: int      # micro-units reserved so far (Reserve + every Extend)
    slices: int        # extensions so far
    seq: int           # sequence of its Reserve
    direction: str = ""
    caller: str = ""
    callee: str = ""
    started_at: float = 0.0

    def live_call(self, profile_id: str, *, started_at: float = 0.0) -> LiveCall:
        """The call as its reservation tells it (ringing; ``started_at`` if the reservation has none)."""
        direction = self.direction if self.direction in ("outgoing", "incoming") else "outgoing"
        return LiveCall(call_id=self.call_id, profile_id=profile_id, direction=direction,  # type: ignore[arg-type]
                        started_at=self.started_at or started_at, caller=self.caller, callee=self.callee)


class ProfileState(msgspec.Struct):
    """The fold of a profile's subject up to ``last_seq``."""

    profile_id: str
    last_seq: int = 0                  # stream sequence of the last event folded
    slot: int = 0                      # events folded: the next one goes to slot + 1
    balance: int = 0
    calls: dict[str, OpenCall] = {}
    keys: dict[str, int] = {}          # credit and transfer keys -> slot, kept for good (rare events)
    # Calls settled in the last CALL_HORIZON slots: a second Settle (or a Reserve of the same id)
    # is refused as AlreadySettled; older ones are forgotten (bounded memory and snapshots) and a
    # late Settle of one is refused as UnknownCall -- refused either way, never applied twice.
    # The horizon is counted in slots, so every fold refuses the same events.
    settled: dict[str, Settled] = {}
    opening: int = 0                   # balance at the snapshot this fold started from (0: none)

    @property
    def channels_in_use(self) -> int:
        return len(self.calls)

    @property
    def reserved(self) -> int:
        return sum(c.reserved for c in self.calls.values())


class AccountState(msgspec.Struct):
    account_id: str
    last_seq: int = 0
    slot: int = 0
    balance: int = 0
    keys: dict[str, int] = {}
    transfers: dict[str, TransferOut] = {}   # every TransferOut: complete_transfers() checks them
    opening: int = 0


# ------------------------------------------------------------------ errors

class JournalRefused(Exception):
    """The state refuses the event (nothing was written)."""


class ChannelsBusy(JournalRefused):
    """Every channel of the profile carries a call (SPEC §4.2 rule 4)."""


class InsufficientCredit(JournalRefused):
    """The balance does not cover the amount."""


class UnknownCall(JournalRefused):
    """No open reservation with this call id."""


class AlreadySettled(JournalRefused):
    """The call was settled before (by this or another node): ``settle`` is that settlement."""

    def __init__(self, message: str, settle: Settle) -> None:
        super().__init__(message)
        self.settle = settle


class AlreadyApplied(JournalRefused):
    """An event with this identity (entry, transfer, call, slice) is in the journal already."""


class InvalidEvent(JournalRefused):
    """An amount or field no event may have."""


class SnapshotTooLarge(Exception):
    """The fold's snapshot does not fit one engine message (too many credit/transfer ids)."""


class JournalCorrupt(Exception):
    """The stream holds an event its predecessors refuse: written around this module."""


class JournalUnavailable(Exception):
    """The engine took no definite decision before the deadline."""


class JournalAmbiguous(JournalUnavailable):
    """Some attempt may have landed: replay before acting on the outcome."""


# ------------------------------------------------------------------ folding

def validate(event: Event) -> None:
    """What no event may hold, whatever the state (checked before any request: costs nothing).

    :raises InvalidEvent: an amount that is not an integer (money is never a float) or has the
        wrong sign, a channel limit below 1, a slice below 1.
    """
    for name in ("amount", "cost", "channels", "slice"):
        value = getattr(event, name, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidEvent(f"{name} must be an integer (micro-units), not {value!r}")
    if isinstance(event, Credit | AccountCredit):
        _need(event.amount != 0, InvalidEvent, "credit amount must not be 0")
    elif isinstance(event, Reserve):
        _need(event.amount >= 0 and event.channels >= 1, InvalidEvent, "reserve needs amount >= 0, channels >= 1")
    elif isinstance(event, Extend):
        _need(event.amount > 0 and event.slice >= 1, InvalidEvent, "extend needs amount > 0, slice >= 1")
    elif isinstance(event, Settle):
        _need(event.cost >= 0, InvalidEvent, "settle needs cost >= 0")
    elif isinstance(event, Settlements):
        _need(0 < len(event.settles) <= MAX_SETTLEMENTS, InvalidEvent,
              f"settlements hold 1..{MAX_SETTLEMENTS} settles")
        _need(len({x.call_id for x in event.settles}) == len(event.settles), InvalidEvent,
              "settlements settle each call once")
        for settle in event.settles:
            validate(settle)
    elif not isinstance(event, Refused):
        _need(event.amount > 0, InvalidEvent, "transfer amount must be > 0")


def _need(ok: bool, exc: type[JournalRefused], message: str) -> None:
    if not ok:
        raise exc(message)


def check_profile(state: ProfileState, event: ProfileEvent) -> None:
    """Raise what applying ``event`` to ``state`` now would raise; change nothing.

    :raises JournalRefused: the event is not valid here.
    """
    if isinstance(event, Settlements):      # each as if alone: settles of distinct calls do not interact
        _need(len({x.call_id for x in event.settles}) == len(event.settles), InvalidEvent,
              "settlements settle each call once")
        for settle in event.settles:
            check_profile(state, settle)
        return
    key = event_key(event)
    if isinstance(event, Reserve | Settle):
        done = state.settled.get(event.call_id)
        if done is not None and done.slot > state.slot - CALL_HORIZON:
            if isinstance(event, Reserve):
                raise AlreadyApplied(f"call {event.call_id} was reserved and settled already")
            raise AlreadySettled(f"call {event.call_id} is settled already",
                                 Settle(event.call_id, done.cost, done.recovery, done.by))
    _need(key not in state.keys, AlreadyApplied, f"{key} is in profile {state.profile_id}'s journal already")
    if isinstance(event, Credit):
        _need(event.amount != 0, InvalidEvent, "credit amount must not be 0")
        _need(state.balance + event.amount >= 0, InsufficientCredit,
              f"profile {state.profile_id} balance is too low for this movement")
    elif isinstance(event, Reserve):
        _need(event.amount >= 0 and event.channels >= 1, InvalidEvent, "reserve needs amount >= 0, channels >= 1")
        _need(event.call_id not in state.calls, AlreadyApplied, f"call {event.call_id} is open already")
        _need(len(state.calls) < event.channels, ChannelsBusy,
              f"profile {state.profile_id}: all {event.channels} channels are busy")
        _need(state.balance >= event.amount, InsufficientCredit,
              f"profile {state.profile_id} balance does not cover the reservation")
    elif isinstance(event, Extend | Settle):
        call = state.calls.get(event.call_id)
        _need(call is not None, UnknownCall, f"no open call {event.call_id} in profile {state.profile_id}")
        assert call is not None
        if isinstance(event, Extend):
            _need(event.amount > 0 and event.slice == call.slices + 1, InvalidEvent,
                  f"extend of call {event.call_id} must be slice {call.slices + 1} with an amount > 0")
            _need(state.balance >= event.amount, InsufficientCredit,
                  f"profile {state.profile_id} balance does not cover the next slice")
        else:
            # the edge never bills past the funded time, so the reservation covers the cost
            _need(0 <= event.cost <= call.reserved, InvalidEvent,
                  f"cost of call {event.call_id} must be within its reservation ({call.reserved})")
    elif not isinstance(event, Refused):      # a refused attempt's CDR: nothing to check
        _need(event.amount > 0, InvalidEvent, "transfer amount must be > 0")


def apply_profile(state: ProfileState, event: ProfileEvent, seq: int) -> list[Entry]:
    """Check ``event`` against ``state`` (:func:`check_profile`) and apply it as the next slot,
    stream sequence ``seq``.

    :returns: the ledger-like entries the event makes.
    :raises JournalRefused: the event is not valid here (``state`` unchanged).
    """
    check_profile(state, event)
    entries: list[Entry] = []
    if isinstance(event, Credit):
        state.balance += event.amount
        entries.append(Entry(seq, event.reason, event.amount, event.entry_id))
    elif isinstance(event, Reserve):
        state.balance -= event.amount
        state.calls[event.call_id] = OpenCall(event.call_id, event.node, event.amount, 0, seq, event.direction,
                                              event.caller, event.callee, event.started_at)
        if event.amount:
            entries.append(Entry(seq, "reserve", -event.amount, event.call_id))
    elif isinstance(event, Extend):
        call = state.calls[event.call_id]
        state.balance -= event.amount
        call.reserved += event.amount
        call.slices += 1
        entries.append(Entry(seq, "reserve", -event.amount, event.call_id))
    elif isinstance(event, Settle):
        _settle(state, event, seq, entries)
    elif isinstance(event, Settlements):
        for settle in event.settles:
            _settle(state, settle, seq, entries)
    elif isinstance(event, TransferIn):
        state.balance += event.amount
        entries.append(Entry(seq, "transfer_in", event.amount, event.transfer_id))
    state.slot += 1
    if isinstance(event, Credit | TransferIn):
        state.keys[event_key(event)] = state.slot
    state.last_seq = seq
    return entries


def _settle(state: ProfileState, event: Settle, seq: int, entries: list[Entry]) -> None:
    """One call's settlement, in the slot being applied (``state.slot + 1``)."""
    call = state.calls.pop(event.call_id)
    state.settled[event.call_id] = Settled(state.slot + 1, event.cost, event.recovery, event.by)
    state.balance += call.reserved - event.cost
    if call.reserved:
        entries.append(Entry(seq, "release", call.reserved, event.call_id))
    if event.cost:
        entries.append(Entry(seq, "call", -event.cost, event.call_id))


def prune(state: ProfileState) -> None:
    """Forget calls settled more than CALL_HORIZON slots ago (the checks ignore them already)."""
    floor = state.slot - CALL_HORIZON
    if any(s.slot <= floor for s in state.settled.values()):
        state.settled = {c: s for c, s in state.settled.items() if s.slot > floor}


def check_account(state: AccountState, event: AccountEvent) -> None:
    """As :func:`check_profile`, for an account's master balance."""
    key = event_key(event)
    _need(key not in state.keys, AlreadyApplied, f"{key} is in account {state.account_id}'s journal already")
    _need(event.amount != 0 if isinstance(event, AccountCredit) else event.amount > 0, InvalidEvent,
          "amount must not be 0 (a transfer's must be > 0)")
    signed = event.amount if isinstance(event, AccountCredit) else -event.amount
    _need(state.balance + signed >= 0, InsufficientCredit, f"account {state.account_id} master balance is too low")


def apply_account(state: AccountState, event: AccountEvent, seq: int) -> list[Entry]:
    """As :func:`apply_profile`, for an account's master balance."""
    check_account(state, event)
    if isinstance(event, TransferOut):
        state.balance -= event.amount
        state.transfers[event.transfer_id] = event
        entries = [Entry(seq, "transfer_out", -event.amount, event.transfer_id)]
    else:
        state.balance += event.amount
        entries = [Entry(seq, event.reason, event.amount, event.entry_id)]
    state.slot += 1
    state.keys[event_key(event)] = state.slot
    state.last_seq = seq
    return entries


# ------------------------------------------------------------------ the journal

S = TypeVar("S", ProfileState, AccountState)
E = TypeVar("E", bound=Event)


async def ensure_stream(engine: Engine) -> None:
    """The journal stream: replicated, on disk, a duplicate window for retried appends."""
    await engine.stream(STREAM, SUBJECTS, duplicate_window=DUPLICATE_WINDOW)


def _check_id(what: str, value: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(f"{what} must be 1..128 of [A-Za-z0-9_-]: {value!r}")
    return value


class _Journal(Generic[S, E]):
    """One journal's fold and its conditional appends. Tasks of one process share one object
    per profile: its appends and reads take turns (each append builds on the slot before), so
    one profile's appends are bounded by the engine's round trip (~1 ms on loopback)."""

    _event_type: Any

    def __init__(self, engine: Engine, subject: str, state: S, *, deadline: float = APPEND_DEADLINE) -> None:
        self.engine = engine
        self.subject = subject
        self.state: S = state
        self.deadline = deadline
        self._entries: list[Entry] = []
        self._forgotten = 0                 # the sum of the entries :meth:`forget_entries` dropped
        self._decoder = msgspec.json.Decoder(self._event_type)
        self._encoder = msgspec.json.Encoder()
        self._landed: dict[str, int] = {}   # our pending Nats-Msg-Id -> sequence, seen while catching up
        self._pending: str | None = None
        self._lock = asyncio.Lock()
        self.conflicts = 0                  # appends refused for a stale view (counters for bench/metrics)
        self.ambiguous = 0                  # publishes without an answer
        self.round_trips = 0                # requests to the engine

    # --- folding

    def _apply(self, event: E, seq: int) -> list[Entry]:
        raise NotImplementedError

    def slot_subject(self, slot: int) -> str:
        return f"{self.subject}.{slot}"

    def _fold(self, seq: int, subject: str, data: bytes, msg_id: str | None) -> None:
        slot = int(subject.rpartition(".")[2])
        if slot <= self.state.slot:
            return               # read twice (a replay racing a catch-up): folded already
        try:
            if slot != self.state.slot + 1:
                raise JournalRefused(f"slot {slot} follows slot {self.state.slot}")
            event = self._decoder.decode(data)
            self._entries.extend(self._apply(event, seq))
        except (msgspec.ValidationError, msgspec.DecodeError, JournalRefused) as exc:
            raise JournalCorrupt(f"{subject} seq {seq}: {exc}") from exc
        if isinstance(self.state, ProfileState) and slot % 1000 == 0:
            prune(self.state)
        if msg_id is not None and msg_id == self._pending:
            self._landed[msg_id] = seq

    def entries(self) -> list[Entry]:
        """Every movement folded and not forgotten, oldest first (an ``opening`` entry first after a
        snapshot or :meth:`forget_entries`): their sum is the balance."""
        carried = self.state.opening + self._forgotten
        opening = [Entry(0, "opening", carried, "snapshot")] if carried or self._forgotten else []
        return opening + self._entries

    def forget_entries(self, upto: int) -> None:
        """The movements up to stream sequence ``upto`` are written (the node's ledger has them):
        drop them, keeping their sum in the opening (memory bounded by what is not written yet,
        not by the journal's length)."""
        i = 0
        while i < len(self._entries) and self._entries[i].seq <= upto:
            i += 1
        if i:
            self._forgotten += sum(e.amount for e in self._entries[:i])
            del self._entries[:i]

    def entries_after(self, seq: int) -> list[Entry]:
        """The movements folded after stream sequence ``seq``, oldest first (none of an opening)."""
        i = len(self._entries)
        while i > 0 and self._entries[i - 1].seq > seq:
            i -= 1
        return self._entries[i:]

    # --- reading

    async def catch_up(self) -> int:
        """Fold the events after ``slot``, one request each to the stream's leader (the few a
        conflicting writer added). :returns: how many."""
        async with self._lock:
            return await self._catch_up()

    async def _catch_up(self) -> int:
        count = 0
        while count < CATCH_UP_LIMIT:
            if not await self._fold_next():
                return count
            count += 1
        raise JournalUnavailable(f"{self.subject}: more than {CATCH_UP_LIMIT} messages behind; replay() instead")

    async def _fold_next(self) -> bool:
        """Read and fold the next slot's event. :returns: False if the slot is empty."""
        subject = self.slot_subject(self.state.slot + 1)
        try:
            self.round_trips += 1
            msg = await self.engine.js.get_msg(STREAM, subject=subject)   # the slot's one message
        except NotFoundError:
            return False
        assert msg.seq is not None
        self._fold(msg.seq, subject, msg.data or b"", (msg.headers or {}).get("Nats-Msg-Id"))
        return True

    async def replay(self, *, timeout: float = 120.0) -> int:
        """Fold everything after ``last_seq`` (all of the subject from a fresh state) through an
        ordered consumer (flow-controlled, no request per message); one that stalls (its member
        died) is made anew from where the fold is. :returns: how many."""
        async with self._lock:
            return await self._replay(timeout)

    async def _replay(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        count = 0
        for attempt in range(MAX_ATTEMPTS):
            try:
                count += await self._replay_once(deadline)
                return count + await self._catch_up()
            except _AMBIGUOUS as exc:
                if time.monotonic() > deadline:
                    raise JournalUnavailable(f"{self.subject}: no replay within {timeout:g} s ({exc!r})") from exc
                await asyncio.sleep(min(1.0, 0.1 * (attempt + 1)))
        raise JournalUnavailable(f"{self.subject}: no replay in {MAX_ATTEMPTS} attempts")

    async def _replay_once(self, deadline: float) -> int:
        if not await self._fold_next():
            return 0                       # not one event after ours: no consumer needed
        self.round_trips += 1
        sub = await self.engine.js.subscribe(
            self.subject + ".*", stream=STREAM, ordered_consumer=True, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=_start_config(self.state.last_seq + 1))
        count = 1
        try:
            while True:
                if time.monotonic() > deadline:
                    raise NatsTimeoutError
                msg = await sub.next_msg(timeout=2.0)
                self._fold(msg.metadata.sequence.stream, msg.subject, msg.data, (msg.headers or {}).get("Nats-Msg-Id"))
                count += 1
                if msg.metadata.num_pending == 0:
                    break
        finally:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is going: nothing to release then
                log.debug("%s: unsubscribe: %s", self.subject, exc)
        return count

    # --- writing

    async def _append(self, event: E) -> int:
        async with self._lock:   # one append at a time per journal: each builds on the last
            return await self._append_locked(event)

    async def _append_locked(self, event: E) -> int:
        """Append ``event`` on the state it was checked against; see the module docstring.

        :returns: the stream sequence it landed at.
        :raises JournalRefused: the state (after catching up) refuses it.
        :raises JournalAmbiguous: no definite answer before the deadline.
        """
        validate(event)
        msg_id = f"{event_key(event)}@{uuid.uuid4().hex}"   # unique per append: never hides another writer's event
        payload = self._encoder.encode(event)
        self._pending = msg_id
        sent = False           # an attempt went out without a definite answer
        deadline = time.monotonic() + self.deadline
        try:
            for attempt in range(MAX_ATTEMPTS):
                if msg_id in self._landed:
                    return self._landed[msg_id]      # an earlier attempt landed: we saw it catching up
                try:
                    self._check(event)
                except JournalRefused:
                    # refuse only on a view the engine just confirmed: a stale one may lack a credit
                    if await self._confirm(deadline, attempt) == 0:
                        raise
                    continue
                try:
                    self.round_trips += 1
                    subject = self.slot_subject(self.state.slot + 1)
                    # "this slot is still empty": the one expected-sequence check nats-server 2.9
                    # makes when it applies the entry (see the module docstring)
                    ack = await self.engine.js.publish(subject, payload, headers={
                        "Nats-Msg-Id": msg_id, "Nats-Expected-Last-Subject-Sequence": "0"})
                except BadRequestError as exc:
                    if exc.err_code != WRONG_LAST_SEQUENCE:
                        raise
                    self.conflicts += 1
                    await self._catch_up_or_wait(deadline, attempt, sent=sent)
                    continue
                except _AMBIGUOUS as exc:
                    sent = True
                    self.ambiguous += 1
                    log.info("%s: append %s without an answer (%s): retrying", self.subject, msg_id,
                             exc.__class__.__name__)
                    await self._catch_up_or_wait(deadline, attempt, pause=True, sent=sent)
                    continue
                if ack.duplicate:      # our earlier attempt landed at ack.seq; fold up to it and past
                    await self._catch_up_until(msg_id, deadline)
                    return ack.seq
                self._fold(ack.seq, subject, payload, msg_id)
                return ack.seq
            raise JournalAmbiguous(f"{self.subject}: {MAX_ATTEMPTS} attempts without a decision") if sent else \
                JournalUnavailable(f"{self.subject}: {MAX_ATTEMPTS} attempts lost to other writers")
        finally:
            self._pending = None
            self._landed.pop(msg_id, None)

    def _check(self, event: E) -> None:
        raise NotImplementedError

    async def _still_there(self, seq: int, slot: int) -> bool:
        """Whether the stream's message ``seq`` is this journal's ``slot`` (a snapshot's anchor)."""
        if seq == 0:
            return slot == 0
        try:
            msg = await self.engine.js.get_msg(STREAM, seq=seq)
        except NotFoundError:
            return False
        return msg.subject == self.slot_subject(slot)

    async def _confirm(self, deadline: float, attempt: int) -> int:
        """Catch up before a refusal; an engine that cannot be read is not a refusal."""
        while True:
            try:
                return await self._catch_up()
            except _AMBIGUOUS as exc:
                if time.monotonic() > deadline:
                    raise JournalUnavailable(f"{self.subject}: cannot read the journal ({exc!r})") from exc
                attempt += 1
                await asyncio.sleep(min(1.0, 0.05 * attempt) * (0.5 + random.random()))

    async def _catch_up_or_wait(self, deadline: float, attempt: int, *, pause: bool = False,
                                sent: bool = True) -> None:
        """:param sent: an attempt went out without an answer (so giving up is ambiguous)."""
        if time.monotonic() > deadline:
            raise JournalAmbiguous(f"{self.subject}: no decision within {self.deadline:g} s") if sent else \
                JournalUnavailable(f"{self.subject}: no append within {self.deadline:g} s")
        if pause:   # an election: give it a moment (jittered, growing, capped)
            await asyncio.sleep(min(1.0, 0.05 * (attempt + 1)) * (0.5 + random.random()))
        try:
            await self._catch_up()
        except _AMBIGUOUS:
            pass       # the read fails the same way: the next publish decides (dedup, expected sequence)
        except APIError as exc:
            log.debug("%s: catch-up failed: %s", self.subject, exc)

    async def _catch_up_until(self, msg_id: str, deadline: float) -> None:
        for attempt in range(MAX_ATTEMPTS):
            await self._catch_up_or_wait(deadline, attempt, pause=attempt > 0, sent=True)
            if msg_id in self._landed:
                return
        raise JournalAmbiguous(f"{self.subject}: the duplicate's first copy was not found")


def _start_config(start: int) -> ConsumerConfig:
    return ConsumerConfig(opt_start_seq=start, deliver_policy=DeliverPolicy.BY_START_SEQUENCE)


class ProfileJournal(_Journal[ProfileState, ProfileEvent]):
    """A profile's channels, reservations and balance as the fold of its subject.

    Build it with :meth:`open` (replays the subject). Every method that writes checks the event
    against the state, appends it conditionally and folds it: when it returns, the event is
    replicated in the engine (a quorum has it on disk) and in :attr:`state`.
    """

    _event_type = ProfileEvent

    def __init__(self, engine: Engine, profile_id: str, *, deadline: float = APPEND_DEADLINE) -> None:
        super().__init__(engine, PROFILE_PREFIX + _check_id("profile id", profile_id), ProfileState(profile_id),
                         deadline=deadline)
        # (CDR seq: stream sequence * CDR_SPAN + place in the event, its event) of every CDR folded
        # and not yet taken (:meth:`take_cdrs`)
        self._cdrs: list[tuple[int, Settle | Refused]] = []

    @classmethod
    async def open(cls, engine: Engine, profile_id: str, *, snapshot: bool = False, new: bool = False,
                   deadline: float = APPEND_DEADLINE) -> ProfileJournal:
        """The profile's journal, replayed (from its snapshot first if ``snapshot``); one of a profile
        just created (``new``: a few events at most) is read slot by slot instead, without the
        consumer a replay makes."""
        journal = cls(engine, profile_id, deadline=deadline)
        if new:
            await journal.catch_up()
            return journal
        if snapshot:
            await journal.load_snapshot()
        await journal.replay()
        return journal

    def _apply(self, event: ProfileEvent, seq: int) -> list[Entry]:
        entries = apply_profile(self.state, event, seq)
        if isinstance(event, Settle | Refused) and event.cdr is not None:
            self._cdrs.append((seq * CDR_SPAN, event))
        elif isinstance(event, Settlements):
            self._cdrs.extend((seq * CDR_SPAN + i, x) for i, x in enumerate(event.settles) if x.cdr is not None)
        return entries

    def _check(self, event: ProfileEvent) -> None:
        check_profile(self.state, event)

    def cdrs(self) -> list[tuple[int, Settle | Refused]]:
        """The CDRs folded since the last :meth:`take_cdrs`, each with its seq (:data:`CDR_SPAN`)."""
        return list(self._cdrs)

    def take_cdrs(self, upto: int) -> None:
        """The CDRs of events up to stream sequence ``upto`` are written: forget them (bounded memory)."""
        self._cdrs = [item for item in self._cdrs if item[0] // CDR_SPAN > upto]

    @property
    def balance(self) -> int:
        return self.state.balance

    async def credit(self, entry_id: str, amount: int, reason: str = "credit") -> int:
        """Add (or, negative, take) ``amount`` micro-units outside a call. :returns: the sequence."""
        return await self._append(Credit(entry_id, amount, reason))

    async def reserve(self, call_id: str, node: str, amount: int, channels: int, *, direction: str = "",
                      caller: str = "", callee: str = "", started_at: float = 0.0) -> OpenCall:
        """Seize a channel for ``call_id`` and reserve ``amount`` (may be 0: before answer).

        :raises ChannelsBusy: ``channels`` calls are open across all nodes.
        :raises InsufficientCredit: the balance does not cover ``amount``.
        """
        seq = await self._append(Reserve(call_id, node, amount, channels, direction, caller, callee, started_at))
        # (settled already only if another node recovered it in between: report what landed)
        return self.state.calls.get(call_id) or OpenCall(call_id, node, amount, 0, seq)

    async def extend(self, call_id: str, amount: int) -> OpenCall:
        """Reserve the call's next slice. :raises InsufficientCredit: the call must end at its funded time."""
        call = self.state.calls.get(call_id)
        if call is None:
            await self.catch_up()
            call = self.state.calls.get(call_id)
        if call is None:
            check_profile(self.state, Extend(call_id, 1, amount))   # raises the right refusal
            raise UnknownCall(f"no open call {call_id}")
        await self._append(Extend(call_id, call.slices + 1, amount))
        return self.state.calls.get(call_id) or call

    async def settle(self, call_id: str, cost: int, *, recovery: bool = False, by: str = "",
                     cdr: Cdr | None = None) -> Settle:
        """End the call: return its reservation, charge ``cost`` (within it), free its channel.

        :param by: the settling holder (its node sends the CDR's ``call.ended``: edge/cluster/money.py).
        :param cdr: the call's CDR, which every node writes when it folds this settlement.
        :raises AlreadySettled: it was settled before (nothing changes: never twice).
        :raises UnknownCall: no such open call.
        """
        event = Settle(call_id, cost, recovery, by, cdr)
        await self._append(event)
        return event

    async def refused(self, call_id: str, cdr: Cdr, *, by: str = "") -> None:
        """The CDR of an attempt refused before it held anything (once per call id and append)."""
        await self._append(Refused(call_id, cdr, by))

    async def settle_open(self, node: str, cost: Callable[[OpenCall], int] | None = None, *,
                          by: str = "", cdr: Callable[[OpenCall, int], Cdr] | None = None) -> list[Settle]:
        """Settle every open call of ``node`` (a new home does this for a dead one), with
        ``recovery``; ``cost`` bills each (default: all of its reservation -- the call may have
        run to the end of its funded time, as CreditEngine.recover bills) and ``cdr`` writes its CDR
        from the call and that cost. A call settled meanwhile by someone else is skipped.
        :returns: the settlements this call appended."""
        await self.catch_up()
        settles = []
        for call in [c for c in self.state.calls.values() if c.node == node]:
            billed = call.reserved if cost is None else cost(call)
            settles.append(Settle(call.call_id, billed, True, by, None if cdr is None else cdr(call, billed)))
        return await self.settle_many(settles)

    async def settle_many(self, settles: list[Settle]) -> list[Settle]:
        """Settle several calls, :data:`MAX_SETTLEMENTS` per append; a call settled meanwhile by
        someone else is skipped. :returns: the settlements this call appended."""
        if any(x.call_id not in self.state.calls for x in settles):
            await self.catch_up()       # a reservation not folded here yet, or settled by another node
        done: list[Settle] = []
        for i in range(0, len(settles), MAX_SETTLEMENTS):
            chunk = [x for x in settles[i:i + MAX_SETTLEMENTS] if x.call_id in self.state.calls]
            try:
                if len(chunk) > 1:
                    await self._append(Settlements(chunk))
                    done += chunk
                    continue
            except JournalRefused:
                pass            # one of them was settled meanwhile: each on its own, below
            for x in chunk:
                try:
                    await self._append(x)
                    done.append(x)
                except (AlreadySettled, UnknownCall):
                    continue
        return done

    async def transfer_in(self, transfer_id: str, account_id: str, amount: int) -> bool:
        """The second half of a transfer. :returns: False if it was applied before."""
        try:
            await self._append(TransferIn(transfer_id, account_id, amount))
        except AlreadyApplied:
            return False
        return True

    # --- snapshots

    def _snapshot_key(self) -> str:
        return "p." + self.state.profile_id

    async def save_snapshot(self) -> int:
        """Store the fold (without its entries) in the replicated snapshot bucket.

        A snapshot is a pure function of the journal up to its ``last_seq``: whoever writes it,
        however old it is, replaying from it gives the same state as replaying everything.
        :returns: its ``last_seq``.
        """
        prune(self.state)
        blob = zlib.compress(msgspec.msgpack.encode(self.state))
        if len(blob) > self.engine.nc.max_payload - 1024:
            raise SnapshotTooLarge(f"{self.subject}: a snapshot of {len(blob)} bytes exceeds the engine's "
                                   f"max_payload ({self.engine.nc.max_payload})")
        kv = await self.engine.bucket(SNAPSHOT_BUCKET)
        await kv.put(self._snapshot_key(), blob)
        return self.state.last_seq

    async def load_snapshot(self) -> bool:
        """Start the fold from the stored snapshot, if it belongs to this stream (its last
        event is still where it says, on this subject). :returns: whether one was used."""
        if self.state.last_seq:
            raise RuntimeError("load_snapshot() only on a fresh journal")
        snap = await _read_snapshot(self.engine, self._snapshot_key(), ProfileState)
        if snap is None or snap.profile_id != self.state.profile_id:
            return False
        if not await self._still_there(snap.last_seq, snap.slot):
            return False
        snap.opening = snap.balance
        self.state = snap
        return True


class AccountJournal(_Journal[AccountState, AccountEvent]):
    """An account's master balance; the source side of transfers to its profiles."""

    _event_type = AccountEvent

    def __init__(self, engine: Engine, account_id: str, *, deadline: float = APPEND_DEADLINE) -> None:
        super().__init__(engine, ACCOUNT_PREFIX + _check_id("account id", account_id), AccountState(account_id),
                         deadline=deadline)

    @classmethod
    async def open(cls, engine: Engine, account_id: str, *, new: bool = False,
                   deadline: float = APPEND_DEADLINE) -> AccountJournal:
        """As :meth:`ProfileJournal.open`."""
        journal = cls(engine, account_id, deadline=deadline)
        await (journal.catch_up() if new else journal.replay())
        return journal

    def _apply(self, event: AccountEvent, seq: int) -> list[Entry]:
        return apply_account(self.state, event, seq)

    def _check(self, event: AccountEvent) -> None:
        check_account(self.state, event)

    @property
    def balance(self) -> int:
        return self.state.balance

    async def credit(self, entry_id: str, amount: int, reason: str = "topup") -> int:
        return await self._append(AccountCredit(entry_id, amount, reason))

    async def transfer_out(self, transfer_id: str, profile_id: str, amount: int) -> TransferOut:
        """The first half of a transfer: money leaves the master balance (conditional, so two
        transfers cannot spend the same master money)."""
        event = TransferOut(transfer_id, _check_id("profile id", profile_id), amount)
        await self._append(event)
        return event

    async def transfer(self, transfer_id: str, profile: ProfileJournal, amount: int) -> None:
        """Move ``amount`` from the master balance to ``profile``: TransferOut here, then
        TransferIn there with the same id. A crash between the two leaves a TransferOut that
        :meth:`complete_transfers` finishes, once."""
        await self.transfer_out(transfer_id, profile.state.profile_id, amount)
        await profile.transfer_in(transfer_id, self.state.account_id, amount)

    def pending(self, profiles: dict[str, ProfileJournal]) -> list[TransferOut]:
        """TransferOut events whose TransferIn the (caught-up) ``profiles`` do not hold."""
        return [t for t in self.state.transfers.values()
                if t.profile_id in profiles and f"i:{t.transfer_id}" not in profiles[t.profile_id].state.keys]

    async def complete_transfers(self, profiles: dict[str, ProfileJournal]) -> list[str]:
        """Append the TransferIn of every TransferOut that lacks one (for the profiles given).
        :returns: the transfer ids completed by this call (another node may complete some first)."""
        await self.catch_up()
        for journal in {t.profile_id for t in self.state.transfers.values()} & profiles.keys():
            await profiles[journal].catch_up()
        done = []
        for t in self.pending(profiles):
            if await profiles[t.profile_id].transfer_in(t.transfer_id, self.state.account_id, t.amount):
                done.append(t.transfer_id)
        return done


async def _read_snapshot(engine: Engine, key: str, kind: type[S]) -> S | None:
    kv = await engine.bucket(SNAPSHOT_BUCKET)
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    if not entry.value:
        return None
    try:
        return msgspec.msgpack.decode(zlib.decompress(entry.value), type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError, zlib.error):
        log.warning("snapshot %s does not decode: replaying from the start", key)
        return None
