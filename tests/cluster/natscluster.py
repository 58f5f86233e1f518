"""A NATS JetStream engine of three (or N) members for the cluster tests.

Each member is a real ``nats-server`` (Debian ``nats-server``) with JetStream on its own store
directory, routed to the others into one cluster; :meth:`NatsCluster.wait_ready` returns once
the JetStream meta group has a leader (before that, creating a replicated stream fails).
Members listen on loopback by default; ``hosts`` and ``wrap`` put member *i* on another address
and run it through a prefix (``["ip", "netns", "exec", NAME]``) for the namespace tests.
:meth:`kill` and :meth:`start_member` take one member away and back (its store is kept, as a
machine that reboots keeps its disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import nats

CLUSTER_NAME = "sipedge-test"
PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up here: a forked child must not dlopen


def _die_with_us() -> None:
    """In the child: SIGKILL when the test process dies, even by SIGKILL (no teardown then)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nats_server() -> str | None:
    return shutil.which("nats-server")


class NatsCluster:
    def __init__(self, root: Path, members: int = 3, *, hosts: list[str] | None = None,
                 wrap: list[list[str]] | None = None) -> None:
        self.root = root
        self.hosts = hosts or ["127.0.0.1"] * members
        self.wrap = wrap or [[] for _ in range(members)]
        self.client_ports = [free_port() for _ in range(members)]
        self.route_ports = [free_port() for _ in range(members)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * members

    @property
    def urls(self) -> list[str]:
        return [f"nats://{h}:{p}" for h, p in zip(self.hosts, self.client_ports, strict=True)]

    def _conf(self, i: int) -> Path:
        routes = ", ".join(f"nats-route://{h}:{p}" for j, (h, p) in enumerate(zip(self.hosts, self.route_ports,
                                                                                    strict=True)) if j != i)
        store = self.root / f"n{i}" / "store"
        store.mkdir(parents=True, exist_ok=True)
        conf = self.root / f"n{i}" / "nats.conf"
        conf.write_text(
            f'server_name: "n{i}"\n'
            f'listen: "{self.hosts[i]}:{self.client_ports[i]}"\n'
            f'jetstream {{ store_dir: "{store}", max_memory_store: 64MB, max_file_store: 1GB }}\n'
            # no_advertise: a client uses the members it was given, never ones it heard of (a client
            # given one member stays cut off when that member is frozen: the partition tests)
            f'cluster {{ name: "{CLUSTER_NAME}", listen: "{self.hosts[i]}:{self.route_ports[i]}", no_advertise: true, '
            f'routes: [{routes}] }}\n')
        return conf

    def start_member(self, i: int) -> None:
        assert self.procs[i] is None, f"member {i} already runs"
        conf = self._conf(i)
        log = (self.root / f"n{i}" / "nats.log").open("ab")
        self.procs[i] = subprocess.Popen([*self.wrap[i], "nats-server", "-c", str(conf)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_us)
        log.close()

    def start(self) -> NatsCluster:
        for i in range(len(self.hosts)):
            self.start_member(i)
        return self

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (its process group: a ``wrap`` prefix is in it too)."""
        proc = self.procs[i]
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # its own session: a wrap prefix goes too
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        self.procs[i] = None

    def freeze(self, i: int) -> None:
        """SIGSTOP member ``i``: its sockets stay open and nothing answers (a partition, as its clients
        and peers see it; TCP does not fail over until keepalives or pings give up)."""
        proc = self.procs[i]
        assert proc is not None, f"member {i} is not running"
        os.killpg(proc.pid, signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        """SIGCONT member ``i`` (the partition heals)."""
        proc = self.procs[i]
        assert proc is not None, f"member {i} is not running"
        os.killpg(proc.pid, signal.SIGCONT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running member answers and JetStream has a meta leader."""
        asyncio.run(self._wait_ready(timeout))

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        running = [u for u, p in zip(self.urls, self.procs, strict=True) if p is not None]
        for url in running:
            while True:
                for i, proc in enumerate(self.procs):
                    if proc is not None and proc.poll() is not None:
                        raise RuntimeError(f"nats-server n{i} exited {proc.returncode}: "
                                           f"{(self.root / f'n{i}' / 'nats.log').read_text()[-2000:]}")
                try:
                    nc = await nats.connect(servers=[url], connect_timeout=1, allow_reconnect=False)
                    try:
                        await nc.jetstream(timeout=2).account_info()
                    finally:
                        await nc.close()
                    break
                except Exception as exc:  # not up yet, or no meta leader yet
                    last = exc
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the engine at {url} did not become ready: {last!r}")
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        for i in range(len(self.procs)):
            proc = self.procs[i]
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)   # a frozen member cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill(i)
            self.procs[i] = None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
