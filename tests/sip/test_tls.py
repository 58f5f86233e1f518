"""SIP over TLS through a real ``sipedge serve`` with raw Python ``ssl`` peers (issue 12 item 1).

Certificates are made here (tests/tlscerts.py): a CA, the edge's certificate for 127.0.0.1,
carriers' certificates for the right host, the wrong host and already expired. The PBX is a
raw TLS socket (exact bytes on the wire); the pjsua2 PBX over TLS with audio is in
tests/e2e/test_tls_e2e.py. What is checked: registration and digest over TLS, Via/Contact
naming TLS, an incoming call delivered over the registered connection, the RFC 5626 pong,
TLS 1.2 as the floor, carriers over verified TLS (a wrong host and an expired certificate
refused and counted, mutual TLS, one connection reused for every probe), an expired client
certificate refused, a certificate reload that keeps an established connection, and a
relay in the middle that sees no SIP in clear.
"""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from edgeproc import EdgeProcess, free_port
from rawsip import RawSip, digest, sdp
from test_calls_raw import Carrier, Pbx, attach_number, carrier_final, carrier_invite, new_profile
from tlscerts import TestCA, serial_of

from edge.sip import build_response, frame_length, parse

pytestmark = pytest.mark.timeout(60)

DOMAIN = "sip.edge.test"


# ------------------------------------------------------------------------------ helpers

