# cython: language_level=3, embedsignature=True
"""RTP/RTCP relay engine: a native pthread on epoll with recvmmsg/sendmmsg.

Layout and field comments are in ``_rtp.pxd``; the public contract and its
docstrings in ``_rtp.pyi``; design (thread, latching rule, counters) in
``docs/media.md``.
"""
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno, EAGAIN, EINTR, EADDRINUSE, EACCES, ECONNREFUSED
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, UINT64_MAX
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport close, read, write

import collections
import os
import resource
import time

# Index = DROP_* value (_rtp.pxd).
DROP_REASONS = ("short", "version", "oversize", "source", "no_dest", "send", "srtp_auth", "srtp_replay",
                "srtp_protect")
_LEGS = {"a": 0, "A": 0, "b": 1, "B": 1}

# SDES crypto suites (RFC 4568 §6.2, RFC 6188, RFC 7714 §12) -> master key + salt length in bytes.
SRTP_SUITES = {
    "AES_CM_128_HMAC_SHA1_80": 30,
    "AES_CM_128_HMAC_SHA1_32": 30,
    "AES_256_CM_HMAC_SHA1_80": 46,
    "AEAD_AES_128_GCM": 28,
    "AEAD_AES_256_GCM": 44,
}


class SrtpError(ValueError):
    """libsrtp refused a key, a suite or a packet; ``reason`` is ``auth``, ``replay`` or ``error``."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


if srtp_init() != srtp_err_status_ok:
    raise ImportError("libsrtp2: srtp_init failed")

LegAddr = collections.namedtuple("LegAddr", "address rtp_port rtcp_port")
LegAddr.__doc__ = "Edge address of one relay leg: put these in the SDP sent to that leg."
RelayEvent = collections.namedtuple("RelayEvent", "relay_id tag kind leg")
RelayEvent.__doc__ = "Something the B2BUA must act on; ``kind`` is ``'timeout'``."


class StreamStats:
    """Counters of one direction-in stream (packets received on an edge port)."""

    __slots__ = ("packets", "bytes", "relayed", "relayed_bytes", "dropped", "lost",
                 "jitter", "jitter_ms", "last_packet_age", "source", "remote", "latched")

    def __init__(self, packets, bytes, relayed, relayed_bytes, dropped, lost,
                 jitter, jitter_ms, last_packet_age, source, remote, latched):
        self.packets = packets
        self.bytes = bytes
        self.relayed = relayed
        self.relayed_bytes = relayed_bytes
        self.dropped = dropped
        self.lost = lost
        self.jitter = jitter
        self.jitter_ms = jitter_ms
        self.last_packet_age = last_packet_age
        self.source = source
        self.remote = remote
        self.latched = latched

    @property
    def dropped_total(self):
        return sum(self.dropped.values())

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self):
        return "StreamStats(%s)" % ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__)


class LegStats:
    """RTP and RTCP counters of one leg (``'a'`` customer side, ``'b'`` carrier side)."""

    __slots__ = ("rtp", "rtcp", "echo")

    def __init__(self, rtp, rtcp, echo):
        self.rtp = rtp
        self.rtcp = rtcp
        self.echo = echo

    def as_dict(self):
        return {"rtp": self.rtp.as_dict(), "rtcp": self.rtcp.as_dict(), "echo": self.echo}

    def __repr__(self):
        return "LegStats(rtp=%r, rtcp=%r, echo=%r)" % (self.rtp, self.rtcp, self.echo)


class RelayStats:
    """Snapshot of a relay's counters (for CDRs)."""

    __slots__ = ("relay_id", "tag", "a", "b", "age")

    def __init__(self, relay_id, tag, a, b, age):
        self.relay_id = relay_id
        self.tag = tag
        self.a = a
        self.b = b
        self.age = age

    def leg(self, name):
        return self.a if _LEGS[name] == 0 else self.b

    def as_dict(self):
        return {"relay_id": self.relay_id, "tag": self.tag, "age": self.age,
                "a": self.a.as_dict(), "b": self.b.as_dict()}

    def __repr__(self):
        return "RelayStats(relay_id=%r, tag=%r, a=%r, b=%r)" % (self.relay_id, self.tag, self.a, self.b)


# ---------------------------------------------------------------------------
# Loop side: everything below until RelayEngine runs without the GIL.

cdef inline int64_t mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline bint same_addr(const rtp_addr *x, const rtp_addr *y) noexcept nogil:
    # sin_port and sin6_port sit at the same offset; only the family's own bytes count
    # (an IPv4 source leaves the tail of the buffer as it was).
    if x.sin6_family != y.sin6_family or x.sin6_port != y.sin6_port:
        return False
    if x.sin6_family == AF_INET:
        return (<const sockaddr_in *>x).sin_addr.s_addr == (<const sockaddr_in *>y).sin_addr.s_addr
    return memcmp(&x.sin6_addr, &y.sin6_addr, 16) == 0


cdef inline int64_t stream_lost(const rtp_stream *s) noexcept nogil:
    # RFC 3550 A.3: expected - received, plus earlier sequences of this stream.
    cdef int64_t expected
    if not s.seq_init:
        return s.lost_prev
    expected = <int64_t>(s.cycles + s.max_seq) - <int64_t>s.base_seq + 1
    return s.lost_prev + expected - <int64_t>s.received


cdef inline void seq_restart(rtp_stream *s, uint16_t seq, uint32_t ssrc) noexcept nogil:
    s.lost_prev = stream_lost(s)
    s.seq_init = 1
    s.ssrc = ssrc
    s.base_seq = seq
    s.max_seq = seq
    s.cycles = 0
    s.received = 0
    s.jit_init = 0


