"""The compiled Digest parameter scanner (edge/_sipparse.pyx digest_params) against its oracle,
the regular expression of edge/sip/parser_py.py, on real answers and on any string."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edge._sipparse as compiled
from edge.sip import parser_py
from edge.sip.auth import parse_authorization

ANSWER = ('Digest username="990500000001", realm="sip.edge.test", nonce="0192abcdef", uri="sip:+4420@edge", '
          'response="0123456789ABCDEF0123456789abcdef", algorithm=MD5, qop=auth, nc=00000001, cnonce="0a4f113b"')

CASES = [
    ANSWER,
    ANSWER.replace(", ", ",").replace("Digest ", "digest  "),
    'Digest username="a\\"b\\\\c", realm="r", nonce=n',           # escapes
    'Digest username="no end, realm="r"',                         # an unclosed quote
    'Digest username="a\\\nb", realm=x',                          # a backslash before LF
    'Digest junk, ===, realm = "r" ,, nonce="n" garbage username=u',
    'Digest \u2003realm\u2003=\u2003"r"\u00a0,nonce=é',           # Unicode white space and letters
    'Digest USERNAME=a, Username=b',                              # the last of a name wins
    'Digest realm=', 'Digest realm', 'Digest ', 'Digest', 'Basic dXNlcjpwYXNz', '', '   ',
    'Digest x="', 'Digest x=""', 'Digest x="\\', 'Digest a' * 2000 + '=1',
]


@pytest.mark.parametrize("value", CASES)
def test_the_scanner_gives_what_the_oracle_gives(value: str) -> None:
    assert compiled.digest_params(value) == parser_py.digest_params(value)


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(st.text(alphabet='aZ9_-=", \t\r\n\\\u00a0\u2003é;:@', max_size=80))
def test_on_any_string_the_scanner_gives_what_the_oracle_gives(tail: str) -> None:
    for value in ("Digest " + tail, tail):
        assert compiled.digest_params(value) == parser_py.digest_params(value)


def test_an_answer_parses_to_its_fields() -> None:
    answer = parse_authorization(ANSWER)
    assert answer is not None and answer.username == "990500000001" and answer.uri == "sip:+4420@edge"
    assert answer.response == "0123456789abcdef0123456789abcdef" and answer.nc == "00000001"
    assert parse_authorization('Digest username="a"') is None and parse_authorization("Basic x") is None
