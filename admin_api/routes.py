"""Handlers of the control API. Thin: decode, check the key's scope, call one domain operation, encode.

Writes run in Litestar's thread pool (``sync_to_thread=True``): an LMDB write
transaction may wait for the writer lock or an fsync, and must not stall the
event loop that also carries SIP. Reads take microseconds and run inline.
Every handler has a named ``operation_id`` and a tag; ``openapi.py`` adds the error
responses (problem+json) and examples to the document.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypedDict

import msgspec
from litestar import Request, Response, delete, get, patch, post, put
from litestar.datastructures import State
from litestar.openapi import ResponseSpec
from litestar.params import Parameter, QueryParameter

from edge.cluster import link
from edge.control import (
    accounts,
    audit,
    channels,
    console_auth,
    idempotency,
    keys,
    ledger,
    numbers,
    operator,
    profiles,
    rates,
    registrations,
    webhooks,
)
from edge.control import cdrs as cdr_store
from edge.control.errors import (
    CallNotFound,
    ClusterUnavailable,
    ClusterUnsupported,
    InsufficientFunds,
    Invalid,
    NotFound,
)
from edge.control.models import Account, AutoRecharge, HangupRequest, Profile
from edge.control.money import format_money, parse_money
from edge.control.store import Store, Txn
from edge.control.tables import parse_rates_csv, rate_from_fields

from .auth import Principal, principal_of
from .export import export_response, time_range
from .schemas import (
    AccountCreate,
    AccountOut,
    AccountPage,
    AdminPassword,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    ApiKeyPage,
    AuditOut,
    AuditPage,
    AutoRechargeRequest,
    BundlesRequest,
    BusinessAccountOut,
    BusinessAccountRequest,
    CdrOut,
    CdrPage,
    CredentialsOut,
    CreditRequest,
    DeliveryOut,
    DeliveryPage,
    ExclusionsPut,
    HangupCreate,
    HangupOut,
    LedgerEntryOut,
    LedgerPage,
    LiveCallOut,
    LiveCallPage,
    LoadedOut,
    NumberAttach,
    NumberBuy,
    NumberOut,
    PrefixesOut,
    ProfileCreate,
    ProfileCreated,
    ProfileCreditOut,
    ProfileOut,
    ProfilePage,
    ProfilePatch,
    RateOut,
    RatesPut,
    RegistrationOut,
    RegistrationPage,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
)


class _Sync(TypedDict):  # typed, so that **THREAD / **READ check against the route decorators' keywords
    sync_to_thread: bool


THREAD: _Sync = {"sync_to_thread": True}
READ: _Sync = {"sync_to_thread": False}  # reads are one LMDB read transaction: microseconds, never block
ADMIN = {"access": "admin"}
_json = msgspec.json.Encoder()

Limit = Parameter(ge=1, le=1000, default=100, description="page size (1..1000)")
After = Parameter(ge=0, le=2**63 - 1, default=0, description="return entries after this seq (from next_after)")
AfterId = Parameter(default="", max_length=64, description="last id of the previous page (from next_after)")
Id = Parameter(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:+-]+$")


JOURNAL_TIMEOUT = 10.0     # seconds a cluster node's movement may take in the engine (an election: 2-5 s)


def _store(state: State) -> Store:
    return state.store


def _who(request: Request[Any, Any, Any]) -> Principal:
    return principal_of(request)


def _profile_out(state: State, profile_id: str) -> ProfileOut:
    def op(txn: Txn) -> ProfileOut:
        prof = profiles.get(txn, profile_id)
        return ProfileOut.of(prof, state.registrar, channels.in_use(txn, prof.id))

    return _store(state).read(op)


def _amount(text: str) -> int:
    micros = parse_money(text)
    if micros <= 0:
        raise Invalid("amount must be greater than zero", field="amount")
    return micros


def _money_move(request: Request[Any, Any, Any], state: State, body: CreditRequest, fn: Any,
                render: Any, *, in_journal: Callable[[str], None] | None = None) -> Response[bytes]:
    """Run a money-moving operation, once per ``Idempotency-Key`` when the header is present.

    :param in_journal: a cluster node's movement (given its move id), appended to the cluster's
        journal through the agent before ``fn`` -- then a read of what it moved -- runs; the move id
        comes from the key, so the same key on any node moves the money once.
    """
    store = _store(state)
    key = request.headers.get("idempotency-key")
    if key is None:
        if in_journal is not None:
            in_journal(uuid.uuid4().hex)
        status, payload = render(store.write(fn))
        return Response(payload, status_code=status, media_type="application/json")
    if not 1 <= len(key) <= 255:
        raise Invalid("Idempotency-Key must be 1..255 characters", field="Idempotency-Key")
    fingerprint = hashlib.sha256(
        f"{request.method} {request.url.path} ".encode() + _json.encode(body)
    ).hexdigest()
    if in_journal is not None:
        # a key reused for another request is refused before anything moves; a replay here moves nothing
        prior = store.read(lambda txn: idempotency.prior(txn, key, fingerprint))
        if prior is None:
            in_journal(hashlib.sha256(f"{request.url.path} {key}".encode()).hexdigest()[:40])
    status, payload, replayed = idempotency.run_once(store, key, fingerprint, fn, render)
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return Response(payload, status_code=status, media_type="application/json", headers=headers)


def _journal_move(state: State, request: link.TopUp | link.Allocate) -> None:
    """Append a cluster node's top-up or allocation through its agent (edge/cluster/money.py)."""
    reply = link.ask_blocking(state.journal, request, JOURNAL_TIMEOUT)
    if reply.result == link.BROKE:
        raise InsufficientFunds("the master balance is lower than the allocation", field="amount")
    if reply.result != link.OK:
        raise ClusterUnavailable("the cluster's engine did not confirm the movement; ask again with the same "
                                 "Idempotency-Key")


