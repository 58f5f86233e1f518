"""The ledger: the only place a balance changes (SPEC §4.4).

:func:`move` updates the owner's balance and appends a :class:`LedgerEntry` with a global
sequence number in the same transaction, so a balance always equals the sum of its ledger
(:func:`audit` checks it). A movement that would make a balance negative raises
``InsufficientFunds`` and the caller's transaction aborts. Money is integer micro-units.

Entry kinds: ``topup`` (account), ``allocate_out``/``allocate_in`` (account → profile),
``auto_recharge_out``/``auto_recharge_in``, ``close_out``/``close_in`` (a deleted
profile's credit returns to its account), and the call kinds of the credit engine
(``reserve``, ``release``, ``call``).
"""

from __future__ import annotations

import itertools
import time

from . import accounts, profiles, webhooks
from .errors import InsufficientFunds, Invalid
from .models import Account, AutoRecharge, LedgerEntry, Profile
from .money import format_money
from .store import SEP, Txn, reads, u64, writes
from .times import window


def owner_key(owner: Account | Profile) -> str:
    """``"account:<id>"`` or ``"profile:<id>"``: how ledger entries name their owner."""
    return f"{'account' if isinstance(owner, Account) else 'profile'}:{owner.id}"


def move(txn: Txn, owner: Account | Profile, amount: int, kind: str, ref: str = "") -> LedgerEntry:
    """Apply ``amount`` (signed micro-units) to ``owner``'s balance and append the ledger entry.

    ``owner`` must have been read in ``txn``; it is updated in place and stored.

    :raises Invalid: ``amount`` is 0.
    :raises InsufficientFunds: the balance would go below zero.
    """
    if amount == 0:
        raise Invalid("amount must be greater than zero", field="amount")
    new_balance = owner.balance + amount
    is_account = isinstance(owner, Account)
    if new_balance < 0:
        raise InsufficientFunds(
            f"{'account' if is_account else 'profile'} {owner.id} balance is too low for this movement")
    owner.balance = new_balance
    if isinstance(owner, Account):
        accounts.save(txn, owner)
    else:
        profiles.save(txn, owner)
    seq = txn.next_counter(b"ledger_seq")
    entry = LedgerEntry(seq=seq, ts=time.time(), owner=owner_key(owner), kind=kind, amount=amount,
                        balance_after=new_balance, ref=ref)
    txn.put("ledger", entry.owner.encode() + SEP + u64(seq), entry)
    return entry


@reads
def entries(txn: Txn, owner: str, *, after: int = 0, limit: int = 100, start: float | None = None,
            end: float | None = None) -> list[LedgerEntry]:
    """Entries of ``"account:<id>"`` or ``"profile:<id>"`` with seq > ``after`` written in
    [``start``, ``end``) (Unix seconds; None: unbounded), oldest first."""
    inside = window(start, end)
    found = (e for e in txn.scan_after_seq("ledger", owner.encode() + SEP, LedgerEntry, after) if inside(e.ts))
    return list(itertools.islice(found, limit))


@reads
def audit(txn: Txn) -> dict[str, tuple[int, int]]:
    """For every owner: (stored balance, sum of its ledger). They must be equal."""
    sums: dict[str, int] = {}
    for entry in txn.values("ledger", LedgerEntry):
        sums[entry.owner] = sums.get(entry.owner, 0) + entry.amount
    out: dict[str, tuple[int, int]] = {}
    for a in txn.values("accounts", Account):
        out[f"account:{a.id}"] = (a.balance, sums.pop(f"account:{a.id}", 0))
    for p in txn.values("profiles", Profile):
        out[f"profile:{p.id}"] = (p.balance, sums.pop(f"profile:{p.id}", 0))
    for owner, total in sums.items():   # ledger of a deleted profile: closed at zero
        out[owner] = (0, total)
    return out


@writes()
def top_up(txn: Txn, account_id: str, amount: int, *, ref: str = "") -> Account:
    """Credit the master balance (the payment itself is out of scope)."""
    acct = accounts.get(txn, account_id)
    move(txn, acct, amount, "topup", ref)
    return acct


