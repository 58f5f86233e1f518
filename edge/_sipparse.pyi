"""Public contract of the compiled SIP parser (re-exported from :mod:`edge.sip`).

``edge/sip/parser_py.py`` implements the same API in plain Python (test oracle).

Limits: a message is at most :data:`MAX_MESSAGE_BYTES` (65536) bytes, has at most
:data:`MAX_HEADER_LINES` (128) header lines, and no physical line is longer than
:data:`MAX_LINE_BYTES` (8192) bytes.  Line ends are CRLF; a bare LF is accepted.

Every function that reads untrusted bytes raises only
:class:`edge.sip.errors.SipParseError` subclasses for bad input (``TypeError`` /
``ValueError`` only for programming errors such as a wrong argument type).

Reasons name the header at fault (``Bad Via rport``, ``Bad Contact port``,
``Missing From tag``, ``Bad Subject value``) and ``offset`` is the byte offset in the
message where the problem is.
"""

from collections.abc import Iterable

MAX_MESSAGE_BYTES: int
MAX_HEADER_LINES: int
MAX_LINE_BYTES: int
#: default reason phrase per status code
REASONS: dict[int, str]

class SipUri:
    """A parsed URI; ``str(uri)`` returns exactly the text it was parsed from.

    ``sip``/``sips``: every field below.  ``tel``: ``user`` is the number and
    ``params`` its parameters.  Other schemes (``http:``, ``isbn:`` ...): only
    ``scheme`` is set (``host == ''``).  Escapes (``%41``) are kept as written.
    """

    scheme: str  #: lower-case
    user: str | None
    password: str | None
    host: str  #: lower-case; an IPv6 reference keeps its brackets
    port: int | None
    params: dict[str, str | None]  #: lower-case names; ``None`` for a parameter without value
    headers: dict[str, str]  #: ``?name=value&...`` part
    def __str__(self) -> str: ...

class NameAddr:
    """A ``name-addr`` / ``addr-spec`` value (From, To, Contact, Route, ...)."""

    display: str | None  #: quotes removed and ``\\x`` escapes resolved; ``None`` if absent
    uri: SipUri | None  #: ``None`` only for ``Contact: *``
    params: dict[str, str | None]  #: header params, lower-case names, quoted values unquoted
    star: bool  #: ``Contact: *``
    @property
    def tag(self) -> str | None: ...
    def __str__(self) -> str: ...

class Via:
    """One Via value: ``SIP/2.0/<transport> <host>[:<port>] *(;param)``."""

    transport: str  #: upper-case (``UDP``, ``TCP``, ``TLS``, ...)
    host: str  #: lower-case sent-by host
    port: int | None  #: sent-by port, ``None`` when absent
    params: dict[str, str | None]
    @property
    def branch(self) -> str | None: ...
    @property
    def received(self) -> str | None: ...
    @property
    def rport(self) -> None | str | int:
        """``None`` if absent, ``''`` if present without value (RFC 3581 request), else the port."""
    @property
    def sent_by(self) -> str: ...
    def __str__(self) -> str: ...

