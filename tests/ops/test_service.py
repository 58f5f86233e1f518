"""The system service (SPEC §2.3): ``make install DESTDIR=...`` lays out the tree, the unit passes
``systemd-analyze verify``, and the installed entry point serves with the default config path
(moved under DESTDIR by SIPEDGE_ROOT / SIPEDGE_CONFIG, docs/deployment.md), telling systemd
READY=1, WATCHDOG=1 and, on SIGTERM, STOPPING=1 over $NOTIFY_SOCKET before it exits 0."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from edgeproc import free_port, wait_ready

from edge import sdnotify

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def destdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("destdir")
    r = subprocess.run(["make", "-s", "install", f"DESTDIR={dest}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return dest


def test_install_lays_out_the_service(destdir: Path) -> None:
    for path in ("usr/bin/sipedge", "opt/sipedge/bin/python", "lib/systemd/system/sipedge.service",
                 "usr/lib/sysusers.d/sipedge.conf", "etc/sipedge/sipedge.toml", "var/lib/sipedge",
                 "usr/share/doc/sipedge/deployment.md"):
        assert (destdir / path).exists(), path
    assert os.access(destdir / "usr/bin/sipedge", os.X_OK)
    # runtime only: no test peers or test libraries in the service's venv
    site = next((destdir / "opt/sipedge/lib").glob("python3*/site-packages"))
    assert (site / "msgspec").exists() and not (site / "pytest").exists() and not (site / "pjsua2").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze missing (make test installs systemd)")
def test_unit_verifies(destdir: Path, tmp_path: Path) -> None:
    unit = (destdir / "lib/systemd/system/sipedge.service").read_text()
    assert "Type=notify" in unit and "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit and "User=sipedge" in unit
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    drain = float(re.search(r"^drain_timeout = (\d+)", (destdir / "etc/sipedge/sipedge.toml").read_text(), re.M)
                  .group(1))
    assert stop > drain
    # verify checks that ExecStart exists: point it at the staged entry point
    staged = tmp_path / "sipedge.service"
    staged.write_text(unit.replace("/usr/bin/sipedge", str(destdir / "usr/bin/sipedge")))
    r = subprocess.run(["systemd-analyze", "verify", str(staged)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def notifications(sock: socket.socket, until: str, limit: int = 50) -> list[str]:
    seen: list[str] = []
    for _ in range(limit):
        seen += sock.recv(4096).decode().splitlines()
        if until in seen:
            return seen
    raise AssertionError(f"{until} not among {seen}")


def test_installed_entry_point_serves_with_the_default_config_path(destdir: Path, tmp_path: Path) -> None:
    config = destdir / "etc/sipedge/sipedge.toml"
    sip_port, api_port = free_port(), free_port()
    # what an operator edits: addresses, and here a data directory inside the staged tree
    config.write_text(config.read_text()
                      .replace("127.0.0.1:5060", f"127.0.0.1:{sip_port}")
                      .replace("127.0.0.1:8080", f"127.0.0.1:{api_port}")
                      .replace('"/var/lib/sipedge/edge.lmdb"', f'"{destdir}/var/lib/sipedge/edge.lmdb"')
                      .replace("map_size_mb = 4096", "map_size_mb = 64"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(20)
    env = dict(os.environ, SIPEDGE_ROOT=str(destdir), SIPEDGE_CONFIG=str(config),
               NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    env.pop("SIPEDGE_ADMIN_TOKEN", None)
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(destdir / "usr/bin/sipedge"), "serve"], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp_path)
    try:
        wait_ready(proc, f"http://127.0.0.1:{api_port}/healthz", log, 30, "installed sipedge")
        seen = notifications(notify, "READY=1")
        seen += notifications(notify, "WATCHDOG=1")
        seen += notifications(notify, "WATCHDOG=1")   # again: pinged periodically, not once
        assert (destdir / "var/lib/sipedge/edge.lmdb/data.mdb").exists()
        assert (destdir / "var/lib/sipedge/edge.lmdb/sipedge.pid").read_text().split("\n")[1] == str(config)
        proc.send_signal(signal.SIGTERM)
        notifications(notify, "STOPPING=1")
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        notify.close()


def test_notify_outside_systemd_and_abstract_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    name = f"sipedge-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1", "STATUS=serving")
        assert sock.recv(100) == b"READY=1\nSTATUS=serving"
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None        # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.5
