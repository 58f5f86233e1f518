"""Online numbers and business accounts (SPEC §3, §4.3): owned by an account, attached to
at most one of its profiles. Incoming calls route by them (:func:`profile_by_number`,
:func:`business_account`)."""

from __future__ import annotations

import msgspec

from . import accounts, profiles
from .errors import (
    AdminNotAttachable,
    BusinessAccountAttachedElsewhere,
    BusinessAccountExists,
    NotFound,
    NumberAttachedElsewhere,
    NumberInvalid,
    NumberTaken,
)
from .models import BusinessAccount, OnlineNumber, Profile
from .store import Store, Txn, reads, writes

_number = msgspec.msgpack.Decoder(OnlineNumber)   # the call path's own decoders
_profile = msgspec.msgpack.Decoder(Profile)

# ----------------------------------------------------------- online numbers


@writes()
def buy(txn: Txn, account_id: str, number: str) -> OnlineNumber:
    """:raises NumberInvalid: not a valid E.164 number (the rule of the SIP path, ``credit.is_e164``).
    :raises Conflict: the number is already owned."""
    from .credit import is_e164

    if is_e164(number, require_plus=True) != number:
        raise NumberInvalid(f"{number} is not a valid E.164 number (country code and a number valid there)",
                            field="number")
    accounts.get(txn, account_id)
    if txn.get_raw("numbers", number.encode()) is not None:
        raise NumberTaken(f"number {number} is already owned", field="number")
    rec = OnlineNumber(number=number, account_id=account_id)
    txn.put("numbers", number.encode(), rec)
    return rec


@reads
def of_account(txn: Txn, account_id: str) -> list[OnlineNumber]:
    """:raises NotFound: no such account."""
    accounts.get(txn, account_id)
    return [r for r in txn.values("numbers", OnlineNumber) if r.account_id == account_id]


@writes()
def attach(txn: Txn, profile_id: str, number: str, extension: str | None = None) -> OnlineNumber:
    """Attach an owned number to a profile of the same account (``extension`` is sent as the
    Request-URI user of incoming calls, if set).

    :raises NotFound: the profile's account does not own the number.
    :raises Conflict: attached to another profile.
    """
    prof = profiles.get(txn, profile_id)
    rec = txn.get("numbers", number.encode(), OnlineNumber)
    if rec is None or rec.account_id != prof.account_id:
        raise NotFound(f"number {number} is not owned by the profile's account")
    if rec.profile_id is not None and rec.profile_id != prof.id:
        raise NumberAttachedElsewhere(f"number {number} is already attached to profile {rec.profile_id}",
                                      field="number")
    rec.profile_id, rec.extension = prof.id, extension
    txn.put("numbers", number.encode(), rec)
    if number not in prof.numbers:
        prof.numbers.append(number)
        profiles.save(txn, prof)
    return rec


@writes(grows=False)
def detach(txn: Txn, profile_id: str, number: str) -> None:
    """:raises NotFound: the number is not attached to the profile."""
    prof = profiles.get(txn, profile_id)
    rec = txn.get("numbers", number.encode(), OnlineNumber)
    if rec is None or rec.profile_id != prof.id:
        raise NotFound(f"number {number} is not attached to profile {profile_id}")
    rec.profile_id, rec.extension = None, None
    txn.put("numbers", number.encode(), rec)
    prof.numbers.remove(number)
    profiles.save(txn, prof)


@writes(grows=False)
def release(txn: Txn, account_id: str, number: str) -> None:
    """Give a number up (SPEC §5.5): detached from its profile if attached, then no longer owned.

    :raises NotFound: the account does not own the number.
    """
    rec = txn.get("numbers", number.encode(), OnlineNumber)
    if rec is None or rec.account_id != account_id:
        raise NotFound(f"number {number} is not owned by account {account_id}")
    if rec.profile_id is not None:
        prof = profiles.find(txn, rec.profile_id)
        if prof is not None and number in prof.numbers:
            prof.numbers.remove(number)
            profiles.save(txn, prof)
    txn.delete("numbers", number.encode())


