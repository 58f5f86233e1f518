"""The registrar (RFC 3261 §10.3, SPEC §4.1) on the LMDB store.

The address-of-record is the profile's SIP username (the To user); the digest
username must be the same. The steps run in the RFC's order: authenticate first
(step 3: no credentials, whatever the To, get a 401 challenge), then the address of
record (step 5: not a profile's SIP username -> 404), then whether the authenticated
user may register it (step 6: not their own -> 403). Bindings are kept per contact with
their expiry and the address the REGISTER really came from (transport, IP and port), so
incoming calls reach a PBX behind NAT over the flow it registered from.
"""

from __future__ import annotations

import logging
import time
from email.utils import formatdate

from edge.control import profiles, registrations
from edge.control.errors import StoreError
from edge.control.models import Registration
from edge.control.store import Store, Txn

from .auth import AuthResult, DigestAuth, FailureTracker, parse_authorization, source_allowed
from .metrics import SipMetrics
from .transaction import ServerTransaction

log = logging.getLogger("sipedge.registrar")


_date_cache: tuple[int, str] = (0, "")


def _http_date(now: float) -> str:
    """RFC 1123 date for the Date header, formatted once per second."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, formatdate(second, usegmt=True))
    return _date_cache[1]


class _OutOfOrder(Exception):
    """An older REGISTER of the same Call-ID than the binding we hold (RFC 3261 §10.3 step 7)."""


class _NewBinding(Exception):
    """The REGISTER adds a binding: new work, to be written under the store's growth check."""


