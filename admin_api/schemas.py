"""Request and response bodies of the control API (SPEC §5). Field names are a contract.

Requests forbid unknown fields, so a typo in a provisioning script is a 422 that
names the field rather than a silently ignored setting.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from edge.control.cdrs import MEDIA_FIELDS
from edge.control.console_auth import PASSWORD_MAX
from edge.control.models import (
    Account,
    ApiKey,
    AuditEntry,
    Cdr,
    Credential,
    Delivery,
    HangupRequest,
    LedgerEntry,
    LiveCall,
    OnlineNumber,
    Profile,
    Rate,
    Registration,
    Webhook,
)
from edge.control.money import Money, format_money
from edge.control.times import maybe_datetime, to_datetime

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
Login = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
Channels = Annotated[int, msgspec.Meta(ge=1, le=300, description="1..300 channels (SPEC §3)")]
E164 = Annotated[str, msgspec.Meta(pattern=r"^\+[1-9][0-9]{6,14}$", examples=["+14155550100"],
                                   description="E.164 with a leading +; must be a valid number (phonenumbers)")]
Extension = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._-]+$")]
SipUri = Annotated[str, msgspec.Meta(pattern=r"^sips?:\S+$", max_length=256)]
Cidr = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


Url = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/?#]+[^\s]*$", max_length=2048,
                                  examples=["https://provisioning.example.com/sipedge/events"])]
EventName = Literal["call.started", "call.ended", "credit.low", "auto_recharge.succeeded", "auto_recharge.failed",
                    "channels.exhausted"]


# ------------------------------------------------------------------ requests

class AccountCreate(Body):
    name: Name
    admin: Login


class CreditRequest(Body):
    amount: Money


class ProfileCreate(Body):
    name: Name
    channels: Channels
    auth: Literal["digest", "ip"] = "digest"
    allowed_ips: list[Cidr] = []
    static_contact: SipUri | None = None


class ProfilePatch(Body):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    channels: Channels | msgspec.UnsetType = msgspec.UNSET
    auth: Literal["digest", "ip"] | msgspec.UnsetType = msgspec.UNSET
    allowed_ips: list[Cidr] | msgspec.UnsetType = msgspec.UNSET
    static_contact: SipUri | None | msgspec.UnsetType = msgspec.UNSET


class AutoRechargeRequest(Body):
    enabled: bool
    amount: Money = "0"
    min_balance: Money = "0"


class BundlesRequest(Body):
    us_bundles: Annotated[int, msgspec.Meta(ge=0, le=300)]


class NumberBuy(Body):
    number: E164


class NumberAttach(Body):
    number: E164
    extension: Extension | None = None


class BusinessAccountRequest(Body):
    name: Login


class RateIn(Body):
    prefix: Annotated[str, msgspec.Meta(pattern=r"^\+?[0-9]{1,15}$")]
    rate: Money
    connect_fee: Money = "0"
    min_seconds: Annotated[int, msgspec.Meta(ge=0, le=86400)] = 0
    increment_seconds: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 1
    description: Annotated[str, msgspec.Meta(max_length=128)] = ""


class RatesPut(Body):
    rates: list[RateIn]


class ExclusionsPut(Body):
    prefixes: list[Annotated[str, msgspec.Meta(pattern=r"^1[0-9]{1,14}$", description="E.164 digits, country code 1")]]


class ApiKeyCreate(Body):
    scope: Literal["admin", "account", "metrics"]
    name: Name = "key"
    account_id: str | None = None          # scope "account": the account the key sees
    read_only: bool = False
    rate_limit: Annotated[float, msgspec.Meta(gt=0, le=100000)] | None = None   # requests/s (default: the node's)


class WebhookCreate(Body):
    url: Url
    events: Annotated[list[EventName], msgspec.Meta(min_length=1, max_length=6)]
    secret: Annotated[str, msgspec.Meta(min_length=16, max_length=128, pattern=r"^[\x21-\x7e]+$")] | None = None
    description: Annotated[str, msgspec.Meta(max_length=256)] = ""


class HangupCreate(Body):
    cause: Annotated[int, msgspec.Meta(ge=200, le=699, description="the Reason header's SIP cause")] = 487


class AdminPassword(Body):
    """``PUT /v1/accounts/{id}/admin-password``: how strong it must be is ``console_auth.check_password``."""

    password: Annotated[str, msgspec.Meta(max_length=PASSWORD_MAX)]


# ----------------------------------------------------------------- responses

class Out(msgspec.Struct, kw_only=True):
    pass


class AccountOut(Out):
    id: str
    name: str
    admin: str
    balance: str
    created_at: datetime

    @classmethod
    def of(cls, a: Account) -> AccountOut:
        return cls(id=a.id, name=a.name, admin=a.admin, balance=format_money(a.balance),
                   created_at=to_datetime(a.created_at))


class AutoRechargeOut(Out):
    enabled: bool
    amount: str
    min_balance: str


class ProfileOut(Out):
    """A profile as every GET shows it: without its SIP password (``GET .../credentials``)."""

    id: str
    account_id: str
    name: str
    channels: int
    channels_in_use: int
    auth: str
    sip_username: str
    registrar: str
    balance: str
    allowed_ips: list[str]
    static_contact: str | None
    auto_recharge: AutoRechargeOut
    us_bundles: int
    numbers: list[str]
    business_accounts: list[str]
    created_at: datetime

    @classmethod
    def fields_of(cls, p: Profile, registrar: str, in_use: int) -> dict[str, Any]:
        ar = p.auto_recharge
        return dict(
            id=p.id, account_id=p.account_id, name=p.name, channels=p.channels, channels_in_use=in_use,
            auth=p.auth, sip_username=p.sip_username, registrar=registrar, balance=format_money(p.balance),
            allowed_ips=p.allowed_ips, static_contact=p.static_contact,
            auto_recharge=AutoRechargeOut(enabled=ar.enabled, amount=format_money(ar.amount),
                                          min_balance=format_money(ar.min_balance)),
            us_bundles=p.us_bundles, numbers=p.numbers, business_accounts=p.business_accounts,
            created_at=to_datetime(p.created_at),
        )

    @classmethod
    def of(cls, p: Profile, registrar: str, in_use: int = 0) -> ProfileOut:
        return cls(**cls.fields_of(p, registrar, in_use))


class ProfileCreated(ProfileOut):
    """The answer to a profile's creation: the one ordinary answer with its SIP password."""

    sip_password: str

    @classmethod
    def created(cls, p: Profile, cred: Credential, registrar: str) -> ProfileCreated:
        return cls(**cls.fields_of(p, registrar, 0), sip_password=cred.password)


