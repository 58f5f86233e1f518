"""Stored records. Each is a msgspec Struct encoded as MessagePack in one LMDB database.

Money fields are integer micro-units (see ``money.py``); times are Unix seconds (float).
``docs/storage.md`` lists the key of each record. Fields are added with defaults so that
records written by an older build still decode.
"""

from __future__ import annotations

from typing import Literal

import msgspec

AuthMode = Literal["digest", "ip"]
Direction = Literal["outgoing", "incoming"]


class Record(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """Base of every stored record (unknown fields tolerated: a newer writer may add some)."""


class Account(Record):
    id: str
    name: str
    admin: str                      # the Skype-Manager-style administrator login; never attachable
    balance: int = 0                # master balance, micro-units
    created_at: float = 0.0


class AutoRecharge(Record):
    enabled: bool = False
    amount: int = 0                 # moved from the master balance at each recharge
    min_balance: int = 0            # recharge when the profile balance falls below this


class Profile(Record):
    id: str
    account_id: str
    name: str
    channels: int
    auth: AuthMode
    sip_username: str
    allowed_ips: list[str] = []
    static_contact: str | None = None
    balance: int = 0                # allocated credit, micro-units
    auto_recharge: AutoRecharge = msgspec.field(default_factory=AutoRecharge)
    us_bundles: int = 0
    numbers: list[str] = []
    business_accounts: list[str] = []
    created_at: float = 0.0


class Credential(Record):
    """Keyed by SIP username: what the registrar and the INVITE challenge need, in one read."""

    profile_id: str
    username: str
    password: str                   # retrievable: the seed's "Authentication details" page shows it
    realm: str
    ha1_md5: str                    # MD5(username:realm:password), RFC 2617
    ha1_sha256: str                 # SHA-256(username:realm:password), RFC 7616
    auth: AuthMode = "digest"
    allowed_ips: list[str] = []


class OnlineNumber(Record):
    number: str                     # E.164 with "+"
    account_id: str
    profile_id: str | None = None
    extension: str | None = None    # the extension tag sent as Request-URI user, if set


class BusinessAccount(Record):
    name: str
    account_id: str
    profile_id: str | None = None   # while set, the account cannot sign in elsewhere


class Rate(Record):
    prefix: str                     # E.164 digits without "+"
    rate: int                       # micro-units per minute
    connect_fee: int = 0
    min_seconds: int = 0
    increment_seconds: int = 1
    description: str = ""


class Registration(Record):
    profile_id: str
    contact: str                    # the Contact URI as the PBX sent it
    expires_at: float
    source: str = ""                # "udp:1.2.3.4:5060" where the REGISTER came from (NAT)
    call_id: str = ""
    cseq: int = 0
    user_agent: str = ""
    registered_at: float = 0.0


class LedgerEntry(Record):
    seq: int                        # global, strictly increasing
    ts: float
    owner: str                      # "account:<id>" or "profile:<id>"
    kind: str                       # topup, allocate_out, allocate_in, auto_recharge_out, auto_recharge_in,
                                    # reserve, release, ...
    amount: int                     # signed micro-units applied to the owner's balance
    balance_after: int
    ref: str = ""                   # call id, counterparty, idempotency key


class LiveCall(Record):
    call_id: str                    # the edge's id for the call (ties both legs)
    profile_id: str
    direction: Direction
    started_at: float
    caller: str = ""
    callee: str = ""
    answered_at: float | None = None
    reserved: int = 0               # credit held for the call, micro-units
    funded_until: float | None = None
    bundle_seconds_reserved: int = 0
    funding: str = ""               # "free" (echo), "credit", "bundle"; "" for incoming calls
    rate: Rate | None = None        # the rate the call is billed at, fixed when funded (recovery bills at it)
    legs: list[dict[str, str]] = [] # how to reach each leg with a BYE after a restart
    # Records of older builds may also carry rate_prefix and owner_pid: ignored when decoded.


class Cdr(Record):
    seq: int
    call_id: str
    profile_id: str
    direction: Direction
    caller: str
    callee: str
    started_at: float
    answered_at: float | None
    ended_at: float
    duration: int                   # billed seconds of talk time
    status: int                     # final SIP status (200 for answered calls)
    end_reason: str                 # caller_bye, callee_bye, cancel, credit_exhausted, rtp_timeout, max_duration,
                                    # recovery, rejected
    cost: int = 0
    bundle_seconds: int = 0
    rate_prefix: str | None = None
    media: dict[str, int] = {}


class IdempotentResult(Record):
    """A money-moving POST's first answer, replayed for a retry with the same key."""

    fingerprint: str                # method, path and body hash: a reused key with another body is a conflict
    status: int
    body: bytes
    created_at: float


ENCODER = msgspec.msgpack.Encoder()
