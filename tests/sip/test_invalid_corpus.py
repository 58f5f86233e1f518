"""Every broken request of ``tests/corpus/invalid/issue-*.sip`` against a real ``sipedge serve``,
over UDP and TCP, from an unknown source and from an authenticated PBX (issue 9).

Each one gets the status and reason of ``expected.toml`` or is dropped, and is counted in
``edge_sip_parse_errors_total``; none leaves a server transaction, a channel or a
traceback behind, and the edge keeps answering. No test measures time: the edge's own
answer to a *barrier* request sent after each message (a request ``validate()``
refuses: a stateless 400, no transaction) shows the message was handled.
"""

from __future__ import annotations

import re
import socket
import tomllib
import uuid
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from edgeproc import EdgeProcess
from rawsip import RawSip, digest

from edge.sip import SipParseError, frame_length, parse

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "invalid"
EXPECTED = tomllib.loads((CORPUS / "expected.toml").read_text())
FILES = sorted(CORPUS.glob("issue-*.sip"))
DOMAIN = "sip.edge.test"
READ_TIMEOUT = 1.0  # [sip] tcp_header_timeout / tcp_body_timeout of this edge
GUARD = 15.0        # how long a test waits for the edge before failing (never asserted on)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    extra = f"tcp_header_timeout = {READ_TIMEOUT}\ntcp_body_timeout = {READ_TIMEOUT}\ntcp_max_connections = 6"
    with EdgeProcess(tmp_path_factory.mktemp("corpus"), sip_extra=extra) as proc:
        yield proc


@pytest.fixture(scope="module")
def pbx(edge: EdgeProcess) -> dict:
    """A digest profile with credit, and a nonce from a real 407 to its INVITE."""
    with edge.client() as api:
        acct = api.post("/v1/accounts", json={"name": "Bad", "admin": f"b.{uuid.uuid4().hex[:6]}"}).json()
        api.post(f"/v1/accounts/{acct['id']}/credit", json={"amount": "10.00"})
        prof = api.post(f"/v1/accounts/{acct['id']}/profiles", json={"name": "PBX", "channels": 2}).json()
        api.post(f"/v1/profiles/{prof['id']}/credit", json={"amount": "5.00"})
    ruri = f"sip:+442071234567@{DOMAIN}"
    tcp = RawSip(edge.sip_port, proto="tcp")  # over TCP the 407's transaction ends with its ACK
    try:
        first = tcp.request("INVITE", ruri, from_user=prof["sip_username"], to_user="+442071234567")
        tcp.send(first)
        challenge = tcp.recv_final()
        assert challenge.status == 407
        req = parse(first)
        tcp.send(tcp.request("ACK", ruri, from_user=prof["sip_username"], to_user="+442071234567",
                             call_id=req.call_id, from_tag=req.from_tag, to_tag=challenge.to_tag, branch=req.branch))
        return {"profile": prof, "challenge": challenge.header("Proxy-Authenticate"), "nc": 0}
    finally:
        tcp.close()


def metrics(edge: EdgeProcess) -> str:
    return httpx.get(edge.base + "/metrics", timeout=10).text


def parse_errors(text: str) -> Counter:
    return Counter({m.group(1): float(m.group(2)) for m in
                    re.finditer(r'^edge_sip_parse_errors_total\{reason="([^"]+)"\} (\S+)$', text, re.M)})


