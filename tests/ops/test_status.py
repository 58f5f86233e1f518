"""``sipedge status`` against a real edge with live traffic (tests/ops/opstraffic.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from edgeproc import TOKEN, free_port
from opstraffic import ops_edge


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    with ops_edge(tmp_path_factory.mktemp("ops-status")) as o:
        yield o


def status(*args: str, token: str | None = None, timeout: float = 20.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SIPEDGE_ADMIN_TOKEN", "SIPEDGE_API")}
    if token is not None:
        env["SIPEDGE_ADMIN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "edge.cli", "status", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_status_with_the_token_from_the_environment(ops) -> None:
    out = status("--api", ops.edge.base, token=TOKEN)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "healthy" in text
    ids = {ops.hq["id"]: "HQ", ops.branch["id"]: "Branch", ops.broke["id"]: "Broke"}
    lines = {ids[line.split()[1]]: line for line in text.splitlines()
             if len(line.split()) > 1 and line.split()[1] in ids}
    # profiles with channels in use / capacity, calls, registrations, balances, auto-recharge
    assert ops.branch["id"] in lines["Branch"] and " 1/1 " in lines["Branch"] and "FULL" in lines["Branch"]
    assert "0.48" in lines["Branch"] and "off (min 2.00)" in lines["Branch"] and "CREDIT LOW" in lines["Branch"]
    assert " 0/2 " in lines["HQ"] and "on: +5.00 below 1.00" in lines["HQ"] and "CREDIT LOW" not in lines["HQ"]
    assert "CREDIT LOW" in lines["Broke"]
    # master balances of the accounts
    assert "Ops Test" in text and "14.50" in text and "Ops Poor" in text
    # the live call and the registration
    assert "LIVE CALLS (1)" in text and "+442071234567" in text
    assert "REGISTRATIONS (1)" in text and ops.hq["sip_username"] in text
    # edge-wide counters from /metrics
    assert "1 active (1 outgoing" in text and "1 blocked sources" in text and "5 lost upstream" in text


def test_status_token_option_and_json(ops) -> None:
    out = status("--api", ops.edge.base, "--token", TOKEN, "--json")
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["healthy"] is True and snap["api_error"] is None
    by_id = {p["id"]: p for p in snap["profiles"]}
    assert by_id[ops.branch["id"]]["in_use"] == 1 and by_id[ops.branch["id"]]["capacity"] == 1
    assert len(by_id[ops.branch["id"]]["calls"]) == 1 and by_id[ops.branch["id"]]["calls"][0]["direction"] == "outgoing"
    assert len(by_id[ops.hq["id"]]["bindings"]) == 1
    assert snap["accounts"][ops.account["id"]]["balance"] == "14.50"
    assert snap["totals"]["calls_answered"] == 4


def test_status_profile_filter(ops) -> None:
    out = status("--api", ops.edge.base, "--profile", ops.hq["id"], "--json", token=TOKEN)
    assert [p["id"] for p in json.loads(out.stdout)["profiles"]] == [ops.hq["id"]]


def test_status_without_a_valid_token_shows_what_metrics_know(ops) -> None:
    out = status("--api", ops.edge.base, "--token", "wrong-token")
    assert out.returncode == 1
    assert "token was refused" in out.stdout and "Branch" in out.stdout and "1/1" in out.stdout
    out = status("--api", ops.edge.base)
    assert out.returncode == 0
    assert "no admin token" in out.stdout and "0.48" in out.stdout and "LIVE CALLS" not in out.stdout


def test_status_from_a_local_config(ops) -> None:
    """``--config``: the API address and the token come from the edge's own config file."""
    out = status("--config", str(ops.edge.config))
    assert out.returncode == 0, out.stderr
    assert ops.edge.base in out.stdout and "LIVE CALLS (1)" in out.stdout


def test_status_unreachable_edge() -> None:
    out = status("--api", f"http://127.0.0.1:{free_port()}", "--timeout", "2", token=TOKEN)
    assert out.returncode == 1 and "cannot reach" in out.stderr


def test_status_watch_refreshes_until_interrupted(ops) -> None:
    env = dict(os.environ, SIPEDGE_ADMIN_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "status", "--api", ops.edge.base, "--watch", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert stdout.count("sipedge status") >= 2
