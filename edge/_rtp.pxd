# cython: language_level=3
"""C-level layout of the RTP relay engine (see docs/media.md).

One native pthread runs the packet loop (epoll + recvmmsg/sendmmsg) without
the GIL. Python control calls (create/set_remote/delete/stats) take
``rtp_engine.lock`` for a few microseconds; the loop takes it once per ready
socket. Nothing in the loop ever calls back into Python: events (timeouts)
are queued in a ring and signalled through an eventfd.
"""
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from "<netinet/in.h>" nogil:
    ctypedef uint32_t in_addr_t
    ctypedef uint16_t in_port_t
    struct in_addr:
        in_addr_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        in_port_t sin_port
        in_addr sin_addr
    struct in6_addr:
        uint8_t s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        in_port_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    enum:
        AF_INET
        AF_INET6
        IPPROTO_UDP
        IPPROTO_IP
        IPPROTO_IPV6
        IP_TOS
        IPV6_TCLASS
        IPV6_V6ONLY
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        unsigned short sa_family
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    enum:
        SOCK_DGRAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_RCVBUF
        SO_SNDBUF
        MSG_DONTWAIT
        MSG_TRUNC
    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int recvmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags)


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)


# An IPv4 or IPv6 socket address: sin6_family says which (a sockaddr_in fits in it).
ctypedef sockaddr_in6 rtp_addr


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_create(pthread_t *th, const void *attr, void *(*fn)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t th, void **ret)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


cdef extern from "<srtp2/srtp.h>" nogil:
    # libsrtp2 (RFC 3711, RFC 7714): the packet loop calls protect/unprotect without the GIL.
    ctypedef struct srtp_ctx_t:
        pass
    ctypedef srtp_ctx_t *srtp_t
    ctypedef enum srtp_err_status_t:
        srtp_err_status_ok
        srtp_err_status_auth_fail
        srtp_err_status_replay_fail
        srtp_err_status_replay_old
    ctypedef enum srtp_ssrc_type_t:
        ssrc_any_inbound
        ssrc_any_outbound
    ctypedef struct srtp_ssrc_t:
        srtp_ssrc_type_t type
        unsigned int value
    ctypedef struct srtp_crypto_policy_t:
        pass
    ctypedef struct srtp_policy_t:
        srtp_ssrc_t ssrc
        srtp_crypto_policy_t rtp
        srtp_crypto_policy_t rtcp
        unsigned char *key
        unsigned long window_size
        int allow_repeat_tx
        srtp_policy_t *next
    enum:
        SRTP_MAX_TRAILER_LEN
    srtp_err_status_t srtp_init()
    srtp_err_status_t srtp_create(srtp_t *session, const srtp_policy_t *policy)
    srtp_err_status_t srtp_dealloc(srtp_t s)
    srtp_err_status_t srtp_protect(srtp_t ctx, void *hdr, int *len)
    srtp_err_status_t srtp_unprotect(srtp_t ctx, void *hdr, int *len)
    srtp_err_status_t srtp_protect_rtcp(srtp_t ctx, void *hdr, int *len)
    srtp_err_status_t srtp_unprotect_rtcp(srtp_t ctx, void *hdr, int *len)
    void srtp_crypto_policy_set_rtp_default(srtp_crypto_policy_t *p)
    void srtp_crypto_policy_set_rtcp_default(srtp_crypto_policy_t *p)
    void srtp_crypto_policy_set_aes_cm_128_hmac_sha1_32(srtp_crypto_policy_t *p)
    void srtp_crypto_policy_set_aes_cm_256_hmac_sha1_80(srtp_crypto_policy_t *p)
    void srtp_crypto_policy_set_aes_gcm_128_16_auth(srtp_crypto_policy_t *p)
    void srtp_crypto_policy_set_aes_gcm_256_16_auth(srtp_crypto_policy_t *p)


# If you add a DROP_* reason, update DROP_REASONS in _rtp.pyx and docs/media.md.
cdef enum:
    DROP_SHORT = 0       # shorter than an RTP (12) / RTCP (8) header, RFC 3550 §5.1/§6.4
    DROP_VERSION = 1     # version field != 2, RFC 3550 §5.1
    DROP_OVERSIZE = 2    # larger than RTP_MAX_PKT or truncated by the buffer
    DROP_SOURCE = 3      # not from the latched source (hijack protection)
    DROP_NODEST = 4      # other leg has no remote yet, or is on hold (0.0.0.0 / port 0)
    DROP_SEND = 5        # sendmmsg refused it (socket buffer full)
    DROP_SRTP_AUTH = 6   # SRTP/SRTCP authentication (or decryption) failed, RFC 3711 §3.3 step 7
    DROP_SRTP_REPLAY = 7 # SRTP/SRTCP index already seen or too old (replay protection, RFC 3711 §3.3.2)
    DROP_SRTP_PROTECT = 8  # libsrtp refused to protect it toward an SRTP leg (malformed header, repeated index)
    DROP_COUNT = 9

