"""``sipedge account|profile|number|rates|keys|cdrs ...``: provisioning over the control API.

Every command is one or a few HTTP requests with a key (``--key``, or env ``SIPEDGE_API_KEY``, or
``SIPEDGE_ADMIN_TOKEN``) against ``--api`` (env ``SIPEDGE_API``, default ``http://127.0.0.1:8080``):
the CLI holds no state and needs no access to the store, so it works against a remote edge and
sees exactly what a provisioning system sees. Output is a table (``rich``) for people, or the
API's JSON with ``--json`` for scripts. A refusal of the API (RFC 9457 problem) is printed as one
line with its status and ``code`` on stderr and exits 1; a usage error exits 2 (argparse).

Lists of accounts, profiles and keys follow ``next_after`` one request per page; CDR pages are
shown one at a time (``--after``), and ``cdrs export`` streams a CSV or JSON Lines export to a
file or stdout without holding it in memory.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
import msgspec

DEFAULT_API = "http://127.0.0.1:8080"
TIMEOUT = 30.0
PAGE = 1000
GROUPS = ("account", "profile", "number", "rates", "keys", "cdrs")


class ProblemError(Exception):
    """The API refused the request, or could not be reached: one line for stderr."""


class Api:
    """A thin client of the control API: JSON in, JSON out, problems raised as :class:`ProblemError`."""

    def __init__(self, base: str, key: str, timeout: float = TIMEOUT) -> None:
        self.http = httpx.Client(base_url=base.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {key}", "Accept": "application/json",
                                          "User-Agent": "sipedge-cli"})

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None, content: bytes | None = None) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            r = self.http.request(method, path, json=body, params=query, headers=headers, content=content)
        except httpx.HTTPError as exc:
            raise ProblemError(f"cannot reach {self.http.base_url}: {exc}") from None
        if r.status_code >= 400:
            raise ProblemError(problem_line(method, path, r))
        return r.json() if r.content else None

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a paged list, one request per page (``next_after``)."""
        after: Any = None
        while True:
            page = self.call("GET", path, params={**(params or {}), "limit": PAGE, "after": after})
            yield from page["items"]
            after = page.get("next_after")
            if after is None:
                return

    def stream_to(self, path: str, params: dict[str, Any], out: Any) -> int:
        """Copy a streamed export into ``out`` (a binary file); :returns: bytes written."""
        query = {k: v for k, v in params.items() if v is not None}
        written = 0
        try:
            with self.http.stream("GET", path, params=query, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ProblemError(problem_line("GET", path, r))
                for block in r.iter_bytes():
                    out.write(block)
                    written += len(block)
        except httpx.HTTPError as exc:
            raise ProblemError(f"cannot reach {self.http.base_url}: {exc}") from None
        return written


def problem_line(method: str, path: str, r: httpx.Response) -> str:
    """``409 insufficient_funds: <detail> (POST /v1/...)``; field errors of a 422 appended."""
    try:
        problem = r.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    code = problem.get("code", "http_error")
    detail = problem.get("detail") or r.reason_phrase
    fields = "; ".join(f"{e.get('pointer') or e.get('parameter') or '?'}: {e.get('detail', '')}"
                       for e in problem.get("errors") or [] if isinstance(e, dict))
    if fields and fields not in detail:
        detail = f"{detail} [{fields}]"
    return f"{r.status_code} {code}: {detail} ({method} {path})"


# ------------------------------------------------------------------ output

#: the columns of a table of each kind of object, in order (``--json`` prints every field)
COLUMNS: dict[str, tuple[str, ...]] = {
    "account": ("id", "name", "admin", "balance", "created_at"),
    "profile": ("id", "account_id", "name", "channels", "channels_in_use", "auth", "sip_username", "balance",
                "us_bundles", "numbers"),
    "number": ("number", "account_id", "profile_id", "extension"),
    "key": ("id", "name", "scope", "account_id", "read_only", "created_at", "last_used_at", "revoked_at"),
    "cdr": ("seq", "call_id", "profile_id", "direction", "caller", "callee", "carrier", "started_at",
            "talk_seconds", "duration", "status", "end_reason", "cost"),
    "ledger": ("seq", "ts", "kind", "amount", "balance_after", "ref"),
}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


class Output:
    """Tables or JSON on ``out``; wide enough when piped that ids are never folded."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        from rich.console import Console

        self.out = out
        self.as_json = as_json
        width = None if out.isatty() else 250
        self.console = Console(file=out, width=width, highlight=False, soft_wrap=False)

    def json(self, value: Any) -> None:
        self.out.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")

    def table(self, kind: str, items: list[dict[str, Any]], *, title: str | None = None) -> None:
        if self.as_json:
            self.json(items)
            return
        from rich.table import Table

        table = Table(title=title, box=None, header_style="bold", pad_edge=False)
        for col in COLUMNS[kind]:
            table.add_column(col.upper(), no_wrap=True, justify="right" if col in ("balance", "cost", "amount",
                                                                                  "balance_after") else "left")
        for item in items:
            table.add_row(*(_cell(item.get(col)) for col in COLUMNS[kind]))
        self.console.print(table)
        if not items:
            self.console.print(f"(no {kind}s)")

    def record(self, value: dict[str, Any], *, note: str | None = None) -> None:
        """One object as FIELD  VALUE lines (every field)."""
        if self.as_json:
            self.json(value)
            return
        from rich.table import Table

        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(no_wrap=True)
        for name, item in value.items():
            table.add_row(name, _cell(item))
        self.console.print(table)
        if note:
            self.console.print(note)


# ------------------------------------------------------------------ commands

Handler = Any   # (Api, argparse.Namespace, Output) -> None


def _account(api: Api, a: argparse.Namespace, o: Output) -> None:
    if a.action == "create":
        o.record(api.call("POST", "/v1/accounts", body={"name": a.name, "admin": a.admin}))
    elif a.action == "list":
        o.table("account", list(api.pages("/v1/accounts")))
    elif a.action == "show":
        o.record(api.call("GET", f"/v1/accounts/{a.id}"))
    elif a.action == "credit":
        o.record(api.call("POST", f"/v1/accounts/{a.id}/credit", body={"amount": a.amount},
                          headers=_idempotency(a)))
    elif a.action == "ledger":
        page = api.call("GET", f"/v1/accounts/{a.id}/ledger", params={"after": a.after, "limit": a.limit})
        _page(o, "ledger", page)
    elif a.action == "delete":
        api.call("DELETE", f"/v1/accounts/{a.id}")
        _done(o, {"deleted": a.id})


def _profile(api: Api, a: argparse.Namespace, o: Output) -> None:
    if a.action == "create":
        body: dict[str, Any] = {"name": a.name, "channels": a.channels, "auth": a.auth}
        if a.allowed_ip:
            body["allowed_ips"] = a.allowed_ip
        if a.static_contact:
            body["static_contact"] = a.static_contact
        o.record(api.call("POST", f"/v1/accounts/{a.account}/profiles", body=body),
                 note="the SIP password is shown here once (again: sipedge profile credentials ID)")
    elif a.action == "list":
        path = f"/v1/accounts/{a.account}/profiles" if a.account else None
        o.table("profile", api.call("GET", path) if path else list(api.pages("/v1/profiles")))
    elif a.action == "show":
        o.record(api.call("GET", f"/v1/profiles/{a.id}"))
    elif a.action == "update":
        patch = {k: v for k, v in (("name", a.name), ("channels", a.channels), ("auth", a.auth),
                                   ("allowed_ips", a.allowed_ip), ("static_contact", a.static_contact))
                 if v is not None}
        if a.no_static_contact:
            patch["static_contact"] = None
        if not patch:
            raise UsageError("profile update: nothing to change (--name, --channels, --auth, ...)")
        o.record(api.call("PATCH", f"/v1/profiles/{a.id}", body=patch))
    elif a.action == "delete":
        api.call("DELETE", f"/v1/profiles/{a.id}")
        _done(o, {"deleted": a.id})
    elif a.action == "credit":
        o.record(api.call("POST", f"/v1/profiles/{a.id}/credit", body={"amount": a.amount},
                          headers=_idempotency(a)))
    elif a.action == "credentials":
        verb, path = ("POST", f"/v1/profiles/{a.id}/credentials/rotate") if a.rotate else \
            ("GET", f"/v1/profiles/{a.id}/credentials")
        o.record(api.call(verb, path))
    elif a.action == "auto-recharge":
        body = {"enabled": a.state == "on", "amount": a.amount, "min_balance": a.min_balance}
        o.record(api.call("PUT", f"/v1/profiles/{a.id}/auto-recharge",
                          body={k: v for k, v in body.items() if v is not None}))
    elif a.action == "bundles":
        o.record(api.call("PUT", f"/v1/profiles/{a.id}/bundles", body={"us_bundles": a.count}))
    elif a.action == "ledger":
        page = api.call("GET", f"/v1/profiles/{a.id}/ledger", params={"after": a.after, "limit": a.limit})
        _page(o, "ledger", page)


def _number(api: Api, a: argparse.Namespace, o: Output) -> None:
    if a.action == "buy":
        o.record(api.call("POST", f"/v1/accounts/{a.account}/numbers", body={"number": a.number}))
    elif a.action == "list":
        o.table("number", api.call("GET", f"/v1/accounts/{a.account}/numbers"))
    elif a.action == "attach":
        body = {"number": a.number, **({"extension": a.extension} if a.extension else {})}
        o.record(api.call("POST", f"/v1/profiles/{a.profile}/numbers", body=body))
    elif a.action == "detach":
        api.call("DELETE", f"/v1/profiles/{a.profile}/numbers/{a.number}")
        _done(o, {"detached": a.number, "profile_id": a.profile})
    elif a.action == "release":
        api.call("DELETE", f"/v1/accounts/{a.account}/numbers/{a.number}")
        _done(o, {"released": a.number, "account_id": a.account})


def _rates(api: Api, a: argparse.Namespace, o: Output) -> None:
    if a.action == "load":
        try:
            data = sys.stdin.buffer.read() if a.file == "-" else Path(a.file).read_bytes()
        except OSError as exc:
            raise UsageError(f"rates load: {a.file}: {exc.strerror}") from None
        csv_file = a.format == "csv" or (a.format is None and not a.file.endswith(".json"))
        ctype = "text/csv" if csv_file else "application/json"
        o.record(api.call("PUT", "/v1/rates", content=data, headers={"Content-Type": ctype}))
    elif a.action == "lookup":
        o.record(api.call("GET", "/v1/rates/lookup", params={"number": a.number}))


def _keys(api: Api, a: argparse.Namespace, o: Output) -> None:
    if a.action == "create":
        body: dict[str, Any] = {"scope": a.scope, "name": a.name, "read_only": a.read_only}
        if a.account:
            body["account_id"] = a.account
        if a.rate_limit is not None:
            body["rate_limit"] = a.rate_limit
        o.record(api.call("POST", "/v1/api-keys", body=body), note="the key is shown once: store it now")
    elif a.action == "list":
        o.table("key", list(api.pages("/v1/api-keys")))
    elif a.action == "revoke":
        api.call("DELETE", f"/v1/api-keys/{a.id}")
        _done(o, {"revoked": a.id})


def _cdrs(api: Api, a: argparse.Namespace, o: Output) -> None:
    path = f"/v1/profiles/{a.profile}/cdrs" if a.profile else f"/v1/accounts/{a.account}/cdrs"
    when = {"from": a.start, "to": a.end}
    if a.action == "list":
        page = api.call("GET", path, params={**when, "after": a.after, "limit": a.limit})
        _page(o, "cdr", page)
        return
    if a.output in (None, "-"):
        api.stream_to(path, {**when, "format": a.format}, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    with open(a.output, "wb") as out:
        size = api.stream_to(path, {**when, "format": a.format}, out)
    print(f"wrote {size} bytes to {a.output}", file=sys.stderr)


def _page(o: Output, kind: str, page: dict[str, Any]) -> None:
    if o.as_json:
        o.json(page)
        return
    o.table(kind, page["items"])
    if page.get("next_after") is not None:
        o.console.print(f"more: --after {page['next_after']}")


def _done(o: Output, what: dict[str, Any]) -> None:
    if o.as_json:
        o.json(what)
    else:
        o.console.print(" ".join(f"{k} {v}" for k, v in what.items()))


def _idempotency(a: argparse.Namespace) -> dict[str, str] | None:
    return {"Idempotency-Key": a.idempotency_key} if a.idempotency_key else None


class UsageError(Exception):
    """A command line that cannot be sent (exit 2)."""


HANDLERS: dict[str, Handler] = {"account": _account, "profile": _profile, "number": _number, "rates": _rates,
                                "keys": _keys, "cdrs": _cdrs}


# ------------------------------------------------------------------ parser


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", help=f"control API base URL (env SIPEDGE_API; default {DEFAULT_API})")
    common.add_argument("--key", help="an API key or the admin token (env SIPEDGE_API_KEY or SIPEDGE_ADMIN_TOKEN)")
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    common.add_argument("--timeout", type=float, default=TIMEOUT, help="HTTP timeout in seconds")
    return common


def _actions(sub: Any, group: str, help_text: str, common: argparse.ArgumentParser) -> Any:
    parser = sub.add_parser(group, help=help_text, description=help_text)
    parser.set_defaults(fn=run, group=group)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=text, description=text, parents=[common])

    return action


def _money_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")
    p.add_argument("amount", help='a decimal amount, e.g. "100.00"')
    p.add_argument("--idempotency-key", help="a retry with the same key moves no money twice")


def _page_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--after", type=int, help="the seq after which the page starts (from 'more: --after N')")
    p.add_argument("--limit", type=int, default=100, help="entries per page (1..1000)")


def register(sub: Any) -> None:
    """Add the provisioning commands to ``sipedge``'s subparsers (``edge/cli.py``)."""
    common = _common()

    act = _actions(sub, "account", "accounts and their master balance", common)
    p = act("create", "create an account")
    p.add_argument("name")
    p.add_argument("--admin", required=True, help="the account administrator's login")
    act("list", "every account (one request per page)")
    act("show", "one account").add_argument("id")
    _money_args(act("credit", "top up the master balance"))
    p = act("ledger", "the master balance's ledger, one page")
    p.add_argument("id")
    _page_args(p)
    act("delete", "delete an account (refused while it has profiles or credit)").add_argument("id")

    act = _actions(sub, "profile", "SIP profiles: channels, auth, credit, credentials", common)
    p = act("create", "create a profile (prints its SIP password once)")
    p.add_argument("account", help="account id")
    p.add_argument("name")
    p.add_argument("--channels", type=int, required=True, help="concurrent calls (1..300)")
    p.add_argument("--auth", choices=["digest", "ip"], default="digest")
    p.add_argument("--allowed-ip", action="append", metavar="CIDR", help="ip auth: a source (repeatable)")
    p.add_argument("--static-contact", metavar="URI", help="ip auth: where incoming calls go (sip:host:port)")
    act("list", "profiles of an account, or every profile").add_argument("--account", help="account id")
    act("show", "one profile").add_argument("id")
    p = act("update", "change a profile")
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--channels", type=int)
    p.add_argument("--auth", choices=["digest", "ip"])
    p.add_argument("--allowed-ip", action="append", metavar="CIDR", help="replaces the list (repeatable)")
    p.add_argument("--static-contact", metavar="URI")
    p.add_argument("--no-static-contact", action="store_true", help="remove the static contact")
    act("delete", "delete a profile (its credit returns to the account)").add_argument("id")
    _money_args(act("credit", "allocate credit from the account's master balance"))
    p = act("credentials", "the SIP username and password")
    p.add_argument("id")
    p.add_argument("--rotate", action="store_true", help="generate a new password")
    p = act("auto-recharge", "turn auto-recharge on or off")
    p.add_argument("id")
    p.add_argument("state", choices=["on", "off"])
    p.add_argument("--amount", help="allocated each time the balance falls below --min-balance")
    p.add_argument("--min-balance")
    p = act("bundles", "set the US bundles")
    p.add_argument("id")
    p.add_argument("count", type=int)
    p = act("ledger", "the profile's ledger, one page")
    p.add_argument("id")
    _page_args(p)

    act = _actions(sub, "number", "online numbers: buy, attach, detach, release", common)
    p = act("buy", "buy a number for an account")
    p.add_argument("account")
    p.add_argument("number", help="E.164 with +")
    act("list", "numbers of an account").add_argument("account")
    p = act("attach", "attach a number to a profile")
    p.add_argument("profile")
    p.add_argument("number")
    p.add_argument("--extension")
    p = act("detach", "detach a number from a profile")
    p.add_argument("profile")
    p.add_argument("number")
    p = act("release", "release a number of an account")
    p.add_argument("account")
    p.add_argument("number")

    act = _actions(sub, "rates", "the rate table", common)
    p = act("load", "replace the rate table from a CSV or JSON file (- for stdin)")
    p.add_argument("file")
    p.add_argument("--format", choices=["csv", "json"], help="default: json for *.json, csv otherwise")
    act("lookup", "the rate of a number").add_argument("number")

    act = _actions(sub, "keys", "API keys", common)
    p = act("create", "create a key (shown once)")
    p.add_argument("--scope", choices=["admin", "account", "metrics"], required=True)
    p.add_argument("--account", help="scope account: the account it sees")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--name", default="key")
    p.add_argument("--rate-limit", type=float, help="requests/s (default: the node's)")
    act("list", "every key (one request per page)")
    act("revoke", "revoke a key at once").add_argument("id")

    act = _actions(sub, "cdrs", "call detail records: pages and exports", common)
    for name, text in (("list", "one page of CDRs"), ("export", "a streamed CSV or JSON Lines export")):
        p = act(name, text)
        owner = p.add_mutually_exclusive_group(required=True)
        owner.add_argument("--profile", help="profile id")
        owner.add_argument("--account", help="account id (every profile)")
        p.add_argument("--from", dest="start", metavar="RFC3339", help="calls started at or after this time")
        p.add_argument("--to", dest="end", metavar="RFC3339", help="calls started before this time")
        if name == "list":
            _page_args(p)
        else:
            p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
            p.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    key = args.key or os.environ.get("SIPEDGE_API_KEY") or os.environ.get("SIPEDGE_ADMIN_TOKEN")
    prog = f"sipedge {args.group} {args.action}"
    if not key:
        print(f"{prog}: no key: --key, or env SIPEDGE_API_KEY or SIPEDGE_ADMIN_TOKEN", file=sys.stderr)
        return 2
    api = Api(args.api or os.environ.get("SIPEDGE_API") or DEFAULT_API, key, timeout=args.timeout)
    try:
        HANDLERS[args.group](api, args, Output(out or sys.stdout, args.json))
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except ProblemError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        api.close()
    return 0
