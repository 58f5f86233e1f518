"""The console's pages: the seed's steps (sign in, set up a SIP profile, read its registration
details, allocate credit, attach numbers and business accounts, test with the echo number).

Server-rendered Jinja2 pages with plain HTML forms (Post/Redirect/Get). Every read and
write is a request to the JSON API (:mod:`.apicall`); a refusal re-renders the page with
the API's ``detail`` and ``code`` beside the form that caused it, and the API's status.
``/static/console.js`` (30 lines, no build step) refreshes the live parts of a profile page.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import jinja2
import msgspec
from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException
from litestar.response import Redirect, Stream

from edge import __version__
from edge.control import console_auth
from edge.control.errors import SignInLocked, Unauthorized

from ..auth import BOOTSTRAP, Principal
from . import session as sess
from .apicall import Answer, call, stream

HERE = Path(__file__).parent
ECHO_NUMBER = "+17606604690"
MAX_FORM = 64 << 10
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    # Referrer-Policy no-referrer would make Chrome send "Origin: null" with every form
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
DONE = {  # ?done=... after a successful POST (fixed texts: nothing from the URL is echoed)
    "created": "Profile created. Note its registration details below to configure your PBX.",
    "credit": "Credit added.", "topup": "Credit added to the master balance.",
    "recharge": "Auto-recharge settings saved.", "bundles": "US minute bundles saved.",
    "number": "Number attached.", "detached": "Detached.", "business": "Business account attached.",
    "bought": "Number bought.", "released": "Number released.", "biz_created": "Business account created.",
    "password": "Admin password set. Other console sessions of this account were signed out.",
    "channels": "Channels saved.", "hangup": "Hang-up sent: the call ends within a second or so.",
}

templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                               trim_blocks=True, lstrip_blocks=True)


def _when(value: Any) -> str:
    """RFC 3339 from the API -> ``2026-12-02 19:04:05 UTC``."""
    if not value:
        return ""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return str(value)


templates.filters["when"] = _when


class SignInFirst(Exception):
    """No live session: pages redirect to the sign-in form, fragments answer 401."""


class CsrfRefused(Exception):
    """A POST without the session's CSRF token (or from another origin)."""


