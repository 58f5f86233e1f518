"""A cluster node's channels in the engine's journal: the agent's side (docs/cluster.md "Channels across nodes").

The workers seize a channel in the node's LMDB as a node alone does, then ask the agent
(edge/cluster/link.py) to reserve it in the profile's journal (edge/cluster/journal.py), where
the check "fewer open calls than ``channels``" sees the calls of every node: two nodes racing
for the last channel, exactly one reservation lands. A reservation carries the money of the
call's first slice (checked against the balance every node spends from), and settlements come
back through the LMDB outbox (edge/cluster/outbox.py) with their cost and are appended here;
edge/cluster/money.py writes the journal's movements into the node's ledger.

A reservation names its holder, ``<node>.<epoch>``, and before a holder's first reservation of a
profile the agent records the pair in the ``sipedge_reserved`` bucket. That index is what the
survivors sweep: once a holder's lease has ended (confirmed through the engine's log, as for a
handover), the survivor that rendezvous hashing picks for each profile settles the holder's open
reservations there (``settle_open``, recovery), and the index key goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from edge.control import channels
from edge.control import profiles as profile_records
from edge.control.credit import billed_seconds, call_cdr
from edge.control.models import Cdr, LiveCall
from edge.control.store import Store

from . import foreign, link, outbox
from .engine import Engine, EngineUnavailable
from .journal import (
    SNAPSHOT_BUCKET,
    ChannelsBusy,
    InsufficientCredit,
    JournalRefused,
    JournalUnavailable,
    OpenCall,
    ProfileJournal,
    Settle,
    SnapshotTooLarge,
    ensure_stream,
)
from .membership import NAMESPACE, Membership, rendezvous

log = logging.getLogger("sipedge.cluster")

SNAPSHOT_EVERY = 1_000          # events of a profile between two snapshots (bounds an agent's start-up replay)
OUTBOX_PERIOD = 0.05            # seconds between two looks at the outbox
PUBLISH_PERIOD = 0.5            # seconds between two publications of the node's answered calls
FINAL_DRAIN = 3.0               # seconds the last drain at stop may take (the supervisor waits 10 s)
FAILED = (JournalUnavailable, EngineUnavailable, NatsError, TimeoutError, OSError)


class ClusterChannels:
    """One :class:`ProfileJournal` per profile, opened (replayed) on first use, shared by all tasks.

    :param membership: this node's; no reservation is appended without its lease.
    """

    def __init__(self, engine: Engine, store: Store, membership: Membership, *,
                 namespace: str = NAMESPACE) -> None:
        self.engine = engine
        self.store = store
        self.membership = membership
        self.index_bucket = f"{namespace}_reserved"
        self.calls_bucket = f"{namespace}_calls"
        self._journals: dict[str, ProfileJournal] = {}
        self._opening: dict[str, asyncio.Task[ProfileJournal]] = {}
        self._indexed: set[str] = set()         # "<node>.<epoch>.<profile>" recorded in the index
        self._index: KeyValue | None = None
        self._calls: KeyValue | None = None
        # "<node>.<epoch>.<call id>" of answered calls in the calls bucket -> the funded_until published
        self._published: dict[str, float | None] = {}
        self._encode = msgspec.msgpack.Encoder().encode
        self._decoder = msgspec.msgpack.Decoder(LiveCall)
        self._snapshots: set[asyncio.Task[None]] = set()
        self.on_change: Callable[[str], Any] = lambda profile_id: None   # a profile's journal moved (money.py)
        # counted for edge_cluster_reservations_total / _settlements_total / _recovered_total (agent.py)
        self.reserved = self.refused = self.broke = self.unavailable = self.settled = self.recovered = 0

    @property
    def holder(self) -> str:
        return f"{self.membership.node}.{self.membership.epoch}"

    async def start(self, *, wait: float = 30.0) -> None:
        """The journal stream and the snapshot bucket exist (made now if not; three replicas can take
        longer to place than one request's timeout, so this retries, bounded by ``wait``)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                await ensure_stream(self.engine)
                await self.engine.bucket(SNAPSHOT_BUCKET)
                self._index = await self.engine.bucket(self.index_bucket)
                self._calls = await self.engine.bucket(self.calls_bucket)
                return
            except (TimeoutError, NatsError) as exc:
                if time.monotonic() > deadline:
                    raise EngineUnavailable(f"cluster: the journal stream not ready in {wait:g} s ({exc!r})") from None
                await asyncio.sleep(0.5)

    @property
    def journals(self) -> dict[str, ProfileJournal]:
        """The profiles' journals opened (and folded) here."""
        return self._journals

    async def journal(self, profile_id: str, *, new: bool = False) -> ProfileJournal:
        """:param new: a profile just created: its journal holds a few events at most (ProfileJournal.open)."""
        found = self._journals.get(profile_id)
        if found is not None:
            return found
        task = self._opening.get(profile_id)
        if task is None:   # one replay per profile, however many calls wait for it
            task = self._opening[profile_id] = asyncio.create_task(
                ProfileJournal.open(self.engine, profile_id, snapshot=not new, new=new))
        try:
            journal = await asyncio.shield(task)
        finally:
            if task.done():
                self._opening.pop(profile_id, None)
        self._journals[profile_id] = journal
        return journal

    async def reserve(self, request: link.Reserve) -> link.Reply:
        """The workers' reservations: ``ok``, ``busy``, ``broke`` (with the balance) or ``unavailable``."""
        def reply(result: str, balance: int = 0) -> link.Reply:
            return link.Reply(request.id, result, balance)

        if not self.membership.holds_lease():
            self.unavailable += 1
            return reply(link.UNAVAILABLE)
        try:
            holder = self.holder
            await self._record_holder(holder, request.profile_id)
            journal = await self.journal(request.profile_id)
            await journal.reserve(request.call_id, holder, request.amount, request.channels,
                                  direction=request.direction, caller=request.caller, callee=request.callee,
                                  started_at=request.started_at)
        except ChannelsBusy:
            self.refused += 1
            return reply(link.BUSY)
        except InsufficientCredit:
            self.broke += 1
            return reply(link.BROKE, journal.balance)
        except (JournalRefused, ValueError) as exc:     # a call id settled before, an invalid id
            log.warning("cluster: reservation of %s refused: %s", request.call_id, exc)
            self.unavailable += 1
            return reply(link.UNAVAILABLE)
        except FAILED as exc:
            log.warning("cluster: reservation of %s for %s failed (%s)", request.call_id, request.profile_id,
                        exc.__class__.__name__)
            self.unavailable += 1
            return reply(link.UNAVAILABLE)
        self.reserved += 1
        self.moved(journal)
        return reply(link.OK, journal.balance)

    def moved(self, journal: ProfileJournal) -> None:
        """An event of ``journal`` was appended here: a snapshot is due now and then, and the ledger follows."""
        self._maybe_snapshot(journal)
        self.on_change(journal.state.profile_id)

    async def _record_holder(self, holder: str, profile_id: str) -> None:
        """The index entry "``holder`` may have open reservations of ``profile_id``", once per epoch."""
        key = f"{holder}.{profile_id}"
        if key in self._indexed:
            return
        assert self._index is not None, "start() first"
        try:
            await self._index.create(key, b"")
        except KeyWrongLastSequenceError:
            pass                # written before (a timed-out create of ours that landed)
        self._indexed.add(key)

    async def sweep(self) -> int:
        """Settle the open reservations of ended holders, for the profiles that are this node's to
        recover (rendezvous over the live members: every survivor computes the same split).
        :returns: the reservations settled."""
        if not self.membership.holds_lease() or self._index is None:
            return 0
        try:
            keys = await self._index.keys()
        except NoKeysError:
            return 0
        members = self.membership.members()
        live = {f"{lease.node}.{lease.epoch}" for lease in members.values()}
        by_holder: dict[tuple[str, str], list[str]] = {}
        for key in keys:
            node, epoch, profile_id = (key.split(".") + ["", "", ""])[:3]
            if profile_id and f"{node}.{epoch}" not in live:
                by_holder.setdefault((node, epoch), []).append(profile_id)
        settled = 0
        for (node, epoch), profiles in by_holder.items():
            mine = [p for p in profiles if rendezvous(p, members) == self.membership.node]
            if not mine or not await self.membership.lease_ended(node, epoch):
                continue
            for profile_id in mine:
                settled += await self._recover(f"{node}.{epoch}", profile_id)
                await self._index.delete(f"{node}.{epoch}.{profile_id}")
        self.recovered += settled
        return settled

    async def _recover(self, holder: str, profile_id: str) -> int:
        """Settle the open calls of ended ``holder`` in ``profile_id``'s journal: an answered call (its
        record published) at its whole reservation, as its node's own recovery bills, one never seen
        answered at 0; each settlement carries its recovery CDR (every node writes it); BYE the legs of
        the answered ones from here."""
        journal = await self.journal(profile_id)
        await journal.catch_up()
        open_calls = {c.call_id: c for c in journal.state.calls.values() if c.node == holder}
        records = await self._records_of(holder, list(open_calls))
        prof = profile_records.find(self.store, profile_id)
        now = time.time()

        def cdr(call: OpenCall, cost: int) -> Cdr:
            made = survivor_cdr(call, records.get(call.call_id), cost, now)
            made.profile_id, made.account_id = profile_id, prof.account_id if prof is not None else ""
            return made

        done = await journal.settle_open(holder, lambda c: c.reserved if c.call_id in records else 0,
                                         by=self.holder, cdr=cdr)
        self.on_change(profile_id)
        if not done:
            return 0
        for d in done:
            if (record := records.get(d.call_id)) is not None:
                foreign.add(self.store, record)
        assert self._calls is not None
        for call_id in records:
            with contextlib.suppress(KeyNotFoundError, *FAILED):
                await self._calls.delete(f"{holder}.{call_id}")
        log.warning("cluster: settled %d open reservations of %s for %s (its lease ended)", len(done), holder,
                    profile_id)
        return len(done)

    async def _records_of(self, holder: str, call_ids: list[str]) -> dict[str, LiveCall]:
        """The published records (answered calls) of ``holder``'s calls among ``call_ids``."""
        assert self._calls is not None
        found: dict[str, LiveCall] = {}
        for call_id in call_ids:
            try:
                entry = await self._calls.get(f"{holder}.{call_id}")
            except KeyNotFoundError:
                continue            # not answered, or answered too late to be published
            if entry.value:
                found[call_id] = self._decoder.decode(entry.value)
        return found

    async def publish_answered(self) -> int:
        """Put the dialog records of this node's answered calls in the engine (the calls bucket), so
        that a survivor can BYE their legs if this node dies; forget those that ended.
        :returns: how many were published now."""
        if self._calls is None or not self.membership.holds_lease():
            return 0
        holder = self.holder
        live = {f"{holder}.{call.call_id}": call for call in channels.live_calls(self.store)
                if call.answered_at is not None and call.legs}
        # new answered calls, and those funded further since (a survivor bills and writes the CDR from it)
        new = [key for key, call in live.items() if self._published.get(key, -1.0) != call.funded_until]
        for key in new:
            await self._calls.put(key, self._encode(live[key]))
            self._published[key] = live[key].funded_until
        for key in [k for k in self._published if k not in live]:
            del self._published[key]
            with contextlib.suppress(KeyNotFoundError, *FAILED):
                await self._calls.delete(key)
        return len(new)

    async def run_publisher(self, stop: asyncio.Event) -> None:
        """Publish answered calls every PUBLISH_PERIOD (a call answered less than that before its node's
        death gets no BYE from a survivor: its parties hang up, or the carrier's session timer does)."""
        await _every(PUBLISH_PERIOD, self.publish_answered, "publishing answered calls", stop)

    async def run_sweeps(self, stop: asyncio.Event) -> None:
        """A sweep every lease; a failed one is tried again at the next."""
        await _every(self.membership.lease_seconds, self.sweep, "sweep of ended holders", stop)

    async def record_refused(self, item: outbox.Pending) -> bool:
        """A refused attempt's CDR into the journal. :returns: False to retry later."""
        try:
            journal = await self.journal(item.profile_id)
            if item.cdr is not None:
                await journal.refused(item.call_id, item.cdr, by=self.holder)
                self.moved(journal)
        except ValueError:          # not a journal id
            pass
        except FAILED:
            return False
        return True

    def drift(self) -> int:
        """Calls the journal holds open for this node's holder minus those the node's store accounts for
        (live, or settled and waiting in the outbox): 0 unless a reservation leaked or was lost (a call
        on its way in or out can show as +-1 for a moment). Journals this agent has not opened hold none."""
        holder = self.holder
        in_journal = sum(1 for j in self._journals.values() for c in j.state.calls.values() if c.node == holder)
        in_store = len(channels.live_calls(self.store)) + len(outbox.pending(self.store, limit=1_000_000))
        return in_journal - in_store

    async def drain_outbox(self) -> int:
        """Append the settlements waiting in LMDB; :returns: how many left the outbox."""
        items = outbox.pending(self.store)
        if not items:
            return 0
        # the calls of one profile in one append (Settlements); refused attempts one by one
        groups: dict[str, list[outbox.Pending]] = {}
        for item in items:
            if not item.refused:
                groups.setdefault(item.profile_id, []).append(item)
        refused = [item for item in items if item.refused]
        batches = list(groups.values())
        results = await asyncio.gather(*(self.settle(group) for group in batches),
                                       *(self.record_refused(item) for item in refused))
        finished = [item for group, landed in zip(batches, results, strict=False) if landed for item in group]
        finished += [item for item, landed in zip(refused, results[len(batches):], strict=True) if landed]
        outbox.done(self.store, finished)
        return len(finished)

    async def settle(self, items: list[outbox.Pending]) -> bool:
        """The settlements of calls of one profile, with their CDRs, in as few appends as the journal
        takes (edge/cluster/journal.py ``settle_many``). :returns: False to retry them all later (those
        that landed are then refused as settled); True once the journal holds each call settled (now,
        or before: a retry of ours, or a survivor's recovery, whose CDR is the call's)."""
        try:
            journal = await self.journal(items[0].profile_id)
            settles = []
            for item in items:
                held = _reserved(journal, item.call_id)
                cost = min(item.cost, held)
                if item.cost > held and item.call_id in journal.state.calls:
                    log.error("cluster: call %s costs %d but holds %d in the journal: billed %d", item.call_id,
                              item.cost, held, held)
                if item.cdr is not None:
                    item.cdr.cost = cost
                settles.append(Settle(item.call_id, cost, False, self.holder, item.cdr))
            done = await journal.settle_many(settles)
        except ValueError:          # not journal ids: nothing was reserved under them
            return True
        except FAILED:
            return False
        landed = {x.call_id for x in done}
        for item in items:          # never reserved (refused, cancelled): nothing to settle, no CDR
            if item.cdr is not None and item.call_id not in landed and item.call_id not in journal.state.settled:
                log.warning("cluster: call %s has a CDR but no reservation in the journal: not recorded",
                            item.call_id)
        self.settled += len(done)
        self.moved(journal)
        return True

    async def run_outbox(self, stop: asyncio.Event) -> None:
        """Drain the outbox until ``stop``, then once more (what the drained workers left), bounded."""
        while True:
            stopping = stop.is_set()
            try:
                await asyncio.wait_for(self.drain_outbox(), FINAL_DRAIN) if stopping else await self.drain_outbox()
            except TimeoutError:
                log.warning("cluster: settlements left in the outbox at stop (the next start appends them)")
            except Exception:       # a store error, a bug: the rows stay and are tried again
                log.exception("cluster: draining the settlement outbox")
            if stopping:
                return
            try:
                await asyncio.wait_for(stop.wait(), OUTBOX_PERIOD)
            except TimeoutError:
                pass

    def _maybe_snapshot(self, journal: ProfileJournal) -> None:
        if journal.state.slot % SNAPSHOT_EVERY == 0:
            task = asyncio.create_task(self._snapshot(journal))
            self._snapshots.add(task)
            task.add_done_callback(self._snapshots.discard)

    @staticmethod
    async def _snapshot(journal: ProfileJournal) -> None:
        try:
            await journal.save_snapshot()
        except (SnapshotTooLarge, *FAILED) as exc:
            log.warning("cluster: snapshot of %s not saved (%s)", journal.subject, exc)


def _reserved(journal: ProfileJournal, call_id: str) -> int:
    """What the journal holds for an open call (a cost is never above it: the edge bills only funded
    time; the bound keeps a wrong cost from being refused for ever and the channel with it)."""
    call = journal.state.calls.get(call_id)
    return call.reserved if call is not None else 0


async def _every(period: float, work: Callable[[], Awaitable[object]], what: str, stop: asyncio.Event) -> None:
    """Run ``work`` every ``period`` seconds until ``stop``; an engine failure postpones it to the next."""
    while not stop.is_set():
        try:
            await work()
        except FAILED as exc:
            log.info("cluster: %s postponed (%s)", what, exc.__class__.__name__)
        except Exception:
            log.exception("cluster: %s", what)
        try:
            await asyncio.wait_for(stop.wait(), period)
        except TimeoutError:
            pass


def survivor_cdr(call: OpenCall, record: LiveCall | None, cost: int, now: float) -> Cdr:
    """The recovery CDR a survivor writes for a dead holder's call: from its published record if it
    was answered (billed to its funded time, as its node's own recovery bills), else from what its
    reservation says."""
    if record is not None and record.answered_at is not None:
        end = min(now, record.funded_until) if record.funded_until is not None else record.answered_at
        talk = max(0.0, end - record.answered_at)
        return call_cdr(record, record.rate, end, duration=billed_seconds(talk, record.rate), status=200,
                        end_reason="recovery", cost=cost)
    return call_cdr(call.live_call("", started_at=now), None, now, duration=0, status=500, end_reason="recovery",
                    cost=cost)
