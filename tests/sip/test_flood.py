"""Flood protection (SPEC §7): per-source rate limit, blocking after repeated auth
failures, per-profile call-attempt limit."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from edgeproc import EdgeProcess
from rawsip import RawSip
from test_calls_raw import Pbx, new_profile


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    extra = "rate_limit = 20\nrate_burst = 5\nauth_block_threshold = 3\nauth_block_seconds = 60\nprofile_rate_limit = 1"
    with EdgeProcess(tmp_path_factory.mktemp("flood"), sip_extra=extra) as proc:
        with proc.client() as api:
            api.put("/v1/rates", json={"rates": [{"prefix": "44", "rate": "0.02"}]})
        yield proc


def answers(ua: RawSip, n: int) -> int:
    got = 0
    for _ in range(n):
        try:
            ua.recv(timeout=0.3)
            got += 1
        except TimeoutError:
            break
    return got


def test_per_source_rate_limit(edge) -> None:
    ua = RawSip(edge.sip_port, bind="127.0.0.5")
    try:
        for _ in range(30):  # a burst well above the bucket
            ua.send(ua.request("OPTIONS", "sip:sip.edge.test", from_user="x", to_user="y"))
        assert 5 <= answers(ua, 30) < 30
        metrics = httpx.get(edge.base + "/metrics").text
        assert 'edge_sip_rate_limited_total{scope="source"}' in metrics
    finally:
        ua.close()


def test_source_blocked_after_repeated_auth_failures(edge) -> None:
    prof = new_profile(edge)
    pbx = Pbx(edge)
    pbx.sock.close()
    pbx.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pbx.sock.bind(("127.0.0.6", 0))
    pbx.host, pbx.port = pbx.sock.getsockname()
    try:
        for _ in range(3):
            d = pbx.invite(prof, "+442071234567", password="wrong")
            refused = pbx.recv_final()
            assert refused.status == 403
            pbx.send(pbx.request("ACK", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=2,
                                 from_tag=d["from_tag"], to_tag=refused.to_tag, branch=d["branch"]))
            time.sleep(0.3)  # stay under this source's request rate limit
        pbx.send(pbx.request("OPTIONS", "sip:sip.edge.test", from_user="x", to_user="y"))
        seen = []
        try:
            while True:  # the unACKed 403s may be retransmitted; the OPTIONS gets nothing
                seen.append(pbx.recv(timeout=0.7).cseq_method)
        except TimeoutError:
            pass
        assert "OPTIONS" not in seen
        assert "edge_sip_blocked_sources 1.0" in httpx.get(edge.base + "/metrics").text
        other = RawSip(edge.sip_port, bind="127.0.0.7")  # other sources are unaffected
        other.send(other.request("OPTIONS", "sip:sip.edge.test", from_user="x", to_user="y"))
        assert other.recv_final().status == 200
        other.close()
    finally:
        pbx.close()


def test_per_profile_call_attempt_limit(edge) -> None:
    prof = new_profile(edge)
    statuses = []
    for i in range(4):
        pbx = Pbx(edge)
        pbx.sock.close()
        pbx.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        pbx.sock.bind((f"127.0.1.{i + 1}", 0))
        pbx.host, pbx.port = pbx.sock.getsockname()
        try:
            pbx.invite(prof, "+442071234567")
            final = pbx.recv_final()
            statuses.append((final.status, final.header("Warning") or ""))
        finally:
            pbx.close()
    limited = [w for s, w in statuses if s == 503 and "rate limit" in w]
    assert limited and len(limited) < len(statuses)  # the burst passes (to "no carrier" here), the rest is limited
