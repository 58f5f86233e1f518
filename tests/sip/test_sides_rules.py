"""Who is heard where (SPEC §2.1), on loopback: the customer side on 127.0.0.1, the carrier
side on 127.0.0.3, the trusted carrier 127.0.0.2. A trusted source is a carrier only on
the carrier side; the carrier side takes no PBX (no REGISTER, no untrusted INVITE); each
side answers from its own address."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from edgeproc import EdgeProcess, free_port
from rawsip import RawSip

from edge.sip import parse

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeProcess]:
    port = free_port()
    extra = f'[sides.carrier]\nlisten = ["udp:127.0.0.3:{port}"]\n'
    with EdgeProcess(tmp_path_factory.mktemp("sides"), sip_port=port, extra_config=extra,
                     trusted=["127.0.0.2/32"]) as proc:
        yield proc


def ask(edge: EdgeProcess, *, bind: str, to: str, method: str, ruri: str, user: str = "+33123456789",
        to_user: str = "+14155550100") -> tuple[int, str]:
    """Send one request from ``bind`` to the listener on ``to``: (final status, the address it came from)."""
    ua = RawSip(edge.sip_port, bind=bind, edge_host=to)
    try:
        ua.send(ua.request(method, ruri, from_user=user, to_user=to_user))
        while True:
            data, source = ua.sock.recvfrom(65535)
            reply = parse(data)
            if reply.status >= 200:
                return reply.status, source[0]
    finally:
        ua.close()


def test_a_trusted_source_on_the_customer_side_is_challenged_like_a_pbx(edge: EdgeProcess) -> None:
    status, source = ask(edge, bind="127.0.0.2", to="127.0.0.1", method="INVITE",
                         ruri=f"sip:+14155550100@127.0.0.1:{edge.sip_port}")
    assert (status, source) == (407, "127.0.0.1")


def test_a_trusted_source_on_the_carrier_side_is_an_incoming_call(edge: EdgeProcess) -> None:
    status, source = ask(edge, bind="127.0.0.2", to="127.0.0.3", method="INVITE",
                         ruri=f"sip:+14155550100@127.0.0.3:{edge.sip_port}")
    assert (status, source) == (404, "127.0.0.3")  # not challenged: routed as incoming, the number is unknown


def test_the_carrier_side_refuses_untrusted_invites_and_registrations(edge: EdgeProcess) -> None:
    status, _ = ask(edge, bind="127.0.0.4", to="127.0.0.3", method="INVITE",
                    ruri=f"sip:+442071234567@127.0.0.3:{edge.sip_port}")
    assert status == 403
    status, _ = ask(edge, bind="127.0.0.1", to="127.0.0.3", method="REGISTER", ruri="sip:sip.edge.test",
                    user="990500000001", to_user="990500000001")
    assert status == 403
    status, source = ask(edge, bind="127.0.0.2", to="127.0.0.3", method="OPTIONS",
                         ruri=f"sip:127.0.0.3:{edge.sip_port}")
    assert (status, source) == (200, "127.0.0.3")


def test_without_sides_a_trusted_source_is_a_carrier_as_before(tmp_path: Path) -> None:
    with EdgeProcess(tmp_path, trusted=["127.0.0.2/32"]) as proc:
        status, _ = ask(proc, bind="127.0.0.2", to="127.0.0.1", method="INVITE",
                        ruri=f"sip:+14155550100@127.0.0.1:{proc.sip_port}")
    assert status == 404
