# cython: language_level=3, embedsignature=True
"""Zero-copy SIP parser and fast response builder (the compiled ``edge.sip`` API).

``parse()`` scans the datagram once into a table of header offsets (compact
forms, case-insensitive names, folding); nothing is decoded until asked, and
every decoded value is cached.  Bad input raises exactly one
:class:`edge.sip.errors.SipParseError` subclass carrying the status to answer
and the byte offset.  ``edge/sip/parser_py.py`` is the pure-Python oracle with
the same API; the public contract with docstrings is ``_sipparse.pyi``.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport (PyUnicode_DATA, PyUnicode_DecodeUTF8, PyUnicode_KIND, PyUnicode_READ,
                              Py_UNICODE_ISSPACE)
from libc.stdint cimport uint8_t, uint32_t, int64_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy

import hashlib
import re

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

include "_hdrnames.pxi"

if <int>HDR_COUNT > <int>HDR_SLOTS:
    raise ImportError("_first[] too small: raise HDR_SLOTS in _sipparse.pxd")

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_HEADER_LINES",
    "MAX_LINE_BYTES",
    "SipMessage",
    "SipUri",
    "NameAddr",
    "Via",
    "parse",
    "frame_length",
    "skip_keepalive",
    "parse_uri",
    "parse_name_addr",
    "parse_via",
    "build_response",
    "build_stateless_error",
    "REASONS",
]

MAX_MESSAGE_BYTES = MAX_MESSAGE
MAX_HEADER_LINES = MAX_HEADERS
MAX_LINE_BYTES = MAX_LINE

# RFC 3261 §25.1 token characters
cdef uint8_t _TOK[256]
for _c in bytearray(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"):
    _TOK[_c] = 1

# mandatory in every message (RFC 3261 §8.1.1)
cdef uint64_t _MANDATORY_MASK = (
    (<uint64_t>1 << HDR_VIA) | (<uint64_t>1 << HDR_FROM) | (<uint64_t>1 << HDR_TO)
    | (<uint64_t>1 << HDR_CALL_ID) | (<uint64_t>1 << HDR_CSEQ))
# a second occurrence of these is an error (RFC 4475 multi01, mcl01)
cdef uint64_t _SINGLE_MASK = (
    _MANDATORY_MASK & ~(<uint64_t>1 << HDR_VIA)) | (<uint64_t>1 << HDR_MAX_FORWARDS) | (
    <uint64_t>1 << HDR_CONTENT_LENGTH)
cdef uint64_t _MULTI_MASK = HDR_MULTI_MASK

_FOLD_RE = re.compile(r"[ \t]*\r?\n[ \t]*")
_VERSION_RE = re.compile(rb"SIP/[0-9]+\.[0-9]+", re.I)


cdef int _fail(object cls, str reason, Py_ssize_t off) except -1:
    raise cls(reason, off)


cdef inline bint _ws(char c) noexcept nogil:
    return c == 32 or c == 9


cdef inline bint _lws(char c) noexcept nogil:
    return c == 32 or c == 9 or c == 13 or c == 10


cdef inline bint _is_sip20(const char* p) noexcept nogil:
    # "SIP/2.0", letters case-insensitive (RFC 3261 §7.1); '|0x20' is exact only for letters
    return ((p[0] | 0x20) == 115 and (p[1] | 0x20) == 105 and (p[2] | 0x20) == 112
            and p[3] == 47 and p[4] == 50 and p[5] == 46 and p[6] == 48)


cdef inline object _decode(const char* p, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(p, n, "surrogateescape")


cdef object _method_str(const char* p, Py_ssize_t n):
    # common methods come back as interned constants: no allocation on the hot path
    if n == 6:
        if memcmp(p, b"INVITE", 6) == 0:
            return "INVITE"
        if memcmp(p, b"CANCEL", 6) == 0:
            return "CANCEL"
        if memcmp(p, b"NOTIFY", 6) == 0:
            return "NOTIFY"
        if memcmp(p, b"UPDATE", 6) == 0:
            return "UPDATE"
    elif n == 3:
        if memcmp(p, b"ACK", 3) == 0:
            return "ACK"
        if memcmp(p, b"BYE", 3) == 0:
            return "BYE"
    elif n == 7:
        if memcmp(p, b"OPTIONS", 7) == 0:
            return "OPTIONS"
        if memcmp(p, b"MESSAGE", 7) == 0:
            return "MESSAGE"
        if memcmp(p, b"PUBLISH", 7) == 0:
            return "PUBLISH"
    elif n == 8:
        if memcmp(p, b"REGISTER", 8) == 0:
            return "REGISTER"
    elif n == 5:
        if memcmp(p, b"PRACK", 5) == 0:
            return "PRACK"
        if memcmp(p, b"REFER", 5) == 0:
            return "REFER"
    elif n == 4:
        if memcmp(p, b"INFO", 4) == 0:
            return "INFO"
    elif n == 9:
        if memcmp(p, b"SUBSCRIBE", 9) == 0:
            return "SUBSCRIBE"
    return _decode(p, n)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _fast_param(const char* v, Py_ssize_t n, const char* name, Py_ssize_t nlen,
                            bint first_only, Py_ssize_t* out_len, int h) except -2:
    """Offset in v of header parameter ``name`` (lower-case), -1 if absent.

    Mirrors ``parser_py._fast_param``: params start at the first ';' outside quotes
    and <>; with first_only the scan stops at the first ',' (top Via value).  A
    present parameter without value gives out_len 0.  Raises on an unterminated
    quote or '<' (the reason names header ``h``); the full grammar is checked by the
    lazy views (``from_`` ...).
    """
    cdef Py_ssize_t i = 0, j, pn_off, pn_len, pv_off, pv_len
    cdef bint inq = 0
    cdef int depth = 0
    cdef char c
    while i < n:
        c = v[i]
        if inq:
            if c == 92:
                i += 1
            elif c == 34:
                inq = 0
        elif c == 34:
            inq = 1
        elif c == 60:
            depth += 1
        elif c == 62:
            depth = 0
        elif depth == 0 and c == 59:
            break
        elif depth == 0 and c == 44 and first_only:
            return -1
        i += 1
    if inq:
        _fail(SipBadHeader, "Unterminated quote in " + HDR_NAMES[h], -1)
    if depth:
        _fail(SipBadHeader, "Unterminated < in " + HDR_NAMES[h], -1)
    while i < n:
        i += 1  # past ';'
        while i < n and _lws(v[i]):
            i += 1
        j = i
        while j < n and _TOK[<uint8_t>v[j]]:
            j += 1
        pn_off = i
        pn_len = j - i
        i = j
        while i < n and _lws(v[i]):
            i += 1
        pv_off = -1
        pv_len = 0
        if i < n and v[i] == 61:  # '='
            i += 1
            while i < n and _lws(v[i]):
                i += 1
            if i < n and v[i] == 34:
                j = i + 1
                while j < n and v[j] != 34:
                    if v[j] == 92:
                        j += 1
                    j += 1
                if j >= n:
                    _fail(SipBadHeader, "Unterminated quote in " + HDR_NAMES[h], -1)
                pv_off = i + 1
                pv_len = j - i - 1
                i = j + 1
            else:
                j = i
                while j < n and not (_lws(v[j]) or v[j] == 59 or v[j] == 44 or v[j] == 34
                                     or v[j] == 60 or v[j] == 62):
                    j += 1
                pv_off = i
                pv_len = j - i
                i = j
        if pn_len == nlen and _hdr_ieq(v + pn_off, name, nlen):
            if pv_off < 0:
                out_len[0] = 0
                return i
            out_len[0] = pv_len
            return pv_off
        while i < n:
            c = v[i]
            if c == 59:
                break
            if c == 44 and first_only:
                return -1
            if c == 34:
                j = i + 1
                while j < n and v[j] != 34:
                    if v[j] == 92:
                        j += 1
                    j += 1
                if j >= n:
                    _fail(SipBadHeader, "Unterminated quote in " + HDR_NAMES[h], -1)
                i = j
            i += 1
    return -1


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _check_ruri(const char* b, Py_ssize_t off, Py_ssize_t n) except -1:
    cdef Py_ssize_t i, colon = -1, at = -1
    cdef uint8_t c
    if n <= 0:
        return _fail(SipBadStartLine, "Bad Request-URI", off)
    for i in range(n):
        c = <uint8_t>b[off + i]
        if c <= 32 or c == 127 or c == 60 or c == 62 or c == 34:
            return _fail(SipBadStartLine, "Bad Request-URI", off)
        if c == 58 and colon < 0:
            colon = i
        elif c == 64:
            at = i
    c = <uint8_t>b[off] | 0x20
    if colon <= 0 or not (97 <= c <= 122):
        return _fail(SipBadStartLine, "Bad Request-URI", off)
    for i in range(1, colon):
        c = <uint8_t>b[off + i]
        if not (c == 43 or c == 45 or c == 46 or 48 <= c <= 57 or 97 <= (c | 0x20) <= 122):
            return _fail(SipBadStartLine, "Bad Request-URI", off)
    if (colon == 3 and _hdr_ieq(b + off, b"sip", 3)) or (colon == 4 and _hdr_ieq(b + off, b"sips", 4)):
        # RFC 3261 §19.1.1: no headers in a Request-URI (RFC 4475 escruri)
        if memchr(b + off + at + 1, 63, n - at - 1) != NULL:
            return _fail(SipBadStartLine, "Headers In Request-URI", off)
    return 0


cdef int _start_line(SipMessage m, Py_ssize_t pos, Py_ssize_t le) except -1:
    cdef const char* b = m._buf
    cdef Py_ssize_t n = le - pos, sp1, sp2, i
    cdef const char* p
    cdef int code
    if n >= 4 and memcmp(b + pos, b"SIP/", 4) == 0:
        m._is_request = 0
        p = <const char*>memchr(b + pos, 32, n)
        if p == NULL:
            return _fail(SipBadStartLine, "Bad Status Line", pos)
        sp1 = p - b
        if not (sp1 - pos == 7 and _is_sip20(b + pos)):
            if _VERSION_RE.fullmatch(b[pos:sp1]):
                return _fail(SipVersionNotSupported, "Version Not Supported", pos)
            return _fail(SipBadStartLine, "Bad Status Line", pos)
        if le - sp1 < 4:
            return _fail(SipBadStartLine, "Bad Status Code", sp1 + 1)
        code = 0
        for i in range(sp1 + 1, sp1 + 4):
            if not (48 <= b[i] <= 57):
                return _fail(SipBadStartLine, "Bad Status Code", sp1 + 1)
            code = code * 10 + (b[i] - 48)
        if b[sp1 + 1] < 49 or b[sp1 + 1] > 54:
            return _fail(SipBadStartLine, "Bad Status Code", sp1 + 1)
        if le > sp1 + 4 and b[sp1 + 4] != 32:
            return _fail(SipBadStartLine, "Bad Status Code", sp1 + 4)
        m._status = code
        i = sp1 + 5 if le > sp1 + 4 else le
        if i > le:
            i = le
        m._reason_off = <uint32_t>i
        m._reason_len = <uint32_t>(le - i)
        return 0
    m._is_request = 1
    p = <const char*>memchr(b + pos, 32, n)
    if p == NULL or p == b + pos:
        return _fail(SipBadStartLine, "Bad Request Line", pos)
    sp1 = p - b
    sp2 = le - 1
    while sp2 > sp1 and b[sp2] != 32:
        sp2 -= 1
    if sp2 == sp1:
        return _fail(SipBadStartLine, "Bad Request Line", pos)
    for i in range(pos, sp1):
        if not _TOK[<uint8_t>b[i]]:
            return _fail(SipBadStartLine, "Bad Method", pos)
    if not (le - sp2 - 1 == 7 and _is_sip20(b + sp2 + 1)):
        if _VERSION_RE.fullmatch(b[sp2 + 1:le]):
            return _fail(SipVersionNotSupported, "Version Not Supported", sp2 + 1)
        return _fail(SipBadStartLine, "Bad Request Line", sp2 + 1)
    _check_ruri(b, sp1 + 1, sp2 - sp1 - 1)
    m._m_off = <uint32_t>pos
    m._m_len = <uint32_t>(sp1 - pos)
    m._ruri_off = <uint32_t>(sp1 + 1)
    m._ruri_len = <uint32_t>(sp2 - sp1 - 1)
    return 0


cdef extern from *:
    """
    /* Does the head p[0:n] hold a control octet other than HTAB, CR and LF (0x00-0x08,
       0x0b, 0x0c, 0x0e-0x1f, 0x7f), or a CR not followed by LF?  One pass over the header
       lines of every message (issue 9; it replaces a memchr for CR per line): 32 octets
       per step with AVX2 when the CPU has it (checked once), else 16 with SSE2 (x86-64
       baseline), else one at a time.  On a hit the scanner looks for the line or value at
       fault.  Mirrors parser_py._HEAD_FAULT_RE. */
    static Py_ssize_t edge_head_tail(const char *p, Py_ssize_t i, Py_ssize_t n) {
        for (; i < n; i++) {
            unsigned char c = (unsigned char)p[i];
            if (c == 13) {
                if (i + 1 >= n || p[i + 1] != 10)
                    return 1;
            } else if ((c < 32 && c != 9 && c != 10) || c == 127) {
                return 1;
            }
        }
        return 0;
    }
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static int edge_head_suspect_sse2(const char *p, Py_ssize_t n) {
        const __m128i lim = _mm_set1_epi8(0x1F), del = _mm_set1_epi8(0x7F), tab = _mm_set1_epi8(0x09),
                      lf = _mm_set1_epi8(0x0A), cr = _mm_set1_epi8(0x0D);
        Py_ssize_t i = 0;
        for (; i + 17 <= n; i += 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)(p + i));
            __m128i next = _mm_loadu_si128((const __m128i *)(p + i + 1));
            __m128i low = _mm_cmpeq_epi8(_mm_min_epu8(v, lim), v);           /* v <= 0x1f */
            __m128i crlf = _mm_and_si128(_mm_cmpeq_epi8(v, cr), _mm_cmpeq_epi8(next, lf));
            __m128i ok = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, tab), _mm_cmpeq_epi8(v, lf)), crlf);
            if (_mm_movemask_epi8(_mm_or_si128(_mm_andnot_si128(ok, low), _mm_cmpeq_epi8(v, del))))
                return 1;
        }
        return (int)edge_head_tail(p, i, n);
    }
    #endif
    #if defined(__GNUC__) && defined(__x86_64__)
    #define EDGE_HAVE_AVX2 1
    #include <immintrin.h>
    __attribute__((target("avx2")))
    static int edge_head_suspect_avx2(const char *p, Py_ssize_t n) {
        const __m256i lim = _mm256_set1_epi8(0x1F), del = _mm256_set1_epi8(0x7F), tab = _mm256_set1_epi8(0x09),
                      lf = _mm256_set1_epi8(0x0A), cr = _mm256_set1_epi8(0x0D);
        Py_ssize_t i = 0;
        for (; i + 33 <= n; i += 32) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(p + i));
            __m256i next = _mm256_loadu_si256((const __m256i *)(p + i + 1));
            __m256i low = _mm256_cmpeq_epi8(_mm256_min_epu8(v, lim), v);
            __m256i crlf = _mm256_and_si256(_mm256_cmpeq_epi8(v, cr), _mm256_cmpeq_epi8(next, lf));
            __m256i ok = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(v, tab), _mm256_cmpeq_epi8(v, lf)),
                                         crlf);
            if (_mm256_movemask_epi8(_mm256_or_si256(_mm256_andnot_si256(ok, low), _mm256_cmpeq_epi8(v, del))))
                return 1;
        }
        return edge_head_suspect_sse2(p + i, n - i);
    }
    #endif
    static int edge_head_suspect(const char *p, Py_ssize_t n) {
    #if defined(EDGE_HAVE_AVX2)
        static int avx2 = -1;
        if (avx2 < 0)
            avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
        if (avx2)
            return edge_head_suspect_avx2(p, n);
    #endif
    #if defined(__SSE2__)
        return edge_head_suspect_sse2(p, n);
    #else
        return (int)edge_head_tail(p, 0, n);
    #endif
    }
    """
    bint _head_suspect "edge_head_suspect"(const char* p, Py_ssize_t n) nogil


cdef inline bint _is_ctl(uint8_t c) noexcept nogil:
    # control octets RFC 3261 §25.1 never allows in a header value outside a quoted-pair;
    # HTAB (9) is whitespace, CR/LF only end lines (a bare CR is refused by the scanner)
    return (c < 32 and c != 9) or c == 127


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _ctl_scan(const char* b, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    """Offset of a control octet RFC 3261 §25.1 does not allow in the header value
    b[i:end], else -1.  Control octets are legal only as a quoted-pair inside a quoted
    string (RFC 4475 intmeth); CR/LF inside a value are the line ends of a fold
    (mirrors parser_py._value_ctl)."""
    cdef bint inq = 0
    cdef uint8_t c
    while i < end:
        c = <uint8_t>b[i]
        if c == 13 or c == 10:
            i += 1
            continue
        if inq and c == 92 and i + 1 < end and b[i + 1] != 13 and b[i + 1] != 10:
            i += 2  # quoted-pair: any octet but CR/LF
            continue
        if c == 34:
            inq = not inq
        elif _is_ctl(c):
            return i
        i += 1
    return -1


cdef str _slot_label(SipMessage m, int k):
    """A header's name for a reason phrase: canonical if known, else as written (a token)."""
    cdef HdrSlot* sl = &m._slots[k]
    if sl.htype:
        return HDR_NAMES[sl.htype]
    if sl.name_len <= 64:
        return m._buf[sl.name_off:sl.name_off + sl.name_len].decode("ascii")
    return "Header"