cdef inline void rtp_account(rtp_engine *eng, rtp_stream *s, const uint8_t *p, int64_t now) noexcept nogil:
    """RFC 3550 A.1 (sequence, simplified: no probation) and A.8 (jitter)."""
    cdef uint16_t seq = (<uint16_t>p[2] << 8) | p[3]
    cdef uint32_t ts = (<uint32_t>p[4] << 24) | (<uint32_t>p[5] << 16) | (<uint32_t>p[6] << 8) | p[7]
    cdef uint32_t ssrc = (<uint32_t>p[8] << 24) | (<uint32_t>p[9] << 16) | (<uint32_t>p[10] << 8) | p[11]
    cdef uint8_t pt = p[1] & 0x7F
    cdef uint16_t udelta
    cdef uint32_t arrival
    cdef int64_t transit, d
    if not s.seq_init or ssrc != s.ssrc:
        # New SSRC (re-INVITE, new source): new sequence space, RFC 3550 §8.2.
        seq_restart(s, seq, ssrc)
        s.pt = pt
    else:
        udelta = <uint16_t>(seq - s.max_seq)
        if udelta < MAX_DROPOUT:
            if seq < s.max_seq:
                s.cycles += 65536           # wrapped
            s.max_seq = seq
        elif udelta <= 65536 - MAX_MISORDER:
            # Very large jump: the sender restarted; resync (A.1 does so after 2 packets).
            seq_restart(s, seq, ssrc)
        # else: duplicate or reordered packet, counted as received below (A.1)
    s.received += 1
    if pt != s.pt:
        return                              # telephone-event / CN: other clock semantics
    # A.8: arrival in timestamp units; differences are taken modulo 2^32.
    arrival = <uint32_t>(<uint64_t>(<double>now * eng.clock_rate / 1e9))
    transit = <int32_t>(arrival - ts)
    if s.jit_init:
        d = transit - s.transit
        if d < 0:
            d = -d
        if d < 0x10000000:                  # ignore absurd jumps (timestamp reset)
            s.jitter += (<double>d - s.jitter) / 16.0
    s.transit = transit
    s.jit_init = 1


cdef void push_event(rtp_engine *eng, uint32_t gen, uint8_t kind, uint8_t leg) noexcept nogil:
    cdef uint64_t one = 1
    cdef uint32_t nxt = (eng.evq_tail + 1) % RTP_EVQ
    if nxt == eng.evq_head:
        eng.evq_overflow += 1
        return
    eng.evq[eng.evq_tail].gen = gen
    eng.evq[eng.evq_tail].kind = kind
    eng.evq[eng.evq_tail].leg = leg
    eng.evq_tail = nxt
    write(eng.evfd, &one, 8)


cdef void scan_timeouts(rtp_engine *eng, int64_t now) noexcept nogil:
    cdef uint32_t i
    cdef int k
    cdef rtp_relay *r
    cdef int64_t last, la, lb
    for i in range(eng.nslots):
        r = eng.slots[i]
        if r == NULL or not r.active or r.timed_out or r.timeout_ns <= 0:
            continue
        la = r.created_ns
        lb = r.created_ns
        for k in range(2):
            if r.st[k].last_ns > la:
                la = r.st[k].last_ns
            if r.st[2 + k].last_ns > lb:
                lb = r.st[2 + k].last_ns
        last = la if la > lb else lb
        if now - last > r.timeout_ns:
            r.timed_out = 1
            push_event(eng, r.gen, EVT_TIMEOUT, 0 if la <= lb else 1)


cdef inline srtp_err_status_t srtp_apply(srtp_t ctx, bint rtcp, bint protect, char *buf, int *len) noexcept nogil:
    if protect:
        return srtp_protect_rtcp(ctx, buf, len) if rtcp else srtp_protect(ctx, buf, len)
    return srtp_unprotect_rtcp(ctx, buf, len) if rtcp else srtp_unprotect(ctx, buf, len)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void handle_ready(rtp_engine *eng, rtp_relay *r, int idx, int64_t now) noexcept nogil:
    """Drain one ready socket: validate, unprotect, latch, count, protect, forward in one sendmmsg."""
    cdef rtp_stream *st = &r.st[idx]
    cdef rtp_stream *out
    cdef rtp_stream *sender
    cdef int got, i, j, nsend, sent, rounds, minlen, clear_len
    cdef unsigned int plen
    cdef const uint8_t *p
    cdef rtp_addr *src
    cdef srtp_err_status_t err
    cdef bint rtcp_pkt
    cdef int leg = idx >> 1
    cdef bint echo = r.echo[leg]
    # SRTP contexts: what this leg sends is unprotected with its key; what leaves toward the
    # destination leg (this one when echoing) is protected with the edge's key for that leg.
    cdef srtp_t rx = r.srtp_in[leg]
    cdef srtp_t tx = r.srtp_out[leg if echo else leg ^ 1]
    minlen = 8 if st.is_rtcp else 12
    # Echo: back out of the same socket to the source; else out of the other leg's socket.
    sender = st if echo else &r.st[idx ^ 2]
    out = &r.st[idx ^ 2]
    for rounds in range(RTP_READS_PER_WAKE):
        for i in range(RTP_BATCH):
            eng.rmsg[i].msg_hdr.msg_namelen = sizeof(rtp_addr)
            eng.rmsg[i].msg_hdr.msg_flags = 0
        got = recvmmsg(st.fd, eng.rmsg, RTP_BATCH, MSG_DONTWAIT, NULL)
        if got <= 0:
            return
        nsend = 0
        for i in range(got):
            plen = eng.rmsg[i].msg_len
            p = <const uint8_t *>eng.rbuf[i]
            src = &eng.rsrc[i]
            if plen > RTP_MAX_PKT or (eng.rmsg[i].msg_hdr.msg_flags & MSG_TRUNC):
                st.dropped[DROP_OVERSIZE] += 1
                continue
            if plen < <unsigned int>minlen:
                st.dropped[DROP_SHORT] += 1
                continue
            if (p[0] >> 6) != 2:
                st.dropped[DROP_VERSION] += 1
                continue
            # Symmetric RTP latching with strict source (docs/media.md, "Latching").
            if st.latched and not same_addr(src, &st.source):
                st.dropped[DROP_SOURCE] += 1
                continue
            clear_len = <int>plen
            # RTCP multiplexed on the RTP port (RFC 5761 §4: packet types 192-223) is SRTCP there.
            rtcp_pkt = st.is_rtcp or (192 <= p[1] <= 223)
            if rx != NULL:
                # Authenticated before it may latch: a forged packet cannot steer the stream.
                err = srtp_apply(rx, rtcp_pkt, False, eng.rbuf[i], &clear_len)
                if err != srtp_err_status_ok:
                    if err == srtp_err_status_replay_fail or err == srtp_err_status_replay_old:
                        st.dropped[DROP_SRTP_REPLAY] += 1
                    else:
                        st.dropped[DROP_SRTP_AUTH] += 1
                    continue
            if not st.latched:
                st.source = src[0]
                st.latched = 1
            st.packets += 1
            st.bytes += plen
            st.last_ns = now
            r.timed_out = 0
            if not st.is_rtcp:
                rtp_account(eng, st, p, now)
            if echo:
                eng.sdst[nsend] = src[0]
            elif out.hold:
                st.dropped[DROP_NODEST] += 1
                continue
            elif out.latched:
                eng.sdst[nsend] = out.source
            elif out.has_remote:
                eng.sdst[nsend] = out.remote
            else:
                st.dropped[DROP_NODEST] += 1
                continue
            if tx != NULL:
                # In place: RTP_BUFSZ leaves room for the tag (and the SRTCP index) past RTP_MAX_PKT.
                if srtp_apply(tx, rtcp_pkt, True, eng.rbuf[i], &clear_len) != srtp_err_status_ok:
                    st.dropped[DROP_SRTP_PROTECT] += 1
                    continue
            # Zero copy: the send vector points at the receive buffer.
            eng.siov[nsend].iov_base = eng.rbuf[i]
            eng.siov[nsend].iov_len = <size_t>clear_len
            eng.smsg[nsend].msg_len = 0
            nsend += 1
        if nsend:
            sent = 0
            while sent < nsend:
                i = sendmmsg(sender.fd, &eng.smsg[sent], <unsigned int>(nsend - sent), MSG_DONTWAIT)
                if i < 0:
                    if errno == EINTR:
                        continue
                    # EAGAIN/ECONNREFUSED/...: drop this one, keep the rest going.
                    st.dropped[DROP_SEND] += 1
                    sent += 1
                    continue
                for j in range(sent, sent + i):
                    st.relayed += 1
                    st.relayed_bytes += eng.smsg[j].msg_len
                sent += i
        if got < RTP_BATCH:
            return


