"""pytest-benchmark of the SIP parser hot path (opt-in: SIPEDGE_PERF=1, see tests/conftest.py).

    SIPEDGE_PERF=1 .venv/bin/python -m pytest tests/perf/test_parse_perf.py --benchmark-only

The side-by-side figures for the README come from ``python -m bench.bench_parse``.
"""

from __future__ import annotations

import pytest

from bench.bench_parse import EXPECTED_KEY, INVITE, OK
from edge.sip import build_response, parse

pytestmark = pytest.mark.perf


def _key(data: bytes):
    m = parse(data)
    return (m.branch, m.cseq, m.call_id, m.from_tag)


@pytest.mark.parametrize("data", [INVITE, OK], ids=["invite", "200ok"])
def test_parse_with_transaction_key(benchmark, data) -> None:
    assert benchmark(_key, data) == EXPECTED_KEY


def test_parse_only(benchmark) -> None:
    assert benchmark(parse, INVITE).is_request


def test_full_views(benchmark) -> None:
    def views():
        m = parse(INVITE)
        return m.top_via, m.from_, m.to, m.contacts, m.uri, m.transaction_key()

    assert benchmark(views)[5][0] == EXPECTED_KEY[0]


def test_build_100_trying(benchmark) -> None:
    req = parse(INVITE)
    out = benchmark(build_response, req, 100, received="192.0.2.1", rport=5060)
    assert out.startswith(b"SIP/2.0 100 Trying\r\n")
