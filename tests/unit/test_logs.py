"""Structured logs: JSON lines with context, never a secret."""

from __future__ import annotations

import json
import logging

from edge.logs import JsonFormatter, TextFormatter


def record(**extra) -> logging.LogRecord:
    rec = logging.LogRecord("sipedge.calls", logging.INFO, __file__, 1, "call ended", (), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_line_with_context() -> None:
    line = JsonFormatter().format(record(event="call_ended", call_id="c1", inbound_call_id="abc", status=200))
    entry = json.loads(line)
    assert entry["level"] == "info" and entry["msg"] == "call ended" and entry["logger"] == "sipedge.calls"
    assert entry["call_id"] == "c1" and entry["inbound_call_id"] == "abc" and entry["status"] == 200
    assert "\n" not in line


def test_secrets_never_logged() -> None:
    for fmt in (JsonFormatter(), TextFormatter()):
        line = fmt.format(record(sip_password="hunter2", admin_token="t0k", digest_response="abcd", ha1_md5="x",
                                 authorization="Digest ...", call_id="c2"))
        assert "hunter2" not in line and "t0k" not in line and "abcd" not in line and "Digest" not in line
        assert "c2" in line