# ------------------------------------------------------------------ accounts

@post("/v1/accounts", status_code=201, operation_id="createAccount", tags=["accounts"], opt=ADMIN,
      summary="Create an account", description="A new account with a zero master balance (admin keys only).",
      **THREAD)
def create_account(data: AccountCreate, state: State) -> AccountOut:
    return AccountOut.of(accounts.create(_store(state), data.name, data.admin))


@get("/v1/accounts", operation_id="listAccounts", tags=["accounts"], summary="List accounts",
     description="Accounts in id order, in pages (an account key sees its own account only).", **READ)
def list_accounts(request: Request[Any, Any, Any], state: State, after: str = AfterId,
                  limit: int = Limit) -> AccountPage:
    who = _who(request)
    if not who.is_admin:
        acct = accounts.get(_store(state), who.account_id or "")
        items = [acct] if acct.id > after else []
        return AccountPage(items=[AccountOut.of(a) for a in items], next_after=None)
    items = accounts.page(_store(state), after=after, limit=limit)
    return AccountPage(items=[AccountOut.of(a) for a in items],
                       next_after=items[-1].id if len(items) == limit else None)


@get("/v1/accounts/{account_id:str}", operation_id="getAccount", tags=["accounts"], summary="Get an account",
     description="The account and its master balance.", **READ)
def get_account(account_id: str, state: State) -> AccountOut:
    return AccountOut.of(accounts.get(_store(state), account_id))


@delete("/v1/accounts/{account_id:str}", status_code=204, operation_id="deleteAccount", tags=["accounts"],
        summary="Delete an account", opt=ADMIN,
        description="Refused with `account_not_empty` while the account has profiles or credit; its numbers are "
                    "released, its business accounts, webhooks and keys go.", **THREAD)
def delete_account(account_id: str, state: State) -> None:
    accounts.delete(_store(state), account_id)


@put("/v1/accounts/{account_id:str}/admin-password", status_code=204, operation_id="setAdminPassword",
     tags=["accounts"], summary="Set the console password of the account's admin login",
     description="The password the account's `admin` login signs in to `/console/` with (SPEC §5.6): at "
                 "least 12 characters (at most 256), not the login (`password_too_weak`). Stored as scrypt; the "
                 "account's console sessions end and a sign-in lock lifts.", **THREAD)
def put_admin_password(account_id: str, data: AdminPassword, state: State) -> None:
    console_auth.set_admin_password(_store(state), account_id, data.password)


@post("/v1/accounts/{account_id:str}/credit", status_code=200, operation_id="topUpAccount", tags=["credit"],
      summary="Top up the master balance",
      description="Adds credit to the account's master balance (the payment itself is out of scope). "
                  "Honours `Idempotency-Key`.", **THREAD)
def credit_account(account_id: str, data: CreditRequest, request: Request[Any, Any, Any],
                   state: State) -> AccountOut:
    amount = _amount(data.amount)
    if state.journal is not None:      # a cluster node: the master balance is the journal's
        accounts.get(_store(state), account_id)
        return _money_move(request, state, data, lambda txn: AccountOut.of(accounts.get(txn, account_id)),
                           lambda out: (200, _json.encode(out)),
                           in_journal=lambda move_id: _journal_move(
                               state, link.TopUp(0, account_id, move_id, amount)))  # type: ignore[return-value]

    def op(txn: Txn) -> AccountOut:
        return AccountOut.of(ledger.top_up(txn, account_id, amount, ref=request.headers.get("idempotency-key", "")))

    return _money_move(request, state, data, op, lambda out: (200, _json.encode(out)))  # type: ignore[return-value]


LedgerFrom = QueryParameter(name="from", description="RFC 3339: entries written at or after this time")
LedgerTo = QueryParameter(name="to", description="RFC 3339: entries written before this time")


