"""The back-to-back user agent: every call is two SIP dialogs joined by the edge.

The leg whose INVITE the edge received is the *inbound* dialog (the edge is its UAS);
the leg the edge creates is the *outbound* dialog (the edge is its UAC). For an
outgoing call the inbound leg is the PBX and the outbound leg a carrier; for an
incoming call it is the other way round. Each leg has its own Call-ID, tags, CSeq
and Contact, so neither side sees the other's addresses (topology hiding), and all
media is anchored on the relay: relay leg "a" faces the PBX, leg "b" the carrier.

Admission follows SPEC §4.2 in order (authentication, From user, E.164, channel,
money), each failure with its own status and a ``Warning`` naming the rule; incoming
calls follow §4.3. Channels and live-call state are LMDB records; credit is reserved
in slices while the call runs and settled at its end (``edge/control/credit.py``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge.config import Config
from edge.control import channels, numbers, profiles, registrations
from edge.control.credit import ECHO_NUMBER, CreditEngine, is_e164
from edge.control.models import LiveCall, Profile, Rate
from edge.control.store import Store
from edge.media.relay import MediaService
from edge.media.sdp import SdpError, parse_sdp_media, rewrite_sdp
from edge.sip import SipMessage, SipParseError, parse_uri
from edge.sip.auth import AuthResult, parse_authorization, source_allowed
from edge.sip.core import RateLimiter, SipService
from edge.sip.request import OutRequest, new_call_id, new_tag
from edge.sip.transaction import ClientTransaction, ServerTransaction, State
from edge.sip.transport import Peer

log = logging.getLogger("sipedge.calls")

SDP = ("Content-Type", "application/sdp")
RETRY_STATUSES = frozenset({408, 500, 502, 503, 504})  # carrier failover (SPEC §4.2); never 4xx/6xx about the callee


def warning(text: str) -> tuple[str, str]:
    return ("Warning", f'399 sipedge "{text}"')


class CallMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.started = Counter("edge_calls_started", "Calls admitted (a channel was taken).", ["direction"], registry=r)
        self.ended = Counter("edge_calls_ended", "Calls ended, by final SIP status and why they ended.",
                             ["direction", "status", "reason"], registry=r)
        self.rejected = Counter("edge_calls_rejected", "INVITEs refused before a channel was taken, by rule.",
                                ["direction", "rule", "status"], registry=r)
        self.active = Gauge("edge_calls_active", "Calls in progress on this node.", ["direction"], registry=r)
        for direction in ("outgoing", "incoming"):  # known label sets start at 0 (increase() sees the first call)
            self.started.labels(direction)
            self.active.labels(direction)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
        self.setup = Histogram("edge_call_setup_seconds", "INVITE to first provisional / to 200 OK.",
                               ["direction", "stage"], buckets=buckets, registry=r)
        self.cutoffs = Counter("edge_credit_cutoffs", "Calls ended because their credit ran out.", registry=r)
        self.failovers = Counter("edge_carrier_failovers", "Outgoing attempts moved to the next carrier.",
                                 ["carrier"], registry=r)


class Dialog:
    """One leg of a call as the edge sees it (RFC 3261 §12)."""

    __slots__ = ("b2b", "call", "side", "peer", "call_id", "local_tag", "remote_tag", "local_uri", "remote_uri",
                 "remote_target", "route_set", "cseq", "ack_timer", "pending_2xx", "proto")

    def __init__(self, b2b: B2BUA, call: Call, side: str, peer: Peer, call_id: str, local_tag: str,
                 local_uri: str, remote_uri: str, remote_target: str, remote_tag: str | None = None,
                 route_set: list[str] | None = None, cseq: int = 1) -> None:
        self.b2b = b2b
        self.call = call
        self.side = side                    # "pbx" | "carrier"
        self.peer = peer
        self.proto = peer.proto
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.local_uri = local_uri          # name-addr without tag
        self.remote_uri = remote_uri
        self.remote_target = remote_target
        self.route_set = route_set or []
        self.cseq = cseq
        self.ack_timer: asyncio.TimerHandle | None = None
        self.pending_2xx: tuple[ServerTransaction, bytes] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.call_id, self.local_tag)

    def request(self, method: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> OutRequest:
        """An in-dialog request: to the remote target, through the route set (§12.2.1.1)."""
        self.cseq += 1
        hdrs = [("Route", r) for r in self.route_set] + [("Contact", self.b2b.contact(self.proto))]
        hdrs += headers or []
        return OutRequest(method, self.remote_target, proto=self.proto, via_host=self.b2b.via_host(self.proto),
                          from_=f"{self.local_uri};tag={self.local_tag}",
                          to=f"{self.remote_uri};tag={self.remote_tag}" if self.remote_tag else self.remote_uri,
                          call_id=self.call_id, cseq=self.cseq, headers=hdrs, body=body)

    def as_record(self) -> dict[str, str]:
        """What recovery needs to BYE this leg after a restart."""
        return {"peer": str(self.peer), "call_id": self.call_id, "local": f"{self.local_uri};tag={self.local_tag}",
                "remote": f"{self.remote_uri};tag={self.remote_tag}" if self.remote_tag else self.remote_uri,
                "target": self.remote_target, "cseq": str(self.cseq)}


class Call:
    __slots__ = ("id", "direction", "profile", "live", "rate", "invite", "inbound", "outbound", "out_tx",
                 "relay", "state", "targets", "attempt", "attempt_target", "started", "answered", "timers", "free", "last_failure",
                 "provisional_seen", "ending")

    def __init__(self, direction: str, profile: Profile, invite: ServerTransaction) -> None:
        self.id = "c" + secrets.token_hex(8)
        self.direction = direction
        self.profile = profile
        self.live: LiveCall | None = None
        self.rate: Rate | None = None
        self.invite = invite
        self.inbound: Dialog | None = None
        self.outbound: Dialog | None = None
        self.out_tx: ClientTransaction | None = None
        self.relay = None
        self.state = "trying"              # trying -> early -> answered -> ended
        self.targets: list[tuple[str, Peer, str]] = []   # (label, peer, request-URI) left to try
        self.attempt: OutRequest | None = None
        self.attempt_target = ""           # the carrier (or PBX) of the current attempt
        self.started = time.monotonic()
        self.answered: float | None = None
        self.timers: list[asyncio.TimerHandle] = []
        self.free = False
        self.last_failure = 503
        self.provisional_seen = False
        self.ending = False

    def leg_of(self, dialog: Dialog) -> str:
        """Relay leg of a dialog: "a" faces the PBX, "b" the carrier."""
        return "a" if dialog.side == "pbx" else "b"


class B2BUA:
    """Calls of one node. Plugs into ``SipService`` as its call handler."""

    def __init__(self, cfg: Config, store: Store, sip: SipService, media: MediaService,
                 registry: CollectorRegistry | None) -> None:
        self.cfg = cfg
        self.store = store
        self.sip = sip
        self.media = media
        self.metrics = CallMetrics(registry)
        self.credit = CreditEngine(store, slice_seconds=cfg.credit.slice_seconds,
                                   bundle_minutes=cfg.credit.bundle_minutes)
        self.calls: dict[str, Call] = {}
        self.by_invite: dict[tuple, Call] = {}
        self.dialogs: dict[tuple[str, str], Dialog] = {}
        self.carriers = sorted(cfg.carriers, key=lambda c: c.priority)
        rate = cfg.sip.profile_rate_limit
        self.profile_limiter = RateLimiter(rate, max(1.0, 2 * rate))
        media.on_event = self._on_media_event
        sip.calls = self

    # ----------------------------------------------------------- addressing

    def via_host(self, proto: str) -> str:
        host, port = self.sip.transports.advertised(proto)
        return f"{host}:{port}"

    def contact(self, proto: str) -> str:
        host, port = self.sip.transports.advertised(proto)
        return f"<sip:{host}:{port};transport={proto}>"

    @property
    def tl(self):
        assert self.sip.transactions is not None
        return self.sip.transactions

    def carrier_targets(self, callee: str) -> list[tuple[str, Peer, str]]:
        """Carriers by priority; within one priority a weighted random order (SPEC §2)."""
        out: list[tuple[str, Peer, str]] = []
        for prio in sorted({c.priority for c in self.carriers}):
            group = [c for c in self.carriers if c.priority == prio]
            while group:
                pick = random.choices(group, weights=[max(c.weight, 0) or 1e-9 for c in group])[0]
                group.remove(pick)
                uri = parse_uri(pick.uri)
                proto = (uri.params.get("transport") or "udp").lower()
                port = uri.port or 5060
                out.append((pick.uri, Peer(proto, uri.host, port), f"sip:{callee}@{uri.host}:{port}"))
        return out

    # ------------------------------------------------------------ admission

    def on_invite(self, tx: ServerTransaction) -> None:
        if self.sip.is_trusted(tx.peer.host):
            self._incoming(tx)
        else:
            self._outgoing(tx)

    def _reject(self, tx: ServerTransaction, direction: str, rule: str, status: int, text: str,
                headers: list[tuple[str, str]] | None = None) -> None:
        self.metrics.rejected.labels(direction, rule, str(status)).inc()
        log.info("call rejected", extra={"event": "call_rejected", "direction": direction, "rule": rule,
                                         "status": status, "source": str(tx.peer), "sip_call_id": tx.request.call_id,
                                         "detail": text})
        tx.respond(status, headers=[warning(text), *(headers or [])], to_tag=new_tag())

    def _authenticate(self, tx: ServerTransaction) -> Profile | None:
        """SPEC §4.2 rule 1: an ip profile whose allow-list holds the source, or a digest
        answer to our 407 challenge. Responds (407/403) and returns None on failure."""
        req = tx.request
        from_user = req.from_.uri.user if req.from_.uri is not None else None
        cred = profiles.credential(self.store, from_user) if from_user else None
        if cred is not None and cred.auth == "ip" and source_allowed(tx.peer.host, cred.allowed_ips):
            return profiles.get(self.store, cred.profile_id)
        header = req.header("Proxy-Authorization")
        answer = parse_authorization(header) if header else None
        if answer is not None and (cred is None or cred.username != answer.username):
            cred = profiles.credential(self.store, answer.username)
        result = self.sip.auth.verify(answer, "INVITE", cred)
        if result is AuthResult.OK:
            assert cred is not None
            self.sip.failures.success(tx.peer.host)
            return profiles.get(self.store, cred.profile_id)
        if result in (AuthResult.MISSING, AuthResult.STALE, AuthResult.BAD_NONCE, AuthResult.UNSUPPORTED):
            if result is not AuthResult.MISSING:
                self.sip.metrics.auth_failures.labels(result.value, "INVITE").inc()
            self.metrics.rejected.labels("outgoing", "auth_challenge", "407").inc()
            tx.respond(407, headers=self.sip.auth.challenge(proxy=True, stale=result is AuthResult.STALE),
                       to_tag=new_tag())
            return None
        log.warning("call authentication refused", extra={"event": "auth_failure", "method": "INVITE",
                                                          "reason": result.value, "source": str(tx.peer)})
        self.sip.auth_failed(tx.peer.host, "INVITE", result.value)
        self._reject(tx, "outgoing", "auth", 403, {
            AuthResult.REPLAY: "nonce count reused",
            AuthResult.UNKNOWN_USER: "unknown SIP username",
            AuthResult.USER_MISMATCH: "digest username is not the SIP username",
            AuthResult.BAD_PASSWORD: "bad credentials",
        }.get(result, "authentication failed"))
        return None

    def _outgoing(self, tx: ServerTransaction) -> None:
        req = tx.request
        prof = self._authenticate(tx)
        if prof is None:
            return
        if not self.profile_limiter.allow(prof.id):                               # flood protection
            self.sip.metrics.rate_limited.labels("profile").inc()
            self._reject(tx, "outgoing", "rate_limit", 503, "call attempt rate limit of the profile",
                         headers=[("Retry-After", "1")])
            return
        from_user = req.from_.uri.user if req.from_.uri is not None else None
        if from_user != prof.sip_username:                                       # rule 2
            self._reject(tx, "outgoing", "from_user", 403, "From user must be the SIP username")
            return
        ruri_user = req.uri.user if req.uri is not None else None
        callee = is_e164(ruri_user or "")                                        # rule 3
        if callee is None:
            self._reject(tx, "outgoing", "e164", 484,
                         "Request-URI must be a full international E.164 number (country code and number)")
            return
        admission = self.credit.admit(prof, callee)
        call = Call("outgoing", prof, tx)
        call.free = admission.free
        if not self._seize(call, caller=prof.sip_username, callee=callee,
                           funding="free" if admission.free else ("bundle" if admission.bundle else "credit")):
            return                                                                # rule 4
        if not admission.ok:                                                      # rule 5
            rule, status, text = (("no_rate", 404, "no route: no rate covers the destination")
                                  if admission.reason == "no_rate" else
                                  ("credit", 402, "insufficient credit for the minimum charge"))
            self.metrics.rejected.labels("outgoing", rule, str(status)).inc()
            self._finish(call, status, rule, respond_text=text)
            return
        call.rate = admission.rate
        self._start_inbound_dialog(call, side="pbx")
        if callee == ECHO_NUMBER:
            self._answer_echo(call)
            return
        self._arm_setup_timer(call)
        call.targets = self.carrier_targets(callee)
        if not call.targets:
            self._finish(call, 503, "no_carrier", respond_text="no carrier configured")
            return
        self._try_next_target(call)

    def _seize(self, call: Call, *, caller: str, callee: str, funding: str) -> bool:
        """Rule 4: a free channel (incoming and outgoing calls alike), seized atomically."""
        prof = call.profile
        live = LiveCall(call_id=call.id, profile_id=prof.id, direction=call.direction, started_at=time.time(),
                        caller=caller, callee=callee, funding=funding)

        if not channels.take(self.store, prof.id, live):
            status = 486
            self.metrics.rejected.labels(call.direction, "channels", str(status)).inc()
            call.invite.respond(status, "Busy Here", headers=[warning(f"all {prof.channels} channels of the profile are in use")],
                                to_tag=new_tag())
            return False
        call.live = live
        log.info("call started", extra={"event": "call_started", "call_id": call.id, "direction": call.direction,
                                        "profile": prof.id, "caller": caller, "callee": callee,
                                        "source": str(call.invite.peer), "inbound_call_id": call.invite.request.call_id})
        self.calls[call.id] = call
        self.by_invite[call.invite.key] = call
        self.metrics.started.labels(call.direction).inc()
        self.metrics.active.labels(call.direction).inc()
        return True

    def _start_inbound_dialog(self, call: Call, side: str) -> None:
        req = call.invite.request
        contact = req.contacts[0].uri if req.contacts and req.contacts[0].uri is not None else req.from_.uri
        local_tag = new_tag()
        call.invite.to_tag = local_tag
        dialog = Dialog(self, call, side, call.invite.peer, req.call_id, local_tag,
                        local_uri=_strip_tag(req.header("To") or ""), remote_uri=req.header("From") or "",
                        remote_target=str(contact), remote_tag=req.from_tag,
                        route_set=req.headers("Record-Route"), cseq=0)
        dialog.remote_uri = _strip_tag(dialog.remote_uri)
        call.inbound = dialog
        self.dialogs[dialog.key] = dialog

    def _incoming(self, tx: ServerTransaction) -> None:
        """SPEC §4.3: a trusted carrier calls an online number or a business account."""
        req = tx.request
        user = req.uri.user if req.uri is not None else None
        if not user:
            self._reject(tx, "incoming", "unknown_number", 404, "no number in the Request-URI")
            return
        number = is_e164(user)
        found = numbers.profile_by_number(self.store, number) if number else None
        target_user = None
        if found is not None:
            rec, prof = found
            target_user = rec.extension or rec.number
        else:
            biz = numbers.business_account(self.store, user)
            if biz is None or biz.profile_id is None:
                self._reject(tx, "incoming", "unknown_number", 404, "number or business account not in service")
                return
            prof = profiles.get(self.store, biz.profile_id)
            target_user = user
        if prof.auth == "ip":
            if not prof.static_contact:
                self._reject(tx, "incoming", "not_registered", 480, "profile has no static contact")
                return
            contact_uri = parse_uri(prof.static_contact)
            dest = Peer((contact_uri.params.get("transport") or "udp").lower(), contact_uri.host, contact_uri.port or 5060)
        else:
            bindings = registrations.live(self.store, prof.id)
            if not bindings:
                self._reject(tx, "incoming", "not_registered", 480, "the PBX of this number is not registered")
                return
            best = max(bindings, key=lambda b: b.registered_at)
            contact_uri = parse_uri(best.contact)
            # NAT: send to where the REGISTER came from, not to the private Contact address
            dest = _peer_of(best.source) or Peer((contact_uri.params.get("transport") or "udp").lower(),
                                                  contact_uri.host, contact_uri.port or 5060)
        caller = (req.from_.uri.user if req.from_.uri is not None else None) or "anonymous"
        call = Call("incoming", prof, tx)
        call.free = True  # incoming calls are not charged
        if not self._seize(call, caller=caller, callee=number or user, funding=""):
            return
        self._start_inbound_dialog(call, side="carrier")
        host_port = f"{contact_uri.host}:{contact_uri.port}" if contact_uri.port else contact_uri.host
        params = "".join(f";{k}={v}" if v is not None else f";{k}" for k, v in contact_uri.params.items())
        ruri = f"sip:{target_user}@{host_port}{params}"
        domain = self.cfg.sip.domain
        call.targets = [("pbx", dest, ruri)]
        self._arm_setup_timer(call)
        self._try_next_target(call, from_uri=f"<sip:{caller}@{domain}>", to_uri=f"<sip:{prof.sip_username}@{domain}>")

    # ---------------------------------------------------------- outbound leg

    def _try_next_target(self, call: Call, from_uri: str | None = None, to_uri: str | None = None) -> None:
        label, peer, ruri = call.targets.pop(0)
        req = call.invite.request
        domain = self.cfg.sip.domain
        if call.relay is None and not self._create_relay(call):
            return
        body = b""
        inbound_leg = call.leg_of(call.inbound)
        outbound_side = "carrier" if call.inbound.side == "pbx" else "pbx"
        if req.body:
            try:
                body = self._anchor(call, inbound_leg, req.body)
            except SdpError as exc:
                self._finish(call, 488, "bad_sdp", respond_text=f"SDP cannot be anchored: {exc}")
                return
        if from_uri is None:
            display = req.from_.display
            from_uri = (f'"{display}" ' if display else "") + f"<sip:{call.profile.sip_username}@{domain}>"
        if to_uri is None:
            to_uri = f"<{ruri}>"
        local_tag = new_tag() if call.outbound is None else call.outbound.local_tag
        call_id = call.outbound.call_id if call.outbound is not None else new_call_id(self.sip.transports.advertised(peer.proto)[0])
        dialog = Dialog(self, call, outbound_side, peer, call_id, local_tag, local_uri=from_uri, remote_uri=to_uri,
                        remote_target=ruri, cseq=(call.outbound.cseq if call.outbound else 0))
        if call.outbound is not None:
            self.dialogs.pop(call.outbound.key, None)
        call.outbound = dialog
        self.dialogs[dialog.key] = dialog
        headers = [("Contact", self.contact(peer.proto)), ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE")]
        if body:
            headers.append(SDP)
        dialog.cseq += 1
        invite = OutRequest("INVITE", ruri, proto=peer.proto, via_host=self.via_host(peer.proto),
                            from_=f"{from_uri};tag={local_tag}", to=to_uri, call_id=call_id, cseq=dialog.cseq,
                            headers=headers, body=body)
        call.attempt = invite
        call.attempt_target = label
        log.info("call attempt", extra={"event": "call_attempt", "call_id": call.id, "target": label,
                                        "outbound_call_id": call_id})
        call.out_tx = self.tl.send_request(invite, peer, on_response=lambda m, c=call, t=invite: self._on_response(c, t, m),
                                           on_timeout=lambda c=call, t=invite: self._on_attempt_timeout(c, t))

    def _arm_setup_timer(self, call: Call) -> None:
        """Timer C (RFC 3261 §16.6): a call that rings too long is cancelled."""
        def expire() -> None:
            if call.state in ("trying", "early") and not call.ending:
                self._finish(call, 408, "timeout", respond_text="no answer")

        call.timers.append(self.tl.loop.call_later(self.cfg.sip.setup_timeout, expire))

    def _create_relay(self, call: Call) -> bool:
        try:
            call.relay = self.media.create(call.id, timeout=self.cfg.media.rtp_timeout)
        except RuntimeError as exc:  # the port range is exhausted
            log.error("call %s: %s", call.id, exc)
            self._finish(call, 503, "no_media_ports", respond_text="no media ports free on the edge")
            return False
        return True

    def _anchor(self, call: Call, from_leg: str, sdp: bytes) -> bytes:
        return self.media.anchor(call.relay, from_leg, sdp)

    def _on_attempt_timeout(self, call: Call, attempt: OutRequest) -> None:
        if call.attempt is not attempt or call.state in ("answered", "ended"):
            return
        self._failover_or_fail(call, 408)

    def _failover_or_fail(self, call: Call, status: int) -> None:
        call.last_failure = status
        if call.targets and not call.provisional_seen and not call.ending:
            self.metrics.failovers.labels(call.attempt_target).inc()  # the carrier that failed
            self._try_next_target(call)
            return
        reason = "timeout" if status == 408 else "carrier_failure"
        if call.direction == "incoming" and status == 408:
            status = 480  # the PBX did not answer: temporarily unavailable for the carrier
        self._finish(call, status, reason)

    def _on_response(self, call: Call, attempt: OutRequest, resp: SipMessage) -> None:
        if call.attempt is not attempt:
            return
        status = resp.status
        out = call.outbound
        if status < 200:
            if status == 100 or call.state in ("answered", "ended"):
                return
            if not call.provisional_seen:
                call.provisional_seen = True
                self.metrics.setup.labels(call.direction, "provisional").observe(time.monotonic() - call.started)
            out.remote_tag = resp.to_tag or out.remote_tag
            headers: list[tuple[str, str]] = [("Contact", self.contact(call.inbound.proto)), *_record_routes(call)]
            body = b""
            if resp.body:
                try:  # early media (183/180 with SDP): anchor it now
                    body = self._anchor(call, call.leg_of(out), resp.body)
                    headers.append(SDP)
                except SdpError:
                    body = b""
            call.state = "early"
            call.invite.respond(status, resp.reason, headers=headers, body=body)
            return
        if status < 300:
            self._on_answer(call, resp)
            return
        if call.state == "ended":
            return
        if status in RETRY_STATUSES and call.direction == "outgoing":
            self._failover_or_fail(call, status)
            return
        self._finish(call, status, "rejected", respond_reason=resp.reason)

    def _on_answer(self, call: Call, resp: SipMessage) -> None:
        out = call.outbound
        if call.state in ("answered", "ended") or call.ending:
            # a retransmitted 2xx (ACK again) or one that raced our CANCEL/BYE (ACK, then BYE)
            self._ack_2xx(out, resp)
            if call.state == "ended" or (call.ending and resp.to_tag != out.remote_tag):
                self.tl.send_stateless(_bye_like(out, resp, self), out.peer)
            return
        out.remote_tag = resp.to_tag
        contact = resp.contacts[0].uri if resp.contacts and resp.contacts[0].uri is not None else None
        if contact is not None:
            out.remote_target = str(contact)
        out.route_set = list(reversed(resp.headers("Record-Route")))
        self._ack_2xx(out, resp)
        body = b""
        if resp.body:
            try:
                body = self._anchor(call, call.leg_of(out), resp.body)
            except SdpError as exc:
                log.warning("call %s: answer SDP cannot be anchored: %s", call.id, exc)
                self._finish(call, 488, "bad_sdp")
                return
        call.state = "answered"
        call.answered = time.monotonic()
        self.metrics.setup.labels(call.direction, "answer").observe(call.answered - call.started)
        log.info("call answered", extra={"event": "call_answered", "call_id": call.id,
                                         "setup_ms": int((call.answered - call.started) * 1000)})
        self._answer_inbound(call, body)
        self._start_billing(call)

    def _ack_2xx(self, dialog: Dialog, resp: SipMessage) -> None:
        """ACK a 2xx ourselves at once: each leg is its own dialog (§13.2.2.4)."""
        ack = OutRequest("ACK", dialog.remote_target, proto=dialog.proto, via_host=self.via_host(dialog.proto),
                         from_=f"{dialog.local_uri};tag={dialog.local_tag}",
                         to=f"{dialog.remote_uri};tag={resp.to_tag}", call_id=dialog.call_id, cseq=resp.cseq,
                         headers=[("Route", r) for r in dialog.route_set])
        self.tl.send_stateless(ack, dialog.peer)

    def _answer_inbound(self, call: Call, body: bytes) -> None:
        headers = [("Contact", self.contact(call.inbound.proto)), *_record_routes(call),
                   ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE")]
        if body:
            headers.append(SDP)
        self._send_2xx(call.inbound, call.invite, 200, headers, body)

    def _send_2xx(self, dialog: Dialog, tx: ServerTransaction, status: int, headers: list[tuple[str, str]],
                  body: bytes) -> None:
        """Send a 2xx to an INVITE and retransmit it until the ACK (§13.3.1.4): T1 doubling to T2."""
        tx.respond(status, headers=headers, body=body, to_tag=dialog.local_tag)
        data = tx.last_response
        assert data is not None
        dialog.pending_2xx = (tx, data)
        t1, t2 = self.tl.t1, self.tl.t2
        deadline = time.monotonic() + 64 * t1

        def again(interval: float) -> None:
            if dialog.pending_2xx is None or dialog.pending_2xx[1] is not data:
                return
            if time.monotonic() >= deadline:
                dialog.pending_2xx = None
                log.info("call %s: no ACK for our 2xx, ending the call", dialog.call.id)
                self.end(dialog.call, "no_ack", skip=None)
                return
            self.sip.transports.send(data, dialog.peer)
            self.sip.metrics.retransmissions.labels("2xx").inc()
            dialog.ack_timer = self.tl.loop.call_later(min(2 * interval, t2), again, min(2 * interval, t2))

        dialog.ack_timer = self.tl.loop.call_later(t1, again, t1)

    # ---------------------------------------------------------------- echo

    def _answer_echo(self, call: Call) -> None:
        """The echo test number: answered by the edge, the caller hears itself (free)."""
        req = call.invite.request
        if not self._create_relay(call):
            return
        body = b""
        if req.body:
            try:
                body = self._anchor_echo(call, req.body)
            except SdpError as exc:
                self._finish(call, 488, "bad_sdp", respond_text=f"SDP cannot be anchored: {exc}")
                return
        call.state = "answered"
        call.answered = time.monotonic()
        self.metrics.setup.labels(call.direction, "answer").observe(call.answered - call.started)
        self._answer_inbound(call, body)
        self._start_billing(call)

    # -------------------------------------------------------------- credit

    def _start_billing(self, call: Call) -> None:
        live = call.live
        assert live is not None
        now = time.time()
        live.answered_at = now
        live.legs = [d.as_record() for d in (call.inbound, call.outbound) if d is not None]
        if call.free or call.rate is None:
            channels.update(self.store, live)
        else:
            self.store.write(lambda txn: self.credit.extend(txn, live, call.rate, now), sync=False, grows=False)
            self._schedule_credit(call)
        limit = self.cfg.credit.max_call_seconds
        call.timers.append(self.tl.loop.call_later(limit, lambda: self.end(call, "max_duration")))

    def _schedule_credit(self, call: Call) -> None:
        """Before the funded time runs out, fund the next slice; if nothing more can be
        funded, end the call exactly when the funded time is over (SPEC §4.4)."""
        live = call.live
        assert live is not None and live.funded_until is not None
        left = live.funded_until - time.time()
        lead = min(5.0, self.cfg.credit.slice_seconds / 4)
        call.timers.append(self.tl.loop.call_later(max(0.0, left - lead), self._extend, call))

    def _extend(self, call: Call) -> None:
        if call.state != "answered" or call.ending:
            return
        live = call.live
        assert live is not None and call.rate is not None
        before = live.funded_until
        after = self.store.write(lambda txn: self.credit.extend(txn, live, call.rate, time.time()), sync=False,
                                 grows=False)
        if after is not None and before is not None and after > before:
            self._schedule_credit(call)
            return
        delay = max(0.0, (after or time.time()) - time.time())
        call.timers.append(self.tl.loop.call_later(delay, self._cut_off, call))

    def _cut_off(self, call: Call) -> None:
        if call.state == "answered" and not call.ending:
            self.metrics.cutoffs.inc()
            self.end(call, "credit_exhausted", reason_header='SIP;cause=402;text="Credit exhausted"')

    # ------------------------------------------------------ in-dialog requests

    def on_in_dialog(self, tx: ServerTransaction) -> bool:
        req = tx.request
        dialog = self.dialogs.get((req.call_id, req.to_tag or ""))
        if dialog is None:
            return False
        call = dialog.call
        method = req.method
        if method == "BYE":
            tx.respond(200)
            if call.state != "ended":
                by_caller = (dialog is call.inbound)
                self.end(call, "caller_bye" if by_caller else "callee_bye", skip=dialog)
            return True
        other = call.outbound if dialog is call.inbound else call.inbound
        if other is None and call.state == "answered" and call.relay is not None:
            self._echo_in_dialog(call, dialog, tx)  # the echo service is the other side
            return True
        if other is None or call.state == "ended":
            tx.respond(481, "Call/Transaction Does Not Exist")
            return True
        if method == "INVITE":
            self._relay_reinvite(call, dialog, other, tx)
            return True
        self._relay_non_invite(call, dialog, other, tx)
        return True

    def _anchor_echo(self, call: Call, sdp: bytes) -> bytes:
        """Point relay leg a back at the caller in echo mode; the answer names leg a's ports."""
        media = parse_sdp_media(sdp)
        call.relay.set_remote("a", media.host, media.port, media.rtcp_port)
        call.relay.set_echo("a")
        leg = call.relay.leg_a
        return rewrite_sdp(sdp, leg.address, leg.rtp_port, leg.rtcp_port)

    def _echo_in_dialog(self, call: Call, dialog: Dialog, tx: ServerTransaction) -> None:
        """Hold/resume and keep-alives on an echo call: answered by the edge itself."""
        req = tx.request
        if req.method != "INVITE" or not req.body:
            tx.respond(200)
            return
        try:
            body = self._anchor_echo(call, req.body)
        except SdpError as exc:
            tx.respond(488, headers=[warning(f"SDP cannot be anchored: {exc}")])
            return
        self._send_2xx(dialog, tx, 200, [("Contact", self.contact(dialog.proto)), SDP], body)

    def _relay_reinvite(self, call: Call, origin: Dialog, other: Dialog, tx: ServerTransaction) -> None:
        """Hold/resume and SDP changes: a re-INVITE on the other leg, media re-anchored."""
        req = tx.request
        if call.relay is None or not req.body:
            tx.respond(488, "Not Acceptable Here", headers=[warning("re-INVITE without SDP is not supported")])
            return
        try:
            body = self._anchor(call, call.leg_of(origin), req.body)
        except SdpError as exc:
            tx.respond(488, headers=[warning(f"SDP cannot be anchored: {exc}")])
            return
        out = other.request("INVITE", headers=[SDP], body=body)

        def on_response(resp: SipMessage) -> None:
            if resp.status < 200:
                return
            if resp.status >= 300:
                tx.respond(resp.status, resp.reason)
                return
            self._ack_2xx(other, resp)
            answer = b""
            if resp.body:
                try:
                    answer = self._anchor(call, call.leg_of(other), resp.body)
                except SdpError:
                    answer = b""
            if tx.state is State.PROCEEDING:
                headers = [("Contact", self.contact(origin.proto))] + ([SDP] if answer else [])
                self._send_2xx(origin, tx, 200, headers, answer)

        self.tl.send_request(out, other.peer, on_response=on_response,
                             on_timeout=lambda: tx.respond(408) if tx.state is State.PROCEEDING else None)

    def _anchor_if_sdp(self, call: Call, sender: Dialog, body: bytes, ctype: str) -> bytes:
        """An SDP body from ``sender`` goes through the relay; any other body passes as it is."""
        if ctype.lower().startswith("application/sdp") and call.relay is not None:
            return self._anchor(call, call.leg_of(sender), body)
        return body

    def _relay_non_invite(self, call: Call, origin: Dialog, other: Dialog, tx: ServerTransaction) -> None:
        """OPTIONS, INFO, UPDATE, ... relayed to the other leg; the answer comes back."""
        req = tx.request
        body = req.body
        headers: list[tuple[str, str]] = []
        ctype = req.header("Content-Type")
        if body and ctype:
            try:
                body = self._anchor_if_sdp(call, origin, body, ctype)
            except SdpError as exc:
                tx.respond(488, headers=[warning(f"SDP cannot be anchored: {exc}")])
                return
            headers.append(("Content-Type", ctype))
        for name in ("Event", "Subscription-State", "Info-Package", "Reason"):
            value = req.header(name)
            if value:
                headers.append((name, value))
        out = other.request(req.method, headers=headers, body=body)

        def on_response(resp: SipMessage) -> None:
            if resp.status < 200:
                return
            rbody = resp.body
            rheaders: list[tuple[str, str]] = []
            rtype = resp.header("Content-Type")
            if rbody and rtype:
                try:
                    rbody = self._anchor_if_sdp(call, other, rbody, rtype)
                except SdpError:
                    rbody = b""
                rheaders.append(("Content-Type", rtype))
            tx.respond(resp.status, resp.reason, headers=rheaders, body=rbody if rheaders else b"")

        self.tl.send_request(out, other.peer, on_response=on_response, on_timeout=lambda: tx.respond(408))

    def on_ack(self, msg: SipMessage, peer: Peer) -> None:
        dialog = self.dialogs.get((msg.call_id, msg.to_tag or ""))
        if dialog is not None and dialog.pending_2xx is not None:
            dialog.pending_2xx = None
            if dialog.ack_timer is not None:
                dialog.ack_timer.cancel()

    def on_cancel(self, invite: ServerTransaction, cancel: SipMessage) -> None:
        call = self.by_invite.get(invite.key)
        if call is None or call.state in ("answered", "ended"):
            if invite.state is State.PROCEEDING:
                invite.respond(487)
            return
        self._finish(call, 487, "cancel")

    def on_stray_response(self, msg: SipMessage, peer: Peer) -> None:
        """A 2xx retransmitted after its INVITE transaction ended: ACK it again."""
        if msg.status < 200 or msg.status >= 300 or msg.cseq_method != "INVITE":
            return
        dialog = self.dialogs.get((msg.call_id, msg.from_tag or ""))
        if dialog is not None:
            self._ack_2xx(dialog, msg)

    # --------------------------------------------------------------- ending

    def _on_media_event(self, relay_id: int, tag: str, kind: str) -> None:
        call = self.calls.get(tag)
        if call is not None and kind == "timeout" and call.state != "ended":
            self.end(call, "rtp_timeout", reason_header='SIP;cause=408;text="Media timeout"')

    def end(self, call: Call, reason: str, *, skip: Dialog | None = None, reason_header: str | None = None) -> None:
        """End a call from the edge or on a BYE: BYE every answered leg but ``skip``."""
        if call.state == "ended" or call.ending:
            return
        if call.state != "answered":
            self._finish(call, 480 if reason != "cancel" else 487, reason)
            return
        call.ending = True
        headers = [("Reason", reason_header)] if reason_header else []
        for dialog in (call.inbound, call.outbound):
            if dialog is None or dialog is skip or dialog.remote_tag is None:
                continue
            dialog.pending_2xx = None
            bye = dialog.request("BYE", headers=list(headers))
            self.tl.send_request(bye, dialog.peer, on_response=lambda m: None, on_timeout=lambda: None)
        self._close(call, 200, reason)

    def _finish(self, call: Call, status: int, reason: str, *, respond_text: str | None = None,
                respond_reason: str | None = None) -> None:
        """End a call that was never answered: answer the inbound INVITE, cancel the outbound one."""
        if call.state == "ended":
            return
        call.ending = True
        if call.out_tx is not None and call.out_tx.state in (State.CALLING, State.PROCEEDING):
            call.out_tx.cancel('SIP;cause=487;text="Call cancelled"' if reason == "cancel" else None)
        if call.invite.state is State.PROCEEDING:
            headers = [warning(respond_text)] if respond_text else []
            call.invite.respond(status, respond_reason, headers=headers,
                                to_tag=call.inbound.local_tag if call.inbound else new_tag())
        self._close(call, status, reason)

    def _close(self, call: Call, status: int, reason: str) -> None:
        call.state = "ended"
        for t in call.timers:
            t.cancel()
        media: dict[str, int] = {}
        if call.relay is not None:
            stats = call.relay.delete() if not call.relay.deleted else None
            if stats is not None:
                media = _media_summary(stats)
        for dialog in (call.inbound, call.outbound):
            if dialog is not None:
                if dialog.ack_timer is not None:
                    dialog.ack_timer.cancel()
                # keep the dialog a little for late BYE/ACK retransmissions, then forget it
                self.tl.loop.call_later(32.0, self.dialogs.pop, dialog.key, None)
        self.calls.pop(call.id, None)
        self.by_invite.pop(call.invite.key, None)
        self.metrics.active.labels(call.direction).dec()
        self.metrics.ended.labels(call.direction, str(status), reason).inc()
        log.info("call ended", extra={
            "event": "call_ended", "call_id": call.id, "direction": call.direction, "profile": call.profile.id,
            "status": status, "reason": reason,
            "talk_seconds": round(time.monotonic() - call.answered, 3) if call.answered else 0,
            "inbound_call_id": call.inbound.call_id if call.inbound else call.invite.request.call_id,
            "outbound_call_id": call.outbound.call_id if call.outbound else None})
        live = call.live
        if live is None:
            return
        ended = time.time()
        rate = call.rate if not call.free else None
        # committed at once (a process crash loses nothing); the fsync follows off the loop
        self.store.write(lambda txn: self.credit.settle(txn, live, rate, ended, status=status, end_reason=reason,
                                                         media=media), sync=False, grows=False)
        self.sip.flush_soon()

    # ------------------------------------------------------------ recovery

    def recover(self) -> int:
        """Settle the calls a previous run left behind and BYE the legs we can reach."""
        calls = self.credit.recover()
        for live in calls:
            for leg in live.legs:
                try:
                    peer = _peer_of(leg["peer"])
                    if peer is None:
                        continue
                    proto = peer.proto
                    bye = OutRequest("BYE", leg["target"], proto=proto, via_host=self.via_host(proto),
                                     from_=leg["local"], to=leg["remote"], call_id=leg["call_id"],
                                     cseq=int(leg.get("cseq", "1")) + 100,
                                     headers=[("Reason", 'SIP;cause=500;text="Edge restarted"')])
                    self.tl.send_request(bye, peer, on_response=lambda m: None,
                                         on_timeout=lambda: None)
                except (KeyError, ValueError, SipParseError):
                    continue
        return len(calls)


