"""``SipMessage.validate()`` (the entry check, Kamailio ``sanity``), control octets in header
values and named reasons -- each run against the compiled parser and the Python oracle."""

from __future__ import annotations

import os

import pytest
from test_sipparse_common import EXPECTED, IMPLS, ISSUES, VALID, outcome

from edge.sip import errors as E


@pytest.fixture(params=sorted(IMPLS), ids=sorted(IMPLS))
def P(request):
    return IMPLS[request.param]


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8", "surrogateescape")


def message(method: str = "INVITE", *, ruri: str = "sip:+442071234567@sip.edge.test",
            via: str = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKv1;rport", maxf: str = "70",
            from_: str = "<sip:pbx@sip.edge.test>;tag=f1", to: str = "<sip:+442071234567@sip.edge.test>",
            call_id: str = "c1@192.0.2.10", extra: str = "", contact: str = "<sip:pbx@192.0.2.10:5060>") -> bytes:
    return crlf(f"{method} {ruri} SIP/2.0\nVia: {via}\nMax-Forwards: {maxf}\nFrom: {from_}\nTo: {to}\n"
                f"Call-ID: {call_id}\nCSeq: 1 {method}\nContact: {contact}\n{extra}Content-Length: 0\n\n")


def error_of(P, data: bytes) -> E.SipParseError | None:
    try:
        P.parse(data).validate()
    except E.SipParseError as err:
        return err
    return None


# -- the regression corpus --------------------------------------------------------------


def test_every_issue_file_has_an_expectation_and_back():
    assert {p.stem for p in ISSUES} == set(EXPECTED)
    assert len(ISSUES) >= 16


@pytest.mark.parametrize("path", ISSUES, ids=lambda p: p.stem)
def test_issue_corpus(P, path):
    data = path.read_bytes()
    exp = EXPECTED[path.stem]
    err = error_of(P, data)
    if "error" not in exp:
        assert err is None
        return
    assert err is not None, "accepted"
    assert type(err).__name__ == exp["error"]
    assert err.reason == exp["reason"]
    assert data[err.offset:].startswith(exp["at"].encode("latin-1")), (err.offset, data[err.offset:err.offset + 20])
    assert err.status == (exp["udp"] if exp["udp"] != "drop" else 400)
    # what the boundary answers: exactly the expected status, or nothing
    reply = P.build_stateless_error(data, err)
    if exp["udp"] == "drop":
        assert reply is None
    else:
        assert reply is not None
        assert reply.startswith(b"SIP/2.0 %d %s\r\n" % (exp["udp"], exp["reason"].encode()))
        if not exp.get("answer_parses", True):  # it repeats the broken header it answers
            assert exp["at"].encode("latin-1") in reply
            return
        answer = P.parse(reply)
        assert answer.call_id == data.split(b"Call-ID: ")[1].split(b"\r\n")[0].decode()
        assert answer.to_tag


@pytest.mark.parametrize("path", ISSUES, ids=lambda p: p.stem)
def test_issue_corpus_compiled_matches_oracle(path):
    data = path.read_bytes()
    assert outcome(IMPLS["c"], data) == outcome(IMPLS["py"], data)


# RFC 4475 valid messages that the edge still refuses at its entry, and why
REFUSED_VALID = {
    "inv2543": (E.SipBadHeader, "Missing From tag"),           # RFC 2543 UA: no From tag (RFC 3261 §8.1.1.3)
    "unkscm": (E.SipUnsupportedUriScheme, "Unsupported Request-URI scheme"),  # 416, RFC 3261 §8.2.2.1
    "novelsc": (E.SipUnsupportedUriScheme, "Unsupported Request-URI scheme"),
}


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_corpus_passes_validate(P, path):
    err = error_of(P, path.read_bytes())
    if path.stem in REFUSED_VALID:
        cls, reason = REFUSED_VALID[path.stem]
        assert type(err) is cls and err.reason == reason
    else:
        assert err is None, err


# -- validate(): what it checks ------------------------------------------------------------


