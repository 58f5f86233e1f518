"""Accounts (SPEC §3): the owner of a master balance, profiles, numbers and business accounts.

Balances change only through :mod:`edge.control.ledger`. Functions take an open
transaction; those decorated with ``@reads``/``@writes`` also take the store and open
their own (see :mod:`edge.control.store`).
"""

from __future__ import annotations

import time

from .errors import AccountNotEmpty, AdminLoginTaken, NotFound
from .models import Account
from .store import Txn, new_id, reads, writes


@reads
def get(txn: Txn, account_id: str) -> Account:
    """:raises NotFound: no such account."""
    acct = txn.get("accounts", account_id.encode(), Account)
    if acct is None:
        raise NotFound(f"account {account_id} not found")
    return acct


@reads
def find(txn: Txn, account_id: str) -> Account | None:
    """The account, or None if it does not exist (any more)."""
    return txn.get("accounts", account_id.encode(), Account)


@reads
def page(txn: Txn, *, after: str = "", limit: int | None = None) -> list[Account]:
    """Accounts in id order, those after ``after`` (a page cursor), at most ``limit``."""
    return txn.page_after_key("accounts", Account, after, limit)


@reads
def is_empty(txn: Txn) -> bool:
    return txn.entries("accounts") == 0


@reads
def is_admin_login(txn: Txn, login: str) -> bool:
    """True if ``login`` administers an account (such a login is never a business account)."""
    return txn.get_raw("admins", login.encode()) is not None


@writes()
def create(txn: Txn, name: str, admin: str) -> Account:
    """A new account with a zero balance; ``admin`` must be a free login.

    :raises Conflict: the login administers another account or is a business account name.
    """
    if is_admin_login(txn, admin):
        raise AdminLoginTaken(f"admin login {admin!r} already administers another account", field="admin")
    if txn.get_raw("business", admin.encode()) is not None:
        raise AdminLoginTaken(f"{admin!r} is a business account name, not a free login", field="admin")
    acct = Account(id=new_id("acc"), name=name, admin=admin, created_at=time.time())
    txn.put("accounts", acct.id.encode(), acct)
    txn.put_raw("admins", admin.encode(), acct.id.encode())
    return acct


def save(txn: Txn, acct: Account) -> None:
    """Store ``acct`` as it is (the ledger's balance updates; nothing else calls this)."""
    txn.put("accounts", acct.id.encode(), acct)


@writes(grows=False)
def delete(txn: Txn, account_id: str) -> None:
    """Delete an account with no profiles and a zero master balance: its numbers are released,
    its business accounts, webhooks and API keys go, its login is free again.

    :raises AccountNotEmpty: it still has profiles or credit.
    """
    from . import keys, numbers, webhooks
    from .models import Profile

    acct = get(txn, account_id)
    n_profiles = sum(1 for p in txn.values("profiles", Profile) if p.account_id == account_id)
    if n_profiles or acct.balance:
        raise AccountNotEmpty(f"account {account_id} still has {n_profiles} profiles and a balance of "
                              f"{acct.balance / 1_000_000:.6f}: delete the profiles and move the credit out first")
    numbers.release_all(txn, account_id)
    webhooks.delete_of_account(txn, account_id)
    keys.revoke_of_account(txn, account_id)
    txn.delete("admins", acct.admin.encode())
    txn.delete("accounts", account_id.encode())
