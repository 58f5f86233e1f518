"""Dead calls and crashes: RTP timeout ends both legs; ``kill -9`` in the middle of a call
loses no money and leaks no channel (SPEC §4.5, §7)."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
from edgeproc import EdgeProcess
from rawsip import media_port, rtp_packet
from test_calls_raw import Carrier, Pbx, answered_call, api_get, new_profile, wait_for


@pytest.fixture(scope="module")
def carrier():
    c = Carrier("127.0.0.2")
    yield c
    c.close()


def make_edge(tmp, carrier: Carrier) -> EdgeProcess:
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n'
             '[credit]\nslice_seconds = 60\n')
    proc = EdgeProcess(tmp, extra_config=extra, trusted=["127.0.0.2/32"],
                       sip_extra="rate_limit = 0")
    text = proc.config.read_text().replace("[media]\n", "[media]\nrtp_timeout = 2.0\nquiet_period = 0.5\n")
    proc.config.write_text(text)
    return proc


def provision_rates(edge: EdgeProcess) -> None:
    with edge.client() as api:
        api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200", "min_seconds": 60,
                                              "increment_seconds": 6}]})


def test_rtp_timeout_ends_both_legs(tmp_path, carrier: Carrier) -> None:
    with make_edge(tmp_path, carrier).start("--log-format", "json") as edge:
        provision_rates(edge)
        prof = new_profile(edge)
        pbx = Pbx(edge)
        try:
            d, tag, inv = answered_call(edge, pbx, carrier, prof)
            _, relay_a = media_port(d["ok"].body)
            for seq in range(5):  # some media, then silence
                pbx.rtp.sendto(rtp_packet(seq), ("127.0.0.1", relay_a))
            t0 = time.monotonic()
            pbx.sock.settimeout(6)
            bye = pbx.recv()
            while not (bye.is_request and bye.method == "BYE"):
                bye = pbx.recv()
            assert 1.5 <= time.monotonic() - t0 <= 4.5
            assert "Media timeout" in bye.header("Reason")
            carrier.answer(carrier.recv_request("BYE"), 200)
            cdr = wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
            assert cdr["end_reason"] == "rtp_timeout" and cdr["media"]["a_packets"] == 5
            assert api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0
            # structured logs: every line is JSON; one call id ties both legs' Call-IDs together
            entries = [json.loads(line) for line in edge.log.read_text().splitlines() if line.startswith("{")]
            mine = [e for e in entries if e.get("call_id") and e.get("event", "").startswith("call_")]
            ended = next(e for e in mine if e["event"] == "call_ended")
            assert ended["reason"] == "rtp_timeout" and ended["inbound_call_id"] == d["call_id"]
            assert ended["outbound_call_id"] == inv.call_id
            assert {e["event"] for e in mine if e["call_id"] == ended["call_id"]} >= {
                "call_started", "call_attempt", "call_answered", "call_ended"}
            assert prof["sip_password"] not in edge.log.read_text()
        finally:
            pbx.close()


def test_kill_9_mid_call_settles_on_restart(tmp_path, carrier: Carrier) -> None:
    edge = make_edge(tmp_path, carrier).start()
    try:
        provision_rates(edge)
        prof = new_profile(edge)
        pbx = Pbx(edge)
        d, tag, inv = answered_call(edge, pbx, carrier, prof)
        assert api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 1
        balance_during = Decimal(api_get(edge, f"/v1/profiles/{prof['id']}")["balance"])
        assert balance_during == Decimal("4.98")  # the first slice (the 60 s minimum) is reserved
        edge.stop(sig_kill=True)
        # the same store, a new process: recovery settles the call and BYEs both legs
        config_text = edge.config.read_text()
        restarted = EdgeProcess(tmp_path)
        restarted.config.write_text(config_text)  # same ports, same store
        restarted.api_port, restarted.base, restarted.sip_port = edge.api_port, edge.base, edge.sip_port
        restarted.start()
        try:
            assert "settled 1 calls" in restarted.log.read_text()
            cdr = wait_for(lambda: api_get(restarted, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
            assert cdr["end_reason"] == "recovery"
            assert api_get(restarted, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0
            assert api_get(restarted, f"/v1/profiles/{prof['id']}/calls") == []
            assert Decimal(api_get(restarted, f"/v1/profiles/{prof['id']}")["balance"]) == Decimal("4.98")
            bye = pbx.recv()
            while not (bye.is_request and bye.method == "BYE"):
                bye = pbx.recv()
            assert bye.call_id == d["call_id"] and "restarted" in bye.header("Reason")
            assert carrier.recv_request("BYE").call_id == inv.call_id
            # every balance still equals its ledger
            for owner in ("profile", "account"):
                oid = prof["id"] if owner == "profile" else prof["account_id"]
                url = f"/v1/{owner}s/{oid}"
                entries = api_get(restarted, url + "/ledger?limit=1000")["items"]
                assert sum(Decimal(e["amount"]) for e in entries) == Decimal(api_get(restarted, url)["balance"])
        finally:
            restarted.stop()
            pbx.close()
    finally:
        edge.stop()