@writes()
def allocate(txn: Txn, profile_id: str, amount: int, *, ref: str = "") -> tuple[Profile, Account]:
    """Move ``amount`` from the master balance to the profile.

    :raises InsufficientFunds: the master balance is lower than ``amount``.
    """
    prof = profiles.get(txn, profile_id)
    acct = accounts.get(txn, prof.account_id)
    if acct.balance < amount:
        raise InsufficientFunds(f"account {acct.id} master balance is lower than the allocation", field="amount")
    move(txn, acct, -amount, "allocate_out", ref or f"profile:{prof.id}")
    move(txn, prof, amount, "allocate_in", ref or f"account:{acct.id}")
    if prof.credit_low and prof.balance >= prof.auto_recharge.min_balance:
        prof.credit_low = False    # back above the minimum: the next fall is a new credit.low
        profiles.save(txn, prof)
    return prof, acct


def close_profile(txn: Txn, prof: Profile) -> None:
    """Return a profile's whole balance to its account (before the profile is deleted)."""
    if prof.balance:
        acct = accounts.get(txn, prof.account_id)
        amount = prof.balance
        move(txn, prof, -amount, "close_out", f"account:{acct.id}")
        move(txn, acct, amount, "close_in", f"profile:{prof.id}")


def auto_recharge(txn: Txn, prof: Profile) -> bool:
    """Recharge ``prof`` from its account if it is below its minimum (SPEC §4.4).

    ``prof`` must have been read in ``txn``. Also where the credit webhooks are written, in
    the transaction of the movement that caused them (edge/control/webhooks.py):
    ``credit.low`` once when the balance falls below ``min_balance`` (again only after it
    was back above), ``auto_recharge.succeeded`` for each recharge, ``auto_recharge.failed``
    once per low episode when the master balance cannot pay it.
    :returns: True if credit moved.
    """
    ar = prof.auto_recharge
    if ar.min_balance <= 0 or prof.balance >= ar.min_balance:
        if prof.credit_low:
            prof.credit_low = False
            profiles.save(txn, prof)
        return False
    entering = not prof.credit_low
    if entering:
        prof.credit_low = True
        profiles.save(txn, prof)
        credit_event(txn, prof, "credit.low", {"balance": format_money(prof.balance),
                                         "min_balance": format_money(ar.min_balance),
                                         "auto_recharge": ar.enabled and ar.amount > 0})
    if not ar.enabled or ar.amount <= 0:
        return False
    acct = accounts.get(txn, prof.account_id)
    if acct.balance < ar.amount:
        if entering:
            credit_event(txn, prof, "auto_recharge.failed", {
                "amount": format_money(ar.amount), "balance": format_money(prof.balance),
                "account_balance": format_money(acct.balance), "reason": "insufficient_funds"})
        return False
    move(txn, acct, -ar.amount, "auto_recharge_out", f"profile:{prof.id}")
    move(txn, prof, ar.amount, "auto_recharge_in", f"account:{acct.id}")
    txn.next_counter(b"auto_recharges:" + prof.id.encode())
    if prof.balance >= ar.min_balance:
        prof.credit_low = False
        profiles.save(txn, prof)
    credit_event(txn, prof, "auto_recharge.succeeded", {
        "amount": format_money(ar.amount), "balance": format_money(prof.balance),
        "account_balance": format_money(acct.balance)})
    return True


def credit_event(txn: Txn, prof: Profile, event_type: str, data: dict[str, object]) -> None:
    """A credit webhook of ``prof`` (``credit.low``, ``auto_recharge.*``), written in ``txn``."""
    webhooks.emit(txn, prof.account_id, event_type, prof.id,
                  {"profile_id": prof.id, "account_id": prof.account_id, **data})


@writes()
def set_auto_recharge(txn: Txn, profile_id: str, settings: AutoRecharge, *, recharge: bool = True) -> Profile:
    """Save the settings; if the balance is already below the minimum, recharge now (``recharge``:
    a cluster node's agent does it instead, from the journal: edge/cluster/money.py)."""
    prof = profiles.get(txn, profile_id)
    prof.auto_recharge = settings
    profiles.save(txn, prof)
    if recharge:
        auto_recharge(txn, prof)
    return prof


@reads
def auto_recharge_count(txn: Txn, profile_id: str) -> int:
    """Auto-recharges performed for the profile (exported as a metric)."""
    return txn.counter(b"auto_recharges:" + profile_id.encode())
