"""A cluster node's money in the engine's journal: the agent's side (docs/cluster.md "Money across nodes").

Every balance of a cluster is the fold of its journal (edge/cluster/journal.py), which every node
spends from with conditional appends: a call's first slice is reserved with its channel
(channels.py), each later slice here (:meth:`ClusterMoney.fund`), and the control API's top-ups
and allocations are appended here too (:meth:`top_up`, :meth:`allocate`), each with an id that
moves its money once whichever node is asked again. No process of a cluster node moves a balance
in LMDB itself: the agent writes the journal's movements into the node's ledger
(:meth:`materialise`), so on every node a balance equals its ledger, and both follow the journal
within a refresh period.

A node joining with balances of its own (a node alone turned into a cluster node, or a copy of
another node) enrols them once: a journal still empty gets a credit of the LMDB balance under the
entry id ``enrol``, which lands once for the whole cluster (the copies' second tries are refused as
applied). A node whose ledger differs from the journal when it first writes it (it joined later)
is brought to the journal's balance by one ``cluster_sync`` entry.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from edge.control import accounts, cdrs, ledger, profiles
from edge.control.errors import InsufficientFunds, StoreError
from edge.control.models import Account, AutoRecharge, Profile
from edge.control.money import format_money
from edge.control.store import Store, Txn, u64

from . import link
from .channels import FAILED, ClusterChannels
from .journal import (
    CDR_SPAN,
    STREAM,
    SUBJECTS,
    AccountJournal,
    AlreadyApplied,
    InsufficientCredit,
    JournalRefused,
    ProfileJournal,
    Settle,
)
from .membership import rendezvous
from .remote import RemoteCalls

log = logging.getLogger("sipedge.cluster")

MARKS = "cluster_money"
WRITE_PERIOD = 0.1          # seconds between two writes of moved journals into the ledger
JUDGE_PERIOD = 1.0          # seconds between two looks at every profile's auto-recharge (new settings)
REFRESH_PERIOD = 30.0       # seconds between two reads of every open journal's next slot: the follower's safety net
ENROL_ENTRY = "enrol"
SYNC_KIND = "cluster_sync"
# journal movement kinds -> the ledger's (edge/control/ledger.py)
LEDGER_KINDS = {"transfer_in": "allocate_in", "transfer_out": "allocate_out"}
RECHARGE_KINDS = {"transfer_in": "auto_recharge_in", "transfer_out": "auto_recharge_out"}
RECHARGE_PREFIX = "ar-"     # transfer id of the n-th auto-recharge of a profile: ar-<profile id>-<n>


class ClusterMoney:
    """The journals of the node's accounts (its profiles' are :class:`ClusterChannels`'s) and their ledger."""

    def __init__(self, channels: ClusterChannels) -> None:
        self.channels = channels
        self.store: Store = channels.store
        self._accounts: dict[str, AccountJournal] = {}
        self._moved_profiles: set[str] = set()
        self._moved_accounts: set[str] = set()
        channels.on_change = self.moved_profile
        self.funded = self.broke = self.unavailable = 0    # slices (edge_cluster_slices_total)
        self.recharged = 0
        self._recharge_due: set[str] = set()
        # per profile, the journal position and settings last judged: judged again after a movement
        # that is not its own recharge, or new settings (one recharge per trigger, as on a node alone)
        self._judged: dict[str, tuple[int, AutoRecharge]] = {}
        self._catching_up: set[str] = set()
        self.following = asyncio.Event()                 # the follower's consumer is in place
        self.remote: RemoteCalls | None = None           # the other nodes' calls, written with the ledger
        self._tasks: set[asyncio.Task[None]] = set()     # held here: the loop keeps only weak references

    def moved_profile(self, profile_id: str) -> None:
        """A profile whose journal (or another node's call record of it) moved: written at the next period."""
        self._moved_profiles.add(profile_id)

    async def account(self, account_id: str, *, new: bool = False) -> AccountJournal:
        found = self._accounts.get(account_id)
        if found is None:
            found = await AccountJournal.open(self.channels.engine, account_id, new=new)
            self._accounts.setdefault(account_id, found)
        return self._accounts[account_id]

    # ----------------------------------------------------------- start

    async def start(self) -> None:
        """Open the journal of every profile and account of the node's store, enrol the balances of
        those still empty, finish transfers a crash cut in two, and write them all into the ledger."""
        owners = self.store.read(lambda txn: (list(txn.values("profiles", Profile)),
                                              list(txn.values("accounts", Account))))
        for prof in owners[0]:
            journal = await self.channels.journal(prof.id)
            await self._enrol(journal, prof.balance)
            self._moved_profiles.add(prof.id)
        for acct in owners[1]:
            account = await self.account(acct.id)
            await self._enrol(account, acct.balance)
            await account.complete_transfers(self.channels.journals)
            self._moved_accounts.add(acct.id)
        self.materialise()

    async def follow(self, account_ids: list[str], profile_ids: list[str]) -> None:
        """Accounts and profiles the cluster's provisioning just brought to this node: their journals'
        balances come into its ledger from now on (the first write closes the gap: ``cluster_sync``)."""
        try:
            for account_id in account_ids:
                await self.account(account_id, new=True)
                self._moved_accounts.add(account_id)
            for profile_id in profile_ids:
                await self.channels.journal(profile_id, new=True)
                self._moved_profiles.add(profile_id)
        except FAILED as exc:       # opened on first use then (a call, the API's credit)
            log.warning("cluster: journals of new profiles not opened yet (%s)", exc.__class__.__name__)

    @staticmethod
    async def _enrol(journal: ProfileJournal | AccountJournal, balance: int) -> None:
        if journal.state.slot or balance <= 0:
            return
        try:
            await journal.credit(ENROL_ENTRY, balance, ENROL_ENTRY)
            log.info("cluster: enrolled %s with the node's balance (%d micro-units)", journal.subject, balance)
        except AlreadyApplied:
            pass                # another node (a copy of this one) enrolled it first

    # ------------------------------------------------------ on request

    async def fund(self, request: link.Fund) -> link.Reply:
        """A worker's next slice of an open call."""
        if not self.channels.membership.holds_lease():
            self.unavailable += 1
            return link.Reply(request.id, link.UNAVAILABLE)
        try:
            journal = await self.channels.journal(request.profile_id)
            await journal.extend(request.call_id, request.amount)
        except InsufficientCredit:
            self.broke += 1
            return link.Reply(request.id, link.BROKE, journal.balance)
        except (JournalRefused, ValueError, *FAILED) as exc:   # settled meanwhile (recovered), no engine
            log.warning("cluster: slice of %s not funded (%s)", request.call_id, exc.__class__.__name__)
            self.unavailable += 1
            return link.Reply(request.id, link.UNAVAILABLE)
        self.funded += 1
        self.channels.moved(journal)
        return link.Reply(request.id, link.OK, journal.balance)

    async def top_up(self, request: link.TopUp) -> link.Reply:
        """The control API's credit to a master balance: once per entry id, cluster-wide."""
        try:
            account = await self.account(request.account_id)
            try:
                await account.credit(request.entry_id, request.amount, "topup")
            except AlreadyApplied:
                pass            # asked again (a retry, another node): moved once
        except (JournalRefused, ValueError, *FAILED) as exc:
            log.warning("cluster: top-up of %s not appended (%s)", request.account_id, exc.__class__.__name__)
            return link.Reply(request.id, link.UNAVAILABLE)
        self._moved_accounts.add(request.account_id)
        self.materialise()
        return link.Reply(request.id, link.OK, account.balance)

    async def allocate(self, request: link.Allocate) -> link.Reply:
        """The control API's move of master balance to a profile: ``transfer_out`` then ``transfer_in``,
        once per transfer id (a second ask completes a first one cut in two, moves nothing again)."""
        try:
            account = await self.account(request.account_id)
            journal = await self.channels.journal(request.profile_id)
            try:
                await account.transfer_out(request.transfer_id, request.profile_id, request.amount)
            except AlreadyApplied:
                pass
            except InsufficientCredit:
                return link.Reply(request.id, link.BROKE, journal.balance, account.balance)
            await journal.transfer_in(request.transfer_id, request.account_id, request.amount)
        except (JournalRefused, ValueError, *FAILED) as exc:
            log.warning("cluster: allocation to %s not appended (%s)", request.profile_id, exc.__class__.__name__)
            return link.Reply(request.id, link.UNAVAILABLE)
        self._moved_accounts.add(request.account_id)
        self.channels.moved(journal)
        self.materialise()
        return link.Reply(request.id, link.OK, journal.balance, account.balance)

    # ----------------------------------------------------- auto-recharge

    async def recharge(self, profile_ids: set[str]) -> int:
        """Auto-recharge (SPEC §4.4) of the profiles among ``profile_ids`` whose balance in the journal is
        below their minimum, by the one live node that rendezvous hashing picks for each: the n-th
        recharge of a profile is the transfer ``ar-<profile>-<n>``, so two nodes that both think it is
        theirs (members changing) move it once. Webhooks as on a node alone, from this node.
        :returns: the recharges done."""
        membership = self.channels.membership
        if not profile_ids or not membership.holds_lease():
            return 0
        members = membership.members()
        done = 0
        for profile_id in sorted(profile_ids):
            journal = self.channels.journals.get(profile_id)
            if journal is None or rendezvous(profile_id, members) != membership.node:
                continue
            prof = profiles.find(self.store, profile_id)
            if prof is None or prof.auto_recharge.min_balance <= 0:
                continue
            if self._judged.get(profile_id) == (journal.state.last_seq, prof.auto_recharge):
                continue
            try:
                done += await self._recharge_one(prof, journal)
            except (JournalRefused, ValueError, *FAILED) as exc:    # judged again at the next period
                log.warning("cluster: auto-recharge of %s postponed (%s)", profile_id, exc.__class__.__name__)
                continue
            self._judged[profile_id] = (journal.state.last_seq, prof.auto_recharge)
        self.recharged += done
        return done

    async def _recharge_one(self, prof: Profile, journal: ProfileJournal) -> int:
        ar = prof.auto_recharge
        balance = journal.balance
        low = balance < ar.min_balance
        events: list[tuple[str, dict[str, object]]] = []
        if low and not prof.credit_low:
            events.append(("credit.low", {"balance": format_money(balance), "min_balance": format_money(ar.min_balance),
                                          "auto_recharge": ar.enabled and ar.amount > 0}))
        recharged = False
        if low and ar.enabled and ar.amount > 0:
            done = sum(1 for key in journal.state.keys if key.startswith("i:" + RECHARGE_PREFIX))
            transfer_id = f"{RECHARGE_PREFIX}{prof.id}-{done + 1}"
            account = await self.account(prof.account_id)
            try:
                await account.transfer_out(transfer_id, prof.id, ar.amount)
                recharged = True
            except AlreadyApplied:
                recharged = True            # its other half was cut off (a node died): completed here
            except InsufficientCredit:
                if not prof.credit_low:
                    events.append(("auto_recharge.failed", {
                        "amount": format_money(ar.amount), "balance": format_money(balance),
                        "account_balance": format_money(account.balance), "reason": "insufficient_funds"}))
            if recharged:
                await journal.transfer_in(transfer_id, prof.account_id, ar.amount)
                events.append(("auto_recharge.succeeded", {
                    "amount": format_money(ar.amount), "balance": format_money(journal.balance),
                    "account_balance": format_money(account.balance)}))
                self._moved_accounts.add(prof.account_id)
                self.channels.moved(journal)
        still_low = journal.balance < ar.min_balance

        def op(txn: Txn) -> None:
            here = profiles.find(txn, prof.id)
            if here is None:
                return
            if here.credit_low != still_low:
                here.credit_low = still_low
                profiles.save(txn, here)
            if recharged:
                txn.next_counter(b"auto_recharges:" + prof.id.encode())
            for event_type, data in events:
                ledger.credit_event(txn, here, event_type, data)

        if events or recharged or prof.credit_low != still_low:
            self.store.write(op, sync=False, grows=False)
        return int(recharged)

    # ------------------------------------------------------- the ledger

    def materialise(self) -> int:
        """Write the movements of the journals that moved into the node's ledger, in one transaction.
        :returns: the owners written."""
        moved_p, self._moved_profiles = self._moved_profiles, set()
        moved_a, self._moved_accounts = self._moved_accounts, set()
        journals: list[tuple[str, ProfileJournal | AccountJournal]] = [
            *((f"p:{p}", self.channels.journals[p]) for p in moved_p if p in self.channels.journals),
            *((f"a:{a}", self._accounts[a]) for a in moved_a if a in self._accounts)]
        if not journals:
            return 0

        node = self.channels.membership.node

        def op(txn: Txn) -> None:
            for mark, journal in journals:
                if isinstance(journal, ProfileJournal):
                    _write_cdrs(txn, mark, journal, node)     # first: the ledger's write moves the mark
                    if self.remote is not None:
                        self.remote.write(txn, journal)
                _write_ledger(txn, mark, journal)

        self._recharge_due |= moved_p

        try:
            self.store.write(op, sync=False, grows=False)
        except StoreError as exc:     # written at the next period
            log.error("cluster: the journal's movements cannot be written to the ledger (%s)", exc)
            self._moved_profiles |= moved_p
            self._moved_accounts |= moved_a
            return 0
        for _mark, journal in journals:     # in the ledger now: not kept in memory
            journal.forget_entries(journal.state.last_seq)
            if isinstance(journal, ProfileJournal):
                journal.take_cdrs(journal.state.last_seq)
        return len(journals)

    async def refresh(self) -> None:
        """Fold what other nodes appended to the journals open here (one request each when nothing did)."""
        for profile_id, journal in list(self.channels.journals.items()):
            if await journal.catch_up():
                self._moved_profiles.add(profile_id)
        for account_id, account in list(self._accounts.items()):
            if await account.catch_up():
                self._moved_accounts.add(account_id)

    def folded(self, subject: str, seq: int, data: bytes, msg_id: str | None) -> bool:
        """An event of the journal stream as another node (or this one) appended it, delivered by the
        follower: folded into the journal open here if it is its next slot; one past it (some were
        missed) makes the journal catch up. :returns: False in that case."""
        parts = subject.split(".")
        if len(parts) != 5 or not parts[4].isdigit():
            return True
        kind, owner, slot = parts[2], parts[3], int(parts[4])
        journal: ProfileJournal | AccountJournal | None
        if kind == "p":
            journal, moved = self.channels.journals.get(owner), self._moved_profiles
        elif kind == "a":
            journal, moved = self._accounts.get(owner), self._moved_accounts
        else:
            return True
        if journal is None or slot <= journal.state.slot:
            return True             # not followed here, or folded already (this node's own append)
        if slot != journal.state.slot + 1:
            self._catch_up(journal, owner, moved)
            return False
        journal._fold(seq, subject, data, msg_id)
        moved.add(owner)
        return True

    async def run_follower(self, stop: asyncio.Event) -> None:
        """Fold what every node appends to the journals open here as it lands (one ordered consumer on
        the whole stream, from now: what was appended before, the journals' replay or a catch-up read),
        instead of asking each journal for its next slot: the cost follows the calls, not the number of
        profiles. A journal that missed an event catches up; :meth:`refresh` is the slow safety net."""
        async def start() -> ConsumerConfig:
            return ConsumerConfig(deliver_policy=DeliverPolicy.NEW)

        async def handle(msg: Msg) -> None:
            self.folded(msg.subject, msg.metadata.sequence.stream, msg.data, (msg.headers or {}).get("Nats-Msg-Id"))

        await self.channels.engine.follow(STREAM, SUBJECTS[0], handle, stop, start=start, what="the journals",
                                          subscribed=self.following)

    def _catch_up(self, journal: ProfileJournal | AccountJournal, owner: str, moved: set[str]) -> None:
        if owner in self._catching_up:
            return
        self._catching_up.add(owner)

        async def catch_up() -> None:
            try:
                if await journal.catch_up():
                    moved.add(owner)
            except FAILED as exc:
                log.info("cluster: catching up %s postponed (%s)", journal.subject, exc.__class__.__name__)
            finally:
                self._catching_up.discard(owner)

        task = asyncio.create_task(catch_up(), name=f"cluster-catch-up-{owner}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, stop: asyncio.Event) -> None:
        """Write moved journals into the ledger every WRITE_PERIOD, judge auto-recharges, and read every
        open journal's next slot every REFRESH_PERIOD (the follower's safety net)."""
        refreshed = judged = time.monotonic()
        while not stop.is_set():
            if time.monotonic() - refreshed >= REFRESH_PERIOD:
                refreshed = time.monotonic()
                try:
                    await self.refresh()
                except FAILED as exc:
                    log.info("cluster: reading the journals postponed (%s)", exc.__class__.__name__)
            if time.monotonic() - judged >= JUDGE_PERIOD:
                judged = time.monotonic()
                self._recharge_due |= set(self.channels.journals)   # new settings need no movement
            self.materialise()
            due, self._recharge_due = self._recharge_due, set()
            await self.recharge(due)
            try:
                await asyncio.wait_for(stop.wait(), WRITE_PERIOD)
            except TimeoutError:
                pass
        self.materialise()


def _write_cdrs(txn: Txn, mark: str, journal: ProfileJournal, node: str) -> None:
    """The CDRs the journal's settlements (and refused attempts) carry since the owner's mark (before
    :func:`_write_ledger` moves it), numbered by their event's stream sequence (* CDR_SPAN + the place
    in a Settlements event), so a CDR has the same ``seq`` on every node; the node that settled a call
    sends its ``call.ended`` (once in the cluster)."""
    if profiles.find(txn, journal.state.profile_id) is None:
        return                  # deleted here
    raw = txn.get_raw(MARKS, mark.encode())
    after = int.from_bytes(raw, "big") if raw is not None else 0
    for number, event in journal.cdrs():
        if number // CDR_SPAN <= after or event.cdr is None:
            continue            # written before (a key of its own: written again, it would be the same)
        mine = isinstance(event, Settle) and event.by.partition(".")[0] == node
        (cdrs.record if mine else cdrs.add)(txn, event.cdr, seq=number)


def _write_ledger(txn: Txn, mark: str, journal: ProfileJournal | AccountJournal) -> None:
    """The journal's movements since the owner's mark as ledger entries; then the owner's balance
    equals the journal's (a first write, or a gap, is closed by one ``cluster_sync`` entry)."""
    owner: Profile | Account | None
    if isinstance(journal, ProfileJournal):
        owner = profiles.find(txn, journal.state.profile_id)
    else:
        owner = accounts.find(txn, journal.state.account_id)
    if owner is None:
        return                  # deleted here: its journal stays the cluster's record
    raw = txn.get_raw(MARKS, mark.encode())
    if raw is not None:
        for entry in journal.entries_after(int.from_bytes(raw, "big")):
            if not entry.amount:
                continue
            kinds = RECHARGE_KINDS if entry.ref.startswith(RECHARGE_PREFIX) else LEDGER_KINDS
            try:
                ledger.move(txn, owner, entry.amount, kinds.get(entry.kind, entry.kind), entry.ref)
            except InsufficientFunds:
                log.error("cluster: the ledger of %s differs from its journal: brought to the journal's balance",
                          mark)
                break
    gap = journal.balance - owner.balance
    if gap:
        ledger.move(txn, owner, gap, SYNC_KIND, journal.subject)
    txn.put_raw(MARKS, mark.encode(), u64(journal.state.last_seq))

