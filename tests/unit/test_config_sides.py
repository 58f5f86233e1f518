"""``[sides.customer]`` / ``[sides.carrier]`` (SPEC §2.1): defaults, validation, listeners."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import ConfigError, load, resolve_sides
from edge.sip.core import listeners_by_side

SPEC_EXAMPLE = """
[sides.customer]
listen = ["udp:192.0.2.10:5060", "tcp:192.0.2.10:5060"]
advertise = "198.51.100.7"
media = "192.0.2.10"
media_advertise = "198.51.100.7"
srtp = "optional"
[sides.carrier]
listen = ["udp:10.0.0.10:5060"]
srtp = "off"
"""


def load_text(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load(path)


def test_without_sides_both_sides_are_the_old_single_interface(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[sip]\nlisten = ["udp:127.0.0.1:5070"]\n[media]\naddress = "127.0.0.1"\n')
    sides = resolve_sides(cfg)
    for side in sides.values():
        assert side.listeners == (("udp", "127.0.0.1", 5070),)
        assert side.advertise == "" and side.media == side.media_advertise == "127.0.0.1"
    assert listeners_by_side(cfg) == {("udp", "127.0.0.1", 5070): ""}  # bound once, for both


def test_the_spec_example_resolves_with_its_defaults(tmp_path: Path) -> None:
    sides = resolve_sides(load_text(tmp_path, SPEC_EXAMPLE))
    customer, carrier = sides["customer"], sides["carrier"]
    assert customer.advertise == "198.51.100.7" and customer.media_advertise == "198.51.100.7"
    assert carrier.listeners == (("udp", "10.0.0.10", 5060),)
    assert carrier.advertise == "" and carrier.media == carrier.media_advertise == "10.0.0.10"  # the listen address


def test_a_side_left_out_keeps_the_sip_listeners_and_media_address(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[sip]\nlisten = ["udp:127.0.0.1:5060"]\n[media]\naddress = "127.0.0.5"\n'
                              '[sides.carrier]\nlisten = ["udp:[::1]:5090", "tcp:[::1]:5090"]\n')
    sides = resolve_sides(cfg)
    assert sides["customer"].listeners == (("udp", "127.0.0.1", 5060),) and sides["customer"].media == "127.0.0.5"
    assert sides["carrier"].media == "::1"
    assert listeners_by_side(cfg) == {("udp", "127.0.0.1", 5060): "customer", ("udp", "::1", 5090): "carrier",
                                      ("tcp", "::1", 5090): "carrier"}


@pytest.mark.parametrize("text, words", [
    ('[sides.customer]\nsrtp = "mandatory"\n', ["sides.customer.srtp", "not supported yet"]),
    ('[sides.customer]\nsrtp = "always"\n', ["sides.customer.srtp"]),
    ('[sides.carrier]\nlisten = ["udp:::1:5060"]\n', ["sides.carrier.listen[0]", "brackets"]),
    ('[sides.carrier]\nlisten = ["udp:0.0.0.0:5060"]\n', ["sides.carrier.listen[0]", "advertise"]),
    ('[sides.carrier]\nmedia = "0.0.0.0"\n', ["media_advertise"]),
    ('[sides.carrier]\nmedia = "carrier.example"\n', ["sides.carrier.media", "not an IP address"]),
    ('[sides.customer]\nmedia = "192.0.2.1"\nmedia_advertise = "2001:db8::1"\n', ["sides.customer.media_advertise",
                                                                                 "IPv6", "IPv4"]),
    ('[sides.customer]\nadvertise = "bad host!"\n', ["sides.customer.advertise"]),
    ('[sides.customer]\nlisten = "udp:127.0.0.1:5060"\n', ["sides.customer.listen"]),
    ('[sides.dmz]\nlisten = []\n', ["sides.dmz", "unknown key"]),
    ('[sides.customer]\nadvertize = "1.2.3.4"\n', ["sides.customer.advertize", "unknown key"]),
])
def test_a_broken_side_is_refused_naming_the_key(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    for word in words:
        assert word in str(err.value)


def test_a_wildcard_listener_with_an_advertised_address_is_accepted(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[sides.customer]\nlisten = ["udp:0.0.0.0:5060"]\nadvertise = "sbc.example.net"\n'
                              'media = "0.0.0.0"\nmedia_advertise = "198.51.100.7"\n')
    assert resolve_sides(cfg)["customer"].advertise == "sbc.example.net"