class CredentialsOut(Out):
    """What a PBX needs to register (SPEC §5.5): only from ``.../credentials`` and its rotation."""

    profile_id: str
    sip_username: str
    sip_password: str
    registrar: str
    realm: str
    auth: str

    @classmethod
    def of(cls, cred: Credential, registrar: str) -> CredentialsOut:
        return cls(profile_id=cred.profile_id, sip_username=cred.username, sip_password=cred.password,
                   registrar=registrar, realm=cred.realm, auth=cred.auth)


class ProfileCreditOut(Out):
    profile_id: str
    account_id: str
    balance: str
    account_balance: str


class NumberOut(Out):
    number: str
    account_id: str
    profile_id: str | None
    extension: str | None

    @classmethod
    def of(cls, n: OnlineNumber) -> NumberOut:
        return cls(number=n.number, account_id=n.account_id, profile_id=n.profile_id, extension=n.extension)


class BusinessAccountOut(Out):
    name: str
    account_id: str
    profile_id: str | None
    can_sign_in: bool               # False while attached to a profile (the seed's rule)


class RateOut(Out):
    prefix: str
    rate: str
    connect_fee: str
    min_seconds: int
    increment_seconds: int
    description: str

    @classmethod
    def of(cls, r: Rate) -> RateOut:
        return cls(prefix=r.prefix, rate=format_money(r.rate), connect_fee=format_money(r.connect_fee),
                   min_seconds=r.min_seconds, increment_seconds=r.increment_seconds, description=r.description)


