"""Request and response bodies of the control API (SPEC §5). Field names are a contract.

Requests forbid unknown fields, so a typo in a provisioning script is a 422 that
names the field rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from edge.control.models import (
    Account,
    Cdr,
    Credential,
    LedgerEntry,
    LiveCall,
    OnlineNumber,
    Profile,
    Rate,
    Registration,
)
from edge.control.money import Money, format_money

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")]
Login = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
Channels = Annotated[int, msgspec.Meta(ge=1, le=300, description="1..300 channels (SPEC §3)")]
E164 = Annotated[str, msgspec.Meta(pattern=r"^\+[1-9][0-9]{6,14}$", description="E.164 with a leading +")]
Extension = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._-]+$")]
SipUri = Annotated[str, msgspec.Meta(pattern=r"^sips?:\S+$", max_length=256)]
Cidr = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


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


# ----------------------------------------------------------------- responses

class Out(msgspec.Struct, kw_only=True):
    pass


class AccountOut(Out):
    id: str
    name: str
    admin: str
    balance: str
    created_at: float

    @classmethod
    def of(cls, a: Account) -> AccountOut:
        return cls(id=a.id, name=a.name, admin=a.admin, balance=format_money(a.balance), created_at=a.created_at)


class AutoRechargeOut(Out):
    enabled: bool
    amount: str
    min_balance: str


class ProfileOut(Out):
    id: str
    account_id: str
    name: str
    channels: int
    channels_in_use: int
    auth: str
    sip_username: str
    sip_password: str
    registrar: str
    balance: str
    allowed_ips: list[str]
    static_contact: str | None
    auto_recharge: AutoRechargeOut
    us_bundles: int
    numbers: list[str]
    business_accounts: list[str]
    created_at: float

    @classmethod
    def of(cls, p: Profile, cred: Credential | None, registrar: str, in_use: int = 0) -> ProfileOut:
        ar = p.auto_recharge
        return cls(
            id=p.id, account_id=p.account_id, name=p.name, channels=p.channels, channels_in_use=in_use,
            auth=p.auth, sip_username=p.sip_username, sip_password=cred.password if cred else "",
            registrar=registrar, balance=format_money(p.balance), allowed_ips=p.allowed_ips,
            static_contact=p.static_contact,
            auto_recharge=AutoRechargeOut(enabled=ar.enabled, amount=format_money(ar.amount),
                                          min_balance=format_money(ar.min_balance)),
            us_bundles=p.us_bundles, numbers=p.numbers, business_accounts=p.business_accounts,
            created_at=p.created_at,
        )


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


class LedgerEntryOut(Out):
    seq: int
    ts: float
    kind: str
    amount: str
    balance_after: str
    ref: str

    @classmethod
    def of(cls, e: LedgerEntry) -> LedgerEntryOut:
        return cls(seq=e.seq, ts=e.ts, kind=e.kind, amount=format_money(e.amount),
                   balance_after=format_money(e.balance_after), ref=e.ref)


class Page(Out):
    items: list
    next_after: int | None          # pass as ?after= for the next page; null at the end


class RegistrationOut(Out):
    contact: str
    expires_in: int
    source: str
    user_agent: str

    @classmethod
    def of(cls, r: Registration, now: float) -> RegistrationOut:
        return cls(contact=r.contact, expires_in=max(0, int(r.expires_at - now)), source=r.source,
                   user_agent=r.user_agent)


class LiveCallOut(Out):
    call_id: str
    direction: str
    caller: str
    callee: str
    started_at: float
    answered_at: float | None
    reserved: str

    @classmethod
    def of(cls, c: LiveCall) -> LiveCallOut:
        return cls(call_id=c.call_id, direction=c.direction, caller=c.caller, callee=c.callee,
                   started_at=c.started_at, answered_at=c.answered_at, reserved=format_money(c.reserved))


class CdrOut(Out):
    seq: int
    call_id: str
    direction: str
    caller: str
    callee: str
    started_at: float
    answered_at: float | None
    ended_at: float
    duration: int
    status: int
    end_reason: str
    cost: str
    bundle_seconds: int
    rate_prefix: str | None
    media: dict[str, int]

    @classmethod
    def of(cls, c: Cdr) -> CdrOut:
        return cls(seq=c.seq, call_id=c.call_id, direction=c.direction, caller=c.caller, callee=c.callee,
                   started_at=c.started_at, answered_at=c.answered_at, ended_at=c.ended_at,
                   duration=c.duration, status=c.status, end_reason=c.end_reason, cost=format_money(c.cost),
                   bundle_seconds=c.bundle_seconds, rate_prefix=c.rate_prefix, media=c.media)


class ErrorOut(Out):
    status_code: int
    detail: str
    field: str | None = None
    errors: list[dict[str, str]] = []
