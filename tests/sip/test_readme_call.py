"""The README's test-call line, run as written with real SIPp against the shipped ``sipedge.toml``
(only its ports and data directory moved, so that tests on one machine do not collide)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from edgeproc import EdgeProcess

ROOT = Path(__file__).resolve().parents[2]


def readme_line() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"^  test call\s+(sipp .*?)\s+\(the echo number", text, re.M).group(1)


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing (make test installs sip-tester)")
def test_the_readme_test_call_works_against_the_shipped_config(tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path)
    shipped = (ROOT / "sipedge.toml").read_text()
    edge.config.write_text(shipped.replace("127.0.0.1:5060", f"127.0.0.1:{edge.sip_port}")
                           .replace("127.0.0.1:8080", f"127.0.0.1:{edge.api_port}")
                           .replace('path = "var/edge.lmdb"', f'path = "{edge.data}"\nmap_size_mb = 64')
                           .replace('token = ""', 'token = "test-admin-token-0123456789"'))
    with edge.start("--demo"):
        out = edge.log.read_text()
        printed = re.search(r"test call\s+(sipp .*?)\s+\(the echo number", out).group(1)
        password = re.search(r"SIP password\s+(\S+)", out).group(1)
        line = readme_line().replace("<password>", password).replace("127.0.0.1:5060", f"127.0.0.1:{edge.sip_port}")
        assert line == printed   # the README shows what `make run` prints
        run = subprocess.run([*shlex.split(line), "-timeout", "20s", "-timeout_error", "-nostdin"],
                             cwd=ROOT, capture_output=True, text=True, timeout=40)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        with edge.client() as api:
            prof_id = re.search(r"/v1/profiles/(prf_\w+)", out).group(1)
            cdr = api.get(f"/v1/profiles/{prof_id}/cdrs").json()["items"][0]
        assert cdr["callee"] == "+17606604690" and cdr["status"] == 200 and float(cdr["cost"]) == 0