cdef object _long_line(const char* b, Py_ssize_t p, Py_ssize_t end, bint start_line):
    """SipLineTooLong for the line at ``p``; the reason names the header of a ``Name: ...`` line."""
    cdef const char* q
    cdef Py_ssize_t colon, ne, i
    cdef uint8_t h
    if not start_line and not _ws(b[p]):
        q = <const char*>memchr(b + p, 58, (end if end < p + 65 else p + 65) - p)
        if q != NULL:
            colon = q - b
            ne = colon
            while ne > p and _ws(b[ne - 1]):
                ne -= 1
            if ne > p:
                for i in range(p, ne):
                    if not _TOK[<uint8_t>b[i]]:
                        break
                else:
                    h = hdr_lookup(b + p, ne - p)
                    label = HDR_NAMES[h] if h else b[p:ne].decode("ascii")
                    return SipLineTooLong(label + " Header Too Long", p)
    return SipLineTooLong("Line Too Long", p)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef int _scan(SipMessage m, Py_ssize_t pos, Py_ssize_t end, bint datagram) except -1:
    """Scan m._buf[pos:end] (pos past leading CRLFs) into m's header table."""
    cdef const char* b = m._buf
    cdef const char* p
    cdef Py_ssize_t nl, le, colon, ne, s, e, i, j, body_off, avail
    cdef HdrSlot* sl
    cdef uint8_t h
    cdef uint64_t bit
    cdef int k
    cdef int64_t v
    cdef Py_ssize_t head
    # start line
    p = <const char*>memchr(b + pos, 10, end - pos)
    if p == NULL:
        if end - pos > MAX_LINE:
            return _fail(SipLineTooLong, "Line Too Long", pos)
        return _fail(SipBadStartLine, "Incomplete Message", end)
    nl = p - b
    le = nl - 1 if (nl > pos and b[nl - 1] == 13) else nl
    if le - pos > MAX_LINE:
        return _fail(SipLineTooLong, "Line Too Long", pos)
    if memchr(b + pos, 13, le - pos) != NULL:  # a bare CR is never valid (RFC 3261 §25.1)
        return _fail(SipBadStartLine, "Bare CR", pos)
    _start_line(m, pos, le)
    pos = nl + 1
    head = pos
    # header lines
    while True:
        if pos >= end:
            return _fail(SipBadHeader, "Missing Empty Line", end)
        p = <const char*>memchr(b + pos, 10, end - pos)
        if p == NULL:
            if end - pos > MAX_LINE:
                raise _long_line(b, pos, end, 0)
            return _fail(SipBadHeader, "Missing Empty Line", end)
        nl = p - b
        le = nl - 1 if (nl > pos and b[nl - 1] == 13) else nl
        if le - pos > MAX_LINE:
            raise _long_line(b, pos, end, 0)
        if le == pos:  # empty line: end of headers
            pos = nl + 1
            break
        if _ws(b[pos]):  # continuation line (RFC 3261 §7.3.1 folding)
            if m._nslots == 0:
                return _fail(SipBadHeader, "Continuation Without Header", pos)
            sl = &m._slots[m._nslots - 1]
            s = pos
            while s < le and _ws(b[s]):
                s += 1
            e = le
            while e > s and _ws(b[e - 1]):
                e -= 1
            if e > s:
                if sl.val_len == 0:
                    sl.val_off = <uint32_t>s
                    sl.val_len = <uint32_t>(e - s)
                else:
                    sl.val_len = <uint32_t>(e - sl.val_off)
                    sl.folded = 1
            pos = nl + 1
            continue
        p = <const char*>memchr(b + pos, 58, le - pos)
        if p == NULL:
            return _fail(SipBadHeader, "Bad Header Line", pos)
        colon = p - b
        ne = colon
        while ne > pos and _ws(b[ne - 1]):
            ne -= 1
        if ne == pos:
            return _fail(SipBadHeader, "Bad Header Name", pos)
        for i in range(pos, ne):
            if not _TOK[<uint8_t>b[i]]:
                return _fail(SipBadHeader, "Bad Header Name", pos)
        if m._nslots >= MAX_HEADERS:
            return _fail(SipTooManyHeaders, "Too Many Headers", pos)
        s = colon + 1
        while s < le and _ws(b[s]):
            s += 1
        e = le
        while e > s and _ws(b[e - 1]):
            e -= 1
        h = hdr_lookup(b + pos, ne - pos)
        bit = (<uint64_t>1) << h
        if m._present & bit:
            if _SINGLE_MASK & bit:
                return _fail(SipBadContentLength if h == HDR_CONTENT_LENGTH else SipBadHeader,
                             "Duplicate " + HDR_NAMES[h], pos)
        else:
            m._present |= bit
            m._first[h] = <int16_t>m._nslots
        sl = &m._slots[m._nslots]
        sl.htype = h
        sl.folded = 0
        sl.name_off = <uint32_t>pos
        sl.name_len = <uint32_t>(ne - pos)
        sl.val_off = <uint32_t>s
        sl.val_len = <uint32_t>(e - s)
        m._nslots += 1
        pos = nl + 1
    body_off = pos
    # One pass over the header lines for a bare CR (it would split lines downstream) and
    # for NUL & co. in values (RFC 3261 §25.1, issue 9); what is at fault is looked for
    # only on a hit, and a control octet in a quoted-pair is allowed then
    if _head_suspect(b + head, body_off - head):
        i = head
        while True:
            p = <const char*>memchr(b + i, 13, body_off - i)
            if p == NULL:
                break
            j = p - b
            if j + 1 >= body_off or b[j + 1] != 10:
                while j > head and b[j - 1] != 10:
                    j -= 1
                return _fail(SipBadHeader, "Bare CR", j)
            i = j + 1
        for k in range(m._nslots):
            sl = &m._slots[k]
            i = _ctl_scan(b, sl.val_off, sl.val_off + sl.val_len)
            if i >= 0:
                return _fail(SipBadHeader, "Bad " + _slot_label(m, k) + " value", i)
    # mandatory headers (RFC 3261 §8.1.1)
    if (m._present & _MANDATORY_MASK) != _MANDATORY_MASK:
        for h in (HDR_VIA, HDR_FROM, HDR_TO, HDR_CALL_ID, HDR_CSEQ):
            if not (m._present & ((<uint64_t>1) << h)):
                return _fail(SipMissingHeader, "Missing " + HDR_NAMES[h], -1)
    # CSeq: 1*10DIGIT LWS method, number < 2**31 (RFC 3261 §8.1.1.5)
    sl = &m._slots[m._first[HDR_CSEQ]]
    s = sl.val_off
    e = s + sl.val_len
    i = s
    v = 0
    while i < e and 48 <= b[i] <= 57 and i - s < 11:
        v = v * 10 + (b[i] - 48)
        i += 1
    if i == s or i - s > 10 or v > 0x7FFFFFFF:
        return _fail(SipBadHeader, "Bad CSeq", s)
    j = i
    while j < e and _lws(b[j]):
        j += 1
    if j == i or j == e:
        return _fail(SipBadHeader, "Bad CSeq", s)
    for k in range(j, e):
        if not _TOK[<uint8_t>b[k]]:
            return _fail(SipBadHeader, "Bad CSeq", s)
    m._cseq = <uint32_t>v
    m._cm_off = <uint32_t>j
    m._cm_len = <uint32_t>(e - j)
    if m._is_request and (m._cm_len != m._m_len or memcmp(b + j, b + m._m_off, m._m_len) != 0):
        return _fail(SipBadHeader, "CSeq Method Mismatch", s)
    # Max-Forwards: digits, <= 255 (RFC 3261 §20.22); absent is tolerated
    if m._present & ((<uint64_t>1) << HDR_MAX_FORWARDS):
        sl = &m._slots[m._first[HDR_MAX_FORWARDS]]
        s = sl.val_off
        e = s + sl.val_len
        v = 0
        if e == s:
            return _fail(SipBadHeader, "Bad Max-Forwards", s)
        for i in range(s, e):
            if not (48 <= b[i] <= 57):
                return _fail(SipBadHeader, "Bad Max-Forwards", s)
            v = v * 10 + (b[i] - 48)
            if v > 255:
                return _fail(SipBadHeader, "Bad Max-Forwards", s)
    sl = &m._slots[m._first[HDR_CALL_ID]]
    if sl.val_len == 0:
        return _fail(SipBadHeader, "Empty Call-ID", sl.val_off)
    # Content-Length (RFC 3261 §18.3)
    m._cl = -1
    if m._present & ((<uint64_t>1) << HDR_CONTENT_LENGTH):
        sl = &m._slots[m._first[HDR_CONTENT_LENGTH]]
        s = sl.val_off
        e = s + sl.val_len
        if e == s or e - s > 10:
            return _fail(SipBadContentLength, "Bad Content-Length", s)
        v = 0
        for i in range(s, e):
            if not (48 <= b[i] <= 57):
                return _fail(SipBadContentLength, "Bad Content-Length", s)
            v = v * 10 + (b[i] - 48)
        m._cl = v
    m._body_off = <uint32_t>body_off
    if datagram:
        avail = end - body_off
        if m._cl < 0:
            m._body_len = <uint32_t>avail  # UDP without Content-Length: rest of the datagram
        elif m._cl > avail:
            return _fail(SipBadContentLength, "Content-Length Larger Than Body",
                         m._slots[m._first[HDR_CONTENT_LENGTH]].val_off)
        else:
            m._body_len = <uint32_t>m._cl  # extra bytes are ignored (RFC 3261 §18.3)
    else:
        m._body_len = <uint32_t>(m._cl if m._cl > 0 else 0)
    return 0


