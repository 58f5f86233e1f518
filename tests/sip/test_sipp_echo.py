"""The test call that ``make run`` prints, run with SIPp against a real demo edge."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from edgeproc import EdgeProcess

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing (make test installs sip-tester)")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_printed_echo_call_works(tmp_path: Path, loop: str) -> None:
    edge = EdgeProcess(tmp_path, sip_extra='digest_algorithms = ["MD5", "SHA-256"]  # as sipedge.toml')
    with edge.start("--demo", "--loop", loop):
        out = edge.log.read_text()
        line = re.search(r"test call\s+(sipp .*?)\s+\(the echo number", out).group(1)
        args = line.split()[1:]
        run = subprocess.run(["sipp", *args, "-i", "127.0.0.1", "-p", "0", "-timeout", "20s", "-timeout_error",
                              "-nostdin", "-trace_err", "-error_file", str(tmp_path / "sipp.err")],
                             cwd=ROOT, capture_output=True, text=True, timeout=40)
        errors = (tmp_path / "sipp.err").read_text() if (tmp_path / "sipp.err").exists() else ""
        assert run.returncode == 0, run.stdout[-2000:] + errors
        with edge.client() as api:
            prof_id = re.search(r"/v1/profiles/(prf_\w+)", out).group(1)
            cdr = api.get(f"/v1/profiles/{prof_id}/cdrs").json()["items"][0]
        assert cdr["callee"] == "+17606604690" and cdr["status"] == 200 and float(cdr["cost"]) == 0
