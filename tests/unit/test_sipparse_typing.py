"""The ``.pyi`` contract of the compiled parser type-checks (msgspec ``tests/typing``).

Skipped when mypy is not installed (it is not in the ``test`` extra yet).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

USAGE = '''
from edge.sip import (NameAddr, SipMessage, SipParseError, SipUri, Via, build_response,
                      build_stateless_error, frame_length, parse, parse_name_addr, parse_uri)

def handle(data: bytes) -> bytes | None:
    try:
        msg: SipMessage = parse(data)
    except SipParseError as err:
        return build_stateless_error(data, err)
    msg.validate()
    key: tuple[object, ...] = msg.transaction_key()
    branch: str | None = msg.branch
    seq: int = msg.cseq + msg.content_length + (msg.max_forwards or 0)
    via: Via = msg.top_via
    port: int | None = via.port
    rport: None | str | int = via.rport
    fr: NameAddr = msg.from_
    tag: str | None = fr.tag
    uri: SipUri | None = msg.uri
    n: int = frame_length(bytearray(data), 0)
    host: str = parse_uri("sip:a@b").host
    star: bool = parse_name_addr("*").star
    vals: list[str] = msg.headers("via")
    items: list[tuple[str, str]] = msg.header_items()
    return build_response(msg, 200, to_tag="x", headers=[("X", "y")], received="1.2.3.4", rport=5060)
'''

BAD = '''
from edge.sip import parse
x: int = parse(b"").call_id
'''


def _mypy(tmp_path: Path, code: str) -> tuple[str, int]:
    api = pytest.importorskip("mypy.api")
    f = tmp_path / "use_sip.py"
    f.write_text(code)
    out, err, rc = api.run([
        "--strict", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
        str(f), str(ROOT / "edge" / "_sipparse.pyi"),
    ])
    return out + err, rc


def test_pyi_accepts_documented_usage(tmp_path: Path) -> None:
    out, rc = _mypy(tmp_path, USAGE)
    assert rc == 0, out


def test_pyi_rejects_wrong_types(tmp_path: Path) -> None:
    out, rc = _mypy(tmp_path, BAD)
    assert rc == 1 and "Incompatible types in assignment" in out, out