cdef void *loop_main(void *arg) noexcept nogil:
    cdef rtp_engine *eng = <rtp_engine *>arg
    cdef epoll_event events[256]            # RTP_MAX_EVENTS
    cdef int n, i, idx
    cdef uint64_t tok, drain
    cdef uint32_t slot, gen
    cdef rtp_relay *r
    cdef int64_t now, last_scan = 0
    while True:
        pthread_mutex_lock(&eng.lock)
        if not eng.running:
            pthread_mutex_unlock(&eng.lock)
            break
        pthread_mutex_unlock(&eng.lock)
        n = epoll_wait(eng.epfd, events, RTP_MAX_EVENTS, 50)
        now = mono_ns()
        eng.loop_wakeups += 1
        for i in range(n):
            tok = events[i].data.u64
            if tok == UINT64_MAX:
                read(eng.wakefd, &drain, 8)
                continue
            gen = <uint32_t>(tok >> 32)
            slot = (<uint32_t>tok) >> 2
            idx = <int>(tok & 3)
            pthread_mutex_lock(&eng.lock)
            if slot < eng.nslots:
                r = eng.slots[slot]
                # A deleted relay's event may still be in this batch: check the generation.
                if r != NULL and r.active and r.gen == gen and r.st[idx].fd >= 0:
                    handle_ready(eng, r, idx, now)
            pthread_mutex_unlock(&eng.lock)
        if now - last_scan >= 100000000:    # 100 ms timeout granularity
            last_scan = now
            pthread_mutex_lock(&eng.lock)
            scan_timeouts(eng, now)
            pthread_mutex_unlock(&eng.lock)
    return NULL


cdef void engine_init_buffers(rtp_engine *eng) noexcept nogil:
    cdef int i
    for i in range(RTP_BATCH):
        eng.riov[i].iov_base = eng.rbuf[i]
        eng.riov[i].iov_len = RTP_BUFSZ
        memset(&eng.rmsg[i], 0, sizeof(mmsghdr))
        eng.rmsg[i].msg_hdr.msg_name = &eng.rsrc[i]
        eng.rmsg[i].msg_hdr.msg_namelen = sizeof(rtp_addr)
        eng.rmsg[i].msg_hdr.msg_iov = &eng.riov[i]
        eng.rmsg[i].msg_hdr.msg_iovlen = 1
        memset(&eng.smsg[i], 0, sizeof(mmsghdr))
        eng.smsg[i].msg_hdr.msg_name = &eng.sdst[i]
        eng.smsg[i].msg_hdr.msg_namelen = sizeof(rtp_addr)   # longer than a sockaddr_in: accepted
        eng.smsg[i].msg_hdr.msg_iov = &eng.siov[i]
        eng.smsg[i].msg_hdr.msg_iovlen = 1


cdef int drain_socket(int fd, unsigned long *dropped) noexcept nogil:
    """Discard every datagram queued on ``fd`` (a pooled socket about to serve a new call).

    0: the queue is empty; 1: still not empty after DRAIN_ROUNDS batches (a flood: the caller
    closes the pair instead); -1: an error other than "empty"."""
    cdef mmsghdr vec[32]                    # DRAIN_BATCH
    cdef int got, rounds
    # Zero-length iovecs: each datagram is dequeued and dropped, nothing is copied.
    memset(vec, 0, sizeof(vec))
    for rounds in range(DRAIN_ROUNDS):
        got = recvmmsg(fd, vec, DRAIN_BATCH, MSG_DONTWAIT, NULL)
        if got < 0:
            if errno == EAGAIN:                 # EWOULDBLOCK on Linux
                return 0
            if errno == EINTR or errno == ECONNREFUSED:     # a pending ICMP error is cleared by reading it
                continue
            return -1
        dropped[0] += <unsigned long>got
        if got < DRAIN_BATCH:
            return 0                        # recvmmsg stops early only when the queue ran dry
    return 1


cdef void totals_add(rtp_totals *t, const rtp_relay *r) noexcept nogil:
    cdef int k, j
    cdef const rtp_stream *s
    for k in range(4):
        s = &r.st[k]
        t.packets += s.packets
        t.bytes += s.bytes
        t.relayed += s.relayed
        t.relayed_bytes += s.relayed_bytes
        for j in range(DROP_COUNT):
            t.dropped[j] += s.dropped[j]
        if not s.is_rtcp:
            t.lost += stream_lost(s)


# ---------------------------------------------------------------------------
# SRTP sessions (libsrtp2). Made and freed here, with the GIL; used by the loop under the lock.

