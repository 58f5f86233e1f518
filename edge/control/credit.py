"""Real-time credit for calls (SPEC §4.4): rating, admission, reservations in slices,
settlement, CDRs. Every function that changes money takes an open write transaction
(:class:`~edge.control.store.Txn`) and moves money only through
:func:`edge.control.ledger.move`, so each step is atomic and ledgered. The transactions
that extend and settle calls finish admitted work: open them with ``grows=False`` (they
may use the store's reserve, docs/storage.md).

Funding of one call, decided at answer:

- **bundle**: a +1 destination in the US, not on the excluded list, while the profile
  has bundle seconds left this calendar month. Bundle seconds are reserved in slices
  (so two calls cannot use the same minutes) and no connection fee applies. When the
  bundle runs out mid-call the rest of the call is paid from credit.
- **credit**: slices of money reserved from the profile balance. ``funded_until`` is
  the call time the reservations cover; when the next slice cannot be funded the call
  is cut at ``funded_until``.

Billing rounds talk time up to ``min_seconds``, then to ``increment_seconds``; the
price of the billed seconds is rounded up to the micro-unit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import phonenumbers

from . import bundles, cdrs, channels, ledger, profiles, rates
from .models import Cdr, LiveCall, Profile, Rate
from .store import Store, Txn

ECHO_NUMBER = "+17606604690"


def billed_seconds(talk: float, rate: Rate | None) -> int:
    """Talk time rounded up to the minimum, then to the increment (0 for an unanswered call); to
    the second without a rate (a free call)."""
    if rate is None:
        return math.ceil(talk)
    if talk <= 0:
        return 0
    seconds = max(math.ceil(talk - 1e-9), rate.min_seconds)
    step = max(1, rate.increment_seconds)
    return -(-seconds // step) * step


def call_cdr(call: LiveCall, rate: Rate | None, ended_at: float, *, duration: int, status: int, end_reason: str,
             cost: int, bundle_seconds: int = 0, media: dict[str, int] | None = None, account_id: str = "") -> Cdr:
    """The CDR of ``call`` as it ended: its settlement here, or a survivor's recovery of a dead node's call."""
    return Cdr(seq=0, call_id=call.call_id, profile_id=call.profile_id, direction=call.direction,
               caller=call.caller, callee=call.callee, started_at=call.started_at, answered_at=call.answered_at,
               ended_at=ended_at, duration=duration, status=status, end_reason=end_reason, cost=cost,
               bundle_seconds=bundle_seconds, rate_prefix=rate.prefix if rate is not None else None,
               media=media or {}, account_id=account_id, carrier=call.carrier, transport=call.transport,
               srtp=call.srtp)


def price(seconds: int, rate: Rate, *, connect_fee: bool = True) -> int:
    """Micro-units for ``seconds`` already billed (rounded up to the micro-unit)."""
    if seconds <= 0:
        return 0
    return (rate.connect_fee if connect_fee else 0) + -(-seconds * rate.rate // 60)


def minimum_charge(rate: Rate) -> int:
    """What the balance must hold for a call to be admitted: the price of the shortest call."""
    return price(billed_seconds(1, rate), rate)


# Regions whose national numbers have no trunk prefix ("0"), so that a number dialled in their
# national format can also read as a valid international number of another country (the US
# 4155550100 is also +41 55 550 01 00, a Swiss number). Without a "+", digits that are a valid
# national number of one of these are refused as national (SPEC §4.2 rule 3, issue 14 item 8).
NATIONAL_WITHOUT_TRUNK_PREFIX = ("US", "ES", "DK", "NO", "PT", "GR")


def is_e164(user: str, *, require_plus: bool = False) -> str | None:
    """The one E.164 rule of the edge (the control API and the SIP path use it alike).

    :param user: a Request-URI user or an API field: international digits, with or without
        "+" (``require_plus``: the API insists on it).
    :returns: the number as E.164 with "+", if it is a full international number that
        phonenumbers holds *valid* (a country code that exists and a number of the length and
        ranges that country uses), else None. National formats are refused: a leading 0 or
        00, and digits without "+" that are a valid national number of a region dialled
        without a trunk prefix (4155550100), even when they happen to be a valid number of
        another country.
    """
    has_plus = user.startswith("+")
    if require_plus and not has_plus:
        return None
    digits = user[1:] if has_plus else user
    if not digits.isdigit() or not 7 <= len(digits) <= 15 or digits[0] == "0":
        return None
    try:
        parsed = phonenumbers.parse("+" + digits, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    if not has_plus:
        for region in NATIONAL_WITHOUT_TRUNK_PREFIX:
            code = str(phonenumbers.country_code_for_region(region))
            if digits.startswith(code):
                continue        # already international for that region (14155550100)
            try:
                national = phonenumbers.parse(digits, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(national):
                return None
    return "+" + digits


def is_us_number(e164: str) -> bool:
    """A +1 number in the United States (not Canada or the Caribbean NANP countries)."""
    if not e164.startswith("+1"):
        return False
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(e164, None)) == "US"
    except phonenumbers.NumberParseException:
        return False


def month_of(ts: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(ts))


def funded_seconds(call: LiveCall) -> float:
    """The talk time ``call``'s reservations cover so far (0 before its answer)."""
    if call.answered_at is None or call.funded_until is None:
        return 0.0
    return call.funded_until - call.answered_at


