"""One sipedge node, and the one place where its objects are built and wired.

Every component gets what it uses as explicit constructor arguments; nothing installs
itself into another object. The two edges of the graph that point upwards (the
transaction layer delivering new INVITEs to the call controller, the relay's packet
thread reporting media timeouts) are connected here, by name, after both ends exist.

The store, the metrics registry, the control API and the SIP edge share one asyncio
loop; the RTP relay runs on its own native thread.

Lifecycle (SPEC §2.2, docs/deployment.md): SIGTERM/SIGINT call :meth:`Node.drain`, SIGHUP
calls :meth:`Node.reload_file`; both are plain methods so that a supervisor process can
forward the signals it gets to its workers. The node finds itself for ``sipedge drain`` and
``sipedge reload`` through ``<data>/sipedge.pid``, and reports each reload in
``<data>/reload.json``.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import msgspec
import uvicorn
from prometheus_client import CollectorRegistry, Gauge

from . import sdnotify
from .calls.admission import Admission
from .calls.billing import Billing
from .calls.carriers import CarrierHealth
from .calls.controller import CallController
from .calls.events import OperatorActions
from .calls.media import CallMedia
from .calls.metrics import CallMetrics
from .calls.model import Call, EndReason
from .calls.routing import Routing
from .cluster import outbox
from .cluster.worker import ClusterWorker
from .config import RELOADABLE, Config, ConfigError, load, resolve_sides, restart_only_changes
from .control import channels, registrations
from .control.credit import CreditEngine
from .control.models import LiveCall
from .control.store import Store
from .sip.dialog import Dialogs, Local
from .sip.transaction import State
from .sip.transport import Peer

log = logging.getLogger("sipedge")

SHUTDOWN_REASON = 'SIP;cause=503;text="Edge shutting down"'
RELOADABLE_SIP = sorted(key.removeprefix("sip.") for key in RELOADABLE if key.startswith("sip."))
PID_FILE = "sipedge.pid"        # "<pid>\n<config path>\n": how `sipedge drain` / `reload` find the node
RELOAD_FILE = "reload.json"     # the outcome of the last reload, for `sipedge reload`
BYE_WAIT = 4.0                  # seconds the last BYEs of a drain may take to be answered
SETTLE_WAIT = 5.0               # seconds a drain waits for CDRs the store refused (then: recovery)


class StartupError(Exception):
    """The node cannot start (a port in use, an unwritable data directory): one line for the operator."""


class ApiServer(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handlers: the node's drain owns those signals,
    and the API keeps serving while the calls drain (SPEC §2.2)."""

    def capture_signals(self) -> nullcontext[None]:  # type: ignore[override]
        return nullcontext()


def running_node(data_dir: Path) -> tuple[int, str] | None:
    """``(pid, config path)`` of the live node serving ``data_dir``, or None (no pid file, or a
    stale one whose process is gone or is no sipedge)."""
    try:
        pid_text, _, config = (data_dir / PID_FILE).read_text().partition("\n")
        pid = int(pid_text)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if b"sipedge" not in cmdline and b"edge.cli" not in cmdline:
        return None  # the pid was reused by something else
    try:  # and by a sipedge of this very store: its map of data.mdb says so
        if str((data_dir / "data.mdb").resolve()) not in Path(f"/proc/{pid}/maps").read_text():
            return None
    except PermissionError:
        pass  # another user's process: the command line has to do
    except OSError:
        return None
    return pid, config.strip()


def data_dir_of(cfg: Config, data: str | None) -> Path:
    return Path(data) if data else Path(cfg.storage.path)


def admin_token(cfg: Config, data_dir: Path) -> str:
    """The configured token (env ``SIPEDGE_ADMIN_TOKEN`` wins, applied by config.load), or one
    generated on first start and kept in ``<data>/admin_token`` (mode 0600)."""
    if cfg.api.token:
        return cfg.api.token
    path = data_dir / "admin_token"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def open_store(cfg: Config, data_dir: Path) -> Store:
    return Store(data_dir, map_size=cfg.storage.map_size_mb << 20)


class WorkerRole(msgspec.Struct, frozen=True):
    """This node process is SIP worker ``index`` of ``count`` (docs/architecture.md "Processes").

    :param key: the node's name on the machine (:func:`edge.sip.workers.node_key`).
    :param nonce_key: the digest nonce key every worker of the node shares.
    :param ready: called once the worker serves (the supervisor's ready pipe).
    """

    index: int
    count: int
    key: str
    nonce_key: bytes
    ready: Callable[[], None]

    def owns(self, call: LiveCall) -> bool:
        """Is ``call`` this worker's to settle: its own, and for worker 0 also those of workers a
        smaller config no longer runs."""
        return call.worker == self.index or (self.index == 0 and not 0 <= call.worker < self.count)


