"""SDP anchoring (edge/media/sdp.py) on SDP as pjsua2 and common PBXs send it.

``pjsua2-2.15.1-captured.sdp`` was captured from a real pjsua2 INVITE; the PBX
samples are written in the shape those products send (Asterisk chan_pjsip,
FreeSWITCH, Cisco CUBE), including hold variants and a WebRTC-style offer.
"""
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.media.sdp import SdpError, parse_sdp, parse_sdp_media, rewrite_sdp

DATA = Path(__file__).parent / "data" / "sdp"
SAMPLES = sorted(p.name for p in DATA.glob("*.sdp"))

EXPECTED = {
    # name: (host, port, rtcp_port, direction)
    "pjsua2-offer.sdp": ("192.168.1.20", 4000, 4001, "sendrecv"),
    # Captured from pjsua2 2.15.1 (the INVITE of Call.makeCall, null audio device).
    "pjsua2-2.15.1-captured.sdp": ("127.0.0.1", 4000, 4001, "sendrecv"),
    "asterisk-offer.sdp": ("10.20.30.40", 14872, None, "sendrecv"),
    "asterisk-hold.sdp": ("10.20.30.40", 14872, None, "sendonly"),
    "freeswitch-answer.sdp": ("203.0.113.7", 23456, 23457, "sendrecv"),
    "cisco-cube-offer.sdp": ("198.51.100.10", 17280, None, "sendrecv"),
    "rfc2543-hold.sdp": ("0.0.0.0", 49170, None, "sendrecv"),
    "webrtc-ice-video.sdp": ("100.64.0.9", 51000, 51001, "sendrecv"),
}


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_all_samples_have_expectations():
    assert set(SAMPLES) == set(EXPECTED)


@pytest.mark.parametrize("name", SAMPLES)
def test_parse(name):
    m = parse_sdp_media(load(name))
    assert (m.host, m.port, m.rtcp_port, m.direction) == EXPECTED[name]
    assert m.addrtype == "IP4"


@pytest.mark.parametrize("name", SAMPLES)
def test_rewrite_points_at_edge_and_keeps_the_rest(name):
    src = load(name)
    out = rewrite_sdp(src, "192.0.2.1", 30000, 30001)
    m = parse_sdp_media(out)
    hold = EXPECTED[name][0] == "0.0.0.0"
    assert m.host == ("0.0.0.0" if hold else "192.0.2.1")
    assert m.port == 30000
    assert m.rtcp_port in (None, 30001)
    assert m.direction == EXPECTED[name][3]
    # Line endings preserved.
    assert (b"\r\n" in out) == (b"\r\n" in src)
    # Codecs, fmtp, telephone-event (RFC 4733), ptime, direction: byte for byte.
    keep = [ln for ln in src.splitlines() if ln.startswith((b"a=rtpmap", b"a=fmtp", b"a=ptime",
                                                            b"a=sendonly", b"a=sendrecv", b"a=ssrc",
                                                            b"a=maxptime", b"b=", b"s=", b"t="))]
    out_lines = out.splitlines()
    for ln in keep:
        assert ln in out_lines, ln
    # No address of the party is left (topology hiding), except a hold address.
    party = EXPECTED[name][0].encode()
    if not hold:
        assert party not in out
    # The m=audio payload type list is unchanged.
    m_src = next(ln for ln in src.splitlines() if ln.startswith(b"m=audio"))
    m_out = next(ln for ln in out_lines if ln.startswith(b"m=audio"))
    assert m_src.split()[2:] == m_out.split()[2:]


@pytest.mark.parametrize("name", ["pjsua2-2.15.1-captured.sdp", "pjsua2-offer.sdp", "asterisk-offer.sdp",
                                  "freeswitch-answer.sdp", "cisco-cube-offer.sdp", "asterisk-hold.sdp"])
def test_round_trip(name):
    """Rewriting to the edge and back to the party's own values gives the original bytes."""
    src = load(name)
    m = parse_sdp_media(src)
    there = rewrite_sdp(src, "192.0.2.1", 30000, 30001 if m.rtcp_port else None)
    back = rewrite_sdp(there, m.host, m.port, m.rtcp_port)
    assert back == src


def test_origin_version_kept_address_replaced():
    out = rewrite_sdp(load("asterisk-hold.sdp"), "192.0.2.1", 30000, 30001)
    o = next(ln for ln in out.splitlines() if ln.startswith(b"o="))
    assert o == b"o=- 1695812345 1695812346 IN IP4 192.0.2.1"


def test_ice_removed_and_other_media_disabled():
    out = rewrite_sdp(load("webrtc-ice-video.sdp"), "192.0.2.1", 30000, 30001)
    assert b"a=candidate" not in out and b"a=ice-" not in out
    assert b"m=video 0 RTP/AVP 96" in out
    assert b"51002" not in out and b"51003" not in out
    assert b"a=rtcp:30001 IN IP4 192.0.2.1" in out
    assert b"a=group:BUNDLE 0 1" in out      # passes through untouched


def test_rtcp_attribute_added_when_not_rtp_plus_one():
    out = rewrite_sdp(load("asterisk-offer.sdp"), "192.0.2.1", 30000, 30011)
    assert parse_sdp_media(out).rtcp_port == 30011
    out = rewrite_sdp(load("asterisk-offer.sdp"), "192.0.2.1", 30000, 30001)
    assert b"a=rtcp" not in out


