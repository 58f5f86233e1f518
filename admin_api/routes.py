"""Handlers of the control API. Thin: decode, call one domain operation, encode.

Writes run in Litestar's thread pool (``sync_to_thread=True``): an LMDB write
transaction may wait for the writer lock or an fsync, and must not stall the
event loop that also carries SIP. Reads take microseconds and run inline.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any, TypedDict

import msgspec
from litestar import Request, Response, delete, get, patch, post, put
from litestar.datastructures import State
from litestar.openapi import ResponseSpec
from litestar.params import Parameter

from edge.control import accounts, cdrs, channels, idempotency, ledger, numbers, profiles, rates, registrations
from edge.control.errors import Invalid, NotFound
from edge.control.models import AutoRecharge
from edge.control.money import format_money, parse_money
from edge.control.store import Store, Txn
from edge.control.tables import parse_rates_csv, rate_from_fields

from .schemas import (
    AccountCreate,
    AccountOut,
    AutoRechargeRequest,
    BundlesRequest,
    BusinessAccountOut,
    BusinessAccountRequest,
    CdrOut,
    CreditRequest,
    ExclusionsPut,
    LedgerEntryOut,
    LiveCallOut,
    LoadedOut,
    NumberAttach,
    NumberBuy,
    NumberOut,
    Page,
    ProfileCreate,
    ProfileCreditOut,
    ProfileOut,
    ProfilePatch,
    RateOut,
    RatesPut,
    RegistrationOut,
)


class _Sync(TypedDict):  # typed, so that **THREAD / **READ check against the route decorators' keywords
    sync_to_thread: bool


THREAD: _Sync = {"sync_to_thread": True}
READ: _Sync = {"sync_to_thread": False}  # reads are one LMDB read transaction: microseconds, never block
_json = msgspec.json.Encoder()

Limit = Parameter(ge=1, le=1000, default=100, description="page size")
After = Parameter(ge=0, default=0, description="return entries after this seq (from next_after)")


def _store(state: State) -> Store:
    return state.store


def _profile_out(state: State, profile_id: str) -> ProfileOut:
    def op(txn: Txn) -> ProfileOut:
        prof = profiles.get(txn, profile_id)
        return ProfileOut.of(prof, profiles.credential_of(txn, prof.id), state.registrar, channels.in_use(txn, prof.id))

    return _store(state).read(op)


def _amount(text: str) -> int:
    micros = parse_money(text)
    if micros <= 0:
        raise Invalid("amount must be greater than zero", field="amount")
    return micros


def _money_move(request: Request, state: State, body: CreditRequest, fn: Any, render: Any) -> Response[bytes]:
    """Run a money-moving operation, once per ``Idempotency-Key`` when the header is present."""
    store = _store(state)
    key = request.headers.get("idempotency-key")
    if key is None:
        status, payload = render(store.write(fn))
        return Response(payload, status_code=status, media_type="application/json")
    if not 1 <= len(key) <= 255:
        raise Invalid("Idempotency-Key must be 1..255 characters", field="Idempotency-Key")
    fingerprint = hashlib.sha256(
        f"{request.method} {request.url.path} ".encode() + _json.encode(body)
    ).hexdigest()
    status, payload, replayed = idempotency.run_once(store, key, fingerprint, fn, render)
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return Response(payload, status_code=status, media_type="application/json", headers=headers)


# ------------------------------------------------------------------ accounts

@post("/v1/accounts", status_code=201, **THREAD)
def create_account(data: AccountCreate, state: State) -> AccountOut:
    return AccountOut.of(accounts.create(_store(state), data.name, data.admin))


@get("/v1/accounts", **READ)
def list_accounts(state: State, after: str = Parameter(default="", description="last id of the previous page"),
                  limit: int = Limit) -> dict[str, Any]:
    items = accounts.page(_store(state), after=after, limit=limit)
    return {"items": [AccountOut.of(a) for a in items],
            "next_after": items[-1].id if len(items) == limit else None}


@get("/v1/profiles", **READ)
def list_all_profiles(state: State, after: str = Parameter(default="", description="last id of the previous page"),
                      limit: int = Limit) -> dict[str, Any]:
    """Every profile of the node, in id order (for fleet tools such as ``sipedge status``)."""
    def op(txn: Txn) -> dict[str, Any]:
        items = profiles.page(txn, after=after, limit=limit)
        return {"items": [ProfileOut.of(p, profiles.credential_of(txn, p.id), state.registrar,
                                        channels.in_use(txn, p.id)) for p in items],
                "next_after": items[-1].id if len(items) == limit else None}

    return _store(state).read(op)


@get("/v1/accounts/{account_id:str}", **READ)
def get_account(account_id: str, state: State) -> AccountOut:
    return AccountOut.of(accounts.get(_store(state), account_id))


@post("/v1/accounts/{account_id:str}/credit", status_code=200, **THREAD,
      responses={200: ResponseSpec(data_container=AccountOut, description="the account with its new balance")})
def credit_account(account_id: str, data: CreditRequest, request: Request, state: State) -> Response[bytes]:
    """Top up the master balance (the payment itself is out of scope). Honours ``Idempotency-Key``."""
    amount = _amount(data.amount)

    def op(txn: Txn) -> AccountOut:
        return AccountOut.of(ledger.top_up(txn, account_id, amount, ref=request.headers.get("idempotency-key", "")))

    return _money_move(request, state, data, op, lambda out: (200, _json.encode(out)))


@get("/v1/accounts/{account_id:str}/ledger", **READ)
def account_ledger(account_id: str, state: State, after: int = After, limit: int = Limit) -> Page:
    def op(txn: Txn) -> Page:
        accounts.get(txn, account_id)
        entries = ledger.entries(txn, f"account:{account_id}", after=after, limit=limit)
        return _page([LedgerEntryOut.of(e) for e in entries], limit)

    return _store(state).read(op)


# ------------------------------------------------------------------ profiles

@post("/v1/accounts/{account_id:str}/profiles", status_code=201, **THREAD)
def create_profile(account_id: str, data: ProfileCreate, state: State) -> ProfileOut:
    prof, cred = profiles.create(
        _store(state), account_id, data.name, data.channels, data.auth, data.allowed_ips, data.static_contact,
        realm=state.realm,
    )
    return ProfileOut.of(prof, cred, state.registrar)


@get("/v1/accounts/{account_id:str}/profiles", **READ)
def list_profiles(account_id: str, state: State) -> list[ProfileOut]:
    def op(txn: Txn) -> list[ProfileOut]:
        accounts.get(txn, account_id)
        return [ProfileOut.of(p, profiles.credential_of(txn, p.id), state.registrar, channels.in_use(txn, p.id))
                for p in profiles.of_account(txn, account_id)]

    return _store(state).read(op)


@get("/v1/profiles/{profile_id:str}", **READ)
def show_profile(profile_id: str, state: State) -> ProfileOut:
    return _profile_out(state, profile_id)


@patch("/v1/profiles/{profile_id:str}", **THREAD)
def patch_profile(profile_id: str, data: ProfilePatch, state: State) -> ProfileOut:
    changes = {f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not msgspec.UNSET}
    profiles.update(_store(state), profile_id, changes)
    return _profile_out(state, profile_id)


@delete("/v1/profiles/{profile_id:str}", status_code=204, **THREAD)
def delete_profile(profile_id: str, state: State) -> None:
    profiles.delete(_store(state), profile_id)


@post("/v1/profiles/{profile_id:str}/credit", status_code=200, **THREAD,
      responses={200: ResponseSpec(data_container=ProfileCreditOut, description="the new balances")})
def credit_profile(profile_id: str, data: CreditRequest, request: Request, state: State) -> Response[bytes]:
    """Allocate credit from the account's master balance. Honours ``Idempotency-Key``."""
    amount = _amount(data.amount)

    def op(txn: Txn) -> ProfileCreditOut:
        prof, acct = ledger.allocate(txn, profile_id, amount, ref=request.headers.get("idempotency-key", ""))
        return ProfileCreditOut(profile_id=prof.id, account_id=acct.id, balance=format_money(prof.balance),
                                account_balance=format_money(acct.balance))

    return _money_move(request, state, data, op, lambda out: (200, _json.encode(out)))


