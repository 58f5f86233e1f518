"""Calls end to end: pjsua2 PBX and carriers with real audio through a real ``sipedge serve``
(SPEC §4.2-§4.5, issue 5 "How it is checked").

The PBX is a pjsua2 UA on 127.0.0.1 that REGISTERs with its profile's SIP username and
password and places calls through the edge (outbound proxy); the carrier is a pjsua2 UA
on 127.0.0.2, listed in ``[[carriers]]`` and ``[inbound] trusted``. The PBX plays a
440 Hz tone, the carrier 1000 Hz (the failover backup 700 Hz); each records what it
hears, and a Goertzel check proves each side hears the other's tone and not its own.
The same cases with exact SIP on the wire are in ``tests/sip/test_calls_raw.py``.

One edge, one PBX UA and one carrier UA serve the whole module (each test makes its own
profile and re-registers the PBX with it); the failover case runs its own small edge.
Logs: ``edge.log`` in the edge's temp dir, ``pjsip-<name>.log`` in the UAs' dir.
"""

from __future__ import annotations

import random
import socket
import threading
import time
import uuid
import wave
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pjsua2")

from edgeproc import EdgeProcess

from e2e.pjua import CallHandle, PjUA, UAPool, edge_registrar, hears_tone, provision_profile, tone_powers

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

DOMAIN = "sip.edge.test"
PBX_TONE = 440.0
CARRIER_TONE = 1000.0
BACKUP_TONE = 700.0
TALK = 1.5           # seconds of audio per call
ECHO = "+17606604690"
UK = "+442071234567"  # rate 44: 0.02/min, 60 s minimum, 6 s steps
FR = "+33123456789"   # rate 3: 1.20/min in 1 s steps = 0.02 per second

RATES = [
    {"prefix": "44", "rate": "0.0200", "min_seconds": 60, "increment_seconds": 6, "description": "UK"},
    {"prefix": "1", "rate": "0.0230", "min_seconds": 60, "increment_seconds": 6, "description": "US"},
    {"prefix": "3", "rate": "1.20", "min_seconds": 1, "increment_seconds": 1, "description": "1 s steps"},
]


# ------------------------------------------------------------------------------ helpers

