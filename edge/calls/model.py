"""What a call is: its legs, its state, its side and direction, why it ended.

State lives in enums, not in strings and flags (asyncpg ``ProtocolState``, sippy's
state classes). A :class:`Call` is plain data; the controller moves it between states.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from edge._rtp import Leg, Relay
    from edge.control.models import LiveCall, Profile, Rate
    from edge.media.sdes import SdesCall
    from edge.sip.invite import InviteSession, UacInvite, UasInvite
    from edge.sip.transport import Peer


class Direction(enum.Enum):
    OUTGOING = "outgoing"           # PBX -> carrier
    INCOMING = "incoming"           # carrier -> PBX


class Side(enum.Enum):
    """Which network a leg faces. The relay's leg "a" faces the customer, "b" the carrier."""

    CUSTOMER = "customer"           # the PBXs
    CARRIER = "carrier"             # the upstream carriers

    @property
    def relay_leg(self) -> Leg:
        return "a" if self is Side.CUSTOMER else "b"

    @property
    def other(self) -> Side:
        return Side.CARRIER if self is Side.CUSTOMER else Side.CUSTOMER


SIDES = tuple(Side)                 # iterating the Enum itself is slow (EnumType.__iter__)


class CallState(enum.Enum):
    ROUTING = "routing"             # admitted; an outbound attempt is on its way, nothing relayed back yet
    EARLY = "early"                 # a provisional answer was relayed to the caller (no more failover)
    ANSWERED = "answered"           # the callee answered: billed from now on
    ENDED = "ended"


class Funding(enum.Enum):
    """How an outgoing call is paid (decided at admission, SPEC §4.2 rule 5)."""

    NONE = ""                       # incoming calls are not charged
    FREE = "free"                   # the echo test number
    BUNDLE = "bundle"               # US bundle minutes first, then credit
    CREDIT = "credit"


class EndReason(enum.Enum):
    """``end_reason`` of the CDR and the ``reason`` label of ``edge_calls_ended_total``."""

    CALLER_BYE = "caller_bye"
    CALLEE_BYE = "callee_bye"
    CANCEL = "cancel"
    REJECTED = "rejected"           # the callee's 4xx-6xx
    TIMEOUT = "timeout"             # no answer: Timer B on the last target, or Timer C
    CARRIER_FAILURE = "carrier_failure"
    CREDIT_EXHAUSTED = "credit_exhausted"
    RTP_TIMEOUT = "rtp_timeout"
    MAX_DURATION = "max_duration"
    NO_ACK = "no_ack"
    SHUTDOWN = "shutdown"
    RECOVERY = "recovery"
    OPERATOR = "operator"           # ended through the control API
    CLUSTER_LEASE = "cluster_lease"  # the node lost its cluster lease: the others may reuse the channel
    STORE_ERROR = "store_error"     # the store could not record the call: ended, never run unfunded
    # refusals after the channel was seized, and admission refusals recorded as CDRs
    CREDIT = "credit"
    NO_RATE = "no_rate"
    NO_CARRIER = "no_carrier"
    BAD_SDP = "bad_sdp"
    SRTP_POLICY = "srtp_policy"     # the SDP breaks a side's srtp mode (SPEC §4.6): 488
    NO_MEDIA_PORTS = "no_media_ports"


class Target(NamedTuple):
    """One place an outbound leg can go: a carrier, or the PBX of an incoming call."""

    label: str                      # carrier URI, or "pbx"
    peer: Peer
    ruri: str


class Call:
    """One call: the session the edge answers (inbound) and the one it places (outbound).

    For an outgoing call the inbound leg faces the customer and the outbound leg the
    carrier; for an incoming call the other way round. An echo call has no outbound leg.
    """

    __slots__ = ("id", "direction", "profile", "caller", "callee", "funding", "rate", "live", "inbound",
                 "outbound", "relay", "sdes", "state", "targets", "attempt", "from_uri", "to_uri", "started",
                 "answered", "last_failure")

    def __init__(self, call_id: str, direction: Direction, profile: Profile, *, caller: str, callee: str,
                 funding: Funding = Funding.NONE, rate: Rate | None = None) -> None:
        self.id = call_id
        self.direction = direction
        self.profile = profile
        self.caller = caller
        self.callee = callee
        self.funding = funding
        self.rate = rate                        # the rate it was admitted with (billing, recovery)
        self.live: LiveCall | None = None       # its LMDB record (channel, reservation)
        self.inbound: UasInvite | None = None
        self.outbound: UacInvite | None = None
        self.relay: Relay | None = None
        self.sdes: SdesCall | None = None       # SRTP keys and modes of its legs (with the relay)
        self.state = CallState.ROUTING
        self.targets: list[Target] = []         # outbound targets left to try
        self.attempt = ""                       # label of the current outbound target
        self.from_uri = ""                      # From/To of the outbound leg
        self.to_uri = ""
        self.started = time.monotonic()
        self.answered: float | None = None      # monotonic time of the answer
        self.last_failure = 503

    @property
    def inbound_side(self) -> Side:
        return Side.CUSTOMER if self.direction is Direction.OUTGOING else Side.CARRIER

    def side_of(self, session: InviteSession) -> Side:
        return self.inbound_side if session is self.inbound else self.inbound_side.other

    def other_leg(self, session: InviteSession) -> InviteSession | None:
        return self.outbound if session is self.inbound else self.inbound

    @property
    def srtp(self) -> dict[str, str]:
        """Per side, the SRTP suite of its leg, ``"rtp"`` for plain RTP (CDR, live calls; never a key)."""
        suites = self.sdes.suites if self.sdes is not None else {}
        if not suites:  # plain RTP on both legs, or no media yet
            return {}
        return {side.value: suites.get(side.relay_leg) or "rtp" for side in SIDES
                if side.relay_leg in suites}

    @property
    def talk_seconds(self) -> float:
        return time.monotonic() - self.answered if self.answered is not None else 0.0


class Reject(NamedTuple):
    """A refusal: which rule, the SIP status and the text of its ``Warning``."""

    rule: str
    status: int
    text: str
    headers: tuple[tuple[str, str], ...] = ()
    record: bool = False            # also write a CDR of the refused attempt (money refusals)