@get("/v1/accounts/{account_id:str}/ledger", operation_id="listAccountLedger", tags=["credit"],
     summary="The account's ledger", description="Every movement of the master balance, oldest first.", **READ)
def account_ledger(account_id: str, state: State, after: int = After, limit: int = Limit,
                   start: Annotated[str | None, LedgerFrom] = None,
                   end: Annotated[str | None, LedgerTo] = None) -> LedgerPage:
    lo, hi = time_range(start, end)

    def op(txn: Txn) -> LedgerPage:
        accounts.get(txn, account_id)
        entries = ledger.entries(txn, f"account:{account_id}", after=after, limit=limit, start=lo, end=hi)
        items = [LedgerEntryOut.of(e) for e in entries]
        return LedgerPage(items=items, next_after=items[-1].seq if len(items) == limit else None)

    return _store(state).read(op)


# ------------------------------------------------------------------ profiles

@get("/v1/profiles", operation_id="listProfiles", tags=["profiles"], summary="List every profile",
     description="Every profile of the node in id order, in pages (fleet tools such as `sipedge status`); "
                 "an account key sees its own.", **READ)
def list_all_profiles(request: Request[Any, Any, Any], state: State, after: str = AfterId,
                      limit: int = Limit) -> ProfilePage:
    who = _who(request)

    def op(txn: Txn) -> ProfilePage:
        if who.is_admin:
            items = profiles.page(txn, after=after, limit=limit)
        else:
            items = [p for p in profiles.of_account(txn, who.account_id) if p.id > after][:limit]
        return ProfilePage(items=[ProfileOut.of(p, state.registrar, channels.in_use(txn, p.id)) for p in items],
                           next_after=items[-1].id if len(items) == limit else None)

    return _store(state).read(op)


@post("/v1/accounts/{account_id:str}/profiles", status_code=201, operation_id="createProfile", tags=["profiles"],
      summary="Create a SIP profile",
      description="A profile with a generated SIP username and password. The answer is the only ordinary one "
                  "with the password (later: `GET /v1/profiles/{id}/credentials`).", **THREAD)
def create_profile(account_id: str, data: ProfileCreate, state: State) -> ProfileCreated:
    prof, cred = profiles.create(
        _store(state), account_id, data.name, data.channels, data.auth, data.allowed_ips, data.static_contact,
        realm=state.realm,
    )
    return ProfileCreated.created(prof, cred, state.registrar)


@get("/v1/accounts/{account_id:str}/profiles", operation_id="listAccountProfiles", tags=["profiles"],
     summary="The account's profiles", description="Every profile of the account (no passwords).", **READ)
def list_profiles(account_id: str, state: State) -> list[ProfileOut]:
    def op(txn: Txn) -> list[ProfileOut]:
        accounts.get(txn, account_id)
        return [ProfileOut.of(p, state.registrar, channels.in_use(txn, p.id))
                for p in profiles.of_account(txn, account_id)]

    return _store(state).read(op)


@get("/v1/profiles/{profile_id:str}", operation_id="getProfile", tags=["profiles"], summary="Get a profile",
     description="The profile with its channels in use (no password).", **READ)
def show_profile(profile_id: str, state: State) -> ProfileOut:
    return _profile_out(state, profile_id)


@patch("/v1/profiles/{profile_id:str}", operation_id="updateProfile", tags=["profiles"], summary="Change a profile",
       description="Any of name, channels (1..300, never below the US bundles), auth, allowed_ips, "
                   "static_contact.", **THREAD)
def patch_profile(profile_id: str, data: ProfilePatch, state: State) -> ProfileOut:
    changes = {f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not msgspec.UNSET}
    profiles.update(_store(state), profile_id, changes)
    return _profile_out(state, profile_id)


@delete("/v1/profiles/{profile_id:str}", status_code=204, operation_id="deleteProfile", tags=["profiles"],
        summary="Delete a profile",
        description="Its credit returns to the account; refused with `profile_has_live_calls` during calls.",
        **THREAD)
def delete_profile(profile_id: str, state: State) -> None:
    if state.journal is not None and (prof := profiles.get(_store(state), profile_id)).balance:
        profiles.refuse_with_live_calls(_store(state), prof)     # "end the calls" comes first
        raise ClusterUnsupported("a cluster node cannot yet return a profile's credit to its account: "
                                 "delete it once its balance is 0")
    profiles.delete(_store(state), profile_id)


@get("/v1/profiles/{profile_id:str}/credentials", operation_id="getProfileCredentials", tags=["profiles"],
     summary="The profile's SIP credentials",
     description="SIP username, password and registrar: the one read that shows the password (SPEC §5.5).", **READ)
def get_credentials(profile_id: str, state: State) -> CredentialsOut:
    return CredentialsOut.of(profiles.credential_of(_store(state), profile_id), state.registrar)


