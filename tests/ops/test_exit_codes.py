"""The one-line failures of ``sipedge`` and their exit codes (SPEC §2.3, docs/deployment.md):
0 ok, 1 a runtime failure, 2 usage or an invalid config; never a traceback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from edgeproc import free_port

from edge import __version__

ROOT = Path(__file__).resolve().parents[2]


def sipedge(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=dict(os.environ, **(env or {})))


def config(tmp_path: Path, sip_port: int, api_port: int) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[sip]\nlisten = ["udp:127.0.0.1:{sip_port}", "tcp:127.0.0.1:{sip_port}"]\n'
                    f'[api]\nlisten = "127.0.0.1:{api_port}"\ntoken = "t"\n'
                    f'[storage]\npath = "{tmp_path / "data"}"\nmap_size_mb = 64\n')
    return path


def one_line(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("sipedge: ") and all(w in last for w in words), r.stderr


def test_version_flag() -> None:
    from edge._rtp import srtp_library

    for args in (["--version"], ["version"]):   # with the SRTP library the relay links
        r = sipedge(*args)
        assert r.returncode == 0 and r.stdout.strip() == f"sipedge {__version__} ({srtp_library()})", r.stdout


def test_default_config_path_missing_is_2(tmp_path: Path) -> None:
    r = sipedge("serve", env={"SIPEDGE_CONFIG": str(tmp_path / "missing.toml")})
    one_line(r, 2, "missing.toml", "No such file")


def test_sip_port_in_use_is_1(tmp_path: Path) -> None:
    sip_port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", sip_port))
        r = sipedge("serve", "--config", str(config(tmp_path, sip_port, free_port())))
    one_line(r, 1, "sip.listen", "Address already in use")


def test_api_port_in_use_is_1(tmp_path: Path) -> None:
    api_port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", api_port))
        busy.listen()
        r = sipedge("serve", "--config", str(config(tmp_path, free_port(), api_port)))
    one_line(r, 1, "api.listen", "Address already in use")


def test_unusable_data_directory_is_1(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    r = sipedge("serve", "--config", str(config(tmp_path, free_port(), free_port())),
                "--data", str(tmp_path / "a-file" / "data"))
    one_line(r, 1, "data directory", "Not a directory")


def _mount_ns_works() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


needs_mount_ns = pytest.mark.skipif(not _mount_ns_works(), reason="needs root and mount namespaces (unshare -m)")


@needs_mount_ns
@pytest.mark.parametrize("options, words", [
    ("size=64k", ("no space left", "data directory")),
    ("ro", ("data directory", "Read-only file system")),
])
def test_full_or_read_only_disk_is_1(tmp_path: Path, options: str, words: tuple[str, ...]) -> None:
    """A tmpfs of its own in a private mount namespace: full (64 KiB), or read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = config(tmp_path, free_port(), free_port())
    script = (f'mount -t tmpfs -o {options} tmpfs "{mnt}" && exec "{sys.executable}" -m edge.cli serve '
              f'--config "{cfg}" --data "{mnt}/data" --demo')
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    one_line(r, 1, *words)