@pytest.mark.parametrize("kw,reason", [
    (dict(via="SIP/2.0/UDP 192.0.2.10:0;branch=z9hG4bKv1"), "Bad Via port"),
    (dict(via="SIP/2.0/UDP 192.0.2.10:65536;branch=z9hG4bKv1"), "Bad Via port"),
    (dict(via="SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKv1;rport=0"), "Bad Via rport"),
    (dict(via="SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKv1;rport=65536"), "Bad Via rport"),
    (dict(via="SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKv1;received=300.1.1.1"), "Bad Via received"),
    (dict(via="SIP/2.0/UDP 192.0.2.10;branch"), "Bad Via branch"),
    (dict(via="SIP/2.0/UDP [2001:db8::1;branch=z9hG4bKv1"), "Bad Via host"),
    (dict(via="SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKv1, SIP/2.0/UDP h:99999;branch=z9hG4bKv0"), "Bad Via port"),
    (dict(via="SIP/3.0/UDP 192.0.2.10;branch=z9hG4bKv1"), "Bad Via protocol"),
    (dict(from_="<sip:pbx@sip.edge.test>"), "Missing From tag"),
    (dict(from_="<sip:pbx@sip.edge.test>;tag"), "Missing From tag"),
    (dict(from_="*"), "Bad From"),
    (dict(from_="*;tag=1"), "Bad From scheme"),
    (dict(from_="<sip:pbx@host:99999>;tag=1"), "Bad From port"),
    (dict(to="<sip:x@h>;tag"), "Bad To tag"),
    (dict(to="<sip:x@h:0>"), "Bad To port"),
    (dict(call_id="two words"), "Bad Call-ID"),
    (dict(ruri="sip:+44@h:70000"), "Bad Request-URI port"),
    (dict(ruri="sip:+44@2001:db8::1"), "Bad Request-URI host"),
    (dict(ruri="urn:service:sos"), "Unsupported Request-URI scheme"),
    (dict(contact="<sip:pbx@2001:db8::1>"), "Bad Contact host"),
    (dict(contact="<sip:pbx@h>;expires=-1"), "Bad Contact expires"),
    (dict(contact="<sip:pbx@h>;expires"), "Bad Contact expires"),
    (dict(contact="*"), "Bad Contact"),
    (dict(extra="Expires: soon\n"), "Bad Expires"),
    (dict(maxf="0"), "Too Many Hops (Max-Forwards 0)"),
])
def test_validate_refuses(P, kw, reason):
    data = message(**kw)
    P.parse(data)  # parse() itself accepts all of these: they are validate()'s job
    err = error_of(P, data)
    assert err is not None and err.reason == reason
    line = data[data.rfind(b"\n", 0, err.offset) + 1:]  # the offset is on the line at fault
    assert line.startswith(_line_of(reason)), line[:40]
    assert "^" in str(err)  # shown with the line and a caret


def _line_of(reason: str) -> bytes:
    if reason.startswith("Too Many Hops"):
        return b"Max-Forwards:"
    if "Request-URI" in reason:
        return b"INVITE "
    return reason.split()[1].encode() + b":"


@pytest.mark.parametrize("kw", [
    dict(via="SIP/2.0/TCP [2001:db8::9]:5061;branch=z9hG4bKv1;received=2001:db8::9;rport=5061"),
    dict(via="SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKv1;received=[2001:db8::9]"),
    dict(via="SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKv1;received=::ffff:192.0.2.1"),
    dict(via="SIP/2.0/UDP 192.0.2.10:65535;branch=z9hG4bKv1;rport=1"),
    dict(via="SIP/2.0/UDP 192.0.2.10"),  # RFC 2543: no branch
    dict(ruri="tel:+442071234567"),
    dict(ruri="sips:+44@h:5061"),
    dict(contact="<sip:pbx@[2001:db8::1]:5060>;expires=3600;q=0.5"),
    dict(contact='"A \\"B\\"" <sip:pbx@h>, <tel:+442071234567>'),
    dict(from_='"a\\\x00b" <sip:pbx@h>;tag=x'),  # a control octet as a quoted-pair is legal
    dict(call_id="intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"),
])
def test_validate_accepts(P, kw):
    err = error_of(P, message(**kw))
    assert err is None, err


def test_max_forwards_zero_only_refused_on_invite(P):
    for method in ("OPTIONS", "REGISTER", "BYE", "ACK", "CANCEL"):
        assert error_of(P, message(method, maxf="0", contact="<sip:pbx@h>")) is None, method
    err = error_of(P, message("INVITE", maxf="0"))
    assert isinstance(err, E.SipTooManyHops) and err.status == 483


def test_unsupported_scheme_is_416(P):
    err = error_of(P, message(ruri="mailto:a@example.com"))
    assert isinstance(err, E.SipUnsupportedUriScheme) and err.status == 416
    assert P.build_stateless_error(message(ruri="mailto:a@example.com"), err).startswith(
        b"SIP/2.0 416 Unsupported Request-URI scheme\r\n")


def test_contact_star(P):
    reg = message("REGISTER", ruri="sip:sip.edge.test", contact="*", extra="Expires: 0\n")
    assert error_of(P, reg) is None
    err = error_of(P, message("REGISTER", ruri="sip:sip.edge.test", contact="*, <sip:a@h>"))
    assert err.reason == "Bad Contact: * must be alone"
    assert error_of(P, message("REGISTER", ruri="sip:sip.edge.test", contact="<sip:a@h>, *")).reason == \
        "Bad Contact: * must be alone"