cdef inline Py_ssize_t _skip_crlf(const char* b, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    while pos < end and (b[pos] == 13 or b[pos] == 10):
        pos += 1
    return pos


cdef SipMessage _new_message(bytes raw):
    cdef SipMessage m = SipMessage.__new__(SipMessage)
    m._raw = raw
    m._buf = PyBytes_AS_STRING(raw)
    m._len = PyBytes_GET_SIZE(raw)
    return m


cpdef SipMessage parse(object data):
    """Parse one SIP message (a UDP datagram).  See ``_sipparse.pyi``."""
    cdef bytes raw
    cdef SipMessage m
    cdef Py_ssize_t pos
    if type(data) is bytes:
        raw = <bytes>data
    else:
        raw = bytes(data)  # bytearray / memoryview: one copy, the message owns it
    if PyBytes_GET_SIZE(raw) > MAX_MESSAGE:
        raise SipMessageTooLarge("Message Too Large", MAX_MESSAGE)
    m = _new_message(raw)
    pos = _skip_crlf(m._buf, 0, m._len)
    if pos >= m._len:
        raise SipBadStartLine("Empty Message", pos)
    try:
        _scan(m, pos, m._len, 1)
    except SipParseError as err:
        err.data = raw  # str(err) shows the line with a caret (aiohttp style)
        raise
    return m


def skip_keepalive(buf, Py_ssize_t start=0):
    """Number of CR/LF bytes at ``buf[start:]`` (RFC 5626 §3.5.1 keep-alives).  See ``_sipparse.pyi``."""
    cdef const unsigned char[::1] view
    cdef Py_ssize_t n, i
    if isinstance(buf, bytes):
        n = PyBytes_GET_SIZE(buf)
        if start < 0 or start > n:
            raise ValueError("start out of range")
        return _skip_crlf(PyBytes_AS_STRING(buf), start, n) - start
    view = buf
    n = view.shape[0]
    if start < 0 or start > n:
        raise ValueError("start out of range")
    i = start
    while i < n and (view[i] == 13 or view[i] == 10):
        i += 1
    return i - start


def frame_length(buf, Py_ssize_t start=0):
    """Stream framing (RFC 3261 §18.3).  See ``_sipparse.pyi``."""
    cdef const unsigned char[::1] view
    cdef const char* b
    cdef Py_ssize_t n, pos, p, le, head_end = -1, total
    cdef const char* q
    cdef SipMessage m
    if isinstance(buf, bytes):
        b = PyBytes_AS_STRING(buf)
        n = PyBytes_GET_SIZE(buf)
    else:
        view = buf
        n = view.shape[0]
        if n == 0:
            if start != 0:
                raise ValueError("start out of range")
            return 0
        b = <const char*>&view[0]
    if start < 0 or start > n:
        raise ValueError("start out of range")
    pos = _skip_crlf(b, start, n)
    if pos >= n:
        return 0
    p = pos
    while True:
        q = <const char*>memchr(b + p, 10, n - p)
        if q == NULL:
            if n - p > MAX_LINE:
                raise _long_line(b, p, n, p == pos)
            break
        le = q - b
        if le > p and b[le - 1] == 13:
            le -= 1
        if le - p > MAX_LINE:
            raise _long_line(b, p, n, p == pos)
        if le == p and p != pos:
            head_end = (q - b) + 1
            break
        p = (q - b) + 1
        if p - pos > MAX_MESSAGE:
            raise SipMessageTooLarge("Message Too Large", pos)
    if head_end < 0:
        if n - pos > MAX_MESSAGE:
            raise SipMessageTooLarge("Message Too Large", pos)
        return 0
    m = _new_message(b[pos:head_end])
    try:
        _scan(m, 0, head_end - pos, 0)
    except SipParseError as err:
        if err.offset >= 0:
            err.offset += pos
        raise
    if m._cl < 0:
        raise SipMissingHeader("Missing Content-Length", -1)
    total = head_end - pos + m._cl
    if total > MAX_MESSAGE:
        raise SipMessageTooLarge("Message Too Large", pos)
    if n - pos < total:
        return 0
    return pos - start + total


cdef object _UNSET = object()  # not in SipMessage._lazy yet


@cython.freelist(64)
cdef class SipMessage:
    """A parsed SIP message; see ``_sipparse.pyi``.  Create with :func:`parse`."""

    def __init__(self):
        raise TypeError("use edge.sip.parse() to create a SipMessage")

    cdef object _value(self, int k):
        cdef HdrSlot* sl = &self._slots[k]
        s = _decode(self._buf + sl.val_off, sl.val_len)
        if sl.folded:
            s = _FOLD_RE.sub(" ", s)
        return s

    cdef bytes _value_bytes(self, int k):
        cdef HdrSlot* sl = &self._slots[k]
        return self._buf[sl.val_off:sl.val_off + sl.val_len]

    cdef object _name(self, int k):
        cdef HdrSlot* sl = &self._slots[k]
        return _decode(self._buf + sl.name_off, sl.name_len)

    @property
    def raw(self):
        return self._raw

    @property
    def is_request(self):
        return self._is_request

    @property
    def status(self):
        return self._status

    @property
    def method(self):
        if not (self._done & DONE_METHOD):
            if self._is_request:
                self._c_method = _method_str(self._buf + self._m_off, self._m_len)
            else:
                self._c_method = _method_str(self._buf + self._cm_off, self._cm_len)
            self._done |= DONE_METHOD
        return self._c_method

    @property
    def cseq_method(self):
        return self.method  # equal for requests: a mismatch is rejected by _scan

    @property
    def cseq(self):
        return self._cseq

    @property
    def reason(self):
        return _decode(self._buf + self._reason_off, self._reason_len)

    @property
    def ruri(self):
        if not self._is_request:
            return ""
        return _decode(self._buf + self._ruri_off, self._ruri_len)

    @property
    def body(self):
        return self._buf[self._body_off:self._body_off + self._body_len]

    @property
    def content_length(self):
        return self._body_len

    @property
    def call_id(self):
        if not (self._done & DONE_CALL_ID):
            self._c_call_id = self._value(self._first[HDR_CALL_ID])
            self._done |= DONE_CALL_ID
        return self._c_call_id

    cdef object _tag_of(self, int h, const char* name, Py_ssize_t nlen, bint first_only):
        cdef HdrSlot* sl = &self._slots[self._first[h]]
        cdef Py_ssize_t vlen = 0
        cdef Py_ssize_t off = _fast_param(self._buf + sl.val_off, sl.val_len, name, nlen, first_only, &vlen, h)
        if off < 0:
            return None
        return _decode(self._buf + sl.val_off + off, vlen)

    # (the cdef getters: validate() and build_response read them without a property lookup)
    cdef object _from_tag(self):
        if not (self._done & DONE_FROM_TAG):
            self._c_from_tag = self._tag_of(HDR_FROM, b"tag", 3, 0)
            self._done |= DONE_FROM_TAG
        return self._c_from_tag

    cdef object _to_tag(self):
        if not (self._done & DONE_TO_TAG):
            self._c_to_tag = self._tag_of(HDR_TO, b"tag", 3, 0)
            self._done |= DONE_TO_TAG
        return self._c_to_tag

    cdef object _branch(self):
        if not (self._done & DONE_BRANCH):
            self._c_branch = self._tag_of(HDR_VIA, b"branch", 6, 1)
            self._done |= DONE_BRANCH
        return self._c_branch

    @property
    def from_tag(self):
        return self._from_tag()

    @property
    def to_tag(self):
        return self._to_tag()

    @property
    def branch(self):
        return self._branch()

    @property
    def max_forwards(self):
        cdef HdrSlot* sl
        if not (self._present & ((<uint64_t>1) << HDR_MAX_FORWARDS)):
            return None
        sl = &self._slots[self._first[HDR_MAX_FORWARDS]]
        return int(self._buf[sl.val_off:sl.val_off + sl.val_len])

    # -- generic header access
    cdef list _slots_for(self, str name, int* htype):
        cdef int k
        cdef int h = HDR_BY_LOWER.get(name.lower(), 0)
        cdef list out = []
        htype[0] = h
        if h:
            if self._present & ((<uint64_t>1) << h):
                for k in range(self._first[h], self._nslots):
                    if self._slots[k].htype == h:
                        out.append(k)
            return out
        low = name.lower()
        for k in range(self._nslots):
            if self._slots[k].htype == 0 and self._name(k).lower() == low:
                out.append(k)
        return out

    def headers(self, str name):
        cdef int h = 0
        cdef list ks = self._slots_for(name, &h)
        cdef list out
        if _MULTI_MASK & ((<uint64_t>1) << h):
            out = []
            for k in ks:
                out.extend(_split_list(self._value(k)))
            return out
        return [self._value(k) for k in ks]

    def header(self, str name):
        cdef int h = 0
        cdef list ks = self._slots_for(name, &h)
        if not ks:
            return None
        if _MULTI_MASK & ((<uint64_t>1) << h):
            for k in ks:
                items = _split_list(self._value(k))
                if items:
                    return items[0]
            return None
        return self._value(ks[0])

    def count(self, str name):
        return len(self.headers(name))

    def header_items(self):
        return [(self._name(k), self._value(k)) for k in range(self._nslots)]

    # -- lazy structured views: decoded on first use, then read from _lazy (validate() fills it);
    # no closure is made for a view already there (the edge reads top_via, to, uri ... per message)
    cdef object _view(self, str key):
        cdef object v
        if self._lazy is None:
            self._lazy = {}
        else:
            v = self._lazy.get(key, _UNSET)
            if v is not _UNSET:
                return v
        v = self._lazy[key] = self._make_view(key)
        return v

    cdef object _make_view(self, str key):
        cdef list out
        if key == "top_via":
            text = self._top_via_text()
            if text is None:
                raise _bad("Empty Via")
            return parse_via(text)
        if key == "vias":
            out = [parse_via(v) for v in self.headers("via")]
            if not out:
                raise _bad("Empty Via")
            return out
        if key == "from":
            return _parse_name_addr(self.header("from"), "From")
        if key == "to":
            return _parse_name_addr(self.header("to"), "To")
        if key == "contacts":
            out = [_parse_name_addr(v, "Contact") for v in self.headers("contact")]
            if len(out) > 1:
                for c in out:
                    if c.star:
                        raise _bad("Bad Contact: * must be alone")
            return out
        if key == "uri":
            return _parse_uri(self.ruri, "Request-URI")
        return self._expires_value()  # "expires"

    cdef object _top_via_text(self):
        """``self.header("via")`` without the generic lookup: first non-empty element of
        the first Via line (same splitting rules as ``_split_list``)."""
        cdef HdrSlot* sl = &self._slots[self._first[HDR_VIA]]
        cdef const char* v = self._buf + sl.val_off
        cdef Py_ssize_t n = sl.val_len, i = 0, start = 0, a, e
        cdef bint inq = 0
        cdef int depth = 0
        cdef char c
        if sl.folded:
            return self.header("via")
        while i <= n:
            c = v[i] if i < n else 44  # a virtual ',' closes the last element
            if i < n and inq:
                if c == 92:
                    i += 1
                elif c == 34:
                    inq = 0
            elif i < n and c == 34:
                inq = 1
            elif i < n and c == 60:
                depth += 1
            elif i < n and c == 62:
                if depth:
                    depth -= 1
            elif c == 44 and (depth == 0 or i >= n):
                a = start
                e = i if i < n else n
                while a < e and _ws(v[a]):
                    a += 1
                while e > a and _ws(v[e - 1]):
                    e -= 1
                if e > a:
                    return _decode(v + a, e - a)
                start = i + 1
            i += 1
        return self.header("via")  # the first Via line has no element: look further

    @property
    def top_via(self):
        return self._view("top_via")

    @property
    def vias(self):
        return self._view("vias")

    @property
    def from_(self):
        return self._view("from")

    @property
    def to(self):
        return self._view("to")

    @property
    def contacts(self):
        return self._view("contacts")

    @property
    def uri(self):
        if not self._is_request:
            return None
        return self._view("uri")

    @property
    def expires(self):
        return self._view("expires")

    cdef object _expires_value(self):
        # the first Expires line (a single-valued header: what header("expires") gives)
        if not (self._present & ((<uint64_t>1) << HDR_EXPIRES)):
            return None
        v = self._value(self._first[HDR_EXPIRES]).strip()
        if not v.isascii() or not v.isdigit() or len(v) > 10 or int(v) > 0xFFFFFFFF:
            raise _bad("Bad Expires")
        return int(v)

    cpdef validate(self):
        """Force every view the edge uses, once (Kamailio ``sanity``); see ``_sipparse.pyi``.

        Mirrors ``parser_py.SipMessage.validate`` check for check, in the same order.
        """
        cdef int k, j
        cdef HdrSlot* sl
        cdef list vias, contacts, items
        cdef bint register
        cdef NameAddr fr, to
        cdef SipUri uri
        if self._valid:
            return None
        raw = self._raw
        if not self._is_request:
            return self._validate_response()
        vias = []
        for k in range(self._first[HDR_VIA], self._nslots):
            sl = &self._slots[k]
            if sl.htype != HDR_VIA:
                continue
            items = _split_list(self._value(k))
            if not items:  # RFC 3261 §20.42: 1#via-parm
                raise SipBadHeader("Empty Via", sl.val_off, raw)
            for j in range(len(items)):
                try:
                    vias.append(_parse_via(items[j]))
                except SipBadHeader as err:
                    raise self._element_error(err, k, j, _PARAM_OF.get(err.reason)) from None
        if (<Via>vias[0]).params.get("branch") != self._branch():  # the fast scanner and the grammar must agree
            raise self._element_error(SipBadHeader("Bad Via branch"), self._first[HDR_VIA], 0, b"branch")
        if self._lazy is None:
            self._lazy = {}
        self._lazy["vias"] = vias
        self._lazy["top_via"] = vias[0]
        fr = self._address(HDR_FROM, "From")
        tag = fr.params.get("tag")
        if self._is_request and not tag:  # RFC 3261 §8.1.1.3: the UAC MUST add a tag
            raise self._element_error(SipBadHeader("Missing From tag"), self._first[HDR_FROM], 0, None)
        if tag != self._from_tag():
            raise self._element_error(SipBadHeader("Bad From tag"), self._first[HDR_FROM], 0, b"tag")
        to = self._address(HDR_TO, "To")
        tag = to.params.get("tag")
        if ("tag" in to.params and not tag) or tag != self._to_tag():
            raise self._element_error(SipBadHeader("Bad To tag"), self._first[HDR_TO], 0, b"tag")
        sl = &self._slots[self._first[HDR_CALL_ID]]
        if sl.folded or memchr(self._buf + sl.val_off, 32, sl.val_len) != NULL or \
                memchr(self._buf + sl.val_off, 9, sl.val_len) != NULL:  # callid = word ["@" word]
            raise SipBadHeader("Bad Call-ID", sl.val_off, raw)
        if self._is_request:
            try:
                uri = _parse_uri(_decode(self._buf + self._ruri_off, self._ruri_len), "Request-URI")
            except SipBadHeader as err:
                raise SipBadStartLine(err.reason, self._ruri_off, raw) from None
            if uri.scheme not in ("sip", "sips", "tel"):  # RFC 3261 §8.2.2.1
                raise SipUnsupportedUriScheme("Unsupported Request-URI scheme", self._ruri_off, raw)
            self._lazy["uri"] = uri
        register = self._is_request and self._m_len == 8 and memcmp(self._buf + self._m_off, b"REGISTER", 8) == 0
        self._validate_contacts(register)
        if self._present & ((<uint64_t>1) << HDR_EXPIRES) and "expires" not in self._lazy:
            try:
                self._lazy["expires"] = self._expires_value()  # (not through the property's lookup)
            except SipBadHeader as err:
                raise SipBadHeader(err.reason, self._slots[self._first[HDR_EXPIRES]].val_off, raw) from None
        if (self._is_request and self._m_len == 6 and memcmp(self._buf + self._m_off, b"INVITE", 6) == 0
                and self.max_forwards == 0):
            # RFC 3261 §16.3 step 2: the edge would forward this INVITE (docs/sip.md)
            raise SipTooManyHops("Too Many Hops (Max-Forwards 0)",
                                 self._slots[self._first[HDR_MAX_FORWARDS]].val_off, raw)
        self._valid = 1
        return None

    cdef object _validate_response(self):
        """A response: only what the edge reads of one -- its Call-ID, and the Contact of a
        2xx to INVITE (the dialog's remote target); branch, CSeq and tags come from
        :func:`parse`. Its Via, From and To are never decoded as objects by the edge."""
        cdef HdrSlot* sl = &self._slots[self._first[HDR_CALL_ID]]
        if sl.folded or memchr(self._buf + sl.val_off, 32, sl.val_len) != NULL or \
                memchr(self._buf + sl.val_off, 9, sl.val_len) != NULL:
            raise SipBadHeader("Bad Call-ID", sl.val_off, self._raw)
        if 200 <= self._status < 300 and self.cseq_method == "INVITE":
            if self._lazy is None:
                self._lazy = {}
            self._validate_contacts(False)
        self._valid = 1
        return None

    cdef object _validate_contacts(self, bint register):
        cdef int k, j
        cdef list contacts = [], items
        cdef NameAddr c
        if self._present & ((<uint64_t>1) << HDR_CONTACT):
            for k in range(self._first[HDR_CONTACT], self._nslots):
                if self._slots[k].htype != HDR_CONTACT:
                    continue
                items = _split_list(self._value(k))
                for j in range(len(items)):
                    try:
                        c = _parse_name_addr(items[j], "Contact")
                    except SipBadHeader as err:
                        raise self._element_error(err, k, j, None) from None
                    if c.star and not register:  # RFC 3261 §10.2.2: "*" only in a REGISTER, and alone
                        raise self._element_error(SipBadHeader("Bad Contact"), k, j, None)
                    if contacts and (c.star or (<NameAddr>contacts[0]).star):
                        raise self._element_error(SipBadHeader("Bad Contact: * must be alone"), k, j, None)
                    if "expires" in c.params and not _is_delta_seconds(c.params["expires"]):
                        raise self._element_error(SipBadHeader("Bad Contact expires"), k, j, b"expires")
                    contacts.append(c)
        self._lazy["contacts"] = contacts

    cdef object _address(self, int h, str what):
        # the from_ / to views, decoded here without their property's generic lookup
        cdef int k = self._first[h]
        cdef str key = "from" if h == HDR_FROM else "to"
        na = self._lazy.get(key)
        if na is None:
            try:
                na = self._lazy[key] = _parse_name_addr(self._value(k), what)
            except SipBadHeader as err:
                raise self._element_error(err, k, 0, None) from None
        if (<NameAddr>na).star:
            raise self._element_error(SipBadHeader(f"Bad {what}"), k, 0, None)
        return na

    cdef object _element_error(self, object err, int k, int j, object param):
        """``err`` again, at the byte offset of element ``j`` of header line ``k`` (or its ``param``)."""
        cdef HdrSlot* sl = &self._slots[k]
        spans = _elements(self._raw, sl.val_off, sl.val_off + sl.val_len)
        a, b = spans[j] if j < len(spans) else (sl.val_off, sl.val_off + sl.val_len)
        if param:
            a = _param_off(self._raw, a, b, param)
        elif err.reason in ("Bad Via host", "Bad Via port"):
            a = _sent_by_off(self._raw, a, b, err.reason == "Bad Via port")
        return type(err)(err.reason, a, self._raw)

    def transaction_key(self):
        """RFC 3261 §17.2.3 / §17.1.3 matching key; see ``_sipparse.pyi``."""
        cdef Via via = self._lazy.get("top_via") if self._lazy is not None else None  # validate()'s
        if via is None:
            via = self.top_via
        port = via.port
        if port is None:
            port = 5061 if via.transport in ("TLS", "WSS") else 5060
        sent_by = f"{via.host}:{port}"
        method = self.method
        if method == "ACK":
            method = "INVITE"
        branch = via.params.get("branch")
        if branch is not None and branch.startswith("z9hG4bK"):
            return (branch, sent_by, method)
        return (None, sent_by, method, self.call_id, self.cseq, self.from_tag, self.ruri)

    def __repr__(self):
        if self._is_request:
            return f"<SipMessage {self.method} {self.ruri} cseq={self.cseq}>"
        return f"<SipMessage {self.status} {self.cseq_method} cseq={self.cseq}>"


REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated", 200: "OK", 202: "Accepted",
    204: "No Notification", 300: "Multiple Choices", 301: "Moved Permanently",
    302: "Moved Temporarily", 305: "Use Proxy", 380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    412: "Conditional Request Failed", 413: "Request Entity Too Large",
    414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 417: "Unknown Resource-Priority", 420: "Bad Extension",
    421: "Extension Required", 422: "Session Interval Too Small", 423: "Interval Too Brief",
    428: "Use Identity Header", 429: "Provide Referrer Identity", 433: "Anonymity Disallowed",
    436: "Bad Identity-Info", 437: "Unsupported Certificate", 438: "Invalid Identity Header",
    439: "First Hop Lacks Outbound Support", 470: "Consent Needed",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    489: "Bad Event", 491: "Request Pending", 493: "Undecipherable",
    494: "Security Agreement Required", 500: "Server Internal Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    555: "Push Notification Service Not Supported", 580: "Precondition Failure",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere",
    606: "Not Acceptable", 607: "Unwanted", 608: "Rejected",
}

