"""SDES negotiation per side mode (edge/media/sdes.py) through CallMedia on a real relay engine."""
from __future__ import annotations

import base64
import os

import pytest

from edge._rtp import RelayEngine
from edge.calls.media import CallMedia, MediaRefused
from edge.calls.model import Call, Direction, EndReason, Side
from edge.media import MediaService
from edge.media.sdp import crypto_line, parse_crypto, parse_sdp_media, rewrite_sdp
from tests.unit.test_rtp_engine import HOST, free_window

CM80 = "AES_CM_128_HMAC_SHA1_80"
GCM = "AEAD_AES_128_GCM"
PBX_KEY = os.urandom(30)
CARRIER_KEY = os.urandom(28)


def sdp(profile: str = "RTP/AVP", crypto: tuple[bytes, ...] = (), port: int = 4000) -> bytes:
    lines = [b"v=0", b"o=- 1 1 IN IP4 127.0.0.1", b"s=-", b"c=IN IP4 127.0.0.1", b"t=0 0",
             b"m=audio %d %s 0 101" % (port, profile.encode()), b"a=rtpmap:0 PCMU/8000", *crypto, b"a=sendrecv"]
    return b"\r\n".join(lines) + b"\r\n"


PBX_LINE = crypto_line(1, CM80, PBX_KEY)


@pytest.fixture
def engine():
    e = RelayEngine(HOST, *free_window(), quiet_period=0.0)
    yield e
    e.stop()


def call_media(engine: RelayEngine, customer: str, carrier: str) -> tuple[CallMedia, Call]:
    media = CallMedia(MediaService(engine), 30.0, {"customer": customer, "carrier": carrier})  # type: ignore[dict-item]
    call = Call("c1", Direction.OUTGOING, None, caller="1", callee="2")  # type: ignore[arg-type]
    return media, call


def crypto_of(body: bytes) -> list:
    return [parse_crypto(ln) for ln in body.split(b"\r\n") if ln.startswith(b"a=crypto:")]


def test_srtp_pbx_to_plain_carrier_is_bridged(engine):
    media, call = call_media(engine, "mandatory", "off")
    out = media.relay_sdp(call, Side.CUSTOMER, sdp("RTP/SAVP", (PBX_LINE,)), "offer")
    assert b"m=audio" in out and b"RTP/AVP 0 101" in out and b"a=crypto" not in out
    assert base64.b64encode(PBX_KEY) not in out                     # the PBX's key stays at the edge
    answer = media.relay_sdp(call, Side.CARRIER, sdp(), "answer")
    assert b"RTP/SAVP 0 101" in answer
    (line,) = crypto_of(answer)
    assert line.tag == 1 and line.suite == CM80 and line.key != PBX_KEY
    assert call.relay.srtp("a") == (True, True) and call.relay.srtp("b") == (False, False)
    assert call.srtp == {"customer": CM80, "carrier": "rtp"}
    assert "key" not in repr(line).replace("key=<30 bytes>", "")


def test_plain_pbx_to_mandatory_carrier_gets_the_edges_keys(engine):
    media, call = call_media(engine, "optional", "mandatory")
    out = media.relay_sdp(call, Side.CUSTOMER, sdp(), "offer")
    assert b"RTP/SAVP 0 101" in out
    offered = crypto_of(out)
    assert [(c.tag, c.suite) for c in offered] == [(1, CM80), (2, GCM)]
    answer = media.relay_sdp(call, Side.CARRIER, sdp("RTP/SAVP", (crypto_line(2, GCM, CARRIER_KEY),)), "answer")
    assert b"RTP/AVP 0 101" in answer and b"a=crypto" not in answer
    assert call.relay.srtp("b") == (True, True) and call.relay.srtp("a") == (False, False)
    assert call.srtp == {"customer": "rtp", "carrier": GCM}
    again = media.relay_sdp(call, Side.CUSTOMER, sdp(), "offer")      # a re-INVITE: the same edge keys
    assert [c.key for c in crypto_of(again)] == [c.key for c in offered]


