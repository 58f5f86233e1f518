"""A real edge with a little of everything the dashboard and the alerts look at.

``ops_edge(tmp)`` starts ``sipedge serve`` with two raw-socket carriers and drives
real SIP through it (the raw-socket helpers of ``tests/sip/test_calls_raw.py``):
answered calls with RTP (and a sequence gap, so loss is counted), a carrier
failover, a call the carrier refuses, rejected INVITEs, a wrong password, a
source blocked after repeated authentication failures, a registration, and one
call left up on a one-channel profile whose credit is below its auto-recharge
minimum with auto-recharge off (so the channel and credit alerts really fire).
"""

from __future__ import annotations

import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgeproc import EdgeProcess
from rawsip import RawSip, digest, media_port, rtp_packet, sdp
from test_calls_raw import Carrier, Pbx, answered_call

REGISTRAR = "sip:sip.edge.test"


@dataclass
class OpsEdge:
    edge: EdgeProcess
    primary: Carrier
    backup: Carrier
    hq: dict = field(default_factory=dict)         # 2 channels, credit, auto-recharge on, registered
    branch: dict = field(default_factory=dict)     # 1 channel, busy, credit below its auto-recharge minimum
    broke: dict = field(default_factory=dict)      # auto-recharge on, but the master balance cannot fund it
    account: dict = field(default_factory=dict)
    held: list = field(default_factory=list)       # (pbx, dialog, to-tag) of calls left up
    block_threshold: int = 3


def _provision(edge: EdgeProcess) -> tuple[dict, dict, dict]:
    with edge.client() as api:
        api.put("/v1/rates", json={"rates": [
            {"prefix": "44", "rate": "0.0200", "min_seconds": 60, "increment_seconds": 6, "description": "UK"},
        ]}).raise_for_status()
        acct = api.post("/v1/accounts", json={"name": "Ops Test", "admin": f"ops.{uuid.uuid4().hex[:8]}"}).json()
        api.post(f"/v1/accounts/{acct['id']}/credit", json={"amount": "20.00"}).raise_for_status()
        hq = api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": "HQ", "channels": 2}).json()
        branch = api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": "Branch", "channels": 1}).json()
        api.post(f"/v1/profiles/{hq['id']}/credit", json={"amount": "5.00"}).raise_for_status()
        api.post(f"/v1/profiles/{branch['id']}/credit", json={"amount": "0.50"}).raise_for_status()
        api.put(f"/v1/profiles/{hq['id']}/auto-recharge",
                json={"enabled": True, "amount": "5.00", "min_balance": "1.00"}).raise_for_status()
        api.put(f"/v1/profiles/{branch['id']}/auto-recharge",
                json={"enabled": False, "amount": "5.00", "min_balance": "2.00"}).raise_for_status()
        acct = api.get(f"/v1/accounts/{acct['id']}").json()
        # a second account whose master balance is below the recharge amount: auto-recharge cannot happen
        poor = api.post("/v1/accounts", json={"name": "Ops Poor", "admin": f"poor.{uuid.uuid4().hex[:8]}"}).json()
        api.post(f"/v1/accounts/{poor['id']}/credit", json={"amount": "1.00"}).raise_for_status()
        broke = api.post(f"/v1/accounts/{poor['id']}/profiles", json={"name": "Broke", "channels": 4}).json()
        api.post(f"/v1/profiles/{broke['id']}/credit", json={"amount": "0.50"}).raise_for_status()
        api.put(f"/v1/profiles/{broke['id']}/auto-recharge",
                json={"enabled": True, "amount": "5.00", "min_balance": "2.00"}).raise_for_status()
    return acct, hq, branch, broke


def register(ua: RawSip, user: str, password: str, expires: int = 300):
    call_id = uuid.uuid4().hex
    ua.send(ua.request("REGISTER", REGISTRAR, from_user=user, to_user=user, call_id=call_id, cseq=1,
                       headers=[("Expires", str(expires))]))
    challenge = ua.recv_final()
    assert challenge.status == 401, challenge.raw
    auth = digest("REGISTER", REGISTRAR, user, password, challenge.header("WWW-Authenticate"))
    ua.send(ua.request("REGISTER", REGISTRAR, from_user=user, to_user=user, call_id=call_id, cseq=2,
                       headers=[("Expires", str(expires)), ("Authorization", auth)]))
    return ua.recv_final()


