"""``sipedge status``: a terminal view of a running edge, from its control API and ``/metrics``.

Profiles are enumerated from ``/metrics`` (``edge_channels_capacity`` carries every profile id, read
from the store at scrape time), then the profiles, live calls, registrations and accounts come from the
control API's paged endpoints with the admin token, one request per page (never one per profile).
``/metrics`` may have a listener of its own (``--metrics``, or ``[api] metrics_listen`` of ``--config``);
the token goes along, for ``[api] metrics_auth``. Without a valid token the view still shows what
``/metrics`` knows (channels, credit, registration counts) and says why the rest is missing.

Works against a remote edge: ``sipedge status --api https://edge1.example:8080 --token T`` (or env
``SIPEDGE_ADMIN_TOKEN``); locally ``--config sipedge.toml`` finds the API address and the token.
Only the standard library and msgspec/prometheus-client (already dependencies) are used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO

import msgspec

DEFAULT_API = "http://127.0.0.1:8080"
TIMEOUT = 5.0


class StatusError(Exception):
    """The edge cannot be reached or answered something unusable."""


# ------------------------------------------------------------------ data


@dataclass
class ProfileView:
    id: str
    name: str
    account: str
    capacity: int
    in_use: int
    balance: str
    registrations: int
    auto_recharge: dict[str, Any] | None = None        # enabled, amount, min_balance (from the API)
    min_balance: str | None = None                      # from /metrics when the API is not available
    auto_recharge_on: bool | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    bindings: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Snapshot:
    api: str
    taken_at: float
    healthy: bool
    profiles: list[ProfileView]
    accounts: dict[str, dict[str, Any]]                # id -> {"name", "balance"}
    totals: dict[str, float]                           # edge-wide counters/gauges from /metrics
    api_error: str | None = None                       # why per-profile details are missing


class Client:
    def __init__(self, api: str, token: str | None, timeout: float = TIMEOUT, metrics: str | None = None) -> None:
        self.api = api.rstrip("/")
        self.metrics = (metrics or api).rstrip("/")     # api.metrics_listen, when /metrics has its own listener
        self.token = token
        self.timeout = timeout

    def get(self, path: str, *, auth: bool = True, base: str | None = None) -> bytes:
        req = urllib.request.Request((base or self.api) + path, headers={"Accept": "application/json"})
        if auth and self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise ApiHTTPError(exc.code, f"GET {path}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StatusError(f"cannot reach {self.api}: {reason}") from None

    def json(self, path: str) -> Any:
        return msgspec.json.decode(self.get(path))

    def pages(self, path: str, limit: int = 1000) -> Any:
        """Every item of a paged endpoint (``{"items", "next_after"}``), one request per page."""
        after = ""
        while True:
            page = self.json(f"{path}?limit={limit}&after={urllib.parse.quote(str(after))}")
            yield from page["items"]
            after = page.get("next_after")
            if after is None:
                return


class ApiHTTPError(StatusError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name (``edge_calls_started_total`` etc.) from the Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _sum(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, ()) if all(labels.get(k) == want for k, want in match.items()))


def _ts(value: Any) -> float:
    """An RFC 3339 timestamp of the API (or a number) as Unix seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    from datetime import datetime

    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _money(value: float) -> str:
    return f"{Decimal(str(value)).quantize(Decimal('0.01'))}"


