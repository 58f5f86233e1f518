"""``sipedge``: serve, check, purge-cdrs, version (and status)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from . import __version__
from .config import ConfigError, load

IDEMPOTENCY_TTL = 24 * 3600  # seconds an Idempotency-Key is remembered


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"sipedge: invalid config: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(cfg.sip.listen)} SIP listeners, {len(cfg.carriers)} carriers, "
          f"API on {cfg.api.listen})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup as setup_logging

    setup_logging(args.log_format, args.log_level)
    from .control import idempotency, rates, registrations
    from .control.demo import ECHO_NUMBER, ensure_demo
    from .control.tables import shipped_exclusions
    from .node import admin_token, data_dir_of, open_store, serve

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"sipedge: invalid config: {exc}", file=sys.stderr)
        return 2
    data_dir = data_dir_of(cfg, args.data)
    store = open_store(cfg, data_dir)
    token = admin_token(cfg, data_dir)
    idempotency.purge(store, time.time() - IDEMPOTENCY_TTL)
    registrations.purge_expired(store)
    rates.ensure_exclusions(store, shipped_exclusions())  # the seed's list until the API replaces it
    if args.demo:
        demo = ensure_demo(store, realm=cfg.sip.domain)
        udp = next((spec for spec in cfg.sip.listen if spec.startswith("udp:")), cfg.sip.listen[0])
        _, host_port = udp.split(":", 1)
        print(
            f"sipedge {__version__} serving (data in {data_dir})\n"
            f"  control API   http://{cfg.api.listen}   token: {token}\n"
            f"  SIP registrar {cfg.sip.domain}  (send to {host_port}, {', '.join(cfg.sip.listen)})\n"
            f"  SIP username  {demo.sip_username}\n"
            f"  SIP password  {demo.sip_password}\n"
            f"  online number {demo.number}{'  (demo provisioned now)' if demo.created else ''}\n"
            f"  test call     sipp -sf deploy/sipp/uac-echo-call.xml -key user {demo.sip_username} "
            f"-key domain {cfg.sip.domain} -au {demo.sip_username} -ap {demo.sip_password} "
            f"-s {ECHO_NUMBER.lstrip('+')} -m 1 {host_port}   (the echo number {ECHO_NUMBER}, free)\n"
            f"  try           curl -H 'Authorization: Bearer {token}' http://{cfg.api.listen}/v1/profiles/{demo.profile_id}",
            flush=True,
        )
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(cfg, store, token))
        else:
            asyncio.run(serve(cfg, store, token))
    finally:
        store.close()
    return 0


def _cmd_purge_cdrs(args: argparse.Namespace) -> int:
    """Delete old CDRs: room in a store that is filling up (export them first)."""
    from .control import cdrs
    from .node import data_dir_of, open_store

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"sipedge: invalid config: {exc}", file=sys.stderr)
        return 2
    data_dir = data_dir_of(cfg, args.data)
    if not (data_dir / "data.mdb").exists():
        print(f"sipedge: no store in {data_dir}", file=sys.stderr)
        return 2
    store = open_store(cfg, data_dir)   # safe beside a running edge: LMDB serialises the writers
    try:
        purged = cdrs.purge(store, time.time() - args.older_than_days * 86400)
    finally:
        store.close()
    print(f"purged {purged} CDRs of calls that ended more than {args.older_than_days:g} days ago from {data_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipedge", description="SIP/RTP trunking edge")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the edge and its control API")
    serve.add_argument("--config", help="TOML config file (defaults built in if omitted)")
    serve.add_argument("--data", help="LMDB directory (overrides storage.path)")
    serve.add_argument("--demo", action="store_true", help="provision the demo tenant on an empty store and print it")
    serve.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="one line per event: text, or JSON for a log pipeline")
    serve.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                       help="event loop implementation (see docs/sip.md for the measurement)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    serve.set_defaults(fn=_cmd_serve)
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("--config", required=True)
    check.set_defaults(fn=_cmd_check)
    purge = sub.add_parser("purge-cdrs", help="delete the CDRs of calls that ended before a number of days ago")
    purge.add_argument("--config", help="TOML config file (for storage.path)")
    purge.add_argument("--data", help="LMDB directory (overrides storage.path)")
    purge.add_argument("--older-than-days", type=float, required=True, metavar="DAYS")
    purge.set_defaults(fn=_cmd_purge_cdrs)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(fn=lambda a: print(f"sipedge {__version__}") or 0)
    from .status import register as register_status

    register_status(sub)
    from .provision import register as register_provisioning

    register_provisioning(sub)  # account, profile, number, rates, keys, cdrs (edge/provision.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
