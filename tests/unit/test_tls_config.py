"""The ``[tls]`` checks (refused with the key at fault), contexts and handshake reason labels."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from tlscerts import TestCA

from edge.config import ConfigError, carrier_uses_tls, load, parse_listen
from edge.sip import parse_uri
from edge.sip.tls import TlsContexts, TlsSetupError, default_port, failure_reason, transport_of


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


def write(tmp_path: Path, tls: str, listen: str = '"tls:127.0.0.1:5061"', carriers: str = "") -> Path:
    path = tmp_path / "sipedge.toml"
    path.write_text(f'[sip]\nlisten = ["udp:127.0.0.1:5060", {listen}]\n{carriers}[tls]\n{tls}\n')
    return path


def tls_keys(cert: Path, key: Path, ca: Path | str = "") -> str:
    return f'cert = "{cert}"\nkey = "{key}"\nca = "{ca}"'


def test_a_tls_listener_with_good_files_loads(tmp_path: Path, ca: TestCA) -> None:
    cert, key, _ = ca.issue("edge", ips=("127.0.0.1",))
    cfg = load(write(tmp_path, tls_keys(cert, key, ca.path)))
    assert parse_listen(cfg.sip.listen[1]) == ("tls", "127.0.0.1", 5061)
    assert cfg.tls.verify_carriers and not cfg.tls.client_cert_carriers


@pytest.mark.parametrize("case,key_at_fault,why", [
    ("no_cert", "tls.cert", "required"),
    ("missing_file", "tls.cert", "cannot read"),
    ("not_pem", "tls.cert", "no PEM certificate"),
    ("expired", "tls.cert", "expired on"),
    ("bad_key", "tls.key", "no unencrypted PEM private key"),
    ("other_key", "tls.key", "is not the private key"),
    ("bad_ca", "tls.ca", "no PEM certificate"),
])
def test_unusable_files_are_refused_with_the_key_at_fault(tmp_path: Path, ca: TestCA, case: str,
                                                          key_at_fault: str, why: str) -> None:
    cert, key, _ = ca.issue(f"edge-{case}", ips=("127.0.0.1",), expired=case == "expired")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a PEM file\n")
    tls = {
        "no_cert": f'key = "{key}"',
        "missing_file": tls_keys(tmp_path / "absent.crt", key),
        "not_pem": tls_keys(junk, key),
        "expired": tls_keys(cert, key),
        "bad_key": tls_keys(cert, junk),
        "other_key": tls_keys(cert, ca.issue("someone-else", ips=("127.0.0.1",))[1]),
        "bad_ca": tls_keys(cert, key, junk),
    }[case]
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, tls))
    assert f": {key_at_fault}: " in str(err.value) and why in str(err.value), str(err.value)


def test_tls_files_are_not_needed_without_tls(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, 'cert = "/nonexistent.crt"', listen='"tcp:127.0.0.1:5060"'))
    assert cfg.tls.cert == "/nonexistent.crt"


def test_a_tls_carrier_needs_a_readable_ca_but_no_identity(tmp_path: Path, ca: TestCA) -> None:
    carriers = '[[carriers]]\nuri = "sips:127.0.0.2"\n'
    load(write(tmp_path, f'ca = "{ca.path}"', listen='"tcp:127.0.0.1:5060"', carriers=carriers))
    with pytest.raises(ConfigError, match="tls.cert: required"):  # mutual TLS needs the edge's identity
        load(write(tmp_path, f'ca = "{ca.path}"\nclient_cert_carriers = true', listen='"tcp:127.0.0.1:5060"',
                   carriers=carriers))


def test_listen_names_the_tls_transport_in_its_error() -> None:
    with pytest.raises(ConfigError, match="tls:HOST:PORT"):
        parse_listen("sctp:127.0.0.1:5060")


def test_which_uris_go_over_tls() -> None:
    assert carrier_uses_tls("sips:gw.example.net") and carrier_uses_tls("sip:1.2.3.4:5061;transport=TLS")
    assert not carrier_uses_tls("sip:1.2.3.4;transport=tcp") and not carrier_uses_tls("sip:tls.example.net")
    assert transport_of(parse_uri("sips:gw.example.net")) == "tls"
    assert transport_of(parse_uri("sip:1.2.3.4;transport=TLS")) == "tls"
    assert transport_of(parse_uri("sip:1.2.3.4")) == "udp"
    assert default_port("tls") == 5061 and default_port("udp") == default_port("tcp") == 5060


def test_contexts_speak_tls_1_2_and_1_3_only(ca: TestCA) -> None:
    cert, key, _ = ca.issue("edge-ctx", ips=("127.0.0.1",))
    ctxs = TlsContexts(str(cert), str(key), str(ca.path))
    for ctx in (*ctxs.server.values(), ctxs.to_carrier, ctxs.to_pbx):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
        assert ctx.maximum_version is ssl.TLSVersion.TLSv1_3
    assert ctxs.for_listener("customer").verify_mode is ssl.CERT_NONE      # PBXs: digest
    assert ctxs.for_listener("carrier").verify_mode is ssl.CERT_OPTIONAL   # a presented cert is checked
    assert ctxs.toward("carrier").verify_mode is ssl.CERT_REQUIRED and ctxs.toward("carrier").check_hostname
    assert ctxs.toward("customer").verify_mode is ssl.CERT_NONE


def test_a_reload_with_unusable_files_keeps_the_running_contexts(tmp_path: Path, ca: TestCA) -> None:
    from edge.config import TlsConfig

    cert, key, _ = ca.issue("edge-reload", ips=("127.0.0.1",))
    ctxs = TlsContexts(str(cert), str(key), str(ca.path))
    before = (dict(ctxs.server), ctxs.to_carrier)
    other = ca.issue("edge-other", ips=("127.0.0.1",))[1]
    with pytest.raises(TlsSetupError) as err:
        ctxs.reload(TlsConfig(cert=str(cert), key=str(other), ca=str(ca.path)))
    assert err.value.key == "tls.key"
    assert (ctxs.server, ctxs.to_carrier) == before
    ctxs.reload(TlsConfig(cert=str(cert), key=str(key), ca=str(ca.path)))
    assert ctxs.to_carrier is not before[1]


def handshake_error(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> BaseException:
    """Run a handshake in memory; the client's exception."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if side is c:
                    return exc
            peer_in.write(out.read())
    raise AssertionError("the handshake succeeded")