class LoadedOut(Out):
    loaded: int


class PrefixesOut(Out):
    prefixes: list[str]


class HealthOut(Out):
    status: str
    version: str
    store: str


class LedgerEntryOut(Out):
    seq: int
    ts: datetime
    kind: str
    amount: str
    balance_after: str
    ref: str

    @classmethod
    def of(cls, e: LedgerEntry) -> LedgerEntryOut:
        return cls(seq=e.seq, ts=to_datetime(e.ts), kind=e.kind, amount=format_money(e.amount),
                   balance_after=format_money(e.balance_after), ref=e.ref)


class RegistrationOut(Out):
    profile_id: str
    contact: str
    expires_in: int
    expires_at: datetime
    source: str
    user_agent: str

    @classmethod
    def of(cls, r: Registration, now: float) -> RegistrationOut:
        return cls(profile_id=r.profile_id, contact=r.contact, expires_in=max(0, int(r.expires_at - now)),
                   expires_at=to_datetime(r.expires_at), source=r.source, user_agent=r.user_agent)


class LiveCallOut(Out):
    call_id: str
    profile_id: str
    direction: str
    caller: str
    callee: str
    started_at: datetime
    answered_at: datetime | None
    reserved: str
    transport: dict[str, str]       # per leg by side, once answered: {"customer": "tls", "carrier": "udp"}
    srtp: dict[str, str] = {}   # per side ("customer", "carrier"): SRTP suite of its leg, "rtp" = plain; set at answer
    node: str = ""              # a cluster's: the node that carries it ("" on a node alone)

    @classmethod
    def of(cls, c: LiveCall, node: str = "") -> LiveCallOut:
        return cls(call_id=c.call_id, profile_id=c.profile_id, direction=c.direction, caller=c.caller,
                   callee=c.callee, started_at=to_datetime(c.started_at), answered_at=maybe_datetime(c.answered_at),
                   reserved=format_money(c.reserved), transport=dict(c.transport), srtp=dict(c.srtp), node=node)


class MediaStats(Out):
    a_packets: int = 0
    a_bytes: int = 0
    a_lost: int = 0
    a_dropped: int = 0
    a_jitter_us: int = 0
    b_packets: int = 0
    b_bytes: int = 0
    b_lost: int = 0
    b_dropped: int = 0
    b_jitter_us: int = 0


class CdrOut(Out):
    seq: int
    call_id: str
    account_id: str
    profile_id: str
    direction: str
    caller: str
    callee: str
    carrier: str
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime
    setup_seconds: float | None
    talk_seconds: float
    duration: int
    status: int
    end_reason: str
    cost: str
    bundle_seconds: int
    rate_prefix: str | None
    media: MediaStats | None
    transport: dict[str, str]       # per leg by side: {"customer": "tls", "carrier": "udp"} ({} before this build)
    srtp: dict[str, str] = {}   # per side: SRTP suite of its leg, "rtp" = plain (never a key)

    @classmethod
    def of(cls, c: Cdr) -> CdrOut:
        answered = c.answered_at
        return cls(seq=c.seq, call_id=c.call_id, account_id=c.account_id, profile_id=c.profile_id,
                   direction=c.direction, caller=c.caller, callee=c.callee, carrier=c.carrier,
                   started_at=to_datetime(c.started_at), answered_at=maybe_datetime(answered),
                   ended_at=to_datetime(c.ended_at),
                   setup_seconds=round(answered - c.started_at, 3) if answered is not None else None,
                   talk_seconds=round(max(0.0, c.ended_at - answered), 3) if answered is not None else 0.0,
                   duration=c.duration, status=c.status, end_reason=c.end_reason, cost=format_money(c.cost),
                   bundle_seconds=c.bundle_seconds, rate_prefix=c.rate_prefix,
                   media=MediaStats(**{f: c.media.get(f, 0) for f in MEDIA_FIELDS}) if c.media else None,
                   transport=dict(c.transport), srtp=dict(c.srtp))