class ParallelPool(UAPool):
    """A :class:`UAPool` that closes its UAs in parallel (each close takes ~1 s)."""

    def close_all(self) -> None:
        threads = [threading.Thread(target=self._close_one, args=(ua,), daemon=True) for ua in self.uas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        self.uas.clear()

    @staticmethod
    def _close_one(ua: PjUA) -> None:
        try:
            ua.close()
        except Exception:
            pass


def free_media_block(size: int = 200) -> tuple[int, int]:
    """UDP ports for the edge's relay that are free right now, below the kernel's ephemeral
    range and outside EdgeProcess's pid-derived default blocks (20000-31999): other engineers'
    test processes run edges on this machine too, and a shared block ends in 503 no_media_ports."""
    for _ in range(50):
        lo = random.randrange(10000, 20000 - size, 2)
        socks: list[socket.socket] = []
        try:
            for port in range(lo, lo + size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return lo, lo + size - 1
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free block of media ports")


def wait_for(fn: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(0.05)


def finished_wav(wav: str | None, timeout: float = 3.0) -> str:
    """``wav`` once pjsua has finalised it: its recorder writes the RIFF header when it is
    destroyed, a moment after the call's DISCONNECTED event."""
    assert wav, "no recording"
    path = Path(wav)

    def done() -> bool:
        try:
            head = path.read_bytes()[:12]
            return head[:4] == b"RIFF" and head[8:12] == b"WAVE" and \
                int.from_bytes(head[4:8], "little") + 8 == path.stat().st_size
        except OSError:
            return False
    wait_for(done, timeout, f"{wav} finalised")
    return wav


def assert_hears(wav: str | None, freq: float, own: float) -> None:
    wav = finished_wav(wav)
    assert hears_tone(wav, freq, own), f"{wav} should carry {freq} Hz, not {own} Hz: {tone_powers(wav, [freq, own])}"


def tail_wav(wav: str, seconds: float, out: Path, *, drop_end: float = 0.1) -> Path:
    """The last ``seconds`` of a recording (minus ``drop_end``) as a WAV of its own."""
    with wave.open(finished_wav(wav), "rb") as r:
        rate, width, channels, n = r.getframerate(), r.getsampwidth(), r.getnchannels(), r.getnframes()
        start = max(0, n - int((seconds + drop_end) * rate))
        r.setpos(start)
        frames = r.readframes(max(0, n - start - int(drop_end * rate)))
    with wave.open(str(out), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return out


def profile(api: Any, **kw: Any) -> dict[str, Any]:
    kw.setdefault("name", f"pbx-{uuid.uuid4().hex[:6]}")
    return provision_profile(api, **kw)


def register(pbx: PjUA, edge: EdgeProcess, prof: dict[str, Any]) -> None:
    """(Re-)register the PBX UA as ``prof``; its later calls use that account."""
    status = pbx.register(edge_registrar(edge), prof["sip_username"], prof["sip_password"], domain=DOMAIN)
    assert status == 200, f"REGISTER answered {status}"


def attach_number(api: Any, prof: dict[str, Any], number: str, extension: str | None = None) -> None:
    acct = prof["account"]["id"]
    assert api.post(f"/v1/accounts/{acct}/numbers", json={"number": number}).status_code == 201
    body = {"number": number, **({"extension": extension} if extension else {})}
    assert api.post(f"/v1/profiles/{prof['id']}/numbers", json=body).status_code == 201


def cdrs(api: Any, prof: dict[str, Any], count: int = 1) -> list[dict[str, Any]]:
    """The profile's CDRs (oldest first), once there are at least ``count``."""
    def get() -> list[dict[str, Any]]:
        items = api.get(f"/v1/profiles/{prof['id']}/cdrs").json()["items"]
        return items if len(items) >= count else []
    return wait_for(get, 5.0, f"{count} CDR(s)")


def ledger(api: Any, prof: dict[str, Any]) -> list[dict[str, Any]]:
    return api.get(f"/v1/profiles/{prof['id']}/ledger").json()["items"]


def get_profile(api: Any, prof: dict[str, Any]) -> dict[str, Any]:
    return api.get(f"/v1/profiles/{prof['id']}").json()


def channels_back_to_zero(api: Any, prof: dict[str, Any]) -> None:
    wait_for(lambda: get_profile(api, prof)["channels_in_use"] == 0, 5.0, "channels_in_use == 0")


def outgoing(pbx: PjUA, carrier: PjUA, callee: str, timeout: float = 10.0) -> tuple[CallHandle, CallHandle]:
    """PBX -> edge -> carrier, answered: (the PBX's call, the carrier's leg)."""
    n = len(carrier.incoming_calls)
    call = pbx.call(f"sip:{callee}@{DOMAIN}", tone_hz=PBX_TONE)
    call.wait_state("CONFIRMED", timeout)
    leg = carrier.wait_incoming(n + 1, 5)
    leg.wait_state("CONFIRMED", 5)
    return call, leg


def refused(pbx: PjUA, callee: str, timeout: float = 10.0, **kw: Any) -> CallHandle:
    """An outgoing call the edge refuses; returns it disconnected."""
    call = pbx.call(f"sip:{callee}@{DOMAIN}", tone_hz=PBX_TONE, **kw)
    call.wait_state("DISCONNECTED", timeout)
    return call


def warning_of(call: CallHandle) -> str:
    final = call.final_response
    assert final is not None, call.responses
    return " ".join(final["headers"].get("warning", []))


def hang_up(call: CallHandle, other: CallHandle) -> None:
    call.hangup(timeout=10)
    other.wait_state("DISCONNECTED", 10)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def uas(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pool = ParallelPool(tmp_path_factory.mktemp("uas"))
    try:
        yield pool
    finally:
        pool.close_all()


@pytest.fixture(scope="module")
def carrier(uas: ParallelPool) -> PjUA:
    return uas.new("carrier", bind="127.0.0.2")


@pytest.fixture(scope="module")
def pbx(uas: ParallelPool) -> PjUA:
    return uas.new("pbx", bind="127.0.0.1")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, carrier: PjUA) -> Any:
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n'
             '[credit]\nslice_seconds = 2\n')
    with EdgeProcess(tmp_path_factory.mktemp("edge"), extra_config=extra, trusted=["127.0.0.2/32"],
                     sip_extra="rate_limit = 0", media_ports=free_media_block()) as proc:
        with proc.client() as api:
            assert api.put("/v1/rates", json={"rates": RATES}).status_code == 200
        yield proc


@pytest.fixture(autouse=True)
def _clean_calls(request: pytest.FixtureRequest) -> Any:
    """Every test starts with the carrier answering at once, and leaves no call up."""
    yield
    for name in ("pbx", "carrier"):
        if name in request.fixturenames:
            ua = request.getfixturevalue(name)
            try:
                ua.hangup_all(timeout=10)
            except Exception:
                pass


@pytest.fixture
def answering_carrier(carrier: PjUA) -> PjUA:
    carrier.on_incoming(200, tone_hz=CARRIER_TONE)
    return carrier


@pytest.fixture
def pool(tmp_path: Path) -> Any:
    """UAs that only one test needs."""
    p = ParallelPool(tmp_path)
    try:
        yield p
    finally:
        p.close_all()


# ------------------------------------------------------------------------------ outgoing

def test_outgoing_call_audio_cdr_charge_and_ledger(edge: EdgeProcess, api: Any, pbx: PjUA,
                                                    answering_carrier: PjUA) -> None:
    carrier = answering_carrier
    prof = profile(api, credit="5.00", channels=2)
    register(pbx, edge, prof)
    call, leg = outgoing(pbx, carrier, UK)
    # the carrier sees the E.164 number and the SIP username, nothing of the PBX
    assert leg.info["ruri_user"] == UK and leg.info["from_user"] == prof["sip_username"]
    assert f":{pbx.port}" not in leg.info["raw"]
    live = api.get(f"/v1/profiles/{prof['id']}/calls").json()
    assert len(live) == 1 and live[0]["direction"] == "outgoing"
    time.sleep(TALK)
    hang_up(call, leg)
    assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)

    cdr = cdrs(api, prof)[0]
    assert cdr["status"] == 200 and cdr["end_reason"] == "caller_bye", cdr
    assert cdr["callee"] == UK and cdr["direction"] == "outgoing"
    assert cdr["duration"] == 60 and Decimal(cdr["cost"]) == Decimal("0.02")  # 60 s minimum at 0.02/min
    assert cdr["media"]["a_packets"] > 40 and cdr["media"]["b_packets"] > 40, cdr["media"]
    entries = ledger(api, prof)
    kinds = [e["kind"] for e in entries]
    assert kinds[0] == "allocate_in" and "reserve" in kinds and kinds[-2:] == ["release", "call"], kinds
    by_kind: dict[str, Decimal] = {}
    for e in entries:
        by_kind[e["kind"]] = by_kind.get(e["kind"], Decimal(0)) + Decimal(str(e["amount"]))
    assert by_kind["reserve"] + by_kind["release"] == 0, entries  # the whole reservation came back
    balance = Decimal(get_profile(api, prof)["balance"])
    assert balance == Decimal("5.00") - Decimal(cdr["cost"]) == Decimal("4.98")
    channels_back_to_zero(api, prof)


def test_rejections_as_the_pbx_sees_them(edge: EdgeProcess, api: Any, pbx: PjUA, pool: ParallelPool) -> None:
    prof = profile(api, credit="5.00", channels=2)
    register(pbx, edge, prof)
    proxy = edge_registrar(edge) + ";lr"
    user, password = prof["sip_username"], prof["sip_password"]

    # wrong password: a UA of its own with wrong credentials
    wrong = pool.new("wrongpw", bind="127.0.0.1")
    call = refused(wrong, UK, auth=(user, password + "x"), from_user=user, domain=DOMAIN, proxy=proxy)
    assert call.last_status == 403, call.responses  # to the INVITE with credentials, after a 407

    # the From user is not the SIP username (right credentials)
    call = refused(pbx, UK, auth=(user, password), from_user="alice", domain=DOMAIN, proxy=proxy)
    assert call.last_status == 403 and "From user" in warning_of(call)

    # a national number
    call = refused(pbx, "02071234567")
    assert call.last_status == 484 and "E.164" in warning_of(call)

    # no credit for the rate's minimum charge (0.02 for 60 s)
    poor = profile(api, credit="0.01", channels=2)
    register(pbx, edge, poor)
    call = refused(pbx, UK)
    assert call.last_status == 402 and "credit" in warning_of(call)
    assert get_profile(api, poor)["channels_in_use"] == 0
    assert cdrs(api, poor)[0]["status"] == 402


def test_channel_limit(edge: EdgeProcess, api: Any, pbx: PjUA, answering_carrier: PjUA) -> None:
    carrier = answering_carrier
    prof = profile(api, credit="5.00", channels=2)
    register(pbx, edge, prof)
    first, leg1 = outgoing(pbx, carrier, UK)
    second, leg2 = outgoing(pbx, carrier, "+442071234568")
    assert get_profile(api, prof)["channels_in_use"] == 2
    busy = refused(pbx, "+442071234569")
    assert busy.last_status == 486 and "channels" in warning_of(busy)
    assert len(api.get(f"/v1/profiles/{prof['id']}/calls").json()) == 2
    time.sleep(TALK)
    hang_up(first, leg1)
    hang_up(second, leg2)
    for call, leg in ((first, leg1), (second, leg2)):
        assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
        assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)
    channels_back_to_zero(api, prof)


def test_echo_number_with_zero_credit(edge: EdgeProcess, api: Any, pbx: PjUA) -> None:
    prof = profile(api, channels=1)  # no credit at all
    assert Decimal(get_profile(api, prof)["balance"]) == 0
    register(pbx, edge, prof)
    call = pbx.call(f"sip:{ECHO}@{DOMAIN}", tone_hz=PBX_TONE)
    call.wait_state("CONFIRMED", 10)
    time.sleep(TALK)
    call.hangup(timeout=10)
    assert_hears(call.record_wav, PBX_TONE, CARRIER_TONE)  # its own tone, back from the relay
    cdr = cdrs(api, prof)[0]
    assert cdr["callee"] == ECHO and cdr["status"] == 200 and Decimal(cdr["cost"]) == 0
    assert Decimal(get_profile(api, prof)["balance"]) == 0


def test_credit_runs_out_mid_call(edge: EdgeProcess, api: Any, pbx: PjUA, answering_carrier: PjUA) -> None:
    carrier = answering_carrier
    prof = profile(api, credit="0.06", channels=1)  # 0.02 per second: 3 s of talk
    register(pbx, edge, prof)
    call, leg = outgoing(pbx, carrier, FR)
    call.wait_state("DISCONNECTED", 8)
    leg.wait_state("DISCONNECTED", 5)
    assert call.connect_time is not None and call.disconnect_time is not None
    talked = call.disconnect_time - call.connect_time
    assert 3.0 - 0.3 <= talked <= 3.0 + 1.0, f"cut after {talked:.2f}s, funded 3 s"
    byes = [r for r in call.requests if r.get("method") == "BYE"]
    assert byes and "Credit exhausted" in " ".join(byes[0]["headers"].get("reason", [])), call.requests
    assert any(r.get("method") == "BYE" for r in leg.requests), leg.requests  # the carrier leg is ended too
    assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)
    cdr = cdrs(api, prof)[0]
    assert cdr["end_reason"] == "credit_exhausted" and cdr["duration"] == 3, cdr
    assert Decimal(cdr["cost"]) == Decimal("0.06")
    assert Decimal(get_profile(api, prof)["balance"]) == 0
    channels_back_to_zero(api, prof)