def worker_ports(ports: tuple[int, int], index: int, count: int) -> tuple[int, int]:
    """Worker ``index``'s slice of ``[media] ports``: equal, even-sized and disjoint, so the
    relays of two workers never collide."""
    lo, hi = ports
    size = ((hi - lo + 1) // count) & ~1
    start = lo + index * size
    return start, start + size - 1


class Node:
    """Owns every long-lived component of a running edge; started and stopped as one.
    Built inside the running event loop (the SIP layers take it as their clock).

    :param config_path: the file :meth:`reload_file` reads again (None: built-in defaults).
    :param data_dir: where the pid file and the reload outcome are kept (None: not kept).
    :param role: one SIP worker of several (no control API here: it runs in a process of its
        own); None: the whole node in this process, API included.
    """

    def __init__(self, cfg: Config, store: Store, token: str, *, config_path: str | None = None,
                 data_dir: Path | None = None, role: WorkerRole | None = None) -> None:
        from ._rtp import RelayEngine
        from .media.metrics import RtpCollector
        from .media.relay import MediaService
        from .sip.core import SipService
        from .sip.request import set_worker
        from .sip.workers import WorkerLink

        loop = asyncio.get_running_loop()
        self.cfg = cfg
        self.store = store
        self.config_path = config_path
        self.data_dir = data_dir
        self.role = role
        self.api: ApiServer | None = None
        if role is None:
            from admin_api.app import create_app  # not imported by a SIP worker: the API runs elsewhere

            self.app, self.registry = create_app(store, token, registrar=cfg.sip.domain, settings=cfg.api)
            self.api = ApiServer(uvicorn.Config(
                self.app, log_level="warning", access_log=False, lifespan="on", loop="asyncio",
            ))
        else:
            from admin_api.metrics import StoreLockCollector

            self.registry = worker_registry()
            self.registry.register(StoreLockCollector(store))
        set_worker(role.index if role is not None else None)
        self.draining = False
        self._end_now = False                       # a second SIGTERM: end the calls now
        self._drained = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self.reloads = 0

        dialogs = Dialogs(loop)
        self.sip = SipService(cfg, store, self.registry, loop, dialogs, reuse_port=role is not None,
                              nonce_key=role.nonce_key if role is not None else None)
        if role is not None:
            self.sip.join_workers(WorkerLink(role.key, role.index, role.count, self.sip.metrics), loop)
        self.sides = resolve_sides(cfg)
        customer, carrier = self.sides["customer"], self.sides["carrier"]
        lo, hi = cfg.media.ports if role is None else worker_ports(cfg.media.ports, role.index, role.count)
        # relay leg "a" faces the customer side, "b" the carrier side (calls/model.py Side)
        self.engine = RelayEngine(customer.media, lo, hi, quiet_period=cfg.media.quiet_period,
                                  timeout=cfg.media.rtp_timeout, address_b=carrier.media)
        self.registry.register(RtpCollector(self.engine))
        self.media = MediaService(self.engine, loop,
                                  advertise={"a": customer.media_advertise, "b": carrier.media_advertise})

        credit = CreditEngine(store, slice_seconds=cfg.credit.slice_seconds, bundle_minutes=cfg.credit.bundle_minutes,
                              on_settle=outbox.add if cfg.cluster.enabled else None, journaled=cfg.cluster.enabled,
                              hold_cdr=outbox.hold_cdr if cfg.cluster.enabled else None)
        self.health = CarrierHealth(cfg.carriers, cfg.health, self.sip.transactions, self.local, self.registry,
                                    cfg.sip.domain, dns=cfg.dns, families=carrier.families)
        self.routing = routing = Routing(cfg.carriers, lambda profile_id: registrations.live(store, profile_id),
                                         cfg.sip.domain, targets=self.health.targets)
        sip = self.sip
        # a cluster node always runs workers under a supervisor (edge/cli.py): there is a role
        self.cluster = cluster = ClusterWorker(store, role.key) if cfg.cluster.enabled and role is not None else None
        self.admission = admission = Admission(
            store, credit, routing, sip.auth, sip.failures,
            count_auth_failure=lambda reason, method: sip.metrics.auth_failures.labels(reason, method).inc(),
            refuse_source=sip.auth_failed, profile_rate_limit=cfg.sip.profile_rate_limit,
            worker=role.index if role is not None else 0,
            fence=cluster.fence if cluster is not None else None,
            cluster=cluster.reservations if cluster is not None else None)
        self.billing = Billing(store, credit, loop, hangup=self._hangup, flush_soon=sip.flush_soon,
                               max_call_seconds=cfg.credit.max_call_seconds,
                               journal=cluster.reservations if cluster is not None else None)
        self.calls = CallController(
            tl=sip.transactions, dialogs=dialogs, local=self.local, admission=admission, routing=routing,
            media=CallMedia(self.media, cfg.media.rtp_timeout, {"customer": customer.srtp, "carrier": carrier.srtp}),
            metrics=CallMetrics(self.registry),
            # operator actions first: it names the carrier in the live record before billing settles it
            listeners=[OperatorActions(store, loop, calls=lambda cid: self.calls.calls.get(cid), hangup=self._hangup),
                       self.billing], is_trusted=sip.is_trusted, setup_timeout=cfg.sip.setup_timeout)
        Gauge("edge_channels_drift", "Live calls this process's store holds for it minus the calls it carries "
              "(0 unless a channel leaked; a scrape during a call's start or end can see +-1).",
              registry=self.registry).set_function(self._channel_drift)
        # the upward edges: new INVITEs and media timeouts reach the controller
        sip.serve_calls(self.calls.on_invite)
        self.media.on_event = self.calls.on_media_event

    def _channel_drift(self) -> float:
        role = self.role
        stored = sum(1 for live in channels.live_calls(self.store) if role is None or role.owns(live))
        return stored - len(self.calls.calls) - self.calls.reserving

    def _hangup(self, call: Call, reason: EndReason, *, status: int = 480, reason_header: str | None = None) -> None:
        self.calls.hangup(call, reason, status=status, reason_header=reason_header)

    def local(self, peer: Peer) -> Local:
        """Via sent-by and Contact of the edge toward ``peer``: its side's listener on its
        transport, named by the side's ``advertise`` address when it has one (SPEC §2.1).

        A peer reached on a listener both sides share is on the carrier side when it is a
        trusted source, else on the customer side (the single-interface rule)."""
        side = peer.side or ("carrier" if self.sip.is_trusted(peer.host) else "customer")
        family = socket.AF_INET6 if ":" in peer.host else socket.AF_INET
        host, port = self.sip.transports.advertised(peer.proto, side, family)
        advertise = self.sides[side].advertise
        # an advertised address stands for the listeners of its family; a DNS name for all
        if advertise and (not _is_ip(advertise) or (":" in advertise) == (":" in host)):
            host = advertise
        name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return Local(name, f"<sip:{name};transport={peer.proto}>")

    # ------------------------------------------------------------ drain

    def drain(self) -> None:
        """Stop admitting calls now, end the node when the live calls have (SPEC §2.2).

        The gate closes in this call (for SIGTERM already in the signal handler, see :meth:`run`),
        so no INVITE is admitted after the signal. A second call ends the calls still up at once.
        """
        if self.draining:
            if not self._end_now:
                log.warning("second stop signal: ending the %d calls still up", len(self.calls.calls),
                            extra={"event": "drain_now"})
            self._end_now = True
            return
        self.draining = True
        self.sip.draining = True
        sdnotify.notify("STOPPING=1", f"STATUS=draining {len(self.calls.calls)} calls")
        log.info("draining: new calls get 503, %d live calls may run for up to %g s",
                 len(self.calls.calls), self.cfg.node.drain_timeout,
                 extra={"event": "drain_started", "live_calls": len(self.calls.calls)})
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="drain")

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.node.drain_timeout
        while self.calls.calls and not self._end_now and loop.time() < deadline:
            await asyncio.sleep(0.1)
        left = list(self.calls.calls.values())
        for call in left:
            self.calls.hangup(call, EndReason.SHUTDOWN, reason_header=SHUTDOWN_REASON)
        if left:
            log.warning("drain: ended %d calls still up with BYE", len(left),
                        extra={"event": "drain_timeout", "ended_calls": len(left)})
        await self._wait(lambda: not self._signalling(), BYE_WAIT)
        if not await self._wait(lambda: not self.billing.unsettled, SETTLE_WAIT):
            log.error("drain: %d calls could not be settled; the next start settles them (recovery)",
                      self.billing.unsettled, extra={"event": "drain_unsettled"})
        log.info("drained", extra={"event": "drain_done"})
        self._drained.set()

    def _signalling(self) -> int:
        """BYEs and CANCELs of ours still waiting for their final answer."""
        return sum(1 for key, tx in self.sip.transactions.client.items()
                   if key[1] in ("BYE", "CANCEL") and tx.state in (State.TRYING, State.PROCEEDING))

    @staticmethod
    async def _wait(done: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return done()

    # ------------------------------------------------------------ reload

    def reload(self, new: Config) -> list[str]:
        """Apply ``new`` to the running node without dropping a call, a registration or a
        connection: carriers, trusted sources, limits, log level, TLS certificates (config.RELOADABLE).

        :returns: the changed keys that only a restart applies (they keep their running value).
        :raises ConfigError: the new TLS files are unusable; nothing was applied.
        """
        restart = restart_only_changes(self.cfg, new)
        old = self.cfg
        applied = msgspec.structs.replace(
            old, node=new.node, carriers=new.carriers, inbound=new.inbound, tls=new.tls,
            sip=msgspec.structs.replace(old.sip, **{key: getattr(new.sip, key) for key in RELOADABLE_SIP}),
            credit=msgspec.structs.replace(old.credit, max_call_seconds=new.credit.max_call_seconds))
        self.sip.reconfigure(applied)
        self.routing.replace_carriers(applied.carriers)
        self.health.replace_carriers(applied.carriers)
        self.admission.profile_limiter.rate = applied.sip.profile_rate_limit
        self.admission.profile_limiter.burst = max(1.0, 2 * applied.sip.profile_rate_limit)
        self.calls.setup_timeout = applied.sip.setup_timeout
        self.billing.max_call_seconds = applied.credit.max_call_seconds
        if applied.node.log_level is not None:
            logging.getLogger().setLevel(applied.node.log_level.upper())
        self.cfg = applied
        return restart

    def reload_file(self) -> None:
        """SIGHUP: read the config file again and apply it; an invalid one is refused, named in
        the log and in ``<data>/reload.json``, and the running config stays."""
        sdnotify.reloading()
        try:
            if self.config_path is None:
                raise ConfigError("started without a config file: nothing to reload")
            new = load(self.config_path)
            restart = self.reload(new)  # the TLS files are read again here: a ConfigError changes nothing
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc, extra={"event": "reload_refused"})
            self._record_reload(ok=False, error=str(exc))
        else:
            if restart:
                log.warning("reload: %s changed; applied at the next start", ", ".join(restart),
                            extra={"event": "reload_restart_keys"})
            log.info("reloaded %s: %d carriers, %d trusted sources", self.config_path, len(new.carriers),
                     len(new.inbound.trusted), extra={"event": "reloaded"})
            self._record_reload(ok=True, restart_needed=restart)
        sdnotify.notify("READY=1", f"STATUS=serving, {len(self.calls.calls)} calls")

    def _record_reload(self, *, ok: bool, error: str = "", restart_needed: list[str] | None = None) -> None:
        self.reloads += 1
        if self.data_dir is not None:
            write_reload_record(self.data_dir, self.reloads, ok=ok, error=error, restart_needed=restart_needed)

    # ------------------------------------------------------------ run

    def _bind_api(self) -> socket.socket:
        return self._bind_api_socket(self.cfg.api.listen)

    @staticmethod
    def _bind_api_socket(listen: str) -> socket.socket:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            raise StartupError(f"control API api.listen {listen}: {exc.strerror}") from None
        sock.set_inheritable(True)
        return sock

    async def _start_sip(self) -> None:
        try:
            await self.sip.start()
        except OSError as exc:
            self.sip.transports.close()
            raise StartupError(f"SIP listener in sip.listen {self.cfg.sip.listen}: {exc.strerror}") from None

    def _recover(self) -> None:
        """Settle the calls a previous run (of this worker) left behind, BYE their legs."""
        recovered = self.billing.recover(self.role.owns if self.role is not None else None)
        for live in recovered:
            self.calls.bye_recovered(live)
        if recovered:
            log.warning("settled %d calls left by the previous run (CDR end_reason=recovery)", len(recovered))

    async def _run_worker(self, role: WorkerRole) -> None:
        """One SIP worker: serve until drained; the metrics go to the API process on request."""
        from .sip.workers import metrics_address

        await self._start_sip()
        self.media.start()
        self.health.start()
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)
        self._recover()
        metrics = await asyncio.start_unix_server(self._serve_metrics, path=metrics_address(role.key, role.index))
        cluster_tasks = self.cluster.start(self.calls, bye_foreign=role.index == 0) if self.cluster else []
        role.ready()
        try:
            await self._drained.wait()
        finally:
            for task in cluster_tasks:
                task.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            metrics.close()
            self.health.stop()
            await self.sip.stop()
            self.media.close()

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from prometheus_client import generate_latest

        try:
            writer.write(await asyncio.to_thread(generate_latest, self.registry))
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def _write_pid_file(self) -> None:
        if self.data_dir is not None:
            (self.data_dir / PID_FILE).write_text(f"{os.getpid()}\n{self.config_path or ''}\n")

    def _remove_pid_file(self) -> None:
        if self.data_dir is not None and running_node(self.data_dir) == (os.getpid(), self.config_path or ""):
            (self.data_dir / PID_FILE).unlink(missing_ok=True)

    async def _watchdog(self, interval: float) -> None:
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until drained; ``ready()`` once SIP and the API listen (the `--demo` banner)."""
        loop = asyncio.get_running_loop()

        def stop_signal(signum: int, frame: object) -> None:
            # A Python-level handler runs at the next bytecode boundary, before the callback of any
            # datagram read after the signal: the gate closes first, the drain itself follows on the loop.
            self.sip.draining = True
            loop.call_soon_threadsafe(self.drain)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self.reload_file)
        if self.role is not None:
            await self._run_worker(self.role)
            return
        api_socket = self._bind_api()
        await self._start_sip()
        self.media.start()
        self.health.start()
        # Everything allocated so far lives as long as the process: keep it out of the
        # cyclic collector, and collect young objects less often (fewer pauses under load).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)
        self._recover()
        assert self.api is not None
        api_task = asyncio.create_task(self.api.serve(sockets=[api_socket]), name="control-api")
        while not self.api.started and not api_task.done():
            await asyncio.sleep(0.01)
        self._write_pid_file()
        background = []
        if not api_task.done():
            sdnotify.notify("READY=1", "STATUS=serving")
            if ready is not None:
                ready()
            interval = sdnotify.watchdog_interval()
            if interval is not None:
                background.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        drained = asyncio.create_task(self._drained.wait())
        try:
            await asyncio.wait({api_task, drained}, return_when=asyncio.FIRST_COMPLETED)
            if api_task.done():  # the API ended by itself: stop the SIP side as well
                self.sip.draining = True
                if api_task.exception() is not None:
                    raise api_task.exception()  # type: ignore[misc]
                raise StartupError("control API stopped")
            self.api.should_exit = True
            await api_task
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)  # on the way out: a late signal has nothing left to stop
            for task in (*background, drained):
                task.cancel()
            self.health.stop()
            await self.sip.stop()
            self.media.close()
            self._remove_pid_file()
            api_socket.close()


def worker_registry() -> CollectorRegistry:
    """A SIP worker's metrics: its own counters and process figures. The store's gauges and the
    build info come from the API process, which adds the workers' up (admin_api/metrics.py)."""
    from prometheus_client import GC_COLLECTOR, PROCESS_COLLECTOR, disable_created_metrics

    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PROCESS_COLLECTOR)
    registry.register(GC_COLLECTOR)
    return registry


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def write_reload_record(data_dir: Path, serial: int, *, ok: bool, error: str = "",
                        restart_needed: list[str] | None = None) -> None:
    """The outcome of a reload, for `sipedge reload` to read (written whole or not at all)."""
    result = {"pid": os.getpid(), "serial": serial, "at": time.time(), "ok": ok, "error": error,
              "restart_needed": restart_needed or []}
    try:
        tmp = data_dir / (RELOAD_FILE + ".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(data_dir / RELOAD_FILE)
    except OSError as exc:
        log.warning("cannot write %s: %s", RELOAD_FILE, exc.strerror)


async def serve(cfg: Config, store: Store, token: str, *, config_path: str | None = None,
                data_dir: Path | None = None, role: WorkerRole | None = None,
                ready: Callable[[], None] | None = None) -> None:
    """Build the node (or one SIP worker of it) inside the running loop and run it until it has drained."""
    await Node(cfg, store, token, config_path=config_path, data_dir=data_dir, role=role).run(ready)
