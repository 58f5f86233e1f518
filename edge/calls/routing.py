"""Routing: where the outbound leg of a call goes, and when to try the next place.

Outgoing calls go to the ``[[carriers]]`` by priority (lowest first), carriers of one
priority in a weighted random order; each carrier's targets in turn (a carrier given by
host name has the addresses of its RFC 3263 resolution: SRV priority first, weighted random
within one, RFC 2782). The next target is tried on a timeout, 408 or 5xx, and only while
nothing was relayed back to the caller yet (SPEC §4.2: never on 4xx answers about the
callee, nor on 6xx). Incoming calls go to the PBX of the profile:
its newest live registration, reached at the address that REGISTER came from (NAT),
or the static contact of an ``ip`` profile (SPEC §4.3).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from edge.config import CarrierConfig
from edge.control.models import Profile, Registration
from edge.sip import SipParseError, parse_uri
from edge.sip.dialog import peer_of
from edge.sip.tls import default_port, transport_of
from edge.sip.transport import Peer

from .carriers import CarrierTarget, request_host, scheme_of
from .model import Call, CallState, Direction, Reject, Target

FAILOVER_STATUSES = frozenset({408, 500, 502, 503, 504})

T = TypeVar("T")


class Routing:
    """:param bindings: the live registrations of a profile (``registrations.live``).
    :param rng: the weighted orders' randomness (tests pass a seeded one).
    :param targets: a carrier's targets that are up now (``CarrierHealth.targets``: resolved,
        probed); ``None``: the URI of each carrier, which must then carry an IP address.
    """

    def __init__(self, carriers: Sequence[CarrierConfig], bindings: Callable[[str], list[Registration]],
                 domain: str, rng: random.Random | None = None,
                 targets: Callable[[CarrierConfig], list[CarrierTarget]] | None = None) -> None:
        # carrier health (calls/carriers.py): a down target is skipped, not tried; no DNS on this path
        self.targets = targets or static_targets
        self.bindings = bindings
        self.domain = domain
        self.rng = rng or random.Random()
        self.replace_carriers(carriers)

    def replace_carriers(self, carriers: Sequence[CarrierConfig]) -> None:
        """A reload: the next call routes over ``carriers``; calls already routed keep their targets."""
        self.carriers = sorted(carriers, key=lambda c: c.priority)
        # What is the same for every call, worked out once per configuration: the scheme and
        # host of each carrier's Request-URIs (its URI parsed once, not per call).
        self._ruri_parts = [(c, *_ruri_parts(c)) for c in self.carriers]

    def carrier_targets(self, callee: str) -> list[Target]:
        """Carriers in the order to try them for ``callee`` (E.164 with "+")."""
        out: list[Target] = []
        reachable = [(c, scheme, host, t) for c, scheme, host in self._ruri_parts if (t := self.targets(c))]
        for group in self._weighted_order(reachable, lambda ct: (ct[0].priority, ct[0].weight)):
            for carrier, scheme, host, targets in group:
                ruri = f"{scheme}:{callee}@{host}"
                for tg in self._weighted_order(targets, lambda t: (t.priority, t.weight)):
                    out += [Target(carrier.uri, t.peer._replace(side=""), ruri) for t in tg]
        return out

    def _weighted_order(self, items: Sequence[T], key: Callable[[T], tuple[int, int]]) -> list[list[T]]:
        """``items`` by priority (lowest first), each priority in a weighted random order (RFC 2782:
        weight 0 is picked last but for a very small chance).

        The order within a priority is that of one weighted draw after the other without
        replacement, made in one pass: each item draws ``u`` in (0, 1] and the items go by
        ``u ** (1 / weight)``, largest first (Efraimidis and Spirakis 2006, the same
        distribution), compared as ``log(u) / weight``. One random number per item instead of
        a ``random.choices`` per pick, and none for a priority that holds one item: one carrier,
        or one target (issue 10).
        """
        if len(items) == 1:
            return [list(items)]
        groups: dict[int, list[T]] = {}
        for item in items:
            groups.setdefault(key(item)[0], []).append(item)
        rnd = self.rng.random
        out: list[list[T]] = []
        for prio in sorted(groups):
            group = groups[prio]
            if len(group) > 1:
                group.sort(key=lambda i: math.log(1.0 - rnd()) / (max(key(i)[1], 0) or 1e-9), reverse=True)
            out.append(group)
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
        proto = transport_of(contact)
        # NAT: send to where the REGISTER came from, not to a private Contact address
        peer = peer_of(source) if source else None
        if peer is None:
            peer = Peer(proto, contact.host, contact.port or default_port(proto))
        host_port = f"{contact.host}:{contact.port}" if contact.port else contact.host
        params = "".join(f";{k}={v}" if v is not None else f";{k}" for k, v in contact.params.items())
        scheme = "sips" if contact.scheme == "sips" else "sip"
        return Target("pbx", peer, f"{scheme}:{pbx_user}@{host_port}{params}")

    def outbound_uris(self, call: Call, target: Target, display: str | None) -> tuple[str, str]:
        """From and To of the outbound leg: the edge speaks for the profile on the carrier
        side, and names the profile's SIP username to its PBX (SPEC §4.3)."""
        username = call.profile.sip_username
        if call.direction is Direction.INCOMING:
            return f"<sip:{call.caller}@{self.domain}>", f"<sip:{username}@{self.domain}>"
        name = f'"{display}" ' if display else ""
        return f"{name}<sip:{username}@{self.domain}>", f"<{target.ruri}>"


def _ruri_parts(carrier: CarrierConfig) -> tuple[str, str]:
    uri = parse_uri(carrier.uri)
    return scheme_of(uri), request_host(uri)


def static_targets(carrier: CarrierConfig) -> list[CarrierTarget]:
    """The one target of a carrier given by IP address: its URI (no probing, no DNS)."""
    uri = parse_uri(carrier.uri)
    peer = Peer((uri.params.get("transport") or "udp").lower(), uri.host.strip("[]"), uri.port or 5060)
    return [CarrierTarget(peer, 0, 0)]