@dataclass(slots=True)
class Ctx:
    request: Request[Any, Any, Any]
    token: str
    session: console_auth.ConsoleSession
    who: Principal
    form: dict[str, str] = field(default_factory=dict)

    async def api(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Answer:
        return await call(self.request.app, self.request.scope, self.who, method, path, body=body, query=query,
                          audit=self.request.app.state.audit)

    def page(self, name: str, status: int = 200, **values: Any) -> Response[str]:
        done = self.request.query_params.get("done", "")
        return render(name, status, who=self.who, csrf=self.session.csrf, login=self.session.login,
                      done=DONE.get(done, ""), **values)


def render(name: str, status: int = 200, **values: Any) -> Response[str]:
    values.setdefault("who", None)
    values.setdefault("csrf", "")
    values.setdefault("done", "")
    html = templates.get_template(name).render(version=__version__, echo=ECHO_NUMBER, **values)
    return Response(html, status_code=status, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


async def _form(request: Request[Any, Any, Any]) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM:
        raise HTTPException(status_code=413, detail="form too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(status_code=400, detail="form is not UTF-8") from None
    return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=64))


async def _ctx(request: Request[Any, Any, Any], *, post: bool = False) -> Ctx:
    store = request.app.state.store
    found = await asyncio.to_thread(sess.session_from, store, request.cookies, request.scope)
    if found is None:
        raise SignInFirst()
    token, session = found
    who = await asyncio.to_thread(sess.principal_of_session, store, session, request.app.state.console_gate.token)
    if who is None:
        raise SignInFirst()
    ctx = Ctx(request, token, session, who)
    if post:
        ctx.form = await _form(request)
        if not sess.origin_ok(request.headers) or not sess.same_token(ctx.form.get("csrf", ""), session.csrf):
            raise CsrfRefused()
    return ctx


def _see(url: str, done: str = "") -> Redirect:
    return Redirect(url + (f"?done={done}" if done else ""), status_code=303)


def _home(who: Principal) -> str:
    return "/console/accounts" if who.is_admin else f"/console/accounts/{who.account_id}"


def _rfc3339(value: str) -> str:
    """A ``datetime-local`` input (``2026-12-02T19:00``, read as UTC) as RFC 3339; anything else as
    typed, for the API to accept or refuse with its own message."""
    value = value.strip()
    if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d", value):
        return value + ":00Z"
    if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", value):
        return value + "Z"
    return value


def _not_found(ctx: Ctx, answer: Answer) -> Response[str]:
    return ctx.page("error.html", answer.status, title="Not found", answer=answer)


# ------------------------------------------------------------------ sign-in

@get("/")
async def index(request: Request[Any, Any, Any]) -> Redirect:
    ctx = await _ctx(request)
    return _see(_home(ctx.who))


def _sign_in_page(request: Request[Any, Any, Any], status: int = 200, error: str = "", login: str = "",
                  mode: str = "password") -> Response[str]:
    token = sess.new_sign_in_token()
    resp = render("sign_in.html", status, sign_in_token=token, error=error, login_value=login, mode=mode)
    resp.headers["Set-Cookie"] = sess.cookie_header(request.scope, sess.SIGN_IN, token, max_age=3600)
    return resp


@get("/sign-in")
async def sign_in_form(request: Request[Any, Any, Any]) -> Response[str]:
    return _sign_in_page(request)


@post("/sign-in", status_code=200)
async def sign_in(request: Request[Any, Any, Any]) -> Response[Any]:
    form = await _form(request)
    expected = sess.cookie_of(request.cookies, request.scope, sess.SIGN_IN)
    if not sess.origin_ok(request.headers) or not sess.same_token(form.get("sign_in_token", ""), expected):
        return _sign_in_page(request, 403, "The sign-in form expired or was not sent by this page: try again.")
    store = request.app.state.store
    login, password, key = form.get("login", "").strip(), form.get("password", ""), form.get("key", "").strip()
    try:
        if key:
            token, session = await asyncio.to_thread(_key_sign_in, request, key)
        elif login and password:
            token, session = await asyncio.to_thread(console_auth.sign_in_password, store, login, password)
        else:
            return _sign_in_page(request, 422, "Enter the admin login and password, or an API key.", login)
    except SignInLocked as exc:
        return _sign_in_page(request, 429, exc.message, login, "key" if key else "password")
    except Unauthorized as exc:
        return _sign_in_page(request, 401, exc.message[:1].upper() + exc.message[1:] + ".", login,
                             "key" if key else "password")
    gate_token = request.app.state.console_gate.token
    who = sess.principal_of_session(store, session, gate_token)
    resp: Response[Any] = Redirect(_home(who) if who else "/console/sign-in", status_code=303)
    resp.headers["Set-Cookie"] = sess.cookie_header(request.scope, sess.SESSION, token)
    return resp


def _key_sign_in(request: Request[Any, Any, Any], key: str) -> tuple[str, console_auth.ConsoleSession]:
    """An API key (or the admin token): the Gate's own check. Failures lock the source address."""
    store, gate = request.app.state.store, request.app.state.console_gate
    client = request.scope.get("client")
    subject = f"key@{client[0] if client else '?'}"
    console_auth.refuse_if_locked(store, subject)
    who = gate.authenticate(b"Bearer " + key.encode("utf-8", "replace"))
    if who is None or who.scope == "metrics":
        if console_auth.note_failure(store, subject, time.time()):
            console_auth.refuse_if_locked(store, subject)
        raise Unauthorized("unknown, revoked or metrics-only key" if who is None else "a metrics key cannot sign in")
    digest = sess.bootstrap_digest(gate.token) if who.key_id == BOOTSTRAP else b""
    return console_auth.open_key_session(store, who.key_id, account_id=who.account_id, token_digest=digest,
                                         clear=subject)


@post("/sign-out", status_code=200)
async def sign_out(request: Request[Any, Any, Any]) -> Response[Any]:
    ctx = await _ctx(request, post=True)
    await asyncio.to_thread(console_auth.end_session, request.app.state.store, ctx.token)
    resp: Response[Any] = Redirect("/console/sign-in", status_code=303)
    resp.headers["Set-Cookie"] = sess.cookie_header(request.scope, sess.SESSION, "", max_age=0)
    return resp


# ------------------------------------------------------------------ accounts

@get("/accounts")
async def accounts_page(request: Request[Any, Any, Any], after: str = "") -> Response[Any]:
    ctx = await _ctx(request)
    if not ctx.who.is_admin:
        return _see(_home(ctx.who))
    answer = await ctx.api("GET", "/v1/accounts", query={"after": after, "limit": "100"})
    return ctx.page("accounts.html", accounts=answer.data["items"], next_after=answer.data["next_after"])


async def _overview(ctx: Ctx, account_id: str, status: int = 200, errors: dict[str, Answer] | None = None,
                    values: dict[str, str] | None = None) -> Response[Any]:
    acct = await ctx.api("GET", f"/v1/accounts/{quote(account_id)}")
    if not acct.ok:
        return _not_found(ctx, acct)
    profiles = await ctx.api("GET", f"/v1/accounts/{quote(account_id)}/profiles")
    numbers = await ctx.api("GET", f"/v1/accounts/{quote(account_id)}/numbers")
    business = await ctx.api("GET", f"/v1/accounts/{quote(account_id)}/business-accounts")
    has_password = await asyncio.to_thread(console_auth.has_password, ctx.request.app.state.store, account_id)
    return ctx.page("account.html", status, account=acct.data, profiles=profiles.data, numbers=numbers.data,
                    business=business.data, errors=errors or {}, values=values or {}, has_password=has_password)


@get("/accounts/{account_id:str}")
async def account_page(request: Request[Any, Any, Any], account_id: str) -> Response[Any]:
    return await _overview(await _ctx(request), account_id)


async def _account_action(request: Request[Any, Any, Any], account_id: str, what: str, method: str, path: str,
                          body: Any, done: str) -> Response[Any]:
    ctx = await _ctx(request, post=True)
    answer = await ctx.api(method, path, body(ctx.form) if callable(body) else body)
    if answer.ok:
        return _see(f"/console/accounts/{account_id}", done)
    return await _overview(ctx, account_id, answer.status, {what: answer}, ctx.form)


@post("/accounts/{account_id:str}/credit", status_code=200)
async def account_credit(request: Request[Any, Any, Any], account_id: str) -> Response[Any]:
    return await _account_action(request, account_id, "topup", "POST", f"/v1/accounts/{quote(account_id)}/credit",
                                 lambda f: {"amount": f.get("amount", "")}, "topup")


@post("/accounts/{account_id:str}/numbers", status_code=200)
async def account_buy_number(request: Request[Any, Any, Any], account_id: str) -> Response[Any]:
    return await _account_action(request, account_id, "buy", "POST", f"/v1/accounts/{quote(account_id)}/numbers",
                                 lambda f: {"number": f.get("number", "").strip()}, "bought")


@post("/accounts/{account_id:str}/numbers/{number:str}/release", status_code=200)
async def account_release_number(request: Request[Any, Any, Any], account_id: str, number: str) -> Response[Any]:
    return await _account_action(request, account_id, "release", "DELETE",
                                 f"/v1/accounts/{quote(account_id)}/numbers/{quote(number)}", None, "released")


@post("/accounts/{account_id:str}/business-accounts", status_code=200)
async def account_create_business(request: Request[Any, Any, Any], account_id: str) -> Response[Any]:
    return await _account_action(request, account_id, "business", "POST",
                                 f"/v1/accounts/{quote(account_id)}/business-accounts",
                                 lambda f: {"name": f.get("name", "").strip()}, "biz_created")


@post("/accounts/{account_id:str}/admin-password", status_code=200)
async def account_password(request: Request[Any, Any, Any], account_id: str) -> Response[Any]:
    return await _account_action(request, account_id, "password", "PUT",
                                 f"/v1/accounts/{quote(account_id)}/admin-password",
                                 lambda f: {"password": f.get("password", "")}, "password")


# ------------------------------------------------- set up a SIP profile

@get("/accounts/{account_id:str}/profiles/new")
async def new_profile_form(request: Request[Any, Any, Any], account_id: str) -> Response[Any]:
    ctx = await _ctx(request)
    acct = await ctx.api("GET", f"/v1/accounts/{quote(account_id)}")
    if not acct.ok:
        return _not_found(ctx, acct)
    return ctx.page("profile_new.html", account=acct.data, step="name", values={}, error=None)


@post("/accounts/{account_id:str}/profiles/new", status_code=200)
async def new_profile(request: Request[Any, Any, Any], account_id: str) -> Response[Any]:
    """The seed's steps 4-7: a name (Next), then channels and US bundles (Buy now)."""
    ctx = await _ctx(request, post=True)
    acct = await ctx.api("GET", f"/v1/accounts/{quote(account_id)}")
    if not acct.ok:
        return _not_found(ctx, acct)
    form = ctx.form
    if form.get("step") == "name":
        if not form.get("name", "").strip():
            return ctx.page("profile_new.html", 422, account=acct.data, step="name", values=form,
                            error=Answer(422, {"code": "validation_failed", "detail": "Enter a name for the profile"},
                                         {}))
        return ctx.page("profile_new.html", account=acct.data, step="channels", values=form, error=None)
    channels: Any = form.get("channels", "").strip()
    channels = int(channels) if re.fullmatch(r"-?\d{1,9}", channels) else channels
    created = await ctx.api("POST", f"/v1/accounts/{quote(account_id)}/profiles",
                            {"name": form.get("name", ""), "channels": channels})
    if not created.ok:
        return ctx.page("profile_new.html", created.status, account=acct.data, step="channels", values=form,
                        error=created)
    profile_id = created.data["id"]
    bundles = form.get("us_bundles", "").strip()
    if bundles not in ("", "0"):
        result = await _put_bundles(ctx, profile_id, bundles)
        if not result.ok:
            return await _profile(ctx, profile_id, result.status, {"bundles": result}, {"us_bundles": bundles},
                                  note="The profile was created; its US minute bundles were refused:")
    return _see(f"/console/profiles/{profile_id}", "created")


async def _put_bundles(ctx: Ctx, profile_id: str, text: str) -> Answer:
    value: Any = int(text) if re.fullmatch(r"-?\d{1,9}", text) else text
    return await ctx.api("PUT", f"/v1/profiles/{quote(profile_id)}/bundles", {"us_bundles": value})


# ------------------------------------------------------------------ profile

async def _profile(ctx: Ctx, profile_id: str, status: int = 200, errors: dict[str, Answer] | None = None,
                   values: dict[str, str] | None = None, credentials: Any = None, note: str = "") -> Response[Any]:
    prof = await ctx.api("GET", f"/v1/profiles/{quote(profile_id)}")
    if not prof.ok:
        return _not_found(ctx, prof)
    account_id = prof.data["account_id"]
    acct = await ctx.api("GET", f"/v1/accounts/{quote(account_id)}")
    numbers = await ctx.api("GET", f"/v1/accounts/{quote(account_id)}/numbers")
    business = await ctx.api("GET", f"/v1/accounts/{quote(account_id)}/business-accounts")
    live = await _live_values(ctx, profile_id)
    return ctx.page("profile.html", status, profile=prof.data, account=acct.data, numbers=numbers.data or [],
                    business=business.data or [], errors=errors or {}, values=values or {},
                    credentials=credentials, note=note, **live)


async def _live_values(ctx: Ctx, profile_id: str) -> dict[str, Any]:
    prof = await ctx.api("GET", f"/v1/profiles/{quote(profile_id)}")
    calls = await ctx.api("GET", f"/v1/profiles/{quote(profile_id)}/calls")
    regs = await ctx.api("GET", f"/v1/profiles/{quote(profile_id)}/registrations")
    return {"live": prof.data, "calls": calls.data or [], "registrations": regs.data or []}


@get("/profiles/{profile_id:str}")
async def profile_page(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    return await _profile(await _ctx(request), profile_id)


@get("/profiles/{profile_id:str}/live")
async def profile_live(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    """The live part of the profile page (channels in use, credit, calls, registrations), polled."""
    ctx = await _ctx(request)
    prof = await ctx.api("GET", f"/v1/profiles/{quote(profile_id)}")
    if not prof.ok:
        return _not_found(ctx, prof)
    return ctx.page("live.html", **await _live_values(ctx, profile_id))


@post("/profiles/{profile_id:str}/credentials", status_code=200)
async def reveal_credentials(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    """The SIP password, on request only (a POST: it is never in a URL or the browser's history)."""
    ctx = await _ctx(request, post=True)
    cred = await ctx.api("GET", f"/v1/profiles/{quote(profile_id)}/credentials")
    if not cred.ok:
        return _not_found(ctx, cred)
    resp = await _profile(ctx, profile_id, credentials=cred.data)
    return resp


async def _profile_action(request: Request[Any, Any, Any], profile_id: str, what: str, method: str, path: str,
                          body: Any, done: str) -> Response[Any]:
    ctx = await _ctx(request, post=True)
    answer = await ctx.api(method, path, body(ctx.form) if callable(body) else body)
    if answer.ok:
        return _see(f"/console/profiles/{profile_id}", done)
    if answer.status == 404 and what not in ("number", "business", "hangup"):
        return _not_found(ctx, answer)
    return await _profile(ctx, profile_id, answer.status, {what: answer}, ctx.form)


@post("/profiles/{profile_id:str}/credit", status_code=200)
async def profile_credit(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    return await _profile_action(request, profile_id, "credit", "POST", f"/v1/profiles/{quote(profile_id)}/credit",
                                 lambda f: {"amount": f.get("amount", "").strip()}, "credit")


@post("/profiles/{profile_id:str}/calls/{call_id:str}/hangup", status_code=200)
async def profile_hangup(request: Request[Any, Any, Any], profile_id: str, call_id: str) -> Response[Any]:
    """End a live call from the page (the API's operator action: BYE to both legs, settled as usual)."""
    return await _profile_action(request, profile_id, "hangup", "POST", f"/v1/calls/{quote(call_id)}/hangup",
                                 {"cause": 487}, "hangup")


@post("/profiles/{profile_id:str}/auto-recharge", status_code=200)
async def profile_auto_recharge(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    return await _profile_action(
        request, profile_id, "recharge", "PUT", f"/v1/profiles/{quote(profile_id)}/auto-recharge",
        lambda f: {"enabled": f.get("enabled") == "on", "amount": f.get("amount", "").strip() or "0",
                   "min_balance": f.get("min_balance", "").strip() or "0"}, "recharge")


@post("/profiles/{profile_id:str}/bundles", status_code=200)
async def profile_bundles(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    ctx = await _ctx(request, post=True)
    answer = await _put_bundles(ctx, profile_id, ctx.form.get("us_bundles", "").strip())
    if answer.ok:
        return _see(f"/console/profiles/{profile_id}", "bundles")
    if answer.status == 404:
        return _not_found(ctx, answer)
    return await _profile(ctx, profile_id, answer.status, {"bundles": answer}, ctx.form)


@post("/profiles/{profile_id:str}/channels", status_code=200)
async def profile_channels(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    def body(form: dict[str, str]) -> dict[str, Any]:
        text = form.get("channels", "").strip()
        return {"channels": int(text) if re.fullmatch(r"-?\d{1,9}", text) else text}

    return await _profile_action(request, profile_id, "channels", "PATCH", f"/v1/profiles/{quote(profile_id)}",
                                 body, "channels")


@post("/profiles/{profile_id:str}/numbers", status_code=200)
async def profile_attach_number(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    def body(form: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {"number": form.get("number", "").strip()}
        if form.get("extension", "").strip():
            out["extension"] = form["extension"].strip()
        return out

    return await _profile_action(request, profile_id, "number", "POST", f"/v1/profiles/{quote(profile_id)}/numbers",
                                 body, "number")


@post("/profiles/{profile_id:str}/numbers/{number:str}/detach", status_code=200)
async def profile_detach_number(request: Request[Any, Any, Any], profile_id: str, number: str) -> Response[Any]:
    return await _profile_action(request, profile_id, "number", "DELETE",
                                 f"/v1/profiles/{quote(profile_id)}/numbers/{quote(number)}", None, "detached")


@post("/profiles/{profile_id:str}/business-accounts", status_code=200)
async def profile_attach_business(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    return await _profile_action(request, profile_id, "business", "POST",
                                 f"/v1/profiles/{quote(profile_id)}/business-accounts",
                                 lambda f: {"name": f.get("name", "").strip()}, "business")


@post("/profiles/{profile_id:str}/business-accounts/{name:str}/detach", status_code=200)
async def profile_detach_business(request: Request[Any, Any, Any], profile_id: str, name: str) -> Response[Any]:
    return await _profile_action(request, profile_id, "business", "DELETE",
                                 f"/v1/profiles/{quote(profile_id)}/business-accounts/{quote(name)}", None,
                                 "detached")


# ------------------------------------------------------------ ledger, CDRs

def _range(request: Request[Any, Any, Any]) -> dict[str, str]:
    return {"from": _rfc3339(request.query_params.get("from", "")), "to": _rfc3339(request.query_params.get("to", ""))}


def _ledger_page(ctx: Ctx, profile_id: str, span: dict[str, str], after: str, limit: int) -> Awaitable[Answer]:
    """One page of the profile's ledger in the range, filtered by the API itself."""
    return ctx.api("GET", f"/v1/profiles/{quote(profile_id)}/ledger",
                   query={**span, "after": after, "limit": str(limit)})


@get("/profiles/{profile_id:str}/ledger")
async def ledger_page(request: Request[Any, Any, Any], profile_id: str, after: int = 0) -> Response[Any]:
    ctx = await _ctx(request)
    prof = await ctx.api("GET", f"/v1/profiles/{quote(profile_id)}")
    if not prof.ok:
        return _not_found(ctx, prof)
    page = await _ledger_page(ctx, profile_id, _range(request), str(after), 100)
    return ctx.page("ledger.html", page.status, profile=prof.data, items=page.data.get("items", []) if page.ok else [],
                    next_after=page.data.get("next_after") if page.ok else None, error=None if page.ok else page,
                    span=dict(request.query_params))


LEDGER_CSV_FIELDS = ("seq", "ts", "kind", "amount", "balance_after", "ref")


@get("/profiles/{profile_id:str}/ledger.csv")
async def ledger_csv(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    """Every entry of the range as CSV, streamed page by page (the API has no ledger CSV of its own)."""
    ctx = await _ctx(request)
    span = _range(request)
    first = await _ledger_page(ctx, profile_id, span, "0", 1000)
    if not first.ok:
        return ctx.page("error.html", first.status, title="Refused", answer=first)

    def rows(items: list[dict[str, Any]]) -> bytes:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([e[f] for f in LEDGER_CSV_FIELDS] for e in items)
        return out.getvalue().encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield (",".join(LEDGER_CSV_FIELDS) + "\n").encode() + rows(first.data["items"])
        after = first.data["next_after"]
        while after is not None:
            page = await _ledger_page(ctx, profile_id, span, str(after), 1000)
            if not page.ok:     # the profile went away mid-export: the file ends here
                return
            yield rows(page.data["items"])
            after = page.data["next_after"]

    return Stream(chunks(), media_type="text/csv; charset=utf-8", headers={
        **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="ledger-{profile_id}.csv"'})


@get("/profiles/{profile_id:str}/cdrs")
async def cdrs_page(request: Request[Any, Any, Any], profile_id: str, after: int = 0) -> Response[Any]:
    ctx = await _ctx(request)
    prof = await ctx.api("GET", f"/v1/profiles/{quote(profile_id)}")
    if not prof.ok:
        return _not_found(ctx, prof)
    span = _range(request)
    page = await ctx.api("GET", f"/v1/profiles/{quote(profile_id)}/cdrs",
                         query={**span, "after": str(after), "limit": "100"})
    csv_query = "&".join(f"{k}={quote(v)}" for k, v in span.items() if v)
    return ctx.page("cdrs.html", page.status, profile=prof.data, items=page.data.get("items", []) if page.ok else [],
                    next_after=page.data.get("next_after") if page.ok else None, error=None if page.ok else page,
                    span=dict(request.query_params), csv_query=csv_query)


@get("/profiles/{profile_id:str}/cdrs.csv")
async def cdrs_csv(request: Request[Any, Any, Any], profile_id: str) -> Response[Any]:
    """The API's own CSV export (``format=csv`` with the page's range), streamed through."""
    ctx = await _ctx(request)
    path = f"/v1/profiles/{quote(profile_id)}/cdrs"
    status, headers, chunks = await stream(request.app, request.scope, ctx.who, path,
                                           {"format": "csv", **_range(request)})
    if status != 200:
        answer = Answer(status, msgspec.json.decode(b"".join([c async for c in chunks]) or b"{}"), headers)
        return ctx.page("error.html", status, title="Refused", answer=answer)
    return Stream(chunks, media_type="text/csv", headers={
        **SECURITY_HEADERS, "Content-Disposition": headers.get("content-disposition", "attachment")})


# ------------------------------------------------------------------ static

@get("/static/{name:str}", sync_to_thread=False)
def static(name: str) -> Response[bytes]:
    if name not in STATIC:
        raise HTTPException(status_code=404, detail=f"no such file: {name}")
    return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name],
                    headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})


@get("/{rest:path}", sync_to_thread=False)
def unknown_page(rest: str) -> Response[str]:
    """Any other /console path: a page that says so (not the API's JSON problem)."""
    return render("error.html", 404, title="Not found", answer=Answer(404, {
        "code": "not_found", "detail": "There is no such console page."}, {}))


# ---------------------------------------------------------------- errors

def _on_sign_in_first(request: Request[Any, Any, Any], exc: SignInFirst) -> Response[Any]:
    if request.headers.get("x-requested-with") == "fetch":
        return Response("", status_code=401, headers=SECURITY_HEADERS)
    return Redirect("/console/sign-in", status_code=303)


def _on_csrf(request: Request[Any, Any, Any], exc: CsrfRefused) -> Response[Any]:
    return render("error.html", 403, title="Refused", answer=Answer(403, {
        "code": "csrf_failed", "detail": "This form was not sent by a console page of this session (missing or "
                                         "wrong CSRF token). Reload the page and try again."}, {}))


def _on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return render("error.html", exc.status_code, title="Error",
                  answer=Answer(exc.status_code, {"code": "bad_request", "detail": str(exc.detail)}, {}))


def router() -> Router:
    """Every console route under ``/console`` (not in the OpenAPI document: pages, not API)."""
    return Router(
        path="/console", include_in_schema=False, opt={"access": "public"},
        route_handlers=[index, sign_in_form, sign_in, sign_out, accounts_page, account_page, account_credit,
                        account_buy_number, account_release_number, account_create_business, account_password,
                        new_profile_form, new_profile, profile_page, profile_live, reveal_credentials, profile_hangup,
                        profile_credit, profile_auto_recharge, profile_bundles, profile_channels,
                        profile_attach_number, profile_detach_number, profile_attach_business,
                        profile_detach_business, ledger_page, ledger_csv, cdrs_page, cdrs_csv, static,
                        unknown_page],
        exception_handlers={SignInFirst: _on_sign_in_first, CsrfRefused: _on_csrf,
                            HTTPException: _on_http},
    )