def test_rtcp_attribute_dropped_without_port():
    out = rewrite_sdp(load("pjsua2-offer.sdp"), "192.0.2.1", 30000, None)
    assert b"a=rtcp" not in out


def test_rejected_stream_keeps_port_zero():
    src = load("asterisk-offer.sdp").replace(b"m=audio 14872", b"m=audio 0")
    assert parse_sdp_media(src).port == 0
    assert b"m=audio 0 RTP/AVP" in rewrite_sdp(src, "192.0.2.1", 30000, 30001)


@pytest.mark.parametrize("bad", [
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\nm=video 5000 RTP/AVP 96\r\n",
    b"v=0\r\ns=-\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n",
    b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio xx RTP/AVP 0\r\n",
    b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 99999 RTP/AVP 0\r\n",
    b"v=0\r\nc=garbage\r\nm=audio 5000 RTP/AVP 0\r\n",
    b"",
])
def test_bad_sdp_raises_sdperror(bad):
    with pytest.raises(SdpError):
        parse_sdp_media(bad)
    with pytest.raises(SdpError):
        rewrite_sdp(bad, "192.0.2.1", 30000, 30001)


def test_media_level_connection_wins():
    sdp = (b"v=0\r\no=- 1 1 IN IP4 1.1.1.1\r\ns=-\r\nc=IN IP4 1.1.1.1\r\nt=0 0\r\n"
           b"m=audio 5000 RTP/AVP 0\r\nc=IN IP4 2.2.2.2\r\na=inactive\r\n")
    m = parse_sdp_media(sdp)
    assert (m.host, m.port, m.direction) == ("2.2.2.2", 5000, "inactive")


_attr = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(attrs=st.lists(_attr.filter(lambda s: not s.startswith(("rtcp:", "candidate:", "ice-"))),
                      max_size=8),
       port=st.integers(1, 65534), crlf=st.booleans())
def test_unknown_attributes_pass_through(attrs, port, crlf):
    eol = b"\r\n" if crlf else b"\n"
    lines = [b"v=0", b"o=- 7 7 IN IP4 10.1.1.1", b"s=-", b"c=IN IP4 10.1.1.1", b"t=0 0",
             b"m=audio %d RTP/AVP 0 101" % port] + [b"a=" + a.encode() for a in attrs]
    sdp = eol.join(lines) + eol
    out = rewrite_sdp(sdp, "192.0.2.1", 30000, 30001)
    assert [ln for ln in out.split(eol) if ln.startswith(b"a=")] == [b"a=" + a.encode() for a in attrs]
    m = parse_sdp_media(out)
    assert (m.host, m.port) == ("192.0.2.1", 30000)
    assert rewrite_sdp(out, "10.1.1.1", port, None) == sdp


@pytest.mark.parametrize("name", SAMPLES)
def test_a_parsed_body_reads_and_rewrites_as_the_body_does(name):
    """parse_sdp once, then rewrite from it: the same result as rewriting the body itself."""
    body = load(name)
    parsed = parse_sdp(body)
    assert parsed.media == parse_sdp_media(body)
    for args in (("198.51.100.7", 30000, 30001), ("2001:db8::10", 30000, 30005)):
        assert rewrite_sdp(parsed, *args) == rewrite_sdp(body, *args)
        assert rewrite_sdp(parsed, *args, secure=True, crypto=(b"a=crypto:1 X inline:k",)) == \
            rewrite_sdp(body, *args, secure=True, crypto=(b"a=crypto:1 X inline:k",))


def test_parse_sdp_refuses_what_parse_sdp_media_refuses():
    for bad in (b"v=0\r\nc=IN IP4 1.2.3.4\r\n", b"v=0\r\nm=audio 4000 RTP/AVP 0\r\n",
                b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio x RTP/AVP 0\r\n"):
        with pytest.raises(SdpError):
            parse_sdp_media(bad)
        with pytest.raises(SdpError):
            parse_sdp(bad)


def test_an_offer_and_an_answer_are_each_split_and_read_once(monkeypatch):
    """CallMedia.relay_sdp reads each body once for the SRTP plan, the relay and the rewrite
    (it was three times: issue 10)."""
    from edge._rtp import RelayEngine
    from edge.calls.media import CallMedia
    from edge.calls.model import Call, Direction, Side
    from edge.media import MediaService
    from edge.media import sdp as sdp_module
    from tests.unit.test_rtp_engine import HOST, free_window

    splits: list[bytes] = []
    real_split = sdp_module._split

    def counting_split(body: bytes):
        splits.append(body)
        return real_split(body)

    monkeypatch.setattr(sdp_module, "_split", counting_split)
    engine = RelayEngine(HOST, *free_window(), quiet_period=0.0)
    try:
        media = CallMedia(MediaService(engine), 30.0)
        call = Call("c1", Direction.OUTGOING, None, caller="1", callee="2")  # type: ignore[arg-type]
        offer, answer = load("pjsua2-offer.sdp"), load("freeswitch-answer.sdp")
        out = media.relay_sdp(call, Side.CUSTOMER, offer, "offer")
        assert splits == [offer] and b"m=audio %d " % call.relay.leg_b.rtp_port in out
        media.relay_sdp(call, Side.CARRIER, answer, "answer")
        assert splits == [offer, answer]
        assert call.relay.stats().b.rtp.remote == ("203.0.113.7", 23456)
    finally:
        engine.stop()