@pytest.mark.parametrize("case,reason", [("wrong_host", "wrong_host"), ("expired", "expired"),
                                         ("untrusted", "untrusted")])
def test_failure_reasons(ca: TestCA, tmp_path: Path, case: str, reason: str) -> None:
    issuer = TestCA(tmp_path / "other") if case == "untrusted" else ca
    cert, key, _ = issuer.issue(f"peer-{case}", ips=("127.0.0.2",), expired=case == "expired")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert), str(key))
    client = TlsContexts(ca=str(ca.path)).to_carrier
    host = "127.0.0.3" if case == "wrong_host" else "127.0.0.2"
    assert failure_reason(handshake_error(client, server, host)) == reason
    assert failure_reason(TimeoutError()) == "timeout" and failure_reason(ConnectionResetError()) == "closed"


def test_uvloop_is_refused_for_tls_listeners(tmp_path: Path) -> None:
    """uvloop 0.23 loses server-side handshakes under a burst (bench_tls_register): refused at start."""
    import subprocess
    import sys

    ca = TestCA(tmp_path / "ca")
    cert, key, _ = ca.issue("edge", ips=("127.0.0.1",))
    config = tmp_path / "c.toml"
    config.write_text(f'[sip]\nlisten = ["tls:127.0.0.1:5061"]\n[tls]\ncert = "{cert}"\nkey = "{key}"\n'
                      f'[storage]\npath = "{tmp_path / "data"}"\n')
    run = subprocess.run([sys.executable, "-m", "edge.cli", "serve", "--config", str(config), "--loop", "uvloop"],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 2, run.stdout + run.stderr
    assert "--loop uvloop cannot serve tls: listeners" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "data").exists()   # refused before anything was written