class SipMessage:
    """A parsed message: owns ``raw`` and keeps offsets into it.

    Scalars below are computed at parse time or decoded on first access and cached.
    Structured views (``top_via``, ``vias``, ``from_``, ``to``, ``contacts``, ``uri``,
    ``expires``) run the full grammar on first access and may raise
    :class:`~edge.sip.errors.SipBadHeader` then -- unless :meth:`validate` passed,
    which decodes and checks all of them at once.  ``from_tag``, ``to_tag`` and
    ``branch`` use a fast scanner that checks only quoting and ``<>`` balance.
    """

    raw: bytes
    is_request: bool
    method: str  #: request method, or the CSeq method for responses
    status: int  #: 0 for requests
    reason: str  #: response reason phrase, '' for requests
    ruri: str  #: Request-URI text, '' for responses
    body: bytes  #: cut to Content-Length (RFC 3261 §18.3)
    content_length: int  #: ``len(body)``
    call_id: str
    cseq: int
    cseq_method: str
    from_tag: str | None
    to_tag: str | None
    branch: str | None  #: top Via branch parameter
    max_forwards: int | None
    def header(self, name: str) -> str | None:
        """First value of ``name`` (case-insensitive, compact forms accepted).

        For list headers (Via, Contact, Route, Allow, Supported, ...) this is the
        first comma-separated element; for others the whole first line's value.
        Folded values come back unfolded (each LWS run with CRLF -> one SP).
        """
    def headers(self, name: str) -> list[str]:
        """All values of ``name``; list headers are split on commas outside quotes and
        ``<>`` (empty elements dropped); single-valued headers (the auth headers, Date,
        unknown headers ...) are never split."""
    def header_items(self) -> list[tuple[str, str]]:
        """``(name as written, value)`` per header line, in order (values unfolded)."""
    def count(self, name: str) -> int:
        """``len(self.headers(name))``."""
    @property
    def top_via(self) -> Via: ...
    @property
    def vias(self) -> list[Via]: ...
    @property
    def from_(self) -> NameAddr: ...
    @property
    def to(self) -> NameAddr: ...
    @property
    def contacts(self) -> list[NameAddr]:
        """Contact values; ``*`` gives one ``NameAddr`` with ``star=True`` (alone, else error)."""
    @property
    def uri(self) -> SipUri | None:
        """Parsed Request-URI; ``None`` for responses."""
    @property
    def expires(self) -> int | None:
        """``Expires`` header as int (0..2**32-1), ``None`` when absent."""
    def validate(self) -> None:
        """Decode and check every view the edge uses, so none of them raises later.

        The transport boundary calls it right after :func:`parse` (Kamailio
        ``sanity``); the views are cached, so the layers above read them for free, and
        a second call returns at once.  A **response** is checked only for what the edge
        reads of one: its Call-ID, and the Contact of a 2xx to INVITE (the dialog's
        remote target); branch, CSeq and tags come from :func:`parse`, and its Via, From
        and To are never decoded by the edge.  A request is checked, in this order:

        * every Via value: ``SIP/2.0/<transport>``, sent-by host (an IPv6 reference
          must be bracketed), port 1..65535, ``rport`` empty or 1..65535, ``received``
          an IP address, ``branch`` non-empty -- ``Bad Via host`` / ``port`` /
          ``rport`` / ``received`` / ``branch``; the grammar and the fast ``branch``
          scanner must agree;
        * From and To (name-addr grammar, not ``*``); a request's From has a tag
          (RFC 3261 §8.1.1.3) -- ``Missing From tag``; tags agree with the fast scanner;
        * Call-ID without whitespace;
        * a request's Request-URI parses; a scheme other than ``sip``, ``sips`` or
          ``tel`` raises :class:`~edge.sip.errors.SipUnsupportedUriScheme` (416,
          RFC 3261 §8.2.2.1);
        * each Contact URI (port 1..65535), its ``expires`` parameter (delta-seconds);
          ``*`` only alone in a REGISTER;
        * ``Expires`` (0..2**32-1);
        * ``Max-Forwards: 0`` on an INVITE raises
          :class:`~edge.sip.errors.SipTooManyHops` (483, RFC 3261 §16.3 step 2).

        CSeq (number < 2**31, method equal to the request method), Max-Forwards
        (0..255), Content-Length (no larger than the datagram's body; extra octets are
        ignored, RFC 3261 §18.3) and control octets in header values are checked by
        :func:`parse` already.

        :raises SipParseError: the first problem, with a reason naming the header and
            the byte offset of the value (or parameter) at fault.
        """
    def transaction_key(self) -> tuple[object, ...]:
        """Transaction matching key (RFC 3261 §17.2.3 for requests, §17.1.3 for responses).

        With an RFC 3261 branch (``z9hG4bK...``): ``(branch, "host:port", method)``
        where host:port is the top Via sent-by (host lower-case; port defaulted to
        5060, or 5061 for TLS/WSS) and method is the request method with ACK mapped
        to INVITE (so an ACK for a non-2xx final finds its INVITE transaction; CANCEL
        keeps its own method).  For responses the method is the CSeq method.

        Without the magic cookie (RFC 2543 peer): ``(None, "host:port", method,
        call_id, cseq, from_tag, ruri)`` -- best effort.
        """