def collect(client: Client, only: list[str] | None = None, details: bool = True) -> Snapshot:
    """One snapshot: ``/healthz``, ``/metrics`` and (with a token) the API views of every profile."""
    try:
        client.get("/healthz", auth=False)
        healthy = True
    except ApiHTTPError:
        healthy = False
    # the token goes along: with api.metrics_auth, /metrics needs a metrics or admin key
    samples = parse_metrics(client.get("/metrics", base=client.metrics).decode())

    by_profile: dict[str, dict[str, Any]] = {}
    names = {labels.get("profile", ""): labels.get("profile_name", "")
             for labels, _ in samples.get("edge_profile_info", ())}
    for name, key in (("edge_channels_capacity", "capacity"), ("edge_channels_in_use", "in_use"),
                      ("edge_credit_balance", "balance"), ("edge_registrations_active", "registrations"),
                      ("edge_auto_recharge_min_balance", "min_balance"), ("edge_auto_recharge_enabled", "ar_on")):
        for labels, value in samples.get(name, ()):
            pid = labels.get("profile")
            if not pid:
                continue
            entry = by_profile.setdefault(pid, {"name": names.get(pid, ""), "account": labels.get("account", "")})
            entry[key] = value
    acct_names = {labels.get("account", ""): labels.get("account_name", "")
                  for labels, _ in samples.get("edge_account_info", ())}
    accounts = {labels["account"]: {"name": acct_names.get(labels["account"], ""), "balance": _money(v)}
                for labels, v in samples.get("edge_account_balance", ()) if "account" in labels}

    profiles = []
    for pid, e in by_profile.items():
        if only and pid not in only:
            continue
        profiles.append(ProfileView(
            id=pid, name=e["name"], account=e["account"], capacity=int(e.get("capacity", 0)),
            in_use=int(e.get("in_use", 0)), balance=_money(e.get("balance", 0.0)),
            registrations=int(e.get("registrations", 0)), min_balance=_money(e.get("min_balance", 0.0)),
            auto_recharge_on=bool(e.get("ar_on", 0.0))))

    api_error = None
    if not details:
        pass
    elif not client.token:
        api_error = "no admin token (--token or SIPEDGE_ADMIN_TOKEN): live calls and registrations not shown"
    else:
        try:
            # the paged endpoints: one request per page of profiles, accounts, calls, bindings
            # (not three requests per profile)
            views = {p.id: p for p in profiles}
            listed: dict[str, ProfileView] = {}
            for prof in client.pages("/v1/profiles"):
                if only and prof["id"] not in only:
                    continue
                p = views.get(prof["id"]) or ProfileView(
                    id=prof["id"], name=prof["name"], account=prof["account_id"], capacity=0, in_use=0,
                    balance="0.00", registrations=0)
                p.name, p.account, p.capacity, p.in_use = (prof["name"], prof["account_id"], prof["channels"],
                                                           prof["channels_in_use"])
                p.balance, p.auto_recharge = prof["balance"], prof.get("auto_recharge")
                p.calls, p.bindings = [], []
                listed[p.id] = p
            for call in client.pages("/v1/calls"):
                if call["profile_id"] in listed:
                    listed[call["profile_id"]].calls.append(call)
            for binding in client.pages("/v1/registrations"):
                if binding["profile_id"] in listed:
                    listed[binding["profile_id"]].bindings.append(binding)
            for p in listed.values():
                p.registrations = len(p.bindings)
            profiles = list(listed.values())
            for acct in client.pages("/v1/accounts"):
                accounts[acct["id"]] = {"name": acct["name"], "balance": acct["balance"]}
        except ApiHTTPError as exc:
            if exc.status in (401, 403):
                api_error = "the admin token was refused (401): live calls and registrations not shown"
            else:
                api_error = str(exc)
    profiles.sort(key=lambda p: (accounts.get(p.account, {}).get("name", ""), p.name, p.id))

    totals = {
        "calls_active_outgoing": _sum(samples, "edge_calls_active", direction="outgoing"),
        "calls_active_incoming": _sum(samples, "edge_calls_active", direction="incoming"),
        "calls_started": _sum(samples, "edge_calls_started_total"),
        "calls_answered": _sum(samples, "edge_call_setup_seconds_count", stage="answer"),
        "calls_failed": sum(v for labels, v in samples.get("edge_calls_ended_total", ())
                            if labels.get("status") != "200"),
        "calls_refused": sum(v for labels, v in samples.get("edge_calls_rejected_total", ())
                             if labels.get("rule") != "auth_challenge"),
        "auth_failures": _sum(samples, "edge_sip_auth_failures_total"),
        "blocked_sources": _sum(samples, "edge_sip_blocked_sources"),
        "parse_errors": _sum(samples, "edge_sip_parse_errors_total"),
        "rtp_streams": _sum(samples, "edge_rtp_streams_active"),
        "rtp_relays": _sum(samples, "edge_rtp_relays_active"),
        "rtp_relayed": _sum(samples, "edge_rtp_packets_relayed_total"),
        "rtp_received": _sum(samples, "edge_rtp_packets_received_total"),
        "rtp_lost": _sum(samples, "edge_rtp_packets_lost_total"),
        "credit_cutoffs": _sum(samples, "edge_credit_cutoffs_total"),
        "rss_bytes": _sum(samples, "process_resident_memory_bytes"),
        "cpu_seconds": _sum(samples, "process_cpu_seconds_total"),
        "start_time": _sum(samples, "process_start_time_seconds"),
    }
    if "edge_cluster_lease_held" in samples:     # a cluster node: its agent's view (docs/cluster.md)
        totals |= {"cluster_lease_held": _sum(samples, "edge_cluster_lease_held"),
                   "cluster_members": _sum(samples, "edge_cluster_members"),
                   "cluster_rtt": _sum(samples, "edge_cluster_engine_rtt_seconds"),
                   "cluster_leases_lost": _sum(samples, "edge_cluster_leases_lost_total")}
    return Snapshot(api=client.api, taken_at=time.time(), healthy=healthy, profiles=profiles, accounts=accounts,
                    totals=totals, api_error=api_error)