def test_bundle_minutes_for_us_calls_not_for_excluded_prefixes(edge: EdgeProcess, api: Any, pbx: PjUA,
                                                               answering_carrier: PjUA) -> None:
    carrier = answering_carrier
    prof = profile(api, credit="1.00", channels=2)
    assert api.put(f"/v1/profiles/{prof['id']}/bundles", json={"us_bundles": 1}).status_code == 200
    register(pbx, edge, prof)
    call, leg = outgoing(pbx, carrier, "+14155550123")
    time.sleep(TALK)
    hang_up(call, leg)
    assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)
    us = cdrs(api, prof, 1)[0]
    assert us["bundle_seconds"] > 0 and Decimal(us["cost"]) == 0, us

    call, leg = outgoing(pbx, carrier, "+12186321234")  # 1218632: on the shipped exclusion list
    time.sleep(0.5)
    hang_up(call, leg)
    excluded = cdrs(api, prof, 2)[1]
    assert excluded["callee"] == "+12186321234"
    assert excluded["bundle_seconds"] == 0 and Decimal(excluded["cost"]) > 0, excluded
    assert Decimal(get_profile(api, prof)["balance"]) == Decimal("1.00") - Decimal(excluded["cost"])


def test_auto_recharge_mid_call(edge: EdgeProcess, api: Any, pbx: PjUA, answering_carrier: PjUA) -> None:
    carrier = answering_carrier
    prof = profile(api, credit="1.01", account_credit="10.00", channels=1)
    r = api.put(f"/v1/profiles/{prof['id']}/auto-recharge",
                json={"enabled": True, "amount": "2.00", "min_balance": "1.00"})
    assert r.status_code == 200, r.text
    assert "auto_recharge_in" not in [e["kind"] for e in ledger(api, prof)]
    register(pbx, edge, prof)
    call, leg = outgoing(pbx, carrier, FR)  # the first 2 s slice (0.04) leaves 0.97 < 1.00
    wait_for(lambda: "auto_recharge_in" in [e["kind"] for e in ledger(api, prof)], 5.0, "auto_recharge_in")
    assert call.state == "CONFIRMED" and leg.state == "CONFIRMED"  # while the call is up
    assert len(api.get(f"/v1/profiles/{prof['id']}/calls").json()) == 1
    time.sleep(max(0.0, TALK - 0.5))
    hang_up(call, leg)
    assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
    cdr = cdrs(api, prof)[0]
    assert cdr["end_reason"] == "caller_bye" and Decimal(cdr["cost"]) > 0
    assert [e["kind"] for e in ledger(api, prof)].count("auto_recharge_in") == 1
    assert Decimal(get_profile(api, prof)["balance"]) == Decimal("3.01") - Decimal(cdr["cost"])