@post("/v1/profiles/{profile_id:str}/credentials/rotate", status_code=200, operation_id="rotateProfileCredentials",
      tags=["profiles"], summary="Rotate the SIP password",
      description="A new generated password; the old one is refused from the next challenge on.", **THREAD)
def rotate_credentials(profile_id: str, state: State) -> CredentialsOut:
    return CredentialsOut.of(profiles.rotate_password(_store(state), profile_id, realm=state.realm), state.registrar)


@post("/v1/profiles/{profile_id:str}/credit", status_code=200, operation_id="allocateProfileCredit",
      tags=["credit"], summary="Allocate credit to a profile",
      description="Moves credit from the account's master balance to the profile. Honours `Idempotency-Key`.",
      **THREAD)
def credit_profile(profile_id: str, data: CreditRequest, request: Request[Any, Any, Any],
                   state: State) -> ProfileCreditOut:
    amount = _amount(data.amount)

    def out(prof: Profile, acct: Account) -> ProfileCreditOut:
        return ProfileCreditOut(profile_id=prof.id, account_id=acct.id, balance=format_money(prof.balance),
                                account_balance=format_money(acct.balance))

    def op(txn: Txn) -> ProfileCreditOut:
        return out(*ledger.allocate(txn, profile_id, amount, ref=request.headers.get("idempotency-key", "")))

    def read(txn: Txn) -> ProfileCreditOut:
        prof = profiles.get(txn, profile_id)
        return out(prof, accounts.get(txn, prof.account_id))

    if state.journal is not None:      # a cluster node: both balances are the journal's
        account_id = profiles.get(_store(state), profile_id).account_id
        return _money_move(request, state, data, read, lambda out: (200, _json.encode(out)),
                           in_journal=lambda move_id: _journal_move(
                               state, link.Allocate(0, account_id, profile_id, move_id, amount)))  # type: ignore[return-value]
    return _money_move(request, state, data, op, lambda out: (200, _json.encode(out)))  # type: ignore[return-value]


@put("/v1/profiles/{profile_id:str}/auto-recharge", operation_id="setAutoRecharge", tags=["credit"],
     summary="Auto-recharge settings",
     description="Recharges at once if the balance is already below the minimum (on a cluster node: "
                 "within a second, by the node's agent).", **THREAD)
def put_auto_recharge(profile_id: str, data: AutoRechargeRequest, state: State) -> ProfileOut:
    settings = AutoRecharge(enabled=data.enabled, amount=parse_money(data.amount),
                            min_balance=parse_money(data.min_balance))
    if settings.enabled and settings.amount <= 0:
        raise Invalid("amount must be greater than zero when auto-recharge is enabled", field="amount")
    # a cluster node's agent recharges from the journal within a second (docs/cluster.md "Money across nodes")
    ledger.set_auto_recharge(_store(state), profile_id, settings, recharge=state.journal is None)
    return _profile_out(state, profile_id)


@put("/v1/profiles/{profile_id:str}/bundles", operation_id="setBundles", tags=["credit"],
     summary="US minute bundles", description="Never more than the profile's channels (`bundles_exceed_channels`).",
     **THREAD)
def put_bundles(profile_id: str, data: BundlesRequest, state: State) -> ProfileOut:
    if state.journal is not None and data.us_bundles:
        raise ClusterUnsupported("US minute bundles are not yet available on a cluster node")
    profiles.set_bundles(_store(state), profile_id, data.us_bundles)
    return _profile_out(state, profile_id)


def _live_calls(txn: Txn, state: State, profile_id: str | None = None) -> list[LiveCallOut]:
    """The live calls of a profile (of every profile if None) in (profile, call) order; on a cluster
    node those of every node, each with the node that carries it (docs/cluster.md "Live calls on every node")."""
    here = [LiveCallOut.of(c, state.node) for c in channels.live_calls(txn, profile_id)]
    if not state.node:
        return here
    elsewhere = [LiveCallOut.of(r.call, r.node) for r in channels.remote_calls(txn, profile_id)]
    return sorted(here + elsewhere, key=lambda c: (c.profile_id, c.call_id))


@get("/v1/profiles/{profile_id:str}/calls", operation_id="listLiveCalls", tags=["calls"],
     summary="Live calls of a profile", description="Calls holding a channel now (on a cluster node: on every "
                                                    "node, each with its `node`).", **READ)
def profile_calls(profile_id: str, state: State) -> list[LiveCallOut]:
    def op(txn: Txn) -> list[LiveCallOut]:
        profiles.get(txn, profile_id)
        return _live_calls(txn, state, profile_id)

    return _store(state).read(op)


@get("/v1/calls", operation_id="listAllLiveCalls", tags=["calls"], summary="Every live call of the node",
     description="Live calls in (profile, call) order, in pages; an account key sees its own. On a cluster "
                 "node: those of every node, each with its `node`.", **READ)
