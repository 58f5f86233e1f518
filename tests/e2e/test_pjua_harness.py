"""The pjsua2 harness itself, peer to peer on loopback (no sipedge needed).

Proves what the end-to-end tests rely on: two UAs in their own processes call each
other, each hears the other's tone and not its own (Goertzel), hold/unhold and hangup
states are reported, DTMF arrives, rejections carry their status, TCP works, and
REGISTER with digest credentials reports the registrar's final answer.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pjsua2")

from e2e.pjua import (
    PjUAError,
    UAPool,
    goertzel,
    hears_tone,
    parse_sip_headers,
    pjua_fixture,  # noqa: F401 - provides the pjua fixture to this module
    tone_powers,
    write_tone_wav,
)

pytestmark = pytest.mark.timeout(60)


def test_goertzel_on_generated_tones(tmp_path: Path) -> None:
    wav = tmp_path / "t.wav"
    write_tone_wav(wav, 440, seconds=1.0)
    assert goertzel(wav, 440) > 0.9
    assert goertzel(wav, 1000) < 0.01
    assert hears_tone(wav, 440, 1000)
    assert not hears_tone(wav, 1000, 440)
    silent = tmp_path / "s.wav"
    write_tone_wav(silent, 440, amplitude=0.0)
    assert tone_powers(silent, [440]) == {440: 0.0}


def test_call_both_directions_of_audio_hold_dtmf_hangup(pjua: UAPool) -> None:
    alice = pjua.new("alice")
    bob = pjua.new("bob")
    bob.on_incoming(200, tone_hz=1000, ring_ms=200)
    call = alice.call(bob.uri, tone_hz=440, headers={"X-Test": "harness"})
    assert call.wait_state("CONFIRMED", 10) == "CONFIRMED"
    incoming = bob.wait_incoming(1, 5)
    incoming.wait_state("CONFIRMED", 5)
    assert call.last_status == 200
    assert "EARLY" in call.states  # the 180 before the answer
    assert 180 in [r["code"] for r in call.responses if r["cseq_method"] == "INVITE"]
    info = bob.received_requests[0]
    assert info["ruri_user"] == "bob" and info["to_user"] == "bob" and info["from_user"] == "alice"
    assert info["headers"]["x-test"] == ["harness"]

    time.sleep(1.5)  # audio both ways
    call.hold()
    call.wait_media("LOCAL_HOLD", 5)
    incoming.wait_media("REMOTE_HOLD", 5)
    call.unhold()
    call.wait_media("ACTIVE", 5)
    incoming.wait_media("ACTIVE", 5)
    call.send_dtmf("12#")
    incoming.wait_dtmf("12#", 5)
    time.sleep(1.0)
    stats = call.stats()
    assert stats["rx_pkt"] > 50 and stats["tx_pkt"] > 50

    call.hangup()
    incoming.wait_state("DISCONNECTED", 5)
    assert call.states[-1] == "DISCONNECTED" and incoming.states[-1] == "DISCONNECTED"
    assert "BYE" in [r.get("method") for r in incoming.requests], incoming.requests

    # each side hears the other's tone, and not (only) its own
    assert call.record_wav and incoming.record_wav
    assert hears_tone(call.record_wav, 1000, 440), tone_powers(call.record_wav, [440, 1000])
    assert hears_tone(incoming.record_wav, 440, 1000), tone_powers(incoming.record_wav, [440, 1000])


def test_rejection_status_and_no_answer_cancel(pjua: UAPool) -> None:
    alice = pjua.new("alice")
    bob = pjua.new("bob")
    bob.on_incoming(486)
    call = alice.call(bob.uri)
    call.wait_state("DISCONNECTED", 10)
    assert call.last_status == 486
    assert call.final_response is not None and call.final_response["code"] == 486
    with pytest.raises(PjUAError):
        call.wait_state("CONFIRMED", 0.1)

    bob.on_incoming(None)  # ring until told: the caller cancels
    call2 = alice.call(bob.uri)
    call2.wait_state("EARLY", 10)
    ringing = bob.wait_incoming(2, 5)
    call2.hangup()  # CANCEL
    ringing.wait_state("DISCONNECTED", 5)
    assert ringing.last_status == 487


def test_tcp_call(pjua: UAPool) -> None:
    alice = pjua.new("alice", transport="tcp")
    bob = pjua.new("bob", transport="tcp")
    bob.on_incoming(200, tone_hz=1000)
    assert bob.uri.endswith(";transport=tcp")
    call = alice.call(bob.uri, tone_hz=440)
    call.wait_state("CONFIRMED", 10)
    call.hangup()
    assert call.states[-1] == "DISCONNECTED"


class FakeRegistrar:
    """A minimal digest registrar (RFC 2617 MD5, qop=auth) on a UDP socket: enough to
    prove the harness's REGISTER, credentials and status reporting."""

    REALM = "sip.edge.test"

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.bindings: dict[str, str] = {}
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            msg = data.decode(errors="replace")
            self.requests.append(msg)
            start, hdrs = parse_sip_headers(msg)
            if not start.startswith("REGISTER"):
                continue
            self.sock.sendto(self._answer(start, hdrs).encode(), addr)

    def _answer(self, start: str, hdrs: dict[str, list[str]]) -> str:
        auth = hdrs.get("authorization", [""])[0]
        code, reason, extra = 401, "Unauthorized", (
            f'WWW-Authenticate: Digest realm="{self.REALM}", nonce="n{time.time_ns()}", qop="auth", algorithm=MD5\r\n')
        if auth:
            p = dict(re.findall(r'(\w+)="?([^",]*)"?', auth))
            user = p.get("username", "")
            pw = self.users.get(user)
            if pw is not None:
                ha1 = hashlib.md5(f"{user}:{self.REALM}:{pw}".encode()).hexdigest()
                ha2 = hashlib.md5(f"REGISTER:{p.get('uri', '')}".encode()).hexdigest()
                kd = f"{ha1}:{p['nonce']}:{p.get('nc')}:{p.get('cnonce')}:auth:{ha2}"
                want = hashlib.md5(kd.encode()).hexdigest()
                if want == p.get("response"):
                    contact = hdrs.get("contact", [""])[0]
                    expires = hdrs.get("expires", ["3600"])[0]
                    if expires == "0":
                        self.bindings.pop(user, None)
                        code, reason, extra = 200, "OK", ""
                    else:
                        self.bindings[user] = contact
                        code, reason, extra = 200, "OK", f"Contact: {contact};expires={expires}\r\n"
                else:
                    code, reason, extra = 403, "Forbidden", ""
            else:
                code, reason, extra = 403, "Forbidden", ""
        lines = [f"SIP/2.0 {code} {reason}"]
        for name in ("via", "from", "call-id", "cseq"):
            for v in hdrs.get(name, []):
                lines.append(f"{name.title() if name != 'call-id' else 'Call-ID'}: {v}")
        to = hdrs.get("to", [""])[0]
        lines.append(f"To: {to}" + ("" if "tag=" in to else ";tag=fake1"))
        return "\r\n".join(lines) + "\r\n" + extra + "Content-Length: 0\r\n\r\n"

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


