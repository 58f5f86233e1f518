"""The compiled ``received``/``rport`` rewrite of a response's top Via (edge/_sipparse.pyx
_set_via_param, a scanner for ASCII values) against its oracle, the regular expression of
edge/sip/parser_py.py, on real Via values and on any string."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edge._sipparse as compiled
from edge.sip import parser_py

VIAS = [
    "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK0123;rport",
    "SIP/2.0/UDP 127.0.0.1:5070;rport;branch=z9hG4bK0123",
    "SIP/2.0/TCP h;branch=z9hG4bKx ; RPORT = 5 ;received=10.0.0.1",
    "SIP/2.0/UDP h;rport=;received",
    "SIP/2.0/UDP h;rportx;rport",                 # a longer name is not the parameter
    "SIP/2.0/UDP h;rport=1,2",                    # a comma ends no parameter: no match, appended
    "SIP/2.0/UDP h;rport=1 x;rport=2",            # the first one whose value ends the parameter
    "SIP/2.0/UDP h;received=a\n",                 # $ matches before a final LF
    "SIP/2.0/UDP h;rport\t",
    "SIP/2.0/UDP h;Received=é",                   # not ASCII: the regular expression
    "SIP/2.0/UDP h", "", ";", ";rport", ";rport=",
]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("name,value", [("received", "192.0.2.1"), ("rport", "5060"), ("received", "[2001:db8::1]")])
def test_the_scanner_gives_what_the_oracle_gives(via: str, name: str, value: str) -> None:
    assert compiled._set_via_param(via, name, value) == parser_py._set_via_param(via, name, value)


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(st.text(alphabet="rportRPOTeceivdECIVD;=, \t\n5x", max_size=40), st.sampled_from(["received", "rport"]))
def test_on_any_string_the_scanner_gives_what_the_oracle_gives(via: str, name: str) -> None:
    assert compiled._set_via_param(via, name, "7") == parser_py._set_via_param(via, name, "7")