cdef enum:
    RTP_BATCH = 64       # recvmmsg/sendmmsg vector length
    RTP_BUFSZ = 2048     # receive buffer per packet (> any sane MTU)
    RTP_MAX_PKT = 1500   # larger datagrams are dropped as oversize
    RTP_MAX_EVENTS = 256 # epoll_wait batch
    RTP_EVQ = 4096       # event ring capacity (timeouts waiting for drain_events)
    RTP_READS_PER_WAKE = 4  # recvmmsg calls per ready socket before moving on (fairness)
    DRAIN_BATCH = 32     # recvmmsg vector length when a pooled socket is emptied before reuse
    DRAIN_ROUNDS = 256   # at most 8192 stale datagrams per socket; past that the pair is closed instead
    ST_A_RTP = 0         # stream index = leg * 2 + kind
    ST_A_RTCP = 1
    ST_B_RTP = 2
    ST_B_RTCP = 3
    MAX_DROPOUT = 3000   # RFC 3550 A.1
    MAX_MISORDER = 100   # RFC 3550 A.1
    EVT_TIMEOUT = 1



ctypedef struct rtp_stream:
    int fd                  # bound non-blocking UDP socket, -1 once closed
    uint16_t port           # local port, host order
    uint8_t is_rtcp         # 1 for the RTCP socket (RTP port + 1, RFC 3550 §11)
    uint8_t has_remote      # an SDP address was set (set_remote) and it is not hold
    uint8_t hold            # SDP said 0.0.0.0 or port 0 (RFC 3264 §8.4): send nothing
    uint8_t latched         # ``source`` is valid: latched on the first packet since (re)arm
    uint8_t pt              # payload type of the first packet; jitter follows it only
    uint8_t seq_init        # RFC 3550 A.1 state initialised
    uint8_t jit_init        # a previous transit time exists
    rtp_addr remote         # address from SDP c=/m= (or a=rtcp, RFC 3605)
    rtp_addr source         # latched source: where packets really come from (NAT)
    uint64_t packets        # valid packets accepted from the latched source
    uint64_t bytes          # their UDP payload bytes
    uint64_t relayed        # packets sent on (to the other leg, or echoed back)
    uint64_t relayed_bytes  # their bytes
    uint64_t dropped[9]     # per DROP_* reason (DROP_COUNT)
    int64_t last_ns         # CLOCK_MONOTONIC of the last accepted packet, 0 = never
    uint32_t ssrc           # SSRC the sequence state belongs to
    uint16_t max_seq        # RFC 3550 A.1 highest sequence number seen
    uint32_t cycles         # RFC 3550 A.1 shifted count of sequence wraps
    uint32_t base_seq       # RFC 3550 A.1 first sequence number
    uint64_t received       # packets counted by the sequence state
    int64_t lost_prev       # loss of earlier SSRCs / sequence restarts
    int64_t transit         # RFC 3550 A.8 previous relative transit time
    double jitter           # RFC 3550 A.8 interarrival jitter, timestamp units


ctypedef struct rtp_relay:
    uint32_t gen            # relay id; also in epoll tokens to reject stale events
    uint8_t active          # slot holds a live relay
    uint8_t timed_out       # a timeout event was queued and no packet came since
    uint8_t echo[2]         # per leg: echo mode (send back to the source)
    int64_t created_ns      # CLOCK_MONOTONIC at create (timeout runs from here)
    int64_t timeout_ns      # silence on both legs before an event, 0 = never
    rtp_stream st[4]        # ST_A_RTP, ST_A_RTCP, ST_B_RTP, ST_B_RTCP
    srtp_t srtp_in[2]       # per leg: unprotects what the leg sends (its SDES key), NULL = plain RTP
    srtp_t srtp_out[2]      # per leg: protects what the edge sends to it (the edge's key), NULL = plain