def client_context(ca: TestCA, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def register(ua: RawSip, prof: dict, password: str | None = None) -> object:
    """REGISTER with digest; returns the final answer."""
    user = prof["sip_username"]
    call_id = uuid.uuid4().hex
    ua.send(ua.request("REGISTER", f"sip:{DOMAIN}", from_user=user, to_user=user, call_id=call_id,
                       headers=[("Expires", "300")]))
    challenge = ua.recv_final()
    assert challenge.status == 401, challenge.raw
    auth = digest("REGISTER", f"sip:{DOMAIN}", user, password or prof["sip_password"],
                  challenge.header("WWW-Authenticate"))
    ua.send(ua.request("REGISTER", f"sip:{DOMAIN}", from_user=user, to_user=user, call_id=call_id, cseq=2,
                       headers=[("Expires", "300"), ("Authorization", auth)]))
    return ua.recv_final()


def metric(edge: EdgeProcess, name: str, **labels: str) -> float:
    """The value of one series of ``/metrics`` (0 when it is absent)."""
    text = httpx.get(edge.base + "/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}\{{([^}}]*)\}} (\S+)$", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


def wait_for(fn, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout waiting for {what} (last: {value!r})")
        time.sleep(0.05)


def free_media_block(size: int = 100) -> tuple[int, int]:
    """Relay ports free right now below the ephemeral range: other test processes on this
    machine run edges too, and a shared block ends in 503 "no media ports"."""
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


def reload(edge: EdgeProcess) -> dict:
    """SIGHUP, then the outcome the node writes to reload.json."""
    path = edge.data / "reload.json"
    before = json.loads(path.read_text())["serial"] if path.exists() else 0
    assert edge.proc is not None
    edge.proc.send_signal(signal.SIGHUP)

    def outcome() -> dict | None:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return result if result["serial"] > before else None
    return wait_for(outcome, 10.0, "reload.json")


class TlsCarrier:
    """A carrier's TLS listener on 127.0.0.x: answers OPTIONS 200 on every connection it accepts.

    :param require_client_cert: mutual TLS: the edge must present a certificate of ``ca``.
    """

    def __init__(self, host: str, cert: tuple[Path, Path], ca: TestCA, *, require_client_cert: bool = False) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        if require_client_cert:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(str(ca.path))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()
        self.accepted = 0           # TCP connections accepted
        self.handshakes = 0         # of them, handshakes that succeeded
        self.options = 0
        self.requests: list[object] = []  # every other request, as parsed
        self.client_subjects: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.handshakes += 1
        peer = conn.getpeercert()
        if peer:
            self.client_subjects.append(dict(x[0] for x in peer["subject"])["commonName"])
        buf = b""
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while buf.strip(b"\r\n") and (n := frame_length(buf)):
                    msg, buf = parse(buf[:n]), buf[n:]
                    if msg.is_request and msg.method == "OPTIONS":
                        self.options += 1
                        conn.sendall(build_response(msg, 200, to_tag="gw"))
                    elif msg.is_request:
                        self.requests.append(msg)
                        if msg.method == "INVITE":  # answered at once, over the connection it came on
                            contact = f"<sip:gw@{self.host}:{self.port};transport=tls>"
                            conn.sendall(build_response(msg, 200, to_tag="gw", body=sdp(40000, host=self.host),
                                                        headers=[("Contact", contact),
                                                                 ("Content-Type", "application/sdp")]))
                        elif msg.method == "BYE":
                            conn.sendall(build_response(msg, 200))

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for t in self._threads:
            t.join(2)


class WireTap:
    """A TCP relay between a client and the edge that keeps every octet it forwards: what a
    capture on the TLS listener's port would see."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.seen = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.sock.accept()
        upstream = socket.create_connection(self.target)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65535)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            with self._lock:
                self.seen += data
            dst.sendall(data)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def carriers(ca: TestCA) -> Iterator[dict[str, TlsCarrier]]:
    made = {
        "good": TlsCarrier("127.0.0.2", ca.issue("carrier-good", ips=("127.0.0.2",))[:2], ca,
                           require_client_cert=True),
        "wrong_host": TlsCarrier("127.0.0.3", ca.issue("carrier-wrong", dns=("other.example",),
                                                       ips=("127.0.0.9",))[:2], ca),
        "expired": TlsCarrier("127.0.0.4", ca.issue("carrier-expired", ips=("127.0.0.4",), expired=True)[:2], ca),
    }
    yield made
    for c in made.values():
        c.close()


@pytest.fixture(scope="module")
def udp_carrier() -> Iterator[Carrier]:
    c = Carrier("127.0.0.2")
    yield c
    c.close()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, ca: TestCA,
         carriers: dict[str, TlsCarrier]) -> Iterator[EdgeProcess]:
    cert, key, _ = ca.issue("edge", ips=("127.0.0.1", "127.0.0.2"), dns=("edge.test",))
    tls_port = free_port()
    carrier_toml = "".join(f'[[carriers]]\nuri = "sip:{c.host}:{c.port};transport=tls"\npriority = {i + 1}\n'
                           for i, c in enumerate(carriers.values()))
    extra = (carrier_toml + '[health]\nenabled = true\ninterval = 0.3\ntimeout = 1.0\nthreshold = 1\n'
             f'[tls]\ncert = "{cert}"\nkey = "{key}"\nca = "{ca.path}"\nclient_cert_carriers = true\n')
    proc = EdgeProcess(tmp_path_factory.mktemp("tls"), extra_config=extra, trusted=["127.0.0.2/32"],
                       sip_extra="rate_limit = 0", listen_extra=(f"tls:127.0.0.1:{tls_port}",),
                       media_ports=free_media_block())
    proc.tls_port = tls_port  # type: ignore[attr-defined]
    proc.tls_cert = cert  # type: ignore[attr-defined]
    proc.tls_key = key  # type: ignore[attr-defined]
    with proc:
        with proc.client() as api:
            assert api.put("/v1/rates", json={"rates": [
                {"prefix": "44", "rate": "0.0200", "min_seconds": 60, "increment_seconds": 6}]}).status_code == 200
        yield proc


class TlsPbx(Pbx):
    """test_calls_raw's PBX (INVITE with digest, ACK, BYE) on a TLS connection."""

    def __init__(self, edge: EdgeProcess, ctx: ssl.SSLContext) -> None:
        RawSip.__init__(self, edge.tls_port, "tls", tls=ctx)  # type: ignore[attr-defined]
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind(("127.0.0.1", 0))
        self.rtp_port = self.rtp.getsockname()[1]


@pytest.fixture
def pbx(edge: EdgeProcess, ca: TestCA) -> Iterator[RawSip]:
    ua = RawSip(edge.tls_port, "tls", tls=client_context(ca))  # type: ignore[attr-defined]
    yield ua
    ua.close()


# ------------------------------------------------------------------------------ PBX side

def test_register_over_tls_and_the_edge_names_tls(edge: EdgeProcess, pbx: RawSip) -> None:
    prof = new_profile(edge)
    ok = register(pbx, prof)
    assert ok.status == 200, ok.raw
    assert pbx.sock.version() in ("TLSv1.2", "TLSv1.3")
    with edge.client() as api:
        regs = api.get(f"/v1/profiles/{prof['id']}/registrations").json()
    assert [r["source"] for r in regs] == [f"tls:127.0.0.1:{pbx.port}"]
    assert any(str(c.uri).endswith(";transport=tls") for c in ok.contacts)


def test_wrong_password_over_tls_is_refused(edge: EdgeProcess, pbx: RawSip) -> None:
    prof = new_profile(edge)
    assert register(pbx, prof, password="not-the-password").status == 403


def test_crlf_keepalive_ping_gets_a_pong(pbx: RawSip) -> None:
    pbx.send(b"\r\n\r\n")  # RFC 5626 §4.4.1
    pbx.sock.settimeout(5)
    assert pbx.sock.recv(16) == b"\r\n"


def test_incoming_call_comes_over_the_registered_tls_connection(edge: EdgeProcess, pbx: RawSip,
                                                               udp_carrier: Carrier) -> None:
    prof = new_profile(edge)
    number = f"+1415555{uuid.uuid4().int % 10000:04d}"
    attach_number(edge, prof, number)
    assert register(pbx, prof).status == 200
    udp_carrier.drain()
    udp_carrier.sock.sendto(carrier_invite(udp_carrier, edge, number), ("127.0.0.1", edge.sip_port))
    inv = pbx.recv()
    while not (inv.is_request and inv.method == "INVITE"):
        inv = pbx.recv()
    via = inv.header("Via")
    assert via.startswith(f"SIP/2.0/TLS 127.0.0.1:{edge.tls_port};"), via  # type: ignore[attr-defined]
    assert ";transport=tls" in inv.header("Contact")
    pbx.send(build_response(inv, 486, to_tag="pbx1"))
    assert carrier_final(udp_carrier) == 486
    with edge.client() as api:
        cdr = wait_for(lambda: api.get(f"/v1/profiles/{prof['id']}/cdrs").json()["items"], 5.0, "CDR")[0]
    assert cdr["transport"] == {"customer": "tls", "carrier": "udp"}
    assert metric(edge, "edge_calls_started_by_transport_total", direction="incoming", transport="udp") >= 1


def test_sips_request_uri_over_udp_is_refused(edge: EdgeProcess) -> None:
    ua = RawSip(edge.sip_port)
    try:
        ua.send(ua.request("OPTIONS", f"sips:{DOMAIN}", from_user="probe", to_user="probe"))
        assert ua.recv_final().status == 416  # RFC 5630: SIPS means TLS on this hop too
    finally:
        ua.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")  # TLS 1.1 is what is refused
def test_tls_1_1_is_refused(edge: EdgeProcess, ca: TestCA) -> None:
    ctx = client_context(ca)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        RawSip(edge.tls_port, "tls", tls=ctx)  # type: ignore[attr-defined]
    wait_for(lambda: metric(edge, "edge_tls_handshake_failures_total", side="both", reason="protocol") >= 1
             or metric(edge, "edge_tls_handshake_failures_total", side="both", reason="peer_refused") >= 1,
             5.0, "a counted protocol failure")


def test_expired_client_certificate_is_refused_and_counted(edge: EdgeProcess, ca: TestCA) -> None:
    expired = ca.issue("client-expired", ips=("127.0.0.2",), expired=True)
    before = metric(edge, "edge_tls_handshake_failures_total", side="both", reason="expired")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ua = RawSip(edge.tls_port, "tls", bind="127.0.0.2", tls=client_context(ca, expired[:2]))  # type: ignore[attr-defined]
        # TLS 1.3: the client learns of the refusal on its first read
        ua.send(b"\r\n\r\n")
        ua.sock.settimeout(5)
        if not ua.sock.recv(16):
            raise ConnectionError("closed")
    wait_for(lambda: metric(edge, "edge_tls_handshake_failures_total", side="both", reason="expired") > before,
             5.0, "the expired client certificate counted")
    log = edge.log.read_text()
    assert re.search(r"TLS handshake from 127\.0\.0\.2:\d+ failed: expired \(certificate has expired\)", log)
    assert "Traceback" not in log


def test_no_sip_in_clear_on_the_tls_port(edge: EdgeProcess, ca: TestCA) -> None:
    tap = WireTap(("127.0.0.1", edge.tls_port))  # type: ignore[attr-defined]
    ua = RawSip(tap.port, "tls", tls=client_context(ca))
    try:
        prof = new_profile(edge)
        assert register(ua, prof).status == 200
    finally:
        ua.close()
    seen = bytes(tap.seen)
    assert len(seen) > 1000  # the handshake and two REGISTER exchanges went through the tap
    for clear in (b"REGISTER", b"SIP/2.0", prof["sip_username"].encode(), b"Digest", b"sip.edge.test"):
        assert clear not in seen, clear


# ------------------------------------------------------------------------------ carrier side

def test_carriers_over_tls_are_verified(edge: EdgeProcess, carriers: dict[str, TlsCarrier]) -> None:
    good, wrong, expired = carriers["good"], carriers["wrong_host"], carriers["expired"]
    wait_for(lambda: good.options >= 3, 10.0, "three OPTIONS answered by the good carrier")
    assert good.handshakes == 1  # every probe on the one connection (reuse)
    assert good.client_subjects == ["edge"]  # mutual TLS: the edge presented its certificate
    wait_for(lambda: metric(edge, "edge_tls_handshake_failures_total", side="carrier", reason="wrong_host") >= 1,
             5.0, "wrong host counted")
    wait_for(lambda: metric(edge, "edge_tls_handshake_failures_total", side="carrier", reason="expired") >= 1,
             5.0, "expired counted")
    assert wrong.options == 0 and expired.options == 0  # nothing was sent over a refused handshake
    assert metric(edge, "edge_carrier_up", carrier=f"127.0.0.2:{good.port};transport=tls") == 1
    assert metric(edge, "edge_carrier_up", carrier=f"127.0.0.3:{wrong.port};transport=tls") == 0
    assert metric(edge, "edge_carrier_up", carrier=f"127.0.0.4:{expired.port};transport=tls") == 0
    log = edge.log.read_text()
    assert f"127.0.0.3:{wrong.port} failed: wrong_host" in log
    assert "Traceback" not in log


def test_a_call_over_tls_on_both_legs(edge: EdgeProcess, ca: TestCA, carriers: dict[str, TlsCarrier]) -> None:
    good = carriers["good"]
    wait_for(lambda: good.options >= 1, 10.0, "the carrier probed up")
    pbx = TlsPbx(edge, client_context(ca))
    try:
        prof = new_profile(edge)
        d = pbx.invite(prof, "+442071234567")
        assert d["first"].status == 407
        ok = pbx.recv_final()
        assert ok.status == 200, ok.raw
        assert ";transport=tls" in ok.header("Contact")
        pbx.ack(d, ok.to_tag)
        invite = wait_for(lambda: [r for r in good.requests if r.method == "INVITE"], 5.0, "the INVITE")[0]
        assert invite.header("Via").startswith("SIP/2.0/TLS 127.0.0.1:")
        assert ";transport=tls" in invite.header("Contact")
        wait_for(lambda: any(r.method == "ACK" for r in good.requests), 5.0, "the ACK over TLS")
        assert pbx.bye(d, ok.to_tag).status == 200
        wait_for(lambda: any(r.method == "BYE" for r in good.requests), 5.0, "the BYE over TLS")
        assert good.handshakes == 1  # probes, INVITE, ACK and BYE: one connection
        with edge.client() as api:
            cdr = wait_for(lambda: api.get(f"/v1/profiles/{prof['id']}/cdrs").json()["items"], 5.0, "CDR")[0]
        assert cdr["status"] == 200 and cdr["transport"] == {"customer": "tls", "carrier": "tls"}
        assert cdr["carrier"] == f"sip:127.0.0.2:{good.port};transport=tls"
    finally:
        pbx.close()


# ------------------------------------------------------------------------------ reload

def test_reload_new_certificate_keeps_established_connections(edge: EdgeProcess, ca: TestCA) -> None:
    old = RawSip(edge.tls_port, "tls", tls=client_context(ca))  # type: ignore[attr-defined]
    try:
        old_serial = serial_of(old.sock.getpeercert(binary_form=True))
        prof = new_profile(edge)
        assert register(old, prof).status == 200
        # a new certificate in the same files, as certbot renews it
        new_cert, new_key, new_serial = ca.issue("edge-renewed", ips=("127.0.0.1", "127.0.0.2"))
        Path(edge.tls_cert).write_bytes(new_cert.read_bytes())  # type: ignore[attr-defined]
        Path(edge.tls_key).write_bytes(new_key.read_bytes())  # type: ignore[attr-defined]
        outcome = reload(edge)
        assert outcome["ok"], outcome
        assert register(old, prof).status == 200  # the established connection still serves
        assert serial_of(old.sock.getpeercert(binary_form=True)) == old_serial
        fresh = RawSip(edge.tls_port, "tls", tls=client_context(ca))  # type: ignore[attr-defined]
        assert serial_of(fresh.sock.getpeercert(binary_form=True)) == new_serial != old_serial
        fresh.close()

        # a key that is not the certificate's: refused, naming tls.key; the running one stays
        _, other_key, _ = ca.issue("unrelated", ips=("127.0.0.1",))
        config = edge.config.read_text()
        edge.config.write_text(config.replace(f'key = "{edge.tls_key}"', f'key = "{other_key}"'))  # type: ignore[attr-defined]
        try:
            outcome = reload(edge)
        finally:
            edge.config.write_text(config)
        assert not outcome["ok"] and "tls.key" in outcome["error"], outcome
        again = RawSip(edge.tls_port, "tls", tls=client_context(ca))  # type: ignore[attr-defined]
        assert serial_of(again.sock.getpeercert(binary_form=True)) == new_serial
        again.close()
        assert register(old, prof).status == 200
    finally:
        old.close()
