"""Typed SIP parse errors: bad input raises exactly one of these, never anything else.

Every error carries the status a UAS answers with (``400`` unless stated), a short
reason phrase that is safe to put on a status line, and the byte offset in the
datagram where the problem was found (``-1`` when it is not about one place).

The one boundary (``Transports.received``: ``parse()`` then ``SipMessage.validate()``)
turns a request's error into a stateless ``<status> <reason>`` with
:func:`edge.sip.build_stateless_error`, or drops it and counts
``edge_sip_parse_errors_total{reason}`` (cf. aiohttp ``BadHttpMessage``).
"""

from __future__ import annotations

__all__ = [
    "SipParseError",
    "SipLineTooLong",
    "SipMessageTooLarge",
    "SipTooManyHeaders",
    "SipMissingHeader",
    "SipBadHeader",
    "SipBadStartLine",
    "SipVersionNotSupported",
    "SipBadContentLength",
    "SipUnsupportedUriScheme",
    "SipTooManyHops",
]


class SipParseError(Exception):
    """A SIP message could not be parsed.

    :param reason: short reason phrase (ASCII, no CR/LF), e.g. ``"Bad CSeq"``.
    :param offset: byte offset in the message where the error was found, or -1.
    :param data: optional message bytes; when given, ``str(err)`` shows the line
        with a ``^`` under ``offset`` (aiohttp style).
    """

    status: int = 400

    def __init__(self, reason: str, offset: int = -1, data: bytes | None = None) -> None:
        self.reason = reason
        self.offset = offset
        self.data = data
        super().__init__(reason, offset)

    def __str__(self) -> str:
        text = f"{self.status} {self.reason}"
        if self.offset < 0:
            return text
        text += f" (at byte {self.offset})"
        if self.data is not None and self.offset <= len(self.data):
            start = self.data.rfind(b"\n", 0, self.offset) + 1
            end = self.data.find(b"\n", self.offset)
            if end < 0:
                end = len(self.data)
            line = self.data[start:end].rstrip(b"\r")[:200].decode("ascii", "backslashreplace")
            text += f"\n  {line}\n  {' ' * min(self.offset - start, 200)}^"
        return text

    def __reduce__(self):  # keep pickling (multiprocessing) working with the extra args
        return (type(self), (self.reason, self.offset, self.data))


class SipLineTooLong(SipParseError):
    """A physical line is longer than the limit (8 KiB). Answered 400."""


class SipMessageTooLarge(SipParseError):
    """The message (or a stream frame) is larger than the limit (64 KiB).

    Answered ``413 Request Entity Too Large`` (RFC 3261 §21.4.11), the closest
    SIP status for "this is bigger than I accept".
    """

    status = 413


class SipTooManyHeaders(SipParseError):
    """More header lines than the limit (128). Answered 400."""


class SipMissingHeader(SipParseError):
    """A mandatory header (Via, From, To, Call-ID, CSeq; Content-Length on streams)
    is absent (RFC 3261 §8.1.1, §18.3). Answered 400."""


class SipBadHeader(SipParseError):
    """A header is malformed, or a single-valued header appears twice. Answered 400."""


class SipBadStartLine(SipParseError):
    """The request or status line is malformed. Answered 400."""


class SipVersionNotSupported(SipBadStartLine):
    """The start line carries a SIP version other than 2.0.

    Answered ``505 Version Not Supported`` (RFC 3261 §21.5.7).
    """

    status = 505


class SipBadContentLength(SipBadHeader):
    """Content-Length is not a number, is repeated, or is larger than the body
    received in the datagram (RFC 3261 §18.3). Answered 400."""


class SipUnsupportedUriScheme(SipBadStartLine):
    """The Request-URI scheme is not ``sip``, ``sips`` or ``tel``.

    Answered ``416 Unsupported URI Scheme`` (RFC 3261 §8.2.2.1); raised by ``validate()``.
    """

    status = 416


class SipTooManyHops(SipParseError):
    """``Max-Forwards: 0`` on a request the edge would forward (an INVITE).

    Answered ``483 Too Many Hops`` (RFC 3261 §16.3 step 2); raised by ``validate()``.
    An OPTIONS with ``Max-Forwards: 0`` is answered by the edge itself (§11).
    """

    status = 483