def _rtp_both_ways(pbx: Pbx, carrier: Carrier, relay_a: int, relay_b: int, n: int = 30, gap: int = 0) -> None:
    """``n`` packets each way; with ``gap`` the PBX skips that many sequence numbers halfway (counted as lost)."""
    pbx.rtp.settimeout(2)
    carrier.rtp.settimeout(2)
    seq = 0
    for i in range(n):
        if gap and i == n // 2:
            seq += gap
        pbx.rtp.sendto(rtp_packet(seq, b"\x11" * 160), ("127.0.0.1", relay_a))
        carrier.rtp.recvfrom(2048)
        carrier.rtp.sendto(rtp_packet(i, b"\x55" * 160, ssrc=9), ("127.0.0.1", relay_b))
        pbx.rtp.recvfrom(2048)
        seq += 1
        time.sleep(0.002)


def _answered_with_media(edge: EdgeProcess, pbx: Pbx, carrier: Carrier, prof: dict, gap: int = 0):
    d, tag, inv = answered_call(edge, pbx, carrier, prof)
    _, relay_b = media_port(inv.body)
    _, relay_a = media_port(d["ok"].body)
    _rtp_both_ways(pbx, carrier, relay_a, relay_b, gap=gap)
    return d, tag, inv


def _hang_up(pbx: Pbx, carrier: Carrier, d: dict, tag: str) -> None:
    assert pbx.bye(d, tag).status == 200
    carrier.answer(carrier.recv_request("BYE"), 200)


def drive(ops: OpsEdge, *, block_source: str = "127.0.0.4", block_threshold: int = 3) -> None:
    """The traffic (a few seconds)."""
    edge, primary, backup = ops.edge, ops.primary, ops.backup
    pbx = Pbx(edge)
    try:
        # a registration of HQ (edge_registrations_active)
        ok = register(pbx, ops.hq["sip_username"], ops.hq["sip_password"])
        assert ok.status == 200, ok.raw
        # two answered calls with media, one with a sequence gap (loss), ended by the PBX
        for gap in (0, 5):
            d, tag, _ = _answered_with_media(edge, pbx, primary, ops.hq, gap=gap)
            _hang_up(pbx, primary, d, tag)
        # failover: the primary answers 503, the backup answers the call
        primary.drain()
        backup.drain()
        d = pbx.invite(ops.hq, "+442071234568")
        inv = primary.recv_request("INVITE")
        primary.answer(inv, 503)
        primary.recv_request("ACK")
        inv2 = backup.recv_request("INVITE")
        backup.answer(inv2, 180)
        backup.answer(inv2, 200, body=sdp(backup.rtp_port, host=backup.host))
        ok = pbx.recv_final()
        assert ok.status == 200, ok.raw
        pbx.ack(d, ok.to_tag)
        backup.recv_request("ACK")
        _hang_up(pbx, backup, d, ok.to_tag)
        # the carrier refuses a call: a failed seizure (ASR < 1)
        primary.drain()
        d = pbx.invite(ops.hq, "+442071234569")
        inv = primary.recv_request("INVITE")
        primary.answer(inv, 486)
        assert pbx.recv_final().status == 486
        primary.recv_request("ACK")
        # rejected before a channel is taken: a national number (484), a wrong password (403)
        pbx.invite(ops.hq, "02071234567")
        assert pbx.recv_final().status == 484
        pbx.invite(ops.hq, "+442071234567", password="wrong")
        assert pbx.recv_final().status == 403
    finally:
        pbx.close()

    # a scanner on another address: wrong passwords until it is blocked, then one more request
    scanner = RawSip(edge.sip_port, bind=block_source)
    try:
        for _ in range(block_threshold):
            challenge, final = _bad_register(scanner, ops.hq["sip_username"])
            assert final.status == 403, final.raw
        # it keeps sending for 2 s: with 1 s scrapes, drops land after the first scrape that shows the
        # counter edge_sip_rate_limited_total{scope="auth_block"}, so increase() sees them
        for _ in range(4):
            scanner.send(scanner.request("OPTIONS", REGISTRAR, from_user="scan", to_user="scan"))
            scanner.sock.settimeout(0.6)
            try:
                scanner.sock.recvfrom(65535)
                raise AssertionError("a blocked source was answered")
            except TimeoutError:
                pass
    finally:
        scanner.close()

    # a malformed message (edge_sip_parse_errors_total)
    junk = RawSip(edge.sip_port)
    try:
        junk.send(b"INVITE sip:x@sip.edge.test SIP/2.0\r\nVia: nonsense\r\nCSeq: x\r\n\r\n")
        time.sleep(0.1)
    finally:
        junk.close()

    # the Branch profile: its one channel busy with a call left up
    pbx2 = Pbx(edge)
    d, tag, _ = _answered_with_media(edge, pbx2, primary, ops.branch)
    ops.held.append((pbx2, d, tag))