def list_calls(request: Request[Any, Any, Any], state: State, after: str = AfterId,
               limit: int = Limit) -> LiveCallPage:
    who = _who(request)

    def op(txn: Txn) -> LiveCallPage:
        own = None if who.is_admin else {p.id for p in profiles.of_account(txn, who.account_id)}
        items = []
        for call in _live_calls(txn, state):
            cursor = f"{call.profile_id}/{call.call_id}"
            if cursor <= after or (own is not None and call.profile_id not in own):
                continue
            items.append(call)
            if len(items) >= limit:
                break
        return LiveCallPage(items=items,
                            next_after=f"{items[-1].profile_id}/{items[-1].call_id}" if len(items) == limit else None)

    return _store(state).read(op)


@get("/v1/registrations", operation_id="listAllRegistrations", tags=["profiles"],
     summary="Every live binding of the node", description="Unexpired bindings of every profile, in pages; an "
                                                           "account key sees its own.", **READ)
def list_registrations(request: Request[Any, Any, Any], state: State, after: str = AfterId,
                       limit: int = Limit) -> RegistrationPage:
    who = _who(request)
    now = time.time()

    def op(txn: Txn) -> RegistrationPage:
        own = None if who.is_admin else {p.id for p in profiles.of_account(txn, who.account_id)}
        items = []
        for reg in registrations.live(txn, None, now):
            cursor = f"{reg.profile_id}/{reg.contact}"
            if cursor <= after or (own is not None and reg.profile_id not in own):
                continue
            items.append(reg)
            if len(items) >= limit:
                break
        return RegistrationPage(items=[RegistrationOut.of(r, now) for r in items],
                                next_after=f"{items[-1].profile_id}/{items[-1].contact}" if len(items) == limit
                                else None)

    return _store(state).read(op)


@post("/v1/calls/{call_id:str}/hangup", status_code=202, operation_id="hangupCall", tags=["calls"],
      summary="End a live call",
      description="BYE to both legs with a Reason, settled as usual. Accepted (202): the process that owns the "
                  "call ends it within a few hundred ms; 404 `call_not_found` if no such live call.", **THREAD)
def hangup_call(call_id: str, request: Request[Any, Any, Any], state: State,
                data: HangupCreate | None = None) -> HangupOut:
    who = _who(request)
    store = _store(state)
    cause = (data or HangupCreate()).cause
    if state.journal is not None and (elsewhere := channels.find_remote(store, call_id)) is not None:
        # another node carries it: its agent records the request there (edge/cluster/hangups.py)
        reply = link.ask_blocking(state.journal, link.Hangup(0, elsewhere.node, call_id, cause, who.key_id),
                                  JOURNAL_TIMEOUT)
        if reply.result == link.OK:
            return HangupOut.of(msgspec.msgpack.decode(reply.body, type=HangupRequest))
        if reply.result == link.GONE:
            raise CallNotFound(f"no live call {call_id}")
        raise ClusterUnavailable(f"node {elsewhere.node}, which carries the call, did not answer: ask again")
    req = operator.request_hangup(store, call_id, cause=cause, key_id=who.key_id,
                                  account_id=None if who.is_admin else who.account_id)
    return HangupOut.of(req)


@get("/v1/profiles/{profile_id:str}/ledger", operation_id="listProfileLedger", tags=["credit"],
     summary="The profile's ledger", description="Every movement of the profile's credit, oldest first.", **READ)
def profile_ledger(profile_id: str, state: State, after: int = After, limit: int = Limit,
                   start: Annotated[str | None, LedgerFrom] = None,
                   end: Annotated[str | None, LedgerTo] = None) -> LedgerPage:
    lo, hi = time_range(start, end)

    def op(txn: Txn) -> LedgerPage:
        profiles.get(txn, profile_id)
        entries = ledger.entries(txn, f"profile:{profile_id}", after=after, limit=limit, start=lo, end=hi)
        items = [LedgerEntryOut.of(e) for e in entries]
        return LedgerPage(items=items, next_after=items[-1].seq if len(items) == limit else None)

    return _store(state).read(op)


@get("/v1/profiles/{profile_id:str}/registrations", operation_id="listRegistrations", tags=["profiles"],
     summary="Live registrar bindings", description="Unexpired bindings with their expiry.", **READ)
def profile_registrations(profile_id: str, state: State) -> list[RegistrationOut]:
    now = time.time()

    def op(txn: Txn) -> list[RegistrationOut]:
        profiles.get(txn, profile_id)
        return [RegistrationOut.of(r, now) for r in registrations.live(txn, profile_id, now)]

    return _store(state).read(op)


# --------------------------------------------------------------------- CDRs

