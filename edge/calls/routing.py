"""Routing: where the outbound leg of a call goes, and when to try the next place.

Outgoing calls go to the ``[[carriers]]`` by priority (lowest first), carriers of one
priority in a weighted random order; the next carrier is tried on a timeout, 408 or
5xx, and only while nothing was relayed back to the caller yet (SPEC §4.2: never on
4xx answers about the callee, nor on 6xx). Incoming calls go to the PBX of the profile:
its newest live registration, reached at the address that REGISTER came from (NAT),
or the static contact of an ``ip`` profile (SPEC §4.3).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from edge.config import CarrierConfig
from edge.control.models import Profile, Registration
from edge.sip import SipParseError, parse_uri
from edge.sip.dialog import peer_of
from edge.sip.transport import Peer

from .model import Call, CallState, Direction, Reject, Target

FAILOVER_STATUSES = frozenset({408, 500, 502, 503, 504})


class Routing:
    """:param bindings: the live registrations of a profile (``registrations.live``).
    :param rng: the weighted order's randomness (tests pass a seeded one).
    :param is_up: is a carrier up (OPTIONS probing)? ``None``: every carrier is.
    """

    def __init__(self, carriers: Sequence[CarrierConfig], bindings: Callable[[str], list[Registration]],
                 domain: str, rng: random.Random | None = None,
                 is_up: Callable[[CarrierConfig], bool] | None = None) -> None:
        self.carriers = sorted(carriers, key=lambda c: c.priority)
        self.is_up = is_up  # carrier health (calls/carriers.py): a down carrier is skipped, not tried
        self.bindings = bindings
        self.domain = domain
        self.rng = rng or random.Random()

    def replace_carriers(self, carriers: Sequence[CarrierConfig]) -> None:
        """A reload: the next call routes over ``carriers``; calls already routed keep their targets."""
        self.carriers = sorted(carriers, key=lambda c: c.priority)

    def carrier_targets(self, callee: str) -> list[Target]:
        """Carriers in the order to try them for ``callee`` (E.164 with "+")."""
        out: list[Target] = []
        carriers = [c for c in self.carriers if self.is_up is None or self.is_up(c)]
        for prio in sorted({c.priority for c in carriers}):
            group = [c for c in carriers if c.priority == prio]
            while group:
                pick = self.rng.choices(group, weights=[max(c.weight, 0) or 1e-9 for c in group])[0]
                group.remove(pick)
                uri = parse_uri(pick.uri)
                port = uri.port or 5060
                peer = Peer((uri.params.get("transport") or "udp").lower(), uri.host, port)
                out.append(Target(pick.uri, peer, f"sip:{callee}@{uri.host}:{port}"))
        return out

    def should_fail_over(self, call: Call, status: int) -> bool:
        """Try the next target? Only an outgoing call, only before anything was relayed back."""
        return (call.direction is Direction.OUTGOING and status in FAILOVER_STATUSES
                and call.state is CallState.ROUTING and bool(call.targets))

    def pbx_target(self, profile: Profile, pbx_user: str) -> Target | Reject:
        """The PBX that takes an incoming call for ``profile``; ``pbx_user`` is its Request-URI user."""
        if profile.auth == "ip":
            if not profile.static_contact:
                return Reject("not_registered", 480, "profile has no static contact")
            contact_text = profile.static_contact
            source = ""
        else:
            bindings = self.bindings(profile.id)
            if not bindings:
                return Reject("not_registered", 480, "the PBX of this number is not registered")
            best = max(bindings, key=lambda b: b.registered_at)
            contact_text, source = best.contact, best.source
        try:
            contact = parse_uri(contact_text)
        except SipParseError:
            return Reject("not_registered", 480, "the PBX contact is not a usable SIP URI")
        proto = (contact.params.get("transport") or "udp").lower()
        # NAT: send to where the REGISTER came from, not to a private Contact address
        peer = peer_of(source) if source else None
        if peer is None:
            peer = Peer(proto, contact.host, contact.port or 5060)
        host_port = f"{contact.host}:{contact.port}" if contact.port else contact.host
        params = "".join(f";{k}={v}" if v is not None else f";{k}" for k, v in contact.params.items())
        return Target("pbx", peer, f"sip:{pbx_user}@{host_port}{params}")

    def outbound_uris(self, call: Call, target: Target, display: str | None) -> tuple[str, str]:
        """From and To of the outbound leg: the edge speaks for the profile on the carrier
        side, and names the profile's SIP username to its PBX (SPEC §4.3)."""
        username = call.profile.sip_username
        if call.direction is Direction.INCOMING:
            return f"<sip:{call.caller}@{self.domain}>", f"<sip:{username}@{self.domain}>"
        name = f'"{display}" ' if display else ""
        return f"{name}<sip:{username}@{self.domain}>", f"<{target.ruri}>"
