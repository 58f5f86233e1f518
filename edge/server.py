"""One sipedge node: the store, the metrics registry, the control API and the SIP edge,
all on one asyncio loop (the RTP relay runs on its own native thread).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
from pathlib import Path

import uvicorn

from .config import Config, parse_listen
from .control.store import Store

log = logging.getLogger("sipedge")


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
    """Owns every long-lived component of a running edge; started and stopped as one."""

    def __init__(self, cfg: Config, store: Store, token: str) -> None:
        from admin_api.app import create_app

        self.cfg = cfg
        self.store = store
        self.app, self.registry = create_app(store, token, registrar=cfg.sip.domain)
        host, _, port = cfg.api.listen.rpartition(":")
        self.api = uvicorn.Server(uvicorn.Config(
            self.app, host=host.strip("[]"), port=int(port), log_level="warning",
            access_log=False, lifespan="on", loop="asyncio",
        ))
        self._stopping = asyncio.Event()
        from ._rtp import RelayEngine
        from .b2bua import B2BUA
        from .media.metrics import RtpCollector
        from .media.relay import MediaService
        from .sip.core import SipService

        self.sip = SipService(cfg, store, self.registry)
        lo, hi = cfg.media.ports
        self.engine = RelayEngine(cfg.media.address, lo, hi, quiet_period=cfg.media.quiet_period,
                                  timeout=cfg.media.rtp_timeout)
        self.registry.register(RtpCollector(self.engine))
        self.media = MediaService(self.engine)
        self.b2bua = B2BUA(cfg, store, self.sip, self.media, self.registry)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        self.api.install_signal_handlers = lambda: None  # the node handles signals
        await self.sip.start()
        self.media.start()
        # Everything allocated so far lives as long as the process: keep it out of the
        # cyclic collector, and collect young objects less often (fewer pauses under load).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)
        recovered = self.b2bua.recover()
        if recovered:
            log.warning("settled %d calls left by the previous run (CDR end_reason=recovery)", recovered)
        api_task = asyncio.create_task(self.api.serve(), name="control-api")
        stop_task = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait({api_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if api_task in done and api_task.exception() is not None:
            raise api_task.exception()  # could not bind, for instance
        self.api.should_exit = True
        await api_task
        stop_task.cancel()
        for call in list(self.b2bua.calls.values()):
            self.b2bua.end(call, "shutdown", reason_header='SIP;cause=503;text="Edge shutting down"')
        await asyncio.sleep(0.05)  # let the BYEs leave
        await self.sip.stop()
        self.media.close()

    def listeners(self) -> list[tuple[str, str, int]]:
        return [parse_listen(item) for item in self.cfg.sip.listen]
