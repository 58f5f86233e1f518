"""``sipedge``: serve, check, drain, reload, backup, purge-cdrs, version (and status, cluster status).

Exit codes (SPEC §2.3, docs/deployment.md): 0 ok; 1 a runtime failure (a port in use, a
data directory that cannot be written, a full disk, no running node to signal); 2 usage
or an invalid config. Every failure is one line on stderr that says why, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, default_config_path, load, resolve_sides, validate

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

IDEMPOTENCY_TTL = 24 * 3600  # seconds an Idempotency-Key is remembered


class Failure(Exception):
    """A command cannot do its job: ``main`` prints ``sipedge: <message>`` and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _config(args: argparse.Namespace) -> Config:
    """The config of ``--config``, or of the default path (``$SIPEDGE_CONFIG``, /etc/sipedge/sipedge.toml).

    A command that reads the config only to find the store (drain, reload, backup, purge-cdrs)
    and is given ``--data`` does without it when the default file does not exist.
    """
    if not args.config and getattr(args, "data", None) and args.fn is not _cmd_serve \
            and not Path(default_config_path()).exists():
        return load(None)
    args.config = args.config or default_config_path()
    try:
        return load(args.config)
    except ConfigError as exc:
        raise Failure(f"invalid config: {exc}", EXIT_USAGE) from None


def _srtp_library() -> str:
    try:
        from ._rtp import srtp_library
    except ImportError:   # not built yet
        return "relay not built"
    return srtp_library()