@pytest.mark.parametrize(("customer", "body", "words"), [
    ("off", sdp("RTP/SAVP", (PBX_LINE,)), 'srtp = "off"'),
    ("mandatory", sdp(), 'srtp = "mandatory"'),
    ("optional", sdp("RTP/SAVP", (b"a=crypto:1 F8_128_HMAC_SHA1_80 inline:" + base64.b64encode(PBX_KEY),)),
     "no usable a=crypto"),
    ("mandatory", sdp("RTP/SAVP", (b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:c2hvcnQ=",)), "no usable"),
    ("optional", sdp("RTP/SAVP", (PBX_LINE + b" UNENCRYPTED_SRTP",)), "no usable"),
])
def test_offers_that_break_the_mode_get_488(engine, customer, body, words):
    media, call = call_media(engine, customer, "off")
    with pytest.raises(MediaRefused) as err:
        media.relay_sdp(call, Side.CUSTOMER, body, "offer")
    assert err.value.status == 488 and err.value.reason is EndReason.SRTP_POLICY and words in err.value.text
    assert base64.b64encode(PBX_KEY).decode() not in err.value.text


def test_off_side_takes_best_effort_sdes_as_plain_rtp(engine):
    media, call = call_media(engine, "off", "off")
    out = media.relay_sdp(call, Side.CUSTOMER, sdp("RTP/AVP", (PBX_LINE,)), "offer")
    assert b"a=crypto" not in out
    answer = media.relay_sdp(call, Side.CARRIER, sdp(), "answer")
    assert b"a=crypto" not in answer and call.relay.srtp("a") == (False, False)


def test_optional_side_takes_best_effort_sdes_as_srtp(engine):
    media, call = call_media(engine, "optional", "off")
    media.relay_sdp(call, Side.CUSTOMER, sdp("RTP/AVP", (PBX_LINE,)), "offer")
    answer = media.relay_sdp(call, Side.CARRIER, sdp(), "answer")
    assert b"RTP/AVP 0 101" in answer and len(crypto_of(answer)) == 1
    assert call.relay.srtp("a") == (True, True)


def test_optional_carrier_is_offered_best_effort_and_may_answer_plain(engine):
    media, call = call_media(engine, "mandatory", "optional")
    out = media.relay_sdp(call, Side.CUSTOMER, sdp("RTP/SAVP", (PBX_LINE,)), "offer")
    assert b"RTP/AVP 0 101" in out and len(crypto_of(out)) == 2
    media.relay_sdp(call, Side.CARRIER, sdp(), "answer")
    assert call.srtp == {"customer": CM80, "carrier": "rtp"}


def test_a_mandatory_carrier_answering_plain_is_refused(engine):
    media, call = call_media(engine, "optional", "mandatory")
    media.relay_sdp(call, Side.CUSTOMER, sdp(), "offer")
    with pytest.raises(MediaRefused) as err:
        media.relay_sdp(call, Side.CARRIER, sdp(), "answer")
    assert err.value.status == 488


def test_an_answer_with_a_tag_the_edge_did_not_offer_is_refused(engine):
    media, call = call_media(engine, "optional", "mandatory")
    media.relay_sdp(call, Side.CUSTOMER, sdp(), "offer")
    with pytest.raises(MediaRefused):
        media.relay_sdp(call, Side.CARRIER, sdp("RTP/SAVP", (crypto_line(1, GCM, CARRIER_KEY),)), "answer")


def test_kind_is_inferred_from_the_pending_offer(engine):
    media, call = call_media(engine, "mandatory", "mandatory")
    media.relay_sdp(call, Side.CUSTOMER, sdp("RTP/SAVP", (PBX_LINE,)))
    answer = media.relay_sdp(call, Side.CARRIER, sdp("RTP/SAVP", (crypto_line(1, CM80, os.urandom(30)),)))
    assert len(crypto_of(answer)) == 1                              # an answer: one line, the PBX's tag
    reoffer = media.relay_sdp(call, Side.CARRIER, sdp("RTP/SAVP", (crypto_line(3, CM80, os.urandom(30)),)))
    assert len(crypto_of(reoffer)) == 2                             # the carrier's re-offer: the edge offers


def test_echo_answers_with_the_edges_key_on_the_customer_leg(engine):
    media, call = call_media(engine, "optional", "off")
    answer = media.echo(call, sdp("RTP/SAVP", (PBX_LINE,)))
    (line,) = crypto_of(answer)
    assert b"RTP/SAVP" in answer and line.key != PBX_KEY and call.relay.srtp("a") == (True, True)


def test_rewrite_drops_every_senders_crypto_line():
    body = sdp("RTP/SAVP", (PBX_LINE,)) + b"m=video 5000 RTP/SAVP 96\r\n" + PBX_LINE + b"\r\n"
    out = rewrite_sdp(body, "127.0.0.9", 6000)
    assert b"a=crypto" not in out and b"m=video 0" in out


def test_parse_reads_profile_and_usable_lines_only():
    broken = b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:!!!"
    m = parse_sdp_media(sdp("RTP/SAVP", (broken, PBX_LINE.replace(b":1", b":2", 1))))
    assert m.secure and m.profile == "RTP/SAVP" and m.crypto_lines == 2
    assert [(c.tag, c.suite, c.key) for c in m.crypto] == [(2, CM80, PBX_KEY)]
    assert parse_crypto(PBX_LINE + b"|2^31") is not None              # a lifetime is fine
    assert parse_crypto(PBX_LINE + b"|1:4") is None                   # an MKI is not
    unpadded = crypto_line(1, GCM, CARRIER_KEY).rstrip(b"=")              # as rtpengine writes them
    assert unpadded.endswith(b"=") is False and parse_crypto(unpadded).key == CARRIER_KEY
    assert parse_crypto(PBX_LINE + b"|2^31|1:4") is None


def test_a_leg_that_went_plain_gets_a_new_key_when_srtp_comes_back(engine):
    """A new libsrtp session restarts at index 0: the same key again would repeat keystream."""
    media, call = call_media(engine, "optional", "off")
    media.relay_sdp(call, Side.CUSTOMER, sdp("RTP/SAVP", (PBX_LINE,)), "offer")
    first = crypto_of(media.relay_sdp(call, Side.CARRIER, sdp(), "answer"))[0].key
    media.relay_sdp(call, Side.CUSTOMER, sdp(), "offer")                  # re-INVITE: plain now
    media.relay_sdp(call, Side.CARRIER, sdp(), "answer")
    assert call.relay.srtp("a") == (False, False)
    media.relay_sdp(call, Side.CUSTOMER, sdp("RTP/SAVP", (PBX_LINE,)), "offer")
    again = crypto_of(media.relay_sdp(call, Side.CARRIER, sdp(), "answer"))[0].key
    assert again != first and call.relay.srtp("a") == (True, True)
