"""The SIP service of a node: transports, transactions, and the dispatch of requests
to the registrar, OPTIONS keep-alives and the B2BUA (calls)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from edge.config import Config, carrier_uses_tls, resolve_sides
from edge.control.errors import StoreError
from edge.control.store import Store

from . import SipMessage
from .auth import DigestAuth, FailureTracker
from .dialog import Dialogs
from .metrics import SipMetrics
from .registrar import Registrar
from .tls import TlsContexts
from .transaction import Clock, ServerTransaction, State, TransactionLayer
from .transport import BOTH, Peer, Transports
from .workers import WorkerLink, WorkerRouter

log = logging.getLogger("sipedge.sip")

DRAIN_RETRY_AFTER = 60  # seconds a peer should leave a draining edge alone (docs/deployment.md)
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REGISTER"


class RateLimiter:
    """Token bucket per source address (SPEC §7 flood protection).

    :param rate: sustained requests per second per source.
    :param burst: bucket size.
    """

    def __init__(self, rate: float, burst: float, max_sources: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if len(self._buckets) >= self.max_sources and key not in self._buckets:
            self._buckets.clear()  # bounded memory under a spoofed-source flood
        self._buckets[key] = (tokens - 1.0, now)
        return True


# Calls ending within this gap share one fsync (issue 10): at 250 calls/s and an fsync of a
# millisecond or two, the flusher otherwise ran one fsync per call, back to back, each with its
# thread hand-off and loop wake-up. A settled call is committed at once (LMDB, durable against
# a crash or kill -9 of the process); the gap adds at most 20 ms to the time it waits in the
# page cache for the disk (a power loss).
FLUSH_GAP = 0.02


class SipService:
    """Owns the SIP side of a node; ``start()`` binds the listeners of both sides (SPEC §2.1).

    In-dialog requests, ACKs, CANCELs and stray 2xx go to ``dialogs``; a new INVITE to
    the handler given to :meth:`serve_calls` (the call controller).
    """

    def __init__(self, cfg: Config, store: Store, registry: CollectorRegistry | None, loop: Clock,
                 dialogs: Dialogs, *, reuse_port: bool = False, nonce_key: bytes | None = None,
                 flush_gap: float = FLUSH_GAP) -> None:
        """:param reuse_port: bind the listeners with SO_REUSEPORT (one of several SIP workers).
        :param nonce_key: the digest nonce key the node's workers share (None: one of this process's own).
        :param flush_gap: seconds from the start of one fsync of the flusher to the next (FLUSH_GAP).
        """
        self.cfg = cfg
        self.store = store
        self.metrics = SipMetrics(registry)
        self.auth = DigestAuth(cfg.sip.domain, nonce_ttl=cfg.sip.nonce_ttl, algorithms=cfg.sip.digest_algorithms,
                               key=nonce_key)
        self.failures = FailureTracker(threshold=cfg.sip.auth_block_threshold, block_seconds=cfg.sip.auth_block_seconds)
        self.metrics.blocked_sources.set_function(lambda: self.failures.blocked_count)  # read at scrape time
        self.limiter = RateLimiter(cfg.sip.rate_limit, cfg.sip.rate_burst)
        self._trusted_hosts: dict[str, bool] = {}   # is_trusted's answers by host, for the current list
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.inbound.trusted]
        self.transports = Transports(self._on_message, self.metrics, max_tcp_connections=cfg.sip.tcp_max_connections,
                                     may_answer=self._source_admitted, tcp_header_timeout=cfg.sip.tcp_header_timeout,
                                     tcp_body_timeout=cfg.sip.tcp_body_timeout, reuse_port=reuse_port)
        self.registrar = Registrar(store, self.auth, self.metrics, self.failures, self.auth_failed,
                                   min_expires=cfg.sip.min_expires, max_expires=cfg.sip.max_expires)
        self.transports.tls = tls_contexts(cfg)
        self.transactions = TransactionLayer(self.transports, self, self.metrics, loop)
        self.dialogs = dialogs
        self.on_invite: Callable[[ServerTransaction], None] | None = None
        self.draining = False  # SPEC §2.2: new INVITEs and OPTIONS get 503 so peers fail over
        self._flusher: asyncio.Task[None] | None = None
        self._flush_wanted = asyncio.Event()
        self.flush_gap = flush_gap
        self.router: WorkerRouter | None = None   # several workers: messages of another go there

    def join_workers(self, link: WorkerLink, loop: asyncio.AbstractEventLoop) -> None:
        """Be one of the node's SIP workers: what another worker owns is forwarded to it."""
        self.router = WorkerRouter(link, self.transports, self.transactions, self._handle, loop)

    def serve_calls(self, on_invite: Callable[[ServerTransaction], None]) -> None:
        """New INVITEs go to ``on_invite`` from now on (without it they get 503)."""
        self.on_invite = on_invite

    def reconfigure(self, cfg: Config) -> None:
        """A reload (SPEC §2.2): trusted sources, limits and TLS certificates change;
        listeners, connections, transactions and dialogs stay as they are.

        :raises TlsSetupError: the new ``[tls]`` files are unusable (nothing was changed).
        """
        if uses_tls(cfg):  # the files are read again even under the same names (a renewed certificate)
            if self.transports.tls is None:
                self.transports.tls = tls_contexts(cfg)
            else:
                self.transports.tls.reload(cfg.tls)  # new handshakes only: connections keep their session
        self.cfg = cfg
        sip = cfg.sip
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.inbound.trusted]
        self.limiter.rate, self.limiter.burst = sip.rate_limit, sip.rate_burst
        self.failures.threshold, self.failures.block_seconds = sip.auth_block_threshold, sip.auth_block_seconds
        self.transports.max_tcp = sip.tcp_max_connections
        self.registrar.min_expires, self.registrar.max_expires = sip.min_expires, sip.max_expires
        self.registrar.default_expires = min(3600, sip.max_expires)  # as built: the Registrar default, bounded

    async def start(self) -> None:
        if self.router is not None:
            self.router.start()
        for (proto, host, port), side in listeners_by_side(self.cfg).items():
            await self.transports.listen(proto, host, port, side)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.transports.close()
        if self.router is not None:
            self.router.close()
        self.store.flush()

    def flush_soon(self) -> None:
        """Ask for an fsync now (money settled on the call path), off the event loop.

        Commits made meanwhile ride on the same fsync: a group commit, so the loop never
        waits for the disk and N calls ending together cost one flush.
        """
        self._flush_wanted.set()

    async def _flush_periodically(self) -> None:
        """Soft state commits without fsync: flush on request, and at least once a second;
        two flushes start at least ``flush_gap`` apart, and what was asked meanwhile rides on
        the next one."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._flush_wanted.wait(), timeout=1.0)
            except TimeoutError:
                pass
            self._flush_wanted.clear()
            started = loop.time()
            try:
                await asyncio.to_thread(self.store.flush)
            except StoreError:
                pass  # the store logged it (once); keep flushing: the disk may come back
            rest = self.flush_gap - (loop.time() - started)
            if rest > 0:
                await asyncio.sleep(rest)

    # ------------------------------------------------------------ dispatch

    def _on_message(self, msg: SipMessage, peer: Peer) -> None:
        if self.router is not None:
            self.router.on_message(msg, peer)   # forwarded to its owner, or back to _handle
        else:
            self._handle(msg, peer)

    def _handle(self, msg: SipMessage, peer: Peer) -> None:
        if msg.is_request and msg.method != "ACK" and not self._source_admitted(peer.host):
            return
        self.transactions.on_message(msg, peer)

    def _source_admitted(self, host: str) -> bool:
        """May a request from ``host`` be handled -- or a malformed one answered (SPEC §7)?"""
        if self.failures.blocked(host):
            self.metrics.rate_limited.labels("auth_block").inc()
            return False  # silently: a blocked scanner gets nothing to work with
        if not self.limiter.allow(host) and not self.is_trusted(host):
            self.metrics.rate_limited.labels("source").inc()
            return False
        return True

    def auth_failed(self, host: str, method: str, reason: str) -> None:
        """Count an authentication failure; block the source after too many (SPEC §7)."""
        self.metrics.auth_failures.labels(reason, method).inc()
        if self.failures.failure(host):
            self.metrics.auth_blocks.inc()
            log.warning("source blocked after repeated authentication failures",
                        extra={"event": "source_blocked", "source": host, "method": method})

    @property
    def trusted(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The networks of ``[inbound] trusted``; a new list (a reload) forgets every answer."""
        return self._trusted

    @trusted.setter
    def trusted(self, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._trusted = networks
        self._trusted_hosts.clear()

    def is_trusted(self, host: str) -> bool:
        """Is ``host`` one of the carriers of ``[inbound] trusted`` (SPEC §4.3)?

        Asked several times per message (admission, the side of a peer, the Via of a
        response): the answer is kept per host, in at most 4,096 entries (emptied when full, so
        a flood of sources cannot grow it), instead of parsing the address each time."""
        known = self._trusted_hosts.get(host)
        if known is not None:
            return known
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            verdict = False
        else:
            verdict = any(addr in net for net in self._trusted)
        if len(self._trusted_hosts) >= 4096:
            self._trusted_hosts.clear()
        self._trusted_hosts[host] = verdict
        return verdict

    def on_request(self, tx: ServerTransaction) -> None:
        req = tx.request
        method = req.method
        if req.to_tag is not None:  # in-dialog: its session owns it
            if not self.dialogs.on_request(tx):
                tx.respond(481, "Call/Transaction Does Not Exist")
            return
        if tx.peer.proto != "tls" and req.uri is not None and req.uri.scheme == "sips":
            # RFC 5630 §3.1.3: SIPS means TLS on every hop, no last-hop exception (docs/security.md)
            tx.respond(416, "SIPS Requires TLS")
        elif method == "REGISTER":
            if tx.peer.side == "carrier":  # PBXs register on the customer side (SPEC §2.1)
                tx.respond(403, "Registrations are taken on the customer side")
            else:
                self.registrar.handle(tx)
        elif self.draining and method in ("INVITE", "OPTIONS"):
            tx.respond(503, "Draining", headers=[("Retry-After", str(DRAIN_RETRY_AFTER))])
        elif method == "OPTIONS":
            tx.respond(200, headers=[("Allow", ALLOW), ("Accept", "application/sdp"), ("Supported", "")])
        elif method == "INVITE" and tx.peer.side == "carrier" and not self.is_trusted(tx.peer.host):
            # the carrier side hears carriers only: a PBX registers and calls on the customer side
            tx.respond(403, "Not a trusted carrier source")
        elif method == "INVITE":
            if self.on_invite is None:
                tx.respond(503, "Calls not enabled", headers=[("Retry-After", "60")])
            else:
                self.on_invite(tx)
        elif method == "BYE":
            tx.respond(481, "Call/Transaction Does Not Exist")
        else:
            tx.respond(405, headers=[("Allow", ALLOW)])

    def on_ack(self, msg: SipMessage, peer: Peer) -> None:
        self.dialogs.on_ack(msg)

    def on_cancel(self, invite: ServerTransaction, cancel: SipMessage) -> None:
        if not self.dialogs.on_cancel(invite.key, cancel) and invite.state is State.PROCEEDING:
            invite.respond(487)

    def on_stray_response(self, msg: SipMessage, peer: Peer) -> None:
        self.dialogs.on_stray_response(msg)


def uses_tls(cfg: Config) -> bool:
    """A ``tls:`` listener or a carrier reached over TLS."""
    listens = any(proto == "tls" for side in resolve_sides(cfg).values() for proto, _, _ in side.listeners)
    return listens or any(carrier_uses_tls(c.uri) for c in cfg.carriers)


def tls_contexts(cfg: Config) -> TlsContexts | None:
    """The node's TLS contexts when it uses TLS (the files were checked by config.validate)."""
    return TlsContexts.from_config(cfg.tls) if uses_tls(cfg) else None


def listeners_by_side(cfg: Config) -> dict[tuple[str, str, int], str]:
    """Every listener to bind, with its side; one both sides list is bound once (``BOTH``)."""
    out: dict[tuple[str, str, int], str] = {}
    for name, side in resolve_sides(cfg).items():
        for listener in side.listeners:
            out[listener] = BOTH if out.get(listener, name) != name else name
    return out
