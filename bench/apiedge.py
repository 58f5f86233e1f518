"""A ``sipedge serve`` child for the control-API benchmarks: loopback ports, a temporary store, a known token."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiEdge:
    """``with ApiEdge(tmp) as edge``: the node runs while the block does; ``edge.pid`` is its process."""

    def __init__(self, tmp: Path, *, map_size_mb: int = 1024, extra_api: str = "", workers: int = 1,
                 sip_extra: str = "") -> None:
        """:param workers: ``[node] workers`` (1: the single process the API benchmarks were written for)."""
        self.tmp = tmp
        self.data = tmp / "data"
        self.map_size_mb = map_size_mb
        self.api_port = free_port()
        sip = self.sip_port = free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.config = tmp / "sipedge.toml"
        self.config.write_text(
            f'[node]\nworkers = {workers}\n'
            f'[sip]\nlisten = ["udp:127.0.0.1:{sip}"]\n{sip_extra}\n'
            f'[media]\nports = [27000, 27999]\n'
            f'[api]\nlisten = "127.0.0.1:{self.api_port}"\ntoken = "{TOKEN}"\nkey_rate_limit = 0\n'
            f'webhook_deliver = false\n{extra_api}\n'
            f'[storage]\npath = "{self.data}"\nmap_size_mb = {map_size_mb}\n')
        self.log = tmp / "edge.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> ApiEdge:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("SIPEDGE_ADMIN_TOKEN", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sipedge exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.base + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"sipedge did not start:\n{self.log.read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60.0,
                            **kw)  # type: ignore[arg-type]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of a process (KiB), from /proc/PID/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[name] = int(value.split()[0])
    return out
