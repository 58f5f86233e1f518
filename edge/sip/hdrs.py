"""Single source of SIP header names, compact forms and list-ness.

``tools/gen_hdrnames.py`` turns this table into ``edge/_hdrnames.pxi`` (the
``HDR_*`` enum and a first-byte name lookup for the compiled parser), and
``edge/sip/parser_py.py`` reads it at import time (Kamailio ``parse_hname2.c``,
aiohttp ``gen.py``).

If you add or reorder a header here, run ``python tools/gen_hdrnames.py`` and
commit the regenerated ``edge/_hdrnames.pxi``; ``tests/unit/test_sipparse_hdrs.py``
fails when the two disagree.  At most 63 headers (the parser keeps a 64-bit
"present" mask; bit 0 is ``HDR_OTHER``).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["HeaderDef", "HEADERS", "BY_LOWER", "COMPACT", "canonical", "is_multi"]


class HeaderDef(NamedTuple):
    enum: str  #: suffix of the ``HDR_*`` constant
    name: str  #: canonical spelling, used when we write the header
    compact: str | None  #: RFC 3261 §7.3.3 / IANA compact form
    multi: bool  #: value is a comma-separated list (RFC 3261 §7.3.1); split by ``headers()``


# Order matters only for the enum values.  Compact forms: RFC 3261 §7.3.3 and the
# IANA "Header Fields" registry (a b c d e f i j k l m n o r s t u v x y).
# multi=False for headers whose values contain commas that are not separators:
# the auth headers (RFC 3261 §25.1 credentials), Date (RFC 1123 date), etc.
HEADERS: tuple[HeaderDef, ...] = (
    HeaderDef("VIA", "Via", "v", True),
    HeaderDef("FROM", "From", "f", False),
    HeaderDef("TO", "To", "t", False),
    HeaderDef("CALL_ID", "Call-ID", "i", False),
    HeaderDef("CSEQ", "CSeq", None, False),
    HeaderDef("MAX_FORWARDS", "Max-Forwards", None, False),
    HeaderDef("CONTACT", "Contact", "m", True),
    HeaderDef("CONTENT_LENGTH", "Content-Length", "l", False),
    HeaderDef("CONTENT_TYPE", "Content-Type", "c", False),
    HeaderDef("CONTENT_ENCODING", "Content-Encoding", "e", True),
    HeaderDef("ROUTE", "Route", None, True),
    HeaderDef("RECORD_ROUTE", "Record-Route", None, True),
    HeaderDef("EXPIRES", "Expires", None, False),
    HeaderDef("MIN_EXPIRES", "Min-Expires", None, False),
    HeaderDef("AUTHORIZATION", "Authorization", None, False),
    HeaderDef("PROXY_AUTHORIZATION", "Proxy-Authorization", None, False),
    HeaderDef("WWW_AUTHENTICATE", "WWW-Authenticate", None, False),
    HeaderDef("PROXY_AUTHENTICATE", "Proxy-Authenticate", None, False),
    HeaderDef("AUTHENTICATION_INFO", "Authentication-Info", None, False),
    HeaderDef("ALLOW", "Allow", None, True),
    HeaderDef("SUPPORTED", "Supported", "k", True),
    HeaderDef("REQUIRE", "Require", None, True),
    HeaderDef("PROXY_REQUIRE", "Proxy-Require", None, True),
    HeaderDef("UNSUPPORTED", "Unsupported", None, True),
    HeaderDef("SUBJECT", "Subject", "s", False),
    HeaderDef("USER_AGENT", "User-Agent", None, False),
    HeaderDef("SERVER", "Server", None, False),
    HeaderDef("DATE", "Date", None, False),
    HeaderDef("WARNING", "Warning", None, True),
    HeaderDef("RETRY_AFTER", "Retry-After", None, False),
    HeaderDef("REASON", "Reason", None, True),
    HeaderDef("ACCEPT", "Accept", None, True),
    HeaderDef("ACCEPT_ENCODING", "Accept-Encoding", None, True),
    HeaderDef("ACCEPT_LANGUAGE", "Accept-Language", None, True),
    HeaderDef("CONTENT_DISPOSITION", "Content-Disposition", None, False),
    HeaderDef("CONTENT_LANGUAGE", "Content-Language", None, True),
    HeaderDef("MIME_VERSION", "MIME-Version", None, False),
    HeaderDef("ORGANIZATION", "Organization", None, False),
    HeaderDef("PRIORITY", "Priority", None, False),
    HeaderDef("TIMESTAMP", "Timestamp", None, False),
    HeaderDef("CALL_INFO", "Call-Info", None, True),
    HeaderDef("ALERT_INFO", "Alert-Info", None, True),
    HeaderDef("ERROR_INFO", "Error-Info", None, True),
    HeaderDef("IN_REPLY_TO", "In-Reply-To", None, True),
    HeaderDef("REPLY_TO", "Reply-To", None, False),
    HeaderDef("RSEQ", "RSeq", None, False),
    HeaderDef("RACK", "RAck", None, False),
    HeaderDef("EVENT", "Event", "o", False),
    HeaderDef("ALLOW_EVENTS", "Allow-Events", "u", True),
    HeaderDef("SUBSCRIPTION_STATE", "Subscription-State", None, False),
    HeaderDef("REFER_TO", "Refer-To", "r", False),
    HeaderDef("REFERRED_BY", "Referred-By", "b", False),
    HeaderDef("SESSION_EXPIRES", "Session-Expires", "x", False),
    HeaderDef("MIN_SE", "Min-SE", None, False),
    HeaderDef("ACCEPT_CONTACT", "Accept-Contact", "a", True),
    HeaderDef("REJECT_CONTACT", "Reject-Contact", "j", True),
    HeaderDef("REQUEST_DISPOSITION", "Request-Disposition", "d", True),
    HeaderDef("IDENTITY", "Identity", "y", False),
    HeaderDef("IDENTITY_INFO", "Identity-Info", "n", False),
    HeaderDef("PATH", "Path", None, True),
    HeaderDef("SERVICE_ROUTE", "Service-Route", None, True),
    HeaderDef("P_ASSERTED_IDENTITY", "P-Asserted-Identity", None, True),
    HeaderDef("PRIVACY", "Privacy", None, False),
)

assert len(HEADERS) <= 63, "the parser's present-mask is 64 bits (bit 0 = HDR_OTHER)"

#: lower-case name or compact form -> index into HEADERS + 1 (== HDR_* value; 0 is HDR_OTHER)
BY_LOWER: dict[str, int] = {}
#: compact letter -> canonical name
COMPACT: dict[str, str] = {}
for _i, _h in enumerate(HEADERS, 1):
    BY_LOWER[_h.name.lower()] = _i
    if _h.compact:
        BY_LOWER[_h.compact] = _i
        COMPACT[_h.compact] = _h.name
del _i, _h


def canonical(name: str) -> str:
    """Canonical spelling of ``name`` (compact forms expanded); unknown names unchanged."""
    idx = BY_LOWER.get(name.lower())
    return HEADERS[idx - 1].name if idx else name


def is_multi(name: str) -> bool:
    """True when ``name`` is a comma-separated list header (split by ``headers()``)."""
    idx = BY_LOWER.get(name.lower())
    return HEADERS[idx - 1].multi if idx else False
