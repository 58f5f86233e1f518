"""Property test: mutated real messages never make the parser raise anything but
SipParseError, every accessor can be touched, and the compiled parser agrees with
the Python oracle on every outcome (Kamailio ``fuzz_parse_msg.c`` in spirit).

Bounded for the normal suite (derandomized, a few hundred examples); set
``SIPPARSE_FUZZ_EXAMPLES=20000`` to explore more.  The coverage-guided target is
``tests/fuzz/fuzz_sipparse.py`` (atheris).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sipparse_common import IMPLS, INVALID, ISSUES, VALID, outcome

from edge.sip.errors import SipParseError

SEEDS = [p.read_bytes() for p in VALID + INVALID + ISSUES]
EXAMPLES = int(os.environ.get("SIPPARSE_FUZZ_EXAMPLES", "600"))
EXPLORE = "SIPPARSE_FUZZ_EXAMPLES" in os.environ  # random seeds when exploring
INTERESTING = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b";", b",", b'"', b"\\", b"<", b">", b"=",
               b"\r\n ", b"\r\n\r\n", b"\x00", b"\xff", b"Via: ", b"l: 0", b"i: x", b"%", b"@",
               b"SIP/2.0", b";tag=", b";branch=z9hG4bK", b"9999999999", b"-1", b"\xd0\xb0"]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "token", "dup"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif kind == "token":
            data[i:i] = draw(st.sampled_from(INTERESTING))
        elif kind == "dup" and data:
            j = draw(st.integers(i, len(data)))
            data[j:j] = data[i:j][:200]
    return bytes(data)


def _exercise(impl, data: bytes) -> None:
    try:
        msg = impl.parse(data)
    except SipParseError as err:
        out = impl.build_stateless_error(data, err)
        assert out is None or out.startswith(b"SIP/2.0 %d " % err.status)
        return
    if msg.is_request:
        try:
            resp = impl.build_response(msg, 200, to_tag="t", received="192.0.2.1", rport=1)
        except SipParseError:
            pass  # the top Via or To could not be decoded (lazy check)
        else:
            assert resp.startswith(b"SIP/2.0 200 OK\r\n")
    try:
        impl.frame_length(data)
    except SipParseError:
        pass


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutations_only_raise_sip_parse_error_and_match_oracle(data):
    results = {}
    for name, impl in IMPLS.items():
        results[name] = outcome(impl, data)  # raises if anything but SipParseError escapes
        _exercise(impl, data)
    assert results["c"] == results["py"]


@settings(max_examples=max(EXAMPLES // 3, 50), deadline=None, derandomize=not EXPLORE)
@given(st.binary(max_size=600))
def test_random_bytes(data):
    assert outcome(IMPLS["c"], data) == outcome(IMPLS["py"], data)
    for impl in IMPLS.values():
        try:
            impl.frame_length(data)
        except SipParseError:
            pass