_LWS_S = " \t\r\n"


# --------------------------------------------------------------------------------------
# Lazy structured values (same grammar as parser_py; typed where it is hot)


cdef class SipUri:
    """A parsed URI.  ``str(uri)`` returns the text it was parsed from.

    For ``sip``/``sips``: ``user``/``password`` (escapes kept as written, ``None``
    when absent), ``host`` (lower-case; IPv6 keeps its brackets), ``port`` (int or
    ``None``), ``params`` (lower-case name -> value or ``None``), ``headers``.
    ``tel`` URIs put the number in ``user``; other schemes only set ``scheme``.
    """

    cdef public str scheme
    cdef public object user
    cdef public object password
    cdef public str host
    cdef public object port
    cdef public dict params
    cdef public dict headers
    cdef str _text

    def __init__(self, text, scheme, user=None, password=None, host="", port=None, params=None, headers=None):
        self._text = text
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params = params if params is not None else {}
        self.headers = headers if headers is not None else {}

    def __str__(self):
        return self._text

    def __repr__(self):
        return f"SipUri({self._text!r})"

    def __eq__(self, other):
        if not isinstance(other, SipUri):
            return NotImplemented
        return str(self) == str(other)

    def __hash__(self):
        return hash(self._text)


cdef SipUri _mk_uri(str text, str scheme, object user, object password, str host, object port,
                    dict params, dict headers):
    cdef SipUri u = SipUri.__new__(SipUri)
    u._text = text
    u.scheme = scheme
    u.user = user
    u.password = password
    u.host = host
    u.port = port
    u.params = params
    u.headers = headers
    return u