def _record_routes(call: Call) -> list[tuple[str, str]]:
    """RFC 3261 §12.1.1: a response that establishes a dialog copies the request's Record-Route."""
    return [("Record-Route", rr) for rr in call.invite.request.headers("Record-Route")]


def _peer_of(text: str) -> Peer | None:
    """``"udp:1.2.3.4:5060"`` (as ``str(Peer)`` writes it) back to a Peer."""
    proto, _, rest = text.partition(":")
    host, _, port = rest.rpartition(":")
    if proto not in ("udp", "tcp") or not host or not port.isdigit():
        return None
    return Peer(proto, host.strip("[]"), int(port))


def _strip_tag(value: str) -> str:
    """A From/To value without its tag parameter (we add our own)."""
    head, sep, rest = value.partition(";tag=")
    if not sep:
        return value
    _, semi, after = rest.partition(";")
    return head + (";" + after if semi else "")


def _bye_like(dialog: Dialog, resp: SipMessage, b2b: B2BUA) -> OutRequest:
    """A BYE for a dialog a stray 2xx established (a fork we do not want)."""
    contact = resp.contacts[0].uri if resp.contacts and resp.contacts[0].uri is not None else None
    return OutRequest("BYE", str(contact) if contact is not None else dialog.remote_target, proto=dialog.proto,
                      via_host=b2b.via_host(dialog.proto), from_=f"{dialog.local_uri};tag={dialog.local_tag}",
                      to=f"{dialog.remote_uri};tag={resp.to_tag}", call_id=dialog.call_id, cseq=dialog.cseq + 1)


def _media_summary(stats) -> dict[str, int]:
    """Per-leg counters for the CDR (a: PBX side, b: carrier side)."""
    out: dict[str, int] = {}
    for name in ("a", "b"):
        leg = stats.leg(name)
        rtp = leg.rtp
        out[f"{name}_packets"] = int(rtp.packets)
        out[f"{name}_bytes"] = int(rtp.bytes)
        out[f"{name}_lost"] = int(rtp.lost)
        out[f"{name}_dropped"] = int(rtp.dropped_total)
        out[f"{name}_jitter_us"] = int(rtp.jitter_ms * 1000)
    return out

