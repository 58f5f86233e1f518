"""Drain and reload (SPEC §2.2) against a real edge with pjsua2 PBX and carrier UAs.

Drain: calls in progress keep their audio through SIGTERM and end normally, a new INVITE
gets 503 + Retry-After and OPTIONS 503 while the control API keeps serving, the process
exits 0 after the last call, and a restart on the same store finds nothing to recover:
channels 0, every CDR written, balances equal to their ledgers. With a short
``node.drain_timeout`` the calls still up are ended with BYE + Reason.

Reload: a carrier's address and the trusted list change under a running call (SIGHUP and
``sipedge reload``); the next call goes to the new carrier, the running call is untouched,
and a broken file is refused with the key at fault while the running config stays.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pjsua2")

from edgeproc import EdgeProcess

from e2e.pjua import PjUA, edge_registrar, hears_tone, provision_profile, tone_powers
from e2e.test_calls_e2e import (
    CARRIER_TONE,
    DOMAIN,
    PBX_TONE,
    RATES,
    UK,
    ParallelPool,
    finished_wav,
    free_media_block,
    tail_wav,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NEW_CARRIER_TONE = 700.0
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def uas(tmp_path: Path) -> Any:
    pool = ParallelPool(tmp_path / "uas")
    try:
        yield pool
    finally:
        pool.close_all()


def carrier_toml(host: str, port: int) -> str:
    return f'[[carriers]]\nuri = "sip:{host}:{port}"\npriority = 1\nweight = 100\n'


def start_edge(tmp_path: Path, carrier: PjUA, node: str = "") -> EdgeProcess:
    (tmp_path / "edge").mkdir()
    edge = EdgeProcess(tmp_path / "edge", extra_config=carrier_toml("127.0.0.2", carrier.port) + node,
                       trusted=["127.0.0.2/32"], sip_extra="rate_limit = 0", media_ports=free_media_block())
    edge.start()
    with edge.client() as api:
        assert api.put("/v1/rates", json={"rates": RATES}).status_code == 200
    return edge


def registered_pbx(uas: ParallelPool, edge: EdgeProcess, api: Any) -> tuple[PjUA, dict[str, Any]]:
    prof = provision_profile(api, name=f"pbx-{uuid.uuid4().hex[:6]}", credit="5.00", channels=4)
    pbx = uas.new("pbx", bind="127.0.0.1")
    assert pbx.register(edge_registrar(edge), prof["sip_username"], prof["sip_password"], domain=DOMAIN) == 200
    return pbx, prof


def call_out(pbx: PjUA, carrier: PjUA) -> tuple[Any, Any]:
    n = len(carrier.incoming_calls)
    call = pbx.call(f"sip:{UK}@{DOMAIN}", tone_hz=PBX_TONE)
    call.wait_state("CONFIRMED", 10)
    leg = carrier.wait_incoming(n + 1, 5)
    leg.wait_state("CONFIRMED", 5)
    return call, leg


def options(edge: EdgeProcess) -> tuple[int, dict[str, str]]:
    """A raw OPTIONS from a PBX address: (status, headers)."""
    from edge.sip import parse

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        branch = "z9hG4bK" + uuid.uuid4().hex
        msg = (f"OPTIONS sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n"
               f"Max-Forwards: 70\r\nFrom: <sip:probe@{DOMAIN}>;tag=p1\r\nTo: <sip:{DOMAIN}>\r\n"
               f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        sock.settimeout(5)
        sock.sendto(msg.encode(), ("127.0.0.1", edge.sip_port))
        resp = parse(sock.recv(65535))
    return resp.status, {"retry-after": resp.header("Retry-After") or ""}


def assert_ledgers_balance(api: Any, prof: dict[str, Any]) -> None:
    for owner, oid in (("profile", prof["id"]), ("account", prof["account"]["id"])):
        url = f"/v1/{owner}s/{oid}"
        entries = api.get(url + "/ledger?limit=1000").json()["items"]
        assert sum(Decimal(e["amount"]) for e in entries) == Decimal(api.get(url).json()["balance"]), owner


def restarted(edge: EdgeProcess) -> EdgeProcess:
    """The same store served again: what the drained run left behind."""
    edge.start()
    return edge


def tail_hears(wav: str | None, tmp: Path, freq: float, other: float) -> None:
    assert wav
    tail = tail_wav(finished_wav(wav), 1.0, tmp)
    assert hears_tone(str(tail), freq, other), tone_powers(str(tail), [freq, other])


# ------------------------------------------------------------------------------ drain

def test_sigterm_drains_live_calls_refuses_new_ones_and_exits_0(tmp_path: Path, uas: ParallelPool) -> None:
    carrier = uas.new("carrier", bind="127.0.0.2")
    carrier.on_incoming(200, tone_hz=CARRIER_TONE)
    edge = start_edge(tmp_path, carrier, "[node]\ndrain_timeout = 60\n")
    try:
        with edge.client() as api:
            pbx, prof = registered_pbx(uas, edge, api)
            call, leg = call_out(pbx, carrier)
            time.sleep(0.5)
            assert edge.proc is not None
            edge.proc.send_signal(signal.SIGTERM)
            # the gate is closed: no new call, PBXs and carriers told to go elsewhere
            status, headers = options(edge)
            assert status == 503 and int(headers["retry-after"]) > 0
            refused = pbx.call(f"sip:{UK}@{DOMAIN}", tone_hz=PBX_TONE)
            refused.wait_state("DISCONNECTED", 10)
            assert refused.last_status == 503, refused.responses
            assert any(r["code"] == 503 and r["headers"].get("retry-after") for r in refused.responses)
            assert len(carrier.incoming_calls) == 1
            # the control API still serves, and the call is still up, with audio both ways
            [live] = api.get(f"/v1/profiles/{prof['id']}/calls").json()
            assert live["answered_at"] is not None
            time.sleep(1.5)
            assert edge.proc.poll() is None and call.state == "CONFIRMED"
            call.hangup(timeout=10)
            leg.wait_state("DISCONNECTED", 10)
            assert edge.proc.wait(15) == 0
        tail_hears(call.record_wav, tmp_path / "pbx-tail.wav", CARRIER_TONE, PBX_TONE)
        tail_hears(leg.record_wav, tmp_path / "carrier-tail.wav", PBX_TONE, CARRIER_TONE)
        log = edge.log.read_text()
        assert "draining" in log and "Traceback" not in log
        assert not (edge.data / "sipedge.pid").exists()
        with restarted(edge).client() as api:
            assert "left by the previous run" not in edge.log.read_text()
            assert api.get(f"/v1/profiles/{prof['id']}").json()["channels_in_use"] == 0
            cdrs = api.get(f"/v1/profiles/{prof['id']}/cdrs").json()["items"]
            by_reason = sorted((c["status"], c["end_reason"]) for c in cdrs)
            assert (200, "caller_bye") in by_reason and len(cdrs) == 1, cdrs  # a 503 at the gate is no call
            assert_ledgers_balance(api, prof)
    finally:
        edge.stop()


def test_drain_timeout_ends_the_rest_with_bye_and_reason(tmp_path: Path, uas: ParallelPool) -> None:
    carrier = uas.new("carrier", bind="127.0.0.2")
    carrier.on_incoming(200, tone_hz=CARRIER_TONE)
    edge = start_edge(tmp_path, carrier, "[node]\ndrain_timeout = 1\n")
    try:
        with edge.client() as api:
            pbx, prof = registered_pbx(uas, edge, api)
            call, leg = call_out(pbx, carrier)
            drain = subprocess.run([sys.executable, "-m", "edge.cli", "drain", "--config", str(edge.config),
                                    "--wait", "20"], capture_output=True, text=True, timeout=30, cwd=ROOT)
            assert drain.returncode == 0, drain.stderr
            assert "draining" in drain.stdout and "has exited" in drain.stdout
            assert edge.proc is not None and edge.proc.wait(5) == 0
            call.wait_state("DISCONNECTED", 5)
            leg.wait_state("DISCONNECTED", 5)
            for side in (call, leg):
                byes = [r for r in side.requests if r.get("method") == "BYE"]
                assert byes, side.requests
                reason = " ".join(byes[0]["headers"].get("reason", []))
                assert "cause=503" in reason and "shutting down" in reason, reason
        with restarted(edge).client() as api:
            assert "left by the previous run" not in edge.log.read_text()
            [cdr] = api.get(f"/v1/profiles/{prof['id']}/cdrs").json()["items"]
            assert cdr["status"] == 200 and cdr["end_reason"] == "shutdown", cdr
            assert api.get(f"/v1/profiles/{prof['id']}").json()["channels_in_use"] == 0
            assert_ledgers_balance(api, prof)
    finally:
        edge.stop()


def test_drain_and_reload_name_a_missing_node(tmp_path: Path) -> None:
    for command in ("drain", "reload"):
        r = subprocess.run([sys.executable, "-m", "edge.cli", command, "--data", str(tmp_path / "none")],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no running sipedge" in r.stderr, r.stderr


# ------------------------------------------------------------------------------ reload

def sipedge_reload(edge: EdgeProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge.cli", "reload", "--config", str(edge.config)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_reload_moves_carriers_and_trusted_under_a_running_call(tmp_path: Path, uas: ParallelPool) -> None:
    old_carrier = uas.new("carrier", bind="127.0.0.2")
    old_carrier.on_incoming(200, tone_hz=CARRIER_TONE)
    new_carrier = uas.new("carrier2", bind="127.0.0.3")
    new_carrier.on_incoming(200, tone_hz=NEW_CARRIER_TONE)
    edge = start_edge(tmp_path, old_carrier)
    original = edge.config.read_text()
    try:
        with edge.client() as api:
            pbx, prof = registered_pbx(uas, edge, api)
            number = f"+1415556{uuid.uuid4().int % 10000:04d}"
            # before: 127.0.0.3 is no carrier, its INVITE is an outgoing attempt and challenged
            probe = new_carrier.call(f"sip:{number}@127.0.0.1:{edge.sip_port}", tone_hz=NEW_CARRIER_TONE)
            probe.wait_state("DISCONNECTED", 10)
            assert probe.last_status == 407, probe.responses

            running, running_leg = call_out(pbx, old_carrier)
            edge.config.write_text(
                original.replace(f"sip:127.0.0.2:{old_carrier.port}", f"sip:127.0.0.3:{new_carrier.port}")
                .replace('trusted = ["127.0.0.2/32"]', 'trusted = ["127.0.0.2/32", "127.0.0.3/32"]')
                .replace("[sip]\n", "[sip]\nsetup_timeout = 90\n")
                .replace('domain = "sip.edge.test"', 'domain = "sip.edge.test"\nnonce_ttl = 120'))
            r = sipedge_reload(edge)
            assert r.returncode == 0, r.stderr
            assert "reloaded" in r.stdout and "sip.nonce_ttl" in r.stdout  # restart-only: named, kept

            # the next call takes the new carrier; the trusted list now holds 127.0.0.3
            nxt, nxt_leg = call_out(pbx, new_carrier)
            assert len(old_carrier.incoming_calls) == 1
            probe = new_carrier.call(f"sip:{number}@127.0.0.1:{edge.sip_port}", tone_hz=NEW_CARRIER_TONE)
            probe.wait_state("DISCONNECTED", 10)
            assert probe.last_status == 404, probe.responses  # an incoming call now: unknown number

            # a broken file: refused with the key at fault, by the CLI and by the node itself
            edge.config.write_text(edge.config.read_text().replace("rate_limit = 0", "rate_limit = -1"))
            r = sipedge_reload(edge)
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and "sip.rate_limit" in r.stderr, r.stderr
            assert edge.proc is not None
            edge.proc.send_signal(signal.SIGHUP)
            result = wait_for(lambda: json.loads((edge.data / "reload.json").read_text())
                              if (edge.data / "reload.json").exists() and "rate_limit" in
                              (edge.data / "reload.json").read_text() else None, 5, "the refused reload")
            assert result["ok"] is False and "sip.rate_limit" in result["error"]
            assert "reload refused" in edge.log.read_text()
            third, third_leg = call_out(pbx, new_carrier)   # the running config stayed

            time.sleep(1.0)
            assert running.state == "CONFIRMED" and running_leg.state == "CONFIRMED"
            for c, leg in ((third, third_leg), (nxt, nxt_leg), (running, running_leg)):
                c.hangup(timeout=10)
                leg.wait_state("DISCONNECTED", 10)
            tail_hears(running.record_wav, tmp_path / "running.wav", CARRIER_TONE, PBX_TONE)
            tail_hears(nxt.record_wav, tmp_path / "next.wav", NEW_CARRIER_TONE, PBX_TONE)
            cdrs = wait_for(lambda: [c for c in api.get(f"/v1/profiles/{prof['id']}/cdrs").json()["items"]
                                     if c["status"] == 200] if len(api.get(
                                         f"/v1/profiles/{prof['id']}/cdrs").json()["items"]) >= 3 else [],
                            5, "three CDRs")
            assert sorted(c["end_reason"] for c in cdrs) == ["caller_bye"] * 3, cdrs
            wait_for(lambda: api.get(f"/v1/profiles/{prof['id']}").json()["channels_in_use"] == 0, 5, "channels 0")
            assert_ledgers_balance(api, prof)
    finally:
        edge.stop()