# ------------------------------------------------------------------ rendering


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*map(str, r)).rstrip() for r in rows]


def _dur(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _below(balance: str, minimum: str | None) -> bool:
    try:
        return minimum is not None and Decimal(balance) < Decimal(minimum)
    except InvalidOperation:
        return False


def render(snap: Snapshot, *, max_calls: int = 50) -> str:
    t = snap.totals
    now = snap.taken_at
    lines = [
        f"sipedge status  {snap.api}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"
        f"  {'healthy' if snap.healthy else 'UNHEALTHY'}"
        + (f"  up {_dur(now - t['start_time'])}" if t["start_time"] else ""),
        f"calls     {int(t['calls_active_outgoing'] + t['calls_active_incoming'])} active "
        f"({int(t['calls_active_outgoing'])} outgoing, {int(t['calls_active_incoming'])} incoming); since start: "
        f"{int(t['calls_started'])} seized, {int(t['calls_answered'])} answered, {int(t['calls_failed'])} failed, "
        f"{int(t['calls_refused'])} refused, {int(t['credit_cutoffs'])} credit cut-offs",
        f"media     {int(t['rtp_streams'])} RTP streams, {int(t['rtp_relays'])} relays; "
        f"{int(t['rtp_relayed'])} packets relayed, {int(t['rtp_lost'])} lost upstream",
        f"security  {int(t['auth_failures'])} auth failures, {int(t['blocked_sources'])} blocked sources, "
        f"{int(t['parse_errors'])} parse errors",
        f"process   RSS {t['rss_bytes'] / 2**20:.0f} MiB, CPU {t['cpu_seconds']:.1f} s",
    ]
    if "cluster_lease_held" in t:
        lines.append(f"cluster   {'lease held' if t['cluster_lease_held'] else 'LEASE NOT HELD: admits no call'}, "
                     f"{int(t['cluster_members'])} members, engine round trip {t['cluster_rtt'] * 1000:.1f} ms, "
                     f"{int(t['cluster_leases_lost'])} leases lost since start")
    if snap.api_error:
        lines.append(f"note      {snap.api_error}")
    lines.append("")
    if snap.accounts:
        used = {p.account for p in snap.profiles}
        rows = [[a.get("name", ""), aid, a.get("balance", "")] for aid, a in sorted(
            snap.accounts.items(), key=lambda kv: kv[1].get("name", "")) if aid in used]
        lines += _table(rows, ["ACCOUNT", "ID", "MASTER BALANCE"]) + [""]
    rows = []
    for p in snap.profiles:
        if p.auto_recharge is not None:
            ar_on, minimum = p.auto_recharge.get("enabled"), p.auto_recharge.get("min_balance")
            ar = (f"on: +{p.auto_recharge.get('amount')} below {minimum}" if ar_on else
                  f"off (min {minimum})" if minimum and Decimal(minimum) else "off")
        else:
            ar_on, minimum = p.auto_recharge_on, p.min_balance
            ar = f"on below {minimum}" if ar_on else (f"off (min {minimum})" if minimum and Decimal(minimum) else "off")
        flags = []
        if p.capacity and p.in_use >= p.capacity:
            flags.append("FULL")
        elif p.capacity and p.in_use / p.capacity > 0.9:
            flags.append(">90%")
        if _below(p.balance, minimum) and Decimal(minimum or 0) > 0:
            flags.append("CREDIT LOW")
        rows.append([p.name, p.id, snap.accounts.get(p.account, {}).get("name", p.account),
                     f"{p.in_use}/{p.capacity}", str(len(p.calls)) if snap.api_error is None else "-",
                     str(p.registrations), p.balance, ar, " ".join(flags)])
    lines += _table(rows, ["PROFILE", "ID", "ACCOUNT", "CHANNELS", "CALLS", "REGS", "BALANCE", "AUTO-RECHARGE", ""])
    if not snap.profiles:
        lines.append("(no profiles)")
    calls = [(p, c) for p in snap.profiles for c in p.calls]
    if calls:
        calls.sort(key=lambda pc: _ts(pc[1].get("started_at", 0)))
        rows = [[p.name, c["call_id"], c["direction"], c["caller"], c["callee"],
                 _dur(now - _ts(c["started_at"])),
                 _dur(now - _ts(c["answered_at"])) if c.get("answered_at") else "ringing", c.get("reserved", "")]
                for p, c in calls[:max_calls]]
        lines += ["", f"LIVE CALLS ({len(calls)})"]
        lines += _table(rows, ["PROFILE", "CALL", "DIRECTION", "CALLER", "CALLEE", "AGE", "TALK", "RESERVED"])
        if len(calls) > max_calls:
            lines.append(f"... {len(calls) - max_calls} more (--max-calls)")
    bindings = [(p, b) for p in snap.profiles for b in p.bindings]
    if bindings:
        rows = [[p.name, b["contact"], b["source"], f"{b['expires_in']} s", b.get("user_agent", "")]
                for p, b in bindings]
        lines += ["", f"REGISTRATIONS ({len(bindings)})"]
        lines += _table(rows, ["PROFILE", "CONTACT", "SOURCE", "EXPIRES IN", "USER AGENT"])
    return "\n".join(lines) + "\n"


def as_json(snap: Snapshot) -> bytes:
    return msgspec.json.format(msgspec.json.encode(snap), indent=2) + b"\n"


# ------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", help=f"control API base URL (env SIPEDGE_API; default {DEFAULT_API}, "
                                      "or [api] listen of --config)")
    parser.add_argument("--token", help="admin token (env SIPEDGE_ADMIN_TOKEN; or found via --config)")
    parser.add_argument("--metrics", help="base URL of /metrics when it has a listener of its own "
                                          "(env SIPEDGE_METRICS; or [api] metrics_listen of --config)")
    parser.add_argument("--config", help="a local edge's TOML config: API address and token from it")
    parser.add_argument("--data", help="with --config: the LMDB directory holding a generated admin_token")
    parser.add_argument("--profile", action="append", metavar="ID", help="only this profile (repeatable)")
    parser.add_argument("--watch", type=float, metavar="N", help="refresh every N seconds (Ctrl-C to stop)")
    parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    parser.add_argument("--max-calls", type=int, default=50, help="live calls listed (default 50)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="HTTP timeout in seconds")


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``status`` to ``sipedge``'s subparsers (``edge/cli.py``)."""
    parser = sub.add_parser("status", help="show a running edge: profiles, channels, calls, registrations, balances")
    add_arguments(parser)
    parser.set_defaults(fn=run)
    return parser


def _url_of(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _resolve(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    api = args.api or os.environ.get("SIPEDGE_API")
    metrics = getattr(args, "metrics", None) or os.environ.get("SIPEDGE_METRICS")
    token = args.token or os.environ.get("SIPEDGE_ADMIN_TOKEN") or None
    if args.config:
        from .config import load

        cfg = load(args.config)
        if not api:
            api = _url_of(cfg.api.listen)
        if not metrics and cfg.api.metrics_listen:
            metrics = _url_of(cfg.api.metrics_listen)
        if not token:
            token = cfg.api.token or None
            path = Path(args.data or cfg.storage.path) / "admin_token"
            if not token and path.exists():
                token = path.read_text().strip() or None
    return api or DEFAULT_API, token, metrics


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    try:
        return _run(args, out or sys.stdout)
    except KeyboardInterrupt:
        return 0


def _run(args: argparse.Namespace, out: TextIO) -> int:
    try:
        api, token, metrics = _resolve(args)
    except Exception as exc:  # a config error is reported like any other
        print(f"sipedge status: {exc}", file=sys.stderr)
        return 2
    client = Client(api, token, timeout=args.timeout, metrics=metrics)
    interactive = args.watch and out.isatty()
    while True:
        try:
            snap = collect(client, only=args.profile)
            text = as_json(snap).decode() if args.json else render(snap, max_calls=args.max_calls)
            rc = 0 if snap.api_error is None or not token else 1
        except StatusError as exc:
            text, rc = f"sipedge status: {exc}\n", 1
            if not args.watch:
                print(text, end="", file=sys.stderr)
                return rc
        if interactive:
            out.write("\x1b[H\x1b[2J")
        out.write(text)
        out.flush()
        if not args.watch:
            return rc
        time.sleep(args.watch)
        if not interactive:
            out.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sipedge status", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
