"""Logging: one line per event, as text for a terminal or JSON for a log pipeline.

Events carry their context as ``extra`` fields (``call_id`` ties both legs of a call
together, with each leg's SIP Call-ID beside it). Nothing secret is ever logged:
no passwords, no digest responses, no admin token; the formatter also drops any
field whose name looks like a secret, as a second line of defence.

Under systemd (stderr is journald's stream, ``$JOURNAL_STREAM``) each line starts with its
syslog priority (``<3>``), which journald strips and stores as the entry's level, and the
text format leaves the time out: journald stamps every entry itself.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_SECRET_WORDS = ("password", "secret", "token", "authorization", "response", "ha1")


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_") and not any(w in k.lower() for w in _SECRET_WORDS)}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self, *, with_time: bool = True) -> None:
        super().__init__(("%(asctime)s " if with_time else "") + "%(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _fields(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<priority>`` before what ``inner`` writes (sd-daemon(3) prefixes, SyslogLevelPrefix=yes)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>{self.inner.format(record)}"


def stderr_is_journal() -> bool:
    """Is stderr the journald stream systemd named in ``$JOURNAL_STREAM`` ("device:inode")?"""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"


def setup(fmt: str = "text", level: str = "info", *, process: str = "") -> None:
    """:param process: the node process this is (``w0``, ``api``): every line carries it as ``proc``."""
    handler = logging.StreamHandler(sys.stderr)
    if process:
        def stamp(record: logging.LogRecord) -> bool:
            setattr(record, "proc", process)  # noqa: B010 (a LogRecord takes extra fields)
            return True

        handler.addFilter(stamp)
    journal = stderr_is_journal()
    inner = JsonFormatter() if fmt == "json" else TextFormatter(with_time=not journal)
    handler.setFormatter(JournalFormatter(inner) if journal else inner)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "litestar"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ThrottledLog:
    """Logs an unexpected exception with its traceback at most once per ``interval``
    seconds per exception type; the others are only counted, and the count is reported
    on the next line logged for that type.

    For the message boundary: a bad datagram that trips a bug must never make the edge
    burn CPU formatting tracebacks (one per datagram under a flood).

    :param interval: seconds between two lines for the same exception type.
    :param max_types: bound on the exception types remembered (a bug could raise many).
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0, *,
                 clock: Callable[[], float] = time.monotonic, max_types: int = 64) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_types = max_types
        self._state: dict[type[BaseException], list[float]] = {}  # type -> [last logged at, suppressed]

    def exception(self, exc: BaseException, msg: str, *args: object) -> bool:
        """Log ``msg % args`` with ``exc``'s traceback, or count it; True if a line was written."""
        now = self.clock()
        key = type(exc)
        state = self._state.get(key)
        if state is not None and now - state[0] < self.interval:
            state[1] += 1
            return False
        suppressed = int(state[1]) if state is not None else 0
        if state is None and len(self._state) >= self.max_types:
            self._state.clear()
        self._state[key] = [now, 0]
        if suppressed:
            msg += " (%d more like it in the last %.0f s not logged)"
            args = (*args, suppressed, now - (state[0] if state is not None else now))
        self.logger.error(msg, *args, exc_info=(type(exc), exc, exc.__traceback__))
        return True

    def suppressed(self, kind: type[BaseException]) -> int:
        """How many exceptions of ``kind`` were counted but not logged since its last line."""
        state = self._state.get(kind)
        return int(state[1]) if state is not None else 0
