"""Public contract of the compiled RTP relay engine (``edge/_rtp.pyx``).

The packet loop is a native pthread (epoll + recvmmsg/sendmmsg) that never
takes the GIL. Every method here is called from Python (the asyncio thread)
and synchronises with the loop through a mutex held for microseconds.
See docs/media.md for the latching rule and the counters.
"""
from typing import Literal, NamedTuple

Leg = Literal["a", "b", "A", "B"]

DROP_REASONS: tuple[str, ...]
"""Reasons a received packet is not relayed: ``short``, ``version``,
``oversize``, ``source`` (hijack protection), ``no_dest`` (no remote yet or
hold), ``send`` (socket buffer full), ``srtp_auth`` (SRTP/SRTCP authentication
failed), ``srtp_replay`` (replay protection), ``srtp_protect`` (libsrtp refused
to protect it toward an SRTP leg)."""

SRTP_SUITES: dict[str, int]
"""SDES suites the relay speaks -> length of master key + salt in bytes."""

SrtpKey = tuple[str, bytes]
"""(suite, master key + salt)."""

class SrtpError(ValueError):
    """libsrtp refused a key, a suite or a packet."""

    reason: str
    """``auth``, ``replay`` or ``error``."""
    def __init__(self, reason: str, message: str) -> None: ...

def srtp_library() -> str: ...

class SrtpContext:
    """One SRTP direction (tests and tools): the libsrtp session the relay uses.

    :param suite: a key of :data:`SRTP_SUITES`
    :param key: master key followed by master salt
    :param inbound: True unprotects, False protects
    """

    inbound: bool
    def __init__(self, suite: str, key: bytes, *, inbound: bool) -> None: ...
    def protect(self, packet: bytes) -> bytes: ...
    def unprotect(self, packet: bytes) -> bytes: ...
    def protect_rtcp(self, packet: bytes) -> bytes: ...
    def unprotect_rtcp(self, packet: bytes) -> bytes: ...

class LegAddr(NamedTuple):
    """Edge address of one relay leg: put these in the SDP sent to that leg."""

    address: str
    rtp_port: int
    rtcp_port: int

class RelayEvent(NamedTuple):
    """Something the B2BUA must act on.

    :param relay_id: :attr:`Relay.id`
    :param tag: the tag given to :meth:`RelayEngine.create`
    :param kind: ``"timeout"``: no packet on either leg for the relay's timeout
    :param leg: ``"a"`` or ``"b"``, the leg silent the longest
    """

    relay_id: int
    tag: str
    kind: str
    leg: str

class StreamStats:
    """Counters of the packets received on one edge port (RTP or RTCP of a leg).

    ``lost`` is the RFC 3550 A.3 cumulative loss (sequence gaps, 0 for RTCP);
    ``jitter`` is the RFC 3550 A.8 interarrival jitter in timestamp units,
    ``jitter_ms`` the same at the engine clock rate (8 kHz by default).
    """

    packets: int
    bytes: int
    relayed: int
    relayed_bytes: int
    dropped: dict[str, int]
    lost: int
    jitter: float
    jitter_ms: float
    last_packet_age: float | None
    source: tuple[str, int] | None
    remote: tuple[str, int] | None
    latched: bool
    @property
    def dropped_total(self) -> int: ...
    def as_dict(self) -> dict[str, object]: ...

class LegStats:
    rtp: StreamStats
    rtcp: StreamStats
    echo: bool
    def as_dict(self) -> dict[str, object]: ...

class RelayStats:
    """Snapshot of a relay's counters, e.g. for the CDR."""

    relay_id: int
    tag: str
    a: LegStats
    b: LegStats
    age: float
    def leg(self, name: Leg) -> LegStats: ...
    def as_dict(self) -> dict[str, object]: ...

class Relay:
    """One anchored call: leg A (customer/PBX side) and leg B (carrier side)."""

    @property
    def engine(self) -> RelayEngine: ...
    @property
    def id(self) -> int: ...
    @property
    def tag(self) -> str: ...
    @property
    def leg_a(self) -> LegAddr: ...
    @property
    def leg_b(self) -> LegAddr: ...
    @property
    def deleted(self) -> bool: ...
    def set_remote(self, leg: Leg, host: str, rtp_port: int, rtcp_port: int | None = None) -> None:
        """Set where a leg's media goes, from its SDP (offer, answer, re-INVITE).

        Re-arms latching on that leg: the next packet's source becomes the
        latched source. ``0.0.0.0`` (``::``) or port 0 means hold: nothing is sent
        to that leg until the next call.

        :param leg: ``"a"`` or ``"b"``
        :param host: IPv4 or IPv6 address from ``c=``, of the leg's own family
        :raises ValueError: not an IP address, or not of the family the leg binds to
        :param rtp_port: port from ``m=audio``
        :param rtcp_port: port from ``a=rtcp`` (RFC 3605); default ``rtp_port + 1``
        """
    def set_srtp(self, leg: Leg, rx: SrtpKey | None = None, tx: SrtpKey | None = None) -> None:
        """SRTP on ``leg``: ``rx`` unprotects what the leg sends (its SDES key), ``tx`` protects
        what the edge sends to it (the edge's key); None is plain RTP that way. Unchanged
        parameters keep their libsrtp session (rollover counter, replay window).

        :raises SrtpError: unknown suite or a key of the wrong length (the leg stays as it was)
        """
    def srtp(self, leg: Leg) -> tuple[bool, bool]:
        """``(receiving, sending)`` SRTP on ``leg``; never the keys."""
    def set_echo(self, leg: Leg, on: bool = True) -> None:
        """Echo mode: every packet received on ``leg`` goes back to its source."""
    def stats(self) -> RelayStats: ...
    def delete(self) -> RelayStats | None: ...
    def delete_counts(self) -> tuple[tuple[int, int, int, int, float], tuple[int, int, int, int, float]] | None:
        """Delete the relay as :meth:`delete` does; per leg (a, b), its RTP stream's ``(packets,
        bytes, lost, dropped, jitter_ms)`` -- what a CDR keeps, without building the
        :class:`RelayStats` -- or None if it was deleted already."""