@put("/v1/profiles/{profile_id:str}/auto-recharge", **THREAD)
def put_auto_recharge(profile_id: str, data: AutoRechargeRequest, state: State) -> ProfileOut:
    settings = AutoRecharge(enabled=data.enabled, amount=parse_money(data.amount),
                            min_balance=parse_money(data.min_balance))
    if settings.enabled and settings.amount <= 0:
        raise Invalid("amount must be greater than zero when auto-recharge is enabled", field="amount")
    ledger.set_auto_recharge(_store(state), profile_id, settings)
    return _profile_out(state, profile_id)


@put("/v1/profiles/{profile_id:str}/bundles", **THREAD)
def put_bundles(profile_id: str, data: BundlesRequest, state: State) -> ProfileOut:
    profiles.set_bundles(_store(state), profile_id, data.us_bundles)
    return _profile_out(state, profile_id)


@get("/v1/profiles/{profile_id:str}/calls", **READ)
def profile_calls(profile_id: str, state: State) -> list[LiveCallOut]:
    def op(txn: Txn) -> list[LiveCallOut]:
        profiles.get(txn, profile_id)
        return [LiveCallOut.of(c) for c in channels.live_calls(txn, profile_id)]

    return _store(state).read(op)


@get("/v1/profiles/{profile_id:str}/cdrs", **READ)
def profile_cdrs(profile_id: str, state: State, after: int = After, limit: int = Limit) -> Page:
    def op(txn: Txn) -> Page:
        profiles.get(txn, profile_id)
        return _page([CdrOut.of(c) for c in cdrs.page(txn, profile_id, after=after, limit=limit)], limit)

    return _store(state).read(op)


