"""One sipedge node, and the one place where its objects are built and wired.

Every component gets what it uses as explicit constructor arguments; nothing installs
itself into another object. The two edges of the graph that point upwards (the
transaction layer delivering new INVITEs to the call controller, the relay's packet
thread reporting media timeouts) are connected here, by name, after both ends exist.

The store, the metrics registry, the control API and the SIP edge share one asyncio
loop; the RTP relay runs on its own native thread.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import secrets
import signal
import socket
from pathlib import Path

import uvicorn

from .calls.admission import Admission
from .calls.billing import Billing
from .calls.carriers import CarrierHealth
from .calls.controller import CallController
from .calls.events import OperatorActions
from .calls.media import CallMedia
from .calls.metrics import CallMetrics
from .calls.model import Call, EndReason
from .calls.routing import Routing
from .config import Config, resolve_sides
from .control import registrations
from .control.credit import CreditEngine
from .control.store import Store
from .sip.dialog import Dialogs, Local
from .sip.transport import Peer

log = logging.getLogger("sipedge")

SHUTDOWN_REASON = 'SIP;cause=503;text="Edge shutting down"'


def data_dir_of(cfg: Config, data: str | None) -> Path:
    return Path(data) if data else Path(cfg.storage.path)


def admin_token(cfg: Config, data_dir: Path) -> str:
    """The configured token (env ``SIPEDGE_ADMIN_TOKEN`` wins, applied by config.load), or one
    generated on first start and kept in ``<data>/admin_token`` (mode 0600)."""
    if cfg.api.token:
        return cfg.api.token
    path = data_dir / "admin_token"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def open_store(cfg: Config, data_dir: Path) -> Store:
    return Store(data_dir, map_size=cfg.storage.map_size_mb << 20)


class Node:
    """Owns every long-lived component of a running edge; started and stopped as one.
    Built inside the running event loop (the SIP layers take it as their clock)."""

    def __init__(self, cfg: Config, store: Store, token: str) -> None:
        from admin_api.app import create_app

        from ._rtp import RelayEngine
        from .media.metrics import RtpCollector
        from .media.relay import MediaService
        from .sip.core import SipService

        loop = asyncio.get_running_loop()
        self.cfg = cfg
        self.store = store
        self.app, self.registry = create_app(store, token, registrar=cfg.sip.domain, settings=cfg.api)
        host, _, port = cfg.api.listen.rpartition(":")
        self.api = uvicorn.Server(uvicorn.Config(
            self.app, host=host.strip("[]"), port=int(port), log_level="warning",
            access_log=False, lifespan="on", loop="asyncio",
        ))
        self._stopping = asyncio.Event()

        dialogs = Dialogs(loop)
        self.sip = SipService(cfg, store, self.registry, loop, dialogs)
        self.sides = resolve_sides(cfg)
        customer, carrier = self.sides["customer"], self.sides["carrier"]
        lo, hi = cfg.media.ports
        # relay leg "a" faces the customer side, "b" the carrier side (calls/model.py Side)
        self.engine = RelayEngine(customer.media, lo, hi, quiet_period=cfg.media.quiet_period,
                                  timeout=cfg.media.rtp_timeout, address_b=carrier.media)
        self.registry.register(RtpCollector(self.engine))
        self.media = MediaService(self.engine, loop,
                                  advertise={"a": customer.media_advertise, "b": carrier.media_advertise})

        credit = CreditEngine(store, slice_seconds=cfg.credit.slice_seconds, bundle_minutes=cfg.credit.bundle_minutes)
        self.health = CarrierHealth(cfg.carriers, cfg.health, self.sip.transactions, self.local, self.registry,
                                    cfg.sip.domain)
        routing = Routing(cfg.carriers, lambda profile_id: registrations.live(store, profile_id), cfg.sip.domain,
                          is_up=self.health.is_up)
        sip = self.sip
        admission = Admission(store, credit, routing, sip.auth, sip.failures,
                              count_auth_failure=lambda reason, method: sip.metrics.auth_failures.labels(
                                  reason, method).inc(),
                              refuse_source=sip.auth_failed, profile_rate_limit=cfg.sip.profile_rate_limit)
        self.billing = Billing(store, credit, loop, hangup=self._hangup, flush_soon=sip.flush_soon,
                               max_call_seconds=cfg.credit.max_call_seconds)
        self.calls = CallController(
            tl=sip.transactions, dialogs=dialogs, local=self.local, admission=admission, routing=routing,
            media=CallMedia(self.media, cfg.media.rtp_timeout), metrics=CallMetrics(self.registry),
            # operator actions first: it names the carrier in the live record before billing settles it
            listeners=[OperatorActions(store, loop, calls=lambda cid: self.calls.calls.get(cid), hangup=self._hangup),
                       self.billing], is_trusted=sip.is_trusted, setup_timeout=cfg.sip.setup_timeout)
        # the upward edges: new INVITEs and media timeouts reach the controller
        sip.serve_calls(self.calls.on_invite)
        self.media.on_event = self.calls.on_media_event

    def _hangup(self, call: Call, reason: EndReason, *, status: int = 480, reason_header: str | None = None) -> None:
        self.calls.hangup(call, reason, status=status, reason_header=reason_header)

    def local(self, peer: Peer) -> Local:
        """Via sent-by and Contact of the edge toward ``peer``: its side's listener on its
        transport, named by the side's ``advertise`` address when it has one (SPEC §2.1).

        A peer reached on a listener both sides share is on the carrier side when it is a
        trusted source, else on the customer side (the single-interface rule)."""
        side = peer.side or ("carrier" if self.sip.is_trusted(peer.host) else "customer")
        family = socket.AF_INET6 if ":" in peer.host else socket.AF_INET
        host, port = self.sip.transports.advertised(peer.proto, side, family)
        advertise = self.sides[side].advertise
        # an advertised address stands for the listeners of its family; a DNS name for all
        if advertise and (not _is_ip(advertise) or (":" in advertise) == (":" in host)):
            host = advertise
        name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return Local(name, f"<sip:{name};transport={peer.proto}>")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        # uvicorn (>= 0.29) holds SIGINT/SIGTERM while it serves (Server.capture_signals): a signal
        # ends the API task first, and uvicorn raises it again afterwards for the handlers above
        await self.sip.start()
        self.media.start()
        self.health.start()
        # Everything allocated so far lives as long as the process: keep it out of the
        # cyclic collector, and collect young objects less often (fewer pauses under load).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)
        recovered = self.billing.recover()
        for live in recovered:
            self.calls.bye_recovered(live)
        if recovered:
            log.warning("settled %d calls left by the previous run (CDR end_reason=recovery)", len(recovered))
        api_task = asyncio.create_task(self.api.serve(), name="control-api")
        stop_task = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait({api_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if api_task in done and api_task.exception() is not None:
            raise api_task.exception()  # type: ignore[misc]  # could not bind, for instance
        self.api.should_exit = True
        await api_task
        stop_task.cancel()
        for call in list(self.calls.calls.values()):
            self.calls.hangup(call, EndReason.SHUTDOWN, reason_header=SHUTDOWN_REASON)
        await asyncio.sleep(0.05)  # let the BYEs leave
        self.health.stop()
        await self.sip.stop()
        self.media.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def serve(cfg: Config, store: Store, token: str) -> None:
    """Build the node inside the running loop and run it until a signal stops it."""
    await Node(cfg, store, token).run()
