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
    credit_low: bool = False        # below auto_recharge.min_balance since the last credit.low event


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
    carrier: str = ""               # outgoing: the carrier that carried (or last tried) the call
    transport: dict[str, str] = {}  # per leg by side ("customer", "carrier"): "udp" | "tcp" | "tls"
    srtp: dict[str, str] = {}       # per side ("customer", "carrier"): SRTP suite of its leg, "rtp" = plain
    worker: int = 0                 # the SIP worker that carries it (its recovery settles it after a crash)
    # Records of older builds may also carry rate_prefix and owner_pid: ignored when decoded.


class RemoteCall(Record):
    """A live call another cluster node carries, as this node knows it (edge/cluster/remote.py)."""

    node: str                       # the carrying node's name
    call: LiveCall                  # its published record once answered, else what its journal reservation says


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
    account_id: str = ""            # the profile's account at settlement ("" in CDRs of older builds)
    carrier: str = ""               # outgoing calls: the carrier URI ("" incoming, echo, older builds)
    transport: dict[str, str] = {}  # per leg by side ("customer", "carrier"): "udp" | "tcp" | "tls"
    srtp: dict[str, str] = {}       # per side: SRTP suite of its leg, "rtp" = plain ({} before media was set up)


class IdempotentResult(Record):
    """A money-moving POST's first answer, replayed for a retry with the same key."""

    fingerprint: str                # method, path and body hash: a reused key with another body is a conflict
    status: int
    body: bytes
    created_at: float


class ApiKey(Record):
    """A control-API key (SPEC §5.2). Only a hash of its secret is stored: the key is shown once."""

    id: str                         # key_<16 hex>; the public half of the key
    name: str
    scope: Literal["admin", "account", "metrics"]
    account_id: str | None = None   # scope "account": the only account it sees
    read_only: bool = False
    salt: bytes = b""
    digest: bytes = b""             # HMAC-SHA256(salt, secret)
    created_at: float = 0.0
    last_used_at: float | None = None
    revoked_at: float | None = None
    rate_limit: float | None = None  # requests per second (None: the node's [api] key_rate_limit)


class AuditEntry(Record):
    """One control-API write: who, what, when, from where, and how it ended."""

    seq: int
    ts: float
    key_id: str                     # "bootstrap" for the configured admin token
    method: str
    path: str
    status: int
    source: str                     # client address
    account_id: str | None = None   # the account the request touched, when known
    request_id: str = ""


class Webhook(Record):
    """An account's webhook endpoint (SPEC §5.3)."""

    id: str                         # whk_<16 hex>
    account_id: str
    url: str
    events: list[str]
    secret: str                     # HMAC key of Sipedge-Signature (the account chose or got it)
    created_at: float = 0.0
    description: str = ""


class OutboxEvent(Record):
    """A webhook event in the durable outbox, written in the transaction of its cause."""

    seq: int                        # outbox order (global, increasing)
    id: str                         # evt_<...>: stable across retries
    type: str
    account_id: str
    order_key: str                  # events of one key (a call, a profile) are delivered in seq order
    webhooks: list[str]             # the subscribed endpoints when it was written
    created_at: float
    body: bytes                     # the JSON POSTed, fixed at creation (retries send the same bytes)


class DeliveryAttempt(Record):
    at: float
    status: int                     # HTTP status, 0 when no answer (connect error, timeout)
    error: str = ""
    duration_ms: float = 0.0


class Delivery(Record):
    """The delivery of one event to one endpoint, with its attempts (the delivery log)."""

    event_seq: int
    event_id: str
    event_type: str
    webhook_id: str
    state: Literal["pending", "delivered", "failed"] = "pending"
    attempts: list[DeliveryAttempt] = []
    next_attempt_at: float = 0.0
    created_at: float = 0.0
    delivered_at: float | None = None


class HangupRequest(Record):
    """An operator's request to end a live call, picked up by the process that owns the call."""

    id: str                         # hup_<16 hex>
    call_id: str
    profile_id: str
    account_id: str
    cause: int = 487                # the Reason header's cause
    requested_at: float = 0.0
    key_id: str = ""
    state: Literal["pending", "done", "gone"] = "pending"
    done_at: float | None = None


ENCODER = msgspec.msgpack.Encoder()
