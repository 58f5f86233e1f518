"""The processes of a node of several SIP workers (docs/architecture.md "Processes").

``sipedge serve`` with ``[node] workers`` > 1 runs a :class:`Supervisor` in the process the
operator (or systemd) started. It binds the control API's socket, then starts N SIP workers
and one control-API process, each a fresh interpreter (``python -m edge.processes worker K``
/ ``api``) that opens the node's one LMDB environment itself: no process ever uses an
environment opened by another, and LMDB's one-writer lock keeps channels and credit exact
across them.

- Each child gets a ready pipe: it writes ``ready`` once it serves, or ``fail <why>`` if it
  cannot start (a port in use); a child that fails at start fails the start (exit 1, its one
  line). The workers start first, the API once they all serve (so a /healthz that answers
  means SIP is served too), and READY=1 goes to systemd when the API is ready as well.
- Children die with the supervisor (``PR_SET_PDEATHSIG``) and sit in a session of their own,
  so a terminal's Ctrl-C reaches the supervisor alone, which forwards one SIGTERM.
- A worker that dies (kill -9, a crash) is started again, with a backoff that grows while it
  keeps dying; at start it settles the calls it left (CDR ``recovery``, its channels freed),
  the other workers' calls are never touched. The API process is restarted the same way;
  calls go on without it.
- A child that stops answering (its event loop blocked: a bug, a stuck syscall, SIGSTOP) is
  killed and started like a dead one: after ``ready`` it writes ``alive`` on the pipe every
  second from its loop, and ``[node] hang_timeout`` seconds without one end it (SIGKILL).
- SIGTERM drains: forwarded to the workers, the API keeps serving until the last worker has
  exited, and the supervisor exits 0 when every worker did. SIGHUP: the supervisor reads the
  config (and reports in ``reload.json`` under its pid), the workers apply it.
- The pid file holds the supervisor's pid (``sipedge drain`` / ``reload`` signal it).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import sdnotify
from .config import Config, ConfigError, load, restart_only_changes

log = logging.getLogger("sipedge")

PR_SET_PDEATHSIG = 1
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0   # seconds before a dead child is started again; doubles while it keeps dying
STABLE_AFTER = 30.0                      # a child up this long has its backoff reset
START_TIMEOUT = 60.0                     # seconds the children may take to be ready at start
API_STOP_WAIT = 10.0
HEARTBEAT = 1.0                          # seconds between two ``alive`` lines of a child
NONCE_KEY_FILE = "nonce.key"


def die_with_parent(parent: int) -> None:
    """In a child: SIGKILL when the supervisor goes (PR_SET_PDEATHSIG); gone already: exit now."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def nonce_key(data_dir: Path) -> bytes:
    """The digest nonce key of the node's workers: derived from ``<data>/nonce.key`` (32 random
    bytes, made once, mode 0600), so a nonce one worker gave verifies on any other."""
    path = data_dir / NONCE_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return hashlib.blake2b(path.read_bytes(), person=b"sipedge-nonce", digest_size=32).digest()


@dataclass
class Child:
    """One process the supervisor keeps running."""

    name: str                     # "worker 0", "api"
    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int = -1
    ready: bool = False
    started_at: float = 0.0
    backoff: float = BACKOFF_FIRST
    failure: str = ""
    restart_at: float | None = None
    restarts: int = 0
    alive_at: float = 0.0         # the last ``ready``/``alive`` line (monotonic)
    buffer: bytearray = field(default_factory=bytearray)


class StartFailed(Exception):
    """A child could not start: its one line."""


