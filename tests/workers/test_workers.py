"""A node of two SIP workers and a control-API process (docs/architecture.md "Processes"),
through a real ``sipedge serve`` with raw-socket PBXs and carriers.

Which worker a socket's traffic lands on is the kernel's choice (SO_REUSEPORT hashes the
4-tuple); every final answer of the edge carries the mark of the worker that gave it in its
To tag (``w0...``/``w1...``), so a test finds sockets that land on either worker by asking,
in bounded loops, instead of hoping.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from edgeproc import EdgeProcess, free_port, node_children
from rawsip import RawSip, media_port, rtp_packet, sdp
from tlscerts import TestCA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sip"))
from test_calls_raw import (
    Carrier,
    Pbx,
    api_get,
    attach_number,
    carrier_invite,
    new_profile,
    register_pbx,
    wait_for,
)

from edge.sip import build_response

pytestmark = pytest.mark.timeout(240)

WORKERS = 2
SOCKET_TRIES = 60        # sockets tried to find one a given worker serves (each lands on one of 2)


def worker_of(tag: str | None) -> int:
    """The worker whose mark a To tag of the edge carries."""
    assert tag is not None and tag[0] == "w", tag
    return int(tag[1])


def options_worker(sock: RawSip) -> int:
    """Which worker serves ``sock``'s traffic: the mark in the To tag of the 200 to an OPTIONS."""
    sock.send(sock.request("OPTIONS", f"sip:{sock.edge[0]}:{sock.edge[1]}", from_user="probe", to_user="edge"))
    return worker_of(sock.recv_final().to_tag)


def pbx_on(edge: EdgeProcess, worker: int, proto: str = "udp") -> Pbx | RawSip:
    """A PBX socket (UDP: a :class:`Pbx` with its RTP socket; TCP, TLS: a connection) that ``worker`` serves."""
    for _ in range(SOCKET_TRIES):
        sock: Pbx | RawSip
        if proto == "udp":
            sock = Pbx(edge)
        elif proto == "tls":
            sock = RawSip(edge.tls_port, proto="tls", tls=edge.tls_client)  # type: ignore[attr-defined]
        else:
            sock = RawSip(edge.sip_port, proto="tcp")
        if options_worker(sock) == worker:
            return sock
        sock.close()
    raise AssertionError(f"no {proto} socket landed on worker {worker} in {SOCKET_TRIES} tries")