class ApiKeyOut(Out):
    id: str
    name: str
    scope: str
    account_id: str | None
    read_only: bool
    rate_limit: float | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, k: ApiKey) -> ApiKeyOut:
        return cls(id=k.id, name=k.name, scope=k.scope, account_id=k.account_id, read_only=k.read_only,
                   rate_limit=k.rate_limit, created_at=to_datetime(k.created_at),
                   last_used_at=maybe_datetime(k.last_used_at), revoked_at=maybe_datetime(k.revoked_at))


class ApiKeyCreated(ApiKeyOut):
    key: str                        # shown once: only its hash is stored

    @classmethod
    def created(cls, k: ApiKey, token: str) -> ApiKeyCreated:
        base = ApiKeyOut.of(k)
        return cls(key=token, **{f: getattr(base, f) for f in ApiKeyOut.__struct_fields__})


class AuditOut(Out):
    seq: int
    ts: datetime
    key_id: str
    method: str
    path: str
    status: int
    source: str
    account_id: str | None
    request_id: str

    @classmethod
    def of(cls, e: AuditEntry) -> AuditOut:
        return cls(seq=e.seq, ts=to_datetime(e.ts), key_id=e.key_id, method=e.method, path=e.path, status=e.status,
                   source=e.source, account_id=e.account_id, request_id=e.request_id)


class WebhookOut(Out):
    id: str
    account_id: str
    url: str
    events: list[str]
    description: str
    created_at: datetime

    @classmethod
    def of(cls, w: Webhook) -> WebhookOut:
        return cls(id=w.id, account_id=w.account_id, url=w.url, events=w.events, description=w.description,
                   created_at=to_datetime(w.created_at))


class WebhookCreated(WebhookOut):
    secret: str                     # the HMAC key of Sipedge-Signature: shown at creation only

    @classmethod
    def created(cls, w: Webhook) -> WebhookCreated:
        base = WebhookOut.of(w)
        return cls(secret=w.secret, **{f: getattr(base, f) for f in WebhookOut.__struct_fields__})


class AttemptOut(Out):
    at: datetime
    status: int
    error: str
    duration_ms: float


class DeliveryOut(Out):
    event_seq: int
    event_id: str
    event_type: str
    webhook_id: str
    state: str
    attempts: list[AttemptOut]
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, d: Delivery) -> DeliveryOut:
        return cls(event_seq=d.event_seq, event_id=d.event_id, event_type=d.event_type, webhook_id=d.webhook_id,
                   state=d.state, attempts=[AttemptOut(at=to_datetime(a.at), status=a.status, error=a.error,
                                                       duration_ms=a.duration_ms) for a in d.attempts],
                   next_attempt_at=to_datetime(d.next_attempt_at) if d.state == "pending" else None,
                   created_at=to_datetime(d.created_at), delivered_at=maybe_datetime(d.delivered_at))


class HangupOut(Out):
    id: str
    call_id: str
    profile_id: str
    state: str
    requested_at: datetime

    @classmethod
    def of(cls, r: HangupRequest) -> HangupOut:
        return cls(id=r.id, call_id=r.call_id, profile_id=r.profile_id, state=r.state,
                   requested_at=to_datetime(r.requested_at))


# ---------------------------------------------------------------- pages
# One page type per item type, so the OpenAPI document types the items (issue 14).

class _Seq(Out):
    next_after: int | None          # pass as ?after= for the next page; null at the end


class _Key(Out):
    next_after: str | None          # pass as ?after= for the next page; null at the end


class AccountPage(_Key):
    items: list[AccountOut]


class ProfilePage(_Key):
    items: list[ProfileOut]


class ApiKeyPage(_Key):
    items: list[ApiKeyOut]


class LedgerPage(_Seq):
    items: list[LedgerEntryOut]


class CdrPage(_Seq):
    items: list[CdrOut]


class AuditPage(_Seq):
    items: list[AuditOut]


class DeliveryPage(_Seq):
    items: list[DeliveryOut]


class LiveCallPage(_Key):
    items: list[LiveCallOut]


class RegistrationPage(_Key):
    items: list[RegistrationOut]
