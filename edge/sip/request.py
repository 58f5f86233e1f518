"""Requests the edge sends (UAC side of each leg), kept structured so that the
transaction layer can derive the ACK for a non-2xx answer and a CANCEL (RFC 3261
§17.1.1.3, §9.1) without re-parsing what it sent."""

from __future__ import annotations

import os

from . import SipMessage

BRANCH_COOKIE = "z9hG4bK"  # RFC 3261 §8.1.1.7


class _TokenPool:
    """Random hex from the OS CSPRNG, read 4 KiB at a time instead of one ``getrandom``
    system call per tag, branch and Call-ID (several per call). The same bits as
    :func:`secrets.token_hex`; only the reads are batched."""

    __slots__ = ("_hex", "_pos")

    def __init__(self) -> None:
        self._hex = ""
        self._pos = 0

    def hex(self, nbytes: int) -> str:
        n = 2 * nbytes
        pos = self._pos
        if pos + n > len(self._hex):
            self._hex, pos = os.urandom(4096).hex(), 0
        self._pos = pos + n
        return self._hex[pos:pos + n]


_tokens = _TokenPool()
token_hex = _tokens.hex

# In a node of several SIP workers (edge/sip/workers.py) every branch and tag the edge makes
# starts with its worker's mark, "w" and one base-36 digit: whatever socket or connection a
# response or an in-dialog request arrives on, the worker that owns it can be read off it.
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_mark = ""


def set_worker(index: int | None) -> None:
    """Mark the tokens this process makes as worker ``index``'s (None: a single process)."""
    global _mark
    _mark = "" if index is None else "w" + _DIGITS[index]


def token_owner(token: str | None) -> int:
    """The worker whose mark ``token`` (a tag, or a branch without its cookie) carries, or -1."""
    if token is None or len(token) < 3 or token[0] != "w":
        return -1
    return _DIGITS.find(token[1])


def branch_owner(branch: str | None) -> int:
    if branch is None or not branch.startswith(BRANCH_COOKIE):
        return -1
    return token_owner(branch[len(BRANCH_COOKIE):])


def new_branch() -> str:
    return BRANCH_COOKIE + _mark + token_hex(8)


def new_tag() -> str:
    return _mark + token_hex(6)


def new_call_id(host: str) -> str:
    return f"{token_hex(12)}@{host}"


class OutRequest:
    """A request the edge originates.

    :param via_host: our advertised ``host:port`` for the Via; ``proto`` its transport.
    :param headers: everything but Via, From, To, Call-ID, CSeq, Max-Forwards and
        Content-Length, in order (Route, Contact, Content-Type, Reason, ...).
    """

    __slots__ = ("method", "ruri", "proto", "via_host", "branch", "from_", "to", "call_id", "cseq",
                 "headers", "body", "max_forwards")

    def __init__(self, method: str, ruri: str, *, proto: str, via_host: str, from_: str, to: str, call_id: str,
                 cseq: int, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                 branch: str | None = None, max_forwards: int = 70) -> None:
        self.method = method
        self.ruri = ruri
        self.proto = proto
        self.via_host = via_host
        self.branch = branch or new_branch()
        self.from_ = from_
        self.to = to
        self.call_id = call_id
        self.cseq = cseq
        self.headers = headers or []
        self.body = body
        self.max_forwards = max_forwards

    @property
    def via(self) -> str:
        return f"SIP/2.0/{self.proto.upper()} {self.via_host};branch={self.branch};rport"

    def encode(self) -> bytes:
        lines = [
            f"{self.method} {self.ruri} SIP/2.0",
            f"Via: {self.via}",
            f"Max-Forwards: {self.max_forwards}",
            f"From: {self.from_}",
            f"To: {self.to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} {self.method}",
        ]
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body

    def _routes(self) -> list[tuple[str, str]]:
        return [(n, v) for n, v in self.headers if n.lower() == "route"]

    def ack_for(self, response: SipMessage) -> OutRequest:
        """The ACK for a non-2xx final answer to this INVITE: same branch, To with the answer's tag."""
        return OutRequest("ACK", self.ruri, proto=self.proto, via_host=self.via_host, from_=self.from_,
                          to=response.header("To") or self.to, call_id=self.call_id, cseq=self.cseq,
                          headers=self._routes(), branch=self.branch)

    def cancel(self, reason: str | None = None) -> OutRequest:
        """CANCEL of this INVITE (RFC 3261 §9.1): same R-URI, branch, From, To, Call-ID, CSeq number."""
        headers = self._routes()
        if reason:
            headers.append(("Reason", reason))
        return OutRequest("CANCEL", self.ruri, proto=self.proto, via_host=self.via_host, from_=self.from_,
                          to=self.to, call_id=self.call_id, cseq=self.cseq, headers=headers, branch=self.branch)


def warning(text: str) -> tuple[str, str]:
    """A ``Warning: 399`` header naming why the edge refused or ended something (RFC 3261 §20.43)."""
    return ("Warning", f'399 sipedge "{text}"')