cdef class NameAddr:
    """A name-addr / addr-spec header value (From, To, Contact, Route...).

    ``display`` is the display name (quotes removed, escapes resolved) or ``None``;
    ``params`` holds the header parameters (lower-case names, quoted values
    unquoted); ``star`` is True for ``Contact: *`` (then ``uri`` is ``None``).
    """

    cdef public object display
    cdef public object uri
    cdef public dict params
    cdef public bint star
    cdef str _text

    def __init__(self, text, display, uri, params, star=False):
        self._text = text
        self.display = display
        self.uri = uri
        self.params = params
        self.star = star

    @property
    def tag(self):
        return self.params.get("tag")

    def __str__(self):
        return self._text

    def __repr__(self):
        return f"NameAddr({self._text!r})"


cdef NameAddr _mk_name_addr(str text, object display, object uri, dict params, bint star):
    cdef NameAddr na = NameAddr.__new__(NameAddr)
    na._text = text
    na.display = display
    na.uri = uri
    na.params = params
    na.star = star
    return na


cdef class Via:
    """One Via value: ``SIP/2.0/<transport> <host>[:<port>];params``."""

    cdef public str transport
    cdef public str host
    cdef public object port
    cdef public dict params
    cdef str _text

    def __init__(self, text, transport, host, port, params):
        self._text = text
        self.transport = transport
        self.host = host
        self.port = port
        self.params = params

    @property
    def branch(self):
        return self.params.get("branch")

    @property
    def received(self):
        return self.params.get("received")

    @property
    def rport(self):
        """``None`` when absent, ``''`` when present without a value (RFC 3581 request), else int."""
        if "rport" not in self.params:
            return None
        v = self.params["rport"]
        if v is None:
            return ""
        return int(v)

    @property
    def sent_by(self):
        return f"{self.host}:{self.port}" if self.port is not None else self.host

    def __str__(self):
        return self._text

    def __repr__(self):
        return f"Via({self._text!r})"


cdef Via _mk_via(str text, str transport, str host, object port, dict params):
    cdef Via v = Via.__new__(Via)
    v._text = text
    v.transport = transport
    v.host = host
    v.port = port
    v.params = params
    return v


def _bad(reason: str, exc=SipBadHeader):
    return exc(reason)


# validate() helpers: where in the datagram a problem is (error path only; same code as parser_py)

_PARAM_OF = {"Bad Via rport": b"rport", "Bad Via received": b"received", "Bad Via branch": b"branch"}
_SENT_BY_RE = re.compile(rb"[^/]+/[^/]+/[ \t\r\n]*[^ \t\r\n]+[ \t\r\n]+")  # "SIP/2.0/UDP "
_PARAM_RE = {name: re.compile(rb";[ \t\r\n]*(" + name + rb")[ \t\r\n]*(?:=|;|,|$)", re.I)
             for name in (b"rport", b"received", b"branch", b"tag", b"expires")}


def _is_delta_seconds(v):
    """RFC 3261 §25.1 delta-seconds, capped at 2**32-1 like the Expires header."""
    return v is not None and v.isascii() and v.isdigit() and len(v) <= 10 and int(v) <= 0xFFFFFFFF