def drive_or_explain(ops: OpsEdge) -> None:
    """:func:`drive`, with the end of the edge's log in the error when the traffic does not go as planned."""
    try:
        drive(ops, block_threshold=ops.block_threshold)
    except (AssertionError, OSError) as exc:
        tail = "\n".join(ops.edge.log.read_text(errors="replace").splitlines()[-40:])
        raise AssertionError(f"traffic through the edge failed: {exc!r}\n--- edge log (end) ---\n{tail}") from exc


def _bad_register(ua: RawSip, user: str):
    call_id = uuid.uuid4().hex
    ua.send(ua.request("REGISTER", REGISTRAR, from_user=user, to_user=user, call_id=call_id, cseq=1))
    challenge = ua.recv_final()
    auth = digest("REGISTER", REGISTRAR, user, "not-the-password", challenge.header("WWW-Authenticate"))
    ua.send(ua.request("REGISTER", REGISTRAR, from_user=user, to_user=user, call_id=call_id, cseq=2,
                       headers=[("Authorization", auth)]))
    return challenge, ua.recv_final()


def free_media_block(size: int = 2000) -> tuple[int, int]:
    """A wide block of UDP ports below the kernel's ephemeral range, mostly free right now.

    This host is shared: other test processes and the benchmarks' relays (rtpengine, the C reference
    relay: 30000 up) bind ports in 20000-32767 as they come and go. The engine skips a pair in use and
    tries the next, so a wide block (1000 pairs) survives neighbours taking hundreds of ports; a narrow
    one (the pid-derived 100 ports of EdgeProcess) can be taken whole and answer 503 no_media_ports.
    """
    best = (0, 23000)
    for _ in range(20):
        lo = random.randrange(23000, 30000 - size, 2)
        free = 0
        for port in range(lo, lo + size, 7):        # a sample is enough
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                    free += 1
                except OSError:
                    pass
        best = max(best, (free, lo))
        if free * 7 >= size * 0.9:
            break
    return best[1], best[1] + size - 1


@contextmanager
def ops_edge(tmp: Path, *, block_threshold: int = 3, traffic: bool = True) -> Iterator[OpsEdge]:
    """A running, provisioned edge; with ``traffic`` the calls of :func:`drive` are already through it
    (without, call ``drive(ops)`` yourself, e.g. once Prometheus scrapes the edge)."""
    Path(tmp).mkdir(parents=True, exist_ok=True)
    primary, backup = Carrier("127.0.0.2"), Carrier("127.0.0.3")
    extra = (f'[[carriers]]\nuri = "sip:127.0.0.2:{primary.port}"\npriority = 1\nweight = 100\n'
             f'[[carriers]]\nuri = "sip:127.0.0.3:{backup.port}"\npriority = 2\nweight = 100\n')
    edge = EdgeProcess(tmp, extra_config=extra, trusted=["127.0.0.2/32", "127.0.0.3/32"],
                       sip_extra=f"rate_limit = 0\nauth_block_threshold = {block_threshold}",
                       media_ports=free_media_block())
    ops = OpsEdge(edge, primary, backup)
    ops.block_threshold = block_threshold
    try:
        with edge:
            ops.account, ops.hq, ops.branch, ops.broke = _provision(edge)
            if traffic:
                drive_or_explain(ops)
            yield ops
    finally:
        for pbx, _, _ in ops.held:
            pbx.close()
        primary.close()
        backup.close()