ctypedef struct rtp_event:
    uint32_t gen            # relay id
    uint8_t kind            # EVT_*
    uint8_t leg             # 0 = A, 1 = B: the leg silent the longest


ctypedef struct rtp_totals:
    uint64_t packets        # valid packets received
    uint64_t bytes          # their bytes
    uint64_t relayed        # packets relayed
    uint64_t relayed_bytes  # bytes relayed
    uint64_t dropped[9]     # per DROP_* reason (DROP_COUNT)
    int64_t lost            # sequence-gap loss (RFC 3550 A.1)


ctypedef struct rtp_engine:
    pthread_mutex_t lock    # guards slots, relays, event ring and totals
    int epfd                # epoll set of every relay socket + wakefd
    int wakefd              # eventfd, control -> loop (stop)
    int evfd                # eventfd, loop -> Python (events pending)
    int running             # loop keeps going while 1 (written under lock)
    uint32_t nslots         # capacity of ``slots``
    rtp_relay **slots       # relay per slot, NULL until first use
    double clock_rate       # RTP clock for jitter (8000 Hz: G.711/G.729; G.722 uses 8000 too)
    uint32_t evq_head       # ring read index
    uint32_t evq_tail       # ring write index
    uint64_t evq_overflow   # events lost because the ring was full
    rtp_event evq[4096]     # RTP_EVQ
    rtp_totals gone         # counters of deleted relays (metrics are monotonic)
    uint64_t loop_wakeups   # epoll_wait returns (diagnostics)
    # loop-owned buffers (touched only by the loop thread)
    mmsghdr rmsg[64]        # RTP_BATCH
    mmsghdr smsg[64]
    iovec riov[64]
    iovec siov[64]
    rtp_addr rsrc[64]       # source address per received packet
    rtp_addr sdst[64]       # destination per sent packet
    char rbuf[64][2048]     # RTP_BATCH x RTP_BUFSZ


cdef class Relay
cdef class RelayEngine


cdef class RelayEngine:
    cdef rtp_engine *_eng       # C state shared with the loop thread (malloc'd)
    cdef pthread_t _thread      # loop thread while _started
    cdef bint _started          # loop thread is running
    cdef readonly str address   # IPv4 or IPv6 address leg A's sockets bind to (the customer side)
    cdef readonly str address_b # address leg B's sockets bind to (the carrier side)
    cdef readonly int port_min  # configured range (inclusive)
    cdef readonly int port_max
    cdef readonly double quiet_period  # seconds before a freed port is reused
    cdef readonly double timeout       # default media timeout, seconds
    cdef readonly int tos              # IP TOS byte of relay sockets (0xB8 = DSCP EF), 0 = leave
    cdef uint32_t _next_gen     # next relay id
    cdef object _free_ports     # deque[(rtp_port, reusable_at_monotonic)], FIFO: pairs with no socket
    cdef list _pools            # deque[(rtp_port, rtp_fd, rtcp_fd, reusable_at)] FIFO per pool: bound pairs kept open
    cdef int _pool_of[2]        # per leg: index in _pools (0 for both when the legs bind the same address)
    cdef readonly int pool_max  # most pairs kept bound in the pools (both together); 0 = close every socket
    cdef readonly unsigned long stale_dropped  # datagrams discarded from pooled sockets before their reuse
    cdef list _free_slots       # unused slot indices
    cdef dict _relays           # id -> Relay
    cdef rtp_addr _bind[2]      # per leg: bind address (port 0), family in sin6_family

    cdef int _open_pair(self, rtp_stream *rtp, rtp_stream *rtcp, int leg) except -1
    cdef int _take_pooled(self, rtp_stream *rtp, rtp_stream *rtcp, int leg) except -1
    cdef object _alloc_pair(self)
    cdef _release(self, rtp_relay *r, int *fds, bint quiet)
    cdef _close_pools(self)
    cdef object _snapshot(self, Relay relay)
    cdef object _counts(self, Relay relay)


cdef class Relay:
    cdef readonly RelayEngine engine  # owner
    cdef readonly uint32_t id         # unique per engine, never reused
    cdef readonly str tag             # caller's label (Call-ID, ...)
    cdef readonly object leg_a        # LegAddr
    cdef readonly object leg_b        # LegAddr
    cdef uint32_t _slot               # index in rtp_engine.slots
    cdef bint _deleted                # delete() ran
    cdef list _srtp                   # per leg: (rx, tx) parameters installed, to keep a context on a re-offer

    cdef rtp_relay *_get(self) except NULL