def _elements(bytes data, Py_ssize_t start, Py_ssize_t end):
    """Byte spans of the non-empty elements of a list value, split like ``_split_list``."""
    cdef list out = [], spans = []
    cdef Py_ssize_t a = start, i = start, b
    cdef bint inq = 0
    cdef int depth = 0
    cdef unsigned char c
    while i < end:
        c = data[i]
        if inq:
            if c == 0x5C:
                i += 1
            elif c == 0x22:
                inq = 0
        elif c == 0x22:
            inq = 1
        elif c == 0x3C:
            depth += 1
        elif c == 0x3E:
            if depth:
                depth -= 1
        elif c == 0x2C and depth == 0:
            out.append((a, i))
            a = i + 1
        i += 1
    out.append((a, end))
    for a, b in out:
        while a < b and data[a] in b" \t\r\n":
            a += 1
        while b > a and data[b - 1] in b" \t\r\n":
            b -= 1
        if b > a:
            spans.append((a, b))
    return spans


def _param_off(bytes data, Py_ssize_t a, Py_ssize_t b, bytes name):
    m = _PARAM_RE[name].search(data, a, b)
    return m.start(1) if m else a


def _sent_by_off(bytes data, Py_ssize_t a, Py_ssize_t b, bint port):
    """Offset of a Via's sent-by host, or of its port (past the last ``:`` before any param)."""
    m = _SENT_BY_RE.match(data, a, b)
    if m is None:
        return a
    host = m.end()
    if not port:
        return host
    semi = data.find(b";", host, b)
    colon = data.rfind(b":", host, semi if semi >= 0 else b)
    return colon + 1 if colon >= 0 else host


cdef inline Py_UCS4 _at(str s, Py_ssize_t i) noexcept:
    # s[i] for 0 <= i < len(s), without the bounds/error checks of generic str indexing:
    # the grammar below reads every character of every header value through this
    return PyUnicode_READ(PyUnicode_KIND(s), PyUnicode_DATA(s), i)


cdef inline bint _u_lws(Py_UCS4 c) noexcept:
    return c == 32 or c == 9 or c == 13 or c == 10


cdef inline bint _u_tok(Py_UCS4 c) noexcept:
    return c < 128 and _TOK[c]


@cython.boundscheck(False)
@cython.wraparound(False)
cdef tuple _read_quoted(str s, Py_ssize_t i, str what):
    """``s[i] == '"'``; return (index after the closing quote, unescaped content)."""
    cdef Py_ssize_t n = len(s), start
    cdef Py_UCS4 c
    cdef list out = []
    i += 1
    start = i
    while i < n:
        c = _at(s, i)
        if c == 92:  # backslash: quoted-pair
            if i + 1 >= n:
                break
            out.append(s[start:i])
            out.append(s[i + 1])
            i += 2
            start = i
            continue
        if c == 34:
            out.append(s[start:i])
            return i + 1, "".join(out)
        i += 1
    raise _bad(f"Unterminated quote in {what}")


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline Py_ssize_t _skip_ws(str s, Py_ssize_t i):
    cdef Py_ssize_t n = len(s)
    while i < n and _u_lws(_at(s, i)):
        i += 1
    return i


@cython.boundscheck(False)
@cython.wraparound(False)
cdef dict _parse_params(str s, Py_ssize_t i, str what):
    """``;name[=value]`` list from ``s[i:]`` (LWS allowed around ``;`` and ``=``)."""
    cdef dict params = {}
    cdef Py_ssize_t n = len(s), j
    cdef Py_UCS4 c
    while True:
        i = _skip_ws(s, i)
        if i >= n:
            return params
        if _at(s, i) != 59:
            raise _bad(f"Bad {what} parameters")
        i = _skip_ws(s, i + 1)
        j = i
        while j < n and _u_tok(_at(s, j)):
            j += 1
        if j == i:
            raise _bad(f"Empty {what} parameter")
        name = s[i:j].lower()
        i = _skip_ws(s, j)
        value = None
        if i < n and _at(s, i) == 61:
            i = _skip_ws(s, i + 1)
            if i < n and _at(s, i) == 34:
                i, value = _read_quoted(s, i, what)
            else:
                j = i
                while j < n:
                    c = _at(s, j)
                    if _u_lws(c) or c == 59 or c == 44 or c == 34 or c == 60 or c == 62:
                        break
                    j += 1
                if j == i:
                    raise _bad(f"Empty {what} parameter value")
                value = s[i:j]
                i = j
        params.setdefault(name, value)


cdef inline bint _u_hostc(Py_UCS4 c) noexcept:
    # parser_py._HOST_CHARS: ALPHA DIGIT . - _
    return (48 <= c <= 57) or (c < 128 and 97 <= (<uint32_t>c | 0x20) <= 122) or c == 46 or c == 45 or c == 95


cdef inline bint _u_ipv6c(Py_UCS4 c) noexcept:
    # parser_py._IPV6_CHARS: HEXDIG : .
    return (48 <= c <= 58) or (c < 128 and 97 <= (<uint32_t>c | 0x20) <= 102) or c == 46


@cython.boundscheck(False)
@cython.wraparound(False)
cdef str _check_host(str host, str what):
    cdef Py_ssize_t i, n = len(host)
    if n == 0:
        raise _bad(f"Missing {what} host")
    if _at(host, 0) == 91:  # '['
        if _at(host, n - 1) != 93 or n < 4:
            raise _bad(f"Bad {what} host")
        for i in range(1, n - 1):
            if not _u_ipv6c(_at(host, i)):
                raise _bad(f"Bad {what} host")
    else:
        for i in range(n):
            if not _u_hostc(_at(host, i)):
                raise _bad(f"Bad {what} host")
    return host.lower()


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _check_port(str p, str what, str part) except -1:
    """``port = 1*DIGIT``, 1..65535: port 0 cannot be sent to (RFC 3261 §19.1.1, §20.42).
    The reason (``Bad <what> <part>``) is built only on failure."""
    cdef Py_ssize_t n = len(p), i
    cdef int v = 0
    cdef Py_UCS4 c
    if n == 0 or n > 5:
        raise _bad(f"Bad {what} {part}")
    for i in range(n):
        c = _at(p, i)
        if c < 48 or c > 57:
            raise _bad(f"Bad {what} {part}")
        v = v * 10 + (<int>c - 48)
    if v == 0 or v > 65535:
        raise _bad(f"Bad {what} {part}")
    return v


def _is_ipv4(str s):
    """RFC 3261 §25.1 ``IPv4address``: four dot-separated 1-3 digit numbers, each <= 255."""
    parts = s.split(".")
    return len(parts) == 4 and all(0 < len(p) <= 3 and p.isascii() and p.isdigit() and int(p) <= 255
                                   for p in parts)


def _is_ipv6(str s):
    """RFC 3261 §25.1 ``IPv6address`` (hex groups, one ``::`` at most, an IPv4 tail allowed)."""
    if s.count("::") > 1 or not s or not s.isascii():
        return False
    head, dbl, tail = s.partition("::")
    groups = (head.split(":") if head else []) + (tail.split(":") if tail else [])
    n = 0
    for i, g in enumerate(groups):
        if i == len(groups) - 1 and "." in g:
            if not _is_ipv4(g):
                return False
            n += 2
        elif 0 < len(g) <= 4 and all(c in "0123456789abcdefABCDEF" for c in g):
            n += 1
        else:
            return False
    return n < 8 if dbl else n == 8


def _is_ip(str s):
    """An IP address as in ``received=`` (RFC 3261 §18.2.1); an IPv6 one with or without []."""
    if s.startswith("[") and s.endswith("]"):
        return _is_ipv6(s[1:-1])
    return _is_ipv4(s) or _is_ipv6(s)


def parse_uri(str s):
    """Parse a URI (``sip``, ``sips``, ``tel`` structured; other schemes opaque).

    :raises SipBadHeader: malformed URI.
    """
    return _parse_uri(s, "URI")


@cython.boundscheck(False)
@cython.wraparound(False)
cdef SipUri _parse_uri(str s, str what):
    """``parse_uri`` whose errors name ``what`` (``"Contact"``, ``"Request-URI"`` ...).

    Works on indices into ``s`` (one substring per field kept), the same grammar as
    ``parser_py._parse_uri``; every header view goes through here.
    """
    cdef Py_ssize_t n = len(s), i, sc, at, end, pend, q, rb, colon
    cdef Py_UCS4 c
    cdef unsigned int kind = PyUnicode_KIND(s)
    cdef void* data = PyUnicode_DATA(s)
    # scheme: [A-Za-z][A-Za-z0-9+.-]* ":"
    if n == 0:
        raise _bad(f"Bad {what} scheme")
    c = PyUnicode_READ(kind, data, 0)
    if not (c < 128 and 97 <= (<uint32_t>c | 0x20) <= 122):
        raise _bad(f"Bad {what} scheme")
    i = 1
    while i < n:
        c = PyUnicode_READ(kind, data, i)
        if not (c < 128 and ((48 <= c <= 57) or 97 <= (<uint32_t>c | 0x20) <= 122 or c == 43 or c == 46 or c == 45)):
            break
        i += 1
    if i >= n or PyUnicode_READ(kind, data, i) != 58:
        raise _bad(f"Bad {what} scheme")
    sc = i
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c <= 32 or c == 60 or c == 62 or c == 34 or c == 127:
            raise _bad(f"Bad {what} character")
    if sc == 3 and _ieq3(kind, data, 115, 105, 112):  # the common schemes without allocating
        scheme = "sip"
    elif sc == 4 and _ieq3(kind, data, 115, 105, 112) and (<uint32_t>PyUnicode_READ(kind, data, 3) | 0x20) == 115:
        scheme = "sips"
    elif sc == 3 and _ieq3(kind, data, 116, 101, 108):
        scheme = "tel"
    else:
        scheme = s[:sc].lower()
    if sc < 5 and (scheme == "sip" or scheme == "sips"):
        user = password = None
        i = sc + 1
        at = s.find("@", i)
        if at >= 0:
            if s.find("@", at + 1) >= 0:
                raise _bad(f"Bad {what}")
            colon = s.find(":", i, at)
            if colon >= 0:
                user = s[i:colon]
                password = s[colon + 1:at]
            else:
                user = s[i:at]
            if not user:
                raise _bad(f"Empty {what} user")
            i = at + 1
        # hostport ends at the first ';' or '?'
        end = i
        while end < n:
            c = PyUnicode_READ(kind, data, end)
            if c == 59 or c == 63:
                break
            end += 1
        port = None
        if i < end and PyUnicode_READ(kind, data, i) == 91:  # "["
            rb = s.find("]", i, end)
            if rb < 0:
                raise _bad(f"Bad {what} host")
            host = s[i:rb + 1]
            if rb + 1 < end:
                if PyUnicode_READ(kind, data, rb + 1) != 58:
                    raise _bad(f"Bad {what} host")
                port = _check_port(s[rb + 2:end], what, "port")
        else:
            colon = s.find(":", i, end)
            if colon >= 0:
                if s.find(":", colon + 1, end) >= 0:  # RFC 3261 §19.1.1: an IPv6 reference needs []
                    raise _bad(f"Bad {what} host")
                host = s[i:colon]
                port = _check_port(s[colon + 1:end], what, "port")
            else:
                host = s[i:end]
        host = _check_host(host, what)
        params: dict = {}
        headers: dict = {}
        q = s.find("?", end)
        pend = n if q < 0 else q
        if end < pend:  # ";param..." up to "?" or the end
            for item in s[end + 1:pend].split(";"):
                name, eq, value = item.partition("=")
                if not name:
                    raise _bad(f"Empty {what} parameter")
                params.setdefault(name.lower(), value if eq else None)
        if q >= 0:
            for item in s[q + 1:].split("&"):
                name, eq, value = item.partition("=")
                if not name or not eq:
                    raise _bad(f"Bad {what} header")
                headers.setdefault(name, value)
        return _mk_uri(s, scheme, user, password, host, port, params, headers)
    rest = s[sc + 1:]
    if not rest:
        raise _bad(f"Empty {what}")
    if scheme == "tel":
        number, _, ptext = rest.partition(";")
        params = {}
        if ptext:
            for item in ptext.split(";"):
                name, eq, value = item.partition("=")
                if not name:
                    raise _bad(f"Empty {what} parameter")
                params.setdefault(name.lower(), value if eq else None)
        return _mk_uri(s, scheme, number, None, "", None, params, {})
    return _mk_uri(s, scheme, None, None, "", None, {}, {})