class Registrar:
    def __init__(self, store: Store, auth: DigestAuth, metrics: SipMetrics, failures: FailureTracker,
                 on_failure, *,
                 min_expires: int = 60, max_expires: int = 3600, default_expires: int = 3600) -> None:
        self.store = store
        self.auth = auth
        self.metrics = metrics
        self.failures = failures
        self.on_failure = on_failure      # (host, method, reason): counts and blocks (SipService.auth_failed)
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = min(default_expires, max_expires)

    def handle(self, tx: ServerTransaction) -> None:
        req = tx.request
        aor = req.to.uri.user if req.to.uri is not None else None
        # §10.3 step 3: authenticate -- an ip profile from an allowed source, or a digest
        # answer checked against the credential of its own username; no credentials, a
        # challenge, whatever the To says
        cred = profiles.credential(self.store, aor) if aor else None
        ip_ok = cred is not None and cred.auth == "ip" and source_allowed(tx.peer.host, cred.allowed_ips)
        if not ip_ok:
            header = req.header("Authorization")
            answer = parse_authorization(header) if header else None
            if answer is not None and (cred is None or cred.username != answer.username):
                cred = profiles.credential(self.store, answer.username)
            result = self.auth.verify(answer, "REGISTER", cred)
            if result is not AuthResult.OK:
                self._refuse(tx, result)
                return
        self.failures.success(tx.peer.host)
        assert cred is not None
        # step 5: the address of record must be a profile's SIP username
        if not aor or (aor != cred.username and profiles.credential(self.store, aor) is None):
            tx.respond(404, headers=[("Warning", '399 sipedge "To must carry a SIP username of this service"')])
            return
        # step 6: the authenticated user may register only their own address of record
        if aor != cred.username:
            self._refuse(tx, AuthResult.USER_MISMATCH)
            return
        self._update_bindings(tx, cred.profile_id)

    def _refuse(self, tx: ServerTransaction, result: AuthResult) -> None:
        if result in (AuthResult.MISSING, AuthResult.STALE, AuthResult.BAD_NONCE, AuthResult.UNSUPPORTED):
            if result is not AuthResult.MISSING:
                self.metrics.auth_failures.labels(result.value, "REGISTER").inc()
            tx.respond(401, headers=self.auth.challenge(proxy=False, stale=result is AuthResult.STALE))
            return
        log.warning("registration refused", extra={"event": "auth_failure", "method": "REGISTER",
                                                   "reason": result.value, "source": str(tx.peer),
                                                   "user": tx.request.to.uri.user if tx.request.to.uri else None})
        self.on_failure(tx.peer.host, "REGISTER", result.value)
        reasons = {
            AuthResult.REPLAY: "Nonce count reused",
            AuthResult.UNKNOWN_USER: "Unknown SIP username",
            AuthResult.USER_MISMATCH: "Digest username must be the SIP username in To",
            AuthResult.BAD_PASSWORD: "Bad credentials",
        }
        text = reasons[result]
        tx.respond(403, text, headers=[("Warning", f'399 sipedge "{text}"')])

    def _update_bindings(self, tx: ServerTransaction, profile_id: str) -> None:
        req = tx.request
        now = time.time()
        header_expires = req.expires
        contacts = req.contacts
        call_id, cseq = req.call_id, req.cseq
        if contacts and contacts[0].star:
            # RFC 3261 §10.3 step 6: "*" only with Expires: 0, and alone
            if header_expires != 0 or len(contacts) != 1:
                tx.respond(400, "Contact * needs Expires: 0")
                return
            registrations.remove_all(self.store, profile_id)
            self._ok(tx, profile_id, [], now)
            return
        changes: list[tuple[str, int]] = []
        for contact in contacts:
            expires = contact.params.get("expires")
            try:
                seconds = int(expires) if expires is not None else (
                    header_expires if header_expires is not None else self.default_expires)
            except ValueError:
                tx.respond(400, "Bad expires parameter")
                return
            if 0 < seconds < self.min_expires:
                tx.respond(423, headers=[("Min-Expires", str(self.min_expires))])
                return
            changes.append((str(contact.uri), min(seconds, self.max_expires)))
        source = str(tx.peer)
        user_agent = req.header("User-Agent") or ""

        def op(txn: Txn, adds: bool) -> list[Registration]:
            for uri, seconds in changes:
                k = registrations.binding_key(profile_id, uri)  # one key for the read and the write
                existing = registrations.binding_at(txn, k)
                if existing is None and seconds and not adds:
                    raise _NewBinding  # aborts: written again as new work
                # §10.3 step 7: an older REGISTER of the same Call-ID must not undo a newer one
                if existing is not None and existing.call_id == call_id and existing.cseq >= cseq:
                    raise _OutOfOrder  # aborts the whole transaction: no contact of it is applied
                if seconds == 0:
                    registrations.remove_at(txn, k)
                else:
                    registrations.save_at(txn, k, Registration(
                        profile_id=profile_id, contact=uri, expires_at=now + seconds, source=source,
                        call_id=call_id, cseq=cseq, user_agent=user_agent, registered_at=now))
            return registrations.live(txn, profile_id, now)  # for the 200, in the same transaction

        if not changes:  # a query: list the bindings
            self._ok(tx, profile_id, registrations.live(self.store, profile_id, now), now)
            return
        # a refresh or removal of bindings we hold finishes admitted work: it may use the store's
        # reserve, so PBXs stay registered on a full store; only a new binding is new work. The
        # common case (a refresh) is one transaction; a new binding tries once more as new work.
        try:
            try:
                bindings = self.store.write(lambda txn: op(txn, False), sync=False, grows=False)
            except _NewBinding:
                bindings = self.store.write(lambda txn: op(txn, True), sync=False, grows=True)
        except _OutOfOrder:
            tx.respond(500, "Out of order REGISTER", headers=[("Retry-After", "1")])
            return
        except StoreError as exc:
            log.error("registration refused: the store cannot record it (%s)", exc)
            tx.respond(503, "Store Unavailable", headers=[
                ("Retry-After", "30"), ("Warning", '399 sipedge "the edge cannot record registrations now"')])
            return
        self._ok(tx, profile_id, bindings, now)

    def _ok(self, tx: ServerTransaction, profile_id: str, bindings: list[Registration], now: float) -> None:
        if log.isEnabledFor(logging.DEBUG):  # per-REGISTER: no dict (nor str(peer)) built when not logged
            log.debug("registered", extra={"event": "registered", "profile": profile_id, "source": str(tx.peer),
                                           "bindings": len(bindings)})
        headers = [("Contact", f"<{b.contact}>;expires={max(1, int(b.expires_at - now))}") for b in bindings]
        headers.append(("Date", _http_date(now)))
        tx.respond(200, headers=headers)