def test_cancel_before_answer(edge: EdgeProcess, api: Any, pbx: PjUA, carrier: PjUA) -> None:
    carrier.on_incoming(None, tone_hz=CARRIER_TONE)  # rings until told
    prof = profile(api, credit="5.00", channels=1)
    register(pbx, edge, prof)
    n = len(carrier.incoming_calls)
    call = pbx.call(f"sip:{UK}@{DOMAIN}", tone_hz=PBX_TONE)
    call.wait_state("EARLY", 10)
    leg = carrier.wait_incoming(n + 1, 5)
    call.hangup(timeout=10)  # CANCEL
    assert call.last_status == 487, call.responses  # pjsua's status of the INVITE: the edge's 487
    leg.wait_state("DISCONNECTED", 5)
    assert "CONFIRMED" not in leg.states
    cdr = cdrs(api, prof)[0]
    assert cdr["end_reason"] == "cancel" and cdr["status"] == 487 and Decimal(cdr["cost"]) == 0, cdr
    channels_back_to_zero(api, prof)


def test_bye_from_the_carrier(edge: EdgeProcess, api: Any, pbx: PjUA, answering_carrier: PjUA) -> None:
    carrier = answering_carrier
    prof = profile(api, credit="5.00", channels=1)
    register(pbx, edge, prof)
    call, leg = outgoing(pbx, carrier, UK)
    time.sleep(TALK)
    leg.hangup(timeout=10)
    call.wait_state("DISCONNECTED", 5)
    assert any(r.get("method") == "BYE" for r in call.requests), call.requests
    assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)
    cdr = cdrs(api, prof)[0]
    assert cdr["end_reason"] == "callee_bye" and cdr["status"] == 200, cdr
    channels_back_to_zero(api, prof)


