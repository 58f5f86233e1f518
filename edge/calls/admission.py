"""Admission: SPEC §4.2 (outgoing) and §4.3 (incoming) as named rules, run in order.

Read like the steps of a Kamailio route script (REQINIT, AUTH, ..., RELAY): each rule
takes the :class:`Attempt` (what the earlier rules learned) and returns a
:class:`~edge.calls.model.Reject` or None, and the first refusal is the answer.
``docs/calls.md`` has this list as a table. Rules only read the store; the channel
is seized last, by :meth:`Admission.seize`, in one write transaction that counts
again, so two attempts racing for the last channel cannot both win and nothing that
can fail comes after it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.cluster import link, outbox
from edge.cluster.fence import Fence
from edge.cluster.link import JournalClient
from edge.control import channels, numbers, profiles
from edge.control.credit import CreditEngine, is_e164, minimum_charge
from edge.control.errors import NotFound, StoreError
from edge.control.models import Credential, LiveCall, Profile, Rate
from edge.control.store import Store, Txn
from edge.sip.auth import AuthResult, DigestAuth, FailureTracker, parse_authorization, source_allowed
from edge.sip.core import RateLimiter
from edge.sip.transaction import ServerTransaction

from .model import Direction, Funding, Reject, Target
from .routing import Routing

log = logging.getLogger("sipedge.calls")

# phonenumbers parses a number in ~10 us; PBXs dial the same numbers again and again
e164 = functools.lru_cache(maxsize=65_536)(is_e164)

AUTH_REFUSALS = {
    AuthResult.REPLAY: "nonce count reused",
    AuthResult.UNKNOWN_USER: "unknown SIP username",
    AuthResult.USER_MISMATCH: "digest username is not the SIP username",
    AuthResult.BAD_PASSWORD: "bad credentials",
}
CHALLENGE_AGAIN = (AuthResult.MISSING, AuthResult.STALE, AuthResult.BAD_NONCE, AuthResult.UNSUPPORTED)


@dataclass(slots=True)
class Attempt:
    """One INVITE on its way through the rules, and what they found out."""

    tx: ServerTransaction
    direction: Direction
    profile: Profile | None = None
    caller: str = ""                # SIP username (outgoing) or the carrier's From user (incoming)
    callee: str = ""                # E.164 (outgoing) or the number / business account called (incoming)
    funding: Funding = Funding.NONE
    rate: Rate | None = None
    pbx_user: str = ""              # incoming: the Request-URI user the PBX gets (number or its extension)
    target: Target | None = None    # incoming: the PBX to ring
    refusal: Reject | None = None   # the first rule that said no

    @property
    def source(self) -> str:
        return self.tx.peer.host


Rule = Callable[[Attempt], Reject | None]


class Admission:
    """Decides whether an INVITE becomes a call.

    :param count_auth_failure: ``(reason, method)``: a failure answered with a new challenge.
    :param refuse_source: ``(host, method, reason)``: a refused answer; counts it and may block the source.
    """

    def __init__(self, store: Store, credit: CreditEngine, routing: Routing, auth: DigestAuth,
                 failures: FailureTracker, *, count_auth_failure: Callable[[str, str], None],
                 refuse_source: Callable[[str, str, str], None], profile_rate_limit: float,
                 worker: int = 0, fence: Fence | None = None, cluster: JournalClient | None = None) -> None:
        self.store = store
        self.fence = fence      # a cluster node's lease (edge/cluster/fence.py); None: a node alone
        self.cluster = cluster  # a cluster node's reservations in the journal, through its agent
        self.worker = worker    # written into each live call: whose recovery settles it after a crash
        self.credit = credit
        self.routing = routing
        self.auth = auth
        self.failures = failures
        self.count_auth_failure = count_auth_failure
        self.refuse_source = refuse_source
        self.profile_limiter = RateLimiter(profile_rate_limit, max(1.0, 2 * profile_rate_limit))
        # SPEC §4.2, in order (flood protection per profile right after authentication)
        self.outgoing_rules: tuple[Rule, ...] = (
            self.authenticated, self.within_profile_rate, self.from_is_sip_username, self.callee_is_e164,
            self.channel_free, self.funded)
        # SPEC §4.3
        self.incoming_rules: tuple[Rule, ...] = (self.number_in_service, self.pbx_reachable, self.channel_free)

    def check(self, tx: ServerTransaction, direction: Direction) -> Attempt:
        """Run the rules of ``direction`` in order; the attempt's ``refusal`` is the first no."""
        attempt = Attempt(tx, direction)
        rules = self.outgoing_rules if direction is Direction.OUTGOING else self.incoming_rules
        for rule in rules:
            attempt.refusal = rule(attempt)
            if attempt.refusal is not None:
                break
        return attempt

    # ------------------------------------------------------------ outgoing

    def authenticated(self, a: Attempt) -> Reject | None:
        """Rule 1: an ``ip`` profile whose allow-list holds the source, or a valid digest
        answer to our 407 (every INVITE of a digest profile is challenged)."""
        req = a.tx.request
        from_user = req.from_.uri.user if req.from_.uri is not None else None
        cred = profiles.credential(self.store, from_user) if from_user else None
        if cred is not None and cred.auth == "ip" and source_allowed(a.source, cred.allowed_ips):
            return self._found(a, cred)
        header = req.header("Proxy-Authorization")
        answer = parse_authorization(header) if header else None
        if answer is not None and (cred is None or cred.username != answer.username):
            cred = profiles.credential(self.store, answer.username)
        result = self.auth.verify(answer, "INVITE", cred)
        if result is AuthResult.OK:
            assert cred is not None
            self.failures.success(a.source)
            return self._found(a, cred)
        if result in CHALLENGE_AGAIN:
            if result is not AuthResult.MISSING:
                self.count_auth_failure(result.value, "INVITE")
            return Reject("auth_challenge", 407, "authentication required",
                          tuple(self.auth.challenge(proxy=True, stale=result is AuthResult.STALE)))
        log.warning("call authentication refused", extra={"event": "auth_failure", "method": "INVITE",
                                                          "reason": result.value, "source": str(a.tx.peer)})
        self.refuse_source(a.source, "INVITE", result.value)
        return Reject("auth", 403, AUTH_REFUSALS.get(result, "authentication failed"))

    def _found(self, a: Attempt, cred: Credential) -> Reject | None:
        try:
            a.profile = profiles.get(self.store, cred.profile_id)
        except NotFound:    # deleted between the credential read and this one
            return Reject("auth", 403, "unknown SIP username")
        return None

    def within_profile_rate(self, a: Attempt) -> Reject | None:
        """Flood protection: call attempts per second of one profile."""
        assert a.profile is not None
        if self.profile_limiter.allow(a.profile.id):
            return None
        return Reject("rate_limit", 503, "call attempt rate limit of the profile", (("Retry-After", "1"),))

    def from_is_sip_username(self, a: Attempt) -> Reject | None:
        """Rule 2: the From user is the profile's SIP username."""
        assert a.profile is not None
        req = a.tx.request
        from_user = req.from_.uri.user if req.from_.uri is not None else None
        if from_user != a.profile.sip_username:
            return Reject("from_user", 403, "From user must be the SIP username")
        a.caller = from_user
        return None

    def callee_is_e164(self, a: Attempt) -> Reject | None:
        """Rule 3: the Request-URI user is a full international E.164 number."""
        uri = a.tx.request.uri
        callee = e164((uri.user if uri is not None else None) or "")
        if callee is None:
            return Reject("e164", 484,
                          "Request-URI must be a full international E.164 number (country code and number)")
        a.callee = callee
        return None

    def channel_free(self, a: Attempt) -> Reject | None:
        """Rule 4: incoming + outgoing calls < channels (a read: :meth:`seize` counts again)."""
        assert a.profile is not None
        if channels.in_use(self.store, a.profile.id) < a.profile.channels:
            return None
        return _busy(a.profile)

    def funded(self, a: Attempt) -> Reject | None:
        """Rule 5: the echo number is free, a bundle covers the destination, or the
        balance holds the rate's minimum charge."""
        assert a.profile is not None
        decision = self.credit.admit(a.profile, a.callee)
        if not decision.ok:
            if decision.reason == "no_rate":
                return Reject("no_rate", 404, "no route: no rate covers the destination", record=True)
            return Reject("credit", 402, "insufficient credit for the minimum charge", record=True)
        a.rate = decision.rate
        a.funding = Funding.FREE if decision.free else Funding.BUNDLE if decision.bundle else Funding.CREDIT
        return None

    # ------------------------------------------------------------ incoming

    def number_in_service(self, a: Attempt) -> Reject | None:
        """§4.3: the Request-URI user is an online number or a business account attached to a profile."""
        req = a.tx.request
        user = req.uri.user if req.uri is not None else None
        if not user:
            return Reject("unknown_number", 404, "no number in the Request-URI")
        number = e164(user)
        found = numbers.profile_by_number(self.store, number) if number else None
        if found is not None:
            rec, a.profile = found
            pbx_user = rec.extension or rec.number
        else:
            biz = numbers.business_account(self.store, user)
            if biz is None or biz.profile_id is None:
                return Reject("unknown_number", 404, "number or business account not in service")
            try:
                a.profile = profiles.get(self.store, biz.profile_id)
            except NotFound:
                return Reject("unknown_number", 404, "number or business account not in service")
            pbx_user = user
        a.callee = number or user
        a.caller = (req.from_.uri.user if req.from_.uri is not None else None) or "anonymous"
        a.pbx_user = pbx_user
        return None

    def pbx_reachable(self, a: Attempt) -> Reject | None:
        """§4.3: the profile's registered contact, or the static contact of an ``ip`` profile."""
        assert a.profile is not None
        target = self.routing.pbx_target(a.profile, a.pbx_user)
        if isinstance(target, Reject):
            return target
        a.target = target
        return None

    # ------------------------------------------------------------- seizing

    def seize(self, a: Attempt, call_id: str) -> LiveCall | Reject:
        """Take a channel for the admitted attempt, last: the live-call record (with the rate
        it will be billed at) and the count in one write transaction (all busy by now: 486;
        a store that cannot record the call: 503, and nothing was taken)."""
        prof = a.profile
        assert prof is not None
        if self.fence is not None and not self.fence.admits():
            # SPEC §9: cut off from the engine, the lease may already be another node's to take over
            return Reject("cluster", 503, "this node is cut off from its cluster", (("Retry-After", "5"),))
        live = LiveCall(call_id=call_id, profile_id=prof.id, direction=a.direction.value, started_at=time.time(),
                        caller=a.caller, callee=a.callee, funding=a.funding.value, rate=a.rate,
                        worker=self.worker)
        try:
            taken = channels.take(self.store, prof.id, live)
        except NotFound:
            return Reject("auth", 403, "unknown SIP username")
        except StoreError as exc:
            log.error("call refused: the store cannot record it (%s)", exc)
            return Reject("store", 503, "the edge cannot record calls now", (("Retry-After", "30"),))
        if not taken:
            return _busy(prof)
        return live


    async def reserve_in_cluster(self, a: Attempt, live: LiveCall) -> Reject | None:
        """A cluster node: the channel just seized here is reserved in the cluster's journal too,
        checked there against the calls of the profile on every node, with the money of the call's
        first slice (docs/cluster.md "Money across nodes"). A balance that covers less than the
        slice reserves what it covers; one below the minimum charge is a 402, as on a node alone."""
        assert self.cluster is not None and a.profile is not None
        amount = 0
        if a.funding is not Funding.FREE and a.rate is not None:
            _seconds, amount = self.credit.next_slice(live, a.rate)
        for _ in range(RESERVE_ATTEMPTS):
            reply = await self.cluster.reserve(a.profile.id, live.call_id, a.profile.channels, amount,
                                               direction=live.direction, caller=live.caller, callee=live.callee,
                                               started_at=live.started_at)
            if reply.result == link.OK:
                live.reserved = amount
                return None
            if reply.result == link.BUSY:
                return _busy(a.profile)
            if reply.result != link.BROKE or a.rate is None:
                break
            seconds, amount = self.credit.next_slice(live, a.rate, reply.balance)
            if seconds <= 0 or amount < minimum_charge(a.rate):
                return Reject("credit", 402, "insufficient credit for the minimum charge", record=True)
        return Reject("cluster", 503, "the cluster did not confirm a channel", (("Retry-After", "5"),))

    def unseize(self, live: LiveCall, *, reserved: bool) -> None:
        """Give back the channel of a call that does not start after all; ``reserved``: its
        journal reservation may have landed, and the agent settles it (edge/cluster/outbox.py)."""
        def op(txn: Txn) -> None:
            channels.release(txn, live.profile_id, live.call_id)
            if reserved:
                outbox.add(txn, live)

        try:
            self.store.write(op, sync=False, grows=False)
        except StoreError as exc:
            log.error("call %s: its channel cannot be given back (%s)", live.call_id, exc)


RESERVE_ATTEMPTS = 3   # a balance spent by another node meanwhile: ask again for what is left, bounded


def _busy(prof: Profile) -> Reject:
    # 486, not 503: a full trunk is this customer's busy line, not a broken server (docs/calls.md)
    return Reject("channels", 486, f"all {prof.channels} channels of the profile are in use")