def test_register_with_digest_against_fake_registrar(pjua: UAPool) -> None:
    reg = FakeRegistrar({"990500000231": "s3cret"})
    try:
        pbx = pjua.new("pbx")
        status = pbx.register(f"sip:127.0.0.1:{reg.port}", "990500000231", "s3cret", domain="sip.edge.test",
                              timeout=10)
        assert status == 200
        assert "990500000231" in reg.bindings and f":{pbx.port}" in reg.bindings["990500000231"]
        assert pbx.unregister() == 200
        assert "990500000231" not in reg.bindings

        bad = pjua.new("bad")
        assert bad.register(f"sip:127.0.0.1:{reg.port}", "990500000231", "wrong", timeout=10) == 403
    finally:
        reg.close()


# ---- against a real sipedge (SPEC §4.1): the harness's edge-facing path -------------------

def _edge_sip_serving(edge) -> bool:  # type: ignore[no-untyped-def]
    """Whether the edge answers SIP at all (OPTIONS over UDP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(2.0)
        port = s.getsockname()[1]
        s.sendto((f"OPTIONS sip:127.0.0.1:{edge.sip_port} SIP/2.0\r\n"
                  f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKprobe{time.time_ns()};rport\r\n"
                  f"From: <sip:probe@sip.edge.test>;tag=p1\r\nTo: <sip:127.0.0.1:{edge.sip_port}>\r\n"
                  f"Call-ID: probe-{time.time_ns()}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                  f"Content-Length: 0\r\n\r\n").encode(), ("127.0.0.1", edge.sip_port))
        try:
            return s.recv(65535).startswith(b"SIP/2.0 ")
        except OSError:
            return False


@pytest.mark.e2e
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_pjua_registers_with_the_edge(edge, api, pjua: UAPool, transport: str) -> None:  # type: ignore[no-untyped-def]
    from e2e.pjua import edge_registrar, provision_profile

    if not _edge_sip_serving(edge):
        pytest.skip("the edge does not answer SIP yet (no OPTIONS reply)")
    prof = provision_profile(api, name=f"reg-{transport}", channels=2)
    registrar = edge_registrar(edge, transport)
    pbx = pjua.new(f"pbx{transport}", transport=transport)
    assert pbx.register(registrar, prof["sip_username"], prof["sip_password"], domain="sip.edge.test") == 200
    regs = api.get(f"/v1/profiles/{prof['id']}/registrations").json()
    items = regs["items"] if isinstance(regs, dict) and "items" in regs else regs
    assert any(f":{pbx.port}" in str(b) for b in items), regs
    assert pbx.unregister() == 200

    wrong = pjua.new(f"wrong{transport}", transport=transport)
    status = wrong.register(registrar, prof["sip_username"], prof["sip_password"] + "x", domain="sip.edge.test")
    assert status in (401, 403), status


@pytest.mark.e2e
def test_pjua_calls_through_the_edge_both_ways(tmp_path: Path, pjua: UAPool) -> None:
    """PBX -> edge -> carrier and carrier -> edge -> PBX with real audio (SPEC §4.2, §4.3)."""
    from edgeproc import EdgeProcess

    from e2e.pjua import edge_registrar, provision_profile

    carrier = pjua.new("carrier", bind="127.0.0.2")
    carrier.on_incoming(200, tone_hz=1000)
    with EdgeProcess(tmp_path, carriers=[f"sip:127.0.0.2:{carrier.port}"]) as edge:
        if not _edge_sip_serving(edge):
            pytest.skip("the edge does not answer SIP yet (no OPTIONS reply)")
        with edge.client() as api:
            assert api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.0200", "connect_fee": "0",
                                                          "min_seconds": 1, "increment_seconds": 1,
                                                          "description": "UK"}]}).status_code == 200
            prof = provision_profile(api, name="HQ", channels=2, credit="5.00")
            acct = prof["account"]["id"]
            assert api.post(f"/v1/accounts/{acct}/numbers", json={"number": "+14155550100"}).status_code == 201
            assert api.post(f"/v1/profiles/{prof['id']}/numbers",
                            json={"number": "+14155550100", "extension": "sales"}).status_code == 201
            pbx = pjua.new("pbx")
            assert pbx.register(edge_registrar(edge), prof["sip_username"], prof["sip_password"]) == 200

            # outgoing: the PBX dials an E.164 number through the edge (outbound proxy)
            out = pbx.call("sip:+442071234567@sip.edge.test", tone_hz=440)
            out.wait_state("CONFIRMED", 15)
            leg = carrier.wait_incoming(1, 5)
            assert leg.info["ruri_user"].lstrip("+") == "442071234567"
            time.sleep(2.0)
            out.hangup()
            leg.wait_state("DISCONNECTED", 10)
            assert hears_tone(out.record_wav, 1000, 440), tone_powers(out.record_wav, [440, 1000])
            assert hears_tone(leg.record_wav, 440, 1000), tone_powers(leg.record_wav, [440, 1000])

            # an unregistered account with the right credentials but another From user: 403
            # (SPEC §4.2 rule 2), and the final response is visible with its headers
            spoof = pbx.call("sip:+442071234567@sip.edge.test", from_user="12345",
                             auth=(prof["sip_username"], prof["sip_password"]),
                             proxy=edge_registrar(edge) + ";lr")
            spoof.wait_state("DISCONNECTED", 15)
            assert spoof.last_status == 403, (spoof.last_status, spoof.last_reason)
            final = spoof.final_response
            assert final is not None and final["code"] == 403

            # incoming: the carrier calls the online number; the PBX sees its SIP username in
            # To and the extension tag as Request-URI user
            pbx.on_incoming(200, tone_hz=1000)
            carrier_call = carrier.call(f"sip:+14155550100@127.0.0.1:{edge.sip_port}", tone_hz=440)
            carrier_call.wait_state("CONFIRMED", 15)
            inc = pbx.wait_incoming(1, 5)
            assert inc.info["to_user"] == prof["sip_username"]
            assert inc.info["ruri_user"] == "sales"
            time.sleep(2.0)
            carrier_call.hangup()
            inc.wait_state("DISCONNECTED", 10)
            assert hears_tone(inc.record_wav, 440, 1000), tone_powers(inc.record_wav, [440, 1000])
            assert hears_tone(carrier_call.record_wav, 1000, 440), tone_powers(carrier_call.record_wav, [440, 1000])