def test_hold_and_resume(edge: EdgeProcess, api: Any, pbx: PjUA, answering_carrier: PjUA, tmp_path: Path) -> None:
    carrier = answering_carrier
    prof = profile(api, credit="5.00", channels=1)
    register(pbx, edge, prof)
    call, leg = outgoing(pbx, carrier, UK)
    time.sleep(0.8)
    call.hold()
    call.wait_media("LOCAL_HOLD", 5)
    leg.wait_media("REMOTE_HOLD", 5)
    time.sleep(0.5)
    call.unhold()
    call.wait_media("ACTIVE", 5)
    leg.wait_media("ACTIVE", 5)
    time.sleep(TALK)
    assert call.state == "CONFIRMED" and leg.state == "CONFIRMED"  # the call survived
    hang_up(call, leg)
    assert call.record_wav and leg.record_wav
    # audio flows again after the resume: the last second of each recording carries the other's tone
    assert_hears(str(tail_wav(call.record_wav, 1.0, tmp_path / "pbx-tail.wav")), CARRIER_TONE, PBX_TONE)
    assert_hears(str(tail_wav(leg.record_wav, 1.0, tmp_path / "carrier-tail.wav")), PBX_TONE, CARRIER_TONE)
    cdr = cdrs(api, prof)[0]
    assert cdr["end_reason"] == "caller_bye" and cdr["status"] == 200