class CdrHolder(Protocol):
    """Where a cluster node's CDRs wait for the journal (edge/cluster/outbox.py ``hold_cdr``)."""

    def __call__(self, txn: Txn, cdr: Cdr, *, refused: bool = False) -> None: ...


@dataclass(slots=True)
class Admission:
    """Why a call may (or may not) start: its rate and how it will be funded."""

    ok: bool
    reason: str = ""            # when not ok: "no_rate" or "no_credit"
    rate: Rate | None = None
    bundle: bool = False        # funded by US bundle minutes first
    free: bool = False          # the echo test number


class CreditEngine:
    """Admission, reservation and settlement of calls against one store."""

    def __init__(self, store: Store, *, slice_seconds: int = 60, bundle_minutes: int = 5000,
                 on_settle: Callable[[Txn, LiveCall, int], None] | None = None, journaled: bool = False,
                 hold_cdr: CdrHolder | None = None) -> None:
        """:param on_settle: also run in each settling transaction, with the call's cost (a cluster
            node's journal outbox).
        :param hold_cdr: takes each settled call's (and refused attempt's) CDR instead of the CDR
            table (a cluster node: the CDR travels in the journal, and every node writes it from there).
        :param journaled: the money of calls lives in the cluster's journal (docs/cluster.md "Money
            across nodes"): this engine prices slices and calls and records what the journal
            reserved in the call, and moves no balance -- the cluster agent writes the journal's
            movements into the ledger. No bundle minutes (they are not in the journal yet).
        """
        self.store = store
        self.slice_seconds = slice_seconds
        self.bundle_seconds_per_bundle = bundle_minutes * 60
        self.on_settle = on_settle
        self.journaled = journaled
        self.hold_cdr = hold_cdr

    # --------------------------------------------------------- admission

    def bundle_left(self, txn: Txn, prof: Profile, now: float) -> int:
        """Bundle seconds the profile has left in the month of ``now``."""
        pool = prof.us_bundles * self.bundle_seconds_per_bundle
        return max(0, pool - bundles.seconds_used(txn, prof.id, month_of(now)))

    def admit(self, prof: Profile, callee: str, now: float | None = None) -> Admission:
        """SPEC §4.2 rule 5: free echo, covered by a bundle, or the balance covers the minimum charge."""
        if callee == ECHO_NUMBER:
            return Admission(ok=True, free=True)
        rate = rates.rate_for(self.store, callee)
        if rate is None:
            return Admission(ok=False, reason="no_rate")
        if self.journaled:      # the journal decides, when the first slice is reserved (admission.py)
            return Admission(ok=True, rate=rate)
        now = time.time() if now is None else now
        bundle = False
        if prof.us_bundles > 0 and is_us_number(callee) and not rates.is_bundle_excluded(self.store, callee):
            bundle = self.store.read(lambda txn: self.bundle_left(txn, prof, now)) > 0
        if bundle or prof.balance >= minimum_charge(rate):
            return Admission(ok=True, rate=rate, bundle=bundle)
        return Admission(ok=False, reason="no_credit", rate=rate)

    # -------------------------------------------------------- reservations

    def cost(self, call: LiveCall, rate: Rate, talk: float) -> int:
        """Money owed for ``talk`` seconds of ``call``: the price of the billed seconds,
        less the seconds its bundle reservation covers (bundle calls pay no connection fee)."""
        billed = billed_seconds(talk, rate)
        if call.funding == "bundle":
            return price(max(0, billed - call.bundle_seconds_reserved), rate, connect_fee=False)
        return price(billed, rate)

    def extend(self, txn: Txn, call: LiveCall, rate: Rate, now: float) -> float:
        """Fund the next slice of ``call`` (at answer, and before each slice runs out).

        Bundle seconds first for a bundle call, then credit; funds as much of the slice
        as the balance allows. Auto-recharge runs the moment the balance drops below
        the profile's minimum, and the slice is retried once with the recharged balance.
        Records ``rate`` in the call (recovery bills at it), updates ``call`` in ``txn`` and
        returns its new ``funded_until``: unchanged when nothing more can be funded, and
        the call must end then.
        """
        assert call.answered_at is not None
        call.rate = rate
        funded = funded_seconds(call)
        target = funded + self.slice_seconds
        if self.journaled:      # at answer: what the journal reserved with the channel (the first slice)
            return self.funded(txn, call, self._affordable(call.reserved, call, rate, funded, target), 0)
        prof = profiles.get(txn, call.profile_id)
        if call.funding == "bundle" and call.reserved == 0:  # still on bundle minutes
            # bundle seconds are counted like billed seconds (minimum and increment included)
            need = billed_seconds(target, rate) - call.bundle_seconds_reserved
            take = int(min(self.bundle_left(txn, prof, now), need))
            if take > 0:
                bundles.add_seconds(txn, prof.id, month_of(call.answered_at), take)
                call.bundle_seconds_reserved += take
        for _ in range(2):  # a second pass uses what an auto-recharge just added
            if funded >= target:
                break
            best = self._affordable(prof.balance + call.reserved, call, rate, funded, target)
            if best <= funded:
                break
            extra = self.cost(call, rate, best) - call.reserved
            if extra > 0:
                ledger.move(txn, prof, -extra, "reserve", call.call_id)
                call.reserved += extra
            funded = best
            if not ledger.auto_recharge(txn, prof):
                break
        call.funded_until = call.answered_at + funded
        channels.update(txn, call)
        return call.funded_until

    def next_slice(self, call: LiveCall, rate: Rate, balance: int | None = None) -> tuple[float, int]:
        """A journaled call's next slice: (the talk seconds funded with it, the micro-units to reserve
        for it), as much of it as ``balance`` covers beside what the call holds (None: all of it).
        Before the answer, the first slice."""
        funded = funded_seconds(call)
        target = funded + self.slice_seconds
        best = target if balance is None else self._affordable(balance + call.reserved, call, rate, funded, target)
        return best, max(0, self.cost(call, rate, best) - call.reserved)

    def funded(self, txn: Txn, call: LiveCall, seconds: float, amount: int) -> float:
        """A journaled call got ``amount`` more reserved, funding ``seconds`` of talk: record it in
        ``call``. :returns: its ``funded_until``."""
        assert call.answered_at is not None
        call.reserved += amount
        call.funded_until = call.answered_at + seconds
        channels.update(txn, call)
        return call.funded_until

    def _affordable(self, budget: int, call: LiveCall, rate: Rate, have: float, want: float) -> float:
        """The most talk seconds in (have, want] whose price ``budget`` covers, else ``have``."""
        if self.cost(call, rate, want) <= budget:
            return want
        step = max(1, rate.increment_seconds)
        best, seconds = have, (math.floor(have / step) + 1) * step
        while seconds < want and self.cost(call, rate, seconds) <= budget:
            best, seconds = seconds, seconds + step
        return best

    # ---------------------------------------------------------- settlement

    def settle(self, txn: Txn, call: LiveCall, rate: Rate | None, ended_at: float, *, status: int, end_reason: str,
               media: dict[str, int] | None = None) -> Cdr:
        """End ``call``: bill it, return the unused reservation and bundle seconds, free its
        channel and write its CDR, all in ``txn``."""
        channels.release(txn, call.profile_id, call.call_id)
        talk = 0.0
        if call.answered_at is not None:
            # never bill past what was funded: the edge cuts the call there
            end = min(ended_at, call.funded_until) if call.funded_until is not None else ended_at
            talk = max(0.0, end - call.answered_at)
        billed = billed_seconds(talk, rate)
        cost = self.cost(call, rate, talk) if rate is not None and call.funding != "free" else 0
        bundle_used = min(billed, call.bundle_seconds_reserved)
        if call.bundle_seconds_reserved > bundle_used and call.answered_at is not None:
            bundles.add_seconds(txn, call.profile_id, month_of(call.answered_at),
                                bundle_used - call.bundle_seconds_reserved)
        if self.on_settle is not None:
            self.on_settle(txn, call, cost)
        prof = profiles.find(txn, call.profile_id)
        if prof is not None and not self.journaled:
            if call.reserved:
                ledger.move(txn, prof, call.reserved, "release", call.call_id)
            if cost:  # cost(talk) <= cost(funded) = reserved: the release covers it
                ledger.move(txn, prof, -min(cost, prof.balance), "call", call.call_id)
            ledger.auto_recharge(txn, prof)
        cdr = call_cdr(call, rate, ended_at, duration=billed, status=status, end_reason=end_reason, cost=cost,
                       bundle_seconds=bundle_used, media=media, account_id=prof.account_id if prof is not None else "")
        if self.hold_cdr is not None:
            self.hold_cdr(txn, cdr)     # to the journal with the settlement (edge/cluster/outbox.py)
        else:
            cdrs.record(txn, cdr)
        return cdr

    def recover(self, now: float | None = None, owned: Callable[[LiveCall], bool] | None = None) -> list[LiveCall]:
        """After a crash: settle every live call of the previous run from its last reservation.

        The reservation is what was funded; the call is billed up to ``funded_until``
        (it may have run that long) at the rate it was funded at (``LiveCall.rate``; the
        rate table of today only for a record of an older build that lacks it), its channel
        is freed and its CDR says ``recovery``. Each settlement is one durable write that
        may use the store's reserve.
        :param owned: which live calls are this process's to settle (None: all). Each SIP worker
            settles its own (docs/architecture.md "Processes"); the others run on.
        :returns: the calls settled (the B2BUA sends BYE to the legs it can reach).
        """
        now = time.time() if now is None else now
        calls = [call for call in channels.live_calls(self.store) if owned is None or owned(call)]
        settled: list[LiveCall] = []
        for call in calls:
            rate = None
            if call.funding in ("credit", "bundle"):
                rate = call.rate if call.rate is not None else rates.rate_for(self.store, call.callee)
            end = (min(now, call.funded_until) if call.funded_until is not None
                   else (call.answered_at or call.started_at))

            def op(txn: Txn, call: LiveCall = call, rate: Rate | None = rate, end: float = end) -> bool:
                if channels.get(txn, call.profile_id, call.call_id) is None:
                    return False    # settled meanwhile, by the process that carried it
                self.settle(txn, call, rate, end, status=200 if call.answered_at else 500, end_reason="recovery")
                return True

            if self.store.write(op, grows=False):
                settled.append(call)
        return settled
