"""The LMDB store: one environment shared by every process of a node.

Every write is one LMDB write transaction, so a change is all or nothing and
writers in different processes (the edge, the control API, a CLI) are serialised
by LMDB's own lock. Reads on the call path open a read transaction and do one or
two ``get``s: microseconds, no cache to invalidate. ``docs/storage.md`` lists every
database with its keys and values.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
import string
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import msgspec

from .errors import Conflict, InsufficientFunds, Invalid, NotFound
from .models import (
    Account,
    AutoRecharge,
    BusinessAccount,
    Cdr,
    Credential,
    IdempotentResult,
    LedgerEntry,
    LiveCall,
    OnlineNumber,
    Profile,
    Rate,
    Registration,
)

T = TypeVar("T")

# Named databases. If you add one, document it in docs/storage.md.
DB_NAMES = (
    "accounts",        # account id -> Account
    "admins",          # admin login -> account id (logins are unique; never attachable)
    "profiles",        # profile id -> Profile
    "credentials",     # SIP username -> Credential
    "numbers",         # E.164 "+..." -> OnlineNumber
    "business",        # business account name -> BusinessAccount
    "rates",           # prefix digits -> Rate
    "exclusions",      # prefix digits (with country code 1) -> b"" (US bundle exclusions)
    "registrations",   # profile id \0 contact -> Registration
    "calls",           # profile id \0 call id -> LiveCall
    "channels",        # profile id -> channels in use, u32 big-endian
    "ledger",          # owner \0 seq u64 BE -> LedgerEntry
    "cdrs",            # profile id \0 seq u64 BE -> Cdr
    "bundle_usage",    # profile id \0 "YYYY-MM" -> seconds used, u64 BE
    "idempotency",     # Idempotency-Key -> IdempotentResult
    "meta",            # counters and index shapes (see docs/storage.md)
)

SIP_USERNAME_BASE = 990500000000
MAX_CHANNELS = 300
SEP = b"\x00"

_PASSWORD_ALPHABET = string.ascii_letters + string.digits


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _from_u64(b: bytes | None) -> int:
    return int.from_bytes(b, "big") if b else 0


def _digits(number: str) -> str:
    return number[1:] if number.startswith("+") else number


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def digest_ha1(username: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """HA1 of RFC 2617 (MD5) / RFC 7616 (SHA-256): H(username:realm:password)."""
    h = hashlib.sha256 if algorithm.upper().startswith("SHA-256") else hashlib.md5
    return h(f"{username}:{realm}:{password}".encode()).hexdigest()


class Store:
    """The node's LMDB environment and every operation on it.

    :param path: directory of the environment (created if missing).
    :param realm: the SIP domain; digest HA1s are computed for it.
    :param map_size: maximum size of the map (a sparse file: costs nothing until used).
    :param durable: fsync after every write that moves money or answers the control
        API (``write(..., sync=True)``, the default). Soft state on the call path
        (registrations, channel bookkeeping) commits with ``sync=False``: a *process*
        crash loses nothing committed (the pages are in the OS cache); an OS crash may
        lose the last such commits, which recovery rebuilds (docs/storage.md).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        realm: str = "sip.edge.test",
        map_size: int = 4 << 30,
        durable: bool = True,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.realm = realm
        self.durable = durable
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=len(DB_NAMES) + 4,
            max_readers=1024,
            sync=False,            # fsync is explicit, per write: see write()
            metasync=False,
            readonly=readonly,
            lock=True,
        )
        self.db: dict[str, Any] = {}
        for name in DB_NAMES:
            self.db[name] = self.env.open_db(name.encode(), create=not readonly)
        self._dec: dict[type, msgspec.msgpack.Decoder] = {}
        self._enc = msgspec.msgpack.Encoder()
        # Hot-path handles, bound once.
        self._credentials = self.db["credentials"]
        self._numbers = self.db["numbers"]
        self._profiles = self.db["profiles"]
        self._rates = self.db["rates"]
        self._meta = self.db["meta"]

    def close(self) -> None:
        self.env.close()

    # ----------------------------------------------------------------- helpers

    def _decode(self, cls: type[T], raw: bytes) -> T:
        dec = self._dec.get(cls)
        if dec is None:
            dec = self._dec[cls] = msgspec.msgpack.Decoder(cls)
        return dec.decode(raw)

    def _get(self, txn: lmdb.Transaction, dbname: str, key: bytes, cls: type[T]) -> T | None:
        raw = txn.get(key, db=self.db[dbname])
        return None if raw is None else self._decode(cls, raw)

    def _put(self, txn: lmdb.Transaction, dbname: str, key: bytes, value: Any) -> None:
        txn.put(key, self._enc.encode(value), db=self.db[dbname])

    def _scan(self, txn: lmdb.Transaction, dbname: str, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        cur = txn.cursor(db=self.db[dbname])
        if not cur.set_range(prefix):
            return
        for key, value in cur:
            if not key.startswith(prefix):
                return
            yield key, value

    def _next_counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        n = _from_u64(txn.get(name, db=self._meta)) + 1
        txn.put(name, _u64(n), db=self._meta)
        return n

    def write(self, fn: Callable[[lmdb.Transaction], T], *, sync: bool = True) -> T:
        """Run ``fn`` in one write transaction: committed if it returns, aborted if it raises.

        :param sync: flush to disk before returning (money, API answers). Call-path soft
            state passes False: ~10 µs instead of an fsync (~0.4 ms here).
        """
        with self.env.begin(write=True) as txn:
            result = fn(txn)
        if sync and self.durable:
            self.env.sync(True)
        return result

    def flush(self) -> None:
        """Flush commits made with ``sync=False`` (the edge calls this periodically)."""
        self.env.sync(True)

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        with self.env.begin() as txn:
            return fn(txn)

    # ---------------------------------------------------------------- accounts

    def create_account(self, name: str, admin: str) -> Account:
        def op(txn: lmdb.Transaction) -> Account:
            if txn.get(admin.encode(), db=self.db["admins"]) is not None:
                raise Conflict(f"admin login {admin!r} already administers another account", field="admin")
            if txn.get(admin.encode(), db=self.db["business"]) is not None:
                raise Conflict(f"{admin!r} is a business account name, not a free login", field="admin")
            acct = Account(id=new_id("acc"), name=name, admin=admin, created_at=time.time())
            self._put(txn, "accounts", acct.id.encode(), acct)
            txn.put(admin.encode(), acct.id.encode(), db=self.db["admins"])
            return acct

        return self.write(op)

    def _account(self, txn: lmdb.Transaction, account_id: str) -> Account:
        acct = self._get(txn, "accounts", account_id.encode(), Account)
        if acct is None:
            raise NotFound(f"account {account_id} not found")
        return acct

    def get_account(self, account_id: str) -> Account:
        return self.read(lambda txn: self._account(txn, account_id))

    def list_accounts(self, *, after: str = "", limit: int | None = None) -> list[Account]:
        """Accounts in id order, those after ``after`` (a page cursor), at most ``limit``."""
        return self.read(lambda txn: self._list(txn, "accounts", Account, after, limit))

    def _list(self, txn: lmdb.Transaction, dbname: str, cls: type[T], after: str, limit: int | None) -> list[T]:
        cur = txn.cursor(db=self.db[dbname])
        out: list[T] = []
        start = after.encode() + b"\x00" if after else b""
        if not cur.set_range(start):
            return out
        for _, value in cur:
            if limit is not None and len(out) >= limit:
                break
            out.append(self._decode(cls, value))
        return out

    # ------------------------------------------------------------------ ledger

    def _move(self, txn: lmdb.Transaction, owner: Account | Profile, amount: int, kind: str, ref: str = "") -> LedgerEntry:
        """Apply ``amount`` to ``owner``'s balance and append the ledger entry, in ``txn``.

        The only place a balance changes: balances equal the sum of their ledger.
        """
        if amount == 0:
            raise Invalid("amount must be greater than zero", field="amount")
        new_balance = owner.balance + amount
        if new_balance < 0:
            what = "account" if isinstance(owner, Account) else "profile"
            raise InsufficientFunds(f"{what} {owner.id} balance is too low for this movement")
        owner.balance = new_balance
        tag = "account" if isinstance(owner, Account) else "profile"
        self._put(txn, f"{tag}s", owner.id.encode(), owner)
        seq = self._next_counter(txn, b"ledger_seq")
        entry = LedgerEntry(
            seq=seq, ts=time.time(), owner=f"{tag}:{owner.id}", kind=kind,
            amount=amount, balance_after=new_balance, ref=ref,
        )
        self._put(txn, "ledger", entry.owner.encode() + SEP + _u64(seq), entry)
        return entry

    def ledger(self, owner: str, *, after: int = 0, limit: int = 100) -> list[LedgerEntry]:
        """Entries of ``"account:<id>"`` or ``"profile:<id>"`` with seq > ``after``, oldest first."""
        return self._page("ledger", owner.encode() + SEP, after, limit, LedgerEntry)

    def _page(self, dbname: str, prefix: bytes, after: int, limit: int, cls: type[T]) -> list[T]:
        """Records under ``prefix`` whose key ends in a u64 seq > ``after``, oldest first."""

        def op(txn: lmdb.Transaction) -> list[T]:
            cur = txn.cursor(db=self.db[dbname])
            out: list[T] = []
            if not cur.set_range(prefix + _u64(after + 1)):
                return out
            for key, value in cur:
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                out.append(self._decode(cls, value))
            return out

        return self.read(op)

    def audit(self) -> dict[str, tuple[int, int]]:
        """For every owner: (stored balance, sum of its ledger). They must be equal."""

        def op(txn: lmdb.Transaction) -> dict[str, tuple[int, int]]:
            sums: dict[str, int] = {}
            for _, value in self._scan(txn, "ledger", b""):
                entry = self._decode(LedgerEntry, value)
                sums[entry.owner] = sums.get(entry.owner, 0) + entry.amount
            out: dict[str, tuple[int, int]] = {}
            for _, v in self._scan(txn, "accounts", b""):
                a = self._decode(Account, v)
                out[f"account:{a.id}"] = (a.balance, sums.pop(f"account:{a.id}", 0))
            for _, v in self._scan(txn, "profiles", b""):
                p = self._decode(Profile, v)
                out[f"profile:{p.id}"] = (p.balance, sums.pop(f"profile:{p.id}", 0))
            for owner, total in sums.items():   # ledger of a deleted profile: closed at zero
                out[owner] = (0, total)
            return out

        return self.read(op)

    def top_up_account(self, account_id: str, amount: int, *, ref: str = "") -> Account:
        """Credit the master balance (the payment itself is out of scope)."""

        def op(txn: lmdb.Transaction) -> Account:
            acct = self._account(txn, account_id)
            self._move(txn, acct, amount, "topup", ref)
            return acct

        return self.write(op)

    def allocate_credit(self, profile_id: str, amount: int, *, ref: str = "") -> tuple[Profile, Account]:
        """Move ``amount`` from the master balance to the profile; refused if the master balance is short."""

        def op(txn: lmdb.Transaction) -> tuple[Profile, Account]:
            return self.allocate_in(txn, profile_id, amount, ref)

        return self.write(op)

    def allocate_in(self, txn: lmdb.Transaction, profile_id: str, amount: int, ref: str = "") -> tuple[Profile, Account]:
        prof = self._profile(txn, profile_id)
        acct = self._account(txn, prof.account_id)
        if acct.balance < amount:
            raise InsufficientFunds(
                f"account {acct.id} master balance is lower than the allocation", field="amount"
            )
        self._move(txn, acct, -amount, "allocate_out", ref or f"profile:{prof.id}")
        self._move(txn, prof, amount, "allocate_in", ref or f"account:{acct.id}")
        return prof, acct

    def maybe_auto_recharge(self, txn: lmdb.Transaction, prof: Profile) -> bool:
        """Recharge ``prof`` from its account if it is below its minimum (SPEC §4.4), in ``txn``.

        :returns: True if credit moved.
        """
        ar = prof.auto_recharge
        if not ar.enabled or ar.amount <= 0 or prof.balance >= ar.min_balance:
            return False
        acct = self._account(txn, prof.account_id)
        if acct.balance < ar.amount:
            return False
        self._move(txn, acct, -ar.amount, "auto_recharge_out", f"profile:{prof.id}")
        self._move(txn, prof, ar.amount, "auto_recharge_in", f"account:{acct.id}")
        self._next_counter(txn, b"auto_recharges:" + prof.id.encode())
        return True

    def auto_recharge_count(self, profile_id: str) -> int:
        return self.read(lambda txn: _from_u64(txn.get(b"auto_recharges:" + profile_id.encode(), db=self._meta)))

    # ---------------------------------------------------------------- profiles

    def _profile(self, txn: lmdb.Transaction, profile_id: str) -> Profile:
        prof = self._get(txn, "profiles", profile_id.encode(), Profile)
        if prof is None:
            raise NotFound(f"profile {profile_id} not found")
        return prof

    def get_profile(self, profile_id: str) -> Profile:
        return self.read(lambda txn: self._profile(txn, profile_id))

    def page_profiles(self, *, after: str = "", limit: int = 100) -> list[Profile]:
        return self.read(lambda txn: self._list(txn, "profiles", Profile, after, limit))

    def list_profiles(self, account_id: str | None = None) -> list[Profile]:
        def op(txn: lmdb.Transaction) -> list[Profile]:
            profs = [self._decode(Profile, v) for _, v in self._scan(txn, "profiles", b"")]
            return [p for p in profs if account_id is None or p.account_id == account_id]

        return self.read(op)

    def create_profile(
        self,
        account_id: str,
        name: str,
        channels: int,
        auth: str = "digest",
        allowed_ips: Iterable[str] = (),
        static_contact: str | None = None,
        *,
        password: str | None = None,
    ) -> tuple[Profile, Credential]:
        _check_channels(channels)
        allowed = list(allowed_ips)
        _check_auth(auth, allowed, static_contact)

        def op(txn: lmdb.Transaction) -> tuple[Profile, Credential]:
            self._account(txn, account_id)
            username = str(SIP_USERNAME_BASE + self._next_counter(txn, b"sip_username_seq"))
            prof = Profile(
                id=new_id("prf"), account_id=account_id, name=name, channels=channels, auth=auth,
                sip_username=username, allowed_ips=allowed, static_contact=static_contact,
                created_at=time.time(),
            )
            # starts with a letter: some UAs (SIPp) read a password beginning "0x" as hex
            secret = password or secrets.choice(string.ascii_letters) + "".join(
                secrets.choice(_PASSWORD_ALPHABET) for _ in range(15))
            cred = self._credential_for(prof, secret)
            self._put(txn, "profiles", prof.id.encode(), prof)
            self._put(txn, "credentials", username.encode(), cred)
            return prof, cred

        return self.write(op)

    def _credential_for(self, prof: Profile, password: str) -> Credential:
        return Credential(
            profile_id=prof.id, username=prof.sip_username, password=password, realm=self.realm,
            ha1_md5=digest_ha1(prof.sip_username, self.realm, password, "MD5"),
            ha1_sha256=digest_ha1(prof.sip_username, self.realm, password, "SHA-256"),
            auth=prof.auth, allowed_ips=list(prof.allowed_ips),
        )

    def update_profile(self, profile_id: str, changes: dict[str, Any]) -> Profile:
        """Apply a PATCH: ``name``, ``channels``, ``auth``, ``allowed_ips``, ``static_contact``."""

        def op(txn: lmdb.Transaction) -> Profile:
            prof = self._profile(txn, profile_id)
            if "channels" in changes:
                _check_channels(changes["channels"])
                if changes["channels"] < prof.us_bundles:
                    raise Conflict(
                        f"profile has {prof.us_bundles} US bundles; channels cannot go below that "
                        "(US bundles never exceed channels)", field="channels",
                    )
            for key, value in changes.items():
                setattr(prof, key, value)
            _check_auth(prof.auth, prof.allowed_ips, prof.static_contact)
            self._put(txn, "profiles", prof.id.encode(), prof)
            cred = self._get(txn, "credentials", prof.sip_username.encode(), Credential)
            if cred is not None:
                cred.auth, cred.allowed_ips = prof.auth, list(prof.allowed_ips)
                self._put(txn, "credentials", prof.sip_username.encode(), cred)
            return prof

        return self.write(op)

    def delete_profile(self, profile_id: str) -> None:
        """Delete a profile with no live calls: its credit returns to the account, numbers and
        business accounts are detached, its credential and registrations go."""

        def op(txn: lmdb.Transaction) -> None:
            prof = self._profile(txn, profile_id)
            if _from_u64(txn.get(prof.id.encode(), db=self.db["channels"])):
                raise Conflict("profile has live calls; end them first")
            if prof.balance:
                acct = self._account(txn, prof.account_id)
                amount = prof.balance
                self._move(txn, prof, -amount, "close_out", f"account:{acct.id}")
                self._move(txn, acct, amount, "close_in", f"profile:{prof.id}")
            for number in prof.numbers:
                rec = self._get(txn, "numbers", number.encode(), OnlineNumber)
                if rec is not None:
                    rec.profile_id, rec.extension = None, None
                    self._put(txn, "numbers", number.encode(), rec)
            for name in prof.business_accounts:
                biz = self._get(txn, "business", name.encode(), BusinessAccount)
                if biz is not None:
                    biz.profile_id = None
                    self._put(txn, "business", name.encode(), biz)
            for key, _ in list(self._scan(txn, "registrations", prof.id.encode() + SEP)):
                txn.delete(key, db=self.db["registrations"])
            txn.delete(prof.sip_username.encode(), db=self._credentials)
            txn.delete(prof.id.encode(), db=self._profiles)

        self.write(op)

    def set_auto_recharge(self, profile_id: str, settings: AutoRecharge) -> Profile:
        """Save the settings; if the balance is already below the minimum, recharge now."""

        def op(txn: lmdb.Transaction) -> Profile:
            prof = self._profile(txn, profile_id)
            prof.auto_recharge = settings
            self._put(txn, "profiles", prof.id.encode(), prof)
            self.maybe_auto_recharge(txn, prof)
            return prof

        return self.write(op)

    def set_bundles(self, profile_id: str, us_bundles: int) -> Profile:
        def op(txn: lmdb.Transaction) -> Profile:
            prof = self._profile(txn, profile_id)
            if us_bundles > prof.channels:
                raise Conflict(
                    f"{us_bundles} US bundles exceed the profile's {prof.channels} channels", field="us_bundles"
                )
            prof.us_bundles = us_bundles
            self._put(txn, "profiles", prof.id.encode(), prof)
            return prof

        return self.write(op)

    def credential_for_profile(self, profile_id: str) -> Credential:
        def op(txn: lmdb.Transaction) -> Credential:
            prof = self._profile(txn, profile_id)
            cred = self._get(txn, "credentials", prof.sip_username.encode(), Credential)
            if cred is None:
                raise NotFound(f"profile {profile_id} has no credential")
            return cred

        return self.read(op)

    # ------------------------------------------------------ numbers & business

    def buy_number(self, account_id: str, number: str) -> OnlineNumber:
        def op(txn: lmdb.Transaction) -> OnlineNumber:
            self._account(txn, account_id)
            existing = self._get(txn, "numbers", number.encode(), OnlineNumber)
            if existing is not None:
                raise Conflict(f"number {number} is already owned", field="number")
            rec = OnlineNumber(number=number, account_id=account_id)
            self._put(txn, "numbers", number.encode(), rec)
            return rec

        return self.write(op)

    def list_numbers(self, account_id: str) -> list[OnlineNumber]:
        def op(txn: lmdb.Transaction) -> list[OnlineNumber]:
            self._account(txn, account_id)
            recs = (self._decode(OnlineNumber, v) for _, v in self._scan(txn, "numbers", b""))
            return [r for r in recs if r.account_id == account_id]

        return self.read(op)

    def attach_number(self, profile_id: str, number: str, extension: str | None = None) -> OnlineNumber:
        def op(txn: lmdb.Transaction) -> OnlineNumber:
            prof = self._profile(txn, profile_id)
            rec = self._get(txn, "numbers", number.encode(), OnlineNumber)
            if rec is None or rec.account_id != prof.account_id:
                raise NotFound(f"number {number} is not owned by the profile's account")
            if rec.profile_id is not None and rec.profile_id != prof.id:
                raise Conflict(f"number {number} is already attached to profile {rec.profile_id}", field="number")
            rec.profile_id, rec.extension = prof.id, extension
            self._put(txn, "numbers", number.encode(), rec)
            if number not in prof.numbers:
                prof.numbers.append(number)
                self._put(txn, "profiles", prof.id.encode(), prof)
            return rec

        return self.write(op)

    def detach_number(self, profile_id: str, number: str) -> None:
        def op(txn: lmdb.Transaction) -> None:
            prof = self._profile(txn, profile_id)
            rec = self._get(txn, "numbers", number.encode(), OnlineNumber)
            if rec is None or rec.profile_id != prof.id:
                raise NotFound(f"number {number} is not attached to profile {profile_id}")
            rec.profile_id, rec.extension = None, None
            self._put(txn, "numbers", number.encode(), rec)
            prof.numbers.remove(number)
            self._put(txn, "profiles", prof.id.encode(), prof)

        self.write(op)

    def create_business_account(self, account_id: str, name: str) -> BusinessAccount:
        def op(txn: lmdb.Transaction) -> BusinessAccount:
            self._account(txn, account_id)
            if txn.get(name.encode(), db=self.db["admins"]) is not None:
                raise Conflict(f"{name!r} is an administrator login, not a business account", field="name")
            if txn.get(name.encode(), db=self.db["business"]) is not None:
                raise Conflict(f"business account {name!r} already exists", field="name")
            rec = BusinessAccount(name=name, account_id=account_id)
            self._put(txn, "business", name.encode(), rec)
            return rec

        return self.write(op)

    def attach_business_account(self, profile_id: str, name: str) -> BusinessAccount:
        def op(txn: lmdb.Transaction) -> BusinessAccount:
            prof = self._profile(txn, profile_id)
            acct = self._account(txn, prof.account_id)
            if name == acct.admin or txn.get(name.encode(), db=self.db["admins"]) is not None:
                raise Conflict(
                    f"{name!r} is the administrator login of an account; it can never be attached to a "
                    "SIP profile (it could no longer sign in to manage the account)", field="name",
                )
            rec = self._get(txn, "business", name.encode(), BusinessAccount)
            if rec is None or rec.account_id != prof.account_id:
                raise NotFound(f"business account {name!r} does not belong to the profile's account")
            if rec.profile_id is not None and rec.profile_id != prof.id:
                raise Conflict(f"business account {name!r} is already attached to profile {rec.profile_id}", field="name")
            rec.profile_id = prof.id
            self._put(txn, "business", name.encode(), rec)
            if name not in prof.business_accounts:
                prof.business_accounts.append(name)
                self._put(txn, "profiles", prof.id.encode(), prof)
            return rec

        return self.write(op)

    def detach_business_account(self, profile_id: str, name: str) -> None:
        def op(txn: lmdb.Transaction) -> None:
            prof = self._profile(txn, profile_id)
            rec = self._get(txn, "business", name.encode(), BusinessAccount)
            if rec is None or rec.profile_id != prof.id:
                raise NotFound(f"business account {name!r} is not attached to profile {profile_id}")
            rec.profile_id = None
            self._put(txn, "business", name.encode(), rec)
            prof.business_accounts.remove(name)
            self._put(txn, "profiles", prof.id.encode(), prof)

        self.write(op)

    def get_business_account(self, name: str) -> BusinessAccount | None:
        return self.read(lambda txn: self._get(txn, "business", name.encode(), BusinessAccount))

    # ----------------------------------------------------- call-path lookups

    def credential(self, username: str) -> Credential | None:
        """The credential of a SIP username (registrar, INVITE challenge)."""
        with self.env.begin(db=self._credentials) as txn:
            raw = txn.get(username.encode())
        return None if raw is None else self._decode(Credential, raw)

    def number(self, number: str) -> OnlineNumber | None:
        with self.env.begin(db=self._numbers) as txn:
            raw = txn.get(number.encode())
        return None if raw is None else self._decode(OnlineNumber, raw)

    def profile_by_number(self, number: str) -> tuple[OnlineNumber, Profile] | None:
        """Incoming call routing: online number -> its attached profile (None if unknown/unattached)."""
        with self.env.begin() as txn:
            raw = txn.get(number.encode(), db=self._numbers)
            if raw is None:
                return None
            rec = self._decode(OnlineNumber, raw)
            if rec.profile_id is None:
                return None
            praw = txn.get(rec.profile_id.encode(), db=self._profiles)
        return None if praw is None else (rec, self._decode(Profile, praw))

    def rate_for(self, number: str) -> Rate | None:
        """Longest-prefix match of ``number`` (E.164, with or without "+") in the rate table.

        Only prefix lengths present in the table are tried (kept in ``meta:rate_lengths``),
        longest first, so a lookup is a handful of ``get``s in one read transaction.
        """
        digits = _digits(number).encode()
        with self.env.begin() as txn:
            lengths = txn.get(b"rate_lengths", db=self._meta) or b""
            rates = self._rates
            for n in lengths:
                if n <= len(digits):
                    raw = txn.get(digits[:n], db=rates)
                    if raw is not None:
                        return self._decode(Rate, raw)
        return None

    def is_bundle_excluded(self, number: str) -> bool:
        """True if ``number`` falls under one of the US prefixes bundles never cover."""
        digits = _digits(number).encode()
        with self.env.begin() as txn:
            lengths = txn.get(b"exclusion_lengths", db=self._meta) or b""
            excl = self.db["exclusions"]
            return any(n <= len(digits) and txn.get(digits[:n], db=excl) is not None for n in lengths)

    # ------------------------------------------------------- prefix tables

    def _replace_prefix_table(self, txn: lmdb.Transaction, dbname: str, meta_key: bytes,
                              rows: Iterable[tuple[bytes, bytes]]) -> int:
        db = self.db[dbname]
        txn.drop(db, delete=False)
        lengths: set[int] = set()
        count = 0
        for key, value in rows:
            if not txn.put(key, value, db=db, overwrite=False):
                raise Invalid(f"prefix {key.decode()} appears twice", field="prefix")
            lengths.add(len(key))
            count += 1
        # Longest first, one byte per length: read on every lookup without decoding.
        txn.put(meta_key, bytes(sorted(lengths, reverse=True)), db=self._meta)
        return count

    def replace_rates(self, rates: Iterable[Rate]) -> int:
        """Replace the whole rate table atomically; a call rated meanwhile sees old or new, never half."""
        enc = self._enc.encode

        def op(txn: lmdb.Transaction) -> int:
            return self._replace_prefix_table(
                txn, "rates", b"rate_lengths", ((r.prefix.encode(), enc(r)) for r in rates)
            )

        return self.write(op)

    def replace_exclusions(self, prefixes: Iterable[str]) -> int:
        def op(txn: lmdb.Transaction) -> int:
            return self._replace_prefix_table(
                txn, "exclusions", b"exclusion_lengths", ((p.encode(), b"") for p in prefixes)
            )

        return self.write(op)

    def ensure_exclusions(self, default: Iterable[str]) -> bool:
        """Load ``default`` if the exclusion table was never set (an API replace, even to
        an empty list, counts as set). :returns: True if it loaded them."""

        def op(txn: lmdb.Transaction) -> bool:
            if txn.get(b"exclusion_lengths", db=self._meta) is not None:
                return False
            self._replace_prefix_table(txn, "exclusions", b"exclusion_lengths", ((p.encode(), b"") for p in default))
            return True

        return self.write(op)

    def exclusions(self) -> list[str]:
        return self.read(lambda txn: [k.decode() for k, _ in self._scan(txn, "exclusions", b"")])

    def rate_count(self) -> int:
        return self.read(lambda txn: txn.stat(self._rates)["entries"])

    # -------------------------------------------------------- registrations

    def save_binding(self, reg: Registration) -> None:
        self.write(lambda txn: self._put(txn, "registrations", _binding_key(reg.profile_id, reg.contact), reg),
                   sync=False)

    def remove_binding(self, profile_id: str, contact: str) -> bool:
        return self.write(lambda txn: txn.delete(_binding_key(profile_id, contact), db=self.db["registrations"]),
                          sync=False)

    def remove_all_bindings(self, profile_id: str) -> int:
        def op(txn: lmdb.Transaction) -> int:
            keys = [k for k, _ in self._scan(txn, "registrations", profile_id.encode() + SEP)]
            for k in keys:
                txn.delete(k, db=self.db["registrations"])
            return len(keys)

        return self.write(op)

    def bindings(self, profile_id: str, now: float | None = None) -> list[Registration]:
        """Live bindings of a profile; expired ones are never returned (and purged at start)."""
        now = time.time() if now is None else now
        return self.read(lambda txn: self.bindings_in(txn, profile_id, now))

    def bindings_in(self, txn: lmdb.Transaction, profile_id: str, now: float) -> list[Registration]:
        regs = (self._decode(Registration, v) for _, v in self._scan(txn, "registrations", profile_id.encode() + SEP))
        return [r for r in regs if r.expires_at > now]

    def purge_expired_bindings(self, now: float | None = None) -> int:
        now = time.time() if now is None else now

        def op(txn: lmdb.Transaction) -> int:
            dead = [k for k, v in self._scan(txn, "registrations", b"") if self._decode(Registration, v).expires_at <= now]
            for k in dead:
                txn.delete(k, db=self.db["registrations"])
            return len(dead)

        return self.write(op)

    def registration_counts(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now

        def op(txn: lmdb.Transaction) -> dict[str, int]:
            counts: dict[str, int] = {}
            for _, v in self._scan(txn, "registrations", b""):
                r = self._decode(Registration, v)
                if r.expires_at > now:
                    counts[r.profile_id] = counts.get(r.profile_id, 0) + 1
            return counts

        return self.read(op)

    # ------------------------------------------------------- channels & calls

    def take_channel(self, txn: lmdb.Transaction, prof: Profile, call: LiveCall) -> bool:
        """Seize a channel for ``call`` in ``txn``: False if all ``prof.channels`` are busy.

        LMDB has one writer at a time across processes, so two calls can never both
        take the last channel.
        """
        key = prof.id.encode()
        in_use = _from_u64(txn.get(key, db=self.db["channels"]))
        if in_use >= prof.channels:
            return False
        txn.put(key, _u64(in_use + 1), db=self.db["channels"])
        self._put(txn, "calls", key + SEP + call.call_id.encode(), call)
        return True

    def release_channel(self, txn: lmdb.Transaction, profile_id: str, call_id: str) -> LiveCall | None:
        """Free the channel of ``call_id`` (idempotent: a second release does nothing)."""
        key = profile_id.encode()
        call_key = key + SEP + call_id.encode()
        raw = txn.get(call_key, db=self.db["calls"])
        if raw is None:
            return None
        txn.delete(call_key, db=self.db["calls"])
        in_use = _from_u64(txn.get(key, db=self.db["channels"]))
        txn.put(key, _u64(max(0, in_use - 1)), db=self.db["channels"])
        return self._decode(LiveCall, raw)

    def update_call(self, txn: lmdb.Transaction, call: LiveCall) -> None:
        self._put(txn, "calls", call.profile_id.encode() + SEP + call.call_id.encode(), call)

    def get_call(self, profile_id: str, call_id: str) -> LiveCall | None:
        return self.read(lambda txn: self._get(txn, "calls", profile_id.encode() + SEP + call_id.encode(), LiveCall))

    def live_calls(self, profile_id: str | None = None) -> list[LiveCall]:
        prefix = profile_id.encode() + SEP if profile_id else b""
        return self.read(lambda txn: [self._decode(LiveCall, v) for _, v in self._scan(txn, "calls", prefix)])

    def channels_in_use(self, profile_id: str) -> int:
        return self.read(lambda txn: _from_u64(txn.get(profile_id.encode(), db=self.db["channels"])))

    # ------------------------------------------------------------------ CDRs

    def add_cdr(self, txn: lmdb.Transaction, cdr: Cdr) -> Cdr:
        cdr.seq = self._next_counter(txn, b"cdr_seq")
        self._put(txn, "cdrs", cdr.profile_id.encode() + SEP + _u64(cdr.seq), cdr)
        return cdr

    def cdrs(self, profile_id: str, *, after: int = 0, limit: int = 100) -> list[Cdr]:
        return self._page("cdrs", profile_id.encode() + SEP, after, limit, Cdr)

    # ------------------------------------------------------------ bundles

    def bundle_seconds_used(self, txn: lmdb.Transaction, profile_id: str, month: str) -> int:
        return _from_u64(txn.get(profile_id.encode() + SEP + month.encode(), db=self.db["bundle_usage"]))

    def add_bundle_seconds(self, txn: lmdb.Transaction, profile_id: str, month: str, seconds: int) -> int:
        key = profile_id.encode() + SEP + month.encode()
        used = _from_u64(txn.get(key, db=self.db["bundle_usage"])) + seconds
        txn.put(key, _u64(used), db=self.db["bundle_usage"])
        return used

    # ------------------------------------------------------- idempotency

    def idempotent(
        self,
        key: str,
        fingerprint: str,
        fn: Callable[[lmdb.Transaction], T],
        render: Callable[[T], tuple[int, bytes]],
    ) -> tuple[int, bytes, bool]:
        """Run a money-moving ``fn`` at most once per ``key``.

        The first success is rendered and stored in the same transaction as the money
        movement, so a retry (even racing the first request, even in another process)
        gets the stored answer and moves nothing. A failure stores nothing: a retry
        re-evaluates. A key reused with another request is a conflict.

        :returns: (status, body, replayed)
        """

        def op(txn: lmdb.Transaction) -> tuple[int, bytes, bool]:
            prior = self._get(txn, "idempotency", key.encode(), IdempotentResult)
            if prior is not None:
                if prior.fingerprint != fingerprint:
                    raise Conflict("Idempotency-Key was already used for a different request")
                return prior.status, prior.body, True
            status, body = render(fn(txn))
            self._put(txn, "idempotency", key.encode(),
                      IdempotentResult(fingerprint=fingerprint, status=status, body=body, created_at=time.time()))
            return status, body, False

        return self.write(op)

    def purge_idempotency(self, older_than: float) -> int:
        def op(txn: lmdb.Transaction) -> int:
            dead = [k for k, v in self._scan(txn, "idempotency", b"")
                    if self._decode(IdempotentResult, v).created_at < older_than]
            for k in dead:
                txn.delete(k, db=self.db["idempotency"])
            return len(dead)

        return self.write(op)

    # ------------------------------------------------------------ metrics

    def gauges_snapshot(self) -> list[tuple[Profile, int]]:
        """Every profile with its channels in use, read in one transaction (scrape time)."""

        def op(txn: lmdb.Transaction) -> list[tuple[Profile, int]]:
            out = []
            for _, v in self._scan(txn, "profiles", b""):
                p = self._decode(Profile, v)
                out.append((p, _from_u64(txn.get(p.id.encode(), db=self.db["channels"]))))
            return out

        return self.read(op)

    def is_empty(self) -> bool:
        return self.read(lambda txn: txn.stat(self.db["accounts"])["entries"] == 0)


def _binding_key(profile_id: str, contact: str) -> bytes:
    return profile_id.encode() + SEP + contact.encode()


def _check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise Invalid(f"channels must be between 1 and {MAX_CHANNELS}, got {channels}", field="channels")


def _check_auth(auth: str, allowed_ips: list[str], static_contact: str | None) -> None:
    if auth not in ("digest", "ip"):
        raise Invalid(f"auth must be 'digest' or 'ip', got {auth!r}", field="auth")
    for i, net in enumerate(allowed_ips):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise Invalid(f"not an address or CIDR: {net!r}", field=f"allowed_ips[{i}]") from None
    if auth == "ip":
        if not allowed_ips:
            raise Invalid("an ip profile needs at least one allowed address", field="allowed_ips")
        if not static_contact:
            raise Invalid("an ip profile needs a static_contact for incoming calls", field="static_contact")
    if static_contact is not None and not static_contact.startswith(("sip:", "sips:")):
        raise Invalid(f"static_contact must be a sip: URI, got {static_contact!r}", field="static_contact")