def release_all(txn: Txn, account_id: str) -> None:
    """Release every number and delete every business account of an account being deleted."""
    for rec in [r for r in txn.values("numbers", OnlineNumber) if r.account_id == account_id]:
        release(txn, account_id, rec.number)
    for biz in [b for b in txn.values("business", BusinessAccount) if b.account_id == account_id]:
        txn.delete("business", biz.name.encode())


def profile_by_number(store: Store, number: str) -> tuple[OnlineNumber, Profile] | None:
    """Call path: online number -> its attached profile (None if unknown or unattached),
    in one read transaction."""
    dbs = store.dbs
    with store.env.begin() as txn:
        raw = txn.get(number.encode(), db=dbs.numbers)
        if raw is None:
            return None
        rec = _number.decode(raw)
        if rec.profile_id is None:
            return None
        praw = txn.get(rec.profile_id.encode(), db=dbs.profiles)
    return None if praw is None else (rec, _profile.decode(praw))


# -------------------------------------------------------- business accounts


@writes()
def create_business(txn: Txn, account_id: str, name: str) -> BusinessAccount:
    """:raises Conflict: ``name`` is an administrator login or already exists."""
    accounts.get(txn, account_id)
    if accounts.is_admin_login(txn, name):
        raise AdminNotAttachable(f"{name!r} is an administrator login, not a business account", field="name")
    if txn.get_raw("business", name.encode()) is not None:
        raise BusinessAccountExists(f"business account {name!r} already exists", field="name")
    rec = BusinessAccount(name=name, account_id=account_id)
    txn.put("business", name.encode(), rec)
    return rec


@writes()
def attach_business(txn: Txn, profile_id: str, name: str) -> BusinessAccount:
    """Attach a business account of the profile's account (it can no longer sign in elsewhere).

    :raises Conflict: ``name`` is an administrator login (never attachable) or is attached elsewhere.
    :raises NotFound: not a business account of the profile's account.
    """
    prof = profiles.get(txn, profile_id)
    acct = accounts.get(txn, prof.account_id)
    if name == acct.admin or accounts.is_admin_login(txn, name):
        raise AdminNotAttachable(
            f"{name!r} is the administrator login of an account; it can never be attached to a "
            "SIP profile (it could no longer sign in to manage the account)", field="name",
        )
    rec = txn.get("business", name.encode(), BusinessAccount)
    if rec is None or rec.account_id != prof.account_id:
        raise NotFound(f"business account {name!r} does not belong to the profile's account")
    if rec.profile_id is not None and rec.profile_id != prof.id:
        raise BusinessAccountAttachedElsewhere(
            f"business account {name!r} is already attached to profile {rec.profile_id}", field="name")
    rec.profile_id = prof.id
    txn.put("business", name.encode(), rec)
    if name not in prof.business_accounts:
        prof.business_accounts.append(name)
        profiles.save(txn, prof)
    return rec


@writes(grows=False)
def detach_business(txn: Txn, profile_id: str, name: str) -> None:
    """:raises NotFound: the business account is not attached to the profile."""
    prof = profiles.get(txn, profile_id)
    rec = txn.get("business", name.encode(), BusinessAccount)
    if rec is None or rec.profile_id != prof.id:
        raise NotFound(f"business account {name!r} is not attached to profile {profile_id}")
    rec.profile_id = None
    txn.put("business", name.encode(), rec)
    prof.business_accounts.remove(name)
    profiles.save(txn, prof)


@reads
def business_account(txn: Txn, name: str) -> BusinessAccount | None:
    return txn.get("business", name.encode(), BusinessAccount)


@reads
def business_of_account(txn: Txn, account_id: str) -> list[BusinessAccount]:
    """The account's business accounts in name order (a scan: there are few per node)."""
    accounts.get(txn, account_id)
    return [b for b in txn.values("business", BusinessAccount) if b.account_id == account_id]


def detach_all(txn: Txn, prof: Profile) -> None:
    """Detach every number and business account of ``prof`` (the profile record is left as is)."""
    for number in prof.numbers:
        rec = txn.get("numbers", number.encode(), OnlineNumber)
        if rec is not None:
            rec.profile_id, rec.extension = None, None
            txn.put("numbers", number.encode(), rec)
    for name in prof.business_accounts:
        biz = txn.get("business", name.encode(), BusinessAccount)
        if biz is not None:
            biz.profile_id = None
            txn.put("business", name.encode(), biz)
