"""Structured logs: JSON lines with context, never a secret."""

from __future__ import annotations

import json
import logging

from edge.logs import JsonFormatter, TextFormatter, ThrottledLog


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


def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # a real traceback, as at the boundary
        return caught


def test_throttled_log_one_traceback_per_interval_per_type(caplog) -> None:
    now = [100.0]
    log = ThrottledLog(logging.getLogger("sipedge.test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="sipedge.test"):
        assert log.exception(_raise(KeyError("a")), "handling %s failed", "INVITE")
        for _ in range(1000):  # a flood of the same bug: counted, not logged
            assert not log.exception(_raise(KeyError("b")), "handling %s failed", "INVITE")
        assert log.exception(_raise(ValueError("c")), "other")  # another type has its own budget
        assert log.suppressed(KeyError) == 1000
        now[0] += 10.0
        assert log.exception(_raise(KeyError("d")), "handling %s failed", "BYE")
    lines = [r for r in caplog.records if r.name == "sipedge.test"]
    assert len(lines) == 3
    assert all(r.exc_info and r.exc_info[2] is not None for r in lines)  # with the traceback
    assert lines[0].getMessage() == "handling INVITE failed"
    assert lines[2].getMessage() == "handling BYE failed (1000 more like it in the last 10 s not logged)"
    assert log.suppressed(KeyError) == 0
    assert "Traceback" in TextFormatter().formatException(lines[2].exc_info)


def test_throttled_log_memory_is_bounded() -> None:
    log = ThrottledLog(logging.getLogger("sipedge.test.bound"), max_types=4, clock=lambda: 0.0)
    for i in range(50):
        log.exception(_raise(type(f"E{i}", (Exception,), {})()), "x")
    assert len(log._state) <= 4


def test_journald_gets_priorities_and_no_time(tmp_path, monkeypatch) -> None:
    """Under systemd ($JOURNAL_STREAM names stderr) lines carry <priority> and leave the time to journald."""
    import io
    import logging
    import os
    import sys

    from edge import logs

    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        try:
            logs.setup("text", "info")
            logging.getLogger("sipedge.x").warning("port busy", extra={"port": 5060})
            logging.getLogger("sipedge.x").info("serving")
        finally:
            logging.getLogger().handlers[:] = [logging.StreamHandler(io.StringIO())]
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines == ["<4>WARNING sipedge.x: port busy port=5060", "<6>INFO    sipedge.x: serving"]
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not logs.stderr_is_journal()


def test_every_line_of_a_node_process_names_it(tmp_path, monkeypatch) -> None:
    """With workers each line says which process wrote it (``proc=w1``, ``"proc":"api"``)."""
    import io
    import sys

    from edge import logs

    for fmt, process, want in (("text", "w1", "proc=w1"), ("json", "api", '"proc":"api"')):
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        try:
            logs.setup(fmt, "info", process=process)
            logging.getLogger("sipedge.x").warning("a call ended", extra={"call_id": "c9"})
        finally:
            logging.getLogger().handlers[:] = [logging.StreamHandler(io.StringIO())]
        line = stream.getvalue().strip()
        assert want in line and "c9" in line, line