FromParam = QueryParameter(name="from", description="RFC 3339: calls started at or after this time")
ToParam = QueryParameter(name="to", description="RFC 3339: calls started before this time")
FormatParam = QueryParameter(name="format",
                        description="json (paged), csv or jsonl (streamed, every row of the range)")


@get("/v1/profiles/{profile_id:str}/cdrs", operation_id="listProfileCdrs", tags=["cdrs"],
     summary="CDRs of a profile", description="JSON pages, or a streamed CSV / JSON Lines export (SPEC §5.4).",
     responses={200: ResponseSpec(data_container=CdrPage, description="a page of CDRs (format=json)")}, **READ)
def profile_cdrs(profile_id: str, state: State, after: int = After, limit: int = Limit,
                 start: Annotated[str | None, FromParam] = None, end: Annotated[str | None, ToParam] = None,
                 fmt: Annotated[Literal["json", "csv", "jsonl"], FormatParam] = "json") -> Response[Any]:
    lo, hi = time_range(start, end)
    if fmt != "json":
        profiles.get(_store(state), profile_id)
        return export_response(_store(state), [profile_id], fmt, lo, hi, f"cdrs-{profile_id}")

    def op(txn: Txn) -> CdrPage:
        profiles.get(txn, profile_id)
        return _cdr_page(txn, [profile_id], after, limit, lo, hi)

    return Response(_store(state).read(op))


@get("/v1/accounts/{account_id:str}/cdrs", operation_id="listAccountCdrs", tags=["cdrs"],
     summary="CDRs of an account",
     description="Every profile of the account: JSON pages in seq order, or a streamed CSV / JSON Lines "
                 "export (profile by profile, oldest first).",
     responses={200: ResponseSpec(data_container=CdrPage, description="a page of CDRs (format=json)")}, **READ)
def account_cdrs(account_id: str, state: State, after: int = After, limit: int = Limit,
                 start: Annotated[str | None, FromParam] = None, end: Annotated[str | None, ToParam] = None,
                 fmt: Annotated[Literal["json", "csv", "jsonl"], FormatParam] = "json") -> Response[Any]:
    lo, hi = time_range(start, end)
    store = _store(state)

    def ids(txn: Txn) -> list[str]:
        accounts.get(txn, account_id)
        return [p.id for p in profiles.of_account(txn, account_id)]

    profile_ids = store.read(ids)
    if fmt != "json":
        return export_response(store, profile_ids, fmt, lo, hi, f"cdrs-{account_id}")
    return Response(store.read(lambda txn: _cdr_page(txn, profile_ids, after, limit, lo, hi)))


def _cdr_page(txn: Txn, profile_ids: list[str], after: int, limit: int, lo: float | None,
              hi: float | None) -> CdrPage:
    """The ``limit`` CDRs with the lowest seq > ``after`` over the profiles (each profile's are in seq order)."""
    import heapq
    import itertools

    streams = [itertools.islice(cdr_store.scan(txn, pid, after=after, start=lo, end=hi), limit) for pid in profile_ids]
    items = [CdrOut.of(c) for c in itertools.islice(heapq.merge(*streams, key=lambda c: c.seq), limit)]
    return CdrPage(items=items, next_after=items[-1].seq if len(items) == limit else None)


# ------------------------------------------------------- numbers & business

@post("/v1/accounts/{account_id:str}/numbers", status_code=201, operation_id="buyNumber", tags=["numbers"],
      summary="Buy an online number", description="A valid E.164 number (`number_invalid` otherwise).", **THREAD)
def buy_number(account_id: str, data: NumberBuy, state: State) -> NumberOut:
    return NumberOut.of(numbers.buy(_store(state), account_id, data.number))


@get("/v1/accounts/{account_id:str}/numbers", operation_id="listNumbers", tags=["numbers"],
     summary="The account's numbers", description="With the profile each is attached to.", **READ)
def list_numbers(account_id: str, state: State) -> list[NumberOut]:
    return [NumberOut.of(n) for n in numbers.of_account(_store(state), account_id)]


@delete("/v1/accounts/{account_id:str}/numbers/{number:str}", status_code=204, operation_id="releaseNumber",
        tags=["numbers"], summary="Release a number",
        description="Detached from its profile if attached, then no longer owned by the account.", **THREAD)
def release_number(account_id: str, number: str, state: State) -> None:
    numbers.release(_store(state), account_id, number)


@post("/v1/profiles/{profile_id:str}/numbers", status_code=201, operation_id="attachNumber", tags=["numbers"],
      summary="Attach a number to a profile", description="`number_attached_elsewhere` if another profile has it.",
      **THREAD)
def attach_number(profile_id: str, data: NumberAttach, state: State) -> NumberOut:
    return NumberOut.of(numbers.attach(_store(state), profile_id, data.number, data.extension))


