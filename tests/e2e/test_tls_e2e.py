"""A pjsua2 PBX over TLS through a real ``sipedge serve``, with audio (issue 12 "How it is checked").

The PBX (127.0.0.1) registers over TLS and verifies the edge's certificate against the test's
CA (pjsip checks chain and name); the carrier is a pjsua2 UA on 127.0.0.2 over plain UDP/RTP.
Each side plays its tone and the other's recording must carry it. The incoming call reaches
the PBX only over the connection it registered on: the edge knows the PBX by that
connection's source port, where nothing listens, so a new connection would fail.
Raw-socket TLS checks (wrong-host and expired certificates, reload, no SIP in clear) are in
tests/sip/test_tls.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("pjsua2")

from edgeproc import EdgeProcess, free_port
from tlscerts import TestCA

from e2e.pjua import PjUA, provision_profile
from e2e.test_calls_e2e import (
    CARRIER_TONE,
    PBX_TONE,
    RATES,
    TALK,
    UK,
    ParallelPool,
    assert_hears,
    attach_number,
    cdrs,
    free_media_block,
    hang_up,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

DOMAIN = "sip.edge.test"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def uas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ParallelPool]:
    pool = ParallelPool(tmp_path_factory.mktemp("uas"))
    try:
        yield pool
    finally:
        pool.close_all()


@pytest.fixture(scope="module")
def carrier(uas: ParallelPool) -> PjUA:
    return uas.new("carrier", bind="127.0.0.2")


@pytest.fixture(scope="module")
def pbx(uas: ParallelPool, ca: TestCA) -> PjUA:
    return uas.new("pbx", bind="127.0.0.1", transport="tls", tls_ca=str(ca.path))


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, carrier: PjUA) -> Iterator[EdgeProcess]:
    cert, key, _ = ca.issue("edge", ips=("127.0.0.1",))
    tls_port = free_port()
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n'
             f'[tls]\ncert = "{cert}"\nkey = "{key}"\nca = "{ca.path}"\n')
    proc = EdgeProcess(tmp_path_factory.mktemp("edge"), extra_config=extra, trusted=["127.0.0.2/32"],
                       sip_extra="rate_limit = 0", media_ports=free_media_block(),
                       listen_extra=(f"tls:127.0.0.1:{tls_port}",))
    proc.tls_port = tls_port  # type: ignore[attr-defined]
    with proc:
        with proc.client() as api:
            assert api.put("/v1/rates", json={"rates": RATES}).status_code == 200
        yield proc


@pytest.fixture
def api(edge: EdgeProcess) -> Iterator[Any]:
    with edge.client() as client:
        yield client


@pytest.fixture(autouse=True)
def _clean_calls(pbx: PjUA, carrier: PjUA) -> Iterator[None]:
    yield
    for ua in (pbx, carrier):
        try:
            ua.hangup_all(timeout=10)
        except Exception:
            pass


def registrar(edge: EdgeProcess) -> str:
    return f"sip:127.0.0.1:{edge.tls_port};transport=tls"  # type: ignore[attr-defined]


def tls_profile(api: Any, edge: EdgeProcess, pbx: PjUA) -> dict[str, Any]:
    prof = provision_profile(api, name=f"tls-{uuid.uuid4().hex[:6]}", credit="1.00")
    status = pbx.register(registrar(edge), prof["sip_username"], prof["sip_password"], domain=DOMAIN)
    assert status == 200, f"REGISTER over TLS answered {status}"
    regs = api.get(f"/v1/profiles/{prof['id']}/registrations").json()
    assert [r["source"].split(":")[0] for r in regs] == ["tls"]
    return prof


def test_outgoing_call_over_tls_with_audio(edge: EdgeProcess, api: Any, pbx: PjUA, carrier: PjUA) -> None:
    prof = tls_profile(api, edge, pbx)
    carrier.on_incoming(200, tone_hz=CARRIER_TONE)
    n = len(carrier.incoming_calls)
    call = pbx.call(f"sip:{UK}@{DOMAIN}", tone_hz=PBX_TONE)
    call.wait_state("CONFIRMED", 10)
    leg = carrier.wait_incoming(n + 1, 5)
    leg.wait_state("CONFIRMED", 5)
    live = api.get(f"/v1/profiles/{prof['id']}/calls").json()
    assert live[0]["transport"] == {"customer": "tls", "carrier": "udp"}
    time.sleep(TALK)
    hang_up(call, leg)
    assert_hears(call.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(leg.record_wav, PBX_TONE, CARRIER_TONE)
    cdr = cdrs(api, prof)[0]
    assert cdr["status"] == 200 and cdr["transport"] == {"customer": "tls", "carrier": "udp"}
    metrics = api.get("/metrics").text
    assert 'edge_calls_started_by_transport_total{direction="outgoing",transport="tls"} 1.0' in metrics


def test_incoming_call_over_the_registered_tls_connection(edge: EdgeProcess, api: Any, pbx: PjUA,
                                                          carrier: PjUA) -> None:
    prof = tls_profile(api, edge, pbx)
    number = f"+1415557{uuid.uuid4().int % 10000:04d}"
    attach_number(api, prof, number)
    pbx.on_incoming(200, tone_hz=PBX_TONE)
    n = len(pbx.incoming_calls)
    call = carrier.call(f"sip:{number}@127.0.0.1:{edge.sip_port}", tone_hz=CARRIER_TONE)
    call.wait_state("CONFIRMED", 10)
    inc = pbx.wait_incoming(n + 1, 5)
    inc.wait_state("CONFIRMED", 5)
    seen = pbx.received_requests[n]
    assert f"SIP/2.0/TLS 127.0.0.1:{edge.tls_port}" in seen["raw"]  # type: ignore[attr-defined]
    time.sleep(TALK)
    hang_up(call, inc)
    assert_hears(inc.record_wav, CARRIER_TONE, PBX_TONE)
    assert_hears(call.record_wav, PBX_TONE, CARRIER_TONE)
    cdr = cdrs(api, prof)[0]
    assert cdr["transport"] == {"customer": "tls", "carrier": "udp"}


def test_wrong_password_over_tls_is_refused(edge: EdgeProcess, api: Any, pbx: PjUA) -> None:
    prof = provision_profile(api, name=f"tls-{uuid.uuid4().hex[:6]}")
    status = pbx.register(registrar(edge), prof["sip_username"], "not-the-password", domain=DOMAIN)
    assert status == 403