@get("/v1/profiles/{profile_id:str}/ledger", **READ)
def profile_ledger(profile_id: str, state: State, after: int = After, limit: int = Limit) -> Page:
    def op(txn: Txn) -> Page:
        profiles.get(txn, profile_id)
        entries = ledger.entries(txn, f"profile:{profile_id}", after=after, limit=limit)
        return _page([LedgerEntryOut.of(e) for e in entries], limit)

    return _store(state).read(op)


@get("/v1/profiles/{profile_id:str}/registrations", **READ)
def profile_registrations(profile_id: str, state: State) -> list[RegistrationOut]:
    now = time.time()

    def op(txn: Txn) -> list[RegistrationOut]:
        profiles.get(txn, profile_id)
        return [RegistrationOut.of(r, now) for r in registrations.live(txn, profile_id, now)]

    return _store(state).read(op)


def _page(items: list[Any], limit: int) -> Page:
    return Page(items=items, next_after=items[-1].seq if len(items) == limit else None)


# ------------------------------------------------------- numbers & business

@post("/v1/accounts/{account_id:str}/numbers", status_code=201, **THREAD)
def buy_number(account_id: str, data: NumberBuy, state: State) -> NumberOut:
    return NumberOut.of(numbers.buy(_store(state), account_id, data.number))


@get("/v1/accounts/{account_id:str}/numbers", **READ)
def list_numbers(account_id: str, state: State) -> list[NumberOut]:
    return [NumberOut.of(n) for n in numbers.of_account(_store(state), account_id)]


@post("/v1/profiles/{profile_id:str}/numbers", status_code=201, **THREAD)
def attach_number(profile_id: str, data: NumberAttach, state: State) -> NumberOut:
    return NumberOut.of(numbers.attach(_store(state), profile_id, data.number, data.extension))


@delete("/v1/profiles/{profile_id:str}/numbers/{number:str}", status_code=204, **THREAD)
def detach_number(profile_id: str, number: str, state: State) -> None:
    numbers.detach(_store(state), profile_id, number)


@post("/v1/accounts/{account_id:str}/business-accounts", status_code=201, **THREAD)
def create_business_account(account_id: str, data: BusinessAccountRequest, state: State) -> BusinessAccountOut:
    rec = numbers.create_business(_store(state), account_id, data.name)
    return BusinessAccountOut(name=rec.name, account_id=rec.account_id, profile_id=None, can_sign_in=True)


@post("/v1/profiles/{profile_id:str}/business-accounts", status_code=201, **THREAD)
def attach_business_account(profile_id: str, data: BusinessAccountRequest, state: State) -> BusinessAccountOut:
    rec = numbers.attach_business(_store(state), profile_id, data.name)
    return BusinessAccountOut(name=rec.name, account_id=rec.account_id, profile_id=rec.profile_id, can_sign_in=False)


@delete("/v1/profiles/{profile_id:str}/business-accounts/{name:str}", status_code=204, **THREAD)
def detach_business_account(profile_id: str, name: str, state: State) -> None:
    numbers.detach_business(_store(state), profile_id, name)


# --------------------------------------------------------------------- rates

@put("/v1/rates", request_max_body_size=64 << 20)
async def put_rates(request: Request, state: State) -> LoadedOut:
    """Replace the rate table: JSON ``{"rates": [...]}`` or ``text/csv`` with the same columns."""
    body = await request.body()
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype == "text/csv":
        try:
            text = body.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise Invalid("CSV must be UTF-8", field="csv") from None
        table = parse_rates_csv(text)
    elif ctype == "application/json":
        put_body = msgspec.json.decode(body, type=RatesPut)
        table = [rate_from_fields(msgspec.structs.asdict(r), f"rates[{i}]") for i, r in enumerate(put_body.rates)]
    else:
        raise Invalid(f"unsupported content type {ctype!r}: use application/json or text/csv", field="Content-Type")
    # 100k rows take a fraction of a second: keep that off the event loop.
    return LoadedOut(loaded=await asyncio.to_thread(rates.replace, _store(state), table))


@get("/v1/rates/lookup", **READ)
def rate_lookup(state: State, number: str = Parameter(pattern=r"^\+?[0-9]{1,20}$")) -> RateOut:
    rate = rates.rate_for(_store(state), number)
    if rate is None:
        raise NotFound(f"no rate covers {number}")
    return RateOut.of(rate)


@put("/v1/bundle-exclusions", **THREAD)
def put_exclusions(data: ExclusionsPut, state: State) -> LoadedOut:
    return LoadedOut(loaded=rates.replace_exclusions(_store(state), data.prefixes))


@get("/v1/bundle-exclusions", **READ)
def get_exclusions(state: State) -> dict[str, list[str]]:
    return {"prefixes": rates.exclusions(_store(state))}


ROUTES = [
    list_accounts, create_account, get_account, credit_account, account_ledger,
    list_all_profiles, create_profile, list_profiles, show_profile, patch_profile, delete_profile,
    credit_profile, put_auto_recharge, put_bundles,
    profile_calls, profile_cdrs, profile_ledger, profile_registrations,
    buy_number, list_numbers, attach_number, detach_number,
    create_business_account, attach_business_account, detach_business_account,
    put_rates, rate_lookup, put_exclusions, get_exclusions,
]