@delete("/v1/profiles/{profile_id:str}/numbers/{number:str}", status_code=204, operation_id="detachNumber",
        tags=["numbers"], summary="Detach a number", description="The account keeps owning it.", **THREAD)
def detach_number(profile_id: str, number: str, state: State) -> None:
    numbers.detach(_store(state), profile_id, number)


@post("/v1/accounts/{account_id:str}/business-accounts", status_code=201, operation_id="createBusinessAccount",
      tags=["numbers"], summary="Create a business account", description="A login owned by the account.", **THREAD)
def create_business_account(account_id: str, data: BusinessAccountRequest, state: State) -> BusinessAccountOut:
    rec = numbers.create_business(_store(state), account_id, data.name)
    return BusinessAccountOut(name=rec.name, account_id=rec.account_id, profile_id=None, can_sign_in=True)


@get("/v1/accounts/{account_id:str}/business-accounts", operation_id="listBusinessAccounts", tags=["numbers"],
     summary="The account's business accounts", description="With the profile each is attached to.", **READ)
def list_business_accounts(account_id: str, state: State) -> list[BusinessAccountOut]:
    return [BusinessAccountOut(name=b.name, account_id=b.account_id, profile_id=b.profile_id,
                               can_sign_in=b.profile_id is None)
            for b in numbers.business_of_account(_store(state), account_id)]


@post("/v1/profiles/{profile_id:str}/business-accounts", status_code=201, operation_id="attachBusinessAccount",
      tags=["numbers"], summary="Attach a business account",
      description="It cannot sign in elsewhere while attached; an administrator login never attaches "
                  "(`admin_not_attachable`).", **THREAD)
def attach_business_account(profile_id: str, data: BusinessAccountRequest, state: State) -> BusinessAccountOut:
    rec = numbers.attach_business(_store(state), profile_id, data.name)
    return BusinessAccountOut(name=rec.name, account_id=rec.account_id, profile_id=rec.profile_id, can_sign_in=False)


@delete("/v1/profiles/{profile_id:str}/business-accounts/{name:str}", status_code=204,
        operation_id="detachBusinessAccount", tags=["numbers"], summary="Detach a business account",
        description="It can sign in again.", **THREAD)
def detach_business_account(profile_id: str, name: str, state: State) -> None:
    numbers.detach_business(_store(state), profile_id, name)


# --------------------------------------------------------------------- rates

@put("/v1/rates", request_max_body_size=64 << 20, operation_id="replaceRates", tags=["rates"], opt=ADMIN,
     summary="Replace the rate table",
     description="JSON `{\"rates\": [...]}` or `text/csv` with the same columns; atomic (admin keys only).")
async def put_rates(request: Request[Any, Any, Any], state: State) -> LoadedOut:
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
        from litestar.exceptions import HTTPException

        raise HTTPException(status_code=415, detail=f"unsupported content type {ctype!r}: use application/json "
                                                    "or text/csv")
    # 100k rows take a fraction of a second: keep that off the event loop, and written in chunks
    # so that the SIP workers' writes never wait long for LMDB's writer lock (edge/control/rates.py)
    return LoadedOut(loaded=await asyncio.to_thread(rates.load, _store(state), table))


@get("/v1/rates/lookup", operation_id="lookupRate", tags=["rates"], summary="The rate of a number",
     description="The longest-prefix rate covering the number (404 if none).", **READ)
def rate_lookup(state: State, number: str = Parameter(pattern=r"^\+?[0-9]{1,20}$")) -> RateOut:
    rate = rates.rate_for(_store(state), number)
    if rate is None:
        raise NotFound(f"no rate covers {number}")
    return RateOut.of(rate)


@put("/v1/bundle-exclusions", operation_id="replaceBundleExclusions", tags=["rates"], opt=ADMIN,
     summary="Replace the US bundle exclusions", description="Prefixes never covered by a US bundle.", **THREAD)
def put_exclusions(data: ExclusionsPut, state: State) -> LoadedOut:
    return LoadedOut(loaded=rates.replace_exclusions(_store(state), data.prefixes))


@get("/v1/bundle-exclusions", operation_id="getBundleExclusions", tags=["rates"],
     summary="The US bundle exclusions", description="Prefixes never covered by a US bundle.", **READ)
def get_exclusions(state: State) -> PrefixesOut:
    return PrefixesOut(prefixes=rates.exclusions(_store(state)))


# ----------------------------------------------------------------- API keys

@post("/v1/api-keys", status_code=201, operation_id="createApiKey", tags=["keys"], opt=ADMIN,
      summary="Create an API key",
      description="Scope `admin`, `account` (with `account_id`, optionally `read_only`) or `metrics`. The key is "
                  "in this answer only: it is stored hashed.", **THREAD)
