"""SIP protocol layer: parser (compiled ``edge._sipparse`` re-exported here), transports, transactions.

The compiled parser is required: there is deliberately no fallback to
``edge.sip.parser_py`` (the pure-Python oracle used by the tests), so a missing
build fails loudly at import instead of running 30x slower.
"""

from edge.sip.errors import (
    SipBadContentLength,
    SipBadHeader,
    SipBadStartLine,
    SipLineTooLong,
    SipMessageTooLarge,
    SipMissingHeader,
    SipParseError,
    SipTooManyHeaders,
    SipTooManyHops,
    SipUnsupportedUriScheme,
    SipVersionNotSupported,
)

try:
    from edge._sipparse import (
        MAX_HEADER_LINES,
        MAX_LINE_BYTES,
        MAX_MESSAGE_BYTES,
        REASONS,
        NameAddr,
        SipMessage,
        SipUri,
        Via,
        build_response,
        build_stateless_error,
        digest_params,
        frame_length,
        parse,
        parse_name_addr,
        parse_uri,
        parse_via,
        skip_keepalive,
    )
except ImportError:
    # ``edge._sipparse`` imports ``edge.sip.errors``, which runs this file first when
    # the compiled module is imported directly: then resolve its names lazily (PEP 562).
    # A missing build is still an ImportError: there is no pure-Python fallback.
    import sys as _sys

    if "edge._sipparse" not in _sys.modules:
        raise
    _COMPILED = frozenset(('MAX_HEADER_LINES', 'MAX_LINE_BYTES', 'MAX_MESSAGE_BYTES', 'REASONS', 'NameAddr',
                           'SipMessage', 'SipUri', 'Via', 'build_response', 'build_stateless_error', 'digest_params',
                           'frame_length',
                           'parse', 'parse_name_addr', 'parse_uri', 'parse_via', 'skip_keepalive'))

    def __getattr__(name: str):
        if name in _COMPILED:
            return getattr(_sys.modules["edge._sipparse"], name)
        raise AttributeError(f"module 'edge.sip' has no attribute {name!r}")


__all__ = [
    "MAX_HEADER_LINES",
    "MAX_LINE_BYTES",
    "MAX_MESSAGE_BYTES",
    "REASONS",
    "NameAddr",
    "SipMessage",
    "SipUri",
    "Via",
    "build_response",
    "build_stateless_error",
    "digest_params",
    "frame_length",
    "parse",
    "parse_name_addr",
    "parse_uri",
    "parse_via",
    "skip_keepalive",
    "SipBadContentLength",
    "SipBadHeader",
    "SipBadStartLine",
    "SipLineTooLong",
    "SipMessageTooLarge",
    "SipMissingHeader",
    "SipParseError",
    "SipTooManyHeaders",
    "SipTooManyHops",
    "SipUnsupportedUriScheme",
    "SipVersionNotSupported",
]