cdef inline bint _ieq3(unsigned int kind, void* data, uint32_t a, uint32_t b, uint32_t c) noexcept:
    # the first three characters, case-insensitively, are the lower-case letters a b c
    return ((<uint32_t>PyUnicode_READ(kind, data, 0) | 0x20) == a
            and (<uint32_t>PyUnicode_READ(kind, data, 1) | 0x20) == b
            and (<uint32_t>PyUnicode_READ(kind, data, 2) | 0x20) == c)


def parse_name_addr(str s):
    """Parse ``["display"] <uri> *(;param)`` or ``addr-spec *(;param)`` or ``*``.

    :raises SipBadHeader: malformed value.
    """
    return _parse_name_addr(s, "Address")


@cython.boundscheck(False)
@cython.wraparound(False)
cdef NameAddr _parse_name_addr(str s, str what):
    """``parse_name_addr`` whose errors name the header ``what`` (``"From"``, ``"Contact"`` ...)."""
    cdef Py_ssize_t n = len(s), i = 0, k, lt, gt
    cdef Py_UCS4 c
    cdef str text
    while i < n and _u_lws(_at(s, i)):  # s.strip(_LWS_S), without a copy when there is nothing to strip
        i += 1
    while n > i and _u_lws(_at(s, n - 1)):
        n -= 1
    text = s if i == 0 and n == len(s) else s[i:n]
    n = len(text)
    i = 0
    if n == 1 and _at(text, 0) == 42:  # "*"
        return _mk_name_addr(text, None, None, {}, True)
    if n == 0:
        raise _bad(f"Empty {what}")
    display = None
    if _at(text, 0) == 34:
        i, display = _read_quoted(text, 0, f"{what} display name")
        i = _skip_ws(text, i)
        if i >= n or _at(text, i) != 60:
            raise _bad(f"Bad {what} display name")
        lt = i
    else:
        lt = -1
        for k in range(n):
            c = _at(text, k)
            if c == 60:
                lt = k
                break
            if c == 59 or c == 34:
                break
        if lt > 0:
            for k in range(lt):  # display-name = *(token LWS): tokens only
                c = _at(text, k)
                if not (_u_tok(c) or _u_lws(c)):
                    raise _bad(f"Bad {what} display name")
            words = text[:lt].split()
            display = " ".join(words) if words else None
    if lt >= 0:
        gt = text.find(">", lt)
        if gt < 0:
            raise _bad(f"Unterminated < in {what}")
        if gt == lt + 1 or _u_lws(_at(text, lt + 1)) or _u_lws(_at(text, gt - 1)):
            raise _bad(f"Bad {what}")  # RFC 4475 §3.1.2.9 badaspec: no LWS inside <>
        uri_text = text[lt + 1: gt]
        i = gt + 1
    else:
        semi = text.find(";")
        uri_text = text if semi < 0 else text[:semi]
        uri_text = uri_text.rstrip(_LWS_S)
        # RFC 3261 §20: a URI with ',', '?' or ';' must be inside <> (RFC 4475 regbadct)
        if "," in uri_text or "?" in uri_text:
            raise _bad(f"Bad {what}: URI must be in <>")
        i = len(uri_text)
    uri = _parse_uri(uri_text, what)
    params = _parse_params(text, i, what)
    return _mk_name_addr(text, display, uri, params, False)


def parse_via(str s):
    """Parse one Via value (``SIP / 2.0 / UDP host:port ;params``, LWS allowed).

    :raises SipBadHeader: malformed value or protocol other than SIP/2.0.
    """
    return _parse_via(s)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Via _parse_via(str s):
    cdef Py_ssize_t n = len(s), i, j, e
    cdef int k
    i = _skip_ws(s, 0)
    parts = []
    for k in range(3):
        j = i
        while j < n and _u_tok(_at(s, j)):
            j += 1
        if j == i:
            raise _bad("Bad Via")
        parts.append(s[i:j])
        i = _skip_ws(s, j)
        if k < 2:
            if i >= n or _at(s, i) != 47:  # "/"
                raise _bad("Bad Via")
            i = _skip_ws(s, i + 1)
    if parts[0].upper() != "SIP" or parts[1] != "2.0":
        raise _bad("Bad Via protocol")
    if i == 0 or not _u_lws(_at(s, i - 1)):
        raise _bad("Bad Via")
    transport = parts[2].upper()
    # sent-by
    if i < n and _at(s, i) == 91:  # "["
        j = s.find("]", i)
        if j < 0:
            raise _bad("Bad Via host")
        j += 1
    else:
        j = i
        while j < n and _u_hostc(_at(s, j)):
            j += 1
        e = j
        while e < n and (_u_hostc(_at(s, e)) or _at(s, e) == 58):
            e += 1
        if s.count(":", j, e) > 1:  # RFC 3261 §25.1: an IPv6 reference must be in brackets
            raise _bad("Bad Via host")
    host = _check_host(s[i:j], "Via")
    i = _skip_ws(s, j)
    port = None
    if i < n and _at(s, i) == 58:  # ":"
        i = _skip_ws(s, i + 1)
        j = i
        while j < n and 48 <= _at(s, j) <= 57:
            j += 1
        port = _check_port(s[i:j], "Via", "port")
        i = j
    params = _parse_params(s, i, "Via")
    # RFC 3261 §20.42 via-params, RFC 3581: rport is empty or a port, received an address,
    # branch a token
    if "rport" in params and params["rport"] is not None:
        _check_port(params["rport"], "Via", "rport")
    if "received" in params and not _is_ip(params["received"] or ""):
        raise _bad("Bad Via received")
    if "branch" in params and not params["branch"]:
        raise _bad("Bad Via branch")
    return _mk_via(s.strip(_LWS_S), transport, host, port, params)


# --------------------------------------------------------------------------------------
# List splitting (Via, Contact, Route, Allow ...)


@cython.boundscheck(False)
@cython.wraparound(False)
cpdef list _split_list(str value):
    """Split a list header value on commas outside quotes and <>; drop empty items."""
    cdef list out = []
    cdef Py_ssize_t start = 0, i = 0, n = len(value)
    cdef bint inq = 0
    cdef int depth = 0
    cdef Py_UCS4 c
    while i < n:
        c = _at(value, i)
        if inq:
            if c == 92:
                i += 1
            elif c == 34:
                inq = 0
        elif c == 34:
            inq = 1
        elif c == 60:
            depth += 1
        elif c == 62:
            if depth:
                depth -= 1
        elif c == 44 and depth == 0:
            item = value[start:i].strip(_LWS_S)
            if item:
                out.append(item)
            start = i + 1
        i += 1
    item = value[start:].strip(_LWS_S)
    if item:
        out.append(item)
    return out


# --------------------------------------------------------------------------------------
# Building responses (no re-parse: header lines are copied from the request's buffer)


_VIA_PARAM_RE = {
    name: re.compile(r";[ \t]*" + name + r"(?:[ \t]*=[ \t]*[^;, \t]*)?(?=[ \t]*(?:;|$))", re.I)
    for name in ("received", "rport")
}


def _set_via_param(str via, str name, str value):
    """Replace or append ``;name=value`` on a Via value (top one)."""
    cdef Py_ssize_t a, b
    if via.isascii() and "\\" not in value:  # (a backslash would be a template escape to subn)
        a = _via_param_span(via, name, &b)
        if a < 0:
            return f"{via};{name}={value}"
        return f"{via[:a]};{name}={value}{via[b:]}"
    if f";{name}" not in via.replace(" ", "").replace("\t", "").lower():
        return f"{via};{name}={value}"
    new, k = _VIA_PARAM_RE[name].subn(f";{name}={value}", via, count=1)
    return new if k else f"{via};{name}={value}"


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _via_param_span(str via, str name, Py_ssize_t* end):
    """Where ``_VIA_PARAM_RE[name]`` first matches the ASCII ``via``: its start (``end[0]`` its
    end), or -1. The pattern by hand: ``;``, SP/HT, the name in any case, optionally SP/HT ``=``
    SP/HT and a value of anything but ``;``, ``,``, SP and HT; then (looking ahead) SP/HT and
    ``;`` or the end (``$``: the end, or a final LF). Backtracking cannot find another match: a
    shorter value is followed by a value character, which the look-ahead refuses."""
    cdef const char* s = <const char*>PyUnicode_DATA(via)
    cdef const char* nm = <const char*>PyUnicode_DATA(name)
    cdef Py_ssize_t n = len(via), nlen = len(name), p, i, j, k
    for p in range(n):
        if s[p] != 59:
            continue
        i = p + 1
        while i < n and (s[i] == 32 or s[i] == 9):
            i += 1
        if i + nlen > n:
            return -1
        for j in range(nlen):
            if (<uint8_t>s[i + j] | 0x20) != <uint8_t>nm[j]:
                break
        else:
            j = i + nlen
            k = j
            while k < n and (s[k] == 32 or s[k] == 9):
                k += 1
            if k < n and s[k] == 61:  # "=" value
                k += 1
                while k < n and (s[k] == 32 or s[k] == 9):
                    k += 1
                while k < n and not (s[k] == 59 or s[k] == 44 or s[k] == 32 or s[k] == 9):
                    k += 1
                if _via_param_ends(s, n, k):
                    end[0] = k
                    return p
            if _via_param_ends(s, n, j):  # the name alone
                end[0] = j
                return p
    return -1


cdef inline bint _via_param_ends(const char* s, Py_ssize_t n, Py_ssize_t k) noexcept:
    # the look-ahead (?=[ \t]*(?:;|$))
    while k < n and (s[k] == 32 or s[k] == 9):
        k += 1
    return k == n or s[k] == 59 or (k == n - 1 and s[k] == 10)