cdef srtp_t _srtp_session(str suite, bytes key, bint inbound) except NULL:
    """One libsrtp session for one direction of one leg: RTP and RTCP of any SSRC, replay on."""
    cdef srtp_policy_t policy
    cdef srtp_t session = NULL
    cdef unsigned char keybuf[64]
    want = SRTP_SUITES.get(suite)
    if want is None:
        raise SrtpError("error", "unsupported SRTP crypto suite %r" % (suite,))
    if len(key) != want:
        raise SrtpError("error", "%s needs a %d-byte master key and salt, got %d" % (suite, want, len(key)))
    memset(&policy, 0, sizeof(policy))
    if suite == "AES_CM_128_HMAC_SHA1_80":
        srtp_crypto_policy_set_rtp_default(&policy.rtp)
        srtp_crypto_policy_set_rtcp_default(&policy.rtcp)
    elif suite == "AES_CM_128_HMAC_SHA1_32":
        srtp_crypto_policy_set_aes_cm_128_hmac_sha1_32(&policy.rtp)
        srtp_crypto_policy_set_rtcp_default(&policy.rtcp)       # SRTCP keeps the 80-bit tag (RFC 4568 §6.2.2)
    elif suite == "AES_256_CM_HMAC_SHA1_80":
        srtp_crypto_policy_set_aes_cm_256_hmac_sha1_80(&policy.rtp)
        srtp_crypto_policy_set_aes_cm_256_hmac_sha1_80(&policy.rtcp)
    elif suite == "AEAD_AES_128_GCM":
        srtp_crypto_policy_set_aes_gcm_128_16_auth(&policy.rtp)
        srtp_crypto_policy_set_aes_gcm_128_16_auth(&policy.rtcp)
    else:
        srtp_crypto_policy_set_aes_gcm_256_16_auth(&policy.rtp)
        srtp_crypto_policy_set_aes_gcm_256_16_auth(&policy.rtcp)
    memcpy(keybuf, <const char *>key, want)
    policy.key = keybuf
    policy.ssrc.type = ssrc_any_inbound if inbound else ssrc_any_outbound
    policy.window_size = 128                                    # RFC 3711 §3.3.2: at least 64
    policy.allow_repeat_tx = 0
    policy.next = NULL
    err = srtp_create(&session, &policy)
    memset(keybuf, 0, sizeof(keybuf))                           # libsrtp keeps its own expanded keys
    if err != srtp_err_status_ok or session == NULL:
        raise SrtpError("error", "libsrtp could not create a %s session (error %d)" % (suite, <int>err))
    return session


cdef inline void _hold_pair(rtp_stream *rtp, rtp_stream *rtcp, int fd0, int fd1, int port) noexcept nogil:
    """A leg's RTP stream on ``port`` (``fd0``) and its RTCP on ``port + 1`` (``fd1``)."""
    rtp.fd = fd0
    rtp.port = <uint16_t>port
    rtp.is_rtcp = 0
    rtcp.fd = fd1
    rtcp.port = <uint16_t>(port + 1)
    rtcp.is_rtcp = 1


cdef extern from *:
    """
    #ifndef SIPEDGE_SRTP_CRYPTO
    #define SIPEDGE_SRTP_CRYPTO "debian"
    #endif
    """
    const char *SIPEDGE_SRTP_CRYPTO


cdef extern from "<srtp2/srtp.h>" nogil:
    const char *srtp_get_version_string()


def srtp_library():
    """``"libsrtp2 2.5.0 on openssl"``: the SRTP library linked and its crypto (``debian``: Debian's
    libsrtp2, built on NSS; ``openssl``: tools/build-libsrtp.sh's)."""
    return "%s on %s" % (srtp_get_version_string().decode(), SIPEDGE_SRTP_CRYPTO.decode())


cdef class SrtpContext:
    """One SRTP direction, for tests and tools: the same libsrtp session the relay uses.

    :param suite: a key of ``SRTP_SUITES``
    :param key: master key followed by master salt (RFC 4568 ``inline:`` decoded)
    :param inbound: True to unprotect (a receiver), False to protect (a sender)
    """

    cdef srtp_t _session
    cdef readonly bint inbound

    def __cinit__(self):
        self._session = NULL

    def __init__(self, str suite, bytes key, *, bint inbound):
        self._session = _srtp_session(suite, key, inbound)
        self.inbound = inbound

    def __dealloc__(self):
        if self._session != NULL:
            srtp_dealloc(self._session)
            self._session = NULL

    cdef bytes _apply(self, bytes packet, bint rtcp, bint protect):
        cdef char buf[2048]
        cdef int n = len(packet)
        cdef srtp_err_status_t err
        if protect == self.inbound:
            raise SrtpError("error", "this context %s" % ("unprotects" if self.inbound else "protects"))
        if n > 2048 - SRTP_MAX_TRAILER_LEN:
            raise SrtpError("error", "packet too long")
        memcpy(buf, <const char *>packet, n)
        err = srtp_apply(self._session, rtcp, protect, buf, &n)
        if err == srtp_err_status_ok:
            return PyBytes_FromStringAndSize(buf, n)
        if err == srtp_err_status_auth_fail:
            raise SrtpError("auth", "SRTP authentication failed")
        if err == srtp_err_status_replay_fail or err == srtp_err_status_replay_old:
            raise SrtpError("replay", "SRTP replay check failed")
        raise SrtpError("error", "libsrtp error %d" % <int>err)

    def protect(self, bytes packet):
        return self._apply(packet, False, True)

    def unprotect(self, bytes packet):
        return self._apply(packet, False, False)

    def protect_rtcp(self, bytes packet):
        return self._apply(packet, True, True)

    def unprotect_rtcp(self, bytes packet):
        return self._apply(packet, True, False)


cdef void _free_srtp(srtp_t *sessions) noexcept:
    """Free the four sessions of a relay (collected under the lock, freed after it)."""
    cdef int k
    for k in range(4):
        if sessions[k] != NULL:
            srtp_dealloc(sessions[k])
            sessions[k] = NULL


# ---------------------------------------------------------------------------
# Python side.

cdef str _fmt_addr(const rtp_addr *a):
    cdef char buf[64]
    cdef uint32_t ip
    if a.sin6_family == AF_INET6:
        inet_ntop(AF_INET6, &a.sin6_addr, buf, sizeof(buf))
        return buf.decode("ascii")
    ip = (<const sockaddr_in *>a).sin_addr.s_addr   # network order: first octet in low byte
    return "%d.%d.%d.%d" % (ip & 0xFF, (ip >> 8) & 0xFF, (ip >> 16) & 0xFF, (ip >> 24) & 0xFF)


cdef object _addr_tuple(const rtp_addr *a):
    return (_fmt_addr(a), ntohs(a.sin6_port))


cdef int _parse_ip(str host, rtp_addr *out) except -1:
    """``host`` (IPv4 dotted or IPv6 text) -> ``out`` with its family, port 0."""
    cdef bytes b = host.strip("[]").encode("ascii", "replace")
    cdef sockaddr_in *v4 = <sockaddr_in *>out
    memset(out, 0, sizeof(rtp_addr))
    if inet_pton(AF_INET, b, &v4.sin_addr) == 1:
        v4.sin_family = AF_INET
        return 0
    memset(out, 0, sizeof(rtp_addr))
    if inet_pton(AF_INET6, b, &out.sin6_addr) == 1:
        out.sin6_family = AF_INET6
        return 0
    raise ValueError("not an IP address: %r" % (host,))