class RelayEngine:
    """RTP/RTCP relay with its own packet thread.

    :param address: IPv4 or IPv6 address leg A's ports bind to (the customer side)
    :param port_min: first port of the range (RTP ports are even, RTCP = RTP + 1)
    :param port_max: last port of the range
    :param quiet_period: seconds a freed port waits before it is reused
    :param timeout: default seconds of silence on both legs before a timeout event
    :param clock_rate: RTP clock used for jitter in ms (8000 for G.711/G.729/G.722)
    :param tos: IP TOS byte set on relay sockets; 0xB8 is DSCP EF (RFC 3246), 0 leaves the default
        (the IPv6 traffic class on IPv6 legs)
    :param address_b: address leg B's ports bind to (the carrier side); default ``address``.
        The legs may differ in family: the relay bridges IPv4 and IPv6.
    :param pool: most RTP/RTCP pairs kept bound (sockets open) after their relay ends, for a
        later relay on the same address; emptied of every queued datagram before that reuse,
        which comes no sooner than ``quiet_period``. ``None``: every pair of the range, but no
        more than ``RLIMIT_NOFILE // 8`` pairs (a quarter of the descriptors). 0: close every socket.
    """

    address: str
    address_b: str
    port_min: int
    port_max: int
    quiet_period: float
    timeout: float
    tos: int
    pool_max: int
    stale_dropped: int
    """Datagrams that reached a pooled pair after its relay ended, discarded before its reuse."""
    def __init__(
        self,
        address: str,
        port_min: int,
        port_max: int,
        *,
        quiet_period: float = 2.0,
        timeout: float = 30.0,
        clock_rate: float = 8000.0,
        tos: int = 0xB8,
        address_b: str | None = None,
        pool: int | None = None,
    ) -> None: ...
    @property
    def pooled_pairs(self) -> int:
        """Bound RTP/RTCP pairs kept open for reuse."""
    @property
    def free_pairs(self) -> int:
        """Pairs no relay holds (unbound or pooled); with ``2 * active_relays``, every pair of the range."""
    def start(self) -> None:
        """Start the packet thread (no-op if running)."""
    def stop(self) -> None:
        """Stop the packet thread, delete every relay and free every port. Idempotent."""
    @property
    def running(self) -> bool: ...
    @property
    def event_fd(self) -> int:
        """An eventfd, readable while events are pending: ``loop.add_reader`` it."""
    def __enter__(self) -> RelayEngine: ...
    def __exit__(self, *exc: object) -> None: ...
    def create(self, tag: str, *, timeout: float | None = None) -> Relay:
        """Allocate a relay: an RTP/RTCP port pair for each leg.

        :param tag: label returned in events (Call-ID, channel id)
        :param timeout: media timeout in seconds (engine default if None, 0 = never)
        :raises RuntimeError: no free port pair (range exhausted or quiet)
        """
    def get(self, relay_id: int) -> Relay | None: ...
    def delete(self, relay_id: int) -> RelayStats | None:
        """Close the relay's sockets; ports come back after the quiet period.

        :returns: final counters, or None if unknown
        """
    def drain_events(self) -> list[RelayEvent]:
        """Pending events (each timeout is reported once until media resumes)."""
    @property
    def active_relays(self) -> int: ...
    @property
    def active_streams(self) -> int:
        """RTP streams of live relays that received a packet within the timeout."""
    def totals(self) -> dict[str, object]:
        """Monotonic counters (deleted relays included), and jitter of live streams.

        Keys: ``relays_active``, ``packets_received``, ``bytes_received``,
        ``packets_relayed``, ``bytes_relayed``, ``dropped`` (per reason),
        ``lost``, ``jitter_mean_ms``, ``jitter_max_ms``, ``jitter_streams``,
        ``events_overflow``.
        """
