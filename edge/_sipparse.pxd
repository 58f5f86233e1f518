# Declarations for the zero-copy SIP parser (edge/_sipparse.pyx).
# The message owns the datagram bytes and keeps offsets into it, not substrings
# (Kamailio hdr_field, httptools field_data).
from libc.stdint cimport uint8_t, uint32_t, int16_t, int64_t, uint64_t


cdef enum:
    MAX_MESSAGE = 65536     # bytes per message (datagram or stream frame); over -> 413
    MAX_HEADERS = 128       # header lines per message (continuations not counted)
    MAX_LINE = 8192         # bytes per physical line, CRLF excluded
    HDR_SLOTS = 64          # size of _first[]: must be >= HDR_COUNT (_hdrnames.pxi), checked at import


# Bits of SipMessage._done: which lazily decoded values are cached.
cdef enum:
    DONE_CALL_ID = 1
    DONE_FROM_TAG = 2
    DONE_TO_TAG = 4
    DONE_BRANCH = 8
    DONE_METHOD = 16


ctypedef struct HdrSlot:
    uint8_t  htype          # HDR_*; HDR_OTHER (0) if unknown
    uint8_t  folded         # value spans continuation lines: unfold (LWS -> SP) on decode
    uint32_t name_off       # header name as written (compact forms included)
    uint32_t name_len
    uint32_t val_off        # value, leading/trailing SP/HT trimmed; not uint16 (httptools #142)
    uint32_t val_len


cdef class SipMessage:
    cdef bytes _raw                 # owns the buffer every offset points into
    cdef const char* _buf           # PyBytes_AS_STRING(_raw)
    cdef Py_ssize_t _len            # len(_raw)
    cdef HdrSlot _slots[MAX_HEADERS]  # one per header line, in order
    cdef int _nslots                # used entries of _slots
    cdef uint64_t _present          # bit per HDR_* seen (Kamailio HDR_T2F)
    cdef int16_t _first[HDR_SLOTS]  # first slot of each HDR_*; valid only if its _present bit is set
    cdef bint _is_request           # request (True) or response
    cdef int _status                # response status code, 0 for requests
    cdef uint32_t _m_off            # request method in the request line
    cdef uint32_t _m_len
    cdef uint32_t _ruri_off         # Request-URI text
    cdef uint32_t _ruri_len
    cdef uint32_t _reason_off       # response reason phrase
    cdef uint32_t _reason_len
    cdef uint32_t _body_off         # body (already cut to Content-Length)
    cdef uint32_t _body_len
    cdef int64_t _cl                # declared Content-Length, -1 when absent
    cdef uint32_t _cseq             # CSeq number (< 2**31, RFC 3261 §8.1.1.5)
    cdef uint32_t _cm_off           # CSeq method
    cdef uint32_t _cm_len
    cdef uint32_t _done             # DONE_* bits: which of the caches below are filled
    cdef object _c_method           # cached str of the method
    cdef object _c_call_id          # cached Call-ID str
    cdef object _c_from_tag         # cached From tag (str or None)
    cdef object _c_to_tag           # cached To tag (str or None)
    cdef object _c_branch           # cached top Via branch (str or None)
    cdef dict _lazy                 # structured views (top_via, vias, from_, to, contacts, uri, expires)
    cdef bint _valid                # validate() passed once: every view in _lazy is decoded and checked

    cdef object _value(self, int k)
    cdef bytes _value_bytes(self, int k)
    cdef object _name(self, int k)
    cdef object _tag_of(self, int h, const char* name, Py_ssize_t nlen, bint first_only)
    cdef object _from_tag(self)
    cdef object _to_tag(self)
    cdef object _branch(self)
    cdef list _slots_for(self, str name, int* htype)
    cdef object _view(self, str key)
    cdef object _make_view(self, str key)
    cdef object _top_via_text(self)
    cpdef validate(self)
    cdef object _validate_response(self)
    cdef object _validate_contacts(self, bint register)
    cdef object _address(self, int h, str what)
    cdef object _expires_value(self)
    cdef object _element_error(self, object err, int k, int j, object param)