def test_responses_are_validated_for_what_the_edge_reads_of_them(P):
    resp = crlf("SIP/2.0 200 OK\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx;rport=5060;received=192.0.2.1\n"
                "From: <sip:a@h>\nTo: <sip:b@h>;tag=t\nCall-ID: c\nCSeq: 1 INVITE\nContact: <sip:b@h:5060>\n"
                "Content-Length: 0\n\n")
    assert error_of(P, resp) is None
    # the Contact of a 2xx to INVITE becomes the dialog's remote target: checked
    assert error_of(P, resp.replace(b"h:5060", b"h:99999")).reason == "Bad Contact port"
    assert error_of(P, resp.replace(b"Call-ID: c", b"Call-ID: c d")).reason == "Bad Call-ID"
    # what the edge never decodes of a response is not checked: its Via (only the branch is
    # read), the Contact of a provisional or of an answer to BYE
    assert error_of(P, resp.replace(b"rport=5060", b"rport=x")) is None
    assert error_of(P, resp.replace(b"200 OK", b"180 Ringing").replace(b"h:5060", b"h:99999")) is None
    assert error_of(P, resp.replace(b"1 INVITE", b"1 BYE").replace(b"h:5060", b"h:99999")) is None


def test_validate_caches_the_views(P):
    m = P.parse(message(extra="Expires: 60\n"))
    m.validate()
    assert m.top_via is m.vias[0] and m.top_via.branch == m.branch == "z9hG4bKv1"
    views = (m.from_, m.to, m.contacts, m.uri, m.expires)
    m.validate()  # a second call is free and keeps the same objects
    assert (m.from_, m.to, m.contacts, m.uri, m.expires) == views
    assert m.from_ is views[0] and m.contacts is views[2]
    assert m.expires == 60 and m.uri.user == "+442071234567"


def test_a_failed_validate_fails_again(P):
    m = P.parse(message(maxf="0"))
    for _ in range(2):
        with pytest.raises(E.SipTooManyHops):
            m.validate()


def test_the_error_names_the_header_of_every_value_of_a_folded_via(P):
    data = message(via="SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKv1,\n SIP/2.0/UDP h;rport=abc")
    err = error_of(P, data)
    assert err.reason == "Bad Via rport" and data[err.offset:].startswith(b"rport=abc")


# -- control octets (parse time) -----------------------------------------------------------


@pytest.mark.parametrize("line,reason", [
    ("Call-ID: a\x00b", "Bad Call-ID value"),
    ("Subject: a\x01b", "Bad Subject value"),
    ("X-Custom: a\x7fb", "Bad X-Custom value"),
    ("X-Custom: a\x0bb", "Bad X-Custom value"),
    ("X-Custom: a\x1fb", "Bad X-Custom value"),
    ("s: a\x00b", "Bad Subject value"),
    ("X-" + "N" * 70 + ": \x00", "Bad Header value"),
    ("X-Custom: one\n two\x00", "Bad X-Custom value"),   # on a continuation line
    ('X-Custom: "a \\\x00 b" \x00', "Bad X-Custom value"),  # quoted-pair ok, then a bare NUL
    ('X-Custom: a\\\x00', "Bad X-Custom value"),  # a backslash outside quotes escapes nothing
])
def test_control_octets_in_values_are_refused(P, line, reason):
    data = crlf("OPTIONS sip:h SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bKc\nFrom: <sip:a@h>;tag=1\n"
                f"To: <sip:b@h>\nCall-ID: c\nCSeq: 1 OPTIONS\n{line}\nContent-Length: 0\n\n")
    if line.startswith("Call-ID"):
        data = data.replace(b"Call-ID: c\r\n", b"", 1)
    with pytest.raises(E.SipBadHeader) as ei:
        P.parse(data)
    assert ei.value.reason == reason
    assert data[ei.value.offset] in b"\x00\x01\x7f\x0b\x1f"


@pytest.mark.parametrize("line", [
    "X-Custom: tab\there",
    'X-Custom: "quoted \\\x07 pair"',
    'X-Custom: "folded quoted string,\n \\\x00 escaped on the next line"',
    "X-Custom: caf\u00e9 \u5927",
])
def test_legal_octets_in_values(P, line):
    data = crlf("OPTIONS sip:h SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bKc\nFrom: <sip:a@h>;tag=1\n"
                f"To: <sip:b@h>\nCall-ID: c\nCSeq: 1 OPTIONS\n{line}\nContent-Length: 0\n\n")
    P.parse(data).validate()


def test_control_octets_in_the_body_are_fine(P):
    data = crlf("MESSAGE sip:h SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bKc\nFrom: <sip:a@h>;tag=1\n"
                "To: <sip:b@h>\nCall-ID: c\nCSeq: 1 MESSAGE\nContent-Length: 3\n\n") + b"\x00\x01\x7f"
    assert P.parse(data).body == b"\x00\x01\x7f"