class Supervisor:
    """:param cfg: the config the node starts with.
    :param argv: the options the children are started with (config, data, log, loop).
    :param ready: called once every child serves (the ``--demo`` banner).
    """

    def __init__(self, cfg: Config, *, config_path: str | None, data_dir: Path, count: int, argv: list[str],
                 api_socket: socket.socket, ready: Callable[[], None] | None = None) -> None:
        from .sip.workers import node_key

        self.cfg = cfg
        self.config_path = config_path
        self.data_dir = data_dir
        self.count = count
        self.api_socket = api_socket
        self.ready = ready
        self.key = node_key(data_dir)
        common = [sys.executable, "-m", "edge.processes"]
        self.workers = [Child(f"worker {k}", [*common, "worker", str(k), "--count", str(count), *argv])
                        for k in range(count)]
        self.api = Child("api", [*common, "api", "--count", str(count), "--api-fd", str(api_socket.fileno()),
                                 *argv], pass_fds=(api_socket.fileno(),))
        # [cluster]: the agent holds the node's lease and mirrors it for the workers (edge/cluster/agent.py)
        self.agent = Child("cluster", [*common, "cluster", "--count", str(count), *argv]) if cfg.cluster.enabled \
            else None
        self.services = [self.api, *filter(None, [self.agent])]   # kept running through a drain, stopped last
        self.draining = False
        self.reloads = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------ children

    def _start(self, child: Child) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        env = dict(os.environ, SIPEDGE_SUPERVISOR=str(os.getpid()), SIPEDGE_READY_FD=str(write_fd))
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)   # systemd hears the supervisor only
        child.proc = subprocess.Popen(child.argv, pass_fds=(*child.pass_fds, write_fd), env=env,
                                      start_new_session=True)
        os.close(write_fd)
        child.ready_fd, child.ready, child.failure = read_fd, False, ""
        child.buffer.clear()
        child.started_at, child.restart_at = time.monotonic(), None
        assert self._loop is not None
        self._loop.add_reader(read_fd, self._readable, child)

    def _readable(self, child: Child) -> None:
        try:
            data = os.read(child.ready_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:   # the child closed its end (it exited, or failed at start)
            self._close_ready(child)
            self._wake.set()
            return
        child.buffer += data
        *lines, rest = child.buffer.split(b"\n")
        child.buffer[:] = rest
        for raw in lines:
            line = raw.decode(errors="replace")
            if line == "alive":
                child.alive_at = time.monotonic()
            elif line == "ready":
                child.ready, child.alive_at = True, time.monotonic()
                if child.restarts:
                    log.info("%s serves again (pid %d)", child.name, child.proc.pid if child.proc else 0,
                             extra={"event": "child_restarted", "child": child.name})
            elif line.startswith("fail "):
                child.failure = line[5:].strip()
        self._wake.set()

    def _close_ready(self, child: Child) -> None:
        if child.ready_fd >= 0:
            assert self._loop is not None
            self._loop.remove_reader(child.ready_fd)
            os.close(child.ready_fd)
            child.ready_fd = -1

    def _children(self) -> list[Child]:
        return [*self.workers, *self.services]

    def _signal(self, children: list[Child], sig: int) -> None:
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                try:
                    child.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------ signals

    def _on_stop(self) -> None:
        if not self.draining:
            self.draining = True
            sdnotify.notify("STOPPING=1", "STATUS=draining")
            log.info("draining the SIP workers", extra={"event": "drain_started"})
        self._signal(self.workers, signal.SIGTERM)   # a second one: the workers end their calls now
        self._wake.set()

    def _on_reload(self) -> None:
        sdnotify.reloading()
        try:
            if self.config_path is None:
                raise ConfigError("started without a config file: nothing to reload")
            new = load(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc, extra={"event": "reload_refused"})
            self._record_reload(ok=False, error=str(exc))
        else:
            restart = restart_only_changes(self.cfg, new)
            self._signal(self.workers, signal.SIGHUP)   # each worker reads the same file and applies it
            self._record_reload(ok=True, restart_needed=restart)
            log.info("reloaded %s in %d workers", self.config_path, self.count, extra={"event": "reloaded"})
        sdnotify.notify("READY=1", "STATUS=serving")

    def _record_reload(self, *, ok: bool, error: str = "", restart_needed: list[str] | None = None) -> None:
        from .node import write_reload_record

        self.reloads += 1
        write_reload_record(self.data_dir, self.reloads, ok=ok, error=error, restart_needed=restart_needed)

    # ------------------------------------------------------------ run

    async def run(self) -> int:
        """Start the children, keep them running, drain on SIGTERM. :returns: the exit code."""
        from .node import PID_FILE, StartupError

        self._loop = loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        starting = [*self.workers, *filter(None, [self.agent])]
        for child in starting:
            self._start(child)
        try:
            # the agent with the workers (they refuse calls until it holds the lease), both before the API
            await self._until_ready(starting)
            # the API last: once /healthz answers, every SIP worker serves
            self._start(self.api)
            await self._until_ready([self.api])
        except StartFailed as exc:
            self._signal(self._children(), signal.SIGKILL)
            for child in self._children():
                if child.proc is not None:
                    child.proc.wait()
            raise StartupError(str(exc)) from None
        (self.data_dir / PID_FILE).write_text(f"{os.getpid()}\n{self.config_path or ''}\n")
        sdnotify.notify("READY=1", f"STATUS=serving with {self.count} SIP workers")
        if self.ready is not None:
            self.ready()
        log.info("serving with %d SIP workers and the control API in its own process", self.count,
                 extra={"event": "serving", "workers": self.count})
        watchdog = sdnotify.watchdog_interval()
        next_ping = 0.0
        try:
            while True:
                now = time.monotonic()
                if watchdog is not None and now >= next_ping:
                    sdnotify.notify("WATCHDOG=1")
                    next_ping = now + watchdog
                if self._tend(now):
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.1)
                except TimeoutError:
                    pass
            codes = [child.proc.returncode for child in self.workers if child.proc is not None]
            for service in reversed(self.services):    # the agent gives the lease up, then the API goes
                await self._stop_service(service)
        finally:
            self._signal(self._children(), signal.SIGKILL)
            pid_file = self.data_dir / PID_FILE
            try:
                if pid_file.read_text().split("\n")[0] == str(os.getpid()):
                    pid_file.unlink()
            except OSError:
                pass
        log.info("drained: every SIP worker has exited", extra={"event": "drain_done"})
        return 0 if all(code == 0 for code in codes) else 1

    async def _until_ready(self, children: list[Child]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for child in children:
                if child.failure:
                    raise StartFailed(child.failure)
                if child.proc is not None and child.proc.poll() is not None and not child.ready:
                    if child.ready_fd >= 0:   # what it wrote before it died
                        self._readable(child)
                        if child.failure:
                            raise StartFailed(child.failure)
                    raise StartFailed(f"{child.name} exited with {child.proc.returncode} while starting")
            if all(child.ready for child in children):
                return
            if time.monotonic() > deadline:
                raise StartFailed(f"the node's processes did not start within {START_TIMEOUT:g} s")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.1)
            except TimeoutError:
                pass

    def _tend(self, now: float) -> bool:
        """Restart what died; :returns: True once a drain has ended (every worker exited)."""
        hang_timeout = self.cfg.node.hang_timeout
        for child in self._children():
            proc = child.proc
            if proc is None or proc.poll() is None:
                if child.restart_at is not None and now >= child.restart_at and not self.draining:
                    self._start(child)
                elif proc is not None and hang_timeout and child.ready and now - child.alive_at > hang_timeout:
                    log.error("%s (pid %d) has not answered for %.0f s: killing it", child.name, proc.pid,
                              now - child.alive_at, extra={"event": "child_hung", "child": child.name})
                    child.ready = False   # killed once; its exit is handled as any death below
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                continue
            if child.restart_at is None and not (self.draining and child not in self.services):
                if child.ready_fd >= 0:
                    self._close_ready(child)
                up = now - child.started_at
                child.backoff = BACKOFF_FIRST if up > STABLE_AFTER else min(BACKOFF_MAX, child.backoff * 2)
                child.restart_at = now + (BACKOFF_FIRST if up > STABLE_AFTER else child.backoff)
                child.restarts += 1
                child.proc = None
                log.error("%s (pid %d) exited with %s; starting it again in %.1f s", child.name, proc.pid,
                          proc.returncode, child.restart_at - now,
                          extra={"event": "child_died", "child": child.name, "code": proc.returncode})
        if not self.draining:
            return False
        return all(c.proc is None or c.proc.poll() is not None for c in self.workers)

    async def _stop_service(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + API_STOP_WAIT
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------- the children


def _ready_fd() -> int:
    return int(os.environ.get("SIPEDGE_READY_FD", "-1"))


def _report(message: str) -> None:
    """Tell the supervisor over the ready pipe: ``fail <why>`` (and close it)."""
    fd = _ready_fd()
    if fd < 0:
        return
    try:
        os.write(fd, message.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass
    os.environ["SIPEDGE_READY_FD"] = "-1"


def _report_ready() -> None:
    """``ready``, then ``alive`` every :data:`HEARTBEAT` from this (running) event loop: a loop
    that blocks stops the lines, and the supervisor's ``hang_timeout`` ends the process."""
    fd = _ready_fd()
    if fd < 0:
        return
    os.set_blocking(fd, False)   # a supervisor that does not read must never block this loop
    loop = asyncio.get_running_loop()

    def say(line: bytes) -> None:
        try:
            os.write(fd, line)
        except BlockingIOError:
            pass                   # the pipe is full: the supervisor will read the next one
        except OSError:
            return                 # the supervisor is gone (we die with it)
        loop.call_later(HEARTBEAT, say, b"alive\n")

    say(b"ready\n")


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge.processes")
    parser.add_argument("role", choices=["worker", "api", "cluster"])
    parser.add_argument("index", nargs="?", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--data", required=True)
    parser.add_argument("--api-fd", type=int)
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--loop", default="asyncio")
    args = parser.parse_args(argv)
    supervisor = int(os.environ.get("SIPEDGE_SUPERVISOR", "0"))
    if supervisor:
        die_with_parent(supervisor)
    from .logs import setup as setup_logging

    setup_logging(args.log_format, args.log_level, process=f"w{args.index}" if args.role == "worker" else args.role)
    from .node import StartupError

    try:
        cfg = load(args.config)
        run = {"worker": _worker, "api": _api, "cluster": _cluster}[args.role](cfg, args)
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(run)
        else:
            asyncio.run(run)
    except (StartupError, ConfigError) as exc:
        _report(f"fail {exc}")
        return 1
    except OSError as exc:
        _report(f"fail {args.role}: {exc.strerror or exc}")
        return 1
    return 0


async def _worker(cfg: Config, args: argparse.Namespace) -> None:
    from .node import WorkerRole, open_store, serve
    from .sip.workers import node_key

    data_dir = Path(args.data)
    store = open_store(cfg, data_dir)   # opened here, in this process: never inherited
    try:
        role = WorkerRole(index=args.index, count=args.count, key=node_key(data_dir),
                          nonce_key=nonce_key(data_dir), ready=_report_ready)
        await serve(cfg, store, "", config_path=args.config, role=role)
    finally:
        store.close()


async def _api(cfg: Config, args: argparse.Namespace) -> None:
    """The control API of the node, and its one /metrics (this process's and every worker's)."""
    import uvicorn

    from admin_api.app import create_app
    from admin_api.metrics import build_registry, node_exposition

    from .cluster.agent import agent_address
    from .cluster.link import journal_address
    from .node import ApiServer, admin_token, open_store
    from .sip.workers import metrics_address, node_key

    data_dir = Path(args.data)
    store = open_store(cfg, data_dir)
    try:
        key = node_key(data_dir)
        registry = build_registry(store, per_profile=cfg.api.metrics_per_profile)
        services = [agent_address(key)] if cfg.cluster.enabled else []
        exposition = node_exposition(registry, [metrics_address(key, k) for k in range(args.count)], services)
        app, _ = create_app(store, admin_token(cfg, data_dir), registrar=cfg.sip.domain, settings=cfg.api,
                            registry=registry, exposition=exposition,
                            journal=journal_address(key) if cfg.cluster.enabled else None,
                            node=cfg.cluster.node if cfg.cluster.enabled else "")
        server = ApiServer(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                          loop="asyncio"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        loop.add_signal_handler(signal.SIGHUP, lambda: None)   # nothing of the API is reloadable
        sock = socket.socket(fileno=args.api_fd)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            _report_ready()
        await task
    finally:
        store.close()


async def _cluster(cfg: Config, args: argparse.Namespace) -> None:
    """The cluster agent: the node's lease in the engine, mirrored into LMDB for the workers."""
    from .cluster.agent import ClusterAgent
    from .cluster.engine import EngineUnavailable
    from .cluster.membership import LeaseConfigMismatch, NodeNameInUse
    from .node import StartupError, open_store
    from .sip.workers import node_key

    data_dir = Path(args.data)
    store = open_store(cfg, data_dir)
    try:
        agent = ClusterAgent(cfg, store, key=node_key(data_dir), ready=_report_ready)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)   # [cluster] is read at start only
        try:
            await agent.run()
        except (EngineUnavailable, NodeNameInUse, LeaseConfigMismatch) as exc:
            raise StartupError(str(exc)) from None
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(_child_main())
