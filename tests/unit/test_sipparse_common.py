"""Shared helpers for the SIP parser tests (collected by pytest, but defines no tests)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import edge._sipparse as compiled
from edge.sip import parser_py
from edge.sip.errors import SipParseError

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
VALID = sorted((CORPUS / "valid").glob("*.sip"))
# RFC 4475 torture messages; the regressions issue-<n>-<slug>.sip have their own table
INVALID = sorted(p for p in (CORPUS / "invalid").glob("*.sip") if not p.name.startswith("issue-"))
ISSUES = sorted((CORPUS / "invalid").glob("issue-*.sip"))
EXPECTED = tomllib.loads((CORPUS / "invalid" / "expected.toml").read_text())
IMPLS = {"c": compiled, "py": parser_py}


def touch(msg) -> tuple:
    """Read every accessor (lazy ones included); returns a comparable summary."""
    out = [
        msg.raw, msg.is_request, msg.method, msg.status, msg.reason, msg.ruri, msg.body,
        msg.content_length, msg.call_id, msg.cseq, msg.cseq_method, msg.from_tag, msg.to_tag,
        msg.branch, msg.header_items(),
    ]
    for name in ("via", "v", "contact", "route", "max-forwards", "x-unknown", "content-type", "allow"):
        out += [msg.header(name), msg.headers(name), msg.count(name)]
    out.append(repr(msg))
    return tuple(out)


def touch_lazy(msg) -> tuple:
    """The structured views; may raise SipParseError on a bad header."""
    via = msg.top_via
    vias = msg.vias
    fr = msg.from_
    to = msg.to
    contacts = msg.contacts
    uri = msg.uri
    return (
        str(via), via.transport, via.host, via.port, via.params, via.branch, via.rport, via.received,
        [str(v) for v in vias],
        fr.display, str(fr.uri), fr.params, fr.tag, to.display, str(to.uri), to.tag,
        [(c.display, str(c.uri), c.params, c.star) for c in contacts],
        None if uri is None else (uri.scheme, uri.user, uri.password, uri.host, uri.port, uri.params, uri.headers),
        msg.expires, msg.max_forwards, msg.transaction_key(),
    )


def outcome(impl, data: bytes):
    """A comparable record of everything the parser says about ``data`` (parity checks)."""
    try:
        msg = impl.parse(data)
    except SipParseError as e:
        return ("err", type(e).__name__, e.status, e.reason, e.offset)
    out = ["ok"]
    for fn in (touch, touch_lazy):
        try:
            out.append(fn(msg))
        except SipParseError as e:
            out.append(("lazy-err", type(e).__name__, e.reason))
    out.append(validated(impl, data))
    return tuple(out)


def validated(impl, data: bytes):
    """What ``parse(data).validate()`` says, on a fresh message (the boundary's order)."""
    try:
        impl.parse(data).validate()
    except SipParseError as e:
        return ("invalid", type(e).__name__, e.status, e.reason, e.offset)
    return ("valid",)