def gauge(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not exported")


def personalise(data: bytes, proto: str, pbx: dict | None) -> bytes:
    """The corpus message for this run: a fresh branch, the transport, and for the PBX its
    SIP username in From and a digest answer to its challenge (so that the request would
    pass authentication if it were well formed)."""
    data = data.replace(b"branch=z9hG4bKi9", b"branch=z9hG4bK" + uuid.uuid4().hex[:10].encode() + b"i9")
    if proto == "tcp":
        data = data.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
    if pbx is not None:
        prof = pbx["profile"]
        data = data.replace(b"sip:pbxuser@", f"sip:{prof['sip_username']}@".encode())
        start, rest = data.split(b"\r\n", 1)
        method, ruri = start.decode("latin-1").split(" ")[:2]
        pbx["nc"] += 1
        auth = digest(method, ruri, prof["sip_username"], prof["sip_password"], pbx["challenge"], nc=pbx["nc"])
        data = start + b"\r\nProxy-Authorization: " + auth.encode() + b"\r\n" + rest
    return data


def barrier(proto: str) -> tuple[bytes, str]:
    """A request the edge refuses statelessly (validate(): "Bad Contact port"), no transaction."""
    call_id = "barrier-" + uuid.uuid4().hex
    data = (f"OPTIONS sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/{proto.upper()} 192.0.2.99:5060;branch=z9hG4bK"
            f"{uuid.uuid4().hex[:12]};rport\r\nMax-Forwards: 70\r\nFrom: <sip:probe@{DOMAIN}>;tag=b1\r\n"
            f"To: <sip:{DOMAIN}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nContact: <sip:probe@192.0.2.99:0>\r\n"
            "Content-Length: 0\r\n\r\n").encode()
    return data, call_id


class Answer(NamedTuple):
    """What the test reads of an answer: also of one that repeats a header a strict parser
    refuses (the CSeq of ``issue-9-cseq-nonnumeric`` comes back as it was sent)."""

    status: int
    reason: str
    call_id: str


def answer_of(data: bytes) -> Answer:
    try:
        msg = parse(data)
        return Answer(msg.status, msg.reason, msg.call_id)
    except SipParseError:
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        status = re.match(r"SIP/2\.0 (\d{3}) (.*)", head)
        call_id = re.search(r"^Call-ID: *(.*)$", head, re.M | re.I)
        assert status and call_id, data
        return Answer(int(status.group(1)), status.group(2).strip(), call_id.group(1).strip())


class Stream:
    """A raw TCP connection that reads until a frame or until the edge closes it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD)
        self.buf = b""
        self.eof = False

    def next(self) -> Answer | None:
        """The next message, or None once the edge has closed the connection."""
        while True:
            try:
                n = frame_length(self.buf) if self.buf.strip(b"\r\n") else 0
            except SipParseError:  # an answer repeating a broken header: its head, no body
                n = self.buf.find(b"\r\n\r\n") + 4 if b"\r\n\r\n" in self.buf else 0
            if n:
                frame, self.buf = self.buf[:n], self.buf[n:]
                return answer_of(frame)
            if self.eof:
                return None
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def exchange_udp(edge: EdgeProcess, data: bytes) -> list[Answer]:
    ua = RawSip(edge.sip_port)
    try:
        probe, probe_id = barrier("udp")
        ua.send(data)
        ua.send(probe)
        answers = []
        ua.sock.settimeout(GUARD)
        while True:
            msg = answer_of(ua.sock.recvfrom(65535)[0])
            if msg.call_id == probe_id:
                assert (msg.status, msg.reason) == (400, "Bad Contact port")
                return answers
            answers.append(msg)
    finally:
        ua.close()


def exchange_tcp(edge: EdgeProcess, data: bytes, after: str) -> list[Answer]:
    conn = Stream(edge.sip_port)
    try:
        conn.sock.sendall(data)
        answers = []
        if after == "open":  # still in sync: a barrier on the same connection
            probe, probe_id = barrier("tcp")
            conn.sock.sendall(probe)
            while (msg := conn.next()) is not None and msg.call_id != probe_id:
                answers.append(msg)
            assert msg is not None, "the edge closed a connection that was still in sync"
            return answers
        while (msg := conn.next()) is not None:  # "close" / "timeout": read until the edge closes
            answers.append(msg)
        return answers
    finally:
        conn.close()


CASES = [(path, proto, who) for path in FILES for proto in ("udp", "tcp") for who in ("unknown", "pbx")]


@pytest.mark.parametrize("path,proto,who", CASES, ids=[f"{p.stem}-{t}-{w}" for p, t, w in CASES])
def test_broken_request(edge: EdgeProcess, pbx: dict, path: Path, proto: str, who: str) -> None:
    exp = EXPECTED[path.stem]
    data = personalise(path.read_bytes(), proto, pbx if who == "pbx" else None)
    before = metrics(edge)
    if proto == "udp":
        answers = exchange_udp(edge, data)
    else:
        answers = exchange_tcp(edge, data, exp["tcp_after"])
    after = metrics(edge)

    want = exp[proto]
    if want == "drop":
        assert answers == []
    else:
        assert [a.status for a in answers] == [want], [(a.status, a.reason) for a in answers]
        if "error" in exp:
            assert answers[0].reason == exp["reason"]  # names the header at fault
    # counted: the message's own reason, the barrier's BadHeader, a TCP read timeout
    counted = parse_errors(after) - parse_errors(before)
    expect: Counter = Counter()
    if "error" in exp and not (proto == "tcp" and exp["tcp_after"] == "timeout"):
        expect[exp["error"].removeprefix("Sip")] += 1
    if proto == "udp" or exp["tcp_after"] == "open":
        expect["BadHeader"] += 1
    if proto == "tcp" and exp["tcp_after"] == "timeout":
        expect["TcpReadTimeout"] += 1
    assert counted == expect
    if "error" in exp:  # a refused message leaves no server transaction behind
        assert gauge(after, "edge_sip_transactions", side="server") <= gauge(before, "edge_sip_transactions",
                                                                             side="server")


def test_afterwards_no_traceback_no_channel_and_still_answering(edge: EdgeProcess, pbx: dict) -> None:
    prof = pbx["profile"]
    for proto in ("udp", "tcp"):
        ua = RawSip(edge.sip_port, proto=proto)
        try:
            ua.send(ua.request("OPTIONS", f"sip:{DOMAIN}", from_user="pbx", to_user="edge"))
            assert ua.recv_final().status == 200
        finally:
            ua.close()
    # the PBX's digest answer is right: a well-formed INVITE with it passes authentication
    tcp = RawSip(edge.sip_port, proto="tcp")
    try:
        ruri = f"sip:+442071234567@{DOMAIN}"
        pbx["nc"] += 1
        auth = digest("INVITE", ruri, prof["sip_username"], prof["sip_password"], pbx["challenge"], nc=pbx["nc"])
        invite = tcp.request("INVITE", ruri, from_user=prof["sip_username"], to_user="+442071234567",
                             headers=[("Proxy-Authorization", auth)])
        tcp.send(invite)
        final = tcp.recv_final(timeout=GUARD)
        assert final.status not in (401, 403, 407), (final.status, final.reason)
        req = parse(invite)
        tcp.send(tcp.request("ACK", ruri, from_user=prof["sip_username"], to_user="+442071234567",
                             call_id=req.call_id, from_tag=req.from_tag, to_tag=final.to_tag, branch=req.branch))
    finally:
        tcp.close()
    text = metrics(edge)
    assert gauge(text, "edge_channels_in_use", profile=prof["id"]) == 0
    assert sum(parse_errors(text).values()) >= len(FILES) * 4
    assert "Traceback" not in edge.log.read_text()


# -- TCP: a message must complete in time from its first octet ---------------------------

OPTIONS = (f"OPTIONS sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/TCP 192.0.2.7:5070;branch=z9hG4bKslow\r\n"
           f"Max-Forwards: 70\r\nFrom: <sip:a@{DOMAIN}>;tag=1\r\nTo: <sip:{DOMAIN}>\r\nCall-ID: slow-1\r\n"
           "CSeq: 1 OPTIONS\r\nContent-Type: text/plain\r\nContent-Length: 20\r\n\r\n0123456789abcdefghij").encode()


def _closed_by_the_edge(conn: Stream) -> bool:
    return conn.next() is None


@pytest.mark.parametrize("case", ["drip", "short-body", "half-head"])
def test_slow_or_incomplete_tcp_message_is_closed_and_counted(edge: EdgeProcess, case: str) -> None:
    before = parse_errors(metrics(edge))
    conn = Stream(edge.sip_port)
    try:
        if case == "drip":  # one byte every 100 ms: every read is progress, none completes a message
            sent = 0
            conn.sock.settimeout(0.1)
            while sent < len(OPTIONS):
                try:
                    conn.sock.send(OPTIONS[sent:sent + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 1
                try:
                    if conn.sock.recv(1, socket.MSG_PEEK) == b"":
                        break  # the edge closed it
                except TimeoutError:
                    pass
            conn.sock.settimeout(GUARD)
            assert sent < len(OPTIONS)  # closed long before the message could complete
        elif case == "short-body":
            conn.sock.sendall(OPTIONS[:-8])  # head and 12 of the 20 body octets
        else:
            conn.sock.sendall(OPTIONS[:50])  # half a head, then silence
        assert _closed_by_the_edge(conn)
    finally:
        conn.close()
    assert (parse_errors(metrics(edge)) - before) == Counter({"TcpReadTimeout": 1})


def test_closed_slow_connections_give_their_slots_back(edge: EdgeProcess) -> None:
    before = parse_errors(metrics(edge))
    slow = [Stream(edge.sip_port) for _ in range(5)]  # of the 6 of tcp_max_connections
    try:
        for conn in slow:
            conn.sock.sendall(OPTIONS[:30])
        for conn in slow:
            assert _closed_by_the_edge(conn)
    finally:
        for conn in slow:
            conn.close()
    assert parse_errors(metrics(edge)) - before == Counter({"TcpReadTimeout": 5})  # each timed out, none refused
    fresh = [RawSip(edge.sip_port, proto="tcp") for _ in range(6)]  # all six slots are free again
    try:
        for ua in fresh:
            ua.send(ua.request("OPTIONS", f"sip:{DOMAIN}", from_user="pbx", to_user="edge"))
            assert ua.recv_final(timeout=GUARD).status == 200
    finally:
        for ua in fresh:
            ua.close()