def create_key(data: ApiKeyCreate, state: State) -> ApiKeyCreated:
    rec, token = keys.create(_store(state), name=data.name, scope=data.scope, account_id=data.account_id,
                             read_only=data.read_only, rate_limit=data.rate_limit)
    return ApiKeyCreated.created(rec, token)


@get("/v1/api-keys", operation_id="listApiKeys", tags=["keys"], opt=ADMIN, summary="List API keys",
     description="Every key with its scope and last use (never the key itself).", **READ)
def list_keys(state: State, after: str = AfterId, limit: int = Limit) -> ApiKeyPage:
    items = keys.page(_store(state), after=after, limit=limit)
    return ApiKeyPage(items=[ApiKeyOut.of(k) for k in items], next_after=items[-1].id if len(items) == limit else None)


@delete("/v1/api-keys/{key_id:str}", status_code=204, operation_id="revokeApiKey", tags=["keys"], opt=ADMIN,
        summary="Revoke an API key", description="Refused (401) from the next request on.", **THREAD)
def revoke_key(key_id: str, state: State) -> None:
    keys.revoke(_store(state), key_id)


@get("/v1/audit", operation_id="listAudit", tags=["keys"], summary="The audit log",
     description="Every write: key id, method, path, status, source, time (an account key sees its account's).")
async def list_audit(request: Request[Any, Any, Any], state: State, after: int = After,
                     limit: int = Limit) -> AuditPage:
    who = _who(request)
    await state.audit.flush()
    items, nxt = audit.page(_store(state), after=after, limit=limit,
                            account_id=None if who.is_admin else who.account_id)
    return AuditPage(items=[AuditOut.of(e) for e in items], next_after=nxt)


# ----------------------------------------------------------------- webhooks

@post("/v1/accounts/{account_id:str}/webhooks", status_code=201, operation_id="createWebhook", tags=["webhooks"],
      summary="Subscribe to events",
      description="An endpoint for some of `call.started`, `call.ended`, `credit.low`, `auto_recharge.succeeded`, "
                  "`auto_recharge.failed`, `channels.exhausted`. The secret (given or generated) signs each "
                  "delivery (`Sipedge-Signature`) and is shown in this answer only.", **THREAD)
def create_webhook(account_id: str, data: WebhookCreate, state: State) -> WebhookCreated:
    hook = webhooks.create(_store(state), account_id, data.url, list(data.events), data.secret, data.description)
    return WebhookCreated.created(hook)


@get("/v1/accounts/{account_id:str}/webhooks", operation_id="listWebhooks", tags=["webhooks"],
     summary="The account's webhooks", description="Endpoints and their events (not the secrets).", **READ)
def list_webhooks(account_id: str, state: State) -> list[WebhookOut]:
    def op(txn: Txn) -> list[WebhookOut]:
        accounts.get(txn, account_id)
        return [WebhookOut.of(w) for w in webhooks.of_account(txn, account_id)]

    return _store(state).read(op)


@delete("/v1/accounts/{account_id:str}/webhooks/{webhook_id:str}", status_code=204, operation_id="deleteWebhook",
        tags=["webhooks"], summary="Delete a webhook", description="With its delivery log.", **THREAD)
def delete_webhook(account_id: str, webhook_id: str, state: State) -> None:
    webhooks.delete(_store(state), account_id, webhook_id)


@get("/v1/accounts/{account_id:str}/webhooks/{webhook_id:str}/deliveries", operation_id="listDeliveries",
     tags=["webhooks"], summary="Delivery log",
     description="Each event sent to the endpoint with its attempts (status, error, time), oldest first.", **READ)
def list_deliveries(account_id: str, webhook_id: str, state: State, after: int = After,
                    limit: int = Limit) -> DeliveryPage:
    def op(txn: Txn) -> DeliveryPage:
        webhooks.get(txn, account_id, webhook_id)
        items = [DeliveryOut.of(d) for d in webhooks.deliveries(txn, webhook_id, after=after, limit=limit)]
        return DeliveryPage(items=items, next_after=items[-1].event_seq if len(items) == limit else None)

    return _store(state).read(op)


ROUTES = [
    list_accounts, create_account, get_account, delete_account, put_admin_password, credit_account, account_ledger,
    list_all_profiles, create_profile, list_profiles, show_profile, patch_profile, delete_profile,
    get_credentials, rotate_credentials,
    credit_profile, put_auto_recharge, put_bundles,
    profile_calls, list_calls, list_registrations, hangup_call, profile_cdrs, account_cdrs, profile_ledger,
    profile_registrations,
    buy_number, list_numbers, release_number, attach_number, detach_number,
    create_business_account, list_business_accounts, attach_business_account, detach_business_account,
    put_rates, rate_lookup, put_exclusions, get_exclusions,
    create_key, list_keys, revoke_key, list_audit,
    create_webhook, list_webhooks, delete_webhook, list_deliveries,
]