cdef bint _unspecified(const rtp_addr *a) noexcept nogil:
    cdef int i
    if a.sin6_family == AF_INET:
        return (<const sockaddr_in *>a).sin_addr.s_addr == 0
    for i in range(16):
        if a.sin6_addr.s6_addr[i]:
            return False
    return True


cdef int _leg_index(leg) except -1:
    try:
        return _LEGS[leg]
    except (KeyError, TypeError):
        raise ValueError("leg must be 'a' or 'b', not %r" % (leg,)) from None


@cython.no_gc_clear
cdef class RelayEngine:

    def __cinit__(self):
        self._eng = NULL
        self._started = False

    def __init__(self, str address, int port_min, int port_max, *, double quiet_period=2.0,
                 double timeout=30.0, double clock_rate=8000.0, int tos=0xB8, address_b=None, pool=None):
        cdef uint32_t nslots
        cdef int first
        cdef epoll_event ev
        if not (0 < port_min <= port_max <= 65535):
            raise ValueError("bad port range %d-%d" % (port_min, port_max))
        _parse_ip(address, &self._bind[0])
        _parse_ip(address if address_b is None else address_b, &self._bind[1])
        self.address = address
        self.address_b = address if address_b is None else address_b
        self.port_min = port_min
        self.port_max = port_max
        self.quiet_period = quiet_period
        self.timeout = timeout
        if not 0 <= tos <= 255:
            raise ValueError("bad TOS byte %r" % tos)
        self.tos = tos
        first = port_min + (port_min & 1)            # RTP on even ports, RFC 3550 §11
        pairs = [p for p in range(first, port_max, 2) if p + 1 <= port_max]
        if len(pairs) < 2:
            raise ValueError("port range %d-%d holds fewer than 2 RTP/RTCP pairs" % (port_min, port_max))
        self._free_ports = collections.deque((p, 0.0) for p in pairs)
        # Bound pairs are kept open when a relay ends and handed to a later relay after the quiet
        # period, emptied first: no socket/bind/setsockopt/close per call (issue 10). Legs that
        # bind the same address share one pool; each pooled pair holds two descriptors, so the
        # default keeps at most a quarter of the process's descriptor limit in the pools.
        if pool is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            pool = len(pairs) if soft == resource.RLIM_INFINITY else min(len(pairs), soft // 8)
        if pool < 0:
            raise ValueError("bad pool size %r" % (pool,))
        self.pool_max = pool
        self.stale_dropped = 0
        same = memcmp(&self._bind[0], &self._bind[1], sizeof(rtp_addr)) == 0
        self._pools = [collections.deque()] if same else [collections.deque(), collections.deque()]
        self._pool_of[0] = 0
        self._pool_of[1] = 0 if same else 1
        nslots = <uint32_t>(len(pairs) // 2)
        self._free_slots = list(range(nslots - 1, -1, -1))
        self._relays = {}
        self._next_gen = 1
        self._eng = <rtp_engine *>calloc(1, sizeof(rtp_engine))
        if self._eng == NULL:
            raise MemoryError()
        self._eng.epfd = self._eng.wakefd = self._eng.evfd = -1
        pthread_mutex_init(&self._eng.lock, NULL)
        self._eng.nslots = nslots
        self._eng.clock_rate = clock_rate
        self._eng.slots = <rtp_relay **>calloc(nslots, sizeof(rtp_relay *))
        if self._eng.slots == NULL:
            raise MemoryError()
        engine_init_buffers(self._eng)
        self._eng.epfd = epoll_create1(EPOLL_CLOEXEC)
        self._eng.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self._eng.evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self._eng.epfd < 0 or self._eng.wakefd < 0 or self._eng.evfd < 0:
            raise OSError(errno, os.strerror(errno))
        ev.events = EPOLLIN
        ev.data.u64 = UINT64_MAX
        if epoll_ctl(self._eng.epfd, EPOLL_CTL_ADD, self._eng.wakefd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))

    def __dealloc__(self):
        cdef uint32_t i
        cdef rtp_engine *eng = self._eng
        if eng == NULL:
            return
        if self._started:
            eng.running = 0
            self._wake()
            with nogil:
                pthread_join(self._thread, NULL)
        if eng.slots != NULL:
            for i in range(eng.nslots):
                if eng.slots[i] != NULL:
                    for k in range(4):
                        if eng.slots[i].st[k].fd >= 0:
                            close(eng.slots[i].st[k].fd)
                    _free_srtp(eng.slots[i].srtp_in)            # srtp_in[2] and srtp_out[2] are adjacent
                    free(eng.slots[i])
            free(eng.slots)
        if self._pools is not None:         # RelayEngine is no_gc_clear: still there
            for dq in self._pools:
                for _, fd0, fd1, _ in dq:
                    close(fd0)
                    close(fd1)
        for fd in (eng.epfd, eng.wakefd, eng.evfd):
            if fd >= 0:
                close(fd)
        pthread_mutex_destroy(&eng.lock)
        free(eng)
        self._eng = NULL

    def _wake(self):
        cdef uint64_t one = 1
        write(self._eng.wakefd, &one, 8)

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        if self._started:
            return
        if self._eng == NULL:
            raise RuntimeError("engine closed")
        self._eng.running = 1
        if pthread_create(&self._thread, NULL, loop_main, self._eng) != 0:
            self._eng.running = 0
            raise OSError("pthread_create failed")
        self._started = True

    def stop(self):
        if self._eng == NULL:
            return
        if self._started:
            pthread_mutex_lock(&self._eng.lock)
            self._eng.running = 0
            pthread_mutex_unlock(&self._eng.lock)
            self._wake()
            with nogil:
                pthread_join(self._thread, NULL)
            self._started = False
        for relay in list(self._relays.values()):
            self._delete(relay, False)
        self._close_pools()
        # Every port is free now: the engine is gone, no quiet period needed.
        self._free_ports = collections.deque(sorted((p, 0.0) for p, _ in self._free_ports))

    @property
    def running(self):
        return self._started

    @property
    def event_fd(self):
        return self._eng.evfd

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- ports ---------------------------------------------------------------

    @property
    def pooled_pairs(self):
        """Bound RTP/RTCP pairs kept open for reuse (both legs' pools)."""
        return sum(len(dq) for dq in self._pools)

    @property
    def free_pairs(self):
        """Pairs no relay holds: unbound, or pooled (quiet or not); with ``2 * active_relays``
        it adds up to every pair of the range."""
        return len(self._free_ports) + self.pooled_pairs

    cdef _close_pools(self):
        for dq in self._pools:
            while dq:
                port, fd0, fd1, _ = dq.popleft()
                close(fd0)
                close(fd1)
                self._free_ports.append((port, 0.0))

    cdef int _take_pooled(self, rtp_stream *rtp, rtp_stream *rtcp, int leg) except -1:
        """The oldest pooled pair of ``leg``'s address whose quiet period is over, emptied of
        whatever reached it since its last relay ended: 1 if one was taken, else 0."""
        cdef int fd0, fd1
        cdef unsigned long dropped = 0
        dq = self._pools[self._pool_of[leg]]
        now = time.monotonic()
        while dq:
            port, fd0, fd1, ready = dq[0]
            if ready > now:
                return 0                            # FIFO: the rest are younger
            dq.popleft()
            # A late packet of the last call must never reach the next one (test_rtp_pool.py).
            if drain_socket(fd0, &dropped) == 0 and drain_socket(fd1, &dropped) == 0:
                self.stale_dropped += dropped
                _hold_pair(rtp, rtcp, fd0, fd1, port)
                return 1
            # Flooded (or broken): close it; the port waits a quiet period unbound.
            self.stale_dropped += dropped
            dropped = 0
            close(fd0)
            close(fd1)
            self._free_ports.append((port, now + self.quiet_period))
        return 0

    cdef object _alloc_pair(self):
        cdef double now = time.monotonic()
        dq = self._free_ports
        for _ in range(len(dq)):
            port, ready = dq[0]
            if ready > now:
                break                               # FIFO: the rest are younger
            dq.popleft()
            return port
        raise RuntimeError("no free RTP port pair in %d-%d (quiet period %.1fs)"
                           % (self.port_min, self.port_max, self.quiet_period))

    cdef int _open_pair(self, rtp_stream *rtp, rtp_stream *rtcp, int leg) except -1:
        """Bind an even RTP port and RTP+1 (RFC 3550 §11) on ``leg``'s address; skip ports
        in use by others. The two legs share one port pool (a port is free on both addresses)."""
        cdef rtp_addr sa
        cdef int fd0, fd1, k, tries
        cdef int bufsz = 1 << 20
        cdef int tos = self.tos
        cdef int family = self._bind[leg].sin6_family
        cdef socklen_t salen = sizeof(sockaddr_in6) if family == AF_INET6 else sizeof(sockaddr_in)
        if self._take_pooled(rtp, rtcp, leg):
            return 0
        tries = len(self._free_ports) + 1
        for k in range(tries):
            port = self._alloc_pair()
            fd0 = socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
            fd1 = socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
            if fd0 < 0 or fd1 < 0:
                err = errno
                if fd0 >= 0:
                    close(fd0)
                if fd1 >= 0:
                    close(fd1)
                self._free_ports.appendleft((port, 0.0))
                raise OSError(err, os.strerror(err))
            sa = self._bind[leg]
            sa.sin6_port = htons(<uint16_t>port)           # same offset as sin_port
            if bind(fd0, <sockaddr *>&sa, salen) == 0:
                sa.sin6_port = htons(<uint16_t>(port + 1))
                if bind(fd1, <sockaddr *>&sa, salen) == 0:
                    setsockopt(fd0, SOL_SOCKET, SO_RCVBUF, &bufsz, sizeof(int))
                    if tos and family == AF_INET6:
                        # the traffic class carries the same DSCP on IPv6 (RFC 2474)
                        setsockopt(fd0, IPPROTO_IPV6, IPV6_TCLASS, &tos, sizeof(int))
                        setsockopt(fd1, IPPROTO_IPV6, IPV6_TCLASS, &tos, sizeof(int))
                    elif tos:
                        # DSCP EF (46 << 2 = 0xB8) on relayed media, RFC 3246 / RFC 4594 (rtpengine.conf ships tos = 184).
                        setsockopt(fd0, IPPROTO_IP, IP_TOS, &tos, sizeof(int))
                        setsockopt(fd1, IPPROTO_IP, IP_TOS, &tos, sizeof(int))
                    _hold_pair(rtp, rtcp, fd0, fd1, port)
                    return 0
            err = errno
            close(fd0)
            close(fd1)
            if err not in (EADDRINUSE, EACCES):
                self._free_ports.appendleft((port, 0.0))
                raise OSError(err, os.strerror(err))
            # Someone else holds it: retry it later, after the quiet period.
            self._free_ports.append((port, time.monotonic() + self.quiet_period))
        raise RuntimeError("no bindable RTP port pair in %d-%d" % (self.port_min, self.port_max))

    cdef _release(self, rtp_relay *r, int *fds, bint quiet):
        """Give back ``r``'s port pairs; ``fds`` are its four sockets (-1: none), out of the
        epoll set: kept bound in the leg's pool while it has room, else closed."""
        cdef int k, leg, j
        ready = time.monotonic() + self.quiet_period if quiet else 0.0
        for leg in range(2):
            k = leg * 2
            if not r.st[k].port:
                continue
            dq = self._pools[self._pool_of[leg]]
            if fds[k] >= 0 and fds[k + 1] >= 0 and self.pooled_pairs < self.pool_max:
                dq.append((r.st[k].port, fds[k], fds[k + 1], ready))
                continue
            for j in (k, k + 1):
                if fds[j] >= 0:
                    close(fds[j])
            self._free_ports.append((r.st[k].port, ready))

    # -- relays --------------------------------------------------------------

    def create(self, str tag, *, timeout=None):
        cdef rtp_relay *r
        cdef rtp_relay tmp
        cdef uint32_t slot
        cdef epoll_event ev
        cdef int k
        if self._eng == NULL:
            raise RuntimeError("engine closed")
        if not self._free_slots:
            raise RuntimeError("relay table full")
        cdef int fds[4]
        memset(&tmp, 0, sizeof(tmp))
        for k in range(4):
            tmp.st[k].fd = -1
        try:
            self._open_pair(&tmp.st[ST_A_RTP], &tmp.st[ST_A_RTCP], 0)
            self._open_pair(&tmp.st[ST_B_RTP], &tmp.st[ST_B_RTCP], 1)
        except BaseException:
            # leg A's pair is back in its pool (already emptied: no quiet period) or closed
            for k in range(4):
                fds[k] = tmp.st[k].fd
            self._release(&tmp, fds, False)
            raise
        slot = self._free_slots.pop()
        gen = self._next_gen
        self._next_gen += 1
        tmp.gen = gen
        tmp.active = 1
        tmp.created_ns = mono_ns()
        tmp.timeout_ns = <int64_t>((self.timeout if timeout is None else timeout) * 1e9)
        pthread_mutex_lock(&self._eng.lock)
        r = self._eng.slots[slot]
        if r == NULL:
            r = <rtp_relay *>calloc(1, sizeof(rtp_relay))
            if r == NULL:
                pthread_mutex_unlock(&self._eng.lock)
                raise MemoryError()
            self._eng.slots[slot] = r
        memcpy(r, &tmp, sizeof(rtp_relay))
        ok = True
        for k in range(4):
            ev.events = EPOLLIN
            ev.data.u64 = (<uint64_t>gen << 32) | (<uint64_t>slot << 2) | <uint64_t>k
            if epoll_ctl(self._eng.epfd, EPOLL_CTL_ADD, r.st[k].fd, &ev) < 0:
                ok = False
        pthread_mutex_unlock(&self._eng.lock)
        cdef Relay relay = Relay.__new__(Relay)
        relay.engine = self
        relay.id = gen
        relay.tag = tag
        relay._slot = slot
        relay._deleted = False
        relay._srtp = [(None, None), (None, None)]
        relay.leg_a = LegAddr(self.address, tmp.st[ST_A_RTP].port, tmp.st[ST_A_RTCP].port)
        relay.leg_b = LegAddr(self.address_b, tmp.st[ST_B_RTP].port, tmp.st[ST_B_RTCP].port)
        self._relays[gen] = relay
        if not ok:
            self._delete(relay, False)
            raise OSError("epoll_ctl failed")
        return relay

    def get(self, relay_id):
        return self._relays.get(relay_id)

    def delete(self, relay_id):
        relay = self._relays.get(relay_id)
        if relay is None:
            return None
        return self._delete(relay, True)

    def _delete(self, Relay relay, bint quiet, bint full=True):
        cdef rtp_relay *r
        cdef int k
        cdef srtp_t sessions[4]
        cdef int fds[4]
        stats = self._snapshot(relay) if full else self._counts(relay)
        pthread_mutex_lock(&self._eng.lock)
        r = self._eng.slots[relay._slot]
        for k in range(4):
            # out of the loop's sight, but kept open: _release pools the pairs (or closes them)
            fds[k] = r.st[k].fd
            if r.st[k].fd >= 0:
                epoll_ctl(self._eng.epfd, EPOLL_CTL_DEL, r.st[k].fd, NULL)
                r.st[k].fd = -1
        totals_add(&self._eng.gone, r)
        r.active = 0
        for k in range(2):
            sessions[k] = r.srtp_in[k]
            sessions[2 + k] = r.srtp_out[k]
            r.srtp_in[k] = NULL
            r.srtp_out[k] = NULL
        pthread_mutex_unlock(&self._eng.lock)
        _free_srtp(sessions)
        self._release(r, fds, quiet)
        relay._deleted = True
        del self._relays[relay.id]
        self._free_slots.append(relay._slot)
        return stats

    cdef object _counts(self, Relay relay):
        """Per leg, the RTP stream's (packets, bytes, lost, dropped, jitter_ms), as _snapshot
        counts them, without the objects of a RelayStats."""
        cdef rtp_stream s
        cdef int leg, j
        cdef int64_t lost
        cdef uint64_t dropped
        cdef double rate = self._eng.clock_rate
        out = []
        for leg in range(2):
            pthread_mutex_lock(&self._eng.lock)
            memcpy(&s, &self._eng.slots[relay._slot].st[leg * 2], sizeof(rtp_stream))  # ST_A_RTP, ST_B_RTP
            pthread_mutex_unlock(&self._eng.lock)
            lost = stream_lost(&s)
            dropped = 0
            for j in range(DROP_COUNT):
                dropped += s.dropped[j]
            out.append((s.packets, s.bytes, lost if lost > 0 else 0, dropped, s.jitter * 1000.0 / rate))
        return tuple(out)

    cdef object _snapshot(self, Relay relay):
        cdef rtp_relay snap
        cdef rtp_stream *s
        cdef int k, leg
        cdef int64_t now = mono_ns()
        cdef double rate = self._eng.clock_rate
        pthread_mutex_lock(&self._eng.lock)
        memcpy(&snap, self._eng.slots[relay._slot], sizeof(rtp_relay))
        pthread_mutex_unlock(&self._eng.lock)
        legs = []
        for leg in range(2):
            streams = []
            for k in range(leg * 2, leg * 2 + 2):
                s = &snap.st[k]
                lost = stream_lost(s) if not s.is_rtcp else 0
                streams.append(StreamStats(
                    s.packets, s.bytes, s.relayed, s.relayed_bytes,
                    {DROP_REASONS[j]: s.dropped[j] for j in range(DROP_COUNT)},
                    lost if lost > 0 else 0,
                    s.jitter, s.jitter * 1000.0 / rate,
                    (now - s.last_ns) / 1e9 if s.last_ns else None,
                    _addr_tuple(&s.source) if s.latched else None,
                    _addr_tuple(&s.remote) if s.has_remote else None,
                    bool(s.latched)))
            legs.append(LegStats(streams[0], streams[1], bool(snap.echo[leg])))
        return RelayStats(relay.id, relay.tag, legs[0], legs[1], (now - snap.created_ns) / 1e9)

    def drain_events(self):
        cdef uint64_t cnt
        cdef rtp_event evs[4096]
        cdef uint32_t n = 0
        read(self._eng.evfd, &cnt, 8)             # non-blocking; resets the counter
        pthread_mutex_lock(&self._eng.lock)
        while self._eng.evq_head != self._eng.evq_tail and n < RTP_EVQ:
            evs[n] = self._eng.evq[self._eng.evq_head]
            self._eng.evq_head = (self._eng.evq_head + 1) % RTP_EVQ
            n += 1
        pthread_mutex_unlock(&self._eng.lock)
        out = []
        for i in range(n):
            relay = self._relays.get(evs[i].gen)
            if relay is None:
                continue                            # deleted meanwhile
            out.append(RelayEvent(evs[i].gen, relay.tag, "timeout", "ab"[evs[i].leg]))
        return out

    # -- metrics -------------------------------------------------------------

    @property
    def active_relays(self):
        return len(self._relays)

    @property
    def active_streams(self):
        """RTP streams of live relays that received media within their timeout."""
        cdef uint32_t i
        cdef int k
        cdef rtp_relay *r
        cdef int64_t now = mono_ns()
        cdef long n = 0
        pthread_mutex_lock(&self._eng.lock)
        for i in range(self._eng.nslots):
            r = self._eng.slots[i]
            if r == NULL or not r.active:
                continue
            for k in (ST_A_RTP, ST_B_RTP):
                if r.st[k].last_ns and (r.timeout_ns <= 0 or now - r.st[k].last_ns <= r.timeout_ns):
                    n += 1
        pthread_mutex_unlock(&self._eng.lock)
        return n

    def totals(self):
        """Monotonic engine counters (deleted relays included) and current jitter.

        Walks the slot table in C under the lock: O(relays), no per-packet Python.
        """
        cdef rtp_totals t
        cdef uint32_t i
        cdef int k
        cdef rtp_relay *r
        cdef double jsum = 0.0, jmax = 0.0
        cdef long jn = 0
        pthread_mutex_lock(&self._eng.lock)
        memcpy(&t, &self._eng.gone, sizeof(t))
        for i in range(self._eng.nslots):
            r = self._eng.slots[i]
            if r == NULL or not r.active:
                continue
            totals_add(&t, r)
            for k in (ST_A_RTP, ST_B_RTP):
                if r.st[k].jit_init:
                    jsum += r.st[k].jitter
                    jn += 1
                    if r.st[k].jitter > jmax:
                        jmax = r.st[k].jitter
        overflow = self._eng.evq_overflow
        pthread_mutex_unlock(&self._eng.lock)
        ms = 1000.0 / self._eng.clock_rate
        return {
            "relays_active": len(self._relays),
            "packets_received": t.packets,
            "bytes_received": t.bytes,
            "packets_relayed": t.relayed,
            "bytes_relayed": t.relayed_bytes,
            "dropped": {DROP_REASONS[j]: t.dropped[j] for j in range(DROP_COUNT)},
            "lost": t.lost if t.lost > 0 else 0,
            "jitter_mean_ms": (jsum / jn * ms) if jn else 0.0,
            "jitter_max_ms": jmax * ms,
            "jitter_streams": jn,
            "events_overflow": overflow,
        }


cdef class Relay:

    def __init__(self):
        raise TypeError("relays are made by RelayEngine.create()")

    cdef rtp_relay *_get(self) except NULL:
        if self._deleted or self.engine._eng == NULL:
            raise RuntimeError("relay %d was deleted" % self.id)
        return self.engine._eng.slots[self._slot]

    @property
    def deleted(self):
        return self._deleted

    def set_remote(self, str leg, str host, int rtp_port, rtcp_port=None):
        cdef int li = _leg_index(leg)
        cdef rtp_addr ip
        cdef rtp_relay *r = self._get()
        cdef rtp_stream *s
        cdef int k
        cdef int ports[2]
        _parse_ip(host, &ip)
        if ip.sin6_family != self.engine._bind[li].sin6_family:
            raise ValueError("leg %s relays IPv%d, the address %r is IPv%d" % (
                "ab"[li], 6 if self.engine._bind[li].sin6_family == AF_INET6 else 4, host,
                6 if ip.sin6_family == AF_INET6 else 4))
        if not (0 <= rtp_port <= 65535):
            raise ValueError("bad RTP port %r" % rtp_port)
        ports[0] = rtp_port
        ports[1] = (rtp_port + 1 if rtp_port else 0) if rtcp_port is None else rtcp_port
        if not (0 <= ports[1] <= 65535):
            raise ValueError("bad RTCP port %r" % rtcp_port)
        hold = _unspecified(&ip) or rtp_port == 0   # RFC 3264 §8.4 / RFC 2543 hold (0.0.0.0 or ::)
        pthread_mutex_lock(&self.engine._eng.lock)
        for k in range(2):
            s = &r.st[li * 2 + k]
            s.hold = hold
            s.has_remote = not hold
            s.remote = ip
            s.remote.sin6_port = htons(<uint16_t>ports[k])
            s.latched = 0                           # re-arm: latch on the next packet
        pthread_mutex_unlock(&self.engine._eng.lock)

    def set_srtp(self, str leg, rx=None, tx=None):
        """SRTP on ``leg``: ``rx`` = (suite, key) the leg protects with, ``tx`` = (suite, key) the
        edge protects with toward it; None = plain RTP that way. Unchanged parameters keep their
        session (its rollover counter and replay window go on across a re-offer)."""
        cdef int li = _leg_index(leg)
        cdef rtp_relay *r = self._get()
        cdef srtp_t made[2]
        cdef srtp_t old[4]
        cdef int k
        want = (rx, tx)
        have = self._srtp[li]
        made[0] = made[1] = NULL
        for k in range(4):
            old[k] = NULL
        try:
            for k in range(2):
                if want[k] is not None and want[k] != have[k]:
                    suite, key = want[k]
                    made[k] = _srtp_session(suite, key, k == 0)
        except BaseException:
            for k in range(2):
                if made[k] != NULL:
                    srtp_dealloc(made[k])
            raise
        pthread_mutex_lock(&self.engine._eng.lock)
        if want[0] != have[0]:
            old[0] = r.srtp_in[li]
            r.srtp_in[li] = made[0]
        if want[1] != have[1]:
            old[1] = r.srtp_out[li]
            r.srtp_out[li] = made[1]
        pthread_mutex_unlock(&self.engine._eng.lock)
        _free_srtp(old)
        self._srtp[li] = want

    def srtp(self, str leg):
        """Whether ``leg`` is SRTP: ``(receiving, sending)`` as two booleans (never the keys)."""
        rx, tx = self._srtp[_leg_index(leg)]
        return (rx is not None, tx is not None)

    def set_echo(self, str leg, bint on=True):
        cdef int li = _leg_index(leg)
        cdef rtp_relay *r = self._get()
        pthread_mutex_lock(&self.engine._eng.lock)
        r.echo[li] = on
        pthread_mutex_unlock(&self.engine._eng.lock)

    def stats(self):
        self._get()
        return self.engine._snapshot(self)

    def delete(self):
        if self._deleted:
            return None
        return self.engine.delete(self.id)

    def delete_counts(self):
        if self._deleted:
            return None
        return self.engine._delete(self, True, False)

    def __repr__(self):
        return "<Relay %d %r a=%s:%d b=%s:%d%s>" % (
            self.id, self.tag, self.leg_a.address, self.leg_a.rtp_port,
            self.leg_b.address, self.leg_b.rtp_port, " deleted" if self._deleted else "")