def test_control_octet_in_a_stream_head(P):
    data = message("OPTIONS", extra="Subject: a\x00b\n")
    with pytest.raises(E.SipBadHeader) as ei:
        P.frame_length(data)
    assert ei.value.reason == "Bad Subject value"


# -- lines over the limit name their header -----------------------------------------------


@pytest.mark.parametrize("line,reason", [
    ("X-Pad: " + "a" * 9000, "X-Pad Header Too Long"),
    ("v : SIP/2.0/UDP h;x=" + "a" * 9000, "Via Header Too Long"),
    ("X-Pad: a\n " + "a" * 9000, "Line Too Long"),     # a continuation line
    (": " + "a" * 9000, "Line Too Long"),              # no name
])
def test_long_line_reasons(P, line, reason):
    head = crlf("OPTIONS sip:h SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bKc\nFrom: <sip:a@h>;tag=1\n"
                f"To: <sip:b@h>\nCall-ID: c\nCSeq: 1 OPTIONS\n{line}\n")
    for data in (head + b"Content-Length: 0\r\n\r\n", head[:-2]):  # complete, and cut inside the line
        with pytest.raises(E.SipLineTooLong) as ei:
            P.parse(data)
        assert ei.value.reason == reason
        with pytest.raises(E.SipLineTooLong) as ei:
            P.frame_length(data)
        assert ei.value.reason == reason
    with pytest.raises(E.SipLineTooLong) as ei:
        P.parse(b"OPTIONS sip:" + b"a" * 9000 + b" SIP/2.0\r\n\r\n")
    assert ei.value.reason == "Line Too Long"


# -- grammar reasons ---------------------------------------------------------------------


def test_parse_uri_ports_and_ipv6(P):
    for bad in ("sip:a@h:65536", "sip:a@h:99999", "sip:a@h:0", "sip:a@2001:db8::1", "sip:a@[2001:db8::1]:0"):
        with pytest.raises(E.SipBadHeader):
            P.parse_uri(bad)
    assert P.parse_uri("sip:a@h:65535").port == 65535
    assert P.parse_uri("sip:a:pw@[2001:db8::1]:1").port == 1
    with pytest.raises(E.SipBadHeader) as ei:
        P.parse_uri("sip:a@h:99999")
    assert ei.value.reason == "Bad URI port"


def test_lazy_views_name_their_header(P):
    m = P.parse(message(contact="<sip:pbx@h:99999>", from_='"x <sip:a@h>;tag=1'))
    with pytest.raises(E.SipBadHeader) as ei:
        m.contacts  # noqa: B018 - reading the view parses it
    assert ei.value.reason == "Bad Contact port"
    with pytest.raises(E.SipBadHeader) as ei:
        m.from_  # noqa: B018 - reading the view parses it
    assert ei.value.reason == "Unterminated quote in From display name"


# -- the compiled grammar against the oracle, value by value ------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_URI_CHARS = "sipSIPtel:+@;=?&[]:.0123456789abcdefABCDEF<> \"%-_~/\\,\x00\xe9"
_uri_text = st.one_of(
    st.text(_URI_CHARS, max_size=40),
    st.builds(lambda sch, rest: sch + rest, st.sampled_from(["sip:", "SIPS:", "tel:", "Sip:", "mailto:", "x-y+z.1:"]),
              st.text(_URI_CHARS, max_size=40)),
)


def _grammar_outcome(fn, text):
    try:
        v = fn(text)
    except E.SipParseError as err:
        return ("err", type(err).__name__, err.reason)
    if hasattr(v, "scheme"):
        return (v.scheme, v.user, v.password, v.host, v.port, v.params, v.headers, str(v))
    if hasattr(v, "star"):
        return (v.display, None if v.uri is None else str(v.uri), v.params, v.star, str(v))
    return (v.transport, v.host, v.port, v.params, str(v))


@settings(max_examples=int(os.environ.get("SIPPARSE_FUZZ_EXAMPLES", "400")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(_uri_text)
def test_uri_grammar_matches_oracle(text):
    c, py = IMPLS["c"], IMPLS["py"]
    assert _grammar_outcome(c.parse_uri, text) == _grammar_outcome(py.parse_uri, text)
    for wrap in ("<{}>;tag=a", '"d" <{}>', "{};expires=5", "A B <{}>"):
        na = wrap.format(text)
        assert _grammar_outcome(c.parse_name_addr, na) == _grammar_outcome(py.parse_name_addr, na)
    via = "SIP/2.0/UDP " + text
    assert _grammar_outcome(c.parse_via, via) == _grammar_outcome(py.parse_via, via)