def metric(edge: EdgeProcess, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (the node's /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(edge.base + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_children(edge: EdgeProcess, timeout: float = 30.0) -> dict[str, int]:
    assert edge.proc is not None
    found = wait_for(lambda: (lambda c: c if len(c) == WORKERS + 1 else None)(node_children(edge)), timeout)
    assert found, node_children(edge)
    return found


def ledger_matches_balance(edge: EdgeProcess, prof: dict) -> None:
    entries = api_get(edge, f"/v1/profiles/{prof['id']}/ledger?limit=1000")["items"]
    balance = Decimal(api_get(edge, f"/v1/profiles/{prof['id']}")["balance"])
    assert sum(Decimal(e["amount"]) for e in entries) == balance, (entries, balance)


class Call:
    """An answered outgoing call of a PBX socket through the carrier."""

    def __init__(self, edge: EdgeProcess, pbx: Pbx, carrier: Carrier, prof: dict) -> None:
        self.edge, self.pbx, self.carrier, self.prof = edge, pbx, carrier, prof
        carrier.drain()
        self.d = pbx.invite(prof, "+442071234567")
        inv = carrier.recv_request("INVITE")
        carrier.answer(inv, 180)
        carrier.answer(inv, 200, to_tag="gw" + uuid.uuid4().hex[:6], body=sdp(carrier.rtp_port, host=carrier.host))
        ok = pbx.recv_final()
        assert ok.status == 200, ok.raw
        self.tag = ok.to_tag
        self.worker = worker_of(ok.to_tag)
        self.invite = inv

    def ack_from(self, sock: RawSip) -> None:
        d = self.d
        sock.send(sock.request("ACK", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=2,
                               from_tag=d["from_tag"], to_tag=self.tag))

    def bye_from(self, sock: RawSip) -> int:
        """BYE from ``sock`` (the PBX's own socket, or one with another source port): its answer."""
        d = self.d
        sock.send(sock.request("BYE", d["ruri"], from_user=d["user"], to_user="x", call_id=d["call_id"], cseq=3,
                               from_tag=d["from_tag"], to_tag=self.tag))
        status = sock.recv_final().status
        while True:   # BYEs of other calls (a recovery's) may come first: answered too
            bye = self.carrier.recv_request("BYE")
            self.carrier.answer(bye, 200)
            if bye.call_id == self.invite.call_id:
                return status


@pytest.fixture(scope="module")
def carrier():
    gw = Carrier("127.0.0.2")
    yield gw
    gw.close()


@pytest.fixture(scope="module")
def edge(tmp_path_factory, carrier):
    """Two workers, with a TLS listener beside UDP and TCP (a TLS session lives in one worker)."""
    import ssl

    tmp = tmp_path_factory.mktemp("workers")
    ca = TestCA(tmp / "ca")
    cert, key, _ = ca.issue("edge", ips=("127.0.0.1",))
    tls_port = free_port()
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n'
             '[credit]\nslice_seconds = 2\n'
             f'[tls]\ncert = "{cert}"\nkey = "{key}"\nca = "{ca.path}"\n')
    proc = EdgeProcess(tmp, extra_config=extra, trusted=["127.0.0.2/32"], sip_extra="rate_limit = 0",
                       listen_extra=(f"tls:127.0.0.1:{tls_port}",), workers=WORKERS)
    proc.tls_port = tls_port  # type: ignore[attr-defined]
    proc.tls_client = ssl.create_default_context(cafile=str(ca.path))  # type: ignore[attr-defined]
    with proc:
        with proc.client() as api:
            assert api.put("/v1/rates", json={"rates": [
                {"prefix": "44", "rate": "0.0200", "min_seconds": 60, "increment_seconds": 6}]}).status_code == 200
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log.read_text()[-3000:]


def test_the_node_runs_as_a_supervisor_of_its_workers(edge: EdgeProcess) -> None:
    assert edge.proc is not None
    found = wait_children(edge)
    assert sorted(found) == ["api", "worker 0", "worker 1"]
    assert int((edge.data / "sipedge.pid").read_text().split("\n")[0]) == edge.proc.pid
    assert metric(edge, "edge_workers_up") == WORKERS
    # each worker answers from the node's one address
    for k in range(WORKERS):
        sock = pbx_on(edge, k)
        sock.close()


def test_in_dialog_requests_from_another_source_port_reach_the_owning_worker(edge: EdgeProcess,
                                                                            carrier: Carrier) -> None:
    """For a call of each worker, ACK and BYE come from sockets the other worker serves."""
    forwarded = metric(edge, "edge_sip_worker_forwarded_total", kind="message")
    for owner in range(WORKERS):
        pbx = pbx_on(edge, owner)
        prof = new_profile(edge)
        try:
            call = Call(edge, pbx, carrier, prof)
            assert call.worker == owner
            elsewhere = pbx_on(edge, 1 - owner, "udp")
            try:
                call.ack_from(elsewhere)
                assert carrier.recv_request("ACK").call_id == call.invite.call_id
                assert call.bye_from(elsewhere) == 200
            finally:
                elsewhere.close()
        finally:
            pbx.close()
        cdr = wait_for(lambda prof=prof: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
        assert (cdr["status"], cdr["end_reason"]) == (200, "caller_bye")
        assert api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0
        ledger_matches_balance(edge, prof)
    # ACK, BYE and (for the call of the worker the carrier does not land on) the carrier's answers
    assert metric(edge, "edge_sip_worker_forwarded_total", kind="message") >= forwarded + 2 * WORKERS


@pytest.mark.parametrize("proto", ["tcp", "tls"])
def test_a_call_over_tcp_and_bye_work_across_workers(edge: EdgeProcess, carrier: Carrier, proto: str) -> None:
    """A PBX registered over a TCP (or TLS) connection one worker holds gets an incoming call the
    other worker handles (written over the link: for TLS, encrypted by the worker holding the
    session), answers it and hangs up over its connection."""
    carrier_worker = options_worker_of_carrier(edge, carrier)
    prof = new_profile(edge)
    number = f"+1415559{uuid.uuid4().int % 10000:04d}"
    attach_number(edge, prof, number)
    tcp = pbx_on(edge, 1 - carrier_worker, proto)
    via, transport = proto.upper(), f"transport={proto}"
    writes = metric(edge, "edge_sip_worker_forwarded_total", kind="write")
    try:
        register_pbx(tcp, prof)
        carrier.drain()
        carrier.sock.sendto(carrier_invite(carrier, edge, number, call_id="tcp-x-" + uuid.uuid4().hex[:6]),
                            ("127.0.0.1", edge.sip_port))
        inv = tcp.recv()
        while not (inv.is_request and inv.method == "INVITE"):
            inv = tcp.recv()
        assert inv.top_via.transport == via and worker_of(inv.from_tag) == carrier_worker
        tcp.send(build_response(inv, 200, to_tag="pbxtcp", headers=[
            ("Contact", f"<sip:{prof['sip_username']}@127.0.0.1:{tcp.port};{transport}>"),
            ("Content-Type", "application/sdp")], body=sdp(40002)))
        final = carrier.recv()
        while final.is_request or final.status < 200:
            final = carrier.recv()
        assert final.status == 200
        ack = (f"ACK sip:x@127.0.0.1:{edge.sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP {carrier.host}:{carrier.port};"
               f"branch=z9hG4bK{uuid.uuid4().hex[:10]}\r\nFrom: {final.header('From')}\r\nTo: {final.header('To')}\r\n"
               f"Call-ID: {final.call_id}\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        carrier.sock.sendto(ack.encode(), ("127.0.0.1", edge.sip_port))
        got = tcp.recv()
        assert got.is_request and got.method == "ACK"
        assert api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 1
        # the PBX hangs up over its TCP connection: the worker holding it forwards to the call's
        bye = (f"BYE {inv.header('Contact').strip('<>')} SIP/2.0\r\nVia: SIP/2.0/{via} 127.0.0.1:{tcp.port};"
               f"branch=z9hG4bK{uuid.uuid4().hex[:10]}\r\nFrom: {inv.header('To')};tag=pbxtcp\r\n"
               f"To: {inv.header('From')}\r\nCall-ID: {inv.call_id}\r\nCSeq: 2 BYE\r\nMax-Forwards: 70\r\n"
               "Content-Length: 0\r\n\r\n")
        tcp.send(bye.encode())
        assert tcp.recv_final().status == 200
        carrier.answer(carrier.recv_request("BYE"), 200)
    finally:
        tcp.close()
    cdr = wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"])[0]
    assert (cdr["direction"], cdr["status"], cdr["end_reason"]) == ("incoming", 200, "callee_bye")
    assert api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0
    assert metric(edge, "edge_sip_worker_forwarded_total", kind="write") > writes


def options_worker_of_carrier(edge: EdgeProcess, carrier: Carrier) -> int:
    """The worker the carrier's socket lands on."""
    carrier.drain()
    carrier.sock.sendto((f"OPTIONS sip:127.0.0.1:{edge.sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP {carrier.host}:"
                         f"{carrier.port};branch=z9hG4bK{uuid.uuid4().hex[:10]}\r\nFrom: <sip:gw@carrier>;tag=o1\r\n"
                         f"To: <sip:edge@edge>\r\nCall-ID: {uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\n"
                         "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode(), ("127.0.0.1", edge.sip_port))
    answer = carrier.recv()
    return worker_of(answer.to_tag)


def test_two_workers_seizing_the_last_channel_at_once(edge: EdgeProcess, carrier: Carrier) -> None:
    """Two INVITEs for a one-channel profile, one on each worker, sent together: one call, one 486."""
    prof = new_profile(edge, channels=1)
    pbxs = [pbx_on(edge, 0), pbx_on(edge, 1)]
    try:
        for _ in range(5):
            carrier.drain()
            dialogs = []
            for pbx in pbxs:   # the 407 of each, so the authenticated INVITEs can go out back to back
                dialogs.append(_challenged(pbx, prof))
            for pbx, (_, second) in zip(pbxs, dialogs, strict=True):
                pbx.send(second)
            finals = []
            for pbx in pbxs:
                finals.append(_final_answering(pbx, carrier))
            assert sorted(f.status for f in finals) == [200, 486], [f.status for f in finals]
            winner = next(i for i, f in enumerate(finals) if f.status == 200)
            loser, busy = pbxs[1 - winner], dialogs[1 - winner][0]
            loser.send(loser.request("ACK", busy["ruri"], from_user=busy["user"], to_user="+442071234567",
                                     call_id=busy["call_id"], cseq=2, from_tag=busy["from_tag"],
                                     to_tag=finals[1 - winner].to_tag, branch=busy["branch"]))
            d = dialogs[winner][0]
            pbx = pbxs[winner]
            pbx.ack(d, finals[winner].to_tag)
            assert pbx.bye(d, finals[winner].to_tag).status == 200
            carrier.answer(carrier.recv_request("BYE"), 200)
            assert wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0)
    finally:
        for pbx in pbxs:
            pbx.close()
    ledger_matches_balance(edge, prof)


def _challenged(pbx: Pbx, prof: dict) -> tuple[dict, bytes]:
    """Send an INVITE, take its 407, ACK it; returns (dialog, the authenticated INVITE to send)."""
    from rawsip import digest

    from edge.sip import parse

    user = prof["sip_username"]
    ruri = "sip:+442071234567@sip.edge.test"
    d = {"call_id": uuid.uuid4().hex, "from_tag": uuid.uuid4().hex[:8], "ruri": ruri, "user": user}
    first = pbx.request("INVITE", ruri, from_user=user, to_user="+442071234567", call_id=d["call_id"], cseq=1,
                        from_tag=d["from_tag"], headers=[("Content-Type", "application/sdp")],
                        body=sdp(pbx.rtp_port))
    pbx.send(first)
    challenge = pbx.recv_final()
    assert challenge.status == 407
    pbx.send(pbx.request("ACK", ruri, from_user=user, to_user="+442071234567", call_id=d["call_id"], cseq=1,
                         from_tag=d["from_tag"], to_tag=challenge.to_tag, branch=parse(first).branch))
    auth = digest("INVITE", ruri, user, prof["sip_password"], challenge.header("Proxy-Authenticate"))
    d["branch"] = "z9hG4bK" + uuid.uuid4().hex[:10]
    second = pbx.request("INVITE", ruri, from_user=user, to_user="+442071234567", call_id=d["call_id"], cseq=2,
                         from_tag=d["from_tag"], branch=d["branch"], body=sdp(pbx.rtp_port),
                         headers=[("Content-Type", "application/sdp"), ("Proxy-Authorization", auth)])
    return d, second


def _final_answering(pbx: Pbx, carrier: Carrier):
    """The PBX's final answer; the carrier answers the INVITE that reaches it meanwhile."""
    deadline = time.monotonic() + 10
    pbx.sock.settimeout(0.05)
    while time.monotonic() < deadline:
        try:
            msg = pbx.recv(0.05)
        except (TimeoutError, BlockingIOError):
            msg = None
        if msg is not None and not msg.is_request and msg.status >= 200:
            return msg
        try:
            inv = carrier.recv(0.01)
        except (TimeoutError, BlockingIOError):
            continue
        if inv.is_request and inv.method == "INVITE":
            carrier.answer(inv, 200, to_tag="gw" + uuid.uuid4().hex[:6], body=sdp(carrier.rtp_port, host=carrier.host))
        elif inv.is_request and inv.method in ("BYE", "CANCEL"):
            carrier.answer(inv, 200)
    raise AssertionError("no final answer")


def test_a_cancel_from_a_socket_of_the_other_worker_is_offered_to_the_owner(edge: EdgeProcess,
                                                                          carrier: Carrier) -> None:
    """A CANCEL has no To tag: the worker it lands on asks the other, which has the INVITE."""
    pbx = pbx_on(edge, 0)
    elsewhere = pbx_on(edge, 1)
    prof = new_profile(edge)
    try:
        carrier.drain()
        d = pbx.invite(prof, "+442071234567")
        inv = carrier.recv_request("INVITE")
        carrier.answer(inv, 180)
        assert pbx.recv().status in (100, 180)
        # the INVITE's Via (§9.1), from another source port (a NAT rebinding): answered there (rport)
        elsewhere.send(pbx.request("CANCEL", d["ruri"], from_user=d["user"], to_user="x",
                                   call_id=d["call_id"], cseq=2, from_tag=d["from_tag"], branch=d["branch"]))
        assert elsewhere.recv_final().status == 200
        carrier.answer(carrier.recv_request("CANCEL"), 200)
        carrier.answer(inv, 487)
        assert pbx.recv_final().status == 487
        # nobody's CANCEL: each worker says so, and the one it reached answers 481
        elsewhere.send(elsewhere.request("CANCEL", d["ruri"], from_user=d["user"], to_user="x",
                                         call_id="nobody", cseq=1, from_tag="x"))
        assert elsewhere.recv_final().status == 481
    finally:
        pbx.close()
        elsewhere.close()
    assert wait_for(lambda: api_get(edge, f"/v1/profiles/{prof['id']}")["channels_in_use"] == 0)


def test_the_echo_service_works_on_every_worker(edge: EdgeProcess) -> None:
    for k in range(WORKERS):
        pbx = pbx_on(edge, k)
        prof = new_profile(edge, credit="0")
        try:
            d = pbx.invite(prof, "+17606604690")
            ok = pbx.recv_final()
            assert ok.status == 200 and worker_of(ok.to_tag) == k
            _, port = media_port(ok.body)
            pbx.ack(d, ok.to_tag)
            pbx.rtp.settimeout(2)
            for seq in range(3):
                pbx.rtp.sendto(rtp_packet(seq, bytes([seq + 7]) * 160), ("127.0.0.1", port))
                assert pbx.rtp.recvfrom(2048)[0][12:] == bytes([seq + 7]) * 160
            assert pbx.bye(d, ok.to_tag).status == 200
        finally:
            pbx.close()


def test_metrics_totals_are_the_calls_placed_on_every_worker(edge: EdgeProcess, carrier: Carrier) -> None:
    started = metric(edge, "edge_calls_started_total", direction="outgoing")
    ended = metric(edge, "edge_calls_ended_total")
    placed = {0: 0, 1: 0}
    for k in (0, 1, 0, 1, 1):
        pbx = pbx_on(edge, k)
        try:
            call = Call(edge, pbx, carrier, new_profile(edge))
            placed[call.worker] += 1
            call.ack_from(pbx)
            carrier.recv_request("ACK")
            assert call.bye_from(pbx) == 200
        finally:
            pbx.close()
    assert placed == {0: 2, 1: 3}
    assert wait_for(lambda: metric(edge, "edge_calls_ended_total") == ended + 5)
    assert metric(edge, "edge_calls_started_total", direction="outgoing") == started + 5
    assert metric(edge, "edge_calls_active") == 0


# ------------------------------------------------------------ crashes (a node of their own)


def node_of_its_own(tmp_path, carrier, extra_config: str = ""):  # type: ignore[no-untyped-def]
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{carrier.port}"\npriority = 1\nweight = 100\n'
             '[credit]\nslice_seconds = 2\n' + extra_config)
    proc = EdgeProcess(tmp_path, extra_config=extra, trusted=["127.0.0.2/32"], sip_extra="rate_limit = 0",
                       workers=WORKERS)
    with proc:
        with proc.client() as api:
            assert api.put("/v1/rates", json={"rates": [
                {"prefix": "44", "rate": "0.0200", "min_seconds": 60, "increment_seconds": 6}]}).status_code == 200
        yield proc


@pytest.fixture
def own_edge(tmp_path, carrier):
    yield from node_of_its_own(tmp_path, carrier)


def test_kill_9_of_a_worker_settles_its_calls_and_leaves_the_others(own_edge: EdgeProcess, carrier: Carrier) -> None:
    edge = own_edge
    calls: list[Call] = []
    pbxs: list[Pbx] = []
    try:
        for k in (0, 0, 1, 1):
            pbx = pbx_on(edge, k)
            pbxs.append(pbx)
            call = Call(edge, pbx, carrier, new_profile(edge))
            call.ack_from(pbx)
            carrier.recv_request("ACK")
            calls.append(call)
        assert [c.worker for c in calls] == [0, 0, 1, 1]
        before = wait_children(edge)
        os.kill(before["worker 0"], signal.SIGKILL)
        # the supervisor starts worker 0 again; at its start it settles the calls it carried
        for call in calls[:2]:
            cdr = wait_for(lambda call=call: api_get(edge, f"/v1/profiles/{call.prof['id']}/cdrs")["items"], 30)
            assert cdr and cdr[0]["end_reason"] == "recovery", cdr
            assert api_get(edge, f"/v1/profiles/{call.prof['id']}")["channels_in_use"] == 0
            ledger_matches_balance(edge, call.prof)
        after = wait_children(edge)
        assert after["worker 0"] != before["worker 0"] and after["worker 1"] == before["worker 1"]
        assert wait_for(lambda: metric(edge, "edge_workers_up") == WORKERS, 10)
        # worker 1's calls ran on and end as usual, billed normally
        for call in calls[2:]:
            assert api_get(edge, f"/v1/profiles/{call.prof['id']}")["channels_in_use"] == 1
            assert call.bye_from(call.pbx) == 200
            cdr = wait_for(lambda call=call: api_get(edge, f"/v1/profiles/{call.prof['id']}/cdrs")["items"])[0]
            assert (cdr["status"], cdr["end_reason"]) == (200, "caller_bye")
            assert Decimal(cdr["cost"]) == Decimal("0.02")
            assert api_get(edge, f"/v1/profiles/{call.prof['id']}")["channels_in_use"] == 0
            ledger_matches_balance(edge, call.prof)
        # and the restarted worker takes calls again
        pbx = pbx_on(edge, 0)
        pbxs.append(pbx)
        call = Call(edge, pbx, carrier, new_profile(edge))
        call.ack_from(pbx)
        carrier.recv_request("ACK")
        assert call.bye_from(pbx) == 200
    finally:
        for pbx in pbxs:
            pbx.close()
    assert edge.stop() == 0, edge.log.read_text()[-3000:]


def test_calls_go_on_while_the_api_process_is_down(own_edge: EdgeProcess, carrier: Carrier) -> None:
    edge = own_edge
    prof = new_profile(edge)
    api_pid = wait_children(edge)["api"]
    os.kill(api_pid, signal.SIGSTOP)   # down: it answers nothing (a kill -9 is restarted within a second)
    try:
        with pytest.raises(httpx.HTTPError):
            httpx.get(edge.base + "/healthz", timeout=1.0)
        for k in range(WORKERS):
            pbx = pbx_on(edge, k)
            try:
                call = Call(edge, pbx, carrier, prof)
                call.ack_from(pbx)
                carrier.recv_request("ACK")
                assert call.bye_from(pbx) == 200
            finally:
                pbx.close()
    finally:
        os.kill(api_pid, signal.SIGCONT)
    os.kill(api_pid, signal.SIGKILL)   # and killed: the supervisor starts it again
    assert wait_for(lambda: (lambda c: c.get("api") not in (None, api_pid))(node_children(edge)), 20)
    assert wait_for(lambda: _healthy(edge), 20)
    cdrs = api_get(edge, f"/v1/profiles/{prof['id']}/cdrs")["items"]
    assert [c["end_reason"] for c in cdrs] == ["caller_bye"] * WORKERS
    ledger_matches_balance(edge, prof)


def _healthy(edge: EdgeProcess) -> bool:
    try:
        return httpx.get(edge.base + "/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_sip_port_in_use_fails_the_start_with_one_line(tmp_path: Path) -> None:
    proc = EdgeProcess(tmp_path, workers=WORKERS)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", proc.sip_port))
        with pytest.raises(RuntimeError, match="sip.listen.*Address already in use"):
            proc.start()


def test_reload_and_drain_go_through_the_supervisor(own_edge: EdgeProcess) -> None:
    """`sipedge reload` and `sipedge drain` find the supervisor by the pid file; it forwards the
    signals, reports the reload, and exits 0 once every worker has drained."""
    import subprocess

    edge = own_edge
    assert edge.proc is not None
    kids = wait_children(edge)
    cli = [sys.executable, "-m", "edge.cli"]
    edge.config.write_text(edge.config.read_text().replace("rate_limit = 0", "rate_limit = 0\nrate_burst = 900"))
    r = subprocess.run([*cli, "reload", "--config", str(edge.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"(pid {edge.proc.pid}) reloaded" in r.stdout, r.stdout + r.stderr
    assert node_children(edge) == kids                      # a reload restarts nothing
    r = subprocess.run([*cli, "drain", "--config", str(edge.config), "--wait", "30"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "has exited" in r.stdout, r.stdout + r.stderr
    assert edge.proc.wait(5) == 0
    assert not (edge.data / "sipedge.pid").exists()
    assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
               for pid in kids.values())


@pytest.fixture
def hang_edge(tmp_path, carrier):
    yield from node_of_its_own(tmp_path, carrier, "[node]\nhang_timeout = 3\n")


def test_a_hung_worker_is_killed_and_its_calls_settled(hang_edge: EdgeProcess, carrier: Carrier) -> None:
    """A worker whose loop stops (SIGSTOP stands for a blocked loop) sends no heartbeat: after
    ``[node] hang_timeout`` the supervisor kills it, starts it again, and the call it held is
    settled at its start as after a crash; the other worker never stops serving."""
    edge = hang_edge
    pbxs = [pbx_on(edge, 1), pbx_on(edge, 0)]
    try:
        call = Call(edge, pbxs[0], carrier, new_profile(edge))
        call.ack_from(pbxs[0])
        carrier.recv_request("ACK")
        assert call.worker == 1
        before = wait_children(edge)
        os.kill(before["worker 1"], signal.SIGSTOP)
        assert wait_for(lambda: node_children(edge).get("worker 1") not in (None, before["worker 1"]), 40)
        cdr = wait_for(lambda: api_get(edge, f"/v1/profiles/{call.prof['id']}/cdrs")["items"], 30)
        assert cdr and cdr[0]["end_reason"] == "recovery", cdr
        assert api_get(edge, f"/v1/profiles/{call.prof['id']}")["channels_in_use"] == 0
        ledger_matches_balance(edge, call.prof)
        assert f"worker 1 (pid {before['worker 1']}) has not answered" in edge.log.read_text()
        assert wait_children(edge)["worker 0"] == before["worker 0"]   # never touched
        other = Call(edge, pbxs[1], carrier, new_profile(edge))
        other.ack_from(pbxs[1])
        carrier.recv_request("ACK")
        assert other.bye_from(pbxs[1]) == 200
    finally:
        for pbx in pbxs:
            pbx.close()
    assert edge.stop() == 0, edge.log.read_text()[-3000:]
