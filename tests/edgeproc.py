"""Run a real ``sipedge serve`` process for tests: free ports, a temp store, a known token."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKEN = "test-admin-token-0123456789"


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM, *, avoid: tuple[int, ...] = ()) -> int:
    """A port free for both UDP and TCP on ``host`` (SIP listens on both), none of ``avoid`` (the kernel
    may hand the port just closed out again: the full run once gave SIP the API's port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port in avoid:
            continue
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s2:
                s2.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float, name: str) -> None:
    """Poll ``url`` until it answers 200; fail with the process log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not become ready:\n{log.read_text()}")


def wait_for_text(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float, start: int = 0) -> None:
    """Wait until ``text`` is in ``log`` past its first ``start`` bytes."""
    deadline = time.monotonic() + timeout
    while text.encode() not in log.read_bytes()[start:]:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sipedge printed no {text.strip()!r} line:\n{log.read_text()}")
        time.sleep(0.05)


def node_children(node: EdgeProcess) -> dict[str, int]:
    """The processes of a supervised node by role: ``{"worker 0": pid, ..., "api": pid, "cluster": pid}``."""
    assert node.proc is not None
    out: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != node.proc.pid or b"edge.processes" not in argv:
            continue
        at = argv.index(b"edge.processes")
        role = argv[at + 1].decode()
        out[f"worker {argv[at + 2].decode()}" if role == "worker" else role] = int(entry.name)
    return out


class EdgeProcess:
    """A ``sipedge serve`` child process; ``stop()`` (or the context manager) ends it."""

    _instances = 0

    def __init__(self, tmp: Path, *, extra_config: str = "", sip_port: int | None = None,
                 carriers: list[str] | None = None, trusted: list[str] | None = None,
                 media_ports: tuple[int, int] = (0, 0), sip_extra: str = "", map_size_mb: int = 256,
                 listen_extra: tuple[str, ...] = (), workers: int = 1) -> None:
        """:param workers: ``[node] workers``; 1 (the default here) is the single process of the
        tests written before the worker processes (a real config defaults to one per core)."""
        self.tmp = Path(tmp)
        self.api_port = free_port()
        self.sip_port = sip_port or free_port(avoid=(self.api_port,))
        self.data = self.tmp / "data"
        lo, hi = media_ports
        if not lo:
            # below the kernel's ephemeral range (32768+), a different block per test process
            lo = 20000 + (os.getpid() % 12) * 1000 + (EdgeProcess._instances % 2) * 500
            hi = lo + 499
        EdgeProcess._instances += 1
        node_toml = f"[node]\nworkers = {workers}\n"
        if "[node]\n" in extra_config:   # the test's own [node] keys join the section
            extra_config, node_toml = extra_config.replace("[node]\n", node_toml, 1), ""
        carriers_toml = "".join(f'[[carriers]]\nuri = "{c}"\npriority = 1\nweight = 100\n' for c in (carriers or []))
        self.config = self.tmp / "sipedge.toml"
        self.config.write_text(
            node_toml + f'[sip]\nlisten = ["udp:127.0.0.1:{self.sip_port}", "tcp:127.0.0.1:{self.sip_port}"'
            + "".join(f', "{item}"' for item in listen_extra) + ']\n'
            f'domain = "sip.edge.test"\n{sip_extra}\n'
            f'[media]\naddress = "127.0.0.1"\nports = [{lo}, {hi}]\n'
            f'[api]\nlisten = "127.0.0.1:{self.api_port}"\ntoken = "{TOKEN}"\n'
            f'[storage]\npath = "{self.data}"\nmap_size_mb = {map_size_mb}\n'
            f'[inbound]\ntrusted = {list(trusted or ["127.0.0.2/32"])!r}\n'.replace("'", '"')
            + carriers_toml + extra_config
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.log = self.tmp / "edge.log"

    def start(self, *args: str, timeout: float = 20.0, new_session: bool = False) -> EdgeProcess:
        """:param new_session: the supervisor leads a session (and process group) of its own, so a
        test may SIGKILL the node's group without signalling pytest's (tests/cluster/netnslab.py)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("SIPEDGE_ADMIN_TOKEN", None)
        self._log_file = open(self.log, "ab")
        logged = self._log_file.tell()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "serve", "--config", str(self.config), *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env, start_new_session=new_session,
        )
        try:
            wait_ready(self.proc, self.base + "/healthz", self.log, timeout, "sipedge")
            if "--demo" in args:  # the banner comes once the listeners are bound, just after /healthz answers
                wait_for_text(self.proc, self.log, "\n  try ", timeout, start=logged)
        except RuntimeError:
            self.stop()
            raise
        return self

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=10.0)

    def stop(self, sig_kill: bool = False, drain_wait: float = 3.0) -> int | None:
        """SIGTERM (a drain), and a second SIGTERM after ``drain_wait`` s if calls are still up (the
        edge then ends them with BYE); SIGKILL only if it has not exited 10 s later."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sig_kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(drain_wait)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        self._log_file.close()
        return self.proc.returncode

    def __enter__(self) -> EdgeProcess:
        # ``with EdgeProcess(...).start("--demo") as e`` must not start a second process
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