def parse(data: bytes | bytearray | memoryview) -> SipMessage:
    """Parse one datagram.

    Leading CR/LF (keep-alives) are skipped.  Without Content-Length the body is
    the rest of the datagram; a body shorter than Content-Length raises
    :class:`~edge.sip.errors.SipBadContentLength`; bytes after Content-Length are
    ignored (RFC 3261 §18.3).  Via, From, To, Call-ID and CSeq are mandatory;
    From, To, Call-ID, CSeq, Max-Forwards and Content-Length must not repeat;
    the CSeq method must equal the request method; Max-Forwards (optional) is
    0..255.  A control octet (0x00-0x08, 0x0a-0x1f, 0x7f) in a header value raises
    ``SipBadHeader("Bad <Header> value")`` unless it is a quoted-pair inside a quoted
    string (RFC 3261 §25.1).  A line over the limit raises
    :class:`~edge.sip.errors.SipLineTooLong` naming its header (``X-Pad Header Too
    Long``).  Non-``bytes`` input is copied once.  Call :meth:`SipMessage.validate`
    before using the structured views.

    :raises SipParseError: one subclass per kind of problem, with ``status``,
        ``reason`` and ``offset``.
    """

def frame_length(buf: bytes | bytearray | memoryview, start: int = 0) -> int:
    """Length of the first complete message in ``buf[start:]`` on a stream (TCP).

    Returns the number of bytes to consume from ``start``: any leading CR/LF
    keep-alives plus the head plus Content-Length body bytes; pass exactly that
    slice to :func:`parse`.  Returns 0 when more bytes are needed (also when
    ``buf[start:]`` holds only keep-alive CR/LF: use :func:`skip_keepalive`).  The head is validated as by
    :func:`parse` once its empty line has arrived.

    :raises SipMissingHeader: the complete head has no Content-Length
        (mandatory on streams, RFC 3261 §18.3).
    :raises SipMessageTooLarge: head + body exceed the message limit.
    :raises SipParseError: the head is malformed.
    """

def skip_keepalive(buf: bytes | bytearray | memoryview, start: int = 0) -> int:
    """Number of CR/LF bytes at the start of ``buf[start:]``.

    Keep-alives (RFC 5626 §3.5.1): a stream peer sends ``CRLFCRLF`` and expects a
    ``CRLF`` pong; a UDP keep-alive datagram is only CR/LF bytes (``parse`` would
    raise ``SipBadStartLine("Empty Message")``).  Transports call this before
    :func:`frame_length` / :func:`parse` to consume (and answer) them.
    """

def parse_uri(s: str) -> SipUri:
    """Parse a URI.  A port must be 1..65535; an IPv6 host must be bracketed.

    :raises SipBadHeader: malformed.
    """

def parse_name_addr(s: str) -> NameAddr:
    """Parse ``["display"] <uri> *(;param)``, ``addr-spec *(;param)`` or ``*``.

    :raises SipBadHeader: malformed (e.g. LWS inside ``<>``, an unquoted display name
        with non-token characters, an addr-spec containing ``,`` or ``?``).
    """

def parse_via(s: str) -> Via:
    """Parse one Via value.  :raises SipBadHeader: malformed or not SIP/2.0."""

def digest_params(value: str) -> dict[str, str] | None:
    """The parameters of an ``Authorization``/``Proxy-Authorization`` value ``Digest name=value, ...``:
    names lower-cased, quoted values unquoted and unescaped; None when the scheme is not Digest.
    Positions where no ``name=value`` starts are skipped (what ``parser_py.digest_params``, a
    regular expression, gives for every string)."""

def build_response(
    req: SipMessage,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    received: str | None = None,
    rport: int | None = None,
) -> bytes:
    """Build ``SIP/2.0 <status> <reason>`` for ``req`` without re-parsing it.

    Copies every Via line in order, then From, To (``;tag=to_tag`` appended when
    given and the request's To has no tag), Call-ID and CSeq, then ``headers``,
    then ``Content-Length: len(body)`` and ``body``.  ``received``/``rport`` set
    those parameters on the top Via (RFC 3261 §18.2.1, RFC 3581 §4; pass ``rport``
    only when ``req.top_via.rport == ''``).  ``reason`` defaults to :data:`REASONS`.
    """

def build_stateless_error(data: bytes | bytearray | memoryview, err: Exception) -> bytes | None:
    """``SIP/2.0 <err.status> <err.reason>`` answering a malformed request, or ``None``.

    Recovers Via (all), From, To, Call-ID and CSeq with a lenient line scan; adds a
    To tag derived from the datagram (stable across retransmissions) and
    ``Content-Length: 0``.  Returns ``None`` for responses, ACKs, and when any of
    those headers is missing, repeated, too long or contains control characters.
    Never raises.
    """