# ------------------------------------------------------------------------------ incoming

@pytest.mark.parametrize("target", ["number", "extension", "business_account"])
def test_incoming_call(edge: EdgeProcess, api: Any, pbx: PjUA, carrier: PjUA, target: str) -> None:
    prof = profile(api, credit="1.00", channels=1)
    if target == "business_account":
        dialled = expected_ruri_user = f"acme.sales{uuid.uuid4().hex[:4]}"
        acct = prof["account"]["id"]
        assert api.post(f"/v1/accounts/{acct}/business-accounts", json={"name": dialled}).status_code == 201
        assert api.post(f"/v1/profiles/{prof['id']}/business-accounts", json={"name": dialled}).status_code == 201
    else:
        dialled = f"+1415555{uuid.uuid4().int % 10000:04d}"
        extension = "sales" if target == "extension" else None
        attach_number(api, prof, dialled, extension)
        expected_ruri_user = extension or dialled
    register(pbx, edge, prof)
    pbx.on_incoming(200, tone_hz=PBX_TONE)
    n = len(pbx.incoming_calls)
    call = carrier.call(f"sip:{dialled}@127.0.0.1:{edge.sip_port}", tone_hz=CARRIER_TONE)
    call.wait_state("CONFIRMED", 10)
    inc = pbx.wait_incoming(n + 1, 5)
    inc.wait_state("CONFIRMED", 5)
    seen = pbx.received_requests[n]
    assert seen["ruri_user"] == expected_ruri_user, seen["ruri"]
    assert seen["to_user"] == prof["sip_username"], seen["to"]
    assert "127.0.0.2" not in seen["raw"]  # topology hiding: nothing of the carrier
    assert not any(r["code"] in (401, 407) for r in call.responses)  # trusted: no challenge
    live = api.get(f"/v1/profiles/{prof['id']}/calls").json()
    assert len(live) == 1 and live[0]["direction"] == "incoming"
    time.sleep(TALK)
    hang_up(call, inc)
    assert_hears(inc.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(call.record_wav, PBX_TONE, CARRIER_TONE)
    cdr = cdrs(api, prof)[0]
    assert cdr["direction"] == "incoming" and cdr["status"] == 200 and Decimal(cdr["cost"]) == 0, cdr
    channels_back_to_zero(api, prof)


def test_incoming_unknown_number_and_unregistered_pbx(edge: EdgeProcess, api: Any, pbx: PjUA,
                                                      carrier: PjUA) -> None:
    n = len(pbx.incoming_calls)
    call = carrier.call(f"sip:+14155559999@127.0.0.1:{edge.sip_port}", tone_hz=CARRIER_TONE)
    call.wait_state("DISCONNECTED", 10)
    assert call.last_status == 404, call.responses

    nobody = profile(api, channels=1)  # nobody ever registers as this profile
    number = f"+1415556{uuid.uuid4().int % 10000:04d}"
    attach_number(api, nobody, number)
    call = carrier.call(f"sip:{number}@127.0.0.1:{edge.sip_port}", tone_hz=CARRIER_TONE)
    call.wait_state("DISCONNECTED", 10)
    assert call.last_status == 480, call.responses
    assert len(pbx.incoming_calls) == n


def test_untrusted_source_is_challenged_not_routed(edge: EdgeProcess, api: Any, pbx: PjUA,
                                                   pool: ParallelPool) -> None:
    prof = profile(api, credit="1.00", channels=1)
    number = f"+1415557{uuid.uuid4().int % 10000:04d}"
    attach_number(api, prof, number)
    register(pbx, edge, prof)
    pbx.on_incoming(200, tone_hz=PBX_TONE)
    n = len(pbx.incoming_calls)
    rogue = pool.new("rogue", bind="127.0.0.3")  # not in [inbound] trusted
    call = rogue.call(f"sip:{number}@127.0.0.1:{edge.sip_port}", tone_hz=CARRIER_TONE)
    call.wait_state("DISCONNECTED", 10)
    assert call.last_status == 407, call.responses  # an outgoing attempt: challenged
    time.sleep(0.3)
    assert len(pbx.incoming_calls) == n  # the PBX never saw it
    assert get_profile(api, prof)["channels_in_use"] == 0


# ------------------------------------------------------------------------------ failover

class RefusingGateway:
    """A carrier gateway that answers every INVITE with ``status`` at once, with no
    provisional answer first (a pjsua UA always sends 180 before rejecting, and the edge
    fails over only before a provisional answer, docs/calls.md)."""

    def __init__(self, host: str, status: int = 503) -> None:
        from edge.sip import build_response, parse

        self._parse, self._build = parse, build_response
        self.status = status
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()
        self.received: list[str] = []   # method of each request
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
            try:
                msg = self._parse(data)
            except Exception:
                continue
            if not msg.is_request:
                continue
            self.received.append(msg.method)
            if msg.method == "INVITE":
                reply = self._build(msg, self.status, to_tag="gw503", headers=[("Retry-After", "30")])
            elif msg.method in ("ACK",):
                continue
            else:
                reply = self._build(msg, 200, to_tag="gw503")
            self.sock.sendto(reply, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def failover(tmp_path_factory: pytest.TempPathFactory, pbx: PjUA, uas: ParallelPool) -> Any:
    """An edge of its own with two carriers: priority 1 (127.0.0.2) answers 503, priority 2
    (127.0.0.4, a pjsua UA playing 700 Hz) answers 200. One call from the PBX, talked and
    hung up; the tests below look at what it left."""
    gateway = RefusingGateway("127.0.0.2", 503)
    backup = uas.new("backup", bind="127.0.0.4")
    backup.on_incoming(200, tone_hz=BACKUP_TONE)
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{gateway.port}"\npriority = 1\nweight = 100\n'
             f'[[carriers]]\nuri = "sip:127.0.0.4:{backup.port}"\npriority = 2\nweight = 100\n')
    try:
        with EdgeProcess(tmp_path_factory.mktemp("failover"), extra_config=extra, trusted=["127.0.0.2/32"],
                         media_ports=free_media_block(100)) as edge2, edge2.client() as api2:
            assert api2.put("/v1/rates", json={"rates": RATES}).status_code == 200
            prof = profile(api2, credit="5.00", channels=1)
            register(pbx, edge2, prof)
            call = pbx.call(f"sip:{UK}@{DOMAIN}", tone_hz=PBX_TONE)
            try:
                call.wait_state("CONFIRMED", 15)
                leg = backup.wait_incoming(1, 5)
                leg.wait_state("CONFIRMED", 5)
                time.sleep(TALK)
                hang_up(call, leg)
            finally:
                pbx.hangup_all()
            metrics = api2.get("/metrics").text
            yield {"gateway": gateway, "backup": backup, "call": call, "leg": leg, "cdr": cdrs(api2, prof)[0],
                   "failovers": [line for line in metrics.splitlines()
                                 if line.startswith("edge_carrier_failovers_total{")]}
    finally:
        gateway.close()


def test_carrier_failover_on_503(failover: dict[str, Any]) -> None:
    gateway, call, leg = failover["gateway"], failover["call"], failover["leg"]
    assert gateway.received.count("INVITE") >= 1 and "ACK" in gateway.received, gateway.received
    assert leg.info["ruri_user"] == UK
    assert_hears(call.record_wav, BACKUP_TONE, PBX_TONE)  # the second carrier's audio
    assert_hears(leg.record_wav, PBX_TONE, BACKUP_TONE)
    cdr = failover["cdr"]
    assert cdr["status"] == 200 and cdr["end_reason"] == "caller_bye", cdr
    assert sum(float(line.rsplit(" ", 1)[1]) for line in failover["failovers"]) == 1, failover["failovers"]


def test_failover_metric_names_the_failed_carrier(failover: dict[str, Any]) -> None:
    failed = f'carrier="sip:127.0.0.2:{failover["gateway"].port}"'
    assert any(failed in line and not line.endswith(" 0.0") for line in failover["failovers"]), failover["failovers"]