cdef bytes _hdr_line(SipMessage msg, int k):
    """``Name: value\\r\\n`` of header line ``k`` (the canonical name of a known header), in one
    allocation instead of four (every response copies five or more such lines)."""
    cdef HdrSlot* sl = &msg._slots[k]
    cdef bytes name
    cdef const char* np
    cdef Py_ssize_t nlen
    cdef char* out
    cdef bytes line
    if sl.folded:
        name = HDR_NAMES_B[sl.htype] if sl.htype else msg._buf[sl.name_off:sl.name_off + sl.name_len]
        return name + b": " + _FOLD_RE.sub(" ", msg._value(k)).encode("utf-8", "surrogateescape") + b"\r\n"
    if sl.htype:
        name = HDR_NAMES_B[sl.htype]
        np = PyBytes_AS_STRING(name)
        nlen = PyBytes_GET_SIZE(name)
    else:
        np = msg._buf + sl.name_off
        nlen = sl.name_len
    line = PyBytes_FromStringAndSize(NULL, nlen + 4 + sl.val_len)
    out = PyBytes_AS_STRING(line)
    memcpy(out, np, nlen)
    out[nlen] = 58
    out[nlen + 1] = 32
    memcpy(out + nlen + 2, msg._buf + sl.val_off, sl.val_len)
    out[nlen + 2 + sl.val_len] = 13
    out[nlen + 3 + sl.val_len] = 10
    return line


HDR_NAMES_B = tuple(n.encode() for n in HDR_NAMES)


cdef bytes _clean_reason(str reason):
    cdef bytes b = reason.encode("utf-8", "replace")
    return bytes([c for c in b if c >= 0x20 and c != 0x7F])


# the status line of each status with its standard reason, built once
_STATUS_LINES = {status: b"SIP/2.0 %d " % status + _clean_reason(text) + b"\r\n" for status, text in REASONS.items()}


cdef int _check_no_crlf(to_tag, received, headers) except -1:
    for v in (to_tag, received):
        if v is not None and ("\r" in v or "\n" in v):
            raise ValueError("CR/LF in a response header value")
    for name, value in headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError("CR/LF in a response header")
    return 0


def build_response(SipMessage req, int status, reason=None, *, to_tag=None, headers=(), body=b"",
                   received=None, rport=None):
    """Build a response to ``req``.  See ``_sipparse.pyi``."""
    cdef list out
    cdef int k
    cdef bint first = 1
    cdef bytes to_line
    if not 100 <= status <= 699:
        raise ValueError("status must be 100..699")
    _check_no_crlf(to_tag, received, headers)
    line = _STATUS_LINES.get(status) if reason is None else None
    if line is None:
        line = b"SIP/2.0 %d " % status + _clean_reason(REASONS.get(status, "Unknown") if reason is None else reason) \
            + b"\r\n"
    out = [line]
    for k in range(req._nslots):
        if req._slots[k].htype != HDR_VIA:
            continue
        if first and (received is not None or rport is not None):
            vals = _split_list(req._value(k))
            if vals:
                top = vals[0]
                if received is not None:
                    top = _set_via_param(top, "received", received)
                if rport is not None:
                    top = _set_via_param(top, "rport", str(int(rport)))
                vals[0] = top
            out.append(b"Via: " + ", ".join(vals).encode("utf-8", "surrogateescape") + b"\r\n")
        else:
            out.append(_hdr_line(req, k))
        first = 0
    out.append(_hdr_line(req, req._first[HDR_FROM]))
    to_line = _hdr_line(req, req._first[HDR_TO])
    if to_tag is not None and req._to_tag() is None:
        to_line = to_line[:-2] + b";tag=" + to_tag.encode() + b"\r\n"
    out.append(to_line)
    out.append(_hdr_line(req, req._first[HDR_CALL_ID]))
    out.append(_hdr_line(req, req._first[HDR_CSEQ]))
    for name, value in headers:
        out.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
    out.append(b"Content-Length: %d\r\n\r\n" % len(body))
    out.append(bytes(body))
    return b"".join(out)


_RECOVER = {HDR_VIA: b"Via", HDR_FROM: b"From", HDR_TO: b"To", HDR_CALL_ID: b"Call-ID", HDR_CSEQ: b"CSeq"}
_MAX_RECOVER_LINE = 2048
_TOKEN_B = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")


def _is_token(b):
    return bool(b) and all(c in _TOKEN_B for c in b)


def build_stateless_error(data, err):
    """``SIP/2.0 <err.status> <err.reason>`` for a malformed request, or ``None``.

    See ``_sipparse.pyi``.
    """
    try:
        return _build_stateless_error(bytes(data), err)
    except Exception:  # recovery is best effort: never raise from the error path
        return None


def _build_stateless_error(bytes data, err):
    n = min(len(data), MAX_MESSAGE)
    pos = 0
    while pos < n and data[pos] in b"\r\n":
        pos += 1
    nl = data.find(b"\n", pos, n)
    if nl < 0:
        return None
    line = data[pos:nl].rstrip(b"\r")
    if line[:4].upper() == b"SIP/":
        return None  # responses never get an answer
    sp = line.find(b" ")
    if sp <= 0 or not _is_token(line[:sp]) or line[:sp] == b"ACK":
        return None
    found = {}
    p = nl + 1
    count = 0
    last = None
    while p < n and count <= MAX_HEADERS:
        nl = data.find(b"\n", p, n)
        if nl < 0:
            break
        ln = data[p:nl].rstrip(b"\r")
        p = nl + 1
        if not ln:
            break
        if ln[0] in b" \t":
            if last is not None and found[last]:
                found[last][-1] += b" " + ln.strip(b" \t")
            continue
        count += 1
        last = None
        colon = ln.find(b":")
        if colon <= 0:
            continue
        name = ln[:colon].rstrip(b" \t")
        if not _is_token(name):
            continue
        h = HDR_BY_LOWER.get(name.decode("ascii").lower(), 0)
        if h not in _RECOVER:
            continue
        found.setdefault(h, []).append(ln[colon + 1:].strip(b" \t"))
        last = h
    out = [b"SIP/2.0 %d " % err.status + _clean_reason(err.reason)[:100] + b"\r\n"]
    for h in (HDR_VIA, HDR_FROM, HDR_TO, HDR_CALL_ID, HDR_CSEQ):
        vals = found.get(h)
        if not vals or not vals[0]:
            return None
        if h != HDR_VIA and len(vals) != 1:
            return None
        for v in vals:
            if len(v) > _MAX_RECOVER_LINE or any(c < 0x20 or c == 0x7F for c in v):
                return None
        if h in (HDR_FROM, HDR_TO) and (
                vals[0].count(b'"') % 2 or vals[0].count(b"<") != vals[0].count(b">")):
            return None  # unbalanced quotes/brackets: cannot be copied into a parseable answer
        if h == HDR_CSEQ:
            # copied as it came, a bad number too (issue 9: `CSeq: abc OPTIONS` gets its 400,
            # as Kamailio's sanity module answers it); the method must be a token, never ACK
            parts = vals[0].split()
            if len(parts) != 2 or not _is_token(parts[1]) or parts[1] == b"ACK":
                return None
        for v in vals:
            out.append(_RECOVER[h] + b": " + v)
            if h == HDR_TO and b";tag=" not in v.replace(b" ", b"").lower():
                # RFC 3261 §8.2.6.2: a UAS adds a To tag; derive it so retransmits match
                out[-1] += b";tag=" + hashlib.blake2b(data[:n], digest_size=6).hexdigest().encode()
            out[-1] += b"\r\n"
    out.append(b"Content-Length: 0\r\n\r\n")
    return b"".join(out)


# -- Digest credentials (RFC 3261 §22.4, RFC 7616 §3.4) -------------------------------------

cdef inline bint _digest_name_char(Py_UCS4 c) noexcept:
    return (c >= u'a' and c <= u'z') or (c >= u'A' and c <= u'Z') or (c >= u'0' and c <= u'9') \
        or c == u'_' or c == u'-'


def digest_params(str value):
    """The parameters of ``Digest name=value, ...`` (names lower-cased, quoted values unquoted
    and unescaped), or None when the scheme is not Digest.

    One pass, and exactly what the oracle ``parser_py.digest_params`` (a regular expression
    findall) gives for every string, malformed ones included: a position where no
    ``name = value`` starts is skipped. A failed attempt skips the whole name it read (every
    position inside it fails the same way), so a hostile header costs linear time.
    """
    cdef str rest
    cdef Py_ssize_t n, i = 0, j, k, ns, ne, vs, ve
    cdef Py_UCS4 c
    cdef int kind
    cdef void *data
    cdef bint upper, escaped
    cdef dict params = {}
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    n = len(rest)
    kind = PyUnicode_KIND(rest)
    data = PyUnicode_DATA(rest)
    while i < n:
        j = i
        while j < n and Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, j)):
            j += 1
        ns = j
        upper = False
        while j < n:
            c = PyUnicode_READ(kind, data, j)
            if not _digest_name_char(c):
                break
            upper |= c >= u'A' and c <= u'Z'
            j += 1
        ne = j
        if ne == ns:
            i = ns + 1                      # no name here, nor in the white space before it
            continue
        while j < n and Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, j)):
            j += 1
        if j >= n or PyUnicode_READ(kind, data, j) != u'=':
            i = ne
            continue
        j += 1
        while j < n and Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, j)):
            j += 1
        vs = j
        ve = -1
        escaped = False
        if j < n and PyUnicode_READ(kind, data, j) == u'"':   # a quoted string: \ escapes any but LF
            k = j + 1
            while k < n:
                c = PyUnicode_READ(kind, data, k)
                if c == u'"':
                    ve = k + 1
                    break
                if c == u'\\':
                    if k + 1 < n and PyUnicode_READ(kind, data, k + 1) != u'\n':
                        escaped = True
                        k += 2
                        continue
                    break
                k += 1
        if ve < 0:                          # else a token: up to white space or a comma
            k = j
            while k < n:
                c = PyUnicode_READ(kind, data, k)
                if Py_UNICODE_ISSPACE(c) or c == u',':
                    break
                escaped |= c == u'\\'
                k += 1
            if k == j:
                i = ne
                continue
            ve = k
        j = ve
        while j < n and Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, j)):
            j += 1
        if j < n and PyUnicode_READ(kind, data, j) == u',':
            j += 1
        if PyUnicode_READ(kind, data, vs) == u'"':   # unquoted as the oracle does: first and last dropped
            raw = rest[vs + 1:ve - 1]
            if escaped:
                raw = raw.replace('\\"', '"').replace("\\\\", "\\")
        else:
            raw = rest[vs:ve]
        name = rest[ns:ne]
        params[name.lower() if upper else name] = raw
        i = j
    return params