def _print_version(args: argparse.Namespace) -> int:
    print(f"sipedge {__version__} ({_srtp_library()})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(f"{args.config}: OK ({len(cfg.sip.listen)} SIP listeners, {len(cfg.carriers)} carriers, "
          f"API on {cfg.api.listen})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup as setup_logging

    cfg = _config(args)
    setup_logging(args.log_format, args.log_level or cfg.node.log_level or "info")
    if args.loop == "uvloop" and any(proto == "tls" for side in resolve_sides(cfg).values()
                                     for proto, _, _ in side.listeners):
        # uvloop 0.23's start_tls on an accepted connection loses handshakes when many arrive at
        # once (bench_tls_register: 5-90 % of them time out; asyncio's: none): docs/security.md
        raise Failure("--loop uvloop cannot serve tls: listeners (uvloop loses TLS handshakes under load); "
                      "use --loop asyncio", EXIT_USAGE)
    from .control import idempotency, rates, registrations
    from .control.demo import ECHO_NUMBER, ensure_demo
    from .control.tables import shipped_exclusions
    from .node import admin_token, data_dir_of, open_store, running_node, serve

    data_dir = args.resolved_data = data_dir_of(cfg, args.data)
    running = running_node(data_dir)
    if running is not None:
        raise Failure(f"data directory {data_dir} is served by a running sipedge (pid {running[0]})")
    _check_data_dir(data_dir)
    store = open_store(cfg, data_dir)
    token = admin_token(cfg, data_dir)
    idempotency.purge(store, time.time() - IDEMPOTENCY_TTL)
    registrations.purge_expired(store)
    rates.ensure_exclusions(store, shipped_exclusions())  # the seed's list until the API replaces it
    banner: Callable[[], None] | None = None
    if args.demo:
        demo = ensure_demo(store, realm=cfg.sip.domain)
        udp = next((spec for spec in cfg.sip.listen if spec.startswith("udp:")), cfg.sip.listen[0])
        _, host_port = udp.split(":", 1)

        def banner() -> None:
            """Printed once the listeners are bound: a test call run at once finds the edge there."""
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
    if args.workers is not None:
        cfg.node.workers = args.workers
        try:
            validate(cfg)
        except ConfigError as exc:
            raise Failure(f"invalid config with --workers {args.workers}: {exc}", EXIT_USAGE) from None
    if cfg.node.worker_count() > 1 or cfg.cluster.enabled:   # a cluster node: the agent is a process too
        store.close()   # the supervisor's children open the store themselves
        return _supervise(cfg, args, data_dir, banner)
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(cfg, store, token, config_path=args.config, data_dir=data_dir, ready=banner))
        else:
            asyncio.run(serve(cfg, store, token, config_path=args.config, data_dir=data_dir, ready=banner))
    finally:
        store.close()
    return EXIT_OK


def _supervise(cfg: Config, args: argparse.Namespace, data_dir: Path, ready: Callable[[], None] | None) -> int:
    """A node of several SIP workers and a control-API process (edge/processes.py)."""
    from .node import Node, open_store
    from .processes import Supervisor

    api_socket = Node._bind_api_socket(cfg.api.listen)
    argv = ["--data", str(data_dir), "--log-format", args.log_format,
            "--log-level", args.log_level or cfg.node.log_level or "info", "--loop", args.loop]
    if args.config:
        argv += ["--config", args.config]
    # held open (and never used) while the node runs: `sipedge drain` knows the node by its map
    store = open_store(cfg, data_dir)
    try:
        supervisor = Supervisor(cfg, config_path=args.config, data_dir=data_dir, count=cfg.node.worker_count(),
                                argv=argv, api_socket=api_socket, ready=ready)
        return asyncio.run(supervisor.run())
    finally:
        store.close()
        api_socket.close()


def _check_data_dir(data_dir: Path) -> None:
    """The data directory exists (created with its parents if missing) and can be written."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise Failure(f"data directory {data_dir}: {exc.strerror}") from None


def _node_of(args: argparse.Namespace) -> tuple[Path, int, str]:
    """The data directory, pid and config path of the running node ``--config``/``--data`` name."""
    from .node import data_dir_of, running_node

    data_dir = data_dir_of(_config(args), args.data)
    running = running_node(data_dir)
    if running is None:
        raise Failure(f"no running sipedge serves {data_dir} (no live pid in {data_dir}/sipedge.pid)")
    return data_dir, *running


def _cmd_drain(args: argparse.Namespace) -> int:
    """SIGTERM to the running node: it stops admitting calls and exits when they have ended."""
    _, pid, _ = _node_of(args)
    os.kill(pid, signal.SIGTERM)
    print(f"sipedge (pid {pid}) is draining: new calls get 503, it exits when the live calls end")
    if args.wait is not None:
        deadline = time.monotonic() + args.wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            raise Failure(f"sipedge (pid {pid}) is still draining after {args.wait:g} s")
        print(f"sipedge (pid {pid}) has exited")
    return EXIT_OK


def _alive(pid: int) -> bool:
    """Is ``pid`` running (a zombie whose parent has not reaped it yet has exited)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmd_reload(args: argparse.Namespace) -> int:
    """Validate the node's config file, SIGHUP the node, and report what the node said."""
    from .node import RELOAD_FILE

    data_dir, pid, config_path = _node_of(args)
    if config_path:
        try:
            load(config_path)   # refuse here first: the same loader the node uses
        except ConfigError as exc:
            raise Failure(f"reload refused, the running config stays: {exc}", EXIT_USAGE) from None
    result_path = data_dir / RELOAD_FILE

    def last() -> dict | None:
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            return None
        return result if result.get("pid") == pid else None

    before = (last() or {}).get("serial", 0)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        result = last()
        if result is not None and result["serial"] > before:
            if not result["ok"]:
                raise Failure(f"reload refused, the running config stays: {result['error']}", EXIT_USAGE)
            print(f"sipedge (pid {pid}) reloaded {config_path}")
            if result["restart_needed"]:
                print(f"  changed, applied at the next start: {', '.join(result['restart_needed'])}")
            return EXIT_OK
        time.sleep(0.05)
    raise Failure(f"sipedge (pid {pid}) did not report the reload within {args.timeout:g} s")


def _cmd_backup(args: argparse.Namespace) -> int:
    """A consistent copy of the store while the edge runs (LMDB's copy, compacted)."""
    from .node import data_dir_of, open_store

    data_dir = data_dir_of(_config(args), args.data)
    if not (data_dir / "data.mdb").exists():
        raise Failure(f"no store in {data_dir}")
    target = Path(args.dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
        if any(target.iterdir()):
            raise Failure(f"backup directory {target} is not empty")
    except OSError as exc:
        raise Failure(f"backup directory {target}: {exc.strerror}") from None
    store = open_store(_config(args), data_dir)
    try:
        store.env.copy(str(target), compact=True)   # one read transaction: a point-in-time copy
    finally:
        store.close()
    size = (target / "data.mdb").stat().st_size
    print(f"backed up {data_dir} to {target} ({size / 2**20:.1f} MiB)")
    return EXIT_OK


def _cmd_purge_cdrs(args: argparse.Namespace) -> int:
    """Delete old CDRs: room in a store that is filling up (export them first)."""
    from .control import cdrs
    from .node import data_dir_of, open_store

    cfg = _config(args)
    data_dir = data_dir_of(cfg, args.data)
    if not (data_dir / "data.mdb").exists():
        raise Failure(f"no store in {data_dir}", EXIT_USAGE)
    store = open_store(cfg, data_dir)   # safe beside a running edge: LMDB serialises the writers
    try:
        purged = cdrs.purge(store, time.time() - args.older_than_days * 86400)
    finally:
        store.close()
    print(f"purged {purged} CDRs of calls that ended more than {args.older_than_days:g} days ago from {data_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipedge", description="SIP/RTP trunking edge")
    parser.add_argument("--version", action="version", version=f"sipedge {__version__} ({_srtp_library()})")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "TOML config file (default: $SIPEDGE_CONFIG, else /etc/sipedge/sipedge.toml)"
    serve = sub.add_parser("serve", help="run the edge and its control API")
    serve.add_argument("--config", help=config_help)
    serve.add_argument("--data", help="LMDB directory (overrides storage.path)")
    serve.add_argument("--demo", action="store_true", help="provision the demo tenant on an empty store and print it")
    serve.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="one line per event: text, or JSON for a log pipeline")
    serve.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                       help="event loop implementation (see docs/sip.md for the measurement)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="default: node.log_level of the config, else info")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="SIP worker processes (overrides [node] workers; 1: one process, API inline)")
    serve.set_defaults(fn=_cmd_serve)
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("--config", help=config_help)
    check.set_defaults(fn=_cmd_check)
    drain = sub.add_parser("drain", help="stop admitting calls; the node exits when its live calls have ended")
    drain.add_argument("--config", help=config_help + " (for storage.path)")
    drain.add_argument("--data", help="LMDB directory of the node (overrides storage.path)")
    drain.add_argument("--wait", type=float, metavar="SECONDS", help="wait up to SECONDS for the node to exit")
    drain.set_defaults(fn=_cmd_drain)
    reload = sub.add_parser("reload", help="re-read the node's config file: carriers, trusted, limits, log level")
    reload.add_argument("--config", help=config_help + " (for storage.path)")
    reload.add_argument("--data", help="LMDB directory of the node (overrides storage.path)")
    reload.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node's answer")
    reload.set_defaults(fn=_cmd_reload)
    backup = sub.add_parser("backup", help="hot, compacted copy of the LMDB store into an empty directory")
    backup.add_argument("dir", help="target directory (created; must be empty)")
    backup.add_argument("--config", help=config_help + " (for storage.path)")
    backup.add_argument("--data", help="LMDB directory (overrides storage.path)")
    backup.set_defaults(fn=_cmd_backup)
    purge = sub.add_parser("purge-cdrs", help="delete the CDRs of calls that ended before a number of days ago")
    purge.add_argument("--config", help=config_help + " (for storage.path)")
    purge.add_argument("--data", help="LMDB directory (overrides storage.path)")
    purge.add_argument("--older-than-days", type=float, required=True, metavar="DAYS")
    purge.set_defaults(fn=_cmd_purge_cdrs)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(fn=_print_version)
    from .status import register as register_status

    register_status(sub)
    from .provision import register as register_provisioning

    register_provisioning(sub)  # account, profile, number, rates, keys, cdrs (edge/provision.py)
    from .cluster.status import register as register_cluster

    register_cluster(sub)       # cluster status (edge/cluster/status.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a failure is one line on stderr and its exit code (module docstring)."""
    import lmdb

    from .control.errors import StoreError
    from .node import StartupError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except Failure as exc:
        message, code = str(exc), exc.code
    except StartupError as exc:
        message, code = str(exc), EXIT_FAILURE
    except (lmdb.Error, StoreError) as exc:
        message, code = _store_message(exc, getattr(args, "resolved_data", None)), EXIT_FAILURE
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        message, code = f"{exc.strerror or exc}{where}", EXIT_FAILURE
    print(f"sipedge: {message}", file=sys.stderr)
    return code


def _store_message(exc: Exception, data_dir: Path | None) -> str:
    """One line for a store that cannot write; a full disk (ENOSPC, or the EIO LMDB reports when
    a page write fails on it) is named as such."""
    import shutil

    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    full = "No space left" in text or getattr(exc, "errno", None) == errno.ENOSPC
    if data_dir is not None and not full:
        try:
            full = shutil.disk_usage(data_dir).free < 1 << 20
        except OSError:
            pass
    if full:
        return f"no space left on the device of the data directory {data_dir or ''} ({text})"
    return f"store: {text}"


if __name__ == "__main__":
    sys.exit(main())
